// absl::Status -> grpc::Status, the one place where kvmem's errors become gRPC's.
#ifndef KVMEM_SERVICE_GRPC_STATUS_H_
#define KVMEM_SERVICE_GRPC_STATUS_H_

#include <grpcpp/support/status.h>

#include "absl/status/status.h"

namespace kvmem {

// Same code (absl and gRPC share the canonical code numbers), same message.
grpc::Status ToGrpcStatus(const absl::Status& status);

}  // namespace kvmem

#endif  // KVMEM_SERVICE_GRPC_STATUS_H_
