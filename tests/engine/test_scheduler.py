"""The continuous-batching scheduler, without a model."""

from __future__ import annotations

from lmserve.engine.block_manager import BlockManager
from lmserve.engine.request import Request, RequestStatus
from lmserve.engine.sampling_params import SamplingParams
from lmserve.engine.scheduler import Scheduler


def make_request(rid: str, n_prompt: int, base: int = 0) -> Request:
    return Request(rid, list(range(base, base + n_prompt)), SamplingParams())


def run_step(sched: Scheduler, sample_token: int = 7):
    """Schedule, then play the model: every request that is caught up samples ``sample_token``."""
    batch = sched.schedule()
    sched.update(batch, [sample_token] * len(batch.to_sample))
    return batch


def test_prefill_then_decode_one_token_each():
    sched = Scheduler(BlockManager(100, 4), max_num_seqs=8, max_num_batched_tokens=64)
    a, b = make_request("a", 10), make_request("b", 5, base=100)
    sched.add(a)
    sched.add(b)
    batch = run_step(sched)
    assert [r.request_id for r in batch.requests] == ["a", "b"] and batch.num_new_tokens == [10, 5]
    batch = run_step(sched)
    assert batch.num_new_tokens == [1, 1]
    assert a.status is RequestStatus.RUNNING and a.num_output_tokens == 2


def test_token_budget_chunks_a_long_prompt():
    sched = Scheduler(BlockManager(100, 4), max_num_seqs=8, max_num_batched_tokens=16)
    a = make_request("a", 40)
    sched.add(a)
    chunks = []
    while a.num_output_tokens == 0:
        chunks.append(run_step(sched).num_new_tokens[0])
    assert chunks == [16, 16, 8]


def test_decodes_go_before_new_prefill_and_share_the_budget():
    sched = Scheduler(BlockManager(100, 4), max_num_seqs=8, max_num_batched_tokens=16)
    a = make_request("a", 4)
    sched.add(a)
    run_step(sched)
    b = make_request("b", 30, base=100)
    sched.add(b)
    batch = run_step(sched)
    assert [r.request_id for r in batch.requests] == ["a", "b"]
    assert batch.num_new_tokens == [1, 15]


def test_max_num_seqs_caps_running_requests():
    sched = Scheduler(BlockManager(100, 4), max_num_seqs=2, max_num_batched_tokens=100)
    reqs = [make_request(str(i), 3, base=10 * i) for i in range(3)]
    for r in reqs:
        sched.add(r)
    batch = run_step(sched)
    assert len(batch) == 2 and reqs[2].status is RequestStatus.WAITING


def test_preempts_most_recent_request_when_blocks_run_out_and_recomputes_it_later():
    # 4 blocks of 4 tokens. Two 7-token prompts take 2 blocks each; the 9th token of either needs more.
    sched = Scheduler(BlockManager(4, 4, enable_prefix_caching=False), max_num_seqs=4, max_num_batched_tokens=64)
    a, b = make_request("a", 7), make_request("b", 7, base=100)
    sched.add(a)
    sched.add(b)
    run_step(sched)  # prefill both: 8 tokens each after sampling
    batch = run_step(sched)  # 8th token of each fits in its second block
    assert batch.num_new_tokens == [1, 1]
    batch = run_step(sched)  # a needs a third block: b (admitted last) is preempted
    assert batch.preempted == [b] and [r.request_id for r in batch.requests] == ["a"]
    assert b.status is RequestStatus.PREEMPTED and b.num_computed_tokens == 0 and b.block_ids == []
    assert sched.waiting[0] is b and sched.num_preemptions == 1
    sched.finish(a, RequestStatus.FINISHED_STOPPED)
    tokens_so_far = b.num_tokens
    batch = run_step(sched)  # b comes back and recomputes prompt + its generated tokens
    assert batch.requests == [b] and batch.num_new_tokens == [tokens_so_far]


def test_preempted_request_reuses_its_own_cached_prefix():
    sched = Scheduler(BlockManager(4, 4), max_num_seqs=4, max_num_batched_tokens=64)
    a, b = make_request("a", 7), make_request("b", 7, base=100)
    sched.add(a)
    sched.add(b)
    run_step(sched)
    run_step(sched)
    run_step(sched)  # b preempted; its full first block stays cached
    sched.finish(a, RequestStatus.FINISHED_STOPPED)
    tokens_so_far = b.num_tokens
    batch = run_step(sched)
    assert batch.requests == [b] and b.num_computed_tokens == tokens_so_far
    assert batch.num_new_tokens[0] < tokens_so_far  # cached blocks were not recomputed


def test_prefix_hit_is_recorded_on_first_admission():
    sched = Scheduler(BlockManager(100, 4), max_num_seqs=4, max_num_batched_tokens=64)
    a = make_request("a", 12)
    sched.add(a)
    run_step(sched)
    b = make_request("b", 12)
    sched.add(b)
    batch = run_step(sched)
    assert batch.num_new_tokens == [1, 4] and b.num_cached_tokens == 8


def test_finish_frees_blocks_and_leaves_queues():
    bm = BlockManager(10, 4)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64)
    a, w = make_request("a", 6), make_request("w", 3, base=50)
    sched.add(a)
    run_step(sched)
    sched.add(w)
    sched.finish(a, RequestStatus.FINISHED_ABORTED)
    sched.finish(w, RequestStatus.FINISHED_ABORTED)
    assert not sched.has_unfinished() and bm.num_free_blocks == 10


def test_a_prompt_that_barely_overshoots_the_budget_is_taken_whole():
    """A first token comes from a prompt's last chunk: a remnant of a few tokens would hold it back a
    whole step, so a rest within half a budget of what is left is computed now, up to the cap."""
    from lmserve.engine.scheduler import WHOLE_PROMPT_SLACK
    from lmserve.engine.step_budget import StepBudget

    assert WHOLE_PROMPT_SLACK == 0.5
    sched = Scheduler(BlockManager(200, 4), max_num_seqs=8, max_num_batched_tokens=140,
                      budget=StepBudget(100, 16, 140, adaptive=False))
    for i, n in enumerate([60, 70, 90]):
        sched.add(make_request(str(i), n, base=100 * i))
    first = run_step(sched)  # 60 fit; 70 overshoots the 40 left by 30 <= 50: whole (130 <= the cap)
    assert first.num_new_tokens == [60, 70] and len(first.to_sample) == 2
    second = run_step(sched)  # two decodes, then 90 fits in the 98 left
    assert second.num_new_tokens == [1, 1, 90]
    sched.add(make_request("long", 300, base=1000))
    third = run_step(sched)  # 300 overshoots the 97 left by far more than half a budget: a chunk
    assert third.num_new_tokens == [1, 1, 1, 97]
    capped = Scheduler(BlockManager(200, 4), max_num_seqs=8, max_num_batched_tokens=120,
                       budget=StepBudget(100, 16, 120, adaptive=False))
    capped.add(make_request("a", 60))
    capped.add(make_request("b", 70, base=100))
    assert run_step(capped).num_new_tokens == [60, 40]  # 130 tokens would pass the step's cap
