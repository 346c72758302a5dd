"""Who may change what, and what a caller is told: the server's safety rules in one place.

- The management routes that change state (POST, PUT, DELETE ``/models``) are off unless the server
  has an API key (they then need it) or the operator passed ``--enable-model-api``.
- A registration is fetched within a ``FetchPolicy``: its url, and every location the model's own
  ``serving.properties`` leads to, must match ``allowed_urls`` (default: the ``model_store``).
- A registered model never runs code from its own files: ``trust_remote_code`` is on only when the
  operator lists its url in ``trust_remote_code_urls``, and a custom handler is refused.
- Without an API key the caller is nobody in particular: a failed registration is answered with
  the url it sent and one of two reasons, never with paths, existence or loader messages (those go
  to the server log). Cache paths are shown relative to ``<cache>`` to everyone.

See docs/security.md for the threat model.
"""

from __future__ import annotations

import ipaddress
import logging
import os
from dataclasses import replace

from lmserve.cache import cache_root, cache_subdir
from lmserve.config.settings import ServerConfig, ServingConfig
from lmserve.config.values import DEFAULT_ENTRY_POINT
from lmserve.errors import (
    CapacityError,
    EngineDeadError,
    InvalidRequestError,
    NotAllowedError,
    OutOfMemoryError,
    UnsupportedModelError,
)
from lmserve.server.errors import ModelConflictError
from lmserve.store.policy import FetchPolicy, directory_pattern, match_form

logger = logging.getLogger("lmserve.server")
_CHANGES = frozenset({"POST", "PUT", "PATCH", "DELETE"})
# Refusals whose message is built from the request alone: every caller may read them.
_PUBLIC = (NotAllowedError, ModelConflictError, InvalidRequestError)
# After the model's files were read: the engine could not start, for reasons not about the url.
_ENGINE_FAILURES = (EngineDeadError, OutOfMemoryError, CapacityError)

MODEL_API_OFF = (
    "registering, scaling and unregistering models is turned off on this server: the operator can turn it "
    "on with an API key (SERVING_API_KEY or --api-key; callers then send 'Authorization: Bearer <key>') or, "
    "for anyone who can reach the port, with --enable-model-api (SERVING_ENABLE_MODEL_API=true)"
)


def model_api_refusal(server: ServerConfig, method: str, path: str) -> NotAllowedError | None:
    """The refusal of a state-changing management request when the model API is off, else None."""
    if server.api_key or server.enable_model_api or method.upper() not in _CHANGES:
        return None
    if path == "/models" or path.startswith("/models/"):
        return NotAllowedError(MODEL_API_OFF)
    return None


def allowed_patterns(server: ServerConfig) -> tuple[str, ...]:
    """``allowed_urls``, or the model store (``model_store``, default ``<cache>/models``) alone."""
    if server.allowed_urls is not None:
        return server.allowed_urls
    return (directory_pattern(server.model_store or cache_subdir("models")),)


def registration_guard(server: ServerConfig, url: str) -> tuple[FetchPolicy, bool]:
    """Refuse (``NotAllowedError``) a url outside ``allowed_urls`` before anything of it is read;
    else the fetch policy for it and whether the operator lets it run its own code."""
    policy = FetchPolicy(allowed_patterns(server), server.max_extracted_bytes, registered_as=url)
    policy.check(url)
    consented = {match_form(entry) for entry in server.trust_remote_code_urls}
    return policy, match_form(url) in consented


def check_registered(config: ServingConfig, url: str, consent: bool) -> ServingConfig:
    """The configuration a registered model loads with: ``trust_remote_code`` exactly when the
    operator consented; a model whose own configuration asks for it (or for a custom handler)
    without that consent is refused, not quietly loaded another way."""
    if config.model.entry_point != DEFAULT_ENTRY_POINT:
        raise NotAllowedError(f"url {url!r} names a custom handler (option.entryPoint); models registered through "
                              "the management API are served by the built-in handler only")  # fmt: skip
    if consent:
        return replace(config, engine=replace(config.engine, trust_remote_code=True))
    if config.engine.trust_remote_code:
        raise NotAllowedError(f"url {url!r} asks for option.trust_remote_code=true, which runs Python code from the "
                              "model's files; a model registered through the management API may do that only when "
                              "the operator lists its url in trust_remote_code_urls (--trust-remote-code-urls)")  # fmt: skip
    return config


def for_caller(exc: BaseException, url: str, server: ServerConfig, log: bool = True) -> BaseException:
    """What a caller who registered (or scaled) ``url`` is told about ``exc``: everything when the
    server has an API key (the caller proved to be the operator), else only the url and the reason
    in words (the detail is logged here, with ``log``)."""
    if server.api_key or isinstance(exc, _PUBLIC):
        return exc
    if log:
        logger.warning("management request for url %r failed: %s", url, exc)
    if isinstance(exc, _ENGINE_FAILURES):
        return EngineDeadError(f"the model at url {url!r} could not be started (the server log says why)")
    return UnsupportedModelError(f"cannot serve a model from url {url!r}: nothing usable was found there, or it "
                                 "could not be loaded (the server log says why)")  # fmt: skip


def error_text(exc: BaseException, url: str, server: ServerConfig) -> str:
    """``for_caller``'s message, with cache paths shown relative to ``<cache>``."""
    shown = for_caller(exc, url, server, log=False)  # the load logged it once already
    return public_location(str(shown) or type(shown).__name__)


def public_location(text: str) -> str:
    """``text`` with the lmserve cache directory written as ``<cache>``."""
    root = cache_root()
    for prefix in sorted({str(root), os.path.realpath(root)}, key=len, reverse=True):
        text = text.replace(prefix, "<cache>")
    return text


def exposure_warnings(server: ServerConfig) -> list[str]:
    """One line per risk of listening where other machines reach the server without a key."""
    if _loopback(server.host) or server.api_key:
        return []
    lines = [f"listening on {server.host}:{server.port}, reachable from other machines, without an API key: anyone "
             "who reaches the port can run inference (set SERVING_API_KEY, or bind 127.0.0.1 behind a proxy; "
             "see docs/security.md)"]  # fmt: skip
    if server.enable_model_api:
        lines.append("--enable-model-api without an API key: anyone who reaches the port can register, scale and "
                     "unregister models (within allowed_urls)")  # fmt: skip
    return lines


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may well resolve to a public interface
