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
from lmserve.engine.kv_cache import KVCacheSpec, activation_reserve, allocate_kv_cache, plan_num_blocks
from lmserve.engine.request import Request
from lmserve.engine.scheduler import step_token_budget
from lmserve.kernels import get_ops
from lmserve.kernels.device import resolve_device, resolve_dtype
from lmserve.models.layers import ForwardContext, PagedAttention
from lmserve.models.loader import load_model
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
                                                   config.max_model_len, state, progress=progress and state.is_first)
        log.info("loaded %s (%s, %s) in %.1fs", self.model_config.architecture, str(self.dtype).split(".")[-1],
                 self.device, time.perf_counter() - start)
        self.block_size = config.block_size
        cfg = self.model_config
        # This rank's KV heads, as its attention layers hold them (replication included).
        heads = next(m.num_kv_heads for m in self.model.modules() if isinstance(m, PagedAttention))
        self.kv_spec = KVCacheSpec(cfg.num_layers, heads, cfg.head_dim, config.block_size, self.dtype)
        step_tokens = step_token_budget(config.max_num_batched_tokens, config.max_num_seqs, self.device.type)
        intermediate = cfg.get("intermediate_size", "ffn_dim", default=4 * cfg.hidden_size) // state.world_size
        reserve = activation_reserve(step_tokens, config.max_num_seqs, cfg.hidden_size, intermediate, cfg.vocab_size,
                                     torch.empty(0, dtype=cfg.act_dtype).element_size())  # fmt: skip
        self.num_blocks = plan_num_blocks(self.kv_spec, self.device, config.kv_cache_tokens,
                                          config.kv_cache_memory_fraction, config.max_num_seqs * cfg.max_model_len,
                                          config.kv_cache_bytes, reserve)
        self.kv_caches = allocate_kv_cache(self.kv_spec, self.num_blocks, self.device)

    def shrink_kv_cache(self, num_blocks: int) -> None:
        """Keep only ``num_blocks`` KV-cache blocks (the ranks of a group agree on the smallest)."""
        self.kv_caches = []  # free the larger cache before allocating the smaller one
        self.kv_caches = allocate_kv_cache(self.kv_spec, num_blocks, self.device)
        self.num_blocks = num_blocks

    def shutdown(self) -> None:
        """Nothing to stop: one rank owns no processes, and its memory goes with the runner."""

    # -- inputs ----------------------------------------------------------------------------------
    def prepare(self, requests: Sequence[Request], num_new_tokens: Sequence[int]) -> StepInputs:
        """The step's flat token batch: every request's next ``n`` uncomputed tokens, in order."""
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

    # -- execution -------------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, inputs: StepInputs) -> torch.Tensor | None:
        """Run the forward pass; returns float32 logits [rows to sample, vocab] on the CPU (rank 0)."""
        dev = self.device
        ctx = ForwardContext(
            slot_mapping=inputs.slot_mapping.to(dev), block_tables=inputs.block_tables.to(dev),
            context_lens=inputs.context_lens.to(dev), query_start_loc=inputs.query_start_loc.to(dev),
            kv_caches=self.kv_caches, ops=self.ops)
        model: Any = self.model
        hidden = model(inputs.input_ids.to(dev), inputs.positions.to(dev), ctx)
        if inputs.logits_indices.numel() == 0:
            return None
        logits = model.compute_logits(hidden.index_select(0, inputs.logits_indices.to(dev)))
        return logits.float().cpu() if self.state.is_first else None
