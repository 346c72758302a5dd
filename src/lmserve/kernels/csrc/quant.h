// Torch-free interface of the quantized linear kernel (quant_gemm.cpp); layouts in kernels/quant.py.
#pragma once

#include <cstdint>

#include "kernels.h"

namespace lmserve {

struct QuantLinearArgs {
    const float* x;          // [M, K], row stride ldx
    int64_t ldx;
    const uint8_t* q;        // panels of values: [P, K, 32] int8 (bits 8) or [P, K, 16] nibble pairs (bits 4)
    const float* scales;     // [P, K / group, 32]
    const float* mins;       // [P, K / group, 32] or null (zero)
    const float* bias;       // [N] or null (not with silu_mul)
    float* y;                // [M, N], row stride ldy
    int64_t ldy;
    int64_t M, N, K;         // N: output columns (the gate width with silu_mul)
    int64_t panels;
    int64_t group;           // a multiple of 16 dividing K
    int bits;                // 8 or 4
    bool silu_mul;           // panels alternate gate/up: y = silu(gate) * up
    int nthreads;
    // VNNI layouts: "q8v" [P, K/4, 32, 4] bytes holding value + 128; "q4v" [P, K/4, 64] nibble pairs
    // (quant_gemm.cpp). Activations are quantized per row and group first (xq int8 [M, K], xscale and
    // xsum [M, K/group]).
    bool vnni;
    const int8_t* xq;
    const float* xscale;
    const int32_t* xsum;
};

void linear_quant(const QuantLinearArgs& a);

}  // namespace lmserve
