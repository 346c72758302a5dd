"""Which implementation multiplies by each linear weight, chosen on this machine by measurement.

Which kernel is fastest is a property of the machine, not of the code: on one CPU torch's bf16
matmul (oneDNN, ``vdpbf16ps`` or AMX) is twice the own fp32-FMA panel kernel at prefill sizes, on
another it is slower at every size, and the own kernel usually wins at decode sizes. So at model
load, for every distinct linear shape (N, K, fused gate|up or not) and every row-count bucket the
engine will run (decode 1-32, prefill chunks up to the step's token budget), each candidate is timed
briefly and the fastest kept. The timings are cached on disk under the machine's key (CPU model and
flags, torch and oneDNN versions, kernel build, thread count), one file per key; an entry that is
unreadable or was written under another key is ignored and measured again. Timings taken while other
processes kept the cores busy are cached marked as contended: a later start measures them again if
the machine is quiet then, and uses them if it is busy again (measuring once more would be just as
contended, and cost another ``BUDGET_S``). A large model's first start can run out of budget before
every row count is timed (a row count is timed for every candidate or not at all): later starts time
the rest, within the same budget, until the entry is complete. A second form of a weight (below) is
used only once a later start has timed its row counts again.

The candidates, and which of them run on this machine, are in ``kernels/candidates.py``.

Memory: the layer keeps its packed panels (the decode winner nearly everywhere, and what the
conversion cache stores) and holds a second copy in another layout only where that copy wins some
bucket by at least ``MIN_GAIN`` times its size relative to the panels (a plain bf16 copy costs as much
as the panels, so 1.1x; an fp32 one twice, so 2.2x). When one candidate wins every bucket, only its
form is kept.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmserve.cpu_load import OthersWatch
from lmserve.errors import ConfigError
from lmserve.kernels.candidates import BASES, CANDIDATES, runnable_candidates
from lmserve.kernels.packed import PackedLinear

log = logging.getLogger(__name__)

FORCE_ENV = "LMSERVE_LINEAR_KERNEL"  # auto, or one candidate's name for every linear
DECODE_BUCKETS = (1, 2, 4, 8, 16, 32)
MIN_GAIN = 1.1  # a second form of a weight as large as the panels must be this much faster to be kept
BUDGET_S = 8.0  # measuring one model's shapes from scratch; larger buckets are skipped beyond it
ROUNDS = 3  # interleaved timing rounds per row count and pass; the best of them counts
PASSES = 2  # passes over all shapes, a second or more apart: a burst of other load spoils only one
CACHE_VERSION = 2  # 2: row counts measured in order of need (``measure_order``)
# Timings taken while other processes took more than this much CPU (in cores, on average) are marked
# contended: a busy neighbour slows some candidates more than others, so a quiet start measures them
# again; a start beside a busy neighbour uses them rather than measuring, as contended, once more.
CONTENDED_CORES = 0.5
BUSY_SAMPLE_S = 0.25  # how long a start with contended entries watches the other processes first


def forced_candidate() -> str | None:
    """The candidate ``LMSERVE_LINEAR_KERNEL`` forces for every linear, or None for ``auto``."""
    value = os.environ.get(FORCE_ENV, "auto").strip().lower() or "auto"
    if value == "auto":
        return None
    if value not in CANDIDATES:
        raise ConfigError(FORCE_ENV, value, "auto, " + ", ".join(CANDIDATES), source="environment")
    return value


def shape_key(w: PackedLinear) -> str:
    return f"{w.out_features}x{w.in_features}" + ("+silu" if w.gate_up else "")


def buckets(max_rows: int) -> list[int]:
    """Row counts to time: the decode sizes, then powers of two up to ``max_rows``."""
    out = [b for b in DECODE_BUCKETS if b <= max(1, max_rows)]
    b = DECODE_BUCKETS[-1] * 2
    while b <= max_rows:
        out.append(b)
        b *= 2
    return out


# Measured first, so that a budget that runs out leaves both regimes timed: one decode row, a
# prefill step as the CPU's adaptive budget makes them (``engine/step_budget.py``), a full decode
# batch; then the rest in increasing order. In increasing order alone, the gate|up weight of a 1.1B
# model had only 1, 2 and 4 rows timed within its share of the budget, where the panel kernel was as
# fast as the dot-product one, and so prefill ran on the panel kernel at less than half the speed.
FIRST_ROWS = (1, 256, DECODE_BUCKETS[-1])


def measure_order(rows: Sequence[int], measured: Iterable[str] = ()) -> list[int]:
    """``rows`` in the order ``measure`` times them: those not ``measured`` yet first (a second pass
    extends what the first reached before it times anything again), each group ``FIRST_ROWS``
    first."""
    done = set(measured)
    ranked = sorted(rows, key=lambda r: (FIRST_ROWS.index(r) if r in FIRST_ROWS else len(FIRST_ROWS), r))
    return [r for r in ranked if str(r) not in done] + [r for r in ranked if str(r) in done]


def choosable(w: PackedLinear | None) -> bool:
    """Only bf16 panels have a choice: other layouts run as they are (or were chosen already)."""
    return w is not None and w.layout == "panel32" and w.data.device.type == "cpu"


def plan_for(timings: dict[str, dict[str, float]]) -> list[tuple[int, str]]:
    """``(min_rows, candidate)`` steps from timings: a base (one of the own kernels, which replaces
    the panels) up to a threshold, then one other candidate, or that candidate alone. The threshold
    minimizes the summed slowdown against the best at each row count, so one bucket disturbed by
    other load does not flip the choice; a second candidate is taken only when it is ``MIN_GAIN``
    faster than the base over its rows (``MIN_GAIN`` squared over a single row count; it costs a
    second copy of the weight, in proportion to its size), and the base other than ``own`` only when
    it is ``MIN_GAIN`` faster overall (a kernel that rounds activations to bf16 must earn its place)."""
    rows = sorted(int(b) for b in timings)
    if not rows:
        return [(1, "own")]
    t = {r: timings[str(r)] for r in rows}
    best_at = {r: min(t[r].values()) for r in rows}

    def gain(name: str, over: str, among: list[int]) -> float:
        return math.prod(t[r][over] / t[r][name] for r in among) ** (1 / len(among))

    best_cost, best_plan = math.inf, [(1, "own")]
    for base in BASES:
        if any(base not in t[r] for r in rows) or (base != "own" and gain(base, "own", rows) < MIN_GAIN):
            continue
        cost = sum(t[r][base] / best_at[r] for r in rows)
        if cost < best_cost:
            best_cost, best_plan = cost, [(1, base)]
        for name in CANDIDATES:
            if name in BASES or any(name not in t[r] for r in rows):
                continue
            for i, start in enumerate(rows):
                tail = rows[i:]
                cost = sum(t[r][base] / best_at[r] for r in rows[:i]) + sum(t[r][name] / best_at[r] for r in tail)
                # One row count alone is one timing: it must clear a wider margin (MIN_GAIN squared).
                # A second form must pay for its memory, and a timing of the largest row count taken
                # in a noisy moment once chose torch from 2048 rows for 1.11x, a 692 MiB copy for a
                # 1.1B model that never runs steps that large.
                need = MIN_GAIN ** (1 if len(tail) > 1 or i == 0 else 2) * CANDIDATES[name].bytes_per_weight / 2
                if gain(name, base, tail) >= need and cost < best_cost:
                    best_cost = cost
                    best_plan = [(1, name)] if i == 0 else [(1, base), (start, name)]
    return best_plan


def chosen_at(plan: list[tuple[int, str]], rows: int) -> str:
    """The candidate ``plan`` runs for ``rows`` rows."""
    return [name for min_rows, name in plan if rows >= min_rows][-1]


def measure(ops: Any, w: PackedLinear, rows: Sequence[int], deadline: float,
            before: dict[str, dict[str, float]] | None = None,
            names: Sequence[str] = tuple(CANDIDATES)) -> dict[str, dict[str, float]]:
    """Seconds per call of every candidate at each row count: the best of a few interleaved rounds
    (load from other processes then falls on all candidates alike) and of ``before``, an earlier
    pass. Row counts go in ``measure_order``; those left when ``deadline`` passes keep their earlier
    timings or stay unmeasured."""
    forms = {name: CANDIDATES[name].prepare(w) for name in names}
    call = ops.linear_silu_mul if w.gate_up else ops.linear
    out = {rows: dict(times) for rows, times in (before or {}).items()}
    for i, m in enumerate(measure_order(rows, out)):
        if i and time.perf_counter() > deadline:  # each pass times at least one row count
            break
        x = torch.randn(m, w.in_features)
        best = {name: float("inf") for name in forms} | out.get(str(m), {})  # a cached row count goes on
        reps = {name: 1 for name in forms}
        for name, form in forms.items():  # warm up (thread pools, caches), then size a call to ~1 ms
            for _ in range(2):
                start = time.perf_counter()
                call(x, form)
            reps[name] = max(1, min(200, int(1e-3 / max(time.perf_counter() - start, 1e-7))))
        for _ in range(ROUNDS):
            for name, form in forms.items():
                start = time.perf_counter()
                for _ in range(reps[name]):
                    call(x, form)
                best[name] = min(best[name], (time.perf_counter() - start) / reps[name])
        out[str(m)] = best
    return out


Timings = dict[str, dict[str, float]]  # bucket (rows, as a string) -> candidate -> seconds per call


@dataclass
class ChoiceTable:
    """The measured (or cached) timings of each linear shape, and what they choose."""

    shapes: dict[str, Timings]
    forced: str | None = None
    source: str = "measured"  # "measured", "cache", "completed cache", "contended cache", "forced" or "none"
    seconds: float = 0.0      # spent measuring
    unconfirmed: frozenset[str] = frozenset()  # shapes whose second form waits for a later start's timing

    def plan(self, w: PackedLinear) -> list[tuple[int, str]]:
        """``(min_rows, candidate)`` steps for ``w``: from ``min_rows`` rows on, that candidate runs
        (without a second form that no later start has confirmed yet)."""
        if self.forced:
            return [(1, self.forced)]
        shape = shape_key(w)
        plan = plan_for(self.shapes.get(shape, {}))
        return plan[:1] if shape in self.unconfirmed else plan

    def forms(self, w: PackedLinear) -> list[tuple[int, PackedLinear]]:
        """``plan(w)`` with each candidate's form of ``w`` prepared (once per candidate)."""
        made: dict[str, PackedLinear] = {}
        out = []
        for min_rows, name in self.plan(w):
            if name not in made:
                made[name] = CANDIDATES[name].prepare(w)
            out.append((min_rows, made[name]))
        return out

    def describe(self) -> list[str]:
        """One line per shape: which candidate runs from which row count."""
        lines = []
        for shape in sorted(self.shapes):
            n, k = (int(v) for v in shape.split("+")[0].split("x"))
            dummy = PackedLinear(torch.empty(0), n, k, "panel32", shape.endswith("+silu"))
            steps = ", ".join(f"{name} from {rows}" for rows, name in self.plan(dummy))
            lines.append(f"{shape}: {steps}")
        return lines


def table_key(ops: Any) -> dict[str, Any]:
    """What the timings depend on besides the shapes: the machine, the kernel build, the threads."""
    from lmserve.kernels.build import ISAS, build_key
    from lmserve.kernels.machine import machine_key

    isa = getattr(getattr(ops, "ext", None), "lmserve_isa", None)
    return machine_key(version=CACHE_VERSION, ops=ops.name, threads=torch.get_num_threads(),
                       build=build_key(ISAS[isa]) if isa in ISAS else "", candidates=sorted(CANDIDATES))


def cache_path(key: dict[str, Any], kind: str = "linear") -> Path:
    """The cache file of ``kind``'s choice (linear, attention) for ``key``: one file per key, so that
    runs with another thread count (a tensor-parallel rank, a test) or kernel build keep their timings
    beside this one's instead of replacing them. The file also holds the key, checked on every read."""
    from lmserve.kernels.machine import keyed_file

    return keyed_file(f"{kind}-choice", key)


def cacheable(what: str, watch: OthersWatch, otherwise: str) -> bool:
    """Whether timings of ``what`` taken during ``watch`` are trustworthy: not when other processes
    took more than ``CONTENDED_CORES`` meanwhile (logged with what happens ``otherwise``). A watch too
    short for the CPU counters to tell (the attention loops take milliseconds; the counters move in
    10 ms ticks, and read 3.4 of 2 cores taken on an idle machine) is replaced by watching for
    ``BUSY_SAMPLE_S`` right after."""
    others = watch.others if watch.error <= CONTENDED_CORES / 2 else others_now()
    if others <= CONTENDED_CORES:
        return True
    log.warning("%s measured while other processes took %.1f of %d cores: %s", what, others,
                len(watch.cores), otherwise)
    return False


def others_now() -> float:
    """The CPU (in cores) other processes take of this process's cores over ``BUSY_SAMPLE_S``."""
    with OthersWatch() as watch:
        time.sleep(BUSY_SAMPLE_S)
    return watch.others


def busy_now() -> bool:
    """Whether other processes take more than ``CONTENDED_CORES`` of this process's cores over
    ``BUSY_SAMPLE_S``."""
    return others_now() > CONTENDED_CORES


def _entry_ok(entry: Any) -> bool:
    if not isinstance(entry, dict) or not isinstance(entry.get("max_rows"), int):
        return False
    if not isinstance(entry.get("contended", False), bool) or not isinstance(entry.get("unconfirmed", False), bool):
        return False
    timings = entry.get("timings")
    return isinstance(timings, dict) and all(
        isinstance(times, dict) and "own" in times and set(times) <= set(CANDIDATES)
        and all(isinstance(t, float) and t > 0 for t in times.values()) for times in timings.values())


def valid_shapes(data: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """The cached shapes, or nothing when any entry is not what this module writes."""
    shapes = (data or {}).get("shapes")
    if isinstance(shapes, dict) and all(_entry_ok(entry) for entry in shapes.values()):
        return shapes
    if data is not None:
        log.warning("ignoring a malformed kernel-choice cache; measuring again")
    return {}


def choose(ops: Any, weights: Iterable[tuple[PackedLinear | None, int]], fresh: bool = False) -> ChoiceTable:
    """Timings for every distinct shape of ``weights`` (each with the most rows it will multiply),
    from the cache when it has them for this machine (unless ``fresh``), else measured now (within
    ``BUDGET_S``) and added to it."""
    from lmserve.fsutil import file_lock
    from lmserve.kernels.machine import read_keyed, write_keyed

    forced = forced_candidate()
    wanted: dict[str, tuple[PackedLinear, int]] = {}
    for w, max_rows in weights:
        if w is not None and choosable(w):
            name = shape_key(w)
            wanted[name] = (w, max(max_rows, wanted.get(name, (w, 0))[1]))
    if forced or not wanted:
        return ChoiceTable({}, forced, "forced" if forced else "none")
    key = table_key(ops)
    path = cache_path(key)
    with file_lock(path.with_name(path.name + ".lock")):  # ranks of one group measure once, not at once
        shapes = valid_shapes(read_keyed(path, key))
        missing = [s for s, (_, rows) in wanted.items()
                   if fresh or s not in shapes or shapes[s]["max_rows"] < rows]
        contended = [s for s in wanted if s not in missing and shapes[s].get("contended")]
        if contended and not busy_now():
            missing += contended  # measured beside a busy process, and this start is quiet
        # Cached shapes of which this start times some row counts only (``retime``): trusted entries
        # whose budget ran out before every row count (the rest, not again the cached ones)...
        retime = {s: untimed(shapes[s]["timings"], wanted[s][1]) for s in wanted if s not in missing}
        retime = {s: rows for s, rows in retime.items() if rows and not shapes[s].get("contended")}
        # ...and a second form measured at one start, timed again at the next (its rows, best of both):
        # a slow phase of the host that lasts through one start's measuring (the counters do not see
        # it) once chose torch at 1.11x, a copy of 184 MiB, where the two kernels were even.
        confirm = {s: second_form_rows(shapes[s]["timings"]) for s in wanted
                   if s not in missing and s not in retime and shapes[s].get("unconfirmed")}
        retime.update(confirm)
        todo = missing + list(retime)
        names = runnable_candidates(ops) if todo else []  # child processes, once per machine
        start = time.perf_counter()
        timed: dict[str, Timings] = {s: shapes[s]["timings"] for s in retime}
        # Each shape's share of the budget is in proportion to its work (weight size x row buckets
        # still to time): an equal share starves the vocabulary head, whose calls take longest.
        work = {s: wanted[s][0].out_features * wanted[s][0].in_features
                * len(retime.get(s) or buckets(wanted[s][1])) for s in todo}
        total = sum(work.values()) * PASSES
        done = 0
        with OthersWatch() as watch:
            for _ in range(PASSES if todo else 0):
                for shape in todo:
                    w, rows = wanted[shape]
                    done += work[shape]
                    deadline = start + BUDGET_S * done / total
                    timed[shape] = measure(ops, w, retime.get(shape) or buckets(rows), deadline, timed.get(shape), names)
        trusted = not todo or cacheable("linear kernels", watch, "cached as contended (a quieter start "
                                        "measures again, a busy one uses them)")
        for shape in missing:
            shapes[shape] = {"max_rows": wanted[shape][1], "timings": timed[shape]}
            if not trusted:
                shapes[shape]["contended"] = True
        if trusted:  # additions are cached only when measured quietly, like the rest
            for shape in retime:
                shapes[shape] = {k: v for k, v in shapes[shape].items() if k != "unconfirmed"} | {"timings": timed[shape]}
            for shape in todo:  # a second form measured now waits for the next start
                if shape not in confirm and second_form_rows(timed[shape]):
                    shapes[shape]["unconfirmed"] = True
        spent = time.perf_counter() - start
        if todo:
            write_keyed(path, key, {"shapes": shapes})
    source = "measured" if missing else "completed cache" if retime else "contended cache" if contended else "cache"
    unconfirmed = frozenset(s for s in wanted if shapes[s].get("unconfirmed") or (s in todo and not trusted))
    table = ChoiceTable({s: timed.get(s, shapes[s]["timings"]) for s in wanted}, None, source, spent, unconfirmed)
    filled = sum(len(rows) - len(untimed(timed[s], wanted[s][1])) for s, rows in retime.items() if s not in confirm)
    said = [f"{filled} row counts added"] if len(retime) > len(confirm) else []
    said += [f"{len(confirm)} second form(s) timed again"] if confirm else []
    said += [f"{len(unconfirmed)} second form(s) to confirm at the next start"] if unconfirmed else []
    log.info("linear kernels (%s%s): %s", table.source,
             f" in {spent:.1f} s" + "".join(f", {x}" for x in said) if todo else "",
             "; ".join(table.describe()))
    return table


def second_form_rows(timings: Timings) -> list[int]:
    """The row counts of ``timings`` that its plan hands to a second form (none when one form
    holds the weight from the first row on)."""
    plan = plan_for(timings)
    return [r for r in sorted(int(b) for b in timings) if r >= plan[1][0]] if len(plan) > 1 else []


def untimed(timings: Timings, max_rows: int) -> list[int]:
    """The row counts up to ``max_rows`` that ``timings`` has no timing for: a start whose budget ran
    out before them (a large model's first start) left them, and a later start times them."""
    return [rows for rows in buckets(max_rows) if str(rows) not in timings]
