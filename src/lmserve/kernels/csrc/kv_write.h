// The ISA-neutral part of writing a step's new keys and values into their paged-cache slots: the
// slot check and the loop over tokens and heads (kv_cache.cpp, elementwise_avx2.cpp supply the row
// copy, with bf16 rounding where needed).
#pragma once

#include <omp.h>

#include <algorithm>
#include <stdexcept>
#include <string>

#include "kernels.h"

namespace lmserve {

// write_row(src, t, h, dst, dst_bf16, D): one head's row of token t from src to dst.
template <typename RowFn>
void write_kv_rows(const KVWrite& a, RowFn write_row) {
    const int64_t capacity = a.num_blocks * a.block_size;
    for (int64_t t = 0; t < a.T; ++t)
        if (a.slots[t] < 0 || a.slots[t] >= capacity)
            throw std::invalid_argument("slot_mapping[" + std::to_string(t) + "] = " + std::to_string(a.slots[t]) +
                                        " is outside the cache's " + std::to_string(capacity) + " slots");
    const int64_t esz = a.cache_bf16 ? 2 : 4;
    const int threads = a.T * a.Hkv * a.D >= (1 << 16) ? std::max(1, a.nthreads) : 1;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
    for (int64_t t = 0; t < a.T; ++t) {
        const int64_t blk = a.slots[t] / a.block_size, off = a.slots[t] % a.block_size;
        for (int64_t h = 0; h < a.Hkv; ++h) {
            char* kd = static_cast<char*>(a.k_cache) + (blk * a.k_sb + off * a.k_st + h * a.k_sh) * esz;
            char* vd = static_cast<char*>(a.v_cache) + (blk * a.v_sb + off * a.v_st + h * a.v_sh) * esz;
            write_row(a.k, t, h, kd, a.cache_bf16, a.D);
            write_row(a.v, t, h, vd, a.cache_bf16, a.D);
        }
    }
}

}  // namespace lmserve
