"""`lmserve serve` flags: given flags override, absent flags override nothing."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from lmserve.config import add_serve_arguments, cli_overrides, load_serving_config
from lmserve.errors import ConfigError


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="lmserve serve")
    parser.add_argument("model", nargs="?")
    add_serve_arguments(parser)
    return parser.parse_args(list(argv))


def test_flags_not_given_produce_no_overrides() -> None:
    assert cli_overrides(parse("org/m")) == {}


def test_flags_not_given_leave_lower_levels_alone(tmp_path: Path) -> None:
    props = tmp_path / "serving.properties"
    props.write_text("option.dtype=bf16\noption.enable_prefix_caching=false\nbatch_size=4\n")
    ns = parse("org/m", "--properties", str(props))
    config = load_serving_config(ns.model, cli=cli_overrides(ns), env={"SERVING_PORT": "9000"},
                                 properties=Path(ns.properties))  # fmt: skip
    assert config.engine.dtype == "bf16" and config.engine.enable_prefix_caching is False
    assert config.batching.batch_size == 4 and config.server.port == 9000


def test_every_flag_lands_in_its_field() -> None:
    ns = parse(
        "org/m", "--host", "127.0.0.1", "--port", "9001", "--tensor-parallel-degree", "max",
        "--dtype", "float16", "--device", "cpu", "--n-positions", "1024", "--max-batch-size", "8",
        "--max-batched-tokens", "512", "--batch-size", "2", "--max-batch-delay", "10",
        "--job-queue-size", "50", "--min-workers", "1", "--max-workers", "2", "--cpu-devices", "4",
        "--predict-timeout", "60", "--model-loading-timeout", "600", "--api-key", "k",
        "--protect-inference", "--kv-cache-tokens", "8192", "--block-size", "32",
        "--no-prefix-caching", "--served-name", "chat", "--entry-point", "model.py",
        "--trust-remote-code",
    )  # fmt: skip
    c = load_serving_config(ns.model, cli=cli_overrides(ns), env={})
    assert (c.server.host, c.server.port, c.server.api_key) == ("127.0.0.1", 9001, "k")
    assert c.server.protect_inference is True
    assert (c.engine.tensor_parallel_degree, c.engine.dtype, c.engine.device) == (-1, "fp16", "cpu")
    assert (c.engine.max_model_len, c.engine.max_num_seqs, c.engine.max_num_batched_tokens) == (1024, 8, 512)
    assert (c.batching.batch_size, c.batching.max_batch_delay_ms) == (2, 10.0)
    assert (c.workers.job_queue_size, c.workers.min_workers, c.workers.max_workers) == (50, 1, 2)
    assert (c.workers.cpu_devices, c.workers.predict_timeout_s) == (4, 60.0)
    assert c.workers.model_loading_timeout_s == 600.0
    assert (c.engine.kv_cache_tokens, c.engine.block_size) == (8192, 32)
    assert c.engine.enable_prefix_caching is False and c.engine.trust_remote_code is True
    assert (c.model.name, c.model.entry_point) == ("chat", "model.py")


def test_option_flag_reaches_any_key_and_repeats() -> None:
    ns = parse("org/m", "--option", "option.rolling_batch=disable", "--option", "option.s3url=s3://b/x")
    config = load_serving_config(cli=cli_overrides(ns), env={})
    assert config.model.rolling_batch == "disable" and config.model.model_id == "s3://b/x"


def test_dedicated_flag_beats_option_for_the_same_key() -> None:
    ns = parse("org/m", "--dtype", "fp16", "--option", "option.dtype=bf16")
    assert load_serving_config(ns.model, cli=cli_overrides(ns), env={}).engine.dtype == "fp16"


def test_option_without_equals_sign_is_an_error() -> None:
    with pytest.raises(ConfigError) as err:
        cli_overrides(parse("org/m", "--option", "option.dtype"))
    assert "KEY=VALUE" in str(err.value)


def test_option_with_unknown_key_names_it_and_the_flag() -> None:
    ns = parse("org/m", "--option", "option.dtyp=fp16")
    with pytest.raises(ConfigError) as err:
        load_serving_config(ns.model, cli=cli_overrides(ns), env={})
    assert "option.dtyp" in str(err.value) and "CLI --option" in str(err.value)
    assert "did you mean option.dtype" in str(err.value)


def test_bad_flag_value_names_the_flag() -> None:
    ns = parse("org/m", "--max-batch-size", "zero")
    with pytest.raises(ConfigError) as err:
        load_serving_config(ns.model, cli=cli_overrides(ns), env={})
    assert "CLI --max-batch-size" in str(err.value) and "'zero'" in str(err.value)
