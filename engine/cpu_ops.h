// Plain f32 building blocks of the CPU reference forward pass.
#ifndef KVMEM_ENGINE_CPU_OPS_H_
#define KVMEM_ENGINE_CPU_OPS_H_

#include <cstdint>

#include "engine/thread_pool.h"

namespace kvmem {

enum class GemmImpl {
  kOpenBlas,  // cblas_sgemm (the default: measured faster, see bench/gemm_bench.cc)
  kBlocked,   // our own register-blocked loop over the thread pool
};

// y (n, out) = x (n, in) * w^T, where w is (out, in) row-major as Hugging Face stores it;
// then y += bias (out) when bias is non-null.
void MatMulTransposed(const float* x, int64_t n, int64_t in, const float* w, int64_t out,
                      const float* bias, float* y, ThreadPool* pool,
                      GemmImpl impl = GemmImpl::kOpenBlas);

// out (n, dim) = x / sqrt(mean(x^2) + eps) * weight, row by row.
void RmsNorm(const float* x, const float* weight, int64_t n, int64_t dim, double eps, float* out);

// Rotate-half RoPE, in place, on `heads` vectors of head_dim for one token at `position`.
// inv_freq has head_dim / 2 entries.
void ApplyRope(float* x, int heads, int head_dim, int64_t position, const double* inv_freq);

// gate (n) = silu(gate) * up.
void SwiGlu(float* gate, const float* up, int64_t n);

}  // namespace kvmem

#endif  // KVMEM_ENGINE_CPU_OPS_H_
