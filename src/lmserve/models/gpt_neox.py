"""GPT-NeoX (Pythia): per-head fused q/k/v, partial neox-style rotary, parallel or sequential residual."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lmserve.models.config import ModelConfig
from lmserve.models.layers import (
    CausalLM,
    ForwardContext,
    LayerNorm,
    Module,
    PagedAttention,
    SampledRows,
    each_layer,
    get_activation,
    get_rope,
    take,
)
from lmserve.models.weights import WeightMap
from lmserve.parallel.layers import (
    ColumnParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from lmserve.parallel.sharding import HeadLayout
from lmserve.parallel.state import ParallelState

WEIGHTS = WeightMap(
    renames=(("gpt_neox.", "model."), (".attention.", ".self_attn.")),
    ignore=(".attention.bias", ".attention.masked_bias", "rotary_emb.inv_freq"),
    tied={"embed_out.weight": "gpt_neox.embed_in.weight"},  # used only when the head is tied
)


def rope_settings(cfg: ModelConfig) -> tuple[float, float, dict[str, Any] | None]:
    """(partial rotary factor, base, scaling): newer configs nest them in ``rope_parameters``."""
    rope = cfg.get("rope_parameters", default={})
    pct = float(rope.get("partial_rotary_factor") or cfg.get("rotary_pct", default=1.0))
    base = float(rope.get("rope_theta") or cfg.get("rotary_emb_base", "rope_theta", default=10000.0))
    scaling = rope if rope.get("rope_type", "default") != "default" else cfg.get("rope_scaling")
    return pct, base, scaling


class GPTNeoXAttention(Module):
    def __init__(self, cfg: ModelConfig, state: ParallelState, index: int) -> None:
        super().__init__()
        heads, d = cfg.num_heads, cfg.head_dim
        bias = bool(cfg.get("attention_bias", default=True))
        self.query_key_value = QKVParallelLinear(cfg.hidden_size, d, heads, heads, bias=bias, dtype=cfg.dtype,
                                                 state=state, fused="per_head")
        self.dense = RowParallelLinear(heads * d, cfg.hidden_size, bias=bias, dtype=cfg.dtype, state=state,
                                       in_split=HeadLayout(heads, d))
        self.heads, self.kv_heads, self.head_dim = self.query_key_value.num_heads, self.query_key_value.num_kv_heads, d
        pct, base, scaling = rope_settings(cfg)
        self.rotary = get_rope(d, int(d * pct), cfg.max_model_len, base, neox_style=True, scaling=scaling)
        self.attn = PagedAttention(self.heads, self.kv_heads, d, index)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, ctx: ForwardContext,
                sampled: SampledRows | None = None) -> torch.Tensor:
        q, k, v = self.query_key_value(x).chunk(3, dim=-1)
        n = x.shape[0]
        q, k = self.rotary(positions, q.view(n, self.heads, self.head_dim), k.view(n, self.kv_heads, self.head_dim))
        return self.dense(self.attn(q, k, v, ctx, sampled))


class GPTNeoXMLP(Module):
    def __init__(self, cfg: ModelConfig, state: ParallelState) -> None:
        super().__init__()
        inner = int(cfg.get("intermediate_size"))
        self.dense_h_to_4h = ColumnParallelLinear(cfg.hidden_size, [inner], True, cfg.dtype, state)
        self.dense_4h_to_h = RowParallelLinear(inner, cfg.hidden_size, True, cfg.dtype, state)
        self.act = get_activation(cfg.get("hidden_act", default="gelu"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(x)))


class GPTNeoXLayer(Module):
    def __init__(self, cfg: ModelConfig, state: ParallelState, index: int) -> None:
        super().__init__()
        eps = float(cfg.get("layer_norm_eps", default=1e-5))
        self.parallel_residual = bool(cfg.get("use_parallel_residual", default=True))
        self.input_layernorm = LayerNorm(cfg.hidden_size, eps, dtype=cfg.dtype)
        self.post_attention_layernorm = LayerNorm(cfg.hidden_size, eps, dtype=cfg.dtype)
        self.self_attn = GPTNeoXAttention(cfg, state, index)
        self.mlp = GPTNeoXMLP(cfg, state)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, ctx: ForwardContext,
                sampled: SampledRows | None = None) -> torch.Tensor:
        attn = self.self_attn(positions, self.input_layernorm(x), ctx, sampled)
        x = take(x, sampled)
        if self.parallel_residual:  # x + attn(ln1(x)) + mlp(ln2(x))
            return x + attn + self.mlp(self.post_attention_layernorm(x))
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x))


class GPTNeoXModel(Module):
    def __init__(self, cfg: ModelConfig, state: ParallelState) -> None:
        super().__init__()
        self.act_dtype = cfg.act_dtype
        self.embed_in = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, cfg.dtype, state)
        self.layers = nn.ModuleList(GPTNeoXLayer(cfg, state, i) for i in range(cfg.num_layers))
        self.final_layer_norm = LayerNorm(cfg.hidden_size, float(cfg.get("layer_norm_eps", default=1e-5)),
                                          dtype=cfg.dtype)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        x = self.embed_in(input_ids, self.act_dtype)
        for layer, sampled in each_layer(self.layers, ctx):
            x = layer(positions, x, ctx, sampled)
        return self.final_layer_norm(x)


class GPTNeoXForCausalLM(CausalLM):
    weights = WEIGHTS
    finishes_sampled_rows_only = True

    def __init__(self, cfg: ModelConfig, state: ParallelState) -> None:
        super().__init__()
        self.model = GPTNeoXModel(cfg, state)
        self.embed_out = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, cfg.dtype, state)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # the head keeps its checkpoint name
        return self.embed_out(hidden)
