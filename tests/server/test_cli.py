"""The ``lmserve`` command line: subcommands and configuration errors (no server is started)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmserve.cli import build_parser, main


def test_help_lists_the_subcommands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "serve" in out and "pull" in out


def test_serve_takes_the_configuration_flags(tiny_model_dir: Path) -> None:
    ns = build_parser().parse_args(["serve", str(tiny_model_dir), "--port", "9000", "--job-queue-size", "7"])
    assert ns.model == str(tiny_model_dir) and ns.port == "9000" and ns.job_queue_size == "7"


def test_bad_configuration_is_one_line_and_exit_2(tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", str(tiny_model_dir), "--port", "eighty"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lmserve serve: error:") and "port" in err and "eighty" in err
    assert "Traceback" not in err
