// A conversation whose memory is a compressed, per-head KV cache.
//
// AppendTurn: template -> tokens -> prefill (attending to the hot set, blocks recalled by
//             digest score, and causally the turn) -> new positions into blocks -> memory
//             policy (what stays hot) -> commit (one durable write) .
// Generate:   [assistant prefix] -> decode -> sample -> stream -> [suffix] -> commit -> policy,
//             or, when the caller does not keep the text, roll the hot set back.
// New tokens always continue at the absolute position counter, never at the hot length.
#ifndef KVMEM_ENGINE_SESSION_H_
#define KVMEM_ENGINE_SESSION_H_

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/backend.h"
#include "engine/chat_template.h"
#include "engine/generate.h"
#include "engine/kv_blocks.h"
#include "engine/kv_cache.h"
#include "engine/kv_store.h"
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
  // Default: false. Keep the hot entries' keys and values in host memory even when the backend
  // keeps its own copy (Backend::KeepsHotRows): analysis tools that read Session::hot()'s rows
  // need it. Otherwise such a session keeps positions only and reads rows back from its
  // blocks when the backend needs them again.
  bool host_hot_rows = false;
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
  int64_t total_tokens = 0;     // absolute position after the turn
  int64_t hot_tokens = 0;       // summed over (layer, KV head)
  int64_t evicted = 0;          // entries that left hot at this turn boundary
  int64_t recalled_blocks = 0;  // (layer, KV head, block) recalls into this turn
  int64_t warm_hits = 0;        // block reads served from memory
  int64_t cold_reads = 0;       // block reads that went to the cold tier
  double prefill_ms = 0;
  double select_ms = 0;
  double commit_ms = 0;
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
  // Default: none. Polled before every decode step; true cancels and keeps nothing.
  std::function<bool()> cancelled;
};

struct GenerateResult {
  GenerationResult generation;
  int64_t turn_index = -1;     // the kept assistant turn, or -1
  int64_t start_position = 0;  // the session's position when the call began
  int64_t hot_attended = 0;    // hot entries (all heads, all layers) when decoding began
  int64_t evicted = 0;
  double decode_ms = 0;
  double select_ms = 0;
};

struct SessionStats {
  int64_t total_tokens = 0;
  int64_t recalled_blocks = 0;  // since the session was loaded
  int64_t turns = 0;
  std::vector<int64_t> hot_tokens_per_head;  // (layer, KV head)
  int64_t hot_tokens = 0;
  int64_t hot_bytes = 0;  // where attention reads them: Backend::HotEntryBytes per entry
  int64_t blocks = 0;
  int64_t block_bytes = 0;  // estimated as `blocks` in the backend's KV type
};

// Where a session's blocks go and come from, and under which uid it writes them.
struct SessionStorage {
  uint64_t uid = 1;
  std::shared_ptr<BlockSource> source;
  std::shared_ptr<CommitSink> sink;
};

// The durable state a session is restored from (what its commits wrote).
struct SessionSnapshot {
  std::vector<TurnRecord> turns;
  int64_t position = 0;
  std::vector<float> last_logits;
  std::vector<std::vector<int64_t>> hot_positions;   // (layer * num_kv_heads + head)
  std::vector<std::vector<double>> policy_scores;    // MemoryPolicy::SaveState() (may be empty)
  std::vector<std::pair<int64_t, uint64_t>> owners;  // (first block index, owner uid)
};

class Session : private KvRowSource {
 public:
  // INVALID_ARGUMENT for bad memory options or template names; FAILED_PRECONDITION for a
  // model without a tokenizer or a template its tokenizer cannot express.
  // Without `storage.source`/`sink`, the session keeps its blocks in a MemoryBlockStore.
  static absl::StatusOr<std::unique_ptr<Session>> Create(const Model& model, Backend& backend,
                                                         const SessionOptions& options,
                                                         SessionStorage storage = {});
  // Rebuilds a session from its last commit: the hot set is read back from the blocks.
  // DATA_LOSS for a corrupt block; NOT_FOUND for a missing one.
  static absl::StatusOr<std::unique_ptr<Session>> Restore(const Model& model, Backend& backend,
                                                          const SessionOptions& options,
                                                          SessionStorage storage,
                                                          SessionSnapshot snapshot);

  // INVALID_ARGUMENT for empty text; RESOURCE_EXHAUSTED for a turn over max_turn_tokens.
  // On error the session is unchanged.
  absl::StatusOr<AppendResult> AppendTurn(Role role, std::string_view text,
                                          const AppendOptions& options = {});
  // FAILED_PRECONDITION when there is nothing to continue from. A cancelled generation is
  // never kept.
  absl::StatusOr<GenerateResult> Generate(const GenerateOptions& options,
                                          const TextCallback& on_text);

  // A session with the same turns and hot set that shares this one's blocks (no copy) and
  // writes its own under `storage.uid` from here on. Empty storage: this session's store and
  // a fresh uid.
  absl::StatusOr<std::unique_ptr<Session>> Fork(SessionStorage storage = {}) const;
  // The state a restore would rebuild (what the last commit wrote).
  SessionSnapshot Snapshot() const;
  // After a failed commit the in-memory state is ahead of the durable one: every further
  // call fails with FAILED_PRECONDITION and the owner should restore the session.
  bool broken() const { return broken_; }
  uint64_t uid() const { return storage_.uid; }

  SessionStats Stats() const;
  const SessionOptions& options() const { return options_; }
  const std::vector<TurnRecord>& turns() const { return turns_; }
  int64_t position() const { return position_; }
  // Rows live on the host unless the backend keeps them (see SessionOptions::host_hot_rows).
  const KvCache& hot() const { return hot_; }
  int block_size() const { return options_.block_size; }
  // K and V of one committed position and KV head, from wherever its block lives.
  absl::Status ReadPosition(int layer, int64_t position, int kv_head, float* k, float* v);

 private:
  Session(const Model& model, Backend& backend, const SessionOptions& options,
          std::unique_ptr<ChatTemplate> chat_template, std::unique_ptr<MemoryPolicy> policy,
          SessionStorage storage);
  BlockKey KeyOf(int layer, int64_t index) const;
  // Moves positions [committed_, position_) (the last entries of every hot head) into blocks;
  // returns the blocks written (new or rewritten tails) with their digests.
  std::vector<BlockWrite> FillBlocks();
  // Runs the memory policy after a turn of `new_tokens` and drops what it does not keep;
  // returns the number of entries dropped. On error nothing is dropped. queries_on_backend:
  // ForwardResult::observed_queries_on_backend when `queries` are that pass's, else 0.
  absl::StatusOr<int64_t> ApplyPolicy(int64_t new_tokens,
                                      const std::vector<std::vector<float>>& queries, int observed,
                                      uint64_t queries_on_backend = 0);
  // Recall for one layer during prefill (see SessionOptions::recall_blocks).
  absl::Status Recall(int layer, const float* q, int64_t n, AppendResult* stats);
  // KvRowSource: committed positions' rows, for a backend that keeps the hot rows itself.
  // Safe to call from several threads at once (nothing else may run on the session then).
  absl::Status ReadRows(int layer, int kv_head, absl::Span<const int64_t> positions, float* keys,
                        float* values) override;
  absl::Status ReadRowsBf16(int layer, int kv_head, absl::Span<const int64_t> positions,
                            uint16_t* keys, uint16_t* values) override;
  absl::Status ReadLayerRows(int layer, absl::Span<const KvRowRef> rows, float* keys,
                             float* values) override;
  absl::Status ReadLayerRowsBf16(int layer, absl::Span<const KvRowRef> rows, uint16_t* keys,
                                 uint16_t* values) override;
  // Pointers into the blocks (live tail, in flight or read from storage) of `dtype`.
  absl::Status LocateLayerRows(int layer, absl::Span<const KvRowRef> rows, BlockDType dtype,
                               const void** keys, const void** values,
                               std::vector<std::shared_ptr<const KvBlock>>* holds) override;
  // Reads row i = row_at(i) (a KvRowRef) of `layer` into keys and values + i * head_dim, for i
  // in [0, n): as f32 or as bf16 bits (E), from the blocks.
  template <typename RowAt, typename E>
  absl::Status ReadRowsAt(int layer, size_t n, const RowAt& row_at, E* keys, E* values);
  // A block of this session from the live tail, the blocks in flight, or storage (then kept
  // in flight, so a pass reads each block once).
  absl::StatusOr<std::shared_ptr<const KvBlock>> FindBlock(int layer, int64_t index);
  // When the rows live with the backend and it has no copy of this cache (after a restore, a
  // fork or an error), reads the blocks of every hot position into the blocks in flight, so
  // the backend's upload finds them in memory (not in storage, under its device lock).
  // DATA_LOSS or NOT_FOUND for a damaged or missing block; nothing changes then.
  absl::Status PrefetchHotBlocks();
  // Makes the turn just applied durable; marks the session broken on failure.
  absl::Status Commit(const TurnRecord& turn, std::vector<BlockWrite> blocks);

  const Model& model_;
  Backend& backend_;
  SessionOptions options_;
  std::unique_ptr<ChatTemplate> template_;
  std::unique_ptr<MemoryPolicy> policy_;
  SessionStorage storage_;
  KvCache hot_;
  std::vector<TurnRecord> turns_;
  int64_t position_ = 0;
  int64_t committed_ = 0;                             // positions held in blocks
  std::vector<float> last_logits_;                    // (vocab) after the last committed token
  std::vector<std::pair<int64_t, uint64_t>> owners_;  // (first block index, owner uid)
  std::vector<std::shared_ptr<KvBlock>> tails_;       // (layer) partial last block or null
  // (layer) -> (block index) -> (num_kv_heads, 2, head_dim) digests.
  std::vector<std::vector<std::vector<float>>> digests_;
  int64_t recalled_blocks_ = 0;
  bool broken_ = false;
  // Blocks ReadRows may need, held for the call in flight: those FillBlocks wrote (until the
  // commit lands), those recall and ReadRows read, and those PrefetchHotBlocks read.
  std::map<std::pair<int, int64_t>, std::shared_ptr<const KvBlock>> blocks_in_flight_;
  // Guards blocks_in_flight_ while ReadRows runs on several threads (a backend's upload); the
  // session's own thread changes it only between backend calls.
  std::mutex blocks_mu_;
};

}  // namespace kvmem

#endif  // KVMEM_ENGINE_SESSION_H_
