"""Typed exceptions for errors a user can cause.

Every exception here carries enough context to tell the user what to change. The server maps them to
HTTP status codes in one table (``lmserve.server.errors``); nothing else decides a status code.
"""

from __future__ import annotations


class LMServeError(Exception):
    """Base class of every error lmserve raises on purpose."""


class ConfigError(LMServeError, ValueError):
    """A configuration key or value cannot be used. Names the key, the value and what is allowed."""

    def __init__(self, key: str, value: object, allowed: str, source: str | None = None) -> None:
        self.key, self.value, self.allowed, self.source = key, value, allowed, source
        where = f" (from {source})" if source else ""
        super().__init__(f"invalid value for '{key}'{where}: {value!r}; allowed: {allowed}")


class UnknownKeyError(ConfigError):
    """A configuration key lmserve does not know; ``hint`` suggests the closest honoured key."""

    def __init__(self, key: str, value: object, hint: str, source: str | None = None) -> None:
        super().__init__(key, value, f"a known key; {hint}", source)
        where = f" (from {source})" if source else ""
        self.args = (f"unknown key '{key}'{where}: {hint}",)


class UnsupportedKeyError(ConfigError):
    """A key for a feature lmserve has not built; says so by name rather than as an unknown key."""

    def __init__(self, key: str, value: object, feature: str, accepts: tuple[str, ...], source: str | None) -> None:
        allowed = f"only {' or '.join(accepts)}" if accepts else "nothing"
        super().__init__(key, value, allowed, source)
        where = f", from {source}" if source else ""
        turn_off = f"; {key}={accepts[0]} is accepted" if accepts else "; remove the key"
        self.args = (f"{feature} ({key}={value!r}{where}){turn_off}",)


class ConfigErrors(ConfigError):
    """Several configuration problems found at once (every unknown key of a file, say), so a user
    fixes them in one edit. ``errors`` holds each; the key, value and source are the first one's."""

    def __init__(self, errors: tuple[ConfigError, ...] | list[ConfigError]) -> None:
        first = errors[0]
        super().__init__(first.key, first.value, first.allowed, first.source)
        self.errors = tuple(errors)
        self.args = (f"{len(self.errors)} configuration errors:\n" + "\n".join(f"  {e}" for e in self.errors),)


class InvalidRequestError(LMServeError, ValueError):
    """A request cannot be served as asked (HTTP 400). ``field`` names the offending input."""

    def __init__(self, field: str, message: str) -> None:
        self.field, self.message = field, message
        super().__init__(f"{field}: {message}")


class ModelNotFoundError(LMServeError):
    """No model of that name or location exists (HTTP 404)."""


class NotAllowedError(LMServeError):
    """The server's configuration forbids what was asked (HTTP 403); the message names the setting
    with which the operator could allow it, and only what the caller sent."""


class UnsupportedModelError(LMServeError):
    """The checkpoint exists but lmserve cannot run it, e.g. an unknown architecture."""


class CapacityError(LMServeError):
    """The server is over capacity (HTTP 429, or 503 when configured for DJL compatibility)."""

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        self.retry_after_s = retry_after_s
        super().__init__(message)


class RequestTimeoutError(LMServeError):
    """A request outlived ``predict_timeout``."""


class EngineDeadError(LMServeError):
    """The engine (or one tensor-parallel rank of it) died; in-flight requests cannot complete."""


class OutOfMemoryError(LMServeError):
    """The device ran out of memory for this request (HTTP 507)."""


class HandlerError(LMServeError):
    """A custom ``model.py`` handler raised (HTTP 424)."""
