"""The Llama family: Llama 1/2/3, Mistral, SmolLM, and Qwen2 (Llama with q/k/v biases)."""

from __future__ import annotations

import torch
from torch import nn

from lmserve.models.config import ModelConfig
from lmserve.models.layers import (
    CausalLM,
    ForwardContext,
    Module,
    PagedAttention,
    RMSNorm,
    SampledRows,
    each_layer,
    get_rope,
    take,
)
from lmserve.models.weights import WeightMap
from lmserve.parallel.layers import (
    GateUpSwiGLU,
    ParallelLMHead,
    QKVParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from lmserve.parallel.sharding import HeadLayout
from lmserve.parallel.state import ParallelState

WEIGHTS = WeightMap(
    merged=(("qkv_proj", "q_proj", "q"), ("qkv_proj", "k_proj", "k"), ("qkv_proj", "v_proj", "v"),
            ("gate_up_proj", "gate_proj", 0), ("gate_up_proj", "up_proj", 1)),
    tied={"lm_head.weight": "model.embed_tokens.weight"},
)


class LlamaAttention(Module):
    def __init__(self, cfg: ModelConfig, state: ParallelState, index: int, qkv_bias: bool) -> None:
        super().__init__()
        self.qkv_proj = QKVParallelLinear(cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads,
                                          bias=qkv_bias, dtype=cfg.dtype, state=state)
        self.o_proj = RowParallelLinear(cfg.num_heads * cfg.head_dim, cfg.hidden_size,
                                        bias=bool(cfg.get("attention_bias", default=False)), dtype=cfg.dtype,
                                        state=state, in_split=HeadLayout(cfg.num_heads, cfg.head_dim))
        self.rotary = get_rope(cfg.head_dim, cfg.head_dim, cfg.max_model_len,
                               float(cfg.get("rope_theta", default=10000.0)), scaling=cfg.get("rope_scaling"))
        self.heads, self.kv_heads, self.head_dim = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads, cfg.head_dim
        self.attn = PagedAttention(self.heads, self.kv_heads, cfg.head_dim, index)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, ctx: ForwardContext,
                sampled: SampledRows | None = None) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split([self.heads * self.head_dim, self.kv_heads * self.head_dim,
                                          self.kv_heads * self.head_dim], dim=-1)
        n = x.shape[0]
        q, k = self.rotary(positions, q.view(n, self.heads, self.head_dim), k.view(n, self.kv_heads, self.head_dim))
        return self.o_proj(self.attn(q, k, v, ctx, sampled))


class LlamaMLP(Module):
    def __init__(self, cfg: ModelConfig, state: ParallelState) -> None:
        super().__init__()
        inter = int(cfg.get("intermediate_size"))
        bias = bool(cfg.get("mlp_bias", default=False))
        self.gate_up_proj = GateUpSwiGLU(cfg.hidden_size, inter, bias, cfg.dtype, state)
        self.down_proj = RowParallelLinear(inter, cfg.hidden_size, bias, cfg.dtype, state)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.gate_up_proj(x))


class LlamaDecoderLayer(Module):
    def __init__(self, cfg: ModelConfig, state: ParallelState, index: int, qkv_bias: bool) -> None:
        super().__init__()
        eps = float(cfg.get("rms_norm_eps", default=1e-6))
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps, cfg.dtype)
        self.self_attn = LlamaAttention(cfg, state, index, qkv_bias)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps, cfg.dtype)
        self.mlp = LlamaMLP(cfg, state)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None,
                ctx: ForwardContext, sampled: SampledRows | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """With ``sampled``, the rows after attention are those rows only."""
        x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(positions, x, ctx, sampled)
        residual = take(residual, sampled)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class LlamaModel(Module):
    def __init__(self, cfg: ModelConfig, state: ParallelState, qkv_bias: bool) -> None:
        super().__init__()
        self.act_dtype = cfg.act_dtype
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, cfg.dtype, state)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, state, i, qkv_bias) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, float(cfg.get("rms_norm_eps", default=1e-6)), cfg.dtype)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        x = self.embed_tokens(input_ids, self.act_dtype)
        residual = None
        for layer, sampled in each_layer(self.layers, ctx):
            x, residual = layer(positions, x, residual, ctx, sampled)
        return self.norm(x, residual)[0]


class LlamaForCausalLM(CausalLM):
    weights = WEIGHTS
    finishes_sampled_rows_only = True
    qkv_bias = False  # whether q/k/v have biases when config.json has no ``attention_bias`` to say

    def __init__(self, cfg: ModelConfig, state: ParallelState) -> None:
        super().__init__()
        self.model = LlamaModel(cfg, state, bool(cfg.get("attention_bias", default=self.qkv_bias)))
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, cfg.dtype, state)


class Qwen2ForCausalLM(LlamaForCausalLM):
    """Qwen2: Llama with biases on q, k and v, which its config.json does not mention."""

    qkv_bias = True
