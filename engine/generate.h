// The decode loop shared by offline completion and sessions: sample -> stream text -> feed.
#ifndef KVMEM_ENGINE_GENERATE_H_
#define KVMEM_ENGINE_GENERATE_H_

#include <functional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/backend.h"
#include "engine/model.h"
#include "engine/sampler.h"

namespace kvmem {

enum class FinishReason { kLength, kEos, kStop, kCancelled };
const char* FinishReasonName(FinishReason reason);

// Turns generated token ids into text deltas as they arrive. Text is held back while it ends
// in an incomplete UTF-8 sequence or could still grow into a stop string.
class TextStream {
 public:
  // `context` holds the tokens just before the generated ones (a few suffice): sentencepiece
  // drops a leading space at the start of a decode, so text is decoded after that context.
  TextStream(const Tokenizer& tokenizer, std::vector<int> context, std::vector<std::string> stop);

  // Adds one generated token and returns the text that became safe to emit (often empty).
  // Sets *stopped when a stop string is now complete; the text then ends before it.
  std::string Push(int token, bool* stopped);
  // At the end of generation: the text still held back.
  std::string Flush();
  // Everything generated so far, cut before a stop string.
  const std::string& text() const { return text_; }

 private:
  const Tokenizer& tokenizer_;
  std::vector<int> ids_;  // context followed by generated tokens
  std::string base_;      // decoded context
  std::vector<std::string> stop_;
  size_t hold_ = 0;       // longest stop string minus one
  std::string text_;
  size_t emitted_ = 0;
  bool stopped_ = false;
};

struct GenerationResult {
  std::vector<int32_t> tokens;  // generated ids; an ending EOS is not included
  std::string text;             // decoded, cut before a stop string
  FinishReason finish = FinishReason::kLength;
  int64_t decode_steps = 0;     // forward passes run while decoding
  // Logits after the last token fed (the request's logits when none was fed).
  std::vector<float> last_logits;
};

// Called with each text delta; returning false cancels generation.
using TextCallback = std::function<bool(std::string_view delta)>;

struct DecodeRequest {
  // Logits (vocab) of the last token already in `kv`.
  std::vector<float> logits;
  // Position the first generated token takes; advanced past every token fed.
  int64_t* next_position = nullptr;
  // Tokens before the generation, for detokenisation (see TextStream).
  std::vector<int> context;
  // Default: true. Feed the final generated token too, so `kv` holds every returned token.
  bool feed_final_token = true;
  // Options of every decode step's forward pass (observe_last = 1 to collect queries).
  ForwardOptions forward_options;
  // Called after each decode step's forward pass, when set.
  std::function<void(const ForwardResult&)> on_forward;
  // Polled before every step, when set: true cancels (FinishReason::kCancelled) even while
  // no text is emitted.
  std::function<bool()> cancelled;
};

// Samples up to params.max_tokens tokens, streaming text through on_text. Stops at EOS
// (unless ignored), a stop string, max_tokens or cancellation.
absl::StatusOr<GenerationResult> DecodeTokens(const Model& model, Backend& backend, KvCache* kv,
                                              DecodeRequest request, const SamplingParams& params,
                                              const TextCallback& on_text);

// Offline completion: BOS + the encoded prompt, prefill, then DecodeTokens (without feeding
// the final token).
absl::StatusOr<GenerationResult> Complete(const Model& model, Backend& backend,
                                          std::string_view prompt, const SamplingParams& params,
                                          const TextCallback& on_text);

}  // namespace kvmem

#endif  // KVMEM_ENGINE_GENERATE_H_
