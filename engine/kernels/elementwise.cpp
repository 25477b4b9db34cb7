// Fused elementwise steps of a decoder layer: residual add + RMSNorm, rotary embedding in place,
// and silu(gate) * up.
//
// Why: in torch each of these is 3-8 separate ops, every one a full pass over the activations
// and (at decode sizes) a dispatch that costs more than its arithmetic; here each is one pass.
// Numerics follow the torch code they replace (engine/layers.py), rounding where it rounds: the
// norm in fp32, its result rounded to the activation dtype before the weight multiplies; rope
// and silu*up round each product and sum like the separate bf16 ops do. fp32 has no FMA
// contraction (built with -ffp-contract=off), so a * b + c rounds twice as in torch.
//
// Element types: fp32 (float) or bf16 (uint16_t, the top half of an fp32), one per call.
#include <cmath>
#include <cstdint>
#include <vector>

#include "numeric.h"
#include "pool.h"

namespace {

using tandem::narrow;
using tandem::widen;

// The value as the activation dtype holds it: identity for fp32, round-trip through bf16.
template <typename E> inline float round_to(float f) { return widen(narrow<E>(f)); }

// fn(first, last) over the rows; large calls split the rows across threads.
template <typename Fn>
void for_rows(int64_t rows, int64_t cols, int64_t threads, Fn fn) {
    constexpr int64_t kMinPerThread = 1 << 15;  // elements: below this a thread costs more than it saves
    const int64_t workers = rows * cols < 2 * kMinPerThread ? 1 : threads;
    tandem::parallel_ranges(rows, workers, fn);
}

// sum of h[c]^2 in double: products of floats are exact in double and the sum order-independent
// to fp32 precision, so 8 independent partial sums (which vectorize) change nothing visible, where
// one running sum was a chain of dependent adds, most of the kernel's time.
inline double sum_of_squares(const float* h, int64_t n) {
    double lanes[8] = {0.0};
    int64_t c = 0;
    for (; c + 8 <= n; c += 8)
        for (int l = 0; l < 8; ++l) lanes[l] += static_cast<double>(h[c + l]) * h[c + l];
    double sum = 0.0;
    for (int l = 0; l < 8; ++l) sum += lanes[l];
    for (; c < n; ++c) sum += static_cast<double>(h[c]) * h[c];
    return sum;
}

// x += delta (when given), then out = weight * round(x * rsqrt(mean(x^2) + eps)).
template <typename E>
void add_rms_norm(E* x, const E* delta, const E* weight, E* out, int64_t rows, int64_t cols, float eps,
                  int64_t threads) {
    for_rows(rows, cols, threads, [=](int64_t first, int64_t last) {
        std::vector<float> h(cols);
        for (int64_t r = first; r < last; ++r) {
            E* xr = x + r * cols;
            for (int64_t c = 0; c < cols; ++c) {
                float v = widen(xr[c]);
                if (delta) {
                    v = round_to<E>(v + widen(delta[r * cols + c]));
                    xr[c] = narrow<E>(v);
                }
                h[c] = v;
            }
            const float mean = static_cast<float>(sum_of_squares(h.data(), cols) / static_cast<double>(cols));
            const float inv = 1.0f / std::sqrt(mean + eps);
            for (int64_t c = 0; c < cols; ++c)
                out[r * cols + c] = narrow<E>(widen(weight[c]) * round_to<E>(h[c] * inv));
        }
    });
}

// Rotate-half rope in place on the first `heads` heads of each row: x * cos + rotate_half(x) * sin.
template <typename E>
void rope(E* x, int64_t row_stride, int64_t rows, int64_t heads, int64_t dim, const E* cos, const E* sin,
          int64_t threads) {
    const int64_t half = dim / 2;
    for_rows(rows, heads * dim, threads, [=](int64_t first, int64_t last) {
        std::vector<float> v(dim);
        for (int64_t r = first; r < last; ++r) {
            const E* c = cos + r * dim;
            const E* s = sin + r * dim;
            for (int64_t h = 0; h < heads; ++h) {
                E* head = x + r * row_stride + h * dim;
                for (int64_t d = 0; d < dim; ++d) v[d] = widen(head[d]);
                for (int64_t d = 0; d < dim; ++d) {
                    const float rotated = d < half ? -v[d + half] : v[d - half];
                    const float a = round_to<E>(v[d] * widen(c[d]));
                    const float b = round_to<E>(rotated * widen(s[d]));
                    head[d] = narrow<E>(a + b);
                }
            }
        }
    });
}

// silu(g) = g / (1 + exp(-g)) over n values, in place in `g` (fp32 scratch).
inline void silu_inplace(float* g, int64_t n) {
    int64_t i = 0;
#ifdef TANDEM_VECTOR_EXPF
    using L = tandem::Lanes;
    const L::V one = L::set1(1.0f), zero = L::set1(0.0f);
    for (; i + L::LANES <= n; i += L::LANES) {
        const L::V v = L::load(g + i);
        L::store(g + i, L::div(v, L::add(one, L::exp(L::sub(zero, v)))));
    }
#endif
    for (; i < n; ++i) g[i] = g[i] / (1.0f + std::exp(-g[i]));
}

// out[r, :] = round(silu(gate_up[r, :inter])) * gate_up[r, inter:].
template <typename E>
void silu_mul(const E* gate_up, E* out, int64_t rows, int64_t inter, int64_t threads) {
    for_rows(rows, 2 * inter, threads, [=](int64_t first, int64_t last) {
        std::vector<float> g(inter);
        for (int64_t r = first; r < last; ++r) {
            const E* gr = gate_up + r * 2 * inter;
            for (int64_t c = 0; c < inter; ++c) g[c] = widen(gr[c]);
            silu_inplace(g.data(), inter);
            for (int64_t c = 0; c < inter; ++c)
                out[r * inter + c] = narrow<E>(round_to<E>(g[c]) * widen(gr[inter + c]));
        }
    });
}

// The largest of x[0..n) (NaNs skipped), and into `special` a NaN when any value is NaN or
// infinite (v * 0 is NaN exactly then), else zero.
inline float block_max(const float* x, int64_t n, float& special) {
    int64_t c = 0;
    float peak = -INFINITY;
#ifdef TANDEM_LANES
    using L = tandem::Lanes;
    L::V peaks = L::set1(-INFINITY), specials = L::set1(0.0f);
    const L::V zero = L::set1(0.0f);
    for (; c + L::LANES <= n; c += L::LANES) {
        const L::V v = L::load(x + c);
        peaks = L::max(v, peaks);
        specials = L::add(specials, L::mul(v, zero));
    }
    peak = L::largest(peaks);
    special += L::sum(specials);
#endif
    for (; c < n; ++c) {
        peak = x[c] > peak ? x[c] : peak;
        special += x[c] * 0.0f;
    }
    return peak;
}

// The first index of the row's largest value, torch.argmax's answer: a row holding a NaN gives its
// first NaN. Blocks' maxima first, then the first block holding the row's maximum is searched;
// only rows with a NaN or an infinity take an exact scalar walk. Why: torch's argmax over a batch
// of vocabulary-sized rows took a few percent of a decode step (benchmarks/RESULTS.md).
inline int64_t argmax_row(const float* x, int64_t n, std::vector<float>& maxima) {
    constexpr int64_t BLOCK = 256;
    const int64_t blocks = (n + BLOCK - 1) / BLOCK;
    maxima.resize(blocks);
    float special = 0.0f, peak = -INFINITY;
    for (int64_t k = 0; k < blocks; ++k) {
        const int64_t len = n - k * BLOCK < BLOCK ? n - k * BLOCK : BLOCK;
        maxima[k] = block_max(x + k * BLOCK, len, special);
        peak = maxima[k] > peak ? maxima[k] : peak;
    }
    if (special == 0.0f) {  // all finite: the peak's first occurrence, in the first block holding it
        int64_t k = 0;
        while (maxima[k] != peak) ++k;
        for (int64_t c = k * BLOCK;; ++c)
            if (x[c] == peak) return c;
    }
    int64_t best = 0;
    for (int64_t c = 0; c < n; ++c) {
        if (std::isnan(x[c])) return c;
        if (x[c] > x[best]) best = c;
    }
    return best;
}

}  // namespace

// out[r] = argmax of row r of x (fp32 [rows, cols]), split over threads by rows.
extern "C" int argmax_rows(const float* x, int64_t rows, int64_t cols, int64_t* out, int64_t threads) {
    if (rows < 0 || cols <= 0) return 1;
    for_rows(rows, cols, threads, [=](int64_t first, int64_t last) {
        std::vector<float> maxima;
        for (int64_t r = first; r < last; ++r) out[r] = argmax_row(x + r * cols, cols, maxima);
    });
    return 0;
}

extern "C" int fused_add_rms_norm(void* x, const void* delta, const void* weight, void* out, int64_t rows,
                                  int64_t cols, float eps, int64_t bf16, int64_t threads) {
    if (rows < 0 || cols <= 0) return 1;
    if (bf16)
        add_rms_norm(static_cast<uint16_t*>(x), static_cast<const uint16_t*>(delta),
                     static_cast<const uint16_t*>(weight), static_cast<uint16_t*>(out), rows, cols, eps, threads);
    else
        add_rms_norm(static_cast<float*>(x), static_cast<const float*>(delta), static_cast<const float*>(weight),
                     static_cast<float*>(out), rows, cols, eps, threads);
    return 0;
}

extern "C" int fused_rope(void* x, int64_t row_stride, int64_t rows, int64_t heads, int64_t dim,
                          const void* cos, const void* sin, int64_t bf16, int64_t threads) {
    if (rows < 0 || heads <= 0 || dim <= 0 || dim % 2 != 0 || row_stride < heads * dim) return 1;
    if (bf16)
        rope(static_cast<uint16_t*>(x), row_stride, rows, heads, dim, static_cast<const uint16_t*>(cos),
             static_cast<const uint16_t*>(sin), threads);
    else
        rope(static_cast<float*>(x), row_stride, rows, heads, dim, static_cast<const float*>(cos),
             static_cast<const float*>(sin), threads);
    return 0;
}

extern "C" int fused_silu_mul(const void* gate_up, void* out, int64_t rows, int64_t inter, int64_t bf16,
                              int64_t threads) {
    if (rows < 0 || inter <= 0) return 1;
    if (bf16)
        silu_mul(static_cast<const uint16_t*>(gate_up), static_cast<uint16_t*>(out), rows, inter, threads);
    else
        silu_mul(static_cast<const float*>(gate_up), static_cast<float*>(out), rows, inter, threads);
    return 0;
}

// 1 when the library splits work over OpenMP threads (pool.h), 0 when over its own pool.
extern "C" int kernels_use_openmp() {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}
