"""Image folder + captions file (JSONL or CSV) importer.

JSONL: one object per line, ``{"image": "rel/path.jpg", "captions": [...]}``; the image field may also be called
``file``, ``filename`` or ``path``; captions may be ``captions`` (list or one string, never split into characters)
or ``caption``; optional ``split`` (default ``train``) and ``key`` (default: the relative path without extension,
made WebDataset-safe). CSV: a header row with the same column names; several rows for one image are merged (their
captions appended in file order). Order: first appearance in the file.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from mcad_cache.data.captions import clean_caption
from mcad_cache.data.importers import ImportItem, ImportReport, make_key, register_importer
from mcad_cache.errors import DataSourceError

IMAGE_FIELDS = ("image", "file", "filename", "path")
CAPTION_FIELDS = ("captions", "caption")


def _records(path: Path) -> list[dict[str, Any]]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise DataSourceError(f"folder: cannot read {path}: {err}") from err
    if path.suffix.lower() == ".csv":
        return list(csv.DictReader(io.StringIO(text, newline="")))
    records = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataSourceError(f"folder: {path} line {n} is not JSON: {err}") from err
        if not isinstance(value, dict):
            raise DataSourceError(f"folder: {path} line {n} is not a JSON object")
        records.append(value)
    return records


def load_folder(annotations: str | Path, *, root: str | Path, report: ImportReport) -> list[ImportItem]:
    """Read a captions JSONL/CSV into import items (merging rows of one image); drops go into ``report``.

    Raises:
        DataSourceError: unreadable file, invalid JSON line, or no image field in the records.
    """
    records = _records(Path(annotations))
    root = Path(root)
    by_image: dict[str, ImportItem] = {}
    raw_counts: dict[str, int] = {}
    for rec in records:
        image = next((str(rec[f]) for f in IMAGE_FIELDS if rec.get(f)), None)
        if image is None:
            raise DataSourceError(f"folder: a record of {annotations} has none of the fields {IMAGE_FIELDS}: {rec}")
        value = next((rec[f] for f in CAPTION_FIELDS if f in rec), None)
        values = value if isinstance(value, list) else ([] if value is None else [value])
        item = by_image.get(image)
        if item is None:
            key = make_key(str(rec.get("key") or Path(image).with_suffix("")).replace("/", "__"))
            item = ImportItem(
                key=key,
                split=str(rec.get("split") or "train"),
                captions=[],
                image_path=root / image,
                meta={"source": "folder", "image": image},
            )
            by_image[image] = item
            raw_counts[image] = 0
        raw_counts[image] += len(values)
        item.captions += [c for c in (clean_caption(v) for v in values) if c is not None]
    items = []
    for image, item in by_image.items():
        report.num_candidates += 1
        if not item.captions:
            report.drop(
                "empty_caption" if raw_counts[image] else "missing_caption",
                item.key,
                f"{raw_counts[image]} caption value(s)",
            )
            continue
        items.append(item)
    return items


@register_importer("folder", needs=("annotations", "root"), summary="captions .jsonl/.csv + image folder")
def import_folder(*, root: str, annotations: str, seed: int, report: ImportReport) -> list[ImportItem]:
    """Registry entry: :func:`load_folder` (``seed`` unused: the records name the splits)."""
    return load_folder(annotations, root=root, report=report)
