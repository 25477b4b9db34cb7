// Element conversions shared by the kernels: bf16 (uint16_t, the top half of an fp32) <-> fp32,
// scalar and a vector at a time, and one vector interface per instruction set (Lanes).
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

}  // namespace tandem

// glibc's vector expf (libmvec, within 4 ulp); the build defines TANDEM_NO_MVEC where the C
// library has none (then the kernels use scalar expf).
#if !defined(TANDEM_NO_MVEC) && defined(__AVX512F__)
#define TANDEM_VECTOR_EXPF 1
extern "C" __m512 _ZGVeN16v_expf(__m512);
#elif !defined(TANDEM_NO_MVEC) && defined(__AVX2__) && defined(__FMA__)
#define TANDEM_VECTOR_EXPF 1
extern "C" __m256 _ZGVdN8v_expf(__m256);
#endif

// The fp32 vector the kernels compute in, one per instruction set: AVX-512 (16 lanes) or AVX2 +
// FMA (8 lanes, e.g. AMD Zen 2/3). load widens bf16 exactly; store(uint16_t*) rounds to nearest
// even, and a NaN stays NaN (the rounding add must not carry it into inf).
namespace tandem {
#if defined(__AVX512F__)
#define TANDEM_LANES 16
struct Lanes {
    using V = __m512;
    static constexpr int LANES = 16;
    static V set1(float f) { return _mm512_set1_ps(f); }
    static V load(const float* p) { return _mm512_loadu_ps(p); }
    static V load(const uint16_t* p) {
        const __m256i half = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
    }
    static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
    static void store(uint16_t* p, V v) {
        const __m512i bits = _mm512_castps_si512(v);
        const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
        __m512i r = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
        r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(r));
    }
    static V add(V a, V b) { return _mm512_add_ps(a, b); }
    static V sub(V a, V b) { return _mm512_sub_ps(a, b); }
    static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
    static V div(V a, V b) { return _mm512_div_ps(a, b); }
    static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
    static V max(V a, V b) { return _mm512_max_ps(a, b); }  // b where either is NaN
    static float sum(V v) { return _mm512_reduce_add_ps(v); }
    static float largest(V v) { return _mm512_reduce_max_ps(v); }
#ifdef TANDEM_VECTOR_EXPF
    static V exp(V v) { return _ZGVeN16v_expf(v); }
#endif
};
#elif defined(__AVX2__) && defined(__FMA__)
#define TANDEM_LANES 8
struct Lanes {
    using V = __m256;
    static constexpr int LANES = 8;
    static V set1(float f) { return _mm256_set1_ps(f); }
    static V load(const float* p) { return _mm256_loadu_ps(p); }
    static V load(const uint16_t* p) {
        const __m128i half = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16));
    }
    static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
    static void store(uint16_t* p, V v) {
        const __m256i bits = _mm256_castps_si256(v);
        const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
        __m256i r = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
        const __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
        r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc0), _mm256_castps_si256(nan));
        // 32 -> 16 bits (values fit, so unsigned saturation is exact); packus works per 128-bit
        // lane, so gather the two lanes' halves into the low 128 bits.
        const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
    }
    static V add(V a, V b) { return _mm256_add_ps(a, b); }
    static V sub(V a, V b) { return _mm256_sub_ps(a, b); }
    static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
    static V div(V a, V b) { return _mm256_div_ps(a, b); }
    static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
    static V max(V a, V b) { return _mm256_max_ps(a, b); }  // b where either is NaN
    static float sum(V v) {  // lanes added pairwise, high half onto low
        __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        h = _mm_add_ps(h, _mm_movehl_ps(h, h));
        return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
    }
    static float largest(V v) {
        __m128 h = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        h = _mm_max_ps(h, _mm_movehl_ps(h, h));
        return _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
    }
#ifdef TANDEM_VECTOR_EXPF
    static V exp(V v) { return _ZGVdN8v_expf(v); }
#endif
};
#endif
}  // namespace tandem
