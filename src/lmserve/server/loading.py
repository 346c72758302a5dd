"""Loading steps that run outside the frontend's event loop.

``resolve_in_child`` fetches the model in a short-lived spawned process: downloads and GGUF
imports may need torch, and the frontend process must never import it. The child sends back plain
data through a pipe; killing it (cancellation, ``model_loading_timeout``) stops the fetch.
``forbid_torch`` makes that rule hold in the ``lmserve serve`` frontend process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import sys
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from lmserve.environ import env_set
from lmserve.spawning import start_spawned
from lmserve.store.policy import FetchPolicy
from lmserve.workers.messages import ErrorInfo

logger = logging.getLogger("lmserve.server")


@dataclass(frozen=True)
class Fetched:
    """Where ``resolve_model`` put the model (see ``lmserve.store.ResolvedModel``)."""

    path: Path
    properties: Path | None
    has_custom_handler: bool
    model_id: str  # what was resolved: the given location, or the default model's directory
    created: tuple[Path, ...] = ()  # cache directories this fetch made (see ResolvedModel.created)


async def resolve_in_child(model_id: str, revision: str | None, default_model: bool,
                           policy: FetchPolicy | None = None) -> Fetched:  # fmt: skip
    """Resolve (and fetch) ``model_id`` in a spawned process within ``policy``; ``default_model``
    pulls the default model first. Raises the child's error with its type (``ModelNotFoundError``,
    ``NotAllowedError``, ...)."""
    ctx = multiprocessing.get_context("spawn")
    receiver, sender = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_resolve_main, args=(sender, model_id, revision, default_model, policy),
                        name="lmserve-resolve")  # fmt: skip
    start_spawned(child)
    sender.close()
    try:
        reply: tuple[Any, ...] = await asyncio.to_thread(_receive, receiver)
    finally:
        if child.is_alive():
            child.kill()  # cancelled or timed out: stop the download too
        await asyncio.to_thread(child.join, 5)
        receiver.close()
    if reply[0] == "error":
        raise ErrorInfo(*reply[1:]).to_exception()
    _, path, properties, handler, resolved_id, created = reply
    return Fetched(Path(path), Path(properties) if properties else None, handler, resolved_id,
                   tuple(Path(p) for p in created))  # fmt: skip


def _receive(receiver: Connection) -> tuple[Any, ...]:
    try:
        return receiver.recv()  # type: ignore[no-any-return]
    except EOFError:
        return ("error", "internal", "the model resolver process exited without an answer", None)


def _resolve_main(sender: Connection, model_id: str, revision: str | None, default_model: bool,
                  policy: FetchPolicy | None) -> None:  # fmt: skip
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if default_model:
            from lmserve.store.default_model import pull_default_model

            model_id = str(pull_default_model(progress=True))
        from lmserve.store import resolve_model

        resolved = resolve_model(model_id, revision=revision, progress=True, policy=policy)
        properties = str(resolved.properties) if resolved.properties else None
        created = [str(path) for path in resolved.created]
        sender.send(("ok", str(resolved.path), properties, resolved.has_custom_handler, model_id, created))
    except BaseException as exc:
        info = ErrorInfo.of(exc)
        sender.send(("error", info.kind, info.message, info.field))
    finally:
        sender.close()


def forbid_torch() -> None:
    """Make ``import torch`` fail in this process (the frontend), unless it is already imported.

    transformers imports torch whenever torch is installed, even for a tokenizer; marking it absent
    keeps the frontend small and free of CUDA, and any other path that would import torch here fails
    loudly instead of silently loading it. transformers' one-line notice that torch is missing is
    silenced while it is first imported.
    """
    if "torch" in sys.modules:
        return
    sys.modules["torch"] = None  # type: ignore[assignment]
    with env_set("TRANSFORMERS_VERBOSITY", "error"), contextlib.suppress(ImportError):
        import transformers  # noqa: F401  (reads the verbosity once, at import)
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_warning()
