// The only file that includes sentencepiece_processor.h (see tokenizer.h).
#include <fstream>
#include <sstream>

#include "engine/tokenizer.h"
#include "sentencepiece_processor.h"

namespace kvmem {
namespace {

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
