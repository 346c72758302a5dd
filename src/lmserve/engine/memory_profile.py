"""How much memory one engine step's activations take on a GPU, measured by running one.

The KV cache gets what ``gpu_memory_utilization`` leaves after the weights and one step's
activations. On CUDA the activations are measured: a forward pass over the largest step the
scheduler can make (``step_tokens`` prompt tokens, logits for ``logit_rows`` rows) runs on a
throw-away cache, and its peak allocation, less that cache, is the reserve. On the CPU, where
memory is not counted per device, the estimate ``kv_cache.activation_reserve`` stays.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from lmserve.engine.kv_cache import KVCacheSpec, allocate_kv_cache
from lmserve.parallel.step import StepInputs

log = logging.getLogger(__name__)

KVCaches = list[tuple[torch.Tensor, torch.Tensor]]
# Decode steps keep a few copies of the logits besides the model's own output (the float copy, the
# sampler's sorted copy, probabilities and the exponential race): counted on top of the forward.
SAMPLER_LOGIT_COPIES = 4


def profiling_step(step_tokens: int, max_model_len: int, block_size: int, logit_rows: int) -> StepInputs:
    """The largest prefill the scheduler may schedule: ``step_tokens`` tokens in sequences of at most
    ``max_model_len`` (the rotary tables end there), over consecutive blocks from block 0, with the
    last ``logit_rows`` rows sampled."""
    lengths = [min(max_model_len, step_tokens - start) for start in range(0, step_tokens, max_model_len)]
    per_seq_blocks = -(-max(lengths) // block_size)
    positions, tables = [], torch.zeros(len(lengths), per_seq_blocks, dtype=torch.int32)
    for s, n in enumerate(lengths):
        positions.append(torch.arange(n))
        tables[s, :] = torch.arange(s * per_seq_blocks, (s + 1) * per_seq_blocks, dtype=torch.int32)
    pos = torch.cat(positions)
    seq_of = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    slots = tables[seq_of, pos // block_size].long() * block_size + pos % block_size
    starts = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    starts[1:] = torch.tensor(lengths).cumsum(0)
    rows = min(logit_rows, step_tokens)
    return StepInputs(input_ids=torch.zeros(step_tokens, dtype=torch.long), positions=pos, slot_mapping=slots,
                      block_tables=tables, context_lens=torch.tensor(lengths, dtype=torch.int32),
                      query_start_loc=starts, logits_indices=torch.arange(step_tokens - rows, step_tokens))


def profile_activation_bytes(run: Callable[[StepInputs, KVCaches], torch.Tensor | None], spec: KVCacheSpec,
                             inputs: StepInputs, vocab_size: int, device: torch.device) -> int:
    """Peak bytes a CUDA step of ``inputs`` allocates beyond what is live now, its throw-away KV
    cache excluded, plus the sampler's copies of its logits. ``run(inputs, caches)`` runs the step."""
    num_blocks = inputs.block_tables.numel()
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    caches = allocate_kv_cache(spec, num_blocks, device)
    cache_bytes = torch.cuda.memory_allocated(device) - before
    run(inputs, caches)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before - cache_bytes
    del caches
    torch.cuda.empty_cache()
    logits = SAMPLER_LOGIT_COPIES * inputs.logits_indices.numel() * vocab_size * 4
    log.info("profiled one step of %d tokens: %.2f GiB of activations, %.2f GiB for sampling",
             inputs.input_ids.numel(), peak / 2**30, logits / 2**30)
    return max(peak, 0) + logits
