// out[M, N] = x[M, K] @ w[K, N] (+ bias) for the small M of decode steps (engine.kernel_linear
// sends it up to 256 rows).
//
// Why a kernel: at decode batch sizes MKL's sgemm runs well below the FMA peak and reads each
// weight at well under the memory bandwidth; oneDNN's bf16 GEMM on a CPU without bf16
// instructions (no AVX512_BF16/AMX) is emulated and slower still (benchmarks/RESULTS.md,
// "engine/kernels/small_gemm.cpp"). Here every thread owns whole panels of w (two vector
// registers wide), so each weight byte is read from memory exactly once per call (one contiguous
// stream per panel, with software prefetch), and MR rows of x at a time are multiplied against it
// in registers (2 x MR accumulators), which keeps both FMA ports busy. Two builds of one kernel:
// AVX-512 (32-column panels, 12 rows: 24 of 32 registers) and AVX2 + FMA (16-column panels,
// 6 rows: 12 of 16 registers), e.g. for AMD Zen 2/3.
//
// Types: x and out are both fp32 or both bf16; w is fp32 or bf16 (widened exactly to fp32); the
// bias, when given, is fp32. All math is fp32: each output is one fp32 FMA chain in k order (the
// same on either build); bf16 outputs are rounded to nearest even. w is packed in panels:
// [ceil(N / NB)][K][NB], the last panel zero-padded (a row-major [K, N] would put each panel row a
// page apart: TLB misses and no hardware prefetch). small_gemm_panel_width() says which NB this
// build packs for.
#include <cstdint>
#include <utility>
#include <vector>

#include "numeric.h"
#include "pool.h"

#ifdef TANDEM_LANES  // numeric.h: AVX-512 or AVX2 + FMA
namespace {

constexpr int PREFETCH = 32;  // rows of w ahead of the one in use

using Simd = tandem::Lanes;
#if TANDEM_LANES == 16
constexpr int MR = 12;  // rows of x per register tile
// Whole-K passes, no prefetch of the next block: with AVX-512 the FMA units keep up with memory,
// and spreading the next panel's prefetch over the passes measured no gain (benchmarks/RESULTS.md).
constexpr int64_t BLOCK_BYTES = INT64_MAX;
constexpr bool PREFETCH_NEXT_BLOCK = false;
#else
constexpr int MR = 6;
// With half the FMA width, a panel's later passes are compute-bound and its first memory-bound:
// k-blocks of 16 KB stay in L1 across the passes, and the later passes fetch the next block.
constexpr int64_t BLOCK_BYTES = 16 << 10;
constexpr bool PREFETCH_NEXT_BLOCK = true;
#endif
using V = Simd::V;
constexpr int NB = 2 * Simd::LANES;  // columns per panel: two vector registers

// One row of a tile's results (+ bias) into `out`, its first `ncols` columns: a full panel in two
// vector stores, the last, partial one through a buffer (same rounding, scalar).
template <typename O>
inline void store_row(V lo, V hi, const float* bias, O* out, int64_t ncols) {
    if (ncols == NB) {
        if (bias) {
            lo = Simd::add(lo, Simd::load(bias));
            hi = Simd::add(hi, Simd::load(bias + Simd::LANES));
        }
        Simd::store(out, lo);
        Simd::store(out + Simd::LANES, hi);
        return;
    }
    alignas(64) float row[NB];
    Simd::store(row, lo);
    Simd::store(row + Simd::LANES, hi);
    for (int64_t c = 0; c < ncols; ++c) out[c] = tandem::narrow<O>(bias ? row[c] + bias[c] : row[c]);
}

// Weight lines to prefetch during one tile pass, one every `every` k steps: the next k-block's,
// so that its first pass finds it in cache while this block's later passes compute.
struct Ahead {
    const char* next;
    const char* end;
    int64_t every;
};

// Rows [0, R) of x (row stride ldx) times k-block [0, kc) of one panel. The running sums start
// at zero on the first block and otherwise come from `partial` (fp32, row stride NB); after the
// last block they go (+ bias) to `out`, otherwise back to `partial`. Saving and reloading a sum
// changes nothing: each output is still one fp32 FMA chain in k order.
template <int R, typename W, typename O>
void tile(const float* x, int64_t ldx, const W* block, int64_t kc, float* partial, bool first, bool last,
          const float* bias, O* out, int64_t ldo, int64_t ncols, Ahead ahead) {
    V acc[R][2];
    for (int r = 0; r < R; ++r) {
        acc[r][0] = first ? Simd::set1(0.0f) : Simd::load(partial + r * NB);
        acc[r][1] = first ? Simd::set1(0.0f) : Simd::load(partial + r * NB + Simd::LANES);
    }
    int64_t countdown = ahead.every;
    for (int64_t k = 0; k < kc; ++k) {
        const W* row = block + k * NB;
        // Prefetching past the weight's end is harmless (a hint, never a fault).
        _mm_prefetch(reinterpret_cast<const char*>(row + PREFETCH * NB), _MM_HINT_T0);
        if constexpr (NB * sizeof(W) > 64)
            _mm_prefetch(reinterpret_cast<const char*>(row + PREFETCH * NB) + 64, _MM_HINT_T0);
        if (--countdown == 0) {
            countdown = ahead.every;
            if (ahead.next < ahead.end) {
                _mm_prefetch(ahead.next, _MM_HINT_T0);
                ahead.next += 64;
            }
        }
        const V w0 = Simd::load(row), w1 = Simd::load(row + Simd::LANES);
        for (int r = 0; r < R; ++r) {
            const V a = Simd::set1(x[r * ldx + k]);
            acc[r][0] = Simd::fma(a, w0, acc[r][0]);
            acc[r][1] = Simd::fma(a, w1, acc[r][1]);
        }
    }
    for (int r = 0; r < R; ++r) {
        if (last) {
            store_row(acc[r][0], acc[r][1], bias, out + r * ldo, ncols);
        } else {
            Simd::store(partial + r * NB, acc[r][0]);
            Simd::store(partial + r * NB + Simd::LANES, acc[r][1]);
        }
    }
}

template <typename W, typename O>
using TileFn = void (*)(const float*, int64_t, const W*, int64_t, float*, bool, bool, const float*, O*,
                        int64_t, int64_t, Ahead);

template <typename W, typename O, int... Rs>
constexpr TileFn<W, O> tile_for(int rows, std::integer_sequence<int, Rs...>) {
    constexpr TileFn<W, O> table[] = {nullptr, &tile<Rs + 1, W, O>...};
    return table[rows];
}

struct Shape {
    int64_t M, K, N;
};

// Equal k-blocks of at most BLOCK_BYTES of a panel each: [blocks, rows per block].
template <typename W>
std::pair<int64_t, int64_t> k_blocks(int64_t K) {
    const int64_t most = BLOCK_BYTES / (NB * static_cast<int64_t>(sizeof(W)));
    const int64_t blocks = most >= K ? 1 : (K + most - 1) / most;
    return {blocks, (K + blocks - 1) / blocks};
}

// Panels [p0, p1) of w against all of x (fp32, [M, K]). Each k-block of a panel is read from
// memory by the first row tile's pass and from L1 by the others', which meanwhile prefetch the
// next block (of this panel or the next: the packed weight is one contiguous stream). The rows
// are split into equal passes (32 rows: 6+6+5+5+5+5, not 6 x 5 + 2): a tile of very few rows has
// too few independent FMA chains to hide their latency.
template <typename W, typename O>
void run_panels(const float* x, const Shape& s, const W* w, const float* bias, O* out, int64_t p0, int64_t p1) {
    const auto tiles = std::make_integer_sequence<int, MR>{};
    const auto [blocks, block_rows] = k_blocks<W>(s.K);
    const int64_t passes = (s.M + MR - 1) / MR;
    const int64_t block_bytes = block_rows * NB * static_cast<int64_t>(sizeof(W));
    const char* range_end = reinterpret_cast<const char*>(w + p1 * s.K * NB);
    std::vector<float> partial(blocks > 1 ? s.M * NB : 0);
    // Bytes of the next block each later pass prefetches (whole lines).
    const int64_t share =
        PREFETCH_NEXT_BLOCK && passes > 1 ? (block_bytes / 64 + passes - 2) / (passes - 1) * 64 : 0;
    for (int64_t p = p0; p < p1; ++p) {
        const int64_t n0 = p * NB, ncols = s.N - n0 < NB ? s.N - n0 : NB;
        const W* panel = w + p * s.K * NB;
        const float* b = bias ? bias + n0 : nullptr;
        for (int64_t k0 = 0; k0 < s.K; k0 += block_rows) {
            const int64_t kc = s.K - k0 < block_rows ? s.K - k0 : block_rows;
            const char* next = reinterpret_cast<const char*>(panel + (k0 + kc) * NB);
            // One line of the share every `every` k steps of this block.
            const int64_t every = share ? (kc * 64 / share > 1 ? kc * 64 / share : 1) : 1;
            for (int64_t pass = 0, m = 0; pass < passes; ++pass) {
                const int rows = static_cast<int>(s.M / passes + (pass < s.M % passes ? 1 : 0));
                Ahead ahead{range_end, range_end, 1};
                if (pass > 0 && share) {
                    const char* from = next + (pass - 1) * share;
                    ahead = {from, from + share < range_end ? from + share : range_end, every};
                }
                float* sums = blocks > 1 ? partial.data() + m * NB : nullptr;  // whole K: in registers
                tile_for<W, O>(rows, tiles)(x + m * s.K + k0, s.K, panel + k0 * NB, kc, sums, k0 == 0,
                                            k0 + kc >= s.K, b, out + m * s.N + n0, s.N, ncols, ahead);
                m += rows;
            }
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

// Columns per packed panel of w (NB), or 0 where this build has no small GEMM (no AVX2/AVX-512).
extern "C" int small_gemm_panel_width() {
#ifdef TANDEM_LANES  // numeric.h: AVX-512 or AVX2 + FMA
    return NB;
#else
    return 0;
#endif
}

// x_bf16 / w_bf16 select the element types (0: fp32, 1: bf16); out has x's type.
extern "C" int small_gemm(const void* x, int64_t x_bf16, const void* w, int64_t w_bf16, const float* bias,
                          void* out, int64_t M, int64_t K, int64_t N, int64_t threads) {
#ifdef TANDEM_LANES  // numeric.h: AVX-512 or AVX2 + FMA
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
