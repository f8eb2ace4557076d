// cuBLAS for the CUDA emulator: the handle calls and the one GEMM the CUDA backend issues
// (cublasGemmEx, column-major, f32 accumulation), computed plainly in double and rounded once.
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstring>
#include <vector>

#include "kernels/emu/emulator.h"

struct cublasContext {
  cudaStream_t stream = nullptr;
};

namespace {

double Load(const void* base, cudaDataType type, size_t i) {
  switch (type) {
    case CUDA_R_32F:
      return static_cast<const float*>(base)[i];
    case CUDA_R_16BF:
      return __bfloat162float(static_cast<const __nv_bfloat16*>(base)[i]);
    case CUDA_R_16F:
      return __half2float(static_cast<const __half*>(base)[i]);
    default:
      return 0;
  }
}

void Store(void* base, cudaDataType type, size_t i, double v) {
  switch (type) {
    case CUDA_R_32F:
      static_cast<float*>(base)[i] = static_cast<float>(v);
      break;
    case CUDA_R_16BF:
      static_cast<__nv_bfloat16*>(base)[i] = __float2bfloat16_rn(static_cast<float>(v));
      break;
    case CUDA_R_16F:
      static_cast<__half*>(base)[i] = __float2half_rn(static_cast<float>(v));
      break;
    default:
      break;
  }
}

bool Supported(cudaDataType type) {
  return type == CUDA_R_32F || type == CUDA_R_16BF || type == CUDA_R_16F;
}

}  // namespace

extern "C" {

cublasStatus_t cublasCreate_v2(cublasHandle_t* handle) {
  *handle = new cublasContext;
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasDestroy_v2(cublasHandle_t handle) {
  delete handle;
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasSetStream_v2(cublasHandle_t handle, cudaStream_t stream) {
  handle->stream = stream;
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasSetWorkspace_v2(cublasHandle_t, void*, size_t) {
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasSetMathMode(cublasHandle_t, cublasMath_t) { return CUBLAS_STATUS_SUCCESS; }
const char* cublasGetStatusName(cublasStatus_t status) {
  switch (status) {
    case CUBLAS_STATUS_SUCCESS:
      return "CUBLAS_STATUS_SUCCESS";
    case CUBLAS_STATUS_INVALID_VALUE:
      return "CUBLAS_STATUS_INVALID_VALUE";
    case CUBLAS_STATUS_NOT_SUPPORTED:
      return "CUBLAS_STATUS_NOT_SUPPORTED";
    default:
      return "CUBLAS_STATUS_UNKNOWN";
  }
}

cublasStatus_t cublasGemmEx(cublasHandle_t handle, cublasOperation_t transa,
                            cublasOperation_t transb, int m, int n, int k, const void* alpha,
                            const void* A, cudaDataType Atype, int lda, const void* B,
                            cudaDataType Btype, int ldb, const void* beta, void* C,
                            cudaDataType Ctype, int ldc, cublasComputeType_t computeType,
                            cublasGemmAlgo_t) {
  if (m < 0 || n < 0 || k < 0 || !Supported(Atype) || !Supported(Btype) || !Supported(Ctype) ||
      (computeType != CUBLAS_COMPUTE_32F && computeType != CUBLAS_COMPUTE_32F_PEDANTIC &&
       computeType != CUBLAS_COMPUTE_32F_FAST_TF32)) {
    return CUBLAS_STATUS_NOT_SUPPORTED;
  }
  const bool ta = transa != CUBLAS_OP_N, tb = transb != CUBLAS_OP_N;
  if (lda < (ta ? k : m) || ldb < (tb ? n : k) || ldc < m) return CUBLAS_STATUS_INVALID_VALUE;
  const float a_scale = *static_cast<const float*>(alpha);
  const float b_scale = *static_cast<const float*>(beta);
  kvmem::cuda_emu::Enqueue(handle->stream, [=] {
    std::vector<double> a_row(k);
    for (int i = 0; i < m; ++i) {
      for (int p = 0; p < k; ++p) {
        a_row[p] = Load(A, Atype,
                        ta ? static_cast<size_t>(p) + static_cast<size_t>(i) * lda
                           : static_cast<size_t>(i) + static_cast<size_t>(p) * lda);
      }
      for (int j = 0; j < n; ++j) {
        double sum = 0;
        for (int p = 0; p < k; ++p) {
          sum += a_row[p] * Load(B, Btype,
                                 tb ? static_cast<size_t>(j) + static_cast<size_t>(p) * ldb
                                    : static_cast<size_t>(p) + static_cast<size_t>(j) * ldb);
        }
        const size_t c = static_cast<size_t>(i) + static_cast<size_t>(j) * ldc;
        double v = a_scale * sum;
        if (b_scale != 0.f) v += b_scale * Load(C, Ctype, c);
        Store(C, Ctype, c, v);
      }
    }
  });
  return CUBLAS_STATUS_SUCCESS;
}

}  // extern "C"
