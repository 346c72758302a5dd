// y = x W^T with quantized weights (kernels/quant.py): W[n, k] = q * scale + min per group of k.
//
// Weight-only: each k-row of a 32-column panel is dequantized to two fp32 vectors in registers
// (int8: one 32-byte load and two sign-extends; 4-bit: one 16-byte load, an AND and a shift) and
// multiplied with broadcast fp32 activations, exactly like the bf16 kernel in gemm.cpp. Decode reads
// a quarter (int8: half) of the bf16 weight bytes; the few extra instructions per k are hidden
// behind the loads at small M and amortized over up to kMR rows at large M. Threads split output
// columns first, then rows, as gemm.cpp does. Where the CPU has AVX-512 VNNI, int8 weights without
// mins, and 4-bit weights, may instead be stored for vpdpbusd ("q8v", "q4v") and multiplied by
// int8-quantized activations.
#include <omp.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <utility>
#include <vector>

#include "panel_tasks.h"
#include "quant.h"
#include "vec.h"

namespace lmserve {
namespace {

constexpr int kMR = 8;         // rows per micro-tile: 16 accumulators + 2 weights + scales/mins
constexpr int64_t kMC = 128;   // rows per task, a multiple of kMR
constexpr int64_t kKC = 512;   // K block (rounded to whole groups)

// Where the next K block of a panel's weights, scales and mins starts (prefetch addresses only).
struct NextBlock {
    const uint8_t* q;
    const float* scales;
    const float* mins;  // null without mins
};

// Panel p's block from k1 on (past the last one: the next panel's first, which follows in memory),
// or nothing (q null) after the weight's last block. Every layout holds 32 bytes of weights per k
// (8-bit) or 16 (4-bit).
template <int BITS, bool MIN>
inline NextBlock next_block(const QuantLinearArgs& a, int64_t p, int64_t k1) {
    if (k1 >= a.K && p + 1 >= a.panels) return {nullptr, nullptr, nullptr};
    const int64_t per_k = BITS == 8 ? kPanel : kPanel / 2, g = p * (a.K / a.group) + k1 / a.group;
    return {a.q + (p * a.K + k1) * per_k, a.scales + g * kPanel, MIN ? a.mins + g * kPanel : nullptr};
}

// Prefetch the scales (and mins) of group gi of the next block: two lines each.
template <bool MIN>
inline void prefetch_group(const NextBlock& next, int64_t gi) {
    _mm_prefetch(reinterpret_cast<const char*>(next.scales + gi * kPanel), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(next.scales + gi * kPanel + 16), _MM_HINT_T0);
    if constexpr (MIN) {
        _mm_prefetch(reinterpret_cast<const char*>(next.mins + gi * kPanel), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(next.mins + gi * kPanel + 16), _MM_HINT_T0);
    }
}

// Panel row k, dequantized: lanes 0..15 and 16..31 of the panel's columns.
template <int BITS>
inline void load_q(const uint8_t* q, int64_t k, __m512& w0, __m512& w1) {
    if constexpr (BITS == 8) {
        const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + k * kPanel));
        w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(b)));
        w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(b, 1)));
    } else {
        const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + k * 16)));
        w0 = _mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32(0xF)));
        w1 = _mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4));
    }
}

// Accumulates MR rows of x[:, k0:k0+kc] (kc whole groups) against one panel into the tile.
template <int MR, int BITS, bool MIN>
void qmicro(const float* x, int64_t ldx, const QuantLinearArgs& a, int64_t p, int64_t k0, int64_t kc,
            const Tile& t, bool first, const NextBlock& next) {
    constexpr int S = MR >= 4 ? 1 : 2;  // independent accumulator sets hide FMA latency at small MR
    const int64_t groups = a.K / a.group;
    const uint8_t* q = a.q + p * a.K * (BITS == 8 ? kPanel : 16);
    const float* sc = a.scales + p * groups * kPanel;
    const float* mn = MIN ? a.mins + p * groups * kPanel : nullptr;
    __m512 acc[S][MR][2];
    for (int s = 0; s < S; ++s)
        for (int r = 0; r < MR; ++r) acc[s][r][0] = acc[s][r][1] = _mm512_setzero_ps();
    for (int64_t g0 = k0; g0 < k0 + kc; g0 += a.group) {
        const int64_t gi = g0 / a.group;
        const __m512 s0 = _mm512_loadu_ps(sc + gi * kPanel), s1 = _mm512_loadu_ps(sc + gi * kPanel + 16);
        __m512 n0 = _mm512_setzero_ps(), n1 = _mm512_setzero_ps();
        if constexpr (MIN) {
            n0 = _mm512_loadu_ps(mn + gi * kPanel);
            n1 = _mm512_loadu_ps(mn + gi * kPanel + 16);
        }
        if (next.q) {  // this group's scales, mins and weights in the next K block
            prefetch_group<MIN>(next, gi - k0 / a.group);
            const int64_t row = BITS == 8 ? kPanel : 16;  // bytes per k
            for (int64_t b = 0; b < a.group * row; b += 64)
                _mm_prefetch(reinterpret_cast<const char*>(next.q) + (g0 - k0) * row + b, _MM_HINT_T0);
        }
        for (int64_t k = g0; k < g0 + a.group; k += S) {  // groups are multiples of 16, so of S
            for (int s = 0; s < S; ++s) {
                __m512 w0, w1;
                load_q<BITS>(q, k + s, w0, w1);
                if constexpr (MIN) {
                    w0 = _mm512_fmadd_ps(w0, s0, n0);
                    w1 = _mm512_fmadd_ps(w1, s1, n1);
                } else {
                    w0 = _mm512_mul_ps(w0, s0);
                    w1 = _mm512_mul_ps(w1, s1);
                }
                for (int r = 0; r < MR; ++r) {
                    const __m512 xv = _mm512_set1_ps(x[r * ldx + (k + s - k0)]);
                    acc[s][r][0] = _mm512_fmadd_ps(xv, w0, acc[s][r][0]);
                    acc[s][r][1] = _mm512_fmadd_ps(xv, w1, acc[s][r][1]);
                }
            }
        }
    }
    fold_sets(acc);
    store_tile<MR>(acc[0], t, first);
}

using QMicroFn = void (*)(const float*, int64_t, const QuantLinearArgs&, int64_t, int64_t, int64_t, const Tile&,
                          bool, const NextBlock&);

template <int BITS, bool MIN, int... R>
constexpr auto make_qtable(std::integer_sequence<int, R...>) {
    return std::array<QMicroFn, sizeof...(R)>{&qmicro<R + 1, BITS, MIN>...};
}

template <int BITS, bool MIN>
constexpr auto kQMicro = make_qtable<BITS, MIN>(std::make_integer_sequence<int, kMR>{});

template <int BITS, bool MIN>
void qpanel_rows(const QuantLinearArgs& a, int64_t p, int64_t m0, int64_t m1, float* c, int64_t ldc,
                 int64_t ncols, bool with_adds) {
    const int64_t nkb = (a.K + kKC - 1) / kKC;
    int64_t kc_full = (a.K + nkb - 1) / nkb;
    kc_full = (kc_full + a.group - 1) / a.group * a.group;
    Tile t{c, ldc, tail_mask(static_cast<int>(ncols)), tail_mask(static_cast<int>(ncols) - 16),
            with_adds && a.bias ? a.bias + p * kPanel : nullptr};
    for (int64_t k0 = 0; k0 < a.K; k0 += kc_full) {
        const int64_t kc = std::min(kc_full, a.K - k0);
        for (int64_t m = m0; m < m1; m += kMR) {
            const int mr = static_cast<int>(std::min<int64_t>(kMR, m1 - m));
            Tile tm = t;
            tm.c = c + (m - m0) * ldc;
            kQMicro<BITS, MIN>[mr - 1](a.x + m * a.ldx + k0, a.ldx, a, p, k0, kc, tm, k0 == 0,
                                       next_block<BITS, MIN>(a, p, k0 + kc));
        }
    }
}

using PanelFn = void (*)(const QuantLinearArgs&, int64_t, int64_t, int64_t, float*, int64_t, int64_t, bool);

// -- VNNI: int8 weights x int8 activations, 64 multiply-adds per vpdpbusd ------------------------
// Each tile prefetches the next K block of its panel (weights, scales, mins) as it goes, as the bf16
// kernels do: at 16 rows over weights out of cache (60 copies of 3072x576, 2-core AMD EPYC) an int4
// linear took 66 instead of 92 us and an int8 one 59 instead of 103; the bf16 dot kernel takes 95.
// vpdpbusd multiplies unsigned by signed bytes, so weights are stored + 128 and the excess removed
// per group with the activations' integer sum: sum (q + 128) x = sum q x + 128 sum x.
// Rows per VNNI tile (2-core AMD EPYC, alternating builds). 8-bit: 6, with 12 int32 and 12 fp32
// accumulators in registers; against 4 rows, linears of the default model's and TinyLlama's shapes ran
// 1-15% faster at 16-400 rows. 4-bit: 8, with 16 int32 accumulators in registers and the fp32 sums in
// an L1 buffer updated once per group (`kSumsInRegs`): the nibble unpacking is shared by twice the rows,
// and against 4 rows 4-bit linears ran 15-27% faster at 16-400 rows. The buffer cost 8-bit ones 5-11%
// at 4 rows (their groups are larger, and they have no unpacking to share).
template <int BITS>
constexpr int kVR = BITS == 8 ? 6 : 8;
// From this many rows on, only a panel's first row tile prefetches the next K block (its other tiles
// find it in cache): two prefetches per k-quad in every tile were an eighth of the loop's instructions,
// and dropping them made 64-400 rows 3-20% faster (int8, 2-core AMD EPYC). Below it, at decode sizes
// where the weights stream from memory, every tile keeps prefetching as it goes.
constexpr int64_t kVnniFetchAllRows = 32;

#define LMSERVE_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,avx512vnni")))

// acc += w * x on unsigned weight and signed activation bytes, in place. The 4-bit loops write the
// instruction out: given the intrinsic, GCC 12 copied each of their accumulators to a fresh register
// and back on every use (19 extra moves per 8 vpdpbusd at 4 rows, 34 per 16 at 8). The 8-bit loops
// compile cleanly with the intrinsic, and gained such moves with the written-out form.
template <int BITS>
LMSERVE_VNNI inline void dpbusd(__m512i& acc, __m512i w, __m512i x) {
    if constexpr (BITS == 8) acc = _mm512_dpbusd_epi32(acc, w, x);
    else asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(w), "v"(x));
}

LMSERVE_VNNI inline void store_sums(float* s, const __m512 (&v)[2]) {
    _mm512_store_ps(s, v[0]);
    _mm512_store_ps(s + 16, v[1]);
}

LMSERVE_VNNI inline void load_sums(const float* s, __m512 (&v)[2]) {
    v[0] = _mm512_load_ps(s);
    v[1] = _mm512_load_ps(s + 16);
}

// 4-bit VNNI layout: per k-quad 64 bytes, byte 4c + j holding (k + j, column c) in its low nibble and
// (k + j, column 16 + c) in its high one; the values 0..15 need no offset, the min adds min * sum x.
template <int MR, int BITS, bool MIN>
LMSERVE_VNNI inline __attribute__((always_inline)) void vmicro(const QuantLinearArgs& a, int64_t p, int64_t m,
                                                               int64_t k0, int64_t kc, const Tile& t, bool first,
                                                               const NextBlock& next) {
    const int64_t groups = a.K / a.group;
    const uint8_t* q = a.q + p * a.K * (BITS == 8 ? kPanel : kPanel / 2);  // [K/4][32][4] or [K/4][64]
    const float* sc = a.scales + p * groups * kPanel;
    const float* mn = MIN ? a.mins + p * groups * kPanel : nullptr;
    constexpr bool kSumsInRegs = BITS == 8 || MR <= 4;  // else in `sums` (see kVR)
    alignas(64) float sums[kSumsInRegs ? 1 : MR][kPanel];
    __m512 acc[MR][2];
    for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    if constexpr (!kSumsInRegs)
        for (int r = 0; r < MR; ++r) store_sums(sums[r], acc[r]);
    for (int64_t g0 = k0; g0 < k0 + kc; g0 += a.group) {
        const int64_t gi = g0 / a.group;
        __m512i iacc[MR][2];
        for (int r = 0; r < MR; ++r) iacc[r][0] = iacc[r][1] = _mm512_setzero_si512();
        if (next.q) prefetch_group<MIN>(next, gi - k0 / a.group);  // this group's scales and mins in the next K block
        for (int64_t k = g0; k < g0 + a.group; k += 4) {
            if (next.q) {  // this k-quad's weights in the next K block: one line (4-bit), two (8-bit)
                const char* nq = reinterpret_cast<const char*>(next.q) + (k - k0) * (BITS == 8 ? kPanel : kPanel / 2);
                _mm_prefetch(nq, _MM_HINT_T0);
                if (BITS == 8) _mm_prefetch(nq + 64, _MM_HINT_T0);
            }
            __m512i w0, w1;
            if constexpr (BITS == 8) {
                const uint8_t* wk = q + k * kPanel;  // (k / 4) * 32 * 4
                w0 = _mm512_loadu_si512(wk);
                w1 = _mm512_loadu_si512(wk + 64);
            } else {
                const __m512i v = _mm512_loadu_si512(q + k * (kPanel / 2));  // (k / 4) * 64
                const __m512i low = _mm512_set1_epi8(0x0F);
                w0 = _mm512_and_si512(v, low);
                w1 = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
            }
            for (int r = 0; r < MR; ++r) {
                int32_t four;
                __builtin_memcpy(&four, a.xq + (m + r) * a.K + k, 4);
                const __m512i xv = _mm512_set1_epi32(four);
                dpbusd<BITS>(iacc[r][0], w0, xv);
                dpbusd<BITS>(iacc[r][1], w1, xv);
            }
        }
        const __m512 s0 = _mm512_loadu_ps(sc + gi * kPanel), s1 = _mm512_loadu_ps(sc + gi * kPanel + 16);
        __m512 n0 = _mm512_setzero_ps(), n1 = _mm512_setzero_ps();
        if constexpr (MIN) {
            n0 = _mm512_loadu_ps(mn + gi * kPanel);
            n1 = _mm512_loadu_ps(mn + gi * kPanel + 16);
        }
        for (int r = 0; r < MR; ++r) {
            const int64_t xi = (m + r) * groups + gi;
            const __m512 xs = _mm512_set1_ps(a.xscale[xi]);
            if constexpr (BITS == 8) {  // stored + 128: remove 128 * sum x
                const __m512i fix = _mm512_set1_epi32(128 * a.xsum[xi]);
                iacc[r][0] = _mm512_sub_epi32(iacc[r][0], fix);
                iacc[r][1] = _mm512_sub_epi32(iacc[r][1], fix);
            }
            if constexpr (!kSumsInRegs) load_sums(sums[r], acc[r]);
            acc[r][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(iacc[r][0]), _mm512_mul_ps(s0, xs), acc[r][0]);
            acc[r][1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(iacc[r][1]), _mm512_mul_ps(s1, xs), acc[r][1]);
            if constexpr (MIN) {
                const __m512 xsum = _mm512_set1_ps(a.xscale[xi] * static_cast<float>(a.xsum[xi]));
                acc[r][0] = _mm512_fmadd_ps(n0, xsum, acc[r][0]);
                acc[r][1] = _mm512_fmadd_ps(n1, xsum, acc[r][1]);
            }
            if constexpr (!kSumsInRegs) store_sums(sums[r], acc[r]);
        }
    }
    if constexpr (!kSumsInRegs)
        for (int r = 0; r < MR; ++r) load_sums(sums[r], acc[r]);
    store_tile<MR>(acc, t, first);
}

template <int MR, int BITS, bool MIN>
LMSERVE_VNNI __attribute__((noinline)) void vmicro_outlined(const QuantLinearArgs& a, int64_t p, int64_t m, int64_t k0,
                                                            int64_t kc, const Tile& t, bool first,
                                                            const NextBlock& next) {
    vmicro<MR, BITS, MIN>(a, p, m, k0, kc, t, first, next);
}

// vmicro for a tile of `rows` rows (1..R), by direct calls. 8-bit tiles are inlined: called through a
// table of function pointers they ran 4-8% slower. 4-bit ones are called out of line: inlined here,
// GCC 12 again copied accumulators between registers in their loops, and 1-row 4-bit linears ran
// 18-27% slower (2-core AMD EPYC).
template <int BITS, bool MIN, int... R>
LMSERVE_VNNI inline __attribute__((always_inline)) void vmicro_rows(int rows, std::integer_sequence<int, R...>,
                                                                   const QuantLinearArgs& a, int64_t p, int64_t m,
                                                                   int64_t k0, int64_t kc, const Tile& t, bool first,
                                                                   const NextBlock& next) {
    if constexpr (BITS == 8)
        ((rows == R + 1 && (vmicro<R + 1, BITS, MIN>(a, p, m, k0, kc, t, first, next), true)) || ...);
    else
        ((rows == R + 1 && (vmicro_outlined<R + 1, BITS, MIN>(a, p, m, k0, kc, t, first, next), true)) || ...);
}

template <int BITS, bool MIN>
LMSERVE_VNNI void vpanel_rows(const QuantLinearArgs& a, int64_t p, int64_t m0, int64_t m1, float* c, int64_t ldc,
                              int64_t ncols, bool with_adds) {
    const int64_t nkb = (a.K + kKC - 1) / kKC;
    int64_t kc_full = (a.K + nkb - 1) / nkb;
    kc_full = (kc_full + a.group - 1) / a.group * a.group;
    Tile t{c, ldc, tail_mask(static_cast<int>(ncols)), tail_mask(static_cast<int>(ncols) - 16),
            with_adds && a.bias ? a.bias + p * kPanel : nullptr};
    for (int64_t k0 = 0; k0 < a.K; k0 += kc_full) {
        const int64_t kc = std::min(kc_full, a.K - k0);
        const NextBlock next = next_block<BITS, MIN>(a, p, k0 + kc), none{nullptr, nullptr, nullptr};
        for (int64_t m = m0; m < m1; m += kVR<BITS>) {
            const NextBlock& ahead = m == m0 || m1 - m0 < kVnniFetchAllRows ? next : none;
            Tile tm = t;
            tm.c = c + (m - m0) * ldc;
            vmicro_rows<BITS, MIN>(static_cast<int>(std::min<int64_t>(kVR<BITS>, m1 - m)),
                                   std::make_integer_sequence<int, kVR<BITS>>{}, a, p, m, k0, kc, tm, k0 == 0, ahead);
        }
    }
}

// Per row and group: scale = max|x| / 127, xq = round(x / scale), xsum = sum of xq. Sixteen
// features a vector (groups are multiples of 16): the scalar loop cost 15% of a 16-row VNNI linear
// at K = 576 and 7% at 256 rows. Rounding is the vector unit's default, to nearest even, as
// nearbyint and the Python reference (kernels/quant.py quantize_activations) round.
void quantize_rows(const QuantLinearArgs& a, int8_t* xq, float* xscale, int32_t* xsum) {
    const int64_t groups = a.K / a.group;
    const __m512 abs_mask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7FFFFFFF));
#pragma omp parallel for num_threads(a.nthreads) schedule(static) if (a.M * a.K > 65536)
    for (int64_t m = 0; m < a.M; ++m) {
        const float* x = a.x + m * a.ldx;
        for (int64_t g = 0; g < groups; ++g) {
            const int64_t k0 = g * a.group, k1 = k0 + a.group;
            __m512 vmax = _mm512_setzero_ps();
            for (int64_t k = k0; k < k1; k += 16)
                vmax = _mm512_max_ps(vmax, _mm512_and_ps(_mm512_loadu_ps(x + k), abs_mask));
            const float amax = _mm512_reduce_max_ps(vmax);
            const float scale = amax / 127.0f, inv = amax > 0.0f ? 1.0f / scale : 0.0f;  // as the reference: 1 / (amax / 127)
            const __m512 vinv = _mm512_set1_ps(inv);
            __m512i vsum = _mm512_setzero_si512();
            for (int64_t k = k0; k < k1; k += 16) {
                const __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + k), vinv));
                _mm_storeu_si128(reinterpret_cast<__m128i*>(xq + m * a.K + k), _mm512_cvtsepi32_epi8(v));
                vsum = _mm512_add_epi32(vsum, v);
            }
            xscale[m * groups + g] = scale;
            xsum[m * groups + g] = _mm512_reduce_add_epi32(vsum);
        }
    }
}

void run_qtask(const QuantLinearArgs& a, PanelFn panel, int64_t m0, int64_t m1, int64_t u0, int64_t u1) {
    if (!a.silu_mul) {
        for (int64_t p = u0; p < u1; ++p)
            panel(a, p, m0, m1, a.y + m0 * a.ldy + p * kPanel, a.ldy, a.N - p * kPanel, true);
        return;
    }
    thread_local std::vector<float> scratch;
    // No clearing: every row tile stores (not adds) its first K block.
    float* s = grow_only(scratch, static_cast<size_t>((m1 - m0) * 2 * kPanel));
    for (int64_t u = u0; u < u1; ++u) {
        panel(a, 2 * u, m0, m1, s, 2 * kPanel, kPanel, false);
        panel(a, 2 * u + 1, m0, m1, s + kPanel, 2 * kPanel, kPanel, false);
        store_silu_mul_rows(s, m1 - m0, a.y + m0 * a.ldy + u * kPanel, a.ldy,
                            static_cast<int>(std::min<int64_t>(kPanel, a.N - u * kPanel)));
    }
}

}  // namespace

void linear_quant(const QuantLinearArgs& a_in) {
    if (a_in.M <= 0 || a_in.panels <= 0) return;
    QuantLinearArgs a = a_in;
    thread_local std::vector<int8_t> xq;  // grow_only: quantize_rows writes every element
    thread_local std::vector<float> xscale;
    thread_local std::vector<int32_t> xsum;
    PanelFn panel = a.bits == 4 ? (a.mins ? &qpanel_rows<4, true> : &qpanel_rows<4, false>)
                                : (a.mins ? &qpanel_rows<8, true> : &qpanel_rows<8, false>);
    if (a.vnni) {
        const auto groups = static_cast<size_t>(a.M * (a.K / a.group));
        int8_t* q = grow_only(xq, static_cast<size_t>(a.M * a.K));
        float* scale = grow_only(xscale, groups);
        int32_t* sum = grow_only(xsum, groups);
        quantize_rows(a, q, scale, sum);
        a.xq = q;
        a.xscale = scale;
        a.xsum = sum;
        panel = a.bits == 4 ? (a.mins ? &vpanel_rows<4, true> : &vpanel_rows<4, false>)
                            : (a.mins ? &vpanel_rows<8, true> : &vpanel_rows<8, false>);
    }
    const int64_t unit = a.silu_mul ? 2 : 1;
    const int64_t units = a.panels / unit;
    for_each_panel_task<kMR, kMC>(a.M, units, a.panels * kPanel * a.K, a.nthreads,
                                  [&](int64_t m0, int64_t m1, int64_t u0, int64_t u1) {
        run_qtask(a, panel, m0, m1, u0, u1);
    });
}

}  // namespace lmserve
