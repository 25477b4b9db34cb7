// Element conversions shared by the kernels: bf16 (uint16_t, the top half of an fp32) <-> fp32,
// scalar and 16 lanes at a time, and glibc's vector expf where the build has it.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__AVX512F__) || defined(__AVX2__)
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

// glibc's vector expf (libmvec, within 4 ulp), 16 lanes on AVX-512 and 8 on AVX2, behind one
// small interface (ExpLanes) for the kernels' exp loops; the build defines TANDEM_NO_MVEC where
// the C library has none (then the kernels use scalar expf).
#if defined(__AVX512F__) && !defined(TANDEM_NO_MVEC)
#define TANDEM_VECTOR_EXPF 1
extern "C" __m512 _ZGVeN16v_expf(__m512);
namespace tandem {
struct ExpLanes {
    using V = __m512;
    static constexpr int LANES = 16;
    static V load(const float* p) { return _mm512_loadu_ps(p); }
    static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
    static V set1(float f) { return _mm512_set1_ps(f); }
    static V add(V a, V b) { return _mm512_add_ps(a, b); }
    static V sub(V a, V b) { return _mm512_sub_ps(a, b); }
    static V div(V a, V b) { return _mm512_div_ps(a, b); }
    static V exp(V v) { return _ZGVeN16v_expf(v); }
    static float sum(V v) { return _mm512_reduce_add_ps(v); }
};
}  // namespace tandem
#elif defined(__AVX2__) && !defined(TANDEM_NO_MVEC)
#define TANDEM_VECTOR_EXPF 1
extern "C" __m256 _ZGVdN8v_expf(__m256);
namespace tandem {
struct ExpLanes {
    using V = __m256;
    static constexpr int LANES = 8;
    static V load(const float* p) { return _mm256_loadu_ps(p); }
    static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
    static V set1(float f) { return _mm256_set1_ps(f); }
    static V add(V a, V b) { return _mm256_add_ps(a, b); }
    static V sub(V a, V b) { return _mm256_sub_ps(a, b); }
    static V div(V a, V b) { return _mm256_div_ps(a, b); }
    static V exp(V v) { return _ZGVdN8v_expf(v); }
    static float sum(V v) {  // lanes added pairwise, high half onto low
        __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        h = _mm_add_ps(h, _mm_movehl_ps(h, h));
        return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
    }
};
}  // namespace tandem
#endif
