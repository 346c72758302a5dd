"""Rope scaling of a GGUF model, from its metadata or, for Llama 3, from the factors llama.cpp stores."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from lmserve.errors import UnsupportedModelError


def rope_scaling(meta: dict[str, Any], arch: str, config: dict[str, Any], freqs: Any) -> dict[str, Any] | None:
    """rope_scaling from metadata, or Llama 3's from the ``rope_freqs`` factors llama.cpp stores instead."""
    if freqs is not None:
        return _llama3_rope_scaling(np.asarray(freqs.data, dtype=np.float32), config)
    kind = meta.get(f"{arch}.rope.scaling.type")
    factor = meta.get(f"{arch}.rope.scaling.factor", meta.get(f"{arch}.rope.scale_linear"))
    if kind in (None, "none") and factor is None:
        return None
    scaling: dict[str, Any] = {"rope_type": kind or "linear", "factor": plain_number(factor)}
    if f"{arch}.rope.scaling.original_context_length" in meta:
        scaling["original_max_position_embeddings"] = meta[f"{arch}.rope.scaling.original_context_length"]
    return scaling


def _llama3_rope_scaling(factors: np.ndarray, config: dict[str, Any]) -> dict[str, Any]:
    """Recover Llama 3's rope parameters from the per-frequency factors llama.cpp precomputed."""
    scaling = {"rope_type": "llama3", "factor": float(factors.max()), "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    expected = llama3_rope_factors(scaling, config["rope_theta"], config["head_dim"])
    if expected.shape != factors.shape or not np.allclose(expected, factors, rtol=1e-4):
        raise UnsupportedModelError(
            "GGUF tensor 'rope_freqs.weight' holds rope frequency factors of an unknown scheme; "
            "supported: Llama 3 rope scaling (low_freq_factor 1, high_freq_factor 4, original context 8192)")
    return scaling


def llama3_rope_factors(scaling: dict[str, Any], rope_theta: float, head_dim: int) -> np.ndarray:
    """The per-frequency divisors Llama 3 rope scaling applies, as llama.cpp's converter writes them."""
    freqs = 1.0 / rope_theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)
    wavelen = 2 * math.pi / freqs
    old_context = scaling["original_max_position_embeddings"]
    low, high, factor = scaling["low_freq_factor"], scaling["high_freq_factor"], scaling["factor"]
    smooth = (old_context / wavelen - low) / (high - low)
    between = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < old_context / high, 1.0,
                    np.where(wavelen > old_context / low, factor, between)).astype(np.float32)


def plain_number(value: Any) -> Any:
    """GGUF stores float32; print 1e-05 rather than 9.999999747378752e-06, as the original config did."""
    return float(str(np.float32(value))) if isinstance(value, float) else value
