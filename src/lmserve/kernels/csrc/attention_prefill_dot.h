// The row-lane prefill loop of attention_prefill.h with bf16 dot products (CPUs with AVX512_BF16,
// bf16 KV cache only), chosen per machine by measurement (kernels/choice.py).
//
// Each vdpbf16ps multiplies a pair of features (scores) or a pair of keys (output) into 16 fp32
// lanes, half the instructions of the fp32 loop. q is rounded to bf16 once per tile and the softmax
// weights once per chunk (their max, sum and the output stay fp32): the precision of bf16 attention
// as GPU kernels compute it. Keys are read as feature pairs straight from the cache; values are
// re-laid as key pairs, (v[j][f], v[j+1][f]) in one 32-bit word.
#pragma once

#include "attention_common.h"

namespace lmserve {

// Two 16-lane fp32 vectors to one vector of bf16 pairs: lo in the low half of each lane.
LMSERVE_BF16_TARGET inline __m512i bf16_pairs(__m512 lo, __m512 hi) {
    const __m512i l = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(lo));
    const __m512i h = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(hi));
    return _mm512_or_si512(l, _mm512_slli_epi32(h, 16));
}

template <int D, int NV>
LMSERVE_BF16_TARGET void run_lanes_dot(const AttentionArgs& a, const Item& it, int64_t G, int log2bs,
                                       const Workspace& ws, const Sink& sink) {
    static_assert(D % 16 == 0, "value pairs are built 16 features at a time");
    constexpr int W = NV * 16;
    constexpr int JB = NV == 1 ? 16 : 8;
    constexpr int IB = NV == 1 ? 16 : 8;
    const int R = it.nt * it.nh;
    const float qscale = a.scale * 1.4426950408889634f;
    uint32_t* q2 = reinterpret_cast<uint32_t*>(ws.q);   // [D/2][W] pairs of q features
    uint32_t* vp = reinterpret_cast<uint32_t*>(ws.vb);  // [kChunk/2][D] pairs of values
    uint32_t* pp = reinterpret_cast<uint32_t*>(ws.kb);  // [kChunk/2][W] pairs of softmax weights
    const uint32_t* krow[kChunk];
    alignas(64) int32_t pos[W];
    alignas(64) float slope[W];
    const __m512 qs = _mm512_set1_ps(qscale);
    for (int r = 0; r < W; ++r) {
        const int rr = std::min(r, R - 1);  // pad lanes repeat the last row; their q is zero
        pos[r] = it.pos0 + rr / it.nh;
        slope[r] = row_slope(a, it, G, rr);
    }
    // q as feature pairs, transposed 16 rows x 16 pairs at a time: row r's pair i goes to q2[i][r].
    for (int v = 0; v < NV; ++v) {
        for (int i0 = 0; i0 < D / 2; i0 += 16) {
            const int left = D - 2 * i0;  // features of the block, 16 pairs at most
            const __mmask16 klo = tail_mask(std::min(left, 16)), khi = tail_mask(std::min(left - 16, 16));
            __m512 blk[16];
            for (int l = 0; l < 16; ++l) {
                const int r = v * 16 + l;
                if (r >= R) {
                    blk[l] = _mm512_setzero_ps();
                    continue;
                }
                const float* src = q_row(a, it, G, r) + 2 * i0;
                const __m512 lo = _mm512_mul_ps(_mm512_maskz_loadu_ps(klo, src), qs);
                const __m512 hi = _mm512_mul_ps(_mm512_maskz_loadu_ps(khi, src + 16), qs);
                blk[l] = (__m512)_mm512_cvtne2ps_pbh(hi, lo);  // word k: features 2k, 2k + 1 of the block
            }
            transpose16x16(blk);
            for (int k = 0; k < 16 && i0 + k < D / 2; ++k)
                _mm512_storeu_ps(reinterpret_cast<float*>(q2 + (i0 + k) * W + v * 16), blk[k]);
        }
    }
    for (int i = 0; i < D * W; ++i) ws.o[i] = 0.0f;
    __m512i posv[NV];
    __m512 slv[NV], mv[NV], lv[NV], av[NV];
    init_lanes<NV>(pos, slope, posv, slv, mv, lv);
    const int last_pos = it.pos0 + it.nt - 1;
    const int32_t* bt = a.block_tables + it.s * a.bt_stride;
    const int64_t mask = a.block_size - 1;
    const uint16_t* kc = static_cast<const uint16_t*>(a.k_cache);
    const uint16_t* vc = static_cast<const uint16_t*>(a.v_cache);
    for (int c0 = it.kv0; c0 < it.kv1; c0 += kChunk) {
        const int nk = std::min(kChunk, it.kv1 - c0);
        const int nkv = std::min(nk, last_pos - c0 + 1);
        const int npairs = (nkv + 1) / 2;
        const uint16_t* vrow[kChunk];
        for (int j = 0; j < kChunk; ++j) {  // keys past the chunk read key 0 (finite) and get weight 0
            const int64_t p = c0 + (j < nk ? j : 0), blk = bt[p >> log2bs], off = p & mask;
            krow[j] = reinterpret_cast<const uint32_t*>(kc + blk * a.k_sb + off * a.k_st + it.g * a.k_sh);
            vrow[j] = vc + blk * a.v_sb + off * a.v_st + it.g * a.v_sh;
        }
        for (int jp = 0; jp < npairs; ++jp) {
            const uint16_t* v0 = vrow[2 * jp];
            const uint16_t* v1 = vrow[2 * jp + 1];
            for (int f = 0; f < D; f += 16) {
                const __m512i l = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v0 + f)));
                const __m512i h = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v1 + f)));
                _mm512_storeu_si512(vp + jp * D + f, _mm512_or_si512(l, _mm512_slli_epi32(h, 16)));
            }
        }
        for (int jb = 0; jb < nkv; jb += JB) {
            __m512 acc[JB][NV];
            for (int jj = 0; jj < JB; ++jj)
                for (int v = 0; v < NV; ++v) acc[jj][v] = _mm512_setzero_ps();
            for (int i = 0; i < D / 2; ++i) {
                __m512bh qv[NV];
                for (int v = 0; v < NV; ++v) qv[v] = (__m512bh)_mm512_loadu_si512(q2 + i * W + v * 16);
                for (int jj = 0; jj < JB; ++jj) {
                    const __m512bh kv = (__m512bh)_mm512_set1_epi32(static_cast<int>(krow[jb + jj][i]));
                    for (int v = 0; v < NV; ++v) acc[jj][v] = _mm512_dpbf16_ps(acc[jj][v], qv[v], kv);
                }
            }
            for (int jj = 0; jj < JB; ++jj)
                for (int v = 0; v < NV; ++v) _mm512_storeu_ps(ws.st + (jb + jj) * W + v * 16, acc[jj][v]);
        }
        for (int v = 0; v < NV; ++v) {
            const __m512 m_new = _mm512_max_ps(mv[v], chunk_max(a, ws.st, W, v, nkv, c0, posv[v], slv[v]));
            av[v] = exp2_ps(_mm512_sub_ps(mv[v], m_new));
            __m512 sum = _mm512_setzero_ps();
            for (int jp = 0; jp < npairs; ++jp) {
                __m512 p[2];
                for (int e = 0; e < 2; ++e) {
                    const int j = 2 * jp + e;
                    if (j >= nkv) {
                        p[e] = _mm512_setzero_ps();
                        continue;
                    }
                    const __mmask16 ok = _mm512_cmple_epi32_mask(_mm512_set1_epi32(c0 + j), posv[v]);
                    p[e] = _mm512_maskz_mov_ps(ok, exp2_ps(_mm512_sub_ps(_mm512_loadu_ps(ws.st + j * W + v * 16), m_new)));
                    sum = _mm512_add_ps(sum, p[e]);
                }
                _mm512_storeu_si512(pp + jp * W + v * 16, bf16_pairs(p[0], p[1]));
            }
            lv[v] = _mm512_fmadd_ps(lv[v], av[v], sum);
            mv[v] = m_new;
        }
        for (int ib = 0; ib < D; ib += IB) {
            __m512 acc[IB][NV];
            for (int ii = 0; ii < IB; ++ii)
                for (int v = 0; v < NV; ++v)
                    acc[ii][v] = _mm512_mul_ps(_mm512_loadu_ps(ws.o + (ib + ii) * W + v * 16), av[v]);
            for (int jp = 0; jp < npairs; ++jp) {
                __m512bh pv[NV];
                for (int v = 0; v < NV; ++v) pv[v] = (__m512bh)_mm512_loadu_si512(pp + jp * W + v * 16);
                for (int ii = 0; ii < IB; ++ii) {
                    const __m512bh x = (__m512bh)_mm512_set1_epi32(static_cast<int>(vp[jp * D + ib + ii]));
                    for (int v = 0; v < NV; ++v) acc[ii][v] = _mm512_dpbf16_ps(acc[ii][v], pv[v], x);
                }
            }
            for (int ii = 0; ii < IB; ++ii)
                for (int v = 0; v < NV; ++v) _mm512_storeu_ps(ws.o + (ib + ii) * W + v * 16, acc[ii][v]);
        }
    }
    emit_lanes<D, NV>(a, it, G, sink, ws.o, mv, lv);
}

}  // namespace lmserve
