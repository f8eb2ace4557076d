// CUDA error reporting and device detection shared by the kernels, the CUDA backend and tests.
// Plain C++: includable from .cc files compiled by the host compiler.
#ifndef KVMEM_KERNELS_CUDA_CHECK_CUH_
#define KVMEM_KERNELS_CUDA_CHECK_CUH_

#include <cuda_runtime_api.h>

#include <cstdio>
#include <cstdlib>
#include <string>

namespace kvmem {

// "file:line: what: cudaErrorName (description)", for a status message or a log line.
inline std::string CudaErrorMessage(cudaError_t err, const char* what, const char* file, int line) {
  return std::string(file) + ":" + std::to_string(line) + ": " + what + ": " +
         cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ")";
}

// The message of a failed CUDA call `expr`, located at the call site.
#define KVMEM_CUDA_ERROR_MESSAGE(err, expr) \
  ::kvmem::CudaErrorMessage((err), #expr, __FILE__, __LINE__)

// Aborts with file:line when a CUDA call that must not fail (a broken invariant) fails.
// Recoverable CUDA errors become an absl::Status in the CUDA backend instead.
#define KVMEM_CUDA_CHECK(expr)                                                               \
  do {                                                                                       \
    const cudaError_t kvmem_cuda_err_ = (expr);                                              \
    if (kvmem_cuda_err_ != cudaSuccess) {                                                    \
      std::fprintf(stderr, "%s\n", KVMEM_CUDA_ERROR_MESSAGE(kvmem_cuda_err_, expr).c_str()); \
      std::abort();                                                                          \
    }                                                                                        \
  } while (0)

// True when device 0 exists and can run this build's kernels (sm_90 machine code and
// compute_90 PTX, so compute capability 9.0 or newer). On false, *why (when non-null) says
// why: no driver, no device, or a device too old.
inline bool CudaDeviceAvailable(std::string* why) {
  std::string reason;
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear the error so later calls do not report it again
    reason = std::string("cudaGetDeviceCount: ") + cudaGetErrorName(err) + " (" +
             cudaGetErrorString(err) + ")";
  } else if (count == 0) {
    reason = "cudaGetDeviceCount found 0 devices";
  } else {
    cudaDeviceProp prop;
    err = cudaGetDeviceProperties(&prop, 0);
    if (err != cudaSuccess) {
      cudaGetLastError();
      reason = std::string("cudaGetDeviceProperties: ") + cudaGetErrorName(err);
    } else if (prop.major < 9) {
      reason = std::string(prop.name) + " has compute capability " + std::to_string(prop.major) +
               "." + std::to_string(prop.minor) + "; kernels are built for 9.0 and newer";
    }
  }
  if (why != nullptr) *why = reason;
  return reason.empty();
}

}  // namespace kvmem

#endif  // KVMEM_KERNELS_CUDA_CHECK_CUH_
