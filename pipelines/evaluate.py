"""``mcad-cache eval`` and ``mcad-cache compare``: image-text retrieval R@1/5/10 and RSUM (docs/eval.md).

What ``--model`` can be:

- a distill run directory (its ``final/`` student) or a student checkpoint folder (``student_config.json``);
- a cache directory built on the **test** shards: its cached embeddings are evaluated, no model is run
  (single-stream caches: ITC top-k re-ranked by the cached ITM logits, ``k_test <= `` the cache's k);
- with ``--teacher clip|albef|blip``: the teacher's model argument (``--pretrained`` its weights), built with
  ``create_teacher``; single-stream teachers are ranked by ITC top-``k_test`` then ITM re-ranking.

Each model is run with its own preprocessing and tokenizer.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch.utils.data import DataLoader

from mcad_cache.cache import check_cache, open_cache
from mcad_cache.config import EvalConfig, config_to_dict
from mcad_cache.data.transforms import make_image_transform
from mcad_cache.data.truncation import token_lengths, truncation_stats
from mcad_cache.data.webdataset import SampleDataset, collate_samples, expand_shards
from mcad_cache.distill import check_cache_data
from mcad_cache.distill import rundir as rd
from mcad_cache.errors import CacheCorruptError, ConfigError, DataSourceError, RunDirError
from mcad_cache.eval import (
    ITM_SCORES,
    encode_retrieval_set,
    evaluate_cache,
    evaluate_dual,
    evaluate_single_stream,
)
from mcad_cache.metrics import METRIC_KEYS
from mcad_cache.preflight import check_input_file, check_writable_file, looks_like_path
from mcad_cache.progress import no_progress
from mcad_cache.runtime import resolve_device, resolve_precision
from mcad_cache.student import DualEncoder
from mcad_cache.teachers import create_teacher, list_teachers

_logger = logging.getLogger(__name__)
T = TypeVar("T")

EVAL_FILE = "eval.json"


def resolve_model_kind(config: EvalConfig) -> tuple[str, Path | None]:
    """``("teacher", None)``, ``("student", checkpoint folder)`` or ``("cache", cache folder)``.

    Raises:
        RunDirError: ``model`` is neither a run dir, a student checkpoint nor a cache (and no ``teacher``).
    """
    if config.teacher:
        return "teacher", None
    path = Path(config.model)
    student = rd.find_student(path)
    if student is not None:
        return "student", student
    if (path / "zarr.json").is_file():
        return "cache", path
    raise RunDirError(
        f"--model {config.model!r}: not a distill run dir (no {rd.FINAL_DIR}/{rd.STUDENT_CONFIG}), a student "
        f"checkpoint ({rd.STUDENT_CONFIG}) or a cache (zarr.json); to evaluate a teacher pass "
        f"--teacher {' | '.join(list_teachers())}"
    )


def _default_out(config: EvalConfig, kind: str, folder: Path | None, shards: list[str]) -> Path:
    """``--out``, else a file named by model, weights and data fingerprint (``rundir.eval_result_path``)."""
    if config.out:
        return Path(config.out)
    return rd.eval_result_path(
        kind=kind, model=config.model, teacher=config.teacher, pretrained=config.pretrained, shards=shards,
        student_folder=folder,
    )  # fmt: skip


def _batches(shards: list[str], model: Any, config: EvalConfig) -> DataLoader:
    dataset = SampleDataset(shards, image_transform=make_image_transform(model.preprocess_cfg))
    return DataLoader(dataset, batch_size=config.batch_size, num_workers=config.workers, collate_fn=collate_samples)


def _truncation(model: Any, captions: list[str]) -> dict[str, Any]:
    """The evaluated model's truncation counts over the test captions (``data.truncation``); logged when any is cut."""
    context = int(model.tokenizer_cfg.get("context_length") or 0)
    lengths = token_lengths(getattr(model, "tokenizer", None), captions) if context > 0 else None
    if lengths is None:
        return {}
    stats = truncation_stats(lengths, context_length=context)
    if stats["num_truncated"]:
        _logger.warning(
            "%d of %d test captions (%.1f%%) are longer than the model's context of %d tokens and are cut",
            stats["num_truncated"], stats["num_captions"], 100 * stats["share_truncated"], context,
        )  # fmt: skip
    return stats


def run(config: EvalConfig, *, progress: Callable[..., Iterable[Any]] = no_progress) -> dict[str, Any]:
    """Evaluate one model on the test shards; write and return the results.

    Returns:
        ``{"model", "kind", "data", "metrics", "protocol", "notices", "elapsed_s", "out", "config"}``; metrics in
        percent (``i2t_R@1`` ... ``rsum``).
    Raises:
        RunDirError: ``model`` is not a run dir, checkpoint or cache; ConfigError: bad options;
        CacheIncompleteError / CacheMismatchError: a cache that is partial or not built on the test shards;
        CacheCorruptError: a cache that fails the cheap checks of ``inspect --check``;
        DataSourceError: ``--data`` matches no shard; OutputPathError: ``--out`` cannot be written (checked first);
        InputPathError: a ``--pretrained`` path that does not exist; DeviceError: the device is not available;
        DataError: an unreadable test sample (evaluation never skips).
    """
    if config.itm_score not in ITM_SCORES:
        raise ConfigError(f"--itm-score must be one of {' | '.join(ITM_SCORES)}, got {config.itm_score!r}")
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    try:
        shards = expand_shards(config.data)
    except ValueError as err:
        raise DataSourceError(f"--data: {err}; check the test shard paths") from err
    kind, folder = resolve_model_kind(config)
    out_path = _default_out(config, kind, folder, shards)
    check_writable_file(out_path, option="--out")  # before any metric is computed
    if kind == "teacher" and config.pretrained and looks_like_path(config.pretrained):
        check_input_file(config.pretrained, option="--pretrained", allow_dir=True)
    device = resolve_device(config.device)
    try:
        resolve_precision(config.precision, device)
    except ValueError as err:
        raise ConfigError(f"--precision: {err}") from err
    t0 = time.perf_counter()
    extra: dict[str, Any] = {}
    if kind == "cache":
        assert folder is not None
        reader = open_cache(folder).require(complete=True)
        check_cache_data(reader, shards)
        problems = check_cache(reader, fused=False)  # the cheap checks of `inspect --check`
        if problems:
            raise CacheCorruptError(
                f"--model {folder}: the cache fails {len(problems)} consistency check(s): {'; '.join(problems[:3])}; "
                f"see `mcad-cache inspect {folder} --check`, then rebuild it (build --overwrite)"
            )
        result = evaluate_cache(reader, k_test=config.k_test, score=config.itm_score, chunk_size=config.chunk_size)
        extra = {"teacher": reader.teacher, "teacher_kind": reader.kind, "cache_k": reader.k}
    else:
        if kind == "student":
            model: Any = DualEncoder.load(folder, map_location=device).eval()
            extra = {"student": model.config.name}
        else:
            model = create_teacher(
                config.teacher, model=config.model or None, pretrained=config.pretrained or None, device=device
            ).eval()
            extra = {"teacher": config.teacher, "teacher_kind": model.kind}
        rs = encode_retrieval_set(
            model, progress((b for b in _batches(shards, model, config)), "encode", None), precision=config.precision
        )
        extra["truncation"] = _truncation(model, rs.captions)
        if kind == "teacher" and model.kind == "single":
            result = evaluate_single_stream(
                model, rs, (b for b in _batches(shards, model, config)), k_test=config.k_test, score=config.itm_score,
                chunk_size=config.chunk_size, precision=config.precision, progress=progress,
            )  # fmt: skip
        else:
            result = evaluate_dual(rs, chunk_size=config.chunk_size, device=device)
            result["notices"] = []
    results = {
        "model": config.model or config.teacher,
        "kind": kind,
        **extra,
        "data": shards,
        "metrics": result["metrics"],
        "protocol": result["protocol"],
        "notices": result.get("notices", []),
        "elapsed_s": time.perf_counter() - t0,
        "device": str(device),
        "out": str(out_path),
        "config": config_to_dict(config),
    }
    proto = result["protocol"]
    _logger.info(
        "protocol: %d images, %d captions (%d-%d per image), score: %s, ties: pessimistic",
        proto["num_images"], proto["num_captions"], proto["captions_per_image"]["min"],
        proto["captions_per_image"]["max"], proto["score"],
    )  # fmt: skip
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(results, indent=2) + "\n")
    if kind == "student" and not config.out and folder is not None:  # RUN/eval.json: the latest, for `compare RUN`
        (rd.run_dir_of(folder) / EVAL_FILE).write_text(json.dumps(results, indent=2) + "\n")
    return results


def load_results(paths: Iterable[str]) -> list[dict[str, Any]]:
    """Results for ``compare``: each path is an eval JSON, or a run dir holding ``eval.json`` (its
    ``summary.json`` adds the preset and steps).

    Raises:
        RunDirError: a path with no results, or a JSON without metrics.
    """
    rows = []
    for p in paths:
        path = Path(p)
        file = path / EVAL_FILE if path.is_dir() else path
        if not file.is_file():
            raise RunDirError(
                f"{p}: no results (expected an eval JSON or a run dir with {EVAL_FILE}; run "
                "`mcad-cache eval --model RUN --data TEST_SHARDS` first)"
            )
        data = json.loads(file.read_text())
        if "metrics" not in data or not all(k in data["metrics"] for k in METRIC_KEYS):
            raise RunDirError(f"{file}: not an eval result (no {list(METRIC_KEYS)} under 'metrics')")
        summary = rd.read_summary(path if path.is_dir() else file.parent)
        if summary is not None:
            data.setdefault("preset", summary.get("preset"))
            data.setdefault("steps", summary.get("steps"))
        data["name"] = str(p)
        rows.append(data)
    return rows


__all__ = ["EVAL_FILE", "load_results", "resolve_model_kind", "run"]
