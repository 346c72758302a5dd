"""The ``lmserve`` command: ``serve [MODEL]``, ``pull``, ``convert MODEL``, ``config check PATH``, and the
SDK's ``package``, ``upload``, ``endpoints``, ``predict`` and ``delete``.

Each subcommand is a ``Command`` in ``COMMANDS``: its name, one help line, a function adding its
arguments and a function running it. New subcommands (``convert``, ``bench``) join that list; their
modules are imported only when they run, so ``lmserve --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmserve._version import __version__
from lmserve.bench.cli import bench_commands
from lmserve.errors import LMServeError


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


# ---- lmserve serve -------------------------------------------------------------------------------


def _serve_arguments(parser: argparse.ArgumentParser) -> None:
    from lmserve.config import add_serve_arguments

    parser.add_argument("model", nargs="?", default=None,
                        help="model directory, .tar.gz, s3:// prefix, Hub id or .gguf file; default: "
                             "option.model_id, else the default model (pulled on first use)")  # fmt: skip
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    add_serve_arguments(parser)
    # For development and tests: another EngineCore implementation, e.g. a fake engine.
    parser.add_argument("--engine-factory", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--engine-options", default=None, help=argparse.SUPPRESS)


def _run_serve(ns: argparse.Namespace) -> int:
    from lmserve.config import cli_overrides, load_serving_config
    from lmserve.errors import ConfigError, ConfigErrors
    from lmserve.server.runtime import DEFAULT_ENGINE_FACTORY, LoadPlan
    from lmserve.server.serve import run_server

    _configure_logging(ns.log_level)
    overrides = cli_overrides(ns)
    properties = Path(ns.properties) if ns.properties else None
    default_model = False
    try:
        config = load_serving_config(ns.model, cli=overrides, properties=properties)
    except ConfigError as exc:
        errors: tuple[ConfigError, ...] = getattr(exc, "errors", (exc,))
        others = [error for error in errors if error.key != "option.model_id"]
        if ns.model is not None or len(others) == len(errors):
            raise
        if others:  # no model means the default one: only the other problems are errors
            raise others[0] if len(others) == 1 else ConfigErrors(others) from None
        from lmserve.store.default_model import default_model_dir

        logging.getLogger("lmserve").info("no model given: serving the default model")
        config = load_serving_config(str(default_model_dir()), cli=overrides, properties=properties)
        default_model = True
    plan = LoadPlan(config, model_arg=ns.model, cli=overrides, properties=properties, resolve=True,
                    default_model=default_model, engine_factory=ns.engine_factory or DEFAULT_ENGINE_FACTORY,
                    engine_options=json.loads(ns.engine_options) if ns.engine_options else {})  # fmt: skip
    return run_server(plan, log_level=ns.log_level)


# ---- lmserve pull --------------------------------------------------------------------------------


def _pull_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _run_pull(ns: argparse.Namespace) -> int:
    from lmserve.store.default_model import pull_default_model

    _configure_logging("info")
    print(pull_default_model(progress=not ns.quiet))
    return 0


def _convert_arguments(parser: argparse.ArgumentParser) -> None:
    from lmserve.convert.cli import add_convert_arguments

    add_convert_arguments(parser)


def _run_convert(ns: argparse.Namespace) -> int:
    from lmserve.convert.cli import run_convert

    _configure_logging("info")
    return int(run_convert(ns) or 0)


# ---- lmserve config check ------------------------------------------------------------------------


def _config_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    check = actions.add_parser("check", help="print what each key of a configuration means to lmserve, every "
                               "warning and every error, without loading the model")  # fmt: skip
    check.add_argument("path", help="model directory, serving.properties file, or an environment file of "
                                    "OPTION_*/SERVING_* lines")  # fmt: skip


def _run_config(ns: argparse.Namespace) -> int:
    from lmserve.config.check import check_config

    report, ok = check_config(Path(ns.path))
    print(report, end="")
    return 0 if ok else 1


# ---- lmserve kernels ------------------------------------------------------------------------------


def _kernels_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--report", action="store_true", help="print the CPU, the kernel build, the linear "
                        "kernel choice and the prefill attention loop (the default action)")
    parser.add_argument("--shapes", default="", help="comma-separated linear shapes to choose for (measured "
                        "unless cached), NxK or IxK+silu for a gate|up pair; default: the shapes already cached")
    parser.add_argument("--max-rows", type=int, default=512, help="largest row count (prefill chunk) to time")
    parser.add_argument("--measure", action="store_true", help="time --shapes again (on a quiet machine) and "
                        "replace the cached timings the server will use")


def _run_kernels(ns: argparse.Namespace) -> int:
    from lmserve.kernels.report import report

    _configure_logging("warning")
    print(report([s for s in ns.shapes.split(",") if s.strip()], ns.max_rows, ns.measure))
    return 0


# ---- the SDK's commands (lmserve.sdk.cli) ---------------------------------------------------------


def _sdk(function: str) -> Callable[[Any], Any]:
    """``lmserve.sdk.cli.<function>``, imported only when the command runs."""

    def call(arg: Any) -> Any:
        from lmserve.sdk import cli as sdk_cli

        return getattr(sdk_cli, function)(arg)

    return call


COMMANDS: list[Command] = [
    Command("serve", "serve a model over HTTP (SageMaker/LMI, TGI and OpenAI routes)", _serve_arguments, _run_serve),
    Command("pull", "fetch the default model into the lmserve cache", _pull_arguments, _run_pull),
    Command("convert", "pre-shard a model for a tensor-parallel degree and dtype", _convert_arguments, _run_convert),
    Command("config", "check a serving.properties or OPTION_* environment file: `lmserve config check PATH`",
            _config_arguments, _run_config),
    Command("kernels", "which CPU kernels run here, which linear kernel is fastest per shape and which "
            "attention loop per head layout: "
            "`lmserve kernels --report`", _kernels_arguments, _run_kernels),
    Command("package", "check a model directory and pack it as a .tar.gz", _sdk("add_package"), _sdk("run_package")),
    Command("upload", "upload a file or directory to s3://", _sdk("add_upload"), _sdk("run_upload")),
    Command("endpoints", "list the endpoints the SDK started on this machine", _sdk("add_endpoints"),
            _sdk("run_endpoints")),
    Command("predict", "send one request to an endpoint (name or URL)", _sdk("add_predict"), _sdk("run_predict")),
    Command("delete", "stop an endpoint the SDK started", _sdk("add_delete"), _sdk("run_delete")),
    *bench_commands(Command),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmserve", description="An open inference server for LLMs.")
    parser.add_argument("--version", action="version", version=f"lmserve {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        sub = commands.add_parser(command.name, help=command.help, description=command.help)
        command.add_arguments(sub)
        sub.set_defaults(run=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lmserve`` script; returns the exit code."""
    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        return int(ns.run(ns))
    except (LMServeError, json.JSONDecodeError, OSError) as exc:  # the user's errors: one line, no traceback
        if ns.debug:
            raise
        print(f"lmserve {ns.command}: error: {exc}", file=sys.stderr)
        print(f"hint: 'lmserve {ns.command} --help' explains the arguments; add --debug for the traceback",
              file=sys.stderr)  # fmt: skip
        return 2
    except KeyboardInterrupt:
        return 130


def _configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


if __name__ == "__main__":
    sys.exit(main())
