// y = x W^T with quantized weights (kernels/quant.py), for CPUs with AVX2 + FMA but no AVX-512: the
// weight-only layouts ("q8": int8 [P, K, 32]; "q4": nibble pairs [P, K, 16]), with the panels,
// threads and K blocks of quant_gemm.cpp and 8-lane vectors. Without it, quantized weights on such
// a CPU were dequantized whole in torch for every call: 290 times slower than bf16 at one row.
//
// A group's products are summed over the weights' integer values and scaled once, at the group's
// end: sum_k x_k (q_k s + m) = s sum_k x_k q_k + m sum_k x_k, with each row's sum of x per group
// computed once per call. A k-row of a panel then costs 4 widenings of 8 values and 4 FMAs per row,
// and no multiply by its scale. A tile is 2 rows x 32 columns: 8 accumulators, 4 widened weights and
// the broadcasts fill 14 of the 16 registers (one row alternates k between two accumulator sets to
// hide the FMA latency). A group's scaled sums go to a 2 x 32 tile in L1, written out after each K
// block, so a last panel of fewer than 32 columns never writes past its row.
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "panel_tasks.h"
#include "quant.h"
#include "vec_avx2.h"

namespace lmserve {
namespace {

constexpr int kMR = 2;         // rows per micro-tile
constexpr int64_t kMC = 128;   // rows per task, a multiple of kMR
constexpr int64_t kKC = 512;   // K block (rounded to whole groups): its weights stay in L1 across row tiles

// Panel row k's values as fp32, v[j] holding columns 8j..8j+7.
template <int BITS>
inline void load_q(const uint8_t* q, int64_t k, __m256 v[4]) {
    if constexpr (BITS == 8) {
        const uint8_t* row = q + k * kPanel;
#pragma GCC unroll 4
        for (int j = 0; j < 4; ++j)
            v[j] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + 8 * j))));
    } else {  // byte j: column j in its low nibble, column 16 + j in its high one
        const uint8_t* row = q + k * 16;
#pragma GCC unroll 2
        for (int h = 0; h < 2; ++h) {
            const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + 8 * h)));
            v[h] = _mm256_cvtepi32_ps(_mm256_and_si256(b, _mm256_set1_epi32(0xF)));
            v[2 + h] = _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4));
        }
    }
}

// Adds MR rows of x[:, k0:k0+kc] (kc whole groups; x already at k0) times panel p to tile [MR][32].
// xsum: the rows' sums of x per group (row stride `groups`), read only with mins. pf: the next K
// block's weights to prefetch, a line per k, or null.
template <int MR, int BITS, bool MIN>
__attribute__((noinline)) void qmicro(const float* x, int64_t ldx, const float* xsum, const QuantLinearArgs& a, int64_t p, int64_t k0,
            int64_t kc, float* tile, const uint8_t* pf) {
    constexpr int S = MR == 1 ? 2 : 1;  // independent accumulator sets
    constexpr int64_t kRow = BITS == 8 ? kPanel : 16;  // bytes per k
    const int64_t groups = a.K / a.group;
    const uint8_t* q = a.q + p * a.K * kRow;
    const float* sc = a.scales + p * groups * kPanel;
    const float* mn = MIN ? a.mins + p * groups * kPanel : nullptr;
    for (int64_t g0 = k0; g0 < k0 + kc; g0 += a.group) {
        __m256 acc[S][MR][4];
#pragma GCC unroll 2
        for (int s = 0; s < S; ++s)
#pragma GCC unroll 2
            for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
                for (int j = 0; j < 4; ++j) acc[s][r][j] = _mm256_setzero_ps();
        for (int64_t k = g0; k < g0 + a.group; k += S) {  // groups are multiples of 16, so of S
#pragma GCC unroll 2
            for (int s = 0; s < S; ++s) {
                if (pf) _mm_prefetch(reinterpret_cast<const char*>(pf + (k + s - k0) * kRow), _MM_HINT_T0);
                __m256 w[4];
                load_q<BITS>(q, k + s, w);
#pragma GCC unroll 2
                for (int r = 0; r < MR; ++r) {
                    const __m256 xv = _mm256_broadcast_ss(x + r * ldx + (k + s - k0));
#pragma GCC unroll 4
                    for (int j = 0; j < 4; ++j) acc[s][r][j] = _mm256_fmadd_ps(xv, w[j], acc[s][r][j]);
                }
            }
        }
        const int64_t gi = g0 / a.group;
#pragma GCC unroll 2
        for (int r = 0; r < MR; ++r) {
            float* out = tile + r * kPanel;
#pragma GCC unroll 4
            for (int j = 0; j < 4; ++j) {
                __m256 sum = acc[0][r][j];
#pragma GCC unroll 2
                for (int s = 1; s < S; ++s) sum = _mm256_add_ps(sum, acc[s][r][j]);
                __m256 t = _mm256_fmadd_ps(sum, _mm256_loadu_ps(sc + gi * kPanel + 8 * j), _mm256_load_ps(out + 8 * j));
                if constexpr (MIN)
                    t = _mm256_fmadd_ps(_mm256_broadcast_ss(xsum + r * groups + gi), _mm256_loadu_ps(mn + gi * kPanel + 8 * j), t);
                _mm256_store_ps(out + 8 * j, t);
            }
        }
    }
}

// Rows [m0, m1) of panel p into c (row stride ldc, ncols valid columns); with_adds: add the bias.
template <int BITS, bool MIN>
void qpanel_rows(const QuantLinearArgs& a, const float* xsums, int64_t p, int64_t m0, int64_t m1, float* c,
                 int64_t ldc, int64_t ncols, bool with_adds) {
    constexpr int64_t kRow = BITS == 8 ? kPanel : 16;
    const int64_t groups = a.K / a.group;
    const int64_t nkb = (a.K + kKC - 1) / kKC;
    int64_t kc_full = (a.K + nkb - 1) / nkb;
    kc_full = (kc_full + a.group - 1) / a.group * a.group;
    const int nc = static_cast<int>(std::min<int64_t>(ncols, kPanel));
    const float* bias = with_adds && a.bias ? a.bias + p * kPanel : nullptr;
    for (int64_t k0 = 0; k0 < a.K; k0 += kc_full) {
        const int64_t kc = std::min(kc_full, a.K - k0);
        // The next K block of this panel, or the next panel's first, which follows in memory.
        const uint8_t* next = k0 + kc < a.K || p + 1 < a.panels ? a.q + (p * a.K + k0 + kc) * kRow : nullptr;
        for (int64_t m = m0; m < m1; m += kMR) {
            const int mr = static_cast<int>(std::min<int64_t>(kMR, m1 - m));
            alignas(32) float tile[kMR * kPanel] = {};
            const float* xs = MIN ? xsums + m * groups : nullptr;
            const uint8_t* pf = m == m0 ? next : nullptr;
            if (mr == 2)
                qmicro<2, BITS, MIN>(a.x + m * a.ldx + k0, a.ldx, xs, a, p, k0, kc, tile, pf);
            else
                qmicro<1, BITS, MIN>(a.x + m * a.ldx + k0, a.ldx, xs, a, p, k0, kc, tile, pf);
            for (int r = 0; r < mr; ++r) {
                float* cr = c + (m - m0 + r) * ldc;
                const float* add = k0 == 0 ? bias : cr;
                for (int j = 0; j < nc; ++j) cr[j] = tile[r * kPanel + j] + (add ? add[j] : 0.0f);
            }
        }
    }
}

// Each row's sum of x over each group: [M, K / group].
void group_sums(const QuantLinearArgs& a, float* out) {
    const int64_t groups = a.K / a.group;
    for (int64_t m = 0; m < a.M; ++m) {
        const float* x = a.x + m * a.ldx;
        for (int64_t g = 0; g < groups; ++g) {
            __m256 s = _mm256_setzero_ps();
            for (int64_t k = g * a.group; k < (g + 1) * a.group; k += 8) s = _mm256_add_ps(s, _mm256_loadu_ps(x + k));
            alignas(32) float v[8];
            _mm256_store_ps(v, s);
            out[m * groups + g] = ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
        }
    }
}

using PanelFn = void (*)(const QuantLinearArgs&, const float*, int64_t, int64_t, int64_t, float*, int64_t, int64_t,
                         bool);

}  // namespace

void linear_quant(const QuantLinearArgs& a) {
    if (a.M <= 0 || a.panels <= 0) return;
    thread_local std::vector<float> sums;  // grow_only: group_sums writes every element it is read at
    const float* xsums = nullptr;
    if (a.mins) {
        float* s = grow_only(sums, static_cast<size_t>(a.M * (a.K / a.group)));
        group_sums(a, s);
        xsums = s;
    }
    const PanelFn panel = a.bits == 4 ? (a.mins ? &qpanel_rows<4, true> : &qpanel_rows<4, false>)
                                      : (a.mins ? &qpanel_rows<8, true> : &qpanel_rows<8, false>);
    const int64_t unit = a.silu_mul ? 2 : 1;
    for_each_panel_task<kMR, kMC>(a.M, a.panels / unit, a.panels * kPanel * a.K, a.nthreads,
                                  [&](int64_t m0, int64_t m1, int64_t u0, int64_t u1) {
        if (!a.silu_mul) {
            for (int64_t p = u0; p < u1; ++p)
                panel(a, xsums, p, m0, m1, a.y + m0 * a.ldy + p * kPanel, a.ldy, a.N - p * kPanel, true);
            return;
        }
        thread_local std::vector<float> scratch;  // gate|up rows; every K block's first writes, not adds
        float* s = grow_only(scratch, static_cast<size_t>((m1 - m0) * 2 * kPanel));
        for (int64_t u = u0; u < u1; ++u) {
            panel(a, xsums, 2 * u, m0, m1, s, 2 * kPanel, kPanel, false);
            panel(a, xsums, 2 * u + 1, m0, m1, s + kPanel, 2 * kPanel, kPanel, false);
            store_silu_mul_rows8(s, m1 - m0, a.y + m0 * a.ldy + u * kPanel, a.ldy,
                                 static_cast<int>(std::min<int64_t>(kPanel, a.N - u * kPanel)));
        }
    });
}

}  // namespace lmserve
