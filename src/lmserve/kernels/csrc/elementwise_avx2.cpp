// The row-wise ops between the GEMMs for the AVX2 build: RMS norm (with the residual add fused),
// rotary embedding and the paged-cache writes, as elementwise.cpp and kv_cache.cpp do them with
// 16 lanes. In torch each was several passes over the activations and several op dispatches: on a
// 2-core AMD EPYC (Zen 3) the three took 14% of a burst of 16 prompts with their decode.
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "kernels.h"
#include "kv_write.h"
#include "vec_avx2.h"

namespace lmserve {
namespace {

// fp32 -> bf16 rounding to nearest even, NaN to 0xFFFF (as kv_cache.cpp, and torch's .to()).
inline uint16_t to_bf16(float x) {
    if (std::isnan(x)) return 0xFFFF;
    uint32_t u;
    __builtin_memcpy(&u, &x, 4);
    return static_cast<uint16_t>((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}

inline __m128i to_bf16x8(__m256 x) {
    const __m256i u = _mm256_castps_si256(x);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
    r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0xFFFF), _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q)));
    // Values fit 16 bits: pack the low halves of the eight lanes, in order.
    return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
}

// One row of D values: bf16 widened to fp32, and fp32 rounded to bf16.
void widen_row(const uint16_t* s, float* d, int64_t D) {
    int64_t i = 0;
    for (; i + 8 <= D; i += 8) {
        const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i)));
        _mm256_storeu_ps(d + i, _mm256_castsi256_ps(_mm256_slli_epi32(w, 16)));
    }
    for (; i < D; ++i) {
        const uint32_t u = static_cast<uint32_t>(s[i]) << 16;
        __builtin_memcpy(d + i, &u, 4);
    }
}

void narrow_row(const float* s, uint16_t* d, int64_t D) {
    int64_t i = 0;
    for (; i + 8 <= D; i += 8) _mm_storeu_si128(reinterpret_cast<__m128i*>(d + i), to_bf16x8(_mm256_loadu_ps(s + i)));
    for (; i < D; ++i) d[i] = to_bf16(s[i]);
}

}  // namespace

void write_kv(const KVWrite& a) { write_kv_rows(a, widen_row, narrow_row); }

void rms_norm(const float* x, int64_t ldx, const float* residual, int64_t ldr, const float* weight, float* out,
              int64_t ldo, float* sum_out, int64_t lds, int64_t M, int64_t H, float eps, int nthreads) {
    const int threads = M * H >= kParallelMinElements ? std::max(1, nthreads) : 1;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
    for (int64_t m = 0; m < M; ++m) {
        const float* xr = x + m * ldx;
        const float* rr = residual ? residual + m * ldr : nullptr;
        float* sr = rr ? sum_out + m * lds : nullptr;  // without a residual the sum is x itself
        const float* src = rr ? sr : xr;
        __m256 ss = _mm256_setzero_ps();
        float tail = 0.0f;
        int64_t i = 0;
        for (; i + 8 <= H; i += 8) {
            __m256 v = _mm256_loadu_ps(xr + i);
            if (rr) {
                v = _mm256_add_ps(v, _mm256_loadu_ps(rr + i));
                _mm256_storeu_ps(sr + i, v);
            }
            ss = _mm256_fmadd_ps(v, v, ss);
        }
        for (; i < H; ++i) {
            const float v = rr ? (sr[i] = xr[i] + rr[i]) : xr[i];
            tail += v * v;
        }
        const float inv = 1.0f / std::sqrt((hsum8(ss) + tail) / static_cast<float>(H) + eps);
        const __m256 vinv = _mm256_set1_ps(inv);
        float* orow = out + m * ldo;
        for (i = 0; i + 8 <= H; i += 8)
            _mm256_storeu_ps(orow + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(src + i), vinv),
                                                     _mm256_loadu_ps(weight + i)));
        for (; i < H; ++i) orow[i] = src[i] * inv * weight[i];
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
                int64_t i = 0;
                for (; i + 8 <= half; i += 8) {
                    const __m256 x1 = _mm256_loadu_ps(v + i), x2 = _mm256_loadu_ps(v + half + i);
                    const __m256 cv = _mm256_loadu_ps(c + i), sv = _mm256_loadu_ps(s + i);
                    _mm256_storeu_ps(v + i, _mm256_fmsub_ps(x1, cv, _mm256_mul_ps(x2, sv)));
                    _mm256_storeu_ps(v + half + i, _mm256_fmadd_ps(x2, cv, _mm256_mul_ps(x1, sv)));
                }
                for (; i < half; ++i) {
                    const float x1 = v[i], x2 = v[half + i];
                    v[i] = x1 * c[i] - x2 * s[i];
                    v[half + i] = x2 * c[i] + x1 * s[i];
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
