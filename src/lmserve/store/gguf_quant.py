"""GGUF quantized tensors in lmserve's grouped form (``kernels.quant.Grouped``), bit for bit.

The GGUF import keeps the raw blocks of every linear weight of a supported type in
``gguf_blocks.st`` (safetensors format, a name the weight loader does not glob) beside the
dequantized weights, so ``quantize="gguf"`` serves the file's own values. Block layouts follow
ggml (and the ``gguf`` package's numpy dequantizers); each converter below states the formula.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmserve.errors import UnsupportedModelError
from lmserve.kernels.quant import Grouped

log = logging.getLogger(__name__)

BLOCKS_FILE = "gguf_blocks.st"
SUPPORTED = ("Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K")
_QK_K = 256


def _f16(raw: np.ndarray) -> np.ndarray:
    """Little-endian fp16 fields ``[..., 2]`` bytes as fp32 ``[...]``."""
    return np.ascontiguousarray(raw).view(np.float16)[..., 0].astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """``[..., 16]`` bytes -> ``[..., 32]`` values: low nibbles first, then high (ggml's 32-block order)."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def to_grouped(raw: np.ndarray, kind: str, k: int) -> Grouped:
    """Rows of ``raw`` (uint8 ``[N, bytes per row]``) of ggml type ``kind`` with ``k`` values per row."""
    n = raw.shape[0]
    convert = _CONVERTERS.get(kind)
    if convert is None:
        raise UnsupportedModelError(f"GGUF type {kind} has no quantized layout; supported: {', '.join(SUPPORTED)}")
    q, scale, mn, bits, group = convert(np.ascontiguousarray(raw, dtype=np.uint8).reshape(n, -1), n, k)
    return Grouped(torch.from_numpy(np.ascontiguousarray(q.reshape(n, k).astype(np.int8))),
                   torch.from_numpy(np.ascontiguousarray(scale.reshape(n, k // group), dtype=np.float32)),
                   None if mn is None else torch.from_numpy(np.ascontiguousarray(mn.reshape(n, k // group),
                                                                                 dtype=np.float32)),
                   bits, group)


_Parts = tuple[np.ndarray, np.ndarray, "np.ndarray | None", int, int]


def _q8_0(raw: np.ndarray, n: int, k: int) -> _Parts:
    """34 bytes per 32 values: fp16 d, 32 int8; w = d q."""
    b = raw.reshape(n, k // 32, 34)
    return b[..., 2:].view(np.int8), _f16(b[..., :2]), None, 8, 32


def _q4_0(raw: np.ndarray, n: int, k: int) -> _Parts:
    """18 bytes per 32: fp16 d, 16 bytes of nibbles; w = d (q - 8) = d q + (-8 d)."""
    b = raw.reshape(n, k // 32, 18)
    d = _f16(b[..., :2])
    return _nibbles(b[..., 2:]), d, -8.0 * d, 4, 32


def _q4_1(raw: np.ndarray, n: int, k: int) -> _Parts:
    """20 bytes per 32: fp16 d, fp16 m, 16 bytes of nibbles; w = d q + m."""
    b = raw.reshape(n, k // 32, 20)
    return _nibbles(b[..., 4:]), _f16(b[..., :2]), _f16(b[..., 2:4]), 4, 32


def _q4_k(raw: np.ndarray, n: int, k: int) -> _Parts:
    """144 bytes per 256: fp16 d, fp16 dmin, 12 bytes of 6-bit (sc, m) for 8 sub-blocks of 32, 128
    bytes of nibbles (chunk i of 32 bytes: low nibbles are sub-block 2i, high ones 2i+1);
    w = (d sc) q - (dmin m)."""
    from gguf.quants import Q4_K

    b = raw.reshape(-1, 144)
    d, dmin = _f16(b[:, :2])[:, None], _f16(b[:, 2:4])[:, None]
    sc, m = Q4_K.get_scale_min(np.ascontiguousarray(b[:, 4:16]))
    qs = b[:, 16:].reshape(-1, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    q = (qs & 0x0F).reshape(-1, _QK_K)
    return q, d * sc.astype(np.float32), -(dmin * m.astype(np.float32)), 4, 32


def _q6_k(raw: np.ndarray, n: int, k: int) -> _Parts:
    """210 bytes per 256: 128 bytes low nibbles, 64 bytes high 2-bit pairs, 16 int8 scales, fp16 d;
    w = (d sc) (q - 32) for each sub-block of 16, with q - 32 in [-32, 31]."""
    b = raw.reshape(-1, 210)
    ql, qh = b[:, :128], b[:, 128:192]
    sc = b[:, 192:208].view(np.int8).astype(np.float32)
    d = _f16(b[:, 208:210])[:, None]
    low_bits = ql.reshape(-1, 2, 1, 64) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    high_bits = qh.reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    low = (low_bits & 0x0F).reshape(-1, 8, 32)
    high = (high_bits & 0x03).reshape(-1, 8, 32)
    q = (low | (high << 4)).astype(np.int16) - 32
    return q.reshape(-1, _QK_K), d * sc, None, 8, 16


_CONVERTERS: dict[str, Any] = {"Q8_0": _q8_0, "Q4_0": _q4_0, "Q4_1": _q4_1, "Q4_K": _q4_k, "Q6_K": _q6_k}


# -- the blocks file of an import ----------------------------------------------------------------
def keep_blocks(tensor: Any) -> bool:
    """Whether the import keeps this GGUF tensor's raw blocks (a 2-D weight of a supported type)."""
    return tensor.tensor_type.name in SUPPORTED and len(tensor.shape) == 2


def write_blocks(blocks: dict[str, tuple[torch.Tensor, str, int]], path: Path) -> None:
    """Save ``{hf_name: (raw uint8 [N, bytes], ggml type, K)}``; nothing when there is none."""
    from safetensors.torch import save_file

    if not blocks:
        return
    meta = {name: {"type": kind, "k": k} for name, (_, kind, k) in blocks.items()}
    save_file({name: raw.contiguous() for name, (raw, _, _) in blocks.items()}, str(path),
              metadata={"blocks": json.dumps(meta)})


def read_blocks(model_dir: Path) -> dict[str, Grouped]:
    """Every kept weight of an import as ``{hf_name: Grouped}``.

    Raises:
        UnsupportedModelError: ``model_dir`` holds no blocks (not an import of a quantized GGUF).
    """
    from safetensors import safe_open

    path = Path(model_dir) / BLOCKS_FILE
    if not path.is_file():
        raise UnsupportedModelError(
            f"quantize='gguf' serves a GGUF file's own quantized weights, and {model_dir} holds none "
            f"(no {BLOCKS_FILE}): give a .gguf file as the model, or use quantize='int8' or 'int4'")
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {})["blocks"])
        return {name: to_grouped(f.get_tensor(name).numpy(), m["type"], int(m["k"])) for name, m in meta.items()}
