// Element conversions shared by the kernels: bf16 (uint16_t, the top half of an fp32) <-> fp32,
// scalar and 16 lanes at a time, and glibc's vector expf where the build has it.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace tandem {

inline float widen(float f) { return f; }
inline float widen(uint16_t h) {
    const uint32_t bits = static_cast<uint32_t>(h) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
}

// fp32 -> E, bf16 rounded to nearest even (a NaN stays a quiet NaN).
template <typename E> E narrow(float f);
template <> inline float narrow<float>(float f) { return f; }
template <> inline uint16_t narrow<uint16_t>(float f) {
    uint32_t bits;
    std::memcpy(&bits, &f, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40u);
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return static_cast<uint16_t>(bits >> 16);
}

#if defined(__AVX512F__)
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const uint16_t* p) {
    const __m256i half = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
}
#endif

}  // namespace tandem

// glibc's vector expf (libmvec, within 4 ulp), 16 lanes; the build defines TANDEM_NO_MVEC where
// the C library has none.
#if defined(__AVX512F__) && !defined(TANDEM_NO_MVEC)
#define TANDEM_VECTOR_EXPF 1
extern "C" __m512 _ZGVeN16v_expf(__m512);
#endif
