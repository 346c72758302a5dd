"""An unchanged DJL-style model.py served by handler workers: dynamic batches, answers in order,
failures confined to their batch, crashed and hung workers restarted, streaming, async handlers."""

from __future__ import annotations

import concurrent.futures
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.handlers.conftest import model_dir, start_handler_server
from tests.server.conftest import LiveServer

# Written as for the managed containers: the djl_python import path, properties at initialisation,
# get_batches() and add_as_json(batch_index=i). Requests choose what the handler does.
DJL_MODEL = '''
    import os
    import time

    from djl_python import Input, Output

    settings = {}


    def handle(inputs: Input) -> Output:
        if inputs.is_empty():
            settings.update(inputs.get_properties())
            return None
        batch = inputs.get_batches()
        requests = [item.get_as_json() for item in batch]
        ops = {request.get("op", "echo") for request in requests}
        if "raise" in ops:
            raise ValueError("the model refuses this batch")
        if "exit" in ops:
            os._exit(3)
        if "hang" in ops:
            time.sleep(3600)
        if "stream" in ops:
            return (f"piece {i};" for i in range(3))
        if "wrong" in ops:  # one output too many, whatever the batch
            return [Output().add_as_json(i) for i in range(len(batch) + 1)]
        outputs = Output()
        for i, request in enumerate(requests):
            outputs.add_as_json({"echo": request, "batch_size": inputs.get_batch_size(),
                                 "greeting": settings.get("greeting"), "id": batch[i].get_request_id()},
                                batch_index=i)
        return outputs
'''


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    path = model_dir(tmp_path_factory.mktemp("djl"), DJL_MODEL, "option.greeting=hello\n")
    server = start_handler_server(path, batch_size=8, max_batch_delay_ms=300, predict_timeout_s=3.0)
    yield server
    server.stop()


def post(live: LiveServer, body: dict[str, Any], timeout: float = 30) -> httpx.Response:
    with live.client(timeout=timeout) as http:
        return http.post("/invocations", json=body)


def replica_info(live: LiveServer) -> dict[str, Any]:
    with live.client() as http:
        return http.get(f"/models/{live.runtime.name}").json()["replicas"][0]  # type: ignore[no-any-return]


def wait_ready(live: LiveServer, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while replica_info(live)["state"] != "ready":
        assert time.monotonic() < deadline, "the handler worker did not come back"
        time.sleep(0.05)


def test_concurrent_requests_are_batched_and_each_caller_gets_its_own_answer(live: LiveServer) -> None:
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(lambda i: post(live, {"n": i}), range(16)))
    assert all(r.status_code == 200 for r in replies), [r.text for r in replies]
    answers = [r.json() for r in replies]
    assert [a["echo"]["n"] for a in answers] == list(range(16))
    assert max(a["batch_size"] for a in answers) > 1
    assert {a["greeting"] for a in answers} == {"hello"}  # serving.properties reached the handler
    assert len({a["id"] for a in answers}) == 16


def test_a_lone_request_waits_only_for_the_batch_delay(live: LiveServer) -> None:
    started = time.monotonic()
    reply = post(live, {"n": "alone"})
    elapsed = time.monotonic() - started
    assert reply.status_code == 200 and reply.json()["batch_size"] == 1
    assert elapsed < 0.3 + 5.0  # max_batch_delay (300 ms) plus a margin for a busy machine


def test_a_handler_that_raises_fails_its_batch_with_424_and_the_next_request_succeeds(live: LiveServer) -> None:
    reply = post(live, {"op": "raise"})
    assert reply.status_code == 424
    assert "the model refuses this batch" in reply.json()["error"]
    assert post(live, {"n": 1}).status_code == 200


def test_a_wrong_number_of_outputs_is_a_clear_error_for_that_batch(live: LiveServer) -> None:
    reply = post(live, {"op": "wrong"})
    assert reply.status_code == 424
    assert "returned 2 output(s) for a batch of 1" in reply.json()["error"]
    assert post(live, {"n": 3}).status_code == 200


def test_a_generator_handler_streams(live: LiveServer) -> None:
    with live.client() as http, http.stream("POST", "/invocations", json={"op": "stream"}) as reply:
        assert reply.status_code == 200
        pieces = list(reply.iter_text())
    assert "".join(pieces) == "piece 0;piece 1;piece 2;"


def test_a_worker_that_exits_fails_its_batch_is_restarted_and_shown_so(live: LiveServer) -> None:
    before = replica_info(live)["restarts"]
    reply = post(live, {"op": "exit"})
    assert reply.status_code == 424 and "exit code 3" in reply.json()["error"]
    wait_ready(live)
    info = replica_info(live)
    assert info["restarts"] == before + 1 and "exit code 3" in info["error"]
    assert post(live, {"n": 4}).status_code == 200
    with live.client() as http:
        assert http.get("/ping").status_code == 200


def test_a_hung_handler_times_out_with_504_and_its_worker_is_replaced(live: LiveServer) -> None:
    before = replica_info(live)
    reply = post(live, {"op": "hang"})
    assert reply.status_code == 504 and "predict_timeout" in reply.json()["error"]
    wait_ready(live)
    after = replica_info(live)
    assert after["restarts"] == before["restarts"] + 1 and after["pid"] != before["pid"]
    assert post(live, {"n": 5}).status_code == 200


def test_async_def_handle_works(tmp_path: Path) -> None:
    path = model_dir(tmp_path, '''
        import asyncio
        from djl_python import Output

        async def handle(inputs):
            if inputs.is_empty():
                return None
            await asyncio.sleep(0.01)
            return Output().add_as_json({"twice": inputs.get_as_json()["x"] * 2})
    ''')
    server = start_handler_server(path)
    try:
        assert post(server, {"x": 21}).json() == {"twice": 42}
    finally:
        server.stop()


def test_an_entry_point_names_the_handler_file(tmp_path: Path) -> None:
    path = model_dir(tmp_path, "raise SystemExit('model.py must not be loaded')\n", "option.entryPoint=serve.py\n",
                     **{"serve.py": "def handle(inputs):\n    return None if inputs.is_empty() else "
                                    "{'body': inputs.get_data()}\n"})  # fmt: skip
    server = start_handler_server(path, model={"entry_point": "serve.py"})
    try:
        reply = post(server, {"a": 1})
        assert reply.status_code == 200 and reply.json() == {"body": {"a": 1}}
        assert json.loads(reply.content) == {"body": {"a": 1}}
    finally:
        server.stop()


def test_a_handler_that_fails_to_initialise_fails_the_model_with_its_message(tmp_path: Path) -> None:
    path = model_dir(tmp_path, "def handle(inputs):\n    raise RuntimeError('no weights in ' + inputs.get_property('model_dir'))\n")
    with pytest.raises(AssertionError, match=r"/ping 500.*RuntimeError: no weights in"):
        start_handler_server(path)


def test_a_custom_handler_keeps_its_own_option_keys(tmp_path: Path) -> None:
    from lmserve.config import load_serving_config
    from lmserve.errors import ConfigError
    from lmserve.handlers.select import handler_properties

    (tmp_path / "custom").mkdir()
    (tmp_path / "plain").mkdir()
    custom = model_dir(tmp_path / "custom", DJL_MODEL, "option.greeting=hello\noption.dtype=fp32\n")
    config = load_serving_config(str(custom), env={}, properties=custom / "serving.properties")
    assert config.engine.dtype == "fp32"  # lmserve's own keys are still read
    assert handler_properties(custom, custom, config)["greeting"] == "hello"
    (tmp_path / "plain" / "serving.properties").write_text("option.greeting=hello\n")
    with pytest.raises(ConfigError, match="greeting"):  # without a handler, an unknown key is a typo
        load_serving_config(str(tmp_path / "plain"), env={}, properties=tmp_path / "plain" / "serving.properties")


def test_boto3_invoke_endpoint_reaches_the_custom_handler(live: LiveServer) -> None:
    boto3 = pytest.importorskip("boto3")
    from botocore.config import Config

    client = boto3.client("sagemaker-runtime", endpoint_url=live.url, region_name="us-east-1",
                          aws_access_key_id="local", aws_secret_access_key="local",
                          config=Config(retries={"max_attempts": 1}))  # fmt: skip
    answer = client.invoke_endpoint(EndpointName=live.runtime.name, Body=json.dumps({"n": 7}),
                                    ContentType="application/json")  # fmt: skip
    assert json.loads(answer["Body"].read())["echo"] == {"n": 7}
    with pytest.raises(client.exceptions.ModelError, match="the model refuses this batch"):
        client.invoke_endpoint(EndpointName=live.runtime.name, Body=json.dumps({"op": "raise"}))


def test_the_worker_makes_openmp_threads_sleep_soon_unless_the_operator_chose(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    # Spinning OpenMP threads of a worker took the cores the frontend needs between two batches.
    from lmserve.engine.cpu_threads import SPIN_ROUNDS

    path = model_dir(tmp_path, '''
        import os

        def handle(inputs):
            if inputs.is_empty():
                return None
            return {name: os.environ.get(name) for name in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    ''')
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    server = start_handler_server(path)
    try:
        assert post(server, {}).json() == {"GOMP_SPINCOUNT": str(SPIN_ROUNDS), "OMP_WAIT_POLICY": None}
    finally:
        server.stop()
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    server = start_handler_server(path)
    try:
        assert post(server, {}).json() == {"GOMP_SPINCOUNT": None, "OMP_WAIT_POLICY": "ACTIVE"}
    finally:
        server.stop()
