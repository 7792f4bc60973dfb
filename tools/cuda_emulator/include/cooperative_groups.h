// Emulator stand-in for CUDA's cooperative_groups.h: exactly the subset deepcore's
// kernels use, the thread-block cluster of emulator.h (see "Thread-block clusters"
// there). Anything else of cooperative_groups fails to compile, on purpose.
#pragma once

#include "emulator.h"

namespace cooperative_groups {

class cluster_group {
public:
    // blockIdx.x % K for a 1-D grid with __cluster_dims__(K, 1, 1).
    static unsigned int block_rank() { return emu::cluster_block_rank(); }
    // A barrier of every thread of the cluster; it orders shared memory (distributed included).
    static void sync() { emu::cluster_sync(); }
    // `addr` in this block's dynamic shared memory -> the same place in block `rank`'s.
    template <typename T>
    static T* map_shared_rank(T* addr, int rank) {
        return static_cast<T*>(emu::map_shared_rank(addr, rank, sizeof(T)));
    }

private:
    cluster_group() = default;
    friend cluster_group this_cluster();
};

inline cluster_group this_cluster() { return cluster_group(); }

}  // namespace cooperative_groups
