// CUDA built-ins for compiling device code as host C++, so the tests can
// execute the kernel's own source on the CPU (see run_kernel.cpp).
//
// Faithful where it matters for correctness:
// - every thread of a block is a real std::thread with its own threadIdx;
// - __syncthreads() is a real barrier (std::barrier);
// - __shared__ variables are one object per block, placed in their own linker
//   section so that the launcher can fill them with garbage before each block
//   (shared memory is uninitialised on a GPU);
// - between barriers the threads of a block run one at a time in a fixed
//   order (highest threadIdx first on even blocks, lowest first on odd ones),
//   one legal GPU schedule chosen so that a read of shared data before the
//   barrier that publishes it reads garbage every time, not by chance.
// Blocks run one after another. Warps, streams and speed are not modelled.
#pragma once

#include <barrier>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <semaphore>
#include <thread>
#include <vector>

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};

inline thread_local dim3 threadIdx;
inline thread_local dim3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static __attribute__((section("emu_shared")))

extern "C" char __start_emu_shared[];  // provided by the linker for the section
extern "C" char __stop_emu_shared[];

namespace emu {

// One block's threads: a turn order between barriers and the barrier itself.
class Block {
 public:
  Block(int num_threads, bool reverse)
      : n_(num_threads), reverse_(reverse), barrier_(num_threads, Reset{this}) {
    for (int i = 0; i < n_; ++i) turn_.push_back(std::make_unique<std::binary_semaphore>(0));
    alive_.assign(n_, true);
  }
  // Position of thread t in the turn order, and the thread at position p.
  int pos_of(int t) const { return reverse_ ? n_ - 1 - t : t; }
  int thread_at(int p) const { return reverse_ ? n_ - 1 - p : p; }

  void wait_turn(int t) { turn_[t]->acquire(); }
  // Hands the turn to the next thread in the order that has not exited.
  void pass_turn(int t) { release_from(pos_of(t) + 1); }
  void start() { release_from(0); }
  void sync(int t) {
    pass_turn(t);
    barrier_.arrive_and_wait();  // the completion below restarts the turns
    wait_turn(t);
  }
  void exit(int t) {
    alive_[t] = false;  // written while holding the turn
    pass_turn(t);
    barrier_.arrive_and_drop();
  }

 private:
  struct Reset {
    Block* b;
    void operator()() noexcept { b->start(); }
  };
  void release_from(int pos) {
    for (; pos < n_; ++pos) {
      if (alive_[thread_at(pos)]) return turn_[thread_at(pos)]->release();
    }
  }
  int n_;
  bool reverse_;
  std::vector<bool> alive_;
  std::vector<std::unique_ptr<std::binary_semaphore>> turn_;
  std::barrier<Reset> barrier_;
};

inline thread_local Block* current_block = nullptr;

// Garbage in every __shared__ byte, written without ASan checks (the section
// also holds the globals' redzones).
__attribute__((no_sanitize_address)) inline void poison_shared() {
  for (volatile char* p = __start_emu_shared; p < __stop_emu_shared; ++p) *p = char(0xff);
}

// Runs kernel() for every block of the grid, one block after another, each
// with block_dim real threads (created once per launch).
inline void launch(unsigned grid_dim, unsigned block_dim, const std::function<void()>& kernel) {
  std::unique_ptr<Block> block;
  std::barrier<> step(static_cast<std::ptrdiff_t>(block_dim) + 1);  // the launcher and the threads
  std::vector<std::thread> threads;
  threads.reserve(block_dim);
  for (unsigned t = 0; t < block_dim; ++t) {
    threads.emplace_back([&, t] {
      threadIdx = {t, 1, 1};
      blockDim = {block_dim, 1, 1};
      gridDim = {grid_dim, 1, 1};
      for (unsigned b = 0; b < grid_dim; ++b) {
        step.arrive_and_wait();  // block b is set up
        blockIdx = {b, 1, 1};
        current_block = block.get();
        block->wait_turn(static_cast<int>(t));
        kernel();
        block->exit(static_cast<int>(t));
        step.arrive_and_wait();  // block b is done
      }
    });
  }
  for (unsigned b = 0; b < grid_dim; ++b) {
    poison_shared();
    block = std::make_unique<Block>(static_cast<int>(block_dim), b % 2 == 0);
    block->start();
    step.arrive_and_wait();
    step.arrive_and_wait();
  }
  for (auto& th : threads) th.join();
}

}  // namespace emu

inline void __syncthreads() { emu::current_block->sync(static_cast<int>(threadIdx.x)); }
