"""The step token budget follows the measured speed (made-up step durations; nothing is timed)."""

from __future__ import annotations

from lmserve.engine.block_manager import BlockManager
from lmserve.engine.request import Request
from lmserve.engine.sampling_params import SamplingParams
from lmserve.engine.scheduler import Scheduler
from lmserve.engine.step_budget import BUDGET_FLOOR, StepBudget, engine_step_budget


def test_the_budget_is_the_measured_prefill_speed_times_the_target_step_time():
    budget = StepBudget(512, floor=16, cap=2048, target_step_s=0.2)
    budget.record(512, 2, seconds=0.5)  # 1024 tokens/s: a 0.2 s step holds about 205 of them
    assert budget.tokens == 192  # rounded down to a multiple of 16
    for _ in range(20):  # a machine five times faster: the budget grows to 0.2 s of 5120 tokens/s
        budget.record(budget.tokens, 2, seconds=budget.tokens / 5120)
    assert 960 <= budget.tokens <= 1024


def test_a_slower_machine_gets_shorter_steps_not_longer_ones():
    fast, slow = StepBudget(512, 16, 2048), StepBudget(512, 16, 2048)
    for _ in range(10):
        fast.record(fast.tokens, 1, seconds=fast.tokens / 8000)
        slow.record(slow.tokens, 1, seconds=slow.tokens / 500)
    assert slow.tokens < 128 < 512 < fast.tokens


def test_decode_only_and_small_steps_do_not_move_it():
    budget = StepBudget(512, 16, 2048)
    budget.record(16, 16, seconds=0.05)  # 16 decodes: per-step overhead, not prefill speed
    budget.record(100, 4, seconds=1.0)  # less than half the budget: too little to judge by
    assert budget.tokens == 512 and budget.tokens_per_s is None


def test_floor_and_cap_hold():
    budget = StepBudget(512, floor=64, cap=1024)
    budget.record(512, 1, seconds=100.0)
    assert budget.tokens == 64
    for _ in range(30):
        budget.record(budget.tokens, 1, seconds=0.001)
    assert budget.tokens == 1024


def test_an_operators_budget_is_fixed():
    budget = engine_step_budget(300, max_num_seqs=8, device_type="cpu")
    budget.record(300, 1, seconds=10.0)
    assert budget.tokens == budget.cap == 300
    adaptive = engine_step_budget(None, max_num_seqs=8, device_type="cpu")
    assert adaptive.adaptive and adaptive.floor == BUDGET_FLOOR < adaptive.tokens < adaptive.cap


def test_a_crowded_machine_does_not_shrink_steps_into_overhead():
    budget = engine_step_budget(None, max_num_seqs=16, device_type="cpu")
    for _ in range(20):  # 40 tokens/s: a 0.2 s step would hold 8 tokens
        budget.record(budget.tokens, 2, seconds=budget.tokens / 40)
    assert budget.tokens == BUDGET_FLOOR


def test_the_scheduler_chunks_prompts_by_the_current_budget():
    budget = StepBudget(32, floor=4, cap=64, target_step_s=0.2)
    sched = Scheduler(BlockManager(100, 4), max_num_seqs=4, max_num_batched_tokens=64, budget=budget)
    sched.add(Request("a", list(range(100)), SamplingParams()))
    first = sched.schedule()
    sched.update(first, [])
    budget.record(first.total_tokens, len(first), seconds=first.total_tokens / 80)  # 80 tokens/s: 16 a step
    second = sched.schedule()
    assert first.num_new_tokens == [32] and second.num_new_tokens == [16]
