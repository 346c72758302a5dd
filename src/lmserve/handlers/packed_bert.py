"""A padding-free forward pass of a BERT encoder, for the text-embedding handler.

A dynamic batch holds texts of different lengths. Padded to the longest, every linear layer, the
LayerNorms and the GELU also run over the padding, which is 20-40% of the work for a batch of short
sentences. Here those run over the real tokens only, concatenated into one ``[tokens, hidden]``
matrix (one large matmul per layer, as efficient as the padded one); only attention, which mixes
tokens within a text, scatters them into a padded ``[texts, heads, longest, head_dim]`` layout and
gathers them back. It is the same arithmetic as Hugging Face's ``BertModel`` in the same dtype, so
its vectors match (the handler's tests compare them against transformers).

Attention can also run on the compiled CPU kernels (``kernels/csrc/encoder_attention.cpp``), which
read each text's rows of the packed matrix where they are, with no padded layout at all; the handler
measures at start whether that is faster on this machine (``use_attention_kernel``).

Only plain BERT (absolute positions, GELU, no cross-attention) qualifies; ``PackedBert.supports``
says whether a model does, and the handler keeps transformers' padded forward for the others.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 (the usual name)


class PackedBert:
    """The encoder of a ``transformers`` ``BertModel`` run over packed tokens (see the module docstring)."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.embeddings = model.embeddings
        self.heads = model.config.num_attention_heads
        self.head_dim = model.config.hidden_size // self.heads
        self.set_matmul_dtype(torch.float32)
        self._kernel: Any = None  # the compiled attention, when in use

    def attention_kernel_available(self) -> bool:
        """Whether the compiled attention runs here (an AVX-512 build of the CPU kernels that takes
        this head size); compiling the kernels on first use if need be."""
        return _encoder_attention(self.head_dim) is not None

    def use_attention_kernel(self, on: bool) -> None:
        """Attention on the compiled kernel (``on``, where available) or in torch."""
        self._kernel = _encoder_attention(self.head_dim) if on else None

    @property
    def attention_kernel(self) -> bool:
        return self._kernel is not None

    def set_matmul_dtype(self, dtype: torch.dtype) -> None:
        """Run the matrix products in ``dtype`` (bf16 where the CPU has fast bf16 dot products),
        with the weights converted once here rather than on every call as autocast would; the
        residual stream, LayerNorm, GELU and attention stay fp32."""
        self.dtype = dtype
        self.layers = []
        for layer in self.model.encoder.layer:
            attention = layer.attention.self
            # q|k|v as one matmul: one pass over the activations instead of three.
            qkv = (torch.cat([attention.query.weight, attention.key.weight, attention.value.weight]),
                   torch.cat([attention.query.bias, attention.key.bias, attention.value.bias]))  # fmt: skip
            linears = [qkv, *((m.weight, m.bias) for m in (layer.attention.output.dense, layer.intermediate.dense,
                                                            layer.output.dense))]  # fmt: skip
            weights = [(w.detach().to(dtype), b.detach().to(dtype)) for w, b in linears]
            self.layers.append((weights, layer.attention.output.LayerNorm, layer.output.LayerNorm))

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
        attend = self._kernel_attention(lengths) if self._kernel is not None else self._padded_attention(lengths)
        for (qkv, attn_out, up, down), norm1, norm2 in self.layers:
            context = attend(_linear(x, *qkv))
            x = norm1(_linear(context, *attn_out) + x)
            # GELU between the two MLP products stays in their dtype: in bf16 its output is rounded
            # to bf16 for the next product anyway, and two conversions of the widest activation go.
            x = norm2(_linear(F.gelu(_linear(x, *up, keep_dtype=True)), *down) + x)
        return x

    def _kernel_attention(self, lengths: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        starts = torch.zeros(len(lengths) + 1, dtype=torch.long)
        torch.cumsum(lengths, 0, out=starts[1:])
        scale, kernel = self.head_dim**-0.5, self._kernel
        return lambda qkv: kernel(qkv, starts, self.heads, scale, torch.get_num_threads())

    def _padded_attention(self, lengths: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        # Where each real token sits in the padded [texts * longest] layout torch's attention uses.
        texts, longest = len(lengths), int(lengths.max())
        slots = torch.cat([torch.arange(n) + i * longest for i, n in enumerate(lengths.tolist())])
        padding = _Padding(texts, longest, slots) if len(slots) < texts * longest else None
        return lambda qkv: self._attention(qkv, texts, longest, padding)

    def _attention(self, qkv: torch.Tensor, texts: int, longest: int, padding: _Padding | None) -> torch.Tensor:
        """Scaled dot-product attention within each text; ``qkv`` is ``[tokens, 3 * hidden]``, and
        ``padding`` is None when every text has ``longest`` tokens (one text alone, say).

        Up to ``MATMUL_ATTENTION_UP_TO`` tokens a text, two batched matrix products and a softmax
        over ``[texts, heads, longest, longest]``: for the short texts a dynamic batch holds, about
        twice as fast as ``scaled_dot_product_attention``, whose blocking per text and head costs
        more than the arithmetic (29 texts of 10-20 tokens: 0.4 against 0.9 ms a layer on a 2-core
        machine); both are fp32. Longer texts take ``scaled_dot_product_attention``, which keeps its
        blocks in cache."""
        width = qkv.shape[1]
        padded = qkv
        if padding is not None:
            padded = qkv.new_zeros(texts * longest, width)
            padded[padding.slots] = qkv
        head_dim = width // 3 // self.heads
        q, k, v = padded.view(texts, longest, 3, self.heads, head_dim).permute(2, 0, 3, 1, 4)
        if longest > MATMUL_ATTENTION_UP_TO:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=None if padding is None else padding.key_mask)
        else:
            scores = torch.matmul(q, k.transpose(-1, -2)).mul_(head_dim**-0.5)
            if padding is not None:
                scores.add_(padding.key_bias)
            out = torch.matmul(scores.softmax(dim=-1), v)
        out = out.transpose(1, 2).reshape(texts * longest, width // 3)
        return out if padding is None else out[padding.slots]


MATMUL_ATTENTION_UP_TO = 128  # tokens a text; measured crossover about 256 (2-core AMD EPYC)


class _Padding:
    """Texts of different lengths in the padded layout: where the real tokens sit (``slots``), and
    which keys are real, as a boolean ``[texts, 1, 1, longest]`` mask and as an additive one
    (0 for a real key, -inf for padding)."""

    def __init__(self, texts: int, longest: int, slots: torch.Tensor) -> None:
        self.slots = slots
        real = torch.zeros(texts * longest, dtype=torch.bool)
        real[slots] = True
        self.key_mask = real.view(texts, 1, 1, longest)
        self.key_bias = torch.zeros(self.key_mask.shape).masked_fill_(~self.key_mask, float("-inf"))


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, keep_dtype: bool = False) -> torch.Tensor:
    """``x @ weight.T + bias`` in the weight's dtype, returned in fp32 unless ``keep_dtype``."""
    out = F.linear(x.to(weight.dtype), weight, bias)
    return out if keep_dtype else out.float()


def mean_pool(hidden: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """The mean of each text's rows of the packed ``hidden``: ``[texts, hidden]``."""
    owner = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    sums = hidden.new_zeros(len(lengths), hidden.shape[1]).index_add_(0, owner, hidden)
    return sums / torch.tensor(lengths, dtype=hidden.dtype)[:, None]


def first_token(hidden: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """Each text's first row (the CLS token) of the packed ``hidden``: ``[texts, hidden]``."""
    starts = torch.tensor([0, *lengths[:-1]]).cumsum(0)
    return hidden[starts]


def _encoder_attention(head_dim: int) -> Any:
    """The compiled ``encoder_attention`` where it takes ``head_dim``, else None (no AVX-512 build
    here, kernels switched off)."""
    from lmserve.kernels.ops import get_ops

    ext: Any = getattr(get_ops("cpu"), "ext", None)
    if ext is None or not hasattr(ext, "encoder_attention") or not ext.encoder_attention_supports_head_dim(head_dim):
        return None
    return ext.encoder_attention
