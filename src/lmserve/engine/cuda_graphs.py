"""Decode steps replayed from CUDA graphs, captured once per bucket of batch sizes.

A decode step launches a few hundred small kernels whose launch cost, on a small model, is most of
the step. ``DecodeGraphs`` captures the forward pass (and the LM head) of a pure-decode batch at each
bucketed batch size, then serves a step by copying its inputs into persistent device buffers, padded
to the next bucket, and replaying that bucket's graph. Batches with a prefill, or larger than the
largest bucket, return ``None`` and run eagerly.

Padding rows are real work for the graph, so they must not touch a live request's KV: they write
their key and value into a scratch block that the block manager never hands out (the model runner
allocates one block more than it reports), and attend over that one slot.

Capture is injectable (``Capture``): the bucketing, padding and buffer filling run on the CPU in
the tests with an eager stand-in, and on CUDA with ``cuda_graph_capture``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lmserve.parallel.step import StepInputs

log = logging.getLogger(__name__)

Forward = Callable[["DecodeBuffers", int], torch.Tensor]  # (buffers, batch) -> logits [batch, vocab]
Replay = Callable[[], None]
Capture = Callable[[Callable[[], torch.Tensor]], tuple[Replay, torch.Tensor]]


def bucket_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 8 up to ``max_num_seqs`` (which is always a bucket): a
    padded batch wastes less than 8 rows above 8, and fewer than half below."""
    if max_num_seqs < 1:
        raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
    sizes = [b for b in (1, 2, 4) if b < max_num_seqs]
    sizes += list(range(8, max_num_seqs, 8))
    return sorted(set(sizes) | {max_num_seqs})


def bucket_for(sizes: Sequence[int], batch: int) -> int | None:
    """The smallest bucket holding ``batch`` rows, or ``None`` above the largest."""
    return next((b for b in sizes if b >= batch), None)


def is_decode_step(inputs: StepInputs) -> bool:
    """Every sequence has exactly one new token and every row is sampled (a pure decode batch)."""
    num_seqs = inputs.context_lens.shape[0]
    return inputs.input_ids.shape[0] == num_seqs and inputs.logits_indices.shape[0] == num_seqs


@dataclass
class DecodeBuffers:
    """The persistent inputs every graph reads; a bucket of ``b`` rows reads the first ``b``."""

    input_ids: torch.Tensor  # [max_batch] int64
    positions: torch.Tensor  # [max_batch] int64
    slot_mapping: torch.Tensor  # [max_batch] int64
    block_tables: torch.Tensor  # [max_batch, max_blocks] int32
    context_lens: torch.Tensor  # [max_batch] int32
    query_start_loc: torch.Tensor  # [max_batch + 1] int32: 0, 1, 2, ... (one token per row, fixed)

    @classmethod
    def allocate(cls, max_batch: int, max_blocks: int, device: torch.device) -> DecodeBuffers:
        def zeros(*shape: int, dtype: torch.dtype = torch.long) -> torch.Tensor:
            return torch.zeros(shape, dtype=dtype, device=device)

        return cls(zeros(max_batch), zeros(max_batch), zeros(max_batch), zeros(max_batch, max_blocks, dtype=torch.int32),
                   zeros(max_batch, dtype=torch.int32),
                   torch.arange(max_batch + 1, dtype=torch.int32, device=device))

    def fill(self, inputs: StepInputs, bucket: int, pad_block: int, block_size: int) -> None:
        """Copy a decode step of ``n`` rows into rows ``[0, n)`` and pad rows ``[n, bucket)`` to a
        one-token sequence in ``pad_block``. In place: the captured graphs read these tensors."""
        n = inputs.input_ids.shape[0]
        width = inputs.block_tables.shape[1]
        if width > self.block_tables.shape[1]:
            raise ValueError(f"a block table of {width} blocks exceeds the captured {self.block_tables.shape[1]}")
        nb = dict(non_blocking=True)
        self.input_ids[:n].copy_(inputs.input_ids, **nb)
        self.positions[:n].copy_(inputs.positions, **nb)
        self.slot_mapping[:n].copy_(inputs.slot_mapping, **nb)
        self.context_lens[:n].copy_(inputs.context_lens, **nb)
        self.block_tables[:n, :width].copy_(inputs.block_tables, **nb)
        # Columns past this step's widest table are never read (they lie past every context), so
        # they may keep stale ids; only the padding rows are rewritten whole.
        if bucket > n:
            self.input_ids[n:bucket] = 0
            self.positions[n:bucket] = 0
            self.slot_mapping[n:bucket] = pad_block * block_size
            self.context_lens[n:bucket] = 1
            self.block_tables[n:bucket] = pad_block


def eager_capture(run: Callable[[], torch.Tensor]) -> tuple[Replay, torch.Tensor]:
    """A stand-in for graph capture: "replay" reruns ``run`` into the first run's output tensor.
    Same contract as ``cuda_graph_capture`` (the output tensor is the one replays refresh)."""
    out = run()

    def replay() -> None:
        out.copy_(run())

    return replay, out


def cuda_graph_capture() -> Capture:
    """Capture with ``torch.cuda.CUDAGraph``, every bucket sharing one memory pool (buckets replay
    one at a time, so their intermediates may overlap)."""
    state: dict[str, Any] = {"pool": None}

    def capture(run: Callable[[], torch.Tensor]) -> tuple[Replay, torch.Tensor]:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up off the capture: lazy inits, autotuning, allocations
            for _ in range(2):
                run()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=state["pool"]):
            out = run()
        state["pool"] = graph.pool()
        return graph.replay, out

    return capture


class DecodeGraphs:
    """Captured decode steps at bucketed batch sizes; ``run`` serves a step or returns ``None``."""

    def __init__(self, forward: Forward, max_num_seqs: int, max_blocks: int, device: torch.device,
                 pad_block: int, block_size: int, capture: Capture = eager_capture,
                 sizes: Sequence[int] | None = None) -> None:
        self.sizes = list(sizes) if sizes is not None else bucket_sizes(max_num_seqs)
        self.pad_block, self.block_size = pad_block, block_size
        self.buffers = DecodeBuffers.allocate(self.sizes[-1], max_blocks, device)
        self._graphs: dict[int, tuple[Replay, torch.Tensor]] = {}
        self._forward, self._capture = forward, capture
        self.replays = self.eager_fallbacks = 0  # counters, for tests and the benchmark

    def capture_all(self) -> None:
        """Capture every bucket, largest first (the pool grows once, to the largest's needs)."""
        for bucket in sorted(self.sizes, reverse=True):
            # Capture over padding rows only: valid inputs whatever the live batches will be.
            self.buffers.slot_mapping[:bucket] = self.pad_block * self.block_size
            self.buffers.context_lens[:bucket] = 1
            self.buffers.block_tables[:bucket] = self.pad_block
            self._graphs[bucket] = self._capture(lambda b=bucket: self._forward(self.buffers, b))  # type: ignore[misc]
        log.info("captured decode graphs for batch sizes %s", ",".join(map(str, self.sizes)))

    def run(self, inputs: StepInputs) -> torch.Tensor | None:
        """The step's logits ``[n, vocab]`` (a view of the graph's output, valid until the next
        replay), or ``None`` when the step is not a pure decode or is larger than every bucket."""
        n = inputs.input_ids.shape[0]
        bucket = bucket_for(self.sizes, n) if is_decode_step(inputs) else None
        if bucket is None or bucket not in self._graphs:
            self.eager_fallbacks += 1
            return None
        self.buffers.fill(inputs, bucket, self.pad_block, self.block_size)
        replay, out = self._graphs[bucket]
        replay()
        self.replays += 1
        return out[:n]
