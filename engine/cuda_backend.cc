#include "engine/cuda_backend.h"

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <functional>
#include <map>
#include <mutex>
#include <type_traits>
#include <vector>

#include "absl/strings/str_cat.h"
#include "engine/host_convert.h"
#include "engine/kv_sync_plan.h"
#include "engine/status_macros.h"
#include "engine/thread_pool.h"
#include "kernels/convert.cuh"
#include "kernels/cuda_check.cuh"
#include "kernels/decode_attention.cuh"
#include "kernels/digest.cuh"
#include "kernels/embedding.cuh"
#include "kernels/kv_append.cuh"
#include "kernels/kv_gather.cuh"
#include "kernels/prefill_attention.cuh"
#include "kernels/qkv_rope.cuh"
#include "kernels/rmsnorm.cuh"
#include "kernels/snapkv.cuh"
#include "kernels/swiglu.cuh"

namespace kvmem {
namespace {

absl::Status CudaStatus(cudaError_t err, const char* what, const char* file, int line) {
  const std::string message = CudaErrorMessage(err, what, file, line);
  if (err == cudaErrorMemoryAllocation) {
    return absl::ResourceExhaustedError(absl::StrCat("device memory exhausted: ", message));
  }
  return absl::InternalError(message);
}

// Returns a failed CUDA call as a Status (RESOURCE_EXHAUSTED for allocations, else INTERNAL).
#define KVMEM_CUDA_RETURN_IF_ERROR(...)                                           \
  do {                                                                            \
    const cudaError_t kvmem_cuda_err_ = (__VA_ARGS__);                            \
    if (kvmem_cuda_err_ != cudaSuccess) {                                         \
      cudaGetLastError(); /* a recoverable error must not fail the next call */   \
      return CudaStatus(kvmem_cuda_err_, #__VA_ARGS__, __FILE__, __LINE__);        \
    }                                                                             \
  } while (0)

#define KVMEM_CUBLAS_RETURN_IF_ERROR(expr)                                                   \
  do {                                                                                       \
    const cublasStatus_t kvmem_cublas_status_ = (expr);                                      \
    if (kvmem_cublas_status_ != CUBLAS_STATUS_SUCCESS) {                                     \
      return absl::InternalError(absl::StrCat(__FILE__, ":", __LINE__, ": ", #expr, ": ",    \
                                              cublasGetStatusName(kvmem_cublas_status_)));   \
    }                                                                                        \
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
  std::vector<int64_t> mirrored;  // positions of the rows, as the device holds them
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
std::atomic<uint64_t> next_backend_id{1};

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
  std::vector<DeviceHead<T>> heads;  // (layer, kv_head)
  std::vector<DeviceDigests> digests;  // (layer) once recall has scored there

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
    cudaSetDevice(previous);
  }
};

// Where the sections of an upload chunk of `rows` rows sit in a staging slot (byte offsets,
// each 8-byte aligned): keys and values (rows, head_dim) in T, positions, then the destination
// row pointers of keys, values and positions.
struct UploadLayout {
  size_t keys = 0, values = 0, positions = 0, dst_keys = 0, dst_values = 0, dst_positions = 0;
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
class CudaBackend : public Backend {
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
    for (void* p : weight_allocations_) cudaFree(p);
    if (cublas_ != nullptr) cublasDestroy(cublas_);
    if (cublas_workspace_ != nullptr) cudaFree(cublas_workspace_);
  }

  const char* name() const override { return "cuda"; }
  // The device copy is the hot set's full copy; sessions keep positions and fresh rows.
  bool KeepsHotRows() const override { return true; }
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
    absl::Status status = Run(tokens, start_pos, kv, options, result, &stale);
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
      const std::vector<std::vector<float>>& queries, int w) override;
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
  absl::StatusOr<float*> UploadVector(std::vector<const float*> parts,
                                      std::vector<int64_t> sizes, bool random_ones);

  absl::Status Gemm(const T* w, int64_t out_features, int64_t in_features, const T* x, int64_t n,
                    float* y) {
    const float alpha = 1.f, beta = 0.f;
    const cublasComputeType_t compute = std::is_same_v<T, float> ? CUBLAS_COMPUTE_32F_PEDANTIC
                                                                 : CUBLAS_COMPUTE_32F;
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
    int32_t* ids = nullptr;        // (n)
    int64_t* pos = nullptr;        // (1) absolute position of the first token
    float* x = nullptr;            // (n, hidden) residual stream
    T* xn = nullptr;               // (n, hidden) normed, the GEMMs' input
    float* qkv = nullptr;          // (n, q_dim + 2 kv_dim)
    float* q = nullptr;            // (n, num_heads, head_dim) after RoPE
    T* q_t = nullptr;              // the same in T (aliases q for f32)
    T* new_k = nullptr;            // (layer, n, kv_heads, head_dim)
    T* new_v = nullptr;            // (layer, n, kv_heads, head_dim)
    T* attn = nullptr;             // (n, num_heads, head_dim)
    float* proj = nullptr;         // (n, hidden)
    float* gate_up = nullptr;      // (n, 2 intermediate)
    T* act = nullptr;              // (n, intermediate)
    float* logits = nullptr;       // (logit rows, vocab)
    float* observed_q = nullptr;   // (layer, observed, num_heads, head_dim) or null
    HeadTables<T> tables;
    void* decode_ws = nullptr;
    size_t decode_ws_bytes = 0;
    Scratch<uint8_t>* decode_ws_scratch = nullptr;  // grows decode_ws (null: fixed size)
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
                          int64_t logit_rows, KvCache* kv, DeviceKv<T>* dkv,
                          ForwardResult* result, uint8_t* pinned = nullptr);
  absl::StatusOr<DecodeGraph*> GraphFor(int32_t longest);

  const ModelConfig config_;
  const CudaBackendOptions options_;
  std::shared_ptr<CudaContext> ctx_;
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
      l.bytes = l.dst_positions + ptrs;
      return l;
    }
  } uploads_;
  struct {
    PassBuffers buffers;                     // fixed addresses, owned as weights are
    std::map<int32_t, DecodeGraph> graphs;  // by attention length bucket
    bool buffers_ready = false;
    uint8_t* workspace = nullptr;  // decode attention's, shared by the graphs
    uint8_t* step_device = nullptr;  // the step inputs' device block (tables, position, id)
    uint8_t* step_host = nullptr;    // its pinned mirror
    uint8_t* out_host = nullptr;     // pinned staging of a step's results
    size_t step_bytes = 0, pos_offset = 0, ids_offset = 0;
    bool graphs_failed = false;
    int64_t eager_steps = 0;
  } decode_;
};

template <typename T>
absl::StatusOr<T*> CudaBackend<T>::UploadMatrix(std::vector<const float*> parts,
                                                std::vector<int64_t> rows, int64_t cols) {
  int64_t total_rows = 0;
  for (int64_t r : rows) total_rows += r;
  KVMEM_ASSIGN_OR_RETURN(T * out, AllocWeight<T>(static_cast<size_t>(total_rows * cols)));
  if (parts.empty() || parts[0] == nullptr) {
    // Random weights: uniform with variance 1 / cols keeps every projection's output at the
    // scale of its input.
    const float scale = std::sqrt(3.f / static_cast<float>(cols));
    KVMEM_CUDA_RETURN_IF_ERROR(LaunchFillUniform(out, total_rows * cols,
                                                 options_.random_weights_seed * 1000003 +
                                                     ++random_counter_,
                                                 scale, ctx_->stream));
    return out;
  }
  // f32 rows through a bounded device staging buffer, converted to T on the device.
  constexpr int64_t kStagingFloats = int64_t{16} << 20;
  Scratch<float> staging;
  KVMEM_RETURN_IF_ERROR(
      staging.Allocate(static_cast<size_t>(std::min(kStagingFloats, total_rows * cols)),
                       ctx_->stream));
  int64_t done = 0;  // elements written to out
  for (size_t p = 0; p < parts.size(); ++p) {
    const int64_t count = rows[p] * cols;
    for (int64_t off = 0; off < count; off += kStagingFloats) {
      const int64_t chunk = std::min(kStagingFloats, count - off);
      // A pageable source: the call returns once the host buffer may be reused.
      KVMEM_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(staging.get(), parts[p] + off,
                                                 chunk * sizeof(float), cudaMemcpyHostToDevice,
                                                 ctx_->stream));
      KVMEM_CUDA_RETURN_IF_ERROR(
          LaunchConvert<float, T>(staging.get(), out + done + off, chunk, ctx_->stream));
    }
    done += count;
  }
  KVMEM_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(ctx_->stream));
  return out;
}

template <typename T>
absl::StatusOr<float*> CudaBackend<T>::UploadVector(std::vector<const float*> parts,
                                                    std::vector<int64_t> sizes, bool random_ones) {
  int64_t total = 0;
  for (int64_t s : sizes) total += s;
  std::vector<float> host(total);
  int64_t off = 0;
  for (size_t p = 0; p < parts.size(); ++p) {
    if (parts[p] != nullptr) {
      std::memcpy(&host[off], parts[p], sizes[p] * sizeof(float));
    } else {
      std::fill(host.begin() + off, host.begin() + off + sizes[p], random_ones ? 1.f : 0.f);
    }
    off += sizes[p];
  }
  KVMEM_ASSIGN_OR_RETURN(float* out, AllocWeight<float>(host.size()));
  KVMEM_CUDA_RETURN_IF_ERROR(cudaMemcpy(out, host.data(), host.size() * sizeof(float),
                                        cudaMemcpyHostToDevice));
  return out;
}

template <typename T>
absl::Status CudaBackend<T>::Init(const ModelWeights* weights) {
  const ModelConfig& c = config_;
  KVMEM_CUDA_RETURN_IF_ERROR(cudaSetDevice(ctx_->device));
  KVMEM_CUBLAS_RETURN_IF_ERROR(cublasCreate(&cublas_));
  KVMEM_CUBLAS_RETURN_IF_ERROR(cublasSetStream(cublas_, ctx_->stream));
  // A fixed workspace keeps cuBLAS from allocating during a pass (and lets passes be captured
  // into CUDA graphs).
  constexpr size_t kCublasWorkspace = size_t{32} << 20;
  KVMEM_CUDA_RETURN_IF_ERROR(cudaMalloc(&cublas_workspace_, kCublasWorkspace));
  KVMEM_CUBLAS_RETURN_IF_ERROR(cublasSetWorkspace(cublas_, cublas_workspace_, kCublasWorkspace));
  if (std::is_same_v<T, float>) {
    KVMEM_CUBLAS_RETURN_IF_ERROR(cublasSetMathMode(cublas_, CUBLAS_PEDANTIC_MATH));
  }
  // Upload staging: two slots of about 16 MiB, pinned on the host, and a copy stream.
  KVMEM_CUDA_RETURN_IF_ERROR(
      cudaStreamCreateWithFlags(&uploads_.stream, cudaStreamNonBlocking));
  {
    const int64_t row_bytes = 2 * c.head_dim * sizeof(T) + 4 * sizeof(int64_t);
    uploads_.slot_rows = std::max<int64_t>(1024, ((int64_t{16} << 20) / row_bytes) / 8 * 8);
    const size_t slot_bytes = uploads_.Layout(uploads_.slot_rows, c.head_dim).bytes;
    for (UploadSlot& slot : uploads_.slots) {
      KVMEM_CUDA_RETURN_IF_ERROR(cudaMallocHost(reinterpret_cast<void**>(&slot.host), slot_bytes));
      KVMEM_ASSIGN_OR_RETURN(slot.device, AllocWeight<uint8_t>(slot_bytes));
      KVMEM_CUDA_RETURN_IF_ERROR(cudaEventCreateWithFlags(&slot.host_free, cudaEventDisableTiming));
      KVMEM_CUDA_RETURN_IF_ERROR(
          cudaEventCreateWithFlags(&slot.device_free, cudaEventDisableTiming));
    }
  }
  // Freed pool memory stays with the process: KV copies grow and shrink every turn.
  cudaMemPool_t pool;
  KVMEM_CUDA_RETURN_IF_ERROR(cudaDeviceGetDefaultMemPool(&pool, ctx_->device));
  uint64_t threshold = ~uint64_t{0};
  KVMEM_CUDA_RETURN_IF_ERROR(
      cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &threshold));

  const bool host = weights != nullptr;
  const int64_t h = c.hidden_size, qd = c.q_dim(), kvd = c.kv_dim(), inter = c.intermediate_size;
  KVMEM_ASSIGN_OR_RETURN(embed_, UploadMatrix({host ? weights->embed : nullptr},
                                              {c.vocab_size}, h));
  if (host ? weights->lm_head == weights->embed : c.tie_word_embeddings) {
    lm_head_ = embed_;
  } else {
    KVMEM_ASSIGN_OR_RETURN(lm_head_, UploadMatrix({host ? weights->lm_head : nullptr},
                                                  {c.vocab_size}, h));
  }
  KVMEM_ASSIGN_OR_RETURN(final_norm_,
                         UploadVector({host ? weights->final_norm : nullptr}, {h}, true));
  layers_.resize(c.num_layers);
  for (int l = 0; l < c.num_layers; ++l) {
    const LayerWeights* lw = host ? &weights->layers[l] : nullptr;
    LayerDevice& d = layers_[l];
    auto p = [&](const float* LayerWeights::*field) { return lw ? lw->*field : nullptr; };
    KVMEM_ASSIGN_OR_RETURN(d.w_qkv, UploadMatrix({p(&LayerWeights::wq), p(&LayerWeights::wk),
                                                  p(&LayerWeights::wv)},
                                                 {qd, kvd, kvd}, h));
    KVMEM_ASSIGN_OR_RETURN(d.w_o, UploadMatrix({p(&LayerWeights::wo)}, {h}, qd));
    KVMEM_ASSIGN_OR_RETURN(d.w_gate_up,
                           UploadMatrix({p(&LayerWeights::w_gate), p(&LayerWeights::w_up)},
                                        {inter, inter}, h));
    KVMEM_ASSIGN_OR_RETURN(d.w_down, UploadMatrix({p(&LayerWeights::w_down)}, {h}, inter));
    KVMEM_ASSIGN_OR_RETURN(d.attn_norm, UploadVector({p(&LayerWeights::attn_norm)}, {h}, true));
    KVMEM_ASSIGN_OR_RETURN(d.mlp_norm, UploadVector({p(&LayerWeights::mlp_norm)}, {h}, true));
    if (lw != nullptr && (lw->bq || lw->bk || lw->bv)) {
      KVMEM_ASSIGN_OR_RETURN(d.b_qkv, UploadVector({lw->bq, lw->bk, lw->bv}, {qd, kvd, kvd},
                                                   false));
    }
    if (lw != nullptr && lw->bo) {
      KVMEM_ASSIGN_OR_RETURN(d.b_o, UploadVector({lw->bo}, {h}, false));
    }
    if (lw != nullptr && (lw->b_gate || lw->b_up)) {
      KVMEM_ASSIGN_OR_RETURN(d.b_gate_up,
                             UploadVector({lw->b_gate, lw->b_up}, {inter, inter}, false));
    }
    if (lw != nullptr && lw->b_down) {
      KVMEM_ASSIGN_OR_RETURN(d.b_down, UploadVector({lw->b_down}, {h}, false));
    }
  }
  const std::vector<double> inv_freq = c.RopeInverseFrequencies();
  KVMEM_ASSIGN_OR_RETURN(inv_freq_, AllocWeight<double>(inv_freq.size()));
  KVMEM_CUDA_RETURN_IF_ERROR(cudaMemcpy(inv_freq_, inv_freq.data(),
                                        inv_freq.size() * sizeof(double),
                                        cudaMemcpyHostToDevice));
  KVMEM_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(ctx_->stream));
  return absl::OkStatus();
}

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
  const int kvh = config_.num_kv_heads, hd = config_.head_dim;
  struct Pending {
    int index;  // into dkv.heads
    KvSyncPlan plan;
  };
  std::vector<Pending> pending;
  int64_t upload_rows = 0;
  for (int l = first_layer; l < last_layer; ++l) {
    for (int g = 0; g < kvh; ++g) {
      const int i = l * kvh + g;
      DeviceHead<T>& dh = dkv.heads[i];
      if (dh.version == kv.version(l, g)) continue;
      KvSyncPlan plan = PlanKvSync(dh.mirrored, kv.head(l, g).positions);
      if (plan.unchanged(static_cast<int64_t>(dh.mirrored.size()))) {
        dh.version = kv.version(l, g);
        continue;
      }
      upload_rows += static_cast<int64_t>(plan.uploads.size());
      pending.push_back({i, std::move(plan)});
    }
  }
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
    KVMEM_RETURN_IF_ERROR(Reserve(
        dkv, dh, static_cast<int64_t>(dh.mirrored.size() + p.plan.uploads.size())));
  }

  // Uploads, in chunks through the two pinned staging slots: rows are converted to T while
  // packed on the host, copied on the copy stream, and scattered to their rows on the compute
  // stream, so packing chunk i + 1 overlaps the copy of chunk i and the scatter of chunk i - 1.
  if (upload_rows > 0) {
    int slot_index = 0;
    int64_t rows = 0;
    auto flush = [&]() -> absl::Status {
      if (rows == 0) return absl::OkStatus();
      UploadSlot& slot = uploads_.slots[slot_index];
      const UploadLayout layout = uploads_.Layout(rows, hd);
      KVMEM_CUDA_RETURN_IF_ERROR(cudaStreamWaitEvent(uploads_.stream, slot.device_free, 0));
      KVMEM_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(slot.device, slot.host, layout.bytes,
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
      sp.rows = rows;
      sp.head_dim = hd;
      KVMEM_CUDA_RETURN_IF_ERROR(LaunchScatterKvRows(sp, ctx_->stream));
      KVMEM_CUDA_RETURN_IF_ERROR(cudaEventRecord(slot.device_free, ctx_->stream));
      slot_index = 1 - slot_index;
      rows = 0;
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
    // Packs `chunk` into the current slot (at a full slot's layout, compacted when partial) and
    // sends it. Runs of one head's rows are packed on the shared thread pool: each run reads its
    // rows back first when the cache keeps them with the backend (KvCache::ReadRows may be
    // called from several threads), then converts them to T.
    auto pack_and_flush = [&]() -> absl::Status {
      if (chunk.empty()) return absl::OkStatus();
      UploadSlot& slot = uploads_.slots[slot_index];
      // The slot's previous copy must be done before its pinned memory is rewritten.
      KVMEM_CUDA_RETURN_IF_ERROR(cudaEventSynchronize(slot.host_free));
      const UploadLayout full = uploads_.Layout(chunk_rows, hd);
      constexpr int64_t kRunRows = 512;
      std::vector<std::pair<int64_t, int64_t>> runs;  // [begin, end) of chunk, one head each
      for (int64_t b = 0; b < static_cast<int64_t>(chunk.size());) {
        int64_t e = b + 1;
        while (e < static_cast<int64_t>(chunk.size()) && e - b < kRunRows &&
               chunk[e].pending == chunk[b].pending) {
          ++e;
        }
        runs.push_back({b, e});
        b = e;
      }
      const bool read_back = !kv.host_rows();
      std::mutex error_mu;
      absl::Status error;
      auto pack_runs = [&](int64_t first_run, int64_t last_run) {
        std::vector<int64_t> positions;
        std::vector<float> read_keys, read_values;
        for (int64_t r = first_run; r < last_run; ++r) {
          const auto [begin, end] = runs[r];
          const Pending& p = pending[chunk[begin].pending];
          DeviceHead<T>& dh = dkv.heads[p.index];
          const int layer = p.index / kvh, head = p.index % kvh;
          const HeadKv& src = kv.head(layer, head);
          if (read_back) {
            positions.clear();
            for (int64_t k = begin; k < end; ++k) {
              positions.push_back(src.positions[p.plan.uploads[chunk[k].u]]);
            }
            read_keys.resize(positions.size() * hd);
            read_values.resize(read_keys.size());
            absl::Status s =
                kv.ReadRows(layer, head, positions, read_keys.data(), read_values.data());
            if (!s.ok()) {
              std::lock_guard<std::mutex> lock(error_mu);
              if (error.ok()) error = std::move(s);
              continue;
            }
          }
          // Rows [0, mirrored.size()) stay; upload u lands at row mirrored.size() + u.
          const int64_t first_row = static_cast<int64_t>(dh.mirrored.size());
          for (int64_t k = begin; k < end; ++k) {
            const int64_t u = chunk[k].u;
            const int64_t e = p.plan.uploads[u];
            const int64_t row = first_row + u;
            const float* key = read_back ? &read_keys[(k - begin) * hd] : &src.keys[e * hd];
            const float* value = read_back ? &read_values[(k - begin) * hd] : &src.values[e * hd];
            RowsFromFloat(key, hd, reinterpret_cast<T*>(slot.host + full.keys) + k * hd);
            RowsFromFloat(value, hd, reinterpret_cast<T*>(slot.host + full.values) + k * hd);
            reinterpret_cast<int64_t*>(slot.host + full.positions)[k] = src.positions[e];
            reinterpret_cast<T**>(slot.host + full.dst_keys)[k] = dh.keys(hd) + row * hd;
            reinterpret_cast<T**>(slot.host + full.dst_values)[k] = dh.values(hd) + row * hd;
            reinterpret_cast<int64_t**>(slot.host + full.dst_positions)[k] = dh.positions(hd) + row;
          }
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
      chunk.clear();
      if (rows < chunk_rows) {
        // A partial chunk: move its sections from the full-slot layout to the compact one.
        const UploadLayout compact = uploads_.Layout(rows, hd);
        const size_t kv_bytes = static_cast<size_t>(rows) * hd * sizeof(T);
        std::memmove(slot.host + compact.values, slot.host + full.values, kv_bytes);
        std::memmove(slot.host + compact.positions, slot.host + full.positions,
                     rows * sizeof(int64_t));
        std::memmove(slot.host + compact.dst_keys, slot.host + full.dst_keys, rows * sizeof(void*));
        std::memmove(slot.host + compact.dst_values, slot.host + full.dst_values,
                     rows * sizeof(void*));
        std::memmove(slot.host + compact.dst_positions, slot.host + full.dst_positions,
                     rows * sizeof(void*));
      }
      return flush();
    };
    for (size_t i = 0; i < pending.size(); ++i) {
      for (size_t u = 0; u < pending[i].plan.uploads.size(); ++u) {
        chunk.push_back({static_cast<int32_t>(i), static_cast<int64_t>(u)});
        if (static_cast<int64_t>(chunk.size()) == chunk_rows) {
          KVMEM_RETURN_IF_ERROR(pack_and_flush());
        }
      }
    }
    KVMEM_RETURN_IF_ERROR(pack_and_flush());
  }

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
      KVMEM_ASSIGN_OR_RETURN(uint8_t * base, AllocAsync<uint8_t>(
                                                 DeviceHead<T>::Bytes(capacity, hd), ctx_->stream));
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
    const KvCache& kv, const SnapKvOptions& options,
    const std::vector<std::vector<float>>& queries, int w) {
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
  KVMEM_RETURN_IF_ERROR(SyncHeads(kv, *dkv, 0, L));
  int32_t max_length = 0;
  for (const DeviceHead<T>& dh : dkv->heads) {
    max_length = std::max<int32_t>(max_length, static_cast<int32_t>(dh.mirrored.size()));
  }
  Scratch<uint8_t> table_mem, workspace;
  HeadTables<T> tables;
  KVMEM_RETURN_IF_ERROR(AllocateTables(&table_mem, &tables));
  KVMEM_RETURN_IF_ERROR(UploadTables(*dkv, 0, L, 0, tables));
  Scratch<float> d_queries;
  KVMEM_RETURN_IF_ERROR(d_queries.Allocate(per_layer * L, s));
  for (int l = 0; l < L; ++l) {
    KVMEM_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(d_queries.get() + per_layer * l,
                                               queries[l].data(), per_layer * sizeof(float),
                                               cudaMemcpyHostToDevice, s));
  }
  const int budget = options.budget;
  Scratch<int32_t> keep, counts;
  KVMEM_RETURN_IF_ERROR(keep.Allocate(static_cast<size_t>(L) * kvh * budget, s));
  KVMEM_RETURN_IF_ERROR(counts.Allocate(static_cast<size_t>(L) * kvh, s));
  const size_t ws = SnapKvWorkspaceBytes(c.num_heads, kvh, w, max_length);
  KVMEM_RETURN_IF_ERROR(workspace.Allocate(ws, s));
  for (int l = 0; l < L; ++l) {
    SnapKvParams<T> p;
    p.queries = d_queries.get() + per_layer * l;
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
    KVMEM_CUDA_RETURN_IF_ERROR(LaunchSnapKv(p, workspace.get(), ws, s));
  }
  std::vector<int32_t> host_keep(static_cast<size_t>(L) * kvh * budget);
  std::vector<int32_t> host_counts(static_cast<size_t>(L) * kvh);
  KVMEM_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(host_keep.data(), keep.get(),
                                             host_keep.size() * sizeof(int32_t),
                                             cudaMemcpyDeviceToHost, s));
  KVMEM_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(host_counts.data(), counts.get(),
                                             host_counts.size() * sizeof(int32_t),
                                             cudaMemcpyDeviceToHost, s));
  KVMEM_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(s));
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
      KVMEM_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(grown, dd.data,
                                                 dd.synced * per_block * sizeof(float),
                                                 cudaMemcpyDeviceToDevice, s));
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
                                             packed.size() * sizeof(float),
                                             cudaMemcpyHostToDevice, s));
  dd.synced = blocks;
  // The window's query rows, then one thread per (KV head, block).
  const int64_t qd = c.q_dim();
  Scratch<float> window, scores;
  KVMEM_RETURN_IF_ERROR(window.Allocate(static_cast<size_t>(w) * qd, s));
  KVMEM_RETURN_IF_ERROR(scores.Allocate(static_cast<size_t>(kvh) * blocks, s));
  KVMEM_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(window.get(), q + (n - w) * qd,
                                             static_cast<size_t>(w) * qd * sizeof(float),
                                             cudaMemcpyHostToDevice, s));
  KVMEM_CUDA_RETURN_IF_ERROR(LaunchDigestScores(window.get(), w, qd, c.num_heads, kvh, hd,
                                                dd.data, static_cast<int>(blocks), scores.get(),
                                                s));
  std::vector<float> out(static_cast<size_t>(kvh) * blocks);
  KVMEM_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(out.data(), scores.get(), out.size() * sizeof(float),
                                             cudaMemcpyDeviceToHost, s));
  KVMEM_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(s));
  return out;
}

// Writes the pointer tables of layers [first_layer, last_layer), with every head's length
// grown by `appended` (the pass's new tokens, which AppendKv writes next).
template <typename T>
absl::Status CudaBackend<T>::UploadTables(const DeviceKv<T>& dkv, int first_layer,
                                          int last_layer, int64_t appended,
                                          const HeadTables<T>& tables) {
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
  KVMEM_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(tables.keys + begin, keys.data(),
                                             count * sizeof(T*), cudaMemcpyHostToDevice, s));
  KVMEM_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(tables.values + begin, values.data(),
                                             count * sizeof(T*), cudaMemcpyHostToDevice, s));
  KVMEM_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(tables.positions + begin, positions.data(),
                                             count * sizeof(int64_t*), cudaMemcpyHostToDevice, s));
  KVMEM_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(tables.lengths + begin, lengths.data(),
                                             count * sizeof(int32_t), cudaMemcpyHostToDevice, s));
  return absl::OkStatus();
}

template <typename T>
absl::Status CudaBackend<T>::AllocatePass(int64_t n, int64_t logit_rows, int observed,
                                          PassScratch* scratch, PassBuffers* b) {
  const ModelConfig& c = config_;
  const int64_t h = c.hidden_size, qd = c.q_dim(), kvd = c.kv_dim(), inter = c.intermediate_size;
  const int L = c.num_layers;
  cudaStream_t s = ctx_->stream;
  KVMEM_RETURN_IF_ERROR(scratch->ids.Allocate(n, s));
  KVMEM_RETURN_IF_ERROR(scratch->pos.Allocate(1, s));
  KVMEM_RETURN_IF_ERROR(scratch->x.Allocate(n * h, s));
  KVMEM_RETURN_IF_ERROR(scratch->xn.Allocate(n * h, s));
  KVMEM_RETURN_IF_ERROR(scratch->qkv.Allocate(n * (qd + 2 * kvd), s));
  KVMEM_RETURN_IF_ERROR(scratch->q.Allocate(n * qd, s));
  if (!std::is_same_v<T, float>) KVMEM_RETURN_IF_ERROR(scratch->q_t.Allocate(n * qd, s));
  KVMEM_RETURN_IF_ERROR(scratch->new_k.Allocate(L * n * kvd, s));
  KVMEM_RETURN_IF_ERROR(scratch->new_v.Allocate(L * n * kvd, s));
  KVMEM_RETURN_IF_ERROR(scratch->attn.Allocate(n * qd, s));
  KVMEM_RETURN_IF_ERROR(scratch->proj.Allocate(n * h, s));
  KVMEM_RETURN_IF_ERROR(scratch->gate_up.Allocate(n * 2 * inter, s));
  KVMEM_RETURN_IF_ERROR(scratch->act.Allocate(n * inter, s));
  KVMEM_RETURN_IF_ERROR(scratch->logits.Allocate(logit_rows * c.vocab_size, s));
  if (observed > 0) {
    KVMEM_RETURN_IF_ERROR(scratch->observed_q.Allocate(static_cast<size_t>(L) * observed * qd, s));
  }
  KVMEM_RETURN_IF_ERROR(AllocateTables(&scratch->tables, &b->tables));
  b->ids = scratch->ids.get();
  b->pos = scratch->pos.get();
  b->x = scratch->x.get();
  b->xn = scratch->xn.get();
  b->qkv = scratch->qkv.get();
  b->q = scratch->q.get();
  b->q_t = std::is_same_v<T, float> ? reinterpret_cast<T*>(scratch->q.get()) : scratch->q_t.get();
  b->new_k = scratch->new_k.get();
  b->new_v = scratch->new_v.get();
  b->attn = scratch->attn.get();
  b->proj = scratch->proj.get();
  b->gate_up = scratch->gate_up.get();
  b->act = scratch->act.get();
  b->logits = scratch->logits.get();
  b->observed_q = scratch->observed_q.get();
  return absl::OkStatus();
}

template <typename T>
absl::Status CudaBackend<T>::EnqueuePass(PassBuffers* b, int64_t n, int64_t start_pos,
                                         int observed, int64_t first_logit,
                                         const std::vector<int32_t>& max_lengths,
                                         const std::function<absl::Status(int)>& after_qkv) {
  const ModelConfig& c = config_;
  const int64_t h = c.hidden_size, qd = c.q_dim(), kvd = c.kv_dim(), inter = c.intermediate_size;
  const int64_t kvh = c.num_kv_heads;
  const int L = c.num_layers;
  cudaStream_t s = ctx_->stream;
  const float scale = 1.0f / std::sqrt(static_cast<float>(c.head_dim));

  KVMEM_CUDA_RETURN_IF_ERROR(LaunchEmbeddingGather(embed_, c.vocab_size, h, b->ids, n, b->x, s));
  const float* residual = nullptr;  // the previous block's output, added before the next norm
  const float* residual_bias = nullptr;
  for (int l = 0; l < L; ++l) {
    const LayerDevice& lw = layers_[l];
    T* layer_k = b->new_k + static_cast<int64_t>(l) * n * kvd;
    T* layer_v = b->new_v + static_cast<int64_t>(l) * n * kvd;
    // Attention block: norm, fused QKV projection, bias + RoPE + split.
    KVMEM_CUDA_RETURN_IF_ERROR(LaunchResidualRmsNorm<T>(b->x, residual, residual_bias,
                                                        lw.attn_norm, n, h, c.rms_norm_eps, b->xn,
                                                        s));
    KVMEM_RETURN_IF_ERROR(Gemm(lw.w_qkv, qd + 2 * kvd, h, b->xn, n, b->qkv));
    QkvRopeParams<T> rp;
    rp.qkv = b->qkv;
    rp.bias = lw.b_qkv;
    rp.n = n;
    rp.start_position_device = b->pos;
    rp.num_heads = c.num_heads;
    rp.num_kv_heads = c.num_kv_heads;
    rp.head_dim = c.head_dim;
    rp.inv_freq = inv_freq_;
    rp.q = b->q;
    rp.q_t = std::is_same_v<T, float> ? nullptr : b->q_t;
    rp.k = layer_k;
    rp.v = layer_v;
    KVMEM_CUDA_RETURN_IF_ERROR(LaunchQkvRope(rp, s));
    if (observed > 0) {
      KVMEM_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(
          b->observed_q + static_cast<int64_t>(l) * observed * qd, b->q + (n - observed) * qd,
          observed * qd * sizeof(float), cudaMemcpyDeviceToDevice, s));
    }
    if (after_qkv) KVMEM_RETURN_IF_ERROR(after_qkv(l));
    // The new tokens join their heads, then attend.
    AppendKvParams<T> ap;
    ap.keys = b->tables.keys + l * kvh;
    ap.values = b->tables.values + l * kvh;
    ap.positions = b->tables.positions + l * kvh;
    ap.lengths = b->tables.lengths + l * kvh;
    ap.k = layer_k;
    ap.v = layer_v;
    ap.n = n;
    ap.start_position_device = b->pos;
    ap.num_kv_heads = c.num_kv_heads;
    ap.head_dim = c.head_dim;
    KVMEM_CUDA_RETURN_IF_ERROR(LaunchAppendKv(ap, s));
    RaggedKv<T> ragged;
    ragged.keys = b->tables.keys + l * kvh;
    ragged.values = b->tables.values + l * kvh;
    ragged.positions = b->tables.positions + l * kvh;
    ragged.lengths = b->tables.lengths + l * kvh;
    ragged.num_kv_heads = c.num_kv_heads;
    ragged.head_dim = c.head_dim;
    ragged.max_length = max_lengths[l];
    if (n == 1) {
      DecodeAttentionParams<T> dp;
      dp.q = b->q_t;
      dp.kv = ragged;
      dp.num_heads = c.num_heads;
      dp.scale = scale;
      dp.sliding_window = c.sliding_window;
      dp.q_position = start_pos;
      dp.split_size = options_.decode_split;
      dp.out = b->attn;
      const size_t ws = DecodeAttentionWorkspaceBytes(c.num_heads, c.head_dim, ragged.max_length,
                                                      options_.decode_split);
      if (ws > b->decode_ws_bytes) {
        if (b->decode_ws_scratch == nullptr) {
          return absl::InternalError("decode workspace too small for a captured step");
        }
        KVMEM_RETURN_IF_ERROR(b->decode_ws_scratch->Allocate(ws, s));
        b->decode_ws = b->decode_ws_scratch->get();
        b->decode_ws_bytes = ws;
      }
      KVMEM_CUDA_RETURN_IF_ERROR(LaunchDecodeAttention(dp, b->decode_ws, b->decode_ws_bytes, s));
    } else {
      PrefillAttentionParams<T> pp;
      pp.q = b->q_t;
      pp.kv = ragged;
      pp.n = n;
      pp.num_heads = c.num_heads;
      pp.scale = scale;
      pp.sliding_window = c.sliding_window;
      pp.start_position = start_pos;
      pp.out = b->attn;
      pp.tensor_cores = options_.tensor_core_prefill;
      KVMEM_CUDA_RETURN_IF_ERROR(LaunchPrefillAttention(pp, s));
    }
    KVMEM_RETURN_IF_ERROR(Gemm(lw.w_o, h, qd, b->attn, n, b->proj));
    // MLP block (SwiGLU).
    KVMEM_CUDA_RETURN_IF_ERROR(LaunchResidualRmsNorm<T>(b->x, b->proj, lw.b_o, lw.mlp_norm, n, h,
                                                        c.rms_norm_eps, b->xn, s));
    KVMEM_RETURN_IF_ERROR(Gemm(lw.w_gate_up, 2 * inter, h, b->xn, n, b->gate_up));
    KVMEM_CUDA_RETURN_IF_ERROR(LaunchSwiGluRows<T>(b->gate_up, lw.b_gate_up, n, inter, b->act, s));
    KVMEM_RETURN_IF_ERROR(Gemm(lw.w_down, h, inter, b->act, n, b->proj));
    residual = b->proj;
    residual_bias = lw.b_down;
  }

  // Logits of the rows asked for.
  const int64_t logit_rows = n - first_logit;
  KVMEM_CUDA_RETURN_IF_ERROR(LaunchResidualRmsNorm<T>(b->x + first_logit * h,
                                                      residual + first_logit * h, residual_bias,
                                                      final_norm_, logit_rows, h, c.rms_norm_eps,
                                                      b->xn, s));
  KVMEM_RETURN_IF_ERROR(Gemm(lm_head_, c.vocab_size, h, b->xn, logit_rows, b->logits));
  return absl::OkStatus();
}

template <typename T>
absl::Status CudaBackend<T>::FinishPass(const PassBuffers& b, int64_t n, int64_t start_pos,
                                        int observed, int64_t logit_rows, KvCache* kv,
                                        DeviceKv<T>* dkv, ForwardResult* result,
                                        uint8_t* pinned) {
  const ModelConfig& c = config_;
  const int64_t hd = c.head_dim, qd = c.q_dim(), kvd = c.kv_dim(), kvh = c.num_kv_heads;
  const int L = c.num_layers;
  cudaStream_t s = ctx_->stream;
  result->logits.resize(logit_rows * c.vocab_size);
  std::vector<float> obs(observed > 0 ? static_cast<size_t>(L) * observed * qd : 0);
  std::vector<T> host_k(static_cast<size_t>(L) * n * kvd), host_v(host_k.size());
  // Results come back in one wait: through pinned staging when given (every copy truly
  // asynchronous, then one host copy each), else straight into the pageable vectors.
  struct Download {
    void* dst;
    const void* src;
    size_t bytes;
  };
  const Download downloads[] = {
      {result->logits.data(), b.logits, result->logits.size() * sizeof(float)},
      {obs.data(), b.observed_q, obs.size() * sizeof(float)},
      {host_k.data(), b.new_k, host_k.size() * sizeof(T)},
      {host_v.data(), b.new_v, host_v.size() * sizeof(T)}};
  size_t staged = 0;
  for (const Download& d : downloads) {
    if (d.bytes == 0) continue;
    if (pinned != nullptr) {
      KVMEM_CUDA_RETURN_IF_ERROR(
          cudaMemcpyAsync(pinned + staged, d.src, d.bytes, cudaMemcpyDeviceToHost, s));
      staged += (d.bytes + 7) / 8 * 8;
    } else {
      KVMEM_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(d.dst, d.src, d.bytes, cudaMemcpyDeviceToHost, s));
    }
  }
  KVMEM_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(s));
  if (pinned != nullptr) {
    staged = 0;
    for (const Download& d : downloads) {
      if (d.bytes == 0) continue;
      std::memcpy(d.dst, pinned + staged, d.bytes);
      staged += (d.bytes + 7) / 8 * 8;
    }
  }

  result->observed_queries.assign(observed > 0 ? L : 0, {});
  for (int l = 0; l < L && observed > 0; ++l) {
    // (observed, num_heads, head_dim) on the device -> (num_heads, observed, head_dim).
    std::vector<float>& oq = result->observed_queries[l];
    oq.resize(static_cast<size_t>(c.num_heads) * observed * hd);
    const float* src = &obs[static_cast<size_t>(l) * observed * qd];
    for (int hq = 0; hq < c.num_heads; ++hq) {
      for (int i = 0; i < observed; ++i) {
        std::memcpy(&oq[(static_cast<size_t>(hq) * observed + i) * hd], src + (i * qd + hq * hd),
                    hd * sizeof(float));
      }
    }
  }
  // The host cache gets the entries exactly as the device holds them (rounded to T), so a
  // later upload of them reproduces the device's rows bit for bit: into every head (kHost),
  // or as the layer's fresh rows with positions only in the heads (kBackend).
  std::vector<float> krow(hd), vrow(hd);
  std::vector<float> fresh_k, fresh_v;
  for (int l = 0; l < L; ++l) {
    if (!kv->host_rows()) {
      const size_t begin = static_cast<size_t>(l) * n * kvd, count = static_cast<size_t>(n) * kvd;
      fresh_k.resize(count);
      fresh_v.resize(count);
      for (size_t i = 0; i < count; ++i) {
        fresh_k[i] = HostToFloat(host_k[begin + i]);
        fresh_v[i] = HostToFloat(host_v[begin + i]);
      }
      kv->AppendFresh(l, start_pos, n, fresh_k.data(), fresh_v.data());
    }
    for (int g = 0; g < kvh; ++g) {
      DeviceHead<T>& dh = dkv->heads[l * kvh + g];
      // A head changed on the host after its layer was synced (only a hook editing another
      // layer could do that) no longer matches the device copy: upload it whole next time.
      const bool in_step = dh.version == kv->version(l, g);
      HeadKv& head = kv->head(l, g);
      if (!in_step) {
        dh.mirrored.clear();
        dh.version = ~uint64_t{0};
      }
      for (int64_t t = 0; t < n; ++t) {
        if (kv->host_rows()) {
          const size_t off = ((static_cast<size_t>(l) * n + t) * kvh + g) * hd;
          for (int64_t d = 0; d < hd; ++d) {
            krow[d] = HostToFloat(host_k[off + d]);
            vrow[d] = HostToFloat(host_v[off + d]);
          }
          head.Append(start_pos + t, krow.data(), vrow.data(), static_cast<int>(hd));
        } else {
          KVMEM_CHECK(head.positions.empty() || head.positions.back() < start_pos + t);
          head.positions.push_back(start_pos + t);
        }
        if (in_step) dh.mirrored.push_back(start_pos + t);
      }
      if (in_step) dh.version = kv->version(l, g);
    }
  }
  return absl::OkStatus();
}

template <typename T>
absl::Status CudaBackend<T>::Run(absl::Span<const int32_t> tokens, int64_t start_pos,
                                 KvCache* kv, const ForwardOptions& options,
                                 ForwardResult* result, std::shared_ptr<void>* stale) {
  const ModelConfig& c = config_;
  const int64_t n = static_cast<int64_t>(tokens.size());
  const int64_t qd = c.q_dim(), kvh = c.num_kv_heads;
  const int L = c.num_layers;
  cudaStream_t s = ctx_->stream;

  // 1. The device copy of the hot set, up to date, with room for the new tokens.
  KVMEM_ASSIGN_OR_RETURN(DeviceKv<T> * dkv, Attach(kv, stale));
  KVMEM_RETURN_IF_ERROR(SyncHeads(*kv, *dkv, 0, L));
  for (DeviceHead<T>& dh : dkv->heads) {
    KVMEM_RETURN_IF_ERROR(Reserve(*dkv, dh, static_cast<int64_t>(dh.mirrored.size()) + n));
  }
  const int observed = static_cast<int>(std::min<int64_t>(options.observe_last, n));
  const int64_t first_logit = options.all_logits ? 0 : n - 1;
  auto layer_max_length = [&](int l) {
    int64_t m = 0;
    for (int g = 0; g < kvh; ++g) {
      m = std::max<int64_t>(m, static_cast<int64_t>(dkv->heads[l * kvh + g].mirrored.size()) + n);
    }
    return static_cast<int32_t>(m);
  };
  std::vector<int32_t> max_lengths(L);
  for (int l = 0; l < L; ++l) max_lengths[l] = layer_max_length(l);

  // 2. A decode step without a hook replays a captured CUDA graph. The first decode step runs
  // op by op (so every kernel is loaded before a capture); a capture that fails turns graphs
  // off for this backend, logged once, and the step runs op by op.
  const bool graphable = n == 1 && observed <= 1 && !options.before_attention &&
                         options_.cuda_graphs && !decode_.graphs_failed && c.sliding_window == 0;
  DecodeGraph* graph = nullptr;
  if (graphable && decode_.eager_steps > 0) {
    int32_t longest = 0;
    for (int32_t m : max_lengths) longest = std::max(longest, m);
    absl::StatusOr<DecodeGraph*> captured = GraphFor(longest);
    if (captured.ok()) {
      graph = *captured;
    } else {
      decode_.graphs_failed = true;
      std::fprintf(stderr, "kvmem: CUDA graph capture failed, decoding op by op: %s\n",
                   captured.status().ToString().c_str());
    }
  }
  if (graph != nullptr) {
    // The step's inputs (head tables, position, token) are written into pinned memory laid out
    // as their device block and sent in one asynchronous copy; the previous step's copy is
    // done (FinishPass waited for the stream).
    PassBuffers& b = decode_.buffers;
    const int heads = L * static_cast<int>(kvh);
    uint8_t* in = decode_.step_host;
    auto* keys = reinterpret_cast<T**>(in);
    auto* values = reinterpret_cast<T**>(in + heads * sizeof(void*));
    auto* positions = reinterpret_cast<int64_t**>(in + 2 * heads * sizeof(void*));
    auto* lengths = reinterpret_cast<int32_t*>(in + 3 * heads * sizeof(void*));
    for (int i = 0; i < heads; ++i) {
      const DeviceHead<T>& dh = dkv->heads[i];
      keys[i] = dh.keys(c.head_dim);
      values[i] = dh.values(c.head_dim);
      positions[i] = dh.positions(c.head_dim);
      lengths[i] = static_cast<int32_t>(dh.mirrored.size() + 1);
    }
    std::memcpy(in + decode_.pos_offset, &start_pos, sizeof(int64_t));
    std::memcpy(in + decode_.ids_offset, tokens.data(), sizeof(int32_t));
    KVMEM_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(decode_.step_device, in, decode_.step_bytes,
                                               cudaMemcpyHostToDevice, s));
    KVMEM_CUDA_RETURN_IF_ERROR(cudaGraphLaunch(graph->exec, s));
    PassBuffers view = b;
    view.observed_q = observed > 0 ? b.observed_q : nullptr;
    return FinishPass(view, n, start_pos, observed, 1, kv, dkv, result, decode_.out_host);
  }

  // 3. Otherwise the pass is launched op by op, with scratch freed in stream order after it.
  if (graphable) ++decode_.eager_steps;
  PassScratch scratch;
  PassBuffers b;
  KVMEM_RETURN_IF_ERROR(AllocatePass(n, n - first_logit, observed, &scratch, &b));
  b.decode_ws_scratch = &scratch.decode_ws;
  KVMEM_RETURN_IF_ERROR(UploadTables(*dkv, 0, L, n, b.tables));
  KVMEM_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(b.ids, tokens.data(), n * sizeof(int32_t),
                                             cudaMemcpyHostToDevice, s));
  KVMEM_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(b.pos, &start_pos, sizeof(int64_t),
                                             cudaMemcpyHostToDevice, s));
  std::function<absl::Status(int)> after_qkv;
  std::vector<float> host_q;  // (n, num_heads, head_dim) for the before_attention hook
  if (options.before_attention) {
    // Recall may change this layer's heads on the host: hand it the queries, then bring the
    // layer's device copy up to date again before the new tokens join it.
    // Only the rows the hook asks for come over (recall reads the turn's last window).
    const int64_t rows =
        options.hook_query_rows > 0 ? std::min<int64_t>(options.hook_query_rows, n) : n;
    after_qkv = [&, rows](int l) -> absl::Status {
      host_q.resize(rows * qd);
      KVMEM_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(host_q.data(), b.q + (n - rows) * qd,
                                                 rows * qd * sizeof(float), cudaMemcpyDeviceToHost,
                                                 s));
      KVMEM_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(s));
      KVMEM_RETURN_IF_ERROR(options.before_attention(l, host_q.data(), rows, kv));
      KVMEM_RETURN_IF_ERROR(SyncHeads(*kv, *dkv, l, l + 1));
      for (int g = 0; g < kvh; ++g) {
        DeviceHead<T>& dh = dkv->heads[l * kvh + g];
        KVMEM_RETURN_IF_ERROR(Reserve(*dkv, dh, static_cast<int64_t>(dh.mirrored.size()) + n));
      }
      max_lengths[l] = layer_max_length(l);
      return UploadTables(*dkv, l, l + 1, n, b.tables);
    };
  }
  KVMEM_RETURN_IF_ERROR(EnqueuePass(&b, n, start_pos, observed, first_logit, max_lengths,
                                    after_qkv));
  return FinishPass(b, n, start_pos, observed, n - first_logit, kv, dkv, result);
}

template <typename T>
absl::StatusOr<typename CudaBackend<T>::DecodeGraph*> CudaBackend<T>::GraphFor(int32_t longest) {
  const ModelConfig& c = config_;
  const int L = c.num_layers;
  cudaStream_t s = ctx_->stream;
  // Graphs are keyed by a bucket of the longest head: attention is launched for the bucket's
  // length (shorter heads end early), so one graph serves a whole range of steps.
  constexpr int32_t kBucket = 4096;
  const int32_t bucket = (longest + kBucket - 1) / kBucket * kBucket;
  auto it = decode_.graphs.find(bucket);
  if (it != decode_.graphs.end()) return &it->second;

  if (!decode_.buffers_ready) {
    // Buffers of a one-token pass, at fixed addresses for the graphs' lifetime; published only
    // once every allocation succeeded.
    PassBuffers b;
    const int64_t h = c.hidden_size, qd = c.q_dim(), kvd = c.kv_dim();
    const int64_t inter = c.intermediate_size;
    KVMEM_ASSIGN_OR_RETURN(b.x, AllocWeight<float>(h));
    KVMEM_ASSIGN_OR_RETURN(b.xn, AllocWeight<T>(h));
    KVMEM_ASSIGN_OR_RETURN(b.qkv, AllocWeight<float>(qd + 2 * kvd));
    KVMEM_ASSIGN_OR_RETURN(b.q, AllocWeight<float>(qd));
    if (std::is_same_v<T, float>) {
      b.q_t = reinterpret_cast<T*>(b.q);
    } else {
      KVMEM_ASSIGN_OR_RETURN(b.q_t, AllocWeight<T>(qd));
    }
    KVMEM_ASSIGN_OR_RETURN(b.new_k, AllocWeight<T>(static_cast<size_t>(L) * kvd));
    KVMEM_ASSIGN_OR_RETURN(b.new_v, AllocWeight<T>(static_cast<size_t>(L) * kvd));
    KVMEM_ASSIGN_OR_RETURN(b.attn, AllocWeight<T>(qd));
    KVMEM_ASSIGN_OR_RETURN(b.proj, AllocWeight<float>(h));
    KVMEM_ASSIGN_OR_RETURN(b.gate_up, AllocWeight<float>(2 * inter));
    KVMEM_ASSIGN_OR_RETURN(b.act, AllocWeight<T>(inter));
    KVMEM_ASSIGN_OR_RETURN(b.logits, AllocWeight<float>(c.vocab_size));
    KVMEM_ASSIGN_OR_RETURN(b.observed_q, AllocWeight<float>(static_cast<size_t>(L) * qd));
    // Step inputs, one block: [head tables | position | token id], mirrored in pinned memory.
    const size_t heads = static_cast<size_t>(L) * c.num_kv_heads;
    const size_t table_bytes = heads * (3 * sizeof(void*) + sizeof(int32_t));
    const size_t pos_offset = (table_bytes + 7) / 8 * 8;
    const size_t ids_offset = pos_offset + sizeof(int64_t);
    const size_t step_bytes = ids_offset + sizeof(int64_t);
    KVMEM_ASSIGN_OR_RETURN(uint8_t * step, AllocWeight<uint8_t>(step_bytes));
    b.tables.keys = reinterpret_cast<T**>(step);
    b.tables.values = reinterpret_cast<T**>(step + heads * sizeof(void*));
    b.tables.positions = reinterpret_cast<int64_t**>(step + 2 * heads * sizeof(void*));
    b.tables.lengths = reinterpret_cast<int32_t*>(step + 3 * heads * sizeof(void*));
    b.pos = reinterpret_cast<int64_t*>(step + pos_offset);
    b.ids = reinterpret_cast<int32_t*>(step + ids_offset);
    // Pinned host memory: the step inputs' mirror, and room for a step's results.
    const size_t out_bytes = (c.vocab_size + static_cast<size_t>(L) * qd) * sizeof(float) +
                             2 * static_cast<size_t>(L) * kvd * sizeof(T) + 4 * 8;
    if (decode_.step_host == nullptr) {
      KVMEM_CUDA_RETURN_IF_ERROR(
          cudaMallocHost(reinterpret_cast<void**>(&decode_.step_host), step_bytes));
    }
    if (decode_.out_host == nullptr) {
      KVMEM_CUDA_RETURN_IF_ERROR(
          cudaMallocHost(reinterpret_cast<void**>(&decode_.out_host), out_bytes));
    }
    decode_.step_device = step;
    decode_.step_bytes = step_bytes;
    decode_.pos_offset = pos_offset;
    decode_.ids_offset = ids_offset;
    decode_.buffers = b;
    decode_.buffers_ready = true;
  }
  PassBuffers& b = decode_.buffers;
  const size_t ws = DecodeAttentionWorkspaceBytes(c.num_heads, c.head_dim, bucket,
                                                  options_.decode_split);
  if (ws > b.decode_ws_bytes) {
    // One workspace serves every graph: sized for the model's context (or this bucket, if
    // longer). Growing it retires the graphs that read the old one.
    const size_t want = std::max(
        ws, DecodeAttentionWorkspaceBytes(c.num_heads, c.head_dim,
                                          std::max(bucket, c.max_position_embeddings),
                                          options_.decode_split));
    for (auto& [key, old] : decode_.graphs) cudaGraphExecDestroy(old.exec);
    decode_.graphs.clear();
    if (decode_.workspace != nullptr) cudaFreeAsync(decode_.workspace, s);
    decode_.workspace = nullptr;
    b.decode_ws = nullptr;
    b.decode_ws_bytes = 0;
    KVMEM_ASSIGN_OR_RETURN(decode_.workspace, AllocAsync<uint8_t>(want, s));
    b.decode_ws = decode_.workspace;
    b.decode_ws_bytes = want;
  }
  b.decode_ws_scratch = nullptr;

  DecodeGraph graph;
  KVMEM_CUDA_RETURN_IF_ERROR(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
  absl::Status enqueued = EnqueuePass(&b, 1, 0, 1, 0, std::vector<int32_t>(L, bucket), nullptr);
  cudaGraph_t captured = nullptr;
  const cudaError_t end = cudaStreamEndCapture(s, &captured);
  if (!enqueued.ok()) {
    if (captured != nullptr) cudaGraphDestroy(captured);
    cudaGetLastError();
    return enqueued;
  }
  KVMEM_CUDA_RETURN_IF_ERROR(end);
  const cudaError_t inst = cudaGraphInstantiate(&graph.exec, captured, 0);
  cudaGraphDestroy(captured);
  KVMEM_CUDA_RETURN_IF_ERROR(inst);
  return &decode_.graphs.emplace(bucket, graph).first->second;
}

template <typename T>
absl::StatusOr<std::unique_ptr<Backend>> MakeBackend(const ModelConfig& config,
                                                     const ModelWeights* weights,
                                                     const CudaBackendOptions& options,
                                                     std::shared_ptr<CudaContext> ctx) {
  auto backend = std::make_unique<CudaBackend<T>>(config, options, std::move(ctx));
  KVMEM_RETURN_IF_ERROR(backend->Init(weights));
  return std::unique_ptr<Backend>(std::move(backend));
}

}  // namespace

bool CudaBackendAvailable(int device, std::string* why) {
  if (!CudaDeviceAvailable(why)) return false;  // driver, runtime and device 0
  int count = 0;
  cudaDeviceProp prop;
  if (cudaGetDeviceCount(&count) != cudaSuccess || device < 0 || device >= count ||
      cudaGetDeviceProperties(&prop, device) != cudaSuccess) {
    cudaGetLastError();
    if (why != nullptr) *why = absl::StrCat("CUDA device ", device, " does not exist");
    return false;
  }
  if (prop.major < 9) {
    if (why != nullptr) {
      *why = absl::StrCat(prop.name, " (device ", device, ") has compute capability ", prop.major,
                          ".", prop.minor, "; kernels are built for 9.0 and newer");
    }
    return false;
  }
  return true;
}

absl::StatusOr<std::unique_ptr<Backend>> CreateCudaBackend(const ModelConfig& config,
                                                           const ModelWeights* weights,
                                                           const CudaBackendOptions& options) {
  std::string why;
  if (!CudaBackendAvailable(options.device, &why)) {
    return absl::UnavailableError(absl::StrCat("no usable CUDA device: ", why));
  }
  if (weights == nullptr && options.random_weights_seed == 0) {
    return absl::InvalidArgumentError("CreateCudaBackend needs weights or a random seed");
  }
  if (config.num_layers <= 0) return absl::InvalidArgumentError("the model has no layers");
  if (config.head_dim > 256 || config.head_dim % 2 != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("head_dim ", config.head_dim, " is not supported (even, at most 256)"));
  }
  if (options.decode_split < 0) {
    return absl::InvalidArgumentError("decode_split must be 0 (default) or positive");
  }
  auto ctx = std::make_shared<CudaContext>();
  ctx->device = options.device;
  KVMEM_CUDA_RETURN_IF_ERROR(cudaSetDevice(options.device));
  KVMEM_CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&ctx->stream, cudaStreamNonBlocking));
  switch (options.dtype) {
    case DeviceDtype::kF32:
      return MakeBackend<float>(config, weights, options, std::move(ctx));
    case DeviceDtype::kF16:
      return MakeBackend<__half>(config, weights, options, std::move(ctx));
    case DeviceDtype::kBF16:
      break;
  }
  return MakeBackend<__nv_bfloat16>(config, weights, options, std::move(ctx));
}

}  // namespace kvmem
