#include "engine/kv_blocks.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "engine/safetensors.h"
#include "engine/status_macros.h"

namespace kvmem {
namespace {

uint32_t BitsOf(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  return bits;
}

void Read(const KvBlock& b, const BlockVector<float>& f32, const BlockVector<uint16_t>& h,
          size_t off, size_t n, float* out) {
  switch (b.dtype) {
    case BlockDType::kF32:
      std::memcpy(out, f32.data() + off, n * sizeof(float));
      return;
    case BlockDType::kBF16: {
      // A shift per value, in a loop the compiler vectorizes.
      const uint16_t* in = h.data() + off;
#pragma omp simd
      for (size_t i = 0; i < n; ++i) {
        const uint32_t bits = static_cast<uint32_t>(in[i]) << 16;
        std::memcpy(&out[i], &bits, sizeof(bits));
      }
      return;
    }
    case BlockDType::kF16:
      for (size_t i = 0; i < n; ++i) out[i] = HalfToFloat(h[off + i]);
      return;
  }
}

void Write(BlockDType dtype, BlockVector<float>& f32, BlockVector<uint16_t>& h, size_t off,
           const float* in, size_t n) {
  switch (dtype) {
    case BlockDType::kF32:
      std::memcpy(f32.data() + off, in, n * sizeof(float));
      return;
    case BlockDType::kBF16: {
      uint16_t* bits = h.data() + off;
#pragma omp simd
      for (size_t i = 0; i < n; ++i) bits[i] = Bf16Rne(in[i]);
      return;
    }
    case BlockDType::kF16:
      for (size_t i = 0; i < n; ++i) {
        if (ExactF16Bits(in[i], &h[off + i])) continue;
        KVMEM_CHECK(std::isnan(in[i]));  // a device's f16 rows hold f16 values or NaN
        h[off + i] = 0x7e00;
      }
      return;
  }
}

}  // namespace

void KvBlock::ReadKeys(size_t off, size_t n, float* out) const {
  Read(*this, keys, keys16, off, n, out);
}
void KvBlock::ReadValues(size_t off, size_t n, float* out) const {
  Read(*this, values, values16, off, n, out);
}
void KvBlock::WriteKeys(size_t off, const float* in, size_t n) {
  Write(dtype, keys, keys16, off, in, n);
}
void KvBlock::WriteValues(size_t off, const float* in, size_t n) {
  Write(dtype, values, values16, off, in, n);
}
void KvBlock::ZeroFrom(size_t off) {
  if (dtype == BlockDType::kF32) {
    std::fill(keys.begin() + off, keys.end(), 0.f);
    std::fill(values.begin() + off, values.end(), 0.f);
  } else {
    std::fill(keys16.begin() + off, keys16.end(), 0);
    std::fill(values16.begin() + off, values16.end(), 0);
  }
}

namespace {

void ReadBf16(const KvBlock& b, const BlockVector<float>& f32, const BlockVector<uint16_t>& h,
              size_t off, size_t n, uint16_t* out) {
  if (b.dtype == BlockDType::kBF16) {
    std::memcpy(out, h.data() + off, n * sizeof(uint16_t));
    return;
  }
  float wide[256];
  for (size_t done = 0; done < n; done += 256) {
    const size_t m = std::min<size_t>(256, n - done);
    Read(b, f32, h, off + done, m, wide);
    for (size_t i = 0; i < m; ++i) out[done + i] = Bf16Rne(wide[i]);
  }
}

}  // namespace

void KvBlock::ReadKeysBf16(size_t off, size_t n, uint16_t* out) const {
  ReadBf16(*this, keys, keys16, off, n, out);
}
void KvBlock::ReadValuesBf16(size_t off, size_t n, uint16_t* out) const {
  ReadBf16(*this, values, values16, off, n, out);
}

void KvBlock::CopyFrom(size_t off, const KvBlock& src, size_t src_off, size_t n) {
  if (src.dtype == dtype) {
    if (dtype == BlockDType::kF32) {
      std::memcpy(keys.data() + off, src.keys.data() + src_off, n * sizeof(float));
      std::memcpy(values.data() + off, src.values.data() + src_off, n * sizeof(float));
    } else {
      std::memcpy(keys16.data() + off, src.keys16.data() + src_off, n * sizeof(uint16_t));
      std::memcpy(values16.data() + off, src.values16.data() + src_off, n * sizeof(uint16_t));
    }
    return;
  }
  float wide[256];
  for (size_t done = 0; done < n; done += 256) {
    const size_t m = std::min<size_t>(256, n - done);
    src.ReadKeys(src_off + done, m, wide);
    WriteKeys(off + done, wide, m);
    src.ReadValues(src_off + done, m, wide);
    WriteValues(off + done, wide, m);
  }
}

void KvBlock::Resize(size_t n) {
  if (dtype == BlockDType::kF32) {
    keys.resize(n);
    values.resize(n);
  } else {
    keys16.resize(n);
    values16.resize(n);
  }
}

void KvBlock::EraseFront(size_t n) {
  if (dtype == BlockDType::kF32) {
    keys.erase(keys.begin(), keys.begin() + n);
    values.erase(values.begin(), values.begin() + n);
  } else {
    keys16.erase(keys16.begin(), keys16.begin() + n);
    values16.erase(values16.begin(), values16.begin() + n);
  }
}

void* KvBlock::KeysAt(size_t off) {
  return dtype == BlockDType::kF32 ? static_cast<void*>(keys.data() + off)
                                   : static_cast<void*>(keys16.data() + off);
}
void* KvBlock::ValuesAt(size_t off) {
  return dtype == BlockDType::kF32 ? static_cast<void*>(values.data() + off)
                                   : static_cast<void*>(values16.data() + off);
}

const void* KvBlock::KeysAt(size_t off) const {
  return dtype == BlockDType::kF32 ? static_cast<const void*>(keys.data() + off)
                                   : static_cast<const void*>(keys16.data() + off);
}
const void* KvBlock::ValuesAt(size_t off) const {
  return dtype == BlockDType::kF32 ? static_cast<const void*>(values.data() + off)
                                   : static_cast<const void*>(values16.data() + off);
}

size_t BlockValueBytes(BlockDType dtype) { return dtype == BlockDType::kF32 ? 4 : 2; }

bool BlockIsPinned(const KvBlock& b) {
  PinnedRange range;
  return b.size() > 0 && FindPinnedRange(b.KeysAt(0), &range) &&
         FindPinnedRange(b.ValuesAt(0), &range);
}

KvBlock WidenedBlock(const KvBlock& b) {
  if (b.dtype == BlockDType::kF32) return b;
  KvBlock w;
  w.index = b.index;
  w.filled = b.filled;
  w.keys.resize(b.size());
  w.values.resize(b.size());
  b.ReadKeys(0, b.size(), w.keys.data());
  b.ReadValues(0, b.size(), w.values.data());
  return w;
}

KvBlock MakeEmptyBlock(int64_t index, int block_size, int num_kv_heads, int head_dim,
                       BlockDType dtype) {
  KvBlock b;
  b.index = index;
  b.filled = 0;
  b.dtype = dtype;
  const size_t n = static_cast<size_t>(block_size) * num_kv_heads * head_dim;
  if (dtype == BlockDType::kF32) {
    b.keys.assign(n, 0.f);
    b.values.assign(n, 0.f);
  } else {
    b.keys16.assign(n, 0);
    b.values16.assign(n, 0);
  }
  return b;
}

// Zeros, infinities, normal and subnormal halves; never NaN or f32 subnormals.
bool ExactF16Bits(float v, uint16_t* out) {
  const uint32_t bits = BitsOf(v);
  const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  const int exp = static_cast<int>((bits >> 23) & 0xffu);
  const uint32_t mant = bits & 0x7fffffu;
  if (exp == 0) {
    if (mant != 0) return false;
    *out = sign;
    return true;
  }
  if (exp == 0xff) {
    if (mant != 0) return false;
    *out = sign | 0x7c00u;
    return true;
  }
  const int e = exp - 127;
  if (e >= -14 && e <= 15) {
    if ((mant & 0x1fffu) != 0) return false;
    *out = static_cast<uint16_t>(sign | ((e + 15) << 10) | (mant >> 13));
    return true;
  }
  if (e >= -24 && e < -14) {
    // A subnormal half m * 2^-24 with the significand (1.mant) * 2^e: m = sig >> -(e + 1).
    const uint32_t sig = mant | 0x800000u;
    const int shift = -(e + 1);
    if ((sig & ((1u << shift) - 1)) != 0) return false;
    *out = static_cast<uint16_t>(sign | (sig >> shift));
    return true;
  }
  return false;
}

}  // namespace kvmem
