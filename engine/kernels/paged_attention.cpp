// Decode attention straight from the paged KV cache (bf16 or fp32): one query token per sequence.
//
// Why a kernel: without it every layer first copies each sequence's context out of the cache
// (index_select) and then runs SDPA, whose CPU flash kernel is tuned for long queries. Both are
// memory-bound, so reading each K/V row exactly once here roughly halves decode attention time.
//
// Layout: q [B, H, D], out [B, H, D], k/v [S, Hkv, D] (S = blocks * block_size), all of one
// element type (bf16 or fp32); slots [B, width] (int64; row b's first lens[b] entries are its
// context, in order). Query head h reads KV head h / (H / Hkv) (grouped-query attention). Math in
// fp32: scores, a max-subtracted softmax, and the weighted sum of V; a bf16 output is rounded to
// nearest even, like torch's own bf16 SDPA.
#include <cmath>
#include <cstdint>
#include <vector>

#include "numeric.h"
#include "pool.h"

namespace {

using tandem::narrow;
using tandem::widen;
#if defined(__AVX512F__)
using tandem::load16;
#endif

// dot(q, row) and acc += w * row over `dim` elements. The AVX-512 path loads 16 values at a time;
// the portable path keeps 16 partial sums so the compiler may vectorize without reassociating a
// single running sum.
template <typename E>
inline float dot(const float* q, const E* row, int64_t dim) {
    int64_t d = 0;
    float sum = 0.0f;
#if defined(__AVX512F__)
    __m512 acc = _mm512_setzero_ps();
    for (; d + 16 <= dim; d += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + d), load16(row + d), acc);
    sum = _mm512_reduce_add_ps(acc);
#else
    float lanes[16] = {0};
    for (; d + 16 <= dim; d += 16)
        for (int l = 0; l < 16; ++l) lanes[l] += q[d + l] * widen(row[d + l]);
    for (int l = 0; l < 16; ++l) sum += lanes[l];
#endif
    for (; d < dim; ++d) sum += q[d] * widen(row[d]);
    return sum;
}

template <typename E>
inline void axpy(float w, const E* row, float* acc, int64_t dim) {
    int64_t d = 0;
#if defined(__AVX512F__)
    const __m512 wv = _mm512_set1_ps(w);
    for (; d + 16 <= dim; d += 16)
        _mm512_storeu_ps(acc + d, _mm512_fmadd_ps(wv, load16(row + d), _mm512_loadu_ps(acc + d)));
#endif
    for (; d < dim; ++d) acc[d] += w * widen(row[d]);
}

// s[t] = exp(s[t] - peak) for t < len; returns their sum. Vector expf on 16 lanes at a time where
// the build has it: a scalar expf per score was a fifth of the kernel's time.
inline float exp_shifted(float* s, int64_t len, float peak) {
    int64_t t = 0;
    float total = 0.0f;
#ifdef TANDEM_VECTOR_EXPF
    const __m512 shift = _mm512_set1_ps(peak);
    __m512 sum = _mm512_setzero_ps();
    for (; t + 16 <= len; t += 16) {
        const __m512 e = _ZGVeN16v_expf(_mm512_sub_ps(_mm512_loadu_ps(s + t), shift));
        _mm512_storeu_ps(s + t, e);
        sum = _mm512_add_ps(sum, e);
    }
    total = _mm512_reduce_add_ps(sum);
#endif
    for (; t < len; ++t) {
        s[t] = std::exp(s[t] - peak);
        total += s[t];
    }
    return total;
}

// Cached rows are scattered by their slots, out of the hardware prefetcher's sight: ask for the
// row a few tokens ahead.
constexpr int64_t AHEAD = 4;

template <typename E>
inline void prefetch_row(const E* row, int64_t dim) {
#if defined(__AVX512F__)
    const char* bytes = reinterpret_cast<const char*>(row);
    for (int64_t off = 0; off < dim * static_cast<int64_t>(sizeof(E)); off += 64)
        _mm_prefetch(bytes + off, _MM_HINT_T0);
#else
    (void)row; (void)dim;
#endif
}

template <typename E>
struct Problem {
    const E* q;
    const E* k;
    const E* v;
    const int64_t* slots;
    const int64_t* lens;
    E* out;
    int64_t heads, kv_heads, dim, width;
    float scale;
};

// One (sequence, KV head) pair: its `group` query heads share every K/V row read.
template <typename E>
void attend(const Problem<E>& p, int64_t b, int64_t kvh, std::vector<float>& scores,
            std::vector<float>& acc, std::vector<float>& query) {
    const int64_t group = p.heads / p.kv_heads, dim = p.dim, len = p.lens[b];
    const int64_t row_stride = p.kv_heads * dim;
    const int64_t* slots = p.slots + b * p.width;
    scores.resize(group * len);
    query.resize(group * dim);
    acc.assign(group * dim, 0.0f);
    for (int64_t g = 0; g < group; ++g) {
        const E* qh = p.q + (b * p.heads + kvh * group + g) * dim;
        for (int64_t d = 0; d < dim; ++d) query[g * dim + d] = widen(qh[d]) * p.scale;
    }
    for (int64_t t = 0; t < len; ++t) {
        const E* kr = p.k + slots[t] * row_stride + kvh * dim;
        if (t + AHEAD < len) prefetch_row(p.k + slots[t + AHEAD] * row_stride + kvh * dim, dim);
        for (int64_t g = 0; g < group; ++g) scores[g * len + t] = dot(query.data() + g * dim, kr, dim);
    }
    for (int64_t g = 0; g < group; ++g) {
        float* s = scores.data() + g * len;
        float peak = -INFINITY;
        for (int64_t t = 0; t < len; ++t) peak = s[t] > peak ? s[t] : peak;
        float total = exp_shifted(s, len, peak);
        const float inv = 1.0f / total;
        for (int64_t t = 0; t < len; ++t) s[t] *= inv;
    }
    for (int64_t t = 0; t < len; ++t) {
        const E* vr = p.v + slots[t] * row_stride + kvh * dim;
        if (t + AHEAD < len) prefetch_row(p.v + slots[t + AHEAD] * row_stride + kvh * dim, dim);
        for (int64_t g = 0; g < group; ++g) axpy(scores[g * len + t], vr, acc.data() + g * dim, dim);
    }
    for (int64_t g = 0; g < group; ++g) {
        E* o = p.out + (b * p.heads + kvh * group + g) * dim;
        for (int64_t d = 0; d < dim; ++d) o[d] = narrow<E>(acc[g * dim + d]);
    }
}

template <typename E>
void run_items(const Problem<E>& p, int64_t first, int64_t last) {
    std::vector<float> scores, acc, query;
    for (int64_t item = first; item < last; ++item)
        attend(p, item / p.kv_heads, item % p.kv_heads, scores, acc, query);
}

template <typename E>
int paged_decode_attention(const E* q, const E* k, const E* v, const int64_t* slots, const int64_t* lens,
                           E* out, int64_t batch, int64_t heads, int64_t kv_heads, int64_t dim,
                           int64_t width, float scale, int64_t threads) {
    if (batch <= 0 || kv_heads <= 0 || heads % kv_heads != 0 || dim <= 0) return 1;
    for (int64_t b = 0; b < batch; ++b)
        if (lens[b] < 1 || lens[b] > width) return 2;
    const Problem<E> p{q, k, v, slots, lens, out, heads, kv_heads, dim, width, scale};
    const int64_t items = batch * kv_heads;
    // Items carry similar work (one context each), so equal contiguous shares balance well.
    tandem::parallel_ranges(items, threads, [&](int64_t first, int64_t last) { run_items(p, first, last); });
    return 0;
}

}  // namespace

extern "C" int paged_decode_attention_bf16(
    const uint16_t* q, const uint16_t* k, const uint16_t* v, const int64_t* slots,
    const int64_t* lens, uint16_t* out, int64_t batch, int64_t heads, int64_t kv_heads,
    int64_t dim, int64_t width, float scale, int64_t threads) {
    return paged_decode_attention(q, k, v, slots, lens, out, batch, heads, kv_heads, dim, width, scale, threads);
}

extern "C" int paged_decode_attention_f32(
    const float* q, const float* k, const float* v, const int64_t* slots,
    const int64_t* lens, float* out, int64_t batch, int64_t heads, int64_t kv_heads,
    int64_t dim, int64_t width, float scale, int64_t threads) {
    return paged_decode_attention(q, k, v, slots, lens, out, batch, heads, kv_heads, dim, width, scale, threads);
}
