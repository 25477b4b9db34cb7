// Decode attention straight from the paged bf16 KV cache: one query token per sequence.
//
// Why a kernel: without it every layer first copies each sequence's context out of the cache
// (index_select) and then runs SDPA, whose CPU flash kernel is tuned for long queries. Both are
// memory-bound, so reading each K/V row exactly once here roughly halves decode attention time.
//
// Layout: q [B, H, D], out [B, H, D] (bf16), k/v [S, Hkv, D] (bf16, S = blocks * block_size),
// slots [B, width] (int64; row b's first lens[b] entries are its context, in order).
// Query head h reads KV head h / (H / Hkv) (grouped-query attention). Math in fp32: scores,
// a max-subtracted softmax, and the weighted sum of V; the output is rounded to bf16
// (round-to-nearest-even), like torch's own bf16 SDPA.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

inline float bf16_to_float(uint16_t h) {
    uint32_t bits = static_cast<uint32_t>(h) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
}

inline uint16_t float_to_bf16(float f) {
    uint32_t bits;
    std::memcpy(&bits, &f, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40u);  // NaN
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return static_cast<uint16_t>(bits >> 16);
}

// dot(q, bf16 row) and acc += w * bf16 row over `dim` elements. The AVX-512 path widens 16 bf16
// values at a time (a bf16 is the top half of an fp32); the portable path keeps 16 partial sums so
// the compiler may vectorize without reassociating a single running sum.
#if defined(__AVX512F__)
inline __m512 load_bf16x16(const uint16_t* p) {
    __m256i half = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
}
#endif

inline float dot_bf16(const float* q, const uint16_t* row, int64_t dim) {
    int64_t d = 0;
    float sum = 0.0f;
#if defined(__AVX512F__)
    __m512 acc = _mm512_setzero_ps();
    for (; d + 16 <= dim; d += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + d), load_bf16x16(row + d), acc);
    sum = _mm512_reduce_add_ps(acc);
#else
    float lanes[16] = {0};
    for (; d + 16 <= dim; d += 16)
        for (int l = 0; l < 16; ++l) lanes[l] += q[d + l] * bf16_to_float(row[d + l]);
    for (int l = 0; l < 16; ++l) sum += lanes[l];
#endif
    for (; d < dim; ++d) sum += q[d] * bf16_to_float(row[d]);
    return sum;
}

inline void axpy_bf16(float w, const uint16_t* row, float* acc, int64_t dim) {
    int64_t d = 0;
#if defined(__AVX512F__)
    const __m512 wv = _mm512_set1_ps(w);
    for (; d + 16 <= dim; d += 16)
        _mm512_storeu_ps(acc + d, _mm512_fmadd_ps(wv, load_bf16x16(row + d), _mm512_loadu_ps(acc + d)));
#endif
    for (; d < dim; ++d) acc[d] += w * bf16_to_float(row[d]);
}

struct Problem {
    const uint16_t* q;
    const uint16_t* k;
    const uint16_t* v;
    const int64_t* slots;
    const int64_t* lens;
    uint16_t* out;
    int64_t heads, kv_heads, dim, width;
    float scale;
};

// One (sequence, KV head) pair: its `group` query heads share every K/V row read.
void attend(const Problem& p, int64_t b, int64_t kvh, std::vector<float>& scores,
            std::vector<float>& acc, std::vector<float>& query) {
    const int64_t group = p.heads / p.kv_heads, dim = p.dim, len = p.lens[b];
    const int64_t row_stride = p.kv_heads * dim;
    const int64_t* slots = p.slots + b * p.width;
    scores.resize(group * len);
    query.resize(group * dim);
    acc.assign(group * dim, 0.0f);
    for (int64_t g = 0; g < group; ++g) {
        const uint16_t* qh = p.q + (b * p.heads + kvh * group + g) * dim;
        for (int64_t d = 0; d < dim; ++d) query[g * dim + d] = bf16_to_float(qh[d]) * p.scale;
    }
    for (int64_t t = 0; t < len; ++t) {
        const uint16_t* kr = p.k + slots[t] * row_stride + kvh * dim;
        for (int64_t g = 0; g < group; ++g) scores[g * len + t] = dot_bf16(query.data() + g * dim, kr, dim);
    }
    for (int64_t g = 0; g < group; ++g) {
        float* s = scores.data() + g * len;
        float peak = -INFINITY;
        for (int64_t t = 0; t < len; ++t) peak = s[t] > peak ? s[t] : peak;
        float total = 0.0f;
        for (int64_t t = 0; t < len; ++t) {
            s[t] = std::exp(s[t] - peak);
            total += s[t];
        }
        const float inv = 1.0f / total;
        for (int64_t t = 0; t < len; ++t) s[t] *= inv;
    }
    for (int64_t t = 0; t < len; ++t) {
        const uint16_t* vr = p.v + slots[t] * row_stride + kvh * dim;
        for (int64_t g = 0; g < group; ++g) axpy_bf16(scores[g * len + t], vr, acc.data() + g * dim, dim);
    }
    for (int64_t g = 0; g < group; ++g) {
        uint16_t* o = p.out + (b * p.heads + kvh * group + g) * dim;
        for (int64_t d = 0; d < dim; ++d) o[d] = float_to_bf16(acc[g * dim + d]);
    }
}

void run_items(const Problem& p, int64_t first, int64_t last) {
    std::vector<float> scores, acc, query;
    for (int64_t item = first; item < last; ++item)
        attend(p, item / p.kv_heads, item % p.kv_heads, scores, acc, query);
}

}  // namespace

extern "C" int paged_decode_attention_bf16(
    const uint16_t* q, const uint16_t* k, const uint16_t* v, const int64_t* slots,
    const int64_t* lens, uint16_t* out, int64_t batch, int64_t heads, int64_t kv_heads,
    int64_t dim, int64_t width, float scale, int64_t threads) {
    if (batch <= 0 || kv_heads <= 0 || heads % kv_heads != 0 || dim <= 0) return 1;
    for (int64_t b = 0; b < batch; ++b)
        if (lens[b] < 1 || lens[b] > width) return 2;
    const Problem p{q, k, v, slots, lens, out, heads, kv_heads, dim, width, scale};
    const int64_t items = batch * kv_heads;
    // Items carry similar work (one context each), so equal contiguous shares balance well.
    const int64_t workers = threads < 1 ? 1 : (threads > items ? items : threads);
    std::vector<std::thread> pool;
    for (int64_t w = 1; w < workers; ++w)
        pool.emplace_back(run_items, std::cref(p), items * w / workers, items * (w + 1) / workers);
    run_items(p, 0, items / workers);
    for (auto& t : pool) t.join();
    return 0;
}
