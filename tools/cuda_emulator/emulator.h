// A CPU stand-in for the parts of CUDA's execution model deepcore's kernels
// use, so kernels/*.cu run (slowly, exactly) on machines without a GPU.
//
// Every CUDA thread of a block is a fiber (ucontext) with its own stack; the
// block's fibers run on one OS thread and switch only at barriers and warp
// shuffles, which is where CUDA lets threads observe each other. Blocks run one
// after another, so `__shared__` becomes a function-local static. What this
// checks that a compile cannot: indexing, every element written, reductions,
// barrier placement (a barrier some threads never reach is reported as a
// deadlock instead of hanging), and, by running the threads of a block in
// different orders, accesses that depend on unsynchronised ordering.
// What it cannot check: timing, the memory model between barriers, occupancy,
// or CUDA's device math library (host expf/logf stand in for the device ones).
// Two limits to keep in mind when reading a green run:
// - A warp shuffle is a switch point here, so it orders memory like a barrier;
//   on a GPU it orders nothing. A missing __syncwarp() between a read and an
//   aliasing write of another lane does not show (tests check that the
//   kernel's __syncwarp() is still there instead).
// - __shared__ memory is a function-local static: a block starts with what the
//   previous block left, not with garbage, so a read before the first write may
//   pass here.
#pragma once

#include <algorithm>
#include <cmath>
#include <math.h>  // expf, logf, fmaxf in the global namespace, as CUDA has them
#include <cstdint>
#include <cstring>
#include <random>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>
#include <ucontext.h>

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};

namespace emu {

struct Barrier {
    int expected = 0;
    int arrived = 0;
    unsigned long long generation = 0;
};

struct Fiber {
    ucontext_t ctx;
    std::vector<char> stack;
    dim3 thread_idx;
    bool done = false;
};

enum Order { kForward = 0, kReverse = 1, kShuffled = 2 };

struct Launch {
    dim3 grid, block, block_idx;
    std::vector<Fiber> fibers;
    std::vector<Barrier> warp_barriers;
    std::vector<float> warp_slots;  // one float per lane, for shuffles
    Barrier block_barrier;
    ucontext_t scheduler;
    Fiber* current = nullptr;
    bool progressed = false;
    std::string error;  // set by a fiber that threw; the launch rethrows it
    void (*body)(void*) = nullptr;
    void* arg = nullptr;
};

inline Launch*& active() {
    static Launch* launch = nullptr;
    return launch;
}

inline Fiber& self() { return *active()->current; }

inline void yield() {
    Launch& l = *active();
    swapcontext(&l.current->ctx, &l.scheduler);
}

// Arrive at `b` and wait until every participant has: the last one to arrive
// releases the others, who notice when the scheduler next resumes them.
inline void arrive_and_wait(Barrier& b) {
    Launch& l = *active();
    l.progressed = true;
    const unsigned long long gen = b.generation;
    if (++b.arrived == b.expected) {
        b.arrived = 0;
        ++b.generation;
        return;
    }
    while (b.generation == gen) yield();
    l.progressed = true;
}

inline int lane_id() { return static_cast<int>(self().thread_idx.x % 32); }
inline int warp_id() { return static_cast<int>(self().thread_idx.x / 32); }

inline void require_full_mask(unsigned mask) {
    if (mask != 0xffffffffu) throw std::logic_error("emulator: only full-warp masks are supported");
}

template <typename T>
T shuffle(T value, int src_lane) {
    static_assert(sizeof(T) == sizeof(float), "emulator: 32-bit shuffles only");
    Launch& l = *active();
    const int w = warp_id();
    float* slots = l.warp_slots.data() + 32 * w;
    std::memcpy(&slots[lane_id()], &value, sizeof(T));
    arrive_and_wait(l.warp_barriers[w]);  // every lane has published its value
    T out;
    std::memcpy(&out, &slots[src_lane & 31], sizeof(T));
    arrive_and_wait(l.warp_barriers[w]);  // every lane has read before the slots are reused
    return out;
}

inline void fiber_entry() {
    Launch& l = *active();
    // An exception must not cross the context switch: keep it for the launch.
    try {
        l.body(l.arg);
    } catch (const std::exception& exc) {
        l.error = exc.what();
    }
    l.current->done = true;
    l.progressed = true;
    // Returning switches to uc_link, the scheduler.
}

// Out of line: getcontext "returns twice" as far as the compiler knows, which
// would make it distrust every local of the caller.
__attribute__((noinline)) inline void start_fiber(Fiber& f, ucontext_t* link) {
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack.data();
    f.ctx.uc_stack.ss_size = f.stack.size();
    f.ctx.uc_link = link;
    makecontext(&f.ctx, fiber_entry, 0);
}

// Run body(arg) as `grid` x `block` CUDA threads (x dimension only).
// Throws std::runtime_error on a deadlock (a barrier some threads never reach).
inline void launch(unsigned grid, unsigned block, Order order, unsigned seed, void (*body)(void*), void* arg,
                   size_t stack_bytes = 64 * 1024) {
    if (block == 0 || block % 32 != 0 || block > 1024)
        throw std::invalid_argument("emulator: block size must be a multiple of 32 in [32, 1024], got " +
                                    std::to_string(block));
    if (active() != nullptr) throw std::logic_error("emulator: nested launch");
    Launch l;
    l.grid.x = grid;
    l.block.x = block;
    l.body = body;
    l.arg = arg;
    const unsigned nwarps = block / 32;
    l.fibers.resize(block);
    for (auto& f : l.fibers) f.stack.resize(stack_bytes);
    l.warp_barriers.resize(nwarps);
    l.warp_slots.assign(32 * nwarps, 0.f);
    std::mt19937 rng(seed);
    std::vector<unsigned> schedule(block);
    active() = &l;
    try {
        for (unsigned bi = 0; bi < grid; ++bi) {
            l.block_idx.x = order == kReverse ? grid - 1 - bi : bi;
            for (auto& b : l.warp_barriers) b = Barrier{32, 0, 0};
            l.block_barrier = Barrier{static_cast<int>(block), 0, 0};
            for (unsigned t = 0; t < block; ++t) {
                Fiber& f = l.fibers[t];
                f.done = false;
                f.thread_idx.x = t;
                start_fiber(f, &l.scheduler);
            }
            for (unsigned t = 0; t < block; ++t) schedule[t] = order == kReverse ? block - 1 - t : t;
            for (unsigned live = block; live > 0;) {
                if (order == kShuffled) std::shuffle(schedule.begin(), schedule.end(), rng);
                l.progressed = false;
                live = 0;
                for (unsigned t : schedule) {
                    Fiber& f = l.fibers[t];
                    if (f.done) continue;
                    l.current = &f;
                    swapcontext(&l.scheduler, &f.ctx);
                    if (!l.error.empty()) throw std::runtime_error(l.error);
                    if (!f.done) ++live;
                }
                if (live > 0 && !l.progressed)
                    throw std::runtime_error("emulator: deadlock in block " + std::to_string(l.block_idx.x) + ": " +
                                             std::to_string(live) +
                                             " thread(s) wait at a barrier the others never reach");
            }
        }
    } catch (...) {
        active() = nullptr;
        throw;
    }
    active() = nullptr;
}

}  // namespace emu

// ------------------------------------------------------------ CUDA's names
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

#define threadIdx (emu::self().thread_idx)
#define blockIdx (emu::active()->block_idx)
#define blockDim (emu::active()->block)
#define gridDim (emu::active()->grid)

inline void __syncthreads() { emu::arrive_and_wait(emu::active()->block_barrier); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
    emu::require_full_mask(mask);
    emu::arrive_and_wait(emu::active()->warp_barriers[emu::warp_id()]);
}
template <typename T>
T __shfl_sync(unsigned mask, T value, int src_lane, int width = 32) {
    emu::require_full_mask(mask);
    if (width != 32) throw std::logic_error("emulator: only width-32 shuffles are supported");
    return emu::shuffle(value, src_lane);
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = 32) {
    emu::require_full_mask(mask);
    if (width != 32) throw std::logic_error("emulator: only width-32 shuffles are supported");
    return emu::shuffle(value, emu::lane_id() ^ lane_mask);
}

template <typename T>
inline T __ldg(const T* p) { return *p; }
inline float __int_as_float(int i) {
    float f;
    std::memcpy(&f, &i, sizeof f);
    return f;
}
inline int __float_as_int(float f) {
    int i;
    std::memcpy(&i, &f, sizeof i);
    return i;
}
// CUDA overloads min/max for every arithmetic type; one template does the same
// without narrowing (an int-only pair would silently truncate a long long).
template <typename A, typename B>
inline std::common_type_t<A, B> min(A a, B b) {
    return a < b ? a : b;
}
template <typename A, typename B>
inline std::common_type_t<A, B> max(A a, B b) {
    return a > b ? a : b;
}
