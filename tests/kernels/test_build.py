"""Choosing and building the kernels: the switch, the fallback, the build cache key."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch

from lmserve.kernels import ReferenceOps, build, get_ops, ops


def test_switch_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(build.ENV_SWITCH, "0")
    assert build.disabled_reason() == f"{build.ENV_SWITCH}=0"


def test_missing_cpu_features(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(build.ENV_SWITCH, raising=False)
    monkeypatch.delenv(build.ISA_ENV, raising=False)
    monkeypatch.setattr(build, "cpu_flags", lambda: {"sse4_2", "avx"})
    reason = build.disabled_reason()
    assert reason is not None and "avx512f" in reason and "avx2, fma" in reason
    monkeypatch.setattr(build, "cpu_flags", lambda: {"avx2", "fma"})
    assert build.disabled_reason() is None  # the AVX2 build may run


def test_failed_build_falls_back_with_one_warning(monkeypatch: pytest.MonkeyPatch,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    def broken(isa: build.Isa) -> None:
        raise RuntimeError("no compiler")

    monkeypatch.setattr(build, "_loaded", {})
    monkeypatch.setattr(build, "disabled_reason", lambda: None)
    monkeypatch.setattr(build, "probe", lambda isa: None)
    monkeypatch.setattr(build, "_compile", broken)
    with caplog.at_level(logging.WARNING, logger="lmserve.kernels.build"):
        assert build.load_cpu_kernels() is None
        assert build.load_cpu_kernels() is None
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "no compiler" in warnings[0].getMessage()


def test_chooser(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ops, "_by_device_type", {})
    monkeypatch.setattr(ops, "load_cpu_kernels", lambda: None)
    cpu = get_ops("cpu")
    assert isinstance(cpu, ReferenceOps) and cpu.name == "reference" and not cpu.fast_bf16
    assert get_ops(torch.device("cpu")) is cpu
    assert isinstance(get_ops("cuda"), ReferenceOps)


def test_chooser_picks_compiled_ops(compiled_ops: ReferenceOps, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ops, "_by_device_type", {})
    chosen = get_ops("cpu")
    assert chosen.name == compiled_ops.name and chosen.name.startswith("cpu-") and chosen.fast_bf16


def test_build_key_tracks_sources() -> None:
    key = build.build_key()
    assert len(key) == 16 and key == build.build_key()


def test_stale_build_lock_is_removed(tmp_path: Path) -> None:
    lock = tmp_path / "lock"
    lock.touch()
    old = lock.stat().st_mtime - build.STALE_LOCK_S - 1
    os.utime(lock, (old, old))
    build._clear_stale_lock(lock)
    assert not lock.exists()
    build._clear_stale_lock(lock)  # no lock: returns at once
