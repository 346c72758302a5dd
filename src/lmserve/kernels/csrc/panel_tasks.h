// How every panel GEMM (bf16 AVX-512, bf16 AVX2, quantized) splits its work among threads.
// ISA-neutral: included by builds compiled with and without AVX-512.
#pragma once

#include <omp.h>

#include <algorithm>
#include <cstdint>

namespace lmserve {

// Calls task(m0, m1, u0, u1) for row range [m0, m1) and column-unit range [u0, u1) so the tasks
// cover M rows x `units` units. Columns are split first: each thread then streams only its share
// of the weights, which is what bounds decode. Rows are split only when there are too few column
// units for the threads, in multiples of MR (the micro-tile) and at most MC rows per task.
// Consecutive tasks share a column range, so a thread keeps its weight slice warm.
template <int64_t MR, int64_t MC, typename Task>
void for_each_panel_task(int64_t M, int64_t units, int nthreads, const Task& task) {
    const int64_t threads = std::max(1, nthreads);
    const int64_t nb = std::min(units, threads);
    int64_t mb = (M + MC - 1) / MC;
    const int64_t max_mb = (M + MR - 1) / MR;
    if (nb * mb < threads) mb = std::min(max_mb, (threads + nb - 1) / nb);
    const int64_t rows_per = ((M + mb - 1) / mb + MR - 1) / MR * MR;
    mb = (M + rows_per - 1) / rows_per;
    const int64_t tasks = nb * mb;
#pragma omp parallel for num_threads(static_cast<int>(threads)) schedule(static) if (tasks > 1)
    for (int64_t t = 0; t < tasks; ++t) {
        const int64_t ni = t / mb, mi = t % mb;
        const int64_t m0 = mi * rows_per;
        task(m0, std::min(M, m0 + rows_per), ni * units / nb, (ni + 1) * units / nb);
    }
}

}  // namespace lmserve
