// The threads that run engine work for RPCs. gRPC callback threads only hand calls to this
// pool; prefill, decoding and commits never run inside a reactor callback.
#ifndef KVMEM_SERVICE_WORKER_POOL_H_
#define KVMEM_SERVICE_WORKER_POOL_H_

#include <condition_variable>
#include <deque>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#include "absl/status/status.h"

namespace kvmem {

class WorkerPool {
 public:
  // `threads` <= 0 means one per hardware thread.
  explicit WorkerPool(int threads);
  // Stops the pool (see Stop).
  ~WorkerPool();
  WorkerPool(const WorkerPool&) = delete;
  WorkerPool& operator=(const WorkerPool&) = delete;

  // Queues `task`; tasks start in submission order. UNAVAILABLE once Stop has begun, and the
  // task is then not run.
  absl::Status Submit(std::function<void()> task);

  // Runs every task already queued, then joins the threads. Idempotent.
  void Stop();

  int size() const { return static_cast<int>(threads_.size()); }

 private:
  void Loop();

  std::mutex mu_;
  std::condition_variable wake_;
  std::deque<std::function<void()>> tasks_;
  bool stopping_ = false;
  std::vector<std::thread> threads_;
};

}  // namespace kvmem

#endif  // KVMEM_SERVICE_WORKER_POOL_H_
