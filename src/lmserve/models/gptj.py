"""GPT-J: attention and MLP side by side on one LayerNorm, interleaved partial rotary, lm_head bias."""

from __future__ import annotations

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
    merged=(("qkv_proj", "q_proj", "q"), ("qkv_proj", "k_proj", "k"), ("qkv_proj", "v_proj", "v")),
    renames=(("transformer.h.", "model.layers."), ("transformer.", "model."), (".attn.", ".self_attn.")),
    ignore=(".attn.bias", ".attn.masked_bias"),  # causal-mask buffers of older checkpoints
)


class GPTJAttention(Module):
    def __init__(self, cfg: ModelConfig, state: ParallelState, index: int) -> None:
        super().__init__()
        heads, d = cfg.num_heads, cfg.head_dim
        self.qkv_proj = QKVParallelLinear(cfg.hidden_size, d, heads, heads, dtype=cfg.dtype, state=state)
        self.out_proj = RowParallelLinear(heads * d, cfg.hidden_size, dtype=cfg.dtype, state=state,
                                          in_split=HeadLayout(heads, d))
        self.heads, self.kv_heads, self.head_dim = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads, d
        rotary_dim = int(cfg.get("rotary_dim", default=d))
        self.rotary = get_rope(d, rotary_dim, cfg.max_model_len, 10000.0, neox_style=False)
        self.attn = PagedAttention(self.heads, self.kv_heads, d, index)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, ctx: ForwardContext,
                sampled: SampledRows | None = None) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).chunk(3, dim=-1)
        n = x.shape[0]
        q, k = self.rotary(positions, q.view(n, self.heads, self.head_dim), k.view(n, self.kv_heads, self.head_dim))
        return self.out_proj(self.attn(q, k, v, ctx, sampled))


class GPTJMLP(Module):
    def __init__(self, cfg: ModelConfig, state: ParallelState) -> None:
        super().__init__()
        inner = int(cfg.get("n_inner", default=4 * cfg.hidden_size))
        self.fc_in = ColumnParallelLinear(cfg.hidden_size, [inner], True, cfg.dtype, state)
        self.fc_out = RowParallelLinear(inner, cfg.hidden_size, True, cfg.dtype, state)
        self.act = get_activation(cfg.get("activation_function", default="gelu_new"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(self.act(self.fc_in(x)))


class GPTJBlock(Module):
    def __init__(self, cfg: ModelConfig, state: ParallelState, index: int) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(cfg.hidden_size, float(cfg.get("layer_norm_epsilon", default=1e-5)), dtype=cfg.dtype)
        self.self_attn = GPTJAttention(cfg, state, index)
        self.mlp = GPTJMLP(cfg, state)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, ctx: ForwardContext,
                sampled: SampledRows | None = None) -> torch.Tensor:
        h = self.ln_1(x)
        attn = self.self_attn(positions, h, ctx, sampled)
        return take(x, sampled) + attn + self.mlp(take(h, sampled))


class GPTJModel(Module):
    def __init__(self, cfg: ModelConfig, state: ParallelState) -> None:
        super().__init__()
        self.act_dtype = cfg.act_dtype
        self.wte = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, cfg.dtype, state)
        self.layers = nn.ModuleList(GPTJBlock(cfg, state, i) for i in range(cfg.num_layers))
        self.ln_f = LayerNorm(cfg.hidden_size, float(cfg.get("layer_norm_epsilon", default=1e-5)), dtype=cfg.dtype)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        x = self.wte(input_ids, self.act_dtype)
        for layer, sampled in each_layer(self.layers, ctx):
            x = layer(positions, x, ctx, sampled)
        return self.ln_f(x)


class GPTJForCausalLM(CausalLM):
    weights = WEIGHTS
    finishes_sampled_rows_only = True

    def __init__(self, cfg: ModelConfig, state: ParallelState) -> None:
        super().__init__()
        self.model = GPTJModel(cfg, state)
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, cfg.dtype, state, bias=True)
