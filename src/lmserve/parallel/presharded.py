"""The pre-sharded form of a model: one safetensors file per tensor-parallel rank plus a manifest.

A conversion directory holds ``rank{r}.safetensors`` with exactly the tensors rank ``r``'s model
parameters hold (already sliced by ``sharding.shard`` and cast to the serving dtype), the source's
config and tokenizer files, and ``manifest.json``, written last. Cached conversions live in
``cache_subdir("converted")/<fingerprint>-tp<N>-<dtype>``; the fingerprint covers the source's
config and weight files, so a changed checkpoint never matches an old conversion.

The converter (``lmserve.convert``) writes this form; the model loader reads it through
``find_conversion`` and ``load_rank``. The first load on a machine also keeps the weights as its
kernels packed them (``rank{r}.packed-<kernels>.safetensors``), so later loads skip repacking.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from lmserve._version import __version__
from lmserve.cache import cache_subdir
from lmserve.dtypes import dtype_name
from lmserve.errors import UnsupportedModelError
from lmserve.fsutil import staged_file
from lmserve.kernels import Ops, PackedLinear
from lmserve.kernels.quant import QuantLinear
from lmserve.parallel.layers import LinearBase

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = 1  # bump when what a rank file holds changes; old conversions then stop matching


def rank_file(rank: int) -> str:
    return f"rank{rank}.safetensors"


def weight_files(model_dir: Path) -> list[Path]:
    """The checkpoint's weight files, as the live loader reads them (safetensors first, else .bin)."""
    files = sorted(model_dir.glob("*.safetensors"))
    return files or sorted(model_dir.glob("pytorch_model*.bin"))


def describe_source(model_dir: Path) -> list[dict[str, Any]]:
    """Name, size and modification time of the config and weight files: what the fingerprint covers."""
    out = []
    for path in [model_dir / "config.json", *weight_files(model_dir)]:
        st = path.stat()
        out.append({"name": path.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return out


def fingerprint(model_dir: Path) -> str:
    """A short hash of the source files (their names, sizes, mtimes; config.json by content)."""
    h = hashlib.sha256(f"lmserve-presharded-{FORMAT}-{__version__}".encode())
    h.update((model_dir / "config.json").read_bytes())
    h.update(json.dumps(describe_source(model_dir), sort_keys=True).encode())
    return h.hexdigest()[:20]


def cache_entry(model_dir: Path, degree: int, dtype: torch.dtype) -> Path:
    """Where the cached conversion of ``model_dir`` for this degree and dtype lives (or would)."""
    return cache_subdir("converted") / f"{fingerprint(model_dir)}-tp{degree}-{dtype_name(dtype)}"


def read_manifest(path: Path) -> dict[str, Any] | None:
    """The directory's manifest, or None when it has none (or an unreadable one)."""
    try:
        manifest: dict[str, Any] = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def is_complete(path: Path, manifest: dict[str, Any] | None = None) -> bool:
    """True when ``path`` holds a finished conversion: a manifest of this format and every rank file
    at the size the manifest recorded."""
    manifest = manifest if manifest is not None else read_manifest(path)
    if manifest is None or manifest.get("format") != FORMAT:
        return False
    try:
        ranks = manifest["ranks"]
        return len(ranks) == manifest["tensor_parallel_degree"] and all(
            (path / r["file"]).stat().st_size == r["bytes"] for r in ranks)
    except (KeyError, TypeError, OSError):
        return False


def find_conversion(model_dir: Path, degree: int, dtype: torch.dtype) -> Path | None:
    """The conversion to load for ``model_dir`` at this degree and dtype, or None to load live.

    ``model_dir`` may itself be a conversion (made with ``lmserve convert -o``); then it must match.
    """
    manifest = read_manifest(model_dir)
    if manifest is not None:
        if not is_complete(model_dir, manifest):
            raise UnsupportedModelError(f"{model_dir} is an incomplete or outdated conversion; convert again")
        have = (manifest["tensor_parallel_degree"], manifest["dtype"])
        if have != (degree, dtype_name(dtype)):
            raise UnsupportedModelError(
                f"{model_dir} was converted for tensor_parallel_degree {have[0]} and dtype {have[1]}; "
                f"asked for degree {degree} and dtype {dtype_name(dtype)}: serve the original model, or convert "
                f"it for these settings")
        return model_dir
    if not (model_dir / "config.json").is_file() or not weight_files(model_dir):
        return None
    try:
        entry = cache_entry(model_dir, degree, dtype)
    except OSError:  # no usable cache directory (a read-only home, say): load the original
        return None
    return entry if is_complete(entry) else None


def save_rank(model: nn.Module, path: Path) -> tuple[int, int]:
    """Write every parameter and persistent buffer of one rank's (unfinalized) model, flushed to
    disk; returns (bytes, tensors). Tied parameters (one tensor, two names) are stored once."""
    tensors = {name: t.detach().contiguous() for name, t in named_tensors(model)}
    save_file(tensors, str(path), metadata={"format": "pt"})
    with open(path, "rb") as f:
        os.fsync(f.fileno())
    return path.stat().st_size, len(tensors)


def load_rank(model: nn.Module, conversion: Path, rank: int, ops: Ops | None = None, quantize: str = "none") -> bool:
    """Give ``model`` rank ``rank``'s tensors from a conversion, without casting or slicing; with
    ``ops``, also the weights packed for those kernels (and ``quantize``) by an earlier load
    (``remember_packed``). Returns whether packed weights were restored."""
    path = conversion / rank_file(rank)
    wanted = dict(named_tensors(model))
    packs = _read_packed(conversion / packed_file(rank, ops, quantize), model) if ops is not None else {}
    skip = {f"{name}.weight" for name in packs}  # replaced by their packed form below
    with safe_open(str(path), framework="pt", device="cpu") as f:
        names = set(f.keys())
        if names != set(wanted):
            missing, extra = sorted(set(wanted) - names), sorted(names - set(wanted))
            raise UnsupportedModelError(
                f"{path} does not fit the model: {len(missing)} tensors missing (e.g. {missing[:3]}), "
                f"{len(extra)} unexpected (e.g. {extra[:3]}); convert again")
        for name, tensor in wanted.items():
            if name in skip:
                continue
            loaded = f.get_tensor(name)
            if loaded.shape != tensor.shape or loaded.dtype != tensor.dtype:
                raise UnsupportedModelError(
                    f"{path}: {name} is {tuple(loaded.shape)} {loaded.dtype}, the model wants "
                    f"{tuple(tensor.shape)} {tensor.dtype}; convert again")
            tensor.data = loaded  # rebinding keeps tied parameters tied
    linears = _linears(model)
    for name, packed in packs.items():
        linears[name].restore_packed(packed)
    return bool(packs)


def packed_file(rank: int, ops: Ops, quantize: str = "none") -> str:
    """The packed weights of one rank; quantized ones are the same for every kernel set."""
    return f"rank{rank}.packed-{ops.name if quantize == 'none' else quantize}.safetensors"


def remember_packed(model: nn.Module, conversion: Path, rank: int, ops: Ops, quantize: str = "none") -> None:
    """Keep the weights ``ops`` packed (after ``finalize``, quantized as ``quantize`` says) next to
    the conversion, so later loads skip packing: the kernels' half of the compiled-model cache. Plain
    layouts are not kept (they cost nothing to rebuild); a read-only conversion stays without them."""
    packs = {name: m.packed for name, m in model.named_modules()
             if isinstance(m, LinearBase) and m.packed is not None and m.packed.layout != "plain"}
    if not packs:
        return
    meta, tensors = {}, {}
    for name, p in packs.items():
        values = {f.name: getattr(p, f.name) for f in dataclasses.fields(p)}
        meta[name] = {k: v for k, v in values.items() if not isinstance(v, torch.Tensor)}
        tensors.update({name if k == "data" else f"{name}:{k}": v.contiguous()
                        for k, v in values.items() if isinstance(v, torch.Tensor) and v.numel()})
    try:
        with staged_file(conversion / packed_file(rank, ops, quantize)) as tmp:
            save_file(tensors, str(tmp), metadata={"packed": json.dumps(meta)})
    except OSError as exc:
        log.info("not keeping packed weights in %s: %s", conversion, exc)


def _read_packed(path: Path, model: nn.Module) -> dict[str, PackedLinear]:
    if not path.is_file():
        return {}
    with safe_open(str(path), framework="pt", device="cpu") as f:
        meta = json.loads((f.metadata() or {}).get("packed", "{}"))
        names = set(f.keys())
        packs: dict[str, PackedLinear] = {}
        for name, fields in meta.items():
            if "group" not in fields:
                packs[name] = PackedLinear(data=f.get_tensor(name), **fields)
                continue
            scales, mins = (f.get_tensor(f"{name}:{k}") if f"{name}:{k}" in names else torch.empty(0)
                            for k in ("scales", "mins"))
            packs[name] = QuantLinear(data=f.get_tensor(name), scales=scales, mins=mins, **fields)
    linears = _linears(model)
    if not packs or any(name not in linears or not linears[name].fits(p) for name, p in packs.items()):
        return {}  # made for another model layout (or lmserve version): the weights get packed afresh
    return packs


def _linears(model: nn.Module) -> dict[str, LinearBase]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LinearBase)}


def named_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """What a rank file holds: parameters (each shared tensor once) and persistent buffers."""
    persistent = [(name, buf) for name, buf in model.named_buffers()
                  if name.rpartition(".")[2] not in _non_persistent(model, name)]
    return [*model.named_parameters(), *persistent]


def _non_persistent(model: nn.Module, buffer_name: str) -> set[str]:
    owner = model.get_submodule(buffer_name.rpartition(".")[0]) if "." in buffer_name else model
    return set(getattr(owner, "_non_persistent_buffers_set", ()))
