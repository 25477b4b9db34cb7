// out[M, N] = x[M, K] @ w[K, N] (+ bias) for the small M of decode steps (engine.kernel_linear
// sends it up to 256 rows).
//
// Why a kernel: at decode batch sizes MKL's sgemm runs at a third of this CPU's FMA peak and, at
// M = 8..32, reads each weight at well under the memory bandwidth; oneDNN's bf16 GEMM on a CPU
// without bf16 instructions (no AVX512_BF16/AMX) is emulated and slower still. Here every thread
// owns whole 32-column panels of w, so each weight byte is read from memory exactly once per call
// (one contiguous stream per panel, with software prefetch), and 12 rows of x at a time are
// multiplied against it in registers (24 accumulators), which keeps both FMA ports busy.
//
// Types: x and out are both fp32 or both bf16; w is fp32 or bf16 (widened exactly to fp32); the
// bias, when given, is fp32. All math is fp32: each output is one fp32 FMA chain in k order; bf16
// outputs are rounded to nearest even. w is packed in panels: [ceil(N / 32)][K][32], the last
// panel zero-padded (a row-major [K, N] would put each panel row a page apart: TLB misses and no
// hardware prefetch, half the speed).
#include <cstdint>
#include <utility>
#include <vector>

#include "numeric.h"
#include "pool.h"

#if defined(__AVX512F__) && defined(__AVX512BW__)
#define TANDEM_SMALL_GEMM 1
#endif

#ifdef TANDEM_SMALL_GEMM
namespace {

constexpr int NB = 32;        // columns per panel: two zmm registers
constexpr int MR = 12;        // rows of x per register tile
constexpr int PREFETCH = 32;  // rows of w ahead of the one in use

using tandem::load16;

inline void store_out(float* p, __m512 v, __mmask16 m) { _mm512_mask_storeu_ps(p, m, v); }
inline void store_out(uint16_t* p, __m512 v, __mmask16 m) {
    const __m512i bits = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);  // rounding must not turn NaN into inf
    r = _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7fc0));
    _mm256_mask_storeu_epi16(p, m, _mm512_cvtepi32_epi16(r));
}

inline __mmask16 lane_mask(int64_t n) {
    return n >= 16 ? static_cast<__mmask16>(0xffff) : n <= 0 ? 0 : static_cast<__mmask16>((1u << n) - 1);
}

template <int R, typename W, typename O>
void tile(const float* x, int64_t K, const W* panel, int64_t ncols, const float* bias, O* out,
          int64_t ldo) {
    const __mmask16 m0 = lane_mask(ncols), m1 = lane_mask(ncols - 16);
    __m512 acc[R][2];
    for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; ++k) {
        const W* row = panel + k * NB;
        // Prefetching past the panel's end is harmless (a hint, never a fault).
        _mm_prefetch(reinterpret_cast<const char*>(row + PREFETCH * NB), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(row + PREFETCH * NB) + 64, _MM_HINT_T0);
        const __m512 w0 = load16(row), w1 = load16(row + 16);
        for (int r = 0; r < R; ++r) {
            const __m512 a = _mm512_set1_ps(x[r * K + k]);
            acc[r][0] = _mm512_fmadd_ps(a, w0, acc[r][0]);
            acc[r][1] = _mm512_fmadd_ps(a, w1, acc[r][1]);
        }
    }
    const __m512 b0 = bias ? _mm512_maskz_loadu_ps(m0, bias) : _mm512_setzero_ps();
    const __m512 b1 = bias ? _mm512_maskz_loadu_ps(m1, bias + 16) : _mm512_setzero_ps();
    for (int r = 0; r < R; ++r) {
        store_out(out + r * ldo, _mm512_add_ps(acc[r][0], b0), m0);
        store_out(out + r * ldo + 16, _mm512_add_ps(acc[r][1], b1), m1);
    }
}

template <typename W, typename O>
using TileFn = void (*)(const float*, int64_t, const W*, int64_t, const float*, O*, int64_t);

template <typename W, typename O, int... Rs>
constexpr TileFn<W, O> tile_for(int rows, std::integer_sequence<int, Rs...>) {
    constexpr TileFn<W, O> table[] = {nullptr, &tile<Rs + 1, W, O>...};
    return table[rows];
}

struct Shape {
    int64_t M, K, N;
};

// Panels [p0, p1) of w against all of x (fp32, [M, K]).
template <typename W, typename O>
void run_panels(const float* x, const Shape& s, const W* w, const float* bias, O* out, int64_t p0, int64_t p1) {
    const auto rows = std::make_integer_sequence<int, MR>{};
    for (int64_t p = p0; p < p1; ++p) {
        const int64_t n0 = p * NB, ncols = s.N - n0 < NB ? s.N - n0 : NB;
        const W* panel = w + p * s.K * NB;
        const float* b = bias ? bias + n0 : nullptr;
        for (int64_t m = 0; m < s.M; m += MR) {
            const int r = static_cast<int>(s.M - m < MR ? s.M - m : MR);
            tile_for<W, O>(r, rows)(x + m * s.K, s.K, panel, ncols, b, out + m * s.N + n0, s.N);
        }
    }
}

inline const float* as_fp32(const float* x, int64_t, std::vector<float>&) { return x; }
inline const float* as_fp32(const uint16_t* x, int64_t count, std::vector<float>& buf) {
    buf.resize(count);
    for (int64_t i = 0; i < count; ++i) buf[i] = tandem::widen(x[i]);
    return buf.data();
}

template <typename X, typename W>
int gemm(const X* x, const W* w, const float* bias, X* out, const Shape& s, int64_t threads) {
    if (s.M <= 0 || s.K <= 0 || s.N <= 0) return 1;
    std::vector<float> widened;
    const float* xf = as_fp32(x, s.M * s.K, widened);
    const int64_t panels = (s.N + NB - 1) / NB;
    // Below a few panels per thread a second thread costs more to wake than it saves.
    int64_t workers = threads < 1 ? 1 : threads;
    if (workers > panels / 4) workers = panels / 4 > 1 ? panels / 4 : 1;
    tandem::parallel_ranges(panels, workers, [&](int64_t first, int64_t last) {
        run_panels<W, X>(xf, s, w, bias, out, first, last);
    });
    return 0;
}

}  // namespace
#endif

extern "C" int small_gemm_supported() {
#ifdef TANDEM_SMALL_GEMM
    return 1;
#else
    return 0;
#endif
}

// x_bf16 / w_bf16 select the element types (0: fp32, 1: bf16); out has x's type.
extern "C" int small_gemm(const void* x, int64_t x_bf16, const void* w, int64_t w_bf16, const float* bias,
                          void* out, int64_t M, int64_t K, int64_t N, int64_t threads) {
#ifdef TANDEM_SMALL_GEMM
    const Shape s{M, K, N};
    using u16 = uint16_t;
    if (x_bf16 && w_bf16) return gemm(static_cast<const u16*>(x), static_cast<const u16*>(w), bias, static_cast<u16*>(out), s, threads);
    if (x_bf16) return gemm(static_cast<const u16*>(x), static_cast<const float*>(w), bias, static_cast<u16*>(out), s, threads);
    if (w_bf16) return gemm(static_cast<const float*>(x), static_cast<const u16*>(w), bias, static_cast<float*>(out), s, threads);
    return gemm(static_cast<const float*>(x), static_cast<const float*>(w), bias, static_cast<float*>(out), s, threads);
#else
    (void)x; (void)x_bf16; (void)w; (void)w_bf16; (void)bias; (void)out;
    (void)M; (void)K; (void)N; (void)threads;
    return 3;
#endif
}
