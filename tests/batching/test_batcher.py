"""DynamicBatcher: batches fill up to batch_size, wait at most max_delay, keep order, bound the queue."""

from __future__ import annotations

import asyncio

import pytest

from lmserve.batching import DynamicBatcher
from lmserve.errors import CapacityError


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


def test_queued_requests_form_one_batch_in_arrival_order() -> None:
    async def go() -> list[str]:
        batcher: DynamicBatcher[str, str] = DynamicBatcher(batch_size=4, max_delay_s=0.0, max_queue=10)
        for name in "abcdef":
            batcher.submit(name)
        first = await batcher.next_batch()
        assert batcher.waiting == 2
        second = await batcher.next_batch()
        return [job.item for job in first] + ["|"] + [job.item for job in second]

    assert run(go()) == ["a", "b", "c", "d", "|", "e", "f"]


def test_a_full_batch_is_taken_without_waiting_for_the_delay() -> None:
    async def go() -> int:
        batcher: DynamicBatcher[int, int] = DynamicBatcher(batch_size=3, max_delay_s=3600.0, max_queue=10)
        for i in range(3):
            batcher.submit(i)
        # With a one-hour delay, only a full batch can come back before wait_for gives up.
        return len(await asyncio.wait_for(batcher.next_batch(), 5.0))

    assert run(go()) == 3


def test_a_lone_request_is_handed_over_once_the_delay_passes() -> None:
    async def go() -> list[int]:
        batcher: DynamicBatcher[int, int] = DynamicBatcher(batch_size=8, max_delay_s=0.05, max_queue=10)
        batcher.submit(7)
        return [job.item for job in await asyncio.wait_for(batcher.next_batch(), 5.0)]

    assert run(go()) == [7]


def test_requests_arriving_during_the_delay_join_the_batch() -> None:
    async def go() -> list[int]:
        batcher: DynamicBatcher[int, int] = DynamicBatcher(batch_size=8, max_delay_s=3600.0, max_queue=100)
        taking = asyncio.create_task(batcher.next_batch())
        for i in range(8):
            await asyncio.sleep(0)
            batcher.submit(i)
        return [job.item for job in await asyncio.wait_for(taking, 5.0)]

    assert run(go()) == list(range(8))


def test_a_full_queue_raises_capacity_error_with_retry_after() -> None:
    async def go() -> None:
        batcher: DynamicBatcher[int, int] = DynamicBatcher(batch_size=2, max_delay_s=0.0, max_queue=2,
                                                           retry_after_s=3.0)  # fmt: skip
        batcher.submit(1)
        batcher.submit(2)
        with pytest.raises(CapacityError, match="job_queue_size") as caught:
            batcher.submit(3)
        assert caught.value.retry_after_s == 3.0
        await batcher.next_batch()
        batcher.submit(3)  # room again once a batch was taken

    run(go())


def test_cancelled_requests_are_skipped_and_requeued_jobs_come_first() -> None:
    async def go() -> list[int]:
        batcher: DynamicBatcher[int, int] = DynamicBatcher(batch_size=2, max_delay_s=0.0, max_queue=10)
        futures = [batcher.submit(i) for i in range(4)]
        futures[0].cancel()
        taken = await batcher.next_batch()
        assert [job.item for job in taken] == [1, 2]
        batcher.requeue(taken)
        return [job.item for job in await batcher.next_batch()]

    assert run(go()) == [1, 2]


def test_fail_all_fails_every_waiting_request() -> None:
    async def go() -> None:
        batcher: DynamicBatcher[int, int] = DynamicBatcher(batch_size=2, max_delay_s=0.0, max_queue=10)
        futures = [batcher.submit(i) for i in range(3)]
        batcher.fail_all(RuntimeError("stopping"))
        for future in futures:
            with pytest.raises(RuntimeError, match="stopping"):
                await future
        assert batcher.waiting == 0

    run(go())
