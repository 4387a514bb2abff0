"""Storage codecs of the cache: symmetric absmax int8 per vector, with its float32 scale (fused [CLS] features)."""

from __future__ import annotations

import numpy as np

from mcad_cache.cache.schema import INT8_LEVELS


def quantize_int8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric absmax int8 quantisation per vector (last axis).

    ``scale = max|x| / 127``; ``q = round(x / scale)`` in [-127, 127]; ``x ~= q * scale`` with
    ``|x - q * scale| <= scale / 2`` per element (absmax quantisation, e.g. Dettmers et al. 2022, LLM.int8(), Sec. 2).
    An all-zero vector gets scale 0 and q 0. NaN vectors (missing) get scale NaN and q 0.

    Args:
        x: [..., C] float array.
    Returns:
        ``(q [..., C] int8, scale [...] float32)``.
    """
    x = np.asarray(x, dtype=np.float32)
    amax = np.abs(x).max(axis=-1)
    scale = (amax / INT8_LEVELS).astype(np.float32)
    safe = np.where(np.isfinite(scale) & (scale > 0), scale, 1.0)[..., None]
    q = np.clip(np.rint(np.nan_to_num(x / safe)), -INT8_LEVELS, INT8_LEVELS).astype(np.int8)
    return q, scale


def dequantize_int8(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Inverse of :func:`quantize_int8`: ``q * scale[..., None]`` as float32 (NaN where the scale is NaN)."""
    return q.astype(np.float32) * np.asarray(scale, dtype=np.float32)[..., None]


__all__ = ["dequantize_int8", "quantize_int8"]
