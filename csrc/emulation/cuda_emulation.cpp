// Runtime of the CPU emulation (see cuda_emulation.h): a cooperative scheduler of one block's
// threads over ucontext coroutines.
#ifndef FASTPE_EMULATION
#define FASTPE_EMULATION 1
#endif
#include "cuda_emulation.h"

#include <ucontext.h>

// Coroutine switches happen at every barrier and shuffle, hundreds of thousands of times per test.
// On x86-64 a hand-written switch (callee-saved registers, MXCSR and the x87 control word) avoids
// the signal-mask system call of swapcontext; elsewhere ucontext does the job.
#if defined(__x86_64__) && !defined(FASTPE_EMU_UCONTEXT)
#define FASTPE_EMU_FAST_SWITCH 1
extern "C" void fastpe_emu_switch(void** save_sp, void* next_sp);
asm(R"(
.text
.globl fastpe_emu_switch
.hidden fastpe_emu_switch
.type fastpe_emu_switch,@function
fastpe_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
.size fastpe_emu_switch, .-fastpe_emu_switch
)");
#endif

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <random>
#include <string>
#include <vector>

namespace fastpe_emu {
namespace {

enum class State { kRunnable, kWaitBlock, kWaitWarp, kDone };

struct Thread {
#ifdef FASTPE_EMU_FAST_SWITCH
  void* sp = nullptr;
#else
  ucontext_t ctx;
#endif
  State state = State::kRunnable;
  uint3 idx;
};

struct Launch {
  dim3 grid, block;
  uint3 block_idx;
  std::vector<Thread> threads;
  std::vector<uint64_t> exchange;
#ifdef FASTPE_EMU_FAST_SWITCH
  void* scheduler = nullptr;
#else
  ucontext_t scheduler;
#endif
  int current = -1;
  const std::function<void()>* body = nullptr;
  unsigned char* smem = nullptr;
};

constexpr size_t kStackBytes = 256 * 1024;
constexpr size_t kGuardBytes = 256;

thread_local Launch* g_launch = nullptr;
thread_local std::string g_error;
thread_local cudaError_t g_last = cudaSuccess;

Thread& me() { return g_launch->threads[g_launch->current]; }

#ifdef FASTPE_EMU_FAST_SWITCH
void yield_to_scheduler() { fastpe_emu_switch(&me().sp, g_launch->scheduler); }
void resume(Thread& t) { fastpe_emu_switch(&g_launch->scheduler, t.sp); }

[[noreturn]] void entry() {
  (*g_launch->body)();
  me().state = State::kDone;
  yield_to_scheduler();  // never resumed
  std::abort();
}

// A fresh stack whose first switch "returns" into entry() with the ABI's alignment.
void start(Thread& t, char* stack, size_t bytes) {
  uintptr_t top = (reinterpret_cast<uintptr_t>(stack) + bytes) & ~uintptr_t(15);
  uint64_t* sp = reinterpret_cast<uint64_t*>(top - 72);  // rsp % 16 == 8 at entry, as after a call
  const uint32_t mxcsr = 0x1F80, x87_cw = 0x037F;        // defaults: round to nearest, exceptions masked
  sp[0] = static_cast<uint64_t>(mxcsr) | (static_cast<uint64_t>(x87_cw) << 32);
  for (int r = 1; r <= 6; ++r) sp[r] = 0;  // r15 r14 r13 r12 rbx rbp
  sp[7] = reinterpret_cast<uint64_t>(&entry);
  t.sp = sp;
}
#else
void yield_to_scheduler() { swapcontext(&me().ctx, &g_launch->scheduler); }
void resume(Thread& t) { swapcontext(&g_launch->scheduler, &t.ctx); }

void entry() {
  (*g_launch->body)();
  me().state = State::kDone;  // uc_link returns to the scheduler
}

void start(Thread& t, char* stack, size_t bytes) {
  getcontext(&t.ctx);
  t.ctx.uc_stack.ss_sp = stack;
  t.ctx.uc_stack.ss_size = bytes;
  t.ctx.uc_link = &g_launch->scheduler;
  makecontext(&t.ctx, entry, 0);
}
#endif

enum class Order { kForward, kReverse, kShuffle };

// Shuffled by default: a fixed order (thread 0 first) hides a missing barrier whenever the
// writer happens to run before the reader.
Order order_from_env() {
  const char* s = std::getenv("FASTPE_EMU_ORDER");
  const std::string v(s == nullptr ? "" : s);
  if (v == "forward") return Order::kForward;
  if (v == "reverse") return Order::kReverse;
  return Order::kShuffle;
}

}  // namespace

const uint3& thread_idx() { return me().idx; }
const uint3& block_idx() { return g_launch->block_idx; }
const dim3& block_dim() { return g_launch->block; }
const dim3& grid_dim() { return g_launch->grid; }
unsigned char* dynamic_smem() { return g_launch->smem; }

void sync_threads() {
  me().state = State::kWaitBlock;
  yield_to_scheduler();
}

void sync_warp() {
  me().state = State::kWaitWarp;
  yield_to_scheduler();
}

uint64_t shuffle_xor_bits(uint64_t bits, int mask) {
  const int self = g_launch->current;
  g_launch->exchange[self] = bits;
  sync_warp();
  const int other = (self & ~31) | ((self & 31) ^ mask);
  const uint64_t out = g_launch->exchange[other];
  sync_warp();
  return out;
}

void fail(const char* message) {
  if (g_error.empty()) g_error = message;
}

cudaError_t last_error() {
  const cudaError_t e = g_last;
  g_last = cudaSuccess;
  return e;
}

const char* last_error_message() { return g_error.c_str(); }

cudaError_t run_grid(dim3 grid, dim3 block, size_t smem_bytes, const std::function<void()>& body) {
  g_error.clear();
  const int nthreads = static_cast<int>(block.x * block.y * block.z);
  if (block.y != 1 || block.z != 1 || nthreads % 32 != 0) {
    fail("emulation: only 1-D blocks of whole warps are supported");
    return g_last = cudaErrorInvalidConfiguration;
  }
  Launch launch;
  launch.grid = grid;
  launch.block = block;
  launch.body = &body;
  launch.threads.resize(nthreads);
  launch.exchange.assign(nthreads, 0);
  std::unique_ptr<char[]> stacks(new char[kStackBytes * nthreads]);
  const size_t smem_alloc = (smem_bytes + kGuardBytes + 127) / 128 * 128;
  std::unique_ptr<unsigned char, decltype(&std::free)> smem(
      static_cast<unsigned char*>(std::aligned_alloc(128, smem_alloc)), &std::free);
  launch.smem = smem.get();
  Launch* saved = g_launch;
  g_launch = &launch;

  const Order order = order_from_env();
  std::mt19937 rng(12345);
  std::vector<int> sequence(nthreads);
  for (int i = 0; i < nthreads; ++i) sequence[i] = order == Order::kReverse ? nthreads - 1 - i : i;

  for (unsigned bz = 0; bz < grid.z && g_error.empty(); ++bz)
    for (unsigned by = 0; by < grid.y && g_error.empty(); ++by)
      for (unsigned bx = 0; bx < grid.x && g_error.empty(); ++bx) {
        launch.block_idx.x = bx;
        launch.block_idx.y = by;
        launch.block_idx.z = bz;
        // Fresh shared memory holds garbage on a GPU: here all-ones bytes, a NaN in every float type.
        std::memset(launch.smem, 0xff, smem_alloc);
        for (int t = 0; t < nthreads; ++t) {
          Thread& th = launch.threads[t];
          th.idx.x = static_cast<unsigned>(t);
          th.idx.y = 0;
          th.idx.z = 0;
          th.state = State::kRunnable;
          start(th, stacks.get() + kStackBytes * t, kStackBytes);
        }
        for (;;) {
          if (order == Order::kShuffle) std::shuffle(sequence.begin(), sequence.end(), rng);
          for (int t : sequence) {
            if (launch.threads[t].state != State::kRunnable) continue;
            launch.current = t;
            resume(launch.threads[t]);
          }
          int live = 0, at_block = 0;
          std::vector<int> ready;  // warps whose live lanes all wait at a warp barrier
          for (int w = 0; w < nthreads / 32; ++w) {
            int w_live = 0, w_wait = 0;
            for (int l = 0; l < 32; ++l) {
              const State s = launch.threads[w * 32 + l].state;
              w_live += s != State::kDone;
              w_wait += s == State::kWaitWarp;
              at_block += s == State::kWaitBlock;
            }
            live += w_live;
            if (w_wait > 0 && w_wait == w_live) ready.push_back(w);
          }
          if (live == 0) break;
          if (!ready.empty()) {
            // Release one warp at a time, so warps drift apart between block barriers as they do
            // on the GPU (releasing all at once would run them in lockstep and hide missing
            // __syncthreads). forward: the lowest warp runs ahead, reverse: the highest.
            const size_t pick = order == Order::kForward ? 0
                                : order == Order::kReverse ? ready.size() - 1
                                                           : std::uniform_int_distribution<size_t>(0, ready.size() - 1)(rng);
            const int w = ready[pick];
            for (int l = 0; l < 32; ++l) {
              if (launch.threads[w * 32 + l].state == State::kWaitWarp) launch.threads[w * 32 + l].state = State::kRunnable;
            }
            continue;
          }
          if (at_block == live) {
            for (Thread& th : launch.threads) {
              if (th.state == State::kWaitBlock) th.state = State::kRunnable;
            }
            continue;
          }
          fail("emulation: deadlock, the threads of a block wait at different barriers");
          break;
        }
        // Writing past the dynamic shared memory the launch asked for is an error on the GPU too.
        for (size_t b = smem_bytes; b < smem_alloc; ++b) {
          if (launch.smem[b] != 0xff) {
            fail("emulation: a kernel wrote past the end of its dynamic shared memory");
            break;
          }
        }
      }
  g_launch = saved;
  if (!g_error.empty()) {
    std::fprintf(stderr, "fastpe CUDA emulation: %s\n", g_error.c_str());
    return g_last = cudaErrorLaunchFailure;
  }
  return g_last = cudaSuccess;
}

}  // namespace fastpe_emu
