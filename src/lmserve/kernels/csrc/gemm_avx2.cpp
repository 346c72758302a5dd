// y = x W^T with bf16 weights and fp32 compute, for CPUs with AVX2 + FMA but no AVX-512.
//
// The same packed layout and the same threading as gemm.cpp, with 8-lane vectors: one 64-byte
// panel line is two 32-byte loads, and widening each gives four 8-column groups (the pair
// interleave puts columns 0-7 and 16-23 in the first load, 8-15 and 24-31 in the second). A micro
// tile is 3 rows x 32 columns: 12 accumulators + 2 widened weights + 1 broadcast of 16 registers.
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <array>
#include <utility>
#include <vector>

#include "kernels.h"
#include "panel_tasks.h"

namespace lmserve {
namespace {

constexpr int kMR = 3;         // rows per micro-tile
constexpr int64_t kMC = 192;   // rows per task, a multiple of kMR
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

template <int MR>
inline void micro(const float* x, int64_t ldx, const uint16_t* w, int64_t kc, const Tile& t, bool first) {
    // One row alone has only 4 independent FMA chains: split k over two sets to hide latency.
    constexpr int S = MR == 1 ? 2 : 1;
    __m256 acc[S][MR][4];
    for (int s = 0; s < S; ++s)
        for (int r = 0; r < MR; ++r)
            for (int g = 0; g < 4; ++g) acc[s][r][g] = _mm256_setzero_ps();
    auto step = [&](int s, int64_t k) {
        _mm_prefetch(reinterpret_cast<const char*>(t.pf + k * kPanel), _MM_HINT_T0);
        const __m256i* line = reinterpret_cast<const __m256i*>(w + k * kPanel);
        for (int h = 0; h < 2; ++h) {
            const __m256i wv = _mm256_loadu_si256(line + h);
            const __m256 we = even8(wv), wo = odd8(wv);
            for (int r = 0; r < MR; ++r) {
                const __m256 xv = _mm256_broadcast_ss(x + r * ldx + k);
                acc[s][r][h] = _mm256_fmadd_ps(xv, we, acc[s][r][h]);
                acc[s][r][2 + h] = _mm256_fmadd_ps(xv, wo, acc[s][r][2 + h]);
            }
        }
    };
    int64_t k = 0;
    for (; k + S <= kc; k += S)
        for (int s = 0; s < S; ++s) step(s, k + s);
    for (; k < kc; ++k) step(0, k);
    for (int s = 1; s < S; ++s)
        for (int r = 0; r < MR; ++r)
            for (int g = 0; g < 4; ++g) acc[0][r][g] = _mm256_add_ps(acc[0][r][g], acc[s][r][g]);
    // Group g holds columns 8g..8g+7: evens of the two loads are 0-7 and 8-15, odds 16-23 and 24-31.
    for (int r = 0; r < MR; ++r) {
        float* cr = t.c + r * t.ldc;
        alignas(32) float buf[kPanel];
        for (int g = 0; g < 4; ++g) _mm256_store_ps(buf + 8 * g, acc[0][r][g]);
        const float* add = first ? t.bias : cr;
        if (t.ncols == kPanel) {
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

using MicroFn = void (*)(const float*, int64_t, const uint16_t*, int64_t, const Tile&, bool);
constexpr std::array<MicroFn, kMR> kMicro = {&micro<1>, &micro<2>, &micro<3>};

inline void panel_rows(const LinearArgs& a, int64_t p, int64_t m0, int64_t m1, float* c, int64_t ldc,
                       int64_t ncols, bool with_adds) {
    const uint16_t* wp = a.w + p * a.K * kPanel;
    const int64_t nkb = (a.K + kKC - 1) / kKC;
    const int64_t kc_full = (a.K + nkb - 1) / nkb;
    Tile t{c, ldc, static_cast<int>(std::min<int64_t>(ncols, kPanel)),
           with_adds && a.bias ? a.bias + p * kPanel : nullptr, nullptr};
    for (int64_t k0 = 0; k0 < a.K; k0 += kc_full) {
        const int64_t kc = std::min(kc_full, a.K - k0);
        for (int64_t m = m0; m < m1; m += kMR) {
            const int mr = static_cast<int>(std::min<int64_t>(kMR, m1 - m));
            Tile tm = t;
            tm.c = c + (m - m0) * ldc;
            tm.pf = wp + (k0 + kc) * kPanel;  // the next K block, which follows in memory
            kMicro[mr - 1](a.x + m * a.ldx + k0, a.ldx, wp + k0 * kPanel, kc, tm, k0 == 0);
        }
    }
}

// 2^x for x in [-126, 126] (clamped outside): 2^f by the same polynomial as vec.h, 2^n by building
// the exponent bits (AVX2 has no vscalefps).
inline __m256 exp2_8(__m256 x) {
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

inline __m256 silu_mul8(__m256 g, __m256 u) {
    const __m256 e = exp2_8(_mm256_mul_ps(g, _mm256_set1_ps(-1.4426950408889634f)));
    return _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0f), e)), u);
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
        const int ncols = static_cast<int>(std::min<int64_t>(kPanel, a.N - u * kPanel));
        for (int64_t m = m0; m < m1; ++m) {
            const float* g = s + (m - m0) * 2 * kPanel;
            float* y = a.y + m * a.ldy + u * kPanel;
            alignas(32) float out[kPanel];
            for (int j = 0; j < kPanel; j += 8)
                _mm256_store_ps(out + j, silu_mul8(_mm256_loadu_ps(g + j), _mm256_loadu_ps(g + kPanel + j)));
            std::copy(out, out + ncols, y);
        }
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
