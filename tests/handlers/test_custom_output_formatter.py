"""option.output_formatter naming a function of the model directory's model.py (the managed LMI
containers' custom formatter): called per generated token with a TextGenerationOutput, its strings
are the /invocations answer; a formatter that raises is a 424; a model registered at run time may
not bring one (the fake engine stands in for a model)."""

from __future__ import annotations

import asyncio
import json
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from lmserve.config import load_serving_config
from lmserve.server.runtime import LoadPlan, ModelRuntime
from tests.handlers.conftest import start_handler_server
from tests.server.conftest import FAKE_FACTORY, LiveServer, start_server
from tests.server.tiny_tokenizer import build_tiny_tokenizer

MODEL_PY = '''
    import json
    from pathlib import Path

    from djl_python.output_formatter import TextGenerationOutput, output_formatter

    Path(__file__).with_name("imported").write_text("yes")  # shows whether the server ran this file


    @output_formatter
    def per_token(output: TextGenerationOutput) -> str:
        sequence = output.sequences[output.best_sequence_index]
        token, first, last = sequence.get_next_token()
        line = {"id": token.id, "text": token.text, "first": first, "last": last, "request": output.request_id,
                "log_prob": token.log_prob}
        if last:
            line |= {"finish_reason": sequence.finish_reason, "input": output.input.input_text,
                     "generated": "".join(t.text for t in sequence.tokens),
                     "max_new_tokens": output.input.parameters["max_new_tokens"]}
        return json.dumps(line) + "\\n"


    def broken(output):
        raise ValueError("this formatter refuses")
'''
ASK = {"inputs": "hello there", "parameters": {"max_new_tokens": 5}}


def formatter_model(directory: Path, properties: str = "") -> Path:
    build_tiny_tokenizer(directory)
    (directory / "model.py").write_text(textwrap.dedent(MODEL_PY))
    if properties:
        (directory / "serving.properties").write_text(properties)
    return directory


def serve(directory: Path, formatter: str) -> LiveServer:
    return start_handler_server(formatter_model(directory), model={"output_formatter": formatter},
                                plan={"engine_factory": FAKE_FACTORY, "engine_options": {"token_delay_s": 0.002}})


@pytest.fixture(scope="module")
def working(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    server = serve(tmp_path_factory.mktemp("formatter-model"), "per_token")
    yield server
    server.stop()


def test_the_formatter_writes_one_piece_per_token_streaming_and_not(working: LiveServer) -> None:
    with working.client() as http:
        streamed = http.post("/invocations", json=ASK | {"stream": True})
        whole = http.post("/invocations", json=ASK | {"inputs": ["a b", "c"]})
    assert streamed.status_code == 200 and whole.status_code == 200
    lines = [json.loads(line) for line in streamed.text.splitlines()]
    assert [(line["first"], line["last"]) for line in lines] == [(True, False)] + [(False, False)] * 3 + [(False, True)]
    assert lines[-1]["finish_reason"] == "length" and lines[-1]["input"] == "hello there"
    assert lines[-1]["generated"] == "".join(line["text"] for line in lines) and lines[-1]["max_new_tokens"] == 5
    answers = [json.loads(line) for line in whole.text.splitlines()]
    assert [line["request"] for line in answers] == [0] * 5 + [1] * 5  # request after request, in order
    assert [line["input"] for line in answers if line["last"]] == ["a b", "c"]
    assert all(line["log_prob"] is not None for line in lines + answers)


def test_a_formatter_that_raises_fails_the_request_with_its_message(tmp_path: Path) -> None:
    server = serve(tmp_path, "broken")
    try:
        with server.client() as http:
            whole = http.post("/invocations", json=ASK)
            streamed = http.post("/invocations", json=ASK | {"stream": True})
            after = http.post("/invocations", json=ASK)
    finally:
        server.stop()
    assert whole.status_code == 424 and "this formatter refuses" in whole.json()["error"]
    assert "this formatter refuses" in json.loads(streamed.text.splitlines()[-1])["error"]
    assert after.status_code == 424  # the server is still up, and still asks the formatter


def test_a_model_registered_at_run_time_may_not_bring_a_formatter(tiny_model_dir: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    path = formatter_model(store / "fmt", "option.output_formatter=per_token\n")
    (path / "imported").unlink(missing_ok=True)
    server = start_server(tiny_model_dir, server={"enable_model_api": True, "model_store": str(store)})
    try:
        with server.client() as http:
            reply = http.post("/models", params={"url": str(path), "model_name": "fmt"})
    finally:
        server.stop()
    assert reply.status_code == 403, reply.text
    assert "option.output_formatter" in reply.json()["error"]
    assert not (path / "imported").exists()


def test_the_formatter_comes_from_the_directory_of_serving_properties_that_points_at_the_weights(
        tiny_model_dir: Path, tmp_path: Path) -> None:  # fmt: skip
    # The containers' usual layout: serving.properties and model.py together, the weights elsewhere.
    (tmp_path / "model.py").write_text(textwrap.dedent(MODEL_PY))
    (tmp_path / "serving.properties").write_text(f"option.model_id={tiny_model_dir}\n"
                                                 "option.output_formatter=per_token\n")  # fmt: skip
    config = load_serving_config(str(tmp_path), env={})
    runtime = ModelRuntime(LoadPlan(config, model_arg=str(tmp_path), resolve=True, engine_factory=FAKE_FACTORY))

    async def load_then_stop() -> None:
        try:
            await runtime.load()
        finally:
            await runtime.shutdown()

    asyncio.run(load_then_stop())
    assert runtime.error is None
    assert runtime.output_formatter is not None and runtime.output_formatter.__name__ == "per_token"
