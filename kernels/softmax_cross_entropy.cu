// Fused softmax + cross-entropy forward and backward, one row per warp (small C)
// or one row per block (large C).
//
// For row i with label y, logits s (C entries), class weights w (all ones when
// class_weights is null) and label smoothing eps:
//   lse            = log(sum_k exp(s_k))
//   loss_row[i]    = (1-eps) w_y (lse - s_y) + (eps/C) sum_k w_k (lse - s_k)
//   grad[i,k]      = scale * (p_k ((1-eps) w_y + (eps/C) W) - (1-eps) w_y [k==y] - (eps/C) w_k)
// with p_k = exp(s_k - lse), W = sum_k w_k and scale read from device memory so
// the host never waits for the mean's denominator (the host derives it from the
// labels, so the kernel writes no per-row weight). A row whose label equals
// ignore_index gets zeros; a label outside [0, C) gets NaN everywhere (and no
// out-of-bounds access) so an unchecked bad label cannot pass silently.
//
// Compiled at run time by NVRTC (cupy.RawModule) and by nvcc for the CI compile
// check, so the only headers are the two NVRTC can always find.
//
// `grad` may be the same buffer as `logits`: a caller whose logits are dead after
// the loss can pass it twice and save an N x C allocation. So neither pointer is
// __restrict__ nor read through the read-only cache, and every row passes a
// warp/block barrier between its last read and its first write (after it, a
// thread reads only the elements it then overwrites itself).

#include <cuda_fp16.h>
#include <cuda_bf16.h>

namespace sce {

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;
// Launch shapes, mirrored in deepcore/backend/cuda_kernels.py (the wrapper
// launches exactly these block sizes). The min-blocks hints cap registers at 40
// (6 x 256 and 3 x 512 = 1536 resident threads per SM): both kernels are
// bandwidth bound and want many loads in flight, and ptxas -v shows no spills
// at that cap, while the next step (32 registers) spills on sm_80/sm_90.
constexpr int kWarpKernelThreads = 256;
constexpr int kWarpKernelMinBlocks = 6;
constexpr int kBlockKernelThreads = 512;
constexpr int kBlockKernelMinBlocks = 3;

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
// both partners; lane 0's result is broadcast afterwards anyway.
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

__device__ __forceinline__ RowStats warp_allreduce(RowStats s, bool smooth) {
#pragma unroll
    for (int off = kWarp / 2; off > 0; off >>= 1) {
        RowStats o;
        o.m = __shfl_xor_sync(kFullMask, s.m, off);
        o.se = __shfl_xor_sync(kFullMask, s.se, off);
        if (smooth) {
            o.sw = __shfl_xor_sync(kFullMask, s.sw, off);
            o.ws = __shfl_xor_sync(kFullMask, s.ws, off);
        } else {
            o.sw = 0.f;
            o.ws = 0.f;
        }
        s = stats_merge(s, o, smooth);
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

}  // namespace sce

// One warp per row, several rows per block. For C <= ~1024, where a block per
// row would leave most threads idle and the block-level reduction would cost
// more than the row itself.
template <typename T, typename L>
__global__ void __launch_bounds__(sce::kWarpKernelThreads, sce::kWarpKernelMinBlocks)
sce_warp_per_row(const T* logits, const L* __restrict__ labels, const float* __restrict__ class_weights,
                 const float* __restrict__ scale, T* grad, float* __restrict__ loss_row, long long n_rows,
                 int n_classes, long long ignore_index, float label_smoothing) {
    using namespace sce;
    const int lane = threadIdx.x % kWarp;
    const int warps_per_block = blockDim.x / kWarp;
    const long long row_step = static_cast<long long>(gridDim.x) * warps_per_block;
    const bool smooth = label_smoothing != 0.f;
    const float eps = label_smoothing;
    const float eps_c = label_smoothing / static_cast<float>(n_classes);
    const float sc = *scale;

    for (long long row = static_cast<long long>(blockIdx.x) * warps_per_block + threadIdx.x / kWarp; row < n_rows;
         row += row_step) {
        const long long base = row * static_cast<long long>(n_classes);
        const T* x = logits + base;
        T* g = grad + base;
        const long long y = static_cast<long long>(labels[row]);

        if (y == ignore_index || y < 0 || y >= n_classes) {
            const float fill = y == ignore_index ? 0.f : quiet_nan();
            for (int k = lane; k < n_classes; k += kWarp) g[k] = from_float<T>(fill);
            if (lane == 0) loss_row[row] = fill;
            continue;  // warp-uniform: the whole warp shares `y`
        }

        RowStats st = stats_identity();
        for (int k = lane; k < n_classes; k += kWarp) {
            const float xv[1] = {to_float(x[k])};
            const float wv[1] = {smooth ? class_weight(class_weights, k) : 1.f};
            stats_add<1>(st, xv, wv, smooth);
        }
        const float sy = lane == 0 ? to_float(x[y]) : 0.f;
        st = warp_allreduce(st, smooth);
        // Orders every lane's reads of this row (lane 0's s_y included) before any lane's
        // write when grad aliases logits. The shuffles around it do not: they order no memory.
        __syncwarp();
        // Lanes may differ in the last bit after the butterfly; use lane 0's values everywhere.
        const float m = __shfl_sync(kFullMask, st.m, 0);
        const float se = __shfl_sync(kFullMask, st.se, 0);
        const float ws = smooth ? __shfl_sync(kFullMask, st.ws, 0) : 0.f;
        const float wy = class_weight(class_weights, y);
        if (lane == 0) loss_row[row] = row_loss(st, sy, wy, eps, eps_c, smooth);
        const GradCoef coef = grad_coef(m, logf(se), ws, wy, eps, eps_c, sc, smooth);
        for (int k = lane; k < n_classes; k += kWarp) {
            const float wk = smooth ? class_weight(class_weights, k) : 0.f;
            g[k] = from_float<T>(grad_at(coef, to_float(x[k]), wk, k == y));
        }
    }
}

// One block per row, for large C (vocabularies of 32k-256k). The row is read
// with 16-byte vector loads between a scalar head (up to the first 16-byte
// boundary) and a scalar tail, so any row offset or C is handled.
template <typename T, typename L>
__global__ void __launch_bounds__(sce::kBlockKernelThreads, sce::kBlockKernelMinBlocks)
sce_block_per_row(const T* logits, const L* __restrict__ labels, const float* __restrict__ class_weights,
                  const float* __restrict__ scale, T* grad, float* __restrict__ loss_row, long long n_rows,
                  int n_classes, long long ignore_index, float label_smoothing) {
    using namespace sce;
    using V = Vec16<T>;
    constexpr int VN = V::N;
    __shared__ float warp_stats[4][kBlockKernelThreads / kWarp];
    __shared__ float row_stats[3];

    const int tid = threadIdx.x;
    const int nthreads = blockDim.x;
    const int lane = tid % kWarp;
    const int warp = tid / kWarp;
    const int nwarps = (nthreads + kWarp - 1) / kWarp;
    const bool smooth = label_smoothing != 0.f;
    const float eps = label_smoothing;
    const float eps_c = label_smoothing / static_cast<float>(n_classes);
    const float sc = *scale;
    const bool has_w = class_weights != nullptr;

    for (long long row = blockIdx.x; row < n_rows; row += gridDim.x) {
        const long long base = row * static_cast<long long>(n_classes);
        const T* x = logits + base;
        T* g = grad + base;
        const long long y = static_cast<long long>(labels[row]);

        if (y == ignore_index || y < 0 || y >= n_classes) {
            const float fill = y == ignore_index ? 0.f : quiet_nan();
            for (int k = tid; k < n_classes; k += nthreads) g[k] = from_float<T>(fill);
            if (tid == 0) loss_row[row] = fill;
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
        st = warp_allreduce(st, smooth);
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
            t = warp_allreduce(t, smooth);
            if (lane == 0) {
                const float wy = class_weight(class_weights, y);
                loss_row[row] = row_loss(t, sy, wy, eps, eps_c, smooth);
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
}
