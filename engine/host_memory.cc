#include "engine/host_memory.h"

#include <malloc.h>

namespace kvmem {

void RetainFreedHeapMemory() {
  // Fixed values also turn off glibc's own threshold adaptation, which would start low again.
  mallopt(M_MMAP_THRESHOLD, 32 << 20);  // glibc's maximum on 64-bit
  mallopt(M_TRIM_THRESHOLD, 1 << 30);
}

}  // namespace kvmem
