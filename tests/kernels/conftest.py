"""Kernel test fixtures: the compiled CPU ops (built once per session) and the pure-torch ones."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from lmserve.kernels import Ops, ReferenceOps
from lmserve.kernels.build import disabled_reason, load_cpu_kernels


@pytest.fixture(scope="session")
def compiled_ops() -> Ops:
    """The compiled ops of the best build for this CPU (AVX-512, else AVX2 with the other ops in
    torch); compiling them on a fresh machine takes about 30 s, once."""
    reason = disabled_reason()
    if reason is not None:
        pytest.skip(f"compiled CPU kernels unavailable: {reason}")
    ext = load_cpu_kernels()
    if ext is None:
        pytest.fail("the CPU supports the kernels but building or probing them failed (see the log)")
    from lmserve.kernels.build import ISAS
    from lmserve.kernels.cpu import CpuOps, PanelLinearOps

    return PanelLinearOps(ext) if ISAS[ext.lmserve_isa].gemm_only else CpuOps(ext)


@pytest.fixture
def compiled_cache_ops(compiled_ops: Ops) -> Ops:
    """The compiled ops where they include the KV cache writes (the AVX-512 build): tests of what
    that kernel refuses. The AVX2 build runs them in torch."""
    from lmserve.kernels.cpu import CpuOps

    if not isinstance(compiled_ops, CpuOps):
        pytest.skip(f"the {compiled_ops.name} build runs cache writes in torch")
    return compiled_ops


@pytest.fixture(params=["compiled", "reference"])
def ops(request: pytest.FixtureRequest) -> Ops:
    """Every op test runs against both implementations."""
    if request.param == "compiled":
        return request.getfixturevalue("compiled_ops")
    return ReferenceOps("cpu")


@pytest.fixture(params=[1, 2, 3], ids=lambda n: f"threads{n}")
def threads(request: pytest.FixtureRequest) -> Iterator[int]:
    """Thread counts that change how the kernels split work (3 oversubscribes a 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)
