// Row-wise ops that sit between the GEMMs: RMS norm (with the residual add fused) and SwiGLU.
// Each saves torch several passes over the activations and several op dispatches per layer.
#include <omp.h>

#include <algorithm>
#include <cmath>

#include "kernels.h"
#include "vec.h"

namespace lmserve {

void rms_norm(const float* x, int64_t ldx, const float* residual, int64_t ldr, const float* weight, float* out,
              int64_t ldo, float* sum_out, int64_t lds, int64_t M, int64_t H, float eps, int nthreads) {
    const int threads = M * H >= kParallelMinElements ? std::max(1, nthreads) : 1;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
    for (int64_t m = 0; m < M; ++m) {
        const float* xr = x + m * ldx;
        const float* rr = residual ? residual + m * ldr : nullptr;
        // Without a residual the sum is x itself and is not written anywhere.
        float* sr = rr ? sum_out + m * lds : nullptr;
        const float* src = rr ? sr : xr;
        __m512 ss = _mm512_setzero_ps();
        for (int64_t i = 0; i < H; i += 16) {
            const __mmask16 k = tail_mask(static_cast<int>(std::min<int64_t>(16, H - i)));
            __m512 v = _mm512_maskz_loadu_ps(k, xr + i);
            if (rr) {
                v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(k, rr + i));
                _mm512_mask_storeu_ps(sr + i, k, v);
            }
            ss = _mm512_fmadd_ps(v, v, ss);
        }
        const __m512 inv = _mm512_set1_ps(1.0f / std::sqrt(_mm512_reduce_add_ps(ss) / static_cast<float>(H) + eps));
        float* orow = out + m * ldo;
        for (int64_t i = 0; i < H; i += 16) {
            const __mmask16 k = tail_mask(static_cast<int>(std::min<int64_t>(16, H - i)));
            const __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(k, src + i), inv);
            _mm512_mask_storeu_ps(orow + i, k, _mm512_mul_ps(v, _mm512_maskz_loadu_ps(k, weight + i)));
        }
    }
}

void silu_and_mul(const float* x, int64_t ldx, float* out, int64_t ldo, int64_t M, int64_t I, int nthreads) {
    const int threads = M * I >= kParallelMinElements ? std::max(1, nthreads) : 1;
    const __m512 neg_log2e = _mm512_set1_ps(-1.4426950408889634f);
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
    for (int64_t m = 0; m < M; ++m) {
        const float* g = x + m * ldx;
        const float* u = g + I;
        float* o = out + m * ldo;
        for (int64_t i = 0; i < I; i += 16) {
            const __mmask16 k = tail_mask(static_cast<int>(std::min<int64_t>(16, I - i)));
            const __m512 gv = _mm512_maskz_loadu_ps(k, g + i);
            const __m512 e = exp2_ps(_mm512_mul_ps(gv, neg_log2e));
            const __m512 s = _mm512_div_ps(gv, _mm512_add_ps(_mm512_set1_ps(1.0f), e));
            _mm512_mask_storeu_ps(o + i, k, _mm512_mul_ps(s, _mm512_maskz_loadu_ps(k, u + i)));
        }
    }
}

// Four sets of 16 lanes, each keeping its largest value and where it first saw it (only a strictly
// greater value moves it), so four compare-and-blend chains run side by side; then the sets merge
// (the smaller index wins a tie) and the lanes holding the row's maximum give their smallest index.
// torch's CPU argmax tracks its index element by element: 335 us for 16 rows of 49,152 logits on a
// 2-core AMD EPYC, seventeen times its own max (this: 38 us).
void argmax_rows(const float* x, int64_t ldx, int64_t M, int64_t N, int64_t* out, int nthreads) {
    constexpr int kSets = 4;
    const int threads = M * N >= kParallelMinElements && M > 1 ? std::max(1, nthreads) : 1;
    const __m512 lowest = _mm512_set1_ps(-INFINITY);
    const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
    for (int64_t m = 0; m < M; ++m) {
        const float* row = x + m * ldx;
        __m512 best[kSets];
        __m512i where[kSets];
        for (int j = 0; j < kSets; ++j) {
            best[j] = lowest;
            where[j] = _mm512_setzero_si512();
        }
        int64_t nan_at = -1;
        for (int64_t i0 = 0; i0 < N && nan_at < 0; i0 += 16 * kSets) {
            for (int j = 0; j < kSets; ++j) {
                const int64_t i = i0 + 16 * j;
                if (i >= N) break;
                const __mmask16 k = tail_mask(static_cast<int>(std::min<int64_t>(16, N - i)));
                const __m512 v = _mm512_mask_loadu_ps(lowest, k, row + i);
                const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
                if (nan) {
                    nan_at = i + __builtin_ctz(nan);
                    break;
                }
                const __mmask16 gt = _mm512_cmp_ps_mask(v, best[j], _CMP_GT_OQ);
                best[j] = _mm512_mask_mov_ps(best[j], gt, v);
                const __m512i at = _mm512_add_epi32(lanes, _mm512_set1_epi32(static_cast<int>(i)));
                where[j] = _mm512_mask_mov_epi32(where[j], gt, at);
            }
        }
        if (nan_at >= 0) {
            out[m] = nan_at;
            continue;
        }
        for (int j = 1; j < kSets; ++j) {
            const __mmask16 take = _mm512_cmp_ps_mask(best[j], best[0], _CMP_GT_OQ) |
                                   (_mm512_cmp_ps_mask(best[j], best[0], _CMP_EQ_OQ) &
                                    _mm512_cmplt_epi32_mask(where[j], where[0]));
            best[0] = _mm512_mask_mov_ps(best[0], take, best[j]);
            where[0] = _mm512_mask_mov_epi32(where[0], take, where[j]);
        }
        const __mmask16 top = _mm512_cmp_ps_mask(best[0], _mm512_set1_ps(_mm512_reduce_max_ps(best[0])), _CMP_EQ_OQ);
        out[m] = _mm512_mask_reduce_min_epi32(top, where[0]);
    }
}

void rotary(float* x, int64_t st, int64_t sh, int64_t T, int64_t H, const int64_t* positions, const float* cos,
            const float* sin, int64_t half, bool neox, int nthreads) {
    const int threads = T * H * half * 2 >= kParallelMinElements ? std::max(1, nthreads) : 1;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
    for (int64_t t = 0; t < T; ++t) {
        const float* c = cos + positions[t] * half;
        const float* s = sin + positions[t] * half;
        for (int64_t h = 0; h < H; ++h) {
            float* v = x + t * st + h * sh;
            if (neox) {  // rotate the pair (v[i], v[i + half])
                for (int64_t i = 0; i < half; i += 16) {
                    const __mmask16 k = tail_mask(static_cast<int>(std::min<int64_t>(16, half - i)));
                    const __m512 x1 = _mm512_maskz_loadu_ps(k, v + i), x2 = _mm512_maskz_loadu_ps(k, v + half + i);
                    const __m512 cv = _mm512_maskz_loadu_ps(k, c + i), sv = _mm512_maskz_loadu_ps(k, s + i);
                    _mm512_mask_storeu_ps(v + i, k, _mm512_fmsub_ps(x1, cv, _mm512_mul_ps(x2, sv)));
                    _mm512_mask_storeu_ps(v + half + i, k, _mm512_fmadd_ps(x2, cv, _mm512_mul_ps(x1, sv)));
                }
            } else {  // rotate adjacent pairs (v[2i], v[2i + 1])
                for (int64_t i = 0; i < half; ++i) {
                    const float x1 = v[2 * i], x2 = v[2 * i + 1];
                    v[2 * i] = x1 * c[i] - x2 * s[i];
                    v[2 * i + 1] = x2 * c[i] + x1 * s[i];
                }
            }
        }
    }
}

}  // namespace lmserve
