"""Tiny image, caption and shard builders shared by the data-layer tests (everything built in tmp_path)."""

from __future__ import annotations

import io
import json
import struct
import tarfile
import zlib
from pathlib import Path

import webdataset as wds
from PIL import Image


def image_bytes(
    mode: str = "RGB", size: tuple[int, int] = (32, 24), color=(200, 30, 30), fmt: str = "PNG", **save
) -> bytes:
    """Encode a solid image of the given PIL mode."""
    im = Image.new(mode, size, color)
    buf = io.BytesIO()
    im.save(buf, fmt, **save)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG with a valid IHDR claiming width x height, and no pixel data (a decoder would fail, a header read not)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def caption_json(*captions) -> bytes:
    return json.dumps({"captions": list(captions)}).encode()


def write_members(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """Write a tar with exactly these members in this order (for broken layouts TarWriter cannot produce)."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def write_samples(path: Path, samples: list[dict]) -> Path:
    """Write well-formed samples with webdataset.TarWriter (dicts with __key__ and ext -> bytes)."""
    with wds.TarWriter(str(path), encoder=False, mtime=0) as writer:
        for s in samples:
            writer.write(s)
    return path


def good_sample(key: str, n_captions: int = 1, mode: str = "RGB", fmt: str = "PNG") -> dict:
    ext = {"PNG": "png", "JPEG": "jpg"}[fmt]
    color = {"RGB": (10, 20, 30), "RGBA": (10, 20, 30, 255), "L": 40, "P": 3, "LA": (40, 255)}[mode]
    return {
        "__key__": key,
        ext: image_bytes(mode, color=color, fmt=fmt),
        "json": caption_json(*[f"caption {j} of {key}" for j in range(n_captions)]),
    }
