// ThreadPool: ParallelFor covers its range exactly once, and the process-wide pool also works
// in a forked child (which has none of its parent's threads).
#include "engine/thread_pool.h"

#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <vector>

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

}  // namespace
}  // namespace kvmem
