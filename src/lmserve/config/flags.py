"""Command-line flags of ``lmserve serve``, generated from the key table.

Each key with a ``flag`` gets one; ``--option KEY=VALUE`` (repeatable) reaches every key and
``--properties PATH`` names the ``serving.properties`` file. Flags keep their values as text, so
the loader validates them like any other source and names the flag in its errors. A flag that is
not given stays ``None`` and overrides nothing.
"""

from __future__ import annotations

import argparse

from lmserve.config import values as v
from lmserve.config.keys import KEYS, Key, find_key
from lmserve.errors import ConfigError

FLAG_OF: dict[str, str] = {key.name: key.flag for key in KEYS if key.flag}
_FLAG_KEYS = tuple(key for key in KEYS if key.flag)


def _dest(key: Key) -> str:
    return str(key.flag).removeprefix("--").replace("-", "_")


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the configuration flags (one per flagged key, ``--option``, ``--properties``) to
    ``parser``. The caller adds the positional model argument."""
    group = parser.add_argument_group(
        "serving configuration", "Flags beat SERVING_* env, serving.properties and OPTION_* env."
    )
    for key in _FLAG_KEYS:
        help_text = f"{key.doc} [{key.name}]".replace("%", "%%")
        if key.type is v.BOOL:
            value = not str(key.flag).startswith("--no-")
            group.add_argument(
                str(key.flag), dest=_dest(key), action="store_const", const=value, default=None, help=help_text
            )
        else:
            metavar = key.type.name.upper().replace("|", "_")
            group.add_argument(str(key.flag), dest=_dest(key), default=None, metavar=metavar, help=help_text)
    group.add_argument(
        "--option", dest="option", action="append", default=None, metavar="KEY=VALUE",
        help="set any serving.properties key, e.g. --option option.rolling_batch=disable (repeatable)",
    )  # fmt: skip
    group.add_argument(
        "--properties", dest="properties", default=None, metavar="PATH",
        help="serving.properties file (or its directory); default: the one in the model directory",
    )  # fmt: skip


def cli_overrides(ns: argparse.Namespace) -> dict[str, object]:
    """The configuration given on the command line, keyed by key name, for ``load_serving_config``.

    Only flags that were given appear. A dedicated flag beats ``--option`` for the same key; among
    ``--option`` entries the last wins. ``--properties`` is not an override: pass it as
    ``load_serving_config(properties=...)``.
    """
    overrides: dict[str, object] = {}
    for item in getattr(ns, "option", None) or ():
        name, sep, value = str(item).partition("=")
        if not sep or not name.strip():
            raise ConfigError("--option", item, "KEY=VALUE, e.g. --option option.dtype=bf16", "CLI --option")
        found = find_key(name)
        canonical = found[0].name if found else name.strip()
        overrides.pop(canonical, None)  # --option a=1 --option A=2: the later one stands alone
        overrides[canonical] = value.strip()
    for key in _FLAG_KEYS:
        given = getattr(ns, _dest(key), None)
        if given is not None:
            overrides[key.name] = given
    return overrides
