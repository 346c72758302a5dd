// AVX-512 helpers shared by the CPU kernels: bf16 widening, exp2, horizontal sums.
//
// Only AVX-512 F/BW/VL/DQ and FMA are assumed: widening bf16 to fp32 is a 16-bit shift. Functions that
// use the bf16 dot-product instructions carry LMSERVE_BF16_TARGET and run only where the CPU has them
// (cpu_has_bf16_dot); whether they are faster is measured on the machine (kernels/choice.py).
#pragma once

#include <immintrin.h>

#include <cstdint>

#define LMSERVE_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")))

namespace lmserve {

// A 64-byte line of pair-interleaved bf16 holds two 16-lane fp32 vectors: element 2j is lane j of
// the "even" vector and element 2j+1 lane j of the "odd" one. Widening then costs one shift or one
// AND per vector instead of a cross-lane zero-extend.
static inline __m512 bf16_even(__m512i v) { return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)); }

static inline __m512 bf16_odd(__m512i v) {
    return _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
}

// 16 contiguous bf16 values widened in order.
static inline __m512 bf16x16_load(const uint16_t* p) {
    __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

static inline __mmask16 tail_mask(int n) {
    return n >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (n > 0 ? n : 0)) - 1u);
}

// Transposes the 16 x 16 matrix of 32-bit elements whose row i is r[i], in place: afterwards r[j]
// holds element j of every former row. Three rounds of in-lane and cross-lane shuffles, 64 in all.
static inline void transpose16x16(__m512 r[16]) {
    __m512 t[16];
    for (int i = 0; i < 16; i += 2) {  // per 128-bit lane: (a0 b0 a1 b1), (a2 b2 a3 b3)
        t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {  // per 128-bit lane L: u[i + k] holds element 4L + k of 4 rows
        const __m512d t0 = _mm512_castps_pd(t[i]), t1 = _mm512_castps_pd(t[i + 1]);
        const __m512d t2 = _mm512_castps_pd(t[i + 2]), t3 = _mm512_castps_pd(t[i + 3]);
        r[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(t0, t2));
        r[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(t0, t2));
        r[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(t1, t3));
        r[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(t1, t3));
    }
    for (int k = 0; k < 4; ++k) {  // gather lane L of rows 0-3, 4-7, 8-11, 12-15 into element 4L + k
        const __m512 v = _mm512_shuffle_f32x4(r[k], r[4 + k], 0x88), w = _mm512_shuffle_f32x4(r[k], r[4 + k], 0xDD);
        const __m512 x = _mm512_shuffle_f32x4(r[8 + k], r[12 + k], 0x88);
        const __m512 y = _mm512_shuffle_f32x4(r[8 + k], r[12 + k], 0xDD);
        t[k] = _mm512_shuffle_f32x4(v, x, 0x88);
        t[8 + k] = _mm512_shuffle_f32x4(v, x, 0xDD);
        t[4 + k] = _mm512_shuffle_f32x4(w, y, 0x88);
        t[12 + k] = _mm512_shuffle_f32x4(w, y, 0xDD);
    }
    for (int i = 0; i < 16; ++i) r[i] = t[i];
}

// 2^x for x in [-126, 126] (clamped outside), relative error ~2e-7: x = n + f with n = round(x),
// |f| <= 0.5, 2^f by its degree-6 Taylor series, then vscalefps applies 2^n without bit tricks.
static inline __m512 exp2_ps(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-126.0f)), _mm512_set1_ps(126.0f));
    __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 f = _mm512_sub_ps(x, n);
    __m512 p = _mm512_set1_ps(1.5403530e-4f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504109e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022651e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

// silu(g) * u, lane by lane.
static inline __m512 silu_mul(__m512 g, __m512 u) {
    const __m512 e = exp2_ps(_mm512_mul_ps(g, _mm512_set1_ps(-1.4426950408889634f)));
    return _mm512_mul_ps(_mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), e)), u);
}

// An output tile of a panel GEMM: 32 columns, the first two K-block passes differ (bias, then add).
struct Tile {
    float* c;            // output tile (row stride ldc)
    int64_t ldc;
    __mmask16 m0, m1;    // valid columns of the two 16-lane halves
    const float* bias;   // added in the first K block, already offset to the panel's first column
    const uint16_t* pf = nullptr;  // weights to prefetch alongside, one step's lines per step (or none)
};

// Adds MR rows of 32-column accumulators to the tile (or its bias, in the first K block) and stores them.
template <int MR>
inline void store_tile(__m512 (&acc)[MR][2], const Tile& t, bool first) {
    for (int r = 0; r < MR; ++r) {
        float* cr = t.c + r * t.ldc;
        __m512 a0 = acc[r][0], a1 = acc[r][1];
        if (!first) {
            a0 = _mm512_add_ps(a0, _mm512_maskz_loadu_ps(t.m0, cr));
            a1 = _mm512_add_ps(a1, _mm512_maskz_loadu_ps(t.m1, cr + 16));
        } else if (t.bias) {
            a0 = _mm512_add_ps(a0, _mm512_maskz_loadu_ps(t.m0, t.bias));
            a1 = _mm512_add_ps(a1, _mm512_maskz_loadu_ps(t.m1, t.bias + 16));
        }
        _mm512_mask_storeu_ps(cr, t.m0, a0);
        _mm512_mask_storeu_ps(cr + 16, t.m1, a1);
    }
}

// Sums S independent accumulator sets (kept apart to hide multiply-add latency) into the first.
template <int S, int MR>
inline void fold_sets(__m512 (&acc)[S][MR][2]) {
    for (int s = 1; s < S; ++s)
        for (int r = 0; r < MR; ++r) {
            acc[0][r][0] = _mm512_add_ps(acc[0][r][0], acc[s][r][0]);
            acc[0][r][1] = _mm512_add_ps(acc[0][r][1], acc[s][r][1]);
        }
}

// The SwiGLU epilogue of one gate|up panel pair: `rows` rows of scratch `s` (each 32 gate values
// then 32 up values) become silu(gate) * up in the first `ncols` columns of y.
static inline void store_silu_mul_rows(const float* s, int64_t rows, float* y, int64_t ldy, int ncols) {
    const __mmask16 k0 = tail_mask(ncols), k1 = tail_mask(ncols - 16);
    for (int64_t m = 0; m < rows; ++m, s += 64, y += ldy) {
        _mm512_mask_storeu_ps(y, k0, silu_mul(_mm512_loadu_ps(s), _mm512_loadu_ps(s + 32)));
        _mm512_mask_storeu_ps(y + 16, k1, silu_mul(_mm512_loadu_ps(s + 16), _mm512_loadu_ps(s + 48)));
    }
}

// Lane j of the result is the sum of all 16 lanes of a[j]: a transpose-and-add tree, 45 shuffles
// and adds for 16 dot products, far cheaper than 16 separate horizontal reductions.
static inline __m512 reduce16(const __m512 a[16]) {
    __m512 s[8];
    for (int i = 0; i < 8; ++i) {
        // per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3]
        s[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]),
                             _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
    }
    __m512 t[4];
    for (int i = 0; i < 4; ++i) {
        // per 128-bit lane: partial sums of the four vectors 4i..4i+3, in order
        __m512d x = _mm512_castps_pd(s[2 * i]), y = _mm512_castps_pd(s[2 * i + 1]);
        t[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
    }
    // Fold the four 128-bit lanes: first pairwise within (t0,t1) and (t2,t3), then across.
    __m512 u0 = _mm512_add_ps(_mm512_shuffle_f32x4(t[0], t[1], 0x88), _mm512_shuffle_f32x4(t[0], t[1], 0xDD));
    __m512 u1 = _mm512_add_ps(_mm512_shuffle_f32x4(t[2], t[3], 0x88), _mm512_shuffle_f32x4(t[2], t[3], 0xDD));
    return _mm512_add_ps(_mm512_shuffle_f32x4(u0, u1, 0x88), _mm512_shuffle_f32x4(u0, u1, 0xDD));
}

}  // namespace lmserve
