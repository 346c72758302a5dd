// y = x W^T with bf16 weights, in two micro-kernels over the same tiling and thread split.
//
// fp32 FMA (`linear_bf16`): keeps a 12-row x 32-column tile in 24 zmm accumulators, loads one
// 64-byte line of packed weights per k, widens it with one shift and one AND, and broadcasts fp32
// activations. Exact in the activations; runs everywhere AVX-512F does.
//
// bf16 dot product (`linear_bf16_dot`, CPUs with AVX512_BF16): activations are rounded to bf16 once
// per call, and each `vdpbf16ps` multiplies a pair of features into 16 fp32 lanes, twice the work of
// an FMA. On some CPUs it issues at the FMA rate (twice the throughput), on others at half of it (no
// gain, and the activations lose precision): kernels/choice.py times both on the machine. Its weight
// layout pairs adjacent features instead (see kernels.h).
//
// Threads split the output columns first (each thread streams its own part of the weights, which is
// what bounds decode), then rows when there are few columns.
#include <omp.h>

#include <algorithm>
#include <array>
#include <utility>
#include <vector>

#include "kernels.h"
#include "panel_tasks.h"
#include "vec.h"

namespace lmserve {
namespace {

constexpr int kMR = 12;        // rows per micro-tile: 12 x 2 accumulators + 2 weights + broadcast
constexpr int64_t kMC = 192;   // rows per task, a multiple of kMR
// K block (features). The row tiles of a task reuse a panel slice of the block from L1 or L2; the
// fewer blocks, the fewer times each tile stores its partial sums and reads them back. Blocks of
// 1024 instead of 512 made 16-200 rows 1.5-4.5% faster on a 2-core AMD EPYC (both kernels; L2 feeds
// a 64 KiB slice fast enough), but a single row tile (decode) lost up to 16%: it has nothing to
// reuse, and a shorter block starts the prefetch of the next one sooner. So one tile keeps 512.
constexpr int64_t kKC = 1024;
constexpr int64_t kKC1 = 512;

// Small MR splits the step loop over S independent accumulator sets so the latency of the
// multiply-add (4 cycles for an FMA, up to 6 for vdpbf16ps, on 2 ports) stays hidden.
template <int MR>
constexpr int kSets = MR >= 4 ? 1 : (MR == 1 ? 4 : 2);

// fp32 FMA: one step is one feature; x is fp32 [MR][ldx].
template <int MR>
void micro_fma(const void* xp, int64_t ldx, const uint16_t* w, int64_t kc, const Tile& t, bool first) {
    constexpr int S = kSets<MR>;
    const float* x = static_cast<const float*>(xp);
    __m512 acc[S][MR][2];
    for (int s = 0; s < S; ++s)
        for (int r = 0; r < MR; ++r) acc[s][r][0] = acc[s][r][1] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + S <= kc; k += S) {
        for (int s = 0; s < S; ++s) {
            if (t.pf) _mm_prefetch(reinterpret_cast<const char*>(t.pf + (k + s) * kPanel), _MM_HINT_T0);
            __m512i wv = _mm512_loadu_si512(w + (k + s) * kPanel);
            __m512 w0 = bf16_even(wv), w1 = bf16_odd(wv);
            for (int r = 0; r < MR; ++r) {
                __m512 xv = _mm512_set1_ps(x[r * ldx + k + s]);
                acc[s][r][0] = _mm512_fmadd_ps(xv, w0, acc[s][r][0]);
                acc[s][r][1] = _mm512_fmadd_ps(xv, w1, acc[s][r][1]);
            }
        }
    }
    for (; k < kc; ++k) {
        __m512i wv = _mm512_loadu_si512(w + k * kPanel);
        __m512 w0 = bf16_even(wv), w1 = bf16_odd(wv);
        for (int r = 0; r < MR; ++r) {
            __m512 xv = _mm512_set1_ps(x[r * ldx + k]);
            acc[0][r][0] = _mm512_fmadd_ps(xv, w0, acc[0][r][0]);
            acc[0][r][1] = _mm512_fmadd_ps(xv, w1, acc[0][r][1]);
        }
    }
    fold_sets(acc);
    store_tile<MR>(acc[0], t, first);
}

// bf16 dot product: one step is a pair of features; x is [MR][ldx] pairs of bf16 (one uint32 each)
// and a step of the panel is two lines, columns 0-15 then 16-31, each lane a (k, k+1) pair.
template <int MR>
LMSERVE_BF16_TARGET void micro_dot(const void* xp, int64_t ldx, const uint16_t* w, int64_t kc, const Tile& t,
                                   bool first) {
    constexpr int S = kSets<MR>;
    const uint32_t* x = static_cast<const uint32_t*>(xp);
    __m512 acc[S][MR][2];
    for (int s = 0; s < S; ++s)
        for (int r = 0; r < MR; ++r) acc[s][r][0] = acc[s][r][1] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + S <= kc; k += S) {
        for (int s = 0; s < S; ++s) {
            if (t.pf) {
                _mm_prefetch(reinterpret_cast<const char*>(t.pf + (k + s) * 2 * kPanel), _MM_HINT_T0);
                _mm_prefetch(reinterpret_cast<const char*>(t.pf + (k + s) * 2 * kPanel + kPanel), _MM_HINT_T0);
            }
            const __m512bh w0 = (__m512bh)_mm512_loadu_si512(w + (k + s) * 2 * kPanel);
            const __m512bh w1 = (__m512bh)_mm512_loadu_si512(w + (k + s) * 2 * kPanel + kPanel);
            for (int r = 0; r < MR; ++r) {
                const __m512bh xv = (__m512bh)_mm512_set1_epi32(static_cast<int>(x[r * ldx + k + s]));
                acc[s][r][0] = _mm512_dpbf16_ps(acc[s][r][0], xv, w0);
                acc[s][r][1] = _mm512_dpbf16_ps(acc[s][r][1], xv, w1);
            }
        }
    }
    for (; k < kc; ++k) {
        const __m512bh w0 = (__m512bh)_mm512_loadu_si512(w + k * 2 * kPanel);
        const __m512bh w1 = (__m512bh)_mm512_loadu_si512(w + k * 2 * kPanel + kPanel);
        for (int r = 0; r < MR; ++r) {
            const __m512bh xv = (__m512bh)_mm512_set1_epi32(static_cast<int>(x[r * ldx + k]));
            acc[0][r][0] = _mm512_dpbf16_ps(acc[0][r][0], xv, w0);
            acc[0][r][1] = _mm512_dpbf16_ps(acc[0][r][1], xv, w1);
        }
    }
    fold_sets(acc);
    store_tile<MR>(acc[0], t, first);
}

using MicroFn = void (*)(const void*, int64_t, const uint16_t*, int64_t, const Tile&, bool);
using MicroTable = std::array<MicroFn, kMR>;

template <int... R>
constexpr MicroTable fma_table(std::integer_sequence<int, R...>) { return {&micro_fma<R + 1>...}; }
template <int... R>
constexpr MicroTable dot_table(std::integer_sequence<int, R...>) { return {&micro_dot<R + 1>...}; }

// What differs between the two kernels: the activations they read and how many features one step
// of a panel (32 bf16 per feature) covers.
struct Kernel {
    MicroTable micro;
    const void* x;       // activations, rows of ldx elements of `xsize` bytes
    int64_t ldx;
    int64_t xsize;
    int64_t steps;       // steps per row of the panel: K (fma) or K/2 rounded up (dot)
    int64_t per_step;    // features per step: 1 or 2
};

const MicroTable kFma = fma_table(std::make_integer_sequence<int, kMR>{});
const MicroTable kDot = dot_table(std::make_integer_sequence<int, kMR>{});

// One panel (32 output columns) for rows [m0, m1): K blocks outer so the panel slice is reused
// from L1 by every row tile. Every row tile prefetches the next K block as it goes: at decode and
// mixed-step sizes (4-64 rows) the first tile of a block waited on memory and the others ran from
// L1 with no load in flight, so the weights streamed at a third to half of what the memory gives.
// With the next block on its way during the whole block, 16 rows took 8.5 instead of 13.9 ms (dot
// product) and 13.6 instead of 27.1 ms (FMA) per pass over 17 weights of 5632 x 2048 (400 MB, out of
// cache) on a 2-core AMD EPYC; from 128 rows on the gain shrinks to 5-15%, and one row (one tile,
// the hardware prefetcher's case) is unchanged.
inline void panel_rows(const LinearArgs& a, const Kernel& kn, int64_t p, int64_t m0, int64_t m1, float* c,
                       int64_t ldc, int64_t ncols, bool with_adds) {
    const uint16_t* wp = a.w + p * kn.steps * kn.per_step * kPanel;
    const int64_t kcmax = (m1 - m0 > kMR ? kKC : kKC1) / kn.per_step;
    const int64_t nkb = (kn.steps + kcmax - 1) / kcmax;
    const int64_t kc_full = (kn.steps + nkb - 1) / nkb;
    Tile t{c, ldc, tail_mask(static_cast<int>(ncols)), tail_mask(static_cast<int>(ncols) - 16),
           with_adds && a.bias ? a.bias + p * kPanel : nullptr};
    const char* x = static_cast<const char*>(kn.x);
    for (int64_t k0 = 0; k0 < kn.steps; k0 += kc_full) {
        const int64_t kc = std::min(kc_full, kn.steps - k0);
        for (int64_t m = m0; m < m1; m += kMR) {
            const int mr = static_cast<int>(std::min<int64_t>(kMR, m1 - m));
            Tile tm = t;
            tm.c = c + (m - m0) * ldc;
            tm.pf = wp + (k0 + kc) * kn.per_step * kPanel;  // the next K block, which follows in memory
            kn.micro[mr - 1](x + (m * kn.ldx + k0) * kn.xsize, kn.ldx, wp + k0 * kn.per_step * kPanel, kc, tm,
                             k0 == 0);
        }
    }
}

void run_task(const LinearArgs& a, const Kernel& kn, int64_t m0, int64_t m1, int64_t u0, int64_t u1) {
    if (a.epilogue == Epilogue::kNone) {
        for (int64_t p = u0; p < u1; ++p)
            panel_rows(a, kn, p, m0, m1, a.y + m0 * a.ldy + p * kPanel, a.ldy, a.N - p * kPanel, true);
        return;
    }
    // Gate and up panels alternate; compute a pair into scratch, then write silu(gate) * up.
    thread_local std::vector<float> scratch;
    // No clearing: every row tile stores (not adds) its first K block.
    float* s = grow_only(scratch, static_cast<size_t>((m1 - m0) * 2 * kPanel));
    for (int64_t u = u0; u < u1; ++u) {
        panel_rows(a, kn, 2 * u, m0, m1, s, 2 * kPanel, kPanel, false);
        panel_rows(a, kn, 2 * u + 1, m0, m1, s + kPanel, 2 * kPanel, kPanel, false);
        store_silu_mul_rows(s, m1 - m0, a.y + m0 * a.ldy + u * kPanel, a.ldy,
                            static_cast<int>(std::min<int64_t>(kPanel, a.N - u * kPanel)));
    }
}

void run(const LinearArgs& a, const Kernel& kn) {
    const int64_t unit = a.epilogue == Epilogue::kSiluMul ? 2 : 1;
    for_each_panel_task<kMR, kMC>(a.M, a.panels / unit, a.panels * kPanel * a.K, a.nthreads,
                                  [&](int64_t m0, int64_t m1, int64_t u0, int64_t u1) {
        run_task(a, kn, m0, m1, u0, u1);
    });
}

// Rows of x rounded to bf16 (nearest even) as pairs, the odd tail padded with zero.
LMSERVE_BF16_TARGET void round_rows(const LinearArgs& a, uint32_t* out, int64_t pairs, int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
        const float* x = a.x + r * a.ldx;
        uint32_t* o = out + r * pairs;
        for (int64_t k = 0; k < a.K; k += 32) {
            const int64_t left = a.K - k;
            const __m512 lo = _mm512_maskz_loadu_ps(tail_mask(static_cast<int>(std::min<int64_t>(left, 16))), x + k);
            const __m512 hi = _mm512_maskz_loadu_ps(tail_mask(static_cast<int>(std::min<int64_t>(left - 16, 16))),
                                                    x + k + 16);
            const __m512i v = (__m512i)_mm512_cvtne2ps_pbh(hi, lo);  // bf16 0-15 from lo, 16-31 from hi
            const int64_t n = std::min<int64_t>(16, pairs - k / 2);
            _mm512_mask_storeu_epi32(o + k / 2, tail_mask(static_cast<int>(n)), v);
        }
    }
}

}  // namespace

void linear_bf16(const LinearArgs& a) {
    if (a.M <= 0 || a.panels <= 0) return;
    run(a, Kernel{kFma, a.x, a.ldx, sizeof(float), a.K, 1});
}

void linear_bf16_dot(const LinearArgs& a) {
    if (a.M <= 0 || a.panels <= 0) return;
    const int64_t pairs = (a.K + 1) / 2;
    thread_local std::vector<uint32_t> buffer;
    uint32_t* xb = grow_only(buffer, static_cast<size_t>(a.M * pairs));  // round_rows writes every pair
    const int threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(a.nthreads, a.M / 16)));
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        const int64_t n = omp_get_num_threads(), i = omp_get_thread_num();
        round_rows(a, xb, pairs, a.M * i / n, a.M * (i + 1) / n);
    }
    run(a, Kernel{kDot, xb, pairs, sizeof(uint32_t), pairs, 2});
}

bool cpu_has_bf16_dot() { return __builtin_cpu_supports("avx512bf16"); }

}  // namespace lmserve
