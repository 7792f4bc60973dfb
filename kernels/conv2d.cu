// Gather kernels for 2-D convolution and pooling on NCHW arrays: im2col / col2im
// around the cuBLAS GEMMs of deepcore/backend/conv_kernels.py, and max / average
// pooling forward and backward.
//
// Column layout (conv_kernels.py explains the choice): for a chunk of nb samples,
//   cols[r, col] with r = (c*KH + p)*KW + q (C*KH*KW rows) and col = n*OH*OW + i*OW + j,
//   cols[r, col] = xpad[n, c, i*sh + p*dh, j*sw + q*dw], xpad = x zero-padded by
//   (pad_top, pad_left) before the first row / column (the far sides need no
//   number: a tap past the edge reads as zero whichever side it falls off).
// So y2d = W2d @ cols (one GEMM per group) and dx = col2im(W2d^T @ dy2d), where
//   dx[n, c, h, w] = sum over (p, q, i, j) with i*sh + p*dh = h + pad_top and
//                    j*sw + q*dw = w + pad_left of dcols[(c*KH + p)*KW + q, n*OH*OW + i*OW + j].
//
// Every kernel is a gather: each output element has one owning thread (im2col: the
// thread of its (c, column); the others: one thread per element), so every element
// is written exactly once (zeros included), nothing needs atomics, and each sum is
// taken in a fixed order: the results are deterministic. Sums accumulate in float
// (double for double). Flat indices and array offsets are 64-bit; the host checks
// that every per-plane or per-row extent (nb*OH*OW, nb*C, H*W, C*KH*KW, ...) fits
// in an int, so coordinates inside one row or plane stay 32-bit and cheap.
//
// Compiled at run time by NVRTC (cupy.RawModule, one instance per module) and by
// nvcc for the CI compile check, so the only headers are the two NVRTC can
// always find; the CPU emulator (tools/cuda_emulator) supplies stand-ins.

#include <cuda_fp16.h>
#include <cuda_bf16.h>

namespace conv {

// Block size of every kernel here, mirrored in conv_kernels.THREADS (the host
// launches exactly this). The kernels are memory bound gathers with a handful of
// registers; 256 threads per block let an SM hold 8 blocks and hide latency.
constexpr int kThreads = 256;

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_acc(typename Acc<T>::type x);
template <> __device__ __forceinline__ float from_acc<float>(float x) { return x; }
template <> __device__ __forceinline__ double from_acc<double>(double x) { return x; }
template <> __device__ __forceinline__ __half from_acc<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) {
    return __float2bfloat16_rn(x);
}

__device__ __forceinline__ long long first_index() {
    return static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ long long grid_stride() { return static_cast<long long>(gridDim.x) * blockDim.x; }

// a / b for a, b >= 0, in 32 bits whenever both fit: a 64-bit division is a long
// software sequence on the GPU, and the flat indices exceed 2**32 only on huge arrays.
__device__ __forceinline__ long long div64(long long a, long long b) {
    return (static_cast<unsigned long long>(a | b) >> 32) == 0
               ? static_cast<long long>(static_cast<unsigned>(a) / static_cast<unsigned>(b))
               : a / b;
}

// hh / s when s divides hh (hh >= 0), else -1; strides 1 and 2, nearly every CNN's, without a division.
__device__ __forceinline__ int exact_div(int hh, int s) {
    if (s == 1) return hh;
    const int i = s == 2 ? hh >> 1 : hh / s;
    return i * s == hh ? i : -1;
}

// 0 <= v < n in one comparison.
__device__ __forceinline__ bool in_range(int v, int n) { return static_cast<unsigned>(v) < static_cast<unsigned>(n); }

// The first output index i >= 0 whose pooling window [i*s - pad, i*s - pad + k)
// contains h, i.e. ceil((h + pad - k + 1) / s) clamped at 0; h + pad >= 0 always.
__device__ __forceinline__ int first_window(int h, int pad, int k, int s) {
    const int lo = h + pad - k + 1;
    return lo <= 0 ? 0 : (lo + s - 1) / s;
}

// Average pooling's divisor for the window starting at (h0, w0): its cells
// inside the zero padding too (count_include_pad; the window never passes the
// padded edge, as OH = floor((H + 2ph - kh) / sh) + 1), else only the real ones.
__device__ __forceinline__ int avg_divisor(int h0, int w0, int H, int W, int kh, int kw, int ph, int pw,
                                           int count_include_pad) {
    if (count_include_pad) return (min(h0 + kh, H + ph) - h0) * (min(w0 + kw, W + pw) - w0);
    return (min(h0 + kh, H) - max(h0, 0)) * (min(w0 + kw, W) - max(w0, 0));
}

}  // namespace conv

// cols (C*KH*KW, nb*OH*OW) from x (nb, C, H, W). One thread per (c, column): it
// splits its index once (three divisions) and copies its KH*KW taps, one element per
// row r = (c*KH + p)*KW + q. At each tap the threads of a warp hold consecutive
// columns, so the stores are coalesced (and, at stride 1, the loads too); a thread
// per element would pay the divisions KH*KW times over for the same traffic.
template <typename T>
__global__ void __launch_bounds__(conv::kThreads)
im2col(const T* __restrict__ x, T* __restrict__ cols, int nb, int C, int H, int W, int KH, int KW, int OH, int OW,
       int sh, int sw, int pad_top, int pad_left, int dh, int dw) {
    using namespace conv;
    const int L = OH * OW;
    const long long ncols = static_cast<long long>(nb) * L;  // < 2**31, checked by the host
    const long long total = static_cast<long long>(C) * ncols;
    const T zero = from_acc<T>(0);
    for (long long e = first_index(); e < total; e += grid_stride()) {
        const int c = static_cast<int>(div64(e, ncols));
        const int col = static_cast<int>(e - c * ncols);
        const int n = col / L;
        const int l = col - n * L;
        const int i = l / OW, j = l - (l / OW) * OW;
        const T* xp = x + (static_cast<long long>(n) * C + c) * H * W;
        T* out = cols + static_cast<long long>(c) * KH * KW * ncols + col;
        const int h0 = i * sh - pad_top, w0 = j * sw - pad_left;
        for (int p = 0; p < KH; ++p) {
            const int h = h0 + p * dh;
            const bool row_in = in_range(h, H);
            for (int q = 0; q < KW; ++q) {
                const int w = w0 + q * dw;
                *out = row_in && in_range(w, W) ? xp[h * W + w] : zero;
                out += ncols;
            }
        }
    }
}

// dx (nb, C, H, W) from dcols (C*KH*KW, nb*OH*OW): one thread per dx element sums,
// in (p, q) order, the column entries that im2col copied it into.
template <typename T>
__global__ void __launch_bounds__(conv::kThreads)
col2im(const T* __restrict__ dcols, T* __restrict__ dx, int nb, int C, int H, int W, int KH, int KW, int OH, int OW,
       int sh, int sw, int pad_top, int pad_left, int dh, int dw) {
    using namespace conv;
    using A = typename Acc<T>::type;
    const int L = OH * OW;
    const long long ncols = static_cast<long long>(nb) * L;
    const long long total = static_cast<long long>(nb) * C * H * W;
    for (long long e = first_index(); e < total; e += grid_stride()) {
        const int plane = static_cast<int>(div64(e, static_cast<long long>(H) * W));  // n*C + c
        const int hw = static_cast<int>(e - static_cast<long long>(plane) * H * W);
        const int h = hw / W, w = hw - (hw / W) * W;
        const int n = plane / C, c = plane - (plane / C) * C;
        const T* base = dcols + static_cast<long long>(c) * KH * KW * ncols + static_cast<long long>(n) * L;
        A acc = 0;
        for (int p = 0; p < KH; ++p) {
            const int hh = h + pad_top - p * dh;  // = i*sh for the output row i that reads tap p here
            if (hh < 0) break;                    // decreases with p
            const int i = exact_div(hh, sh);
            if (i < 0 || i >= OH) continue;
            for (int q = 0; q < KW; ++q) {
                const int ww = w + pad_left - q * dw;
                if (ww < 0) break;
                const int j = exact_div(ww, sw);
                if (j < 0 || j >= OW) continue;
                acc += to_acc(base[static_cast<long long>(p * KW + q) * ncols + i * OW + j]);
            }
        }
        dx[e] = from_acc<T>(acc);
    }
}

// y and argmax (the flat index h*W + w inside the plane) of each window, with
// -inf padding: padded cells never win, so they are simply skipped. The first
// maximum in row-major window order wins ties, and a NaN always takes over
// (the last NaN wins), as in PyTorch.
template <typename T>
__global__ void __launch_bounds__(conv::kThreads)
max_pool2d_forward(const T* __restrict__ x, T* __restrict__ y, int* __restrict__ argmax, long long planes, int H,
                   int W, int OH, int OW, int kh, int kw, int sh, int sw, int ph, int pw) {
    using namespace conv;
    using A = typename Acc<T>::type;
    const long long total = planes * OH * OW;
    for (long long e = first_index(); e < total; e += grid_stride()) {
        const long long plane = div64(e, static_cast<long long>(OH) * OW);
        const int ij = static_cast<int>(e - plane * OH * OW);
        const int i = ij / OW, j = ij - (ij / OW) * OW;
        const T* xp = x + plane * H * W;
        const int h0 = i * sh - ph, w0 = j * sw - pw;
        const int hs = max(h0, 0), he = min(h0 + kh, H), ws = max(w0, 0), we = min(w0 + kw, W);
        // ph <= kh/2 (checked by the layer) puts at least one real cell in every window.
        int best_at = hs * W + ws;
        A best = to_acc(xp[best_at]);
        for (int h = hs; h < he; ++h) {
            for (int w = ws; w < we; ++w) {
                const A v = to_acc(xp[h * W + w]);
                if (v > best || v != v) {
                    best = v;
                    best_at = h * W + w;
                }
            }
        }
        y[e] = xp[best_at];
        argmax[e] = best_at;
    }
}

// dx[h, w] = sum of dy over the windows whose argmax is (h, w), gathered per dx
// element over the windows that contain it, in row-major output order.
template <typename T>
__global__ void __launch_bounds__(conv::kThreads)
max_pool2d_backward(const T* __restrict__ dy, const int* __restrict__ argmax, T* __restrict__ dx, long long planes,
                    int H, int W, int OH, int OW, int kh, int kw, int sh, int sw, int ph, int pw) {
    using namespace conv;
    using A = typename Acc<T>::type;
    const long long total = planes * H * W;
    for (long long e = first_index(); e < total; e += grid_stride()) {
        const long long plane = div64(e, static_cast<long long>(H) * W);
        const int hw = static_cast<int>(e - plane * H * W);
        const int h = hw / W, w = hw - (hw / W) * W;
        const long long plane_out = plane * OH * OW;
        const int self = h * W + w;
        const int i_end = min((h + ph) / sh + 1, OH), j_end = min((w + pw) / sw + 1, OW);
        const int j_begin = first_window(w, pw, kw, sw);
        A acc = 0;
        for (int i = first_window(h, ph, kh, sh); i < i_end; ++i) {
            for (int j = j_begin; j < j_end; ++j) {
                const long long o = plane_out + i * OW + j;
                if (argmax[o] == self) acc += to_acc(dy[o]);
            }
        }
        dx[e] = from_acc<T>(acc);
    }
}

// y = (sum of the window's real cells, zero padding adding nothing) / divisor.
template <typename T>
__global__ void __launch_bounds__(conv::kThreads)
avg_pool2d_forward(const T* __restrict__ x, T* __restrict__ y, long long planes, int H, int W, int OH, int OW, int kh,
                   int kw, int sh, int sw, int ph, int pw, int count_include_pad) {
    using namespace conv;
    using A = typename Acc<T>::type;
    const long long total = planes * OH * OW;
    for (long long e = first_index(); e < total; e += grid_stride()) {
        const long long plane = div64(e, static_cast<long long>(OH) * OW);
        const int ij = static_cast<int>(e - plane * OH * OW);
        const int i = ij / OW, j = ij - (ij / OW) * OW;
        const T* xp = x + plane * H * W;
        const int h0 = i * sh - ph, w0 = j * sw - pw;
        const int hs = max(h0, 0), he = min(h0 + kh, H), ws = max(w0, 0), we = min(w0 + kw, W);
        A sum = 0;
        for (int h = hs; h < he; ++h)
            for (int w = ws; w < we; ++w) sum += to_acc(xp[h * W + w]);
        y[e] = from_acc<T>(sum / static_cast<A>(avg_divisor(h0, w0, H, W, kh, kw, ph, pw, count_include_pad)));
    }
}

// dx[h, w] = sum over the windows containing (h, w) of dy / that window's divisor.
template <typename T>
__global__ void __launch_bounds__(conv::kThreads)
avg_pool2d_backward(const T* __restrict__ dy, T* __restrict__ dx, long long planes, int H, int W, int OH, int OW,
                    int kh, int kw, int sh, int sw, int ph, int pw, int count_include_pad) {
    using namespace conv;
    using A = typename Acc<T>::type;
    const long long total = planes * H * W;
    for (long long e = first_index(); e < total; e += grid_stride()) {
        const long long plane = div64(e, static_cast<long long>(H) * W);
        const int hw = static_cast<int>(e - plane * H * W);
        const int h = hw / W, w = hw - (hw / W) * W;
        const long long plane_out = plane * OH * OW;
        const int i_end = min((h + ph) / sh + 1, OH), j_end = min((w + pw) / sw + 1, OW);
        const int j_begin = first_window(w, pw, kw, sw);
        A acc = 0;
        for (int i = first_window(h, ph, kh, sh); i < i_end; ++i) {
            // Unrolled, the IEEE divisions' slow-path calls made ptxas spill (double, sm_90).
#pragma unroll 1
            for (int j = j_begin; j < j_end; ++j) {
                const A d = static_cast<A>(avg_divisor(i * sh - ph, j * sw - pw, H, W, kh, kw, ph, pw,
                                                       count_include_pad));
                acc += to_acc(dy[plane_out + i * OW + j]) / d;
            }
        }
        dx[e] = from_acc<T>(acc);
    }
}
