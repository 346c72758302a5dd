// y = x W^T with quantized weights (kernels/quant.py), for CPUs with AVX2 + FMA but no AVX-512: the
// weight-only layouts ("q8": int8 [P, K, 32]; "q4": nibble pairs [P, K, 16]), with the panels,
// threads and K blocks of quant_gemm.cpp and 8-lane vectors. Without it, quantized weights on such
// a CPU were dequantized whole in torch for every call: 290 times slower than bf16 at one row.
//
// A group's products are summed over the weights' integer values and scaled once, at the group's
// end: sum_k x_k (q_k s + m) = s sum_k x_k q_k + m sum_k x_k, with each row's sum of x per group
// computed once per call. A k-row of a panel then costs 4 widenings of 8 values and 4 FMAs per row,
// and no multiply by its scale. A tile is 6 rows x 16 columns (qmicro_half) while 6 rows remain,
// then 2 or 1 rows x 32 columns: 8 accumulators, 4 widened weights and the broadcasts fill 14 of the
// 16 registers (one row alternates k between two accumulator sets to hide the FMA latency). A
// group's scaled sums go to a tile in L1, written out after each K block, so a last panel of fewer
// than 32 columns never writes past its row.
// From a dozen rows (4-bit) or 48 (int8) a task takes another way: each K block of a panel is widened
// to fp32 once, value * scale + min, and every row tile multiplies the widened block from L1.
// Weights are packed for the int8-dot kernels below instead wherever this build runs (4-bit "q4v",
// dmicro; int8 without mins "q8v", emicro); the weight-only paths serve 8-bit weights with mins
// (Q6_K), and weights packed elsewhere or with LMSERVE_QUANT_VNNI=0.
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

constexpr int kMR = 2;         // rows per full-panel micro-tile
constexpr int kHR = 6;         // rows per half-panel micro-tile (from kHR rows on)
constexpr int64_t kMC = 132;   // rows per task, a multiple of kMR and kHR
constexpr int64_t kKC = 512;   // K block (rounded to whole groups): its weights stay in L1 across row tiles
// From this many rows in a task, a panel's K block is widened to fp32 once (value * scale + min) and
// every row tile multiplies the widened block (qpanel_rows_widened). Measured on a 2-core AMD EPYC
// (Zen 3), alternating builds: 4-bit 1.0-1.2x from 12 rows, 1.25-1.5x from 48; int8 (cheaper to
// widen) 0.8-0.9x at 12 rows, 1.0-1.3x from 48.
constexpr int64_t widen_rows(int bits) { return bits == 4 ? 12 : 48; }
constexpr int64_t kKW = 256;   // K block of widened weights: 256 x 32 fp32 = 32 KB, L1

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

// Panel row k's values in columns 16h..16h+15 as fp32: v[0] columns 16h..16h+7, v[1] the next 8.
// The low nibble is taken by two shifts, not a mask: a half tile needs every register but one.
template <int BITS>
inline void load_q_half(const uint8_t* q, int64_t k, int h, __m256 v[2]) {
    if constexpr (BITS == 8) {
        const uint8_t* row = q + k * kPanel + 16 * h;
#pragma GCC unroll 2
        for (int j = 0; j < 2; ++j)
            v[j] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + 8 * j))));
    } else {
        const uint8_t* row = q + k * 16;
#pragma GCC unroll 2
        for (int j = 0; j < 2; ++j) {
            const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + 8 * j)));
            v[j] = _mm256_cvtepi32_ps(h == 0 ? _mm256_srli_epi32(_mm256_slli_epi32(b, 28), 28) : _mm256_srli_epi32(b, 4));
        }
    }
}

// qmicro for MR rows and one half (16 columns) of the panel: each widened weight serves MR rows
// instead of 2, a third of the widening per FMA; 12 accumulators, 2 weights and a broadcast take
// 15 registers. On a 2-core AMD EPYC (Zen 3), alternating builds, linears from 6 rows ran 3-16%
// (int8) and 1-12% (4-bit) faster than with 2-row tiles alone, with bit-identical results: the
// widening was not all that held the 2-row tile back.
template <int MR, int BITS, bool MIN>
__attribute__((noinline)) void qmicro_half(const float* x, int64_t ldx, const float* xsum, const QuantLinearArgs& a,
                                           int64_t p, int64_t k0, int64_t kc, int h, float* tile, const uint8_t* pf) {
    constexpr int64_t kRow = BITS == 8 ? kPanel : 16;
    const int64_t groups = a.K / a.group;
    const uint8_t* q = a.q + p * a.K * kRow;
    const float* sc = a.scales + p * groups * kPanel + 16 * h;
    const float* mn = MIN ? a.mins + p * groups * kPanel + 16 * h : nullptr;
    for (int64_t g0 = k0; g0 < k0 + kc; g0 += a.group) {
        __m256 acc[MR][2];
#pragma GCC unroll 8
        for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
        for (int64_t k = g0; k < g0 + a.group; ++k) {
            if (pf) _mm_prefetch(reinterpret_cast<const char*>(pf + (k - k0) * kRow), _MM_HINT_T0);
            __m256 w[2];
            load_q_half<BITS>(q, k, h, w);
#pragma GCC unroll 8
            for (int r = 0; r < MR; ++r) {
                const __m256 xv = _mm256_broadcast_ss(x + r * ldx + (k - k0));
                acc[r][0] = _mm256_fmadd_ps(xv, w[0], acc[r][0]);
                acc[r][1] = _mm256_fmadd_ps(xv, w[1], acc[r][1]);
            }
        }
        const int64_t gi = g0 / a.group;
#pragma GCC unroll 8
        for (int r = 0; r < MR; ++r) {
            float* out = tile + r * kPanel + 16 * h;
#pragma GCC unroll 2
            for (int j = 0; j < 2; ++j) {
                __m256 t = _mm256_fmadd_ps(acc[r][j], _mm256_loadu_ps(sc + gi * kPanel + 8 * j), _mm256_load_ps(out + 8 * j));
                if constexpr (MIN)
                    t = _mm256_fmadd_ps(_mm256_broadcast_ss(xsum + r * groups + gi), _mm256_loadu_ps(mn + gi * kPanel + 8 * j), t);
                _mm256_store_ps(out + 8 * j, t);
            }
        }
    }
}

// Panel p's k-rows [k0, k0 + kc) as fp32 values * scale + min, w[kc][32].
template <int BITS, bool MIN>
void widen_block(const QuantLinearArgs& a, int64_t p, int64_t k0, int64_t kc, float* w) {
    constexpr int64_t kRow = BITS == 8 ? kPanel : 16;
    const int64_t groups = a.K / a.group;
    const uint8_t* q = a.q + p * a.K * kRow;
    const float* sc = a.scales + p * groups * kPanel;
    const float* mn = MIN ? a.mins + p * groups * kPanel : nullptr;
    for (int64_t k = k0; k < k0 + kc; ++k) {
        const int64_t gi = k / a.group;
        __m256 v[4];
        load_q<BITS>(q, k, v);
#pragma GCC unroll 4
        for (int j = 0; j < 4; ++j) {
            const __m256 s = _mm256_loadu_ps(sc + gi * kPanel + 8 * j);
            const __m256 r = MIN ? _mm256_fmadd_ps(v[j], s, _mm256_loadu_ps(mn + gi * kPanel + 8 * j)) : _mm256_mul_ps(v[j], s);
            _mm256_store_ps(w + (k - k0) * kPanel + 8 * j, r);
        }
    }
}

// tile[MR][32] = MR rows of x (already at the block's k0) times a widened block w[kc][32].
template <int MR>
__attribute__((noinline)) void wmicro(const float* x, int64_t ldx, const float* w, int64_t kc, float* tile) {
    constexpr int S = MR == 1 ? 2 : 1;  // one row alone: two accumulator sets to hide the FMA latency
    __m256 acc[S][MR][4];
#pragma GCC unroll 2
    for (int s = 0; s < S; ++s)
#pragma GCC unroll 2
        for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
            for (int j = 0; j < 4; ++j) acc[s][r][j] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + S <= kc; k += S) {
#pragma GCC unroll 2
        for (int s = 0; s < S; ++s) {
            __m256 wv[4];
#pragma GCC unroll 4
            for (int j = 0; j < 4; ++j) wv[j] = _mm256_load_ps(w + (k + s) * kPanel + 8 * j);
#pragma GCC unroll 2
            for (int r = 0; r < MR; ++r) {
                const __m256 xv = _mm256_broadcast_ss(x + r * ldx + k + s);
#pragma GCC unroll 4
                for (int j = 0; j < 4; ++j) acc[s][r][j] = _mm256_fmadd_ps(xv, wv[j], acc[s][r][j]);
            }
        }
    }
    for (; k < kc; ++k) {
#pragma GCC unroll 2
        for (int r = 0; r < MR; ++r) {
            const __m256 xv = _mm256_broadcast_ss(x + r * ldx + k);
#pragma GCC unroll 4
            for (int j = 0; j < 4; ++j) acc[0][r][j] = _mm256_fmadd_ps(xv, _mm256_load_ps(w + k * kPanel + 8 * j), acc[0][r][j]);
        }
    }
#pragma GCC unroll 2
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
        for (int j = 0; j < 4; ++j) {
            __m256 sum = acc[0][r][j];
#pragma GCC unroll 2
            for (int s = 1; s < S; ++s) sum = _mm256_add_ps(sum, acc[s][r][j]);
            _mm256_store_ps(tile + r * kPanel + 8 * j, sum);
        }
}

// wmicro for kHR rows and one half (16 columns) of the block: each loaded weight serves kHR rows.
__attribute__((noinline)) void wmicro_half(const float* x, int64_t ldx, const float* w, int64_t kc, int h, float* tile) {
    static_assert(kHR == 6, "tile6x16 is 6 rows");
    tile6x16(x, ldx, kc, tile + 16 * h, [&](int64_t k, __m256& w0, __m256& w1) {
        w0 = _mm256_load_ps(w + k * kPanel + 16 * h);
        w1 = _mm256_load_ps(w + k * kPanel + 16 * h + 8);
    });
}

// qpanel_rows for many rows: each K block of the panel widened once, then multiplied by every row, in
// 6-row half-panel tiles while 6 rows remain (each loaded weight serves 6 rows), then 2 or 1 rows.
template <int BITS, bool MIN>
void qpanel_rows_widened(const QuantLinearArgs& a, int64_t p, int64_t m0, int64_t m1, float* c, int64_t ldc,
                         int nc, const float* bias) {
    thread_local std::vector<float> block;  // every element read is written by widen_block first
    float* w = grow_only(block, static_cast<size_t>(kKW * kPanel + 8));
    w = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(w) + 31) & ~uintptr_t{31});
    for (int64_t k0 = 0; k0 < a.K; k0 += kKW) {
        const int64_t kc = std::min(kKW, a.K - k0);
        widen_block<BITS, MIN>(a, p, k0, kc, w);
        for (int64_t m = m0; m < m1;) {
            const bool half = m1 - m >= kHR;
            const int mr = half ? kHR : static_cast<int>(std::min<int64_t>(kMR, m1 - m));
            alignas(32) float tile[kHR * kPanel];
            if (half) {
                wmicro_half(a.x + m * a.ldx + k0, a.ldx, w, kc, 0, tile);
                wmicro_half(a.x + m * a.ldx + k0, a.ldx, w, kc, 1, tile);
            } else if (mr == 2) {
                wmicro<2>(a.x + m * a.ldx + k0, a.ldx, w, kc, tile);
            } else {
                wmicro<1>(a.x + m * a.ldx + k0, a.ldx, w, kc, tile);
            }
            add_tile_rows(tile, mr, c + (m - m0) * ldc, ldc, nc, bias, k0 == 0);
            m += mr;
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
    if (m1 - m0 >= widen_rows(BITS)) return qpanel_rows_widened<BITS, MIN>(a, p, m0, m1, c, ldc, nc, bias);
    for (int64_t k0 = 0; k0 < a.K; k0 += kc_full) {
        const int64_t kc = std::min(kc_full, a.K - k0);
        // The next K block of this panel, or the next panel's first, which follows in memory.
        const uint8_t* next = k0 + kc < a.K || p + 1 < a.panels ? a.q + (p * a.K + k0 + kc) * kRow : nullptr;
        for (int64_t m = m0; m < m1;) {
            const bool half = m1 - m >= kHR;
            const int mr = half ? kHR : static_cast<int>(std::min<int64_t>(kMR, m1 - m));
            alignas(32) float tile[kHR * kPanel] = {};
            const float* xs = MIN ? xsums + m * groups : nullptr;
            const uint8_t* pf = m == m0 ? next : nullptr;
            if (half) {
                qmicro_half<kHR, BITS, MIN>(a.x + m * a.ldx + k0, a.ldx, xs, a, p, k0, kc, 0, tile, pf);
                qmicro_half<kHR, BITS, MIN>(a.x + m * a.ldx + k0, a.ldx, xs, a, p, k0, kc, 1, tile, nullptr);
            } else if (mr == 2) {
                qmicro<2, BITS, MIN>(a.x + m * a.ldx + k0, a.ldx, xs, a, p, k0, kc, tile, pf);
            } else {
                qmicro<1, BITS, MIN>(a.x + m * a.ldx + k0, a.ldx, xs, a, p, k0, kc, tile, pf);
            }
            add_tile_rows(tile, mr, c + (m - m0) * ldc, ldc, nc, bias, k0 == 0);
            m += mr;
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


// -- 4-bit weights x int8 activations ("q4v", kernels/quant.py to_vnni) --------------------------
// AVX2 has no vpdpbusd; vpmaddubsw multiplies unsigned weight bytes by signed activation bytes and
// adds pairs into 16 bits, vpmaddwd by ones adds those pairs into 32: four multiply-adds per lane in
// two instructions. With values 0..15 and activations within +-127 a pair is at most 3810, so the
// 16-bit sums never saturate. Against the fp32 widening of qmicro a k-quad of 32 columns costs 4
// masks or shifts and 8 multiplies per row instead of 16 conversions and 16 FMAs.
// Per k-quad 64 bytes: bytes 0..31 hold columns 0..7 (low nibbles) and 16..23 (high), bytes 32..63
// columns 8..15 and 24..31; accumulator j holds columns 8j..8j+7.
template <int MR, bool MIN>
__attribute__((noinline)) void dmicro(const QuantLinearArgs& a, int64_t p, int64_t m, int64_t k0, int64_t kc,
                                      float* tile) {
    const int64_t groups = a.K / a.group;
    const uint8_t* q = a.q + p * a.K * 16;  // [K/4][64]
    const float* sc = a.scales + p * groups * kPanel;
    const float* mn = MIN ? a.mins + p * groups * kPanel : nullptr;
    const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    for (int64_t g0 = k0; g0 < k0 + kc; g0 += a.group) {
        const int64_t gi = g0 / a.group;
        __m256i iacc[MR][4];
#pragma GCC unroll 4
        for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
            for (int j = 0; j < 4; ++j) iacc[r][j] = _mm256_setzero_si256();
        for (int64_t k = g0; k < g0 + a.group; k += 4) {
            _mm_prefetch(reinterpret_cast<const char*>(q + k * 16 + 1024), _MM_HINT_T0);
            const __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + k * 16));
            const __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + k * 16 + 32));
            const __m256i w[4] = {_mm256_and_si256(v0, low), _mm256_and_si256(v1, low),
                                  _mm256_and_si256(_mm256_srli_epi16(v0, 4), low),
                                  _mm256_and_si256(_mm256_srli_epi16(v1, 4), low)};
#pragma GCC unroll 4
            for (int r = 0; r < MR; ++r) {
                int32_t four;
                __builtin_memcpy(&four, a.xq + (m + r) * a.K + k, 4);
                const __m256i xv = _mm256_set1_epi32(four);
#pragma GCC unroll 4
                for (int j = 0; j < 4; ++j)
                    iacc[r][j] = _mm256_add_epi32(iacc[r][j], _mm256_madd_epi16(_mm256_maddubs_epi16(w[j], xv), ones));
            }
        }
#pragma GCC unroll 4
        for (int r = 0; r < MR; ++r) {
            const int64_t xi = (m + r) * groups + gi;
            const __m256 xs = _mm256_set1_ps(a.xscale[xi]);
            const __m256 xsum = _mm256_set1_ps(a.xscale[xi] * static_cast<float>(a.xsum[xi]));
            float* out = tile + r * kPanel;
#pragma GCC unroll 4
            for (int j = 0; j < 4; ++j) {
                __m256 t = _mm256_fmadd_ps(_mm256_cvtepi32_ps(iacc[r][j]),
                                           _mm256_mul_ps(_mm256_loadu_ps(sc + gi * kPanel + 8 * j), xs),
                                           _mm256_load_ps(out + 8 * j));
                if constexpr (MIN) t = _mm256_fmadd_ps(_mm256_loadu_ps(mn + gi * kPanel + 8 * j), xsum, t);
                _mm256_store_ps(out + 8 * j, t);
            }
        }
    }
}

// 8-bit weights x int8 activations ("q8v": [K/4][32][4] bytes, value + 128, no mins). value + 128
// times an activation would saturate vpmaddubsw's pair sums, so the weight's sign moves to the
// activation: |w| * (x signed as w) is at most 128 * 127 per product, 32512 per pair. A k-quad of
// 32 columns then costs 2 shared instructions per 8 columns (back to signed, absolute value) and
// 4 per row (sign, multiply, widen, add).
template <int MR>
__attribute__((noinline)) void emicro(const QuantLinearArgs& a, int64_t p, int64_t m, float* tile) {
    const int64_t groups = a.K / a.group;
    const uint8_t* q = a.q + p * a.K * kPanel;  // [K/4][32][4]
    const float* sc = a.scales + p * groups * kPanel;
    const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80)), ones = _mm256_set1_epi16(1);
    for (int64_t g0 = 0; g0 < a.K; g0 += a.group) {
        const int64_t gi = g0 / a.group;
        __m256i iacc[MR][4];
#pragma GCC unroll 4
        for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
            for (int j = 0; j < 4; ++j) iacc[r][j] = _mm256_setzero_si256();
        for (int64_t k = g0; k < g0 + a.group; k += 4) {
            const uint8_t* wk = q + k * kPanel;  // (k / 4) * 32 * 4
            _mm_prefetch(reinterpret_cast<const char*>(wk + 2048), _MM_HINT_T0);
            _mm_prefetch(reinterpret_cast<const char*>(wk + 2048 + 64), _MM_HINT_T0);
            __m256i xv[MR];
#pragma GCC unroll 4
            for (int r = 0; r < MR; ++r) {
                int32_t four;
                __builtin_memcpy(&four, a.xq + (m + r) * a.K + k, 4);
                xv[r] = _mm256_set1_epi32(four);
            }
#pragma GCC unroll 4
            for (int j = 0; j < 4; ++j) {
                const __m256i w = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wk + 32 * j)), flip);
                const __m256i aw = _mm256_abs_epi8(w);
#pragma GCC unroll 4
                for (int r = 0; r < MR; ++r)
                    iacc[r][j] = _mm256_add_epi32(
                        iacc[r][j], _mm256_madd_epi16(_mm256_maddubs_epi16(aw, _mm256_sign_epi8(xv[r], w)), ones));
            }
        }
#pragma GCC unroll 4
        for (int r = 0; r < MR; ++r) {
            const __m256 xs = _mm256_set1_ps(a.xscale[(m + r) * groups + gi]);
            float* out = tile + r * kPanel;
#pragma GCC unroll 4
            for (int j = 0; j < 4; ++j)
                _mm256_store_ps(out + 8 * j, _mm256_fmadd_ps(_mm256_cvtepi32_ps(iacc[r][j]),
                                                             _mm256_mul_ps(_mm256_loadu_ps(sc + gi * kPanel + 8 * j), xs),
                                                             _mm256_load_ps(out + 8 * j)));
        }
    }
}

void epanel_rows(const QuantLinearArgs& a, const float*, int64_t p, int64_t m0, int64_t m1, float* c, int64_t ldc,
                 int64_t ncols, bool with_adds) {
    const int nc = static_cast<int>(std::min<int64_t>(ncols, kPanel));
    const float* bias = with_adds && a.bias ? a.bias + p * kPanel : nullptr;
    for (int64_t m = m0; m < m1; m += 2) {
        const int mr = static_cast<int>(std::min<int64_t>(2, m1 - m));
        alignas(32) float tile[2 * kPanel] = {};
        if (mr == 2) emicro<2>(a, p, m, tile);
        else emicro<1>(a, p, m, tile);
        add_tile_rows(tile, mr, c + (m - m0) * ldc, ldc, nc, bias, true);
    }
}

constexpr int kDR = 2;  // rows per q4v tile

template <bool MIN>
void dpanel_rows(const QuantLinearArgs& a, const float*, int64_t p, int64_t m0, int64_t m1, float* c, int64_t ldc,
                 int64_t ncols, bool with_adds) {
    const int nc = static_cast<int>(std::min<int64_t>(ncols, kPanel));
    const float* bias = with_adds && a.bias ? a.bias + p * kPanel : nullptr;
    for (int64_t m = m0; m < m1; m += kDR) {
        const int mr = static_cast<int>(std::min<int64_t>(kDR, m1 - m));
        alignas(32) float tile[kDR * kPanel] = {};
        if (mr == 2) dmicro<2, MIN>(a, p, m, 0, a.K, tile);
        else dmicro<1, MIN>(a, p, m, 0, a.K, tile);
        add_tile_rows(tile, mr, c + (m - m0) * ldc, ldc, nc, bias, true);
    }
}

// Per row and group: scale = max|x| / 127, xq = round(x / scale) (to nearest even, as the Python
// reference kernels/quant.py quantize_activations rounds), xsum = sum of xq.
void quantize_rows(const QuantLinearArgs& a, int8_t* xq, float* xscale, int32_t* xsum) {
    const int64_t groups = a.K / a.group;
    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    for (int64_t m = 0; m < a.M; ++m) {
        const float* x = a.x + m * a.ldx;
        for (int64_t g = 0; g < groups; ++g) {
            const int64_t k0 = g * a.group, k1 = k0 + a.group;
            __m256 vmax = _mm256_setzero_ps();
            for (int64_t k = k0; k < k1; k += 8) vmax = _mm256_max_ps(vmax, _mm256_and_ps(_mm256_loadu_ps(x + k), abs_mask));
            __m128 h = _mm_max_ps(_mm256_castps256_ps128(vmax), _mm256_extractf128_ps(vmax, 1));
            h = _mm_max_ps(h, _mm_movehl_ps(h, h));
            const float amax = _mm_cvtss_f32(_mm_max_ss(h, _mm_shuffle_ps(h, h, 1)));
            const float scale = amax / 127.0f, inv = amax > 0.0f ? 1.0f / scale : 0.0f;  // as the reference: 1 / (amax / 127)
            const __m256 vinv = _mm256_set1_ps(inv);
            __m256i vsum = _mm256_setzero_si256();
            for (int64_t k = k0; k < k1; k += 8) {
                const __m256i v = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + k), vinv));
                vsum = _mm256_add_epi32(vsum, v);
                const __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
                _mm_storel_epi64(reinterpret_cast<__m128i*>(xq + m * a.K + k), _mm_packs_epi16(w, w));
            }
            alignas(32) int32_t s[8];
            _mm256_store_si256(reinterpret_cast<__m256i*>(s), vsum);
            xscale[m * groups + g] = scale;
            xsum[m * groups + g] = ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
        }
    }
}

using PanelFn = void (*)(const QuantLinearArgs&, const float*, int64_t, int64_t, int64_t, float*, int64_t, int64_t,
                         bool);

}  // namespace

void linear_quant(const QuantLinearArgs& a_in) {
    if (a_in.M <= 0 || a_in.panels <= 0) return;
    QuantLinearArgs a = a_in;
    thread_local std::vector<float> sums;  // grow_only: group_sums writes every element it is read at
    const float* xsums = nullptr;
    PanelFn panel = a.bits == 4 ? (a.mins ? &qpanel_rows<4, true> : &qpanel_rows<4, false>)
                                : (a.mins ? &qpanel_rows<8, true> : &qpanel_rows<8, false>);
    if (a.vnni) {  // "q4v" or "q8v"
        thread_local std::vector<int8_t> xq;  // grow_only: quantize_rows writes every element
        thread_local std::vector<float> xscale;
        thread_local std::vector<int32_t> xsum;
        const auto groups = static_cast<size_t>(a.M * (a.K / a.group));
        a.xq = grow_only(xq, static_cast<size_t>(a.M * a.K));
        a.xscale = grow_only(xscale, groups);
        a.xsum = grow_only(xsum, groups);
        quantize_rows(a, const_cast<int8_t*>(a.xq), const_cast<float*>(a.xscale), const_cast<int32_t*>(a.xsum));
        panel = a.bits == 8 ? &epanel_rows : a.mins ? &dpanel_rows<true> : &dpanel_rows<false>;
    } else if (a.mins) {
        float* s = grow_only(sums, static_cast<size_t>(a.M * (a.K / a.group)));
        group_sums(a, s);
        xsums = s;
    }
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
