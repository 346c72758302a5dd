// Python bindings: argument checks, output allocation, and the GIL released around each kernel.
// The only translation unit that includes torch, so the kernels themselves compile quickly.
#include <torch/extension.h>

#include "kernels.h"
#include "quant.h"

namespace {

using torch::Tensor;

void check_rows(const Tensor& t, const char* name, at::ScalarType dtype, int64_t dim) {
    TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be on the CPU");
    TORCH_CHECK_VALUE(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
    TORCH_CHECK_VALUE(t.dim() == dim, name, " must have ", dim, " dimensions, got ", t.dim());
    TORCH_CHECK_VALUE(t.stride(dim - 1) == 1, name, " must be contiguous in its last dimension");
}

// fp32 [rows, features] with a contiguous last dimension; a view of t when it already is one.
Tensor as_rows(const Tensor& t) {
    Tensor r = t.dim() == 2 ? t : t.reshape({-1, t.size(-1)});
    if (r.scalar_type() != at::kFloat) r = r.to(at::kFloat);
    return r.stride(1) == 1 ? r : r.contiguous();
}

std::vector<int64_t> out_shape(const Tensor& x, int64_t n) {
    std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
    shape.back() = n;
    return shape;
}

// What the bf16 and quantized linear bindings share around their kernels: the output width
// against the packed panels (half of them for silu_mul, whose panels pair gate and up), the bias
// rule, x as fp32 rows and the fp32 output; then the output in x's leading shape and dtype.
struct LinearIO {
    Tensor x, y, bias;  // bias undefined when there is none
};

LinearIO linear_io(const Tensor& x_in, int64_t panels, int64_t n, bool silu_mul, const std::optional<Tensor>& bias_in) {
    const int64_t cover = silu_mul ? panels / 2 : panels;
    TORCH_CHECK_VALUE(n > 0 && n <= cover * lmserve::kPanel && n > (cover - 1) * lmserve::kPanel,
                      "output width ", n, " does not match ", panels, " packed panels");
    TORCH_CHECK_VALUE(!silu_mul || !bias_in, "silu_mul takes no bias");
    LinearIO io;
    io.x = as_rows(x_in);
    io.y = torch::empty({io.x.size(0), n}, io.x.options());
    if (bias_in) {
        io.bias = bias_in->to(at::kFloat).contiguous();
        TORCH_CHECK_VALUE(io.bias.numel() == n, "bias must have ", n, " elements, got ", io.bias.numel());
    }
    return io;
}

Tensor linear_result(const Tensor& x_in, Tensor y, int64_t n) {
    if (x_in.dim() != 2) y = y.view(out_shape(x_in, n));
    return x_in.scalar_type() == at::kFloat ? y : y.to(x_in.scalar_type());
}

// Accepts x of any leading shape and float dtype; returns x's leading shape and dtype.
// `dot`: the pair layout and vdpbf16ps (kernels.h), else the fp32-FMA panels.
Tensor linear_impl(const Tensor& x_in, const Tensor& w, int64_t n, const std::optional<Tensor>& bias_in,
                   int64_t epilogue, int64_t nthreads, bool dot) {
    TORCH_CHECK_VALUE(x_in.device().is_cpu() && x_in.dim() >= 1, "x must be a CPU tensor");
    TORCH_CHECK_VALUE(w.dim() == 3 && w.size(2) == lmserve::kPanel && w.scalar_type() == at::kBFloat16 &&
                          w.is_contiguous(), "packed weight must be contiguous bf16 [panels, K, 32]");
    const int64_t k_in = x_in.size(-1);
    TORCH_CHECK_VALUE(w.size(1) == (dot ? k_in + (k_in & 1) : k_in), "x has ", k_in,
                      " features, the weight expects ", w.size(1));
    const auto ep = static_cast<lmserve::Epilogue>(epilogue);
    const LinearIO io = linear_io(x_in, w.size(0), n, ep == lmserve::Epilogue::kSiluMul, bias_in);
    lmserve::LinearArgs a{};
    a.x = io.x.data_ptr<float>();
    a.ldx = io.x.stride(0);
    a.w = reinterpret_cast<const uint16_t*>(w.data_ptr());
    a.bias = io.bias.defined() ? io.bias.data_ptr<float>() : nullptr;
    a.y = io.y.data_ptr<float>();
    a.ldy = io.y.stride(0);
    a.M = io.x.size(0);
    a.N = n;
    a.K = k_in;
    a.panels = w.size(0);
    a.epilogue = ep;
    a.nthreads = static_cast<int>(nthreads);
    {
        pybind11::gil_scoped_release nogil;
#ifndef LMSERVE_GEMM_ONLY
        if (dot) {
            lmserve::linear_bf16_dot(a);
        } else {
            lmserve::linear_bf16(a);
        }
#else
        lmserve::linear_bf16(a);  // the AVX2 build has no dot-product kernel; linear_dot is not bound there
#endif
    }
    return linear_result(x_in, io.y, n);
}

Tensor linear(const Tensor& x, const Tensor& w, int64_t n, const std::optional<Tensor>& bias, int64_t epilogue,
              int64_t nthreads) {
    return linear_impl(x, w, n, bias, epilogue, nthreads, false);
}

// W [N, K] (and the up half w2 of a gate|up pair) packed for `linear` (panels) or `linear_dot` (pairs).
Tensor pack_linear(const Tensor& w, bool pairs, const std::optional<Tensor>& w2, int64_t nthreads) {
    TORCH_CHECK_VALUE(w.device().is_cpu() && w.dim() == 2 && w.scalar_type() == at::kBFloat16,
                      "the weight must be a 2-D bf16 CPU tensor");
    const Tensor rows = w.stride(1) == 1 ? w : w.contiguous();
    Tensor rows2;
    if (w2) {
        TORCH_CHECK_VALUE(w2->sizes() == w.sizes() && w2->scalar_type() == at::kBFloat16 && w2->device().is_cpu(),
                          "the up weight must be a bf16 CPU tensor shaped like the gate weight");
        rows2 = w2->stride(1) == 1 && w2->stride(0) == rows.stride(0) ? *w2 : w2->contiguous();
        TORCH_CHECK_VALUE(rows2.stride(0) == rows.stride(0), "gate and up weights must have the same row stride");
    }
    const int64_t n = w.size(0), k = w.size(1), per = (n + lmserve::kPanel - 1) / lmserve::kPanel;
    Tensor out = torch::empty({per * (w2 ? 2 : 1), pairs ? k + (k & 1) : k, lmserve::kPanel}, w.options());
    lmserve::PackArgs a{reinterpret_cast<const uint16_t*>(rows.data_ptr()),
                        w2 ? reinterpret_cast<const uint16_t*>(rows2.data_ptr()) : nullptr, rows.stride(0), n, k,
                        pairs, reinterpret_cast<uint16_t*>(out.data_ptr()), static_cast<int>(nthreads)};
    pybind11::gil_scoped_release nogil;
    lmserve::pack_weight(a);
    return out;
}

Tensor panels_to_pairs(const Tensor& panels, int64_t nthreads) {
    TORCH_CHECK_VALUE(panels.device().is_cpu() && panels.dim() == 3 && panels.size(2) == lmserve::kPanel &&
                          panels.scalar_type() == at::kBFloat16 && panels.is_contiguous(),
                      "panels must be contiguous bf16 [panels, K, 32]");
    const int64_t k = panels.size(1);
    Tensor out = torch::empty({panels.size(0), k + (k & 1), lmserve::kPanel}, panels.options());
    pybind11::gil_scoped_release nogil;
    lmserve::panels_to_pairs(reinterpret_cast<const uint16_t*>(panels.data_ptr()), panels.size(0), k,
                             reinterpret_cast<uint16_t*>(out.data_ptr()), static_cast<int>(nthreads));
    return out;
}

// Quantized weight (kernels/quant.py): q [P, K, 32] int8 or [P, K, 16] uint8, scales/mins [P, K/group, 32].
Tensor linear_quant(const Tensor& x_in, const Tensor& q, const Tensor& scales, const std::optional<Tensor>& mins,
                    int64_t n, int64_t group, int64_t bits, const std::optional<Tensor>& bias_in, bool silu_mul,
                    int64_t nthreads) {
    TORCH_CHECK_VALUE(x_in.device().is_cpu() && x_in.dim() >= 1, "x must be a CPU tensor");
    // bits: 8 or 4 (weight-only layouts), 0 or -4 (the VNNI layouts of 8- and 4-bit values)
    TORCH_CHECK_VALUE(bits == 8 || bits == 4 || bits == 0 || bits == -4, "bits must be 8, 4, 0 or -4");
    const bool vnni = bits <= 0;
    const int64_t width = vnni ? (bits == 0 ? 4 : 2) * lmserve::kPanel : (bits == 8 ? lmserve::kPanel : 16);
    TORCH_CHECK_VALUE(q.dim() == 3 && q.is_contiguous() && q.size(2) == width && q.element_size() == 1,
                      "quantized values must be contiguous 1-byte [panels, K", vnni ? " / 4" : "", ", ", width, "]");
    TORCH_CHECK_VALUE(bits != 0 || !mins, "the 8-bit VNNI layout has no mins");
    const int64_t K = vnni ? 4 * q.size(1) : q.size(1);
    TORCH_CHECK_VALUE(group >= 16 && group % 16 == 0 && K % group == 0, "group ", group, " must be a multiple of 16 "
                      "dividing K = ", K);
    TORCH_CHECK_VALUE(scales.scalar_type() == at::kFloat && scales.is_contiguous() && scales.dim() == 3 &&
                          scales.size(0) == q.size(0) && scales.size(1) == K / group && scales.size(2) == lmserve::kPanel,
                      "scales must be contiguous fp32 [panels, K / group, 32]");
    if (mins) TORCH_CHECK_VALUE(mins->sizes() == scales.sizes() && mins->scalar_type() == at::kFloat &&
                                    mins->is_contiguous(), "mins must be shaped and typed like scales");
    TORCH_CHECK_VALUE(x_in.size(-1) == K, "x has ", x_in.size(-1), " features, the weight expects ", K);
    const LinearIO io = linear_io(x_in, q.size(0), n, silu_mul, bias_in);
    lmserve::QuantLinearArgs a{};
    a.x = io.x.data_ptr<float>();
    a.ldx = io.x.stride(0);
    a.q = reinterpret_cast<const uint8_t*>(q.data_ptr());
    a.scales = scales.data_ptr<float>();
    a.mins = mins ? mins->data_ptr<float>() : nullptr;
    a.bias = io.bias.defined() ? io.bias.data_ptr<float>() : nullptr;
    a.y = io.y.data_ptr<float>();
    a.ldy = io.y.stride(0);
    a.M = io.x.size(0);
    a.N = n;
    a.K = K;
    a.panels = q.size(0);
    a.group = group;
    a.bits = bits == 0 ? 8 : (bits == -4 ? 4 : static_cast<int>(bits));
    a.vnni = vnni;
    a.silu_mul = silu_mul;
    a.nthreads = static_cast<int>(nthreads);
    {
        pybind11::gil_scoped_release nogil;
        lmserve::linear_quant(a);
    }
    return linear_result(x_in, io.y, n);
}

Tensor int32_rows(const Tensor& t) {
    Tensor r = t.scalar_type() == at::kInt ? t : t.to(at::kInt);
    return r.is_contiguous() ? r : r.contiguous();
}

Tensor paged_attention(const Tensor& q_in, const Tensor& k_cache, const Tensor& v_cache, const Tensor& bt_in,
                       const Tensor& cl_in, const Tensor& qsl_in, double scale, const std::optional<Tensor>& alibi_in,
                       const std::optional<Tensor>& out, int64_t nthreads, bool dot) {
    Tensor q = q_in.scalar_type() == at::kFloat ? q_in : q_in.to(at::kFloat);
    if (q.dim() == 3 && q.stride(2) != 1) q = q.contiguous();
    check_rows(q, "q", at::kFloat, 3);
    const Tensor block_tables = int32_rows(bt_in), context_lens = int32_rows(cl_in),
                 query_start_loc = int32_rows(qsl_in);
    const auto cache_type = k_cache.scalar_type();
    TORCH_CHECK_VALUE(cache_type == at::kBFloat16 || cache_type == at::kFloat, "KV cache must be bf16 or float32");
    check_rows(k_cache, "k_cache", cache_type, 4);
    check_rows(v_cache, "v_cache", cache_type, 4);
    TORCH_CHECK_VALUE(k_cache.sizes() == v_cache.sizes(), "k_cache and v_cache shapes differ");
    TORCH_CHECK_VALUE(k_cache.size(3) == q.size(2), "head_dim of q and the cache differ");
    check_rows(block_tables, "block_tables", at::kInt, 2);
    TORCH_CHECK_VALUE(query_start_loc.numel() == context_lens.numel() + 1, "query_start_loc must have S + 1 entries");
    TORCH_CHECK_VALUE(block_tables.size(0) >= context_lens.numel(), "block_tables has fewer rows than sequences");
    // Kernel output goes straight into out when out is fp32 with contiguous rows, else it is copied.
    const bool direct = out && out->scalar_type() == at::kFloat && out->stride(-1) == 1;
    Tensor o = direct ? *out : torch::empty(q.sizes(), q.options());
    check_rows(o, "out", at::kFloat, 3);
    TORCH_CHECK_VALUE(o.sizes() == q.sizes(), "out must have q's shape");
    lmserve::AttentionArgs a{};
    a.q = q.data_ptr<float>();
    a.q_st = q.stride(0);
    a.q_sh = q.stride(1);
    a.out = o.data_ptr<float>();
    a.o_st = o.stride(0);
    a.o_sh = o.stride(1);
    a.k_cache = k_cache.data_ptr();
    a.v_cache = v_cache.data_ptr();
    a.k_sb = k_cache.stride(0), a.k_st = k_cache.stride(1), a.k_sh = k_cache.stride(2);
    a.v_sb = v_cache.stride(0), a.v_st = v_cache.stride(1), a.v_sh = v_cache.stride(2);
    a.bf16 = cache_type == at::kBFloat16;
#ifdef LMSERVE_GEMM_ONLY
    TORCH_CHECK_VALUE(!dot, "the AVX2 build has no bf16 dot-product attention loop");
#else
    TORCH_CHECK_VALUE(!dot || lmserve::cpu_has_bf16_dot(), "this CPU has no AVX512_BF16 dot-product instructions");
#endif
    a.dot = dot && a.bf16;
    a.block_tables = block_tables.data_ptr<int32_t>();
    a.bt_stride = block_tables.stride(0);
    a.max_blocks = block_tables.size(1);
    a.num_blocks = k_cache.size(0);
    a.context_lens = context_lens.data_ptr<int32_t>();
    a.query_start_loc = query_start_loc.data_ptr<int32_t>();
    a.S = context_lens.numel();
    a.T = q.size(0);
    a.Hq = q.size(1);
    a.Hkv = k_cache.size(2);
    a.D = q.size(2);
    a.block_size = k_cache.size(1);
    a.scale = static_cast<float>(scale);
    Tensor alibi;
    if (alibi_in) {
        alibi = alibi_in->to(at::kFloat).contiguous();
        TORCH_CHECK_VALUE(alibi.numel() == a.Hq, "alibi_slopes must have one slope per query head");
        a.alibi = alibi.data_ptr<float>();
    }
    a.nthreads = static_cast<int>(nthreads);
    {
        pybind11::gil_scoped_release nogil;
        lmserve::paged_attention(a);
    }
    if (out && !direct) return out->copy_(o);
    return q_in.scalar_type() == at::kFloat ? o : o.to(q_in.scalar_type());
}

// Accepts x of any leading shape and float dtype; both results have x's shape and dtype.
std::tuple<Tensor, Tensor> rms_norm(const Tensor& x_in, const Tensor& weight_in, double eps,
                                    const std::optional<Tensor>& residual_in, int64_t nthreads) {
    TORCH_CHECK_VALUE(x_in.device().is_cpu() && x_in.dim() >= 1, "x must be a CPU tensor");
    const Tensor x = as_rows(x_in);
    const Tensor weight = weight_in.to(at::kFloat).contiguous();
    TORCH_CHECK_VALUE(weight.numel() == x.size(1), "weight must have ", x.size(1), " elements");
    Tensor out = torch::empty({x.size(0), x.size(1)}, x.options());
    Tensor sum, residual;
    if (residual_in) {
        residual = as_rows(*residual_in);
        TORCH_CHECK_VALUE(residual.sizes() == x.sizes(), "residual must have x's shape");
        sum = torch::empty_like(out);
    }
    {
        pybind11::gil_scoped_release nogil;
        lmserve::rms_norm(x.data_ptr<float>(), x.stride(0), residual_in ? residual.data_ptr<float>() : nullptr,
                          residual_in ? residual.stride(0) : 0, weight.data_ptr<float>(), out.data_ptr<float>(),
                          out.stride(0), residual_in ? sum.data_ptr<float>() : nullptr, out.stride(0), x.size(0),
                          x.size(1), static_cast<float>(eps), static_cast<int>(nthreads));
    }
    const auto dtype = x_in.scalar_type();
    out = out.view(x_in.sizes());
    if (!residual_in) return {dtype == at::kFloat ? out : out.to(dtype), x_in};
    sum = sum.view(x_in.sizes());
    if (dtype == at::kFloat) return {out, sum};
    return {out.to(dtype), sum.to(dtype)};
}

void rotary_embedding(const Tensor& positions_in, Tensor& q, Tensor& k, const Tensor& cos, const Tensor& sin,
                      int64_t rotary_dim, bool neox, int64_t nthreads) {
    check_rows(q, "q", at::kFloat, 3);
    check_rows(k, "k", at::kFloat, 3);
    check_rows(cos, "cos", at::kFloat, 2);
    check_rows(sin, "sin", at::kFloat, 2);
    TORCH_CHECK_VALUE(cos.is_contiguous() && sin.is_contiguous() && cos.sizes() == sin.sizes(),
                      "cos and sin must be contiguous tables of one shape");
    TORCH_CHECK_VALUE(rotary_dim % 2 == 0 && rotary_dim <= q.size(2) && rotary_dim == 2 * cos.size(1),
                      "rotary_dim must be even, fit the head and match the tables");
    const Tensor positions = positions_in.to(at::kLong).contiguous();
    TORCH_CHECK_VALUE(positions.numel() == q.size(0) && positions.numel() == k.size(0), "one position per token");
    if (positions.numel() > 0) {
        const auto [lo, hi] = torch::aminmax(positions);
        TORCH_CHECK_VALUE(lo.item<int64_t>() >= 0 && hi.item<int64_t>() < cos.size(0), "position outside the tables");
    }
    const int64_t half = rotary_dim / 2;
    pybind11::gil_scoped_release nogil;
    for (Tensor* x : {&q, &k}) {
        lmserve::rotary(x->data_ptr<float>(), x->stride(0), x->stride(1), x->size(0), x->size(1),
                        positions.data_ptr<int64_t>(), cos.data_ptr<float>(), sin.data_ptr<float>(), half, neox,
                        static_cast<int>(nthreads));
    }
}

lmserve::KVSource kv_source(const Tensor& t, const Tensor& like_cache, const char* name) {
    check_rows(t, name, t.scalar_type(), 3);
    TORCH_CHECK_VALUE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, name,
                      " must be float32 or bfloat16");
    TORCH_CHECK_VALUE(t.size(1) == like_cache.size(2) && t.size(2) == like_cache.size(3), name,
                      " must be [tokens, kv_heads, head_dim] like the cache");
    return {t.data_ptr(), t.scalar_type() == at::kBFloat16, t.stride(0), t.stride(1)};
}

void write_kv(const Tensor& k_in, const Tensor& v_in, Tensor& k_cache, Tensor& v_cache, const Tensor& slot_mapping,
              int64_t nthreads) {
    const auto cache_type = k_cache.scalar_type();
    TORCH_CHECK_VALUE(cache_type == at::kBFloat16 || cache_type == at::kFloat, "KV cache must be bf16 or float32");
    check_rows(k_cache, "k_cache", cache_type, 4);
    check_rows(v_cache, "v_cache", cache_type, 4);
    TORCH_CHECK_VALUE(k_cache.sizes() == v_cache.sizes(), "k_cache and v_cache shapes differ");
    const Tensor k = k_in.scalar_type() == at::kFloat || k_in.scalar_type() == at::kBFloat16 ? k_in : k_in.to(at::kFloat);
    const Tensor v = v_in.scalar_type() == at::kFloat || v_in.scalar_type() == at::kBFloat16 ? v_in : v_in.to(at::kFloat);
    Tensor slots = slot_mapping.scalar_type() == at::kLong ? slot_mapping : slot_mapping.to(at::kLong);
    slots = slots.contiguous();
    TORCH_CHECK_VALUE(slots.numel() == k.size(0) && v.size(0) == k.size(0), "one slot per new token");
    lmserve::KVWrite a{};
    a.k = kv_source(k, k_cache, "k");
    a.v = kv_source(v, v_cache, "v");
    a.k_cache = k_cache.data_ptr();
    a.v_cache = v_cache.data_ptr();
    a.k_sb = k_cache.stride(0), a.k_st = k_cache.stride(1), a.k_sh = k_cache.stride(2);
    a.v_sb = v_cache.stride(0), a.v_st = v_cache.stride(1), a.v_sh = v_cache.stride(2);
    a.cache_bf16 = cache_type == at::kBFloat16;
    a.slots = slots.data_ptr<int64_t>();
    a.T = k.size(0);
    a.Hkv = k_cache.size(2);
    a.D = k_cache.size(3);
    a.num_blocks = k_cache.size(0);
    a.block_size = k_cache.size(1);
    a.nthreads = static_cast<int>(nthreads);
    pybind11::gil_scoped_release nogil;
    lmserve::write_kv(a);
}

// The AVX2 build (LMSERVE_GEMM_ONLY) compiles everything above: linear layers, attention, RMS norm,
// rotary embedding and cache writes. The ops below fall back to their pure-torch versions there.
#ifndef LMSERVE_GEMM_ONLY
Tensor linear_dot(const Tensor& x, const Tensor& w, int64_t n, const std::optional<Tensor>& bias, int64_t epilogue,
                  int64_t nthreads) {
    TORCH_CHECK(lmserve::cpu_has_bf16_dot(), "this CPU has no AVX512_BF16 dot-product instructions");
    return linear_impl(x, w, n, bias, epilogue, nthreads, true);
}

// qkv [T, 3 * H * D] fp32 (rows may be strided), starts [S + 1] int64; returns [T, H * D] fp32.
Tensor encoder_attention(const Tensor& qkv, const Tensor& starts_in, int64_t heads, double scale, int64_t nthreads) {
    check_rows(qkv, "qkv", at::kFloat, 2);
    TORCH_CHECK_VALUE(heads > 0 && qkv.size(1) % (3 * heads) == 0, "qkv's width ", qkv.size(1),
                      " is not 3 x ", heads, " heads x head_dim");
    const Tensor starts = starts_in.to(at::kLong).contiguous();
    TORCH_CHECK_VALUE(starts.dim() == 1 && starts.numel() >= 1, "starts must be a vector of S + 1 offsets");
    Tensor out = torch::empty({qkv.size(0), qkv.size(1) / 3}, qkv.options());
    lmserve::EncoderAttentionArgs a{};
    a.qkv = qkv.data_ptr<float>();
    a.ld = qkv.stride(0);
    a.out = out.data_ptr<float>();
    a.ldo = out.stride(0);
    a.starts = starts.data_ptr<int64_t>();
    a.S = starts.numel() - 1;
    a.T = qkv.size(0);
    a.H = heads;
    a.D = qkv.size(1) / (3 * heads);
    a.scale = static_cast<float>(scale);
    a.nthreads = static_cast<int>(nthreads);
    {
        pybind11::gil_scoped_release nogil;
        lmserve::encoder_attention(a);
    }
    return out;
}

Tensor argmax_rows(const Tensor& x_in, int64_t nthreads) {
    TORCH_CHECK_VALUE(x_in.device().is_cpu() && x_in.dim() == 2, "x must be a 2-D CPU tensor");
    TORCH_CHECK_VALUE(x_in.size(1) > 0 && x_in.size(1) <= INT32_MAX, "rows must have 1 to 2^31 - 1 elements");
    const Tensor x = as_rows(x_in);
    Tensor out = torch::empty({x.size(0)}, x.options().dtype(at::kLong));
    {
        pybind11::gil_scoped_release nogil;
        lmserve::argmax_rows(x.data_ptr<float>(), x.stride(0), x.size(0), x.size(1), out.data_ptr<int64_t>(),
                             static_cast<int>(nthreads));
    }
    return out;
}

Tensor silu_and_mul(const Tensor& x_in, int64_t nthreads) {
    TORCH_CHECK_VALUE(x_in.device().is_cpu() && x_in.dim() >= 1, "x must be a CPU tensor");
    TORCH_CHECK_VALUE(x_in.size(-1) % 2 == 0, "silu_and_mul needs an even last dimension");
    const Tensor x = as_rows(x_in);
    const int64_t inter = x.size(1) / 2;
    Tensor out = torch::empty({x.size(0), inter}, x.options());
    {
        pybind11::gil_scoped_release nogil;
        lmserve::silu_and_mul(x.data_ptr<float>(), x.stride(0), out.data_ptr<float>(), out.stride(0), x.size(0), inter,
                              static_cast<int>(nthreads));
    }
    if (x_in.dim() != 2) out = out.view(out_shape(x_in, inter));
    return x_in.scalar_type() == at::kFloat ? out : out.to(x_in.scalar_type());
}

#endif  // LMSERVE_GEMM_ONLY

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("linear", &linear, "y = x W^T (+ bias) with a packed bf16 weight");
    m.def("pack_linear", &pack_linear, "bf16 W [N, K] (and an up half) in the panel or pair layout");
    m.def("panels_to_pairs", &panels_to_pairs, "panels re-laid in the pair layout");
    m.def("linear_quant", &linear_quant, "y = x W^T (+ bias) with a quantized weight (kernels/quant.py)");
    m.def("paged_attention", &paged_attention, "causal attention over a paged KV cache");
    m.def("attention_supports_head_dim", &lmserve::attention_supports_head_dim);
    m.def("rms_norm", &rms_norm, "RMS norm with an optional fused residual add");
    m.def("rotary_embedding", &rotary_embedding, "rotary position embedding of q and k, in place");
    m.def("write_kv", &write_kv, "store new keys/values at their cache slots");
#ifndef LMSERVE_GEMM_ONLY
    m.def("linear_dot", &linear_dot, "y = x W^T (+ bias) with a pair-packed bf16 weight and vdpbf16ps");
    m.def("silu_and_mul", &silu_and_mul, "silu(x[:, :I]) * x[:, I:]");
    m.def("argmax_rows", &argmax_rows, "the index of each row's largest value (the first on ties), as torch.argmax");
    m.def("encoder_attention", &encoder_attention, "bidirectional attention within each text of a packed batch");
    m.def("encoder_attention_supports_head_dim", &lmserve::encoder_attention_supports_head_dim);
#endif
    m.attr("PANEL") = lmserve::kPanel;
}
