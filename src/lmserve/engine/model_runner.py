"""Turns a scheduled batch into tensors, runs the model, and returns the logits to sample from."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmserve.config.settings import EngineConfig
from lmserve.engine.cuda_graphs import Capture, DecodeBuffers, DecodeGraphs, cuda_graph_capture
from lmserve.engine.kv_cache import (
    KVCacheSpec,
    activation_reserve,
    allocate_kv_cache,
    fault_in,
    plan_num_blocks,
)
from lmserve.engine.memory_profile import profile_activation_bytes, profiling_step
from lmserve.engine.request import Request
from lmserve.engine.scheduler import step_token_budget
from lmserve.kernels import get_ops
from lmserve.kernels.attention_choice import choose_attention
from lmserve.kernels.device import resolve_device, resolve_dtype
from lmserve.models.layers import ForwardContext, PagedAttention, SampledRows
from lmserve.models.loader import choose_linear_kernels, linear_weights_on_huge_pages, load_model
from lmserve.parallel.state import SINGLE, ParallelState
from lmserve.parallel.step import StepInputs

log = logging.getLogger(__name__)


class ModelRunner:
    """Owns the model weights and the KV cache of one rank (a ``Runner`` on its own, or one rank of
    a tensor-parallel group)."""

    def __init__(self, config: EngineConfig, state: ParallelState = SINGLE, progress: bool = True) -> None:
        self.config, self.state = config, state
        self.device = resolve_device(config.device)
        if config.num_threads and self.device.type == "cpu":
            torch.set_num_threads(config.num_threads)
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.ops = get_ops(self.device)
        start = time.perf_counter()
        self.model, self.model_config = load_model(Path(config.model), self.dtype, self.device, self.ops,
                                                   config.max_model_len, state, progress=progress and state.is_first,
                                                   quantize=config.quantize)
        log.info("loaded %s (%s, %s) in %.1fs", self.model_config.architecture, str(self.dtype).split(".")[-1],
                 self.device, time.perf_counter() - start)
        step_tokens = step_token_budget(config.max_num_batched_tokens, config.max_num_seqs, self.device.type)
        self.kernel_choice = choose_linear_kernels(self.model, self.ops, step_tokens, config.max_num_seqs)
        if self.device.type == "cpu":
            linear_weights_on_huge_pages(self.model)
        self.block_size = config.block_size
        cfg = self.model_config
        # This rank's KV heads, as its attention layers hold them (replication included).
        attn = next(m for m in self.model.modules() if isinstance(m, PagedAttention))
        heads = attn.num_kv_heads
        if self.device.type == "cpu":
            choose_attention(self.ops, attn.num_heads, attn.num_kv_heads, attn.head_dim, self.dtype)
        self.kv_spec = KVCacheSpec(cfg.num_layers, heads, cfg.head_dim, config.block_size, self.dtype)
        self.num_blocks = self._plan_num_blocks()
        # One block more than the block manager is told of: padded rows of a graph-replayed decode
        # step write there (block ``num_blocks``), never into a live request's blocks.
        self.kv_caches = allocate_kv_cache(self.kv_spec, self.num_blocks + 1, self.device)
        self.decode_graphs: DecodeGraphs | None = None
        self._graph_capture: Capture | None = None
        if self._wants_graphs():
            self.use_decode_graphs(cuda_graph_capture())

    def _plan_num_blocks(self) -> int:
        """KV blocks that fit beside the weights and one step's activations: measured by a
        profiling forward on CUDA (unless the cache size is given), estimated on the CPU."""
        config, cfg = self.config, self.model_config
        step_tokens = step_token_budget(config.max_num_batched_tokens, config.max_num_seqs, self.device.type)
        intermediate = cfg.get("intermediate_size", "ffn_dim", default=4 * cfg.hidden_size) // self.state.world_size
        reserve = activation_reserve(step_tokens, config.max_num_seqs, cfg.hidden_size, intermediate, cfg.vocab_size,
                                     torch.empty(0, dtype=cfg.act_dtype).element_size())  # fmt: skip
        if self.device.type == "cuda" and config.kv_cache_tokens is None and config.kv_cache_bytes is None:
            # Every rank takes this branch (same configuration), so the profiling forward's
            # collectives match across a tensor-parallel group.
            step = profiling_step(step_tokens, cfg.max_model_len, config.block_size, config.max_num_seqs)
            # Every row through every layer: the largest step (one with prompt logprobs) is what
            # the activations must fit.
            reserve = profile_activation_bytes(lambda inputs, caches: self._forward(inputs, caches, every_row=True),
                                               self.kv_spec, step, cfg.vocab_size, self.device)
        return plan_num_blocks(self.kv_spec, self.device, config.kv_cache_tokens, config.kv_cache_memory_fraction,
                               config.max_num_seqs * cfg.max_model_len, config.kv_cache_bytes, reserve)

    def _wants_graphs(self) -> bool:
        # Graphs need ops that never read device values on the host (the Triton attention), and
        # one rank: NCCL collectives inside graphs are left for later.
        return (self.device.type == "cuda" and not self.config.enforce_eager and self.state.world_size == 1
                and getattr(self.ops, "graph_safe", False))

    def use_decode_graphs(self, capture: Capture) -> None:
        """Serve pure-decode steps by replaying forwards captured now with ``capture`` (CUDA graphs
        on a GPU; the tests pass an eager stand-in to run the same path on the CPU)."""
        blocks_per_seq = -(-self.model_config.max_model_len // self.block_size)
        self._graph_capture = capture
        self.decode_graphs = DecodeGraphs(self._graph_forward, self.config.max_num_seqs, blocks_per_seq, self.device,
                                          pad_block=self.num_blocks, block_size=self.block_size, capture=capture)
        with torch.inference_mode():
            self.decode_graphs.capture_all()

    @property
    def num_kv_tensors(self) -> int:
        """The KV cache's tensors: each layer's keys, then its values."""
        return 2 * len(self.kv_caches)

    def fault_in_blocks(self, first: int, end: int, tensor: int | None = None) -> None:
        """Map the pages of KV blocks ``first .. end - 1`` (never held by a request) ahead of use, in
        every cache tensor or only in ``tensor`` (see ``num_kv_tensors``)."""
        fault_in(self.kv_caches, first, end, tensor)

    def shrink_kv_cache(self, num_blocks: int) -> None:
        """Keep only ``num_blocks`` KV-cache blocks (the ranks of a group agree on the smallest)."""
        self.decode_graphs = None  # they hold the old cache
        self.kv_caches = []  # free the larger cache before allocating the smaller one
        self.kv_caches = allocate_kv_cache(self.kv_spec, num_blocks + 1, self.device)
        self.num_blocks = num_blocks
        if self._graph_capture is not None:
            self.use_decode_graphs(self._graph_capture)

    def shutdown(self) -> None:
        """Nothing to stop: one rank owns no processes, and its memory goes with the runner."""

    # -- inputs ----------------------------------------------------------------------------------
    def prepare(self, requests: Sequence[Request], num_new_tokens: Sequence[int]) -> StepInputs:
        """The step's flat token batch: every request's next ``n`` uncomputed tokens, in order."""
        if all(n == 1 for n in num_new_tokens) and all(r.num_computed_tokens + 1 == r.num_tokens for r in requests):
            return self._prepare_decode(requests)
        return self._prepare_any(requests, num_new_tokens)

    def _prepare_any(self, requests: Sequence[Request], num_new_tokens: Sequence[int]) -> StepInputs:
        bs = self.block_size
        ids: list[int] = []
        positions, slots = [], []
        starts = np.zeros(len(requests) + 1, dtype=np.int32)
        context = np.empty(len(requests), dtype=np.int32)
        logits_rows: list[int] = []
        max_blocks = max(len(r.block_ids) for r in requests)
        tables = np.zeros((len(requests), max_blocks), dtype=np.int32)
        for i, (req, n) in enumerate(zip(requests, num_new_tokens, strict=True)):
            first = req.num_computed_tokens
            ids.extend(req.token_slice(first, first + n))
            pos = np.arange(first, first + n, dtype=np.int64)
            blocks = np.asarray(req.block_ids, dtype=np.int64)
            positions.append(pos)
            slots.append(blocks[pos // bs] * bs + pos % bs)
            tables[i, :len(blocks)] = blocks
            starts[i + 1] = starts[i] + n
            context[i] = first + n
            logits_rows.extend(int(starts[i]) + p - first for p in req.prompt_logprob_positions(n))
            if first + n == req.num_tokens:
                logits_rows.append(starts[i + 1] - 1)
        return StepInputs(
            input_ids=torch.tensor(ids, dtype=torch.long),
            positions=torch.from_numpy(np.concatenate(positions)),
            slot_mapping=torch.from_numpy(np.concatenate(slots)),
            block_tables=torch.from_numpy(tables),
            context_lens=torch.from_numpy(context),
            query_start_loc=torch.from_numpy(starts),
            logits_indices=torch.tensor(logits_rows, dtype=torch.long),
        )

    def _prepare_decode(self, requests: Sequence[Request]) -> StepInputs:
        """``prepare`` for a step where every request decodes its last token: plain lists and one
        array per field (at 256 requests about five times faster than the general path, which is
        host time every decode step waits for)."""
        bs, n = self.block_size, len(requests)
        ids, positions, slots, rows = [], [], [], []
        width = max(len(r.block_ids) for r in requests)
        for r in requests:
            p = r.num_computed_tokens
            ids.append(r.output_token_ids[-1] if r.output_token_ids else r.prompt_token_ids[-1])
            positions.append(p)
            slots.append(r.block_ids[p // bs] * bs + p % bs)
            rows.append(r.block_ids + [0] * (width - len(r.block_ids)))
        return StepInputs(
            input_ids=torch.tensor(ids, dtype=torch.long), positions=torch.tensor(positions, dtype=torch.long),
            slot_mapping=torch.tensor(slots, dtype=torch.long), block_tables=torch.tensor(rows, dtype=torch.int32),
            context_lens=torch.tensor(positions, dtype=torch.int32) + 1,
            query_start_loc=torch.arange(n + 1, dtype=torch.int32), logits_indices=torch.arange(n))

    # -- execution -------------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, inputs: StepInputs) -> torch.Tensor | None:
        """Run the forward pass; returns float32 logits [rows to sample, vocab] on rank 0: on the
        device on CUDA (the GPU sampler reads them there), else on the CPU."""
        if self.decode_graphs is not None:
            logits = self.decode_graphs.run(inputs)
            if logits is not None:
                return self._logits_out(logits)
        logits = self._forward(inputs, self.kv_caches)
        return None if logits is None else self._logits_out(logits)

    @torch.inference_mode()
    def _forward(self, inputs: StepInputs, kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                 every_row: bool = False) -> torch.Tensor | None:
        """One eager forward over ``kv_caches``; the logits of the sampled rows, on the device. The
        last layer finishes only the sampled rows where it can, unless ``every_row``."""
        dev = self.device
        model: Any = self.model
        sampled = None
        if model.finishes_sampled_rows_only and not every_row:
            sampled = SampledRows.of(inputs.logits_indices, inputs.query_start_loc, inputs.block_tables,
                                     inputs.context_lens)
        ctx = ForwardContext(
            slot_mapping=inputs.slot_mapping.to(dev), block_tables=inputs.block_tables.to(dev),
            context_lens=inputs.context_lens.to(dev), query_start_loc=inputs.query_start_loc.to(dev),
            kv_caches=kv_caches, ops=self.ops, sampled=None if sampled is None else sampled.to(dev))
        hidden = model(inputs.input_ids.to(dev), inputs.positions.to(dev), ctx)
        if inputs.logits_indices.numel() == 0:
            return None
        if sampled is not None:  # the model finished the sampled rows only, in logits order
            return model.compute_logits(hidden)
        return model.compute_logits(hidden.index_select(0, inputs.logits_indices.to(dev)))

    def _logits_out(self, logits: torch.Tensor) -> torch.Tensor | None:
        if not self.state.is_first:
            return None
        return logits.float() if self.device.type == "cuda" else logits.float().cpu()

    def _graph_forward(self, buffers: DecodeBuffers, batch: int) -> torch.Tensor:
        """The forward of a decode batch of ``batch`` rows read from ``buffers`` (what is captured)."""
        b = buffers
        ctx = ForwardContext(slot_mapping=b.slot_mapping[:batch], block_tables=b.block_tables[:batch],
                             context_lens=b.context_lens[:batch], query_start_loc=b.query_start_loc[:batch + 1],
                             kv_caches=self.kv_caches, ops=self.ops)
        model: Any = self.model
        return model.compute_logits(model(b.input_ids[:batch], b.positions[:batch], ctx))
