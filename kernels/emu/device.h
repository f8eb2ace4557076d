// Force-included (-include) ahead of every kernel source compiled for the CUDA emulator: the
// CUDA headers in their host form, then what nvcc would otherwise provide to device code
// (built-in variables, __shared__, barriers, warp shuffles and the few intrinsics our kernels
// use), in terms of kernels/emu/emulator.h.
#ifndef KVMEM_KERNELS_EMU_DEVICE_H_
#define KVMEM_KERNELS_EMU_DEVICE_H_

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "kernels/emu/emulator.h"

#define KVMEM_CUDA_EMULATOR 1

#undef __global__
#undef __device__
#undef __host__
#undef __shared__
#undef __forceinline__
#undef __launch_bounds__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)
// Blocks run one at a time on their launching host thread, so a per-thread static is the
// running block's shared memory. (The rewrite of .cu files replaces their __shared__
// declarations with ones that also read as NaN until written; this covers headers.)
#define __shared__ static thread_local

#define threadIdx (::kvmem::cuda_emu::CurrentThread()->thread_idx)
#define blockIdx (::kvmem::cuda_emu::CurrentBlockIdx())
#define blockDim (::kvmem::cuda_emu::CurrentBlockDim())
#define gridDim (::kvmem::cuda_emu::CurrentGridDim())
#define warpSize 32

inline void __syncthreads() { ::kvmem::cuda_emu::SyncThreads(); }
inline int __syncthreads_or(int predicate) {
  return ::kvmem::cuda_emu::SyncThreads(predicate != 0) ? 1 : 0;
}
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  if (mask != 0xffffffffu) ::kvmem::cuda_emu::Fatal("only full-warp __syncwarp is emulated");
  ::kvmem::cuda_emu::SyncWarp();
}

namespace kvmem {
namespace cuda_emu {

inline int XorLane(int lane, int mask) { return lane ^ mask; }
inline int UpLane(int lane, int delta) {
  // Within the 32-lane segment; the low lanes keep their own value.
  return lane - delta >= 0 ? lane - delta : lane;
}
inline int DownLane(int lane, int delta) { return lane + delta < 32 ? lane + delta : lane; }
inline int FixedLane(int, int source) { return source & 31; }

template <typename T>
T Shuffle(unsigned mask, T v, int (*source)(int, int), int arg, int width) {
  static_assert(sizeof(T) <= 16, "shuffled values are at most 16 bytes");
  if (mask != 0xffffffffu || width != 32) {
    Fatal("only full-warp shuffles (mask 0xffffffff, width 32) are emulated");
  }
  T out;
  WarpExchange(&v, &out, sizeof(T), source, arg);
  return out;
}

}  // namespace cuda_emu
}  // namespace kvmem

template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  return ::kvmem::cuda_emu::Shuffle(mask, v, &::kvmem::cuda_emu::XorLane, lane_mask, width);
}
template <typename T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return ::kvmem::cuda_emu::Shuffle(mask, v, &::kvmem::cuda_emu::UpLane, static_cast<int>(delta),
                                    width);
}
template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return ::kvmem::cuda_emu::Shuffle(mask, v, &::kvmem::cuda_emu::DownLane, static_cast<int>(delta),
                                    width);
}
template <typename T>
T __shfl_sync(unsigned mask, T v, int source_lane, int width = 32) {
  return ::kvmem::cuda_emu::Shuffle(mask, v, &::kvmem::cuda_emu::FixedLane, source_lane, width);
}

// nvcc's global min and max for device code, over the usual arithmetic conversions.
template <typename A, typename B>
std::common_type_t<A, B> min(A a, B b) {
  return b < a ? b : a;
}
template <typename A, typename B>
std::common_type_t<A, B> max(A a, B b) {
  return a < b ? b : a;
}

inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }

// nvcc's typed overload, which host compilers do not see.
template <typename... P>
cudaError_t cudaFuncSetAttribute(void (*kernel)(P...), cudaFuncAttribute attr, int value) {
  return ::cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel), attr, value);
}

// Rounded single operations: the emulator is compiled with -ffp-contract=off, so these are
// never fused, as on the device.
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }

inline float __uint_as_float(unsigned v) {
  float f;
  std::memcpy(&f, &v, sizeof f);
  return f;
}
inline unsigned __float_as_uint(float f) {
  unsigned v;
  std::memcpy(&v, &f, sizeof v);
  return v;
}
inline long long __double_as_longlong(double d) {
  long long v;
  std::memcpy(&v, &d, sizeof v);
  return v;
}

template <typename T>
T __ldg(const T* p) {
  return *p;
}
template <typename T>
T __ldcs(const T* p) {
  return *p;
}

// Threads of a block never run at the same time, so a plain update is atomic.
template <typename T>
T atomicAdd(T* address, T v) {
  const T old = *address;
  *address = old + v;
  return old;
}

#endif  // KVMEM_KERNELS_EMU_DEVICE_H_
