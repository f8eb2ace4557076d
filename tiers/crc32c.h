// CRC-32C (Castagnoli), the checksum every stored block and record carries.
#ifndef KVMEM_TIERS_CRC32C_H_
#define KVMEM_TIERS_CRC32C_H_

#include <cstddef>
#include <cstdint>

namespace kvmem {

// CRC-32C of `n` bytes, continuing from `crc` (0 to start).
uint32_t Crc32c(const void* data, size_t n, uint32_t crc = 0);
// The table-driven implementation Crc32c falls back to without SSE4.2 (exposed for tests).
uint32_t Crc32cPortable(const void* data, size_t n, uint32_t crc = 0);

}  // namespace kvmem

#endif  // KVMEM_TIERS_CRC32C_H_
