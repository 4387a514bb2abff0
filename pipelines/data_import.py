"""``mcad-cache data import``: a captioned image source to WebDataset shards (docs/data.md).

Writes ``OUT/<split>/shard-%06d.tar``, ``OUT/index.json`` (per-shard sha256 and sample counts, the resolved config)
and ``OUT/import_report.json`` (kept and dropped per reason with examples, per split, captions per image, time).
Sources are the importer registry (``mcad_cache.data.importers.list_importers()``): ``karpathy``
(``--annotations dataset_coco.json --root IMAGE_ROOT``), ``folder`` (``--annotations captions.jsonl|csv --root
IMAGE_FOLDER``) and, once the demo app is imported (the CLI does), ``openclipart`` (fetched with apt-get/dpkg).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from mcad_cache.config import ImportConfig, config_to_dict
from mcad_cache.data.decode import DecodePolicy
from mcad_cache.data.importers import (
    ImportReport,
    check_import_report,
    first_n,
    get_importer,
    list_importers,
    write_index,
    write_items,
)
from mcad_cache.errors import ConfigError
from mcad_cache.preflight import check_input_file, check_writable_dir
from mcad_cache.progress import no_progress

_logger = logging.getLogger(__name__)

REPORT_FILE = "import_report.json"
__all__ = ["REPORT_FILE", "list_importers", "run"]  # list_importers: for the CLI's --source help


def run(config: ImportConfig, *, progress: Callable[..., Iterable[Any]] = no_progress) -> dict[str, Any]:
    """Import ``config.source`` into shards under ``config.out``; returns the import report (also written to disk).

    Raises:
        UnknownImporterError: no importer is registered under ``config.source``.
        ConfigError: a field the importer needs (``--annotations``, ``--root``) is empty, or a size is negative.
        InputPathError: ``--annotations`` does not exist.
        OutputPathError: ``--out`` is a file, lies under a file, or cannot be written.
        DataSourceError: the source cannot be fetched or read, or the import kept nothing or dropped more than
            ``max_drop_share`` of the candidates (the message names the likely cause; the report is still written).
    """
    importer = get_importer(config.source)
    missing = [f"--{name}" for name in importer.needs if not getattr(config, name)]
    if missing:
        raise ConfigError(f"--source {config.source} needs {' and '.join(missing)}")
    if not 0.0 <= config.max_drop_share <= 1.0:
        raise ConfigError(f"max_drop_share must be in [0, 1] (got {config.max_drop_share}); e.g. 0.5")
    if config.samples_per_shard <= 0 or config.image_size_px < 0 or config.max_samples < 0:
        raise ConfigError(
            f"--samples-per-shard must be > 0 (got {config.samples_per_shard}), --image-size-px and --max-samples "
            f">= 0 (got {config.image_size_px}, {config.max_samples})"
        )
    if config.annotations:
        check_input_file(config.annotations, option="--annotations")
    start = time.perf_counter()
    out = check_writable_dir(config.out, option="--out")
    policy = DecodePolicy()
    report = ImportReport(source=config.source)
    items = importer.load(root=config.root, annotations=config.annotations, seed=config.seed, report=report)
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
    check_import_report(report, max_drop_share=config.max_drop_share, root=config.root, out=out)
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
