"""Image preprocessing for exported encoders in numpy + PIL only (no torch), so an app or a query process can run it.

It reproduces ``mcad_cache.data.transforms.make_image_transform`` (torchvision on PIL images) step by step, and a
test checks the two against each other for every resize mode:

- ``"shortest"``, square target: torchvision's scalar ``Resize``: shorter side -> ``S``, longer side
  ``int(S * long / short)`` (truncation); then ``CenterCrop`` with offsets ``int(round((side - S) / 2))``.
- ``"shortest"`` / ``"longest"``, other targets: timm / open_clip ``ResizeKeepRatio`` (``round(side / ratio)``), then
  the centre crop (or open_clip's centre pad: left/top ``(target - size) // 2``, fill value ``fill``).
- ``"squash"``: resize to exactly (H, W).
- then ``x / 255`` and ``(x - mean) / std`` per channel in float32 (torchvision ``ToTensor`` + ``Normalize``).

Resizing is PIL's ``Image.resize`` with the named filter, which is what torchvision calls for PIL input.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import Image

_FILTERS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
            "nearest": Image.Resampling.NEAREST}  # fmt: skip


def _size_hw(image_size: int | list[int]) -> tuple[int, int]:
    if isinstance(image_size, int):
        return image_size, image_size
    return int(image_size[0]), int(image_size[1])


def _resize(img: Image.Image, cfg: Mapping[str, Any]) -> Image.Image:
    th, tw = _size_hw(cfg["image_size"])
    resample = _FILTERS[cfg["interpolation"]]
    w, h = img.size
    mode = cfg["resize_mode"]
    if mode == "squash":
        return img.resize((tw, th), resample)
    if mode == "shortest" and th == tw:
        short, long = min(w, h), max(w, h)
        new_short, new_long = th, int(th * long / short)
        new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
        return img if (new_w, new_h) == (w, h) else img.resize((new_w, new_h), resample)
    ratio_h, ratio_w = h / th, w / tw
    ratio = max(ratio_h, ratio_w) if mode == "longest" else min(ratio_h, ratio_w)
    return img.resize((round(w / ratio), round(h / ratio)), resample)


def _center_crop_or_pad(arr: np.ndarray, th: int, tw: int, *, fill: int) -> np.ndarray:
    h, w = arr.shape[:2]
    if th > h or tw > w:
        top, left = max(th - h, 0) // 2, max(tw - w, 0) // 2
        padded = np.full((max(h, th), max(w, tw), 3), fill, dtype=arr.dtype)
        padded[top : top + h, left : left + w] = arr
        arr, (h, w) = padded, padded.shape[:2]
    top, left = int(round((h - th) / 2.0)), int(round((w - tw) / 2.0))
    return arr[top : top + th, left : left + tw]


def preprocess_image(img: Image.Image, cfg: Mapping[str, Any]) -> np.ndarray:
    """One RGB image -> the encoder input.

    Args:
        img: 8-bit RGB ``PIL.Image`` (decode with the export's decode policy first).
        cfg: ``preprocess.json`` of an export (the student's ``preprocess_cfg``).
    Returns:
        ``[3, H, W]`` float32, ``(pixel / 255 - mean) / std``.
    Raises:
        ValueError: the image is not RGB.
    """
    if img.mode != "RGB":
        raise ValueError(f"preprocess_image needs an RGB image, got mode {img.mode!r} (decode it first)")
    th, tw = _size_hw(cfg["image_size"])
    arr = np.asarray(_resize(img, cfg), dtype=np.uint8)
    arr = _center_crop_or_pad(arr, th, tw, fill=int(cfg.get("fill", 0)))
    x = arr.astype(np.float32) / np.float32(255.0)
    mean = np.asarray(cfg["mean"], dtype=np.float32)
    std = np.asarray(cfg["std"], dtype=np.float32)
    return np.ascontiguousarray(((x - mean) / std).transpose(2, 0, 1))
