"""``lmserve kernels --report``: this machine's CPU, the kernel build that runs here, the linear
kernel choice (from the cache, or measured for the shapes asked for) and the prefill attention loop
chosen for each head layout served so far."""

from __future__ import annotations

import re

import torch

from lmserve.errors import ConfigError
from lmserve.kernels.candidates import CANDIDATES
from lmserve.kernels.choice import (
    ChoiceTable,
    cache_path,
    choose,
    chosen_at,
    plan_for,
    table_key,
    valid_shapes,
)
from lmserve.kernels.machine import FLAGS_THAT_MATTER, cpu_flags, cpu_model, read_keyed
from lmserve.kernels.ops import Ops, get_ops
from lmserve.kernels.packed import PackedLinear

_SHAPE = re.compile(r"^(\d+)x(\d+)(\+silu)?$")


def random_weight(ops: Ops, shape: str) -> PackedLinear:
    """A bf16 weight of ``shape`` (``NxK``, or ``IxK+silu`` for a gate|up pair) packed by ``ops``."""
    match = _SHAPE.match(shape.strip())
    if not match:
        raise ConfigError("--shapes", shape, "NxK or IxK+silu, e.g. 576x576,1536x576+silu")
    n, k = int(match[1]), int(match[2])
    if match[3]:
        return ops.pack_gate_up_weight(torch.randn(n, k).bfloat16(), torch.randn(n, k).bfloat16())
    return ops.pack_linear_weight(torch.randn(n, k).bfloat16())


def cached_table(ops: Ops) -> ChoiceTable:
    """Every shape measured on this machine so far, as the cache holds them."""
    key = table_key(ops)
    data = read_keyed(cache_path(key), key)
    return ChoiceTable({s: e["timings"] for s, e in valid_shapes(data).items()}, source="cache")


def report(shapes: list[str], max_rows: int, measure: bool = False) -> str:
    """The report as text: machine, build, and per shape and row count each candidate's GFLOP/s
    (``measure``: time ``shapes`` again, replacing what the cache holds for them)."""
    ops = get_ops("cpu")
    flags = cpu_flags()
    lines = [f"CPU: {cpu_model()}",
             "flags that matter: " + (" ".join(f for f in FLAGS_THAT_MATTER if f in flags) or "(none reported)"),
             f"kernels: {ops.name}; torch {torch.__version__}, {torch.get_num_threads()} threads"]
    table = (choose(ops, [(random_weight(ops, s), max_rows) for s in shapes], fresh=measure) if shapes else cached_table(ops))
    return "\n".join([*lines, *linear_lines(table, bool(shapes)), *attention_lines(ops)])


def attention_lines(ops: Ops) -> list[str]:
    """The cached timings of the two prefill attention loops per head layout, and the choice."""
    from lmserve.kernels import attention_choice as ac

    if not hasattr(ops, "attention_dot"):
        return []
    key = ac.table_key(ops)
    layouts = ac.valid_timings(read_keyed(cache_path(key, "attention"), key))
    if not layouts:
        return ["prefill attention over a bf16 cache: no choice measured yet (serve a bf16 model)"]
    lines = [f"prefill attention over a bf16 cache (cache), ms per {ac.PREFILL_TOKENS}-token prefill, * = chosen:",
             f"{'heads/kv x dim':>16} {'fp32':>9} {'bf16 dot':>9}"]
    for layout, times in sorted(layouts.items()):
        dot = ac.prefers_dot(times)
        lines.append(f"{layout:>16} {times['fp32'] * 1e3:8.3f}{' ' if dot else '*'} {times['dot'] * 1e3:8.3f}"
                     f"{'*' if dot else ' '}")
    return lines


def linear_lines(table: ChoiceTable, asked: bool) -> list[str]:
    if table.forced:
        return [f"linear kernel forced for every shape: {table.forced}"]
    if not table.shapes:
        hint = "" if asked else " (none measured yet: serve a model, or pass --shapes)"
        return ["no linear kernel choice" + hint]
    names = list(CANDIDATES)
    lines = [f"linear kernels ({table.source}), GFLOP/s per candidate, * = chosen:",
              f"{'shape':>16} {'rows':>6} " + " ".join(f"{n:>11}" for n in names)]
    for shape in sorted(table.shapes):
        n, k = (int(v) for v in shape.split("+")[0].split("x"))
        flops_per_row = 2 * n * k * (2 if shape.endswith("+silu") else 1)
        plan = plan_for(table.shapes[shape])
        for rows in sorted(table.shapes[shape], key=int):
            times = table.shapes[shape][rows]
            cells = [f"{flops_per_row * int(rows) / times[c] / 1e9:10.1f}{'*' if chosen_at(plan, int(rows)) == c else ' '}"
                     if c in times else f"{'-':>11}" for c in names]
            lines.append(f"{shape:>16} {rows:>6} " + " ".join(cells))
    return lines
