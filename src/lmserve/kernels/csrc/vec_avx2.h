// AVX2 + FMA helpers shared by the kernels of the AVX2 build (gemm_avx2.cpp, quant_gemm_avx2.cpp,
// attention_avx2.cpp, elementwise_avx2.cpp).
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>

namespace lmserve {

// 2^x for x in [-126, 126] (clamped outside): 2^f by the same polynomial as vec.h, 2^n by building
// the exponent bits (AVX2 has no vscalefps).
static inline __m256 exp2_8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-126.0f)), _mm256_set1_ps(126.0f));
    const __m256 n = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256 f = _mm256_sub_ps(x, n);
    __m256 p = _mm256_set1_ps(1.5403530e-4f);
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.3333558e-3f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.6181291e-3f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.5504109e-2f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.4022651e-1f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.9314718e-1f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

static inline __m256 silu_mul8(__m256 g, __m256 u) {
    const __m256 e = exp2_8(_mm256_mul_ps(g, _mm256_set1_ps(-1.4426950408889634f)));
    return _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0f), e)), u);
}

// The sum of the eight lanes of v.
static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)));
}

// A tile of 6 rows x 16 columns: tile[r][j] = sum over k < kc of x[r * ldx + k] * w_k[j], where
// load(k, w0, w1) gives k-row k's 16 weights as two vectors. Each loaded weight serves 6 rows: 12
// accumulators, 2 weights and a broadcast take 15 of the 16 registers. Tile rows are 32 floats apart.
template <typename Load>
static inline void tile6x16(const float* x, int64_t ldx, int64_t kc, float* tile, Load load) {
    __m256 acc[6][2];
#pragma GCC unroll 8
    for (int r = 0; r < 6; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    for (int64_t k = 0; k < kc; ++k) {
        __m256 w0, w1;
        load(k, w0, w1);
#pragma GCC unroll 8
        for (int r = 0; r < 6; ++r) {
            const __m256 xv = _mm256_broadcast_ss(x + r * ldx + k);
            acc[r][0] = _mm256_fmadd_ps(xv, w0, acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(xv, w1, acc[r][1]);
        }
    }
#pragma GCC unroll 8
    for (int r = 0; r < 6; ++r) {
        _mm256_store_ps(tile + r * 32, acc[r][0]);
        _mm256_store_ps(tile + r * 32 + 8, acc[r][1]);
    }
}

// A row tile's sums (row stride 32) written to c (row stride ldc, nc columns): over the bias (or
// nothing) in the first K block, added to what c holds in the later ones.
static inline void add_tile_rows(const float* tile, int rows, float* c, int64_t ldc, int nc, const float* bias,
                                 bool first) {
    for (int r = 0; r < rows; ++r) {
        float* cr = c + r * ldc;
        const float* add = first ? bias : cr;
        for (int j = 0; j < nc; ++j) cr[j] = tile[r * 32 + j] + (add ? add[j] : 0.0f);
    }
}

// Rows of gate|up pairs (row stride 64 floats: 32 gate columns, then 32 up ones) written to y as
// silu(gate) * up, ncols columns a row.
static inline void store_silu_mul_rows8(const float* s, int64_t rows, float* y, int64_t ldy, int ncols) {
    for (int64_t m = 0; m < rows; ++m, s += 64, y += ldy) {
        alignas(32) float out[32];
        for (int j = 0; j < 32; j += 8)
            _mm256_store_ps(out + j, silu_mul8(_mm256_loadu_ps(s + j), _mm256_loadu_ps(s + 32 + j)));
        std::copy(out, out + ncols, y);
    }
}

}  // namespace lmserve
