"""option.quantize: the modes lmserve serves are honoured everywhere; LMI's GPU formats are refused by name."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmserve.config import load_serving_config
from lmserve.errors import ConfigError


def load(tmp_path: Path, text: str, **kw: object):
    props = tmp_path / "serving.properties"
    props.write_text("option.model_id=org/m\n" + text)
    return load_serving_config(None, env=kw.pop("env", {}), properties=props, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("mode", ["none", "int8", "int4", "gguf", "INT8"])
def test_supported_modes_set_the_engine_field(tmp_path: Path, mode: str) -> None:
    config = load(tmp_path, f"option.quantize={mode}\n")
    assert config.engine.quantize == mode.lower() and not config.warnings


def test_default_is_no_quantization(tmp_path: Path) -> None:
    assert load(tmp_path, "").engine.quantize == "none"


@pytest.mark.parametrize("mode", ["awq", "gptq", "fp8", "bitsandbytes8", "smoothquant"])
def test_other_engines_formats_are_refused_naming_what_is_supported(tmp_path: Path, mode: str) -> None:
    with pytest.raises(ConfigError) as err:
        load(tmp_path, f"option.quantize={mode}\n")
    message = str(err.value)
    assert "option.quantize" in message and repr(mode) in message
    assert all(supported in message for supported in ("int8", "int4", "gguf"))


def test_cli_flag_and_environment_set_it(tmp_path: Path) -> None:
    assert load(tmp_path, "", cli={"option.quantize": "int4"}).engine.quantize == "int4"
    assert load(tmp_path, "", env={"OPTION_QUANTIZE": "gguf"}).engine.quantize == "gguf"


def test_offline_api_refuses_an_unknown_mode_before_loading(tmp_path: Path) -> None:
    from lmserve.models.quantize import check_mode

    with pytest.raises(ConfigError, match="'awq'.*int8, int4, gguf"):
        check_mode("awq")
