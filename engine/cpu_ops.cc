#include "engine/cpu_ops.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>

namespace kvmem {
namespace {

// 4 tokens x 4 output rows per register tile; the k loop vectorises through the simd pragma.
void BlockedRows(const float* x, int64_t n, int64_t in, const float* w, int64_t row_begin,
                 int64_t row_end, int64_t out, float* y) {
  constexpr int64_t kTile = 4;
  for (int64_t r0 = row_begin; r0 < row_end; r0 += kTile) {
    const int64_t rows = std::min(kTile, row_end - r0);
    for (int64_t t0 = 0; t0 < n; t0 += kTile) {
      const int64_t toks = std::min(kTile, n - t0);
      for (int64_t t = 0; t < toks; ++t) {
        const float* xt = x + (t0 + t) * in;
        for (int64_t r = 0; r < rows; ++r) {
          const float* wr = w + (r0 + r) * in;
          float acc = 0.f;
#pragma omp simd reduction(+ : acc)
          for (int64_t k = 0; k < in; ++k) acc += xt[k] * wr[k];
          y[(t0 + t) * out + r0 + r] = acc;
        }
      }
    }
  }
}

}  // namespace

void MatMulTransposed(const float* x, int64_t n, int64_t in, const float* w, int64_t out,
                      const float* bias, float* y, ThreadPool* pool, GemmImpl impl) {
  if (impl == GemmImpl::kOpenBlas) {
    if (n == 1) {
      cblas_sgemv(CblasRowMajor, CblasNoTrans, static_cast<blasint>(out),
                  static_cast<blasint>(in), 1.0f, w, static_cast<blasint>(in), x, 1, 0.0f, y, 1);
    } else {
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<blasint>(n),
                  static_cast<blasint>(out), static_cast<blasint>(in), 1.0f, x,
                  static_cast<blasint>(in), w, static_cast<blasint>(in), 0.0f, y,
                  static_cast<blasint>(out));
    }
  } else {
    pool->ParallelFor((out + 3) / 4, [&](int64_t begin, int64_t end) {
      BlockedRows(x, n, in, w, begin * 4, std::min(out, end * 4), out, y);
    });
  }
  if (bias != nullptr) {
    for (int64_t t = 0; t < n; ++t) {
      for (int64_t o = 0; o < out; ++o) y[t * out + o] += bias[o];
    }
  }
}

void RmsNorm(const float* x, const float* weight, int64_t n, int64_t dim, double eps, float* out) {
  for (int64_t t = 0; t < n; ++t) {
    const float* xt = x + t * dim;
    float* ot = out + t * dim;
    double ss = 0;
    for (int64_t i = 0; i < dim; ++i) ss += static_cast<double>(xt[i]) * xt[i];
    const float scale = static_cast<float>(1.0 / std::sqrt(ss / dim + eps));
    for (int64_t i = 0; i < dim; ++i) ot[i] = xt[i] * scale * weight[i];
  }
}

void ApplyRope(float* x, int heads, int head_dim, int64_t position, const double* inv_freq) {
  const int half = head_dim / 2;
  for (int i = 0; i < half; ++i) {
    const double angle = static_cast<double>(position) * inv_freq[i];
    const float c = static_cast<float>(std::cos(angle));
    const float s = static_cast<float>(std::sin(angle));
    for (int h = 0; h < heads; ++h) {
      float* v = x + h * head_dim;
      const float x1 = v[i], x2 = v[i + half];
      v[i] = x1 * c - x2 * s;
      v[i + half] = x2 * c + x1 * s;
    }
  }
}

void SwiGlu(float* gate, const float* up, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float g = gate[i];
    gate[i] = g / (1.0f + std::exp(-g)) * up[i];
  }
}

}  // namespace kvmem
