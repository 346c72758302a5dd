"""GPT-2: learned positions, pre-LayerNorm blocks, Conv1D weights ([in, out]) and a fused q|k|v."""

from __future__ import annotations

import torch
from torch import nn

from lmserve.errors import UnsupportedModelError
from lmserve.models.config import ModelConfig
from lmserve.models.layers import (
    CausalLM,
    Embedding,
    ForwardContext,
    LayerNorm,
    Module,
    PagedAttention,
    SampledRows,
    each_layer,
    get_activation,
    take,
)
from lmserve.models.weights import WeightMap
from lmserve.parallel.layers import (
    ColumnParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    conv1d_checkpoint,
)
from lmserve.parallel.sharding import HeadLayout
from lmserve.parallel.state import ParallelState

# Checkpoints name tensors "transformer.h.0.attn..." or, saved from the bare model, "h.0.attn...".
# "h." occurs nowhere else in GPT-2's tensor names, so the prefix can be dropped and "h." renamed.
WEIGHTS = WeightMap(
    renames=(("transformer.", ""), ("h.", "model.layers."), ("wte.", "model.wte."), ("wpe.", "model.wpe."),
             ("ln_f.", "model.ln_f."), (".attn.", ".self_attn.")),
    ignore=(".attn.bias", ".attn.masked_bias", "lm_head.weight"),  # causal-mask buffers; the tied head
)


class GPT2Attention(Module):
    def __init__(self, cfg: ModelConfig, state: ParallelState, index: int) -> None:
        super().__init__()
        heads, d = cfg.num_heads, cfg.head_dim
        self.c_attn = conv1d_checkpoint(QKVParallelLinear(cfg.hidden_size, d, heads, heads, bias=True, dtype=cfg.dtype,
                                                          state=state, fused="qkv"))
        self.c_proj = conv1d_checkpoint(RowParallelLinear(heads * d, cfg.hidden_size, bias=True, dtype=cfg.dtype,
                                                          state=state, in_split=HeadLayout(heads, d)))
        self.heads, self.kv_heads = self.c_attn.num_heads, self.c_attn.num_kv_heads
        scale = d ** -0.5 if cfg.get("scale_attn_weights", default=True) else 1.0
        if cfg.get("scale_attn_by_inverse_layer_idx", default=False):
            scale /= index + 1
        self.attn = PagedAttention(self.heads, self.kv_heads, d, index, scale)

    def forward(self, x: torch.Tensor, ctx: ForwardContext, sampled: SampledRows | None = None) -> torch.Tensor:
        q, k, v = self.c_attn(x).chunk(3, dim=-1)
        return self.c_proj(self.attn(q, k, v, ctx, sampled))


class GPT2MLP(Module):
    def __init__(self, cfg: ModelConfig, state: ParallelState) -> None:
        super().__init__()
        inner = int(cfg.get("n_inner", default=4 * cfg.hidden_size))
        self.c_fc = conv1d_checkpoint(ColumnParallelLinear(cfg.hidden_size, [inner], True, cfg.dtype, state))
        self.c_proj = conv1d_checkpoint(RowParallelLinear(inner, cfg.hidden_size, True, cfg.dtype, state))
        self.act = get_activation(cfg.get("activation_function", default="gelu_new"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class GPT2Block(Module):
    def __init__(self, cfg: ModelConfig, state: ParallelState, index: int) -> None:
        super().__init__()
        eps = float(cfg.get("layer_norm_epsilon", default=1e-5))
        self.ln_1 = LayerNorm(cfg.hidden_size, eps, dtype=cfg.dtype)
        self.self_attn = GPT2Attention(cfg, state, index)
        self.ln_2 = LayerNorm(cfg.hidden_size, eps, dtype=cfg.dtype)
        self.mlp = GPT2MLP(cfg, state)

    def forward(self, x: torch.Tensor, ctx: ForwardContext, sampled: SampledRows | None = None) -> torch.Tensor:
        x = take(x, sampled) + self.self_attn(self.ln_1(x), ctx, sampled)
        return x + self.mlp(self.ln_2(x))


class GPT2Model(Module):
    def __init__(self, cfg: ModelConfig, state: ParallelState) -> None:
        super().__init__()
        self.act_dtype = cfg.act_dtype
        self.wte = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, cfg.dtype, state)
        self.wpe = Embedding(int(cfg.get("n_positions", "max_position_embeddings")), cfg.hidden_size, dtype=cfg.dtype)
        self.layers = nn.ModuleList(GPT2Block(cfg, state, i) for i in range(cfg.num_layers))
        self.ln_f = LayerNorm(cfg.hidden_size, float(cfg.get("layer_norm_epsilon", default=1e-5)), dtype=cfg.dtype)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        x = self.wte(input_ids, self.act_dtype) + self.wpe(positions).to(self.act_dtype)
        for layer, sampled in each_layer(self.layers, ctx):
            x = layer(x, ctx, sampled)
        return self.ln_f(x)


class GPT2LMHeadModel(CausalLM):
    weights = WEIGHTS
    finishes_sampled_rows_only = True

    def __init__(self, cfg: ModelConfig, state: ParallelState) -> None:
        super().__init__()
        if not cfg.get("tie_word_embeddings", default=True):
            raise UnsupportedModelError("GPT-2 with tie_word_embeddings=false is not supported")
        self.model = GPT2Model(cfg, state)
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, cfg.dtype, state)
        self.lm_head.weight = self.model.wte.weight  # tied: one tensor, split by vocabulary alike
