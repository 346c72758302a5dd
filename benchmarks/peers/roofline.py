"""The floor of an offline workload: the least time any system could take on this machine.

A decoder's work is fixed by the model and the workload: every generated token but the last passes
through each linear layer once (2 FLOPs per weight), and so does every prompt token but in the last
layer, where only a prompt's last token goes on past its keys and values (the others' outputs are
never read); the LM head runs once per generated token, and causal attention touches each earlier
position once per layer (in the last layer, for a prompt's last token only). Two bounds hold for
any schedule:

- all of that arithmetic at the fastest linear kernel this machine runs (every candidate the engine
  chooses between, timed at a prefill shape of the model);
- the request whose prompt finishes last starts decoding only once every prompt has been through the
  model, and then needs ``new_tokens - 1`` passes one after another, each reading every weight from
  memory (a model of this size does not fit in the caches): the prompts' arithmetic at that rate,
  plus those passes at the memory bandwidth measured here.

The larger is the floor: no system doing the same arithmetic in the same precision beats it, so
``system seconds / floor seconds`` is the highest ratio any implementation could reach over that system.

A server's first tokens have a floor of the same kind (``first_token_floors``): in a burst of equal
prompts that arrive together, whichever prompt gets its first token k-th waits at least for k
prompts' arithmetic at the fastest linear kernel, whatever the schedule.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Work:
    """What a workload costs in arithmetic and in weight reads."""

    flops: float  # all of it
    prompt_flops: float  # the prompts' passes (and the first token each)
    weight_bytes: float  # read by every pass: the linear layers and the LM head
    serial_passes: int  # decode passes of one request, one after another


@dataclass(frozen=True)
class Floor:
    work: Work
    rate: float  # the fastest linear kernel measured here, FLOP/s
    kernel: str  # which kernel that was
    bandwidth: float  # memory read bandwidth measured here, bytes/s

    @property
    def compute_seconds(self) -> float:
        return self.work.flops / self.rate

    @property
    def serial_seconds(self) -> float:
        return self.work.prompt_flops / self.rate + self.work.serial_passes * self.work.weight_bytes / self.bandwidth

    @property
    def seconds(self) -> float:
        return max(self.compute_seconds, self.serial_seconds)

    def describe(self) -> str:
        return (f"floor: {self.seconds:.1f}s = the larger of {self.work.flops / 1e12:.2f} TFLOP at {self.rate / 1e9:.0f} "
                f"GFLOP/s ({self.kernel}, the fastest linear kernel here at a prefill shape) = {self.compute_seconds:.1f}s, "
                f"and the prompts' {self.work.prompt_flops / 1e12:.2f} TFLOP then {self.work.serial_passes} passes reading "
                f"{self.work.weight_bytes / 1e9:.2f} GB at {self.bandwidth / 1e9:.1f} GB/s = {self.serial_seconds:.1f}s")


def workload(model_dir: str | Path, prompt_lengths: list[int], new_tokens: int, bytes_per_weight: int = 2) -> Work:
    """The arithmetic and weight reads a decoder must spend on these prompts and ``new_tokens`` each
    (the first comes from the prompt's own pass, so ``new_tokens - 1`` decode passes per request)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    head = model.get_output_embeddings()
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head)
    vocab, hidden = head.weight.shape
    heads, layers = config.num_attention_heads, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    layer = linear / layers  # the linear weights of one layer
    kv = 2.0 * hidden * head_dim * (getattr(config, "num_key_value_heads", None) or heads)  # its k and v
    per_pair = 4.0 * heads * head_dim * layers
    requests, tokens = len(prompt_lengths), sum(prompt_lengths)
    prompt_pairs = sum(n * (n + 1) // 2 for n in prompt_lengths)  # causal (query, key) pairs scored
    all_pairs = sum((n + new_tokens - 1) * (n + new_tokens) // 2 for n in prompt_lengths)
    head_flops = 2.0 * vocab * hidden
    # The last layer: keys and values of every prompt token, the rest for each prompt's last token.
    prompt_linear = (linear - layer + kv) * tokens + (layer - kv) * requests
    prompt_attention = per_pair * ((layers - 1) * prompt_pairs + tokens) / layers
    prompt_flops = 2.0 * prompt_linear + head_flops * requests + prompt_attention
    decode_flops = (2.0 * linear + head_flops) * requests * (new_tokens - 1) + per_pair * (all_pairs - prompt_pairs)
    return Work(prompt_flops + decode_flops, prompt_flops, float(bytes_per_weight * (linear + vocab * hidden)),
                new_tokens - 1)


def first_token_floors(prompt_flops: float, requests: int, streams: int, rate: float) -> list[float]:
    """The least seconds from arrival to first token of each of ``requests`` equal prompts (each
    ``prompt_flops`` of arithmetic, ``rate`` FLOP/s) sent by a closed loop of ``streams`` streams: the
    first ``streams`` arrive as one burst, and the k-th of them to get its first token needs k prompts
    computed; each later request arrives as one ends and needs at least its own prompt."""
    one = prompt_flops / rate
    burst = min(streams, requests)
    return [k * one for k in range(1, burst + 1)] + [one] * (requests - burst)


def fastest_linear(in_features: int, out_features: int, rows: tuple[int, ...] = (128, 256, 512),
                   passes: int = 3) -> tuple[str, float]:
    """The fastest linear kernel here for ``rows`` x ``in_features`` -> ``out_features`` at any of
    ``rows``, and its FLOP/s: the best of ``passes`` passes (a floor must not come from a slow moment
    of a shared machine: a single pass once read 25% below the rate the engine then reached)."""
    from lmserve.kernels import get_ops
    from lmserve.kernels.candidates import runnable_candidates
    from lmserve.kernels.choice import measure
    from lmserve.kernels.packed import PackedLinear, pack_panels

    ops = get_ops("cpu")
    weight = torch.randn(out_features, in_features).bfloat16()
    packed = PackedLinear(pack_panels(weight), out_features, in_features, "panel32")
    names = runnable_candidates(ops) if hasattr(ops, "ext") else ["torch-bf16", "torch-fp32"]
    timings: dict[str, dict[str, float]] = {}
    for _ in range(passes):
        timings = measure(ops, packed, list(rows), deadline=time.perf_counter() + 60, before=timings, names=names)
    rates = {(name, m): 2.0 * int(m) * in_features * out_features / seconds
             for m, by_name in timings.items() for name, seconds in by_name.items()}  # fmt: skip
    (name, _), rate = max(rates.items(), key=lambda item: item[1])
    return name, rate


def read_bandwidth(nbytes: int = 1 << 30, rounds: int = 5) -> float:
    """Bytes/s of the best of ``rounds`` sums over a buffer far larger than any cache."""
    buffer = torch.ones(nbytes // 4)
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        buffer.sum()
        best = min(best, time.perf_counter() - start)
    return nbytes / best


def floor_for(model_dir: str | Path, prompt_lengths: list[int], new_tokens: int) -> Floor:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    widest = getattr(config, "intermediate_size", None) or 4 * config.hidden_size
    kernel, rate = fastest_linear(config.hidden_size, widest)
    return Floor(workload(model_dir, prompt_lengths, new_tokens), rate, kernel, read_bandwidth())
