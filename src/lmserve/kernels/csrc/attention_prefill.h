// Paged attention for tiles of 12..48 query rows (prefill, chunked prefill, wide GQA decode).
//
// Rows live in the vector lanes (q is transposed once per tile), so the scores, the softmax max and
// sum and the rescale of the output are all vertical ops, and K/V values are broadcast from the
// chunk buffer: each key and value is read once per tile, not once per row.
#pragma once

#include "attention_common.h"

namespace lmserve {

template <int D, int NV>
void run_lanes(const AttentionArgs& a, const Item& it, int64_t G, int log2bs, const Workspace& ws, const Sink& sink) {
    constexpr int W = NV * 16;           // row lanes
    constexpr int JB = NV == 1 ? 16 : 8; // keys per QK register block
    constexpr int IB = NV == 1 ? 16 : 8; // features per PV register block
    const int R = it.nt * it.nh;
    const float qscale = a.scale * 1.4426950408889634f;
    alignas(64) int32_t pos[W];
    alignas(64) float slope[W];
    for (int r = 0; r < W; ++r) {
        const int rr = std::min(r, R - 1);  // pad lanes repeat the last row; their q is zero
        pos[r] = it.pos0 + rr / it.nh;
        slope[r] = row_slope(a, it, G, rr);
    }
    // q in buffer order, transposed 16 rows x 16 features at a time: row r's feature perm[i] goes to q[i][r].
    const __m512 qs = _mm512_set1_ps(qscale);
    for (int v = 0; v < NV; ++v) {
        for (int i0 = 0; i0 < D; i0 += 16) {
            const __m512i from = _mm512_loadu_si512(ws.perm + i0);
            __m512 blk[16];
            for (int l = 0; l < 16; ++l) {
                const int r = v * 16 + l;
                blk[l] = r < R ? _mm512_mul_ps(_mm512_i32gather_ps(from, q_row(a, it, G, r), 4), qs)
                               : _mm512_setzero_ps();
            }
            transpose16x16(blk);
            for (int k = 0; k < 16; ++k) _mm512_storeu_ps(ws.q + (i0 + k) * W + v * 16, blk[k]);
        }
    }
    for (int i = 0; i < D * W; ++i) ws.o[i] = 0.0f;
    __m512i posv[NV];
    __m512 slv[NV], mv[NV], lv[NV], av[NV];
    init_lanes<NV>(pos, slope, posv, slv, mv, lv);
    const int last_pos = it.pos0 + it.nt - 1;
    for (int c0 = it.kv0; c0 < it.kv1; c0 += kChunk) {
        const int nk = std::min(kChunk, it.kv1 - c0);
        fetch_chunk<D>(a, log2bs, it.s, it.g, c0, nk, ws.kb, ws.vb, nullptr, 0, true);  // o in feature order
        const int nkv = std::min(nk, last_pos - c0 + 1);
        for (int jb = 0; jb < nkv; jb += JB) {
            __m512 acc[JB][NV];
            for (int jj = 0; jj < JB; ++jj)
                for (int v = 0; v < NV; ++v) acc[jj][v] = _mm512_setzero_ps();
            for (int i = 0; i < D; ++i) {
                __m512 qv[NV];
                for (int v = 0; v < NV; ++v) qv[v] = _mm512_loadu_ps(ws.q + i * W + v * 16);
                for (int jj = 0; jj < JB; ++jj) {
                    const __m512 kv = _mm512_set1_ps(ws.kb[(jb + jj) * D + i]);
                    for (int v = 0; v < NV; ++v) acc[jj][v] = _mm512_fmadd_ps(kv, qv[v], acc[jj][v]);
                }
            }
            for (int jj = 0; jj < JB; ++jj)
                for (int v = 0; v < NV; ++v) _mm512_storeu_ps(ws.st + (jb + jj) * W + v * 16, acc[jj][v]);
        }
        for (int v = 0; v < NV; ++v) {
            const __m512 m_new = _mm512_max_ps(mv[v], chunk_max(a, ws.st, W, v, nkv, c0, posv[v], slv[v]));
            av[v] = exp2_ps(_mm512_sub_ps(mv[v], m_new));
            __m512 sum = _mm512_setzero_ps();
            for (int j = 0; j < nkv; ++j) {
                float* sp = ws.st + j * W + v * 16;
                const __mmask16 ok = _mm512_cmple_epi32_mask(_mm512_set1_epi32(c0 + j), posv[v]);
                const __m512 p = _mm512_maskz_mov_ps(ok, exp2_ps(_mm512_sub_ps(_mm512_loadu_ps(sp), m_new)));
                _mm512_storeu_ps(sp, p);
                sum = _mm512_add_ps(sum, p);
            }
            lv[v] = _mm512_fmadd_ps(lv[v], av[v], sum);
            mv[v] = m_new;
        }
        for (int ib = 0; ib < D; ib += IB) {
            __m512 acc[IB][NV];
            for (int ii = 0; ii < IB; ++ii)
                for (int v = 0; v < NV; ++v)
                    acc[ii][v] = _mm512_mul_ps(_mm512_loadu_ps(ws.o + (ib + ii) * W + v * 16), av[v]);
            for (int j = 0; j < nkv; ++j) {
                __m512 pv[NV];
                for (int v = 0; v < NV; ++v) pv[v] = _mm512_loadu_ps(ws.st + j * W + v * 16);
                for (int ii = 0; ii < IB; ++ii) {
                    const __m512 x = _mm512_set1_ps(ws.vb[j * D + ib + ii]);
                    for (int v = 0; v < NV; ++v) acc[ii][v] = _mm512_fmadd_ps(x, pv[v], acc[ii][v]);
                }
            }
            for (int ii = 0; ii < IB; ++ii)
                for (int v = 0; v < NV; ++v) _mm512_storeu_ps(ws.o + (ib + ii) * W + v * 16, acc[ii][v]);
        }
    }
    emit_lanes<D, NV>(a, it, G, sink, ws.o, mv, lv);
}

}  // namespace lmserve
