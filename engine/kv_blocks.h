// A KV block: full-fidelity K and V of `block_size` consecutive positions of one layer, all KV
// heads. Every position a session has seen lives in blocks; hot sets are subsets of them.
#ifndef KVMEM_ENGINE_KV_BLOCKS_H_
#define KVMEM_ENGINE_KV_BLOCKS_H_

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

#include "engine/block_memory.h"

namespace kvmem {

// How a block holds its values: f32, or the bit patterns of bf16 or f16. A session's blocks take
// its backend's KV type (Backend::BlockDType), so a bf16 device's rows take half the host
// memory of f32 and move between the tiers without conversion.
enum class BlockDType : uint8_t { kF32 = 0, kBF16 = 1, kF16 = 2 };

struct KvBlock {
  int64_t index = 0;  // holds positions [index * B, (index + 1) * B)
  int filled = 0;     // positions written; < B only for a session's last block
  BlockDType dtype = BlockDType::kF32;
  // (B, num_kv_heads, head_dim), keys with RoPE applied: `keys`/`values` for f32 blocks,
  // `keys16`/`values16` (empty otherwise) for 16-bit ones. Read and write through the functions
  // below unless the type is known.
  // Their memory comes from engine/block_memory.h: pinned, device-readable memory once a GPU
  // backend installs its pool.
  BlockVector<float> keys;
  BlockVector<float> values;
  BlockVector<uint16_t> keys16;
  BlockVector<uint16_t> values16;

  // Values in K (the same in V): B * num_kv_heads * head_dim.
  size_t size() const { return dtype == BlockDType::kF32 ? keys.size() : keys16.size(); }
  // Host bytes of K and V.
  int64_t bytes() const {
    return static_cast<int64_t>(size()) * 2 * (dtype == BlockDType::kF32 ? 4 : 2);
  }
  // out[i] = K (V) value off + i as f32, for i in [0, n).
  void ReadKeys(size_t off, size_t n, float* out) const;
  void ReadValues(size_t off, size_t n, float* out) const;
  // Stores in[i] at K (V) value off + i. 16-bit blocks hold values of their type: bf16 rounds
  // to nearest even (exact for a bf16 device's rows); f16 requires exact values (checked).
  void WriteKeys(size_t off, const float* in, size_t n);
  void WriteValues(size_t off, const float* in, size_t n);
  // Zeroes values [off, size()) of K and V.
  void ZeroFrom(size_t off);
  // out[i] = K (V) value off + i as bf16 bits: copied from a bf16 block, else rounded to
  // nearest even (Bf16Rne).
  void ReadKeysBf16(size_t off, size_t n, uint16_t* out) const;
  void ReadValuesBf16(size_t off, size_t n, uint16_t* out) const;
  // K and V values [off, off + n) at once: as f32 (ReadKeys) or as bf16 bits (ReadKeysBf16).
  void ReadKv(size_t off, size_t n, float* keys, float* values) const {
    ReadKeys(off, n, keys);
    ReadValues(off, n, values);
  }
  void ReadKv(size_t off, size_t n, uint16_t* keys, uint16_t* values) const {
    ReadKeysBf16(off, n, keys);
    ReadValuesBf16(off, n, values);
  }
  // K and V values [off, off + n) from src's [src_off, src_off + n): copied when both blocks
  // have one type, else converted as ReadKeys and WriteKeys do.
  void CopyFrom(size_t off, const KvBlock& src, size_t src_off, size_t n);

  // As growable rows (KvCache's fresh rows): n values in K and in V (cut, or grown with
  // zeros); dropping the first n; where values from `off` on are, in the block's own type (f32,
  // or the bits of its 16-bit type).
  void Resize(size_t n);
  void EraseFront(size_t n);
  void* KeysAt(size_t off);
  void* ValuesAt(size_t off);
  const void* KeysAt(size_t off) const;
  const void* ValuesAt(size_t off) const;
};

// Bytes of one stored K (or V) value: 4 for f32, 2 for the 16-bit types.
size_t BlockValueBytes(BlockDType dtype);

// True when b's keys and values both lie in the pinned pool (engine/block_memory.h), where a
// device can read them by address.
bool BlockIsPinned(const KvBlock& b);

// `b` with its values as f32 (exact for every type).
KvBlock WidenedBlock(const KvBlock& b);

// A zeroed block with nothing filled.
KvBlock MakeEmptyBlock(int64_t index, int block_size, int num_kv_heads, int head_dim,
                       BlockDType dtype = BlockDType::kF32);

// The exact f16 bits of v; false when v is not an f16. (f32 values of 16-bit bits:
// BFloat16ToFloat and HalfToFloat in engine/safetensors.h.)
bool ExactF16Bits(float v, uint16_t* bits);
// bf16 bits of v, rounded to nearest even, every NaN as 0x7fff: bit for bit what CUDA's
// __float2bfloat16_rn gives on the host, written so the compiler can vectorize a loop of it.
inline uint16_t Bf16Rne(float v) {
  uint32_t b;
  std::memcpy(&b, &v, sizeof(b));
  const uint32_t rounded = (b + 0x7fffu + ((b >> 16) & 1u)) >> 16;
  return (b & 0x7fffffffu) > 0x7f800000u ? uint16_t{0x7fff} : static_cast<uint16_t>(rounded);
}

}  // namespace kvmem

#endif  // KVMEM_ENGINE_KV_BLOCKS_H_
