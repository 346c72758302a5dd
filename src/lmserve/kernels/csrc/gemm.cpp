// y = x W^T with bf16 weights and fp32 compute.
//
// The micro-kernel keeps a 12-row x 32-column tile in 24 zmm accumulators, loads one 64-byte line
// of packed weights per k, widens it with one shift and one AND, and broadcasts activations. fp32
// FMA rather than vdpbf16ps because the latter runs at half the FMA rate on our CPUs and would need
// the activations rounded to bf16. Threads split the output columns first (each thread streams its
// own part of the weights, which is what bounds decode), then rows when there are few columns.
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
constexpr int64_t kKC = 512;   // K block: a panel slice of kKC x 64 B stays in L1 across row tiles

struct Tile {
    float* c;            // output tile (row stride ldc)
    int64_t ldc;
    __mmask16 m0, m1;    // valid columns of the two 16-lane halves
    const float* bias;   // added in the first K block, already offset to the panel's first column
};

// Accumulates MR rows of x[:, k0:k0+kc] against one panel slice into the tile. Small MR splits the
// k loop over S independent accumulator sets so the FMA latency (4 cycles, 2 ports) stays hidden.
template <int MR>
inline void micro(const float* x, int64_t ldx, const uint16_t* w, int64_t kc, const Tile& t, bool first) {
    constexpr int S = MR >= 4 ? 1 : (MR == 1 ? 4 : 2);
    __m512 acc[S][MR][2];
    for (int s = 0; s < S; ++s)
        for (int r = 0; r < MR; ++r) acc[s][r][0] = acc[s][r][1] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + S <= kc; k += S) {
        for (int s = 0; s < S; ++s) {
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
    for (int s = 1; s < S; ++s)
        for (int r = 0; r < MR; ++r) {
            acc[0][r][0] = _mm512_add_ps(acc[0][r][0], acc[s][r][0]);
            acc[0][r][1] = _mm512_add_ps(acc[0][r][1], acc[s][r][1]);
        }
    for (int r = 0; r < MR; ++r) {
        float* cr = t.c + r * t.ldc;
        __m512 a0 = acc[0][r][0], a1 = acc[0][r][1];
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

using MicroFn = void (*)(const float*, int64_t, const uint16_t*, int64_t, const Tile&, bool);

template <int... R>
constexpr auto make_table(std::integer_sequence<int, R...>) {
    return std::array<MicroFn, sizeof...(R)>{&micro<R + 1>...};
}
constexpr auto kMicro = make_table(std::make_integer_sequence<int, kMR>{});

// One panel (32 output columns) for rows [m0, m1): K blocks outer so the panel slice is reused
// from L1 by every row tile.
inline void panel_rows(const LinearArgs& a, int64_t p, int64_t m0, int64_t m1, float* c, int64_t ldc,
                       int64_t ncols, bool with_adds) {
    const uint16_t* wp = a.w + p * a.K * kPanel;
    const int64_t nkb = (a.K + kKC - 1) / kKC;
    const int64_t kc_full = (a.K + nkb - 1) / nkb;
    Tile t{c, ldc, tail_mask(static_cast<int>(ncols)), tail_mask(static_cast<int>(ncols) - 16),
           with_adds && a.bias ? a.bias + p * kPanel : nullptr};
    for (int64_t k0 = 0; k0 < a.K; k0 += kc_full) {
        const int64_t kc = std::min(kc_full, a.K - k0);
        for (int64_t m = m0; m < m1; m += kMR) {
            const int mr = static_cast<int>(std::min<int64_t>(kMR, m1 - m));
            Tile tm = t;
            tm.c = c + (m - m0) * ldc;
            kMicro[mr - 1](a.x + m * a.ldx + k0, a.ldx, wp + k0 * kPanel, kc, tm, k0 == 0);
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
    scratch.resize(static_cast<size_t>((m1 - m0) * 2 * kPanel));
    float* s = scratch.data();
    for (int64_t u = u0; u < u1; ++u) {
        panel_rows(a, 2 * u, m0, m1, s, 2 * kPanel, kPanel, false);
        panel_rows(a, 2 * u + 1, m0, m1, s + kPanel, 2 * kPanel, kPanel, false);
        store_silu_mul_rows(s, m1 - m0, a.y + m0 * a.ldy + u * kPanel, a.ldy,
                            static_cast<int>(std::min<int64_t>(kPanel, a.N - u * kPanel)));
    }
}

}  // namespace

void linear_bf16(const LinearArgs& a) {
    if (a.M <= 0 || a.panels <= 0) return;
    const int64_t unit = a.epilogue == Epilogue::kSiluMul ? 2 : 1;
    const int64_t units = a.panels / unit;
    for_each_panel_task<kMR, kMC>(a.M, units, a.nthreads, [&](int64_t m0, int64_t m1, int64_t u0, int64_t u1) {
        run_task(a, m0, m1, u0, u1);
    });
}

}  // namespace lmserve
