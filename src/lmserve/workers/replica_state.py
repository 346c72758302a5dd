"""``ReplicaState``: the states a replica (and the engine process filling it) goes through."""

from __future__ import annotations

import enum


class ReplicaState(enum.Enum):
    """An engine process's state: ``LOADING`` -> ``READY``, then ``FAILED`` (crashed, exited or
    frozen) or ``STOPPED``. A supervised ``Replica`` adds ``RESTARTING`` (waiting to start a new
    process after a failure) and ``DRAINING`` (finishing its requests before it stops). The router
    sends requests only to ``READY`` replicas."""

    LOADING = "loading"
    READY = "ready"
    RESTARTING = "restarting"
    DRAINING = "draining"
    FAILED = "failed"
    STOPPED = "stopped"
