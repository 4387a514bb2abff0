"""``mcad-cache data import``: a captioned image source to WebDataset shards (docs/data.md).

Writes ``OUT/<split>/shard-%06d.tar``, ``OUT/index.json`` (per-shard sha256 and sample counts, the resolved config)
and ``OUT/import_report.json`` (kept and dropped per reason with examples, per split, captions per image, time).
Sources: ``openclipart`` (fetched with apt-get/dpkg into ``root`` when absent, default ``.work/openclipart``),
``karpathy`` (``--annotations dataset_coco.json --root IMAGE_ROOT``), ``folder`` (``--annotations captions.jsonl|csv
--root IMAGE_FOLDER``).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from mcad_cache.config import ImportConfig, config_to_dict
from mcad_cache.data.decode import DecodePolicy
from mcad_cache.data.importers import ImportReport, first_n, write_index, write_items
from mcad_cache.data.importers.folder import load_folder
from mcad_cache.data.importers.karpathy import load_karpathy
from mcad_cache.data.importers.openclipart import load_openclipart
from mcad_cache.progress import no_progress

_logger = logging.getLogger(__name__)

SOURCES = ("openclipart", "karpathy", "folder")
DEFAULT_OPENCLIPART_ROOT = ".work/openclipart"
REPORT_FILE = "import_report.json"


def run(config: ImportConfig, *, progress: Callable[..., Iterable[Any]] = no_progress) -> dict[str, Any]:
    """Import ``config.source`` into shards under ``config.out``; returns the import report (also written to disk).

    Raises:
        ValueError: unknown source, missing ``--annotations``/``--root`` for karpathy/folder, bad sizes.
        DataSourceError: the source cannot be fetched or read.
    """
    if config.source not in SOURCES:
        raise ValueError(f"unknown source {config.source!r}; expected one of {SOURCES}")
    if config.source != "openclipart" and not (config.annotations and config.root):
        raise ValueError(f"source {config.source!r} needs --annotations and --root")
    if config.samples_per_shard <= 0 or config.image_size_px < 0 or config.max_samples < 0:
        raise ValueError("samples_per_shard must be > 0, image_size_px and max_samples >= 0")
    start = time.perf_counter()
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    policy = DecodePolicy()
    report = ImportReport(source=config.source)
    if config.source == "openclipart":
        items = load_openclipart(config.root or DEFAULT_OPENCLIPART_ROOT, seed=config.seed, report=report)
    elif config.source == "karpathy":
        items = load_karpathy(config.annotations, root=config.root, report=report)
    else:
        items = load_folder(config.annotations, root=config.root, report=report)
    if config.max_samples:
        report.extra["max_samples"] = config.max_samples
        report.extra["num_not_taken"] = max(0, len(items) - config.max_samples)
        items = list(first_n(items, config.max_samples))
    splits = write_items(
        items,
        out_dir=out,
        samples_per_shard=config.samples_per_shard,
        image_size_px=config.image_size_px,
        policy=policy,
        report=report,
        workers=config.workers,
        progress=progress,
    )
    config_dict = config_to_dict(config)
    write_index(out, source=config.source, splits=splits, config={**config_dict, "decode_policy": policy.to_dict()})
    result = report.to_dict()
    result["shards"] = {split: [s["path"] for s in info["shards"]] for split, info in splits.items()}
    result["time_s"] = round(time.perf_counter() - start, 2)
    (out / REPORT_FILE).write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    _logger.info(
        "imported %d of %d candidates from %s into %s in %.1f s; dropped %s",
        report.num_kept,
        report.num_candidates,
        config.source,
        out,
        result["time_s"],
        dict(report.dropped),
    )
    return result
