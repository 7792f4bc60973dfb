// Emulator stand-in for CUDA's cuda_bf16.h: bfloat16 is the top half of a
// float32; conversions round to nearest even and keep NaN a NaN.
#pragma once

#include <cstdint>
#include <cstring>

struct __nv_bfloat16 {
    std::uint16_t bits;
};

inline float __bfloat162float(__nv_bfloat16 h) {
    const std::uint32_t u = static_cast<std::uint32_t>(h.bits) << 16;
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
}

inline __nv_bfloat16 __float2bfloat16_rn(float f) {
    std::uint32_t u;
    std::memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{static_cast<std::uint16_t>((u >> 16) | 0x40u)};
    u += 0x7fffu + ((u >> 16) & 1u);  // ties to even; overflow carries into the exponent, giving inf
    return __nv_bfloat16{static_cast<std::uint16_t>(u >> 16)};
}
