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


def test_without_a_model_the_errors_are_the_real_ones_not_a_missing_model(capsys: pytest.CaptureFixture[str]) -> None:
    """No model means the default model; a bad flag beside it must not also read "no model given"."""
    assert main(["serve", "--quantize", "int3"]) == 2
    err = capsys.readouterr().err
    assert "'option.quantize'" in err and "int3" in err and "model_id" not in err
    assert main(["serve", "--quantize", "int3", "--port", "eighty"]) == 2
    err = capsys.readouterr().err
    assert "2 configuration errors" in err and "eighty" in err and "model_id" not in err


VLLM_SAMPLE = """\
option.model_id=meta-llama/Llama-3.1-8B-Instruct
option.entryPoint=djl_python.lmi_vllm.vllm_async_service
option.async_mode=true
option.tensor_parallel_degree=max
option.max_num_batched_tokens=8192
option.max_rolling_batch_prefill_tokes=4096
option.enable_lora=true
"""


def test_config_check_prints_every_key_its_meaning_and_every_problem(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "serving.properties").write_text(VLLM_SAMPLE)
    assert main(["config", "check", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    keys = [line.split(" = ")[0].strip() for line in out.splitlines() if " = " in line and "[" in line]
    assert keys == [line.split("=")[0] for line in VLLM_SAMPLE.splitlines()]  # every key, in file order
    assert "model.entry_point = 'lmserve.default'" in out
    assert "same as option.max_rolling_batch_prefill_tokens: engine.max_num_batched_tokens = 8192" in out
    assert "ignored: lmserve batches requests continuously" in out
    assert "did you mean option.max_rolling_batch_prefill_tokens?" in out
    assert "LoRA adapters are not supported yet" in out
    assert "errors (2):" in out and "warnings (1):" in out


def test_config_check_reads_an_option_env_file_and_passes_a_good_one(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    env_file = tmp_path / "lmi.env"
    env_file.write_text("# SageMaker endpoint environment\nHF_MODEL_ID=Qwen/Qwen2.5-7B-Instruct\n"
                        "export OPTION_ROLLING_BATCH=lmi-dist\nOPTION_TENSOR_PARALLEL_DEGREE=\"max\"\n"
                        "SERVING_FAIL_FAST=true\n")  # fmt: skip
    assert main(["config", "check", str(env_file)]) == 0
    out = capsys.readouterr().out
    assert "environment file" in out and "model.model_id = 'Qwen/Qwen2.5-7B-Instruct'" in out
    assert "engine.tensor_parallel_degree = max" in out and "workers.fail_fast = True" in out
    assert "lmserve's own continuous batching is used (auto)" in out
    assert out.rstrip().endswith("OK: lmserve serve accepts this configuration")


def test_config_check_of_a_missing_path_is_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "check", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err.startswith("lmserve config: error:")
