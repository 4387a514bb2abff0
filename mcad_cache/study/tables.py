"""The frozen-tower tables of a study (``--frozen-towers``): encoded once per split, saved in ``<out>/tables/`` and
reused by every run and every rerun made from the same student towers, shards (and stored views).

- ``tables/data.pt``, ``test.pt``, ``val.pt``: canonical image and caption features (``study.frozen.encode_frozen``).
- ``tables/data-views.pt``: the train table plus the features of every stored view of the dual-stream cache
  (``study.frozen.encode_views``, V x the image pass), made only when an arm replays views (issue 16).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mcad_cache.cache import open_cache
from mcad_cache.config import DistillConfig
from mcad_cache.data.webdataset import expand_shards
from mcad_cache.distill.views import StoredViews, stored_view_params
from mcad_cache.hashing import state_dict_sha256
from mcad_cache.progress import ProgressFn, no_progress
from mcad_cache.runtime import resolve_device
from mcad_cache.student import create_student
from mcad_cache.study import frozen
from mcad_cache.study.config import StudyConfig
from mcad_cache.study.frozen import FeatureTable, load_table, save_table

SPLITS = ("data", "test", "val")  # StudyConfig fields naming the train, test and val shards


def stored_views(caches: Sequence[str]) -> StoredViews | None:
    """``key -> int32 [V, 5]`` of the dual-stream cache among ``caches`` that holds views, else None."""
    for path in caches:
        reader = open_cache(path)
        if reader.kind == "dual" and reader.manifest.get("views"):
            return stored_view_params(reader)
    return None


def replays_views(runs: Sequence[DistillConfig], params: StoredViews | None) -> bool:
    """True when a run may replay stored views: the cache holds some and a run does not ask for ``augment=none``
    (``distill.views.attach_views`` decides the rest, and refuses a spec the cache does not hold)."""
    return params is not None and any(r.augment.strip() != "none" for r in runs)


def frozen_tables(
    config: StudyConfig,
    out: str | Path,
    *,
    views: bool = False,
    progress: ProgressFn = no_progress,
) -> dict[str, FeatureTable]:
    """The train (``"data"``), test (and val) tables: loaded from ``out/tables/`` when made from the same student
    towers and shards (and view params), else encoded and saved. The towers are those of the student created with
    seed 0 (pretrained towers do not depend on the seed; the fingerprint holds their weights' sha256).

    Args:
        config: the study (student, shards, caches, batch size, workers, precision, device).
        out: the study folder.
        views: also encode every stored view of the train images (``data`` then has ``image_feat_views``).
    Raises:
        DataError: an unreadable sample; what ``create_student`` and ``open_cache`` raise.
    """
    out = Path(out)
    torch.manual_seed(0)
    reference = create_student(config.student).to(resolve_device(config.device))
    towers = {k: v for k, v in reference.state_dict().items() if not k.startswith(("image_proj", "text_proj"))}
    student_fp = {"config": reference.config.to_dict(), "towers_sha256": state_dict_sha256(towers)}
    encode: dict[str, Any] = dict(
        batch_size=config.eval_batch_size, workers=config.workers, precision=config.precision, progress=progress
    )
    tables: dict[str, FeatureTable] = {}
    for split in SPLITS:
        shards = expand_shards(getattr(config, split)) if getattr(config, split) else []
        if not shards:
            continue
        fp = {"student": student_fp, "shards": [(p, Path(p).stat().st_size) for p in shards]}
        path = out / "tables" / f"{split}.pt"
        table = load_table(path, fingerprint=fp)
        if table is None:
            table = frozen.encode_frozen(reference, shards, description=f"frozen towers ({split})", **encode)
            save_table(table, path, fingerprint=fp)
        params = stored_views(config.cache) if split == "data" and views else None
        if params is not None:
            sha = hashlib.sha256(np.ascontiguousarray(params.params).tobytes()).hexdigest()
            fp_views = {**fp, "view_params_sha256": sha, "view_keys": sorted(params.rows)[:3] + [len(params)]}
            path_views = out / "tables" / f"{split}-views.pt"
            with_views = load_table(path_views, fingerprint=fp_views)
            if with_views is None:
                feats = frozen.encode_views(reference, shards, table, params, **encode)
                with_views = dataclasses.replace(table, image_feat_views=feats)
                save_table(with_views, path_views, fingerprint=fp_views)
            table = with_views
        tables[split] = table
    return tables


__all__ = ["SPLITS", "frozen_tables", "replays_views", "stored_views"]
