"""Joining a process group from the environment, and refusing degrees that cannot work."""

from __future__ import annotations

import multiprocessing
import os

import pytest
import torch

from lmserve.errors import ConfigError
from lmserve.parallel.group import GroupSpec, check_degree, find_free_port, join_group, threads_per_rank


def test_group_spec_round_trips_through_the_environment() -> None:
    spec = GroupSpec(rank=1, world_size=4, master_addr="10.0.0.7", master_port=29500, local_rank=0)
    assert GroupSpec.from_env(spec.env()) == spec
    assert spec.device_index == 0  # the second host's first device


def test_group_spec_names_what_the_launcher_forgot() -> None:
    with pytest.raises(ConfigError, match="missing: MASTER_PORT, WORLD_SIZE"):
        GroupSpec.from_env({"MASTER_ADDR": "h", "RANK": "0"})
    with pytest.raises(ConfigError, match="'RANK'.*4.*0 to 1"):
        GroupSpec.from_env({"MASTER_ADDR": "h", "MASTER_PORT": "1", "RANK": "4", "WORLD_SIZE": "2"})


@pytest.mark.parametrize(("degree", "heads", "device", "count", "message"), [
    (0, 8, "cpu", None, "at least 1"),
    (16, 9, "cpu", None, "at most 9: the model has 9 query heads"),
    (4, 8, "cuda", 2, "at most 2: one rank per CUDA device and 2 are visible"),
])
def test_check_degree_names_the_numbers(degree: int, heads: int, device: str, count: int | None,
                                        message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        check_degree(degree, heads, device, count)


def test_uneven_degrees_that_fit_the_heads_are_accepted() -> None:
    check_degree(2, 9, "cpu")  # 9 query heads split 5 + 4
    check_degree(8, 8, "cuda", device_count=8)


def test_threads_are_shared_out() -> None:
    assert threads_per_rank(2, cores=16) == 8
    assert threads_per_rank(4, cores=2) == 1


def _rank(env: dict[str, str], out: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    os.environ.update(env)
    group = join_group(GroupSpec.from_env(), "cpu", timeout_s=20)
    x = torch.tensor([float(group.spec.rank + 1)])
    group.state.all_reduce(x)
    gathered = group.state.all_gather_last_dim(torch.tensor([[float(group.spec.rank)]]))
    out.put((group.spec.rank, x.item(), gathered.flatten().tolist()))
    group.close()


def test_ranks_meet_through_the_environment() -> None:
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    port = find_free_port()
    procs = [ctx.Process(target=_rank, args=(GroupSpec(r, 2, "127.0.0.1", port).env(), out)) for r in range(2)]
    for p in procs:
        p.start()
    results = sorted(out.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    assert results == [(0, 3.0, [0.0, 1.0]), (1, 3.0, [0.0, 1.0])]
