"""``from djl_python.outputs import Output`` (the containers' module layout)."""

from lmserve.handlers.io import Output

__all__ = ["Output"]
