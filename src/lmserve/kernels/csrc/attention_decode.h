// Paged attention for items with few query rows (decode: one token times the GQA group).
//
// Each row is dotted with 16 buffered keys at a time and the 16 partial vectors are reduced by one
// transpose-and-add tree. Values are read straight from the cache and widened in registers: with
// so few rows, staging them in a buffer would cost more stores than the FMAs that use them.
#pragma once

#include "attention_common.h"

namespace lmserve {

// Scores of one row against 16 buffered keys.
template <int D>
inline __m512 dot16(const float* q, const float* kb) {
    __m512 acc[16];
    for (int j = 0; j < 16; ++j) acc[j] = _mm512_setzero_ps();
    for (int i = 0; i < D; i += 16) {
        const __m512 qv = _mm512_load_ps(q + i);
        for (int j = 0; j < 16; ++j) acc[j] = _mm512_fmadd_ps(qv, _mm512_load_ps(kb + j * D + i), acc[j]);
    }
    return reduce16(acc);
}

// o[r] = o[r] * alpha[r] + sum_j p[r][j] * v[j] for NR rows. Keys outer and NR x D/16 independent
// accumulators inner: with keys inner, every accumulator would be one long FMA latency chain.
template <int D, int NR, bool BF16>
inline void pv_rows(float* o, const float* p, const float* alpha, int nkv, const void* const* vrows) {
    constexpr int DV = D / 16;
    __m512 acc[NR][DV];
    for (int r = 0; r < NR; ++r)
        for (int v = 0; v < DV; ++v)
            acc[r][v] = _mm512_mul_ps(_mm512_load_ps(o + r * D + v * 16), _mm512_set1_ps(alpha[r]));
    for (int j = 0; j < nkv; ++j) {
        __m512 pj[NR];
        for (int r = 0; r < NR; ++r) pj[r] = _mm512_set1_ps(p[r * kChunk + j]);
        if constexpr (BF16) {
            const uint16_t* src = static_cast<const uint16_t*>(vrows[j]);
            for (int v = 0; v + 2 <= DV; v += 2) {
                const __m512i w = _mm512_loadu_si512(src + v * 16);
                const __m512 x0 = bf16_even(w), x1 = bf16_odd(w);
                for (int r = 0; r < NR; ++r) {
                    acc[r][v] = _mm512_fmadd_ps(pj[r], x0, acc[r][v]);
                    acc[r][v + 1] = _mm512_fmadd_ps(pj[r], x1, acc[r][v + 1]);
                }
            }
            if constexpr (DV % 2) {
                const __m512 x = bf16x16_load(src + D - 16);
                for (int r = 0; r < NR; ++r) acc[r][DV - 1] = _mm512_fmadd_ps(pj[r], x, acc[r][DV - 1]);
            }
        } else {
            const float* src = static_cast<const float*>(vrows[j]);
            for (int v = 0; v < DV; ++v) {
                const __m512 x = _mm512_loadu_ps(src + v * 16);
                for (int r = 0; r < NR; ++r) acc[r][v] = _mm512_fmadd_ps(pj[r], x, acc[r][v]);
            }
        }
    }
    for (int r = 0; r < NR; ++r)
        for (int v = 0; v < DV; ++v) _mm512_store_ps(o + r * D + v * 16, acc[r][v]);
}

template <int D, bool BF16>
void pv_all(float* o, const float* p, const float* alpha, int R, int nkv, const void* const* vrows) {
    constexpr int RB = D >= 256 ? 1 : std::min(4, 256 / D);  // at most 16 accumulators
    for (int r0 = 0; r0 < R; r0 += RB) {
        float* orow = o + r0 * D;
        const float* prow = p + r0 * kChunk;
        switch (std::min(RB, R - r0)) {
            case 1: pv_rows<D, 1, BF16>(orow, prow, alpha + r0, nkv, vrows); break;
            case 2: pv_rows<D, std::min(2, RB), BF16>(orow, prow, alpha + r0, nkv, vrows); break;
            case 3: pv_rows<D, std::min(3, RB), BF16>(orow, prow, alpha + r0, nkv, vrows); break;
            default: pv_rows<D, RB, BF16>(orow, prow, alpha + r0, nkv, vrows); break;
        }
    }
}

// The item's KV heads one at a time within each chunk (not one after the other over all chunks):
// a token's keys for all heads are adjacent in the cache, so the item then reads memory in order.
template <int D>
void run_rowdot(const AttentionArgs& a, const Item& it, int64_t G, int log2bs, const Workspace& ws, const Sink& sink) {
    const int R = it.nt * it.nh;  // rows per KV head; all heads' rows fit in kTileRows
    const float qscale = a.scale * 1.4426950408889634f;
    float* m = ws.ml;
    float* l = ws.ml + kTileRows;
    float* alpha = ws.ml + 2 * kTileRows;
    float* slope = ws.ml + 3 * kTileRows;
    Item heads[kTileRows];
    for (int h = 0; h < it.ng; ++h) {
        heads[h] = it;
        heads[h].g = it.g + h;
        heads[h].ng = 1;
        for (int r = 0; r < R; ++r) {
            const int row = h * R + r;
            const float* src = q_row(a, heads[h], G, r);
            for (int i = 0; i < D; ++i) ws.q[row * D + i] = src[ws.perm[i]] * qscale;
            for (int i = 0; i < D; ++i) ws.o[row * D + i] = 0.0f;
            m[row] = -FLT_MAX;
            l[row] = 0.0f;
            slope[row] = row_slope(a, heads[h], G, r);
        }
    }
    const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512 lowest = _mm512_set1_ps(-FLT_MAX);
    const void* vrows[kChunk];
    for (int c0 = it.kv0; c0 < it.kv1; c0 += kChunk) {
        const int nk = std::min(kChunk, it.kv1 - c0);
        for (int h = 0; h < it.ng; ++h) {
            fetch_chunk<D>(a, log2bs, it.s, it.g + h, c0, nk, ws.kb, nullptr, vrows, it.kv1);
            int nkv = 0;  // keys any row still sees in this chunk
            for (int r = 0; r < R; ++r) {
                const int row = h * R + r;
                const int pos = it.pos0 + r / it.nh;
                const int nvalid = std::min(nk, pos - c0 + 1);
                float* p = ws.st + row * kChunk;
                if (nvalid <= 0) {
                    alpha[row] = 1.0f;
                    for (int j = 0; j < kChunk; ++j) p[j] = 0.0f;
                    continue;
                }
                nkv = std::max(nkv, nvalid);
                const __mmask16 k0 = tail_mask(nvalid), k1 = tail_mask(nvalid - 16);
                __m512 s0 = dot16<D>(ws.q + row * D, ws.kb);
                __m512 s1 = k1 ? dot16<D>(ws.q + row * D, ws.kb + 16 * D) : lowest;
                if (a.alibi) {
                    const __m512 sl = _mm512_set1_ps(slope[row]);
                    const __m512 rel = _mm512_add_ps(iota, _mm512_set1_ps(static_cast<float>(c0 - pos)));
                    s0 = _mm512_fmadd_ps(sl, rel, s0);
                    s1 = _mm512_fmadd_ps(sl, _mm512_add_ps(rel, _mm512_set1_ps(16.0f)), s1);
                }
                s0 = _mm512_mask_mov_ps(lowest, k0, s0);
                s1 = _mm512_mask_mov_ps(lowest, k1, s1);
                const float m_new = std::max(m[row], _mm512_reduce_max_ps(_mm512_max_ps(s0, s1)));
                // Once the running max settles (most chunks of a long context) the rescale is exact 1.
                alpha[row] = m_new == m[row] ? 1.0f : std::exp2(m[row] - m_new);
                const __m512 mv = _mm512_set1_ps(m_new);
                const __m512 p0 = _mm512_maskz_mov_ps(k0, exp2_ps(_mm512_sub_ps(s0, mv)));
                const __m512 p1 = _mm512_maskz_mov_ps(k1, exp2_ps(_mm512_sub_ps(s1, mv)));
                l[row] = l[row] * alpha[row] + _mm512_reduce_add_ps(_mm512_add_ps(p0, p1));
                m[row] = m_new;
                _mm512_store_ps(p, p0);
                _mm512_store_ps(p + 16, p1);
            }
            float* o = ws.o + h * R * D;
            const float* ps = ws.st + h * R * kChunk;
            if (a.bf16)
                pv_all<D, true>(o, ps, alpha + h * R, R, nkv, vrows);
            else
                pv_all<D, false>(o, ps, alpha + h * R, R, nkv, vrows);
        }
    }
    for (int h = 0; h < it.ng; ++h)
        for (int r = 0; r < R; ++r)
            emit_row<D>(a, heads[h], G, r, sink, ws.o + (h * R + r) * D, m[h * R + r], l[h * R + r], ws.perm);
}

}  // namespace lmserve
