"""Karpathy-split JSON importer (COCO, Flickr30k, Flickr8k ``dataset_*.json``) plus an image root, to shards.

Input: ``{"images": [{"filepath"?: "val2014", "filename": "...jpg", "split": "train|val|test|restval",
"sentences": [{"raw": "..."}, ...], "imgid": int, "cocoid"?: int}, ...]}``. The image is
``ROOT/filepath/filename`` (``ROOT/filename`` without ``filepath``). Each image becomes **one** sample holding all
of its cleaned captions, in order (any number, 1..n); ``restval`` counts as ``train`` (as in the Karpathy
splits' common use: "train + restval" = 113k COCO training images). Keys are the file name without extension, made
WebDataset-safe (:func:`mcad_cache.data.importers.make_key`). Order: the JSON's order.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mcad_cache.data.captions import clean_caption
from mcad_cache.data.importers import ImportItem, ImportReport, make_key, register_importer
from mcad_cache.errors import DataSourceError

SPLIT_ALIASES = {"train": "train", "restval": "train", "val": "val", "test": "test"}


def load_karpathy(annotations: str | Path, *, root: str | Path, report: ImportReport) -> list[ImportItem]:
    """Read a Karpathy JSON into import items; images without a usable caption are dropped into ``report``.

    Raises:
        DataSourceError: the file cannot be read, is not JSON, or has no ``images`` list.
    """
    try:
        doc = json.loads(Path(annotations).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataSourceError(f"karpathy: cannot read {annotations}: {err}") from err
    images = doc.get("images") if isinstance(doc, dict) else None
    if not isinstance(images, list):
        raise DataSourceError(f"karpathy: {annotations} has no 'images' list (keys: {list(doc)[:10]})")
    root = Path(root)
    items: list[ImportItem] = []
    for i, img in enumerate(images):
        report.num_candidates += 1
        filename = str(img.get("filename", ""))
        key = make_key(Path(filename).stem) if filename else f"item_{i}"
        split = SPLIT_ALIASES.get(str(img.get("split", "")))
        if split is None:
            report.drop("unknown_split", key, f"split {img.get('split')!r}")
            continue
        if not filename:
            report.drop("missing_image", key, "no 'filename'")
            continue
        sentences = img.get("sentences") or []
        if isinstance(sentences, str):  # one caption as a bare string: never split it into characters
            sentences = [sentences]
        if not isinstance(sentences, list):
            report.drop("bad_schema", key, f"'sentences' is a {type(sentences).__name__}, not a list")
            continue
        raws = [s.get("raw") if isinstance(s, dict) else s for s in sentences]
        captions = [c for c in (clean_caption(r) for r in raws) if c is not None]
        if not captions:
            report.drop("empty_caption" if raws else "missing_caption", key, f"{len(raws)} sentence(s)")
            continue
        meta: dict[str, Any] = {"source": "karpathy", "filename": filename, "split": img.get("split")}
        for id_field in ("imgid", "cocoid"):
            if id_field in img:
                meta[id_field] = img[id_field]
        path = root / str(img.get("filepath", "")) / filename
        items.append(ImportItem(key=key, split=split, captions=captions, image_path=path, meta=meta))
    return items


@register_importer("karpathy", needs=("annotations", "root"), summary="Karpathy-split dataset_*.json + image root")
def import_karpathy(*, root: str, annotations: str, seed: int, report: ImportReport) -> list[ImportItem]:
    """Registry entry: :func:`load_karpathy` (``seed`` unused: the JSON names the splits)."""
    return load_karpathy(annotations, root=root, report=report)
