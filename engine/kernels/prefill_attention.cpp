// Causal prefill attention over a packed batch of prompts or prompt chunks (bf16 or fp32), flash style.
//
// Why a kernel: torch's CPU SDPA ran SmolLM2's shapes at a fraction of the GF/s this CPU's GEMMs
// reach (benchmarks/RESULTS.md); here the score and weighted-sum products run as register-tiled
// FMA loops in L1-sized blocks, the softmax online (one pass over the keys) and vectorized across
// query rows.
//
// Layout: token t of the packed batch has q at q + t * q_stride (H heads of D), k and v at
// k/v + t * kv_stride (Hkv heads of D; the strides let q/k/v be views of the fused projection);
// out [T, H, D] contiguous. Sequence s's queries are tokens [starts[s], starts[s] + lens[s]), its keys
// rows [kv_starts[s], kv_starts[s] + offsets[s] + lens[s]) of k and v: a chunk of a longer prompt sees
// the offsets[s] keys of the prompt before it (a whole prompt: offset 0, keys = its own tokens). Its
// query token i attends to its keys 0..offsets[s] + i. Query head h reads KV head h / (H / Hkv). Math
// in fp32, a bf16 output rounded to nearest even.
//
// A work item is one sequence, one KV head and a block of QB query tokens: its rows are those
// tokens times the query heads sharing that KV head (row r: token i0 + r / G, head g = r % G). Per
// item the queries are transposed once ([D][rows]); then per block of KB keys the keys and values
// are widened to fp32 rows, scores computed key-major (st[key][row]: the softmax's max, exp and sum
// are then plain vector ops across rows), and the output rows rescaled and accumulated.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <utility>
#include <vector>

#include "numeric.h"
#include "pool.h"

#ifdef TANDEM_LANES  // numeric.h: AVX-512 (16 lanes) or AVX2 + FMA (8 lanes)
namespace {

using tandem::narrow;
using tandem::widen;
using L = tandem::Lanes;

constexpr int RV = 2;                               // row vectors per score tile (2 * LANES rows)
constexpr int ROWS_ALIGN = RV * L::LANES;           // an item's rows are padded to this
constexpr int KT = TANDEM_LANES == 16 ? 8 : 6;      // keys per score tile: KT x RV accumulators
constexpr int KB = 4 * KT;                          // keys per block
constexpr int RP = TANDEM_LANES == 16 ? 6 : 2;      // rows per weighted-sum tile
constexpr int DS_MAX = 4;                           // vectors per weighted-sum slice: RP x DS accumulators
constexpr int64_t QB = 32;                          // query tokens per item

inline L::V exp_lanes(L::V x) {
#ifdef TANDEM_VECTOR_EXPF
    return L::exp(x);
#else
    float lanes[L::LANES];
    L::store(lanes, x);
    for (float& f : lanes) f = std::exp(f);
    return L::load(lanes);
#endif
}

template <typename E>
struct Problem {
    const E* q;
    const E* k;
    const E* v;
    E* out;
    const int64_t* starts;
    const int64_t* lens;
    const int64_t* kv_starts;
    const int64_t* offsets;
    int64_t heads, kv_heads, dim, q_stride, kv_stride;
    float scale;
};

struct Item {
    int64_t seq, kv_head, i0, i1, offset;
    int64_t cost() const { return (offset + i1) * (i1 - i0); }  // keys read x query tokens
};

struct Scratch {
    std::vector<float> qt, o, st, kb, vb, m, l, alpha;
};

// st[c * rp + r] = sum_d kb[c * D + d] * qt[d * rp + r], keys c < KT, rows r < RV * LANES.
template <int64_t D>
inline void score_tile(const float* qt, int64_t rp, const float* kb, float* st) {
    L::V acc[KT][RV];
    for (auto& key : acc)
        for (auto& a : key) a = L::set1(0.0f);
    for (int64_t d = 0; d < D; ++d) {
        L::V qv[RV];
        for (int i = 0; i < RV; ++i) qv[i] = L::load(qt + d * rp + i * L::LANES);
        for (int c = 0; c < KT; ++c) {
            const L::V b = L::set1(kb[c * D + d]);
            for (int i = 0; i < RV; ++i) acc[c][i] = L::fma(b, qv[i], acc[c][i]);
        }
    }
    for (int c = 0; c < KT; ++c)
        for (int i = 0; i < RV; ++i) L::store(st + c * rp + i * L::LANES, acc[c][i]);
}

// o[r][slice] = alpha[r] * o[r][slice] + sum_{c < KB} st[c * rp + r] * vb[c][slice] for R rows,
// the slice DS vectors wide (o and vb rows D apart, both already offset to the slice).
template <int R, int DS, int64_t D>
inline void weighted_tile(const float* st, int64_t rp, const float* vb, float* o, const float* alpha) {
    L::V acc[R][DS];
    for (int r = 0; r < R; ++r) {
        const L::V a = L::set1(alpha[r]);
        for (int d = 0; d < DS; ++d) acc[r][d] = L::mul(a, L::load(o + r * D + d * L::LANES));
    }
    for (int c = 0; c < KB; ++c) {
        L::V vv[DS];
        for (int d = 0; d < DS; ++d) vv[d] = L::load(vb + c * D + d * L::LANES);
        for (int r = 0; r < R; ++r) {
            const L::V p = L::set1(st[c * rp + r]);
            for (int d = 0; d < DS; ++d) acc[r][d] = L::fma(p, vv[d], acc[r][d]);
        }
    }
    for (int r = 0; r < R; ++r)
        for (int d = 0; d < DS; ++d) L::store(o + r * D + d * L::LANES, acc[r][d]);
}

template <int DS, int64_t D, int... Rs>
constexpr auto weighted_tile_for(int rows, std::integer_sequence<int, Rs...>) {
    using Fn = void (*)(const float*, int64_t, const float*, float*, const float*);
    constexpr Fn table[] = {&weighted_tile<Rs + 1, DS, D>...};
    return table[rows - 1];
}

// Keys (or values) [j0, j0 + n) of one KV head widened into fp32 rows of D; rows n..KB zero (they
// lie past the item's last query token, so their scores are masked, and 0 * 0 keeps NaN out).
template <int64_t D, typename E>
inline void load_rows(const E* src, int64_t stride, int64_t n, float* dst) {
    for (int64_t c = 0; c < n; ++c)
        for (int64_t d = 0; d < D; d += L::LANES) L::store(dst + c * D + d, L::load(src + c * stride + d));
    std::fill(dst + n * D, dst + KB * D, 0.0f);
}

// The item's queries, scaled, transposed to qt[d * rp + r]; padded rows zero.
template <int64_t D, typename E>
inline void load_queries(const Problem<E>& p, const Item& it, int64_t rows, int64_t rp, float* qt) {
    const int64_t group = p.heads / p.kv_heads, base = p.starts[it.seq];
    std::fill(qt, qt + D * rp, 0.0f);
    for (int64_t r = 0; r < rows; ++r) {
        const int64_t token = base + it.i0 + r / group, head = it.kv_head * group + r % group;
        const E* src = p.q + token * p.q_stride + head * D;
        for (int64_t d = 0; d < D; ++d) qt[d * rp + r] = widen(src[d]) * p.scale;
    }
}

// Key j is hidden from rows r < (j - i0) * G (their tokens come before it): -inf scores.
inline void mask_block(float* st, int64_t rp, int64_t rows, int64_t j0, int64_t i0, int64_t group) {
    for (int64_t c = 0; c < KB; ++c) {
        const int64_t hidden = std::min(rows, (j0 + c - i0) * group);
        if (hidden > 0) std::fill(st + c * rp, st + c * rp + hidden, -INFINITY);
    }
}

// The online softmax step over one block's scores, a vector of rows at a time: new running max m,
// st becomes exp(st - m), l the running sum, alpha the factor for the output rows so far.
inline void softmax_block(float* st, int64_t rp, float* m, float* l, float* alpha) {
    for (int64_t r = 0; r < rp; r += L::LANES) {
        const L::V old = L::load(m + r);
        L::V peak = old;
        for (int c = 0; c < KB; ++c) peak = L::max(L::load(st + c * rp + r), peak);
        L::V sum = L::set1(0.0f);
        for (int c = 0; c < KB; ++c) {
            const L::V e = exp_lanes(L::sub(L::load(st + c * rp + r), peak));
            L::store(st + c * rp + r, e);
            sum = L::add(sum, e);
        }
        // The first block holds key 0, which every row sees: peak is finite from then on.
        const L::V a = exp_lanes(L::sub(old, peak));
        L::store(alpha + r, a);
        L::store(l + r, L::fma(L::load(l + r), a, sum));
        L::store(m + r, peak);
    }
}

template <int64_t D, typename E>
void attend_item(const Problem<E>& p, const Item& it, Scratch& w) {
    constexpr int DS = D / L::LANES < DS_MAX ? D / L::LANES : DS_MAX;
    const int64_t group = p.heads / p.kv_heads, rows = (it.i1 - it.i0) * group;
    const int64_t rp = (rows + ROWS_ALIGN - 1) / ROWS_ALIGN * ROWS_ALIGN;
    const int64_t kv_base = p.kv_starts[it.seq], kv_offset = it.kv_head * D, end = it.offset + it.i1;
    w.qt.resize(D * rp);
    w.st.resize(KB * rp);
    w.kb.resize(KB * D);
    w.vb.resize(KB * D);
    w.o.assign(rp * D, 0.0f);
    w.m.assign(rp, -INFINITY);
    w.l.assign(rp, 0.0f);
    w.alpha.resize(rp);
    load_queries<D>(p, it, rows, rp, w.qt.data());
    const auto tiles = std::make_integer_sequence<int, RP>{};
    for (int64_t j0 = 0; j0 < end; j0 += KB) {
        const int64_t n = std::min<int64_t>(KB, end - j0);
        load_rows<D>(p.k + (kv_base + j0) * p.kv_stride + kv_offset, p.kv_stride, n, w.kb.data());
        load_rows<D>(p.v + (kv_base + j0) * p.kv_stride + kv_offset, p.kv_stride, n, w.vb.data());
        for (int64_t c0 = 0; c0 < KB; c0 += KT)
            for (int64_t r0 = 0; r0 < rp; r0 += ROWS_ALIGN)
                score_tile<D>(w.qt.data() + r0, rp, w.kb.data() + c0 * D, w.st.data() + c0 * rp + r0);
        if (j0 + KB > it.offset + it.i0 + 1)
            mask_block(w.st.data(), rp, rows, j0 - it.offset, it.i0, group);
        softmax_block(w.st.data(), rp, w.m.data(), w.l.data(), w.alpha.data());
        for (int64_t r0 = 0; r0 < rows; r0 += RP) {
            const int r = static_cast<int>(std::min<int64_t>(RP, rows - r0));
            const auto tile = weighted_tile_for<DS, D>(r, tiles);
            for (int64_t slice = 0; slice < D; slice += DS * L::LANES)
                tile(w.st.data() + r0, rp, w.vb.data() + slice, w.o.data() + r0 * D + slice, w.alpha.data() + r0);
        }
    }
    const int64_t base = p.starts[it.seq];
    for (int64_t r = 0; r < rows; ++r) {
        const int64_t token = base + it.i0 + r / group, head = it.kv_head * group + r % group;
        E* dst = p.out + (token * p.heads + head) * D;
        const float inv = 1.0f / w.l[r];
        for (int64_t d = 0; d < D; ++d) dst[d] = narrow<E>(w.o[r * D + d] * inv);
    }
}

template <int64_t D, typename E>
void run(const Problem<E>& p, const std::vector<Item>& items, int64_t threads) {
    // Items differ in cost by their causal prefix: the longest first, each thread taking the next.
    std::atomic<size_t> next{0};
    tandem::parallel_ranges(threads, threads, [&](int64_t, int64_t) {
        Scratch w;
        for (size_t i = next++; i < items.size(); i = next++) attend_item<D>(p, items[i], w);
    });
}

template <typename E>
int prefill_attention(const Problem<E>& p, int64_t num_seqs, int64_t threads) {
    if (num_seqs < 0 || p.kv_heads <= 0 || p.heads % p.kv_heads != 0) return 1;
    std::vector<Item> items;
    for (int64_t s = 0; s < num_seqs; ++s) {
        if (p.lens[s] < 1) return 2;
        if (p.offsets[s] < 0) return 4;
        for (int64_t kvh = 0; kvh < p.kv_heads; ++kvh)
            for (int64_t i0 = 0; i0 < p.lens[s]; i0 += QB)
                items.push_back({s, kvh, i0, std::min(p.lens[s], i0 + QB), p.offsets[s]});
    }
    std::stable_sort(items.begin(), items.end(), [](const Item& a, const Item& b) { return a.cost() > b.cost(); });
    threads = std::max<int64_t>(1, std::min<int64_t>(threads, static_cast<int64_t>(items.size())));
    switch (p.dim) {  // head dims of 1, 2, 4, 8 or 16 vectors
        case L::LANES: run<L::LANES>(p, items, threads); return 0;
        case 2 * L::LANES: run<2 * L::LANES>(p, items, threads); return 0;
        case 4 * L::LANES: run<4 * L::LANES>(p, items, threads); return 0;
        case 8 * L::LANES: run<8 * L::LANES>(p, items, threads); return 0;
        case 16 * L::LANES: run<16 * L::LANES>(p, items, threads); return 0;
        default: return 3;
    }
}

template <typename E>
int prefill_attention(const void* q, const void* k, const void* v, void* out, const int64_t* starts,
                      const int64_t* lens, const int64_t* kv_starts, const int64_t* offsets, int64_t num_seqs,
                      int64_t heads, int64_t kv_heads, int64_t dim, int64_t q_stride, int64_t kv_stride,
                      float scale, int64_t threads) {
    const Problem<E> p{static_cast<const E*>(q), static_cast<const E*>(k), static_cast<const E*>(v),
                       static_cast<E*>(out), starts, lens, kv_starts, offsets, heads, kv_heads, dim, q_stride,
                       kv_stride, scale};
    return prefill_attention(p, num_seqs, threads);
}

}  // namespace
#endif

// The head dims the kernel takes (multiples of the vector width up to 16 vectors): the largest
// such vector count's width, or 0 where the build has no vectors (then no head dim is supported).
extern "C" int prefill_attention_lanes() {
#ifdef TANDEM_LANES
    return TANDEM_LANES;
#else
    return 0;
#endif
}

// Status: 0 ok, 1 bad head counts, 2 an empty sequence, 3 an unsupported head dim (or no vectors),
// 4 a negative offset. Whole prompts pass kv_starts = starts and offsets all 0.
extern "C" int prefill_attention(const void* q, const void* k, const void* v, void* out, const int64_t* starts,
                                 const int64_t* lens, const int64_t* kv_starts, const int64_t* offsets,
                                 int64_t num_seqs, int64_t heads, int64_t kv_heads, int64_t dim, int64_t q_stride,
                                 int64_t kv_stride, float scale, int64_t bf16, int64_t threads) {
#ifdef TANDEM_LANES
    if (bf16)
        return prefill_attention<uint16_t>(q, k, v, out, starts, lens, kv_starts, offsets, num_seqs, heads,
                                           kv_heads, dim, q_stride, kv_stride, scale, threads);
    return prefill_attention<float>(q, k, v, out, starts, lens, kv_starts, offsets, num_seqs, heads, kv_heads,
                                    dim, q_stride, kv_stride, scale, threads);
#else
    (void)q; (void)k; (void)v; (void)out; (void)starts; (void)lens; (void)kv_starts; (void)offsets;
    (void)num_seqs; (void)heads;
    (void)kv_heads; (void)dim; (void)q_stride; (void)kv_stride; (void)scale; (void)bf16; (void)threads;
    return 3;
#endif
}
