// A CUDA emulator for machines without a GPU: runs our kernels' C++ on the CPU, one block at a
// time, each CUDA thread as a fiber of the launching host thread. It exists so that the kernels'
// indexing and the CUDA backend's host code (uploads, graphs, streams) run in every test run,
// GPU or not. It checks logic, not speed, timing or the hardware's memory model. Streams run
// their work eagerly (as if the device were infinitely fast), deferred (as late as CUDA
// allows) or staggered (one stream ahead of another), so host code that reads results before
// waiting for them, or rewrites a buffer the device has yet to read, fails in one of the
// modes (StreamMode).
// docs/cuda.md ("Without a GPU: the CUDA emulator") lists what it checks and what it cannot.
//
// Kernel sources are compiled for it as C++ (kernels/emu/CMakeLists.txt) after
// rewrite_kernel_source.cmake turns launches into
// `kernel | LaunchConfig(grid, block, smem, stream) || KernelArgs(args...)` and shared memory
// declarations into the running block's; kernels/emu/device.h supplies the built-in variables
// and intrinsics.
#ifndef KVMEM_KERNELS_EMU_EMULATOR_H_
#define KVMEM_KERNELS_EMU_EMULATOR_H_

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <source_location>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace kvmem {
namespace cuda_emu {

struct Block;

// Prints "CUDA emulator: <what>" and aborts: a broken invariant of the emulator or a kernel.
[[noreturn]] void Fatal(const char* what);

// One CUDA thread of the block that runs now.
struct Thread {
  uint3 thread_idx;
  int linear = 0;           // x + y * dim.x + z * dim.x * dim.y
  unsigned warp_phase = 0;  // toggles at every warp-wide operation (double-buffered exchange)
  Block* block = nullptr;
  // cp.async copies issued and not yet waited for: their bytes (read when issued) land in
  // shared memory only at the cp.async.wait_group that completes their group.
  struct PendingCopy {
    void* dst;
    unsigned char bytes[16];
  };
  std::vector<PendingCopy> pending_copies;
  std::vector<size_t> copy_group_ends;  // committed groups: ends in pending_copies, oldest first
};

// The thread whose code runs now; only valid inside a kernel.
Thread* CurrentThread();
const uint3& CurrentBlockIdx();
const dim3& CurrentBlockDim();
const dim3& CurrentGridDim();
// The running block's dynamic shared memory (the launch's `smem` bytes, 128-byte aligned,
// filled with 0xff at the start of each block).
void* DynamicShared();
// Fills a static shared variable with 0xff the first time one of the running block's threads
// reaches its declaration (kernels/emu/rewrite_kernel_source.cmake adds the call), so that a
// kernel reading shared memory nobody wrote reads NaN, not what the previous block left.
void PoisonShared(void* variable, size_t bytes);

// Block-wide barrier; returns whether `predicate` was true on any thread (__syncthreads_or).
bool SyncThreads(bool predicate = false);
// Warp-wide exchange: every live lane of the warp deposits `bytes` (at most 32) and, after all
// have, reads lane `source(lane)`'s deposit. The lanes of a warp must reach it together, as on
// the hardware; a kernel whose lanes do not, deadlocks here and the emulator aborts.
void WarpExchange(const void* in, void* out, size_t bytes, int (*source)(int lane, int arg),
                  int arg);
// Warp barrier (__syncwarp).
void SyncWarp();

// cp.async.cg.shared.global of 16 bytes (`bytes` of them from `src`, zeros after), its
// commit_group and wait_group N: the copy reaches `dst` only when a wait completes its group
// (all but the newest N committed groups), or when the thread returns, so a kernel that reads
// its shared memory before the wait reads what was there before.
void CopyAsync(void* dst, const void* src, int bytes);
void CopyAsyncCommit();
void CopyAsyncWait(int pending_groups);

// The tensor-core instructions the prefill kernel issues through inline PTX, with the
// fragment layouts of the PTX ISA. ldmatrix .m8n8.x4(.trans).shared.b16: lane l gives the
// address of row l % 8 of matrix l / 8 and gets, in r[i], two 16-bit elements of matrix i.
void LoadMatrixX4(uint32_t (&r)[4], const void* row, bool transpose);
// mma.sync .m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32: c += a b over the warp's fragments.
void Mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, bool bf16);

// The order in which a block's threads take turns between barriers. Code that lets one thread
// read what another wrote without a barrier between them sees the write in one order and not
// in the other, so running a test in both finds such races in either direction. The default
// is kForward, or kReverse when the environment has KVMEM_CUDA_EMULATOR_ORDER=reverse.
enum class ThreadOrder { kForward, kReverse };
void SetThreadOrder(ThreadOrder order);

// When streams run what is queued on them (copies, memsets, launches, graphs, event records).
// kEager runs each operation when it is enqueued: every event and stream is complete when the
// host looks. kDeferred queues it and runs it only when the host must see it done: a
// synchronisation of its stream, of an event recorded after it, or of the device; a stream
// that waits on such an event; a synchronous copy or memset on the legacy default stream that
// CUDA completes before returning (and everything earlier on the blocking streams, which that
// stream waits for); a copy into pageable memory; cudaFree, cudaFreeHost and
// cudaStreamDestroy. Freed device memory is filled with NaN bytes first. cudaStreamQuery on a
// stream with work queued returns cudaErrorNotReady and then runs it. Copies from pageable memory read it when called, as CUDA's staging does; copies
// from pinned memory read it when they run. So host code that reads results it has not waited
// for, or rewrites pinned memory or frees what queued work still reads, goes wrong in deferred
// mode; code that counts on work not having run yet goes wrong in eager mode. kStaggered defers
// as kDeferred does, except that streams with odd ids run their work as soon as it is queued,
// running the streams they wait on as far as they must; kStaggeredEven the same with even ids.
// The default stream's id is 1 and created streams count up from 2, so of two streams created
// one after the other, one runs ahead of the other in each staggered mode: a stream that
// overwrites what a lagging stream has yet to read, without waiting for it, goes wrong in one
// of the two. Synchronous cudaMemcpy and cudaMemset follow CUDA's documented behaviour: a copy
// from pageable memory to the device, one between device buffers and a memset of device memory
// may still be queued when they return. The default is kEager, or the mode
// KVMEM_CUDA_EMULATOR_STREAMS names (eager, deferred, staggered or staggered-even). Setting it
// runs everything queued so far first.
enum class StreamMode { kEager, kDeferred, kStaggered, kStaggeredEven };
void SetStreamMode(StreamMode mode);
// Whether `stream` runs its work as soon as it is queued in the current mode (always in
// eager mode, never in deferred mode).
bool RunsAhead(cudaStream_t stream);

// A launch's grid, block, dynamic shared memory and stream, and where in the source it is.
struct LaunchConfig {
  LaunchConfig(dim3 grid, dim3 block, size_t smem = 0, cudaStream_t stream = nullptr,
               std::source_location where = std::source_location::current())
      : grid(grid), block(block), smem(smem), stream(stream), where(where) {}
  dim3 grid, block;
  size_t smem;
  cudaStream_t stream;
  std::source_location where;
};

// Checks the configuration (as the driver would) and queues `body` to run on every thread of
// every block in `config.stream`'s order (see Enqueue). Errors are
// reported through cudaGetLastError, as a failed launch's are.
void Launch(const void* kernel, const LaunchConfig& config, std::function<void()> body);
// Runs `op` in `stream`'s order: now (eager), when the stream gets to it (deferred), or when the
// graph it is being captured into launches.
void Enqueue(cudaStream_t stream, std::function<void()> op);
// Runs every block of a checked launch now (Launch, or a graph's replay, calls it).
void RunKernel(const LaunchConfig& config, const std::function<void()>& body);

template <typename... Params>
struct BoundKernel {
  void (*kernel)(Params...);
  LaunchConfig config;
};

template <typename... Params>
BoundKernel<Params...> operator|(void (*kernel)(Params...), const LaunchConfig& config) {
  return {kernel, config};
}

template <typename... Args>
std::tuple<std::decay_t<Args>...> KernelArgs(Args&&... args) {
  return std::tuple<std::decay_t<Args>...>(std::forward<Args>(args)...);
}

// The launch itself: arguments are converted to the kernel's parameter types and copied, as
// the driver copies them, so a recorded launch replays with the values it had when captured.
template <typename... Params, typename... Args>
void operator||(const BoundKernel<Params...>& bound, std::tuple<Args...>&& args) {
  static_assert(sizeof...(Params) == sizeof...(Args), "kernel launched with the wrong arity");
  std::tuple<std::decay_t<Params>...> params =
      std::apply([](auto&&... a) { return std::tuple<std::decay_t<Params>...>(std::move(a)...); },
                 std::move(args));
  auto kernel = bound.kernel;
  Launch(reinterpret_cast<const void*>(kernel), bound.config,
         [kernel, params]() { std::apply(kernel, params); });
}

}  // namespace cuda_emu
}  // namespace kvmem

#endif  // KVMEM_KERNELS_EMU_EMULATOR_H_
