"""How the benchmarks that compare systems order their rounds."""

from __future__ import annotations


def round_order(systems: list[str], round_index: int) -> list[str]:
    """Systems in the order given in even rounds and reversed in odd ones: a host that slows down or
    speeds up within a run then weighs on every system alike over two rounds."""
    return list(systems) if round_index % 2 == 0 else list(reversed(systems))
