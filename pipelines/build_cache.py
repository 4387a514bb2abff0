"""``mcad-cache build``: run one teacher over WebDataset shards into a resumable Zarr v3 cache.

Passes (``docs/cache-format.md`` describes the result):

0. **layout** - read keys and captions of every shard without decoding images (shards in sorted path order, samples
   in tar order). Samples the data layer skips here (missing image or caption, bad captions, duplicate keys, split
   samples, truncated shards) get no row; their counts go into the manifest. Every other sample gets one image row
   and one text row per caption. All arrays are created with fixed shapes. (A resumed build reads the rows back from
   the store: the shards' sha256 are part of the fingerprint.)
1. **embeddings** - images through a DataLoader (workers decode, the teacher's own transform), texts from the
   captions of pass 0, batched, with autocast on CUDA. An image that fails to decode here (decode error, too many
   pixels, extreme aspect) keeps its row with ``image_valid = False`` (and its captions ``text_valid = False``),
   NaN embeddings and a skip code.
2. **top-k** - for each image the k most similar captions and for each caption the k most similar images over all
   valid rows, by the teacher's ITC cosine similarity of the *stored* embeddings (so a resumed build computes the same
   candidates), chunked, ties to the lower row. Ground-truth positives are flagged (and forced in with
   ``force_positives``).
3. **ITM** (single-stream teachers) - 3a, image-major: each image's tokens are computed once and every pair that
   involves the image is scored in both directions (i2t: its k candidate captions; t2i: every caption that lists
   it). i2t results are written per image unit; t2i results go to scratch files grouped by image. 3b, text-major:
   each text unit gathers its t2i results from the scratch files.

Resume: work is committed per unit of ``rows_per_chunk`` rows (one Zarr chunk, or several whole chunks of the
finer-chunked fused arrays, written by one writer) followed by a done marker. Rerunning the same command skips
committed units and recomputes the rest; batches never cross unit borders and are formed in row order, so a resumed
build stores the same values as an uninterrupted one. The manifest's ``complete`` flag is written last.
``rank`` / ``world_size``: unit u of every stage belongs to rank u % world_size; ranks wait for each other's done
markers between passes and rank 0 writes the final manifest. A ``flock`` on ``<out>.lock`` (``<out>.rank<r>.lock``)
keeps a second process from writing the same units.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import zarr
from torch.utils.data import DataLoader

from mcad_cache.cache.manifest import code_version, file_sha256, fingerprint_diff, format_diff, utc_now
from mcad_cache.cache.schema import BUILD_GROUP, EMB_DTYPES, FUSED_DTYPES, SCHEMA_VERSION, CacheLayout
from mcad_cache.cache.store import STAGES, CacheReader, CacheWriter, open_cache
from mcad_cache.cache.topk import chunked_topk, faiss_topk, force_positives, positives_i2t, positives_t2i
from mcad_cache.config import BuildConfig, config_to_dict
from mcad_cache.data import (
    SKIP_REASONS,
    DecodePolicy,
    SampleDataset,
    SkipReport,
    expand_shards,
    iter_samples,
)
from mcad_cache.data.transforms import image_size_hw, make_image_transform
from mcad_cache.errors import (
    BuildLockedError,
    CacheMismatchError,
    CacheSchemaError,
    DataSourceError,
    McadError,
    NonFiniteError,
)
from mcad_cache.progress import ProgressFn, no_progress
from mcad_cache.teachers import create_teacher
from mcad_cache.teachers.base import resolve_device
from mcad_cache.teachers.text_states import TextStateCache, supports_text_states

_logger = logging.getLogger(__name__)

T = TypeVar("T")

CANDIDATE_RULE = (
    "global top-k over all valid rows by ITC cosine similarity of the stored embeddings (float64 accumulation, "
    "float32 result), descending, ties to the lower row"
)
RESCORE_MARGIN_CUDA = 16  # on CUDA: float32 top-(k + 16) retrieval, float64 re-scoring (fast where float64 is slow)
FUSED_ROWS_PER_CHUNK = 4  # fused arrays: 4 rows per chunk (measured: docs/cache-format.md, "Read speed")
MAX_SKIP_EXAMPLES = 100  # (shard, key, reason) examples kept in the manifest


@dataclass
class BuildResult:
    """What a build did."""

    path: str
    status: str  # "built" | "resumed" | "complete" (nothing to do)
    num_images: int = 0
    num_texts: int = 0
    num_valid_images: int = 0
    num_valid_texts: int = 0
    skip_counts: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    stage_seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


# --------------------------------------------------------------------------------------------------- helpers
def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> ``bf16`` on CUDA, ``fp32`` elsewhere; otherwise the value given (fp32 | bf16 | fp16).

    Raises:
        ValueError: an unknown value, or bf16 / fp16 on a non-CUDA device.
    """
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"precision must be auto | fp32 | bf16 | fp16, got {precision!r}")
    if precision != "fp32" and device.type != "cuda":
        raise ValueError(f"precision {precision} needs a CUDA device (autocast on CUDA only), device is {device}")
    return precision


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def _check_config(config: BuildConfig) -> None:
    problems = []
    if config.k <= 0:
        problems.append(f"k must be > 0, got {config.k}")
    if config.batch_size <= 0 or config.workers < 0 or config.chunk_size <= 0 or config.rows_per_chunk <= 0:
        problems.append("batch_size, chunk_size, rows_per_chunk must be > 0 and workers >= 0")
    if config.fused_dtype not in FUSED_DTYPES:
        problems.append(f"fused_dtype must be one of {FUSED_DTYPES}, got {config.fused_dtype!r}")
    if config.emb_dtype not in EMB_DTYPES:
        problems.append(f"emb_dtype must be one of {EMB_DTYPES}, got {config.emb_dtype!r}")
    if config.topk_backend not in ("torch", "faiss"):
        problems.append(f"topk_backend must be torch | faiss, got {config.topk_backend!r}")
    elif config.topk_backend == "faiss" and importlib.util.find_spec("faiss") is None:
        problems.append("topk_backend=faiss needs faiss-cpu: pip install 'mcad-cache[faiss]'")
    if not config.data:
        problems.append("no --data shards given")
    if config.world_size < 1 or not 0 <= config.rank < config.world_size:
        problems.append(f"need 0 <= rank < world_size, got rank={config.rank}, world_size={config.world_size}")
    if problems:
        raise ValueError("build config: " + "; ".join(problems))


def _timed(stage_seconds: dict[str, float], name: str, t0: float) -> None:
    stage_seconds[name] = stage_seconds.get(name, 0.0) + time.perf_counter() - t0


@dataclass
class _Rows:
    """Pass-0 result: the row layout of the cache."""

    keys: list[str]
    shard_of: np.ndarray  # [N_i] int32 index into shards
    captions: list[list[str]]
    report: SkipReport | None  # pass-0 skips (None when the rows were read back from an existing cache)
    per_shard_rows: list[int]

    @property
    def offsets(self) -> np.ndarray:
        counts = np.array([len(c) for c in self.captions], dtype=np.int64)
        return np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)


def _scan_rows(shards: list[str], *, policy: DecodePolicy, strict: bool, progress: ProgressFn) -> _Rows:
    report = SkipReport(strict=strict)
    index = {s: i for i, s in enumerate(shards)}
    keys: list[str] = []
    shard_of: list[int] = []
    captions: list[list[str]] = []
    per_shard = [0] * len(shards)
    samples = iter_samples(shards, policy=policy, strict=strict, decode_images=False)
    for s in progress(samples, "pass 0: keys and captions", None):
        report.add(s)
        if s.skip is not None:
            continue
        keys.append(s.key)
        shard_of.append(index[s.shard])
        captions.append(list(s.captions))
        per_shard[index[s.shard]] += 1
    return _Rows(keys, np.asarray(shard_of, dtype=np.int32), captions, report, per_shard)


def _rescore_margin(device: torch.device) -> int:
    return RESCORE_MARGIN_CUDA if device.type == "cuda" else 0


def _scoring(config: BuildConfig, device: torch.device) -> str:
    """How the top-k similarities are computed (part of the fingerprint: a resume must score the same way)."""
    if config.candidate_source:
        return "source cache's candidates, re-scored in float64"
    if config.topk_backend == "faiss":
        return "faiss IndexFlatIP retrieval of k+16, float64 re-scoring"
    m = _rescore_margin(device)
    return f"float32 retrieval of k+{m}, float64 re-scoring" if m else "float64"


def _fingerprint(
    config: BuildConfig,
    teacher: Any,
    shards: list[str],
    hashes: list[str],
    policy: DecodePolicy,
    precision: str,
    source_fingerprint: dict[str, Any] | None,
    device: torch.device,
) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "teacher": teacher.fingerprint(),
        "kind": teacher.kind,
        "preprocess": teacher.preprocess_cfg,
        "tokenizer": teacher.tokenizer_cfg,
        "decode_policy": policy.to_dict(),
        "k": config.k,
        "candidates": {
            "rule": CANDIDATE_RULE,
            "source": "own_itc" if not config.candidate_source else "cache",
            "source_cache": source_fingerprint,
            "force_positives": config.force_positives,
            "scoring": _scoring(config, device),
            "pool": "all valid rows",
        },
        "storage": {
            "emb_dtype": config.emb_dtype,
            "fused_dtype": config.fused_dtype if teacher.kind == "single" else "none",
            "rows_per_chunk": config.rows_per_chunk,
            "fused_rows_per_chunk": math.gcd(FUSED_ROWS_PER_CHUNK, config.rows_per_chunk),
        },
        "precision": precision,
        "data": {"shards": [{"name": os.path.basename(s), "sha256": h} for s, h in zip(shards, hashes, strict=True)]},
    }


class _UnitBatcher:
    """Collects decoded images by row and releases them in fixed batches that never cross unit borders.

    Batches of a unit are rows ``[start + j * batch_size, ...)``, so a batch's content depends only on the rows, not
    on worker interleaving or on which units a resumed build still has to do.
    """

    def __init__(self, *, rows_per_unit: int, batch_size: int, num_rows: int, todo_units: Iterable[int]) -> None:
        self.rpu, self.bs, self.n = rows_per_unit, batch_size, num_rows
        self.todo = set(todo_units)
        self.pending: dict[tuple[int, int], dict[int, Any]] = {}

    def slot(self, row: int) -> tuple[int, int]:
        unit = row // self.rpu
        return unit, (row - unit * self.rpu) // self.bs

    def slot_rows(self, unit: int, j: int) -> range:
        start = unit * self.rpu + j * self.bs
        return range(start, min(start + self.bs, (unit + 1) * self.rpu, self.n))

    def add(self, row: int, item: Any) -> tuple[int, int, list[int], list[Any]] | None:
        """Add one row's item (a tensor, or None for an invalid image); return a completed slot, if any."""
        unit, j = self.slot(row)
        if unit not in self.todo:
            return None
        slot = self.pending.setdefault((unit, j), {})
        slot[row] = item
        rows = self.slot_rows(unit, j)
        if len(slot) < len(rows):
            return None
        del self.pending[(unit, j)]
        return unit, j, list(rows), [slot[r] for r in rows]

    def slots_per_unit(self, unit: int) -> int:
        start = unit * self.rpu
        n = min(self.rpu, self.n - start)
        return (n + self.bs - 1) // self.bs


def _iter_images(
    *,
    shards: list[str],
    rows: _Rows,
    key_to_row: dict[str, int],
    todo_units: list[int],
    rows_per_unit: int,
    batch_size: int,
    workers: int,
    transform: Callable[..., torch.Tensor],
    policy: DecodePolicy,
    progress: ProgressFn,
    description: str,
) -> Iterator[tuple[int, list[int], list[torch.Tensor | None], list[str | None]]]:
    """Yield ``(unit, rows, images, skip reasons)`` batches in fixed row slots, for the units in ``todo_units``.

    Only shards holding rows of those units are read. A sample whose shard is not the one that owns its key's row
    (a duplicate key), or whose key has no row (skipped in pass 0), is ignored here.
    """
    n = len(rows.keys)
    todo = sorted(todo_units)
    if not todo:
        return
    need = np.zeros(n, dtype=bool)
    for u in todo:
        need[u * rows_per_unit : min((u + 1) * rows_per_unit, n)] = True
    shard_ids = sorted(set(rows.shard_of[need].tolist()))
    read = [shards[i] for i in shard_ids]
    batcher = _UnitBatcher(rows_per_unit=rows_per_unit, batch_size=batch_size, num_rows=n, todo_units=todo)
    ds = SampleDataset(read, image_transform=transform, policy=policy)
    loader = DataLoader(ds, batch_size=batch_size, num_workers=min(workers, len(read)), collate_fn=_collate_keep_order)
    shard_index = {s: i for i, s in enumerate(shards)}
    total_slots = sum(batcher.slots_per_unit(u) for u in todo)
    reasons: dict[int, str] = {}

    def completed() -> Iterator[tuple[int, list[int], list[Any], list[str | None]]]:
        for batch in loader:
            for item in batch:
                row = key_to_row.get(item["key"])
                if row is None or int(rows.shard_of[row]) != shard_index.get(item["shard"], -1):
                    continue
                if item["skip"] is not None:
                    reasons[row] = item["skip"]
                got = batcher.add(row, item["image"] if item["skip"] is None else None)
                if got is not None:
                    unit, _, slot_rows, images = got
                    yield unit, slot_rows, images, [reasons.pop(r, None) for r in slot_rows]

    seen = 0
    for out in progress(completed(), description, total_slots):
        seen += 1
        yield out
    if batcher.pending or seen != total_slots:
        missing = sum(len(batcher.slot_rows(u, j)) - len(v) for (u, j), v in batcher.pending.items())
        raise CacheSchemaError(
            f"{description}: {missing} row(s) of {len(batcher.pending)} batch(es) never arrived from the shards "
            "(did a shard change during the build?)"
        )


def _collate_keep_order(batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Keep items as a list (images stay per-row tensors; batches are regrouped by row in the main process)."""
    return [{"key": b["key"], "shard": b["shard"], "image": b["image"], "skip": b["skip"]} for b in batch]


class _UnitAccumulator:
    """Per-unit buffers that fill batch by batch and are flushed when every batch slot of the unit is in."""

    def __init__(self, slots_needed: Callable[[int], int]) -> None:
        self.slots_needed = slots_needed
        self.buffers: dict[int, dict[str, Any]] = {}
        self.count: dict[int, int] = {}

    def get(self, unit: int, make: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        if unit not in self.buffers:
            self.buffers[unit] = make()
            self.count[unit] = 0
        return self.buffers[unit]

    def slot_done(self, unit: int) -> dict[str, Any] | None:
        self.count[unit] += 1
        if self.count[unit] == self.slots_needed(unit):
            self.count.pop(unit)
            return self.buffers.pop(unit)
        return None


# ------------------------------------------------------------------------------------------------------ build
def run(config: BuildConfig, *, progress: ProgressFn = no_progress) -> BuildResult:
    """Build (or resume, or confirm) the cache ``config.out`` of teacher ``config.teacher`` over ``config.data``.

    Args:
        config: the resolved build config.
        progress: ``progress(iterable, description, total)`` wrapper for progress bars (identity by default).
    Returns:
        A :class:`BuildResult` (``status`` "built", "resumed", or "complete" when there was nothing to do).
    Raises:
        ValueError: an invalid config value.
        CacheMismatchError: a cache built with another fingerprint exists at ``config.out`` (the message is a diff;
            pass ``overwrite`` to replace it), or ``out`` holds something that is not a cache.
        DataError: ``strict`` and a bad sample.
        NonFiniteError: a teacher output that is not finite or overflows its storage dtype (names array and key).
        UnknownModelError: an unknown teacher name.
    """
    _check_config(config)
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    t_start = time.perf_counter()
    stage_s: dict[str, float] = {}
    try:
        shards = expand_shards(config.data)
    except ValueError as err:
        raise DataSourceError(str(err)) from err
    device = resolve_device(config.device)
    precision = resolve_precision(config.precision, device)
    policy = DecodePolicy()
    teacher = create_teacher(
        config.teacher, model=config.model or None, pretrained=config.pretrained or None, device=str(device)
    )
    teacher.to(device)
    teacher.eval()
    if teacher.kind == "single" and not all(hasattr(teacher, a) for a in ("image_tokens", "itm_from_tokens")):
        raise TypeError(f"single-stream teacher {config.teacher!r} lacks image_tokens / itm_from_tokens")
    source = _open_candidate_source(config)
    t0 = time.perf_counter()
    hashes = [file_sha256(s) for s in progress(shards, "hashing shards", len(shards))]
    _timed(stage_s, "hash", t0)
    fingerprint = _fingerprint(
        config, teacher, shards, hashes, policy, precision, source.fingerprint if source is not None else None, device
    )
    out = Path(config.out)
    with _BuildLock(out, rank=config.rank, world_size=config.world_size):
        return _run_locked(
            config,
            progress=progress,
            teacher=teacher,
            shards=shards,
            hashes=hashes,
            fingerprint=fingerprint,
            policy=policy,
            device=device,
            precision=precision,
            source=source,
            stage_s=stage_s,
            t_start=t_start,
        )


def _run_locked(
    config: BuildConfig,
    *,
    progress: ProgressFn,
    teacher: Any,
    shards: list[str],
    hashes: list[str],
    fingerprint: dict[str, Any],
    policy: DecodePolicy,
    device: torch.device,
    precision: str,
    source: CacheReader | None,
    stage_s: dict[str, float],
    t_start: float,
) -> BuildResult:
    out = Path(config.out)
    rank, world = config.rank, config.world_size
    if rank == 0:
        writer = _open_existing(out, fingerprint, overwrite=config.overwrite)
    else:
        writer = _wait_for_layout(out, fingerprint, overwrite=config.overwrite)
    status = "resumed"
    if writer is not None and writer.manifest.get("complete"):
        _logger.info("cache %s is complete and matches this build: nothing to do", out)
        m = writer.manifest
        return BuildResult(path=str(out), status="complete", seconds=time.perf_counter() - t_start, **_counts(m))
    t0 = time.perf_counter()
    if writer is None:
        status = "built"
        rows = _scan_rows(shards, policy=policy, strict=config.strict, progress=progress)
        if not rows.keys:
            counts = {r: c for r, c in rows.report.counts.items() if c} if rows.report is not None else {}
            raise DataSourceError(f"no usable sample in {len(shards)} shard(s) of {list(config.data)}; skips: {counts}")
        writer = _create(out, config, teacher, shards, hashes, rows, fingerprint, device, precision)
    else:
        _logger.info("resuming cache %s (rank %d of %d)", out, rank, world)
        rows = _rows_from_store(writer, num_shards=len(shards))
        if rank == 0:
            writer.update_manifest({"resumed_at": [*writer.manifest.get("resumed_at", []), utc_now()]})
    _timed(stage_s, "pass0_layout", t0)

    key_to_row = {k: i for i, k in enumerate(rows.keys)}
    transform = make_image_transform(teacher.preprocess_cfg)
    common = {
        "shards": shards,
        "rows": rows,
        "key_to_row": key_to_row,
        "transform": transform,
        "policy": policy,
        "workers": config.workers,
        "progress": progress,
    }
    t0 = time.perf_counter()
    _pass_image_emb(writer, teacher, config, device, precision, common)
    _wait_done(writer, ("image_emb",))
    _timed(stage_s, "pass1_images", t0)
    t0 = time.perf_counter()
    _pass_text_emb(writer, teacher, config, device, precision, progress)
    _timed(stage_s, "pass1_texts", t0)
    t0 = time.perf_counter()
    _wait_done(writer, ("text_emb",))
    _pass_topk(writer, config, device, source, progress)
    _wait_done(writer, ("topk_i2t", "topk_t2i"))
    _timed(stage_s, "pass2_topk", t0)
    if writer.layout.kind == "single":
        t0 = time.perf_counter()
        _pass_itm_images(writer, teacher, config, device, precision, common)
        _timed(stage_s, "pass3a_itm_images", t0)
        t0 = time.perf_counter()
        _wait_done(writer, ("itm_scratch",))
        _pass_itm_texts(writer, config, progress)
        _timed(stage_s, "pass3b_itm_texts", t0)
    if config.rank != 0:
        _logger.info("rank %d of %d: all its units are committed; rank 0 finalizes", config.rank, config.world_size)
        return BuildResult(
            path=str(out), status="rank-done", seconds=time.perf_counter() - t_start, stage_seconds=stage_s
        )
    _wait_done(writer, tuple(s for s in STAGES if writer.layout.kind == "single" or not s.startswith("itm")))
    final = _finalize(writer, rows, shards)
    seconds = time.perf_counter() - t_start
    _logger.info("cache %s %s in %.1f s: %s", out, status, seconds, final)
    return BuildResult(path=str(out), status=status, seconds=seconds, stage_seconds=stage_s, **final)


def _mine(mask: np.ndarray, config: BuildConfig) -> list[int]:
    """Units set in ``mask`` that belong to this rank (unit u belongs to rank u % world_size)."""
    return [int(u) for u in np.nonzero(mask)[0] if int(u) % config.world_size == config.rank]


WAIT_POLL_S = 0.5  # how often a rank polls the done markers of other ranks
WAIT_LOG_S = 60.0  # how often it logs that it is still waiting


def _wait_done(writer: CacheWriter, stages: tuple[str, ...]) -> None:
    """Block until every unit of ``stages`` is committed (by any rank). Returns at once for a single process."""
    t0 = last = time.monotonic()
    while True:
        missing = {s: int((~writer.done(s)).sum()) for s in stages}
        if not any(missing.values()):
            return
        if time.monotonic() - last > WAIT_LOG_S:
            last = time.monotonic()
            _logger.info("waiting %.0f s for other ranks: units not done %s", last - t0, missing)
        time.sleep(WAIT_POLL_S)


def _wait_for_layout(out: Path, fingerprint: dict[str, Any], *, overwrite: bool) -> CacheWriter:
    """Ranks > 0: wait until rank 0 has created (or validated) the cache, then open it for writing.

    Raises:
        CacheMismatchError: the cache at ``out`` has another fingerprint (and ``overwrite`` is off, so rank 0 will
            not replace it).
    """
    t0 = last = time.monotonic()
    while True:
        if (out / "zarr.json").is_file():
            try:
                writer = CacheWriter.open(out)
            except McadError:
                writer = None
            if writer is not None:
                lines = fingerprint_diff(writer.manifest.get("fingerprint", {}), fingerprint)
                if lines and not overwrite:
                    raise CacheMismatchError(f"{out} holds a cache built differently:{format_diff(lines)}")
                if not lines and writer.done("layout").all():
                    return writer
        if time.monotonic() - last > WAIT_LOG_S:
            last = time.monotonic()
            _logger.info("waiting %.0f s for rank 0 to create %s", last - t0, out)
        time.sleep(WAIT_POLL_S)


class _BuildLock:
    """An exclusive ``fcntl.flock`` on ``<out>.lock`` (``<out>.rank<r>.lock`` with several ranks), so that two
    processes never write the same units. The kernel drops the lock when its process dies (SIGKILL included), so an
    interrupted build never leaves a stale lock. Removed when the build returns."""

    def __init__(self, out: Path, *, rank: int, world_size: int) -> None:
        name = out.name + (".lock" if world_size == 1 else f".rank{rank}.lock")
        self.path = out.parent / name
        self.fd: int | None = None

    def __enter__(self) -> _BuildLock:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as err:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
            os.close(fd)
            raise BuildLockedError(
                f"another build is writing {self.path.with_suffix('')} ({holder or 'unknown process'}); "
                f"wait for it or stop it (lock {self.path})"
            ) from err
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} since {utc_now()}".encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.fd is not None:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
            os.close(self.fd)
            self.fd = None


def _rows_from_store(writer: CacheWriter, *, num_shards: int) -> _Rows:
    """The pass-0 layout of an existing cache (its shards' sha256 matched, so it is what pass 0 would find)."""
    g = writer.group
    keys = [str(k) for k in g["image_keys"][:].tolist()]
    shard_of = np.asarray(g["image_shard"][:], dtype=np.int32)
    offsets = np.asarray(g["img2txt_offsets"][:], dtype=np.int64)
    caps = [str(c) for c in g["captions"][:].tolist()]
    captions = [caps[offsets[i] : offsets[i + 1]] for i in range(len(keys))]
    per_shard = np.bincount(shard_of, minlength=num_shards).tolist() if len(keys) else [0] * num_shards
    return _Rows(keys, shard_of, captions, None, per_shard)


def _counts(manifest: dict[str, Any]) -> dict[str, Any]:
    c = manifest.get("counts", {})
    return {
        "num_images": c.get("num_images", 0),
        "num_texts": c.get("num_texts", 0),
        "num_valid_images": c.get("num_valid_images", 0),
        "num_valid_texts": c.get("num_valid_texts", 0),
        "skip_counts": manifest.get("skips", {}).get("counts", {}),
    }


def _open_candidate_source(config: BuildConfig) -> CacheReader | None:
    if not config.candidate_source:
        return None
    src = open_cache(config.candidate_source).require(complete=True)
    if config.k > src.k:
        raise CacheSchemaError(
            f"candidate source {config.candidate_source} holds k={src.k} candidates; cannot build k={config.k}"
        )
    return src


def _open_existing(out: Path, fingerprint: dict[str, Any], *, overwrite: bool) -> CacheWriter | None:
    """The resumable writer at ``out``, or None when a fresh cache is to be created (deleting what is there)."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return None
    if not (out / "zarr.json").is_file():
        if overwrite:
            _logger.warning("removing %s (not a cache) because of overwrite", out)
            _remove(out)
            return None
        raise CacheMismatchError(f"{out} exists and is not an mcad-cache cache; choose another --out or --overwrite")
    try:
        writer = CacheWriter.open(out)
    except (CacheSchemaError, McadError) as err:
        if overwrite:
            _remove(out)
            return None
        raise CacheMismatchError(f"{out}: existing cache cannot be resumed ({err}); pass --overwrite") from err
    found = writer.manifest.get("fingerprint", {})
    lines = fingerprint_diff(found, fingerprint)
    if lines:
        if overwrite:
            _logger.warning("overwriting cache %s built with another fingerprint:%s", out, format_diff(lines))
            _remove(out)
            return None
        raise CacheMismatchError(
            f"{out} holds a cache built differently (pass --overwrite to replace it):{format_diff(lines)}"
        )
    if not writer.done("layout").all():
        _logger.info("cache %s was interrupted while being created: recreating it", out)
        _remove(out)
        return None
    return writer


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()


@torch.no_grad()
def _probe_dims(teacher: Any, device: torch.device) -> tuple[int, int]:
    tokens = teacher.tokenize(["a"])
    emb_dim = int(teacher.encode_text(tokens).shape[-1])
    fused_dim = 0
    if teacher.kind == "single":
        h, w = image_size_hw(teacher.preprocess_cfg["image_size"])
        image = torch.zeros(1, 3, h, w, device=device)
        _, fused = teacher.itm_from_tokens(teacher.image_tokens(image), tokens)
        fused_dim = int(fused.shape[-1])
    return emb_dim, fused_dim


def _create(
    out: Path,
    config: BuildConfig,
    teacher: Any,
    shards: list[str],
    hashes: list[str],
    rows: _Rows,
    fingerprint: dict[str, Any],
    device: torch.device,
    precision: str,
) -> CacheWriter:
    emb_dim, fused_dim = _probe_dims(teacher, device)
    offsets = rows.offsets
    layout = CacheLayout(
        kind=teacher.kind,
        num_images=len(rows.keys),
        num_texts=int(offsets[-1]),
        emb_dim=emb_dim,
        k=config.k,
        fused_dim=fused_dim if config.fused_dtype != "none" else 0,
        emb_dtype=config.emb_dtype,
        fused_dtype=config.fused_dtype if teacher.kind == "single" else "none",
        rows_per_chunk=config.rows_per_chunk,
        fused_rows_per_chunk=math.gcd(FUSED_ROWS_PER_CHUNK, config.rows_per_chunk),
    )
    assert rows.report is not None
    report = rows.report.to_dict()
    pass0_per_shard = Counter(item["shard"] for item in report["skipped"])  # exact up to SkipReport.max_listed
    manifest = {
        "fingerprint": fingerprint,
        "teacher": {"name": teacher.name, "kind": teacher.kind},
        "logit_scale": float(teacher.logit_scale),
        "skip_reasons": list(SKIP_REASONS),
        "shards": [
            {
                "path": os.path.abspath(s),
                "name": os.path.basename(s),
                "sha256": h,
                "num_rows": n,  # samples with a row (valid or not)
                "num_skipped_pass0": pass0_per_shard.get(s, 0),  # samples without a row
            }
            for s, h, n in zip(shards, hashes, rows.per_shard_rows, strict=True)
        ],
        "pass0_skips": {
            "counts": {r: c for r, c in report["counts"].items() if c},
            "examples": [
                [os.path.basename(s["shard"]), s["key"], s["reason"]] for s in report["skipped"][:MAX_SKIP_EXAMPLES]
            ],
        },
        "build": {
            "config": config_to_dict(config),
            "code_version": code_version(),
            "torch_version": torch.__version__,
            "zarr_version": zarr.__version__,
            "device": str(device),
            "precision": precision,
        },
        "started_at": utc_now(),
    }
    writer = CacheWriter.create(out, layout=layout, manifest=manifest)
    text_keys = [f"{k}#{j}" for k, caps in zip(rows.keys, rows.captions, strict=True) for j in range(len(caps))]
    counts = np.diff(offsets)
    writer.write("image_keys", 0, np.array(rows.keys, dtype=str))
    writer.write("image_shard", 0, rows.shard_of)
    writer.write("img2txt_offsets", 0, offsets)
    writer.write("text_keys", 0, np.array(text_keys, dtype=str))
    writer.write("captions", 0, np.array([c for caps in rows.captions for c in caps], dtype=str))
    writer.write("txt2img", 0, np.repeat(np.arange(len(rows.keys), dtype=np.int32), counts))
    writer.mark_done("layout", 0)
    return writer


def _pass_image_emb(
    writer: CacheWriter, teacher: Any, config: BuildConfig, device: torch.device, precision: str, common: dict[str, Any]
) -> None:
    done = writer.done("image_emb")
    todo = _mine(~done, config)
    if not todo:
        return
    lay = writer.layout
    keys = common["rows"].keys
    skip_code = {r: i + 1 for i, r in enumerate(SKIP_REASONS)}
    acc = _UnitAccumulator(
        lambda u: -(-(writer.unit_range("image_emb", u)[1] - u * lay.rows_per_chunk) // config.batch_size)
    )

    def make(unit: int) -> Callable[[], dict[str, Any]]:
        a, b = writer.unit_range("image_emb", unit)
        return lambda: {
            "emb": np.full((b - a, lay.emb_dim), np.nan, np.float32),
            "valid": np.zeros(b - a, bool),
            "skip": np.zeros(b - a, np.int8),
        }

    for unit, slot_rows, images, reasons in _iter_images(
        todo_units=todo,
        rows_per_unit=lay.rows_per_chunk,
        batch_size=config.batch_size,
        description="pass 1: image embeddings",
        **common,
    ):
        a, b = writer.unit_range("image_emb", unit)
        buf = acc.get(unit, make(unit))
        ok = [i for i, im in enumerate(images) if im is not None]
        if ok:
            batch = torch.stack([images[i] for i in ok]).to(device)
            with _autocast(device, precision):
                emb = teacher.encode_image(batch)
            local = np.array([slot_rows[i] - a for i in ok])
            buf["emb"][local] = emb.float().cpu().numpy()
            buf["valid"][local] = True
        for i, reason in enumerate(reasons):
            if reason is not None:
                buf["skip"][slot_rows[i] - a] = skip_code[reason]
        full = acc.slot_done(unit)
        if full is not None:
            writer.write("image_emb", a, full["emb"], keys=keys[a:b], valid=full["valid"])
            writer.write("image_valid", a, full["valid"])
            writer.write("image_skip", a, full["skip"])
            writer.mark_done("image_emb", unit)


def _pass_text_emb(
    writer: CacheWriter, teacher: Any, config: BuildConfig, device: torch.device, precision: str, progress: ProgressFn
) -> None:
    done = writer.done("text_emb")
    todo = _mine(~done, config)
    if not todo:
        return
    lay = writer.layout
    image_valid = np.asarray(writer.group["image_valid"][:], dtype=bool)
    txt2img = np.asarray(writer.group["txt2img"][:])
    captions = writer.group["captions"]
    text_keys = writer.group["text_keys"]
    for unit in progress(todo, "pass 1: text embeddings", len(todo)):
        a, b = writer.unit_range("text_emb", unit)
        valid = image_valid[txt2img[a:b]]
        caps = [str(c) for c in captions[a:b].tolist()]
        emb = np.full((b - a, lay.emb_dim), np.nan, np.float32)
        for s in range(0, b - a, config.batch_size):
            idx = [i for i in range(s, min(s + config.batch_size, b - a)) if valid[i]]
            if not idx:
                continue
            tokens = {k: v.to(device) for k, v in teacher.tokenize([caps[i] for i in idx]).items()}
            with _autocast(device, precision):
                out = teacher.encode_text(tokens)
            emb[idx] = out.float().cpu().numpy()
        keys = [str(k) for k in text_keys[a:b].tolist()]
        writer.write("text_emb", a, emb, keys=keys, valid=valid)
        writer.write("text_valid", a, valid)
        writer.mark_done("text_emb", unit)


def _pass_topk(
    writer: CacheWriter, config: BuildConfig, device: torch.device, source: CacheReader | None, progress: ProgressFn
) -> None:
    todo = {d: _mine(~writer.done(f"topk_{d}"), config) for d in ("i2t", "t2i")}
    if not todo["i2t"] and not todo["t2i"]:
        return
    g = writer.group
    img = np.asarray(g["image_emb"][:], dtype=np.float32)
    txt = np.asarray(g["text_emb"][:], dtype=np.float32)
    iv = np.asarray(g["image_valid"][:], dtype=bool)
    tv = np.asarray(g["text_valid"][:], dtype=bool)
    txt2img = np.asarray(g["txt2img"][:], dtype=np.int64)
    offsets = np.asarray(g["img2txt_offsets"][:], dtype=np.int64)
    k = writer.layout.k
    for direction, q, gal, qv, gv in (("i2t", img, txt, iv, tv), ("t2i", txt, img, tv, iv)):
        stage = f"topk_{direction}"
        if not todo[direction]:
            continue
        if source is not None:
            sims, idx = _source_candidates(source, writer, direction, q, gal, qv, gv, k)
        elif config.topk_backend == "faiss":
            sims, idx = faiss_topk(q, gal, k=k, query_valid=qv, gallery_valid=gv, chunk_size=config.chunk_size)
        else:
            sims, idx = chunked_topk(
                q,
                gal,
                k=k,
                chunk_size=config.chunk_size,
                query_valid=qv,
                gallery_valid=gv,
                device=device,
                rescore_margin=_rescore_margin(device),
            )
        if config.force_positives:
            if direction == "i2t":
                pos = [
                    np.arange(offsets[i], offsets[i + 1])[tv[offsets[i] : offsets[i + 1]]]
                    if iv[i]
                    else np.zeros(0, np.int64)
                    for i in range(len(iv))
                ]
            else:
                pos = [np.array([txt2img[t]]) if tv[t] else np.zeros(0, np.int64) for t in range(len(tv))]
            pos_sims = [_dots(q[i], gal[p]) for i, p in enumerate(pos)]
            sims, idx = force_positives(sims, idx, pos, pos_sims)
        flags = positives_i2t(idx, txt2img) if direction == "i2t" else positives_t2i(idx, txt2img)
        for unit in progress(todo[direction], f"pass 2: top-k {direction}", len(todo[direction])):
            a, b = writer.unit_range(stage, unit)
            writer.write(f"{direction}_idx", a, idx[a:b])
            writer.write(f"{direction}_sims", a, sims[a:b], check=False)
            writer.write(f"{direction}_is_positive", a, flags[a:b])
            writer.mark_done(stage, unit)


def _dots(q: np.ndarray, g: np.ndarray) -> np.ndarray:
    """float32 dot products of one query [D] with gallery rows [n, D], accumulated in float64 like chunked_topk."""
    return (g.astype(np.float64) @ q.astype(np.float64)).astype(np.float32)


def _source_candidates(
    source: CacheReader,
    writer: CacheWriter,
    direction: str,
    q: np.ndarray,
    gal: np.ndarray,
    qv: np.ndarray,
    gv: np.ndarray,
    k: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Candidates chosen by another cache's ITC (same rows), re-scored with this teacher's stored embeddings."""
    for name in ("image_keys", "text_keys"):
        if not np.array_equal(np.asarray(source.array(name)[:]), np.asarray(writer.group[name][:])):
            raise CacheMismatchError(
                f"candidate source {source.path}: its {name} differ from this build's rows (built on other data?)"
            )
    idx = np.asarray(source.array(f"{direction}_idx")[:, :k]).astype(np.int32)
    idx = np.where((idx >= 0) & qv[:, None] & gv[np.where(idx >= 0, idx, 0)], idx, -1)
    rows, slots = np.nonzero(idx >= 0)
    sims = np.full(idx.shape, np.nan, np.float32)
    dots = np.einsum("nd,nd->n", q[rows].astype(np.float64), gal[idx[rows, slots]].astype(np.float64))
    sims[rows, slots] = dots.astype(np.float32)
    # keep the source's order (its ranking) but move empty slots last
    order = np.argsort(idx < 0, axis=1, kind="stable")
    return np.take_along_axis(sims, order, 1), np.take_along_axis(idx, order, 1)


def _pair_plan(writer: CacheWriter) -> dict[str, np.ndarray]:
    """The t2i pairs grouped by image: for pair p = t * K + j (t2i_idx[t, j] >= 0), its rank in image-major order."""
    g = writer.group
    idx_t2i = np.asarray(g["t2i_idx"][:], dtype=np.int64)
    k = writer.layout.k
    flat = idx_t2i.ravel()
    pairs = np.nonzero(flat >= 0)[0]
    order = pairs[np.argsort(flat[pairs], kind="stable")]  # image-major, then (t, j) ascending
    rank = np.full(flat.size, -1, np.int64)
    rank[order] = np.arange(order.size)
    img_off = np.concatenate([[0], np.cumsum(np.bincount(flat[pairs], minlength=writer.layout.num_images))])
    return {"order": order, "rank": rank, "img_off": img_off, "k": np.array(k)}


def _scratch_dir(writer: CacheWriter) -> Path:
    return Path(str(writer.group.store.root)) / BUILD_GROUP / "scratch"


def _save_scratch(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)


def _pass_itm_images(
    writer: CacheWriter, teacher: Any, config: BuildConfig, device: torch.device, precision: str, common: dict[str, Any]
) -> None:
    need = ~(writer.done("itm_i2t") & writer.done("itm_scratch"))
    todo = _mine(need, config)
    if not todo:
        return
    lay = writer.layout
    g = writer.group
    idx_i2t = np.asarray(g["i2t_idx"][:], dtype=np.int64)
    captions = [str(c) for c in g["captions"][:].tolist()]
    keys = common["rows"].keys
    plan = _pair_plan(writer)
    order, img_off, k = plan["order"], plan["img_off"], lay.k
    fdim = max(lay.fused_dim, 1)
    scratch_dtype = np.float16 if lay.fused_dtype == "fp16" else np.float32
    acc = _UnitAccumulator(
        lambda u: -(-(writer.unit_range("itm_i2t", u)[1] - u * lay.rows_per_chunk) // config.batch_size)
    )
    sdir = _scratch_dir(writer)
    text_states = TextStateCache(teacher, captions, block=config.batch_size) if supports_text_states(teacher) else None

    def make(unit: int) -> Callable[[], dict[str, Any]]:
        a, b = writer.unit_range("itm_i2t", unit)
        p = int(img_off[b] - img_off[a])
        return lambda: {
            "itm": np.full((b - a, k, 2), np.nan, np.float32),
            "fused": np.full((b - a, k, fdim), np.nan, np.float32),
            "s_itm": np.full((p, 2), np.nan, np.float32),
            "s_fused": np.full((p, fdim), np.nan, np.float32),
        }

    for unit, slot_rows, images, _ in _iter_images(
        todo_units=todo,
        rows_per_unit=lay.rows_per_chunk,
        batch_size=config.batch_size,
        description="pass 3a: ITM per image",
        **common,
    ):
        a, b = writer.unit_range("itm_i2t", unit)
        buf = acc.get(unit, make(unit))
        ok = [i for i, im in enumerate(images) if im is not None]
        if ok:
            batch = torch.stack([images[i] for i in ok]).to(device)
            with _autocast(device, precision):
                tokens = teacher.image_tokens(batch)
            # all pairs of this batch's images, in a fixed order: i2t pairs, then t2i pairs, image by image
            local, texts, dest = [], [], []
            for li, i in enumerate(ok):
                row = slot_rows[i]
                for j in range(k):
                    if idx_i2t[row, j] >= 0:
                        local.append(li)
                        texts.append(int(idx_i2t[row, j]))
                        dest.append((0, row - a, j))
                for r in range(int(img_off[row]), int(img_off[row + 1])):
                    local.append(li)
                    texts.append(int(order[r] // k))
                    dest.append((1, r - int(img_off[a]), 0))
            for s in range(0, len(local), config.batch_size):
                sl = slice(s, s + config.batch_size)
                sel = torch.as_tensor(local[sl], device=tokens.device)
                with _autocast(device, precision):
                    if text_states is not None:
                        text_tokens, mask = text_states.get(texts[sl])
                        itm, fused = teacher.itm_from_text_tokens(tokens[sel], text_tokens, mask)
                    else:
                        tok = {kk: v.to(device) for kk, v in teacher.tokenize([captions[t] for t in texts[sl]]).items()}
                        itm, fused = teacher.itm_from_tokens(tokens[sel], tok)
                itm, fused = itm.float().cpu().numpy(), fused.float().cpu().numpy()
                for n, (kind, x, j) in enumerate(dest[sl]):
                    if kind == 0:
                        buf["itm"][x, j] = itm[n]
                        if lay.has_fused:
                            buf["fused"][x, j] = fused[n]
                    else:
                        buf["s_itm"][x] = itm[n]
                        if lay.has_fused:
                            buf["s_fused"][x] = fused[n]
        full = acc.slot_done(unit)
        if full is not None:
            _check_itm(full["itm"], keys[a:b], "i2t_itm_logits")
            _check_itm(full["s_itm"], None, "t2i_itm_logits")
            writer.write("i2t_itm_logits", a, full["itm"], check=False)
            writer.write_fused("i2t", a, full["fused"], keys=keys[a:b])
            _save_scratch(sdir / f"t2i_itm_{unit:06d}.npy", full["s_itm"])
            if lay.has_fused:
                _save_scratch(sdir / f"t2i_fused_{unit:06d}.npy", full["s_fused"].astype(scratch_dtype))
            writer.mark_done("itm_i2t", unit)
            writer.mark_done("itm_scratch", unit)


def _check_itm(itm: np.ndarray, keys: list[str] | None, name: str) -> None:
    filled = ~np.isnan(itm).all(axis=-1)
    bad = filled & ~np.isfinite(itm).all(axis=-1)
    if bad.any():
        pos = np.argwhere(bad)[0]
        where = f"sample {keys[pos[0]]!r}" if keys is not None else f"pair {tuple(pos.tolist())}"
        raise NonFiniteError(f"array {name!r}: non-finite ITM logits for {where}")


def _pass_itm_texts(writer: CacheWriter, config: BuildConfig, progress: ProgressFn) -> None:
    done = writer.done("itm_t2i")
    todo = _mine(~done, config)
    if not todo:
        return
    lay = writer.layout
    g = writer.group
    plan = _pair_plan(writer)
    rank, img_off, k = plan["rank"], plan["img_off"], lay.k
    idx_t2i = np.asarray(g["t2i_idx"][:], dtype=np.int64)
    sdir = _scratch_dir(writer)
    rpc = lay.rows_per_chunk
    text_keys = g["text_keys"]
    maps: dict[tuple[str, int], np.ndarray] = {}

    def scratch(kind: str, unit: int) -> np.ndarray:
        if (kind, unit) not in maps:
            maps[(kind, unit)] = np.load(sdir / f"t2i_{kind}_{unit:06d}.npy", mmap_mode="r")
        return maps[(kind, unit)]

    for unit in progress(todo, "pass 3b: ITM per text", len(todo)):
        a, b = writer.unit_range("itm_t2i", unit)
        itm = np.full((b - a, k, 2), np.nan, np.float32)
        fused = np.full((b - a, k, max(lay.fused_dim, 1)), np.nan, np.float32)
        t, j = np.nonzero(idx_t2i[a:b] >= 0)
        images = idx_t2i[a:b][t, j]
        ranks = rank[(t + a) * k + j]
        img_units = images // rpc
        for u in np.unique(img_units):
            m = img_units == u
            local = ranks[m] - img_off[u * rpc]
            itm[t[m], j[m]] = scratch("itm", int(u))[local]
            if lay.has_fused:
                fused[t[m], j[m]] = scratch("fused", int(u))[local].astype(np.float32)
        keys = [str(x) for x in text_keys[a:b].tolist()]
        writer.write("t2i_itm_logits", a, itm, check=False)
        writer.write_fused("t2i", a, fused, keys=keys)
        writer.mark_done("itm_t2i", unit)


def _finalize(writer: CacheWriter, rows: _Rows, shards: list[str]) -> dict[str, Any]:
    g = writer.group
    iv = np.asarray(g["image_valid"][:], dtype=bool)
    tv = np.asarray(g["text_valid"][:], dtype=bool)
    skip = np.asarray(g["image_skip"][:], dtype=np.int64)
    manifest = writer.manifest
    counts = dict(manifest.get("pass0_skips", {}).get("counts", {}))
    examples = [list(e) for e in manifest.get("pass0_skips", {}).get("examples", [])]
    shard_names = [os.path.basename(s) for s in shards]
    for row in np.nonzero(skip)[0]:
        reason = SKIP_REASONS[skip[row] - 1]
        counts[reason] = counts.get(reason, 0) + 1
        if len(examples) < MAX_SKIP_EXAMPLES:
            examples.append([shard_names[rows.shard_of[row]], rows.keys[row], reason])
    per_shard_valid = np.bincount(rows.shard_of[iv], minlength=len(shards)) if iv.size else np.zeros(len(shards))
    per_shard_invalid = np.bincount(rows.shard_of[~iv], minlength=len(shards)) if iv.size else np.zeros(len(shards))
    shard_entries = [
        {**entry, "num_valid": int(per_shard_valid[i]), "num_skipped_pass1": int(per_shard_invalid[i])}
        for i, entry in enumerate(manifest.get("shards", []))
    ]
    final = {
        "num_images": int(iv.size),
        "num_texts": int(tv.size),
        "num_valid_images": int(iv.sum()),
        "num_valid_texts": int(tv.sum()),
        "skip_counts": counts,
    }
    updates = {
        "counts": {k: v for k, v in final.items() if k != "skip_counts"},
        "skips": {
            "counts": counts,
            "num_skipped": int(sum(counts.values())),
            "examples": examples,
            "policy": "pass-0 skips get no row; pass-1 image failures keep an invalid row",
        },
        "shards": shard_entries,
    }
    scratch = _scratch_dir(writer)
    if scratch.exists():  # every t2i unit is committed: the scratch files are no longer needed
        shutil.rmtree(scratch)
    writer.mark_complete(updates)  # complete=True is the last write
    return final


__all__ = ["BuildResult", "resolve_precision", "run"]
