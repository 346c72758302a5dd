// Paged attention for CPUs with AVX2 + FMA but no AVX-512 (the AVX2 build): decode, prefill and
// chunked prefill in one call, over an fp32 or bf16 cache, checked as attention.cpp checks it.
//
// A work item is one query head of one sequence and up to kRows of its new tokens; items go to the
// threads dynamically, largest first. Each row (token, head) makes two passes over its keys:
// 1. scores, eight keys at a time: eight dot-product accumulators over the features, then one tree of
//    horizontal adds puts the eight scores in one vector (in log2 units, so each exp is an exp2);
// 2. softmax weights, and the weighted sum of values 64 features at a time in registers.
// The item's next row finds the same keys and values in L1/L2. Its first row prefetches them: at
// decode every layer's cache rows come from memory, and the hardware prefetcher alone left the
// kernel waiting on them (16 decodes over 264 keys, a bf16 cache: 1.5-1.7x faster with it and the
// pairs below, on a 2-core AMD EPYC, Zen 3).
// A bf16 cache is widened by pairs of features (load16_pairs) where the head size is a multiple of
// 16: two integer ops per 16 values, against a shuffle and a shift per 8.
// Without this kernel the build ran attention in torch, gathering every sequence's blocks for each
// call: on the same machine that was 37% of a burst of 16 prompts with their decode.
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "attention_checks.h"
#include "kernels.h"
#include "panel_tasks.h"
#include "vec_avx2.h"

namespace lmserve {
namespace {

constexpr int64_t kRows = 16;  // new tokens per work item
constexpr float kLog2e = 1.4426950408889634f;
constexpr int64_t kAhead = 32;  // keys ahead to prefetch: the cache rows come from memory each step

// Eight cache values from p as fp32.
template <typename T>
inline __m256 load8(const T* p) {
    if constexpr (std::is_same_v<T, uint16_t>)
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
    else
        return _mm256_loadu_ps(p);
}

// Lane i: the sum of the eight lanes of a[i].
inline __m256 sum8x8(const __m256 a[8]) {
    const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

inline float hmax8(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps(m, m, 1)));
}

// One sequence's keys or values of one KV head: key j at base + block(j) * sb + (j % bs) * st, the
// block size a power of two (a division per key cost more than its dot product).
template <typename T>
struct Rows {
    const T* base;
    const int32_t* bt;
    int64_t sb, st;
    int log2bs;
    const T* at(int64_t j) const {
        return base + bt[j >> log2bs] * sb + (j & ((int64_t{1} << log2bs) - 1)) * st;
    }
};

// Prefetch the cache row at r: every 64-byte line of its n features.
template <typename T>
inline void prefetch_row(const T* r, int64_t n) {
    const char* c = reinterpret_cast<const char*>(r);
    for (int64_t b = 0; b < n * static_cast<int64_t>(sizeof(T)); b += 64) _mm_prefetch(c + b, _MM_HINT_T0);
}

// out[0, NV * 8) += sum over keys of p[j] * v_j[d0, d0 + NV * 8), then scaled by inv.
template <int NV, typename T>
void weighted_values(const Rows<T>& v, const float* p, int64_t nkeys, int64_t d0, float inv, bool fetch, float* out) {
    __m256 o[NV];
#pragma GCC unroll 8
    for (int c = 0; c < NV; ++c) o[c] = _mm256_setzero_ps();
    for (int64_t j = 0; j < nkeys; ++j) {
        const T* vj = v.at(j) + d0;
        if (fetch && j + kAhead < nkeys) prefetch_row(v.at(j + kAhead) + d0, 8 * NV);
        const __m256 pj = _mm256_broadcast_ss(p + j);
#pragma GCC unroll 8
        for (int c = 0; c < NV; ++c) o[c] = _mm256_fmadd_ps(pj, load8(vj + 8 * c), o[c]);
    }
    const __m256 s = _mm256_set1_ps(inv);
#pragma GCC unroll 8
    for (int c = 0; c < NV; ++c) _mm256_storeu_ps(out + d0 + 8 * c, _mm256_mul_ps(o[c], s));
}

// A bf16 cache's rows by pairs of features: one 256-bit load of 16 values gives the even-numbered
// ones (low halves shifted up) and the odd-numbered ones (high halves masked) as two fp32 vectors,
// two integer ops where widening eight at a time takes a shuffle and a shift each. Dot products
// take the query in the same order (``pair_order``); sums of values are put back in order at the end.
inline void load16_pairs(const uint16_t* p, __m256& even, __m256& odd) {
    const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    even = _mm256_castsi256_ps(_mm256_slli_epi32(raw, 16));
    odd = _mm256_castsi256_ps(_mm256_and_si256(raw, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
}

// q's D features (D a multiple of 16) in pair order: each 16 as its 8 even-numbered, then 8 odd-numbered.
inline void pair_order(const float* q, int64_t D, float* qp) {
    for (int64_t d = 0; d < D; d += 16)
        for (int i = 0; i < 8; ++i) {
            qp[d + i] = q[d + 2 * i];
            qp[d + 8 + i] = q[d + 2 * i + 1];
        }
}

// weighted_values for a bf16 cache, NP * 16 features by pairs.
template <int NP>
void weighted_values_pairs(const Rows<uint16_t>& v, const float* p, int64_t nkeys, int64_t d0, float inv, bool fetch,
                           float* out) {
    __m256 e[NP], o[NP];
#pragma GCC unroll 4
    for (int c = 0; c < NP; ++c) e[c] = o[c] = _mm256_setzero_ps();
    for (int64_t j = 0; j < nkeys; ++j) {
        const uint16_t* vj = v.at(j) + d0;
        if (fetch && j + kAhead < nkeys) prefetch_row(v.at(j + kAhead) + d0, 16 * NP);
        const __m256 pj = _mm256_broadcast_ss(p + j);
#pragma GCC unroll 4
        for (int c = 0; c < NP; ++c) {
            __m256 ve, vo;
            load16_pairs(vj + 16 * c, ve, vo);
            e[c] = _mm256_fmadd_ps(pj, ve, e[c]);
            o[c] = _mm256_fmadd_ps(pj, vo, o[c]);
        }
    }
    const __m256 s = _mm256_set1_ps(inv);
#pragma GCC unroll 4
    for (int c = 0; c < NP; ++c) {
        const __m256 lo = _mm256_unpacklo_ps(e[c], o[c]), hi = _mm256_unpackhi_ps(e[c], o[c]);
        _mm256_storeu_ps(out + d0 + 16 * c, _mm256_mul_ps(_mm256_permute2f128_ps(lo, hi, 0x20), s));
        _mm256_storeu_ps(out + d0 + 16 * c + 8, _mm256_mul_ps(_mm256_permute2f128_ps(lo, hi, 0x31), s));
    }
}

// One row: q (D features) attends keys [0, nkeys); p is room for nkeys scores. slope: ALiBi's, or 0;
// pos: the row's position (ALiBi adds slope * (key - pos)).
// Pairs: a bf16 cache read by pairs of features (load16_pairs), q given in pair order.
template <typename T, bool Pairs>
void attend_row(const float* q, int64_t D, const Rows<T>& k, const Rows<T>& v, int64_t nkeys, float scale, float slope,
                int64_t pos, bool fetch, float* p, float* out) {
    const __m256 c = _mm256_set1_ps(scale * kLog2e), cs = _mm256_set1_ps(slope * kLog2e);
    const __m256 step = _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7);
    __m256 vmax = _mm256_set1_ps(-FLT_MAX);
    for (int64_t j = 0; j < nkeys; j += 8) {
        const int n = static_cast<int>(std::min<int64_t>(8, nkeys - j));
        const T* kp[8];
        for (int i = 0; i < 8; ++i) kp[i] = k.at(j + std::min(i, n - 1));  // past the end: repeat the last key
        if (fetch && j + kAhead < nkeys)
            for (int64_t i = j + kAhead; i < std::min(j + kAhead + 8, nkeys); ++i) prefetch_row(k.at(i), D);
        __m256 acc[8];
#pragma GCC unroll 8
        for (int i = 0; i < 8; ++i) acc[i] = _mm256_setzero_ps();
        if constexpr (Pairs) {
            for (int64_t d = 0; d < D; d += 16) {
                const __m256 qe = _mm256_loadu_ps(q + d), qo = _mm256_loadu_ps(q + d + 8);
#pragma GCC unroll 8
                for (int i = 0; i < 8; ++i) {
                    __m256 ke, ko;
                    load16_pairs(kp[i] + d, ke, ko);
                    acc[i] = _mm256_fmadd_ps(qo, ko, _mm256_fmadd_ps(qe, ke, acc[i]));
                }
            }
        } else {
            for (int64_t d = 0; d < D; d += 8) {
                const __m256 qv = _mm256_loadu_ps(q + d);
#pragma GCC unroll 8
                for (int i = 0; i < 8; ++i) acc[i] = _mm256_fmadd_ps(qv, load8(kp[i] + d), acc[i]);
            }
        }
        __m256 s = _mm256_mul_ps(sum8x8(acc), c);
        if (slope != 0.0f)
            s = _mm256_fmadd_ps(cs, _mm256_add_ps(step, _mm256_set1_ps(static_cast<float>(j - pos))), s);
        if (n < 8) {
            alignas(32) float tmp[8];
            _mm256_store_ps(tmp, s);
            for (int i = n; i < 8; ++i) tmp[i] = -FLT_MAX;
            s = _mm256_load_ps(tmp);
            for (int i = 0; i < n; ++i) p[j + i] = tmp[i];
        } else {
            _mm256_storeu_ps(p + j, s);
        }
        vmax = _mm256_max_ps(vmax, s);
    }
    const __m256 m = _mm256_set1_ps(hmax8(vmax));
    __m256 vsum = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 8 <= nkeys; j += 8) {
        const __m256 e = exp2_8(_mm256_sub_ps(_mm256_loadu_ps(p + j), m));
        _mm256_storeu_ps(p + j, e);
        vsum = _mm256_add_ps(vsum, e);
    }
    float sum = hsum8(vsum);
    const float mf = _mm256_cvtss_f32(m);
    for (; j < nkeys; ++j) {
        p[j] = std::exp2(p[j] - mf);
        sum += p[j];
    }
    const float inv = 1.0f / sum;
    int64_t d0 = 0;
    if constexpr (Pairs) {
        for (; d0 + 64 <= D; d0 += 64) weighted_values_pairs<4>(v, p, nkeys, d0, inv, fetch, out);
        switch ((D - d0) / 16) {
            case 1: weighted_values_pairs<1>(v, p, nkeys, d0, inv, fetch, out); break;
            case 2: weighted_values_pairs<2>(v, p, nkeys, d0, inv, fetch, out); break;
            case 3: weighted_values_pairs<3>(v, p, nkeys, d0, inv, fetch, out); break;
            default: break;
        }
    } else {
        for (; d0 + 64 <= D; d0 += 64) weighted_values<8>(v, p, nkeys, d0, inv, fetch, out);
        switch ((D - d0) / 8) {
            case 1: weighted_values<1>(v, p, nkeys, d0, inv, fetch, out); break;
            case 2: weighted_values<2>(v, p, nkeys, d0, inv, fetch, out); break;
            case 3: weighted_values<3>(v, p, nkeys, d0, inv, fetch, out); break;
            case 4: weighted_values<4>(v, p, nkeys, d0, inv, fetch, out); break;
            case 5: weighted_values<5>(v, p, nkeys, d0, inv, fetch, out); break;
            case 6: weighted_values<6>(v, p, nkeys, d0, inv, fetch, out); break;
            case 7: weighted_values<7>(v, p, nkeys, d0, inv, fetch, out); break;
            default: break;
        }
    }
}

struct RowItem {
    int64_t s, h, i0, nt, cost;
};

template <typename T, bool Pairs>
void attention_items(const AttentionArgs& a, const std::vector<RowItem>& items) {
    const int64_t G = a.Hq / a.Hkv;
    const int64_t n = static_cast<int64_t>(items.size());
    int log2bs = 0;
    while ((int64_t{1} << log2bs) < a.block_size) ++log2bs;
#pragma omp parallel for num_threads(std::max(1, a.nthreads)) schedule(dynamic, 1) if (n > 1)
    for (int64_t i = 0; i < n; ++i) {
        const RowItem& it = items[i];
        const int64_t q0 = a.query_start_loc[it.s], n_new = a.query_start_loc[it.s + 1] - q0;
        const int64_t ctx = a.context_lens[it.s], g = it.h / G;
        const int32_t* bt = a.block_tables + it.s * a.bt_stride;
        const Rows<T> k{static_cast<const T*>(a.k_cache) + g * a.k_sh, bt, a.k_sb, a.k_st, log2bs};
        const Rows<T> v{static_cast<const T*>(a.v_cache) + g * a.v_sh, bt, a.v_sb, a.v_st, log2bs};
        thread_local std::vector<float> scores;
        float* p = grow_only(scores, static_cast<size_t>(ctx + 8));
        thread_local std::vector<float> paired;
        float* qp = grow_only(paired, static_cast<size_t>(a.D));
        const float slope = a.alibi ? a.alibi[it.h] : 0.0f;
        for (int64_t r = it.i0; r < it.i0 + it.nt; ++r) {
            const int64_t t = q0 + r, pos = ctx - n_new + r;
            const float* q = a.q + t * a.q_st + it.h * a.q_sh;
            if constexpr (Pairs) {
                pair_order(q, a.D, qp);
                q = qp;
            }
            attend_row<T, Pairs>(q, a.D, k, v, pos + 1, a.scale, slope, pos, r == it.i0, p,
                                 a.out + t * a.o_st + it.h * a.o_sh);
        }
    }
}

}  // namespace

bool attention_supports_head_dim(int64_t d) { return d >= 8 && d <= 512 && d % 8 == 0; }

void paged_attention(const AttentionArgs& a) {
    check_attention_call(a);
    if (!attention_supports_head_dim(a.D))
        throw std::invalid_argument("head_dim " + std::to_string(a.D) + " has no compiled CPU kernel");
    std::vector<RowItem> items;
    for (int64_t s = 0; s < a.S; ++s) {
        const SequenceSpan span = checked_sequence(a, s);
        for (int64_t h = 0; h < a.Hq; ++h)
            for (int64_t i0 = 0; i0 < span.n_new; i0 += kRows) {
                const int64_t nt = std::min(kRows, span.n_new - i0);
                items.push_back({s, h, i0, nt, nt * (span.ctx - span.n_new + i0 + nt)});
            }
    }
    // Longest first, so the dynamic schedule does not end on one long straggler.
    std::stable_sort(items.begin(), items.end(), [](const RowItem& x, const RowItem& y) { return x.cost > y.cost; });
    if (a.bf16 && a.D % 16 == 0)
        attention_items<uint16_t, true>(a, items);
    else if (a.bf16)
        attention_items<uint16_t, false>(a, items);
    else
        attention_items<float, false>(a, items);
}

}  // namespace lmserve
