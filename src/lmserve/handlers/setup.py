"""Everything a handler needs before its first worker starts, and the launcher that runs it.

``prepare_handler`` installs a custom handler's ``requirements.txt`` (into the shared per-content
cache, or with ``option.enable_venv`` into a virtual environment of the model's own) and builds the
``HandlerSpec`` the workers load. It runs pip, so call it off the event loop.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

from lmserve.config.settings import ServingConfig
from lmserve.engine.protocol import ModelInfo
from lmserve.handlers.launcher import BatchObserver, HandlerLauncher
from lmserve.handlers.messages import HandlerSpec
from lmserve.handlers.select import HandlerChoice, handler_properties
from lmserve.store.requirements import install_requirements, install_requirements_venv, venv_site_packages
from lmserve.workers.launcher import Backoff
from lmserve.workers.messages import EngineSpec
from lmserve.workers.placement import Devices


@dataclasses.dataclass(frozen=True)
class PreparedHandler:
    spec: HandlerSpec
    python: str | None  # the model venv's interpreter, or None for this one


def prepare_handler(choice: HandlerChoice, model_dir: Path, handler_dir: Path,
                    config: ServingConfig) -> PreparedHandler:  # fmt: skip
    """Install the handler's requirements (custom handlers only) and describe what workers load."""
    site_dirs: tuple[str, ...] = ()
    python: str | None = None
    if choice.custom and config.model.enable_venv:
        venv_python = install_requirements_venv(handler_dir)
        if venv_python is not None:
            python, site_dirs = str(venv_python), (str(venv_site_packages(venv_python)),)
    elif choice.custom:
        installed = install_requirements(handler_dir)
        site_dirs = (str(installed),) if installed is not None else ()
    properties = handler_properties(model_dir, handler_dir, config)
    return PreparedHandler(HandlerSpec(choice.entry, str(handler_dir), properties, site_dirs), python)


def handler_model_info(config: ServingConfig) -> ModelInfo:
    """What the management API and ``/v1/models`` show of a handler model (it has no token limits)."""
    return ModelInfo(name=config.engine.served_name or config.model.name, max_model_len=0, vocab_size=0,
                     dtype=config.engine.dtype, device=config.engine.device, tensor_parallel_degree=1,
                     eos_token_ids=(), max_num_seqs=config.batching.batch_size, max_num_batched_tokens=0,
                     kv_cache_tokens=0)  # fmt: skip


def handler_launcher(name: str, prepared: PreparedHandler, config: ServingConfig, devices: Devices,
                     backoff: Backoff, on_failed: Callable[[BaseException], None],
                     observer: BatchObserver | None) -> HandlerLauncher:  # fmt: skip
    """A launcher of handler workers: one replica per device (a worker is one process, degree 1)."""
    engine = dataclasses.replace(config.engine, tensor_parallel_degree=1)
    return HandlerLauncher(name, prepared.spec, EngineSpec("", engine), handler_model_info(config), devices,
                           config.workers, config.batching, backoff, on_failed, prepared.python,
                           observer)  # fmt: skip
