// Reading safetensors files: memory-mapped, validated before any tensor is touched.
//
// Format: an 8-byte little-endian header length N, N bytes of JSON mapping tensor names to
// {dtype, shape, data_offsets: [begin, end]} (offsets relative to the byte after the header),
// then the tensor bytes. Every malformed file is an error status, never a crash.
#ifndef KVMEM_ENGINE_SAFETENSORS_H_
#define KVMEM_ENGINE_SAFETENSORS_H_

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace kvmem {

enum class DType { kF64, kF32, kF16, kBF16, kI64, kI32, kI16, kI8, kU8, kBool, kF8E4M3, kF8E5M2 };

// Parses a safetensors dtype name ("F32", "BF16", ...).
absl::StatusOr<DType> ParseDType(std::string_view name);
const char* DTypeName(DType dtype);
size_t DTypeSize(DType dtype);

// A read-only file mapped into memory. The mapping lives as long as the object.
class MappedFile {
 public:
  static absl::StatusOr<std::unique_ptr<MappedFile>> Open(const std::string& path);
  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  const uint8_t* data() const { return data_; }
  size_t size() const { return size_; }

 private:
  MappedFile(const uint8_t* data, size_t size) : data_(data), size_(size) {}
  const uint8_t* data_;
  size_t size_;
};

// One tensor inside a mapped file; `data` points into the mapping.
struct TensorView {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  const uint8_t* data = nullptr;
  size_t nbytes = 0;

  int64_t NumElements() const;
  std::string ShapeString() const;  // "[64, 512]"
};

class SafetensorsFile {
 public:
  // On success every tensor's offsets lie inside the file and match its dtype and shape.
  // On failure: NOT_FOUND for a missing file, INVALID_ARGUMENT (naming the file and the
  // problem) for anything malformed.
  static absl::StatusOr<std::unique_ptr<SafetensorsFile>> Open(const std::string& path);

  const std::string& path() const { return path_; }
  // The JSON header exactly as stored (part of the model fingerprint).
  std::string_view header() const { return header_; }
  const std::map<std::string, TensorView>& tensors() const { return tensors_; }
  const TensorView* Find(const std::string& name) const;

 private:
  std::string path_;
  std::unique_ptr<MappedFile> file_;
  std::string_view header_;
  std::map<std::string, TensorView> tensors_;
};

// Writes tensors as a safetensors file (used by tests and benchmarks that make their own
// models). Each entry's data must hold NumElements() * DTypeSize(dtype) bytes.
struct TensorToWrite {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  std::vector<uint8_t> bytes;
};
absl::Status WriteSafetensors(const std::string& path, const std::vector<TensorToWrite>& tensors);

// Converts a floating-point tensor (F32, F16, BF16, F64) to f32; `out` holds NumElements().
absl::Status ConvertToFloat32(const TensorView& tensor, float* out);

// Scalar conversions, exact where the source format allows.
float HalfToFloat(uint16_t h);
float BFloat16ToFloat(uint16_t b);
uint16_t FloatToBFloat16(float f);  // round to nearest even
uint16_t FloatToHalf(float f);      // round to nearest even

}  // namespace kvmem

#endif  // KVMEM_ENGINE_SAFETENSORS_H_
