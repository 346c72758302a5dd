"""The default handlers for encoder models: text embeddings (``embed``) and text classification
(``classify``). They run in handler workers like any ``model.py``, batched by the dynamic batcher.

Request body: ``{"inputs": str | [str]}``. Every text of every request of a batch goes through the
model in one forward pass, truncated to the model's length: for plain BERT checkpoints without any
padding (``packed_bert.py``), for the others padded to the longest text.

Matrix products run in bf16 (the rest, LayerNorm included, in fp32) when ``option.dtype`` is
bf16, or when it is ``auto`` and, measured once at start on this machine, bf16 is faster and its
vectors stay within cosine 0.9999 of fp32 ones; else in fp32. Attention runs on the compiled CPU
kernel where it measured faster at start. The packed forward of a large batch may run in pieces of
a few hundred tokens, when that measured faster at start (it keeps each layer's activations in
cache); the vectors are the same.

- ``embed`` answers a list of vectors, one per text: the pooled last hidden state (mean over the
  real tokens unless the checkpoint's ``1_Pooling/config.json`` asks for the CLS token), L2
  normalised, as sentence-transformers computes it. The ``x-prompt-tokens`` header counts tokens.
- ``classify`` answers ``[{"label", "score"}]``, the most likely label of each text and its
  softmax probability.

A request that is not of that shape gets its own 400; the others of its batch are answered.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lmserve.handlers.io import Input, Output

logger = logging.getLogger(__name__)
_models: dict[str, Any] = {}


class _Encoder:
    """A tokenizer and model from ``model_id``; ``head`` picks the transformers class."""

    def __init__(self, model_id: str, head: str) -> None:
        import torch
        import transformers

        self.torch = torch
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(model_id)
        model_class = getattr(transformers, head)
        self.model = model_class.from_pretrained(model_id).float().eval()  # fp32: the reference numbers
        pooling = Path(model_id) / "1_Pooling" / "config.json"
        self.cls_pooling = pooling.is_file() and bool(json.loads(pooling.read_text()).get("pooling_mode_cls_token"))
        limit = getattr(self.model.config, "max_position_embeddings", 512)
        self.max_length = min(int(self.tokenizer.model_max_length or limit), int(limit))
        self.bf16 = False  # matrix products in bf16 (see the module docstring); set by the handler

    def encode(self, texts: list[str]) -> tuple[Any, Any, Any]:
        """(model output, attention mask, token counts) for ``texts`` in one forward pass."""
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        with self.torch.inference_mode(), self.torch.autocast("cpu", self.torch.bfloat16, enabled=self.bf16):
            output = self.model(**batch)
        mask = batch["attention_mask"]
        return output, mask, mask.sum(dim=1).tolist()


class _Embedder(_Encoder):
    """``embed``'s model: pooled, L2-normalised vectors, padding-free where the model allows."""

    def __init__(self, model_id: str) -> None:
        super().__init__(model_id, "AutoModel")
        from lmserve.handlers.packed_bert import PackedBert

        self.packed = PackedBert(self.model) if PackedBert.supports(self.model) else None
        self.chunk_tokens: int | None = None  # packed forward in pieces of at most this many tokens

    def set_bf16(self, on: bool) -> None:
        """Matrix products in bf16 (``on``) or fp32."""
        self.bf16 = on
        if self.packed is not None:
            self.packed.set_matmul_dtype(self.torch.bfloat16 if on else self.torch.float32)

    def vectors(self, texts: list[str]) -> tuple[Any, list[int]]:
        """``[texts, hidden]`` unit vectors and each text's token count."""
        torch = self.torch
        if self.packed is None:
            output, mask, counts = self.encode(texts)
            hidden = output.last_hidden_state.float()
            if self.cls_pooling:
                pooled = hidden[:, 0]
            else:
                weights = mask.unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2, dim=1), counts
        from lmserve.handlers.packed_bert import first_token, mean_pool

        batch = self.tokenizer(texts, truncation=True, max_length=self.max_length)
        ids, types = batch["input_ids"], batch.get("token_type_ids")
        counts = [len(t) for t in ids]
        with torch.inference_mode():
            pieces = [self.packed(ids[a:b], types[a:b] if types is not None else None)
                      for a, b in _pieces(counts, self.chunk_tokens)]  # fmt: skip
        hidden = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
        pooled = first_token(hidden, counts) if self.cls_pooling else mean_pool(hidden, counts)
        return torch.nn.functional.normalize(pooled, p=2, dim=1), counts


def _pieces(counts: list[int], limit: int | None) -> list[tuple[int, int]]:
    """Consecutive ranges of texts holding at most ``limit`` tokens each (a longer text alone)."""
    if limit is None:
        return [(0, len(counts))]
    ranges, start, tokens = [], 0, 0
    for i, count in enumerate(counts):
        if tokens + count > limit and i > start:
            ranges.append((start, i))
            start, tokens = i, 0
        tokens += count
    ranges.append((start, len(counts)))
    return ranges


def _best_times(options: tuple[Any, ...], apply: Callable[[Any], None],
                run: Callable[[], Any]) -> tuple[dict[Any, float], dict[Any, Any]]:  # fmt: skip
    """Each option applied and ``run`` in turn, three rounds alternated (the box may be busy): the
    best seconds of each and its last result."""
    best: dict[Any, float] = {}
    results: dict[Any, Any] = {}
    for _ in range(3):
        for option in options:
            apply(option)
            started = time.perf_counter()
            results[option] = run()
            best[option] = min(best.get(option, float("inf")), time.perf_counter() - started)
    return best, results


_PROBE_WORDS = ["serving", "models", "on", "a", "small", "machine", "with", "dynamic", "batching", "of", "short",
                "sentences", "for", "embeddings"]  # fmt: skip
# Texts of several lengths for the start-up check of bf16 against fp32.
_PROBE = [" ".join(_PROBE_WORDS[:n]) for n in range(1, 10)] * 4
# A batch's forward in one piece or in pieces of so many tokens: which is faster depends on the
# machine's caches (on one 2-core machine with 1 MiB of L2 a core, pieces of 256 tokens were 10-20%
# faster than one of 400), so it is measured at start on a batch of about 400 tokens.
_CHUNK_CANDIDATES = (None, 128, 256, 512)
_CHUNK_PROBE = [" ".join(_PROBE_WORDS[: 6 + n % 9]) for n in range(32)]


def _choose_attention_kernel(embedder: _Embedder) -> bool:
    """Whether the compiled attention (``packed_bert.py``) runs here and beats torch's by 5% on a
    batch of about 400 tokens, in one piece; else attention stays in torch."""
    packed = embedder.packed
    if packed is None or not packed.attention_kernel_available():
        return False
    embedder.chunk_tokens = None
    best, _ = _best_times((False, True), packed.use_attention_kernel, lambda: embedder.vectors(_CHUNK_PROBE))
    return best[True] < 0.95 * best[False]


def _choose_chunk(embedder: _Embedder) -> int | None:
    """The fastest of ``_CHUNK_CANDIDATES`` on this machine; a piece size must beat one piece by 5%
    to be kept."""
    best, _ = _best_times(_CHUNK_CANDIDATES, lambda limit: setattr(embedder, "chunk_tokens", limit),
                          lambda: embedder.vectors(_CHUNK_PROBE))  # fmt: skip
    fastest = min(_CHUNK_CANDIDATES, key=lambda limit: best[limit])
    return fastest if best[fastest] < 0.95 * best[None] else None


_MIN_COSINE = 0.9999  # ten times closer than the agreement with transformers that the tests ask for


def _use_bf16(setting: str, vectors: Callable[[list[str]], Any], set_bf16: Callable[[bool], None]) -> bool:
    """Whether matrix products should run in bf16 for ``option.dtype`` = ``setting`` (see the module
    docstring); ``auto`` measures ``vectors`` both ways on this machine."""
    import torch

    if setting in ("bf16", "bfloat16"):
        return True
    if setting != "auto" or not torch.backends.mkldnn.is_available() or not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return False
    timings, results = _best_times((False, True), set_bf16, lambda: vectors(_PROBE)[0])
    cosine = float(torch.nn.functional.cosine_similarity(results[False], results[True]).min())
    return cosine >= _MIN_COSINE and timings[True] < 0.9 * timings[False]


def embed(inputs: Input) -> Output | list[Output] | None:
    """The text-embedding handler (see the module docstring)."""
    if inputs.is_empty():
        properties = inputs.get_properties()
        embedder = _Embedder(properties["model_id"])
        bf16 = _use_bf16(properties.get("dtype", "auto"), embedder.vectors, embedder.set_bf16)
        embedder.set_bf16(bf16)
        if embedder.packed is not None:
            embedder.packed.use_attention_kernel(_choose_attention_kernel(embedder))
            embedder.chunk_tokens = _choose_chunk(embedder)
        kernel = embedder.packed is not None and embedder.packed.attention_kernel
        logger.info("text embeddings: matrix products in %s, attention %s, batches in %s", "bf16" if bf16 else "fp32",
                    "on the compiled kernel" if kernel else "in torch",
                    f"pieces of at most {embedder.chunk_tokens} tokens" if embedder.chunk_tokens else "one piece")  # fmt: skip
        _models["embed"] = embedder
        return None
    encoder: _Embedder = _models["embed"]

    def run(texts: list[str]) -> tuple[list[Any], list[int]]:
        vectors, counts = encoder.vectors(texts)
        return vectors.numpy(), counts  # float32 rows: to_json writes each value's shortest float32 text

    return _answer(inputs, run)


def classify(inputs: Input) -> Output | list[Output] | None:
    """The text-classification handler (see the module docstring)."""
    if inputs.is_empty():
        _models["classify"] = _Encoder(inputs.get_properties()["model_id"], "AutoModelForSequenceClassification")
        return None
    encoder: _Encoder = _models["classify"]
    labels = encoder.model.config.id2label

    def run(texts: list[str]) -> tuple[list[Any], list[int]]:
        output, _, counts = encoder.encode(texts)
        scores, best = output.logits.float().softmax(dim=-1).max(dim=-1)
        return [{"label": labels[int(i)], "score": float(s)} for s, i in zip(scores, best, strict=True)], counts

    return _answer(inputs, run)


def _answer(inputs: Input, run: Any) -> list[Output]:
    """Run every valid request's texts together; one ``Output`` per request, in order."""
    requests = inputs.get_batches()
    texts: list[list[str] | None] = [_texts(item) for item in requests]
    flat = [text for group in texts if group is not None for text in group]
    results, counts = run(flat) if flat else ([], [])
    outputs, at = [], 0
    for group in texts:
        if group is None:
            outputs.append(_bad_request())
            continue
        answer = Output().add_as_json(results[at:at + len(group)])
        answer.add_property("x-prompt-tokens", str(sum(counts[at:at + len(group)])))
        outputs.append(answer)
        at += len(group)
    return outputs


def _texts(item: Input) -> list[str] | None:
    try:
        body = item.get_as_json()
    except ValueError:
        return None
    value = body.get("inputs") if isinstance(body, dict) else None
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return value
    return None


def _bad_request() -> Output:
    error = {"error": "inputs: send {\"inputs\": a string or a non-empty list of strings}", "code": 400,
             "field": "inputs"}  # fmt: skip
    return Output(code=400, message="Bad Request").add_as_json(error)
