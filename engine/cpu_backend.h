// The plain, threaded f32 CPU reference backend: the oracle every other path is checked against.
#ifndef KVMEM_ENGINE_CPU_BACKEND_H_
#define KVMEM_ENGINE_CPU_BACKEND_H_

#include <memory>
#include <vector>

#include "engine/backend.h"
#include "engine/cpu_ops.h"
#include "engine/model.h"
#include "engine/thread_pool.h"

namespace kvmem {

struct CpuBackendOptions {
  // Default: 0 (one per hardware thread). Threads for attention and for the GEMMs.
  int threads = 0;
  // Default: kOpenBlas. Which GEMM runs the projections.
  GemmImpl gemm = GemmImpl::kOpenBlas;
};

class CpuBackend : public Backend {
 public:
  // `model` must outlive the backend.
  CpuBackend(const Model& model, const CpuBackendOptions& options = {});
  const char* name() const override { return "cpu"; }
  absl::Status Forward(absl::Span<const int32_t> tokens, int64_t start_pos, KvCache* kv,
                       const ForwardOptions& options, ForwardResult* result) override;

 private:
  // Attention of the n new tokens of one layer; q (n, num_heads, head_dim) -> out likewise.
  void Attend(const KvCache& kv, int layer, int64_t n, int64_t start_pos, const float* q,
              float* out);

  const Model& model_;
  CpuBackendOptions options_;
  std::unique_ptr<ThreadPool> pool_;
  std::vector<double> inv_freq_;  // (head_dim / 2)
};

}  // namespace kvmem

#endif  // KVMEM_ENGINE_CPU_BACKEND_H_
