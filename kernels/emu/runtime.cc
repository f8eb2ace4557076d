// The CUDA runtime API for the emulator (kernels/emu/emulator.h): the functions our code calls,
// defined against the toolkit's own headers, so that host code compiled for a GPU links
// against these instead of libcudart. Device memory is host memory. Streams run their
// operations as emulator.h's StreamMode says: eagerly, each when it is enqueued, or deferred,
// each as late as CUDA's ordering rules allow (some streams running ahead in the staggered
// modes); a stream being captured records them instead.
#include <cuda_runtime_api.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <iterator>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

#include "kernels/emu/emulator.h"

struct CUstream_st {
  // Names the stream in the registry, so that a queued wait outlives the stream it waits on.
  uint64_t id = 0;
  // Created without cudaStreamNonBlocking: ordered with the legacy default stream both ways.
  bool blocking = true;
  bool capturing = false;
  // A capture that an error or a prohibited call broke: EndCapture fails, as CUDA's does.
  std::atomic<bool> invalidated{false};
  cudaStreamCaptureMode mode = cudaStreamCaptureModeGlobal;
  std::thread::id owner;  // the thread that began the capture
  std::vector<std::function<void()>> captured;
  // Deferred mode, under QueueMu: the operations not yet run, oldest first, with their
  // sequence numbers; `enqueued` is the newest one's, `done` that of the newest that has run.
  std::deque<std::pair<uint64_t, std::function<void()>>> pending;
  uint64_t enqueued = 0;
  uint64_t done = 0;
};
struct CUevent_st {
  // Shared with the queued record, which may run after the event is destroyed.
  std::shared_ptr<std::chrono::steady_clock::time_point> when =
      std::make_shared<std::chrono::steady_clock::time_point>(std::chrono::steady_clock::now());
  // Its latest record, under QueueMu: the stream's id and the record's sequence number there
  // (0: complete).
  uint64_t stream_id = 0;
  uint64_t seq = 0;
};
using OpList = std::vector<std::function<void()>>;
struct CUgraph_st {
  OpList ops;
};
struct CUgraphExec_st {
  // Shared with queued launches, which may run after the executable graph is destroyed.
  std::shared_ptr<const OpList> ops;
};
struct CUmemPoolHandle_st {};

namespace kvmem {
namespace cuda_emu {
namespace {

// An H100's limits, which the kernels are written for.
constexpr int kMultiProcessors = 132;
constexpr size_t kSharedPerBlock = 48 << 10;
constexpr size_t kSharedPerBlockOptIn = 232448;
constexpr size_t kGlobalMemory = size_t{80} << 30;
// Fresh device memory reads as NaN (all bits set) in every float type, so a kernel that reads
// what nobody wrote shows it in the tests' comparisons.
constexpr unsigned char kFreshByte = 0xff;

thread_local cudaError_t t_last_error = cudaSuccess;
constexpr uint64_t kDefaultStreamId = 1;
CUstream_st g_default_stream{.id = kDefaultStreamId};
CUmemPoolHandle_st g_pool;

cudaError_t Fail(cudaError_t err) {
  t_last_error = err;
  return err;
}

struct Allocation {
  size_t bytes;
  bool device;  // else pinned host memory
};

std::mutex& AllocationsMu() {
  static std::mutex mu;
  return mu;
}
std::map<uintptr_t, Allocation>& Allocations() {
  static std::map<uintptr_t, Allocation> a;
  return a;
}

void* Allocate(size_t bytes, bool device) {
  // Exactly `bytes` (256-byte aligned, as cudaMalloc's are): under AddressSanitizer a kernel
  // that reads or writes one element past its buffer is reported where it does.
  void* p = nullptr;
  if (posix_memalign(&p, 256, std::max<size_t>(bytes, 1)) != 0) return nullptr;
  std::memset(p, kFreshByte, bytes);  // pinned host memory is not cleared either
  std::lock_guard<std::mutex> lock(AllocationsMu());
  Allocations()[reinterpret_cast<uintptr_t>(p)] = {bytes, device};
  return p;
}

cudaError_t Release(void* p, bool device) {
  if (p == nullptr) return cudaSuccess;
  {
    std::lock_guard<std::mutex> lock(AllocationsMu());
    auto it = Allocations().find(reinterpret_cast<uintptr_t>(p));
    if (it == Allocations().end() || it->second.device != device) {
      return Fail(cudaErrorInvalidValue);
    }
    // Poisoned first: queued work that still reads it (it should not) reads NaN.
    std::memset(p, kFreshByte, it->second.bytes);
    Allocations().erase(it);
  }
  std::free(p);
  return cudaSuccess;
}

// Whether [p, p + bytes) (bytes >= 1) lies inside one allocation, and then whether that is
// device memory (else pinned host memory).
std::optional<bool> AllocationKind(const void* p, size_t bytes) {
  const auto a = reinterpret_cast<uintptr_t>(p);
  std::lock_guard<std::mutex> lock(AllocationsMu());
  auto it = Allocations().upper_bound(a);
  if (it == Allocations().begin()) return std::nullopt;
  --it;
  if (a + bytes > it->first + std::max<size_t>(it->second.bytes, 1)) return std::nullopt;
  return it->second.device;
}

// What a copy's device side must be: inside one device or pinned host allocation.
bool DeviceAccessible(const void* p, size_t bytes) {
  return bytes == 0 || AllocationKind(p, bytes).has_value();
}

// The legacy and per-thread default streams are the one default stream here.
CUstream_st* StreamOf(cudaStream_t s) {
  return s == nullptr || s == cudaStreamLegacy || s == cudaStreamPerThread ? &g_default_stream : s;
}

// Streams being captured, for the calls a capture prohibits.
std::mutex& CapturesMu() {
  static std::mutex mu;
  return mu;
}
std::set<CUstream_st*>& Captures() {
  static std::set<CUstream_st*> streams;
  return streams;
}

// A synchronous copy, memset or device synchronisation is prohibited while a stream is being
// captured in global mode, or in thread-local mode by this thread: it fails and invalidates
// those captures, as on a device. True when the call may go on.
bool AllowedDuringCaptures(const char* call) {
  std::lock_guard<std::mutex> lock(CapturesMu());
  bool allowed = true;
  for (CUstream_st* s : Captures()) {
    if (s->mode == cudaStreamCaptureModeGlobal ||
        (s->mode == cudaStreamCaptureModeThreadLocal && s->owner == std::this_thread::get_id())) {
      s->invalidated = true;
      allowed = false;
    }
  }
  if (!allowed) {
    std::fprintf(stderr, "CUDA emulator: %s while a stream is being captured invalidates it\n",
                 call);
  }
  return allowed;
}

// Synchronising or querying a stream being captured is prohibited: it fails and invalidates the
// capture. True when the call may go on.
bool AllowedOnStream(CUstream_st* s) {
  if (!s->capturing) return true;
  s->invalidated = true;
  Fail(cudaErrorStreamCaptureUnsupported);
  return false;
}

bool InsideDeviceAllocation(const void* p) { return AllocationKind(p, 1).value_or(false); }

std::mutex& SharedLimitsMu() {
  static std::mutex mu;
  return mu;
}
std::map<const void*, int>& SharedLimits() {  // cudaFuncAttributeMaxDynamicSharedMemorySize
  static std::map<const void*, int> limits;
  return limits;
}

// -1 until set or read from KVMEM_CUDA_EMULATOR_STREAMS, then a StreamMode.
std::atomic<int> g_stream_mode{-1};

StreamMode Mode() {
  int mode = g_stream_mode.load(std::memory_order_relaxed);
  if (mode < 0) {
    const char* env = std::getenv("KVMEM_CUDA_EMULATOR_STREAMS");
    const std::string_view name = env != nullptr ? env : "eager";
    if (name == "eager") {
      mode = static_cast<int>(StreamMode::kEager);
    } else if (name == "deferred") {
      mode = static_cast<int>(StreamMode::kDeferred);
    } else if (name == "staggered") {
      mode = static_cast<int>(StreamMode::kStaggered);
    } else if (name == "staggered-even") {
      mode = static_cast<int>(StreamMode::kStaggeredEven);
    } else {
      Fatal("KVMEM_CUDA_EMULATOR_STREAMS must be eager, deferred, staggered or staggered-even");
    }
    g_stream_mode.store(mode, std::memory_order_relaxed);
  }
  return static_cast<StreamMode>(mode);
}
bool Deferred() { return Mode() != StreamMode::kEager; }

// Guards every stream's queue and the registry of live streams.
std::mutex& QueueMu() {
  static std::mutex mu;
  return mu;
}
std::map<uint64_t, CUstream_st*>& Registry() {
  static std::map<uint64_t, CUstream_st*> streams{{kDefaultStreamId, &g_default_stream}};
  return streams;
}
uint64_t g_next_stream_id = kDefaultStreamId + 1;  // under QueueMu

// Held while queued operations run: the device runs one at a time. Recursive because running
// a queued wait runs the other stream's operations it waits for.
std::recursive_mutex& DeviceMu() {
  static std::recursive_mutex mu;
  return mu;
}

// Runs stream `id`'s queued operations, oldest first, until the one numbered `seq` has run.
// A stream no longer registered was drained when it was destroyed.
void RunUntil(uint64_t id, uint64_t seq) {
  std::lock_guard<std::recursive_mutex> device(DeviceMu());
  for (;;) {
    std::function<void()> op;
    uint64_t op_seq = 0;
    CUstream_st* s = nullptr;
    {
      std::lock_guard<std::mutex> lock(QueueMu());
      auto it = Registry().find(id);
      if (it == Registry().end()) return;
      s = it->second;
      if (s->done >= seq || s->pending.empty()) return;
      op_seq = s->pending.front().first;
      op = std::move(s->pending.front().second);
      s->pending.pop_front();
    }
    op();
    std::lock_guard<std::mutex> lock(QueueMu());
    s->done = op_seq;  // destroying the stream drains it under DeviceMu, so s is still live
  }
}

// The newest operation queued on stream `id` now (0 when none ever was).
uint64_t Enqueued(uint64_t id) {
  std::lock_guard<std::mutex> lock(QueueMu());
  auto it = Registry().find(id);
  return it == Registry().end() ? 0 : it->second->enqueued;
}

// An event's latest record: (stream id, sequence number); the number is 0 when complete.
std::pair<uint64_t, uint64_t> LatestRecord(const CUevent_st* event) {
  std::lock_guard<std::mutex> lock(QueueMu());
  return {event->stream_id, event->seq};
}

// Runs everything queued on every stream so far (a device-wide synchronisation).
void RunAll() {
  std::vector<std::pair<uint64_t, uint64_t>> until;
  {
    std::lock_guard<std::mutex> lock(QueueMu());
    for (const auto& [id, s] : Registry()) until.emplace_back(id, s->enqueued);
  }
  for (const auto& [id, seq] : until) RunUntil(id, seq);
}

// Queues `op` on the stream and returns its sequence number there; 0 when it ran at once
// (eager mode) or was recorded into a capture. In deferred mode the legacy default stream and
// the blocking streams wait for each other's earlier work, as CUDA's legacy stream semantics
// say.
uint64_t QueueOp(cudaStream_t stream, std::function<void()> op) {
  CUstream_st* s = StreamOf(stream);
  if (s->capturing) {
    s->captured.push_back(std::move(op));
    return 0;
  }
  if (!Deferred()) {
    op();
    return 0;
  }
  std::lock_guard<std::mutex> lock(QueueMu());
  std::vector<std::pair<uint64_t, uint64_t>> waits;  // (stream id, sequence number)
  if (s == &g_default_stream) {
    for (const auto& [id, other] : Registry()) {
      if (other != s && other->blocking && other->enqueued > other->done) {
        waits.emplace_back(id, other->enqueued);
      }
    }
  } else if (s->blocking && g_default_stream.enqueued > g_default_stream.done) {
    waits.emplace_back(kDefaultStreamId, g_default_stream.enqueued);
  }
  if (!waits.empty()) {
    s->pending.emplace_back(++s->enqueued, [waits] {
      for (const auto& [id, seq] : waits) RunUntil(id, seq);
    });
  }
  s->pending.emplace_back(++s->enqueued, std::move(op));
  return s->enqueued;
}

// Whether stream `id` runs what is queued on it at once in a staggered mode.
bool AheadInStaggeredMode(uint64_t id) {
  const StreamMode mode = Mode();
  return (mode == StreamMode::kStaggered && id % 2 == 1) ||
         (mode == StreamMode::kStaggeredEven && id % 2 == 0);
}

// Queues as QueueOp does; in a staggered mode a stream that runs ahead then runs what it has
// queued at once (its waits run the streams they wait on as far as they must).
uint64_t EnqueueOp(cudaStream_t stream, std::function<void()> op) {
  const uint64_t seq = QueueOp(stream, std::move(op));
  const uint64_t id = StreamOf(stream)->id;
  if (seq != 0 && AheadInStaggeredMode(id)) RunUntil(id, seq);
  return seq;
}

cudaError_t Copy(void* dst, const void* src, size_t count, cudaMemcpyKind kind,
                 cudaStream_t stream, bool synchronous) {
  if (count == 0) return cudaSuccess;
  const bool dst_device = kind == cudaMemcpyHostToDevice || kind == cudaMemcpyDeviceToDevice;
  const bool src_device = kind == cudaMemcpyDeviceToHost || kind == cudaMemcpyDeviceToDevice;
  if (dst == nullptr || src == nullptr || (dst_device && !DeviceAccessible(dst, count)) ||
      (src_device && !DeviceAccessible(src, count))) {
    std::fprintf(stderr,
                 "CUDA emulator: cudaMemcpy of %zu bytes (kind %d) from %p to %p: the device side "
                 "is not inside one device or pinned allocation\n",
                 count, static_cast<int>(kind), src, dst);
    return Fail(cudaErrorInvalidValue);
  }
  const bool src_host = kind == cudaMemcpyHostToDevice || kind == cudaMemcpyHostToHost;
  const bool dst_host = kind == cudaMemcpyDeviceToHost || kind == cudaMemcpyHostToHost;
  if ((src_host && InsideDeviceAllocation(src)) || (dst_host && InsideDeviceAllocation(dst))) {
    std::fprintf(stderr,
                 "CUDA emulator: cudaMemcpy of %zu bytes (kind %d) from %p to %p: its host side "
                 "is device memory (the kind is the wrong way round)\n",
                 count, static_cast<int>(kind), src, dst);
    return Fail(cudaErrorInvalidValue);
  }
  // What CUDA guarantees of pageable host memory (not inside a pinned allocation): a copy
  // from it has read it when the call returns, and a copy to it has landed. A synchronous
  // cudaMemcpy (`synchronous`) has also landed when it returns, except one from pageable memory
  // to the device (staged, like an asynchronous one) and one between device buffers.
  const bool pageable_src = src_host && !DeviceAccessible(src, count);
  const bool pageable_dst = dst_host && !DeviceAccessible(dst, count);
  const bool lands_before_return =
      pageable_dst || (src_host && dst_host) ||
      (synchronous && (dst_host || (kind == cudaMemcpyHostToDevice && !pageable_src)));
  uint64_t seq = 0;
  if (pageable_src && !StreamOf(stream)->capturing) {
    auto staged = std::make_shared<std::vector<unsigned char>>(
        static_cast<const unsigned char*>(src), static_cast<const unsigned char*>(src) + count);
    seq = EnqueueOp(stream, [=] { std::memmove(dst, staged->data(), count); });
  } else {
    seq = EnqueueOp(stream, [=] { std::memmove(dst, src, count); });
  }
  if (lands_before_return) RunUntil(StreamOf(stream)->id, seq);
  return cudaSuccess;
}

}  // namespace

void Enqueue(cudaStream_t stream, std::function<void()> op) { EnqueueOp(stream, std::move(op)); }

void Launch(const void* kernel, const LaunchConfig& config, std::function<void()> body) {
  const dim3& g = config.grid;
  const dim3& b = config.block;
  const uint64_t threads = uint64_t{b.x} * b.y * b.z;
  cudaError_t err = cudaSuccess;
  if (g.x == 0 || g.y == 0 || g.z == 0 || g.y > 65535 || g.z > 65535 || threads == 0 ||
      threads > 1024 || b.z > 64) {
    err = cudaErrorInvalidConfiguration;
  } else if (config.smem > kSharedPerBlock) {
    std::lock_guard<std::mutex> lock(SharedLimitsMu());
    auto it = SharedLimits().find(kernel);
    if (it == SharedLimits().end() || config.smem > static_cast<size_t>(it->second)) {
      err = cudaErrorInvalidValue;
    }
  }
  if (err != cudaSuccess) {
    std::fprintf(stderr,
                 "CUDA emulator: launch at %s:%u refused (%s): grid (%u, %u, %u), block (%u, %u, "
                 "%u), %zu bytes of dynamic shared memory\n",
                 config.where.file_name(), config.where.line(), cudaGetErrorName(err), g.x, g.y,
                 g.z, b.x, b.y, b.z, config.smem);
    Fail(err);
    CUstream_st* s = StreamOf(config.stream);
    if (s->capturing) s->invalidated = true;
    return;
  }
  Enqueue(config.stream, [config, body = std::move(body)] { RunKernel(config, body); });
}

}  // namespace cuda_emu
}  // namespace kvmem

using kvmem::cuda_emu::Allocate;
using kvmem::cuda_emu::Deferred;
using kvmem::cuda_emu::Enqueued;
using kvmem::cuda_emu::EnqueueOp;
using kvmem::cuda_emu::Fail;
using kvmem::cuda_emu::Release;
using kvmem::cuda_emu::RunAll;
using kvmem::cuda_emu::RunUntil;
using kvmem::cuda_emu::StreamOf;

namespace kvmem {
namespace cuda_emu {

void SetStreamMode(StreamMode mode) {
  RunAll();  // what the old mode queued runs first
  g_stream_mode.store(static_cast<int>(mode), std::memory_order_relaxed);
}

bool RunsAhead(cudaStream_t stream) {
  return !Deferred() || AheadInStaggeredMode(StreamOf(stream)->id);
}

}  // namespace cuda_emu
}  // namespace kvmem

extern "C" {

cudaError_t cudaGetLastError() {
  const cudaError_t err = kvmem::cuda_emu::t_last_error;
  kvmem::cuda_emu::t_last_error = cudaSuccess;
  return err;
}
cudaError_t cudaPeekAtLastError() { return kvmem::cuda_emu::t_last_error; }

const char* cudaGetErrorName(cudaError_t error) {
  switch (error) {
    case cudaSuccess:
      return "cudaSuccess";
    case cudaErrorInvalidValue:
      return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation:
      return "cudaErrorMemoryAllocation";
    case cudaErrorInvalidConfiguration:
      return "cudaErrorInvalidConfiguration";
    case cudaErrorInvalidDevice:
      return "cudaErrorInvalidDevice";
    case cudaErrorNotSupported:
      return "cudaErrorNotSupported";
    case cudaErrorStreamCaptureUnsupported:
      return "cudaErrorStreamCaptureUnsupported";
    case cudaErrorStreamCaptureInvalidated:
      return "cudaErrorStreamCaptureInvalidated";
    case cudaErrorIllegalState:
      return "cudaErrorIllegalState";
    case cudaErrorNoDevice:
      return "cudaErrorNoDevice";
    case cudaErrorNotReady:
      return "cudaErrorNotReady";
    default:
      return "cudaErrorUnknown";
  }
}
const char* cudaGetErrorString(cudaError_t error) {
  return error == cudaSuccess ? "no error" : "reported by the CUDA emulator";
}

cudaError_t cudaDriverGetVersion(int* v) {
  *v = CUDART_VERSION;
  return cudaSuccess;
}
cudaError_t cudaRuntimeGetVersion(int* v) {
  *v = CUDART_VERSION;
  return cudaSuccess;
}
cudaError_t cudaGetDeviceCount(int* count) {
  *count = 1;
  return cudaSuccess;
}
cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
cudaError_t cudaSetDevice(int device) {
  return device == 0 ? cudaSuccess : Fail(cudaErrorInvalidDevice);
}
cudaError_t cudaDeviceSynchronize() {
  if (!kvmem::cuda_emu::AllowedDuringCaptures("cudaDeviceSynchronize")) {
    return Fail(cudaErrorStreamCaptureUnsupported);
  }
  RunAll();
  return cudaSuccess;
}

cudaError_t cudaGetDeviceProperties(cudaDeviceProp* prop, int device) {
  if (device != 0) return Fail(cudaErrorInvalidDevice);
  std::memset(prop, 0, sizeof(*prop));
  std::snprintf(prop->name, sizeof(prop->name), "kvmem CUDA emulator (H100 limits)");
  prop->major = 9;
  prop->minor = 0;
  prop->totalGlobalMem = kvmem::cuda_emu::kGlobalMemory;
  prop->multiProcessorCount = kvmem::cuda_emu::kMultiProcessors;
  prop->sharedMemPerBlock = kvmem::cuda_emu::kSharedPerBlock;
  prop->sharedMemPerBlockOptin = kvmem::cuda_emu::kSharedPerBlockOptIn;
  prop->sharedMemPerMultiprocessor = 233472;
  prop->regsPerBlock = 65536;
  prop->warpSize = 32;
  prop->maxThreadsPerBlock = 1024;
  prop->maxThreadsPerMultiProcessor = 2048;
  prop->maxThreadsDim[0] = prop->maxThreadsDim[1] = 1024;
  prop->maxThreadsDim[2] = 64;
  prop->maxGridSize[0] = 0x7fffffff;
  prop->maxGridSize[1] = prop->maxGridSize[2] = 65535;
  prop->l2CacheSize = 50 << 20;
  prop->memoryBusWidth = 5120;
  prop->canMapHostMemory = 1;
  prop->unifiedAddressing = 1;
  prop->concurrentKernels = 1;
  prop->asyncEngineCount = 3;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (device != 0) return Fail(cudaErrorInvalidDevice);
  switch (attr) {
    case cudaDevAttrMultiProcessorCount:
      *value = kvmem::cuda_emu::kMultiProcessors;
      break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin:
      *value = static_cast<int>(kvmem::cuda_emu::kSharedPerBlockOptIn);
      break;
    case cudaDevAttrMaxThreadsPerBlock:
      *value = 1024;
      break;
    case cudaDevAttrComputeCapabilityMajor:
      *value = 9;
      break;
    case cudaDevAttrComputeCapabilityMinor:
      *value = 0;
      break;
    case cudaDevAttrWarpSize:
      *value = 32;
      break;
    default:
      return Fail(cudaErrorNotSupported);
  }
  return cudaSuccess;
}

cudaError_t cudaFuncSetAttribute(const void* func, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return Fail(cudaErrorNotSupported);
  if (value < 0 || static_cast<size_t>(value) > kvmem::cuda_emu::kSharedPerBlockOptIn) {
    return Fail(cudaErrorInvalidValue);
  }
  std::lock_guard<std::mutex> lock(kvmem::cuda_emu::SharedLimitsMu());
  kvmem::cuda_emu::SharedLimits()[func] = value;
  return cudaSuccess;
}

// cudaMalloc, cudaFree, cudaHostAlloc and cudaFreeHost are among the calls a capture prohibits
// (AllowedDuringCaptures); cudaFree and cudaFreeHost synchronise the device first, as CUDA's do.
cudaError_t cudaMalloc(void** p, size_t bytes) {
  if (!kvmem::cuda_emu::AllowedDuringCaptures("cudaMalloc")) {
    return Fail(cudaErrorStreamCaptureUnsupported);
  }
  *p = Allocate(bytes, true);
  return *p != nullptr ? cudaSuccess : Fail(cudaErrorMemoryAllocation);
}
cudaError_t cudaFree(void* p) {
  if (!kvmem::cuda_emu::AllowedDuringCaptures("cudaFree")) {
    return Fail(cudaErrorStreamCaptureUnsupported);
  }
  RunAll();
  return Release(p, true);
}
cudaError_t cudaMallocAsync(void** p, size_t bytes, cudaStream_t stream) {
  if (StreamOf(stream)->capturing) return Fail(cudaErrorStreamCaptureUnsupported);
  *p = Allocate(bytes, true);
  return *p != nullptr ? cudaSuccess : Fail(cudaErrorMemoryAllocation);
}
cudaError_t cudaFreeAsync(void* p, cudaStream_t stream) {
  if (StreamOf(stream)->capturing) return Fail(cudaErrorStreamCaptureUnsupported);
  if (p == nullptr) return cudaSuccess;
  if (!kvmem::cuda_emu::InsideDeviceAllocation(p)) return Fail(cudaErrorInvalidValue);
  EnqueueOp(stream, [p] { Release(p, true); });  // in stream order
  return cudaSuccess;
}
cudaError_t cudaDeviceGetDefaultMemPool(cudaMemPool_t* pool, int device) {
  if (device != 0) return Fail(cudaErrorInvalidDevice);
  *pool = &kvmem::cuda_emu::g_pool;
  return cudaSuccess;
}
cudaError_t cudaMemPoolSetAttribute(cudaMemPool_t, cudaMemPoolAttr, void*) { return cudaSuccess; }

cudaError_t cudaHostAlloc(void** p, size_t bytes, unsigned int flags) {
  if (!kvmem::cuda_emu::AllowedDuringCaptures("cudaHostAlloc")) {
    return Fail(cudaErrorStreamCaptureUnsupported);
  }
  *p = Allocate(bytes, false);
  return *p != nullptr ? cudaSuccess : Fail(cudaErrorMemoryAllocation);
}
cudaError_t cudaMallocHost(void** p, size_t bytes) { return cudaHostAlloc(p, bytes, 0); }
cudaError_t cudaFreeHost(void* p) {
  if (!kvmem::cuda_emu::AllowedDuringCaptures("cudaFreeHost")) {
    return Fail(cudaErrorStreamCaptureUnsupported);
  }
  RunAll();
  return Release(p, false);
}
cudaError_t cudaHostGetDevicePointer(void** device, void* host, unsigned int flags) {
  if (flags != 0 || !kvmem::cuda_emu::DeviceAccessible(host, 1)) {
    return Fail(cudaErrorInvalidValue);
  }
  *device = host;
  return cudaSuccess;
}

cudaError_t cudaMemcpy(void* dst, const void* src, size_t count, cudaMemcpyKind kind) {
  if (!kvmem::cuda_emu::AllowedDuringCaptures("cudaMemcpy")) {
    return Fail(cudaErrorStreamCaptureUnsupported);
  }
  return kvmem::cuda_emu::Copy(dst, src, count, kind, nullptr, /*synchronous=*/true);
}
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t count, cudaMemcpyKind kind,
                            cudaStream_t stream) {
  return kvmem::cuda_emu::Copy(dst, src, count, kind, stream, /*synchronous=*/false);
}
cudaError_t cudaMemsetAsync(void* p, int value, size_t count, cudaStream_t stream) {
  if (!kvmem::cuda_emu::DeviceAccessible(p, count)) return Fail(cudaErrorInvalidValue);
  EnqueueOp(stream, [=] { std::memset(p, value, count); });
  return cudaSuccess;
}
cudaError_t cudaMemset(void* p, int value, size_t count) {
  if (!kvmem::cuda_emu::AllowedDuringCaptures("cudaMemset")) {
    return Fail(cudaErrorStreamCaptureUnsupported);
  }
  if (!kvmem::cuda_emu::DeviceAccessible(p, count)) return Fail(cudaErrorInvalidValue);
  // Asynchronous with respect to the host on device memory, as CUDA documents; synchronous on
  // pinned host memory.
  const uint64_t seq = EnqueueOp(nullptr, [=] { std::memset(p, value, count); });
  if (!kvmem::cuda_emu::InsideDeviceAllocation(p)) RunUntil(kvmem::cuda_emu::kDefaultStreamId, seq);
  return cudaSuccess;
}

cudaError_t cudaStreamCreateWithFlags(cudaStream_t* stream, unsigned int flags) {
  auto* s = new CUstream_st;
  s->blocking = (flags & cudaStreamNonBlocking) == 0;
  std::lock_guard<std::mutex> lock(kvmem::cuda_emu::QueueMu());
  s->id = kvmem::cuda_emu::g_next_stream_id++;
  kvmem::cuda_emu::Registry()[s->id] = s;
  *stream = s;
  return cudaSuccess;
}
cudaError_t cudaStreamCreate(cudaStream_t* stream) {
  return cudaStreamCreateWithFlags(stream, cudaStreamDefault);
}
cudaError_t cudaStreamDestroy(cudaStream_t stream) {
  if (StreamOf(stream) == &kvmem::cuda_emu::g_default_stream) return Fail(cudaErrorInvalidValue);
  {
    std::lock_guard<std::mutex> lock(kvmem::cuda_emu::CapturesMu());
    kvmem::cuda_emu::Captures().erase(stream);  // a capture it was in ends with it
  }
  {
    // CUDA finishes the stream's work after the call returns; here it runs first, and the
    // stream leaves the registry while no queued operation runs.
    std::lock_guard<std::recursive_mutex> device(kvmem::cuda_emu::DeviceMu());
    RunUntil(stream->id, std::numeric_limits<uint64_t>::max());
    std::lock_guard<std::mutex> lock(kvmem::cuda_emu::QueueMu());
    kvmem::cuda_emu::Registry().erase(stream->id);
  }
  delete stream;
  return cudaSuccess;
}
cudaError_t cudaStreamSynchronize(cudaStream_t stream) {
  CUstream_st* s = StreamOf(stream);
  if (!kvmem::cuda_emu::AllowedOnStream(s)) return cudaErrorStreamCaptureUnsupported;
  RunUntil(s->id, Enqueued(s->id));
  return cudaSuccess;
}
// Deferred mode: a stream with work queued is not ready when asked, and its work runs right
// after the call, so a caller that polls sees it finish and one that assumed it had is caught.
cudaError_t cudaStreamQuery(cudaStream_t stream) {
  CUstream_st* s = StreamOf(stream);
  if (!kvmem::cuda_emu::AllowedOnStream(s)) return cudaErrorStreamCaptureUnsupported;
  uint64_t enqueued = 0;
  {
    std::lock_guard<std::mutex> lock(kvmem::cuda_emu::QueueMu());
    if (s->done >= s->enqueued) return cudaSuccess;
    enqueued = s->enqueued;
  }
  RunUntil(s->id, enqueued);
  return cudaErrorNotReady;  // not sticky: cudaGetLastError does not report it
}
cudaError_t cudaStreamWaitEvent(cudaStream_t stream, cudaEvent_t event, unsigned int) {
  if (event == nullptr) return Fail(cudaErrorInvalidValue);
  const auto [id, seq] = kvmem::cuda_emu::LatestRecord(event);
  if (seq == 0 || StreamOf(stream)->capturing) return cudaSuccess;
  EnqueueOp(stream, [id, seq] { RunUntil(id, seq); });
  return cudaSuccess;
}
cudaError_t cudaStreamBeginCapture(cudaStream_t stream, cudaStreamCaptureMode mode) {
  CUstream_st* s = StreamOf(stream);
  if (s == &kvmem::cuda_emu::g_default_stream || s->capturing) {
    return Fail(cudaErrorIllegalState);
  }
  s->capturing = true;
  s->invalidated = false;
  s->mode = mode;
  s->owner = std::this_thread::get_id();
  s->captured.clear();
  std::lock_guard<std::mutex> lock(kvmem::cuda_emu::CapturesMu());
  kvmem::cuda_emu::Captures().insert(s);
  return cudaSuccess;
}
cudaError_t cudaStreamEndCapture(cudaStream_t stream, cudaGraph_t* graph) {
  CUstream_st* s = StreamOf(stream);
  if (!s->capturing) return Fail(cudaErrorIllegalState);
  {
    std::lock_guard<std::mutex> lock(kvmem::cuda_emu::CapturesMu());
    kvmem::cuda_emu::Captures().erase(s);
  }
  s->capturing = false;
  std::vector<std::function<void()>> ops = std::move(s->captured);
  s->captured.clear();
  if (s->invalidated) {
    s->invalidated = false;
    *graph = nullptr;
    return Fail(cudaErrorStreamCaptureInvalidated);
  }
  *graph = new CUgraph_st{std::move(ops)};
  return cudaSuccess;
}
cudaError_t cudaStreamIsCapturing(cudaStream_t stream, cudaStreamCaptureStatus* status) {
  *status =
      StreamOf(stream)->capturing ? cudaStreamCaptureStatusActive : cudaStreamCaptureStatusNone;
  return cudaSuccess;
}

cudaError_t cudaGraphInstantiate(cudaGraphExec_t* exec, cudaGraph_t graph, unsigned long long) {
  if (graph == nullptr) return Fail(cudaErrorInvalidValue);
  *exec = new CUgraphExec_st{std::make_shared<const OpList>(graph->ops)};
  return cudaSuccess;
}
cudaError_t cudaGraphLaunch(cudaGraphExec_t exec, cudaStream_t stream) {
  if (exec == nullptr) return Fail(cudaErrorInvalidValue);
  EnqueueOp(stream, [ops = exec->ops] {
    for (const auto& op : *ops) op();
  });
  return cudaSuccess;
}
cudaError_t cudaGraphDestroy(cudaGraph_t graph) {
  delete graph;
  return cudaSuccess;
}
cudaError_t cudaGraphExecDestroy(cudaGraphExec_t exec) {
  delete exec;
  return cudaSuccess;
}

cudaError_t cudaEventCreate(cudaEvent_t* event) {
  *event = new CUevent_st;
  return cudaSuccess;
}
cudaError_t cudaEventCreateWithFlags(cudaEvent_t* event, unsigned int) {
  return cudaEventCreate(event);
}
cudaError_t cudaEventDestroy(cudaEvent_t event) {
  if (event == nullptr) return Fail(cudaErrorInvalidValue);
  delete event;
  return cudaSuccess;
}
cudaError_t cudaEventRecord(cudaEvent_t event, cudaStream_t stream) {
  if (event == nullptr) return Fail(cudaErrorInvalidValue);
  const bool capturing = StreamOf(stream)->capturing;
  const uint64_t seq =
      EnqueueOp(stream, [when = event->when] { *when = std::chrono::steady_clock::now(); });
  if (!capturing) {
    std::lock_guard<std::mutex> lock(kvmem::cuda_emu::QueueMu());
    event->stream_id = StreamOf(stream)->id;
    event->seq = seq;
  }
  return cudaSuccess;
}
cudaError_t cudaEventSynchronize(cudaEvent_t event) {
  if (event == nullptr) return Fail(cudaErrorInvalidValue);
  const auto [id, seq] = kvmem::cuda_emu::LatestRecord(event);
  if (seq != 0) RunUntil(id, seq);
  return cudaSuccess;
}
cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t start, cudaEvent_t end) {
  if (start == nullptr || end == nullptr) return Fail(cudaErrorInvalidValue);
  {
    // Both records must have run (a stream no longer registered has run everything).
    std::lock_guard<std::mutex> lock(kvmem::cuda_emu::QueueMu());
    for (const CUevent_st* e : {start, end}) {  // QueueMu guards their record fields too
      auto it = kvmem::cuda_emu::Registry().find(e->stream_id);
      if (e->seq != 0 && it != kvmem::cuda_emu::Registry().end() && it->second->done < e->seq) {
        return Fail(cudaErrorNotReady);
      }
    }
  }
  *ms = std::chrono::duration<float, std::milli>(*end->when - *start->when).count();
  return cudaSuccess;
}

}  // extern "C"
