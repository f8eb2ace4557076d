// ThreadPool: ParallelFor covers its range exactly once, and the process-wide pool also works
// in a forked child (which has none of its parent's threads). ShareOneMallocArena keeps new
// threads in one arena.
#include "engine/thread_pool.h"

#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

#include "engine/malloc_arenas.h"
#include "gtest/gtest.h"

namespace kvmem {
namespace {

TEST(ThreadPoolTest, ParallelForVisitsEveryIndexOnce) {
  ThreadPool pool(4);
  for (int64_t n : {int64_t{0}, int64_t{1}, int64_t{3}, int64_t{1000}}) {
    std::vector<std::atomic<int>> seen(n);
    pool.ParallelFor(n, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) seen[i]++;
    });
    for (int64_t i = 0; i < n; ++i) EXPECT_EQ(seen[i].load(), 1) << "n=" << n << " i=" << i;
  }
}

TEST(ThreadPoolTest, SharedPoolWorksInAForkedChild) {
  // The parent's pool exists (and has threads) before the fork.
  std::atomic<int64_t> sum{0};
  SharedThreadPool().ParallelFor(100, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) sum += i;
  });
  ASSERT_EQ(sum.load(), 4950);
  const pid_t child = fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    alarm(20);  // a deadlocked child dies of SIGALRM instead of hanging the test
    std::atomic<int64_t> child_sum{0};
    SharedThreadPool().ParallelFor(1000, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) child_sum += i;
    });
    _exit(child_sum.load() == 499500 ? 0 : 1);
  }
  int status = 0;
  ASSERT_EQ(waitpid(child, &status, 0), child);
  ASSERT_TRUE(WIFEXITED(status)) << "the child did not exit (signal "
                                 << (WIFSIGNALED(status) ? WTERMSIG(status) : 0) << ")";
  EXPECT_EQ(WEXITSTATUS(status), 0);
}

// In a child process: the arenas made while four threads allocate, after ShareOneMallocArena
// or without it; -1 when that cannot be told.
int ArenasMadeByFourThreads(bool share) {
  const pid_t pid = fork();
  if (pid < 0) return -1;
  if (pid == 0) {
    if (share) ShareOneMallocArena();
    const int before = CountMallocArenas();
    if (before < 1) _exit(255);
    std::vector<std::thread> threads;
    for (int t = 0; t < 4; ++t) {
      threads.emplace_back([] {
        std::vector<void*> blocks;
        for (int i = 0; i < 64; ++i) {
          blocks.push_back(std::malloc(32 << 10));
          std::memset(blocks.back(), i, 32 << 10);
        }
        for (void* b : blocks) std::free(b);
      });
    }
    for (auto& t : threads) t.join();
    const int after = CountMallocArenas();
    _exit(after < before ? 255 : std::min(after - before, 100));
  }
  int status = 0;
  if (waitpid(pid, &status, 0) != pid || !WIFEXITED(status)) return -1;
  return WEXITSTATUS(status) == 255 ? -1 : WEXITSTATUS(status);
}

TEST(MallocArenasTest, SharedArenaKeepsNewThreadsInIt) {
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
  GTEST_SKIP() << "the sanitizers replace malloc";
#endif
  const int arenas = CountMallocArenas();
  if (arenas < 1) GTEST_SKIP() << "malloc_info is glibc's; this libc has none";
  // Threads that have exited leave their arenas free for new threads (a forked child too), so
  // only a process that has never run another thread can tell; ctest runs each test alone.
  if (arenas > 1 || std::getenv("MALLOC_ARENA_MAX") != nullptr) {
    GTEST_SKIP() << "earlier tests in this process made arenas; run this test on its own";
  }
  // glibc gives threads arenas of their own by default...
  EXPECT_GT(ArenasMadeByFourThreads(false), 0);
  // ...and none once the process shares one.
  EXPECT_EQ(ArenasMadeByFourThreads(true), 0);
}

}  // namespace
}  // namespace kvmem
