// How the process's allocator shares memory between threads.
#ifndef KVMEM_ENGINE_MALLOC_ARENAS_H_
#define KVMEM_ENGINE_MALLOC_ARENAS_H_

namespace kvmem {

// Makes every thread allocate from one malloc arena (glibc; elsewhere it does nothing), unless
// the operator set the arena count (MALLOC_ARENA_MAX, or glibc.malloc.arena_max in
// GLIBC_TUNABLES). Call it first thing in main(), before any thread starts.
//
// A session's KV blocks (32-64 KiB each, gigabytes in all) are made on the thread pool, on
// gRPC threads and on the caller's, and freed on others. With glibc's default arena per
// thread, memory freed into one arena is never handed to a thread of another, so resident
// memory outgrows the warm tier's budget, and a restore that reads blocks on the thread pool
// faults in fresh pages while the memory the old blocks left sits unused (on the 2-core
// development VM: 6.5-6.8 s against 1.0 s for the same restore, docs/tiers.md). Allocations
// up to about 1 KB still come from each thread's cache without a lock; larger ones (blocks,
// RocksDB's and gRPC's buffers) take the arena's lock, which has not been measured on more
// than 2 cores.
void ShareOneMallocArena();

// The number of malloc arenas the process has made so far (glibc), for tests; -1 elsewhere.
int CountMallocArenas();

}  // namespace kvmem

#endif  // KVMEM_ENGINE_MALLOC_ARENAS_H_
