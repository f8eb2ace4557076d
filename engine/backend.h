// The interface every compute backend (CPU reference, CUDA) implements.
#ifndef KVMEM_ENGINE_BACKEND_H_
#define KVMEM_ENGINE_BACKEND_H_

#include <cstdint>
#include <functional>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "engine/kv_blocks.h"
#include "engine/kv_cache.h"
#include "engine/snapkv.h"

namespace kvmem {

struct ForwardOptions {
  // Default: false. True returns logits for every input token, false only for the last.
  bool all_logits = false;
  // Default: 0. Keep the post-RoPE queries of the last `observe_last` input tokens of every
  // layer (SnapKV's observation window and recall scoring read them).
  int observe_last = 0;
  // Called for every layer once the new tokens' queries and keys exist (RoPE applied) and
  // before the new keys join `kv`: recall inserts older entries into the layer's heads here
  // (keeping each head sorted by position). q is (n, num_heads, head_dim). An error aborts the
  // pass; `kv` may then hold part of it.
  std::function<absl::Status(int layer, const float* q, int64_t n, KvCache* kv)> before_attention;
  // Default: 0 (all). When positive, before_attention receives only the queries of the last
  // min(hook_query_rows, n) tokens (q holds those rows and n counts them): a device backend
  // then copies only those to the host.
  int hook_query_rows = 0;
};

struct ForwardResult {
  std::vector<float> logits;  // (all_logits ? n : 1, vocab)
  // Per layer, (num_heads, observed, head_dim) with observed = min(observe_last, n).
  std::vector<std::vector<float>> observed_queries;
  // Default: 0. Nonzero when the backend also kept observed_queries where it computes (the
  // CUDA backend: on the device, after a multi-token pass): passed to SelectSnapKv together
  // with exactly these queries, it spares sending them back. The backend drops them at the
  // cache's next pass or selection; a stale value is ignored.
  uint64_t observed_queries_on_backend = 0;
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual const char* name() const = 0;

  // Runs `tokens` at absolute positions start_pos, start_pos + 1, ... Each token attends to
  // every entry `kv` holds for its KV head (all at positions < start_pos) and causally to the
  // new tokens before it; the new tokens' K/V are appended to every head of `kv`.
  // INVALID_ARGUMENT for token ids outside the vocabulary or start_pos not beyond `kv`;
  // on error `kv` is unchanged.
  virtual absl::Status Forward(absl::Span<const int32_t> tokens, int64_t start_pos, KvCache* kv,
                               const ForwardOptions& options, ForwardResult* result) = 0;

  // True when the backend keeps its own copy of the hot rows (the GPU's) and can run on a
  // cache whose rows live with it (KvCache::RowHome::kBackend): a session then keeps only
  // positions and fresh rows on the host. Forward on such a cache appends positions to every
  // head and the new rows to the fresh rows. Backends that answer false need kHost caches.
  virtual bool KeepsHotRows() const { return false; }
  // The type a session's blocks take: the backend's KV type. Its fresh rows must hold values of
  // that type exactly (a bf16 device's rows are bf16 values), so storing them loses nothing.
  virtual BlockDType KvDType() const { return BlockDType::kF32; }

  // Bytes the backend keeps per hot entry (key, value and its position where stored): what a
  // session's hot set costs where attention reads it (device memory for the CUDA backend).
  virtual int64_t HotEntryBytes(int head_dim) const {
    return 2 * static_cast<int64_t>(head_dim) * static_cast<int64_t>(sizeof(float));
  }

  // Recall's digest scores (Session::Recall) where the backend keeps its own copy of `kv`:
  // scores (num_kv_heads, blocks) with scores[g][b] the max, over the query heads h of KV head
  // g's group and the last w of the n query rows of q (n, num_heads, head_dim), of
  // DigestScore(q row, head g's digest of block b), bit-identical to that host loop.
  // digests[b] is block b's (num_kv_heads, 2, head_dim); between calls for one cache, blocks
  // are only appended and only the last one may change. UNIMPLEMENTED when the backend has no
  // such path: the caller then scores on the host.
  virtual absl::StatusOr<std::vector<float>> ScoreRecallBlocks(
      const KvCache& kv, int layer, const float* q, int64_t n, int w,
      const std::vector<std::vector<float>>& digests) {
    return absl::UnimplementedError("this backend scores recall candidates on the host");
  }

  // SelectSnapKv (engine/snapkv.h) for every layer of `kv`, run where the backend keeps its
  // own copy of the cache (the CUDA backend: on the device), returning the same entries.
  // queries: per layer (num_heads, w, head_dim), the last w entries' queries of every head.
  // queries_on_backend: 0, or the ForwardResult::observed_queries_on_backend of the pass that
  // produced exactly `queries` on this cache; the backend then reads its own copy of them.
  // Result: (layer, KV head) lists of ascending entry indices to keep. UNIMPLEMENTED when the
  // backend has no such path: the caller then selects on the host.
  virtual absl::StatusOr<std::vector<std::vector<int64_t>>> SelectSnapKv(
      const KvCache& kv, const SnapKvOptions& options,
      const std::vector<std::vector<float>>& queries, int w, uint64_t queries_on_backend) {
    return absl::UnimplementedError("this backend selects SnapKV on the host");
  }
};

}  // namespace kvmem

#endif  // KVMEM_ENGINE_BACKEND_H_
