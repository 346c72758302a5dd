"""lmserve.server.policy without a server: consent to run a registered model's code, who is told
what, and the warning about listening beyond loopback."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from lmserve.config.settings import EngineConfig, ModelSpec, ServerConfig, ServingConfig
from lmserve.errors import ModelNotFoundError, NotAllowedError, OutOfMemoryError
from lmserve.server.policy import check_registered, exposure_warnings, for_caller, registration_guard


def config(trust: bool = False, entry_point: str = "lmserve.default") -> ServingConfig:
    return ServingConfig(model=ModelSpec(model_id="m", name="m", entry_point=entry_point),
                         engine=EngineConfig(model="m", trust_remote_code=trust))  # fmt: skip


def test_only_a_url_the_operator_listed_runs_code(tmp_path: Path) -> None:
    listed, other = tmp_path / "listed", tmp_path / "other"
    listed.mkdir(), other.mkdir()
    server = ServerConfig(allowed_urls=(".*",), trust_remote_code_urls=(str(listed), "org/custom"))

    assert registration_guard(server, f"{tmp_path}/./listed/")[1] is True  # the same directory, spelled otherwise
    assert registration_guard(server, "org/custom")[1] is True
    assert registration_guard(server, str(other))[1] is False

    assert check_registered(config(trust=False), str(listed), consent=True).engine.trust_remote_code is True
    assert check_registered(config(trust=False), str(other), consent=False).engine.trust_remote_code is False
    with pytest.raises(NotAllowedError, match="trust_remote_code_urls"):
        check_registered(config(trust=True), str(other), consent=False)
    with pytest.raises(NotAllowedError, match="custom handler"):
        check_registered(config(entry_point="model.py"), str(listed), consent=True)


def test_a_caller_without_a_key_is_told_the_url_and_the_reason_only() -> None:
    open_server, keyed = ServerConfig(enable_model_api=True), ServerConfig(api_key="k")
    found = ModelNotFoundError("cannot find a model at '/etc/shadow': a file exists there")

    assert for_caller(found, "/etc/shadow", keyed) is found
    shown = str(for_caller(found, "/etc/shadow", open_server))
    assert "exists" not in shown and "'/etc/shadow'" in shown
    assert "could not be started" in str(for_caller(OutOfMemoryError("cuda: 80 GiB at 0x7f..."), "u", open_server))
    refusal = NotAllowedError("url 'u' is not allowed")
    assert for_caller(refusal, "u", open_server) is refusal


@pytest.mark.parametrize(("host", "key", "warned"), [("127.0.0.1", None, 0), ("::1", None, 0), ("localhost", None, 0),
                                                     ("0.0.0.0", "k", 0), ("0.0.0.0", None, 1), ("my-host", None, 1)])  # fmt: skip
def test_listening_beyond_loopback_without_a_key_is_one_warning_line(host: str, key: str | None, warned: int) -> None:
    lines = exposure_warnings(ServerConfig(host=host, api_key=key))
    assert len(lines) == warned and all("without an API key" in line for line in lines)
    enabled = exposure_warnings(replace(ServerConfig(host=host, api_key=key), enable_model_api=True))
    assert len(enabled) == 2 * warned
