"""lmserve.bench: the load generator (``lmserve bench``) and the recommender (``lmserve recommend``).

It speaks only HTTP to the server it measures, and starts lmserve as a subprocess to sweep it.
"""

from __future__ import annotations

from lmserve.errors import LMServeError


class BenchUsageError(LMServeError, ValueError):
    """A bench or recommend argument cannot be used; the message names it, the value and what is allowed."""
