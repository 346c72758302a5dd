"""Which handler serves a model: the generative engine (``None``), a default handler, or custom code.

In order: ``option.entryPoint`` naming a ``.py`` file or ``module:function``; a ``model.py`` beside
the model's ``serving.properties`` (as the managed containers do), unless ``option.output_formatter``
names a function of it; ``option.task``; else the
checkpoint's ``architectures`` (``...ForSequenceClassification``: text classification; an encoder
without a language-model head, e.g. ``BertModel``: text embedding; anything else: generation).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from lmserve.config.properties import read_properties
from lmserve.config.settings import ServingConfig
from lmserve.config.values import OUTPUT_FORMATS
from lmserve.errors import UnsupportedModelError

EMBEDDING = "lmserve.handlers.encoders:embed"
CLASSIFICATION = "lmserve.handlers.encoders:classify"
_BUILT_IN = {"text-embedding": EMBEDDING, "text-classification": CLASSIFICATION}
_ENCODERS = {"bert", "roberta", "xlm-roberta", "distilbert", "mpnet", "electra", "deberta", "deberta-v2",
             "camembert", "albert", "nomic_bert", "modernbert"}  # fmt: skip


@dataclass(frozen=True)
class HandlerChoice:
    """``entry``: an absolute ``.py`` path or ``module:function``; ``custom``: code that came with
    the model (or names a module outside lmserve), which only the operator may allow."""

    entry: str
    custom: bool
    task: str  # "custom", "text-embedding" or "text-classification"


def choose_handler(model_dir: Path, handler_dir: Path, config: ServingConfig) -> HandlerChoice | None:
    """The handler for a model whose weights are in ``model_dir`` and whose ``serving.properties``
    (and ``model.py``) are in ``handler_dir``; None for the generative engine."""
    entry = config.model.entry_point
    if entry.endswith(".py"):
        path = Path(entry) if Path(entry).is_absolute() else handler_dir / entry
        if not path.is_file():
            raise UnsupportedModelError(f"option.entryPoint names {entry!r}, which is not a file in the model "
                                        f"directory {handler_dir}")  # fmt: skip
        return HandlerChoice(str(path.resolve()), custom=True, task="custom")
    if ":" in entry:
        built_in = entry in _BUILT_IN.values()
        task = next((t for t, e in _BUILT_IN.items() if e == entry), "custom")
        return HandlerChoice(entry, custom=not built_in, task=task)
    if (handler_dir / "model.py").is_file() and not _names_formatter(config):
        return HandlerChoice(str((handler_dir / "model.py").resolve()), custom=True, task="custom")
    task = config.model.task or _task_of(model_dir)
    return HandlerChoice(_BUILT_IN[task], custom=False, task=task) if task in _BUILT_IN else None


def _names_formatter(config: ServingConfig) -> bool:
    """Whether ``option.output_formatter`` names a function of model.py: model.py then holds that
    formatter of the default handler's answers, not a handler (as in the managed containers)."""
    formatter = config.model.output_formatter
    return formatter is not None and formatter not in OUTPUT_FORMATS


def _task_of(model_dir: Path) -> str:
    try:
        hf = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return "text-generation"  # no readable config.json: the engine reports what is wrong with it
    architectures = [str(a) for a in hf.get("architectures") or []]
    if any(a.endswith("ForSequenceClassification") for a in architectures):
        return "text-classification"
    generative = any(a.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")) for a in architectures)
    if not generative and str(hf.get("model_type", "")).lower() in _ENCODERS:
        return "text-embedding"
    return "text-generation"


def handler_properties(model_dir: Path, handler_dir: Path, config: ServingConfig) -> dict[str, str]:
    """What the handler's initialisation call sees: every ``serving.properties`` entry (``option.``
    removed, as the managed containers pass them), then the values lmserve settled on."""
    properties: dict[str, str] = {}
    file = handler_dir / "serving.properties"
    if file.is_file():
        for entry in read_properties(file).entries:
            key = entry.key.removeprefix("option.")
            properties[key] = entry.value
    properties |= {"model_dir": str(handler_dir), "model_id": str(model_dir),
                   "batch_size": str(config.batching.batch_size),
                   "max_batch_delay": f"{config.batching.max_batch_delay_ms:g}",
                   "predict_timeout": f"{config.workers.predict_timeout_s:g}",
                   "device": config.engine.device, "dtype": config.engine.dtype}  # fmt: skip
    return properties
