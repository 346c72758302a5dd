// y = x W^T with bf16 weights and fp32 compute, for CPUs with AVX2 + FMA but no AVX-512.
//
// The same packed layout and the same threading as gemm.cpp, with 8-lane vectors: one 64-byte
// panel line is two 32-byte loads, and widening each gives four 8-column groups (the pair
// interleave puts columns 0-7 and 16-23 in the first load, 8-15 and 24-31 in the second). A micro
// tile is 2 rows x 32 columns: 8 accumulators, the widened weights, the broadcasts and the widening
// mask fit the 16 registers with room to spare. A 3-row tile needs all 16 and one more: GCC then
// kept one accumulator on the stack, and its chain of FMA, store and reload set the pace of the
// whole loop. On a 2-core AMD EPYC without AVX-512 (Zen 3), alternating builds, the 2-row tile ran
// 1.6-2.1x faster from 16 rows (about 80% of the FMA peak on one core) and 1.25-1.4x at 4.
// From 16 rows in a task, 6-row tiles of half a panel (micro_half) take the rows while 6 remain: each
// widened weight then serves 6 rows, not 2. Same machine, alternating builds: 1.06-1.17x from 16 rows,
// bit-identical results (each output still sums k in order in one accumulator).
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <array>
#include <utility>
#include <vector>

#include "kernels.h"
#include "panel_tasks.h"
#include "vec_avx2.h"

namespace lmserve {
namespace {

constexpr int kMR = 2;         // rows per micro-tile
constexpr int64_t kMC = 128;   // rows per task, a multiple of kMR
constexpr int64_t kKC = 512;   // K block: a panel slice of kKC x 64 B stays in L1 across row tiles

inline __m256 even8(__m256i v) { return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)); }
inline __m256 odd8(__m256i v) {
    return _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
}

struct Tile {
    float* c;            // output tile (row stride ldc)
    int64_t ldc;
    int ncols;           // valid columns of the panel (32 except in the last one)
    const float* bias;   // added in the first K block, already offset to the panel's first column
    const uint16_t* pf;  // the next K block's weights, prefetched a line per step (see gemm.cpp)
};

// GCC 12 stores every accumulator of the array to the stack at every k (besides keeping it in a
// register) unless the loops over the array are unrolled before its scalar replacement: hence the
// unroll pragmas, here and in quant_gemm_avx2.cpp (checked in the assembly).
template <int MR>
inline void micro(const float* x, int64_t ldx, const uint16_t* w, int64_t kc, const Tile& t, bool first) {
    // One row alone has only 4 independent FMA chains: split k over two sets to hide latency.
    constexpr int S = MR == 1 ? 2 : 1;
    __m256 acc[S][MR][4];
#pragma GCC unroll 8
    for (int s = 0; s < S; ++s)
#pragma GCC unroll 8
        for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
            for (int g = 0; g < 4; ++g) acc[s][r][g] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k < kc; k += S) {
        const int sets = k + S <= kc ? S : 1;
#pragma GCC unroll 2
        for (int s = 0; s < S; ++s) {
            if (s >= sets) break;
            _mm_prefetch(reinterpret_cast<const char*>(t.pf + (k + s) * kPanel), _MM_HINT_T0);
            const __m256i* line = reinterpret_cast<const __m256i*>(w + (k + s) * kPanel);
#pragma GCC unroll 2
            for (int h = 0; h < 2; ++h) {
                const __m256i wv = _mm256_loadu_si256(line + h);
                const __m256 we = even8(wv), wo = odd8(wv);
#pragma GCC unroll 8
                for (int r = 0; r < MR; ++r) {
                    const __m256 xv = _mm256_broadcast_ss(x + r * ldx + k + s);
                    acc[s][r][h] = _mm256_fmadd_ps(xv, we, acc[s][r][h]);
                    acc[s][r][2 + h] = _mm256_fmadd_ps(xv, wo, acc[s][r][2 + h]);
                }
            }
        }
    }
#pragma GCC unroll 8
    for (int s = 1; s < S; ++s)
#pragma GCC unroll 8
        for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
            for (int g = 0; g < 4; ++g) acc[0][r][g] = _mm256_add_ps(acc[0][r][g], acc[s][r][g]);
    // Group g holds columns 8g..8g+7: evens of the two loads are 0-7 and 8-15, odds 16-23 and 24-31.
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
        float* cr = t.c + r * t.ldc;
        alignas(32) float buf[kPanel];
#pragma GCC unroll 4
        for (int g = 0; g < 4; ++g) _mm256_store_ps(buf + 8 * g, acc[0][r][g]);
        const float* add = first ? t.bias : cr;
        if (t.ncols == kPanel) {
#pragma GCC unroll 4
            for (int g = 0; g < 4; ++g) {
                __m256 v = _mm256_load_ps(buf + 8 * g);
                if (add) v = _mm256_add_ps(v, _mm256_loadu_ps(add + 8 * g));
                _mm256_storeu_ps(cr + 8 * g, v);
            }
        } else {
            for (int j = 0; j < t.ncols; ++j) cr[j] = buf[j] + (add ? add[j] : 0.0f);
        }
    }
}

constexpr int kHR = 6;  // rows per half-panel tile
constexpr int64_t kHalfFrom = 16;  // rows in a task from which they run (at 12 they lost up to 8%)

// kHR rows x 16 columns (half h of the panel): the two loads of a panel line hold columns 0-7 and
// 8-15 as their even halves, 16-23 and 24-31 as their odd ones, so a half widens two vectors per k
// and each serves kHR rows (tile6x16).
__attribute__((noinline)) void micro_half(const float* x, int64_t ldx, const uint16_t* w, int64_t kc, int h,
                                          float* tile) {
    static_assert(kHR == 6, "tile6x16 is 6 rows");
    tile6x16(x, ldx, kc, tile + 16 * h, [&](int64_t k, __m256& w0, __m256& w1) {
        const __m256i* line = reinterpret_cast<const __m256i*>(w + k * kPanel);
        const __m256i l0 = _mm256_loadu_si256(line), l1 = _mm256_loadu_si256(line + 1);
        w0 = h == 0 ? even8(l0) : odd8(l0);
        w1 = h == 0 ? even8(l1) : odd8(l1);
    });
}

using MicroFn = void (*)(const float*, int64_t, const uint16_t*, int64_t, const Tile&, bool);
constexpr std::array<MicroFn, kMR> kMicro = {&micro<1>, &micro<2>};

inline void panel_rows(const LinearArgs& a, int64_t p, int64_t m0, int64_t m1, float* c, int64_t ldc,
                       int64_t ncols, bool with_adds) {
    const uint16_t* wp = a.w + p * a.K * kPanel;
    const int64_t nkb = (a.K + kKC - 1) / kKC;
    const int64_t kc_full = (a.K + nkb - 1) / nkb;
    Tile t{c, ldc, static_cast<int>(std::min<int64_t>(ncols, kPanel)),
           with_adds && a.bias ? a.bias + p * kPanel : nullptr, nullptr};
    for (int64_t k0 = 0; k0 < a.K; k0 += kc_full) {
        const int64_t kc = std::min(kc_full, a.K - k0);
        for (int64_t m = m0; m < m1;) {
            if (m1 - m0 >= kHalfFrom && m1 - m >= kHR) {  // 6-row half tiles, added to c as the 2-row tile adds
                alignas(32) float tile[kHR * kPanel];
                micro_half(a.x + m * a.ldx + k0, a.ldx, wp + k0 * kPanel, kc, 0, tile);
                micro_half(a.x + m * a.ldx + k0, a.ldx, wp + k0 * kPanel, kc, 1, tile);
                add_tile_rows(tile, kHR, c + (m - m0) * ldc, ldc, t.ncols, t.bias, k0 == 0);
                m += kHR;
                continue;
            }
            const int mr = static_cast<int>(std::min<int64_t>(kMR, m1 - m));
            Tile tm = t;
            tm.c = c + (m - m0) * ldc;
            tm.pf = wp + (k0 + kc) * kPanel;  // the next K block, which follows in memory
            kMicro[mr - 1](a.x + m * a.ldx + k0, a.ldx, wp + k0 * kPanel, kc, tm, k0 == 0);
            m += mr;
        }
    }
}

void run_task(const LinearArgs& a, int64_t m0, int64_t m1, int64_t u0, int64_t u1) {
    if (a.epilogue == Epilogue::kNone) {
        for (int64_t p = u0; p < u1; ++p)
            panel_rows(a, p, m0, m1, a.y + m0 * a.ldy + p * kPanel, a.ldy, a.N - p * kPanel, true);
        return;
    }
    // Gate and up panels alternate; compute a pair into scratch, then write silu(gate) * up.
    thread_local std::vector<float> scratch;
    // No clearing: every row tile stores (not adds) its first K block.
    float* s = grow_only(scratch, static_cast<size_t>((m1 - m0) * 2 * kPanel));
    for (int64_t u = u0; u < u1; ++u) {
        panel_rows(a, 2 * u, m0, m1, s, 2 * kPanel, kPanel, false);
        panel_rows(a, 2 * u + 1, m0, m1, s + kPanel, 2 * kPanel, kPanel, false);
        store_silu_mul_rows8(s, m1 - m0, a.y + m0 * a.ldy + u * kPanel, a.ldy,
                             static_cast<int>(std::min<int64_t>(kPanel, a.N - u * kPanel)));
    }
}

}  // namespace

void linear_bf16(const LinearArgs& a) {
    if (a.M <= 0 || a.panels <= 0) return;
    const int64_t unit = a.epilogue == Epilogue::kSiluMul ? 2 : 1;
    const int64_t units = a.panels / unit;
    for_each_panel_task<kMR, kMC>(a.M, units, a.panels * kPanel * a.K, a.nthreads,
                                  [&](int64_t m0, int64_t m1, int64_t u0, int64_t u1) {
        run_task(a, m0, m1, u0, u1);
    });
}

}  // namespace lmserve
