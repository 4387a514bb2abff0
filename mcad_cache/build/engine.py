"""The cache build, pass by pass: :func:`build_cache` runs one teacher over WebDataset shards into a resumable Zarr
v3 cache (``docs/cache-format.md`` describes the result).

Passes, one module each: 0 rows (``layout.py``), 1 embeddings (``embeddings.py``), 2 top-k (``candidates.py``),
3 ITM / fused features for single-stream teachers (``itm.py``).

Resume: work is committed per unit of ``rows_per_chunk`` rows (one Zarr chunk, or several whole chunks of the
finer-chunked fused arrays, written by one writer) followed by a done marker. Rerunning the same build skips
committed units and recomputes the rest; batches never cross unit borders and are formed in row order, so a resumed
build stores the same values as an uninterrupted one. The manifest's ``complete`` flag is written last.
``rank`` / ``world_size``: unit u of every stage belongs to rank u % world_size; ranks wait for each other's done
markers between passes (``coordination.py``) and rank 0 writes the final manifest. A ``flock`` on ``<out>.lock``
(``<out>.rank<r>.lock``) keeps a second process from writing the same units.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mcad_cache.build.candidates import pass_topk
from mcad_cache.build.coordination import BuildLock, RankSync, open_existing
from mcad_cache.build.embeddings import pass_image_embeddings, pass_text_embeddings
from mcad_cache.build.fingerprint import build_fingerprint, supports_itm
from mcad_cache.build.itm import pass_itm_images, pass_itm_texts, scratch_dir, token_scratch_for
from mcad_cache.build.layout import MAX_SKIP_EXAMPLES, Rows, create_cache, rows_from_store, scan_rows
from mcad_cache.build.units import ImageSource
from mcad_cache.build.views import pass_view_embeddings, with_view_stage
from mcad_cache.cache.manifest import utc_now
from mcad_cache.cache.reader import CacheReader, open_cache
from mcad_cache.cache.writer import STAGES, CacheWriter, is_cache_dir
from mcad_cache.config import BuildConfig
from mcad_cache.data import SKIP_REASONS, DecodePolicy, expand_shards
from mcad_cache.data.decode import reset_pil_flags
from mcad_cache.data.tar import shard_sha256
from mcad_cache.data.transforms import make_image_transform
from mcad_cache.data.truncation import token_lengths, truncation_stats
from mcad_cache.errors import CacheSchemaError, DataSourceError, OutputPathError
from mcad_cache.progress import ProgressFn, no_progress
from mcad_cache.teachers.base import Teacher

_logger = logging.getLogger(__name__)


@dataclass
class BuildResult:
    """What a build did."""

    path: str
    status: str  # "built" | "resumed" | "complete" (nothing to do) | "rank-done" (a rank > 0 finished its units)
    num_images: int = 0
    num_texts: int = 0
    num_valid_images: int = 0
    num_valid_texts: int = 0
    skip_counts: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    stage_seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def resolve_shards(data: tuple[str, ...] | list[str]) -> list[str]:
    """The shard paths of ``--data`` patterns (sorted, see ``mcad_cache.data.expand_shards``).

    Raises:
        DataSourceError: a pattern matches nothing.
    """
    try:
        return expand_shards(data)
    except ValueError as err:
        raise DataSourceError(str(err)) from err


def open_candidate_source(path: str, *, k: int) -> CacheReader | None:
    """The complete cache at ``path`` whose candidates the build takes (None for ``""``: own ITC).

    Raises:
        CacheNotFoundError / CacheIncompleteError: no complete cache there.
        CacheSchemaError: it holds fewer than ``k`` candidates.
    """
    if not path:
        return None
    src = open_cache(path).require(complete=True)
    if k > src.k:
        raise CacheSchemaError(f"candidate source {path} holds k={src.k} candidates; cannot build k={k}")
    return src


def refuse_foreign_out(out: Path) -> None:
    """Refuse an ``--out`` that exists and is neither empty nor an mcad-cache cache, with or without ``--overwrite``:
    the build deletes only what it made (a cache, recognised by its manifest), never a user's folder or file.

    Raises:
        OutputPathError: names the path and what to do.
    """
    if not out.exists() or is_cache_dir(out):
        return
    if out.is_dir() and not any(out.iterdir()):
        return
    what = "a folder that is not an mcad-cache cache (no manifest)" if out.is_dir() else "a file"
    raise OutputPathError(
        f"--out {out}: is {what}; the build never deletes or writes into it, --overwrite included; "
        "choose another --out (a new or empty folder, or an existing cache)"
    )


class _Timer:
    """Seconds per stage, summed over repeats."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def add(self, name: str, t0: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0


def build_cache(
    config: BuildConfig,
    *,
    teacher: Teacher,
    shards: list[str],
    device: torch.device,
    precision: str,
    progress: ProgressFn = no_progress,
) -> BuildResult:
    """Build (or resume, or confirm) the cache ``config.out`` of ``teacher`` over ``shards``.

    Args:
        config: the build config, already checked (``check_config``); every field is used or recorded.
        teacher: the teacher, on ``device``, in eval mode.
        shards: shard paths in row order (``resolve_shards(config.data)``).
        device: the teacher's device; precision: the resolved precision (``mcad_cache.runtime.resolve_precision``).
        progress: ``progress(iterable, description, total)`` wrapper for progress bars.
    Returns:
        A :class:`BuildResult` (``status`` "built", "resumed", "complete" when there was nothing to do, or
        "rank-done" for a rank > 0).
    Raises:
        TypeError: a single-stream teacher without the ``SingleStreamTeacher`` abilities.
        CacheMismatchError: a cache built with another fingerprint exists at ``config.out`` (the message is a diff;
            pass ``overwrite`` to replace it).
        OutputPathError: ``out`` holds something that is not a cache (never deleted, ``overwrite`` or not).
        BuildLockedError: another build process writes ``config.out``.
        DataSourceError: no usable sample in the shards.
        DataError: ``strict`` and a bad sample.
        NonFiniteError: a teacher output that is not finite or overflows its storage dtype (names array and key).
    """
    t_start = time.perf_counter()
    timer = _Timer()
    pil_flags_found = reset_pil_flags()  # recorded below: the build never decodes with PIL's lenient flags
    if teacher.kind == "single" and not supports_itm(teacher):
        raise TypeError(f"single-stream teacher {config.teacher!r} lacks image_tokens / itm_from_tokens")
    source = open_candidate_source(config.candidate_source, k=config.k)
    policy = DecodePolicy()
    t0 = time.perf_counter()
    hashes = [shard_sha256(s) for s in progress(shards, "hashing shards", len(shards))]
    timer.add("hash", t0)
    fingerprint = build_fingerprint(
        teacher,
        config=config,
        shards=shards,
        hashes=hashes,
        policy=policy,
        precision=precision,
        device=device,
        source_fingerprint=source.fingerprint if source is not None else None,
    )
    out = Path(config.out)
    rank, world = config.rank, config.world_size
    sync = RankSync(out, rank=rank, world_size=world, timeout_s=config.wait_timeout_s)  # barriers or done markers
    if rank == 0:  # other ranks may see rank 0's cache half-created
        refuse_foreign_out(out)
    with BuildLock(out, rank=rank, world_size=world):
        if rank == 0:
            writer = open_existing(out, fingerprint, overwrite=config.overwrite)
        else:
            writer = sync.wait_for_layout(fingerprint, overwrite=config.overwrite)
        if writer is not None and writer.manifest.get("complete"):
            sync.layout_ready()
            _logger.info("cache %s is complete and matches this build: nothing to do", out)
            seconds = time.perf_counter() - t_start
            return BuildResult(path=str(out), status="complete", seconds=seconds, **_counts(writer.manifest))
        status = "resumed"
        t0 = time.perf_counter()
        if writer is None:
            status = "built"
            rows = scan_rows(shards, policy=policy, strict=config.strict, progress=progress)
            if not rows.keys:
                counts = {r: c for r, c in rows.report.counts.items() if c} if rows.report is not None else {}
                raise DataSourceError(
                    f"no usable sample in {len(shards)} shard(s) of {list(config.data)}; skips: {counts}"
                )
            writer = create_cache(
                out,
                teacher,
                config=config,
                shards=shards,
                hashes=hashes,
                rows=rows,
                fingerprint=fingerprint,
                device=device,
                precision=precision,
            )
        else:
            _logger.info("resuming cache %s (rank %d of %d)", out, rank, world)
            rows = rows_from_store(writer, num_shards=len(shards))
            if rank == 0:
                writer.update_manifest({"resumed_at": [*writer.manifest.get("resumed_at", []), utc_now()]})
        if pil_flags_found and rank == 0:
            writer.update_manifest({"pil_flags_reset": [*writer.manifest.get("pil_flags_reset", []), pil_flags_found]})
        timer.add("pass0_layout", t0)
        sync.layout_ready()  # rank 0: the other ranks may open the cache now
        _run_passes(
            writer,
            teacher,
            config=config,
            shards=shards,
            rows=rows,
            policy=policy,
            device=device,
            precision=precision,
            source=source,
            progress=progress,
            timer=timer,
            sync=sync,
        )
        final_stages = tuple(s for s in STAGES if writer.layout.kind == "single" or not s.startswith("itm"))
        final_stages = with_view_stage(final_stages, writer.layout)  # issue 16: image_views only with views
        sync.wait(writer, final_stages, after="the last pass")
        stage_seconds = sync.stage_seconds(timer.seconds)  # rank 0's summary: every rank's pass times
        if rank != 0:
            _logger.info("rank %d of %d: all its units are committed; rank 0 finalizes", rank, world)
            seconds = time.perf_counter() - t_start
            return BuildResult(path=str(out), status="rank-done", seconds=seconds, stage_seconds=timer.seconds)
        final = finalize(writer, rows=rows, shards=shards, truncation=caption_truncation(teacher, writer))
    seconds = time.perf_counter() - t_start
    _logger.info("cache %s %s in %.1f s: %s", out, status, seconds, final)
    return BuildResult(path=str(out), status=status, seconds=seconds, stage_seconds=stage_seconds, **final)


def _run_passes(
    writer: CacheWriter,
    teacher: Teacher,
    *,
    config: BuildConfig,
    shards: list[str],
    rows: Rows,
    policy: DecodePolicy,
    device: torch.device,
    precision: str,
    source: CacheReader | None,
    progress: ProgressFn,
    timer: _Timer,
    sync: RankSync,
) -> None:
    """Passes 1-3 for this rank's units, with the waits for other ranks between them (``sync``)."""
    rank, world = config.rank, config.world_size
    images = ImageSource(
        shards=shards,
        keys=rows.keys,
        shard_of=rows.shard_of,
        transform=make_image_transform(teacher.preprocess_cfg),
        policy=policy,
        workers=config.workers,
        progress=progress,
    )
    t0 = time.perf_counter()
    single = writer.layout.kind == "single" and supports_itm(teacher)
    tokens = (  # pass 1 -> 3a (issue 11); None with --token-scratch-gib 0
        token_scratch_for(writer, batch_size=config.batch_size, cap_gib=config.token_scratch_gib) if single else None
    )
    on = {"rank": rank, "world_size": world}  # every pass computes only this rank's units
    encode = {"images": images, "batch_size": config.batch_size, "device": device, "precision": precision, **on}
    pass_image_embeddings(writer, teacher, keep_tokens=tokens, **encode)
    sync.wait(writer, ("image_emb",), after="pass 1 (image embeddings)")
    timer.add("pass1_images", t0)
    if writer.layout.num_views:  # issue 16: pass 1v, V augmented views per image (build/views.py)
        t0 = time.perf_counter()
        pass_view_embeddings(writer, teacher, **encode)
        timer.add("pass1v_views", t0)
    t0 = time.perf_counter()
    text = {k: v for k, v in encode.items() if k != "images"}
    pass_text_embeddings(writer, teacher, progress=progress, **text)
    timer.add("pass1_texts", t0)
    t0 = time.perf_counter()
    sync.wait(writer, ("text_emb",), after="pass 1 (text embeddings)")
    pass_topk(
        writer,
        source=source,
        topk_backend=config.topk_backend,
        chunk_size=config.chunk_size,
        force_positive_candidates=config.force_positives,
        device=device,
        progress=progress,
        **on,
    )
    sync.wait(writer, ("topk_i2t", "topk_t2i"), after="pass 2 (top-k)")
    timer.add("pass2_topk", t0)
    if single:
        t0 = time.perf_counter()
        pass_itm_images(writer, teacher, tokens=tokens, **encode)
        timer.add("pass3a_itm_images", t0)
        t0 = time.perf_counter()
        sync.wait(writer, ("itm_scratch",), after="pass 3a (ITM images)")
        pass_itm_texts(writer, progress=progress, **on)
        timer.add("pass3b_itm_texts", t0)


def _counts(manifest: dict[str, Any]) -> dict[str, Any]:
    c = manifest.get("counts", {})
    return {
        "num_images": c.get("num_images", 0),
        "num_texts": c.get("num_texts", 0),
        "num_valid_images": c.get("num_valid_images", 0),
        "num_valid_texts": c.get("num_valid_texts", 0),
        "skip_counts": manifest.get("skips", {}).get("counts", {}),
    }


def topk_fill(writer: CacheWriter, *, image_valid: np.ndarray, text_valid: np.ndarray) -> dict[str, float]:
    """Share of candidate slots filled (id >= 0) over the valid query rows, per direction, in [0, 1].

    Below 1 when ``k`` exceeds what the data can fill (fewer valid candidates than ``k``); then a warning gives the
    rate, since the empty slots carry no target. Returns ``{"i2t": rate, "t2i": rate}`` (recorded in the manifest).
    """
    fill: dict[str, float] = {}
    for direction, valid, other in (("i2t", image_valid, text_valid), ("t2i", text_valid, image_valid)):
        idx = np.asarray(writer.group[f"{direction}_idx"][:])[valid]
        fill[direction] = round(float((idx >= 0).mean()), 4) if idx.size else 0.0
        if fill[direction] < 1.0:
            _logger.warning(
                "k=%d exceeds what the data can fill for %s: %d valid candidate rows; %.0f%% of the candidate slots "
                "are filled (empty slots are -1 and carry no target); build with a smaller --k or more data",
                writer.layout.k,
                direction,
                int(other.sum()),
                100 * fill[direction],
            )
    return fill


def caption_truncation(teacher: Teacher, writer: CacheWriter) -> dict[str, Any]:
    """The teacher tokenizer's truncation counts over the cached captions (``data.truncation``), for the manifest's
    ``truncation`` entry; a warning gives the share of captions the teacher cuts. ``{}`` when the teacher's
    tokenizer is of no known kind (e.g. a test teacher)."""
    context = int(teacher.tokenizer_cfg.get("context_length") or 0)
    tokenizer = getattr(teacher, "tokenizer", None)
    lengths = token_lengths(tokenizer, [str(c) for c in writer.group["captions"][:]]) if tokenizer else None
    if lengths is None or context <= 0:
        return {}
    stats = truncation_stats(lengths, context_length=context)
    if stats["num_truncated"]:
        _logger.warning(
            "%d of %d captions (%.1f%%) are longer than the teacher's context of %d tokens and are cut (longest: %d "
            "tokens); cut captions may become identical token sequences",
            stats["num_truncated"],
            stats["num_captions"],
            100 * stats["share_truncated"],
            context,
            stats["max_tokens"],
        )
    return {"teacher": stats}


def finalize(
    writer: CacheWriter, *, rows: Rows, shards: list[str], truncation: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Rank 0, every unit committed: write counts, skips (pass 0 + pass 1) and per-shard counts into the manifest,
    remove the scratch files, and set ``complete`` (the last write). Returns the counts of :class:`BuildResult`."""
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
    fill = topk_fill(writer, image_valid=iv, text_valid=tv)
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
        "topk_fill": fill,
        "truncation": truncation or {},  # per text model: captions cut at its context length (data.truncation)
    }
    scratch = scratch_dir(writer)
    if scratch.exists():  # every t2i unit is committed: the scratch files are no longer needed
        shutil.rmtree(scratch)
    writer.mark_complete(updates)  # complete=True is the last write
    return final


__all__ = [
    "BuildResult",
    "build_cache",
    "caption_truncation",
    "finalize",
    "open_candidate_source",
    "refuse_foreign_out",
    "resolve_shards",
    "topk_fill",
]
