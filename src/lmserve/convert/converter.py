"""Convert a checkpoint once into its pre-sharded form (see ``lmserve.parallel.presharded``).

Each rank's model is built on the CPU and filled by the family's own weight loaders, exactly as live
loading would (the same weight map, the same ``shard``), then its parameters are saved before any
kernel repacking. Writing happens in a temporary sibling directory renamed into place at the end,
and the manifest is written last, so an interrupted conversion never leaves an entry that looks
complete.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from lmserve._version import __version__
from lmserve.cache import cache_subdir
from lmserve.dtypes import dtype_name, torch_dtype
from lmserve.errors import UnsupportedModelError
from lmserve.fsutil import file_lock, staged_dir
from lmserve.models.checkpoint import describe_checkpoint
from lmserve.models.weights import load_weights
from lmserve.parallel import presharded
from lmserve.parallel.state import ParallelState

log = logging.getLogger(__name__)

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".h5", ".msgpack")
_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def convert(model_dir: Path | str, out_dir: Path | str, tensor_parallel_degree: int, dtype: torch.dtype | str,
            progress: bool = True) -> Path:
    """Write ``rank{r}.safetensors`` for every rank, the config/tokenizer files and ``manifest.json``
    into ``out_dir`` (which must not exist yet); returns ``out_dir``."""
    model_dir, out_dir, dtype = Path(model_dir), Path(out_dir), torch_dtype(dtype)
    degree = tensor_parallel_degree
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists; choose a new output directory")
    if presharded.read_manifest(model_dir) is not None:
        raise UnsupportedModelError(f"{model_dir} is already a conversion; convert the original model")
    info = describe_checkpoint(model_dir, dtype, torch.device("cpu"))
    start = time.perf_counter()
    with staged_dir(out_dir) as tmp:
        ranks = []
        for rank in tqdm(range(degree), desc=f"converting to tp{degree} {dtype_name(dtype)}",
                         unit=" rank", disable=not progress):
            model = info.empty_model(ParallelState(rank, degree))
            load_weights(model, model_dir, info.family.weights)
            nbytes, count = presharded.save_rank(model, tmp / presharded.rank_file(rank))
            ranks.append({"file": presharded.rank_file(rank), "bytes": nbytes, "tensors": count})
            del model
        _copy_support_files(model_dir, tmp)
        manifest = {
            "format": presharded.FORMAT, "lmserve_version": __version__,
            "fingerprint": presharded.fingerprint(model_dir),
            "source": {"path": str(model_dir.resolve()), "files": presharded.describe_source(model_dir)},
            "architecture": info.config.architecture, "family": info.family_name,
            "tensor_parallel_degree": degree, "dtype": dtype_name(dtype), "ranks": ranks,
            "created_unix": time.time(), "convert_seconds": round(time.perf_counter() - start, 3),
        }
        _write_json(tmp / presharded.MANIFEST, manifest)  # last: its presence marks a finished conversion
    log.info("converted %s to %s (tp%d, %s) in %.1fs", model_dir, out_dir, degree,
             dtype_name(dtype), time.perf_counter() - start)
    return out_dir


def store_quantized(model_dir: Path | str, conversion: Path | str, quantize: str) -> int:
    """Quantize every rank of ``conversion`` as ``quantize`` says and keep the packed weights beside
    it (``rank{r}.packed-{quantize}[-vnni].safetensors``, the file a load with that setting reads), so
    serving skips quantizing. ``model_dir`` is the original (a GGUF import's blocks live there).
    Returns the bytes of the quantized linear weights of all ranks."""
    from lmserve.kernels import get_ops
    from lmserve.models.quantize import cache_name, check_mode, quantize_model, weight_bytes

    model_dir, conversion = Path(model_dir), Path(conversion)
    if check_mode(quantize) == "none":
        return 0
    manifest = presharded.read_manifest(conversion)
    if manifest is None:
        raise UnsupportedModelError(f"{conversion} is not a finished conversion")
    degree, dtype = manifest["tensor_parallel_degree"], torch_dtype(manifest["dtype"])
    info = describe_checkpoint(model_dir, dtype, torch.device("cpu"))
    total = 0
    for rank in range(degree):
        state = ParallelState(rank, degree)
        model = info.empty_model(state)
        presharded.load_rank(model, conversion, rank)
        ops = get_ops("cpu")
        quantize_model(model, quantize, model_dir, info.family.weights, state, ops)
        presharded.remember_packed(model, conversion, rank, ops, cache_name(quantize, ops))
        total += weight_bytes(model)[1]
    return total


def conversion_pays(model_dir: Path, degree: int, dtype: torch.dtype) -> bool:
    """Whether loading would do work a conversion saves: slicing for several ranks, casting to
    another dtype, or reading pickled ``.bin`` weights."""
    if presharded.read_manifest(model_dir) is not None:
        return False  # already a conversion
    files = presharded.weight_files(model_dir)
    if degree > 1 or any(f.suffix != ".safetensors" for f in files):
        return True
    return any(stored not in (None, dtype) for f in files for stored in _stored_float_dtypes(f))


def ensure_converted(model_dir: Path | str, degree: int, dtype: torch.dtype | str, progress: bool = True) -> Path:
    """The cached conversion of ``model_dir`` for this degree and dtype, converting on a miss.

    Concurrent callers wait on a lock, so a model is converted once; entries whose source changed
    or disappeared are removed on the way.
    """
    model_dir, dtype = Path(model_dir), torch_dtype(dtype)
    entry = presharded.cache_entry(model_dir, degree, dtype)
    if presharded.is_complete(entry):
        return entry
    with file_lock(entry.parent / f".{entry.name}.lock"):
        if presharded.is_complete(entry):
            return entry
        for leftover in [entry, *entry.parent.glob(f".{entry.name}.tmp-*")]:
            shutil.rmtree(leftover, ignore_errors=True)  # an outdated entry, or an interrupted conversion
        convert(model_dir, entry, degree, dtype, progress=progress)
    prune_stale(model_dir)
    return entry


def prune_stale(model_dir: Path) -> list[Path]:
    """Remove cached conversions of ``model_dir`` made from other versions of its files, and those
    whose source directory no longer exists; returns what was removed."""
    root = cache_subdir("converted")
    here, current = str(model_dir.resolve()), presharded.fingerprint(model_dir)
    removed = []
    for entry in root.iterdir():
        manifest = presharded.read_manifest(entry) if entry.is_dir() and not entry.name.startswith(".") else None
        if manifest is None:
            continue
        source = manifest.get("source", {}).get("path", "")
        stale = (source == here and manifest.get("fingerprint") != current) or not Path(source).exists()
        if stale:
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def _stored_float_dtypes(path: Path) -> set[torch.dtype | None]:
    """Floating dtypes a safetensors file stores, read from its header alone."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header: dict[str, Any] = json.loads(f.read(size))
    return {_SAFETENSORS_DTYPES.get(v["dtype"]) for k, v in header.items()
            if k != "__metadata__" and v["dtype"] in _SAFETENSORS_DTYPES}


def _copy_support_files(model_dir: Path, out: Path) -> None:
    """Config, generation config, tokenizer and chat template files: everything but the weights."""
    for item in model_dir.iterdir():
        if item.is_file() and not item.name.endswith(_WEIGHT_SUFFIXES) and not item.name.endswith(".index.json") \
                and item.name != presharded.MANIFEST:
            shutil.copy2(item, out / item.name)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
