"""The default handlers for encoder models: text embeddings (``embed``) and text classification
(``classify``). They run in handler workers like any ``model.py``, batched by the dynamic batcher.

Request body: ``{"inputs": str | [str]}``. Every text of every request of a batch goes through the
model in one forward pass (padded, truncated to the model's length).

- ``embed`` answers a list of vectors, one per text: the pooled last hidden state (mean over the
  real tokens unless the checkpoint's ``1_Pooling/config.json`` asks for the CLS token), L2
  normalised, as sentence-transformers computes it. The ``x-prompt-tokens`` header counts tokens.
- ``classify`` answers ``[{"label", "score"}]``, the most likely label of each text and its
  softmax probability.

A request that is not of that shape gets its own 400; the others of its batch are answered.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmserve.handlers.io import Input, Output

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

    def encode(self, texts: list[str]) -> tuple[Any, Any, Any]:
        """(model output, attention mask, token counts) for ``texts`` in one forward pass."""
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        with self.torch.inference_mode():
            output = self.model(**batch)
        mask = batch["attention_mask"]
        return output, mask, mask.sum(dim=1).tolist()


def embed(inputs: Input) -> Output | list[Output] | None:
    """The text-embedding handler (see the module docstring)."""
    if inputs.is_empty():
        _models["embed"] = _Encoder(inputs.get_properties()["model_id"], "AutoModel")
        return None
    encoder: _Encoder = _models["embed"]

    def run(texts: list[str]) -> tuple[list[Any], list[int]]:
        output, mask, counts = encoder.encode(texts)
        hidden = output.last_hidden_state
        if encoder.cls_pooling:
            pooled = hidden[:, 0]
        else:
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
        pooled = encoder.torch.nn.functional.normalize(pooled, p=2, dim=1)
        return pooled.tolist(), counts

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
