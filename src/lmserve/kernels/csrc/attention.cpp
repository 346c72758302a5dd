// Paged attention over a block KV cache for decode, prefill and chunked prefill in one call.
//
// The call is cut into work items (sequence x KV head x tile of new tokens), checked against the
// block tables, sorted longest first and handed to threads dynamically. When there are too few
// items to keep every thread busy (a handful of long decodes), decode items are also split along
// their keys and the partial softmax states are merged afterwards.
#include <omp.h>

#include <algorithm>
#include <stdexcept>
#include <string>
#include <vector>

#include "attention_checks.h"
#include "attention_decode.h"
#include "attention_prefill.h"
#include "attention_prefill_dot.h"

namespace lmserve {
namespace {

constexpr int kSplitMinKeys = 256;  // a key split below this costs more to merge than it saves

std::vector<Item> plan_items(const AttentionArgs& a, int64_t G, int threads) {
    std::vector<Item> items;
    // With enough decodes to go round, one item takes all KV heads of a sequence: a token's keys
    // for all heads are contiguous, so the item streams whole cache lines that it fully uses.
    int64_t decodes = 0;
    for (int64_t s = 0; s < a.S; ++s) decodes += a.query_start_loc[s + 1] - a.query_start_loc[s] == 1;
    const bool whole_decodes = decodes >= 8LL * threads;
    const int64_t heads_per_item = std::min<int64_t>(G, kTileRows);
    for (int64_t s = 0; s < a.S; ++s) {
        const auto [q0, n_new, ctx] = checked_sequence(a, s);
        if (n_new == 0) continue;
        for (int64_t h0 = 0; h0 < G; h0 += heads_per_item) {
            const int32_t nh = static_cast<int32_t>(std::min(heads_per_item, G - h0));
            const int64_t tq = std::max<int64_t>(1, kTileRows / nh);
            for (int64_t i0 = 0; i0 < n_new; i0 += tq) {
                const int32_t nt = static_cast<int32_t>(std::min(tq, n_new - i0));
                const int32_t pos0 = static_cast<int32_t>(ctx - n_new + i0);
                const int32_t ng = whole_decodes && n_new == 1 && nh == G ? static_cast<int32_t>(a.Hkv) : 1;
                for (int64_t g = 0; g < a.Hkv; g += ng) {
                    Item it{q0 + i0, static_cast<int32_t>(s), static_cast<int32_t>(g), ng, static_cast<int32_t>(h0),
                            nh, nt, pos0, 0, pos0 + nt, -1, 0};
                    it.cost = static_cast<int64_t>(nt) * nh * ng * (pos0 + nt);
                    items.push_back(it);
                }
            }
        }
    }
    return items;
}

// Split single-token items along their keys until there are about four items per thread.
int split_decodes(std::vector<Item>& items, int threads) {
    const int64_t target = 4LL * threads;
    if (threads <= 1 || items.empty() || static_cast<int64_t>(items.size()) >= target) return 0;
    const int64_t want = (target + static_cast<int64_t>(items.size()) - 1) / static_cast<int64_t>(items.size());
    std::vector<Item> out;
    int parts = 0;
    for (const Item& it : items) {
        const int64_t len = it.kv1 - it.kv0;
        const int64_t n = std::min<int64_t>(want, len / kSplitMinKeys);
        if (it.nt != 1 || it.ng != 1 || n < 2) {
            out.push_back(it);
            continue;
        }
        const int64_t step = ((len + n - 1) / n + kChunk - 1) / kChunk * kChunk;
        for (int64_t k = it.kv0; k < it.kv1; k += step) {
            Item p = it;
            p.kv0 = static_cast<int32_t>(k);
            p.kv1 = static_cast<int32_t>(std::min<int64_t>(it.kv1, k + step));
            p.part = parts++;
            p.cost = static_cast<int64_t>(p.nh) * (p.kv1 - p.kv0);
            out.push_back(p);
        }
    }
    items.swap(out);
    return parts;
}

// One KV head of an item: the row-dot loop for few rows, the row-lane loop (by vector count) for many.
template <int D>
void run_head(const AttentionArgs& a, const Item& it, int64_t G, int log2bs, const Workspace& ws, const Sink& sink) {
    const int R = it.nt * it.nh;
    if (R < kLanesMinRows)
        run_rowdot<D>(a, it, G, log2bs, ws, sink);
    else if (a.dot && R <= 16)
        run_lanes_dot<D, 1>(a, it, G, log2bs, ws, sink);
    else if (a.dot && R <= 32)
        run_lanes_dot<D, 2>(a, it, G, log2bs, ws, sink);
    else if (a.dot)
        run_lanes_dot<D, 3>(a, it, G, log2bs, ws, sink);
    else if (R <= 16)
        run_lanes<D, 1>(a, it, G, log2bs, ws, sink);
    else if (R <= 32)
        run_lanes<D, 2>(a, it, G, log2bs, ws, sink);
    else
        run_lanes<D, 3>(a, it, G, log2bs, ws, sink);
}

template <int D>
void run_item(const AttentionArgs& a, const Item& item, int64_t G, int log2bs, const Workspace& ws, const Sink& sink) {
    const int R = item.nt * item.nh;
    if (R < kLanesMinRows && R * item.ng <= kTileRows) return run_rowdot<D>(a, item, G, log2bs, ws, sink);
    for (int32_t g = item.g; g < item.g + item.ng; ++g) {
        Item one = item;
        one.g = g;
        one.ng = 1;
        run_head<D>(a, one, G, log2bs, ws, sink);
    }
}

// Merge the key splits of one (sequence, head slice) into normalized output rows.
void merge_parts(const AttentionArgs& a, const std::vector<Item>& items, const std::vector<size_t>& group,
                 int64_t G, int64_t D, const float* part_o, const float* part_ml) {
    const Item& first = items[group[0]];
    for (int r = 0; r < first.nt * first.nh; ++r) {
        float m = -FLT_MAX;
        for (size_t i : group) m = std::max(m, part_ml[(items[i].part * kTileRows + r) * 2]);
        float l = 0.0f;
        float* dst = out_row(a, first, G, r);
        for (int64_t d = 0; d < D; ++d) dst[d] = 0.0f;
        for (size_t i : group) {
            const int64_t base = items[i].part * kTileRows + r;
            const float w = std::exp2(part_ml[base * 2] - m);
            l += w * part_ml[base * 2 + 1];
            const float* po = part_o + base * D;
            for (int64_t d = 0; d < D; ++d) dst[d] += w * po[d];
        }
        const float inv = 1.0f / l;
        for (int64_t d = 0; d < D; ++d) dst[d] *= inv;
    }
}

template <int D>
void attention_d(const AttentionArgs& a) {
    const int64_t G = a.Hq / a.Hkv;
    int log2bs = 0;
    while ((int64_t{1} << log2bs) < a.block_size) ++log2bs;
    const int threads = std::max(1, a.nthreads);
    std::vector<Item> items = plan_items(a, G, threads);
    const int parts = split_decodes(items, threads);
    std::vector<float> part_o(static_cast<size_t>(parts) * kTileRows * D);
    std::vector<float> part_ml(static_cast<size_t>(parts) * kTileRows * 2);
    // Longest first, so the dynamic schedule does not end on one long straggler.
    std::stable_sort(items.begin(), items.end(), [](const Item& x, const Item& y) { return x.cost > y.cost; });
    std::vector<int32_t> perm(D);
    for (int i = 0; i < D; ++i) {
        // bf16 chunks are widened even/odd within each 32 features (see vec.h); fp32 keep order.
        const int grp = i / 32, w = i % 32;
        perm[i] = (a.bf16 && grp * 32 + 32 <= D) ? grp * 32 + (w < 16 ? 2 * w : 2 * (w - 16) + 1) : i;
    }
    const int64_t n = static_cast<int64_t>(items.size());
#pragma omp parallel num_threads(threads) if (n > 1)
    {
        // 64-byte aligned: every buffer row is read and written as whole zmm vectors, and a
        // vector that straddles two cache lines costs two accesses.
        thread_local std::vector<float> buf;
        const size_t need = static_cast<size_t>(2 * kTileRows * D + 2 * kChunk * D + kChunk * kTileRows + 4 * kTileRows);
        if (buf.size() < need + 16) buf.assign(need + 16, 0.0f);
        float* p = buf.data() + ((64 - reinterpret_cast<uintptr_t>(buf.data()) % 64) % 64) / sizeof(float);
        Workspace ws{p, p + kTileRows * D, p + 2 * kTileRows * D, p + 2 * kTileRows * D + kChunk * D,
                     p + 2 * kTileRows * D + 2 * kChunk * D, p + 2 * kTileRows * D + 2 * kChunk * D + kChunk * kTileRows,
                     perm.data()};
#pragma omp for schedule(dynamic, 1)
        for (int64_t i = 0; i < n; ++i) {
            const Item& it = items[i];
            Sink sink{nullptr, nullptr};
            if (it.part >= 0) sink = {part_o.data() + it.part * kTileRows * D, part_ml.data() + it.part * kTileRows * 2};
            run_item<D>(a, it, G, log2bs, ws, sink);
        }
    }
    if (parts == 0) return;
    // Group the parts of each split item (they were created consecutively, sorting moved them).
    std::vector<std::vector<size_t>> groups;
    std::vector<size_t> order;
    for (size_t i = 0; i < items.size(); ++i)
        if (items[i].part >= 0) order.push_back(i);
    std::sort(order.begin(), order.end(), [&](size_t x, size_t y) { return items[x].part < items[y].part; });
    for (size_t k = 0; k < order.size(); ++k) {
        const Item& it = items[order[k]];
        if (k == 0 || it.kv0 == 0) groups.emplace_back();
        groups.back().push_back(order[k]);
    }
#pragma omp parallel for num_threads(threads) schedule(static) if (groups.size() > 1)
    for (size_t gi = 0; gi < groups.size(); ++gi) merge_parts(a, items, groups[gi], G, D, part_o.data(), part_ml.data());
}

}  // namespace

bool attention_supports_head_dim(int64_t d) { return d == 32 || d == 64 || d == 80 || d == 96 || d == 128 || d == 256; }

void paged_attention(const AttentionArgs& a) {
    check_attention_call(a);
    switch (a.D) {
        case 32: return attention_d<32>(a);
        case 64: return attention_d<64>(a);
        case 80: return attention_d<80>(a);
        case 96: return attention_d<96>(a);
        case 128: return attention_d<128>(a);
        case 256: return attention_d<256>(a);
        default: throw std::invalid_argument("head_dim " + std::to_string(a.D) + " has no compiled CPU kernel");
    }
}

}  // namespace lmserve
