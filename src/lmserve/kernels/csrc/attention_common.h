// What the two attention inner loops share: work items, per-thread buffers, fetching a chunk of keys
// and values out of the paged cache, and writing finished rows.
//
// One work item is one sequence, one KV head (or a slice of its query heads) and a tile of new
// tokens, swept over its keys 32 at a time with online softmax (attention_decode.h for few rows,
// attention_prefill.h for many). Scores are kept in log2 units (q is pre-scaled by
// scale * log2(e)) so each exp is one exp2.
#pragma once

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>

#include "kernels.h"
#include "vec.h"

namespace lmserve {

constexpr int kChunk = 32;     // keys per online-softmax step
constexpr int kTileRows = 48;  // rows per prefill tile: 3 vectors of 16 lanes
constexpr int kLanesMinRows = 12;

struct Item {
    int64_t t0;       // first q row (token index) of the tile
    int32_t s, g;     // sequence, first KV head
    int32_t ng;       // KV heads g .. g + ng - 1, one after the other
    int32_t h0, nh;   // query heads g * G + h0 .. + nh
    int32_t nt;       // tokens in the tile
    int32_t pos0;     // position of the first token
    int32_t kv0, kv1; // key range [kv0, kv1)
    int32_t part;     // -1: write normalized rows to out; else index of a partial result
    int64_t cost;
};

// Where an item's unnormalized result goes: straight to out, or to a partial for split keys.
struct Sink {
    float* part_o;  // [rows][D] in d order, or null
    float* part_ml; // [rows][2] = (max, sum)
};

struct Workspace {
    float* q;   // rowdot: [R][D]; lanes: [D][48]
    float* o;   // rowdot: [R][D]; lanes: [D][48]
    float* kb;  // [32][D]
    float* vb;  // [32][D]
    float* st;  // rowdot: [R][32]; lanes: [32][48]
    float* ml;  // [48][4] row scratch
    int32_t* perm;  // buffer index -> d
};

// One cache row to fp32 in buffer d order: pairs of 16 features even/odd within each 32 (vec.h),
// a trailing 16 in order.
template <int D>
inline void widen_row(const uint16_t* src, float* dst) {
    for (int i = 0; i + 32 <= D; i += 32) {
        const __m512i w = _mm512_loadu_si512(src + i);
        _mm512_store_ps(dst + i, bf16_even(w));
        _mm512_store_ps(dst + i + 16, bf16_odd(w));
    }
    if (D % 32) _mm512_store_ps(dst + D - 16, bf16x16_load(src + D - 16));
}

// One cache row to fp32 in feature order.
template <int D>
inline void widen_row_in_order(const uint16_t* src, float* dst) {
    for (int i = 0; i < D; i += 16) _mm512_store_ps(dst + i, bf16x16_load(src + i));
}

template <int D>
inline void copy_row(const float* src, float* dst) {
    for (int i = 0; i < D; i += 16) _mm512_store_ps(dst + i, _mm512_loadu_ps(src + i));
}

// Fetch keys c0 .. c0+nk of sequence s / KV head g into fp32 chunk buffers (buffer d order; values
// in feature order with ``values_in_order``, so that an output built from them needs no permutation).
// Without vb, the value rows are left in the cache and vrows receives their addresses instead.
// Keys before prefetch_end one chunk ahead are prefetched as these are fetched: a decode walks its
// sequence's blocks, scattered over the cache, and stalled on each (16 decodes of ~260-token
// contexts, default model, 2-core AMD EPYC: 200 -> 110 us a call, 10% of the whole generation).
template <int D>
inline void fetch_chunk(const AttentionArgs& a, int log2bs, int s, int g, int c0, int nk, float* kb, float* vb,
                        const void** vrows = nullptr, int prefetch_end = 0, bool values_in_order = false) {
    const int32_t* bt = a.block_tables + s * a.bt_stride;
    const int64_t mask = a.block_size - 1;
    const int64_t row_bytes = a.bf16 ? 2 * D : 4 * D;
    for (int j = 0; j < nk; ++j) {
        const int64_t pos = c0 + j, blk = bt[pos >> log2bs], off = pos & mask;
        const int64_t ko = blk * a.k_sb + off * a.k_st + g * a.k_sh, vo = blk * a.v_sb + off * a.v_st + g * a.v_sh;
        if (pos + kChunk < prefetch_end) {  // the same key of the next chunk, K and V rows
            const int64_t ahead = pos + kChunk, nblk = bt[ahead >> log2bs], noff = ahead & mask;
            const int64_t es = a.bf16 ? 2 : 4;
            const char* kp = static_cast<const char*>(a.k_cache) + (nblk * a.k_sb + noff * a.k_st + g * a.k_sh) * es;
            const char* vp = static_cast<const char*>(a.v_cache) + (nblk * a.v_sb + noff * a.v_st + g * a.v_sh) * es;
            for (int64_t b = 0; b < row_bytes; b += 64) {
                _mm_prefetch(kp + b, _MM_HINT_T0);
                _mm_prefetch(vp + b, _MM_HINT_T0);
            }
        }
        if (a.bf16) {
            const uint16_t* vs = static_cast<const uint16_t*>(a.v_cache) + vo;
            widen_row<D>(static_cast<const uint16_t*>(a.k_cache) + ko, kb + j * D);
            if (!vb)
                vrows[j] = vs;
            else if (values_in_order)
                widen_row_in_order<D>(vs, vb + j * D);
            else
                widen_row<D>(vs, vb + j * D);
        } else {
            const float* vs = static_cast<const float*>(a.v_cache) + vo;
            copy_row<D>(static_cast<const float*>(a.k_cache) + ko, kb + j * D);
            if (vb) copy_row<D>(vs, vb + j * D); else vrows[j] = vs;
        }
    }
}

// Row r of an item: token t0 + r / nh, head g * G + h0 + r % nh.
inline const float* q_row(const AttentionArgs& a, const Item& it, int64_t G, int r) {
    return a.q + (it.t0 + r / it.nh) * a.q_st + (it.g * G + it.h0 + r % it.nh) * a.q_sh;
}

inline float* out_row(const AttentionArgs& a, const Item& it, int64_t G, int r) {
    return a.out + (it.t0 + r / it.nh) * a.o_st + (it.g * G + it.h0 + r % it.nh) * a.o_sh;
}

inline float row_slope(const AttentionArgs& a, const Item& it, int64_t G, int r) {
    return a.alibi ? a.alibi[it.g * G + it.h0 + r % it.nh] * 1.4426950408889634f : 0.0f;
}

// Finish one row from its accumulator (element i of o is feature perm[i]).
template <int D>
inline void emit_row(const AttentionArgs& a, const Item& it, int64_t G, int r, const Sink& sink, const float* o,
                     float m, float l, const int32_t* perm) {
    if (sink.part_o) {
        float* po = sink.part_o + r * D;
        for (int i = 0; i < D; ++i) po[perm[i]] = o[i];
        sink.part_ml[2 * r] = m;
        sink.part_ml[2 * r + 1] = l;
        return;
    }
    float* dst = out_row(a, it, G, r);
    const float inv = 1.0f / l;
    for (int i = 0; i < D; ++i) dst[perm[i]] = o[i] * inv;
}

// The row-lane loops (attention_prefill.h, attention_prefill_dot.h) share their per-lane state:
// each lane's position and ALiBi slope, running max and running sum.
template <int NV>
inline void init_lanes(const int32_t* pos, const float* slope, __m512i* posv, __m512* slv, __m512* mv, __m512* lv) {
    for (int v = 0; v < NV; ++v) {
        posv[v] = _mm512_load_si512(pos + v * 16);
        slv[v] = _mm512_load_ps(slope + v * 16);
        mv[v] = _mm512_set1_ps(-FLT_MAX);
        lv[v] = _mm512_setzero_ps();
    }
}

// The max of vector v's lanes over the chunk's first nkv keys (scores in st, W floats a key), a
// lane counting only the keys at or before its position; ALiBi is added to the scores in place.
inline __m512 chunk_max(const AttentionArgs& a, float* st, int W, int v, int nkv, int c0, __m512i posv, __m512 slv) {
    __m512 mx = _mm512_set1_ps(-FLT_MAX);
    for (int j = 0; j < nkv; ++j) {
        float* sp = st + j * W + v * 16;
        __m512 s = _mm512_loadu_ps(sp);
        if (a.alibi) {
            const __m512i rel = _mm512_sub_epi32(_mm512_set1_epi32(c0 + j), posv);
            s = _mm512_fmadd_ps(slv, _mm512_cvtepi32_ps(rel), s);
            _mm512_storeu_ps(sp, s);
        }
        const __mmask16 ok = _mm512_cmple_epi32_mask(_mm512_set1_epi32(c0 + j), posv);
        mx = _mm512_mask_max_ps(mx, ok, mx, s);
    }
    return mx;
}

// Write a row-lane tile's R rows from its output o ([D][W], features in order) and the lanes' max
// and sum. 16 x 16 blocks of o are transposed in registers and each row is written 16 features at a
// time (a scalar strided copy took a fifth of a prefill tile).
template <int D, int NV>
inline void emit_lanes(const AttentionArgs& a, const Item& it, int64_t G, const Sink& sink, const float* o,
                       const __m512* mv, const __m512* lv) {
    static_assert(D % 16 == 0, "rows are written 16 features at a time");
    constexpr int W = NV * 16;
    const int R = it.nt * it.nh;
    // Where each row goes and what it is scaled by: a partial result stays unnormalized.
    alignas(64) float m[W], l[W], scale[W];
    float* dst[W];
    for (int v = 0; v < NV; ++v) {
        _mm512_store_ps(m + v * 16, mv[v]);
        _mm512_store_ps(l + v * 16, lv[v]);
        const __m512 one = _mm512_set1_ps(1.0f);
        _mm512_store_ps(scale + v * 16, sink.part_o ? one : _mm512_div_ps(one, lv[v]));
    }
    for (int r = 0; r < R; ++r) dst[r] = sink.part_o ? sink.part_o + r * D : out_row(a, it, G, r);
    for (int v = 0; v < NV && v * 16 < R; ++v) {
        for (int d0 = 0; d0 < D; d0 += 16) {
            __m512 blk[16];
            for (int i = 0; i < 16; ++i) blk[i] = _mm512_loadu_ps(o + (d0 + i) * W + v * 16);
            transpose16x16(blk);
            for (int k = 0; k < 16 && v * 16 + k < R; ++k)
                _mm512_storeu_ps(dst[v * 16 + k] + d0, _mm512_mul_ps(blk[k], _mm512_set1_ps(scale[v * 16 + k])));
        }
    }
    if (sink.part_o)
        for (int r = 0; r < R; ++r) {
            sink.part_ml[2 * r] = m[r];
            sink.part_ml[2 * r + 1] = l[r];
        }
}

}  // namespace lmserve
