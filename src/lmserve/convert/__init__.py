"""The pre-sharded cache: convert a checkpoint once per (degree, dtype), load it fast ever after.

``convert`` writes a conversion to a directory; ``ensure_converted`` finds or makes the cached one.
Names load lazily, so the CLI can import ``lmserve.convert.cli`` without importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lmserve.convert.converter import conversion_pays, convert, ensure_converted, prune_stale

__all__ = ["conversion_pays", "convert", "ensure_converted", "prune_stale"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from lmserve.convert import converter

        return getattr(converter, name)
    raise AttributeError(name)
