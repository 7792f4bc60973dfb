// The fused softmax cross-entropy kernels of kernels/softmax_cross_entropy.cu,
// built for the CPU emulator and exported with a C ABI for ctypes
// (tools/cuda_emulator/emulated.py). SCE_KERNEL_SOURCE is the .cu's path.
#include "emulator.h"

#include <mutex>

#include SCE_KERNEL_SOURCE

namespace {

// The kernels' parameters; sce_two_pass and sce_cluster have no threads_per_row. Mirrored by
// emulated.py's ctypes structure.
struct SceArgs {
    const void* logits;
    const void* labels;
    const float* class_weights;
    void* grad;
    void* loss;
    float* partials;
    unsigned* ticket;
    long long n_rows;
    int n_classes;
    long long ignore_index;
    float label_smoothing;
    float scale;
    int reduction;
    int threads_per_row;
};

enum Kind { kOnChip, kTwoPass, kCluster };

template <typename T, typename L, Kind K>
void run(void* p) {
    const SceArgs& a = *static_cast<const SceArgs*>(p);
    if constexpr (K == kCluster) {
        sce_cluster<T, L>(static_cast<const T*>(a.logits), static_cast<const L*>(a.labels), a.class_weights,
                          static_cast<T*>(a.grad), static_cast<T*>(a.loss), a.partials, a.ticket, a.n_rows,
                          a.n_classes, a.ignore_index, a.label_smoothing, a.scale, a.reduction);
    } else if constexpr (K == kOnChip) {
        sce_on_chip<T, L>(static_cast<const T*>(a.logits), static_cast<const L*>(a.labels), a.class_weights,
                          static_cast<T*>(a.grad), static_cast<T*>(a.loss), a.partials, a.ticket, a.n_rows,
                          a.n_classes, a.ignore_index, a.label_smoothing, a.scale, a.reduction, a.threads_per_row);
    } else {
        sce_two_pass<T, L>(static_cast<const T*>(a.logits), static_cast<const L*>(a.labels), a.class_weights,
                           static_cast<T*>(a.grad), static_cast<T*>(a.loss), a.partials, a.ticket, a.n_rows,
                           a.n_classes, a.ignore_index, a.label_smoothing, a.scale, a.reduction);
    }
}

struct Instance {
    const char* name;  // the name expression cuda_kernels.py hands NVRTC
    void (*body)(void*);
    unsigned max_threads;  // the kernel's __launch_bounds__: a GPU refuses a larger block
    size_t logit_bytes;    // sizeof(T)
    bool on_chip;          // takes threads_per_row
    unsigned cluster;      // the kernel's __cluster_dims__ (blocks per cluster), 1 without
};

#define SCE_INSTANCE(KERNEL, T, L, KIND, CLUSTER) \
    {KERNEL "<" #T ", " #L ">", run<T, L, KIND>, sce::kThreads, sizeof(T), KIND == kOnChip, CLUSTER}
#define SCE_INSTANCES(KERNEL, KIND, CLUSTER)                                                               \
    SCE_INSTANCE(KERNEL, float, int, KIND, CLUSTER), SCE_INSTANCE(KERNEL, float, long long, KIND, CLUSTER), \
        SCE_INSTANCE(KERNEL, __half, int, KIND, CLUSTER), SCE_INSTANCE(KERNEL, __half, long long, KIND, CLUSTER), \
        SCE_INSTANCE(KERNEL, __nv_bfloat16, int, KIND, CLUSTER),                                            \
        SCE_INSTANCE(KERNEL, __nv_bfloat16, long long, KIND, CLUSTER)

const Instance kInstances[] = {SCE_INSTANCES("sce_on_chip", kOnChip, 1), SCE_INSTANCES("sce_two_pass", kTwoPass, 1),
                               SCE_INSTANCES("sce_cluster", kCluster, sce::kClusterBlocks)};
constexpr int kCount = sizeof(kInstances) / sizeof(kInstances[0]);

thread_local std::string last_error;
std::mutex launch_mutex;  // one launch at a time: the emulator's state and __shared__ statics are global

// A copy of `bytes` bytes at `src` whose address has the same remainder mod 16,
// so the kernel takes the same vector/scalar paths on it as on the original.
struct AlignedCopy {
    std::vector<unsigned char> storage;
    void* data = nullptr;
    AlignedCopy(const void* src, size_t bytes) {
        if (bytes > (SIZE_MAX >> 1)) throw std::length_error("emulator: buffer too large to copy");
        storage.resize(bytes + 32);
        const auto want = reinterpret_cast<std::uintptr_t>(src) % 16;
        auto p = reinterpret_cast<std::uintptr_t>(storage.data());
        p += (want + 16 - p % 16) % 16;
        data = reinterpret_cast<void*>(p);
        if (bytes != 0 && src != nullptr) std::memcpy(data, src, bytes);
    }
};

// kShufflesReplay: record the shuffles on copies of the buffers the kernel
// writes (grad, loss, partials, ticket; logits too, as grad may alias it), then
// replay them on the caller's buffers.
void launch_unordered(const Instance& inst, unsigned grid, unsigned block, emu::Options opts, SceArgs args) {
    const size_t n = static_cast<size_t>(args.n_rows) * static_cast<size_t>(args.n_classes) * inst.logit_bytes;
    const auto lo = reinterpret_cast<std::uintptr_t>(args.logits), go = reinterpret_cast<std::uintptr_t>(args.grad);
    if (args.grad != args.logits && lo < go + n && go < lo + n)
        throw std::invalid_argument("emulator: grad overlaps logits without being the same buffer");
    const bool aliased = args.grad == args.logits;
    const size_t loss_bytes = (args.reduction == sce::kNone ? static_cast<size_t>(args.n_rows) : 1) * inst.logit_bytes;
    AlignedCopy logits(args.logits, n);
    AlignedCopy grad_own(aliased ? nullptr : args.grad, aliased ? 0 : n);
    AlignedCopy loss(args.loss, loss_bytes);
    AlignedCopy partials(args.partials, args.partials != nullptr ? grid * sizeof(float) : 0);
    AlignedCopy ticket(args.ticket, args.ticket != nullptr ? sizeof(unsigned) : 0);
    SceArgs copy = args;
    copy.logits = logits.data;
    copy.grad = aliased ? logits.data : grad_own.data;
    copy.loss = loss.data;
    if (args.partials != nullptr) copy.partials = static_cast<float*>(partials.data);
    if (args.ticket != nullptr) copy.ticket = static_cast<unsigned*>(ticket.data);
    emu::ShuffleLog log;
    opts.log = &log;
    opts.shuffles = emu::kShufflesRecord;
    emu::launch(grid, block, opts, inst.body, &copy);
    opts.shuffles = emu::kShufflesReplay;
    emu::launch(grid, block, opts, inst.body, &args);
}

}  // namespace

extern "C" {

int emu_sce_count() { return kCount; }

const char* emu_sce_name(int i) { return i >= 0 && i < kCount ? kInstances[i].name : nullptr; }

int emu_sce_on_chip(int i) { return i >= 0 && i < kCount ? static_cast<int>(kInstances[i].on_chip) : -1; }

// Blocks per cluster of instance i (its __cluster_dims__), 1 for a kernel without clusters.
int emu_sce_cluster(int i) { return i >= 0 && i < kCount ? static_cast<int>(kInstances[i].cluster) : -1; }

const char* emu_last_error() { return last_error.c_str(); }

// 0 on success, else -1 with the reason in emu_last_error(). Runs blocks
// [first_block, last_block) of the grid only; `unordered_shuffles` != 0 makes
// shuffles order no memory (emu::kShufflesReplay, see emulator.h).
int emu_sce_launch(int instance, unsigned grid, unsigned block, unsigned shared_bytes, int order, unsigned seed,
                   unsigned first_block, unsigned last_block, int unordered_shuffles, const SceArgs* args) {
    last_error.clear();
    if (instance < 0 || instance >= kCount) {
        last_error = "no kernel instance " + std::to_string(instance);
        return -1;
    }
    const Instance& inst = kInstances[instance];
    if (block > inst.max_threads) {
        last_error = std::string(inst.name) + ": block of " + std::to_string(block) +
                     " threads exceeds its __launch_bounds__ of " + std::to_string(inst.max_threads) +
                     " (a GPU refuses this launch)";
        return -1;
    }
    emu::Options opts;
    opts.order = static_cast<emu::Order>(order);
    opts.seed = seed;
    opts.first_block = first_block;
    opts.last_block = last_block;
    opts.dynamic_shared_bytes = shared_bytes;
    opts.cluster_blocks = inst.cluster;
    // A cluster's blocks run together: K x 512 fibers, so smaller stacks (still far above what the kernels use).
    if (inst.cluster > 1) opts.stack_bytes = 32 * 1024;
    std::lock_guard<std::mutex> lock(launch_mutex);
    try {
        if (unordered_shuffles != 0) {
            launch_unordered(inst, grid, block, opts, *args);
        } else {
            SceArgs copy = *args;
            emu::launch(grid, block, opts, inst.body, &copy);
        }
    } catch (const std::exception& exc) {
        last_error = exc.what();
        return -1;
    }
    return 0;
}

}  // extern "C"
