// The CUDA emulator (kernels/emu/emulator.h) against what CUDA specifies: warp shuffles,
// block barriers and shared memory, launch checks, graph capture, and its own diagnostics
// (deadlocks, unwritten device memory). Built only for the emulator: the kernels below are
// compiled through its rewrite, as every kernel source is.
#include <cuda_runtime_api.h>

#include <cmath>
#include <cstdint>
#include <utility>
#include <vector>

#include "gtest/gtest.h"

namespace kvmem {
namespace {

// out[lane] for each shuffle kind over lanes holding 100 + lane.
__global__ void ShuffleKernel(int* out) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int v = 100 + lane + 1000 * warp;
  int* o = out + warp * 4 * 32;
  o[lane] = __shfl_xor_sync(0xffffffffu, v, 5);
  o[32 + lane] = __shfl_up_sync(0xffffffffu, v, 3);
  o[64 + lane] = __shfl_down_sync(0xffffffffu, v, 3);
  o[96 + lane] = __shfl_sync(0xffffffffu, v, 7);
}

// Each thread writes its slot, then (after the barrier) reads its neighbour's: wrong without
// a real barrier between the phases.
__global__ void NeighbourKernel(int* out) {
  __shared__ int slots[256];
  slots[threadIdx.x] = static_cast<int>(threadIdx.x) * 3 + static_cast<int>(blockIdx.x);
  __syncthreads();
  out[blockIdx.x * blockDim.x + threadIdx.x] = slots[(threadIdx.x + 1) % blockDim.x];
}

__global__ void AnyKernel(int chosen, int* out) {
  out[threadIdx.x] = __syncthreads_or(static_cast<int>(threadIdx.x) == chosen);
}

// Thread 0 waits at the block barrier while the rest of its warp waits for it at a shuffle:
// a hang on a device, a reported deadlock here.
__global__ void MismatchedBarrierKernel(int* out) {
  int v = static_cast<int>(threadIdx.x);
  if (threadIdx.x == 0) {
    __syncthreads();
  } else {
    v = __shfl_xor_sync(0xffffffffu, v, 1);
  }
  out[threadIdx.x] = v;
}

// Reads the next thread's slot with no barrier after the writes: a race. (`seed` differs
// between launches, so what an earlier launch left in shared memory is never right.)
__global__ void MissingBarrierKernel(int seed, int* out) {
  __shared__ int slots[64];
  slots[threadIdx.x] = static_cast<int>(threadIdx.x) + seed;
  out[threadIdx.x] = slots[(threadIdx.x + 1) % 64];
}

// Only block 0 writes the shared array; the others read what their block never wrote.
__global__ void UnwrittenSharedKernel(float* out) {
  __shared__ float s[32];
  if (blockIdx.x == 0) s[threadIdx.x] = 1.f;
  __syncthreads();
  out[blockIdx.x * 32 + threadIdx.x] = s[threadIdx.x];
}

// Lane 0 shuffles while the other lanes of its warp are at __syncwarp.
__global__ void MismatchedWarpOpsKernel(int* out) {
  int v = static_cast<int>(threadIdx.x);
  if (threadIdx.x == 0) {
    v = __shfl_xor_sync(0xffffffffu, v, 1);
  } else {
    __syncwarp();
  }
  out[threadIdx.x] = v;
}

__global__ void AddOneKernel(float* data, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) data[i] += 1.f;
}

__global__ void DynamicSharedKernel(float* out) {
  extern __shared__ float scratch[];
  scratch[threadIdx.x] = static_cast<float>(threadIdx.x);
  __syncthreads();
  out[threadIdx.x] = scratch[blockDim.x - 1 - threadIdx.x];
}

template <typename T>
struct DeviceBuffer {
  explicit DeviceBuffer(size_t n) : n(n) { EXPECT_EQ(cudaMalloc(&p, n * sizeof(T)), cudaSuccess); }
  ~DeviceBuffer() { cudaFree(p); }
  std::vector<T> Read() const {
    std::vector<T> v(n);
    EXPECT_EQ(cudaMemcpy(v.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost), cudaSuccess);
    return v;
  }
  T* p = nullptr;
  size_t n;
};

TEST(CudaEmulatorTest, WarpShufflesFollowTheirLaneFormulas) {
  DeviceBuffer<int> out(2 * 4 * 32);
  ShuffleKernel<<<1, 64>>>(out.p);
  ASSERT_EQ(cudaGetLastError(), cudaSuccess);
  const std::vector<int> got = out.Read();
  for (int warp = 0; warp < 2; ++warp) {
    const int* o = got.data() + warp * 4 * 32;
    const auto v = [&](int lane) { return 100 + lane + 1000 * warp; };
    for (int lane = 0; lane < 32; ++lane) {
      EXPECT_EQ(o[lane], v(lane ^ 5)) << lane;
      EXPECT_EQ(o[32 + lane], v(lane >= 3 ? lane - 3 : lane)) << lane;
      EXPECT_EQ(o[64 + lane], v(lane + 3 < 32 ? lane + 3 : lane)) << lane;
      EXPECT_EQ(o[96 + lane], v(7)) << lane;
    }
  }
}

TEST(CudaEmulatorTest, SyncThreadsSeparatesSharedMemoryPhasesOfEachBlock) {
  DeviceBuffer<int> out(3 * 256);
  NeighbourKernel<<<3, 256>>>(out.p);
  ASSERT_EQ(cudaGetLastError(), cudaSuccess);
  const std::vector<int> got = out.Read();
  for (int b = 0; b < 3; ++b) {
    for (int t = 0; t < 256; ++t) EXPECT_EQ(got[b * 256 + t], ((t + 1) % 256) * 3 + b);
  }
}

TEST(CudaEmulatorTest, SyncThreadsOrSeesAnyThreadsPredicate) {
  DeviceBuffer<int> out(96);
  for (int chosen : {95, -1}) {
    AnyKernel<<<1, 96>>>(chosen, out.p);
    ASSERT_EQ(cudaGetLastError(), cudaSuccess);
    for (int v : out.Read()) EXPECT_EQ(v, chosen >= 0 ? 1 : 0);
  }
}

TEST(CudaEmulatorTest, DynamicSharedMemoryIsTheLaunchsBytes) {
  DeviceBuffer<float> out(128);
  DynamicSharedKernel<<<1, 128, 128 * sizeof(float)>>>(out.p);
  ASSERT_EQ(cudaGetLastError(), cudaSuccess);
  const std::vector<float> got = out.Read();
  for (int t = 0; t < 128; ++t) EXPECT_EQ(got[t], 127 - t);
}

TEST(CudaEmulatorTest, RefusesLaunchesTheDeviceWouldRefuse) {
  DeviceBuffer<float> out(4096);
  AddOneKernel<<<1, 2048>>>(out.p, 4096);  // more than 1024 threads per block
  EXPECT_EQ(cudaGetLastError(), cudaErrorInvalidConfiguration);
  AddOneKernel<<<0, 32>>>(out.p, 4096);
  EXPECT_EQ(cudaGetLastError(), cudaErrorInvalidConfiguration);
  // Past 48 KiB of dynamic shared memory only after the kernel has opted in.
  DynamicSharedKernel<<<1, 32, 64 << 10>>>(out.p);
  EXPECT_EQ(cudaGetLastError(), cudaErrorInvalidValue);
  ASSERT_EQ(cudaFuncSetAttribute(DynamicSharedKernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                 64 << 10),
            cudaSuccess);
  DynamicSharedKernel<<<1, 32, 64 << 10>>>(out.p);
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);
}

TEST(CudaEmulatorTest, SharedMemoryABlockNeverWroteReadsAsNan) {
  DeviceBuffer<float> out(3 * 32);
  UnwrittenSharedKernel<<<3, 32>>>(out.p);
  ASSERT_EQ(cudaGetLastError(), cudaSuccess);
  const std::vector<float> got = out.Read();
  for (int i = 0; i < 3 * 32; ++i) {
    if (i < 32) {
      EXPECT_EQ(got[i], 1.f) << i;
    } else {
      EXPECT_TRUE(std::isnan(got[i])) << i << ": " << got[i];  // not block 0's 1.0
    }
  }
}

TEST(CudaEmulatorTest, FreshDeviceMemoryReadsAsNan) {
  DeviceBuffer<float> out(64);
  for (float v : out.Read()) EXPECT_TRUE(std::isnan(v));
}

TEST(CudaEmulatorTest, CopiesWhoseDeviceSideIsNotDeviceMemoryAreRefused) {
  std::vector<float> host(16, 1.f), other(16, 0.f);
  EXPECT_EQ(cudaMemcpy(other.data(), host.data(), 64, cudaMemcpyHostToDevice),
            cudaErrorInvalidValue);
  DeviceBuffer<float> dev(16), other_dev(16);
  EXPECT_EQ(cudaMemcpy(dev.p, host.data(), 128, cudaMemcpyHostToDevice),  // past its end
            cudaErrorInvalidValue);
  // A kind the wrong way round: the "host" side is device memory.
  EXPECT_EQ(cudaMemcpy(dev.p, other_dev.p, 64, cudaMemcpyHostToDevice), cudaErrorInvalidValue);
  EXPECT_EQ(cudaMemcpy(dev.p, host.data(), 64, cudaMemcpyHostToDevice), cudaSuccess);
  cudaGetLastError();
}

TEST(CudaEmulatorTest, CapturedGraphsReplayWithTheirCapturedArguments) {
  DeviceBuffer<float> data(100);
  ASSERT_EQ(cudaMemset(data.p, 0, 100 * sizeof(float)), cudaSuccess);
  cudaStream_t stream;
  ASSERT_EQ(cudaStreamCreate(&stream), cudaSuccess);
  ASSERT_EQ(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal), cudaSuccess);
  int n = 60;
  AddOneKernel<<<2, 64, 0, stream>>>(data.p, n);
  n = 100;  // the graph keeps 60
  cudaGraph_t graph;
  ASSERT_EQ(cudaStreamEndCapture(stream, &graph), cudaSuccess);
  for (float v : data.Read()) EXPECT_EQ(v, 0.f);  // nothing ran while capturing
  cudaGraphExec_t exec;
  ASSERT_EQ(cudaGraphInstantiate(&exec, graph, 0), cudaSuccess);
  for (int i = 0; i < 3; ++i) ASSERT_EQ(cudaGraphLaunch(exec, stream), cudaSuccess);
  ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
  const std::vector<float> got = data.Read();
  for (int i = 0; i < 100; ++i) EXPECT_EQ(got[i], i < 60 ? 3.f : 0.f) << i;
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  cudaStreamDestroy(stream);
}

TEST(CudaEmulatorTest, EachThreadOrderShowsARaceTheOtherHides) {
  DeviceBuffer<int> out(64);
  int wrong[2] = {0, 0};
  for (cuda_emu::ThreadOrder order :
       {cuda_emu::ThreadOrder::kForward, cuda_emu::ThreadOrder::kReverse}) {
    cuda_emu::SetThreadOrder(order);
    ASSERT_EQ(cudaMemset(out.p, 0xff, 64 * sizeof(int)), cudaSuccess);
    const int seed = 1000 * (1 + static_cast<int>(order));
    MissingBarrierKernel<<<1, 64>>>(seed, out.p);
    const std::vector<int> got = out.Read();
    for (int t = 0; t < 64; ++t) wrong[static_cast<int>(order)] += got[t] != (t + 1) % 64 + seed;
  }
  cuda_emu::SetThreadOrder(cuda_emu::ThreadOrder::kForward);
  // Forward: every thread but the last reads its neighbour's slot before the neighbour wrote it.
  // Reverse: only the last thread does (its neighbour, thread 0, runs last).
  EXPECT_EQ(wrong[0], 63);
  EXPECT_EQ(wrong[1], 1);
}

TEST(CudaEmulatorTest, ErrorsAndProhibitedCallsInvalidateACapture) {
  DeviceBuffer<float> data(64);
  cudaStream_t stream;
  ASSERT_EQ(cudaStreamCreate(&stream), cudaSuccess);
  // A refused launch while capturing: the capture ends with no graph.
  ASSERT_EQ(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal), cudaSuccess);
  AddOneKernel<<<1, 2048, 0, stream>>>(data.p, 64);
  EXPECT_EQ(cudaGetLastError(), cudaErrorInvalidConfiguration);
  cudaGraph_t graph = nullptr;
  EXPECT_EQ(cudaStreamEndCapture(stream, &graph), cudaErrorStreamCaptureInvalidated);
  EXPECT_EQ(graph, nullptr);
  cudaGetLastError();
  // A synchronous copy by the capturing thread is prohibited in thread-local mode.
  std::vector<float> host(64, 0.f);
  ASSERT_EQ(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal), cudaSuccess);
  AddOneKernel<<<1, 64, 0, stream>>>(data.p, 64);
  EXPECT_EQ(cudaMemcpy(host.data(), data.p, 64 * sizeof(float), cudaMemcpyDeviceToHost),
            cudaErrorStreamCaptureUnsupported);
  EXPECT_EQ(cudaStreamEndCapture(stream, &graph), cudaErrorStreamCaptureInvalidated);
  cudaGetLastError();
  // So is an allocation by the capturing thread.
  ASSERT_EQ(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal), cudaSuccess);
  void* p = nullptr;
  EXPECT_EQ(cudaMalloc(&p, 64), cudaErrorStreamCaptureUnsupported);
  EXPECT_EQ(cudaStreamEndCapture(stream, &graph), cudaErrorStreamCaptureInvalidated);
  cudaGetLastError();
  // And a clean capture still works.
  ASSERT_EQ(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal), cudaSuccess);
  AddOneKernel<<<1, 64, 0, stream>>>(data.p, 64);
  ASSERT_EQ(cudaStreamEndCapture(stream, &graph), cudaSuccess);
  EXPECT_NE(graph, nullptr);
  cudaGraphDestroy(graph);
  cudaStreamDestroy(stream);
}

// Runs the test body's stream work deferred, as late as CUDA allows, and eager again after.
class DeferredStreamsTest : public ::testing::Test {
 protected:
  void SetUp() override { cuda_emu::SetStreamMode(cuda_emu::StreamMode::kDeferred); }
  void TearDown() override { cuda_emu::SetStreamMode(cuda_emu::StreamMode::kEager); }
};

// Pinned host memory of n floats.
struct PinnedFloats {
  explicit PinnedFloats(size_t n) : n(n) {
    EXPECT_EQ(cudaHostAlloc(reinterpret_cast<void**>(&p), n * sizeof(float), 0), cudaSuccess);
  }
  ~PinnedFloats() { cudaFreeHost(p); }
  float* p = nullptr;
  size_t n;
};

cudaStream_t NonBlockingStream() {
  cudaStream_t s = nullptr;
  EXPECT_EQ(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), cudaSuccess);
  return s;
}

// Queues on `stream`: data = 0, data += 1, then data's n floats copied into host.
void QueueZeroAddOneAndCopyOut(float* data, float* host, int n, cudaStream_t stream) {
  ASSERT_EQ(cudaMemsetAsync(data, 0, n * sizeof(float), stream), cudaSuccess);
  AddOneKernel<<<1, n, 0, stream>>>(data, n);
  ASSERT_EQ(cudaMemcpyAsync(host, data, n * sizeof(float), cudaMemcpyDeviceToHost, stream),
            cudaSuccess);
}

TEST_F(DeferredStreamsTest, ResultsArriveOnlyOnceTheHostWaitsForThem) {
  DeviceBuffer<float> data(64);
  PinnedFloats host(64);
  cudaStream_t stream = NonBlockingStream();
  QueueZeroAddOneAndCopyOut(data.p, host.p, 64, stream);
  EXPECT_TRUE(std::isnan(host.p[0]));  // fresh pinned memory; nothing has run yet
  EXPECT_EQ(cudaStreamQuery(stream), cudaErrorNotReady);
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);  // not ready is not an error
  EXPECT_EQ(cudaStreamQuery(stream), cudaSuccess);  // and it ran right after the query
  for (int i = 0; i < 64; ++i) EXPECT_EQ(host.p[i], 1.f) << i;
  AddOneKernel<<<1, 64, 0, stream>>>(data.p, 64);
  ASSERT_EQ(cudaMemcpyAsync(host.p, data.p, 64 * sizeof(float), cudaMemcpyDeviceToHost, stream),
            cudaSuccess);
  EXPECT_EQ(host.p[5], 1.f);
  ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
  EXPECT_EQ(host.p[5], 2.f);
  cudaStreamDestroy(stream);
}

TEST_F(DeferredStreamsTest, AStreamSeesAnotherStreamsWorkOnlyThroughAnEvent) {
  DeviceBuffer<float> data(32);
  PinnedFloats host(32);
  cudaStream_t producer = NonBlockingStream(), consumer = NonBlockingStream();
  cudaEvent_t written;
  ASSERT_EQ(cudaEventCreateWithFlags(&written, cudaEventDisableTiming), cudaSuccess);
  ASSERT_EQ(cudaMemsetAsync(data.p, 0, 32 * sizeof(float), producer), cudaSuccess);
  for (bool wait : {false, true}) {
    // The producer adds one each round: 1 after the first, 2 after the second.
    AddOneKernel<<<1, 32, 0, producer>>>(data.p, 32);
    ASSERT_EQ(cudaEventRecord(written, producer), cudaSuccess);
    if (wait) ASSERT_EQ(cudaStreamWaitEvent(consumer, written, 0), cudaSuccess);
    ASSERT_EQ(cudaMemcpyAsync(host.p, data.p, 32 * sizeof(float), cudaMemcpyDeviceToHost,
                              consumer),
              cudaSuccess);
    ASSERT_EQ(cudaStreamSynchronize(consumer), cudaSuccess);
    // Without the wait the consumer's copy ran before the producer's work: it read fresh
    // memory. With it, the copy saw this round's addition (1 would be the last round's).
    if (wait) {
      EXPECT_EQ(host.p[7], 2.f);
    } else {
      EXPECT_TRUE(std::isnan(host.p[7]));
    }
    ASSERT_EQ(cudaEventSynchronize(written), cudaSuccess);
  }
  cudaEventDestroy(written);
  cudaStreamDestroy(producer);
  cudaStreamDestroy(consumer);
}

TEST_F(DeferredStreamsTest, CopiesReadPinnedMemoryWhenTheyRunAndPageableMemoryWhenCalled) {
  DeviceBuffer<float> from_pinned(4), from_pageable(4);
  PinnedFloats pinned(4);
  std::vector<float> pageable(4, 1.f);
  for (int i = 0; i < 4; ++i) pinned.p[i] = 1.f;
  cudaStream_t stream = NonBlockingStream();
  ASSERT_EQ(cudaMemcpyAsync(from_pinned.p, pinned.p, 4 * sizeof(float), cudaMemcpyHostToDevice,
                            stream),
            cudaSuccess);
  ASSERT_EQ(cudaMemcpyAsync(from_pageable.p, pageable.data(), 4 * sizeof(float),
                            cudaMemcpyHostToDevice, stream),
            cudaSuccess);
  // Rewritten before the stream ran the copies: a bug for the pinned source, which the copy
  // reads only when it runs; fine for the pageable one, which was staged when called.
  for (int i = 0; i < 4; ++i) pinned.p[i] = pageable[i] = 2.f;
  ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
  EXPECT_EQ(from_pinned.Read()[0], 2.f);
  EXPECT_EQ(from_pageable.Read()[0], 1.f);
  // A copy into pageable memory has landed when the call returns.
  std::vector<float> back(4, 0.f);
  AddOneKernel<<<1, 4, 0, stream>>>(from_pageable.p, 4);
  ASSERT_EQ(cudaMemcpyAsync(back.data(), from_pageable.p, 4 * sizeof(float),
                            cudaMemcpyDeviceToHost, stream),
            cudaSuccess);
  EXPECT_EQ(back[3], 2.f);
  cudaStreamDestroy(stream);
}

TEST_F(DeferredStreamsTest, BlockingStreamsWaitForTheLegacyStreamsQueuedWork) {
  DeviceBuffer<float> a(8), b(8);
  cudaStream_t blocking = nullptr;
  ASSERT_EQ(cudaStreamCreate(&blocking), cudaSuccess);
  cudaStream_t non_blocking = NonBlockingStream();
  // A memset of device memory returns before it has run.
  ASSERT_EQ(cudaMemset(a.p, 0, 8 * sizeof(float)), cudaSuccess);
  ASSERT_EQ(cudaMemset(b.p, 0, 8 * sizeof(float)), cudaSuccess);
  AddOneKernel<<<1, 8, 0, blocking>>>(a.p, 8);
  AddOneKernel<<<1, 8, 0, non_blocking>>>(b.p, 8);
  ASSERT_EQ(cudaStreamSynchronize(non_blocking), cudaSuccess);  // before the memsets ran
  ASSERT_EQ(cudaStreamSynchronize(blocking), cudaSuccess);      // after them
  EXPECT_EQ(a.Read()[0], 1.f);
  EXPECT_EQ(b.Read()[0], 0.f);  // its memset ran after the kernel
  cudaStreamDestroy(blocking);
  cudaStreamDestroy(non_blocking);
}

TEST_F(DeferredStreamsTest, TheLegacyDefaultStreamWaitsForBlockingStreamsOnly) {
  DeviceBuffer<float> data(16);
  ASSERT_EQ(cudaMemset(data.p, 0, 16 * sizeof(float)), cudaSuccess);
  cudaStream_t blocking = nullptr;
  ASSERT_EQ(cudaStreamCreate(&blocking), cudaSuccess);
  cudaStream_t non_blocking = NonBlockingStream();
  AddOneKernel<<<1, 16, 0, blocking>>>(data.p, 16);
  EXPECT_EQ(data.Read()[0], 1.f);  // cudaMemcpy on the legacy stream waited for it
  AddOneKernel<<<1, 16, 0, non_blocking>>>(data.p, 16);
  EXPECT_EQ(data.Read()[0], 1.f);  // it did not wait for this one
  ASSERT_EQ(cudaStreamSynchronize(non_blocking), cudaSuccess);
  EXPECT_EQ(data.Read()[0], 2.f);
  cudaStreamDestroy(blocking);
  cudaStreamDestroy(non_blocking);
}

TEST_F(DeferredStreamsTest, QueuedWorkOutlivesItsGraphEventAndStream) {
  DeviceBuffer<float> data(8);
  ASSERT_EQ(cudaMemset(data.p, 0, 8 * sizeof(float)), cudaSuccess);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);  // non-blocking streams do not wait for it
  cudaStream_t capture = NonBlockingStream(), consumer = NonBlockingStream();
  ASSERT_EQ(cudaStreamBeginCapture(capture, cudaStreamCaptureModeThreadLocal), cudaSuccess);
  AddOneKernel<<<1, 8, 0, capture>>>(data.p, 8);
  cudaGraph_t graph;
  ASSERT_EQ(cudaStreamEndCapture(capture, &graph), cudaSuccess);
  cudaGraphExec_t exec;
  ASSERT_EQ(cudaGraphInstantiate(&exec, graph, 0), cudaSuccess);
  cudaStream_t producer = NonBlockingStream();
  ASSERT_EQ(cudaGraphLaunch(exec, producer), cudaSuccess);
  ASSERT_EQ(cudaGraphLaunch(exec, producer), cudaSuccess);
  cudaEvent_t done;
  ASSERT_EQ(cudaEventCreate(&done), cudaSuccess);
  ASSERT_EQ(cudaEventRecord(done, producer), cudaSuccess);
  ASSERT_EQ(cudaStreamWaitEvent(consumer, done, 0), cudaSuccess);
  AddOneKernel<<<1, 8, 0, consumer>>>(data.p, 8);
  // Destroyed while queued: CUDA lets the queued work finish. The consumer's sync runs the
  // producer's graph launches through the wait first.
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  cudaEventDestroy(done);
  ASSERT_EQ(cudaStreamSynchronize(consumer), cudaSuccess);
  ASSERT_EQ(cudaStreamSynchronize(producer), cudaSuccess);
  EXPECT_EQ(data.Read()[2], 3.f);
  // A wait on a stream destroyed before the wait runs.
  ASSERT_EQ(cudaEventCreate(&done), cudaSuccess);
  AddOneKernel<<<1, 8, 0, producer>>>(data.p, 8);
  ASSERT_EQ(cudaEventRecord(done, producer), cudaSuccess);
  ASSERT_EQ(cudaStreamWaitEvent(consumer, done, 0), cudaSuccess);
  cudaEventDestroy(done);
  cudaStreamDestroy(producer);  // runs its work
  AddOneKernel<<<1, 8, 0, consumer>>>(data.p, 8);
  ASSERT_EQ(cudaStreamSynchronize(consumer), cudaSuccess);
  EXPECT_EQ(data.Read()[2], 5.f);
  cudaStreamDestroy(consumer);
  cudaStreamDestroy(capture);
}

// Runs the test body in one staggered mode (the parameter), and eager again after.
class StaggeredStreamsTest : public ::testing::TestWithParam<cuda_emu::StreamMode> {
 protected:
  void SetUp() override { cuda_emu::SetStreamMode(GetParam()); }
  void TearDown() override { cuda_emu::SetStreamMode(cuda_emu::StreamMode::kEager); }
};

// Of two new streams one runs ahead. It overwrites a buffer the other has yet to copy out
// unless it waits for an event recorded after that copy.
TEST_P(StaggeredStreamsTest, ShowAStreamOverwritingWhatALaggingOneHasYetToRead) {
  DeviceBuffer<float> shared(8), out(8);
  ASSERT_EQ(cudaMemset(shared.p, 0, 8 * sizeof(float)), cudaSuccess);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);  // non-blocking streams do not wait for it
  cudaStream_t lagging = NonBlockingStream(), ahead = NonBlockingStream();
  if (cuda_emu::RunsAhead(lagging)) std::swap(lagging, ahead);
  ASSERT_TRUE(cuda_emu::RunsAhead(ahead));
  ASSERT_FALSE(cuda_emu::RunsAhead(lagging));
  cudaEvent_t read;
  ASSERT_EQ(cudaEventCreate(&read), cudaSuccess);
  for (bool wait : {false, true}) {
    ASSERT_EQ(cudaMemsetAsync(out.p, 0, 8 * sizeof(float), lagging), cudaSuccess);
    ASSERT_EQ(cudaMemcpyAsync(out.p, shared.p, 8 * sizeof(float), cudaMemcpyDeviceToDevice,
                              lagging),
              cudaSuccess);
    ASSERT_EQ(cudaEventRecord(read, lagging), cudaSuccess);
    if (wait) ASSERT_EQ(cudaStreamWaitEvent(ahead, read, 0), cudaSuccess);
    AddOneKernel<<<1, 8, 0, ahead>>>(shared.p, 8);
    ASSERT_EQ(cudaStreamSynchronize(lagging), cudaSuccess);
    // Without the wait the lagging copy saw the increment it was meant to precede.
    const float before = wait ? 1.f : 0.f;
    EXPECT_EQ(out.Read()[0], wait ? before : before + 1.f) << wait;
  }
  cudaEventDestroy(read);
  cudaStreamDestroy(lagging);
  cudaStreamDestroy(ahead);
}

INSTANTIATE_TEST_SUITE_P(BothParities, StaggeredStreamsTest,
                         ::testing::Values(cuda_emu::StreamMode::kStaggered,
                                           cuda_emu::StreamMode::kStaggeredEven));

TEST(CudaEmulatorTest, EagerStreamsRunEachOperationWhenItIsQueued) {
  cuda_emu::SetStreamMode(cuda_emu::StreamMode::kEager);
  DeviceBuffer<float> data(4);
  PinnedFloats host(4);
  cudaStream_t stream = NonBlockingStream();
  QueueZeroAddOneAndCopyOut(data.p, host.p, 4, stream);
  EXPECT_EQ(host.p[1], 1.f);
  EXPECT_EQ(cudaStreamQuery(stream), cudaSuccess);
  cudaStreamDestroy(stream);
}

TEST(CudaEmulatorDeathTest, ReportsLanesAtDifferentWarpOperations) {
  EXPECT_DEATH(
      {
        DeviceBuffer<int> out(32);
        MismatchedWarpOpsKernel<<<1, 32>>>(out.p);
      },
      "lanes of warp 0 are at different warp operations");
}

TEST(CudaEmulatorDeathTest, ReportsThreadsWaitingAtDifferentBarriers) {
  EXPECT_DEATH(
      {
        DeviceBuffer<int> out(32);
        MismatchedBarrierKernel<<<1, 32>>>(out.p);
      },
      "deadlocked in block \\(0, 0, 0\\)");
}

}  // namespace
}  // namespace kvmem
