"""Augmented image views that a cache stores and a student replays exactly (issue 16; ``docs/cache-format.md``).

A *view* of a sample is a RandomResizedCrop box in source pixels plus a horizontal-flip bit, applied to the decoded
RGB image **before** the model's own resize / crop / normalise (``data.transforms.make_image_transform``). The
teacher embeds each view at build time; the student applies the same box and flip to the same decoded image at train
time, so the cached target belongs to the pixels the student sees (Beyer et al., CVPR 2022, "consistent" teaching;
DataCompDR stores crop parameters beside per-view embeddings the same way).

- :class:`AugmentSpec`: the augmentation, versioned, with a string form recorded in the manifest (``SPEC`` below).
- :func:`draw_view` / :func:`draw_views`: per-view params drawn from ``(seed, sample key, view index)`` only, so a
  resumed, re-ordered, multi-worker or multi-rank build draws the same views.
- :func:`apply_view`: crop + flip of a PIL image by stored params.

Spec string (``--augment``), version 1::

    rrc:scale=LO-HI,ratio=LO-HI,flip=P;v1      e.g.  rrc:scale=0.35-1,ratio=0.75-1.3333,flip=0.5;v1

``scale``: crop area as a fraction of the source area; ``ratio``: crop width / height; ``flip``: probability of a
horizontal flip; ``v1``: the version of the draw algorithm below (omitted = current). Keys may come in any order;
missing keys take the defaults of :class:`AugmentSpec`. The same spec as JSON is accepted too:
``{"kind": "rrc", "scale": [0.35, 1], "ratio": [0.75, 1.3333], "flip": 0.5, "version": 1}``. ``"none"`` is the
identity (canonical view only).

Params of one view: ``int32 [5] = (x0, y0, w, h, flip)``: the crop box's left / top corner and its width / height in
source pixels (the decoded image, EXIF orientation applied), and 1 if the crop is mirrored left-right after cropping.
View 0 is always the canonical view ``(0, 0, W, H, 0)`` (the whole image, unmirrored: the same pixels as a cache
without views, so top-k candidates chosen from it equal those of a 1-view cache; our choice).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import Image

from mcad_cache.errors import ConfigError

SPEC_VERSION = 1  # version of the draw algorithm (bump when draw_view changes what it returns)
NUM_VIEW_PARAMS = 5  # x0, y0, w, h, flip
VIEW_PARAM_NAMES = ("x0", "y0", "w", "h", "flip")
MAX_TRIES = 10  # RandomResizedCrop attempts before the centre-crop fallback (torchvision's value)


@dataclass(frozen=True)
class AugmentSpec:
    """RandomResizedCrop + horizontal flip, as torchvision's ``RandomResizedCrop`` and ``RandomHorizontalFlip``
    define them (``scale`` / ``ratio`` ranges; flip probability).

    Defaults: scale (0.35, 1.0) is our choice (torchvision's 0.08 lower bound crops away most of what a caption
    describes); ratio (3/4, 4/3) and flip 0.5 are torchvision's defaults.
    """

    scale: tuple[float, float] = (0.35, 1.0)  # crop area / source area, uniform in [lo, hi]
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # crop width / height, log-uniform in [lo, hi]
    flip: float = 0.5  # probability of a left-right mirror of the crop
    version: int = SPEC_VERSION  # draw algorithm version

    def __post_init__(self) -> None:
        lo, hi = self.scale
        if not (0.0 < lo <= hi <= 1.0):
            raise ConfigError(f"--augment: scale={lo}-{hi} must satisfy 0 < lo <= hi <= 1")
        lo, hi = self.ratio
        if not (0.0 < lo <= hi):
            raise ConfigError(f"--augment: ratio={lo}-{hi} must satisfy 0 < lo <= hi")
        if not (0.0 <= self.flip <= 1.0):
            raise ConfigError(f"--augment: flip={self.flip} must be a probability in [0, 1]")
        if self.version != SPEC_VERSION:
            raise ConfigError(f"--augment: spec version v{self.version}; this code draws views with v{SPEC_VERSION}")

    def to_string(self) -> str:
        """The canonical spec string (what the manifest records; :func:`parse_augment` inverts it)."""
        return (
            f"rrc:scale={_num(self.scale[0])}-{_num(self.scale[1])},"
            f"ratio={_num(self.ratio[0])}-{_num(self.ratio[1])},flip={_num(self.flip)};v{self.version}"
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (also accepted by :func:`parse_augment`)."""
        return {"kind": "rrc", **asdict(self)}


def _num(x: float) -> str:
    return f"{x:.6g}"


def _range(name: str, text: str) -> tuple[float, float]:
    parts = text.split("-")
    try:
        if len(parts) == 1:
            v = float(parts[0])
            return v, v
        if len(parts) == 2:
            return float(parts[0]), float(parts[1])
    except ValueError:
        pass
    raise ConfigError(f"--augment: {name}={text!r} is not a range LO-HI (e.g. {name}=0.35-1)")


def parse_augment(spec: str | dict[str, Any] | AugmentSpec | None) -> AugmentSpec | None:
    """Parse ``--augment`` (string or JSON form, see the module docstring).

    Returns:
        The :class:`AugmentSpec`, or None for ``""``, ``"none"`` or None (canonical view only).
    Raises:
        ConfigError: an unknown kind or key, a malformed range, a value out of range, or another spec version.
    """
    if spec is None or isinstance(spec, AugmentSpec):
        return spec
    if isinstance(spec, str):
        text = spec.strip()
        if text in ("", "none"):
            return None
        if text.startswith("{"):
            try:
                spec = json.loads(text)
            except json.JSONDecodeError as err:
                raise ConfigError(f"--augment: not valid JSON: {err}") from err
        else:
            return _parse_string(text)
    if not isinstance(spec, dict):
        raise ConfigError(f"--augment: expected a spec string or a JSON object, got {type(spec).__name__}")
    d = dict(spec)
    if d.pop("kind", "rrc") != "rrc":
        raise ConfigError("--augment: only kind 'rrc' (RandomResizedCrop + flip) exists; e.g. " + EXAMPLE_SPEC)
    unknown = set(d) - {"scale", "ratio", "flip", "version"}
    if unknown:
        raise ConfigError(f"--augment: unknown key(s) {sorted(unknown)}; keys: scale, ratio, flip, version")
    kwargs: dict[str, Any] = {}
    for name in ("scale", "ratio"):
        if name in d:
            v = d[name]
            if not (isinstance(v, list | tuple) and len(v) == 2):
                raise ConfigError(f"--augment: {name} must be a pair [lo, hi], got {v!r}")
            kwargs[name] = (float(v[0]), float(v[1]))
    if "flip" in d:
        kwargs["flip"] = float(d["flip"])
    if "version" in d:
        kwargs["version"] = int(d["version"])
    return AugmentSpec(**kwargs)


EXAMPLE_SPEC = "rrc:scale=0.35-1,ratio=0.75-1.3333,flip=0.5;v1"


def _parse_string(text: str) -> AugmentSpec:
    body, _, version = text.partition(";")
    kind, _, args = body.partition(":")
    if kind.strip() != "rrc":
        raise ConfigError(f"--augment {text!r}: unknown kind {kind.strip()!r}; e.g. {EXAMPLE_SPEC}")
    kwargs: dict[str, Any] = {}
    for item in filter(None, (a.strip() for a in args.split(","))):
        name, eq, value = item.partition("=")
        if not eq or name not in ("scale", "ratio", "flip"):
            raise ConfigError(f"--augment {text!r}: bad item {item!r}; keys: scale, ratio, flip; e.g. {EXAMPLE_SPEC}")
        if name == "flip":
            try:
                kwargs["flip"] = float(value)
            except ValueError as err:
                raise ConfigError(f"--augment {text!r}: flip={value!r} is not a number") from err
        else:
            kwargs[name] = _range(name, value)
    if version.strip():
        v = version.strip()
        if not (v.startswith("v") and v[1:].isdigit()):
            raise ConfigError(f"--augment {text!r}: version {v!r} must look like v1")
        kwargs["version"] = int(v[1:])
    return AugmentSpec(**kwargs)


def view_rng(*parts: object) -> np.random.Generator:
    """A numpy Generator seeded from the sha256 of ``parts`` (joined with ``|``): the same parts give the same
    stream in any process, worker or rank (Python's ``hash`` is salted per process; sha256 is not)."""
    digest = hashlib.sha256("|".join(str(p) for p in parts).encode("utf-8")).digest()
    return np.random.Generator(np.random.PCG64(int.from_bytes(digest[:16], "little")))


def canonical_view(width: int, height: int) -> np.ndarray:
    """The canonical view of a ``width`` x ``height`` image: ``int32 [5] = (0, 0, W, H, 0)``."""
    return np.array([0, 0, width, height, 0], dtype=np.int32)


def draw_view(spec: AugmentSpec, *, seed: int, key: str, view: int, width: int, height: int) -> np.ndarray:
    """Params of view ``view`` (>= 1) of sample ``key``: torchvision's ``RandomResizedCrop.get_params`` algorithm
    (10 tries of area ~ U(scale) * W * H and log-ratio ~ U(log ratio); else the centre crop clamped to the ratio
    range), then a flip with probability ``spec.flip``, drawn from :func:`view_rng` ``(version, seed, key, view)``.

    Args:
        spec: the augmentation.
        seed: the build's view seed; key: the sample's ``__key__``; view: view index (0 is canonical, not drawn).
        width, height: the decoded source image size in pixels.
    Returns:
        ``int32 [5] = (x0, y0, w, h, flip)``, with ``0 <= x0``, ``x0 + w <= width`` (same for y / height), w, h >= 1.
    Raises:
        ValueError: ``width`` or ``height`` < 1.
    """
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width} x {height}")
    rng = view_rng(spec.version, seed, key, view)
    area = width * height
    log_lo, log_hi = math.log(spec.ratio[0]), math.log(spec.ratio[1])
    box = None
    for _ in range(MAX_TRIES):
        target = area * rng.uniform(spec.scale[0], spec.scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            y0 = int(rng.integers(0, height - h + 1))
            x0 = int(rng.integers(0, width - w + 1))
            box = (x0, y0, w, h)
            break
    if box is None:  # torchvision's fallback: central crop with the ratio clamped to the range
        in_ratio = width / height
        if in_ratio < spec.ratio[0]:
            w, h = width, max(1, int(round(width / spec.ratio[0])))
        elif in_ratio > spec.ratio[1]:
            h, w = height, max(1, int(round(height * spec.ratio[1])))
        else:
            w, h = width, height
        box = ((width - w) // 2, (height - h) // 2, w, h)
    flip = int(rng.random() < spec.flip)
    return np.array([*box, flip], dtype=np.int32)


def draw_views(spec: AugmentSpec | None, *, seed: int, key: str, num_views: int, width: int, height: int) -> np.ndarray:
    """Params of every view of one sample: view 0 canonical, views 1..V-1 from :func:`draw_view`.

    Returns:
        ``int32 [V, 5]`` rows ``(x0, y0, w, h, flip)``.
    Raises:
        ValueError: ``num_views`` < 1, or > 1 without a spec.
    """
    if num_views < 1:
        raise ValueError(f"num_views must be >= 1, got {num_views}")
    if num_views > 1 and spec is None:
        raise ValueError("more than one view needs an augmentation spec")
    out = np.empty((num_views, NUM_VIEW_PARAMS), dtype=np.int32)
    out[0] = canonical_view(width, height)
    for v in range(1, num_views):
        assert spec is not None
        out[v] = draw_view(spec, seed=seed, key=key, view=v, width=width, height=height)
    return out


def apply_view(image: Image.Image, params: np.ndarray | tuple[int, ...] | list[int]) -> Image.Image:
    """Crop ``image`` to the stored box and mirror it if the flip bit is set (before the model's own transform).

    Args:
        image: the decoded source image (the one the params were drawn for: same size).
        params: ``(x0, y0, w, h, flip)`` int, source pixels.
    Returns:
        A ``w`` x ``h`` PIL image (the same object for the canonical view of its own size).
    Raises:
        ValueError: the box does not fit in the image (the params belong to another image or size).
    """
    x0, y0, w, h, flip = (int(p) for p in params)
    width, height = image.size
    if x0 < 0 or y0 < 0 or w < 1 or h < 1 or x0 + w > width or y0 + h > height:
        raise ValueError(f"view box (x0={x0}, y0={y0}, w={w}, h={h}) does not fit a {width} x {height} image")
    out = image if (x0, y0, w, h) == (0, 0, width, height) else image.crop((x0, y0, x0 + w, y0 + h))
    if flip:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return out


VIEW_ARRAYS = ("image_emb_views", "view_params")  # the per-view arrays of a cache (cache.schema.array_specs)


def views_summary(
    record: dict[str, Any] | None, *, arrays: dict[str, dict[str, Any]], num_images: int
) -> dict[str, Any]:
    """The ``views`` entry of ``inspect``: V, the augment spec, the seed and the stored bytes of the view arrays.

    Args:
        record: the manifest's ``views`` entry (None: a cache without views).
        arrays: ``describe_cache``'s per-array info (``stored_bytes`` of each array).
        num_images: N_i.
    Returns:
        ``{}`` without views, else ``{"views": {"num_views", "augment", "seed", "single_stream_targets",
        "stored_bytes", "bytes_per_view", "bytes_per_view_per_image"}}`` (bytes as stored, compressed).
    """
    if not record:
        return {}
    stored = sum(int(arrays.get(name, {}).get("stored_bytes", 0)) for name in VIEW_ARRAYS)
    v = int(record["num_views"])
    return {
        "views": {
            "num_views": v,
            "augment": record.get("augment"),
            "seed": record.get("seed"),
            "single_stream_targets": record.get("single_stream_targets"),
            "stored_bytes": stored,
            "bytes_per_view": stored / v,
            "bytes_per_view_per_image": stored / (v * max(1, num_images)),
        }
    }


__all__ = [
    "MAX_TRIES",
    "NUM_VIEW_PARAMS",
    "SPEC_VERSION",
    "VIEW_PARAM_NAMES",
    "EXAMPLE_SPEC",
    "VIEW_ARRAYS",
    "AugmentSpec",
    "apply_view",
    "canonical_view",
    "draw_view",
    "draw_views",
    "parse_augment",
    "view_rng",
    "views_summary",
]
