"""Reading checkpoint tensors into a model, driven by each family's weight map (data, not code)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn
from tqdm import tqdm

from lmserve.errors import UnsupportedModelError
from lmserve.parallel.presharded import weight_files


@dataclass(frozen=True)
class WeightMap:
    """How checkpoint tensor names become parameter names.

    ``merged`` entries ``(param_fragment, checkpoint_fragment, part)`` load several checkpoint
    tensors into one merged parameter (q|k|v, gate|up). ``renames`` rewrite name fragments first.
    ``tied`` lists parameters that take another checkpoint tensor when their own is absent.
    """

    merged: tuple[tuple[str, str, Any], ...] = ()
    renames: tuple[tuple[str, str], ...] = ()
    ignore: tuple[str, ...] = ("rotary_emb.inv_freq", "attn.bias", "attn.masked_bias")
    tied: dict[str, str] = field(default_factory=dict)

    def target(self, name: str) -> tuple[str, Any]:
        for old, new in self.renames:
            name = name.replace(old, new)
        for param_frag, ckpt_frag, part in self.merged:
            if ckpt_frag in name:
                return name.replace(ckpt_frag, param_frag), part
        return name, None


def iter_checkpoint(model_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of the directory's safetensors files (or PyTorch .bin files as a fallback)."""
    files = weight_files(model_dir)
    if not files:
        raise UnsupportedModelError(f"{model_dir} holds no *.safetensors or pytorch_model*.bin weights")
    for path in files:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                    yield name, f.get_tensor(name)
        else:
            yield from torch.load(path, map_location="cpu", weights_only=True).items()


def load_weights(model: nn.Module, model_dir: Path, weight_map: WeightMap, progress: bool = False) -> None:
    """Load every parameter of ``model`` from the checkpoint; a missing parameter is an error."""
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    tied_sources = set(weight_map.tied.values())
    stash: dict[str, torch.Tensor] = {}  # sources of tied parameters, used if the tied one is absent
    names = tqdm(iter_checkpoint(model_dir), desc="loading weights", unit=" tensors", disable=not progress)
    for ckpt_name, tensor in names:
        if any(frag in ckpt_name for frag in weight_map.ignore):
            continue
        if ckpt_name in tied_sources:
            stash[ckpt_name] = tensor
        name, part = weight_map.target(ckpt_name)
        param = params.get(name)
        if param is None:
            raise UnsupportedModelError(f"checkpoint tensor {ckpt_name!r} has no place in the model ({name!r})")
        _load_one(param, tensor, part)
        loaded.add(name)
    for name, source in weight_map.tied.items():
        if name in params and name not in loaded and source in stash:
            _load_one(params[name], stash[source], None)
            loaded.add(name)
    missing = sorted(set(params) - loaded)
    if missing:
        raise UnsupportedModelError(f"checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")


def _load_one(param: nn.Parameter, tensor: torch.Tensor, part: Any) -> None:
    loader = getattr(param, "weight_loader", None)
    if loader is None:
        param.data.copy_(tensor)
    else:
        loader(param, tensor.to(param.dtype), part)
