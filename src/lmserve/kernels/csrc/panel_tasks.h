// How every panel GEMM (bf16 AVX-512, bf16 AVX2, quantized) splits its work among threads.
// ISA-neutral: included by builds compiled with and without AVX-512.
#pragma once

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <vector>

namespace lmserve {

// Tasks [0, tasks) dealt out in contiguous ranges, one per thread; a thread that has finished its
// own range takes tasks from the far end of the others'. Each range is one 64-bit word, next task
// (low half) and end (high half), claimed by compare-and-swap.
class TaskRanges {
  public:
    TaskRanges(int64_t tasks, int64_t threads) : n_(threads), ranges_(new std::atomic<uint64_t>[threads]) {
        for (int64_t i = 0; i < threads; ++i)
            ranges_[i].store(pack(tasks * i / threads, tasks * (i + 1) / threads), std::memory_order_relaxed);
    }

    // The next task for thread i: from the front of its own range, else from the back of another's;
    // -1 when every range is empty.
    int64_t next(int64_t i) {
        const int64_t own = i % n_;
        for (int64_t k = 0; k < n_; ++k) {
            std::atomic<uint64_t>& r = ranges_[(own + k) % n_];
            uint64_t cur = r.load(std::memory_order_relaxed);
            for (;;) {
                const int64_t front = static_cast<int64_t>(cur & 0xffffffffu), back = static_cast<int64_t>(cur >> 32);
                if (front >= back) break;
                const bool mine = k == 0;
                const uint64_t want = mine ? pack(front + 1, back) : pack(front, back - 1);
                if (r.compare_exchange_weak(cur, want, std::memory_order_acq_rel, std::memory_order_relaxed))
                    return mine ? front : back - 1;
            }
        }
        return -1;
    }

  private:
    static uint64_t pack(int64_t front, int64_t back) {
        return static_cast<uint64_t>(front) | (static_cast<uint64_t>(back) << 32);
    }
    int64_t n_;
    std::unique_ptr<std::atomic<uint64_t>[]> ranges_;
};

// From kSharedMinRows rows (prefill), or from kSharedMinWeights weights at any row count (a decode
// call that streams megabytes: TinyLlama-1.1B's layers, a large vocabulary's LM head), the columns
// are cut into kBlocksPerThread blocks per thread, and a thread done with its own blocks takes the
// others' last ones. When another process (the frontend, a load generator, the host) takes a core
// for a moment, the thread on it then delays the call by about half that moment instead of all of
// it, and a step of a few hundred such calls stops paying for every moment in full. 2-core AMD EPYC,
// 16 prompts of 200 tokens arriving together at a server, median first token over 6 bursts, 4
// alternating pairs: 589-617 ms with one static block per thread, 540-601 ms sharing. The linears
// alone: unchanged within 1-3% unloaded; beside a process busy 0.5 ms of every 2.5 ms, 3-8% faster at
// 200-416 rows and 5-13% faster (medians) for the large decode calls. Small decode calls (tens of
// microseconds) keep one static block per thread: finer blocks cost them 8-14%.
constexpr int64_t kSharedMinRows = 64;
constexpr int64_t kSharedMinWeights = int64_t{4} << 20;
constexpr int64_t kBlocksPerThread = 4;
// Prefill calls (kSharedMinRows rows on) cut twice as fine: the threads end a call at most one task
// apart, and half a task less of waiting was worth 1-4% at 200-406 rows.
constexpr int64_t kPrefillBlocksPerThread = 8;

// Calls task(m0, m1, u0, u1) for row range [m0, m1) and column-unit range [u0, u1) so the tasks
// cover M rows x `units` units. Columns are split first: each thread then streams only its share
// of the weights, which is what bounds decode. Rows are split only when there are too few column
// units for the threads, in multiples of MR (the micro-tile) and at most MC rows per task.
// weights: how many the whole call streams (all its panels, all of K).
// Consecutive tasks share a column range, so a thread keeps its weight slice warm; the tasks of a
// thread's range are consecutive, and taken ones come from the other end of a range.
template <int64_t MR, int64_t MC, typename Task>
void for_each_panel_task(int64_t M, int64_t units, int64_t weights, int nthreads, const Task& task) {
    const int64_t threads = std::max(1, nthreads);
    const bool shared = threads > 1 && (M >= kSharedMinRows || weights >= kSharedMinWeights);
    const int64_t per_thread = M >= kSharedMinRows ? kPrefillBlocksPerThread : kBlocksPerThread;
    const int64_t nb = std::min(units, shared ? threads * per_thread : threads);
    int64_t mb = (M + MC - 1) / MC;
    const int64_t max_mb = (M + MR - 1) / MR;
    if (nb * mb < threads) mb = std::min(max_mb, (threads + nb - 1) / nb);
    const int64_t rows_per = ((M + mb - 1) / mb + MR - 1) / MR * MR;
    mb = (M + rows_per - 1) / rows_per;
    const int64_t tasks = nb * mb;
    const auto run = [&](int64_t t) {
        const int64_t ni = t / mb, mi = t % mb;
        const int64_t m0 = mi * rows_per;
        task(m0, std::min(M, m0 + rows_per), ni * units / nb, (ni + 1) * units / nb);
    };
    if (!shared) {
#pragma omp parallel for num_threads(static_cast<int>(threads)) schedule(static) if (tasks > 1)
        for (int64_t t = 0; t < tasks; ++t) run(t);
        return;
    }
    TaskRanges ranges(tasks, threads);
#pragma omp parallel num_threads(static_cast<int>(threads))
    for (int64_t t = ranges.next(omp_get_thread_num()); t >= 0; t = ranges.next(omp_get_thread_num())) run(t);
}

// Room for n elements in a per-thread buffer that only grows; what lies beyond earlier calls' writes
// is left as it is. A GEMM's rounded or quantized activations then cost no allocation, no page faults
// (a freed block of a few hundred KiB goes back to the system and comes back as fresh pages) and no
// zero-filling, once the largest call has run. The buffer lives as long as its thread: at most a
// step's tokens x the widest input of the model.
template <typename T>
T* grow_only(std::vector<T>& buf, size_t n) {
    if (buf.size() < n) buf.resize(n);
    return buf.data();
}

}  // namespace lmserve
