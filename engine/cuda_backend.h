// The CUDA backend: the whole forward pass on one GPU, with the hot KV in device memory.
//
// Weights live on the device in the chosen type (bf16, f16, or f32 for exact parity checks); the
// residual stream, RoPE, softmax and every accumulation run in f32. GEMMs go through cuBLAS
// (fused QKV and fused gate/up projections); norm, RoPE, attention over the ragged per-head KV
// and the KV writes are our kernels (kernels/).
//
// The session's KvCache stays the host-side record of the hot set (what SnapKV, recall and the
// commit read). The backend keeps a device copy of it attached to the cache (KvCache::
// attachment()) and brings only the heads whose version changed up to date before each pass
// (PlanKvSync: appended entries are uploaded in place, evictions are gathered on the device,
// recalled entries are uploaded and gathered in). The copy is freed with the cache.
//
// This header needs no CUDA headers; in a build without CUDA the factory says so.
#ifndef KVMEM_ENGINE_CUDA_BACKEND_H_
#define KVMEM_ENGINE_CUDA_BACKEND_H_

#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/backend.h"
#include "engine/model.h"

namespace kvmem {

// The element type of device weights and KV.
enum class DeviceDtype { kF32, kBF16, kF16 };

// "f32", "bf16" or "f16"; INVALID_ARGUMENT naming the accepted values otherwise.
absl::StatusOr<DeviceDtype> ParseDeviceDtype(std::string_view name);
const char* DeviceDtypeName(DeviceDtype dtype);

struct CudaBackendOptions {
  // Default: kBF16. Weights and KV on the device; kF32 matches the CPU reference to ~1e-5.
  // kF16 has 3 more mantissa bits than bf16 but overflows past 65504.
  DeviceDtype dtype = DeviceDtype::kBF16;
  // Default: 0. CUDA device ordinal.
  int device = 0;
  // Default: 0 (the kernel's 256). Entries per split of decode attention.
  int decode_split = 0;
  // Default: true. Decode steps (one token, no recall hook) replay a CUDA
  // graph of the whole pass captured once per graph_bucket-entry bucket of the longest head.
  bool cuda_graphs = true;
  // Default: 4096. The bucket (in entries) of the longest head that selects a decode graph:
  // each step's attention is launched for its bucket's length (shorter heads end early), so a
  // larger bucket captures fewer graphs. Must be positive.
  int graph_bucket = 4096;
  // Default: true. Prefill attention on tensor cores for bf16/f16 (PrefillAttentionParams::
  // tensor_cores); false runs the CUDA-core kernel.
  bool tensor_core_prefill = true;
  // Default: 0. Benchmarks only: with no host weights, fill the device weights with uniform
  // values of this seed (scaled so activations stay finite) instead of uploading.
  uint64_t random_weights_seed = 0;
  // Default: 64 MiB. Pinned host memory through which a multi-token pass's new rows and
  // observed queries leave, layer by layer; a soft size, at least two layers' worth.
  size_t download_staging_bytes = size_t{64} << 20;
  // Default: 16 MiB. Each of the two pinned staging slots through which rows the device copy
  // lacks (page-in, recall, restore) go up, in bytes; a soft size, at least 8 rows a slot.
  // Uploads larger than a slot go in chunks that reuse the slots in turn.
  size_t upload_staging_bytes = size_t{16} << 20;
  // Default: 0 (off). Host memory the session's KV blocks may take from a pool of pinned,
  // device-mapped slabs (engine/block_memory.h), in bytes: a page-in or recall then reads
  // their rows where they lie instead of packing them through the staging slots. Past the
  // limit blocks stay in pageable memory. The pool is process-wide and outlives the backend;
  // serve it at least the warm tier's budget.
  int64_t pinned_block_bytes = 0;
  // Default: false. Diagnostics: time each op of every pass with CUDA events (a graphed decode
  // step counts as one op) and of device SnapKV selection; read with TakeCudaOpProfile.
  bool profile_ops = false;
};

// Device time of one op, summed over `count` passes (ms), in the order ops were first seen.
// An op's time runs from the end of the op before it, so host work the device waited for is
// charged to the op that followed it. "(host wall, whole call)" is each call's host time.
struct CudaOpTime {
  std::string op;
  double ms = 0;
  int64_t count = 0;
};

// The op times gathered since the last call by a CUDA backend created with profile_ops; empty
// for any other backend.
std::vector<CudaOpTime> TakeCudaOpProfile(Backend& backend);

// Rows a CUDA backend has uploaded to its device copies since it was made: packed into its
// staging slots on the host, or read by the device where they lie in pinned blocks
// (CudaBackendOptions::pinned_block_bytes). All zero for any other backend.
struct CudaUploadStats {
  int64_t rows_packed = 0;
  int64_t rows_by_address = 0;
  // SnapKV selections that read the pass's observed queries where the device kept them
  // (ForwardResult::observed_queries_on_backend) instead of uploading the host's.
  int64_t snapkv_queries_kept = 0;
};
CudaUploadStats GetCudaUploadStats(const Backend& backend);

// True when this build has the CUDA backend and device `device` can run it; otherwise false
// and *why (when non-null) says why.
bool CudaBackendAvailable(int device, std::string* why);

// The backend for `config`. `weights` (nullable only with options.random_weights_seed) must
// outlive the call; the backend copies them to the device and keeps no pointer to them.
// UNAVAILABLE when the build has no CUDA or the device cannot be used (the message says why);
// RESOURCE_EXHAUSTED when the weights do not fit in device memory; INVALID_ARGUMENT for
// options or shapes the kernels do not support.
absl::StatusOr<std::unique_ptr<Backend>> CreateCudaBackend(const ModelConfig& config,
                                                           const ModelWeights* weights,
                                                           const CudaBackendOptions& options);
inline absl::StatusOr<std::unique_ptr<Backend>> CreateCudaBackend(
    const Model& model, const CudaBackendOptions& options) {
  return CreateCudaBackend(model.config(), &model.weights(), options);
}

}  // namespace kvmem

#endif  // KVMEM_ENGINE_CUDA_BACKEND_H_
