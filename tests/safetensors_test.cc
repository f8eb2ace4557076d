// Safetensors reading and writing, the F16/BF16 scalar conversions, and every malformed file.
#include "engine/safetensors.h"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "tests/test_util.h"

namespace kvmem {
namespace {

using testing::TempDir;
using testing::WriteText;

uint32_t Bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return b;
}

float FromBits(uint32_t b) {
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}

std::vector<uint8_t> Bytes(const void* data, size_t n) {
  const auto* p = static_cast<const uint8_t*>(data);
  return std::vector<uint8_t>(p, p + n);
}

// A safetensors file built by hand: the 8-byte little-endian `header_len`, `header`, `data`.
std::string RawFile(uint64_t header_len, const std::string& header, const std::string& data) {
  std::string out;
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<char>((header_len >> (8 * i)) & 0xff));
  return out + header + data;
}

std::string RawFile(const std::string& header, const std::string& data) {
  return RawFile(header.size(), header, data);
}

class SafetensorsFileTest : public ::testing::Test {
 protected:
  // Writes `contents` to a file and opens it.
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> OpenRaw(const std::string& contents) {
    path_ = dir_.path() + "/raw.safetensors";
    WriteText(path_, contents);
    return SafetensorsFile::Open(path_);
  }

  // Expects OpenRaw(contents) to fail with INVALID_ARGUMENT naming the file and `what`.
  void ExpectMalformed(const std::string& contents, const std::string& what) {
    auto file = OpenRaw(contents);
    ASSERT_FALSE(file.ok()) << "accepted: " << what;
    EXPECT_EQ(file.status().code(), absl::StatusCode::kInvalidArgument) << file.status();
    EXPECT_NE(file.status().message().find(path_), std::string::npos) << file.status();
    EXPECT_NE(file.status().message().find(what), std::string::npos)
        << "wanted \"" << what << "\" in: " << file.status();
  }

  TempDir dir_;
  std::string path_;
};

TEST_F(SafetensorsFileTest, RoundTripsNamesDtypesShapesAndBytes) {
  const std::vector<float> f32 = {1.5f, -2.25f, 3.0f, 0.0f, -0.0f, 1e-30f};
  const std::vector<uint16_t> f16 = {0x3c00, 0xc000, 0x7bff, 0x0001};
  const std::vector<uint16_t> bf16 = {0x3f80, 0x4049, 0xff80};
  const std::vector<int32_t> i32 = {7, -8, 9};
  const std::vector<double> f64 = {3.141592653589793};
  const std::vector<uint8_t> u8 = {1, 2, 3, 4, 5};
  std::vector<TensorToWrite> tensors = {
      {"a.f32", DType::kF32, {2, 3}, Bytes(f32.data(), 24)},
      {"b.f16", DType::kF16, {4}, Bytes(f16.data(), 8)},
      {"c.bf16", DType::kBF16, {1, 3, 1}, Bytes(bf16.data(), 6)},
      {"d.i32", DType::kI32, {3}, Bytes(i32.data(), 12)},
      {"e.scalar", DType::kF64, {}, Bytes(f64.data(), 8)},
      {"f.u8", DType::kU8, {5}, u8},
      {"g.empty", DType::kF32, {2, 0}, {}},
  };
  const std::string path = dir_.path() + "/model.safetensors";
  ASSERT_TRUE(WriteSafetensors(path, tensors).ok());

  auto file = SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ((*file)->path(), path);
  ASSERT_EQ((*file)->tensors().size(), tensors.size());
  for (const TensorToWrite& want : tensors) {
    const TensorView* got = (*file)->Find(want.name);
    ASSERT_NE(got, nullptr) << want.name;
    EXPECT_EQ(got->name, want.name);
    EXPECT_EQ(got->dtype, want.dtype) << want.name;
    EXPECT_EQ(got->shape, want.shape) << want.name;
    ASSERT_EQ(got->nbytes, want.bytes.size()) << want.name;
    EXPECT_EQ(std::vector<uint8_t>(got->data, got->data + got->nbytes), want.bytes) << want.name;
    EXPECT_NE((*file)->header().find("\"" + want.name + "\""), std::string::npos);
  }
  EXPECT_EQ((*file)->Find("a.f32")->ShapeString(), "[2, 3]");
  EXPECT_EQ((*file)->Find("a.f32")->NumElements(), 6);
  EXPECT_EQ((*file)->Find("e.scalar")->NumElements(), 1);
  EXPECT_EQ((*file)->Find("g.empty")->NumElements(), 0);
  EXPECT_EQ((*file)->Find("missing"), nullptr);
  // Tensor data starts 8-byte aligned, so F32 weights can be used in place.
  EXPECT_EQ((8 + (*file)->header().size()) % 8, 0u);
}

TEST_F(SafetensorsFileTest, SkipsMetadataAndKeepsHeaderVerbatim) {
  const std::string header =
      R"({"__metadata__":{"format":"pt"},"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";
  const float values[2] = {0.5f, -4.0f};
  auto file = OpenRaw(RawFile(header, std::string(reinterpret_cast<const char*>(values), 8)));
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ((*file)->header(), header);
  ASSERT_EQ((*file)->tensors().size(), 1u);
  const TensorView* w = (*file)->Find("w");
  ASSERT_NE(w, nullptr);
  float out[2];
  ASSERT_TRUE(ConvertToFloat32(*w, out).ok());
  EXPECT_EQ(out[0], 0.5f);
  EXPECT_EQ(out[1], -4.0f);
}

TEST_F(SafetensorsFileTest, WriteRejectsBytesThatDoNotMatchTheShape) {
  absl::Status status = WriteSafetensors(dir_.path() + "/bad.safetensors",
                                         {{"w", DType::kF32, {2, 2}, std::vector<uint8_t>(12)}});
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << status;
  EXPECT_NE(status.message().find("w"), std::string::npos) << status;
  EXPECT_NE(status.message().find("16"), std::string::npos) << status;
}

TEST_F(SafetensorsFileTest, MissingFileIsNotFound) {
  const std::string path = dir_.path() + "/absent.safetensors";
  auto file = SafetensorsFile::Open(path);
  ASSERT_FALSE(file.ok());
  EXPECT_EQ(file.status().code(), absl::StatusCode::kNotFound) << file.status();
  EXPECT_NE(file.status().message().find(path), std::string::npos) << file.status();
}

TEST_F(SafetensorsFileTest, RejectsFileShorterThanLengthField) {
  ExpectMalformed("", "shorter than the 8-byte header length");
  ExpectMalformed(std::string("\x02\x00\x00\x00\x00", 5), "shorter than the 8-byte header length");
}

TEST_F(SafetensorsFileTest, RejectsHeaderLengthBeyondFile) {
  ExpectMalformed(RawFile(1000, "{}", ""), "header length 1000 exceeds the file");
  ExpectMalformed(RawFile(3, "{}", ""), "header length 3 exceeds the file");
  ExpectMalformed(RawFile(~0ull, "{}", ""), "exceeds the file");
}

TEST_F(SafetensorsFileTest, RejectsHeaderThatIsNotJson) {
  ExpectMalformed(RawFile("{\"w\": ", ""), "header is not valid JSON");
  ExpectMalformed(RawFile("not json at all", ""), "header is not valid JSON");
}

TEST_F(SafetensorsFileTest, RejectsHeaderThatIsNotAnObject) {
  ExpectMalformed(RawFile("[1, 2, 3]", ""), "header is not a JSON object");
  ExpectMalformed(RawFile("\"w\"", ""), "header is not a JSON object");
}

TEST_F(SafetensorsFileTest, RejectsEntryThatIsNotAnObject) {
  ExpectMalformed(RawFile(R"({"w": [1, 2]})", ""), "tensor \"w\": entry is not an object");
}

TEST_F(SafetensorsFileTest, RejectsEntryMissingAField) {
  const std::string data(8, '\0');
  ExpectMalformed(RawFile(R"({"w":{"shape":[2],"data_offsets":[0,8]}})", data),
                  "tensor \"w\": missing string \"dtype\"");
  ExpectMalformed(RawFile(R"({"w":{"dtype":"F32","data_offsets":[0,8]}})", data),
                  "tensor \"w\": missing array \"shape\"");
  ExpectMalformed(RawFile(R"({"w":{"dtype":"F32","shape":[2]}})", data),
                  "tensor \"w\": \"data_offsets\" must be an array [begin, end]");
  ExpectMalformed(RawFile(R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[8]}})", data),
                  "\"data_offsets\" must be an array [begin, end]");
}

TEST_F(SafetensorsFileTest, RejectsUnknownDtype) {
  ExpectMalformed(
      RawFile(R"({"w":{"dtype":"F17","shape":[2],"data_offsets":[0,8]}})", std::string(8, '\0')),
      "tensor \"w\": unknown safetensors dtype \"F17\"");
}

TEST_F(SafetensorsFileTest, RejectsNegativeOrNonIntegerShapeEntries) {
  const std::string data(8, '\0');
  ExpectMalformed(RawFile(R"({"w":{"dtype":"F32","shape":[-1,-2],"data_offsets":[0,8]}})", data),
                  "tensor \"w\": shape entries must be non-negative integers");
  ExpectMalformed(RawFile(R"({"w":{"dtype":"F32","shape":[2.5],"data_offsets":[0,8]}})", data),
                  "tensor \"w\": shape entries must be non-negative integers");
  ExpectMalformed(RawFile(R"({"w":{"dtype":"F32","shape":["2"],"data_offsets":[0,8]}})", data),
                  "tensor \"w\": shape entries must be non-negative integers");
}

TEST_F(SafetensorsFileTest, RejectsOffsetsOutOfOrderOrBeyondData) {
  const std::string data(8, '\0');
  ExpectMalformed(RawFile(R"({"w":{"dtype":"U8","shape":[4],"data_offsets":[8,4]}})", data),
                  "tensor \"w\": data_offsets [8, 4] out of range (data is 8 bytes)");
  ExpectMalformed(RawFile(R"({"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})", data),
                  "tensor \"w\": data_offsets [0, 16] out of range (data is 8 bytes)");
  ExpectMalformed(RawFile(R"({"w":{"dtype":"U8","shape":[1],"data_offsets":[-1,0]}})", data),
                  "tensor \"w\": data_offsets must be non-negative integers");
}

TEST_F(SafetensorsFileTest, RejectsByteSpanThatDoesNotMatchDtypeAndShape) {
  const std::string data(16, '\0');
  ExpectMalformed(RawFile(R"({"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", data),
                  "tensor \"w\": shape [3] of F32 needs 12 bytes but data_offsets span 8");
  ExpectMalformed(RawFile(R"({"w":{"dtype":"BF16","shape":[2,2],"data_offsets":[0,16]}})", data),
                  "tensor \"w\": shape [2, 2] of BF16 needs 8 bytes but data_offsets span 16");
}

TEST_F(SafetensorsFileTest, ReportsTheBadTensorAfterGoodOnes) {
  const std::string header = R"({"ok":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
                             R"("zz":{"dtype":"F32","shape":[2],"data_offsets":[4,8]}})";
  ExpectMalformed(RawFile(header, std::string(8, '\0')), "tensor \"zz\": shape [2] of F32");
}

TEST(DTypeTest, ParsesNamesAndSizes) {
  struct Case {
    const char* name;
    DType dtype;
    size_t size;
  };
  for (const Case& c :
       {Case{"F64", DType::kF64, 8}, Case{"F32", DType::kF32, 4}, Case{"F16", DType::kF16, 2},
        Case{"BF16", DType::kBF16, 2}, Case{"I64", DType::kI64, 8}, Case{"I32", DType::kI32, 4},
        Case{"I8", DType::kI8, 1}, Case{"BOOL", DType::kBool, 1},
        Case{"F8_E4M3", DType::kF8E4M3, 1}}) {
    auto dtype = ParseDType(c.name);
    ASSERT_TRUE(dtype.ok()) << c.name;
    EXPECT_EQ(*dtype, c.dtype) << c.name;
    EXPECT_EQ(DTypeSize(c.dtype), c.size) << c.name;
    EXPECT_STREQ(DTypeName(c.dtype), c.name);
  }
  auto bad = ParseDType("f32");
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
}

// The value a finite half encodes, from the IEEE 754 binary16 definition.
double HalfValue(uint16_t h) {
  const int sign = h >> 15, exp = (h >> 10) & 0x1f, mant = h & 0x3ff;
  const double mag = exp == 0 ? std::ldexp(mant, -24) : std::ldexp(1024 + mant, exp - 25);
  return sign ? -mag : mag;
}

TEST(HalfTest, DecodesEveryFiniteHalfExactly) {
  for (uint32_t h = 0; h <= 0xffff; ++h) {
    if ((h & 0x7c00) == 0x7c00) continue;  // inf and nan below
    const float f = HalfToFloat(static_cast<uint16_t>(h));
    ASSERT_EQ(static_cast<double>(f), HalfValue(static_cast<uint16_t>(h))) << std::hex << h;
    ASSERT_EQ(std::signbit(f), (h & 0x8000) != 0) << std::hex << h;
  }
  EXPECT_EQ(HalfToFloat(0x3c00), 1.0f);
  EXPECT_EQ(HalfToFloat(0xc000), -2.0f);
  EXPECT_EQ(HalfToFloat(0x7bff), 65504.0f);
  EXPECT_EQ(HalfToFloat(0x0400), std::ldexp(1.0f, -14));
  EXPECT_EQ(HalfToFloat(0x0001), std::ldexp(1.0f, -24));     // smallest subnormal
  EXPECT_EQ(HalfToFloat(0x03ff), std::ldexp(1023.0f, -24));  // largest subnormal
  EXPECT_EQ(HalfToFloat(0x8001), -std::ldexp(1.0f, -24));
  EXPECT_EQ(HalfToFloat(0x3555), 0.333251953125f);
}

TEST(HalfTest, DecodesInfinityAndNan) {
  EXPECT_EQ(HalfToFloat(0x7c00), std::numeric_limits<float>::infinity());
  EXPECT_EQ(HalfToFloat(0xfc00), -std::numeric_limits<float>::infinity());
  EXPECT_TRUE(std::isnan(HalfToFloat(0x7e00)));
  EXPECT_TRUE(std::isnan(HalfToFloat(0x7c01)));
  EXPECT_TRUE(std::isnan(HalfToFloat(0xfe00)));
}

TEST(HalfTest, EncodesEveryHalfValueBackToItself) {
  for (uint32_t h = 0; h <= 0xffff; ++h) {
    const float f = HalfToFloat(static_cast<uint16_t>(h));
    if (std::isnan(f)) {
      const uint16_t back = FloatToHalf(f);
      ASSERT_EQ(back & 0x7c00, 0x7c00) << std::hex << h;
      ASSERT_NE(back & 0x3ff, 0) << std::hex << h;
      continue;
    }
    ASSERT_EQ(FloatToHalf(f), h) << std::hex << h;
  }
}

// Between every pair of adjacent finite halves: the exact midpoint goes to the even one, and
// the floats just either side of it go to the nearer one.
TEST(HalfTest, RoundsToNearestEven) {
  for (uint16_t h = 0; h < 0x7bff; ++h) {
    const uint16_t up = h + 1;
    const float mid = static_cast<float>((HalfValue(h) + HalfValue(up)) / 2);
    ASSERT_EQ(static_cast<double>(mid), (HalfValue(h) + HalfValue(up)) / 2);  // exact in f32
    const uint16_t even = (h & 1) ? up : h;
    ASSERT_EQ(FloatToHalf(mid), even) << std::hex << h;
    ASSERT_EQ(FloatToHalf(-mid), even | 0x8000) << std::hex << h;
    ASSERT_EQ(FloatToHalf(std::nextafter(mid, 0.0f)), h) << std::hex << h;
    ASSERT_EQ(FloatToHalf(std::nextafter(mid, 1e9f)), up) << std::hex << h;
  }
  // Spot checks of the same rule.
  EXPECT_EQ(FloatToHalf(1.0f + std::ldexp(1.0f, -11)), 0x3c00);      // tie, down to even
  EXPECT_EQ(FloatToHalf(1.0f + 3 * std::ldexp(1.0f, -11)), 0x3c02);  // tie, up to even
  EXPECT_EQ(FloatToHalf(2.0f - std::ldexp(1.0f, -11)), 0x4000);      // carry into exponent
  EXPECT_EQ(FloatToHalf(std::ldexp(1.0f, -25)), 0x0000);             // subnormal tie
  EXPECT_EQ(FloatToHalf(std::ldexp(3.0f, -25)), 0x0002);
  EXPECT_EQ(FloatToHalf(std::ldexp(1.0f, -14) - std::ldexp(1.0f, -25)), 0x0400);
  EXPECT_EQ(FloatToHalf(1e-10f), 0x0000);
  EXPECT_EQ(FloatToHalf(-1e-10f), 0x8000);
  EXPECT_EQ(FloatToHalf(0.1f), 0x2e66);
}

TEST(HalfTest, EncodesOverflowInfinityAndNan) {
  const float inf = std::numeric_limits<float>::infinity();
  EXPECT_EQ(FloatToHalf(65504.0f), 0x7bff);
  EXPECT_EQ(FloatToHalf(65519.996f), 0x7bff);  // below the midpoint to 65536
  EXPECT_EQ(FloatToHalf(65520.0f), 0x7c00);    // the midpoint; 0x7bff is odd
  EXPECT_EQ(FloatToHalf(1e10f), 0x7c00);
  EXPECT_EQ(FloatToHalf(-1e10f), 0xfc00);
  EXPECT_EQ(FloatToHalf(inf), 0x7c00);
  EXPECT_EQ(FloatToHalf(-inf), 0xfc00);
  EXPECT_EQ(FloatToHalf(0.0f), 0x0000);
  EXPECT_EQ(FloatToHalf(-0.0f), 0x8000);
  for (float nan :
       {std::numeric_limits<float>::quiet_NaN(), FromBits(0x7f800001u), FromBits(0xffc00000u)}) {
    const uint16_t h = FloatToHalf(nan);
    EXPECT_EQ(h & 0x7c00, 0x7c00) << std::hex << h;
    EXPECT_NE(h & 0x3ff, 0) << std::hex << h;
  }
}

TEST(BFloat16Test, DecodesAsTheTopHalfOfAFloat) {
  for (uint32_t b = 0; b <= 0xffff; ++b) {
    const float f = BFloat16ToFloat(static_cast<uint16_t>(b));
    ASSERT_EQ(Bits(f), b << 16) << std::hex << b;
  }
  EXPECT_EQ(BFloat16ToFloat(0x3f80), 1.0f);
  EXPECT_EQ(BFloat16ToFloat(0x4049), 3.140625f);
  EXPECT_EQ(BFloat16ToFloat(0xc000), -2.0f);
  EXPECT_EQ(BFloat16ToFloat(0x0001), std::ldexp(1.0f, -133));  // subnormal
  EXPECT_EQ(BFloat16ToFloat(0x7f80), std::numeric_limits<float>::infinity());
  EXPECT_TRUE(std::isnan(BFloat16ToFloat(0x7fc0)));
}

TEST(BFloat16Test, EncodesEveryBFloat16ValueBackToItself) {
  for (uint32_t b = 0; b <= 0xffff; ++b) {
    const float f = BFloat16ToFloat(static_cast<uint16_t>(b));
    if (std::isnan(f)) {
      ASSERT_TRUE(std::isnan(BFloat16ToFloat(FloatToBFloat16(f)))) << std::hex << b;
      continue;
    }
    ASSERT_EQ(FloatToBFloat16(f), b) << std::hex << b;
  }
}

TEST(BFloat16Test, RoundsToNearestEven) {
  for (uint32_t b = 0; b < 0x7f7f; ++b) {
    const uint32_t mid_bits = (b << 16) | 0x8000;  // exactly halfway to b + 1
    const uint16_t even = (b & 1) ? b + 1 : b;
    ASSERT_EQ(FloatToBFloat16(FromBits(mid_bits)), even) << std::hex << b;
    ASSERT_EQ(FloatToBFloat16(FromBits(mid_bits | 0x80000000u)), even | 0x8000) << std::hex << b;
    ASSERT_EQ(FloatToBFloat16(FromBits(mid_bits - 1)), b) << std::hex << b;
    ASSERT_EQ(FloatToBFloat16(FromBits(mid_bits + 1)), b + 1) << std::hex << b;
  }
  EXPECT_EQ(FloatToBFloat16(1.0f + std::ldexp(1.0f, -8)), 0x3f80);      // tie, down to even
  EXPECT_EQ(FloatToBFloat16(1.0f + 3 * std::ldexp(1.0f, -8)), 0x3f82);  // tie, up to even
  EXPECT_EQ(FloatToBFloat16(2.0f - std::ldexp(1.0f, -9)), 0x4000);      // carry into exponent
  EXPECT_EQ(FloatToBFloat16(3.14159265f), 0x4049);
  EXPECT_EQ(FloatToBFloat16(0.1f), 0x3dcd);
}

TEST(BFloat16Test, EncodesOverflowInfinityAndNan) {
  const float inf = std::numeric_limits<float>::infinity();
  EXPECT_EQ(FloatToBFloat16(inf), 0x7f80);
  EXPECT_EQ(FloatToBFloat16(-inf), 0xff80);
  EXPECT_EQ(FloatToBFloat16(std::numeric_limits<float>::max()), 0x7f80);  // rounds up to inf
  EXPECT_EQ(FloatToBFloat16(FromBits(0x7f7f7fffu)), 0x7f7f);
  EXPECT_EQ(FloatToBFloat16(-0.0f), 0x8000);
  // A nan whose payload lies only in the low 16 bits must not truncate to infinity.
  for (float nan : {std::numeric_limits<float>::quiet_NaN(), FromBits(0x7f800001u),
                    FromBits(0xff800001u), FromBits(0x7fffffffu)}) {
    const uint16_t b = FloatToBFloat16(nan);
    EXPECT_TRUE(std::isnan(BFloat16ToFloat(b))) << std::hex << b;
    EXPECT_EQ(b & 0x8000u, (Bits(nan) >> 16) & 0x8000u) << std::hex << b;
  }
}

TEST(ConvertToFloat32Test, ConvertsEveryFloatingDtype) {
  const std::vector<float> want = {1.0f, -2.5f, 0.0f, 65504.0f, std::ldexp(1.0f, -24)};
  const int n = static_cast<int>(want.size());
  std::vector<uint16_t> f16 = {0x3c00, 0xc100, 0x0000, 0x7bff, 0x0001};
  std::vector<uint16_t> bf16(n);
  std::vector<double> f64(n);
  for (int i = 0; i < n; ++i) {
    bf16[i] = FloatToBFloat16(want[i]);
    f64[i] = want[i];
  }
  auto view = [&](DType dtype, const void* data) {
    TensorView t;
    t.name = "t";
    t.dtype = dtype;
    t.shape = {n};
    t.data = static_cast<const uint8_t*>(data);
    t.nbytes = n * DTypeSize(dtype);
    return t;
  };
  for (const TensorView& t : {view(DType::kF32, want.data()), view(DType::kF16, f16.data()),
                              view(DType::kF64, f64.data())}) {
    std::vector<float> out(n, 123.0f);
    ASSERT_TRUE(ConvertToFloat32(t, out.data()).ok()) << DTypeName(t.dtype);
    EXPECT_EQ(out, want) << DTypeName(t.dtype);
  }
  std::vector<float> out(n);
  ASSERT_TRUE(ConvertToFloat32(view(DType::kBF16, bf16.data()), out.data()).ok());
  for (int i = 0; i < n; ++i) EXPECT_EQ(out[i], BFloat16ToFloat(bf16[i])) << i;
  EXPECT_EQ(out[1], -2.5f);  // exactly representable in bf16
}

TEST(ConvertToFloat32Test, ConvertsTensorsReadFromAFile) {
  TempDir dir;
  const std::vector<float> values = {0.5f, -1.25f, 3.0f, 1024.0f};
  const std::string path = dir.path() + "/w.safetensors";
  ASSERT_TRUE(WriteSafetensors(
                  path, {{"h", DType::kF16, {2, 2}, testing::EncodeValues(values, DType::kF16)},
                         {"b", DType::kBF16, {4}, testing::EncodeValues(values, DType::kBF16)}})
                  .ok());
  auto file = SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  for (const char* name : {"h", "b"}) {
    std::vector<float> out(4);
    ASSERT_TRUE(ConvertToFloat32(*(*file)->Find(name), out.data()).ok()) << name;
    EXPECT_EQ(out, values) << name;
  }
}

TEST(ConvertToFloat32Test, RejectsIntegerTensorsNamingThem) {
  const int32_t ints[2] = {1, 2};
  TensorView t;
  t.name = "model.norm.weight";
  t.dtype = DType::kI32;
  t.shape = {2};
  t.data = reinterpret_cast<const uint8_t*>(ints);
  t.nbytes = 8;
  float out[2];
  absl::Status status = ConvertToFloat32(t, out);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << status;
  EXPECT_NE(status.message().find("model.norm.weight"), std::string::npos) << status;
  EXPECT_NE(status.message().find("I32"), std::string::npos) << status;
}

}  // namespace
}  // namespace kvmem
