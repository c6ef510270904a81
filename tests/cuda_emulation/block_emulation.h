// Prelude of the host emulations of CUDA kernels that cooperate within a block (shared memory, __syncthreads, warp
// shuffles and ballots). Unlike emulation.h (one thread walks a grid-stride loop), every CUDA thread of a block is
// a host thread: __syncthreads is a barrier over the block, each warp exchanges shuffle/ballot values through a
// per-warp slot array between two warp barriers, atomics take a lock, and blocks run one after another. It checks
// the kernels' logic and their barriers' placement (a missing __syncthreads shows up as a wrong result only when the
// host threads happen to interleave badly) - not occupancy, timing or the glue. Build with -std=c++20 -pthread.
#pragma once
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "emulation_common.h"

// A kernel's static __shared__ arrays become function statics: one copy, seen by all of the block's threads (blocks
// run one at a time). Its dynamic shared memory (VOSOPS_DYNAMIC_SMEM, common/cuda_types.cuh) is emu::dynamic_smem.
#define __shared__ static
#define __align__(n) alignas(n)
#define VOSOPS_DYNAMIC_SMEM(name) unsigned char* name = emu::dynamic_smem

namespace emu {

struct Dim3 {
  unsigned int x = 0, y = 0, z = 0;
};

// Width of the lane segments a narrow shuffle or a segment __syncwarp synchronises (the local_attention teams).
constexpr unsigned kSegment = 8;

struct Warp {
  explicit Warp(unsigned lanes) : sync(lanes) {
    for (unsigned s = 0; s * kSegment < lanes; ++s) {
      segments.push_back(std::make_unique<std::barrier<>>(std::min(kSegment, lanes - kSegment * s)));
    }
  }
  std::barrier<> sync;
  // One barrier per kSegment lanes: a width-kSegment shuffle or a __syncwarp over one segment's lanes waits only
  // for that segment, as on a GPU, where a team's masked shuffle does not involve the warp's other teams.
  std::vector<std::unique_ptr<std::barrier<>>> segments;
  uint64_t slot[32] = {};
};

struct Block {
  explicit Block(unsigned threads) : sync(threads) {
    for (unsigned w = 0; w * 32 < threads; ++w) {
      warps.push_back(std::make_unique<Warp>(std::min(32u, threads - 32 * w)));
    }
  }
  std::barrier<> sync;
  std::vector<std::unique_ptr<Warp>> warps;
};

inline Block* current_block = nullptr;
alignas(16) inline unsigned char dynamic_smem[1 << 20];
inline std::mutex atomic_lock;

}  // namespace emu

inline thread_local emu::Dim3 threadIdx;
inline emu::Dim3 blockIdx, blockDim, gridDim;

inline void __syncthreads() { emu::current_block->sync.arrive_and_wait(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  emu::Warp& w = *emu::current_block->warps[threadIdx.x / 32];
  if (__builtin_popcount(mask) == static_cast<int>(emu::kSegment)) {
    w.segments[(threadIdx.x % 32) / emu::kSegment]->arrive_and_wait();  // a team's lanes only
  } else {
    w.sync.arrive_and_wait();
  }
}

namespace emu {
// Every lane of the warp publishes `value`, then reads lane `src(lane)`'s; the second barrier keeps the slots until
// all have read.
// width: the lanes taking part, 32 (the warp) or kSegment (the lane's segment; src stays inside it).
template <typename T, typename Src>
T exchange(T value, Src src, unsigned width = 32) {
  static_assert(sizeof(T) <= sizeof(uint64_t));
  Warp& w = *current_block->warps[threadIdx.x / 32];
  const unsigned lane = threadIdx.x % 32;
  std::barrier<>& bar = width == kSegment ? *w.segments[lane / kSegment] : w.sync;
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  w.slot[lane] = bits;
  bar.arrive_and_wait();
  const uint64_t got = w.slot[src(lane) % 32];
  bar.arrive_and_wait();
  T out;
  std::memcpy(&out, &got, sizeof(T));
  return out;
}
}  // namespace emu

template <typename T>
T __shfl_xor_sync(unsigned, T v, int mask) {
  return emu::exchange(v, [mask](unsigned lane) { return lane ^ static_cast<unsigned>(mask); });
}
template <typename T>
T __shfl_xor_sync(unsigned, T v, int mask, int width) {  // mask < width: the partner is in the lane's segment
  return emu::exchange(v, [mask, width](unsigned lane) {
    return (lane & ~static_cast<unsigned>(width - 1)) | ((lane ^ static_cast<unsigned>(mask)) & (width - 1));
  }, static_cast<unsigned>(width));
}
template <typename T>
T __shfl_sync(unsigned, T v, int src) {
  return emu::exchange(v, [src](unsigned) { return static_cast<unsigned>(src); });
}
template <typename T>
T __shfl_sync(unsigned, T v, int src, int width) {  // lane src % width of the lane's segment
  return emu::exchange(v, [src, width](unsigned lane) {
    return (lane & ~static_cast<unsigned>(width - 1)) | (static_cast<unsigned>(src) & (width - 1));
  }, static_cast<unsigned>(width));
}
inline unsigned __ballot_sync(unsigned, int predicate) {
  emu::Warp& w = *emu::current_block->warps[threadIdx.x / 32];
  const unsigned lane = threadIdx.x % 32;
  w.slot[lane] = predicate != 0;
  w.sync.arrive_and_wait();
  unsigned bits = 0;
  for (unsigned l = 0; l < 32; ++l) bits |= static_cast<unsigned>(w.slot[l] != 0) << l;
  w.sync.arrive_and_wait();
  return bits;
}
inline int __ffs(unsigned x) { return x == 0 ? 0 : __builtin_ctz(x) + 1; }
inline int __popc(unsigned x) { return __builtin_popcount(x); }

inline float __int_as_float(int v) {
  float f;
  std::memcpy(&f, &v, sizeof f);
  return f;
}
inline double __longlong_as_double(long long v) {
  double d;
  std::memcpy(&d, &v, sizeof d);
  return d;
}
template <typename T>
inline T __ldg(const T* p) {
  return *p;
}
template <typename T>
inline T atomicAdd(T* a, T v) {
  std::lock_guard<std::mutex> guard(emu::atomic_lock);
  const T old = *a;
  *a = old + v;
  return old;
}
// CUDA's device max/min overloads for float, double and integers.
template <typename T>
inline T max(T a, T b) {
  return a < b ? b : a;
}
template <typename T>
inline T min(T a, T b) {
  return b < a ? b : a;
}

namespace emu {
// Runs kernel body `run()` on a grid of (grid_x, grid_y) blocks of `threads` host threads each, block after block.
// The block's dynamic shared memory (`smem_bytes`) is filled with 0xff bytes first (NaN floats, -1 integers), so a
// read of an element the block never wrote shows. A thread that returns leaves the barriers (as on a GPU, where an
// exited thread no longer holds up bar.sync). Returns false when smem_bytes exceeds the emulated shared memory.
inline bool launch(unsigned grid_x, unsigned grid_y, unsigned threads, size_t smem_bytes,
                   const std::function<void()>& run) {
  if (smem_bytes > sizeof(dynamic_smem)) return false;
  gridDim = {grid_x, grid_y, 1};
  blockDim = {threads, 1, 1};
  for (unsigned by = 0; by < grid_y; ++by) {
    for (unsigned bx = 0; bx < grid_x; ++bx) {
      blockIdx = {bx, by, 0};
      std::memset(dynamic_smem, 0xff, smem_bytes);
      Block block(threads);
      current_block = &block;
      std::vector<std::thread> pool;
      pool.reserve(threads);
      for (unsigned t = 0; t < threads; ++t) {
        pool.emplace_back([t, &run, &block] {
          threadIdx = {t, 0, 0};
          run();
          block.sync.arrive_and_drop();
          block.warps[t / 32]->sync.arrive_and_drop();
          block.warps[t / 32]->segments[(t % 32) / emu::kSegment]->arrive_and_drop();
        });
      }
      for (auto& th : pool) th.join();
      current_block = nullptr;
    }
  }
  return true;
}
}  // namespace emu

// In an extern "C" entry point: `return CALL;` with T bound to the element type numbered `code` (0 float32,
// 1 float64, 2 float16, 3 bfloat16; the tests' numbering); 2 for an unknown code.
#define EMU_DISPATCH(code, CALL)                                    \
  switch (code) {                                                   \
    case 0: { using T = float; return CALL; }                       \
    case 1: { using T = double; return CALL; }                      \
    case 2: { using T = __half; return CALL; }                      \
    case 3: { using T = __nv_bfloat16; return CALL; }               \
  }                                                                 \
  return 2;
