// The CUDA backend's internals, shared by its two source files: cuda_backend.cc (weights,
// forward passes, CUDA graphs) and cuda_kv_sync.cc (the device copy of the hot set: uploads,
// gathers, device SnapKV and recall scoring). Not a public header.
#ifndef KVMEM_ENGINE_CUDA_BACKEND_INTERNAL_H_
#define KVMEM_ENGINE_CUDA_BACKEND_INTERNAL_H_

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstring>
#include <functional>
#include <map>
#include <mutex>
#include <type_traits>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "engine/block_memory.h"
#include "engine/cuda_backend.h"
#include "engine/host_convert.h"
#include "engine/kv_sync_plan.h"
#include "engine/status_macros.h"
#include "engine/thread_pool.h"
#include "kernels/convert.cuh"
#include "kernels/cuda_check.cuh"
#include "kernels/decode_attention.cuh"
#include "kernels/digest.cuh"
#include "kernels/embedding.cuh"
#include "kernels/gemv.cuh"
#include "kernels/head_major.cuh"
#include "kernels/kv_append.cuh"
#include "kernels/kv_gather.cuh"
#include "kernels/prefill_attention.cuh"
#include "kernels/qkv_rope.cuh"
#include "kernels/rmsnorm.cuh"
#include "kernels/snapkv.cuh"
#include "kernels/swiglu.cuh"

namespace kvmem {
namespace cuda_internal {

inline absl::Status CudaStatus(cudaError_t err, const char* what, const char* file, int line) {
  const std::string message = CudaErrorMessage(err, what, file, line);
  if (err == cudaErrorMemoryAllocation) {
    return absl::ResourceExhaustedError(absl::StrCat("device memory exhausted: ", message));
  }
  return absl::InternalError(message);
}

// Returns a failed CUDA call as a Status (RESOURCE_EXHAUSTED for allocations, else INTERNAL).
#define KVMEM_CUDA_RETURN_IF_ERROR(...)                                         \
  do {                                                                          \
    const cudaError_t kvmem_cuda_err_ = (__VA_ARGS__);                          \
    if (kvmem_cuda_err_ != cudaSuccess) {                                       \
      cudaGetLastError(); /* a recoverable error must not fail the next call */ \
      return CudaStatus(kvmem_cuda_err_, #__VA_ARGS__, __FILE__, __LINE__);     \
    }                                                                           \
  } while (0)

#define KVMEM_CUBLAS_RETURN_IF_ERROR(expr)                                                 \
  do {                                                                                     \
    const cublasStatus_t kvmem_cublas_status_ = (expr);                                    \
    if (kvmem_cublas_status_ != CUBLAS_STATUS_SUCCESS) {                                   \
      return absl::InternalError(absl::StrCat(__FILE__, ":", __LINE__, ": ", #expr, ": ",  \
                                              cublasGetStatusName(kvmem_cublas_status_))); \
    }                                                                                      \
  } while (0)

template <typename T>
constexpr cudaDataType_t kCudaType = std::is_same_v<T, float>           ? CUDA_R_32F
                                     : std::is_same_v<T, __nv_bfloat16> ? CUDA_R_16BF
                                                                        : CUDA_R_16F;

// Host-side widening of a device element (bf16 is the top half of an f32).
inline float HostToFloat(float v) { return v; }
inline float HostToFloat(__half v) { return __half2float(v); }
inline float HostToFloat(__nv_bfloat16 v) {
  uint16_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  const uint32_t wide = static_cast<uint32_t>(bits) << 16;
  float out;
  std::memcpy(&out, &wide, sizeof(out));
  return out;
}

// The device, its stream and the lock every piece of work on them takes (forwards, and frees
// of device KV copies, which may happen on any thread that drops a cache).
struct CudaContext {
  int device = 0;
  cudaStream_t stream = nullptr;
  std::recursive_mutex mu;

  ~CudaContext() {
    if (stream != nullptr) {
      cudaSetDevice(device);
      cudaStreamSynchronize(stream);
      cudaStreamDestroy(stream);
    }
  }
};

// Per-op device times of passes run op by op (CudaBackendOptions::profile_ops): Begin records
// an event on the stream, each Mark another, and the time between two events is charged to the
// later mark's op, so host gaps land on the op that waited for them. End waits for the last
// event and adds the pass's times to the totals. Marks outside Begin/End, or while the stream
// is being captured into a graph, are ignored.
class OpProfiler {
 public:
  ~OpProfiler() {
    for (cudaEvent_t e : events_) cudaEventDestroy(e);
  }
  void Begin(bool enabled, cudaStream_t stream) {
    active_ = enabled;
    if (!active_) return;
    stream_ = stream;
    used_ = 0;
    ops_.clear();
    host_start_ = std::chrono::steady_clock::now();
    Record(nullptr);
  }
  void Mark(const char* op) {
    if (!active_) return;
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    if (cudaStreamIsCapturing(stream_, &capture) != cudaSuccess) cudaGetLastError();
    if (capture == cudaStreamCaptureStatusNone) Record(op);
  }
  void End() {
    if (!active_) return;
    active_ = false;
    if (cudaEventSynchronize(events_[used_ - 1]) != cudaSuccess) {
      cudaGetLastError();
      return;
    }
    for (size_t i = 1; i < used_; ++i) {
      float ms = 0;
      if (cudaEventElapsedTime(&ms, events_[i - 1], events_[i]) != cudaSuccess) {
        cudaGetLastError();
        continue;
      }
      Add(ops_[i], ms);
    }
    Add("(host wall, whole call)",
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - host_start_)
            .count());
  }
  std::vector<CudaOpTime> Take() { return std::exchange(totals_, {}); }
  // Calls End when it goes out of scope (a call that returns early ends its pass too).
  struct EndOnExit {
    OpProfiler* profiler;
    ~EndOnExit() { profiler->End(); }
  };

 private:
  void Record(const char* op) {
    if (used_ == events_.size()) {
      cudaEvent_t e;
      if (cudaEventCreate(&e) != cudaSuccess) {
        cudaGetLastError();
        active_ = false;  // this pass goes unprofiled
        return;
      }
      events_.push_back(e);
    }
    if (cudaEventRecord(events_[used_], stream_) != cudaSuccess) {
      cudaGetLastError();
      active_ = false;
      return;
    }
    ops_.resize(used_ + 1);
    ops_[used_++] = op;
  }
  void Add(const char* op, double ms) {
    for (CudaOpTime& t : totals_) {
      if (t.op == op) {
        t.ms += ms;
        ++t.count;
        return;
      }
    }
    totals_.push_back({op, ms, 1});
  }

  bool active_ = false;
  cudaStream_t stream_ = nullptr;
  std::vector<cudaEvent_t> events_;
  std::vector<const char*> ops_;
  size_t used_ = 0;
  std::chrono::steady_clock::time_point host_start_;
  std::vector<CudaOpTime> totals_;
};

// What TakeCudaOpProfile finds, by a cross-cast, in every CUDA backend.
class OpProfileSource {
 public:
  virtual ~OpProfileSource() = default;
  virtual std::vector<CudaOpTime> TakeOpProfile() = 0;
  virtual CudaUploadStats UploadStats() const = 0;
};

// Device memory from the stream-ordered pool, freed in stream order.
template <typename U>
absl::StatusOr<U*> AllocAsync(size_t count, cudaStream_t stream) {
  void* p = nullptr;
  if (count == 0) return static_cast<U*>(nullptr);
  KVMEM_CUDA_RETURN_IF_ERROR(cudaMallocAsync(&p, count * sizeof(U), stream));
  return static_cast<U*>(p);
}

// A scratch allocation released (in stream order) when it goes out of scope.
template <typename U>
class Scratch {
 public:
  Scratch() = default;
  ~Scratch() { Reset(); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;

  absl::Status Allocate(size_t count, cudaStream_t stream) {
    Reset();
    stream_ = stream;
    KVMEM_ASSIGN_OR_RETURN(ptr_, AllocAsync<U>(count, stream));
    return absl::OkStatus();
  }
  U* get() const { return ptr_; }
  // Hands the allocation over: the caller frees it (cudaFreeAsync on the same stream).
  U* Release() {
    U* p = ptr_;
    ptr_ = nullptr;
    return p;
  }

 private:
  void Reset() {
    if (ptr_ != nullptr) cudaFreeAsync(ptr_, stream_);
    ptr_ = nullptr;
  }
  U* ptr_ = nullptr;
  cudaStream_t stream_ = nullptr;
};

// One (layer, KV head) on the device: rows [0, mirrored.size()) of keys, values and positions,
// in one allocation of `capacity` rows: [keys | values | positions].
template <typename T>
struct DeviceHead {
  void* base = nullptr;
  int64_t capacity = 0;
  std::vector<int64_t> mirrored;    // positions of the rows, as the device holds them
  uint64_t version = ~uint64_t{0};  // the KvCache head version last brought up to date

  T* keys(int hd) const { return static_cast<T*>(base); }
  T* values(int hd) const { return static_cast<T*>(base) + capacity * hd; }
  int64_t* positions(int hd) const {
    return reinterpret_cast<int64_t*>(static_cast<T*>(base) + 2 * capacity * hd);
  }
  static size_t Bytes(int64_t capacity, int hd) {
    return static_cast<size_t>(capacity) * (2 * hd * sizeof(T) + sizeof(int64_t));
  }
};

// Identifies a backend for the lifetime of the process (addresses are reused).
inline std::atomic<uint64_t> next_backend_id{1};
// Names kept observed queries (ForwardResult::observed_queries_on_backend) across backends.
inline std::atomic<uint64_t> next_observed_id{1};

// What every device copy of a KvCache starts with, whatever its element type: the attachment
// points at this base, so a backend can tell its own copies from another backend's.
struct DeviceKvBase {
  virtual ~DeviceKvBase() = default;
  std::shared_ptr<CudaContext> ctx;
  uint64_t owner = 0;  // id of the backend that made it (which fixes the element type)
};

// One layer's block digests on the device, for recall scoring: rows [0, synced) of
// (blocks, num_kv_heads, 2, head_dim) f32 match the host's, except that the last may have
// changed since (a partial block keeps filling).
struct DeviceDigests {
  float* data = nullptr;
  int64_t capacity = 0;  // blocks
  int64_t synced = 0;
};

// The device copy of one KvCache, attached to it.
template <typename T>
struct DeviceKv : DeviceKvBase {
  int head_dim = 0;
  std::vector<DeviceHead<T>> heads;    // (layer, kv_head)
  std::vector<DeviceDigests> digests;  // (layer) once recall has scored there
  // The observed queries of the cache's last multi-token pass, (layer, num_heads,
  // observed_rows, head_dim) f32, kept for SnapKV at the end of the turn; observed_id is the
  // ForwardResult::observed_queries_on_backend that names them (0: none kept).
  float* observed = nullptr;
  int observed_rows = 0;
  uint64_t observed_id = 0;

  // Frees the kept observed queries in stream order.
  void DropObserved() {
    if (observed != nullptr) cudaFreeAsync(observed, ctx->stream);
    observed = nullptr;
    observed_rows = 0;
    observed_id = 0;
  }

  ~DeviceKv() override {
    std::lock_guard<std::recursive_mutex> lock(ctx->mu);
    int previous = 0;
    cudaGetDevice(&previous);  // whichever thread drops a cache keeps its current device
    cudaSetDevice(ctx->device);
    for (DeviceHead<T>& h : heads) {
      if (h.base != nullptr) cudaFreeAsync(h.base, ctx->stream);
    }
    for (DeviceDigests& d : digests) {
      if (d.data != nullptr) cudaFreeAsync(d.data, ctx->stream);
    }
    DropObserved();
    cudaSetDevice(previous);
  }
};

// Page-locked host memory for engine/block_memory.h's pool: portable (any context may use it)
// and mapped, so kernels read blocks in it over the bus by address. Blocks are made on any
// thread (the thread pool's, a cold read's), so each call runs on the backend's device and
// puts the thread's own device back after.
class CudaHostPinner : public HostMemoryPinner {
 public:
  explicit CudaHostPinner(int device) : device_(device) {}
  absl::StatusOr<void*> Allocate(size_t bytes) override {
    void* p = nullptr;
    const cudaError_t err = OnDevice(
        [&] { return cudaHostAlloc(&p, bytes, cudaHostAllocPortable | cudaHostAllocMapped); });
    if (err != cudaSuccess) {
      return CudaStatus(err, "pinning host memory for KV blocks", __FILE__, __LINE__);
    }
    return p;
  }
  absl::StatusOr<const void*> DeviceAddress(void* base) override {
    void* device = nullptr;
    const cudaError_t err = OnDevice([&] { return cudaHostGetDevicePointer(&device, base, 0); });
    if (err != cudaSuccess) {
      return CudaStatus(err, "mapping pinned KV blocks for the device", __FILE__, __LINE__);
    }
    return static_cast<const void*>(device);
  }

 private:
  template <typename Call>
  cudaError_t OnDevice(const Call& call) {
    int previous = -1;
    cudaError_t err = cudaGetDevice(&previous);
    if (err == cudaSuccess) err = cudaSetDevice(device_);
    if (err == cudaSuccess) err = call();
    if (previous >= 0 && previous != device_) cudaSetDevice(previous);
    if (err != cudaSuccess) cudaGetLastError();
    return err;
  }
  const int device_;
};

// Where the sections of an upload chunk of `rows` rows sit in a staging slot (byte offsets,
// each 8-byte aligned): keys and values (rows, head_dim) in T, positions, then the destination
// row pointers of keys, values and positions, then the source row pointers.
struct UploadLayout {
  size_t keys = 0, values = 0, positions = 0, dst_keys = 0, dst_values = 0, dst_positions = 0;
  // Where each row is read from (ScatterKvRowsParams::src_keys): its packed row in the slot,
  // or its block in pinned host memory. Filled only for chunks with rows of the latter kind.
  size_t src_keys = 0, src_values = 0;
  size_t bytes = 0;
};

// One of the two staging slots of uploads: pinned host memory and its device twin.
struct UploadSlot {
  uint8_t* host = nullptr;
  uint8_t* device = nullptr;
  cudaEvent_t host_free = nullptr;    // the slot's last copy to the device finished
  cudaEvent_t device_free = nullptr;  // the scatter reading the slot's device copy finished
};

// Device pointer tables the attention and append kernels read for every layer:
// (layers * kv_heads) each, laid out in one allocation.
template <typename T>
struct HeadTables {
  T** keys = nullptr;
  T** values = nullptr;
  int64_t** positions = nullptr;
  int32_t* lengths = nullptr;
};

template <typename T>
class CudaBackend : public Backend, public OpProfileSource {
 public:
  CudaBackend(const ModelConfig& config, const CudaBackendOptions& options,
              std::shared_ptr<CudaContext> ctx)
      : config_(config), options_(options), ctx_(std::move(ctx)), id_(next_backend_id++) {}

  ~CudaBackend() override {
    std::lock_guard<std::recursive_mutex> lock(ctx_->mu);
    cudaSetDevice(ctx_->device);
    cudaStreamSynchronize(ctx_->stream);
    for (auto& [bucket, graph] : decode_.graphs) cudaGraphExecDestroy(graph.exec);
    if (decode_.workspace != nullptr) cudaFreeAsync(decode_.workspace, ctx_->stream);
    if (decode_.step_host != nullptr) cudaFreeHost(decode_.step_host);
    if (decode_.out_host != nullptr) cudaFreeHost(decode_.out_host);
    cudaStreamSynchronize(ctx_->stream);
    if (uploads_.stream != nullptr) cudaStreamSynchronize(uploads_.stream);
    for (UploadSlot& slot : uploads_.slots) {
      if (slot.host != nullptr) cudaFreeHost(slot.host);
      if (slot.host_free != nullptr) cudaEventDestroy(slot.host_free);
      if (slot.device_free != nullptr) cudaEventDestroy(slot.device_free);
    }
    if (uploads_.stream != nullptr) {
      cudaStreamSynchronize(uploads_.stream);
      cudaStreamDestroy(uploads_.stream);
    }
    if (downloads_.stream != nullptr) {
      cudaStreamSynchronize(downloads_.stream);
      cudaStreamDestroy(downloads_.stream);
    }
    for (cudaEvent_t e : downloads_.ready) cudaEventDestroy(e);
    for (cudaEvent_t e : downloads_.done) cudaEventDestroy(e);
    if (downloads_.host != nullptr) cudaFreeHost(downloads_.host);
    for (void* p : weight_allocations_) cudaFree(p);
    if (cublas_ != nullptr) cublasDestroy(cublas_);
    if (cublas_workspace_ != nullptr) cudaFree(cublas_workspace_);
  }

  const char* name() const override { return "cuda"; }
  // The device copy is the hot set's full copy; sessions keep positions and fresh rows.
  bool KeepsHotRows() const override { return true; }
  // A session's blocks take T: the fresh rows the device hands back are T values, stored as
  // they are.
  BlockDType KvDType() const override {
    if constexpr (std::is_same_v<T, __nv_bfloat16>) {
      return BlockDType::kBF16;
    } else if constexpr (std::is_same_v<T, __half>) {
      return BlockDType::kF16;
    } else {
      return BlockDType::kF32;
    }
  }
  // Device rows of key and value in T, and the position.
  int64_t HotEntryBytes(int head_dim) const override {
    return 2 * static_cast<int64_t>(head_dim) * static_cast<int64_t>(sizeof(T)) +
           static_cast<int64_t>(sizeof(int64_t));
  }

  absl::Status Init(const ModelWeights* weights);

  absl::Status Forward(absl::Span<const int32_t> tokens, int64_t start_pos, KvCache* kv,
                       const ForwardOptions& options, ForwardResult* result) override {
    const ModelConfig& c = config_;
    const int64_t n = static_cast<int64_t>(tokens.size());
    result->observed_queries_on_backend = 0;  // set by a pass that keeps them
    if (n == 0) return absl::InvalidArgumentError("Forward needs at least one token");
    for (int32_t t : tokens) {
      if (t < 0 || t >= c.vocab_size) {
        return absl::InvalidArgumentError(
            absl::StrCat("token id ", t, " is outside the vocabulary [0, ", c.vocab_size, ")"));
      }
    }
    if (kv->num_layers() != c.num_layers || kv->num_kv_heads() != c.num_kv_heads ||
        kv->head_dim() != c.head_dim) {
      return absl::InvalidArgumentError("the KV cache's shape does not match the model");
    }
    if (start_pos <= kv->MaxPosition()) {
      return absl::InvalidArgumentError(absl::StrCat("start position ", start_pos,
                                                     " does not follow the cached position ",
                                                     kv->MaxPosition()));
    }
    std::shared_ptr<void> stale;  // a foreign attachment, dropped after the lock is released
    std::lock_guard<std::recursive_mutex> lock(ctx_->mu);
    KVMEM_CUDA_RETURN_IF_ERROR(cudaSetDevice(ctx_->device));
    prof_.Begin(options_.profile_ops, ctx_->stream);
    absl::Status status = Run(tokens, start_pos, kv, options, result, &stale);
    ReleaseReadsInPlace();
    prof_.End();
    if (!status.ok()) {
      // Nothing queued may still read pinned inputs or write pinned outputs the next pass
      // reuses.
      cudaStreamSynchronize(ctx_->stream);
      cudaGetLastError();
      // The device copy may be ahead of the host's entries: forget it; the next pass uploads
      // the cache again.
      kv->set_attachment(nullptr);
    }
    return status;
  }

  absl::StatusOr<std::vector<std::vector<int64_t>>> SelectSnapKv(
      const KvCache& kv, const SnapKvOptions& options,
      const std::vector<std::vector<float>>& queries, int w,
      uint64_t queries_on_backend) override;
  absl::StatusOr<std::vector<float>> ScoreRecallBlocks(
      const KvCache& kv, int layer, const float* q, int64_t n, int w,
      const std::vector<std::vector<float>>& digests) override;

 private:
  struct LayerDevice {
    T* w_qkv = nullptr;      // (q_dim + 2 kv_dim, hidden)
    T* w_o = nullptr;        // (hidden, q_dim)
    T* w_gate_up = nullptr;  // (2 intermediate, hidden): gate rows then up rows
    T* w_down = nullptr;     // (hidden, intermediate)
    float* attn_norm = nullptr;
    float* mlp_norm = nullptr;
    float* b_qkv = nullptr;      // or null
    float* b_o = nullptr;        // or null
    float* b_gate_up = nullptr;  // or null
    float* b_down = nullptr;     // or null
  };

  template <typename U>
  absl::StatusOr<U*> AllocWeight(size_t count) {
    void* p = nullptr;
    KVMEM_CUDA_RETURN_IF_ERROR(cudaMalloc(&p, std::max<size_t>(count, 1) * sizeof(U)));
    weight_allocations_.push_back(p);
    return static_cast<U*>(p);
  }
  // Copies `rows` f32 host rows of `cols` from each of `parts` (stacked) into a new device
  // matrix of T; random values instead when there are no host weights.
  absl::StatusOr<T*> UploadMatrix(std::vector<const float*> parts, std::vector<int64_t> rows,
                                  int64_t cols);
  absl::StatusOr<float*> UploadVector(std::vector<const float*> parts, std::vector<int64_t> sizes,
                                      bool random_ones);

  absl::Status Gemm(const T* w, int64_t out_features, int64_t in_features, const T* x, int64_t n,
                    float* y) {
    // One token: our bandwidth-bound GEMV (cuBLAS's choice for an f32 output reached 58-67% of
    // the copy bandwidth on the 8B shape's attention projections on an H100).
    if (n == 1) {
      KVMEM_CUDA_RETURN_IF_ERROR(LaunchGemv(w, out_features, in_features, x, y, ctx_->stream));
      return absl::OkStatus();
    }
    const float alpha = 1.f, beta = 0.f;
    const cublasComputeType_t compute =
        std::is_same_v<T, float> ? CUBLAS_COMPUTE_32F_PEDANTIC : CUBLAS_COMPUTE_32F;
    // Row-major y (n, out) = x (n, in) w^T: column-major y^T = w^T' x^T with w as (in, out).
    KVMEM_CUBLAS_RETURN_IF_ERROR(cublasGemmEx(
        cublas_, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(out_features), static_cast<int>(n),
        static_cast<int>(in_features), &alpha, w, kCudaType<T>, static_cast<int>(in_features), x,
        kCudaType<T>, static_cast<int>(in_features), &beta, y, CUDA_R_32F,
        static_cast<int>(out_features), compute, CUBLAS_GEMM_DEFAULT));
    return absl::OkStatus();
  }

  // This backend's device copy of `kv`, or null. (Attachments are set only by CUDA backends,
  // always pointing at a DeviceKvBase.)
  DeviceKv<T>* OwnCopy(const KvCache& kv) const {
    auto* base = static_cast<DeviceKvBase*>(kv.attachment().get());
    if (base == nullptr || base->owner != id_ || base->ctx != ctx_) return nullptr;
    return static_cast<DeviceKv<T>*>(base);
  }
  absl::StatusOr<DeviceKv<T>*> Attach(KvCache* kv, std::shared_ptr<void>* stale);
  absl::Status AllocateTables(Scratch<uint8_t>* memory, HeadTables<T>* tables);
  absl::Status Reserve(DeviceKv<T>& dkv, DeviceHead<T>& head, int64_t rows);
  absl::Status SyncHeads(const KvCache& kv, DeviceKv<T>& dkv, int first_layer, int last_layer);
  absl::Status UploadTables(const DeviceKv<T>& dkv, int first_layer, int last_layer,
                            int64_t appended, const HeadTables<T>& tables);
  // Device pointers of one pass's buffers (see AllocatePass for shapes).
  struct PassBuffers {
    int32_t* ids = nullptr;       // (n)
    int64_t* pos = nullptr;       // (1) absolute position of the first token
    float* x = nullptr;           // (n, hidden) residual stream
    T* xn = nullptr;              // (n, hidden) normed, the GEMMs' input
    float* qkv = nullptr;         // (n, q_dim + 2 kv_dim)
    float* q = nullptr;           // (n, num_heads, head_dim) after RoPE
    T* q_t = nullptr;             // the same in T (aliases q for f32)
    T* new_k = nullptr;           // (layer, n, kv_heads, head_dim)
    T* new_v = nullptr;           // (layer, n, kv_heads, head_dim)
    T* attn = nullptr;            // (n, num_heads, head_dim)
    float* proj = nullptr;        // (n, hidden)
    float* gate_up = nullptr;     // (n, 2 intermediate)
    T* act = nullptr;             // (n, intermediate)
    float* logits = nullptr;      // (logit rows, vocab)
    float* observed_q = nullptr;  // (layer, num_heads, observed, head_dim) or null
    HeadTables<T> tables;
    void* decode_ws = nullptr;
    size_t decode_ws_bytes = 0;
    Scratch<uint8_t>* decode_ws_scratch = nullptr;  // grows decode_ws (null: fixed size)
    // (layer) events recorded once a layer's new K/V and observed queries are written, so
    // FinishPass can copy them out while later layers run; null for captured graphs.
    cudaEvent_t* layer_ready = nullptr;
  };
  // Owners of an op-by-op pass's buffers.
  struct PassScratch {
    Scratch<int32_t> ids;
    Scratch<int64_t> pos;
    Scratch<float> x, qkv, q, proj, gate_up, logits, observed_q;
    Scratch<T> xn, q_t, new_k, new_v, attn, act;
    Scratch<uint8_t> tables, decode_ws;
  };
  // A captured one-token pass, replayed for every decode step whose longest head fits it.
  struct DecodeGraph {
    cudaGraphExec_t exec = nullptr;
  };

  absl::Status Run(absl::Span<const int32_t> tokens, int64_t start_pos, KvCache* kv,
                   const ForwardOptions& options, ForwardResult* result,
                   std::shared_ptr<void>* stale);
  absl::Status AllocatePass(int64_t n, int64_t logit_rows, int observed, PassScratch* scratch,
                            PassBuffers* b);
  // Queues embedding, every layer and the logits of rows [first_logit, n) on the stream.
  // after_qkv (may be empty) runs on the host once layer l's queries exist.
  absl::Status EnqueuePass(PassBuffers* b, int64_t n, int64_t start_pos, int observed,
                           int64_t first_logit, const std::vector<int32_t>& max_lengths,
                           const std::function<absl::Status(int)>& after_qkv);
  // Copies the pass's results to the host and appends its entries to the host cache.
  // pinned: null, or pinned host memory with room for every result (8-byte aligned each).
  absl::Status FinishPass(const PassBuffers& b, int64_t n, int64_t start_pos, int observed,
                          int64_t logit_rows, KvCache* kv, DeviceKv<T>* dkv, ForwardResult* result,
                          uint8_t* pinned = nullptr);
  absl::StatusOr<DecodeGraph*> GraphFor(int32_t longest);

  std::vector<CudaOpTime> TakeOpProfile() override {
    std::lock_guard<std::recursive_mutex> lock(ctx_->mu);
    return prof_.Take();
  }
  // Drops the holds on blocks read by address once the stream has run everything queued.
  void ReleaseReadsInPlace() {
    if (!reads_in_place_.empty() && cudaStreamQuery(ctx_->stream) == cudaSuccess) {
      reads_in_place_.clear();
    }
  }
  CudaUploadStats UploadStats() const override {
    return {upload_stats_.rows_packed.load(), upload_stats_.rows_by_address.load(),
            upload_stats_.snapkv_queries_kept.load()};
  }

  const ModelConfig config_;
  const CudaBackendOptions options_;
  std::shared_ptr<CudaContext> ctx_;
  OpProfiler prof_;
  struct {
    std::atomic<int64_t> rows_packed{0};
    std::atomic<int64_t> rows_by_address{0};
    std::atomic<int64_t> snapkv_queries_kept{0};
  } upload_stats_;
  // Blocks whose rows scatters queued on ctx_->stream read by address (SyncHeads), kept alive
  // until the stream has run them (ReleaseReadsInPlace; the destructor waits for the stream
  // before members go).
  std::vector<std::shared_ptr<const KvBlock>> reads_in_place_;
  const uint64_t id_;
  cublasHandle_t cublas_ = nullptr;
  void* cublas_workspace_ = nullptr;
  std::vector<void*> weight_allocations_;
  uint64_t random_counter_ = 0;
  T* embed_ = nullptr;    // (vocab, hidden)
  T* lm_head_ = nullptr;  // (vocab, hidden); == embed_ when tied
  float* final_norm_ = nullptr;
  double* inv_freq_ = nullptr;  // (head_dim / 2)
  std::vector<LayerDevice> layers_;
  // Host -> device uploads of KV rows (page-in, recall, restore) on their own stream.
  struct Uploads {
    cudaStream_t stream = nullptr;
    UploadSlot slots[2];
    int64_t slot_rows = 0;
    size_t elem = sizeof(T);
    UploadLayout Layout(int64_t rows, int hd) const {
      auto align = [](size_t b) { return (b + 7) / 8 * 8; };
      UploadLayout l;
      const size_t kv = align(static_cast<size_t>(rows) * hd * elem);
      const size_t ptrs = static_cast<size_t>(rows) * sizeof(void*);
      l.keys = 0;
      l.values = kv;
      l.positions = 2 * kv;
      l.dst_keys = l.positions + static_cast<size_t>(rows) * sizeof(int64_t);
      l.dst_values = l.dst_keys + ptrs;
      l.dst_positions = l.dst_values + ptrs;
      l.src_keys = l.dst_positions + ptrs;
      l.src_values = l.src_keys + ptrs;
      l.bytes = l.src_values + ptrs;
      return l;
    }
  } uploads_;
  // Device -> host copies of a multi-token pass's new rows and observed queries on their own
  // stream, layer by layer as the pass writes them, through a ring of pinned slots that the
  // host empties on the thread pool (see FinishPass).
  struct Downloads {
    cudaStream_t stream = nullptr;
    std::vector<cudaEvent_t> ready, done;  // per layer: written (compute), copied (download)
    uint8_t* host = nullptr;
    size_t bytes = 0;
  } downloads_;
  // Creates the download stream and events on first use.
  absl::Status PrepareDownloads();
  struct {
    PassBuffers buffers;                    // fixed addresses, owned as weights are
    std::map<int32_t, DecodeGraph> graphs;  // by attention length bucket
    bool buffers_ready = false;
    uint8_t* workspace = nullptr;    // decode attention's, shared by the graphs
    uint8_t* step_device = nullptr;  // the step inputs' device block (tables, position, id)
    uint8_t* step_host = nullptr;    // its pinned mirror
    uint8_t* out_host = nullptr;     // pinned staging of a step's results
    size_t step_bytes = 0, pos_offset = 0, ids_offset = 0;
    bool graphs_failed = false;
    int64_t eager_steps = 0;
  } decode_;
};

}  // namespace cuda_internal
}  // namespace kvmem

#endif  // KVMEM_ENGINE_CUDA_BACKEND_INTERNAL_H_
