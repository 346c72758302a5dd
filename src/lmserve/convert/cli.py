"""``lmserve convert MODEL --tp N --dtype bf16 [--quantize int8] [-o DIR]``: pre-shard a model ahead of serving it.

Without ``-o`` the conversion goes to the cache, where ``lmserve serve MODEL`` with the same degree
and dtype finds it; with ``-o DIR`` it is a self-contained directory that can be served directly.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

DTYPE_CHOICES = ("auto", "fp32", "fp16", "bf16")


def add_convert_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``convert`` subcommand's arguments."""
    parser.add_argument("model", nargs="?", default=None,
                        help="model directory, .tar.gz, s3:// prefix, Hub id or .gguf file; default: the default model")
    parser.add_argument("--tp", "--tensor-parallel-degree", dest="tp", type=int, default=1,
                        help="tensor-parallel degree to shard for (default 1)")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                        help="dtype to store weights in; auto = what serving on --device would pick")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="the device 'auto' dtype is resolved for (default: cuda if present)")
    parser.add_argument("--quantize", choices=("none", "int8", "int4", "gguf"), default="none",
                        help="also store the linear weights quantized so (the packed form serving with "
                             "the same option.quantize loads)")
    parser.add_argument("-o", "--output", default=None,
                        help="write to this new directory instead of the lmserve cache")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def add_convert_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``convert`` to an ``add_subparsers()`` object; its ``func`` is ``run_convert``."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "convert", help="pre-shard a model for a tensor-parallel degree and dtype",
        description=__doc__.splitlines()[0])
    add_convert_arguments(parser)
    parser.set_defaults(func=run_convert)
    return parser


def run_convert(args: argparse.Namespace) -> int:
    """Convert as ``args`` say and print where the conversion is; returns the exit status."""
    from lmserve.convert.converter import convert, ensure_converted, store_quantized
    from lmserve.dtypes import dtype_name

    model_dir = _model_dir(args.model, progress=not args.quiet)
    dtype = _resolve_dtype(args.dtype, args.device)
    start = time.perf_counter()
    if args.output:
        out = convert(model_dir, Path(args.output), args.tp, dtype, progress=not args.quiet)
    else:
        out = ensure_converted(model_dir, args.tp, dtype, progress=not args.quiet)
    quantized = store_quantized(model_dir, out, args.quantize)
    extra = f", {args.quantize} linear weights {quantized / 2**20:.1f} MiB" if quantized else ""
    print(f"{model_dir} -> {out} (tensor_parallel_degree {args.tp}, {dtype_name(dtype)}{extra}, "
          f"{time.perf_counter() - start:.1f}s)")
    return 0


def _model_dir(model: str | None, progress: bool) -> Path:
    if model is None:
        from lmserve.store.default_model import pull_default_model

        return pull_default_model(progress=progress)
    from lmserve.store import resolve_model

    return resolve_model(model, progress=progress).path


def _resolve_dtype(name: str, device: str) -> Any:
    # The serving side's own rule, so that "auto" here names the conversion "auto" there will look for.
    from lmserve.kernels.device import resolve_device, resolve_dtype

    return resolve_dtype(name, resolve_device(device))
