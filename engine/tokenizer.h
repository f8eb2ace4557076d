// Text <-> token ids.
//
// This header deliberately includes no abseil header: sentencepiece_processor.h (0.1.97)
// declares its own absl::string_view shim, so the sentencepiece implementation lives in one
// .cc file that sees only this interface. Errors come back as strings; model.cc turns them
// into statuses.
#ifndef KVMEM_ENGINE_TOKENIZER_H_
#define KVMEM_ENGINE_TOKENIZER_H_

#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace kvmem {

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;

  // Loads a sentencepiece model (tokenizer.model). On failure returns null and sets *error.
  static std::unique_ptr<Tokenizer> LoadSentencePiece(const std::string& path, std::string* error);

  // Encodes text as the start of a string, without BOS/EOS: sentencepiece adds its
  // dummy-prefix space as trained, so "day" becomes "▁day". On failure returns false and sets
  // *error.
  virtual bool Encode(std::string_view text, std::vector<int>* ids, std::string* error) const = 0;
  // Encodes text as the continuation of a string: the ids `text` gets when it follows other
  // text in one Encode call at a piece boundary, i.e. without the dummy-prefix space. "day"
  // then does not start a word and "\n" is just the newline, while " day" still becomes
  // "▁day". The tokenizer's whitespace normalization applies as to any string: where it
  // strips a string's trailing spaces, it strips this text's too. On success `ids` holds
  // the ids (empty for empty text); on failure returns false and sets *error. The default
  // fails, so that fakes which never encode need not implement it.
  virtual bool EncodeContinuation(std::string_view text, std::vector<int>* ids,
                                  std::string* error) const {
    ids->clear();
    *error = "this tokenizer cannot encode text as a continuation";
    return false;
  }
  // Decodes ids to text. Out-of-range ids decode to nothing.
  virtual std::string Decode(const std::vector<int>& ids) const = 0;
  virtual int vocab_size() const = 0;
  virtual int bos_id() const = 0;
  virtual int eos_id() const = 0;
  // The id of a piece (a special token such as "<|im_start|>"), or -1 when it has none.
  virtual int PieceToId(std::string_view piece) const = 0;
  // The model file's bytes, hashed into the model fingerprint.
  virtual const std::string& serialized_model() const = 0;
};

}  // namespace kvmem

#endif  // KVMEM_ENGINE_TOKENIZER_H_
