// The ISA-neutral part of writing a step's new keys and values into their paged-cache slots: the
// slot check, the loop over tokens and heads, and each row's copy; kv_cache.cpp and
// elementwise_avx2.cpp supply the bf16 conversions of a row.
#pragma once

#include <omp.h>

#include <algorithm>
#include <stdexcept>
#include <string>

#include "kernels.h"

namespace lmserve {

// One head's row of token t from src to dst. widen(const uint16_t*, float*, D) and
// narrow(const float*, uint16_t*, D) convert a row of D values; narrowing rounds to nearest even and
// turns NaN into 0xFFFF, bit for bit what torch's .to(bfloat16) does.
template <typename Widen, typename Narrow>
void write_row(const KVSource& src, int64_t t, int64_t h, void* dst, bool dst_bf16, int64_t D, Widen widen,
               Narrow narrow) {
    if (src.bf16) {
        const uint16_t* s = static_cast<const uint16_t*>(src.data) + t * src.st + h * src.sh;
        if (dst_bf16)
            std::copy(s, s + D, static_cast<uint16_t*>(dst));
        else
            widen(s, static_cast<float*>(dst), D);
        return;
    }
    const float* s = static_cast<const float*>(src.data) + t * src.st + h * src.sh;
    if (dst_bf16)
        narrow(s, static_cast<uint16_t*>(dst), D);
    else
        std::copy(s, s + D, static_cast<float*>(dst));
}

// Checks every slot first (std::invalid_argument names the first bad one), then writes each token's
// rows; the tokens of a large step are shared among the threads.
template <typename Widen, typename Narrow>
void write_kv_rows(const KVWrite& a, Widen widen, Narrow narrow) {
    const int64_t capacity = a.num_blocks * a.block_size;
    for (int64_t t = 0; t < a.T; ++t)
        if (a.slots[t] < 0 || a.slots[t] >= capacity)
            throw std::invalid_argument("slot_mapping[" + std::to_string(t) + "] = " + std::to_string(a.slots[t]) +
                                        " is outside the cache's " + std::to_string(capacity) + " slots");
    const int64_t esz = a.cache_bf16 ? 2 : 4;
    const int threads = a.T * a.Hkv * a.D >= kParallelMinElements ? std::max(1, a.nthreads) : 1;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
    for (int64_t t = 0; t < a.T; ++t) {
        const int64_t blk = a.slots[t] / a.block_size, off = a.slots[t] % a.block_size;
        for (int64_t h = 0; h < a.Hkv; ++h) {
            char* kd = static_cast<char*>(a.k_cache) + (blk * a.k_sb + off * a.k_st + h * a.k_sh) * esz;
            char* vd = static_cast<char*>(a.v_cache) + (blk * a.v_sb + off * a.v_st + h * a.v_sh) * esz;
            write_row(a.k, t, h, kd, a.cache_bf16, a.D, widen, narrow);
            write_row(a.v, t, h, vd, a.cache_bf16, a.D, widen, narrow);
        }
    }
}

}  // namespace lmserve
