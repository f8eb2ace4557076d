// The parts of engine/cuda_backend.h every build has, with or without CUDA.
#include <string>

#include "absl/strings/str_cat.h"
#include "engine/cuda_backend.h"

namespace kvmem {

absl::StatusOr<DeviceDtype> ParseDeviceDtype(std::string_view name) {
  if (name == "f32") return DeviceDtype::kF32;
  if (name == "bf16") return DeviceDtype::kBF16;
  if (name == "f16") return DeviceDtype::kF16;
  return absl::InvalidArgumentError(
      absl::StrCat("device dtype must be bf16, f16 or f32, got \"", std::string(name), "\""));
}

const char* DeviceDtypeName(DeviceDtype dtype) {
  switch (dtype) {
    case DeviceDtype::kF32:
      return "f32";
    case DeviceDtype::kF16:
      return "f16";
    case DeviceDtype::kBF16:
      break;
  }
  return "bf16";
}

}  // namespace kvmem
