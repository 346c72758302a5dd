"""The server in front of the real engine (a tiny random Llama on the CPU), not the fake one."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from lmserve.server.runtime import DEFAULT_ENGINE_FACTORY
from tests.server.conftest import MODEL_NAME, LiveServer, start_server
from tests.server.metrics_util import metric, wait_for_metric

pytestmark = pytest.mark.slow
ENGINE = {"dtype": "fp32", "device": "cpu", "max_model_len": 128, "block_size": 16, "kv_cache_tokens": 2048}


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    from tests.tiny_models import make_tiny_model

    path = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_model(path, "llama", tokenizer_dir)
    return path


@pytest.fixture(scope="module")
def real(llama_dir: Path) -> Iterator[LiveServer]:
    server = start_server(llama_dir, engine_factory=DEFAULT_ENGINE_FACTORY, engine=ENGINE,
                          model_loading_timeout_s=300)  # fmt: skip
    yield server
    server.stop()


def test_greedy_completion_matches_the_offline_engine(real: LiveServer, llama_dir: Path) -> None:
    from lmserve import LLM, SamplingParams

    prompt = [5, 17, 33, 42, 7, 99]
    client = openai.OpenAI(base_url=f"{real.url}/v1", api_key="unused", max_retries=0)
    served = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=12, temperature=0,
                                       extra_body={"ignore_eos": True})  # fmt: skip
    offline = LLM(llama_dir, **{k: v for k, v in ENGINE.items() if k != "block_size"}).generate(
        [prompt], SamplingParams(max_new_tokens=12, ignore_eos=True))[0]  # fmt: skip
    assert served.choices[0].text == offline.text
    assert served.usage.completion_tokens == 12


def test_chat_stream_through_the_model_template(real: LiveServer) -> None:
    client = openai.OpenAI(base_url=f"{real.url}/v1", api_key="unused", max_retries=0)
    chunks = list(client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "Paris?"}],
                                                 max_tokens=5, temperature=0, stream=True))
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_disconnect_frees_the_real_kv_blocks(real: LiveServer) -> None:
    body = {"inputs": "The quick brown fox", "stream": True,
            "parameters": {"max_new_tokens": 100, "ignore_eos": True}}  # fmt: skip
    with real.client() as http:
        with http.stream("POST", "/invocations", json=body) as r:
            lines = r.iter_lines()
            next(lines)
            assert metric(http, "lmserve_kv_cache_usage_ratio") > 0
        wait_for_metric(http, "lmserve_num_requests_running", 0)
        wait_for_metric(http, "lmserve_kv_cache_usage_ratio", 0)
        assert isinstance(http.get("/info").json()["max_total_tokens"], int)


def test_prompt_longer_than_the_context_is_400(real: LiveServer) -> None:
    with httpx.Client(base_url=real.url) as http:
        r = http.post("/v1/completions", json={"prompt": list(range(10, 140)), "max_tokens": 1})
    assert r.status_code == 400 and r.json()["field"] == "prompt"
