// What both attention builds (attention.cpp, attention_avx2.cpp) check before computing: the call's
// metadata, sequence by sequence. ISA-neutral.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

#include "kernels.h"

namespace lmserve {

// The heads and block size every attention call needs.
inline void check_attention_call(const AttentionArgs& a) {
    if (a.Hkv <= 0 || a.Hq % a.Hkv != 0)
        throw std::invalid_argument("query heads (" + std::to_string(a.Hq) + ") must be a multiple of KV heads (" +
                                    std::to_string(a.Hkv) + ")");
    if (a.block_size <= 0 || (a.block_size & (a.block_size - 1)) != 0)
        throw std::invalid_argument("block_size must be a power of two, got " + std::to_string(a.block_size));
}

// Sequence s: its new tokens are rows [q0, q0 + n_new) and take keys [0, ctx).
struct SequenceSpan {
    int64_t q0, n_new, ctx;
};

// Sequence s's span, after checking its rows, context length and block-table entries; throws
// std::invalid_argument naming what is wrong.
inline SequenceSpan checked_sequence(const AttentionArgs& a, int64_t s) {
    const int64_t q0 = a.query_start_loc[s], q1 = a.query_start_loc[s + 1];
    const int64_t ctx = a.context_lens[s], n_new = q1 - q0;
    if (n_new < 0 || q0 < 0 || q1 > a.T)
        throw std::invalid_argument("query_start_loc must be non-decreasing and end at most at the number of tokens"
                                    " (sequence " + std::to_string(s) + ")");
    if (n_new == 0) return {q0, 0, ctx};
    if (ctx < n_new)
        throw std::invalid_argument("context_lens[" + std::to_string(s) + "] = " + std::to_string(ctx) +
                                    " is smaller than its " + std::to_string(n_new) + " new tokens");
    const int64_t nblk = (ctx + a.block_size - 1) / a.block_size;
    if (nblk > a.max_blocks)
        throw std::invalid_argument("block_tables has " + std::to_string(a.max_blocks) + " columns but sequence " +
                                    std::to_string(s) + " needs " + std::to_string(nblk));
    const int32_t* bt = a.block_tables + s * a.bt_stride;
    for (int64_t b = 0; b < nblk; ++b)
        if (bt[b] < 0 || bt[b] >= a.num_blocks)
            throw std::invalid_argument("block_tables[" + std::to_string(s) + ", " + std::to_string(b) + "] = " +
                                        std::to_string(bt[b]) + " is not a block of the cache");
    return {q0, n_new, ctx};
}

}  // namespace lmserve
