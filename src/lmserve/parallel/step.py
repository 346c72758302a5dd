"""One engine step's inputs, and their wire form between the ranks of a tensor-parallel group.

Rank 0 broadcasts every step over the group's gloo control group as two int64 tensors: a header of
fixed size (the command, the payload's length, then dtype, rows and columns of each field) and one
payload holding every field's values. The workers know the header's size in advance, so they can
wait for the next message without knowing what it will be. ``IDLE`` messages (heartbeats) and
``STOP`` carry no payload.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from lmserve.parallel.group import ProcessGroup

IDLE, STEP, STOP = 0, 1, 2  # commands in the step header


@dataclass
class StepInputs:
    """Everything one forward pass reads; what rank 0 broadcasts to the other ranks."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    context_lens: torch.Tensor
    query_start_loc: torch.Tensor
    logits_indices: torch.Tensor  # rows of the hidden states whose next token is sampled


_FIELDS = [f.name for f in dataclasses.fields(StepInputs)]
_DTYPES = [torch.int64, torch.int32]  # the integer dtypes StepInputs tensors come in
HEADER_LEN = 2 + 3 * len(_FIELDS)  # command, payload length, then (dtype, rows, columns or -1) per field


def encode_step(command: int, inputs: StepInputs | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(header, payload) int64 tensors carrying ``inputs``; both empty-bodied for IDLE and STOP."""
    header = torch.zeros(HEADER_LEN, dtype=torch.int64)
    header[0] = command
    if inputs is None:
        return header, torch.empty(0, dtype=torch.int64)
    parts = []
    for i, name in enumerate(_FIELDS):
        t: torch.Tensor = getattr(inputs, name)
        assert t.dim() <= 2 and t.dtype in _DTYPES, f"{name}: {t.dtype} {tuple(t.shape)} is not a step tensor"
        shape = list(t.shape) + [-1] * (2 - t.dim())
        header[2 + 3 * i: 5 + 3 * i] = torch.tensor([_DTYPES.index(t.dtype), *shape])
        parts.append(t.reshape(-1).to(torch.int64))
    payload = torch.cat(parts)
    header[1] = payload.numel()
    return header, payload


def decode_step(header: torch.Tensor, payload: torch.Tensor) -> StepInputs:
    """The ``StepInputs`` that ``encode_step`` packed, dtypes and shapes restored."""
    fields, offset = {}, 0
    for i, name in enumerate(_FIELDS):
        code, *dims = header[2 + 3 * i: 5 + 3 * i].tolist()
        shape = [d for d in dims if d >= 0]
        count = int(torch.Size(shape).numel())
        fields[name] = payload[offset: offset + count].view(shape).to(_DTYPES[code])
        offset += count
    return StepInputs(**fields)


def send_step(group: ProcessGroup, command: int, inputs: StepInputs | None = None) -> None:
    """Rank 0: broadcast one message to every other rank."""
    import torch.distributed as dist

    header, payload = encode_step(command, inputs)
    dist.broadcast(header, src=0, group=group.control)
    if payload.numel():
        dist.broadcast(payload, src=0, group=group.control)


def receive_step(group: ProcessGroup) -> tuple[int, StepInputs | None]:
    """Ranks 1..N-1: wait for rank 0's next message; the inputs come with ``STEP`` only."""
    import torch.distributed as dist

    header = torch.empty(HEADER_LEN, dtype=torch.int64)
    dist.broadcast(header, src=0, group=group.control)
    command = int(header[0])
    if command != STEP:
        return command, None
    payload = torch.empty(int(header[1]), dtype=torch.int64)
    dist.broadcast(payload, src=0, group=group.control)
    return command, decode_step(header, payload)
