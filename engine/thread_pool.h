// A fixed set of worker threads for data-parallel loops of the CPU backend.
#ifndef KVMEM_ENGINE_THREAD_POOL_H_
#define KVMEM_ENGINE_THREAD_POOL_H_

#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace kvmem {

class ThreadPool {
 public:
  // `threads` <= 0 means one per hardware thread. The calling thread counts as one worker.
  explicit ThreadPool(int threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return static_cast<int>(workers_.size()) + 1; }

  // Runs fn(begin, end) over disjoint chunks covering [0, n) and returns when all are done.
  // Calls from several threads at once are serialised.
  void ParallelFor(int64_t n, const std::function<void(int64_t, int64_t)>& fn);

 private:
  void WorkerLoop(int index);

  std::vector<std::thread> workers_;
  std::mutex call_mu_;  // one ParallelFor at a time
  std::mutex mu_;
  std::condition_variable wake_;
  std::condition_variable done_;
  const std::function<void(int64_t, int64_t)>* job_ = nullptr;
  int64_t job_n_ = 0;
  uint64_t generation_ = 0;
  int pending_ = 0;
  bool stop_ = false;
};

// A pool of one thread per hardware thread shared by the whole process, made on first use
// (session-level work outside a backend, such as scoring recall candidates). A child made by
// fork() has none of its parent's threads: there the first call makes the child its own pool.
ThreadPool& SharedThreadPool();

}  // namespace kvmem

#endif  // KVMEM_ENGINE_THREAD_POOL_H_
