"""The operator's safety settings: where the server listens, the model API switch, allowed_urls
(and DJL's model_url_pattern), trust_remote_code_urls and the archive limit."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmserve.cli import build_parser
from lmserve.config import cli_overrides, load_serving_config
from lmserve.errors import ConfigError


def test_the_defaults_are_safe() -> None:
    server = load_serving_config("org/m", env={}).server
    assert server.host == "127.0.0.1" and server.api_key is None and server.enable_model_api is False
    assert server.allowed_urls is None and server.trust_remote_code_urls == ()
    assert server.max_extracted_bytes == 256 * 1024**3


def test_the_flags_set_them() -> None:
    ns = build_parser().parse_args(["serve", "org/m", "--host", "0.0.0.0", "--enable-model-api",
                                    "--allowed-urls", r"^s3://models/.*  /srv/models/.*",
                                    "--trust-remote-code-urls", "s3://models/custom/, /srv/models/x",
                                    "--max-extracted-bytes", "1000", "--model-store", "/srv/models"])  # fmt: skip
    server = load_serving_config("org/m", cli=cli_overrides(ns), env={}).server
    assert server.host == "0.0.0.0" and server.enable_model_api is True
    assert server.allowed_urls == (r"^s3://models/.*", "/srv/models/.*")
    assert server.trust_remote_code_urls == ("s3://models/custom/", "/srv/models/x")
    assert (server.max_extracted_bytes, server.model_store) == (1000, "/srv/models")


def test_the_environment_sets_them_and_model_url_pattern_is_allowed_urls() -> None:
    env = {"SERVING_ENABLE_MODEL_API": "true", "SERVING_MODEL_URL_PATTERN": r"s3://a/\w{1,8}/.*",
           "SERVING_TRUST_REMOTE_CODE_URLS": "org/custom"}  # fmt: skip
    server = load_serving_config("org/m", env=env).server
    assert server.enable_model_api is True and server.allowed_urls == (r"s3://a/\w{1,8}/.*",)
    assert server.trust_remote_code_urls == ("org/custom",)


def test_a_bad_pattern_names_the_key_and_the_pattern() -> None:
    with pytest.raises(ConfigError, match=r"'allowed_urls'.*'ok/\.\* \(unclosed'; allowed: one or more regular") as err:
        load_serving_config("org/m", env={"SERVING_ALLOWED_URLS": "ok/.* (unclosed"})
    assert err.value.key == "allowed_urls" and "SERVING_ALLOWED_URLS" in str(err.value)


@pytest.mark.parametrize("line", ["enable_model_api=true", "allowed_urls=.*", "trust_remote_code_urls=x",
                                  "model_url_pattern=.*", "max_extracted_bytes=1"])  # fmt: skip
def test_a_model_cannot_loosen_them_from_its_serving_properties(tmp_path: Path, line: str) -> None:
    (tmp_path / "serving.properties").write_text(line + "\n")
    with pytest.raises(ConfigError, match="not from a model's serving.properties"):
        load_serving_config(str(tmp_path), env={})
