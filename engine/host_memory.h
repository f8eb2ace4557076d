// How the process's heap treats the large buffers a turn allocates and frees.
#ifndef KVMEM_ENGINE_HOST_MEMORY_H_
#define KVMEM_ENGINE_HOST_MEMORY_H_

namespace kvmem {

// Every turn allocates and frees megabytes of KV rows, blocks and encoded records. By default
// glibc hands freed heap tops and large chunks back to the kernel, so the next turn faults in
// and zeroes every one of those pages again: at Llama-3-8B shape that made encoding a 288-token
// turn's blocks take 115 ms instead of 18 ms (bench/turn_host_bench, docs/tiers.md). This keeps
// freed memory in the process (up to 1 GiB of free heap top; chunks up to 32 MiB from the heap).
// Call once, first thing in main: it changes process-wide allocator settings.
void RetainFreedHeapMemory();

}  // namespace kvmem

#endif  // KVMEM_ENGINE_HOST_MEMORY_H_
