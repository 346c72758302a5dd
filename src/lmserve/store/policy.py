"""What one fetch may touch: ``FetchPolicy`` (allowed locations, archive size limit).

A model registered through the management API names its location in a request, so every location
its resolution visits (the url, then each ``option.model_id``/``option.s3url`` a fetched
``serving.properties`` points at) must fully match one of the operator's ``allowed_urls`` patterns.
The startup model is the operator's own choice and is fetched with ``allowed_urls=None``.

Matching sees local paths as absolute paths with links and ``..`` resolved (``file://`` and ``~``
removed), so ``<store>/../etc`` or a link out of the store matches as what it really is; ``s3://``
URIs and Hub ids are matched as written.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from lmserve.errors import NotAllowedError

logger = logging.getLogger("lmserve.store")
DEFAULT_MAX_EXTRACTED_BYTES = 256 * 1024**3


@dataclass(frozen=True)
class FetchPolicy:
    """Limits of one ``resolve_model`` call; plain data, so it crosses to the resolver process."""

    allowed_urls: tuple[str, ...] | None = None  # regexes; None: any location (the operator's own)
    max_extracted_bytes: int = DEFAULT_MAX_EXTRACTED_BYTES
    registered_as: str | None = None  # the url a caller sent, named in refusals instead of the hops

    def check(self, location: str, registered_as: str | None = None) -> None:
        """Raise ``NotAllowedError`` unless ``location`` matches an allowed pattern.

        When ``location`` is a hop found in fetched files (not the url the caller sent, given as
        ``registered_as`` here or in the policy), the refusal names only the url: the hop is the
        content of a file on the server, and goes to the log.
        """
        if self.allowed_urls is None or allowed(location, self.allowed_urls):
            return
        sent = self.registered_as or registered_as or location
        if match_form(sent) == match_form(location):
            raise NotAllowedError(f"url {sent!r} is not allowed: it matches none of the server's allowed_urls "
                                  "(by default only the operator's model_store)")  # fmt: skip
        logger.warning("refused %r: its serving.properties points at %r, outside allowed_urls", sent, location)
        raise NotAllowedError(f"url {sent!r} is not allowed: its serving.properties names another location "
                              "(option.model_id or option.s3url) that matches none of the server's allowed_urls")  # fmt: skip


def allowed(location: str, patterns: tuple[str, ...]) -> bool:
    """Whether ``location`` (in its ``match_form``) fully matches one of ``patterns``."""
    target = match_form(location)
    return any(re.fullmatch(pattern, target) for pattern in patterns)


def match_form(location: str) -> str:
    """What patterns see: an absolute path with links resolved for a local path, else the text."""
    text = location.strip()
    if text.startswith("s3://"):
        return text
    local = text.removeprefix("file://")
    if local.startswith(("/", "~", ".")) or Path(local).expanduser().exists():
        return os.path.realpath(Path(local).expanduser())
    return text


def directory_pattern(directory: str | os.PathLike[str]) -> str:
    """The pattern allowing ``directory`` and everything under it (links resolved)."""
    return re.escape(os.path.realpath(Path(directory).expanduser())) + r"(?:/.*)?"
