// The device copy of a session's hot set: attaching it to a KvCache, bringing it up to date
// (uploads through pinned staging, gathers), and the work that reads it in place (device
// SnapKV, recall scoring). See engine/cuda_backend_internal.h.
#include "engine/block_memory.h"
#include "engine/cuda_backend_internal.h"

namespace kvmem {
namespace cuda_internal {

template <typename T>
absl::StatusOr<DeviceKv<T>*> CudaBackend<T>::Attach(KvCache* kv, std::shared_ptr<void>* stale) {
  if (DeviceKv<T>* existing = OwnCopy(*kv)) return existing;
  *stale = kv->attachment();
  auto dkv = std::make_shared<DeviceKv<T>>();
  dkv->ctx = ctx_;
  dkv->owner = id_;
  dkv->head_dim = config_.head_dim;
  dkv->heads.resize(static_cast<size_t>(config_.num_layers) * config_.num_kv_heads);
  DeviceKv<T>* raw = dkv.get();
  kv->set_attachment(std::static_pointer_cast<void>(std::shared_ptr<DeviceKvBase>(std::move(dkv))));
  return raw;
}

// Makes room for `rows` rows, keeping the rows held (rounded up generously so a growing head
// reallocates rarely).
template <typename T>
absl::Status CudaBackend<T>::Reserve(DeviceKv<T>& dkv, DeviceHead<T>& head, int64_t rows) {
  if (rows <= head.capacity) return absl::OkStatus();
  const int hd = dkv.head_dim;
  const int64_t capacity = std::max<int64_t>({rows, head.capacity * 2, 256});
  KVMEM_ASSIGN_OR_RETURN(uint8_t * base,
                         AllocAsync<uint8_t>(DeviceHead<T>::Bytes(capacity, hd), ctx_->stream));
  DeviceHead<T> grown;
  grown.base = base;
  grown.capacity = capacity;
  const int64_t held = static_cast<int64_t>(head.mirrored.size());
  if (held > 0) {
    cudaStream_t s = ctx_->stream;
    cudaError_t err = cudaMemcpyAsync(grown.keys(hd), head.keys(hd), held * hd * sizeof(T),
                                      cudaMemcpyDeviceToDevice, s);
    if (err == cudaSuccess) {
      err = cudaMemcpyAsync(grown.values(hd), head.values(hd), held * hd * sizeof(T),
                            cudaMemcpyDeviceToDevice, s);
    }
    if (err == cudaSuccess) {
      err = cudaMemcpyAsync(grown.positions(hd), head.positions(hd), held * sizeof(int64_t),
                            cudaMemcpyDeviceToDevice, s);
    }
    if (err != cudaSuccess) {
      cudaGetLastError();
      cudaFreeAsync(base, s);
      return CudaStatus(err, "growing a device KV head", __FILE__, __LINE__);
    }
  }
  if (head.base != nullptr) KVMEM_CUDA_RETURN_IF_ERROR(cudaFreeAsync(head.base, ctx_->stream));
  head.base = grown.base;
  head.capacity = capacity;
  return absl::OkStatus();
}

// Brings every head of layers [first_layer, last_layer) whose version changed up to date with
// the host: one packed upload for all of them, one scatter of the uploaded rows and one gather
// for the heads that must be rebuilt.
template <typename T>
absl::Status CudaBackend<T>::SyncHeads(const KvCache& kv, DeviceKv<T>& dkv, int first_layer,
                                       int last_layer) {
  ReleaseReadsInPlace();
  const int kvh = config_.num_kv_heads, hd = config_.head_dim;
  struct Pending {
    int index;  // into dkv.heads
    KvSyncPlan plan;
  };
  std::vector<Pending> pending;
  for (int l = first_layer; l < last_layer; ++l) {
    for (int g = 0; g < kvh; ++g) {
      const int i = l * kvh + g;
      if (dkv.heads[i].version != kv.version(l, g)) pending.push_back({i, {}});
    }
  }
  // Plans are independent merge walks over each head's positions (after a SnapKV turn at 8B,
  // 256 heads of 16K: ~9 ms on one core of an H100 machine): many run on the thread pool.
  int64_t planned_positions = 0;
  for (const Pending& p : pending) {
    planned_positions += static_cast<int64_t>(dkv.heads[p.index].mirrored.size()) +
                         static_cast<int64_t>(kv.head(p.index / kvh, p.index % kvh).size());
  }
  auto plan_range = [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      const int i = pending[j].index;
      pending[j].plan = PlanKvSync(dkv.heads[i].mirrored, kv.head(i / kvh, i % kvh).positions);
    }
  };
  if (pending.size() > 1 && planned_positions > (int64_t{1} << 16)) {
    SharedThreadPool().ParallelFor(static_cast<int64_t>(pending.size()), plan_range);
  } else {
    plan_range(0, static_cast<int64_t>(pending.size()));
  }
  int64_t upload_rows = 0;
  size_t changed = 0;
  for (Pending& p : pending) {
    DeviceHead<T>& dh = dkv.heads[p.index];
    if (p.plan.unchanged(static_cast<int64_t>(dh.mirrored.size()))) {
      dh.version = kv.version(p.index / kvh, p.index % kvh);
      continue;
    }
    upload_rows += static_cast<int64_t>(p.plan.uploads.size());
    if (&pending[changed] != &p) pending[changed] = std::move(p);
    ++changed;
  }
  pending.resize(changed);
  if (pending.empty()) return absl::OkStatus();
  // Should anything below fail, the pending heads' rows are in an unknown state: make the next
  // sync upload them whole (the host holds every entry, or reads it back from its blocks).
  struct ForgetOnError {
    std::vector<DeviceHead<T>*> heads;
    bool done = false;
    ~ForgetOnError() {
      if (done) return;
      for (DeviceHead<T>* h : heads) {
        h->mirrored.clear();
        h->version = ~uint64_t{0};
      }
    }
  } forget;
  for (const Pending& p : pending) forget.heads.push_back(&dkv.heads[p.index]);

  // Room for the uploads: after the kept prefix (in place) or past every held row (gather).
  for (Pending& p : pending) {
    DeviceHead<T>& dh = dkv.heads[p.index];
    if (!p.plan.gather) dh.mirrored.resize(p.plan.keep);
    KVMEM_RETURN_IF_ERROR(
        Reserve(dkv, dh, static_cast<int64_t>(dh.mirrored.size() + p.plan.uploads.size())));
  }

  prof_.Mark("sync heads: plans, reserve");
  // Uploads, in chunks through the two pinned staging slots: rows are converted to T while
  // packed on the host, copied on the copy stream, and scattered to their rows on the compute
  // stream, so packing chunk i + 1 overlaps the copy of chunk i and the scatter of chunk i - 1.
  if (upload_rows > 0) {
    int slot_index = 0;
    int64_t rows = 0;
    // Of the chunk's rows: how many the device reads from pinned blocks by address.
    int64_t addressed = 0;
    auto flush = [&]() -> absl::Status {
      if (rows == 0) return absl::OkStatus();
      UploadSlot& slot = uploads_.slots[slot_index];
      const UploadLayout layout = uploads_.Layout(rows, hd);
      KVMEM_CUDA_RETURN_IF_ERROR(cudaStreamWaitEvent(uploads_.stream, slot.device_free, 0));
      // A chunk read wholly by address sends no rows, only where they are and where they go;
      // one with no row read by address sends no source addresses.
      const size_t from = addressed == rows ? layout.positions : 0;
      const size_t to = addressed == 0 ? layout.src_keys : layout.bytes;
      KVMEM_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(slot.device + from, slot.host + from, to - from,
                                                 cudaMemcpyHostToDevice, uploads_.stream));
      KVMEM_CUDA_RETURN_IF_ERROR(cudaEventRecord(slot.host_free, uploads_.stream));
      KVMEM_CUDA_RETURN_IF_ERROR(cudaStreamWaitEvent(ctx_->stream, slot.host_free, 0));
      ScatterKvRowsParams<T> sp;
      sp.keys = reinterpret_cast<const T*>(slot.device + layout.keys);
      sp.values = reinterpret_cast<const T*>(slot.device + layout.values);
      sp.positions = reinterpret_cast<const int64_t*>(slot.device + layout.positions);
      sp.dst_keys = reinterpret_cast<T* const*>(slot.device + layout.dst_keys);
      sp.dst_values = reinterpret_cast<T* const*>(slot.device + layout.dst_values);
      sp.dst_positions = reinterpret_cast<int64_t* const*>(slot.device + layout.dst_positions);
      if (addressed > 0) {
        sp.src_keys = reinterpret_cast<const T* const*>(slot.device + layout.src_keys);
        sp.src_values = reinterpret_cast<const T* const*>(slot.device + layout.src_values);
      }
      sp.rows = rows;
      sp.head_dim = hd;
      KVMEM_CUDA_RETURN_IF_ERROR(LaunchScatterKvRows(sp, ctx_->stream));
      KVMEM_CUDA_RETURN_IF_ERROR(cudaEventRecord(slot.device_free, ctx_->stream));
      slot_index = 1 - slot_index;
      rows = 0;
      addressed = 0;
      return absl::OkStatus();
    };
    const int64_t chunk_rows = uploads_.slot_rows;
    // The rows of one chunk: upload `u` of pending head `pending`, in slot row order.
    struct Item {
      int32_t pending;
      int64_t u;
    };
    std::vector<Item> chunk;
    chunk.reserve(static_cast<size_t>(chunk_rows));
    // Per row of the chunk, when rows may be read by address: 1 where the scatter reads it from
    // its pinned block.
    std::vector<uint8_t> chunk_addressed;
    // The blocks the device reads by address stay alive until the stream has run the scatters
    // that read them: whichever way this scope is left, they join reads_in_place_.
    struct KeepUntilRead {
      std::vector<std::shared_ptr<const KvBlock>>* keep;
      std::mutex mu;
      std::vector<std::shared_ptr<const KvBlock>> blocks;
      ~KeepUntilRead() {
        keep->insert(keep->end(), std::make_move_iterator(blocks.begin()),
                     std::make_move_iterator(blocks.end()));
      }
    } held{&reads_in_place_, {}, {}};
    // Packs `chunk` into the current slot (at a full slot's layout, compacted when partial) and
    // sends it. Runs of one layer's rows (the chunk goes layer by layer, each layer's rows
    // ordered by position across its heads) are packed on the shared thread pool: each run reads
    // its rows back first when the cache keeps them with the backend, in one layer read that
    // sweeps each block once (KvCache::ReadLayerRows may be called from several threads), then
    // converts them to T.
    auto pack_and_flush = [&]() -> absl::Status {
      if (chunk.empty()) return absl::OkStatus();
      UploadSlot& slot = uploads_.slots[slot_index];
      // The slot's previous copy must be done before its pinned memory is rewritten.
      KVMEM_CUDA_RETURN_IF_ERROR(cudaEventSynchronize(slot.host_free));
      const UploadLayout full = uploads_.Layout(chunk_rows, hd);
      constexpr int64_t kRunRows = 512;
      auto layer_of = [&](const Item& item) { return pending[item.pending].index / kvh; };
      std::vector<std::pair<int64_t, int64_t>> runs;  // [begin, end) of chunk, one layer each
      for (int64_t b = 0; b < static_cast<int64_t>(chunk.size());) {
        int64_t e = b + 1;
        while (e < static_cast<int64_t>(chunk.size()) && e - b < kRunRows &&
               layer_of(chunk[e]) == layer_of(chunk[b])) {
          ++e;
        }
        runs.push_back({b, e});
        b = e;
      }
      const bool read_back = !kv.host_rows();
      // A bf16 device reads rows back as bf16 bits (KvCache::ReadLayerRowsBf16): no f32 round
      // trip.
      constexpr bool kBf16Rows = std::is_same_v<T, __nv_bfloat16>;
      // Rows in blocks of the pinned pool (engine/block_memory.h) are not packed: the scatter
      // reads them where they lie, by address. The rest are read back and packed as before.
      const bool by_address = read_back && PinnedBlockPoolInstalled();
      constexpr BlockDType kBlockType = std::is_same_v<T, float>    ? BlockDType::kF32
                                        : std::is_same_v<T, __half> ? BlockDType::kF16
                                                                    : BlockDType::kBF16;
      if (by_address) chunk_addressed.assign(chunk.size(), 0);
      std::atomic<int64_t> chunk_by_address{0};
      std::mutex error_mu;
      absl::Status error;
      auto pack_runs = [&](int64_t first_run, int64_t last_run) {
        std::vector<KvRowRef> refs, unlocated;
        std::vector<float> read_keys, read_values;
        std::vector<uint16_t> read_k16, read_v16;
        std::vector<const void*> at_keys, at_values;
        std::vector<std::shared_ptr<const KvBlock>> run_holds;
        PinnedRange key_slab, value_slab;  // the slabs the last rows were found in
        auto device_address = [](const void* p, PinnedRange* slab) -> const void* {
          if (p == nullptr || (!slab->Contains(p) && !FindPinnedRange(p, slab))) return nullptr;
          return static_cast<const char*>(p) + slab->device_offset;
        };
        for (int64_t r = first_run; r < last_run; ++r) {
          const auto [begin, end] = runs[r];
          const int layer = layer_of(chunk[begin]);
          // Rows of this run packed into the slot (all but those read by address).
          int64_t packed = end - begin;
          if (read_back) {
            refs.clear();
            for (int64_t k = begin; k < end; ++k) {
              const Pending& p = pending[chunk[k].pending];
              const int head = p.index % kvh;
              refs.push_back({kv.head(layer, head).positions[p.plan.uploads[chunk[k].u]], head});
            }
            absl::Status s;
            if (by_address) {
              at_keys.resize(refs.size());
              at_values.resize(refs.size());
              s = kv.LocateLayerRows(layer, refs, kBlockType, at_keys.data(), at_values.data(),
                                     &run_holds);
              unlocated.clear();
              for (int64_t k = begin; s.ok() && k < end; ++k) {
                const void* key = device_address(at_keys[k - begin], &key_slab);
                const void* value = device_address(at_values[k - begin], &value_slab);
                if (key == nullptr || value == nullptr) {
                  unlocated.push_back(refs[k - begin]);
                  continue;
                }
                chunk_addressed[k] = 1;
                reinterpret_cast<const void**>(slot.host + full.src_keys)[k] = key;
                reinterpret_cast<const void**>(slot.host + full.src_values)[k] = value;
              }
              packed = static_cast<int64_t>(unlocated.size());
              chunk_by_address += end - begin - packed;
            }
            const bool all = packed == end - begin;
            const std::vector<KvRowRef>& to_read = all ? refs : unlocated;
            if (s.ok() && packed > 0) {
              if constexpr (kBf16Rows) {
                // Straight into the slot when every row is packed: a session's bf16 blocks are
                // copied as they are.
                if (all) {
                  s = kv.ReadLayerRowsBf16(
                      layer, refs, reinterpret_cast<uint16_t*>(slot.host + full.keys) + begin * hd,
                      reinterpret_cast<uint16_t*>(slot.host + full.values) + begin * hd);
                } else {
                  read_k16.resize(to_read.size() * hd);
                  read_v16.resize(read_k16.size());
                  s = kv.ReadLayerRowsBf16(layer, to_read, read_k16.data(), read_v16.data());
                }
              } else {
                read_keys.resize(to_read.size() * hd);
                read_values.resize(read_keys.size());
                s = kv.ReadLayerRows(layer, to_read, read_keys.data(), read_values.data());
              }
            }
            if (!s.ok()) {
              std::lock_guard<std::mutex> lock(error_mu);
              if (error.ok()) error = std::move(s);
              continue;
            }
          }
          const bool all_packed = packed == end - begin;
          int64_t next_read = 0;  // index into the rows read back
          for (int64_t k = begin; k < end; ++k) {
            const Pending& p = pending[chunk[k].pending];
            DeviceHead<T>& dh = dkv.heads[p.index];
            const HeadKv& src = kv.head(layer, p.index % kvh);
            // Rows [0, mirrored.size()) stay; upload u lands at row mirrored.size() + u.
            const int64_t u = chunk[k].u;
            const int64_t e = p.plan.uploads[u];
            const int64_t row = static_cast<int64_t>(dh.mirrored.size()) + u;
            const bool addressed_row = by_address && chunk_addressed[k] != 0;
            if (!addressed_row) {
              const int64_t m = next_read++;
              T* slot_key = reinterpret_cast<T*>(slot.host + full.keys) + k * hd;
              T* slot_value = reinterpret_cast<T*>(slot.host + full.values) + k * hd;
              if (kBf16Rows && read_back) {
                if (!all_packed) {  // else already in the slot
                  std::memcpy(static_cast<void*>(slot_key), &read_k16[m * hd], hd * sizeof(T));
                  std::memcpy(static_cast<void*>(slot_value), &read_v16[m * hd], hd * sizeof(T));
                }
              } else {
                const float* key = read_back ? &read_keys[m * hd] : &src.keys[e * hd];
                const float* value = read_back ? &read_values[m * hd] : &src.values[e * hd];
                RowsFromFloat(key, hd, slot_key);
                RowsFromFloat(value, hd, slot_value);
              }
            }
            reinterpret_cast<int64_t*>(slot.host + full.positions)[k] = src.positions[e];
            reinterpret_cast<T**>(slot.host + full.dst_keys)[k] = dh.keys(hd) + row * hd;
            reinterpret_cast<T**>(slot.host + full.dst_values)[k] = dh.values(hd) + row * hd;
            reinterpret_cast<int64_t**>(slot.host + full.dst_positions)[k] = dh.positions(hd) + row;
          }
        }
        if (!run_holds.empty()) {
          std::lock_guard<std::mutex> lock(held.mu);
          held.blocks.insert(held.blocks.end(), std::make_move_iterator(run_holds.begin()),
                             std::make_move_iterator(run_holds.end()));
        }
      };
      // A few rows (a recalled block or two) are not worth waking the pool.
      const int64_t runs_count = static_cast<int64_t>(runs.size());
      if (static_cast<int64_t>(chunk.size()) < 4 * kRunRows) {
        pack_runs(0, runs_count);
      } else {
        SharedThreadPool().ParallelFor(runs_count, pack_runs);
      }
      KVMEM_RETURN_IF_ERROR(error);
      rows = static_cast<int64_t>(chunk.size());
      addressed = chunk_by_address.load();
      upload_stats_.rows_packed += rows - addressed;
      upload_stats_.rows_by_address += addressed;
      chunk.clear();
      const UploadLayout layout = uploads_.Layout(rows, hd);
      if (rows < chunk_rows) {
        // A partial chunk: move its sections from the full-slot layout to the compact one.
        const UploadLayout& compact = layout;
        const size_t kv_bytes = static_cast<size_t>(rows) * hd * sizeof(T);
        std::memmove(slot.host + compact.values, slot.host + full.values, kv_bytes);
        std::memmove(slot.host + compact.positions, slot.host + full.positions,
                     rows * sizeof(int64_t));
        std::memmove(slot.host + compact.dst_keys, slot.host + full.dst_keys, rows * sizeof(void*));
        std::memmove(slot.host + compact.dst_values, slot.host + full.dst_values,
                     rows * sizeof(void*));
        std::memmove(slot.host + compact.dst_positions, slot.host + full.dst_positions,
                     rows * sizeof(void*));
        if (addressed > 0) {
          std::memmove(slot.host + compact.src_keys, slot.host + full.src_keys,
                       rows * sizeof(void*));
          std::memmove(slot.host + compact.src_values, slot.host + full.src_values,
                       rows * sizeof(void*));
        }
      }
      if (addressed > 0 && addressed < rows) {
        // Packed rows are read from their place in the slot's device copy.
        for (int64_t k = 0; k < rows; ++k) {
          if (chunk_addressed[k] != 0) continue;
          reinterpret_cast<const void**>(slot.host + layout.src_keys)[k] =
              slot.device + layout.keys + k * hd * sizeof(T);
          reinterpret_cast<const void**>(slot.host + layout.src_values)[k] =
              slot.device + layout.values + k * hd * sizeof(T);
        }
      }
      return flush();
    };
    // Layer by layer (pending heads come in layer order), each layer's uploads merged across its
    // heads by position, so that a layer's rows are read in one sweep through its blocks.
    std::vector<size_t> next;  // per pending head of the layer: its next upload
    for (size_t first = 0; first < pending.size();) {
      size_t last = first + 1;
      while (last < pending.size() && pending[last].index / kvh == pending[first].index / kvh) {
        ++last;
      }
      const int layer = pending[first].index / kvh;
      next.assign(last - first, 0);
      for (;;) {
        // The head whose next upload has the smallest position (heads are few: a scan).
        size_t best = last;
        int64_t best_position = 0;
        for (size_t i = first; i < last; ++i) {
          const KvSyncPlan& plan = pending[i].plan;
          if (next[i - first] == plan.uploads.size()) continue;
          const int64_t position =
              kv.head(layer, pending[i].index % kvh).positions[plan.uploads[next[i - first]]];
          if (best == last || position < best_position) {
            best = i;
            best_position = position;
          }
        }
        if (best == last) break;
        chunk.push_back({static_cast<int32_t>(best), static_cast<int64_t>(next[best - first]++)});
        if (static_cast<int64_t>(chunk.size()) == chunk_rows) {
          KVMEM_RETURN_IF_ERROR(pack_and_flush());
        }
      }
      first = last;
    }
    KVMEM_RETURN_IF_ERROR(pack_and_flush());
  }

  prof_.Mark("sync heads: uploads");
  // Heads rebuilt by a gather into fresh allocations, all in one launch.
  std::vector<Pending*> gathers;
  int32_t max_keep = 0;
  for (Pending& p : pending) {
    if (!p.plan.gather) continue;
    gathers.push_back(&p);
    max_keep = std::max<int32_t>(max_keep, static_cast<int32_t>(p.plan.sources.size()));
  }
  // Buffers the gather replaces, freed (in stream order) however this function returns.
  struct FreeOnExit {
    cudaStream_t stream;
    std::vector<void*> bases;
    ~FreeOnExit() {
      for (void* b : bases) {
        if (b != nullptr) cudaFreeAsync(b, stream);
      }
    }
  } old_bases{ctx_->stream, {}};
  if (!gathers.empty()) {
    const int count = static_cast<int>(gathers.size());
    std::vector<const T*> src_keys(count), src_values(count);
    std::vector<const int64_t*> src_positions(count);
    std::vector<int32_t> src_lengths(count), keep_counts(count);
    std::vector<T*> dst_keys(count), dst_values(count);
    std::vector<int64_t*> dst_positions(count);
    std::vector<int32_t> keep(static_cast<size_t>(count) * std::max<int32_t>(max_keep, 1), 0);
    int32_t max_length = 0;
    for (int j = 0; j < count; ++j) {
      const Pending& p = *gathers[j];
      DeviceHead<T>& dh = dkv.heads[p.index];
      src_keys[j] = dh.keys(hd);
      src_values[j] = dh.values(hd);
      src_positions[j] = dh.positions(hd);
      src_lengths[j] = static_cast<int32_t>(dh.mirrored.size() + p.plan.uploads.size());
      max_length = std::max(max_length, src_lengths[j]);
      keep_counts[j] = static_cast<int32_t>(p.plan.sources.size());
      std::copy(p.plan.sources.begin(), p.plan.sources.end(),
                keep.begin() + static_cast<size_t>(j) * std::max<int32_t>(max_keep, 1));
      // The rebuilt head: room for what it keeps plus a growth margin.
      const int64_t capacity = std::max<int64_t>(256, keep_counts[j] + keep_counts[j] / 4);
      KVMEM_ASSIGN_OR_RETURN(uint8_t * base,
                             AllocAsync<uint8_t>(DeviceHead<T>::Bytes(capacity, hd), ctx_->stream));
      old_bases.bases.push_back(dh.base);
      dh.base = base;
      dh.capacity = capacity;
      dst_keys[j] = dh.keys(hd);
      dst_values[j] = dh.values(hd);
      dst_positions[j] = dh.positions(hd);
    }
    // Packed: [src keys | src values | src positions | dst keys | dst values | dst positions |
    // src lengths | keep counts | keep], pointers first so everything stays aligned.
    std::vector<uint8_t> packed;
    auto put = [&](const void* src, size_t bytes) {
      const uint8_t* b = static_cast<const uint8_t*>(src);
      packed.insert(packed.end(), b, b + bytes);
    };
    const size_t ptrs = count * sizeof(void*);
    put(src_keys.data(), ptrs);
    put(src_values.data(), ptrs);
    put(src_positions.data(), ptrs);
    put(dst_keys.data(), ptrs);
    put(dst_values.data(), ptrs);
    put(dst_positions.data(), ptrs);
    put(src_lengths.data(), count * sizeof(int32_t));
    put(keep_counts.data(), count * sizeof(int32_t));
    put(keep.data(), keep.size() * sizeof(int32_t));
    Scratch<uint8_t> dev;
    KVMEM_RETURN_IF_ERROR(dev.Allocate(packed.size(), ctx_->stream));
    KVMEM_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(dev.get(), packed.data(), packed.size(),
                                               cudaMemcpyHostToDevice, ctx_->stream));
    uint8_t* d = dev.get();
    KvGatherParams<T> gp;
    gp.src.keys = reinterpret_cast<const T* const*>(d);
    gp.src.values = reinterpret_cast<const T* const*>(d + ptrs);
    gp.src.positions = reinterpret_cast<const int64_t* const*>(d + 2 * ptrs);
    gp.dst_keys = reinterpret_cast<T* const*>(d + 3 * ptrs);
    gp.dst_values = reinterpret_cast<T* const*>(d + 4 * ptrs);
    gp.dst_positions = reinterpret_cast<int64_t* const*>(d + 5 * ptrs);
    gp.src.lengths = reinterpret_cast<const int32_t*>(d + 6 * ptrs);
    gp.keep_counts = reinterpret_cast<const int32_t*>(d + 6 * ptrs + count * sizeof(int32_t));
    gp.keep = reinterpret_cast<const int32_t*>(d + 6 * ptrs + 2 * count * sizeof(int32_t));
    gp.src.num_kv_heads = count;
    gp.src.head_dim = hd;
    gp.src.max_length = max_length;
    gp.keep_stride = std::max<int32_t>(max_keep, 1);
    gp.max_keep = max_keep;
    KVMEM_CUDA_RETURN_IF_ERROR(LaunchGatherKv(gp, ctx_->stream));
    prof_.Mark("sync heads: gather");
  }

  // The device now holds exactly the host's positions.
  for (Pending& p : pending) {
    DeviceHead<T>& dh = dkv.heads[p.index];
    const int l = p.index / kvh, g = p.index % kvh;
    dh.mirrored = kv.head(l, g).positions;
    dh.version = kv.version(l, g);
  }
  forget.done = true;
  return absl::OkStatus();
}

template <typename T>
absl::Status CudaBackend<T>::AllocateTables(Scratch<uint8_t>* memory, HeadTables<T>* tables) {
  const size_t heads = static_cast<size_t>(config_.num_layers) * config_.num_kv_heads;
  KVMEM_RETURN_IF_ERROR(
      memory->Allocate(heads * (3 * sizeof(void*) + sizeof(int32_t)), ctx_->stream));
  uint8_t* base = memory->get();
  tables->keys = reinterpret_cast<T**>(base);
  tables->values = reinterpret_cast<T**>(base + heads * sizeof(void*));
  tables->positions = reinterpret_cast<int64_t**>(base + 2 * heads * sizeof(void*));
  tables->lengths = reinterpret_cast<int32_t*>(base + 3 * heads * sizeof(void*));
  return absl::OkStatus();
}

template <typename T>
absl::StatusOr<std::vector<std::vector<int64_t>>> CudaBackend<T>::SelectSnapKv(
    const KvCache& kv, const SnapKvOptions& options, const std::vector<std::vector<float>>& queries,
    int w, uint64_t queries_on_backend) {
  const ModelConfig& c = config_;
  const int L = c.num_layers, kvh = c.num_kv_heads;
  if (kv.num_layers() != L || kv.num_kv_heads() != kvh || kv.head_dim() != c.head_dim ||
      static_cast<int>(queries.size()) != L || w <= 0 || options.budget <= w) {
    return absl::InvalidArgumentError("SelectSnapKv: queries per layer and 0 < w < budget");
  }
  const size_t per_layer = static_cast<size_t>(c.num_heads) * w * c.head_dim;
  for (const std::vector<float>& q : queries) {
    if (q.size() != per_layer) return absl::InvalidArgumentError("SelectSnapKv: query shape");
  }
  std::lock_guard<std::recursive_mutex> lock(ctx_->mu);
  KVMEM_CUDA_RETURN_IF_ERROR(cudaSetDevice(ctx_->device));
  DeviceKv<T>* dkv = OwnCopy(kv);
  if (dkv == nullptr) {
    // No device copy (the cache never ran here): selecting on the host is cheaper than a
    // whole upload.
    return absl::UnimplementedError("the cache has no copy on this device");
  }
  cudaStream_t s = ctx_->stream;
  prof_.Begin(options_.profile_ops, s);
  const OpProfiler::EndOnExit end_profile{&prof_};
  KVMEM_RETURN_IF_ERROR(SyncHeads(kv, *dkv, 0, L));
  prof_.Mark("snapkv: sync heads");
  int32_t max_length = 0;
  for (const DeviceHead<T>& dh : dkv->heads) {
    max_length = std::max<int32_t>(max_length, static_cast<int32_t>(dh.mirrored.size()));
  }
  Scratch<uint8_t> table_mem, workspace;
  HeadTables<T> tables;
  KVMEM_RETURN_IF_ERROR(AllocateTables(&table_mem, &tables));
  KVMEM_RETURN_IF_ERROR(UploadTables(*dkv, 0, L, 0, tables));
  // The queries: the device's own copy when the caller passes the pass's (same layout), else
  // the host's, uploaded. Either way the kept copy is used up: the next pass would replace it.
  Scratch<float> d_queries;
  const float* queries_device = nullptr;
  if (queries_on_backend != 0 && queries_on_backend == dkv->observed_id &&
      dkv->observed_rows == w) {
    queries_device = dkv->observed;
    upload_stats_.snapkv_queries_kept++;
  } else {
    KVMEM_RETURN_IF_ERROR(d_queries.Allocate(per_layer * L, s));
    for (int l = 0; l < L; ++l) {
      KVMEM_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(d_queries.get() + per_layer * l,
                                                 queries[l].data(), per_layer * sizeof(float),
                                                 cudaMemcpyHostToDevice, s));
    }
    queries_device = d_queries.get();
  }
  prof_.Mark("snapkv: tables, queries up");
  const int budget = options.budget;
  Scratch<int32_t> keep, counts;
  KVMEM_RETURN_IF_ERROR(keep.Allocate(static_cast<size_t>(L) * kvh * budget, s));
  KVMEM_RETURN_IF_ERROR(counts.Allocate(static_cast<size_t>(L) * kvh, s));
  const size_t ws = SnapKvWorkspaceBytes(c.num_heads, kvh, w, max_length);
  KVMEM_RETURN_IF_ERROR(workspace.Allocate(ws, s));
  // Every layer's pooled scores, then one top-k over all L * kvh heads (a top-k block per head:
  // one layer's kvh blocks alone would leave most of the device idle).
  Scratch<double> pooled;
  KVMEM_RETURN_IF_ERROR(pooled.Allocate(static_cast<size_t>(L) * kvh * std::max(max_length, 1), s));
  for (int l = 0; l < L; ++l) {
    SnapKvParams<T> p;
    p.queries = queries_device + per_layer * l;
    p.num_heads = c.num_heads;
    p.w = w;
    p.kv.keys = tables.keys + l * kvh;
    p.kv.values = tables.values + l * kvh;
    p.kv.positions = tables.positions + l * kvh;
    p.kv.lengths = tables.lengths + l * kvh;
    p.kv.num_kv_heads = kvh;
    p.kv.head_dim = c.head_dim;
    p.kv.max_length = max_length;
    p.kernel = options.kernel;
    p.pooling = options.pooling == Pooling::kMax ? SnapKvPool::kMax : SnapKvPool::kAvg;
    p.budget = budget;
    p.sliding_window = c.sliding_window;
    p.keep = keep.get() + static_cast<size_t>(l) * kvh * budget;
    p.keep_counts = counts.get() + static_cast<size_t>(l) * kvh;
    p.scores = pooled.get() + static_cast<size_t>(l) * kvh * max_length;
    p.top_k = false;
    KVMEM_CUDA_RETURN_IF_ERROR(LaunchSnapKv(p, workspace.get(), ws, s));
  }
  prof_.Mark("snapkv: score, pool (per layer)");
  SnapKvParams<T> all;
  all.num_heads = c.num_heads * L;  // not read by the top-k; kept consistent with the heads
  all.w = w;
  all.kv.lengths = tables.lengths;
  all.kv.num_kv_heads = L * kvh;
  all.kv.head_dim = c.head_dim;
  all.kv.max_length = max_length;
  all.budget = budget;
  all.keep = keep.get();
  all.keep_counts = counts.get();
  all.scores = pooled.get();
  KVMEM_CUDA_RETURN_IF_ERROR(LaunchSnapKvTopK(all, s));
  prof_.Mark("snapkv: top-k (all layers)");
  std::vector<int32_t> host_keep(static_cast<size_t>(L) * kvh * budget);
  std::vector<int32_t> host_counts(static_cast<size_t>(L) * kvh);
  KVMEM_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(
      host_keep.data(), keep.get(), host_keep.size() * sizeof(int32_t), cudaMemcpyDeviceToHost, s));
  KVMEM_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(host_counts.data(), counts.get(),
                                             host_counts.size() * sizeof(int32_t),
                                             cudaMemcpyDeviceToHost, s));
  KVMEM_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(s));
  prof_.Mark("snapkv: picks down");
  dkv->DropObserved();
  std::vector<std::vector<int64_t>> result(static_cast<size_t>(L) * kvh);
  for (size_t i = 0; i < result.size(); ++i) {
    const int32_t* k = &host_keep[i * budget];
    result[i].assign(k, k + host_counts[i]);
  }
  return result;
}

template <typename T>
absl::StatusOr<std::vector<float>> CudaBackend<T>::ScoreRecallBlocks(
    const KvCache& kv, int layer, const float* q, int64_t n, int w,
    const std::vector<std::vector<float>>& digests) {
  const ModelConfig& c = config_;
  const int kvh = c.num_kv_heads, hd = c.head_dim;
  const int64_t blocks = static_cast<int64_t>(digests.size());
  const size_t per_block = static_cast<size_t>(kvh) * 2 * hd;
  if (layer < 0 || layer >= c.num_layers || w <= 0 || w > n || blocks == 0) {
    return absl::InvalidArgumentError("ScoreRecallBlocks: layer, window or blocks out of range");
  }
  std::lock_guard<std::recursive_mutex> lock(ctx_->mu);
  KVMEM_CUDA_RETURN_IF_ERROR(cudaSetDevice(ctx_->device));
  DeviceKv<T>* dkv = OwnCopy(kv);
  if (dkv == nullptr) return absl::UnimplementedError("the cache has no copy on this device");
  cudaStream_t s = ctx_->stream;
  if (dkv->digests.empty()) dkv->digests.resize(c.num_layers);
  DeviceDigests& dd = dkv->digests[layer];
  if (blocks < dd.synced) dd.synced = 0;  // not this cache's history: upload it again
  if (blocks > dd.capacity) {
    const int64_t capacity = std::max<int64_t>({blocks, dd.capacity * 2, 64});
    KVMEM_ASSIGN_OR_RETURN(float* grown, AllocAsync<float>(capacity * per_block, s));
    if (dd.synced > 0) {
      KVMEM_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(
          grown, dd.data, dd.synced * per_block * sizeof(float), cudaMemcpyDeviceToDevice, s));
    }
    if (dd.data != nullptr) cudaFreeAsync(dd.data, s);  // a failed free only leaks
    dd.data = grown;
    dd.capacity = capacity;
  }
  // The last synced block may have filled further since: upload from it on.
  const int64_t from = std::max<int64_t>(0, dd.synced - 1);
  std::vector<float> packed((blocks - from) * per_block);
  for (int64_t b = from; b < blocks; ++b) {
    if (digests[b].size() != per_block) {
      dd.synced = 0;
      return absl::InvalidArgumentError("ScoreRecallBlocks: a digest has the wrong shape");
    }
    std::memcpy(&packed[(b - from) * per_block], digests[b].data(), per_block * sizeof(float));
  }
  dd.synced = 0;  // until the upload below is queued
  KVMEM_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(dd.data + from * per_block, packed.data(),
                                             packed.size() * sizeof(float), cudaMemcpyHostToDevice,
                                             s));
  dd.synced = blocks;
  // The window's query rows, then one thread per (KV head, block).
  const int64_t qd = c.q_dim();
  Scratch<float> window, scores;
  KVMEM_RETURN_IF_ERROR(window.Allocate(static_cast<size_t>(w) * qd, s));
  KVMEM_RETURN_IF_ERROR(scores.Allocate(static_cast<size_t>(kvh) * blocks, s));
  KVMEM_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(window.get(), q + (n - w) * qd,
                                             static_cast<size_t>(w) * qd * sizeof(float),
                                             cudaMemcpyHostToDevice, s));
  KVMEM_CUDA_RETURN_IF_ERROR(LaunchDigestScores(window.get(), w, qd, c.num_heads, kvh, hd, dd.data,
                                                static_cast<int>(blocks), scores.get(), s));
  std::vector<float> out(static_cast<size_t>(kvh) * blocks);
  KVMEM_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(out.data(), scores.get(), out.size() * sizeof(float),
                                             cudaMemcpyDeviceToHost, s));
  KVMEM_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(s));
  return out;
}

// Writes the pointer tables of layers [first_layer, last_layer), with every head's length
// grown by `appended` (the pass's new tokens, which AppendKv writes next).
template <typename T>
absl::Status CudaBackend<T>::UploadTables(const DeviceKv<T>& dkv, int first_layer, int last_layer,
                                          int64_t appended, const HeadTables<T>& tables) {
  const int kvh = config_.num_kv_heads, hd = config_.head_dim;
  const int begin = first_layer * kvh, end = last_layer * kvh, count = end - begin;
  std::vector<T*> keys(count), values(count);
  std::vector<int64_t*> positions(count);
  std::vector<int32_t> lengths(count);
  for (int i = begin; i < end; ++i) {
    const DeviceHead<T>& dh = dkv.heads[i];
    keys[i - begin] = dh.keys(hd);
    values[i - begin] = dh.values(hd);
    positions[i - begin] = dh.positions(hd);
    lengths[i - begin] = static_cast<int32_t>(dh.mirrored.size() + appended);
  }
  cudaStream_t s = ctx_->stream;
  KVMEM_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(tables.keys + begin, keys.data(), count * sizeof(T*),
                                             cudaMemcpyHostToDevice, s));
  KVMEM_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(tables.values + begin, values.data(),
                                             count * sizeof(T*), cudaMemcpyHostToDevice, s));
  KVMEM_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(tables.positions + begin, positions.data(),
                                             count * sizeof(int64_t*), cudaMemcpyHostToDevice, s));
  KVMEM_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(tables.lengths + begin, lengths.data(),
                                             count * sizeof(int32_t), cudaMemcpyHostToDevice, s));
  return absl::OkStatus();
}

// The members defined here, for every element type (the class itself is instantiated in
// cuda_backend.cc).
#define KVMEM_CUDA_KV_SYNC_MEMBERS(T)                                                             \
  template absl::StatusOr<DeviceKv<T>*> CudaBackend<T>::Attach(KvCache*, std::shared_ptr<void>*); \
  template absl::Status CudaBackend<T>::Reserve(DeviceKv<T>&, DeviceHead<T>&, int64_t);           \
  template absl::Status CudaBackend<T>::SyncHeads(const KvCache&, DeviceKv<T>&, int, int);        \
  template absl::Status CudaBackend<T>::AllocateTables(Scratch<uint8_t>*, HeadTables<T>*);        \
  template absl::StatusOr<std::vector<std::vector<int64_t>>> CudaBackend<T>::SelectSnapKv(        \
      const KvCache&, const SnapKvOptions&, const std::vector<std::vector<float>>&, int,          \
      uint64_t);                                                                                  \
  template absl::StatusOr<std::vector<float>> CudaBackend<T>::ScoreRecallBlocks(                  \
      const KvCache&, int, const float*, int64_t, int, const std::vector<std::vector<float>>&);   \
  template absl::Status CudaBackend<T>::UploadTables(const DeviceKv<T>&, int, int, int64_t,       \
                                                     const HeadTables<T>&);
KVMEM_CUDA_KV_SYNC_MEMBERS(float)
KVMEM_CUDA_KV_SYNC_MEMBERS(__nv_bfloat16)
KVMEM_CUDA_KV_SYNC_MEMBERS(__half)
#undef KVMEM_CUDA_KV_SYNC_MEMBERS

}  // namespace cuda_internal
}  // namespace kvmem
