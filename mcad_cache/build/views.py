"""Build pass 1v, augmented views (issue 16): the teacher's ITC embedding of V views of every image row, and the
view params they were computed from (``docs/cache-format.md``, "Augmented views").

Per row, the params of views ``0..V-1`` are drawn by :func:`mcad_cache.views.draw_views` from ``(view_seed, sample
key, view index)`` and the decoded source size, so a resumed, multi-worker or multi-rank build draws the same views.
Each view is ``apply_view`` (crop + flip of the decoded image) followed by the teacher's own transform. View 0 is the
canonical view (the whole image): the same pixels as ``image_emb``, from which the top-k candidates are chosen.

Stored: ``image_emb_views [N_i, V, D]`` (storage dtype of ``image_emb``; NaN rows invalid) and ``view_params
[N_i, V, 5] int32`` (-1 rows invalid), committed per ``image_views`` unit with a done marker, in fixed row batches
(``build.units``), so a resumed build stores the same values as an uninterrupted one. Single-stream targets (ITM
logits, fused [CLS]) stay canonical-only: per view they would cost V times the ITM pairs (N x k x V per direction);
recorded as ``views.single_stream_targets = "canonical"`` in the manifest.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from PIL import Image

from mcad_cache.build.units import ImageSource, UnitAccumulator, owned_units, slots_in_unit
from mcad_cache.cache.schema import CacheLayout
from mcad_cache.cache.writer import CacheWriter
from mcad_cache.config import BuildConfig
from mcad_cache.errors import ConfigError
from mcad_cache.runtime import autocast
from mcad_cache.teachers.base import Teacher
from mcad_cache.views import EXAMPLE_SPEC, NUM_VIEW_PARAMS, apply_view, draw_views, parse_augment

SINGLE_STREAM_TARGETS = ("canonical",)  # per-view ITM / fused targets: not built (cost ITM pairs x V; docs)


def check_views_config(config: BuildConfig) -> None:
    """Check ``views`` / ``augment`` / ``view_targets`` before any work.

    Raises:
        ConfigError: ``views`` < 1, ``views`` > 1 without ``augment`` (or the reverse), a bad spec, or a
            ``view_targets`` other than "canonical".
    """
    if config.views < 1:
        raise ConfigError(f"--views must be >= 1, got {config.views}")
    spec = parse_augment(config.augment)
    if config.views > 1 and spec is None:
        raise ConfigError(f"--views {config.views} needs --augment SPEC, e.g. --augment {EXAMPLE_SPEC}")
    if config.views == 1 and spec is not None:
        raise ConfigError("--augment without --views V > 1 stores no view; pass --views 4 (view 0 is canonical)")
    if config.view_targets not in SINGLE_STREAM_TARGETS:
        raise ConfigError(
            f"--view-targets {config.view_targets!r}: only 'canonical' is built (single-stream ITM / fused targets of "
            "view 0; per view they cost ITM pairs x V)"
        )


def num_views(config: BuildConfig) -> int:
    """``CacheLayout.num_views`` of a build: 0 for ``views == 1`` (no view arrays), else V."""
    return config.views if config.views > 1 else 0


def views_record(config: BuildConfig) -> dict[str, Any]:
    """The ``views`` entry of the fingerprint and manifest (empty for a build without views, so such a cache's
    fingerprint is unchanged): V, the canonical spec string, its dict, the seed, and what the views cover.

    Raises:
        ConfigError: see :func:`check_views_config`.
    """
    check_views_config(config)
    if config.views <= 1:
        return {}
    spec = parse_augment(config.augment)
    assert spec is not None
    return {
        "views": {
            "num_views": config.views,
            "augment": spec.to_string(),
            "augment_spec": spec.to_dict(),
            "seed": config.view_seed,
            "canonical_view": 0,
            "topk_from": "canonical view (image_emb)",
            "single_stream_targets": config.view_targets,
            "params": "x0, y0, w, h in decoded source pixels; flip 1 = left-right mirror after the crop",
        }
    }


def with_view_stage(stages: tuple[str, ...], layout: CacheLayout) -> tuple[str, ...]:
    """``stages`` without ``image_views`` when ``layout`` stores no views (its done markers do not exist)."""
    return stages if layout.num_views else tuple(s for s in stages if s != "image_views")


def keep_pil(image: Image.Image) -> Image.Image:
    """Picklable identity transform: workers hand the decoded PIL image to the main process, which crops it."""
    return image


def pass_view_embeddings(
    writer: CacheWriter,
    teacher: Teacher,
    *,
    images: ImageSource,
    batch_size: int,
    device: torch.device,
    precision: str,
    rank: int = 0,
    world_size: int = 1,
) -> None:
    """Pass 1v: write ``image_emb_views`` [N_i, V, D] and ``view_params`` [N_i, V, 5] int32 for every
    ``image_views`` unit of this rank not yet done (nothing when the layout stores no views).

    Args:
        writer: the cache (its manifest's ``views`` entry gives the spec and seed).
        teacher: the teacher, on ``device``.
        images: the image source of pass 1 (its ``transform`` is the teacher's, applied here after the crop).
        batch_size: rows per batch (the teacher sees ``batch_size * V`` view images per call, in chunks of
            ``batch_size``).
        device, precision: as pass 1.
        rank, world_size: unit u belongs to rank u % world_size.
    Raises:
        NonFiniteError: a non-finite embedding, or one beyond the float16 range (names the sample key).
        CacheSchemaError: rows never arrived from the shards.
    """
    lay = writer.layout
    if not lay.num_views:
        return
    todo = owned_units(~writer.done("image_views"), rank=rank, world_size=world_size)
    if not todo:
        return
    record = writer.manifest["views"]
    spec = parse_augment(record["augment"])
    seed, n_views = int(record["seed"]), lay.num_views
    transform = images.transform
    source = dataclasses.replace(images, transform=keep_pil)
    keys = images.keys
    acc = UnitAccumulator(
        lambda u: slots_in_unit(
            u, stop=writer.unit_range("image_views", u)[1], rows_per_unit=lay.rows_per_chunk, batch_size=batch_size
        )
    )

    def make(unit: int) -> Callable[[], dict[str, Any]]:
        a, b = writer.unit_range("image_views", unit)
        return lambda: {
            "emb": np.full((b - a, n_views, lay.emb_dim), np.nan, np.float32),
            "params": np.full((b - a, n_views, NUM_VIEW_PARAMS), -1, np.int32),
            "valid": np.zeros(b - a, bool),
        }

    for unit, slot_rows, batch_images, _ in source.batches(
        todo_units=todo, rows_per_unit=lay.rows_per_chunk, batch_size=batch_size, description="pass 1v: image views"
    ):
        a, b = writer.unit_range("image_views", unit)
        buf = acc.get(unit, make(unit))
        ok = [i for i, im in enumerate(batch_images) if im is not None]
        if ok:
            params, pixels = [], []
            for i in ok:
                image = batch_images[i]
                p = draw_views(spec, seed=seed, key=keys[slot_rows[i]], num_views=n_views, width=image.width,
                               height=image.height)  # fmt: skip
                params.append(p)
                pixels += [transform(apply_view(image, view)) for view in p]
            stacked = torch.stack(pixels)  # [len(ok) * V, 3, H, W], row-major: row, then view
            parts = []
            for s in range(0, stacked.shape[0], batch_size):
                with autocast(device, precision):
                    parts.append(teacher.encode_image(stacked[s : s + batch_size].to(device)).float().cpu())
            emb = torch.cat(parts).numpy().reshape(len(ok), n_views, -1)
            local = np.array([slot_rows[i] - a for i in ok])
            buf["emb"][local] = emb
            buf["params"][local] = np.stack(params)
            buf["valid"][local] = True
        full = acc.slot_done(unit)
        if full is not None:
            writer.write("image_emb_views", a, full["emb"], keys=keys[a:b], valid=full["valid"])
            writer.write("view_params", a, full["params"])
            writer.mark_done("image_views", unit)


__all__ = [
    "SINGLE_STREAM_TARGETS",
    "check_views_config",
    "keep_pil",
    "num_views",
    "pass_view_embeddings",
    "views_record",
    "with_view_stage",
]
