// Fused softmax + cross-entropy forward and backward in ONE launch per call: the
// per-row losses, the "mean" denominator (when it depends on the labels), the
// final sum/mean and the gradient.
//
// For row i with label y, logits s (C entries), class weights w (all ones when
// class_weights is null) and label smoothing eps:
//   lse            = log(sum_k exp(s_k))
//   loss_row[i]    = (1-eps) w_y (lse - s_y) + (eps/C) sum_k w_k (lse - s_k)
//   grad[i,k]      = scale * (p_k ((1-eps) w_y + (eps/C) W) - (1-eps) w_y [k==y] - (eps/C) w_k)
// with p_k = exp(s_k - lse) and W = sum_k w_k. A row whose label equals
// ignore_index gets zeros; a label outside [0, C) gets NaN everywhere (and no
// out-of-bounds access) so an unchecked bad label cannot pass silently.
//
// Two kernels, one of which the host launches per call:
// - sce_on_chip: a block stages a tile of whole rows (rows_per_tile = blockDim /
//   threads_per_row consecutive rows, one contiguous range of memory) in dynamic
//   shared memory with 16-byte vector loads, so each logit is read from DRAM once;
//   threads_per_row (a power of two, 1...blockDim) threads reduce each row (segmented
//   warp shuffles up to 32, shared memory across warps above), write the gradient
//   back into the tile, and the block stores the tile with 16-byte vector stores.
//   Small C (MNIST's 10) thus runs hundreds of rows per block; rows up to the device's
//   shared-memory limit run a block per row.
// - sce_two_pass: rows longer than shared memory holds, a block per row, read twice
//   (the second read from L2 at best).
//
// scale: the host passes 1 ("sum"/"none") or 1/N ("mean" without class weights or
// ignore_index, where the denominator is the row count). For "mean" with either,
// every block first reduces sum w_y over the labels itself (reduction ==
// kMeanOfLabels), in a fixed order, so all blocks hold the same bits of 1/denominator
// before writing any gradient; an out-of-range label makes it NaN, every row ignored
// makes it 1/0 = inf (and the mean 0 * inf = NaN, as in PyTorch).
//
// The final sum or mean ("sum"/"mean") is deterministic: each block writes its
// partial (its rows' losses in a fixed order) to partials[blockIdx.x], fences, and
// takes a ticket (atomicInc, which wraps the counter back to 0 at the last block);
// the last block sums the partials in block order and writes the 0-d result.
//
// Compiled at run time by NVRTC (cupy.RawModule) and by nvcc for the CI compile
// check, so the only headers are the two NVRTC can always find.
//
// `grad` may be the same buffer as `logits`: a caller whose logits are dead after
// the loss can pass it twice and save an N x C allocation. So neither pointer is
// __restrict__ nor read through the read-only cache. sce_on_chip reads a tile
// completely before a block barrier and writes it only after; sce_two_pass passes a
// block barrier between a row's last read and its first write (after it, a thread
// reads only the elements it then overwrites itself).

#include <cuda_fp16.h>
#include <cuda_bf16.h>

// sce_cluster needs thread-block clusters (sm_90+) and cooperative_groups' cluster_group: it
// exists where both do (the host pass of nvcc included, so that its instances can be named).
// Every other kernel compiles without the header (sm_80, or an NVRTC that cannot find it).
#if (!defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900) && __has_include(<cooperative_groups.h>)
#define SCE_HAS_CLUSTER 1
#include <cooperative_groups.h>
#endif

// Dynamic shared memory. The CPU emulator (tools/cuda_emulator/emulator.h), which
// cannot spell `extern __shared__`, defines EMU_DYNAMIC_SHARED itself.
#ifdef EMU_DYNAMIC_SHARED
#define SCE_DYNAMIC_SHARED(T, name) EMU_DYNAMIC_SHARED(T, name)
#else
#define SCE_DYNAMIC_SHARED(T, name) extern __shared__ __align__(16) T name[]
#endif

namespace sce {

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;
// Both kernels' largest block, mirrored in deepcore/backend/cuda_kernels.py. No
// min-blocks hint: ptxas takes the registers the code needs (up to 128 at 512
// threads), so occupancy is what the registers and the tile's shared memory allow.
constexpr int kThreads = 512;
constexpr int kMaxWarps = kThreads / kWarp;

// sce_cluster: blocks per cluster (__cluster_dims__; 8 is the portable maximum), and the bytes
// at the front of its dynamic shared memory before the row's slice (sce::ClusterShared).
// Mirrored in deepcore/backend/cuda_kernels.py.
constexpr int kClusterBlocks = 8;
constexpr int kClusterHeaderBytes = 512;

// `reduction`, as the host passes it.
constexpr int kNone = 0;          // loss[row] per row, in T
constexpr int kSum = 1;           // *loss = sum of rows (scale is 1)
constexpr int kMean = 2;          // *loss = scale * sum, scale = 1/N from the host
constexpr int kMeanOfLabels = 3;  // *loss = sum / sum w_y, the denominator reduced in the kernel

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }
__device__ __forceinline__ float quiet_nan() { return __int_as_float(0x7fffffff); }

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
    return __float2bfloat16_rn(x);
}

// 16-byte vector of T so one load/store instruction moves 4 floats or 8 halves.
template <typename T>
struct alignas(16) Vec16 {
    static constexpr int N = 16 / sizeof(T);
    T v[N];
};

// Online softmax statistics of the elements one thread (or a merged group) has seen:
//   m  = max s_k, se = sum exp(s_k - m), ws = sum w_k, sw = sum w_k (s_k - m).
// sw is kept relative to the running max (and corrected when the max moves)
// because sum w_k s_k - W lse cancels catastrophically for logits around 1e4.
struct RowStats {
    float m, se, sw, ws;
};

__device__ __forceinline__ RowStats stats_identity() {
    RowStats s;
    s.m = neg_inf();
    s.se = 0.f;
    s.sw = 0.f;
    s.ws = 0.f;
    return s;
}

// s - m, with -inf kept as -inf: when the running max is itself -inf (every
// element so far was -inf) the plain difference would be NaN.
__device__ __forceinline__ float shifted(float x, float m) { return x == neg_inf() ? neg_inf() : x - m; }

// Add N elements at once: rescale by the chunk's max first, so a chunk costs
// one extra exp at most instead of one per element.
template <int N>
__device__ __forceinline__ void stats_add(RowStats& s, const float (&x)[N], const float (&w)[N], bool smooth) {
    float cm = x[0];
#pragma unroll
    for (int j = 1; j < N; ++j) cm = fmaxf(cm, x[j]);
    if (cm > s.m) {
        const float d = s.m - cm;  // <= 0, -inf when nothing finite was seen yet
        s.se *= expf(d);           // se is 0 whenever d is -inf, exp(-inf) = 0
        // ws == 0 means nothing weighted was seen: skip, 0 * -inf would be NaN.
        if (smooth && s.ws != 0.f) s.sw += s.ws * d;
        s.m = cm;
    }
#pragma unroll
    for (int j = 0; j < N; ++j) {
        const float dx = shifted(x[j], s.m);
        s.se += expf(dx);
        if (smooth) {
            s.sw += w[j] * dx;
            s.ws += w[j];
        }
    }
}

// Written symmetrically in (a, b) so the xor butterfly does the same work on
// both partners; the group's first lane's result is broadcast afterwards anyway.
__device__ __forceinline__ RowStats stats_merge(const RowStats& a, const RowStats& b, bool smooth) {
    RowStats r;
    r.m = fmaxf(a.m, b.m);
    // exp(-inf - -inf) would be NaN: an empty or all -inf side with the same max scales by 1.
    const float fa = a.m == r.m ? 1.f : expf(a.m - r.m);
    const float fb = b.m == r.m ? 1.f : expf(b.m - r.m);
    r.se = a.se * fa + b.se * fb;
    if (smooth) {
        const float ca = (a.m == r.m || a.ws == 0.f) ? 0.f : a.ws * (a.m - r.m);
        const float cb = (b.m == r.m || b.ws == 0.f) ? 0.f : b.ws * (b.m - r.m);
        r.sw = (a.sw + ca) + (b.sw + cb);
        r.ws = a.ws + b.ws;
    } else {
        r.sw = 0.f;
        r.ws = 0.f;
    }
    return r;
}

// Butterfly over each aligned group of `width` lanes (a power of two <= 32; every
// lane of the warp takes part).
__device__ __forceinline__ RowStats group_allreduce(RowStats s, bool smooth, int width) {
    for (int off = 1; off < width; off <<= 1) {
        RowStats o;
        o.m = __shfl_xor_sync(kFullMask, s.m, off, width);
        o.se = __shfl_xor_sync(kFullMask, s.se, off, width);
        if (smooth) {
            o.sw = __shfl_xor_sync(kFullMask, s.sw, off, width);
            o.ws = __shfl_xor_sync(kFullMask, s.ws, off, width);
        } else {
            o.sw = 0.f;
            o.ws = 0.f;
        }
        s = stats_merge(s, o, smooth);
    }
    return s;
}

// The group's first lane's statistics in every lane of the group (lanes may differ
// in the last bit after the butterfly, where a product was contracted into an FMA).
__device__ __forceinline__ RowStats group_broadcast(RowStats s, bool smooth, int width) {
    s.m = __shfl_sync(kFullMask, s.m, 0, width);
    s.se = __shfl_sync(kFullMask, s.se, 0, width);
    if (smooth) {
        s.sw = __shfl_sync(kFullMask, s.sw, 0, width);
        s.ws = __shfl_sync(kFullMask, s.ws, 0, width);
    }
    return s;
}

// Everything the write pass needs, with `scale` already folded in.
struct GradCoef {
    float m;       // row max
    float logse;   // lse - m
    float a;       // scale * ((1-eps) w_y + (eps/C) W)
    float b;       // scale * (1-eps) w_y, subtracted at k == y
    float c;       // scale * eps/C, times w_k
};

// Loss of a valid row from its reduced statistics.
__device__ __forceinline__ float row_loss(const RowStats& s, float sy, float wy, float eps, float eps_c, bool smooth) {
    const float logse = logf(s.se);
    // (m - s_y) + logse rather than lse - s_y keeps the digits of lse - m at large |m|.
    const float nll = (s.m - sy) + logse;
    if (!smooth) return wy * nll;  // eps == 0: an infinite smoothing sum must not turn into 0 * inf
    // sum_k w_k (lse - s_k) = W (lse - m) - sum_k w_k (s_k - m)
    const float smooth_sum = s.ws * logse - s.sw;
    return (1.f - eps) * wy * nll + eps_c * smooth_sum;
}

__device__ __forceinline__ GradCoef grad_coef(float m, float logse, float ws, float wy, float eps, float eps_c,
                                              float scale, bool smooth) {
    GradCoef g;
    g.m = m;
    g.logse = logse;
    const float b = (1.f - eps) * wy;
    g.a = scale * (smooth ? b + eps_c * ws : b);
    g.b = scale * b;
    g.c = smooth ? scale * eps_c : 0.f;
    return g;
}

__device__ __forceinline__ float grad_at(const GradCoef& g, float x, float wk, bool is_label) {
    const float p = expf(shifted(x, g.m) - g.logse);
    float r = p * g.a - g.c * wk;
    if (is_label) r -= g.b;
    return r;
}

__device__ __forceinline__ float class_weight(const float* __restrict__ w, long long k) {
    return w != nullptr ? __ldg(w + k) : 1.f;
}

// Sum of one float per thread over the block, the same bits in every thread: a xor
// butterfly per warp (a + b == b + a exactly, so every lane ends equal), then the
// warps' sums in warp order. Every thread of the block must call it.
__device__ __forceinline__ float block_sum(float v, float* warp_sums) {
#pragma unroll
    for (int off = kWarp / 2; off > 0; off >>= 1) v += __shfl_xor_sync(kFullMask, v, off);
    const int nwarps = blockDim.x / kWarp;
    if (threadIdx.x % kWarp == 0) warp_sums[threadIdx.x / kWarp] = v;
    __syncthreads();
    float total = warp_sums[0];
    for (int w = 1; w < nwarps; ++w) total += warp_sums[w];
    __syncthreads();  // warp_sums may be written again by the next call
    return total;
}

// 1 / sum_rows w_y with w_y = 0 for an ignored row, NaN for a label outside [0, C):
// each block reduces every label itself (N labels against its share of N x C logits),
// in the same order, so every block holds the same bits.
template <typename L>
__device__ float scale_from_labels(const L* __restrict__ labels, long long n_rows, const float* __restrict__ w,
                                   int n_classes, long long ignore_index, float* warp_sums) {
    float acc = 0.f;
    for (long long i = threadIdx.x; i < n_rows; i += blockDim.x) {
        const long long y = static_cast<long long>(labels[i]);
        acc += y == ignore_index ? 0.f : (y < 0 || y >= n_classes) ? quiet_nan() : class_weight(w, y);
    }
    return 1.f / block_sum(acc, warp_sums);
}

// The block's share of the sum (`v` per thread), then, in the block that takes the last
// ticket, the sum of every block's share in block order, times scale, into *out.
// `last_block` is one int of the block's shared memory.
template <typename T>
__device__ void finish_total(float v, float scale, float* __restrict__ partials, unsigned* __restrict__ ticket,
                             T* out, float* warp_sums, int* last_block) {
    const float block_total = block_sum(v, warp_sums);
    if (threadIdx.x == 0) {
        partials[blockIdx.x] = block_total;
        __threadfence();  // the partial is visible to every block before the ticket is
        // atomicInc wraps to 0 when it reaches gridDim.x - 1: ready for the next launch.
        *last_block = atomicInc(ticket, gridDim.x - 1) == gridDim.x - 1;
    }
    __syncthreads();
    if (!*last_block) return;
    __threadfence();
    const volatile float* shares = partials;  // written by other blocks: never from a stale L1 line
    float acc = 0.f;
    // Thread t sums blocks t, t + blockDim, ... in order; block_sum then adds the threads in order.
    for (unsigned b = threadIdx.x; b < gridDim.x; b += blockDim.x) acc += shares[b];
    const float total = block_sum(acc, warp_sums);
    if (threadIdx.x == 0) *out = from_float<T>(total * scale);
}

}  // namespace sce

// Rows staged on chip: see the top of the file. threads_per_row is a power of two
// dividing blockDim.x; the dynamic shared memory holds (rows_per_tile * C + 16 /
// sizeof(T)) elements of T (the host sizes it).
template <typename T, typename L>
__global__ void __launch_bounds__(sce::kThreads)
sce_on_chip(const T* logits, const L* __restrict__ labels, const float* __restrict__ class_weights, T* grad,
            T* loss, float* __restrict__ partials, unsigned* __restrict__ ticket, long long n_rows, int n_classes,
            long long ignore_index, float label_smoothing, float scale, int reduction, int threads_per_row) {
    using namespace sce;
    using V = Vec16<T>;
    constexpr int VN = V::N;
    // One type for every instance: CUDA allows a single declaration of an extern __shared__ array.
    SCE_DYNAMIC_SHARED(unsigned char, tile_storage);
    T* const tile = reinterpret_cast<T*>(tile_storage);
    __shared__ float warp_sums[kMaxWarps];
    __shared__ float group_stats[4][kMaxWarps];
    __shared__ int last_block;

    const int tid = threadIdx.x;
    const int nthreads = blockDim.x;
    const int tpr = threads_per_row;
    const int rows_per_tile = nthreads / tpr;
    const int r = tid / tpr;  // this thread's row in the tile
    const int q = tid % tpr;  // and its place among the row's threads
    const int lane = tid % kWarp;
    const int warp = tid / kWarp;
    const bool smooth = label_smoothing != 0.f;
    const float eps = label_smoothing;
    const float eps_c = label_smoothing / static_cast<float>(n_classes);
    const float sc = reduction == kMeanOfLabels
                         ? scale_from_labels(labels, n_rows, class_weights, n_classes, ignore_index, warp_sums)
                         : scale;
    float loss_sum = 0.f;  // this thread's rows (q == 0 only), in tile order

    const long long n_tiles = (n_rows + rows_per_tile - 1) / rows_per_tile;
    for (long long t = blockIdx.x; t < n_tiles; t += gridDim.x) {
        const long long row0 = t * rows_per_tile;
        const int rows = static_cast<int>(min(static_cast<long long>(rows_per_tile), n_rows - row0));
        const long long base = row0 * static_cast<long long>(n_classes);
        const T* x = logits + base;
        T* g = grad + base;
        const int n_el = rows * n_classes;

        // ---- load: element e of the tile goes to tile[mis + e], so the 16-byte vectors
        // between a scalar head and tail land on 16-byte boundaries of shared memory ----
        const int mis = static_cast<int>((reinterpret_cast<unsigned long long>(x) % 16) / sizeof(T));
        const int head = min(mis == 0 ? 0 : VN - mis, n_el);
        const int nvec = (n_el - head) / VN;
        const int tail = head + nvec * VN;
        if (tid < head) tile[mis + tid] = x[tid];
        const V* xvec = reinterpret_cast<const V*>(x + head);
        V* tvec = reinterpret_cast<V*>(tile + mis + head);
#pragma unroll 4
        for (int v = tid; v < nvec; v += nthreads) tvec[v] = xvec[v];
        for (int e = tail + tid; e < n_el; e += nthreads) tile[mis + e] = x[e];
        // Every read of this tile from global memory happens before this barrier, every write
        // to grad after the next: alias-safe.
        __syncthreads();

        // ---- each row: statistics from shared memory, reduced over the row's threads ----
        const bool in_tile = r < rows;
        const long long row = row0 + r;
        const long long y = in_tile ? static_cast<long long>(labels[row]) : ignore_index;
        const bool valid = in_tile && y != ignore_index && y >= 0 && y < n_classes;
        T* xs = tile + mis + r * n_classes;
        RowStats st = stats_identity();
        float sy = 0.f;
        if (valid) {
            int k = q;
            for (; k + 3 * tpr < n_classes; k += 4 * tpr) {
                const float xv[4] = {to_float(xs[k]), to_float(xs[k + tpr]), to_float(xs[k + 2 * tpr]),
                                     to_float(xs[k + 3 * tpr])};
                const float wv[4] = {smooth ? class_weight(class_weights, k) : 1.f,
                                     smooth ? class_weight(class_weights, k + tpr) : 1.f,
                                     smooth ? class_weight(class_weights, k + 2 * tpr) : 1.f,
                                     smooth ? class_weight(class_weights, k + 3 * tpr) : 1.f};
                stats_add<4>(st, xv, wv, smooth);
            }
            for (; k < n_classes; k += tpr) {
                const float xv[1] = {to_float(xs[k])};
                const float wv[1] = {smooth ? class_weight(class_weights, k) : 1.f};
                stats_add<1>(st, xv, wv, smooth);
            }
            if (q == 0) sy = to_float(xs[y]);
        }
        if (tpr <= kWarp) {
            st = group_broadcast(group_allreduce(st, smooth, tpr), smooth, tpr);
            // Orders the first lane's read of s_y before the other lanes overwrite the row with
            // its gradient below. The shuffles around it do not: they order no memory.
            __syncwarp();
        } else {
            st = group_allreduce(st, smooth, kWarp);
            if (lane == 0) {
                group_stats[0][warp] = st.m;
                group_stats[1][warp] = st.se;
                group_stats[2][warp] = st.sw;
                group_stats[3][warp] = st.ws;
            }
            // Also orders the read of s_y before the row's gradient overwrites it.
            __syncthreads();
            // Every thread of the row merges the row's warps in the same order: the same bits.
            const int first = (r * tpr) / kWarp;
            st.m = group_stats[0][first];
            st.se = group_stats[1][first];
            st.sw = group_stats[2][first];
            st.ws = group_stats[3][first];
            for (int w = first + 1; w < first + tpr / kWarp; ++w) {
                RowStats o;
                o.m = group_stats[0][w];
                o.se = group_stats[1][w];
                o.sw = group_stats[2][w];
                o.ws = group_stats[3][w];
                st = stats_merge(st, o, smooth);
            }
        }

        // ---- the row's gradient, into the tile over its logits (each thread its own elements) ----
        if (valid) {
            const float wy = class_weight(class_weights, y);
            const GradCoef coef = grad_coef(st.m, logf(st.se), st.ws, wy, eps, eps_c, sc, smooth);
            for (int k = q; k < n_classes; k += tpr) {
                const float wk = smooth ? class_weight(class_weights, k) : 0.f;
                xs[k] = from_float<T>(grad_at(coef, to_float(xs[k]), wk, k == y));
            }
            if (q == 0) {
                const float lr = row_loss(st, sy, wy, eps, eps_c, smooth);
                if (reduction == kNone) loss[row] = from_float<T>(lr);
                else loss_sum += lr;
            }
        } else if (in_tile) {
            const float fill = y == ignore_index ? 0.f : quiet_nan();
            for (int k = q; k < n_classes; k += tpr) xs[k] = from_float<T>(fill);
            if (q == 0) {
                if (reduction == kNone) loss[row] = from_float<T>(fill);
                else loss_sum += fill;
            }
        }
        __syncthreads();

        // ---- store: 16-byte vectors where grad's rows share the logits' alignment (always when
        // grad aliases logits, and for fresh buffers whenever the input is 16-byte aligned) ----
        if ((reinterpret_cast<unsigned long long>(g) % 16) == (reinterpret_cast<unsigned long long>(x) % 16)) {
            if (tid < head) g[tid] = tile[mis + tid];
            V* gvec = reinterpret_cast<V*>(g + head);
#pragma unroll 4
            for (int v = tid; v < nvec; v += nthreads) gvec[v] = tvec[v];
            for (int e = tail + tid; e < n_el; e += nthreads) g[e] = tile[mis + e];
        } else {
            for (int e = tid; e < n_el; e += nthreads) g[e] = tile[mis + e];
        }
        __syncthreads();  // the next tile's loads overwrite the tile
    }
    if (reduction != kNone) finish_total(loss_sum, sc, partials, ticket, loss, warp_sums, &last_block);
}

// Rows too long for shared memory: one block per row (vocabularies of 64k-256k), read
// with 16-byte vector loads between a scalar head (up to the first 16-byte boundary)
// and a scalar tail, once for the statistics and once more for the gradient.
template <typename T, typename L>
__global__ void __launch_bounds__(sce::kThreads)
sce_two_pass(const T* logits, const L* __restrict__ labels, const float* __restrict__ class_weights, T* grad,
             T* loss, float* __restrict__ partials, unsigned* __restrict__ ticket, long long n_rows, int n_classes,
             long long ignore_index, float label_smoothing, float scale, int reduction) {
    using namespace sce;
    using V = Vec16<T>;
    constexpr int VN = V::N;
    __shared__ float warp_stats[4][kMaxWarps];
    __shared__ float row_stats[3];
    __shared__ float warp_sums[kMaxWarps];
    __shared__ int last_block;

    const int tid = threadIdx.x;
    const int nthreads = blockDim.x;
    const int lane = tid % kWarp;
    const int warp = tid / kWarp;
    const int nwarps = (nthreads + kWarp - 1) / kWarp;
    const bool smooth = label_smoothing != 0.f;
    const float eps = label_smoothing;
    const float eps_c = label_smoothing / static_cast<float>(n_classes);
    const bool has_w = class_weights != nullptr;
    const float sc = reduction == kMeanOfLabels
                         ? scale_from_labels(labels, n_rows, class_weights, n_classes, ignore_index, warp_sums)
                         : scale;
    float loss_sum = 0.f;  // thread 0 only, rows in order

    for (long long row = blockIdx.x; row < n_rows; row += gridDim.x) {
        const long long base = row * static_cast<long long>(n_classes);
        const T* x = logits + base;
        T* g = grad + base;
        const long long y = static_cast<long long>(labels[row]);

        if (y == ignore_index || y < 0 || y >= n_classes) {
            const float fill = y == ignore_index ? 0.f : quiet_nan();
            for (int k = tid; k < n_classes; k += nthreads) g[k] = from_float<T>(fill);
            if (tid == 0) {
                if (reduction == kNone) loss[row] = from_float<T>(fill);
                else loss_sum += fill;
            }
            continue;  // block-uniform: the whole block shares `y`
        }

        // Elements before the first 16-byte boundary of this row (0 when aligned).
        const int misaligned = static_cast<int>((reinterpret_cast<unsigned long long>(x) % 16) / sizeof(T));
        const int head = min(misaligned == 0 ? 0 : VN - misaligned, n_classes);
        const int nvec = (n_classes - head) / VN;
        const int tail = head + nvec * VN;

        // ---- read pass: online max / sum of exp / smoothing sum ----
        RowStats st = stats_identity();
        if (tid < head) {
            const float xv[1] = {to_float(x[tid])};
            const float wv[1] = {smooth ? class_weight(class_weights, tid) : 1.f};
            stats_add<1>(st, xv, wv, smooth);
        }
        const V* xvec = reinterpret_cast<const V*>(x + head);
        for (int v = tid; v < nvec; v += nthreads) {
            const V raw = xvec[v];
            float xv[VN];
            float wv[VN];
#pragma unroll
            for (int j = 0; j < VN; ++j) {
                xv[j] = to_float(raw.v[j]);
                wv[j] = (smooth && has_w) ? __ldg(class_weights + head + v * VN + j) : 1.f;
            }
            stats_add<VN>(st, xv, wv, smooth);
        }
        for (int k = tail + tid; k < n_classes; k += nthreads) {
            const float xv[1] = {to_float(x[k])};
            const float wv[1] = {smooth ? class_weight(class_weights, k) : 1.f};
            stats_add<1>(st, xv, wv, smooth);
        }
        const float sy = tid == 0 ? to_float(x[y]) : 0.f;

        // ---- block reduction: warp butterflies, then warp 0 over the per-warp partials ----
        st = group_allreduce(st, smooth, kWarp);
        if (lane == 0) {
            warp_stats[0][warp] = st.m;
            warp_stats[1][warp] = st.se;
            warp_stats[2][warp] = st.sw;
            warp_stats[3][warp] = st.ws;
        }
        // Also orders every read of this row (s_y included) before any write to an aliasing grad.
        __syncthreads();
        if (warp == 0) {
            RowStats t = stats_identity();
            if (lane < nwarps) {
                t.m = warp_stats[0][lane];
                t.se = warp_stats[1][lane];
                t.sw = warp_stats[2][lane];
                t.ws = warp_stats[3][lane];
            }
            t = group_allreduce(t, smooth, kWarp);
            if (lane == 0) {
                const float wy = class_weight(class_weights, y);
                const float lr = row_loss(t, sy, wy, eps, eps_c, smooth);
                if (reduction == kNone) loss[row] = from_float<T>(lr);
                else loss_sum += lr;
                row_stats[0] = t.m;
                row_stats[1] = t.se;
                row_stats[2] = t.ws;
            }
        }
        __syncthreads();
        // The next row's writes to warp_stats/row_stats happen only after its first barrier,
        // which every thread reaches after reading row_stats below, so no third barrier.

        // ---- write pass ----
        const float wy = class_weight(class_weights, y);
        const GradCoef coef = grad_coef(row_stats[0], logf(row_stats[1]), row_stats[2], wy, eps, eps_c, sc, smooth);
        const bool w_needed = smooth && has_w;
        if (tid < head) {
            const float wk = w_needed ? __ldg(class_weights + tid) : 1.f;
            g[tid] = from_float<T>(grad_at(coef, to_float(x[tid]), wk, tid == y));
        }
        // Vector stores need grad's row to share logits' alignment (always true
        // when grad aliases logits, and for fresh allocations whenever C * sizeof(T) % 16 == 0).
        const bool g_vec_ok = (reinterpret_cast<unsigned long long>(g) % 16) ==
                              (reinterpret_cast<unsigned long long>(x) % 16);
        V* gvec = reinterpret_cast<V*>(g + head);
        for (int v = tid; v < nvec; v += nthreads) {
            const V raw = xvec[v];
            const int k0 = head + v * VN;
            V out;
#pragma unroll
            for (int j = 0; j < VN; ++j) {
                const float wk = w_needed ? __ldg(class_weights + k0 + j) : 1.f;
                out.v[j] = from_float<T>(grad_at(coef, to_float(raw.v[j]), wk, k0 + j == y));
            }
            if (g_vec_ok) {
                gvec[v] = out;
            } else {
#pragma unroll
                for (int j = 0; j < VN; ++j) g[k0 + j] = out.v[j];
            }
        }
        for (int k = tail + tid; k < n_classes; k += nthreads) {
            const float wk = w_needed ? __ldg(class_weights + k) : 1.f;
            g[k] = from_float<T>(grad_at(coef, to_float(x[k]), wk, k == y));
        }
    }
    if (reduction != kNone) finish_total(loss_sum, sc, partials, ticket, loss, warp_sums, &last_block);
}

namespace sce {

// sce_cluster's shared memory ahead of the slice: all of it dynamic, so that every block of
// a cluster has its own (the CPU emulator runs a cluster's blocks together and has no
// per-block static __shared__). `published` is this block's partial statistics of a row
// (m, se, sw, ws, and s_y from the block whose slice holds the label), double-buffered by
// the row's parity so that the next row may publish before the other blocks have read.
struct ClusterShared {
    float warp_sums[kMaxWarps];
    float warp_stats[4][kMaxWarps];
    float published[2][8];
    int last_block;
};
static_assert(sizeof(ClusterShared) <= kClusterHeaderBytes, "kClusterHeaderBytes too small");

// Elements of a row per block of a cluster: a multiple of the vector width, so that every
// slice but the first starts on a 16-byte boundary, covering the row plus its misalignment
// (at most vn - 1 elements) in kClusterBlocks slices. The host sizes shared memory by it.
__device__ __forceinline__ long long cluster_slice(int n_classes, int vn) {
    const long long per_block = (static_cast<long long>(n_classes) + vn - 1 + kClusterBlocks - 1) / kClusterBlocks;
    return (per_block + vn - 1) / vn * vn;
}

}  // namespace sce

#ifdef SCE_HAS_CLUSTER
// Rows too long for one SM's shared memory but not for a cluster's (sm_90+): the
// kClusterBlocks blocks of a cluster split each row, cluster c taking rows c, c + the number
// of clusters, ...; every logit is read from DRAM once. Block `rank` stages elements
// [rank * slice - mis, (rank + 1) * slice - mis) of the row (mis: the row's offset from a
// 16-byte boundary, in elements) in its shared memory with 16-byte loads, reduces their
// statistics and publishes them; after cluster.sync() every block merges all of them in rank
// order from distributed shared memory (the same bits in every block), writes its slice of
// the gradient into shared memory and stores it with 16-byte stores. Rank 0 accounts the row's
// loss; the other blocks' partials of the total are 0. Alias-safe as sce_on_chip: a block reads
// only its own slice of a row from global memory, all before a block barrier, and writes it
// only after the next. The grid is a multiple of kClusterBlocks (a launch fails otherwise).
// Dynamic shared memory: kClusterHeaderBytes + cluster_slice() * sizeof(T).
template <typename T, typename L>
__global__ void __cluster_dims__(sce::kClusterBlocks, 1, 1) __launch_bounds__(sce::kThreads)
sce_cluster(const T* logits, const L* __restrict__ labels, const float* __restrict__ class_weights, T* grad,
            T* loss, float* __restrict__ partials, unsigned* __restrict__ ticket, long long n_rows, int n_classes,
            long long ignore_index, float label_smoothing, float scale, int reduction) {
    using namespace sce;
    namespace cg = cooperative_groups;
    using V = Vec16<T>;
    constexpr int VN = V::N;
    SCE_DYNAMIC_SHARED(unsigned char, tile_storage);
    ClusterShared& sh = *reinterpret_cast<ClusterShared*>(tile_storage);
    T* const tile = reinterpret_cast<T*>(tile_storage + kClusterHeaderBytes);
    const cg::cluster_group cluster = cg::this_cluster();
    const int rank = static_cast<int>(cluster.block_rank());

    const int tid = threadIdx.x;
    const int nthreads = blockDim.x;
    const int lane = tid % kWarp;
    const int warp = tid / kWarp;
    const int nwarps = (nthreads + kWarp - 1) / kWarp;
    const bool smooth = label_smoothing != 0.f;
    const float eps = label_smoothing;
    const float eps_c = label_smoothing / static_cast<float>(n_classes);
    const float sc = reduction == kMeanOfLabels
                         ? scale_from_labels(labels, n_rows, class_weights, n_classes, ignore_index, sh.warp_sums)
                         : scale;
    const long long slice = cluster_slice(n_classes, VN);
    float loss_sum = 0.f;  // rank 0's thread 0 only, rows in order
    int phase = 0;         // which `published` buffer this row uses

    for (long long row = blockIdx.x / kClusterBlocks; row < n_rows; row += gridDim.x / kClusterBlocks) {
        const long long base = row * static_cast<long long>(n_classes);
        const T* x = logits + base;
        T* g = grad + base;
        const long long y = static_cast<long long>(labels[row]);
        // This block's slice: positions [p0, p1) of the row counted from the 16-byte boundary
        // at or before its start, so elements [p0 - mis, p1 - mis); in shared memory at
        // tile[p - rank * slice], which keeps each element's offset from a 16-byte boundary.
        const int mis = static_cast<int>((reinterpret_cast<unsigned long long>(x) % 16) / sizeof(T));
        const long long p0 = max(rank * slice, static_cast<long long>(mis));
        const long long p1 = min((rank + 1) * slice, static_cast<long long>(mis) + n_classes);
        const int n_el = p1 > p0 ? static_cast<int>(p1 - p0) : 0;
        const int k0 = static_cast<int>(min(p0 - mis, static_cast<long long>(n_classes)));  // first class
        T* const ts = tile + (p0 - rank * slice);  // ts[e] is class k0 + e
        const T* xs = x + k0;
        T* gs = g + k0;

        if (y == ignore_index || y < 0 || y >= n_classes) {
            const float fill = y == ignore_index ? 0.f : quiet_nan();
            for (int e = tid; e < n_el; e += nthreads) gs[e] = from_float<T>(fill);
            if (rank == 0 && tid == 0) {
                if (reduction == kNone) loss[row] = from_float<T>(fill);
                else loss_sum += fill;
            }
            continue;  // cluster-uniform: every block reads the same label
        }

        // ---- load the slice: scalar head up to a 16-byte boundary, vectors, scalar tail ----
        const int lmis = static_cast<int>((reinterpret_cast<unsigned long long>(xs) % 16) / sizeof(T));
        const int head = min(lmis == 0 ? 0 : VN - lmis, n_el);
        const int nvec = (n_el - head) / VN;
        const int tail = head + nvec * VN;
        if (tid < head) ts[tid] = xs[tid];
        const V* xvec = reinterpret_cast<const V*>(xs + head);
        V* tvec = reinterpret_cast<V*>(ts + head);
#pragma unroll 4
        for (int v = tid; v < nvec; v += nthreads) tvec[v] = xvec[v];
        for (int e = tail + tid; e < n_el; e += nthreads) ts[e] = xs[e];
        // Every read of this slice from global memory happens before this barrier, every write
        // to grad after the next: alias-safe.
        __syncthreads();

        // ---- the slice's statistics: each thread its elements e = tid (mod blockDim) ----
        RowStats st = stats_identity();
        {
            int e = tid;
            for (; e + 3 * nthreads < n_el; e += 4 * nthreads) {
                const float xv[4] = {to_float(ts[e]), to_float(ts[e + nthreads]), to_float(ts[e + 2 * nthreads]),
                                     to_float(ts[e + 3 * nthreads])};
                const float wv[4] = {smooth ? class_weight(class_weights, k0 + e) : 1.f,
                                     smooth ? class_weight(class_weights, k0 + e + nthreads) : 1.f,
                                     smooth ? class_weight(class_weights, k0 + e + 2 * nthreads) : 1.f,
                                     smooth ? class_weight(class_weights, k0 + e + 3 * nthreads) : 1.f};
                stats_add<4>(st, xv, wv, smooth);
            }
            for (; e < n_el; e += nthreads) {
                const float xv[1] = {to_float(ts[e])};
                const float wv[1] = {smooth ? class_weight(class_weights, k0 + e) : 1.f};
                stats_add<1>(st, xv, wv, smooth);
            }
        }
        const bool owns_label = y >= k0 && y < k0 + n_el;
        const float sy = tid == 0 && owns_label ? to_float(ts[y - k0]) : 0.f;
        st = group_allreduce(st, smooth, kWarp);
        if (lane == 0) {
            sh.warp_stats[0][warp] = st.m;
            sh.warp_stats[1][warp] = st.se;
            sh.warp_stats[2][warp] = st.sw;
            sh.warp_stats[3][warp] = st.ws;
        }
        // Also orders thread 0's read of s_y before the slice is overwritten with its gradient.
        __syncthreads();
        if (warp == 0) {
            RowStats t = stats_identity();
            if (lane < nwarps) {
                t.m = sh.warp_stats[0][lane];
                t.se = sh.warp_stats[1][lane];
                t.sw = sh.warp_stats[2][lane];
                t.ws = sh.warp_stats[3][lane];
            }
            t = group_allreduce(t, smooth, kWarp);
            if (lane == 0) {
                float* pub = sh.published[phase];
                pub[0] = t.m;
                pub[1] = t.se;
                pub[2] = t.sw;
                pub[3] = t.ws;
                pub[4] = sy;  // lane 0 is thread 0
            }
        }
        // Every block's statistics are published (and visible through distributed shared memory).
        cluster.sync();

        // ---- the row's statistics: all blocks' in rank order, the same bits in every block ----
        RowStats r;
        {
            const float* pub = cluster.map_shared_rank(sh.published[phase], 0);
            r.m = pub[0];
            r.se = pub[1];
            r.sw = pub[2];
            r.ws = pub[3];
        }
        for (int q = 1; q < kClusterBlocks; ++q) {
            const float* pub = cluster.map_shared_rank(sh.published[phase], q);
            RowStats o;
            o.m = pub[0];
            o.se = pub[1];
            o.sw = pub[2];
            o.ws = pub[3];
            r = stats_merge(r, o, smooth);
        }
        const float wy = class_weight(class_weights, y);
        if (rank == 0 && tid == 0) {
            const int owner = static_cast<int>((y + mis) / slice);
            const float sy_row = cluster.map_shared_rank(sh.published[phase], owner)[4];
            const float lr = row_loss(r, sy_row, wy, eps, eps_c, smooth);
            if (reduction == kNone) loss[row] = from_float<T>(lr);
            else loss_sum += lr;
        }
        // The next row publishes into the other buffer; the one after into this buffer again,
        // once past the next row's cluster.sync(), which no block reaches before it has read here.
        phase ^= 1;

        // ---- the slice's gradient, into shared memory (each thread its own elements) ----
        const GradCoef coef = grad_coef(r.m, logf(r.se), r.ws, wy, eps, eps_c, sc, smooth);
        for (int e = tid; e < n_el; e += nthreads) {
            const float wk = smooth ? class_weight(class_weights, k0 + e) : 0.f;
            ts[e] = from_float<T>(grad_at(coef, to_float(ts[e]), wk, k0 + e == y));
        }
        __syncthreads();

        // ---- store the slice: 16-byte vectors where grad's row shares the logits' alignment ----
        if ((reinterpret_cast<unsigned long long>(g) % 16) == (reinterpret_cast<unsigned long long>(x) % 16)) {
            if (tid < head) gs[tid] = ts[tid];
            V* gvec = reinterpret_cast<V*>(gs + head);
#pragma unroll 4
            for (int v = tid; v < nvec; v += nthreads) gvec[v] = tvec[v];
            for (int e = tail + tid; e < n_el; e += nthreads) gs[e] = ts[e];
        } else {
            for (int e = tid; e < n_el; e += nthreads) gs[e] = ts[e];
        }
        __syncthreads();  // the next row's loads overwrite the slice
    }
    // No block may exit while another can still read its shared memory.
    cluster.sync();
    if (reduction != kNone) finish_total(loss_sum, sc, partials, ticket, loss, sh.warp_sums, &sh.last_block);
}
#endif  // SCE_HAS_CLUSTER
