"""lmserve: an open inference server for large language models.

``from lmserve import LLM, SamplingParams`` is the offline entry point; ``lmserve serve`` the server.
Heavy modules (torch, the engine) load only when first used, so ``import lmserve`` stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lmserve._version import __version__

if TYPE_CHECKING:
    from lmserve.engine.llm import LLM
    from lmserve.engine.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "LLM":
        from lmserve.engine.llm import LLM

        return LLM
    if name == "SamplingParams":
        from lmserve.engine.sampling_params import SamplingParams

        return SamplingParams
    raise AttributeError(name)
