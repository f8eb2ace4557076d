#include "kernels/emu/emulator.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

#include <cuda_fp16.h>

namespace kvmem {
namespace cuda_emu {

namespace {
float BitsToFloat(uint32_t v) {
  float f;
  std::memcpy(&f, &v, sizeof f);
  return f;
}
}  // namespace

[[noreturn]] void Fatal(const char* what) {
  std::fprintf(stderr, "CUDA emulator: %s\n", what);
  std::abort();
}

// ---------------------------------------------------------------------------------------------
// Fibers: a stack each and a switch that saves only what the ABI asks a callee to keep.

#if defined(__x86_64__)
extern "C" void kvmem_emu_switch(void** save_sp, void* load_sp);
extern "C" void kvmem_emu_fiber_entry();
// Pushes the callee-saved registers on the current stack, saves the stack pointer, loads the
// other one and pops its registers: the other context resumes where it switched away (or, the
// first time, in kvmem_emu_fiber_entry with r12 = argument, r13 = function).
asm(R"(
  .text
  .globl kvmem_emu_switch
  .type kvmem_emu_switch, @function
kvmem_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size kvmem_emu_switch, .-kvmem_emu_switch

  .globl kvmem_emu_fiber_entry
  .type kvmem_emu_fiber_entry, @function
kvmem_emu_fiber_entry:
  movq %r12, %rdi
  callq *%r13
  ud2
  .size kvmem_emu_fiber_entry, .-kvmem_emu_fiber_entry
)");
#endif

namespace {

constexpr size_t kStackBytes = size_t{256} << 10;  // kernels keep arrays in "registers"
// Fresh shared memory reads as NaN in every float type (and -1 as an integer).
constexpr unsigned char kFreshSharedByte = 0xff;

// A fiber's stack with an inaccessible guard page below it, so an overflow faults.
class Stack {
 public:
  Stack() {
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    bytes_ = kStackBytes + page;
    void* p = mmap(nullptr, bytes_, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) Fatal("cannot map a fiber stack");
    if (mprotect(p, page, PROT_NONE) != 0) Fatal("cannot protect a fiber stack's guard page");
    base_ = static_cast<char*>(p);
  }
  ~Stack() { munmap(base_, bytes_); }
  Stack(const Stack&) = delete;
  Stack& operator=(const Stack&) = delete;
  char* top() const { return base_ + bytes_; }
  char* bottom() const { return base_ + bytes_ - kStackBytes; }

 private:
  char* base_ = nullptr;
  size_t bytes_ = 0;
};

struct Fiber {
  Thread thread;
  std::unique_ptr<Stack> stack;
  bool done = false;
#if defined(__x86_64__)
  void* sp = nullptr;
#else
  ucontext_t context;
#endif
};

}  // namespace

// One block's threads, barriers and warp exchange buffers.
struct Block {
  uint3 block_idx;
  dim3 block_dim, grid_dim;
  void* dynamic_shared = nullptr;
  const std::function<void()>* body = nullptr;
  std::vector<Fiber> fibers;
  int live = 0;              // fibers not yet returned
  Fiber* running = nullptr;  // null while the scheduler (the launching code) runs
  const char* kernel_name = "";
  bool reverse = false;  // threads take turns from the last to the first
  uint64_t progress_seen = 0;
  int idle_yields = 0;
#if defined(__x86_64__)
  void* scheduler_sp = nullptr;
#else
  ucontext_t scheduler;
#endif
  // Block barrier.
  int arrived = 0;
  uint64_t generation = 0;
  bool any = false, any_result = false;
  // Warp barriers and exchange slots, double-buffered by phase.
  struct Warp {
    int arrived = 0, live = 0;
    int op = 0;  // what the lanes at the barrier are doing (WarpOp * 64 + bytes)
    uint64_t generation = 0;
    alignas(16) unsigned char slots[2][32][32];
  };
  std::vector<Warp> warps;
  uint64_t progress = 0;        // bumped whenever a thread arrives somewhere or returns
  std::vector<void*> poisoned;  // static shared variables this block has filled
};

namespace {

thread_local Block* t_block = nullptr;

// Stacks survive launches (per host thread), so a launch maps none after the first.
std::vector<std::unique_ptr<Stack>>& StackCache() {
  thread_local std::vector<std::unique_ptr<Stack>> cache;
  return cache;
}

// Saves the running context in `from` (a fiber, or the scheduler when null) and resumes `to`
// (likewise).
void Switch(Block* b, Fiber* from, Fiber* to) {
  b->running = to;
#if defined(__x86_64__)
  kvmem_emu_switch(from != nullptr ? &from->sp : &b->scheduler_sp,
                   to != nullptr ? to->sp : b->scheduler_sp);
#else
  swapcontext(from != nullptr ? &from->context : &b->scheduler,
              to != nullptr ? &to->context : &b->scheduler);
#endif
}

// The next thread after `from`, in order and wrapping around, that has not returned; null when
// none has not.
Fiber* NextLive(Block* b, const Fiber* from) {
  const int n = static_cast<int>(b->fibers.size());
  const int step = b->reverse ? n - 1 : 1;  // -1 modulo n
  for (int k = 1, i = from->thread.linear; k <= n; ++k) {
    i = (i + step) % n;
    if (!b->fibers[i].done) return &b->fibers[i];
  }
  return nullptr;
}

// -1 until set or read from KVMEM_CUDA_EMULATOR_ORDER, then 0 (forward) or 1 (reverse).
std::atomic<int> g_reverse{-1};

bool ReverseOrder() {
  int reverse = g_reverse.load(std::memory_order_relaxed);
  if (reverse < 0) {
    const char* order = std::getenv("KVMEM_CUDA_EMULATOR_ORDER");
    if (order != nullptr && std::string_view(order) != "forward" &&
        std::string_view(order) != "reverse") {
      Fatal("KVMEM_CUDA_EMULATOR_ORDER must be forward or reverse");
    }
    reverse = order != nullptr && std::string_view(order) == "reverse";
    g_reverse.store(reverse, std::memory_order_relaxed);
  }
  return reverse == 1;
}

[[noreturn]] void ReportDeadlock(Block* b) {
  std::fprintf(stderr,
               "CUDA emulator: the kernel launched at %s deadlocked in block (%u, %u, %u): its "
               "threads wait at a __syncthreads or warp operation that not all of them reach "
               "(%d of %zu threads live, %d at __syncthreads)\n",
               b->kernel_name, b->block_idx.x, b->block_idx.y, b->block_idx.z, b->live,
               b->fibers.size(), b->arrived);
  for (size_t w = 0; w < b->warps.size(); ++w) {
    if (b->warps[w].arrived > 0) {
      std::fprintf(stderr, "  warp %zu: %d of %d live lanes at a warp operation\n", w,
                   b->warps[w].arrived, b->warps[w].live);
    }
  }
  std::abort();
}

void FiberMain(Fiber* f) {
  Block* b = f->thread.block;
  (*b->body)();
  CopyAsyncCommit();
  CopyAsyncWait(0);  // what a thread leaves in flight still lands
  f->done = true;
  --b->live;
  --b->warps[f->thread.linear / 32].live;
  ++b->progress;
  Switch(b, f, NextLive(b, f));  // null: the block is done, back to the scheduler
  Fatal("a finished fiber was resumed");
}

#if !defined(__x86_64__)
void FiberTrampoline(unsigned lo, unsigned hi) {
  FiberMain(reinterpret_cast<Fiber*>((static_cast<uintptr_t>(hi) << 32) | lo));
}
#endif

void StartFiber(Fiber* f) {
#if defined(__x86_64__)
  // Six registers for kvmem_emu_switch to pop (r15, r14, r13, r12, rbx, rbp) and the entry as
  // the return address; at the entry's `call` the stack is 16-byte aligned, as the ABI wants.
  auto* top = reinterpret_cast<uintptr_t*>(f->stack->top());
  uintptr_t* sp = top - 7;  // after the pops and the ret, the stack pointer is `top`
  sp[0] = 0;                // r15
  sp[1] = 0;                // r14
  sp[2] = reinterpret_cast<uintptr_t>(&FiberMain);              // r13: function
  sp[3] = reinterpret_cast<uintptr_t>(f);                       // r12: argument
  sp[4] = 0;                                                    // rbx
  sp[5] = 0;                                                    // rbp
  sp[6] = reinterpret_cast<uintptr_t>(&kvmem_emu_fiber_entry);  // return address
  f->sp = sp;
#else
  getcontext(&f->context);
  f->context.uc_stack.ss_sp = f->stack->bottom();
  f->context.uc_stack.ss_size = kStackBytes;
  f->context.uc_link = nullptr;
  const auto p = reinterpret_cast<uintptr_t>(f);
  makecontext(&f->context, reinterpret_cast<void (*)()>(&FiberTrampoline), 2,
              static_cast<unsigned>(p), static_cast<unsigned>(p >> 32));
#endif
}

// Lets the block's other threads run, in order, until this one's turn comes again. A full turn
// of the block in which no thread arrived anywhere or returned is a deadlock.
void Yield() {
  Block* b = t_block;
  if (b->progress != b->progress_seen) {
    b->progress_seen = b->progress;
    b->idle_yields = 0;
  } else if (++b->idle_yields > 2 * b->live + 2) {
    ReportDeadlock(b);
  }
  Fiber* from = b->running;
  Fiber* to = NextLive(b, from);
  if (to != from) Switch(b, from, to);
}

void RunBlock(Block* b) {
  const int n = static_cast<int>(b->block_dim.x * b->block_dim.y * b->block_dim.z);
  auto& cache = StackCache();
  b->fibers.resize(n);
  b->warps.assign((n + 31) / 32, {});
  for (int i = 0; i < n; ++i) {
    Fiber& f = b->fibers[i];
    f = Fiber();
    if (cache.size() <= static_cast<size_t>(i)) cache.push_back(std::make_unique<Stack>());
    f.stack = std::move(cache[i]);
    f.thread.linear = i;
    f.thread.thread_idx = {static_cast<unsigned>(i) % b->block_dim.x,
                           (static_cast<unsigned>(i) / b->block_dim.x) % b->block_dim.y,
                           static_cast<unsigned>(i) / (b->block_dim.x * b->block_dim.y)};
    f.thread.block = b;
    ++b->warps[i / 32].live;
    StartFiber(&f);
  }
  b->live = n;
  b->idle_yields = 0;
  Block* const outer = t_block;
  t_block = b;
  b->reverse = ReverseOrder();
  Switch(b, nullptr, &b->fibers[b->reverse ? n - 1 : 0]);  // back here when the last returns
  t_block = outer;
  for (int i = 0; i < n; ++i) cache[i] = std::move(b->fibers[i].stack);
}

}  // namespace

void SetThreadOrder(ThreadOrder order) {
  g_reverse.store(order == ThreadOrder::kReverse ? 1 : 0, std::memory_order_relaxed);
}

Thread* CurrentThread() {
  if (t_block == nullptr || t_block->running == nullptr) Fatal("device code ran outside a kernel");
  return &t_block->running->thread;
}
const uint3& CurrentBlockIdx() { return t_block->block_idx; }
const dim3& CurrentBlockDim() { return t_block->block_dim; }
const dim3& CurrentGridDim() { return t_block->grid_dim; }
void* DynamicShared() { return t_block->dynamic_shared; }

void PoisonShared(void* variable, size_t bytes) {
  std::vector<void*>& done = t_block->poisoned;
  if (std::find(done.begin(), done.end(), variable) != done.end()) return;
  done.push_back(variable);
  std::memset(variable, kFreshSharedByte, bytes);
}

bool SyncThreads(bool predicate) {
  Block* b = t_block;
  ++b->progress;
  b->any = b->any || predicate;
  const uint64_t generation = b->generation;
  if (++b->arrived == b->live) {
    b->any_result = b->any;
    b->any = false;
    b->arrived = 0;
    ++b->generation;
    return b->any_result;
  }
  while (b->generation == generation) {
    Yield();
    // A thread that returned no longer counts: the others may all be here now.
    if (b->generation == generation && b->arrived == b->live) {
      ++b->progress;
      b->any_result = b->any;
      b->any = false;
      b->arrived = 0;
      ++b->generation;
    }
  }
  return b->any_result;
}

namespace {

// What a lane does at a warp barrier; every lane of the warp must be doing the same.
enum WarpOp : int { kShuffle = 1, kGather = 2, kSyncWarp = 3 };

void WarpBarrier(Block::Warp& w, int op, size_t bytes) {
  Block* b = t_block;
  ++b->progress;
  const uint64_t generation = w.generation;
  const int what = op * 64 + static_cast<int>(bytes);
  if (w.arrived == 0) {
    w.op = what;
  } else if (w.op != what) {
    std::fprintf(stderr,
                 "CUDA emulator: the kernel launched at %s, block (%u, %u, %u): lanes of warp %d "
                 "are at different warp operations (a shuffle, an ldmatrix/mma or __syncwarp, "
                 "or values of different sizes), which a device does not pair up\n",
                 b->kernel_name, b->block_idx.x, b->block_idx.y, b->block_idx.z,
                 b->running->thread.linear / 32);
    std::abort();
  }
  if (++w.arrived == w.live) {
    w.arrived = 0;
    ++w.generation;
    return;
  }
  while (w.generation == generation) {
    Yield();
    if (w.generation == generation && w.arrived == w.live) {
      ++b->progress;
      w.arrived = 0;
      ++w.generation;
    }
  }
}

}  // namespace

namespace {

constexpr size_t kSlotBytes = sizeof(Block::Warp::slots[0][0]);

// Deposits `bytes` for this lane and, once the warp's live lanes all have, returns the 32 lanes'
// deposits (kSlotBytes apart). They stay in place until this lane's next warp operation: the
// next operation deposits into the other buffer, and the one after cannot begin before this
// lane has arrived at the next.
const unsigned char* GatherInPlace(const void* in, size_t bytes, WarpOp op) {
  if (bytes > kSlotBytes) Fatal("a warp operation on more than 32 bytes per lane");
  Thread* t = CurrentThread();
  Block::Warp& w = t_block->warps[t->linear / 32];
  const unsigned phase = (t->warp_phase ^= 1u);
  std::memcpy(w.slots[phase][t->linear % 32], in, bytes);
  WarpBarrier(w, op, bytes);
  return &w.slots[phase][0][0];
}

float HalfBitsToFloat(uint32_t bits, bool bf16) {
  if (bf16) return BitsToFloat(bits << 16);
  __half_raw raw;
  raw.x = static_cast<uint16_t>(bits);
  return __half2float(__half(raw));
}

}  // namespace

void WarpExchange(const void* in, void* out, size_t bytes, int (*source)(int lane, int arg),
                  int arg) {
  const unsigned char* slots = GatherInPlace(in, bytes, kShuffle);
  const int lane = CurrentThread()->linear % 32;
  const int from = source(lane, arg);
  std::memcpy(out, slots + (from >= 0 && from < 32 ? from : lane) * kSlotBytes, bytes);
}

void LoadMatrixX4(uint32_t (&r)[4], const void* row, bool transpose) {
  if (reinterpret_cast<uintptr_t>(row) % 16 != 0) {
    Fatal("ldmatrix: a row address that is not 16-byte aligned (a fault on the device)");
  }
  const unsigned char* slots = GatherInPlace(&row, sizeof(row), kGather);
  const int lane = CurrentThread()->linear % 32;
  const int g = lane / 4, t = lane % 4;
  for (int i = 0; i < 4; ++i) {
    uint16_t e[2];
    for (int j = 0; j < 2; ++j) {
      // Element (row, col) of matrix i lies at column col of the row lane 8 i + row gave.
      const int mrow = transpose ? 2 * t + j : g;
      const int mcol = transpose ? g : 2 * t + j;
      const uint16_t* p;
      std::memcpy(&p, slots + (8 * i + mrow) * kSlotBytes, sizeof(p));
      std::memcpy(&e[j], p + mcol, 2);
    }
    r[i] = static_cast<uint32_t>(e[0]) | (static_cast<uint32_t>(e[1]) << 16);
  }
}

void Mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, bool bf16) {
  const uint32_t mine[6] = {a[0], a[1], a[2], a[3], b0, b1};
  const unsigned char* slots = GatherInPlace(mine, sizeof(mine), kGather);
  const auto reg = [&](int lane, int i) {
    uint32_t v;
    std::memcpy(&v, slots + lane * kSlotBytes + 4 * i, 4);
    return v;
  };
  const auto unpack = [&](uint32_t v, float* out) {
    out[0] = HalfBitsToFloat(v & 0xffff, bf16);
    out[1] = HalfBitsToFloat(v >> 16, bf16);
  };
  const int lane = CurrentThread()->linear % 32;
  const int g = lane / 4, t = lane % 4;
  // This lane's outputs: rows g and g + 8, columns 2t and 2t + 1. Row g of A comes from the
  // lanes of group g (a0: columns 2t'.., a2: 2t' + 8..; rows g + 8 in a1, a3); column n of B
  // from the lanes of group n (b0: k = 2t'.., b1: k = 2t' + 8..).
  float rows[2][16], cols[2][16];
  for (int tp = 0; tp < 4; ++tp) {
    const int from_a = 4 * g + tp;
    for (int r = 0; r < 2; ++r) {
      unpack(reg(from_a, r), &rows[r][2 * tp]);
      unpack(reg(from_a, r + 2), &rows[r][2 * tp + 8]);
    }
    for (int j = 0; j < 2; ++j) {
      const int from_b = 4 * (2 * t + j) + tp;
      unpack(reg(from_b, 4), &cols[j][2 * tp]);
      unpack(reg(from_b, 5), &cols[j][2 * tp + 8]);
    }
  }
  for (int i = 0; i < 4; ++i) {  // c0, c1: (g, 2t + i); c2, c3: (g + 8, 2t + i - 2)
    // Products of 16-bit values are exact in f32; the sum is rounded once per step here and
    // in an unspecified order on the device, within the tests' tolerances either way.
    float sum = c[i];
    for (int k = 0; k < 16; ++k) sum += rows[i / 2][k] * cols[i % 2][k];
    c[i] = sum;
  }
}

void CopyAsync(void* dst, const void* src, int bytes) {
  if (reinterpret_cast<uintptr_t>(dst) % 16 != 0 || reinterpret_cast<uintptr_t>(src) % 16 != 0) {
    Fatal("cp.async of 16 bytes from or to an address that is not 16-byte aligned");
  }
  if (bytes < 0 || bytes > 16) Fatal("cp.async of more than 16 bytes");
  Thread::PendingCopy copy{dst, {}};
  std::memcpy(copy.bytes, src, bytes);
  CurrentThread()->pending_copies.push_back(copy);
}

void CopyAsyncCommit() {
  Thread* t = CurrentThread();
  t->copy_group_ends.push_back(t->pending_copies.size());
}

void CopyAsyncWait(int pending_groups) {
  Thread* t = CurrentThread();
  const int groups = static_cast<int>(t->copy_group_ends.size());
  if (groups <= pending_groups) return;
  const size_t done = t->copy_group_ends[groups - pending_groups - 1];
  for (size_t i = 0; i < done; ++i) {
    std::memcpy(t->pending_copies[i].dst, t->pending_copies[i].bytes, 16);
  }
  t->pending_copies.erase(t->pending_copies.begin(), t->pending_copies.begin() + done);
  t->copy_group_ends.erase(t->copy_group_ends.begin(), t->copy_group_ends.end() - pending_groups);
  for (size_t& end : t->copy_group_ends) end -= done;
}

void SyncWarp() {
  Thread* t = CurrentThread();
  t->warp_phase ^= 1u;
  WarpBarrier(t_block->warps[t->linear / 32], kSyncWarp, 0);
}

void RunKernel(const LaunchConfig& config, const std::function<void()>& body) {
  const std::string name =
      std::string(config.where.file_name()) + ":" + std::to_string(config.where.line());
  std::vector<unsigned char> shared_bytes(config.smem + 128);
  Block block;
  block.grid_dim = config.grid;
  block.block_dim = config.block;
  block.body = &body;
  block.kernel_name = name.c_str();
  const uintptr_t raw = reinterpret_cast<uintptr_t>(shared_bytes.data());
  block.dynamic_shared = reinterpret_cast<void*>((raw + 127) & ~uintptr_t{127});
  // Blocks run one after another, in reverse with ThreadOrder::kReverse too, so that a block
  // reading what another block of the launch writes shows in one of the two orders.
  const uint64_t blocks = uint64_t{config.grid.x} * config.grid.y * config.grid.z;
  const bool reverse = ReverseOrder();
  for (uint64_t i = 0; i < blocks; ++i) {
    const uint64_t b = reverse ? blocks - 1 - i : i;
    block.block_idx = {static_cast<unsigned>(b % config.grid.x),
                       static_cast<unsigned>(b / config.grid.x % config.grid.y),
                       static_cast<unsigned>(b / (uint64_t{config.grid.x} * config.grid.y))};
    block.arrived = 0;
    block.any = false;
    block.poisoned.clear();
    // Uninitialised shared memory, as on the device: garbage a kernel must not read.
    std::memset(block.dynamic_shared, kFreshSharedByte, config.smem);
    RunBlock(&block);
  }
}

}  // namespace cuda_emu
}  // namespace kvmem
