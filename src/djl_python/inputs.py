"""``from djl_python.inputs import Input`` (the containers' module layout)."""

from lmserve.handlers.io import Input

__all__ = ["Input"]
