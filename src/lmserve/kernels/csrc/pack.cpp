// Linear weights laid out for the GEMM kernels at load time: bf16 rows W[N, K] into panels of 32
// output columns (`panel32`: per feature, one 64-byte line, column j at 2j and column 16 + j at
// 2j + 1) or feature pairs (`pair32`: per pair of features, columns 0-31 in order, each column's
// two features adjacent); and panels re-laid as pairs (the dot-product kernel's form, chosen per
// machine after the panels were packed). kernels/packed.py holds the same layouts in torch, the
// reference the tests compare these with.
//
// torch's permute-then-contiguous over these shapes is a strided copy with two-element inner runs:
// a 1.1B model's weights took 10 s to pack into panels and 5 s more into pairs on a 2-core AMD EPYC.
// Here each thread packs whole panels, reading 64 features of each of a panel's 32 rows (128
// contiguous bytes) and writing the 4 KiB of the panel they fill, and every byte of the output,
// padding included, is written once (fresh memory is touched once, not zeroed first).
// ISA-neutral: compiled into every build.
#include <omp.h>

#include <algorithm>
#include <cstdint>

#include "kernels.h"

namespace lmserve {
namespace {

constexpr int64_t kBlock = 64;  // features per block: 32 rows x 128 bytes read, 4 KiB written

// Where element (column c, feature k) of a panel goes, relative to the panel's start.
inline int64_t panel_slot(int64_t c, int64_t k) { return k * kPanel + 2 * (c % 16) + c / 16; }
inline int64_t pair_slot(int64_t c, int64_t k) { return (k / 2) * 2 * kPanel + 2 * c + (k & 1); }

}  // namespace

void pack_weight(const PackArgs& a) {
    const int64_t panels_per_source = (a.N + kPanel - 1) / kPanel;
    const int64_t sources = a.w2 ? 2 : 1;
    const int64_t panels = panels_per_source * sources;
    const int64_t kp = a.pairs ? a.K + (a.K & 1) : a.K;
    const int threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(a.nthreads, panels)));
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
    for (int64_t q = 0; q < panels; ++q) {
        // With two sources (gate and up) their panels alternate: q = 2u from w, 2u + 1 from w2.
        const uint16_t* src = sources == 2 && (q & 1) ? a.w2 : a.w;
        const int64_t p = q / sources;
        uint16_t* out = a.out + q * kp * kPanel;
        for (int64_t k0 = 0; k0 < kp; k0 += kBlock) {
            const int64_t k1 = std::min(kp, k0 + kBlock);
            for (int64_t c = 0; c < kPanel; ++c) {
                const int64_t n = p * kPanel + c;
                const uint16_t* row = n < a.N ? src + n * a.ldw : nullptr;
                for (int64_t k = k0; k < k1; ++k) {
                    const uint16_t v = row && k < a.K ? row[k] : 0;
                    out[a.pairs ? pair_slot(c, k) : panel_slot(c, k)] = v;
                }
            }
        }
    }
}

void panels_to_pairs(const uint16_t* in, int64_t panels, int64_t K, uint16_t* out, int nthreads) {
    const int64_t kp = K + (K & 1);
    const int threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(nthreads, panels)));
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
    for (int64_t p = 0; p < panels; ++p) {
        const uint16_t* src = in + p * K * kPanel;
        uint16_t* dst = out + p * kp * kPanel;
        for (int64_t k = 0; k < kp; ++k)
            for (int64_t c = 0; c < kPanel; ++c) dst[pair_slot(c, k)] = k < K ? src[panel_slot(c, k)] : 0;
    }
}

}  // namespace lmserve
