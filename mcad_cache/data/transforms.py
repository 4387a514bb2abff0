"""Per-model image preprocessing, built from that model's own preprocessing dict.

The dict (``preprocess_cfg``) is the one a teacher or student exposes and the one stored in a cache's fingerprint::

    {"image_size": 224 | [H, W], "resize_mode": "shortest" | "squash" | "longest", "crop": "center" | None,
     "interpolation": "bicubic" | "bilinear" | "nearest", "mean": [3 floats], "std": [3 floats]}

optionally with ``"fill": int`` (padding value for ``"longest"``, default 0).

Semantics (inference transforms only; no augmentation):

- ``"shortest"`` + ``"center"``: resize the shorter side to the target (keeping aspect ratio), centre-crop.
  This is open_clip's ``image_transform(..., is_train=False, resize_mode="shortest")`` (the OpenAI CLIP transform).
- ``"longest"`` + ``"center"``: resize the longer side to the target (keeping aspect ratio), centre-pad with
  ``fill``. open_clip's ``resize_mode="longest"`` (``ResizeKeepRatio(longest=1)`` + ``CenterCropOrPad``).
- ``"squash"`` + ``None``: resize to exactly ``(H, W)``, ignoring aspect ratio. ALBEF's and BLIP's test transform
  (salesforce/ALBEF ``dataset/__init__.py``: ``Resize((res, res), interpolation=BICUBIC)``, ``ToTensor``,
  ``Normalize``) and open_clip's ``resize_mode="squash"``.

All resizing is torchvision's (PIL backend, antialiased), followed by ``ToTensor`` (uint8 -> [0, 1]) and
``Normalize(mean, std)``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

RESIZE_MODES = ("shortest", "squash", "longest")
INTERPOLATIONS = {
    "bicubic": InterpolationMode.BICUBIC,
    "bilinear": InterpolationMode.BILINEAR,
    "nearest": InterpolationMode.NEAREST,
}
REQUIRED_KEYS = ("image_size", "resize_mode", "crop", "interpolation", "mean", "std")


def image_size_hw(image_size: int | list[int] | tuple[int, ...]) -> tuple[int, int]:
    """``image_size`` of a preprocess cfg (int or [H, W]) as an ``(H, W)`` tuple of pixels.

    Raises:
        ValueError: not a positive int or a pair of positive ints.
    """
    if isinstance(image_size, bool):
        raise ValueError(f"image_size must be an int or [H, W], got {image_size!r}")
    if isinstance(image_size, int):
        hw = (image_size, image_size)
    elif isinstance(image_size, (list, tuple)) and len(image_size) == 2 and all(isinstance(v, int) for v in image_size):
        hw = (int(image_size[0]), int(image_size[1]))
    else:
        raise ValueError(f"image_size must be an int or [H, W], got {image_size!r}")
    if min(hw) <= 0:
        raise ValueError(f"image_size must be positive, got {image_size!r}")
    return hw


def validate_preprocess_cfg(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Check a preprocess cfg and return a normalised plain copy (lists for sequences, floats for mean/std).

    Raises:
        ValueError: a missing key, an unknown resize mode / interpolation / crop, a crop that does not fit the resize
            mode (``"shortest"`` and ``"longest"`` need ``"center"``, ``"squash"`` needs ``None``), or mean/std that
            are not 3 numbers (std > 0).
    """
    missing = [k for k in REQUIRED_KEYS if k not in cfg]
    if missing:
        raise ValueError(f"preprocess cfg is missing {missing}; expected keys {list(REQUIRED_KEYS)}, got {sorted(cfg)}")
    h, w = image_size_hw(cfg["image_size"])
    mode = cfg["resize_mode"]
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {mode!r}")
    crop = cfg["crop"]
    expected_crop = None if mode == "squash" else "center"
    if crop != expected_crop:
        raise ValueError(f"resize_mode {mode!r} needs crop={expected_crop!r}, got crop={crop!r}")
    interp = cfg["interpolation"]
    if interp not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {sorted(INTERPOLATIONS)}, got {interp!r}")
    mean = [float(v) for v in cfg["mean"]]
    std = [float(v) for v in cfg["std"]]
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ValueError(f"mean and std must be 3 numbers (std > 0), got mean={cfg['mean']!r} std={cfg['std']!r}")
    out: dict[str, Any] = {
        "image_size": h if h == w else [h, w],
        "resize_mode": mode,
        "crop": crop,
        "interpolation": interp,
        "mean": mean,
        "std": std,
    }
    fill = int(cfg.get("fill", 0))
    if fill != 0:
        out["fill"] = fill
    return out


class ResizeKeepRatio:
    """Resize keeping the aspect ratio so that the shorter (``longest=False``) or longer (``longest=True``) side
    matches the target; new side = ``round(side / ratio)``, the rounding rule of timm's / open_clip's
    ``ResizeKeepRatio``. Picklable (DataLoader workers).

    Args:
        size: target (H, W) in pixels.
        longest: match the longer side (True) or the shorter side (False).
        interpolation: torchvision ``InterpolationMode``.
    """

    def __init__(self, size: tuple[int, int], *, longest: bool, interpolation: InterpolationMode) -> None:
        self.size = tuple(size)
        self.longest = longest
        self.interpolation = interpolation

    def __call__(self, img: Image.Image) -> Image.Image:
        w, h = img.size
        ratio_h, ratio_w = h / self.size[0], w / self.size[1]
        ratio = max(ratio_h, ratio_w) if self.longest else min(ratio_h, ratio_w)
        new_size = [round(h / ratio), round(w / ratio)]
        return F.resize(img, new_size, self.interpolation)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, longest={self.longest}, interpolation={self.interpolation})"


class CenterCropOrPad:
    """Centre-crop to (H, W), padding with ``fill`` first where the image is smaller (open_clip's
    ``center_crop_or_pad``: left/top padding ``(target - size) // 2``, crop offset ``round((size - target) / 2)``)."""

    def __init__(self, size: tuple[int, int], *, fill: int = 0) -> None:
        self.size = tuple(size)
        self.fill = fill

    def __call__(self, img: Image.Image) -> Image.Image:
        w, h = img.size
        th, tw = self.size
        if tw > w or th > h:
            pad = [
                (tw - w) // 2 if tw > w else 0,
                (th - h) // 2 if th > h else 0,
                (tw - w + 1) // 2 if tw > w else 0,
                (th - h + 1) // 2 if th > h else 0,
            ]
            img = F.pad(img, pad, fill=self.fill)
            w, h = img.size
        return F.crop(img, int(round((h - th) / 2.0)), int(round((w - tw) / 2.0)), th, tw)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, fill={self.fill})"


class RequireRGB:
    """Pass an RGB PIL image through; anything else is an error (alpha and palette handling is the decoder's job,
    ``data.decode.decode_image``, so that every model sees the same pixels)."""

    def __call__(self, img: Image.Image) -> Image.Image:
        if not isinstance(img, Image.Image):
            raise TypeError(f"expected a PIL.Image.Image, got {type(img).__name__}")
        if img.mode != "RGB":
            raise ValueError(f"expected an RGB image, got mode {img.mode!r} (decode with data.decode.decode_image)")
        return img

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def make_image_transform(cfg: Mapping[str, Any]) -> Callable[[Image.Image], torch.Tensor]:
    """Build the inference transform a model's own preprocessing dict describes.

    Args:
        cfg: the preprocessing dict (see the module docstring): ``image_size`` in pixels, ``resize_mode``, ``crop``,
            ``interpolation``, ``mean`` / ``std`` (per channel, applied after scaling to [0, 1]).
    Returns:
        A picklable callable: RGB ``PIL.Image`` -> ``[3, H, W]`` float32 tensor, ``(x / 255 - mean) / std``.
        With the cfg of an open_clip model it gives the same tensor as open_clip's own ``preprocess``
        (``open_clip/transform.py`` ``image_transform``, ``is_train=False``); with the ALBEF cfg the same as
        ALBEF's test transform. (One known difference: for a non-square target with ``"shortest"``, open_clip's
        ``ResizeKeepRatio`` always uses bicubic; here the cfg's interpolation is used.)
    Raises:
        ValueError: an invalid cfg (see ``validate_preprocess_cfg``).
    """
    cfg = validate_preprocess_cfg(cfg)
    size = image_size_hw(cfg["image_size"])
    interp = INTERPOLATIONS[cfg["interpolation"]]
    steps: list[Callable[[Any], Any]] = [RequireRGB()]
    if cfg["resize_mode"] == "squash":
        steps.append(T.Resize(size, interpolation=interp))
    elif cfg["resize_mode"] == "shortest":
        if size[0] == size[1]:
            # torchvision's scalar Resize: shorter side to size, longer side int(size * long / short)
            # (truncation, as open_clip's square case uses it).
            steps.append(T.Resize(size[0], interpolation=interp))
        else:
            steps.append(ResizeKeepRatio(size, longest=False, interpolation=interp))
        steps.append(T.CenterCrop(size))
    else:  # longest
        steps.append(ResizeKeepRatio(size, longest=True, interpolation=interp))
        steps.append(CenterCropOrPad(size, fill=cfg.get("fill", 0)))
    steps += [T.ToTensor(), T.Normalize(mean=cfg["mean"], std=cfg["std"])]
    return T.Compose(steps)


__all__ = [
    "INTERPOLATIONS",
    "RESIZE_MODES",
    "CenterCropOrPad",
    "ResizeKeepRatio",
    "image_size_hw",
    "make_image_transform",
    "validate_preprocess_cfg",
]
