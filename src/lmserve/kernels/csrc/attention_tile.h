// The two inner loops of paged attention: one work item is one sequence, one KV head (or a slice of
// its query heads) and a tile of new tokens, swept over its keys 32 at a time with online softmax.
//
// - rowdot (few rows, i.e. decode): each query row is dotted with 16 keys at once and the 16
//   partial vectors are reduced by one transpose-and-add tree; output rows keep d in the lanes.
// - lanes (prefill tiles of 12..48 rows): rows live in the vector lanes (q transposed once per
//   tile), so scores, the softmax max/sum and the rescale are all vertical ops, and K/V values are
//   broadcast from the chunk buffer. K/V are read once per tile, not once per row.
//
// Scores are kept in log2 units (q is pre-scaled by scale * log2(e)) so exp is one exp2.
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
    int32_t s, g;     // sequence, KV head
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

// Fetch keys c0 .. c0+nk of sequence s / KV head g into fp32 chunk buffers (buffer d order).
template <int D>
inline void fetch_chunk(const AttentionArgs& a, int log2bs, int s, int g, int c0, int nk, float* kb, float* vb) {
    const int32_t* bt = a.block_tables + s * a.bt_stride;
    const int64_t mask = a.block_size - 1;
    for (int j = 0; j < nk; ++j) {
        const int64_t pos = c0 + j, blk = bt[pos >> log2bs], off = pos & mask;
        float* kd = kb + j * D;
        float* vd = vb + j * D;
        if (a.bf16) {
            const uint16_t* ks = static_cast<const uint16_t*>(a.k_cache) + blk * a.k_sb + off * a.k_st + g * a.k_sh;
            const uint16_t* vs = static_cast<const uint16_t*>(a.v_cache) + blk * a.v_sb + off * a.v_st + g * a.v_sh;
            for (int i = 0; i + 32 <= D; i += 32) {
                __m512i kv = _mm512_loadu_si512(ks + i), vv = _mm512_loadu_si512(vs + i);
                _mm512_storeu_ps(kd + i, bf16_even(kv));
                _mm512_storeu_ps(kd + i + 16, bf16_odd(kv));
                _mm512_storeu_ps(vd + i, bf16_even(vv));
                _mm512_storeu_ps(vd + i + 16, bf16_odd(vv));
            }
            if (D % 32) {
                _mm512_storeu_ps(kd + D - 16, bf16x16_load(ks + D - 16));
                _mm512_storeu_ps(vd + D - 16, bf16x16_load(vs + D - 16));
            }
        } else {
            const float* ks = static_cast<const float*>(a.k_cache) + blk * a.k_sb + off * a.k_st + g * a.k_sh;
            const float* vs = static_cast<const float*>(a.v_cache) + blk * a.v_sb + off * a.v_st + g * a.v_sh;
            for (int i = 0; i < D; i += 16) {
                _mm512_storeu_ps(kd + i, _mm512_loadu_ps(ks + i));
                _mm512_storeu_ps(vd + i, _mm512_loadu_ps(vs + i));
            }
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
                     int64_t o_stride, float m, float l, const int32_t* perm) {
    if (sink.part_o) {
        float* po = sink.part_o + r * D;
        for (int i = 0; i < D; ++i) po[perm[i]] = o[i * o_stride];
        sink.part_ml[2 * r] = m;
        sink.part_ml[2 * r + 1] = l;
        return;
    }
    float* dst = out_row(a, it, G, r);
    const float inv = 1.0f / l;
    for (int i = 0; i < D; ++i) dst[perm[i]] = o[i * o_stride] * inv;
}

// Scores of one row against 16 buffered keys.
template <int D>
inline __m512 dot16(const float* q, const float* kb) {
    __m512 acc[16];
    for (int j = 0; j < 16; ++j) acc[j] = _mm512_setzero_ps();
    for (int i = 0; i < D; i += 16) {
        const __m512 qv = _mm512_loadu_ps(q + i);
        for (int j = 0; j < 16; ++j) acc[j] = _mm512_fmadd_ps(qv, _mm512_loadu_ps(kb + j * D + i), acc[j]);
    }
    return reduce16(acc);
}

template <int D>
void run_rowdot(const AttentionArgs& a, const Item& it, int64_t G, int log2bs, const Workspace& ws, const Sink& sink) {
    const int R = it.nt * it.nh;
    const float qscale = a.scale * 1.4426950408889634f;
    float* m = ws.ml;
    float* l = ws.ml + kTileRows;
    float* alpha = ws.ml + 2 * kTileRows;
    float* slope = ws.ml + 3 * kTileRows;
    for (int r = 0; r < R; ++r) {
        const float* src = q_row(a, it, G, r);
        for (int i = 0; i < D; ++i) ws.q[r * D + i] = src[ws.perm[i]] * qscale;
        for (int i = 0; i < D; ++i) ws.o[r * D + i] = 0.0f;
        m[r] = -FLT_MAX;
        l[r] = 0.0f;
        slope[r] = row_slope(a, it, G, r);
    }
    const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    for (int c0 = it.kv0; c0 < it.kv1; c0 += kChunk) {
        const int nk = std::min(kChunk, it.kv1 - c0);
        fetch_chunk<D>(a, log2bs, it.s, it.g, c0, nk, ws.kb, ws.vb);
        int nkv = 0;  // keys any row still sees in this chunk
        for (int r = 0; r < R; ++r) {
            const int pos = it.pos0 + r / it.nh;
            const int nvalid = std::min(nk, pos - c0 + 1);
            float* p = ws.st + r * kChunk;
            if (nvalid <= 0) {
                alpha[r] = 1.0f;
                for (int j = 0; j < kChunk; ++j) p[j] = 0.0f;
                continue;
            }
            nkv = std::max(nkv, nvalid);
            const __mmask16 k0 = tail_mask(nvalid), k1 = tail_mask(nvalid - 16);
            __m512 s0 = dot16<D>(ws.q + r * D, ws.kb);
            __m512 s1 = k1 ? dot16<D>(ws.q + r * D, ws.kb + 16 * D) : _mm512_setzero_ps();
            if (a.alibi) {
                const __m512 sl = _mm512_set1_ps(slope[r]);
                const __m512 rel = _mm512_add_ps(iota, _mm512_set1_ps(static_cast<float>(c0 - pos)));
                s0 = _mm512_fmadd_ps(sl, rel, s0);
                s1 = _mm512_fmadd_ps(sl, _mm512_add_ps(rel, _mm512_set1_ps(16.0f)), s1);
            }
            float mx = _mm512_mask_reduce_max_ps(k0, s0);
            if (k1) mx = std::max(mx, _mm512_mask_reduce_max_ps(k1, s1));
            const float m_new = std::max(m[r], mx);
            alpha[r] = std::exp2(m[r] - m_new);
            const __m512 mv = _mm512_set1_ps(m_new);
            const __m512 p0 = _mm512_maskz_mov_ps(k0, exp2_ps(_mm512_sub_ps(s0, mv)));
            const __m512 p1 = _mm512_maskz_mov_ps(k1, exp2_ps(_mm512_sub_ps(s1, mv)));
            l[r] = l[r] * alpha[r] + _mm512_reduce_add_ps(_mm512_add_ps(p0, p1));
            m[r] = m_new;
            _mm512_storeu_ps(p, p0);
            _mm512_storeu_ps(p + 16, p1);
        }
        // o[r] = o[r] * alpha[r] + sum_j p[r][j] * v[j]; two rows at a time share each V load.
        int r = 0;
        for (; r + 2 <= R; r += 2) {
            const float* p0 = ws.st + r * kChunk;
            const float* p1 = p0 + kChunk;
            for (int i = 0; i < D; i += 16) {
                __m512 a0 = _mm512_mul_ps(_mm512_loadu_ps(ws.o + r * D + i), _mm512_set1_ps(alpha[r]));
                __m512 a1 = _mm512_mul_ps(_mm512_loadu_ps(ws.o + (r + 1) * D + i), _mm512_set1_ps(alpha[r + 1]));
                for (int j = 0; j < nkv; ++j) {
                    const __m512 v = _mm512_loadu_ps(ws.vb + j * D + i);
                    a0 = _mm512_fmadd_ps(_mm512_set1_ps(p0[j]), v, a0);
                    a1 = _mm512_fmadd_ps(_mm512_set1_ps(p1[j]), v, a1);
                }
                _mm512_storeu_ps(ws.o + r * D + i, a0);
                _mm512_storeu_ps(ws.o + (r + 1) * D + i, a1);
            }
        }
        for (; r < R; ++r) {
            const float* p0 = ws.st + r * kChunk;
            for (int i = 0; i < D; i += 16) {
                __m512 a0 = _mm512_mul_ps(_mm512_loadu_ps(ws.o + r * D + i), _mm512_set1_ps(alpha[r]));
                for (int j = 0; j < nkv; ++j)
                    a0 = _mm512_fmadd_ps(_mm512_set1_ps(p0[j]), _mm512_loadu_ps(ws.vb + j * D + i), a0);
                _mm512_storeu_ps(ws.o + r * D + i, a0);
            }
        }
    }
    for (int r = 0; r < R; ++r) emit_row<D>(a, it, G, r, sink, ws.o + r * D, 1, m[r], l[r], ws.perm);
}

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
        const float* src = q_row(a, it, G, rr);
        for (int i = 0; i < D; ++i) ws.q[i * W + r] = r < R ? src[ws.perm[i]] * qscale : 0.0f;
    }
    for (int i = 0; i < D * W; ++i) ws.o[i] = 0.0f;
    __m512i posv[NV];
    __m512 slv[NV], mv[NV], lv[NV], av[NV];
    for (int v = 0; v < NV; ++v) {
        posv[v] = _mm512_load_si512(pos + v * 16);
        slv[v] = _mm512_load_ps(slope + v * 16);
        mv[v] = _mm512_set1_ps(-FLT_MAX);
        lv[v] = _mm512_setzero_ps();
    }
    const int last_pos = it.pos0 + it.nt - 1;
    for (int c0 = it.kv0; c0 < it.kv1; c0 += kChunk) {
        const int nk = std::min(kChunk, it.kv1 - c0);
        fetch_chunk<D>(a, log2bs, it.s, it.g, c0, nk, ws.kb, ws.vb);
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
            __m512 mx = _mm512_set1_ps(-FLT_MAX);
            for (int j = 0; j < nkv; ++j) {
                float* sp = ws.st + j * W + v * 16;
                __m512 s = _mm512_loadu_ps(sp);
                if (a.alibi) {
                    const __m512i rel = _mm512_sub_epi32(_mm512_set1_epi32(c0 + j), posv[v]);
                    s = _mm512_fmadd_ps(slv[v], _mm512_cvtepi32_ps(rel), s);
                    _mm512_storeu_ps(sp, s);
                }
                const __mmask16 ok = _mm512_cmple_epi32_mask(_mm512_set1_epi32(c0 + j), posv[v]);
                mx = _mm512_mask_max_ps(mx, ok, mx, s);
            }
            const __m512 m_new = _mm512_max_ps(mv[v], mx);
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
    alignas(64) float m[W], l[W];
    for (int v = 0; v < NV; ++v) {
        _mm512_store_ps(m + v * 16, mv[v]);
        _mm512_store_ps(l + v * 16, lv[v]);
    }
    for (int r = 0; r < R; ++r) emit_row<D>(a, it, G, r, sink, ws.o + r, W, m[r], l[r], ws.perm);
}

}  // namespace lmserve
