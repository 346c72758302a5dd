"""Device kernels: packed-weight GEMM, paged attention, norms. ``get_ops(device)`` picks them."""

from lmserve.kernels.ops import KernelModule, Module, Ops, get_ops
from lmserve.kernels.packed import PackedLinear
from lmserve.kernels.reference import ReferenceOps

__all__ = ["KernelModule", "Module", "Ops", "PackedLinear", "ReferenceOps", "get_ops"]
