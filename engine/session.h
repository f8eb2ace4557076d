// A conversation whose memory is a compressed, per-head KV cache.
//
// AppendTurn: template -> tokens -> prefill (attending to the hot set and, causally, the turn)
//             -> commit the new positions to the block table -> memory policy (what stays hot).
// Generate:   [assistant prefix] -> decode -> sample -> stream -> [suffix] -> commit -> policy,
//             or, when the caller does not keep the text, roll the hot set back.
// New tokens always continue at the absolute position counter, never at the hot length.
#ifndef KVMEM_ENGINE_SESSION_H_
#define KVMEM_ENGINE_SESSION_H_

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/backend.h"
#include "engine/chat_template.h"
#include "engine/generate.h"
#include "engine/kv_blocks.h"
#include "engine/kv_cache.h"
#include "engine/memory_policy.h"
#include "engine/model.h"

namespace kvmem {

struct SessionOptions {
  // Default: "raw". Chat template name (see chat_template.h).
  std::string chat_template = "raw";
  // Default: snapkv, budget 1024, window 32, kernel 7, max pooling.
  MemoryOptions memory;
  // Default: 16. Positions per KV block.
  int block_size = 16;
  // Default: 8192. Tokens one turn may hold; longer turns are RESOURCE_EXHAUSTED.
  int max_turn_tokens = 8192;
  // Default: 8. Blocks per (layer, KV head) that a turn may recall from outside the hot set
  // into its attention, chosen by digest score; 0 disables recall.
  int recall_blocks = 8;
};

struct TurnRecord {
  Role role = Role::kUser;
  std::string text;
  std::vector<int32_t> tokens;
  int64_t first_position = 0;
};

struct AppendOptions {
  // Default: false. Return the logits of every token of the turn (analysis, simulations).
  bool return_logits = false;
  // Default: 0. Return the post-RoPE queries of the turn's last `return_queries` tokens.
  int return_queries = 0;
};

struct AppendResult {
  int64_t turn_index = 0;
  int64_t turn_tokens = 0;
  int64_t total_tokens = 0;  // absolute position after the turn
  int64_t hot_tokens = 0;    // summed over (layer, KV head)
  int64_t evicted = 0;       // entries that left hot at this turn boundary
  double prefill_ms = 0;
  double select_ms = 0;
  // Only when asked through AppendOptions:
  std::vector<float> logits;  // (turn_tokens, vocab)
  // Per layer (num_heads, min(return_queries, turn_tokens), head_dim).
  std::vector<std::vector<float>> queries;
};

struct GenerateOptions {
  SamplingParams sampling;
  // Default: true. Keep the generated text as the assistant turn; false leaves the session
  // exactly as it was.
  bool keep = true;
};

struct GenerateResult {
  GenerationResult generation;
  int64_t turn_index = -1;  // the kept assistant turn, or -1
  int64_t hot_attended = 0; // hot entries (all heads, all layers) when decoding began
  int64_t evicted = 0;
  double decode_ms = 0;
  double select_ms = 0;
};

struct SessionStats {
  int64_t total_tokens = 0;
  int64_t turns = 0;
  std::vector<int64_t> hot_tokens_per_head;  // (layer, KV head)
  int64_t hot_tokens = 0;
  int64_t hot_bytes = 0;
  int64_t blocks = 0;
  int64_t block_bytes = 0;
};

class Session {
 public:
  // INVALID_ARGUMENT for bad memory options or template names; FAILED_PRECONDITION for a
  // model without a tokenizer or a template its tokenizer cannot express.
  static absl::StatusOr<std::unique_ptr<Session>> Create(const Model& model, Backend& backend,
                                                         const SessionOptions& options);

  // INVALID_ARGUMENT for empty text; RESOURCE_EXHAUSTED for a turn over max_turn_tokens.
  // On error the session is unchanged.
  absl::StatusOr<AppendResult> AppendTurn(Role role, std::string_view text,
                                          const AppendOptions& options = {});
  // FAILED_PRECONDITION when there is nothing to continue from. A cancelled generation is
  // never kept.
  absl::StatusOr<GenerateResult> Generate(const GenerateOptions& options,
                                          const TextCallback& on_text);

  // An independent copy: same turns, hot set and blocks; the two diverge from here.
  absl::StatusOr<std::unique_ptr<Session>> Fork() const;

  SessionStats Stats() const;
  const SessionOptions& options() const { return options_; }
  const std::vector<TurnRecord>& turns() const { return turns_; }
  int64_t position() const { return position_; }
  const KvCache& hot() const { return hot_; }
  const BlockTable& blocks() const { return blocks_; }

 private:
  Session(const Model& model, Backend& backend, const SessionOptions& options,
          std::unique_ptr<ChatTemplate> chat_template, std::unique_ptr<MemoryPolicy> policy);
  // Copies positions [blocks_.positions(), position_) from the hot set into the block table.
  void CommitBlocks();
  // Runs the memory policy after a turn of `new_tokens` and drops what it does not keep.
  int64_t ApplyPolicy(int64_t new_tokens, const std::vector<std::vector<float>>& queries,
                      int observed);

  const Model& model_;
  Backend& backend_;
  SessionOptions options_;
  std::unique_ptr<ChatTemplate> template_;
  std::unique_ptr<MemoryPolicy> policy_;
  KvCache hot_;
  BlockTable blocks_;
  std::vector<TurnRecord> turns_;
  int64_t position_ = 0;
  std::vector<float> last_logits_;  // (vocab) after the last committed token
};

}  // namespace kvmem

#endif  // KVMEM_ENGINE_SESSION_H_
