"""A variable set for a block is as it was afterwards, set or unset, even when the block raises."""

from __future__ import annotations

import os

import pytest

from lmserve.environ import env_set


def test_a_set_variable_gets_its_value_back_and_an_unset_one_goes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LMSERVE_TEST_SET", "before")
    monkeypatch.delenv("LMSERVE_TEST_UNSET", raising=False)
    with env_set("LMSERVE_TEST_SET", "during"), env_set("LMSERVE_TEST_UNSET", "during"):
        assert os.environ["LMSERVE_TEST_SET"] == os.environ["LMSERVE_TEST_UNSET"] == "during"
    assert os.environ["LMSERVE_TEST_SET"] == "before"
    assert "LMSERVE_TEST_UNSET" not in os.environ
    with pytest.raises(RuntimeError), env_set("LMSERVE_TEST_SET", "during"):
        raise RuntimeError("the block failed")
    assert os.environ["LMSERVE_TEST_SET"] == "before"
