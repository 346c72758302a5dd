"""Schemathesis drives every operation in /openapi.json with generated requests, valid and invalid
by the schema: the server never answers 5xx (a 500 would be a bug; 503/504 cannot happen here)."""

from __future__ import annotations

from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from tests.server.conftest import MODEL_NAME, start_server

BUDGET = {GenerationMode.POSITIVE: 20, GenerationMode.NEGATIVE: 12}  # examples per operation


@pytest.mark.slow
def test_no_generated_request_makes_the_server_fail(tiny_model_dir: Path) -> None:
    server = start_server(tiny_model_dir, {}, server={"enable_model_api": True})  # fuzz the routes, not the 403
    try:
        schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
        operations = [result.ok() for result in schema.get_all_operations()]
        assert len(operations) >= 12
        for operation in operations:
            for mode, examples in BUDGET.items():
                if mode is GenerationMode.POSITIVE and operation.method.upper() == "POST" and operation.path == "/models":
                    continue  # a valid registration fetches whatever URL was generated (network, disk)

                # Valid requests name the served model, so they reach the engine, not only the 404.
                names = {"model_name": MODEL_NAME} if mode is GenerationMode.POSITIVE else None

                @given(case=operation.as_strategy(generation_mode=mode, path_parameters=names))
                @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                          suppress_health_check=list(HealthCheck))  # fmt: skip
                def no_server_error(case) -> None:  # type: ignore[no-untyped-def]
                    response = case.call(timeout=30)
                    assert response.status_code < 500, \
                        f"{case.method} {case.formatted_path} {case.body!r} -> {response.status_code} {response.text}"  # fmt: skip

                try:
                    no_server_error()
                except Unsatisfiable:  # no invalid request exists for an operation without inputs
                    assert mode is GenerationMode.NEGATIVE and operation.method.upper() in ("GET", "DELETE")
    finally:
        server.stop()
