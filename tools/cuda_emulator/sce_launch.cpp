// The fused softmax cross-entropy kernels of kernels/softmax_cross_entropy.cu,
// built for the CPU emulator and exported with a C ABI for ctypes
// (tools/cuda_emulator/emulated.py). SCE_KERNEL_SOURCE is the .cu's path.
#include "emulator.h"

#include <mutex>

#include SCE_KERNEL_SOURCE

namespace {

struct SceArgs {
    const void* logits;
    const void* labels;
    const float* class_weights;
    const float* scale;
    void* grad;
    float* loss_row;
    float* weight_row;
    long long n_rows;
    int n_classes;
    long long ignore_index;
    float label_smoothing;
};

template <typename T, typename L, bool Block>
void run(void* p) {
    const SceArgs& a = *static_cast<const SceArgs*>(p);
    const auto kernel = Block ? sce_block_per_row<T, L> : sce_warp_per_row<T, L>;
    kernel(static_cast<const T*>(a.logits), static_cast<const L*>(a.labels), a.class_weights, a.scale,
           static_cast<T*>(a.grad), a.loss_row, a.weight_row, a.n_rows, a.n_classes, a.ignore_index,
           a.label_smoothing);
}

struct Instance {
    const char* name;  // the name expression cuda_kernels.py hands NVRTC
    void (*body)(void*);
    unsigned max_threads;  // the kernel's __launch_bounds__: a GPU refuses a larger block
};

#define SCE_INSTANCES(KERNEL, BLOCK, MAX)                                              \
    {KERNEL "<float, int>", run<float, int, BLOCK>, MAX},                              \
    {KERNEL "<float, long long>", run<float, long long, BLOCK>, MAX},                  \
    {KERNEL "<__half, int>", run<__half, int, BLOCK>, MAX},                            \
    {KERNEL "<__half, long long>", run<__half, long long, BLOCK>, MAX},                \
    {KERNEL "<__nv_bfloat16, int>", run<__nv_bfloat16, int, BLOCK>, MAX},             \
    {KERNEL "<__nv_bfloat16, long long>", run<__nv_bfloat16, long long, BLOCK>, MAX}

const Instance kInstances[] = {SCE_INSTANCES("sce_warp_per_row", false, sce::kWarpKernelThreads),
                               SCE_INSTANCES("sce_block_per_row", true, sce::kBlockKernelThreads)};
constexpr int kCount = sizeof(kInstances) / sizeof(kInstances[0]);

thread_local std::string last_error;
std::mutex launch_mutex;  // one launch at a time: the emulator's state and __shared__ statics are global

}  // namespace

extern "C" {

int emu_sce_count() { return kCount; }

const char* emu_sce_name(int i) { return i >= 0 && i < kCount ? kInstances[i].name : nullptr; }

const char* emu_last_error() { return last_error.c_str(); }

// 0 on success, else -1 with the reason in emu_last_error().
int emu_sce_launch(int instance, unsigned grid, unsigned block, int order, unsigned seed, const void* logits,
                   const void* labels, const float* class_weights, const float* scale, void* grad, float* loss_row,
                   float* weight_row, long long n_rows, int n_classes, long long ignore_index,
                   float label_smoothing) {
    last_error.clear();
    if (instance < 0 || instance >= kCount) {
        last_error = "no kernel instance " + std::to_string(instance);
        return -1;
    }
    if (block > kInstances[instance].max_threads) {
        last_error = std::string(kInstances[instance].name) + ": block of " + std::to_string(block) +
                     " threads exceeds its __launch_bounds__ of " + std::to_string(kInstances[instance].max_threads) +
                     " (a GPU refuses this launch)";
        return -1;
    }
    SceArgs args{logits,   labels,     class_weights, scale,     grad,          loss_row,
                 weight_row, n_rows,   n_classes,     ignore_index, label_smoothing};
    std::lock_guard<std::mutex> lock(launch_mutex);
    try {
        emu::launch(grid, block, static_cast<emu::Order>(order), seed, kInstances[instance].body, &args);
    } catch (const std::exception& exc) {
        last_error = exc.what();
        return -1;
    }
    return 0;
}

}  // extern "C"
