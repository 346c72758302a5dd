"""The frontend's zmq contexts: one of each kind per process, for the life of the process.

A context of its own per client looked tidy but could hang the process. When a client is collected
without ``shutdown()`` (a failed start, a bug elsewhere), the garbage collector clears the weak
references a context keeps to its sockets before it runs the context's destructor, so the destructor
closes nothing and then waits, forever, for those still-open sockets to close: whatever code
happened to trigger the collection hangs. Process-wide contexts are never collected; a leaked
socket is closed by its own destructor, with linger 0 (messages for an engine that is gone are
dropped, not waited for).
"""

from __future__ import annotations

import os
import threading

import zmq
import zmq.asyncio

_lock = threading.Lock()
_contexts: dict[tuple[str, int], zmq.Context] = {}


def _context(kind: str) -> zmq.Context:
    key = (kind, os.getpid())  # a forked child must not use its parent's context
    with _lock:
        ctx = _contexts.get(key)
        if ctx is None:
            ctx = zmq.asyncio.Context() if kind == "asyncio" else zmq.Context()
            ctx.setsockopt(zmq.LINGER, 0)  # the default of every socket it makes
            _contexts[key] = ctx
        return ctx


def async_context() -> zmq.asyncio.Context:
    """This process's asyncio context (sockets whose receives are awaited on the event loop)."""
    return _context("asyncio")  # type: ignore[return-value]


def sync_context() -> zmq.Context:
    """This process's plain context (sockets used without awaiting, e.g. non-blocking sends)."""
    return _context("sync")
