"""A padding-free forward pass of a BERT encoder, for the text-embedding handler.

A dynamic batch holds texts of different lengths. Padded to the longest, every linear layer, the
LayerNorms and the GELU also run over the padding, which is 20-40% of the work for a batch of short
sentences. Here those run over the real tokens only, concatenated into one ``[tokens, hidden]``
matrix (one large matmul per layer, as efficient as the padded one); only attention, which mixes
tokens within a text, scatters them into a padded ``[texts, heads, longest, head_dim]`` layout and
gathers them back. It is the same arithmetic as Hugging Face's ``BertModel`` in the same dtype, so
its vectors match (the handler's tests compare them against transformers).

Only plain BERT (absolute positions, GELU, no cross-attention) qualifies; ``PackedBert.supports``
says whether a model does, and the handler keeps transformers' padded forward for the others.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 (the usual name)


class PackedBert:
    """The encoder of a ``transformers`` ``BertModel`` run over packed tokens (see the module docstring)."""

    def __init__(self, model: Any) -> None:
        self.embeddings = model.embeddings
        self.layers = []
        for layer in model.encoder.layer:
            attention = layer.attention.self
            # q|k|v as one matmul: one pass over the activations instead of three.
            qkv_weight = torch.cat([attention.query.weight, attention.key.weight, attention.value.weight])
            qkv_bias = torch.cat([attention.query.bias, attention.key.bias, attention.value.bias])
            self.layers.append((qkv_weight.detach(), qkv_bias.detach(), layer))
        self.heads = model.config.num_attention_heads

    @staticmethod
    def supports(model: Any) -> bool:
        """Whether ``model`` is a plain BERT encoder this forward reproduces exactly."""
        config = model.config
        return (getattr(config, "model_type", None) == "bert"
                and getattr(config, "position_embedding_type", "absolute") == "absolute"
                and config.hidden_act == "gelu" and not getattr(config, "add_cross_attention", False)
                and not getattr(config, "is_decoder", False))  # fmt: skip

    def __call__(self, ids: list[list[int]], token_types: list[list[int]] | None = None) -> torch.Tensor:
        """The last hidden state of every text's tokens, concatenated: ``[sum of lengths, hidden]``."""
        lengths = torch.tensor([len(t) for t in ids])
        flat = torch.tensor([token for text in ids for token in text])
        positions = torch.cat([torch.arange(n) for n in lengths.tolist()])
        types = (torch.tensor([t for text in token_types for t in text]) if token_types is not None
                 else torch.zeros_like(flat))  # fmt: skip
        e = self.embeddings
        x = e.word_embeddings(flat) + e.position_embeddings(positions) + e.token_type_embeddings(types)
        x = e.LayerNorm(x)
        # Where each real token sits in the padded [texts * longest] layout attention uses.
        longest = int(lengths.max())
        slots = torch.cat([torch.arange(n) + i * longest for i, n in enumerate(lengths.tolist())])
        key_mask = torch.arange(longest)[None, :] < lengths[:, None]  # [texts, longest]
        for qkv_weight, qkv_bias, layer in self.layers:
            context = self._attention(F.linear(x, qkv_weight, qkv_bias), slots, key_mask, longest)
            attn_out = layer.attention.output
            x = attn_out.LayerNorm(attn_out.dense(context) + x)
            hidden = F.gelu(layer.intermediate.dense(x))
            x = layer.output.LayerNorm(layer.output.dense(hidden) + x)
        return x

    def _attention(self, qkv: torch.Tensor, slots: torch.Tensor, key_mask: torch.Tensor,
                   longest: int) -> torch.Tensor:  # fmt: skip
        """Scaled dot-product attention within each text; ``qkv`` is ``[tokens, 3 * hidden]``."""
        texts, width = key_mask.shape[0], qkv.shape[1]
        padded = qkv.new_zeros(texts * longest, width)
        padded[slots] = qkv
        head_dim = width // 3 // self.heads
        q, k, v = padded.view(texts, longest, 3, self.heads, head_dim).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None, :])
        return out.transpose(1, 2).reshape(texts * longest, width // 3)[slots]


def mean_pool(hidden: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """The mean of each text's rows of the packed ``hidden``: ``[texts, hidden]``."""
    owner = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    sums = hidden.new_zeros(len(lengths), hidden.shape[1]).index_add_(0, owner, hidden)
    return sums / torch.tensor(lengths, dtype=hidden.dtype)[:, None]


def first_token(hidden: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """Each text's first row (the CLS token) of the packed ``hidden``: ``[texts, hidden]``."""
    starts = torch.tensor([0, *lengths[:-1]]).cumsum(0)
    return hidden[starts]
