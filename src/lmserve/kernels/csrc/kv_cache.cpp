// Writing a step's new keys and values into their paged-cache slots.
//
// torch's index_copy_ costs tens of microseconds per call even for one token, and it runs twice
// per layer per step; a direct row copy (with bf16 rounding where needed) takes about one.
#include <algorithm>

#include "kernels.h"
#include "kv_write.h"
#include "vec.h"

namespace lmserve {
namespace {

// fp32 -> bf16 rounding to nearest even, NaN to 0xFFFF: what torch's vectorized .to() does, bit
// for bit, without requiring the AVX-512 BF16 extension.
inline __m256i to_bf16(__m512 x) {
    const __m512i u = _mm512_castps_si512(x);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), _mm512_set1_epi32(0xFFFF));
    return _mm512_cvtepi32_epi16(r);
}

// One row of D values: bf16 widened to fp32, and fp32 rounded to bf16.
void widen_row(const uint16_t* s, float* d, int64_t D) {
    for (int64_t i = 0; i < D; i += 16) {
        const __mmask16 m = tail_mask(static_cast<int>(std::min<int64_t>(16, D - i)));
        const __m256i w = _mm256_maskz_loadu_epi16(m, s + i);
        _mm512_mask_storeu_ps(d + i, m, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(w), 16)));
    }
}

void narrow_row(const float* s, uint16_t* d, int64_t D) {
    for (int64_t i = 0; i < D; i += 16) {
        const __mmask16 m = tail_mask(static_cast<int>(std::min<int64_t>(16, D - i)));
        _mm256_mask_storeu_epi16(d + i, m, to_bf16(_mm512_maskz_loadu_ps(m, s + i)));
    }
}

}  // namespace

void write_kv(const KVWrite& a) { write_kv_rows(a, widen_row, narrow_row); }

}  // namespace lmserve
