"""The one decode path: every image mode, the alpha/EXIF policy, header-first size limits, decode errors."""

from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from mcad_cache.data.decode import DecodePolicy, decode_image, decode_image_with_header, probe_image
from mcad_cache.data.skips import SampleSkip
from tests.data_fixtures import image_bytes, png_header_only

POLICY = DecodePolicy()


def _px(im: Image.Image, xy=(0, 0)) -> tuple[int, int, int]:
    assert im.mode == "RGB"
    return im.getpixel(xy)


def test_rgb_png_is_exact():
    im = decode_image(image_bytes("RGB", (32, 24), (200, 30, 30)), policy=POLICY)
    assert im.size == (32, 24) and _px(im) == (200, 30, 30)


def test_rgba_composited_on_white_not_dropped():
    # Fully transparent black must become the background, half-transparent red must be blended with it.
    arr = np.zeros((2, 2, 4), np.uint8)
    arr[0, 1] = (255, 0, 0, 128)
    buf = io.BytesIO()
    Image.fromarray(arr, "RGBA").save(buf, "PNG")
    im, header = decode_image_with_header(buf.getvalue(), policy=POLICY)
    assert header.mode == "RGBA"
    assert _px(im, (0, 0)) == (255, 255, 255)
    r, g, b = _px(im, (1, 0))
    assert r == 255 and abs(g - 127) <= 1 and abs(b - 127) <= 1
    black = decode_image(buf.getvalue(), policy=DecodePolicy(background=(0, 0, 0)))
    assert _px(black, (0, 0)) == (0, 0, 0)


def test_la_and_l_and_bilevel():
    la = decode_image(image_bytes("LA", color=(90, 0)), policy=POLICY)
    assert _px(la) == (255, 255, 255)
    assert _px(decode_image(image_bytes("L", color=90), policy=POLICY)) == (90, 90, 90)
    assert _px(decode_image(image_bytes("1", color=1), policy=POLICY)) == (255, 255, 255)


def test_palette_with_and_without_transparency():
    im = Image.new("P", (4, 4), 1)
    im.putpalette([0, 0, 0, 12, 34, 56] + [0] * 762)
    im.putpixel((0, 0), 0)
    buf = io.BytesIO()
    im.save(buf, "PNG")
    opaque = decode_image(buf.getvalue(), policy=POLICY)
    assert _px(opaque, (1, 1)) == (12, 34, 56) and _px(opaque, (0, 0)) == (0, 0, 0)
    buf = io.BytesIO()
    im.save(buf, "PNG", transparency=0)
    im2, header = decode_image_with_header(buf.getvalue(), policy=POLICY)
    assert header.mode == "P"
    assert _px(im2, (0, 0)) == (255, 255, 255) and _px(im2, (1, 1)) == (12, 34, 56)


def test_grey_with_transparency_entry_is_composited():
    buf = io.BytesIO()
    Image.new("L", (4, 4), 7).save(buf, "PNG", transparency=7)
    assert _px(decode_image(buf.getvalue(), policy=POLICY)) == (255, 255, 255)


def test_sixteen_bit_is_scaled_not_clipped():
    arr = np.array([[0, 257, 32768, 65535, 1000]], dtype=np.uint16)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    im, header = decode_image_with_header(buf.getvalue(), policy=POLICY)
    assert header.mode == "I;16"
    got = [im.getpixel((x, 0))[0] for x in range(5)]
    assert got == [0, 1, 128, 255, 4]  # round(v / 257); clipping would give 255 for 1000


def test_cmyk_jpeg():
    data = image_bytes("CMYK", color=(255, 0, 0, 0), fmt="JPEG", quality=100)
    im, header = decode_image_with_header(data, policy=POLICY)
    assert header.mode == "CMYK"
    r, g, b = _px(im)
    assert r <= 2 and g >= 253 and b >= 253  # cyan


def test_exif_orientation_applied_by_policy():
    im = Image.new("RGB", (40, 20), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    buf = io.BytesIO()
    im.save(buf, "JPEG", exif=exif.tobytes())
    assert decode_image(buf.getvalue(), policy=POLICY).size == (20, 40)
    assert decode_image(buf.getvalue(), policy=DecodePolicy(exif_transpose=False)).size == (40, 20)


def test_limits_checked_from_header_before_decoding(monkeypatch):
    # The PNG below has no pixel data: only a header read can say "too many pixels" instead of "decode error",
    # and PIL's own global guard is switched off to show the check is ours.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    with pytest.raises(SampleSkip) as err:
        decode_image(png_header_only(60_000, 60_000), policy=POLICY)
    assert err.value.reason == "too_many_pixels"
    with pytest.raises(SampleSkip) as err:
        decode_image(image_bytes("RGB", (40, 40)), policy=DecodePolicy(max_pixels=1000))
    assert err.value.reason == "too_many_pixels"
    with pytest.raises(SampleSkip) as err:
        decode_image(png_header_only(2000, 50), policy=POLICY)
    assert err.value.reason == "extreme_aspect"
    assert probe_image(png_header_only(2000, 50)).width == 2000


def test_pil_global_guard_is_reported_as_too_many_pixels(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(SampleSkip) as err:
        decode_image(image_bytes("RGB", (40, 40)), policy=POLICY)
    assert err.value.reason == "too_many_pixels"


@pytest.mark.parametrize("data", [b"not an image", image_bytes("RGB", (64, 64), fmt="PNG")[:60], b""])
def test_corrupt_bytes_are_decode_errors(data):
    with pytest.raises(SampleSkip) as err:
        decode_image(data, policy=POLICY)
    assert err.value.reason == "decode_error"


def test_truncated_jpeg_is_decode_error():
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    with pytest.raises(SampleSkip) as err:
        decode_image(buf.getvalue()[: len(buf.getvalue()) // 2], policy=POLICY)
    assert err.value.reason == "decode_error"


def test_policy_validation_and_dict():
    with pytest.raises(ValueError):
        DecodePolicy(max_aspect=0.5)
    assert DecodePolicy().to_dict()["background"] == [255, 255, 255]


def test_importing_the_package_leaves_pil_globals_alone():
    code = (
        "import importlib, pkgutil\n"
        "from PIL import Image, ImageFile\n"
        "before = (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES)\n"
        "import mcad_cache\n"
        "for m in pkgutil.walk_packages(mcad_cache.__path__, 'mcad_cache.'):\n"
        "    try:\n"
        "        importlib.import_module(m.name)\n"
        "    except ImportError:\n"
        "        pass\n"
        "after = (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES)\n"
        "assert before == after, (before, after)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize(
    ("mode", "values", "expected"),
    [("I", [0, 257, 65535, 70000, -5], [0, 1, 255, 255, 0]), ("F", [0.0, 0.5, 1.0, 2.0, -1.0], [0, 128, 255, 255, 0])],
)
def test_int32_and_float_tiff(mode, values, expected):
    dtype = np.int32 if mode == "I" else np.float32
    buf = io.BytesIO()
    Image.fromarray(np.array([values], dtype=dtype), mode=mode).save(buf, "TIFF")
    im, header = decode_image_with_header(buf.getvalue(), policy=POLICY)
    assert header.mode == mode
    assert [im.getpixel((x, 0)) for x in range(5)] == [(v, v, v) for v in expected]
