// engine/cuda_backend.h in a build without CUDA (KVMEM_CUDA=OFF): no device is ever usable.
#include "engine/cuda_backend.h"

namespace kvmem {

bool CudaBackendAvailable(int device, std::string* why) {
  if (why != nullptr) *why = "this build has no CUDA backend (configured with KVMEM_CUDA=OFF)";
  return false;
}

absl::StatusOr<std::unique_ptr<Backend>> CreateCudaBackend(const ModelConfig& config,
                                                           const ModelWeights* weights,
                                                           const CudaBackendOptions& options) {
  std::string why;
  CudaBackendAvailable(options.device, &why);
  return absl::UnavailableError(why);
}

std::vector<CudaOpTime> TakeCudaOpProfile(Backend&) { return {}; }

CudaUploadStats GetCudaUploadStats(const Backend&) { return {}; }

}  // namespace kvmem
