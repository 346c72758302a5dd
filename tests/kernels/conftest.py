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


@pytest.fixture(scope="session")
def avx2_ops() -> Iterator[Ops]:
    """The AVX2 + FMA build, forced on this machine the way a user would force it."""
    from lmserve.kernels import build
    from lmserve.kernels.cpu import PanelLinearOps

    if build.isa_unavailable(build.ISAS["avx2"]) is not None:
        pytest.skip("this CPU cannot run the AVX2 build")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(build.ISA_ENV, "avx2")
        ext = build.load_cpu_kernels()
    assert ext is not None and ext.lmserve_isa == "avx2"
    yield PanelLinearOps(ext)


@pytest.fixture(params=["compiled", "avx2", "reference"])
def ops(request: pytest.FixtureRequest) -> Ops:
    """Every op test runs against the best build for this CPU, the AVX2 build (where that is another
    one) and pure torch."""
    if request.param == "compiled":
        return request.getfixturevalue("compiled_ops")
    if request.param == "avx2":
        compiled = request.getfixturevalue("compiled_ops")
        if compiled.name == "cpu-avx2":
            pytest.skip("the best build here is the AVX2 build")
        return request.getfixturevalue("avx2_ops")
    return ReferenceOps("cpu")


@pytest.fixture(params=[1, 2, 3], ids=lambda n: f"threads{n}")
def threads(request: pytest.FixtureRequest) -> Iterator[int]:
    """Thread counts that change how the kernels split work (3 oversubscribes a 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)
