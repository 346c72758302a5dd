"""A tensor-parallel group: step messages, idling, and failing loudly when any rank dies."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from lmserve import LLM, SamplingParams
from lmserve.errors import ConfigError, EngineDeadError
from lmserve.parallel.step import STEP, StepInputs, decode_step, encode_step
from lmserve.parallel.supervisor import HEARTBEAT_S
from tests.parallel.helpers import close
from tests.tiny_models import make_tiny_model

pytestmark = pytest.mark.usefixtures("private_cache")

FAIL_WITHIN_S = 5.0


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    path = tmp_path_factory.mktemp("gpt2")
    make_tiny_model(path, "gpt2", tokenizer_dir)
    return path


def test_step_inputs_survive_the_wire_format() -> None:
    inputs = StepInputs(
        input_ids=torch.tensor([5, 6, 7]), positions=torch.tensor([0, 1, 9]), slot_mapping=torch.tensor([0, 1, 41]),
        block_tables=torch.tensor([[0, 0], [1, 2]], dtype=torch.int32),
        context_lens=torch.tensor([2, 10], dtype=torch.int32),
        query_start_loc=torch.tensor([0, 2, 3], dtype=torch.int32), logits_indices=torch.tensor([1, 2]))
    header, payload = encode_step(STEP, inputs)
    decoded = decode_step(header, payload)
    for name, value in vars(inputs).items():
        got = getattr(decoded, name)
        assert got.dtype == value.dtype and torch.equal(got, value), name


def test_impossible_degrees_are_refused_before_any_process_starts(gpt2_dir: Path) -> None:
    with pytest.raises(ConfigError, match="at most 4: the model has 4 query heads"):
        LLM(str(gpt2_dir), dtype="fp32", tensor_parallel_degree=8)
    with pytest.raises(ConfigError, match="256 output features cannot be split over 3 ranks"):
        LLM(str(gpt2_dir), dtype="fp32", tensor_parallel_degree=3)
    assert multiprocessing.active_children() == []


def test_group_idles_through_heartbeats_then_generates(gpt2_dir: Path) -> None:
    llm = LLM(str(gpt2_dir), dtype="fp32", kv_cache_tokens=256, tensor_parallel_degree=2)
    try:
        time.sleep(2.5 * HEARTBEAT_S)  # the workers wait in a collective meanwhile
        (out,) = llm.generate([[5, 6, 7]], SamplingParams(max_new_tokens=4, ignore_eos=True))
        assert len(out.token_ids) == 4
    finally:
        close(llm)
    assert all(not p.is_alive() for p in multiprocessing.active_children())


def test_killing_a_worker_mid_generation_fails_the_request_within_seconds(gpt2_dir: Path) -> None:
    llm = LLM(str(gpt2_dir), dtype="fp32", kv_cache_tokens=4096, tensor_parallel_degree=2)
    (worker,) = llm.engine.runner.worker_pids
    killed_at: list[float] = []

    def kill() -> None:
        time.sleep(0.5)
        killed_at.append(time.monotonic())
        os.kill(worker, signal.SIGKILL)

    threading.Thread(target=kill).start()
    try:
        with pytest.raises(EngineDeadError, match=rf"rank 1 \(pid {worker}\) exited with code -9"):
            llm.generate([[5, 6, 7]] * 4, SamplingParams(max_new_tokens=1000, ignore_eos=True))
        assert time.monotonic() - killed_at[0] < FAIL_WITHIN_S
        with pytest.raises(EngineDeadError):  # the engine stays dead rather than hanging
            llm.generate([[5, 6, 7]], SamplingParams(max_new_tokens=2))
    finally:
        close(llm)


_ENGINE = """
import sys, time
from lmserve import LLM
llm = LLM(sys.argv[1], dtype="fp32", kv_cache_tokens=256, tensor_parallel_degree=2)
print(*llm.engine.runner.worker_pids, flush=True)
time.sleep(600)
"""


def test_workers_exit_when_the_engine_process_is_killed(gpt2_dir: Path) -> None:
    engine = subprocess.Popen([sys.executable, "-c", _ENGINE, str(gpt2_dir)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])})
    try:
        workers = [int(pid) for pid in engine.stdout.readline().split()]  # type: ignore[union-attr]
        assert workers
        engine.kill()
        engine.wait()
        deadline = time.monotonic() + FAIL_WITHIN_S
        while time.monotonic() < deadline and any(_alive(pid) for pid in workers):
            time.sleep(0.1)
        assert not any(_alive(pid) for pid in workers)
    finally:
        engine.kill()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_an_engine_process_stops_its_ranks_and_exits_by_itself(gpt2_dir: Path) -> None:
    """A process-group SIGTERM leaves the engine process and its ranks running (they ignore it while
    the frontend drains); after ``Shutdown`` the engine must stop its ranks itself, or it waits on
    them at exit until the frontend gives up and kills it (exit code -9)."""
    from lmserve.config.settings import EngineConfig
    from lmserve.workers.engine_client import EngineClient
    from lmserve.workers.messages import EngineSpec

    config = EngineConfig(model=str(gpt2_dir), dtype="fp32", kv_cache_tokens=256, tensor_parallel_degree=2)
    client = EngineClient(EngineSpec("lmserve.engine.llm_engine:LLMEngine", config))

    async def serve_one_request() -> list[int]:
        await client.start()
        await client.wait_ready(timeout=120)
        try:
            stream = client.generate([5, 6, 7], SamplingParams(max_new_tokens=3, ignore_eos=True), "r1")
            return [token for delta in [d async for d in stream] for token in delta.token_ids]
        finally:
            await client.shutdown()

    assert len(asyncio.run(serve_one_request())) == 3
    assert client._process.exitcode == 0
