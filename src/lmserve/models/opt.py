"""OPT: learned positions offset by 2, ReLU MLP, pre- or post-LayerNorm, optional embedding projections."""

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
    ReplicatedLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from lmserve.parallel.sharding import HeadLayout
from lmserve.parallel.state import ParallelState

POSITION_OFFSET = 2  # OPT's position table keeps two extra rows in front (a fairseq legacy)

# Causal-LM checkpoints say "model.decoder.", bare OPTModel checkpoints (facebook/opt-*) "decoder.".
WEIGHTS = WeightMap(
    merged=(("qkv_proj", "q_proj", "q"), ("qkv_proj", "k_proj", "k"), ("qkv_proj", "v_proj", "v")),
    renames=(("model.decoder.", "model."), ("decoder.", "model.")),
    ignore=("lm_head.weight",),  # tied to the token embedding
)


class OPTAttention(Module):
    def __init__(self, cfg: ModelConfig, state: ParallelState, index: int) -> None:
        super().__init__()
        heads, d, bias = cfg.num_heads, cfg.head_dim, bool(cfg.get("enable_bias", default=True))
        self.qkv_proj = QKVParallelLinear(cfg.hidden_size, d, heads, heads, bias=bias, dtype=cfg.dtype, state=state)
        self.out_proj = RowParallelLinear(heads * d, cfg.hidden_size, bias=bias, dtype=cfg.dtype, state=state,
                                          in_split=HeadLayout(heads, d))
        self.heads, self.kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.attn = PagedAttention(self.heads, self.kv_heads, d, index)

    def forward(self, x: torch.Tensor, ctx: ForwardContext, sampled: SampledRows | None = None) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).chunk(3, dim=-1)
        return self.out_proj(self.attn(q, k, v, ctx, sampled))


class OPTDecoderLayer(Module):
    def __init__(self, cfg: ModelConfig, state: ParallelState, index: int) -> None:
        super().__init__()
        bias, affine = bool(cfg.get("enable_bias", default=True)), bool(cfg.get("layer_norm_elementwise_affine",
                                                                               default=True))
        ffn = int(cfg.get("ffn_dim"))
        self.pre_norm = bool(cfg.get("do_layer_norm_before", default=True))
        self.self_attn = OPTAttention(cfg, state, index)
        self.self_attn_layer_norm = LayerNorm(cfg.hidden_size, elementwise_affine=affine, dtype=cfg.dtype)
        self.fc1 = ColumnParallelLinear(cfg.hidden_size, [ffn], bias, cfg.dtype, state)
        self.fc2 = RowParallelLinear(ffn, cfg.hidden_size, bias, cfg.dtype, state)
        self.final_layer_norm = LayerNorm(cfg.hidden_size, elementwise_affine=affine, dtype=cfg.dtype)
        self.act = get_activation(cfg.get("activation_function", default="relu"))

    def forward(self, x: torch.Tensor, ctx: ForwardContext, sampled: SampledRows | None = None) -> torch.Tensor:
        if self.pre_norm:
            x = take(x, sampled) + self.self_attn(self.self_attn_layer_norm(x), ctx, sampled)
            return x + self.fc2(self.act(self.fc1(self.final_layer_norm(x))))
        x = self.self_attn_layer_norm(take(x, sampled) + self.self_attn(x, ctx, sampled))
        return self.final_layer_norm(x + self.fc2(self.act(self.fc1(x))))


class OPTModel(Module):
    def __init__(self, cfg: ModelConfig, state: ParallelState) -> None:
        super().__init__()
        self.act_dtype = cfg.act_dtype
        hidden, proj = cfg.hidden_size, int(cfg.get("word_embed_proj_dim", default=cfg.hidden_size))
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, proj, cfg.dtype, state)
        positions = int(cfg.get("max_position_embeddings")) + POSITION_OFFSET
        self.embed_positions = Embedding(positions, hidden, dtype=cfg.dtype)
        # project_in/out map between a narrower embedding and the hidden size (OPT-350m).
        self.project_in = ReplicatedLinear(proj, hidden, dtype=cfg.dtype, state=state) if proj != hidden else None
        self.project_out = ReplicatedLinear(hidden, proj, dtype=cfg.dtype, state=state) if proj != hidden else None
        self.layers = nn.ModuleList(OPTDecoderLayer(cfg, state, i) for i in range(cfg.num_layers))
        keep_final = cfg.get("do_layer_norm_before", default=True) and not cfg.get("_remove_final_layer_norm",
                                                                                   default=False)
        affine = bool(cfg.get("layer_norm_elementwise_affine", default=True))
        self.final_layer_norm = LayerNorm(hidden, elementwise_affine=affine, dtype=cfg.dtype) if keep_final else None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        x = self.embed_tokens(input_ids, self.act_dtype)
        if self.project_in is not None:
            x = self.project_in(x)
        x = x + self.embed_positions(positions + POSITION_OFFSET).to(self.act_dtype)
        for layer, sampled in each_layer(self.layers, ctx):
            x = layer(x, ctx, sampled)
        if self.final_layer_norm is not None:
            x = self.final_layer_norm(x)
        return x if self.project_out is None else self.project_out(x)


class OPTForCausalLM(CausalLM):
    weights = WEIGHTS
    finishes_sampled_rows_only = True

    def __init__(self, cfg: ModelConfig, state: ParallelState) -> None:
        super().__init__()
        if not cfg.get("tie_word_embeddings", default=True):
            raise UnsupportedModelError("OPT with tie_word_embeddings=false is not supported")
        self.model = OPTModel(cfg, state)
        proj = int(cfg.get("word_embed_proj_dim", default=cfg.hidden_size))
        self.lm_head = ParallelLMHead(cfg.vocab_size, proj, cfg.dtype, state)
        self.lm_head.weight = self.model.embed_tokens.weight  # tied: one tensor, split by vocabulary alike
