"""The one image decode path shared by import, build, distill and eval: any image bytes in, 8-bit RGB out.

Policy (recorded in every cache fingerprint through :meth:`DecodePolicy.to_dict`; ``docs/data.md`` explains it):

* Limits are checked from the image header, before any pixel is decoded: ``width * height <= max_pixels`` and
  ``max(w, h) / min(w, h) <= max_aspect``. The check is ours and does not depend on PIL's process-wide
  ``Image.MAX_IMAGE_PIXELS`` (which model code may change); if PIL's own bomb guard fires first, that is also
  reported as ``too_many_pixels``.
* EXIF orientation: applied by default (``exif_transpose=True``), i.e. pixels are turned the way a viewer shows
  them; unreadable EXIF counts as orientation 1.
* Alpha (``RGBA``, ``LA``, ``PA``, palette or grey/RGB with a ``transparency`` entry, premultiplied ``RGBa``/``La``)
  is composited onto ``background`` (white by default), never dropped (which would show hidden colours).
* Palette ``P``, bilevel ``1``, grey ``L``, ``CMYK`` (PIL's conversion, no ICC colour management), ``YCbCr``,
  ``RGBX`` are converted with PIL. 16-bit grey (``I;16``, ``I;16B``, ``I;16L``) and 32-bit ``I`` are **scaled**
  from [0, 65535] to [0, 255] (``round(v / 257)``), not clipped; ``F`` is read as [0, 1] and scaled by 255.
* Multi-frame files (GIF, WebP, TIFF): the first frame.
* ICC profiles are ignored (pixel values are taken as sRGB).
"""

from __future__ import annotations

import io
import logging
import warnings
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageFile

from mcad_cache.data.skips import SampleSkip

_logger = logging.getLogger(__name__)

_EXIF_ORIENTATION_TAG = 0x0112
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


@dataclass(frozen=True)
class DecodePolicy:
    """How image bytes become an 8-bit RGB image. Part of every cache fingerprint.

    Attributes:
        max_pixels: largest accepted ``width * height`` (pixels), read from the header before decoding. The default,
            50 million, keeps a decoded RGB image under 150 MB; our choice.
        max_aspect: largest accepted ``max(w, h) / min(w, h)`` (dimensionless). Default 20 (our choice: drops
            banners and one-pixel lines, keeps panoramas).
        background: RGB 0..255 colour that transparent pixels are composited onto. Default white (our choice:
            clip art and logos are drawn for a white page).
        exif_transpose: apply the EXIF orientation tag (default True: the pixels a person saw when captioning).
    """

    max_pixels: int = 50_000_000
    max_aspect: float = 20.0
    background: tuple[int, int, int] = (255, 255, 255)
    exif_transpose: bool = True

    def __post_init__(self) -> None:
        if self.max_pixels <= 0 or self.max_aspect < 1:
            raise ValueError(
                f"DecodePolicy: need max_pixels > 0 and max_aspect >= 1, got {self.max_pixels}, {self.max_aspect}"
            )
        if len(self.background) != 3 or not all(0 <= int(c) <= 255 for c in self.background):
            raise ValueError(f"DecodePolicy.background must be 3 values in 0..255, got {self.background}")

    def to_dict(self) -> dict:
        """JSON-ready dict (for cache fingerprints and reports), with a ``decode_version`` of this code's rules."""
        d = asdict(self)
        d["background"] = list(self.background)
        d["decode_version"] = 1
        return d


@dataclass(frozen=True)
class ImageHeader:
    """What the header of an image file says, read without decoding pixels."""

    format: str  # PIL format name, e.g. "PNG", "JPEG"
    mode: str  # PIL source mode, e.g. "RGBA", "P", "I;16", "CMYK"
    width: int  # pixels
    height: int  # pixels


def _open(data: bytes) -> Image.Image:
    """PIL's lazy open (header only); every failure becomes a SampleSkip."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as err:
        raise SampleSkip("too_many_pixels", f"PIL's global pixel guard: {err}") from err
    except Exception as err:  # PIL raises many types (UnidentifiedImageError, SyntaxError, struct.error, ...)
        raise SampleSkip("decode_error", f"cannot read image header: {type(err).__name__}: {err}") from err


def _check_limits(width: int, height: int, policy: DecodePolicy) -> None:
    if width <= 0 or height <= 0:
        raise SampleSkip("decode_error", f"image size {width}x{height}")
    if width * height > policy.max_pixels:
        raise SampleSkip("too_many_pixels", f"{width}x{height} = {width * height} px > max_pixels {policy.max_pixels}")
    aspect = max(width, height) / min(width, height)
    if aspect > policy.max_aspect:
        raise SampleSkip("extreme_aspect", f"{width}x{height}: aspect {aspect:.1f} > max_aspect {policy.max_aspect}")


def probe_image(data: bytes, *, policy: DecodePolicy | None = None) -> ImageHeader:
    """Read an image's format, mode and size from its header only; optionally check the policy's limits.

    Args:
        data: encoded image file bytes.
        policy: when given, raise if the header breaks its pixel or aspect limits.
    Returns:
        The header fields.
    Raises:
        SampleSkip: ``decode_error`` (unreadable header), ``too_many_pixels`` or ``extreme_aspect``.
    """
    im = _open(data)
    header = ImageHeader(format=str(im.format), mode=im.mode, width=im.size[0], height=im.size[1])
    if policy is not None:
        _check_limits(header.width, header.height, policy)
    return header


def _exif_orientation(im: Image.Image) -> int:
    try:
        return int(im.getexif().get(_EXIF_ORIENTATION_TAG, 1))
    except Exception:  # malformed EXIF: the policy says treat it as "no rotation"
        _logger.debug("unreadable EXIF; orientation 1 assumed")
        return 1


_TRANSPOSE = {
    2: (Image.Transpose.FLIP_LEFT_RIGHT,),
    3: (Image.Transpose.ROTATE_180,),
    4: (Image.Transpose.FLIP_TOP_BOTTOM,),
    5: (Image.Transpose.TRANSPOSE,),
    6: (Image.Transpose.ROTATE_270,),
    7: (Image.Transpose.TRANSVERSE,),
    8: (Image.Transpose.ROTATE_90,),
}  # the EXIF 2.3 orientation table, as in PIL.ImageOps.exif_transpose


def _scale_high_bit_depth(im: Image.Image) -> Image.Image:
    arr = np.asarray(im)
    if im.mode == "F":
        scaled = np.clip(arr.astype(np.float64), 0.0, 1.0) * 255.0
    else:  # I;16*, I: the 16-bit range [0, 65535] maps to [0, 255]; v / 257 is exact at both ends
        scaled = np.clip(arr.astype(np.float64), 0, 65535) / 257.0
    return Image.fromarray(np.floor(scaled + 0.5).astype(np.uint8), mode="L")


def to_rgb(im: Image.Image, *, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Convert a loaded PIL image of any mode to 8-bit RGB following the decode policy (module docstring).

    Args:
        im: a loaded image (any PIL mode).
        background: RGB 0..255 colour that transparent pixels are composited onto.
    Returns:
        A new ``RGB`` image of the same size.
    Raises:
        ValueError: if PIL has no conversion for the mode (e.g. ``LAB``).
    """
    mode = im.mode
    if mode in _SIXTEEN_BIT_MODES or mode == "F":
        return _scale_high_bit_depth(im).convert("RGB")
    if mode in _ALPHA_MODES or (mode in ("P", "L", "RGB", "1") and "transparency" in im.info):
        rgba = im.convert("RGBA")
        base = Image.new("RGBA", rgba.size, (*(int(c) for c in background), 255))
        return Image.alpha_composite(base, rgba).convert("RGB")
    if mode == "RGB":
        return im.copy()
    return im.convert("RGB")


def open_checked(data: bytes, *, policy: DecodePolicy) -> Image.Image:
    """Open image bytes lazily (header only) and check the policy's pixel and aspect limits before any decoding.

    Raises:
        SampleSkip: ``decode_error``, ``too_many_pixels`` or ``extreme_aspect``.
    """
    im = _open(data)
    _check_limits(im.size[0], im.size[1], policy)
    return im


def apply_exif_orientation(im: Image.Image) -> Image.Image:
    """Turn a loaded image by its EXIF orientation tag (the EXIF 2.3 table); unreadable EXIF counts as 1."""
    for op in _TRANSPOSE.get(_exif_orientation(im), ()):
        im = im.transpose(op)
    return im


PIL_FLAG_DEFAULTS = {"LOAD_TRUNCATED_IMAGES": False}  # PIL.ImageFile globals the decode policy depends on


def reset_pil_flags() -> dict[str, object]:
    """Put PIL's process-wide ``ImageFile`` flags back to their defaults (:data:`PIL_FLAG_DEFAULTS`).

    Another module (model code, a notebook) may set ``ImageFile.LOAD_TRUNCATED_IMAGES = True``, which makes PIL
    decode a truncated image with grey fill instead of failing. Every decode calls this first; the build also calls
    it at start and records what it found in the manifest (``pil_flags_reset``).

    Returns:
        ``{flag: value found}`` for each flag that was not at its default (empty when all were); logged.
    """
    found: dict[str, object] = {}
    for name, default in PIL_FLAG_DEFAULTS.items():
        value = getattr(ImageFile, name)
        if value != default:
            found[name] = value
            setattr(ImageFile, name, default)
    if found:
        _logger.warning("PIL flags %s were changed by some import: reset to the defaults %s", found, PIL_FLAG_DEFAULTS)
    return found


def decode_image_with_header(data: bytes, *, policy: DecodePolicy) -> tuple[Image.Image, ImageHeader]:
    """:func:`decode_image` that also returns the source header (format, mode, size before EXIF rotation)."""
    im = _open(data)
    header = ImageHeader(format=str(im.format), mode=im.mode, width=im.size[0], height=im.size[1])
    _check_limits(header.width, header.height, policy)
    reset_pil_flags()  # a truncated image must fail here, never decode with grey fill
    try:
        im.load()
        if policy.exif_transpose:
            im = apply_exif_orientation(im)
        rgb = to_rgb(im, background=policy.background)
    except Exception as err:  # truncated or corrupt pixel data, unsupported mode conversion
        raise SampleSkip(
            "decode_error", f"{header.format} {header.mode} {header.width}x{header.height}: {type(err).__name__}: {err}"
        ) from err
    return rgb, header


def decode_image(data: bytes, *, policy: DecodePolicy) -> Image.Image:
    """Decode image file bytes to an 8-bit RGB PIL image: the one decode path of every phase.

    Sizes are checked from the header before decoding; alpha is composited onto ``policy.background``; EXIF
    orientation is applied when ``policy.exif_transpose``; 16-bit grey is scaled, not clipped (module docstring).

    Args:
        data: encoded image file bytes (JPEG, PNG, WebP, GIF, BMP, TIFF, PPM, ...).
        policy: limits, background colour and EXIF rule.
    Returns:
        ``PIL.Image.Image`` in mode ``RGB`` (uint8 per channel), EXIF-rotated when the policy says so.
    Raises:
        SampleSkip: reason ``decode_error``, ``too_many_pixels`` or ``extreme_aspect``, with a detail.
    """
    return decode_image_with_header(data, policy=policy)[0]
