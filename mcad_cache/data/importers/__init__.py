"""Importers that turn a captioned image source into WebDataset shards, plus what they share.

Every importer writes ``OUT/<split>/shard-%06d.tar`` with ``webdataset.ShardWriter`` (members ``KEY.<jpg|png>`` and
``KEY.json`` = ``{"captions": [...], ...}``), in a deterministic order with tar mtimes fixed to 0, so the same input
and config give byte-identical shards; then ``OUT/index.json`` (per-shard sha256 and sample counts) and
``OUT/import_report.json`` (what was kept and dropped, and why). See ``docs/data.md``.

Importers are a registry (:func:`register_importer`, :func:`get_importer`, :func:`list_importers`): ``karpathy`` and
``folder`` are built in (registered on first lookup); the demo app registers ``openclipart`` when
``mcad_cache.demo`` is imported. A new importer is one module with one ``@register_importer`` function.
"""

from __future__ import annotations

import hashlib
import importlib
import io
import json
import logging
import re
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import webdataset as wds
from PIL import Image

from mcad_cache.data.decode import (
    DecodePolicy,
    apply_exif_orientation,
    decode_image,
    open_checked,
    reset_pil_flags,
    to_rgb,
)
from mcad_cache.data.skips import SampleSkip
from mcad_cache.errors import DataSourceError, OutputPathError, UnknownImporterError
from mcad_cache.hashing import file_sha256
from mcad_cache.progress import no_progress

_logger = logging.getLogger(__name__)

INDEX_FORMAT = "mcad-cache-shards"
INDEX_VERSION = 1
SHARD_PATTERN = "shard-%06d.tar"
_LOSSLESS_FORMATS = {"PNG", "GIF", "BMP", "TIFF", "PPM", "WEBP_LOSSLESS"}
_EXT_OF_FORMAT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tif", "PPM": "ppm"}


def make_key(text: str) -> str:
    """A WebDataset-safe ``__key__``: runs of characters other than ``A-Z a-z 0-9 _ -`` become one ``_``.

    Keys must not contain dots (WebDataset splits a member name at the first dot of its file name) or slashes.
    """
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_") or "_"


def split_of(group: str, *, seed: int, test_fraction: float, val_fraction: float) -> str:
    """Deterministic split from a hash of ``f"{seed}:{group}"``: "test", "val" or "train".

    ``u = int(sha256(...)[:16], 16) / 2**64`` is uniform in [0, 1); ``u < test_fraction`` is test, the next
    ``val_fraction`` is val. Everything in one group lands in one split.
    """
    u = int(hashlib.sha256(f"{seed}:{group}".encode()).hexdigest()[:16], 16) / 2.0**64
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


def reencode_image(data: bytes, *, max_side_px: int, policy: DecodePolicy) -> tuple[bytes, str]:
    """Validate an image with the decode policy and shrink it so its longer side is at most ``max_side_px``.

    Alpha is kept (the readers composite it, ``docs/data.md``) and resized premultiplied so transparent pixels do
    not bleed dark fringes; lossless sources are written as PNG, others as JPEG quality 90. EXIF orientation is
    applied to the pixels (and the tag dropped) when the policy says so. Images are never enlarged.

    Args:
        data: encoded image bytes.
        max_side_px: longest side in pixels; 0 keeps the original bytes (after a full decode check).
        policy: the decode policy (limits, EXIF rule).
    Returns:
        (encoded bytes, file extension without dot).
    Raises:
        SampleSkip: ``decode_error``, ``too_many_pixels`` or ``extreme_aspect``.
    """
    if max_side_px <= 0:
        fmt = open_checked(data, policy=policy).format or ""
        decode_image(data, policy=policy)  # a full decode with the same path the readers use
        ext = _EXT_OF_FORMAT.get(fmt)
        if ext is None:
            raise SampleSkip("decode_error", f"format {fmt} is not stored as is; set image_size_px > 0")
        return data, ext
    im = open_checked(data, policy=policy)
    fmt = im.format
    reset_pil_flags()  # a truncated image must fail, never be stored with grey fill
    try:
        im.load()
        if policy.exif_transpose:
            im = apply_exif_orientation(im)
        has_alpha = im.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in im.info
        if has_alpha and im.mode not in ("I;16", "I;16L", "I;16B", "I", "F"):
            out = im.convert("RGBA").convert("RGBa")
            out.thumbnail((max_side_px, max_side_px), Image.Resampling.LANCZOS)
            out = out.convert("RGBA")
            lossless = True
        else:
            out = to_rgb(im, background=policy.background)
            out.thumbnail((max_side_px, max_side_px), Image.Resampling.LANCZOS)
            lossless = fmt in _LOSSLESS_FORMATS
    except SampleSkip:
        raise
    except Exception as err:  # corrupt pixel data
        raise SampleSkip("decode_error", f"{type(err).__name__}: {err}") from err
    buf = io.BytesIO()
    if lossless:
        out.save(buf, "PNG")
        return buf.getvalue(), "png"
    out.save(buf, "JPEG", quality=90)
    return buf.getvalue(), "jpg"


def previous_import_files(out_dir: str | Path) -> list[Path]:
    """The shard files an earlier import wrote into ``out_dir``: those its ``index.json`` lists, no others.

    Only paths that resolve inside ``out_dir`` and end in ``.tar`` are returned (a hand-edited index cannot make
    the importer delete anything else). No index, or one that is not an mcad-cache shard index: nothing.
    """
    out_dir = Path(out_dir)
    try:
        index = json.loads((out_dir / "index.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return []
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT or not isinstance(index.get("splits"), dict):
        return []
    root = out_dir.resolve()
    found: list[Path] = []
    for info in index["splits"].values():
        for shard in info.get("shards", []) if isinstance(info, dict) else []:
            rel = shard.get("path") if isinstance(shard, dict) else None
            if not isinstance(rel, str) or not rel.endswith(".tar"):
                continue
            path = (out_dir / rel).resolve()
            if path.is_relative_to(root) and path != root and path.is_file():
                found.append(out_dir / rel)
    return sorted(set(found))


class SplitShardWriter:
    """One ``webdataset.ShardWriter`` per split, opened on that split's first sample, into ``OUT/<split>/``.

    The shards of an earlier import into ``out_dir`` are removed at construction (only the files its
    ``OUT/index.json`` lists: :func:`previous_import_files`), so a rerun never leaves stale shards beside the new
    ones, and nothing the importer did not write is touched (a sibling dataset under the same parent survives).

    Args:
        out_dir: output folder.
        samples_per_shard: samples per tar.
    """

    def __init__(self, out_dir: str | Path, *, samples_per_shard: int) -> None:
        if samples_per_shard <= 0:
            raise ValueError(f"samples_per_shard must be > 0, got {samples_per_shard}")
        self.out_dir = Path(out_dir)
        self.samples_per_shard = samples_per_shard
        self._writers: dict[str, wds.ShardWriter] = {}
        self._counts: dict[str, Counter[str]] = {}
        stale = previous_import_files(self.out_dir)
        if stale:
            _logger.info("removing %d shard(s) of an earlier import under %s", len(stale), self.out_dir)
        for old in stale:
            old.unlink(missing_ok=True)

    def write(self, split: str, key: str, image: bytes, image_ext: str, meta: dict[str, Any]) -> None:
        """Write one sample: ``KEY.<image_ext>`` and ``KEY.json`` (``meta`` must hold ``"captions"``).

        Raises:
            OutputPathError: the split's folder already holds shard files no earlier import into ``out_dir`` wrote.
        """
        writer = self._writers.get(split)
        if writer is None:
            folder = self.out_dir / split
            foreign = sorted(folder.glob("shard-*.tar"))
            if foreign:  # not listed by an earlier import into out_dir (those were removed): never overwrite them
                raise OutputPathError(
                    f"--out {self.out_dir}: {folder} already holds {len(foreign)} shard file(s) that no earlier import "
                    f"into {self.out_dir} wrote (e.g. {foreign[0].name}); choose another --out or move them away"
                )
            folder.mkdir(parents=True, exist_ok=True)
            writer = wds.ShardWriter(
                str(folder / SHARD_PATTERN), maxcount=self.samples_per_shard, verbose=0, encoder=False, mtime=0
            )
            self._writers[split] = writer
            self._counts[split] = Counter()
        writer.write({"__key__": key, image_ext: image, "json": json.dumps(meta, ensure_ascii=False).encode()})
        self._counts[split][writer.fname] += 1

    def close(self) -> dict[str, Any]:
        """Close every writer; returns the ``splits`` part of ``index.json`` (paths relative to ``out_dir``)."""
        splits: dict[str, Any] = {}
        for split in sorted(self._writers):
            self._writers[split].close()
            shards = [
                {
                    "path": str(Path(fname).relative_to(self.out_dir)),
                    "num_samples": n,
                    "sha256": file_sha256(fname),
                    "size_bytes": Path(fname).stat().st_size,
                }
                for fname, n in sorted(self._counts[split].items())
            ]
            splits[split] = {"num_samples": sum(s["num_samples"] for s in shards), "shards": shards}
        self._writers = {}
        return splits


@dataclass
class ImportReport:
    """What an importer kept and dropped, and why (``import_report.json``)."""

    source: str
    num_candidates: int = 0
    kept_per_split: Counter[str] = field(default_factory=Counter)
    dropped: Counter[str] = field(default_factory=Counter)
    examples: dict[str, list[dict[str, str]]] = field(default_factory=dict)
    captions_per_image: Counter[int] = field(default_factory=Counter)
    extra: dict[str, Any] = field(default_factory=dict)
    max_examples: int = 5

    def keep(self, split: str, num_captions: int) -> None:
        self.kept_per_split[split] += 1
        self.captions_per_image[num_captions] += 1

    def drop(self, reason: str, key: str, detail: str = "") -> None:
        self.dropped[reason] += 1
        listed = self.examples.setdefault(reason, [])
        if len(listed) < self.max_examples:
            listed.append({"key": key, "detail": detail})
        _logger.debug("dropped %s: %s (%s)", key, reason, detail)

    @property
    def num_kept(self) -> int:
        return sum(self.kept_per_split.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "num_candidates": self.num_candidates,
            "num_kept": self.num_kept,
            "num_dropped": sum(self.dropped.values()),
            "kept_per_split": dict(sorted(self.kept_per_split.items())),
            "dropped": dict(sorted(self.dropped.items())),
            "examples": self.examples,
            "captions_per_image": {str(k): v for k, v in sorted(self.captions_per_image.items())},
            **self.extra,
        }


# Drop reason -> the likely cause, for the message of an import that kept nothing or dropped too much.
LIKELY_CAUSE = {
    "missing_image": "image files not found: is --root the folder the annotation paths are relative to?",
    "missing_caption": "no caption found: check the caption field/column names (captions | caption | sentences)",
    "empty_caption": "every caption is empty after cleaning: check the caption field/column",
    "unknown_split": "unknown split names: check the annotation schema (train | val | test | restval)",
    "bad_schema": "the annotations do not follow the importer's schema (docs/data.md)",
    "duplicate_key": "many images share one key: check the image/key field",
}


def check_import_report(report: ImportReport, *, max_drop_share: float, root: str = "", out: str | Path = "") -> None:
    """Refuse an import that kept nothing, or dropped more than ``max_drop_share`` of its candidates.

    Args:
        report: the finished import's report.
        max_drop_share: allowed share of dropped candidates, in [0, 1] (``ImportConfig.max_drop_share``).
        root, out: named in the message.
    Raises:
        DataSourceError: one line with the counts, the main drop reason with an example, and the likely cause.
    """
    dropped = sum(report.dropped.values())
    if report.num_candidates == 0:
        raise DataSourceError(
            f"import {report.source}: the annotations hold no entries; check --annotations and its schema "
            "(docs/data.md)"
        )
    share = dropped / report.num_candidates
    if report.num_kept > 0 and share <= max_drop_share:
        return
    reason, count = report.dropped.most_common(1)[0] if report.dropped else ("?", 0)
    example = (report.examples.get(reason) or [{}])[0]
    cause = LIKELY_CAUSE.get(reason, "images could not be decoded: check the image files")
    if reason == "missing_image" and root:
        cause += f" (--root {root})"
    raise DataSourceError(
        f"import {report.source}: kept {report.num_kept} of {report.num_candidates} candidates (dropped {share:.0%}, "
        f"limit max_drop_share={max_drop_share:g}); most drops: {reason} x{count}, e.g. "
        f"{example.get('key', '?')!r}: {example.get('detail', '')}; likely cause: {cause}; "
        f"report: {out}/import_report.json"
    )


def write_index(out_dir: str | Path, *, source: str, splits: dict[str, Any], config: dict[str, Any]) -> Path:
    """Write ``OUT/index.json``: format tag, source, the import config and per-split shard lists."""
    index = {"format": INDEX_FORMAT, "version": INDEX_VERSION, "source": source, "config": config, "splits": splits}
    path = Path(out_dir) / "index.json"
    path.write_text(json.dumps(index, indent=2, ensure_ascii=False) + "\n")
    return path


def first_n(items: Iterable[Any], n: int) -> Iterable[Any]:
    """The first ``n`` items (all when ``n <= 0``)."""
    for i, item in enumerate(items):
        if 0 < n <= i:
            return
        yield item


@dataclass
class ImportItem:
    """One image to import: its key, split, cleaned captions, image file and extra JSON metadata."""

    key: str
    split: str
    captions: list[str]
    image_path: Path
    meta: dict[str, Any] = field(default_factory=dict)


def _load_and_reencode(job: tuple[Path, int, DecodePolicy]) -> tuple[bytes, str] | tuple[None, str, str]:
    """Worker: read and re-encode one image; returns (bytes, ext) or (None, reason, detail). Module-level: picklable."""
    path, image_size_px, policy = job
    try:
        data = path.read_bytes()
    except OSError as err:
        return None, "missing_image", f"{path}: {err.strerror or err}"
    try:
        return reencode_image(data, max_side_px=image_size_px, policy=policy)
    except SampleSkip as skip:
        return None, skip.reason, f"{path}: {skip.detail}"


def write_items(
    items: list[ImportItem],
    *,
    out_dir: str | Path,
    samples_per_shard: int,
    image_size_px: int,
    policy: DecodePolicy,
    report: ImportReport,
    workers: int = 1,
    progress: Any = no_progress,
) -> dict[str, Any]:
    """Re-encode and write items in the given order; returns the ``splits`` part of ``index.json``.

    Items whose key was already written are dropped as ``duplicate_key``; a missing image file as ``missing_image``;
    decode problems with their :data:`mcad_cache.data.SKIP_REASONS` reason. All drops are counted in ``report``.
    With ``workers > 1`` images are re-encoded in a process pool whose results are consumed in item order, so the
    shards are byte-identical to a single-process run.
    """
    seen: set[str] = set()
    unique: list[ImportItem] = []
    for item in items:
        if item.key in seen:
            report.drop("duplicate_key", item.key, f"{item.image_path}")
        else:
            seen.add(item.key)
            unique.append(item)
    jobs = [(item.image_path, image_size_px, policy) for item in unique]
    writer = SplitShardWriter(out_dir, samples_per_shard=samples_per_shard)
    pool = ProcessPoolExecutor(max_workers=workers) if workers > 1 and len(jobs) > 1 else None
    try:
        results = pool.map(_load_and_reencode, jobs, chunksize=16) if pool else map(_load_and_reencode, jobs)
        for item, result in progress(zip(unique, results, strict=True), f"import {report.source}", len(unique)):
            if result[0] is None:
                report.drop(result[1], item.key, result[2])
                continue
            image, ext = result
            writer.write(item.split, item.key, image, ext, {"captions": item.captions, **item.meta})
            report.keep(item.split, len(item.captions))
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
        splits = writer.close()
    return splits


@dataclass(frozen=True)
class ImporterSpec:
    """One registered importer.

    Attributes:
        name: the ``--source`` value.
        load: ``load(*, root: str, annotations: str, seed: int, report: ImportReport) -> list[ImportItem]``, items in
            the importer's deterministic order (unused arguments are ignored by the importer).
        needs: ``ImportConfig`` fields that must be non-empty for this importer (``"root"``, ``"annotations"``).
        summary: one line for help strings.
    """

    name: str
    load: Callable[..., list[ImportItem]]
    needs: tuple[str, ...] = ()
    summary: str = ""


_IMPORTERS: dict[str, ImporterSpec] = {}
# Built-in importers: name -> module that registers it on import (they import this package, so not at the top).
_BUILTIN = {"karpathy": "mcad_cache.data.importers.karpathy", "folder": "mcad_cache.data.importers.folder"}


def register_importer(
    name: str, *, needs: tuple[str, ...] = (), summary: str = ""
) -> Callable[[Callable[..., list[ImportItem]]], Callable[..., list[ImportItem]]]:
    """Decorator: register ``load(*, root, annotations, seed, report) -> list[ImportItem]`` as importer ``name``.

    Raises:
        ValueError: ``name`` is already registered by another function.
    """

    def deco(fn: Callable[..., list[ImportItem]]) -> Callable[..., list[ImportItem]]:
        if name in _IMPORTERS and _IMPORTERS[name].load is not fn:
            raise ValueError(f"importer {name!r} is already registered")
        _IMPORTERS[name] = ImporterSpec(name=name, load=fn, needs=needs, summary=summary)
        return fn

    return deco


def list_importers() -> list[str]:
    """Importer names ``get_importer`` accepts (built-in ones and those registered so far), sorted."""
    return sorted(set(_IMPORTERS) | set(_BUILTIN))


def get_importer(name: str) -> ImporterSpec:
    """The registered importer ``name``.

    Raises:
        UnknownImporterError: no importer has that name; the message lists ``list_importers()``.
    """
    if name not in _IMPORTERS and name in _BUILTIN:
        importlib.import_module(_BUILTIN[name])
    if name not in _IMPORTERS:
        raise UnknownImporterError(
            f"unknown --source {name!r}; known importers: {', '.join(list_importers())}"
            + ("" if name != "openclipart" else " (openclipart is the demo's: import mcad_cache.demo first)")
        )
    return _IMPORTERS[name]
