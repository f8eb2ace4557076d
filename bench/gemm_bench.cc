// Which GEMM should the CPU backend use? Times OpenBLAS against our own blocked loop on
// Llama-like projection shapes, in one run, and prints the ratio.
//   build/bin/gemm_bench [threads]
#include <chrono>
#include <cstdio>
#include <algorithm>
#include <cstdlib>
#include <functional>
#include <random>
#include <vector>

#include <cblas.h>

#include "engine/cpu_ops.h"
#include "engine/thread_pool.h"

namespace {

double MedianSeconds(const std::function<void()>& fn, int reps) {
  std::vector<double> t;
  fn();  // warm up
  for (int i = 0; i < reps; ++i) {
    auto start = std::chrono::steady_clock::now();
    fn();
    t.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  const int threads = argc > 1 ? std::atoi(argv[1]) : 0;
  kvmem::ThreadPool pool(threads);
  openblas_set_num_threads(pool.size());
  std::mt19937 rng(1);
  std::normal_distribution<float> normal;
  struct Shape { const char* what; int64_t n, in, out; };
  const Shape shapes[] = {
      {"decode 1x2048->2048", 1, 2048, 2048},
      {"decode 1x2048->8192", 1, 2048, 8192},
      {"prefill 64x2048->2048", 64, 2048, 2048},
      {"prefill 256x2048->8192", 256, 2048, 8192},
  };
  std::printf("threads=%d\n%-26s %12s %12s %9s\n", pool.size(), "shape", "openblas GF/s",
              "blocked GF/s", "blas/own");
  for (const Shape& s : shapes) {
    std::vector<float> x(s.n * s.in), w(s.out * s.in), y(s.n * s.out);
    for (float& v : x) v = normal(rng);
    for (float& v : w) v = normal(rng);
    const int reps = s.n == 1 ? 50 : 5;
    const double blas = MedianSeconds([&] {
      kvmem::MatMulTransposed(x.data(), s.n, s.in, w.data(), s.out, nullptr, y.data(), &pool,
                              kvmem::GemmImpl::kOpenBlas);
    }, reps);
    const double own = MedianSeconds([&] {
      kvmem::MatMulTransposed(x.data(), s.n, s.in, w.data(), s.out, nullptr, y.data(), &pool,
                              kvmem::GemmImpl::kBlocked);
    }, reps);
    const double flops = 2.0 * s.n * s.in * s.out;
    std::printf("%-26s %12.1f %12.1f %9.2f\n", s.what, flops / blas / 1e9, flops / own / 1e9,
                own / blas);
  }
  return 0;
}
