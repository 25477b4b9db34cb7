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
#include <utility>
#include <vector>

#include "numeric.h"
#include "pool.h"

namespace {

using tandem::narrow;
using tandem::widen;

// dot(q, row) and acc += w * row over `dim` elements, a vector at a time where the build has
// vectors, the tail (or everything, elsewhere) scalar.
template <typename E>
inline float dot(const float* q, const E* row, int64_t dim) {
    int64_t d = 0;
    float sum = 0.0f;
#ifdef TANDEM_LANES
    using L = tandem::Lanes;
    L::V acc = L::set1(0.0f);
    for (; d + L::LANES <= dim; d += L::LANES) acc = L::fma(L::load(q + d), L::load(row + d), acc);
    sum = L::sum(acc);
#endif
    for (; d < dim; ++d) sum += q[d] * widen(row[d]);
    return sum;
}

template <typename E>
inline void axpy(float w, const E* row, float* acc, int64_t dim) {
    int64_t d = 0;
#ifdef TANDEM_LANES
    using L = tandem::Lanes;
    const L::V wv = L::set1(w);
    for (; d + L::LANES <= dim; d += L::LANES) L::store(acc + d, L::fma(wv, L::load(row + d), L::load(acc + d)));
#endif
    for (; d < dim; ++d) acc[d] += w * widen(row[d]);
}

// s[t] = exp(s[t] - peak) for t < len; returns their sum. Vector expf (16 or 8 lanes) where
// the build has it: a scalar expf per score was a fifth of the kernel's time.
inline float exp_shifted(float* s, int64_t len, float peak) {
    int64_t t = 0;
    float total = 0.0f;
#ifdef TANDEM_VECTOR_EXPF
    using L = tandem::Lanes;
    const L::V shift = L::set1(peak);
    L::V sum = L::set1(0.0f);
    for (; t + L::LANES <= len; t += L::LANES) {
        const L::V e = L::exp(L::sub(L::load(s + t), shift));
        L::store(s + t, e);
        sum = L::add(sum, e);
    }
    total = L::sum(sum);
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
#ifdef TANDEM_LANES
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

// The query heads [first, first + count) of sequence b, widened and scaled, into `query`.
template <typename E>
inline void load_queries(const Problem<E>& p, int64_t b, int64_t first, int64_t count, std::vector<float>& query) {
    const E* src = p.q + (b * p.heads + first) * p.dim;
    query.resize(count * p.dim);
    for (int64_t i = 0; i < count * p.dim; ++i) query[i] = widen(src[i]) * p.scale;
}

template <typename E>
inline void store_outputs(const Problem<E>& p, int64_t b, int64_t first, int64_t count, const std::vector<float>& acc) {
    E* dst = p.out + (b * p.heads + first) * p.dim;
    for (int64_t i = 0; i < count * p.dim; ++i) dst[i] = narrow<E>(acc[i]);
}

// The largest of s[0..len), NaNs skipped; -inf when all are NaN. A vector at a time where the
// build has vectors: the scalar loop's dependent compares were a third of the score phase.
inline float largest(const float* s, int64_t len) {
    int64_t t = 0;
    float peak = -INFINITY;
#ifdef TANDEM_LANES
    using L = tandem::Lanes;
    L::V peaks = L::set1(-INFINITY);
    for (; t + L::LANES <= len; t += L::LANES) peaks = L::max(L::load(s + t), peaks);
    peak = L::largest(peaks);
#endif
    for (; t < len; ++t) peak = s[t] > peak ? s[t] : peak;
    return peak;
}

// Each of the `rows` rows of `len` scores becomes its max-subtracted softmax, in place.
inline void softmax_rows(float* scores, int64_t rows, int64_t len) {
    for (int64_t h = 0; h < rows; ++h) {
        float* s = scores + h * len;
        const float peak = largest(s, len);
        const float inv = 1.0f / exp_shifted(s, len, peak);
        for (int64_t t = 0; t < len; ++t) s[t] *= inv;
    }
}

// Sequence b's KV heads [h0, h1) and the query heads that read them. Tokens are walked in
// context order and each token's rows of all these heads are read together: a block's rows are
// contiguous across heads, so the cache streams through the hardware prefetchers instead of
// being read one head (a 1/Hkv-th of every line run) at a time.
template <typename E>
void attend(const Problem<E>& p, int64_t b, int64_t h0, int64_t h1, std::vector<float>& scores,
            std::vector<float>& acc, std::vector<float>& query) {
    const int64_t group = p.heads / p.kv_heads, dim = p.dim, len = p.lens[b];
    const int64_t nq = (h1 - h0) * group;  // query heads here, from query head h0 * group on
    const int64_t row_stride = p.kv_heads * dim, first = h0 * dim, span = (h1 - h0) * dim;
    const int64_t* slots = p.slots + b * p.width;
    scores.resize(nq * len);
    acc.assign(nq * dim, 0.0f);
    load_queries(p, b, h0 * group, nq, query);
    for (int64_t t = 0; t < len; ++t) {
        const E* kr = p.k + slots[t] * row_stride + first;
        if (t + AHEAD < len) prefetch_row(p.k + slots[t + AHEAD] * row_stride + first, span);
        for (int64_t h = 0; h < nq; h += group, kr += dim)  // query heads h..h+group read row kr
            for (int64_t g = h; g < h + group; ++g) scores[g * len + t] = dot(query.data() + g * dim, kr, dim);
    }
    softmax_rows(scores.data(), nq, len);
    for (int64_t t = 0; t < len; ++t) {
        const E* vr = p.v + slots[t] * row_stride + first;
        if (t + AHEAD < len) prefetch_row(p.v + slots[t + AHEAD] * row_stride + first, span);
        for (int64_t h = 0; h < nq; h += group, vr += dim)
            for (int64_t g = h; g < h + group; ++g) axpy(scores[g * len + t], vr, acc.data() + g * dim, dim);
    }
    store_outputs(p, b, h0 * group, nq, acc);
}

#ifdef TANDEM_LANES  // numeric.h: AVX-512 (16 lanes) or AVX2 + FMA (8 lanes)
// The fast path for head dims of 1, 2, 4, 8 or 16 vectors (DV = dim / LANES): scores LANES tokens at
// a time, each token's q.k partial products kept as one vector and the LANES vectors summed in one
// transposing tree (against a horizontal sum per score: on AVX2, with the cache in L3, the portable
// loop took twice as long); the weighted sum of V keeps a group of heads' outputs in registers.
using L = tandem::Lanes;
constexpr int CHUNK = L::LANES;  // tokens scored together

#if TANDEM_LANES == 16
// Chunk token t's partial products go to vector slot_of(t); lane t of the result is their sum.
constexpr int slot_of(int t) { return (t & 3) * 4 + (t >> 2); }

inline __m512 transpose_sum(const __m512 (&v)[16]) {
    __m512 w[8], x[4], y[2];
    for (int i = 0; i < 8; ++i)  // vector 2i's partials in 128-bit chunks 0-1, 2i+1's in 2-3
        w[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44),
                             _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xEE));
    for (int i = 0; i < 4; ++i)  // chunk c: vector 4i + c's four partials
        x[i] = _mm512_add_ps(_mm512_shuffle_f32x4(w[2 * i], w[2 * i + 1], 0x88),
                             _mm512_shuffle_f32x4(w[2 * i], w[2 * i + 1], 0xDD));
    for (int i = 0; i < 2; ++i)
        y[i] = _mm512_add_ps(_mm512_shuffle_ps(x[2 * i], x[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_ps(x[2 * i], x[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    // chunk c, lane j: vector 4j + c
    return _mm512_add_ps(_mm512_shuffle_ps(y[0], y[1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_ps(y[0], y[1], _MM_SHUFFLE(3, 1, 3, 1)));
}
#else
constexpr int slot_of(int t) { return t; }

inline __m256 transpose_sum(const __m256 (&v)[8]) {
    // Pairwise sums within 128-bit halves: lanes of v0..v3 then v4..v7, low half and high half.
    const __m256 a = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
    const __m256 b = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
}
#endif

// The chunk of cached rows (`span` elements from `off` on) of tokens [t0, t0 + CHUNK) below len.
template <typename E>
inline void prefetch_rows(const E* cache, const int64_t* slots, int64_t t0, int64_t len, int64_t row_stride,
                          int64_t off, int64_t span) {
    for (int64_t t = t0; t < t0 + CHUNK && t < len; ++t) prefetch_row(cache + slots[t] * row_stride + off, span);
}

// out[t] = q . rows[t] for t < n (n <= CHUNK); q is fp32 (already scaled), rows point at one head.
template <int DV, typename E>
inline void score_chunk(const float* q, const E* const* rows, int n, float* out) {
    L::V qv[DV], v[CHUNK];
    for (int d = 0; d < DV; ++d) qv[d] = L::load(q + L::LANES * d);
    for (int t = 0; t < CHUNK; ++t) {
        L::V acc = L::set1(0.0f);
        if (t < n)
            for (int d = 0; d < DV; ++d) acc = L::fma(qv[d], L::load(rows[t] + L::LANES * d), acc);
        v[slot_of(t)] = acc;
    }
    if (n == CHUNK) return L::store(out, transpose_sum(v));
    float sums[CHUNK];
    L::store(sums, transpose_sum(v));
    for (int t = 0; t < n; ++t) out[t] = sums[t];
}

// Accumulators one weighted_sum call keeps in registers (of 32 or 16), G heads x DS vectors.
constexpr int ACC_VECTORS = TANDEM_LANES == 16 ? 16 : 8;

// acc[g][slice] += sum_{t < n} p[g * len + t] * rows[t][off + slice] for G query heads sharing one
// KV head, over the DS vectors of the row from `off` on; head g's output at acc + g * dim.
template <int DS, int G, typename E>
void weighted_sum(const float* p, int64_t len, const E* const* rows, int n, int64_t off, int64_t dim, float* acc) {
    L::V sums[G][DS];
    for (int g = 0; g < G; ++g)
        for (int d = 0; d < DS; ++d) sums[g][d] = L::load(acc + g * dim + L::LANES * d);
    for (int t = 0; t < n; ++t) {
        L::V vv[DS];
        for (int d = 0; d < DS; ++d) vv[d] = L::load(rows[t] + off + L::LANES * d);
        for (int g = 0; g < G; ++g) {
            const L::V w = L::set1(p[g * len + t]);
            for (int d = 0; d < DS; ++d) sums[g][d] = L::fma(w, vv[d], sums[g][d]);
        }
    }
    for (int g = 0; g < G; ++g)
        for (int d = 0; d < DS; ++d) L::store(acc + g * dim + L::LANES * d, sums[g][d]);
}

// A row slice of DS vectors and up to MAX_G(DS) heads fill the accumulators.
template <int DV> constexpr int SLICE = DV < ACC_VECTORS ? DV : ACC_VECTORS;
template <int DS> constexpr int MAX_G = ACC_VECTORS / DS < 4 ? ACC_VECTORS / DS : 4;

template <int DS, typename E, int... Gs>
constexpr auto weighted_sum_for(int g, std::integer_sequence<int, Gs...>) {
    using Fn = void (*)(const float*, int64_t, const E* const*, int, int64_t, int64_t, float*);
    constexpr Fn table[] = {nullptr, &weighted_sum<DS, Gs + 1, E>...};
    return table[g];
}

template <int DV, typename E>
void attend_vec(const Problem<E>& p, int64_t b, int64_t h0, int64_t h1, std::vector<float>& scores,
                std::vector<float>& acc, std::vector<float>& query) {
    constexpr int64_t dim = DV * L::LANES;
    const int64_t group = p.heads / p.kv_heads, len = p.lens[b];
    const int64_t nq = (h1 - h0) * group, row_stride = p.kv_heads * dim;
    const int64_t* slots = p.slots + b * p.width;
    scores.resize(nq * len);
    acc.resize(nq * dim);
    load_queries(p, b, h0 * group, nq, query);
    const E* rows[CHUNK];
    for (int64_t t0 = 0; t0 < len; t0 += CHUNK) {
        const int n = static_cast<int>(len - t0 < CHUNK ? len - t0 : CHUNK);
        for (int t = 0; t < n; ++t) rows[t] = p.k + slots[t0 + t] * row_stride;
        prefetch_rows(p.k, slots, t0 + CHUNK, len, row_stride, h0 * dim, (h1 - h0) * dim);
        for (int64_t kvh = h0; kvh < h1; ++kvh) {
            const E* heads[CHUNK];
            for (int t = 0; t < n; ++t) heads[t] = rows[t] + kvh * dim;
            for (int64_t g = 0; g < group; ++g) {
                const int64_t h = (kvh - h0) * group + g;
                score_chunk<DV>(query.data() + h * dim, heads, n, scores.data() + h * len + t0);
            }
        }
    }
    prefetch_rows(p.v, slots, 0, len, row_stride, h0 * dim, (h1 - h0) * dim);
    softmax_rows(scores.data(), nq, len);
    // V a chunk of tokens at a time, each chunk's rows (all these heads) read from memory once and
    // then from L1 by every head (a walk over all tokens per KV head read 1/Hkv of every row per pass,
    // the rest of each line waiting in cache, or not, for the next head's pass).
    constexpr int DS = SLICE<DV>, GMAX = MAX_G<DS>;
    const auto gs = std::make_integer_sequence<int, GMAX>{};
    acc.assign(nq * dim, 0.0f);
    for (int64_t t0 = 0; t0 < len; t0 += CHUNK) {
        const int n = static_cast<int>(len - t0 < CHUNK ? len - t0 : CHUNK);
        for (int t = 0; t < n; ++t) rows[t] = p.v + slots[t0 + t] * row_stride;
        prefetch_rows(p.v, slots, t0 + CHUNK, len, row_stride, h0 * dim, (h1 - h0) * dim);
        for (int64_t kvh = h0; kvh < h1; ++kvh)
            for (int64_t g0 = 0; g0 < group; g0 += GMAX) {
                const int g = static_cast<int>(group - g0 < GMAX ? group - g0 : GMAX);
                const int64_t h = (kvh - h0) * group + g0;
                for (int64_t slice = 0; slice < dim; slice += DS * L::LANES)
                    weighted_sum_for<DS, E>(g, gs)(scores.data() + h * len + t0, len, rows, n, kvh * dim + slice, dim,
                                                   acc.data() + h * dim + slice);
            }
    }
    store_outputs(p, b, h0 * group, nq, acc);
}
#endif

template <typename E>
void attend_any(const Problem<E>& p, int64_t b, int64_t h0, int64_t h1, std::vector<float>& scores,
                std::vector<float>& acc, std::vector<float>& query) {
#ifdef TANDEM_LANES
    switch (p.dim / L::LANES * (p.dim % L::LANES == 0)) {
        case 1: return attend_vec<1>(p, b, h0, h1, scores, acc, query);
        case 2: return attend_vec<2>(p, b, h0, h1, scores, acc, query);
        case 4: return attend_vec<4>(p, b, h0, h1, scores, acc, query);
        case 8: return attend_vec<8>(p, b, h0, h1, scores, acc, query);
        case 16: return attend_vec<16>(p, b, h0, h1, scores, acc, query);
        default: break;
    }
#endif
    attend(p, b, h0, h1, scores, acc, query);
}

// Item i is sequence i / splits, KV heads [kv_heads * s / splits, kv_heads * (s + 1) / splits)
// for s = i % splits: whole sequences when the batch alone keeps every thread busy.
template <typename E>
void run_items(const Problem<E>& p, int64_t splits, int64_t first, int64_t last) {
    std::vector<float> scores, acc, query;
    for (int64_t item = first; item < last; ++item) {
        const int64_t b = item / splits, s = item % splits;
        attend_any(p, b, p.kv_heads * s / splits, p.kv_heads * (s + 1) / splits, scores, acc, query);
    }
}

template <typename E>
int paged_decode_attention(const E* q, const E* k, const E* v, const int64_t* slots, const int64_t* lens,
                           E* out, int64_t batch, int64_t heads, int64_t kv_heads, int64_t dim,
                           int64_t width, float scale, int64_t threads) {
    if (batch <= 0 || kv_heads <= 0 || heads % kv_heads != 0 || dim <= 0) return 1;
    for (int64_t b = 0; b < batch; ++b)
        if (lens[b] < 1 || lens[b] > width) return 2;
    const Problem<E> p{q, k, v, slots, lens, out, heads, kv_heads, dim, width, scale};
    if (threads < 1) threads = 1;
    // Split sequences by KV heads only when there are too few of them for two items per thread.
    int64_t splits = (2 * threads + batch - 1) / batch;
    splits = splits < 1 ? 1 : splits > kv_heads ? kv_heads : splits;
    const int64_t items = batch * splits;
    // Items carry similar work (one context each), so equal contiguous shares balance well.
    tandem::parallel_ranges(items, threads, [&](int64_t first, int64_t last) { run_items(p, splits, first, last); });
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
