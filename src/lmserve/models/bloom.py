"""BLOOM: ALiBi instead of positions, per-head fused q/k/v, a LayerNorm right after the embedding."""

from __future__ import annotations

import torch
from torch import nn

from lmserve.errors import UnsupportedModelError
from lmserve.models.config import ModelConfig
from lmserve.models.layers import (
    CausalLM,
    ForwardContext,
    LayerNorm,
    Module,
    PagedAttention,
    SampledRows,
    alibi_slopes,
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
)
from lmserve.parallel.sharding import HeadLayout, query_heads
from lmserve.parallel.state import ParallelState

# Checkpoints say "transformer.h.0..." or, saved from the bare model (bigscience/bloom-*), "h.0...".
# The MLP names contain "h." too, so they are renamed first; then "h." only starts a layer name.
WEIGHTS = WeightMap(
    renames=(("transformer.", ""), ("dense_h_to_4h.", "up_proj."), ("dense_4h_to_h.", "down_proj."),
             ("h.", "model.layers."), ("word_embeddings", "model.word_embeddings"), ("ln_f.", "model.ln_f."),
             (".self_attention.", ".self_attn.")),
    ignore=("lm_head.weight",),  # tied to the word embedding
)


class BloomAttention(Module):
    def __init__(self, cfg: ModelConfig, state: ParallelState, index: int) -> None:
        super().__init__()
        heads, d = cfg.num_heads, cfg.head_dim
        self.query_key_value = QKVParallelLinear(cfg.hidden_size, d, heads, heads, bias=True, dtype=cfg.dtype,
                                                 state=state, fused="per_head")
        self.dense = RowParallelLinear(heads * d, cfg.hidden_size, bias=True, dtype=cfg.dtype, state=state,
                                       in_split=HeadLayout(heads, d))
        self.heads, self.kv_heads = self.query_key_value.num_heads, self.query_key_value.num_kv_heads
        mine = query_heads(heads, state.world_size, state.rank)  # each rank biases only its own heads
        slopes = alibi_slopes(heads)[mine.start:mine.stop].contiguous()
        self.attn = PagedAttention(self.heads, self.kv_heads, d, index, alibi_slopes=slopes)

    def forward(self, x: torch.Tensor, ctx: ForwardContext, sampled: SampledRows | None = None) -> torch.Tensor:
        q, k, v = self.query_key_value(x).chunk(3, dim=-1)
        return self.dense(self.attn(q, k, v, ctx, sampled))


class BloomMLP(Module):
    def __init__(self, cfg: ModelConfig, state: ParallelState) -> None:
        super().__init__()
        self.up_proj = ColumnParallelLinear(cfg.hidden_size, [4 * cfg.hidden_size], True, cfg.dtype, state)
        self.down_proj = RowParallelLinear(4 * cfg.hidden_size, cfg.hidden_size, True, cfg.dtype, state)
        self.act = get_activation("bloom_gelu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.up_proj(x)))


class BloomBlock(Module):
    def __init__(self, cfg: ModelConfig, state: ParallelState, index: int) -> None:
        super().__init__()
        eps = float(cfg.get("layer_norm_epsilon", default=1e-5))
        # Some BLOOM variants add the residual after the LayerNorm rather than before it.
        self.residual_after_norm = bool(cfg.get("apply_residual_connection_post_layernorm", default=False))
        self.input_layernorm = LayerNorm(cfg.hidden_size, eps, dtype=cfg.dtype)
        self.self_attn = BloomAttention(cfg, state, index)
        self.post_attention_layernorm = LayerNorm(cfg.hidden_size, eps, dtype=cfg.dtype)
        self.mlp = BloomMLP(cfg, state)

    def forward(self, x: torch.Tensor, ctx: ForwardContext, sampled: SampledRows | None = None) -> torch.Tensor:
        h = self.input_layernorm(x)
        x = take(h if self.residual_after_norm else x, sampled) + self.self_attn(h, ctx, sampled)
        h = self.post_attention_layernorm(x)
        return (h if self.residual_after_norm else x) + self.mlp(h)


class BloomModel(Module):
    def __init__(self, cfg: ModelConfig, state: ParallelState) -> None:
        super().__init__()
        eps = float(cfg.get("layer_norm_epsilon", default=1e-5))
        self.act_dtype = cfg.act_dtype
        self.word_embeddings = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, cfg.dtype, state)
        self.word_embeddings_layernorm = LayerNorm(cfg.hidden_size, eps, dtype=cfg.dtype)
        self.layers = nn.ModuleList(BloomBlock(cfg, state, i) for i in range(cfg.num_layers))
        self.ln_f = LayerNorm(cfg.hidden_size, eps, dtype=cfg.dtype)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        x = self.word_embeddings_layernorm(self.word_embeddings(input_ids, self.act_dtype))
        for layer, sampled in each_layer(self.layers, ctx):
            x = layer(x, ctx, sampled)
        return self.ln_f(x)


class BloomForCausalLM(CausalLM):
    weights = WEIGHTS
    finishes_sampled_rows_only = True

    def __init__(self, cfg: ModelConfig, state: ParallelState) -> None:
        super().__init__()
        if not cfg.get("tie_word_embeddings", default=True):
            raise UnsupportedModelError("BLOOM with tie_word_embeddings=false is not supported")
        self.model = BloomModel(cfg, state)
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, cfg.dtype, state)
        self.lm_head.weight = self.model.word_embeddings.weight  # tied: one tensor, split by vocabulary alike
