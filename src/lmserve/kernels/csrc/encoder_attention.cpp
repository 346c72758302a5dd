// Bidirectional attention within each text of a packed batch, for encoder models (BERT).
//
// The handler's packed forward keeps a batch's tokens as one [tokens, 3 * H * D] q|k|v matrix, texts
// one after the other. Every token attends to every token of its own text and to no other. Done with
// torch, that takes a scatter into a [texts, H, longest, D] layout padded to the longest text, two
// batched products with their copies and a gather back; here each (text, head) is one task that
// reads its rows where they are and writes its output rows, with no padding and no copies.
//
// Per task the keys are transposed into a small [D, len rounded up to 16] buffer, so the scores of
// 16 keys are D broadcast multiply-adds; the softmax runs in base 2 (exp2_ps) with the maximum
// subtracted; the output is the weighted sum of the value rows. Everything is fp32.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>
#include <vector>

#include "kernels.h"
#include "vec.h"

namespace lmserve {
namespace {

constexpr float kLog2e = 1.4426950408889634f;

// Scratch of one thread: transposed keys, scores, one output row.
struct Scratch {
    std::vector<float> kt, p, acc;
};

void text_head(const EncoderAttentionArgs& a, int64_t start, int64_t len, int64_t h, Scratch& s) {
    const int64_t D = a.D, lp = (len + 15) & ~int64_t{15};
    const float* q0 = a.qkv + start * a.ld + h * D;
    const float* k0 = a.qkv + start * a.ld + (a.H + h) * D;
    const float* v0 = a.qkv + start * a.ld + (2 * a.H + h) * D;
    s.kt.resize(static_cast<size_t>(D * lp));
    s.p.resize(static_cast<size_t>(lp));
    s.acc.resize(static_cast<size_t>(D));
    float* kt = s.kt.data();
    for (int64_t j = 0; j < lp; ++j)
        for (int64_t d = 0; d < D; ++d) kt[d * lp + j] = j < len ? k0[j * a.ld + d] : 0.0f;
    const __m512 scale = _mm512_set1_ps(a.scale * kLog2e);
    for (int64_t i = 0; i < len; ++i) {
        const float* qi = q0 + i * a.ld;
        __m512 vmax = _mm512_set1_ps(-INFINITY);
        for (int64_t j = 0; j < lp; j += 16) {
            __m512 acc = _mm512_setzero_ps();
            for (int64_t d = 0; d < D; ++d)
                acc = _mm512_fmadd_ps(_mm512_set1_ps(qi[d]), _mm512_loadu_ps(kt + d * lp + j), acc);
            const __mmask16 valid = tail_mask(static_cast<int>(len - j));
            acc = _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), valid, _mm512_mul_ps(acc, scale));
            _mm512_storeu_ps(s.p.data() + j, acc);
            vmax = _mm512_max_ps(vmax, acc);
        }
        const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(vmax));
        __m512 vsum = _mm512_setzero_ps();
        for (int64_t j = 0; j < lp; j += 16) {
            const __mmask16 valid = tail_mask(static_cast<int>(len - j));
            const __m512 e = _mm512_maskz_mov_ps(valid, exp2_ps(_mm512_sub_ps(_mm512_loadu_ps(s.p.data() + j), m)));
            _mm512_storeu_ps(s.p.data() + j, e);
            vsum = _mm512_add_ps(vsum, e);
        }
        const float inv = 1.0f / _mm512_reduce_add_ps(vsum);
        float* acc = s.acc.data();
        std::fill(acc, acc + D, 0.0f);
        for (int64_t j = 0; j < len; ++j) {
            const __m512 pj = _mm512_set1_ps(s.p[static_cast<size_t>(j)]);
            const float* vj = v0 + j * a.ld;
            for (int64_t d = 0; d < D; d += 16)
                _mm512_storeu_ps(acc + d, _mm512_fmadd_ps(pj, _mm512_loadu_ps(vj + d), _mm512_loadu_ps(acc + d)));
        }
        float* out = a.out + (start + i) * a.ldo + h * D;
        const __m512 vinv = _mm512_set1_ps(inv);
        for (int64_t d = 0; d < D; d += 16) _mm512_storeu_ps(out + d, _mm512_mul_ps(_mm512_loadu_ps(acc + d), vinv));
    }
}

}  // namespace

bool encoder_attention_supports_head_dim(int64_t d) { return d >= 16 && d <= 512 && d % 16 == 0; }

void encoder_attention(const EncoderAttentionArgs& a) {
    if (!encoder_attention_supports_head_dim(a.D))
        throw std::invalid_argument("head_dim " + std::to_string(a.D) + " is not a multiple of 16 in [16, 512]");
    for (int64_t t = 0; t < a.S; ++t)
        if (a.starts[t] < 0 || a.starts[t + 1] < a.starts[t] || a.starts[t + 1] > a.T)
            throw std::invalid_argument("starts must be non-decreasing from 0 and end at most at the number of tokens"
                                        " (text " + std::to_string(t) + ")");
    const int64_t tasks = a.S * a.H;
    const int threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(a.nthreads, tasks)));
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        Scratch s;
#pragma omp for schedule(dynamic, 4)
        for (int64_t task = 0; task < tasks; ++task) {
            const int64_t t = task / a.H, h = task % a.H;
            const int64_t len = a.starts[t + 1] - a.starts[t];
            if (len > 0) text_head(a, a.starts[t], len, h, s);
        }
    }
}

}  // namespace lmserve
