"""The CUDA-graph component's bucketing, padding and buffer filling, on the CPU: capture is
injected (an eager stand-in that reruns the forward into the captured output), so everything but
the graph itself runs here."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmserve import LLM, SamplingParams
from lmserve.engine.cuda_graphs import DecodeBuffers, DecodeGraphs, bucket_for, bucket_sizes, eager_capture
from lmserve.parallel.step import StepInputs
from tests.tiny_models import make_tiny_model

PAD_BLOCK, BLOCK_SIZE = 50, 4


@pytest.mark.parametrize(("max_num_seqs", "sizes"), [
    (1, [1]), (3, [1, 2, 3]), (8, [1, 2, 4, 8]), (20, [1, 2, 4, 8, 16, 20]),
    (64, [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]),
])
def test_buckets_double_to_eight_then_step_by_eight(max_num_seqs: int, sizes: list[int]) -> None:
    assert bucket_sizes(max_num_seqs) == sizes


def test_a_batch_goes_to_the_smallest_bucket_that_holds_it() -> None:
    sizes = bucket_sizes(20)
    assert [bucket_for(sizes, n) for n in (1, 3, 5, 8, 9, 17, 20, 21)] == [1, 4, 8, 8, 16, 20, 20, None]


def decode_step(contexts: list[int], width: int = 3) -> StepInputs:
    """A decode step: one new token per sequence at position context - 1, blocks 10*s + i."""
    n = len(contexts)
    tables = torch.tensor([[10 * s + i for i in range(width)] for s in range(n)], dtype=torch.int32)
    pos = torch.tensor(contexts, dtype=torch.long) - 1
    slots = tables[torch.arange(n), pos // BLOCK_SIZE].long() * BLOCK_SIZE + pos % BLOCK_SIZE
    return StepInputs(input_ids=torch.arange(100, 100 + n), positions=pos, slot_mapping=slots, block_tables=tables,
                      context_lens=torch.tensor(contexts, dtype=torch.int32),
                      query_start_loc=torch.arange(n + 1, dtype=torch.int32), logits_indices=torch.arange(n))


def echo_forward(b: DecodeBuffers, batch: int) -> torch.Tensor:
    """What each row of the batch read: token, position, slot, context length, first two blocks."""
    cols = [b.input_ids, b.positions, b.slot_mapping, b.context_lens, b.block_tables[:, 0], b.block_tables[:, 1]]
    return torch.stack([c[:batch].double() for c in cols], dim=1)


def graphs(max_num_seqs: int = 8, captured: list[int] | None = None) -> DecodeGraphs:
    def capture(run):  # type: ignore[no-untyped-def]
        replay, out = eager_capture(run)
        if captured is not None:
            captured.append(out.shape[0])
        return replay, out

    g = DecodeGraphs(echo_forward, max_num_seqs, max_blocks=4, device=torch.device("cpu"), pad_block=PAD_BLOCK,
                     block_size=BLOCK_SIZE, capture=capture)
    g.capture_all()
    return g


def test_every_bucket_is_captured_once_largest_first() -> None:
    captured: list[int] = []
    g = graphs(8, captured)
    assert captured == [8, 4, 2, 1]
    g.run(decode_step([5, 9, 2]))
    assert captured == [8, 4, 2, 1]  # serving replays, never captures


def test_a_decode_step_is_copied_into_the_buffers_and_padded_to_its_bucket() -> None:
    g = graphs()
    before = {name: t.data_ptr() for name, t in vars(g.buffers).items()}
    step = decode_step([5, 9, 2])
    out = g.run(step)
    assert out is not None and out.shape == (3, 6) and g.replays == 1
    want = torch.stack([step.input_ids, step.positions, step.slot_mapping, step.context_lens,
                        step.block_tables[:, 0], step.block_tables[:, 1]], dim=1).double()
    torch.testing.assert_close(out, want)
    # Row 3 pads the batch to bucket 4: a one-token sequence writing into the scratch block only.
    b = g.buffers
    assert b.slot_mapping[3] == PAD_BLOCK * BLOCK_SIZE and b.context_lens[3] == 1
    assert b.block_tables[3].tolist() == [PAD_BLOCK] * 4
    assert {name: t.data_ptr() for name, t in vars(b).items()} == before  # filled in place


def test_a_smaller_batch_after_a_larger_one_leaves_no_stale_rows() -> None:
    g = graphs()
    g.run(decode_step([5, 9, 2, 7, 8, 3]))
    out = g.run(decode_step([4, 6]))
    assert out is not None and out[:, 0].tolist() == [100, 101]
    assert g.buffers.context_lens[:2].tolist() == [4, 6]  # bucket 2: no padding row at all


def test_prefills_and_batches_above_the_largest_bucket_run_eagerly() -> None:
    g = graphs(4)
    prefill = decode_step([5, 9])
    prefill.input_ids = torch.arange(3)
    prefill.query_start_loc = torch.tensor([0, 2, 3], dtype=torch.int32)
    assert g.run(prefill) is None
    assert g.run(decode_step([3] * 5)) is None
    assert g.eager_fallbacks == 2 and g.replays == 0


def test_a_table_wider_than_the_captured_one_is_refused() -> None:
    g = graphs()
    with pytest.raises(ValueError, match="exceeds the captured"):
        g.run(decode_step([5], width=6))


def test_graph_replayed_decoding_gives_the_eager_tokens_and_logprobs(tmp_path: Path, tokenizer_dir: Path) -> None:
    # The model runner's own path: its capture forward, the scratch block for padding rows, the
    # same KV cache. Three requests decode in bucket 4 (one padding row), then fewer as they end.
    make_tiny_model(tmp_path, "llama", tokenizer_dir)
    llm = LLM(str(tmp_path), dtype="fp32", max_model_len=64, block_size=4, max_num_seqs=4,
              enable_prefix_caching=False)
    prompts = [[5, 6, 7, 8, 9], [11, 12], [4, 3, 2, 1, 20, 21, 22]]
    params = [SamplingParams(max_new_tokens=n, ignore_eos=True, logprobs=2) for n in (9, 6, 12)]
    eager = llm.generate(prompts, params)
    runner = llm.engine.runner
    runner.use_decode_graphs(eager_capture)  # type: ignore[attr-defined]
    replayed = llm.generate(prompts, params)
    assert runner.decode_graphs.replays > 0  # type: ignore[attr-defined]
    for a, b in zip(eager, replayed, strict=True):
        assert a.token_ids == b.token_ids
        assert a.logprobs is not None and b.logprobs is not None
        for x, y in zip(a.logprobs, b.logprobs, strict=True):
            assert x.token_id == y.token_id and x.logprob == pytest.approx(y.logprob, abs=1e-4)


@pytest.mark.gpu
def test_cuda_graph_decoding_gives_the_eager_tokens(tmp_path: Path, tokenizer_dir: Path) -> None:
    make_tiny_model(tmp_path, "llama", tokenizer_dir)
    prompts = [[5, 6, 7, 8, 9], [11, 12], [4, 3, 2, 1, 20, 21, 22]]
    params = [SamplingParams(max_new_tokens=n, ignore_eos=True, logprobs=2) for n in (9, 6, 12)]
    results = []
    for eager in (True, False):
        llm = LLM(str(tmp_path), device="cuda", dtype="fp32", max_model_len=64, max_num_seqs=4, kv_cache_tokens=512,
                  enforce_eager=eager)
        results.append(llm.generate(prompts, params))
        graphs = llm.engine.runner.decode_graphs  # type: ignore[attr-defined]
        assert (graphs is None) == eager and (eager or graphs.replays > 0)
        del llm
    for a, b in zip(*results, strict=True):
        assert a.token_ids == b.token_ids
        assert a.logprobs is not None and b.logprobs is not None
        assert [x.logprob for x in a.logprobs] == pytest.approx([y.logprob for y in b.logprobs], abs=1e-3)


def test_the_decode_fast_path_prepares_what_the_general_path_does() -> None:
    from lmserve.engine.model_runner import ModelRunner
    from lmserve.engine.request import Request

    class Prep(ModelRunner):
        def __init__(self) -> None:  # only what prepare reads
            self.block_size = 4

    requests = []
    for i, (prompt, out) in enumerate([(5, 0), (3, 4), (9, 7)]):
        r = Request(str(i), list(range(10, 10 + prompt)), SamplingParams())
        r.output_token_ids = list(range(50, 50 + out))
        r.num_computed_tokens = r.num_tokens - 1
        r.block_ids = [7 * i + b for b in range(-(-r.num_tokens // 4))]
        requests.append(r)
    fast, general = Prep().prepare(requests, [1, 1, 1]), Prep()._prepare_any(requests, [1, 1, 1])
    for name in vars(general):
        got, want = getattr(fast, name), getattr(general, name)
        assert got.dtype == want.dtype and torch.equal(got, want), name
