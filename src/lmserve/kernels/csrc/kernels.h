// Torch-free interfaces of the CPU kernels. Only bindings.cpp includes torch; the kernels take raw
// pointers and strides so their translation units compile in a second or two.
#pragma once

#include <cstdint>

namespace lmserve {

// Packed linear weight: ceil(N / 32) panels, each [K][32] bf16 with the pair interleave of vec.h
// (element 2j = column j, element 2j+1 = column 16 + j of the panel). Padding columns are zero.
constexpr int kPanel = 32;

// Below this many elements (256 KB of fp32) a row-wise op (norms, rotary embedding, cache writes)
// runs on one thread: it takes a few microseconds, about what waking the other threads costs.
constexpr int64_t kParallelMinElements = 1 << 16;

enum class Epilogue : int {
    kNone = 0,     // y = x W^T + bias
    kSiluMul = 1,  // panels alternate gate/up; y[:, c] = silu(gate[:, c]) * up[:, c]
};

struct LinearArgs {
    const float* x;          // [M, K], row stride ldx
    int64_t ldx;
    const uint16_t* w;       // packed panels
    const float* bias;       // [N] or null (not with kSiluMul)
    float* y;                // [M, N_out], row stride ldy
    int64_t ldy;
    int64_t M, N, K;         // N: output columns (for kSiluMul the gate width); K: input features
    int64_t panels;          // number of packed panels
    Epilogue epilogue;
    int nthreads;
};

void linear_bf16(const LinearArgs& a);

// The same product with vdpbf16ps (AVX512_BF16 only: check cpu_has_bf16_dot first) on the pair
// layout: panels [ceil(N / 32), K rounded up to even, 32] bf16 where the 64 elements of feature pair
// (2i, 2i+1) are columns 0-15 then 16-31, each column's two features adjacent. x is rounded to bf16.
void linear_bf16_dot(const LinearArgs& a);
bool cpu_has_bf16_dot();

// bf16 rows W [N, K] (row stride ldw) packed into the panel layout, or the pair layout when `pairs`
// (K then rounded up to even); with w2 (same shape), panels alternate w, w2 (gate, up) for kSiluMul.
// out holds every panel, padding included: [ceil(N / 32) * (w2 ? 2 : 1), K or K + K % 2, 32].
struct PackArgs {
    const uint16_t* w;
    const uint16_t* w2;      // or null
    int64_t ldw;
    int64_t N, K;
    bool pairs;
    uint16_t* out;
    int nthreads;
};
void pack_weight(const PackArgs& a);
// Panels [panels, K, 32] re-laid in the pair layout [panels, K + K % 2, 32].
void panels_to_pairs(const uint16_t* in, int64_t panels, int64_t K, uint16_t* out, int nthreads);

struct AttentionArgs {
    const float* q;          // [T, Hq, D] with strides (q_st, q_sh), last dim contiguous
    int64_t q_st, q_sh;
    float* out;              // [T, Hq, D] with strides (o_st, o_sh)
    int64_t o_st, o_sh;
    const void* k_cache;     // [blocks, block_size, Hkv, D], strides (kb, kt, kh)
    const void* v_cache;
    int64_t k_sb, k_st, k_sh, v_sb, v_st, v_sh;
    bool bf16;               // cache dtype: bf16 if true, else fp32
    bool dot;                // bf16 cache: tiles of many rows use vdpbf16ps (check cpu_has_bf16_dot first)
    const int32_t* block_tables;  // [S, max_blocks] row stride bt_stride
    int64_t bt_stride, max_blocks, num_blocks;
    const int32_t* context_lens;     // [S]
    const int32_t* query_start_loc;  // [S + 1]
    int64_t S, T, Hq, Hkv, D, block_size;
    float scale;
    const float* alibi;      // [Hq] or null
    int nthreads;
};

// Throws std::invalid_argument on inconsistent metadata (bad block ids, too many new tokens).
void paged_attention(const AttentionArgs& a);
bool attention_supports_head_dim(int64_t d);

// Bidirectional attention within each text of a packed batch (encoder models, encoder_attention.cpp).
struct EncoderAttentionArgs {
    const float* qkv;        // [T, 3 * H * D]: q, k, v of every token, row stride ld
    int64_t ld;
    float* out;              // [T, H * D], row stride ldo
    int64_t ldo;
    const int64_t* starts;   // [S + 1]: text t is tokens [starts[t], starts[t + 1])
    int64_t S, T, H, D;
    float scale;
    int nthreads;
};

// Throws std::invalid_argument on a head size it does not take or inconsistent starts.
void encoder_attention(const EncoderAttentionArgs& a);
bool encoder_attention_supports_head_dim(int64_t d);

// New keys or values [T, Hkv, D], fp32 or bf16, strides (st, sh), last dimension contiguous.
struct KVSource {
    const void* data;
    bool bf16;
    int64_t st, sh;
};

struct KVWrite {
    KVSource k, v;
    void* k_cache;           // [blocks, block_size, Hkv, D], strides (k_sb, k_st, k_sh)
    void* v_cache;
    int64_t k_sb, k_st, k_sh, v_sb, v_st, v_sh;
    bool cache_bf16;
    const int64_t* slots;    // [T]: block * block_size + offset
    int64_t T, Hkv, D, num_blocks, block_size;
    int nthreads;
};

// Throws std::invalid_argument when a slot lies outside the cache.
void write_kv(const KVWrite& a);

// out = rms_norm(x + residual) * weight; sum_out receives x + residual (untouched without residual).
void rms_norm(const float* x, int64_t ldx, const float* residual, int64_t ldr, const float* weight,
              float* out, int64_t ldo, float* sum_out, int64_t lds, int64_t M, int64_t H, float eps,
              int nthreads);

// out[:, c] = silu(x[:, c]) * x[:, I + c] for x [M, 2I].
void silu_and_mul(const float* x, int64_t ldx, float* out, int64_t ldo, int64_t M, int64_t I, int nthreads);

// out[m] = the index of the largest of x[m, 0..N), the first one on ties; a NaN counts as the
// largest (its first occurrence), as torch.argmax has it.
void argmax_rows(const float* x, int64_t ldx, int64_t M, int64_t N, int64_t* out, int nthreads);

// In place: rotary embedding of the first 2*half features of each of H heads of T tokens (token stride st,
// head stride sh); cos/sin are [positions, half] tables; neox rotates halves, otherwise adjacent pairs.
void rotary(float* x, int64_t st, int64_t sh, int64_t T, int64_t H, const int64_t* positions, const float* cos,
            const float* sin, int64_t half, bool neox, int nthreads);

}  // namespace lmserve
