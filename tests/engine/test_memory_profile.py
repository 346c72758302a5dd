"""The profiling step that sizes the KV cache on CUDA: a valid largest step that runs through the
model, and on a GPU a measurement of its peak."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmserve.config.settings import EngineConfig
from lmserve.engine.kv_cache import KVCacheSpec, allocate_kv_cache
from lmserve.engine.memory_profile import SAMPLER_LOGIT_COPIES, profile_activation_bytes, profiling_step
from lmserve.engine.model_runner import ModelRunner
from lmserve.parallel.step import StepInputs
from tests.tiny_models import make_tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    path = tmp_path_factory.mktemp("llama")
    make_tiny_model(path, "llama", tokenizer_dir)
    return path


def test_the_profiling_step_splits_the_budget_into_sequences_the_model_can_hold() -> None:
    step = profiling_step(step_tokens=100, max_model_len=32, block_size=8, logit_rows=6)
    assert step.context_lens.tolist() == [32, 32, 32, 4]
    assert step.query_start_loc.tolist() == [0, 32, 64, 96, 100]
    assert int(step.positions.max()) == 31 and step.input_ids.numel() == 100
    assert step.slot_mapping.unique().numel() == 100  # every token its own cache slot
    assert int(step.slot_mapping.max()) < step.block_tables.numel() * 8
    assert step.logits_indices.tolist() == list(range(94, 100))


def test_the_profiling_step_runs_through_the_model(model_dir: Path) -> None:
    runner = ModelRunner(EngineConfig(model=str(model_dir), dtype="fp32", device="cpu", max_model_len=48,
                                      block_size=4, kv_cache_tokens=64), progress=False)
    step = profiling_step(100, 48, 4, logit_rows=5)
    caches = allocate_kv_cache(runner.kv_spec, step.block_tables.numel(), runner.device)
    logits = runner._forward(step, caches)
    assert logits is not None and logits.shape == (5, runner.model_config.vocab_size)
    assert torch.isfinite(logits).all()


@pytest.mark.gpu
def test_profiling_counts_the_step_peak_but_not_its_throw_away_cache() -> None:
    spec = KVCacheSpec(num_layers=2, num_kv_heads=2, head_dim=64, block_size=16, dtype=torch.bfloat16)
    step = profiling_step(256, 128, 16, logit_rows=4)

    def run(inputs: StepInputs, caches: list) -> None:
        scratch = torch.empty(64 << 20, dtype=torch.uint8, device="cuda")
        del scratch

    got = profile_activation_bytes(run, spec, step, vocab_size=1000, device=torch.device("cuda"))
    sampler = SAMPLER_LOGIT_COPIES * 4 * 1000 * 4
    assert 64 << 20 <= got - sampler < (64 << 20) + (1 << 20)


@pytest.mark.gpu
def test_cuda_runs_bf16_with_a_profiled_cache_and_decode_graphs(model_dir: Path) -> None:
    runner = ModelRunner(EngineConfig(model=str(model_dir), device="cuda", max_num_seqs=8, max_model_len=256),
                         progress=False)
    assert runner.dtype == torch.bfloat16 and runner.num_blocks > 0
    assert runner.decode_graphs is not None and runner.decode_graphs.sizes == [1, 2, 4, 8]
