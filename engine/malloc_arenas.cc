#include "engine/malloc_arenas.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>

#if defined(__GLIBC__)
#include <malloc.h>
#endif

namespace kvmem {

void ShareOneMallocArena() {
#if defined(__GLIBC__)
  // An operator's own setting wins.
  const char* tunables = std::getenv("GLIBC_TUNABLES");
  if (std::getenv("MALLOC_ARENA_MAX") != nullptr ||
      (tunables != nullptr && std::strstr(tunables, "glibc.malloc.arena_max") != nullptr)) {
    return;
  }
  mallopt(M_ARENA_MAX, 1);
#endif
}

int CountMallocArenas() {
#if defined(__GLIBC__)
  // malloc_info writes one <heap nr="..."> element per arena.
  char* text = nullptr;
  size_t size = 0;
  FILE* f = open_memstream(&text, &size);
  if (f == nullptr) return -1;
  const int rc = malloc_info(0, f);
  std::fclose(f);
  int arenas = 0;
  for (const char* p = text; rc == 0 && (p = std::strstr(p, "<heap nr=")) != nullptr; ++p) {
    ++arenas;
  }
  std::free(text);
  return rc == 0 ? arenas : -1;
#else
  return -1;
#endif
}

}  // namespace kvmem
