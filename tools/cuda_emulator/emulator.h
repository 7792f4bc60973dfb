// A CPU stand-in for the parts of CUDA's execution model deepcore's kernels
// use, so kernels/*.cu run (slowly, exactly) on machines without a GPU.
//
// Every CUDA thread of a block is a fiber (ucontext) with its own stack; the
// block's fibers run on one OS thread and switch only at barriers and (by
// default) warp shuffles, where CUDA lets threads observe each other. Blocks
// run one after another, so `__shared__` becomes a function-local static.
//
// Thread-block clusters (Options::cluster_blocks = K > 1, a kernel's
// __cluster_dims__(K, 1, 1); 1-D grids only, a multiple of K): the K blocks of a
// cluster (blockIdx.x / K) run together, their K x blockDim fibers in one scheduler
// (in `order` over all of them), each block with its own barriers and dynamic shared
// memory; cooperative_groups' cluster_group (include/cooperative_groups.h) gives
// block_rank() = blockIdx.x % K, sync() (a barrier of the cluster's threads, a
// deadlock reported as for __syncthreads) and map_shared_rank(), a pointer into
// another block's dynamic shared memory. A block's dynamic shared memory is poisoned
// again once all its threads have exited, and mapping an exited block's is an error
// (CUDA leaves both undefined). A static __shared__ would be one variable for the
// whole cluster here, so declaring one in a cluster launch throws: a cluster kernel
// keeps its shared memory in EMU_DYNAMIC_SHARED. What this
// checks that a compile cannot: indexing, every element written, reductions,
// barrier placement (a barrier some threads never reach is reported as a
// deadlock instead of hanging), and, by running the threads of a block in
// different orders, accesses that depend on unsynchronised ordering.
// What it cannot check: timing, the memory model between barriers beyond the
// two extremes below, occupancy, or CUDA's device math library (host
// expf/logf stand in for the device ones).
//
// Warp shuffles (Options::shuffles):
// - kShufflesMeet (default): a shuffle is a switch point where the whole warp
//   meets, so it orders memory like a __syncwarp(). On a GPU it orders nothing,
//   so a missing __syncwarp() between one lane's read and another lane's
//   aliasing write does not show in this mode.
// - kShufflesReplay: shuffles order nothing. Every thread runs from one barrier
//   (__syncwarp/__syncthreads) to the next without a switch, the threads one
//   after another in `order`, and each shuffle returns the value it returned in
//   an earlier kShufflesRecord launch of the same kernel on the same inputs (the
//   caller runs that first, on copies of the buffers the kernel writes). With
//   reverse or shuffled order, a lane that reads memory another lane of its
//   warp overwrites without a barrier in between then reads the new value, as
//   a GPU may. A thread whose shuffles send other values than they did when
//   recorded, or that shuffles a different number of times, is reported.
//
// Options::first_block/last_block run only blocks [first, last) of the grid
// (blockIdx and gridDim stay those of the whole launch), to reach one block of
// a huge grid: the other blocks' work is simply not done.
//
// __shared__ memory is a function-local static: a block starts with what the
// previous block left, not with garbage, so a read before the first write may
// pass here. Dynamic shared memory (Options::dynamic_shared_bytes, declared in a
// kernel with EMU_DYNAMIC_SHARED(T, name), which a .cu uses where it would write
// `extern __shared__ T name[]`) is poisoned with 0xff bytes (NaN in every float
// type) at the start of every block, and followed by a guard zone that is checked
// after every block: a write past its end is reported.
//
// Atomics (atomicAdd, atomicInc) are plain read-modify-writes and __threadfence()
// does nothing: blocks run one after another, so what they order is already
// ordered. A kernel that waits for another block (a spin on a flag another block
// sets) can therefore never finish here; the emulator has no such wait.
#pragma once

#include <algorithm>
#include <climits>
#include <cmath>
#include <memory>
#include <math.h>  // expf, logf, fmaxf in the global namespace, as CUDA has them
#include <cstdint>
#include <cstring>
#include <random>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
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

// One 32-bit word per shuffle: what the thread sent and what it received.
using ShuffleRecord = std::vector<std::pair<std::uint32_t, std::uint32_t>>;

struct Fiber {
    ucontext_t ctx;
    std::unique_ptr<char[]> stack;  // uninitialised: a cluster launch has thousands of fibers
    size_t stack_bytes = 0;
    dim3 thread_idx;
    dim3 block_idx;
    unsigned slot = 0;  // the block's place in its cluster (its rank), 0 without clusters
    bool done = false;
    ShuffleRecord* shuffles = nullptr;  // this thread's record (kShufflesRecord / kShufflesReplay)
    size_t n_shuffles = 0;              // shuffles done so far in this block
};

enum Order { kForward = 0, kReverse = 1, kShuffled = 2 };
enum Shuffles { kShufflesMeet = 0, kShufflesRecord = 1, kShufflesReplay = 2 };

// Every thread's shuffles of one launch, indexed (block - first_block) * blockDim + thread.
struct ShuffleLog {
    std::vector<ShuffleRecord> threads;
};

struct Options {
    Order order = kForward;
    unsigned seed = 0;
    unsigned first_block = 0;         // run blocks [first_block, min(last_block, grid)) only
    unsigned last_block = UINT_MAX;
    Shuffles shuffles = kShufflesMeet;
    ShuffleLog* log = nullptr;        // written by kShufflesRecord, read by kShufflesReplay
    size_t stack_bytes = 64 * 1024;
    size_t dynamic_shared_bytes = 0;  // the launch's dynamic shared memory per block
    unsigned cluster_blocks = 1;      // blocks per cluster: the kernel's __cluster_dims__(K, 1, 1)
};

constexpr size_t kDynamicSharedGuard = 64;
constexpr unsigned char kDynamicSharedGuardByte = 0xa5;

struct Launch {
    dim3 grid, block;
    unsigned cluster_blocks = 1;
    Shuffles shuffles = kShufflesMeet;
    std::vector<Fiber> fibers;              // cluster_blocks x block, block by block
    std::vector<Barrier> warp_barriers;     // per block of the cluster, per warp
    std::vector<float> warp_slots;          // one float per lane, for shuffles
    std::vector<unsigned char> dynamic_shared;  // per block: 16 bytes of slack for alignment, the buffer, its guard
    std::vector<unsigned char*> dynamic_shared_base;  // per block of the cluster
    std::vector<unsigned> live_threads;     // per block of the cluster: threads not yet exited
    size_t dynamic_shared_bytes = 0;
    std::vector<Barrier> block_barriers;    // per block of the cluster
    Barrier cluster_barrier;
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

inline std::string where() {
    return "block " + std::to_string(self().block_idx.x) + " thread " + std::to_string(self().thread_idx.x);
}

template <typename T>
T shuffle(T value, int src_lane) {
    static_assert(sizeof(T) == sizeof(float), "emulator: 32-bit shuffles only");
    Launch& l = *active();
    Fiber& f = self();
    std::uint32_t sent;
    std::memcpy(&sent, &value, sizeof sent);
    if (l.shuffles == kShufflesReplay) {
        // No switch: the warp does not meet here, so nothing orders memory.
        const ShuffleRecord& rec = *f.shuffles;
        if (f.n_shuffles >= rec.size())
            throw std::runtime_error("emulator: " + where() + " shuffles more often than when recorded");
        const auto [was_sent, received] = rec[f.n_shuffles];
        if (sent != was_sent)
            throw std::runtime_error("emulator: " + where() + ": shuffle #" + std::to_string(f.n_shuffles) +
                                     " sends another value than when shuffles met: the thread read memory "
                                     "that another thread wrote with no barrier in between");
        ++f.n_shuffles;
        T out;
        std::memcpy(&out, &received, sizeof out);
        return out;
    }
    const int w = static_cast<int>(f.slot * (l.block.x / 32)) + warp_id();
    float* slots = l.warp_slots.data() + 32 * w;
    std::memcpy(&slots[lane_id()], &value, sizeof(T));
    arrive_and_wait(l.warp_barriers[w]);  // every lane has published its value
    T out;
    std::memcpy(&out, &slots[src_lane & 31], sizeof(T));
    arrive_and_wait(l.warp_barriers[w]);  // every lane has read before the slots are reused
    if (l.shuffles == kShufflesRecord) {
        std::uint32_t received;
        std::memcpy(&received, &out, sizeof received);
        f.shuffles->emplace_back(sent, received);
    }
    return out;
}

// CUDA's lane of a shuffle with `width` (a power of two <= 32): each aligned
// group of `width` lanes shuffles among itself.
inline void require_width(int width) {
    if (width < 1 || width > 32 || (width & (width - 1)) != 0)
        throw std::logic_error("emulator: shuffle width must be a power of two in [1, 32], got " +
                               std::to_string(width));
}

inline int shfl_src_lane(int src_lane, int width) {
    require_width(width);
    const int lane = lane_id();
    return (lane & ~(width - 1)) + (src_lane & (width - 1));
}

// __shfl_xor_sync: a lane of a later group than the caller's returns the caller's own value.
inline int shfl_xor_src_lane(int lane_mask, int width) {
    require_width(width);
    const int lane = lane_id();
    const int src = lane ^ lane_mask;
    return src >= (lane & ~(width - 1)) + width ? lane : (src & 31);
}

inline unsigned char* dynamic_shared() {
    Launch& l = *active();
    if (l.dynamic_shared_bytes == 0)
        throw std::logic_error("emulator: the kernel uses dynamic shared memory but the launch gave it none");
    return l.dynamic_shared_base[self().slot];
}

inline Barrier& block_barrier() { return active()->block_barriers[self().slot]; }
inline Barrier& warp_barrier() {
    Launch& l = *active();
    return l.warp_barriers[self().slot * (l.block.x / 32) + warp_id()];
}

// Evaluated wherever a kernel declares a static __shared__ variable (see the top of the file).
inline int static_shared_declared() {
    Launch* l = active();
    if (l != nullptr && l->cluster_blocks > 1)
        throw std::logic_error("emulator: " + where() + " declares a static __shared__ variable in a cluster "
                               "launch, where the cluster's blocks would share it: use dynamic shared memory");
    return 0;
}

// cooperative_groups::cluster_group, for include/cooperative_groups.h.
inline unsigned cluster_block_rank() { return self().block_idx.x % active()->cluster_blocks; }
inline void cluster_sync() { arrive_and_wait(active()->cluster_barrier); }
inline void* map_shared_rank(const void* addr, int rank, size_t size) {
    Launch& l = *active();
    if (rank < 0 || static_cast<unsigned>(rank) >= l.cluster_blocks)
        throw std::logic_error("emulator: " + where() + ": map_shared_rank to rank " + std::to_string(rank) +
                               " of a cluster of " + std::to_string(l.cluster_blocks));
    const unsigned char* own = l.dynamic_shared_base[self().slot];
    const auto* p = static_cast<const unsigned char*>(addr);
    if (l.dynamic_shared_bytes < size || p < own || p > own + (l.dynamic_shared_bytes - size))
        throw std::logic_error("emulator: " + where() + ": map_shared_rank of an address outside the block's "
                               "dynamic shared memory (the only shared memory mapped here)");
    if (l.live_threads[rank] == 0)
        throw std::runtime_error("emulator: " + where() + " maps the shared memory of cluster rank " +
                                 std::to_string(rank) + ", whose block has exited");
    return l.dynamic_shared_base[rank] + (p - own);
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
    f.ctx.uc_stack.ss_sp = f.stack.get();
    f.ctx.uc_stack.ss_size = f.stack_bytes;
    f.ctx.uc_link = link;
    makecontext(&f.ctx, fiber_entry, 0);
}

// Run body(arg) as `grid` x `block` CUDA threads (x dimension only), blocks (or
// clusters of opts.cluster_blocks blocks) one after another and the threads of each in
// `opts.order` between switches. Throws std::runtime_error on a deadlock (a barrier some
// threads never reach).
inline void launch(unsigned grid, unsigned block, const Options& opts, void (*body)(void*), void* arg) {
    if (block == 0 || block % 32 != 0 || block > 1024)
        throw std::invalid_argument("emulator: block size must be a multiple of 32 in [32, 1024], got " +
                                    std::to_string(block));
    const unsigned k = opts.cluster_blocks;
    if (k == 0 || k > 8) throw std::invalid_argument("emulator: cluster size must be in [1, 8], got " + std::to_string(k));
    if (grid % k != 0)
        throw std::invalid_argument("emulator: the grid of " + std::to_string(grid) +
                                    " blocks is not a multiple of the kernel's cluster size " + std::to_string(k) +
                                    " (a GPU refuses this launch)");
    const unsigned first = opts.first_block, last = std::min(opts.last_block, grid);
    if (first > last)
        throw std::invalid_argument("emulator: first block " + std::to_string(first) + " lies past the grid's " +
                                    std::to_string(last));
    if (first % k != 0 || last % k != 0)
        throw std::invalid_argument("emulator: blocks [" + std::to_string(first) + ", " + std::to_string(last) +
                                    ") do not start and end on clusters of " + std::to_string(k));
    if (opts.shuffles != kShufflesMeet && opts.log == nullptr)
        throw std::invalid_argument("emulator: recording or replaying shuffles needs a ShuffleLog");
    if (active() != nullptr) throw std::logic_error("emulator: nested launch");
    const size_t n_threads = static_cast<size_t>(last - first) * block;
    if (opts.shuffles == kShufflesRecord) opts.log->threads.assign(n_threads, ShuffleRecord{});
    if (opts.shuffles == kShufflesReplay && opts.log->threads.size() != n_threads)
        throw std::invalid_argument("emulator: the shuffle log was recorded for another launch shape");
    Launch l;
    l.grid.x = grid;
    l.block.x = block;
    l.cluster_blocks = k;
    l.shuffles = opts.shuffles;
    l.body = body;
    l.arg = arg;
    const unsigned nwarps = block / 32;
    const unsigned n_fibers = k * block;
    l.fibers.resize(n_fibers);
    for (auto& f : l.fibers) {
        f.stack.reset(new char[opts.stack_bytes]);
        f.stack_bytes = opts.stack_bytes;
    }
    l.warp_barriers.resize(static_cast<size_t>(k) * nwarps);
    l.warp_slots.assign(32 * static_cast<size_t>(k) * nwarps, 0.f);
    l.block_barriers.resize(k);
    l.live_threads.assign(k, 0);
    l.dynamic_shared_bytes = opts.dynamic_shared_bytes;
    const size_t stride = (opts.dynamic_shared_bytes + kDynamicSharedGuard + 15) / 16 * 16;
    l.dynamic_shared.assign(stride * k + 16, 0);
    {
        auto p = reinterpret_cast<std::uintptr_t>(l.dynamic_shared.data());
        unsigned char* base = l.dynamic_shared.data() + (16 - p % 16) % 16;
        for (unsigned r = 0; r < k; ++r) l.dynamic_shared_base.push_back(base + r * stride);
    }
    auto block_name = [&](unsigned slot, unsigned c) {
        return std::to_string(c * k + slot);
    };
    std::mt19937 rng(opts.seed);
    std::vector<unsigned> schedule(n_fibers);
    active() = &l;
    try {
        for (unsigned ci = first / k; ci < last / k; ++ci) {
            const unsigned c = opts.order == kReverse ? first / k + last / k - 1 - ci : ci;  // the cluster
            for (auto& b : l.warp_barriers) b = Barrier{32, 0, 0};
            for (unsigned r = 0; r < k; ++r) {
                std::memset(l.dynamic_shared_base[r], 0xff, l.dynamic_shared_bytes);
                std::memset(l.dynamic_shared_base[r] + l.dynamic_shared_bytes, kDynamicSharedGuardByte,
                            kDynamicSharedGuard);
                l.block_barriers[r] = Barrier{static_cast<int>(block), 0, 0};
                l.live_threads[r] = block;
            }
            l.cluster_barrier = Barrier{static_cast<int>(n_fibers), 0, 0};
            for (unsigned i = 0; i < n_fibers; ++i) {
                Fiber& f = l.fibers[i];
                f.done = false;
                f.slot = i / block;
                f.thread_idx.x = i % block;
                f.block_idx.x = c * k + f.slot;
                f.n_shuffles = 0;
                f.shuffles = opts.log != nullptr
                                 ? &opts.log->threads[static_cast<size_t>(f.block_idx.x - first) * block + i % block]
                                 : nullptr;
                start_fiber(f, &l.scheduler);
            }
            for (unsigned i = 0; i < n_fibers; ++i) schedule[i] = opts.order == kReverse ? n_fibers - 1 - i : i;
            for (unsigned live = n_fibers; live > 0;) {
                if (opts.order == kShuffled) std::shuffle(schedule.begin(), schedule.end(), rng);
                l.progressed = false;
                live = 0;
                for (unsigned i : schedule) {
                    Fiber& f = l.fibers[i];
                    if (f.done) continue;
                    l.current = &f;
                    swapcontext(&l.scheduler, &f.ctx);
                    if (!l.error.empty()) throw std::runtime_error(l.error);
                    if (!f.done) {
                        ++live;
                    } else if (--l.live_threads[f.slot] == 0 && k > 1) {
                        // The block has exited: what another block reads of its shared memory now is garbage.
                        std::memset(l.dynamic_shared_base[f.slot], 0xff, l.dynamic_shared_bytes);
                    }
                }
                if (live > 0 && !l.progressed)
                    throw std::runtime_error("emulator: deadlock in " +
                                             (k > 1 ? "cluster " + std::to_string(c) + " (blocks " +
                                                          block_name(0, c) + "-" + block_name(k - 1, c) + ")"
                                                    : "block " + block_name(0, c)) +
                                             ": " + std::to_string(live) +
                                             " thread(s) wait at a barrier the others never reach");
            }
            for (unsigned r = 0; r < k; ++r) {
                for (size_t i = 0; i < kDynamicSharedGuard; ++i)
                    if (l.dynamic_shared_base[r][l.dynamic_shared_bytes + i] != kDynamicSharedGuardByte)
                        throw std::runtime_error("emulator: block " + block_name(r, c) +
                                                 " wrote past the end of its " +
                                                 std::to_string(l.dynamic_shared_bytes) +
                                                 " bytes of dynamic shared memory");
            }
            if (opts.shuffles == kShufflesReplay)
                for (const Fiber& f : l.fibers)
                    if (f.n_shuffles != f.shuffles->size())
                        throw std::runtime_error("emulator: block " + std::to_string(f.block_idx.x) + " thread " +
                                                 std::to_string(f.thread_idx.x) +
                                                 " shuffles less often than when recorded");
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
// A static __shared__ variable: a function-local static, refused in a cluster launch.
#define EMU_CAT2(a, b) a##b
#define EMU_CAT(a, b) EMU_CAT2(a, b)
#define __shared__ [[maybe_unused]] const int EMU_CAT(emu_static_shared_, __COUNTER__) = emu::static_shared_declared(); static
#define __cluster_dims__(...)

#define threadIdx (emu::self().thread_idx)
#define blockIdx (emu::self().block_idx)
#define blockDim (emu::active()->block)
#define gridDim (emu::active()->grid)

inline void __syncthreads() { emu::arrive_and_wait(emu::block_barrier()); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
    emu::require_full_mask(mask);
    emu::arrive_and_wait(emu::warp_barrier());
}
template <typename T>
T __shfl_sync(unsigned mask, T value, int src_lane, int width = 32) {
    emu::require_full_mask(mask);
    return emu::shuffle(value, emu::shfl_src_lane(src_lane, width));
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = 32) {
    emu::require_full_mask(mask);
    return emu::shuffle(value, emu::shfl_xor_src_lane(lane_mask, width));
}

// `extern __shared__ T name[]`, which a host compiler cannot take: a pointer to the
// launch's dynamic shared memory (16-byte aligned, as CUDA's).
#define EMU_DYNAMIC_SHARED(T, name) T* const name = reinterpret_cast<T*>(emu::dynamic_shared())

// Blocks run one after another and a block's threads switch only at barriers and
// shuffles, so an atomic is a plain read-modify-write and a fence orders nothing more.
inline void __threadfence() {}
inline unsigned atomicInc(unsigned* address, unsigned val) {
    const unsigned old = *address;
    *address = old >= val ? 0u : old + 1u;
    return old;
}
inline unsigned atomicAdd(unsigned* address, unsigned val) {
    const unsigned old = *address;
    *address = old + val;
    return old;
}
inline int atomicAdd(int* address, int val) {
    const int old = *address;
    *address = static_cast<int>(static_cast<unsigned>(old) + static_cast<unsigned>(val));
    return old;
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
