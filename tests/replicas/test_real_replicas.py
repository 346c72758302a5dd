"""Replicas of a real model (a tiny random Llama) on the CPU: load spread, a killed replica, and a
tensor-parallel replica, all through the HTTP server."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from lmserve.server.runtime import DEFAULT_ENGINE_FACTORY
from lmserve.workers.launcher import Backoff
from tests.server.conftest import MODEL_NAME, LiveServer, start_server

pytestmark = pytest.mark.slow
ENGINE = {"dtype": "fp32", "device": "cpu", "max_model_len": 1024, "block_size": 16, "kv_cache_tokens": 8192}


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    from tests.tiny_models import make_tiny_model

    path = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_model(path, "llama", tokenizer_dir)
    return path


@pytest.fixture(scope="module")
def two(llama_dir: Path) -> Iterator[LiveServer]:
    """Two replicas, one core each where there are two (``option.cpu_devices=2``)."""
    server = start_server(llama_dir, engine_factory=DEFAULT_ENGINE_FACTORY, engine=ENGINE, job_queue_size=64,
                          workers={"cpu_devices": 2}, backoff=Backoff(first_s=0.5), model_loading_timeout_s=300)  # fmt: skip
    yield server
    server.stop()


def describe(http: httpx.Client) -> dict:
    return http.get(f"/models/{MODEL_NAME}").json()  # type: ignore[no-any-return]


def test_two_replicas_both_take_a_concurrent_load_and_answer_alike(two: LiveServer) -> None:
    body = {"prompt": [5, 17, 33, 42, 7, 99], "max_tokens": 16, "temperature": 0, "ignore_eos": True}
    with two.client() as http:
        before = [r["requests_total"] for r in describe(http)["replicas"]]
        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(lambda _: http.post("/v1/completions", json=body), range(32)))
        assert {a.status_code for a in answers} == {200}
        assert len({a.json()["choices"][0]["text"] for a in answers}) == 1  # same weights, same greedy text
        model = describe(http)
    served = [r["requests_total"] - b for r, b in zip(model["replicas"], before, strict=True)]
    assert sum(served) == 32 and min(served) >= 8, served
    assert model["replicas"][0]["devices"]["threads_per_rank"] * 2 <= max(2, len(os.sched_getaffinity(0)))


@dataclass
class Stream:
    lines: list[dict] = field(default_factory=list)
    ended_at: float = 0.0
    started: threading.Event = field(default_factory=threading.Event)

    def run(self, url: str) -> None:
        body = {"inputs": "The quick brown fox", "stream": True,
                "parameters": {"max_new_tokens": 1000, "ignore_eos": True}}  # fmt: skip
        with httpx.Client(timeout=120) as http, http.stream("POST", f"{url}/invocations", json=body) as r:
            for line in r.iter_lines():
                if line:
                    self.lines.append(json.loads(line))
                    self.started.set()
        self.ended_at = time.monotonic()

    @property
    def failed(self) -> bool:
        return "error" in self.lines[-1]


def test_a_killed_replica_fails_only_its_requests_and_comes_back(two: LiveServer) -> None:
    streams = [Stream() for _ in range(6)]
    threads = [threading.Thread(target=s.run, args=(two.url,)) for s in streams]
    for thread in threads:
        thread.start()
    with two.client() as http:
        assert all(s.started.wait(60) for s in streams)
        victim, survivor = describe(http)["replicas"]
        killed = time.monotonic()
        os.kill(victim["pid"], signal.SIGKILL)
        assert victim["outstanding"] >= 1 and survivor["outstanding"] >= 1, (victim, survivor)
        time.sleep(0.3)
        ping = http.get("/ping")
        assert ping.status_code == 200 and ping.json()["models"][MODEL_NAME]["replicas_ready"] == 1
        assert [r["state"] for r in describe(http)["replicas"]][1] == "ready"
        meanwhile = http.post("/generate", json={"inputs": "Paris", "parameters": {"max_new_tokens": 4}})
        assert meanwhile.status_code == 200  # the survivor serves while the victim restarts
        for thread in threads:
            thread.join(120)
        failed = [s for s in streams if s.failed]
        assert len(failed) == victim["outstanding"] and all("exited unexpectedly" in s.lines[-1]["error"] for s in failed)
        assert max(s.ended_at for s in failed) - killed < 3
        assert all(s.lines[-1]["generated_text"] is not None for s in streams if not s.failed)
        deadline = time.monotonic() + 120
        while (replicas := describe(http)["replicas"])[0]["state"] != "ready":
            assert time.monotonic() < deadline, replicas
            time.sleep(0.2)
        assert replicas[0]["pid"] != victim["pid"] and replicas[0]["restarts"] == 1
        assert http.get("/ping").json()["models"][MODEL_NAME]["replicas_ready"] == 2


def test_a_tensor_parallel_replica_matches_the_offline_engine(llama_dir: Path) -> None:
    from lmserve import LLM, SamplingParams

    engine = ENGINE | {"tensor_parallel_degree": 2, "max_model_len": 128, "kv_cache_tokens": 2048}
    server = start_server(llama_dir, engine_factory=DEFAULT_ENGINE_FACTORY, engine=engine,
                          workers={"cpu_devices": 2}, model_loading_timeout_s=300)  # fmt: skip
    prompts = [[5, 17, 33, 42, 7, 99], [10, 11, 12]]
    try:
        with server.client() as http:
            [replica] = describe(http)["replicas"]  # two CPU devices at degree 2: one replica
            assert describe(http)["tensor_parallel_degree"] == 2 and replica["state"] == "ready"
            served = [http.post("/v1/completions", json={"prompt": p, "max_tokens": 12, "temperature": 0,
                                                         "ignore_eos": True}).json()["choices"][0]["text"]
                      for p in prompts]  # fmt: skip
    finally:
        server.stop()
    offline = LLM(llama_dir, dtype="fp32", device="cpu", max_model_len=128, kv_cache_tokens=2048).generate(
        prompts, SamplingParams(max_new_tokens=12, ignore_eos=True))  # fmt: skip
    assert served == [o.text for o in offline]
