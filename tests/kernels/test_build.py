"""Choosing and building the kernels: the switch, the fallback, the build cache key."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import time
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


_HOLD_LOCK = """
import sys, time
from lmserve.fsutil import file_lock
lock = file_lock(sys.argv[1])
lock.acquire()
print("held", flush=True)
time.sleep(float(sys.argv[2]))
open(sys.argv[1] + ".released", "w").close()
lock.release()
"""


def _holder(lock: Path, hold_s: float) -> subprocess.Popen[str]:
    """A process that takes the build lock, as a compile would, and holds it for ``hold_s``."""
    proc = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(lock), str(hold_s)], stdout=subprocess.PIPE,
                            text=True)  # fmt: skip
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def test_a_killed_compile_leaves_no_lock_anyone_waits_on(tmp_path: Path) -> None:
    """A compile killed mid-way leaves torch's lock file behind; the next build removes it at once
    instead of waiting on it (torch waits forever), and the OS lock died with its holder."""
    holder = _holder(tmp_path / "build.lock", 600)
    (tmp_path / "lock").touch()  # torch's, as the killed compile left it
    holder.kill()
    holder.wait()
    started = time.monotonic()
    with build.build_lock(tmp_path):
        assert not (tmp_path / "lock").exists()
    assert time.monotonic() - started < 60  # not STALE-age polling nor a wait for the dead holder


def test_a_live_compile_is_waited_for_and_said_so(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    holder = _holder(tmp_path / "build.lock", 1.0)
    try:
        with caplog.at_level(logging.INFO, logger="lmserve.kernels.build"), build.build_lock(tmp_path):
            assert (tmp_path / "build.lock.released").exists()  # ours only once the holder let it go
        assert any("another process is compiling" in r.getMessage() for r in caplog.records)
    finally:
        holder.kill()
        holder.wait()


def test_a_compile_that_never_ends_falls_back_instead_of_hanging(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(build, "BUILD_WAIT_S", 0.3)
    holder = _holder(tmp_path / "build.lock", 600)
    try:
        with pytest.raises(TimeoutError, match="held the kernel build lock for over"), build.build_lock(tmp_path):
            pass
    finally:
        holder.kill()
        holder.wait()


def test_installs_at_two_places_build_apart_but_share_the_key(tmp_path: Path) -> None:
    # torch's builder records the sources' paths: two installs sharing a build directory would each
    # find the other's build stale and compile again on every switch.
    isa, key = build.ISAS["avx512"], build.build_key()
    copy = tmp_path / "csrc"
    copy.mkdir()
    here = build.build_dir_name(isa, key)
    assert here == build.build_dir_name(isa, key, build.CSRC) and here.startswith(f"cpu-avx512-{key}-")
    assert build.build_dir_name(isa, key, copy) != here
    assert build.build_dir_name(build.ISAS["avx2"], key) != here


def _fake_ninja(directory: Path) -> Path:
    """A ``ninja`` that leaves a mark and fails, first on a PATH: another version, or a broken one."""
    directory.mkdir()
    mark = directory / "ran"
    script = directory / "ninja"
    script.write_text(f"#!/bin/sh\ntouch {mark}\nexit 3\n")
    script.chmod(0o755)
    return mark


def test_builds_run_the_environments_own_ninja_whatever_is_first_on_path(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    own = build.ninja_binary()
    assert own is not None, "the ninja package is a dependency"
    _fake_ninja(tmp_path / "other")
    path = f"{tmp_path / 'other'}{os.pathsep}{os.environ['PATH']}"
    monkeypatch.setenv("PATH", path)
    assert shutil.which("ninja") == str(tmp_path / "other" / "ninja")
    with build.own_ninja():
        assert shutil.which("ninja") == str(own)
    assert os.environ["PATH"] == path  # only while a build runs


def test_a_model_venv_on_top_of_lmserve_finds_lmserves_ninja(tmp_path: Path) -> None:
    # option.enable_venv runs workers with the model venv's interpreter and lmserve's packages on
    # sys.path: looked up beside that interpreter, the ninja was missing and PATH's own was used.
    import venv

    venv.EnvBuilder(symlinks=True, with_pip=False).create(tmp_path / "model-venv")
    env = os.environ | {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    code = "from lmserve.kernels.build import ninja_binary; print(ninja_binary())"
    done = subprocess.run([str(tmp_path / "model-venv" / "bin" / "python"), "-c", code], env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == str(build.ninja_binary())


@pytest.mark.slow
def test_kernels_load_beside_a_foreign_ninja_without_running_it(tmp_path: Path) -> None:
    # ninja versions hash a build's commands differently: each found the other's build stale and
    # compiled everything again; a missing or broken ninja on PATH meant no kernels at all.
    if build.disabled_reason() is not None:
        pytest.skip(f"no CPU kernels here: {build.disabled_reason()}")
    mark = _fake_ninja(tmp_path / "other")
    env = os.environ | {"PATH": f"{tmp_path / 'other'}{os.pathsep}{os.environ['PATH']}"}
    code = "from lmserve.kernels.build import load_cpu_kernels; import sys; sys.exit(0 if load_cpu_kernels() else 1)"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert not mark.exists()
