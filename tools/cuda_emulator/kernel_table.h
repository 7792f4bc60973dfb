// A table of emulated kernels with a C ABI, for any kernel source: each entry is
// one template instance, called the way cuLaunchKernel calls a kernel, with an
// array of pointers to the argument values (kernelParams). raw_module.py writes a
// translation unit that includes emulator.h, the .cu and this header, lists the
// instances with EMU_KERNEL and ends with EMU_EXPORT_TABLE; it reads each
// instance's parameter types from emu_signature() to check every argument it
// passes, so a host wrapper that passes a wrong type or dtype fails here instead
// of reading garbage as it would through CuPy.
#pragma once

#include "emulator.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <mutex>
#include <string>
#include <type_traits>
#include <utility>

namespace emu_table {

template <typename T> struct TypeName;
template <> struct TypeName<float> { static constexpr const char* value = "float"; };
template <> struct TypeName<double> { static constexpr const char* value = "double"; };
template <> struct TypeName<__half> { static constexpr const char* value = "__half"; };
template <> struct TypeName<__nv_bfloat16> { static constexpr const char* value = "__nv_bfloat16"; };
template <> struct TypeName<int> { static constexpr const char* value = "int"; };
template <> struct TypeName<long long> { static constexpr const char* value = "long long"; };

// "const float*", "float*", "int", ...: the parameter's type as raw_module.py parses it.
template <typename A>
std::string type_name() {
    if constexpr (std::is_pointer_v<A>) {
        using P = std::remove_pointer_t<A>;
        return std::string(std::is_const_v<P> ? "const " : "") + TypeName<std::remove_cv_t<P>>::value + "*";
    } else {
        return TypeName<std::remove_cv_t<A>>::value;
    }
}

template <typename F> struct Signature;

template <typename... Args>
struct Signature<void (*)(Args...)> {
    static std::string text() {
        std::string s;
        ((s += (s.empty() ? "" : ","), s += type_name<Args>()), ...);
        return s;
    }
    template <auto Kernel, size_t... I>
    static void call(void* const* argv, std::index_sequence<I...>) {
        Kernel(*static_cast<std::remove_reference_t<Args>*>(argv[I])...);
    }
};

// The fiber body of one instance: unpack argv and call the kernel.
template <auto Kernel> struct Runner;

template <typename... Args, void (*Kernel)(Args...)>
struct Runner<Kernel> {
    static void run(void* argv) {
        Signature<void (*)(Args...)>::template call<Kernel>(static_cast<void* const*>(argv),
                                                            std::index_sequence_for<Args...>{});
    }
};

struct Entry {
    const char* name;       // the name expression the host hands NVRTC
    std::string signature;  // comma-separated parameter types
    unsigned max_threads;   // the kernel's __launch_bounds__: a GPU refuses a larger block
    void (*body)(void*);
};

}  // namespace emu_table

// Each fiber's stack. The emulator's default (64 KiB) costs a launch of 256 threads
// 16 MiB of zeroed memory; a kernel without deep calls needs a fraction of it.
#ifndef EMU_TABLE_STACK_BYTES
#define EMU_TABLE_STACK_BYTES (16 * 1024)
#endif

// EMU_KERNEL(max_threads, name<T>): one table entry; the name expression is the
// instance itself, stringified.
#define EMU_KERNEL(MAX_THREADS, ...)                                                                     \
    emu_table::Entry {                                                                                   \
        #__VA_ARGS__, emu_table::Signature<decltype(&__VA_ARGS__)>::text(), (MAX_THREADS),               \
            &emu_table::Runner<&__VA_ARGS__>::run                                                        \
    }

// The C ABI over a table `TABLE` (an array of emu_table::Entry).
#define EMU_EXPORT_TABLE(TABLE)                                                                               \
    namespace {                                                                                               \
    constexpr int emu_table_count = sizeof(TABLE) / sizeof(TABLE[0]);                                        \
    thread_local std::string emu_table_error;                                                                 \
    std::mutex emu_table_mutex; /* one launch at a time: the emulator's state is global */                   \
    }                                                                                                         \
    extern "C" {                                                                                              \
    int emu_count() { return emu_table_count; }                                                               \
    const char* emu_name(int i) { return i >= 0 && i < emu_table_count ? TABLE[i].name : nullptr; }           \
    const char* emu_signature(int i) {                                                                        \
        return i >= 0 && i < emu_table_count ? TABLE[i].signature.c_str() : nullptr;                          \
    }                                                                                                         \
    unsigned emu_max_threads(int i) { return i >= 0 && i < emu_table_count ? TABLE[i].max_threads : 0u; }     \
    const char* emu_last_error() { return emu_table_error.c_str(); }                                          \
    /* 0 on success, else -1 with the reason in emu_last_error(). */                                          \
    int emu_launch(int i, unsigned grid, unsigned block, int order, unsigned seed, unsigned first_block,      \
                   unsigned last_block, void* const* argv) {                                                  \
        emu_table_error.clear();                                                                              \
        if (i < 0 || i >= emu_table_count) {                                                                  \
            emu_table_error = "no kernel instance " + std::to_string(i);                                      \
            return -1;                                                                                        \
        }                                                                                                     \
        if (block > TABLE[i].max_threads) {                                                                   \
            emu_table_error = std::string(TABLE[i].name) + ": block of " + std::to_string(block) +            \
                              " threads exceeds its __launch_bounds__ of " +                                  \
                              std::to_string(TABLE[i].max_threads) + " (a GPU refuses this launch)";          \
            return -1;                                                                                        \
        }                                                                                                     \
        emu::Options opts;                                                                                    \
        opts.order = static_cast<emu::Order>(order);                                                          \
        opts.seed = seed;                                                                                     \
        opts.first_block = first_block;                                                                       \
        opts.last_block = last_block;                                                                         \
        opts.stack_bytes = EMU_TABLE_STACK_BYTES;                                                             \
        std::lock_guard<std::mutex> lock(emu_table_mutex);                                                    \
        try {                                                                                                 \
            emu::launch(grid, block, opts, TABLE[i].body, const_cast<void**>(argv));                          \
        } catch (const std::exception& exc) {                                                                 \
            emu_table_error = exc.what();                                                                     \
            return -1;                                                                                        \
        }                                                                                                     \
        return 0;                                                                                             \
    }                                                                                                         \
    }
