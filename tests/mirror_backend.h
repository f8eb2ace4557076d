// A test backend that keeps its own copy of every hot row, as the CUDA backend keeps one on the
// device, and computes with the CPU reference on that copy only. Sessions over it keep
// positions and fresh rows on the host (KvCache::RowHome::kBackend), so the session's side of
// that contract (fresh rows, KvCache::ReadRows, head versions, read-back from blocks on several
// threads) is tested without a GPU. The copy is brought up to date the way the CUDA backend
// does it: by head versions, reading the rows it lacks through the cache.
#ifndef KVMEM_TESTS_MIRROR_BACKEND_H_
#define KVMEM_TESTS_MIRROR_BACKEND_H_

#include <algorithm>
#include <atomic>
#include <cstring>
#include <memory>
#include <utility>
#include <vector>

#include "engine/backend.h"
#include "engine/block_memory.h"
#include "engine/cpu_backend.h"
#include "engine/kv_blocks.h"
#include "engine/model.h"
#include "engine/safetensors.h"
#include "engine/snapkv.h"
#include "engine/status_macros.h"
#include "engine/thread_pool.h"

namespace kvmem {

class MirrorBackend : public Backend {
 public:
  MirrorBackend(const Model& model, CpuBackend* cpu) : model_(model), cpu_(cpu) {}

  const char* name() const override { return "mirror"; }
  bool KeepsHotRows() const override { return true; }
  // Rows read back through KvCache::ReadLayerRows (what a device would upload).
  int64_t rows_read() const { return rows_read_; }
  // bf16 read-backs that differ from the f32 read of the same rows (must stay 0).
  int64_t bf16_mismatches() const { return bf16_mismatches_; }
  // Makes SelectSnapKv fail, as a device out of memory would.
  void set_select_fails(bool fails) { select_fails_ = fails; }
  // Plays a bf16 device: each pass's new rows are rounded to bf16 (to nearest even) in the copy
  // and handed over as bf16 fresh rows, rows are read back as bf16 (KvCache::ReadRowsBf16),
  // and sessions' blocks take `blocks` (Backend::KvDType).
  void set_bf16_rows(BlockDType blocks) {
    bf16_rows_ = true;
    block_dtype_ = blocks;
  }
  BlockDType KvDType() const override { return block_dtype_; }
  // Plays a device that reads rows in place from pinned blocks (as the CUDA backend does once
  // engine/block_memory.h's pool is installed): rows KvCache::LocateLayerRows points at are
  // taken from there.
  void set_reads_in_place(bool in_place) { reads_in_place_ = in_place; }
  // Rows taken from where LocateLayerRows pointed.
  int64_t rows_read_in_place() const { return rows_in_place_; }
  // Located rows whose values differ from ReadLayerRows' (must stay 0), and located rows outside
  // the pinned pool, which a device could not read (must stay 0 while the pool has room).
  int64_t in_place_mismatches() const { return in_place_mismatches_; }
  int64_t rows_outside_pool() const { return rows_outside_pool_; }

  absl::Status Forward(absl::Span<const int32_t> tokens, int64_t start_pos, KvCache* kv,
                       const ForwardOptions& options, ForwardResult* result) override {
    if (kv->host_rows()) return cpu_->Forward(tokens, start_pos, kv, options, result);
    if (kv->attachment() == nullptr) {
      const ModelConfig& c = model_.config();
      auto mirror = std::make_shared<Mirror>(Mirror{
          KvCache(c.num_layers, c.num_kv_heads, c.head_dim),
          std::vector<uint64_t>(static_cast<size_t>(c.num_layers) * c.num_kv_heads, ~uint64_t{0})});
      kv->set_attachment(mirror);
    }
    Mirror& m = *static_cast<Mirror*>(kv->attachment().get());
    KVMEM_RETURN_IF_ERROR(Sync(*kv, m, 0, kv->num_layers()));
    ForwardOptions inner = options;
    if (options.before_attention) {
      // Recall edits the session's cache; the copy catches up before the layer attends.
      inner.before_attention = [&](int layer, const float* q, int64_t n, KvCache*) {
        KVMEM_RETURN_IF_ERROR(options.before_attention(layer, q, n, kv));
        return Sync(*kv, m, layer, layer + 1);
      };
    }
    absl::Status s = cpu_->Forward(tokens, start_pos, &m.rows, inner, result);
    if (!s.ok()) {
      std::fill(m.versions.begin(), m.versions.end(), ~uint64_t{0});  // rebuild next time
      return s;
    }
    // Hand the new rows over as fresh rows and their positions to every head.
    const int64_t n = static_cast<int64_t>(tokens.size());
    const int kvh = kv->num_kv_heads(), hd = kv->head_dim();
    for (int l = 0; l < kv->num_layers(); ++l) {
      std::vector<float> k(static_cast<size_t>(n) * kvh * hd), v(k.size());
      for (int g = 0; g < kvh && bf16_rows_; ++g) {
        HeadKv& h = m.rows.head(l, g);
        for (size_t i = (h.size() - n) * hd; i < h.keys.size(); ++i) {
          h.keys[i] = BFloat16ToFloat(Bf16Rne(h.keys[i]));
          h.values[i] = BFloat16ToFloat(Bf16Rne(h.values[i]));
        }
      }
      for (int g = 0; g < kvh; ++g) {
        const HeadKv& h = std::as_const(m.rows).head(l, g);
        for (int64_t t = 0; t < n; ++t) {
          const int64_t e = h.size() - n + t;
          std::memcpy(&k[(t * kvh + g) * hd], &h.keys[e * hd], hd * sizeof(float));
          std::memcpy(&v[(t * kvh + g) * hd], &h.values[e * hd], hd * sizeof(float));
        }
      }
      if (bf16_rows_) {
        // As a bf16 device does: the rows are handed over as bf16 bits.
        std::vector<uint16_t> k16(k.size()), v16(v.size());
        for (size_t i = 0; i < k.size(); ++i) {
          k16[i] = Bf16Rne(k[i]);
          v16[i] = Bf16Rne(v[i]);
        }
        kv->AppendFresh(l, start_pos, n, BlockDType::kBF16, k16.data(), v16.data());
      } else {
        kv->AppendFresh(l, start_pos, n, k.data(), v.data());
      }
      for (int g = 0; g < kvh; ++g) {
        const size_t i = static_cast<size_t>(l) * kvh + g;
        const bool in_step = m.versions[i] == kv->version(l, g);
        HeadKv& head = kv->head(l, g);
        for (int64_t t = 0; t < n; ++t) head.positions.push_back(start_pos + t);
        m.versions[i] = in_step ? kv->version(l, g) : ~uint64_t{0};
      }
    }
    return absl::OkStatus();
  }

  absl::StatusOr<std::vector<std::vector<int64_t>>> SelectSnapKv(
      const KvCache& kv, const SnapKvOptions& options,
      const std::vector<std::vector<float>>& queries, int w, uint64_t) override {
    if (select_fails_) return absl::ResourceExhaustedError("no memory for SnapKV's workspace");
    if (kv.attachment() == nullptr) return absl::UnimplementedError("no copy of this cache");
    Mirror& m = *static_cast<Mirror*>(kv.attachment().get());
    KVMEM_RETURN_IF_ERROR(Sync(kv, m, 0, kv.num_layers()));
    std::vector<std::vector<int64_t>> keep;
    for (int l = 0; l < kv.num_layers(); ++l) {
      std::vector<const HeadKv*> heads;
      for (int g = 0; g < kv.num_kv_heads(); ++g)
        heads.push_back(&std::as_const(m.rows).head(l, g));
      for (auto& k : kvmem::SelectSnapKv(options, queries[l].data(), model_.config().num_heads, w,
                                         heads, model_.config().sliding_window)) {
        keep.push_back(std::move(k));
      }
    }
    return keep;
  }

 private:
  struct Mirror {
    KvCache rows;                    // kHost: the backend's copy
    std::vector<uint64_t> versions;  // (layer, kv_head) of the session's cache last synced
  };

  // Rebuilds every head of [first, last) whose version changed: rows the copy holds stay,
  // the others are read back through the cache, for all heads at once on the shared thread
  // pool (as the CUDA backend reads them).
  absl::Status Sync(const KvCache& kv, Mirror& m, int first, int last) {
    const int kvh = kv.num_kv_heads(), hd = kv.head_dim();
    std::vector<int> changed;  // layer * kvh + head
    for (int i = first * kvh; i < last * kvh; ++i) {
      if (m.versions[i] != kv.version(i / kvh, i % kvh)) changed.push_back(i);
    }
    std::vector<std::vector<float>> mk(changed.size()), mv(changed.size());
    // By layer, as the CUDA backend uploads: every changed head's missing rows in one read,
    // ordered by position (KvCache::ReadLayerRows), on the shared thread pool.
    std::vector<std::vector<size_t>> of_layer(kv.num_layers());  // indices into `changed`
    for (size_t c = 0; c < changed.size(); ++c) of_layer[changed[c] / kvh].push_back(c);
    std::vector<absl::Status> status(kv.num_layers());
    std::atomic<int64_t> read{0};
    SharedThreadPool().ParallelFor(kv.num_layers(), [&](int64_t b, int64_t e) {
      for (int l = static_cast<int>(b); l < e; ++l) {
        std::vector<KvRowRef> refs;
        for (size_t c : of_layer[l]) {
          const int g = changed[c] % kvh;
          const HeadKv& held = std::as_const(m.rows).head(l, g);
          for (int64_t p : kv.head(l, g).positions) {
            if (!std::binary_search(held.positions.begin(), held.positions.end(), p)) {
              refs.push_back({p, g});
            }
          }
        }
        std::sort(refs.begin(), refs.end(), [](const KvRowRef& x, const KvRowRef& y) {
          return x.position != y.position ? x.position < y.position : x.head < y.head;
        });
        std::vector<float> k(refs.size() * hd), v(k.size());
        if (bf16_rows_) {
          // As a bf16 device reads them: bf16 bits, widened here for the f32 copy.
          std::vector<uint16_t> k16(k.size()), v16(k.size());
          status[l] = kv.ReadLayerRowsBf16(l, refs, k16.data(), v16.data());
          // The f32 read of the same rows must agree bit for bit (every value is a bf16).
          std::vector<float> k32(k.size()), v32(k.size());
          if (status[l].ok()) status[l] = kv.ReadLayerRows(l, refs, k32.data(), v32.data());
          for (size_t i = 0; i < k.size(); ++i) {
            k[i] = BFloat16ToFloat(k16[i]);
            v[i] = BFloat16ToFloat(v16[i]);
            if (status[l].ok() && (std::memcmp(&k[i], &k32[i], sizeof(float)) != 0 ||
                                   std::memcmp(&v[i], &v32[i], sizeof(float)) != 0)) {
              ++bf16_mismatches_;
            }
          }
        } else {
          status[l] = kv.ReadLayerRows(l, refs, k.data(), v.data());
        }
        if (reads_in_place_ && status[l].ok()) status[l] = ReadInPlace(kv, l, refs, &k, &v);
        // Each head's rows in position order, as the rebuild below takes them.
        for (size_t i = 0; i < refs.size(); ++i) {
          size_t c = 0;
          while (changed[of_layer[l][c]] % kvh != refs[i].head) ++c;
          const size_t at = of_layer[l][c];
          mk[at].insert(mk[at].end(), &k[i * hd], &k[i * hd] + hd);
          mv[at].insert(mv[at].end(), &v[i * hd], &v[i * hd] + hd);
        }
        read += static_cast<int64_t>(refs.size());
      }
    });
    for (const absl::Status& s : status) KVMEM_RETURN_IF_ERROR(s);
    rows_read_ += read.load();
    for (size_t c = 0; c < changed.size(); ++c) {
      const int l = changed[c] / kvh, g = changed[c] % kvh;
      const HeadKv& want = kv.head(l, g);
      const HeadKv& held = std::as_const(m.rows).head(l, g);
      HeadKv rebuilt;
      size_t next_missing = 0;
      for (int64_t p : want.positions) {
        auto it = std::lower_bound(held.positions.begin(), held.positions.end(), p);
        if (it != held.positions.end() && *it == p) {
          const int64_t e = it - held.positions.begin();
          rebuilt.Append(p, &held.keys[e * hd], &held.values[e * hd], hd);
        } else {
          rebuilt.Append(p, &mk[c][next_missing * hd], &mv[c][next_missing * hd], hd);
          ++next_missing;
        }
      }
      m.rows.head(l, g) = std::move(rebuilt);
      m.versions[changed[c]] = kv.version(l, g);
    }
    return absl::OkStatus();
  }

  // Replaces the rows of `refs` that LocateLayerRows points at with the values found there
  // (k and v hold every row as ReadLayerRows gave it; they must agree).
  absl::Status ReadInPlace(const KvCache& kv, int layer, const std::vector<KvRowRef>& refs,
                           std::vector<float>* k, std::vector<float>* v) {
    const int hd = kv.head_dim();
    std::vector<const void*> kp(refs.size()), vp(refs.size());
    std::vector<std::shared_ptr<const KvBlock>> holds;
    KVMEM_RETURN_IF_ERROR(
        kv.LocateLayerRows(layer, refs, block_dtype_, kp.data(), vp.data(), &holds));
    std::vector<float> row(hd);
    PinnedRange range;
    for (size_t i = 0; i < refs.size(); ++i) {
      if (kp[i] == nullptr) continue;
      ++rows_in_place_;
      if (!FindPinnedRange(kp[i], &range) || !FindPinnedRange(vp[i], &range)) ++rows_outside_pool_;
      for (int part = 0; part < 2; ++part) {
        const void* at = part == 0 ? kp[i] : vp[i];
        float* out = (part == 0 ? k->data() : v->data()) + i * hd;
        for (int d = 0; d < hd; ++d) {
          row[d] = block_dtype_ == BlockDType::kF32
                       ? static_cast<const float*>(at)[d]
                       : BFloat16ToFloat(static_cast<const uint16_t*>(at)[d]);
        }
        if (std::memcmp(row.data(), out, hd * sizeof(float)) != 0) ++in_place_mismatches_;
        std::memcpy(out, row.data(), hd * sizeof(float));
      }
    }
    return absl::OkStatus();
  }

  const Model& model_;
  CpuBackend* cpu_;
  int64_t rows_read_ = 0;
  bool reads_in_place_ = false;
  std::atomic<int64_t> rows_in_place_{0};
  std::atomic<int64_t> in_place_mismatches_{0};
  std::atomic<int64_t> rows_outside_pool_{0};
  std::atomic<int64_t> bf16_mismatches_{0};
  bool select_fails_ = false;
  bool bf16_rows_ = false;
  BlockDType block_dtype_ = BlockDType::kF32;
};

}  // namespace kvmem

#endif  // KVMEM_TESTS_MIRROR_BACKEND_H_
