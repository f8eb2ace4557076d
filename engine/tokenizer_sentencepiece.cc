// The only file that includes sentencepiece_processor.h (see tokenizer.h).
#include <fstream>
#include <sstream>
#include <string>
#include <string_view>
#include <vector>

#include "engine/tokenizer.h"
#include "sentencepiece_processor.h"

namespace kvmem {
namespace {

// Sentinels EncodeContinuation puts in front of the text, tried in order. U+E000 (private use)
// is in no trained vocabulary, so no piece can join it to the text (byte fallback spells it in
// byte pieces of its own); "<unk>" is Hugging Face's choice, for normalizers that drop U+E000.
constexpr std::string_view kSentinels[] = {"\xEE\x80\x80", "<unk>"};

// True when the first alone.size() pieces of `joined` are `alone`, spell exactly `sentinel`
// and lie before its end, and every later piece starts at or after that end: the encoding of
// sentinel + text then splits exactly between the two. (A normalizer that dropped the
// sentinel would leave no pieces spelling it.)
bool SplitsAfterSentinel(const std::vector<int>& alone,
                         const sentencepiece::ImmutableSentencePieceText& joined,
                         std::string_view sentinel) {
  if (joined.pieces_size() < alone.size()) return false;
  std::string spelled;
  for (size_t i = 0; i < joined.pieces_size(); ++i) {
    const auto piece = joined.pieces(static_cast<int>(i));
    if (i < alone.size()) {
      if (static_cast<int>(piece.id()) != alone[i] || piece.end() > sentinel.size()) return false;
      spelled += piece.surface();
    } else if (piece.begin() < sentinel.size()) {
      return false;
    }
  }
  return spelled == sentinel;
}

class SentencePieceTokenizer : public Tokenizer {
 public:
  bool Load(const std::string& path, std::string* error) {
    std::ifstream in(path, std::ios::binary);
    if (!in) {
      *error = "cannot open tokenizer " + path;
      return false;
    }
    std::ostringstream buf;
    buf << in.rdbuf();
    serialized_ = buf.str();
    auto status = processor_.LoadFromSerializedProto(serialized_);
    if (!status.ok()) {
      *error = "cannot load sentencepiece model " + path + ": " + status.ToString();
      return false;
    }
    return true;
  }

  bool Encode(std::string_view text, std::vector<int>* ids, std::string* error) const override {
    ids->clear();
    auto status = processor_.Encode(std::string(text), ids);
    if (!status.ok()) {
      *error = status.ToString();
      return false;
    }
    return true;
  }

  // Encodes a sentinel followed by the text and drops the sentinel's pieces, as Hugging
  // Face's LlamaTokenizer (legacy=False) does with its unk token: the dummy prefix then lands
  // on the sentinel. The result is used only where the sentinel's pieces are exactly
  // Encode(sentinel) and end where the text begins; otherwise a piece joined the sentinel to
  // the text (or the normalizer changed the sentinel) and the next sentinel is tried.
  bool EncodeContinuation(std::string_view text, std::vector<int>* ids,
                          std::string* error) const override {
    ids->clear();
    if (text.empty()) return true;
    for (std::string_view sentinel : kSentinels) {
      std::vector<int> alone;
      auto status = processor_.Encode(std::string(sentinel), &alone);
      if (!status.ok()) {
        *error = status.ToString();
        return false;
      }
      sentencepiece::ImmutableSentencePieceText joined;
      status = processor_.Encode(std::string(sentinel) + std::string(text), joined.mutable_proto());
      if (!status.ok()) {
        *error = status.ToString();
        return false;
      }
      if (!SplitsAfterSentinel(alone, joined, sentinel)) continue;
      for (size_t i = alone.size(); i < joined.pieces_size(); ++i) {
        ids->push_back(static_cast<int>(joined.pieces(static_cast<int>(i)).id()));
      }
      return true;
    }
    *error = "cannot encode \"" + std::string(text) +
             "\" as a continuation: its start joins every sentinel into one piece";
    return false;
  }

  std::string Decode(const std::vector<int>& ids) const override {
    std::vector<int> valid;
    valid.reserve(ids.size());
    for (int id : ids) {
      if (id >= 0 && id < processor_.GetPieceSize()) valid.push_back(id);
    }
    std::string text;
    processor_.Decode(valid, &text).IgnoreError();
    return text;
  }

  int vocab_size() const override { return processor_.GetPieceSize(); }
  int bos_id() const override { return processor_.bos_id(); }
  int eos_id() const override { return processor_.eos_id(); }

  int PieceToId(std::string_view piece) const override {
    int id = processor_.PieceToId(std::string(piece));
    // sentencepiece answers unk for pieces it lacks; tell the two apart.
    if (id == processor_.unk_id() && processor_.IdToPiece(id) != piece) return -1;
    return id;
  }

  const std::string& serialized_model() const override { return serialized_; }

 private:
  sentencepiece::SentencePieceProcessor processor_;
  std::string serialized_;
};

}  // namespace

std::unique_ptr<Tokenizer> Tokenizer::LoadSentencePiece(const std::string& path,
                                                        std::string* error) {
  auto tokenizer = std::make_unique<SentencePieceTokenizer>();
  if (!tokenizer->Load(path, error)) return nullptr;
  return tokenizer;
}

}  // namespace kvmem
