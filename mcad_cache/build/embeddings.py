"""Build pass 1, embeddings: the teacher's L2-normalised ITC embeddings of every image row and every text row.

Images come through a DataLoader (workers decode with the teacher's own transform) in fixed row batches; texts are
the captions of pass 0, batched in row order; the teacher runs under :func:`mcad_cache.runtime.autocast`. An image
that fails to decode here (decode error, too many pixels, extreme aspect) keeps its row with ``image_valid = False``
(and its captions ``text_valid = False``), NaN embeddings and a skip code (1 + its index in ``SKIP_REASONS``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from mcad_cache.build.fingerprint import supports_itm
from mcad_cache.build.units import ImageSource, UnitAccumulator, owned_units, slots_in_unit
from mcad_cache.cache.writer import CacheWriter
from mcad_cache.data import SKIP_REASONS
from mcad_cache.progress import ProgressFn
from mcad_cache.runtime import autocast
from mcad_cache.teachers.base import Teacher


def pass_image_embeddings(
    writer: CacheWriter,
    teacher: Teacher,
    *,
    images: ImageSource,
    batch_size: int,
    device: torch.device,
    precision: str,
    rank: int = 0,
    world_size: int = 1,
    keep_tokens: Callable[[int, list[int], int, torch.Tensor], None] | None = None,
) -> None:
    """Pass 1, images: write ``image_emb`` [N_i, D] (storage dtype; NaN rows invalid), ``image_valid`` [N_i] bool
    and ``image_skip`` [N_i] int8 for every ``image_emb`` unit of this rank not yet done, one unit at a time.
    ``keep_tokens`` (single-stream teachers, ``build.itm.TokenScratch``): the embedding is computed from the image
    tokens (``encode_image_from_tokens(image_tokens(x))``, the same values) and the tokens are handed over as
    ``keep_tokens(unit, valid rows, first row of the batch slot, image_tokens [n, L, C])`` for pass 3a.

    Raises:
        NonFiniteError: a non-finite embedding, or one beyond the float16 range (names the sample key).
        CacheSchemaError: rows never arrived from the shards.
    """
    todo = owned_units(~writer.done("image_emb"), rank=rank, world_size=world_size)
    if not todo:
        return
    lay = writer.layout
    keys = images.keys
    skip_code = {r: i + 1 for i, r in enumerate(SKIP_REASONS)}
    acc = UnitAccumulator(
        lambda u: slots_in_unit(
            u, stop=writer.unit_range("image_emb", u)[1], rows_per_unit=lay.rows_per_chunk, batch_size=batch_size
        )
    )

    def make(unit: int) -> Callable[[], dict[str, Any]]:
        a, b = writer.unit_range("image_emb", unit)
        return lambda: {
            "emb": np.full((b - a, lay.emb_dim), np.nan, np.float32),
            "valid": np.zeros(b - a, bool),
            "skip": np.zeros(b - a, np.int8),
        }

    for unit, slot_rows, batch_images, reasons in images.batches(
        todo_units=todo,
        rows_per_unit=lay.rows_per_chunk,
        batch_size=batch_size,
        description="pass 1: image embeddings",
    ):
        a, b = writer.unit_range("image_emb", unit)
        buf = acc.get(unit, make(unit))
        ok = [i for i, im in enumerate(batch_images) if im is not None]
        if keep_tokens is not None and supports_itm(teacher):
            batch = torch.stack([batch_images[i] for i in ok]).to(device) if ok else None
            with autocast(device, precision):
                image_tokens = teacher.image_tokens(batch) if batch is not None else torch.empty(0)
                emb = teacher.encode_image_from_tokens(image_tokens) if batch is not None else None
            keep_tokens(unit, [slot_rows[i] for i in ok], slot_rows[0], image_tokens)
        elif ok:
            with autocast(device, precision):
                emb = teacher.encode_image(torch.stack([batch_images[i] for i in ok]).to(device))
        if ok:
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


def pass_text_embeddings(
    writer: CacheWriter,
    teacher: Teacher,
    *,
    batch_size: int,
    device: torch.device,
    precision: str,
    progress: ProgressFn,
    rank: int = 0,
    world_size: int = 1,
) -> None:
    """Pass 1, texts: write ``text_emb`` [N_t, D] and ``text_valid`` [N_t] bool (valid iff the text's image is) for
    every ``text_emb`` unit of this rank not yet done. Needs every ``image_emb`` unit done (it reads
    ``image_valid``).

    Raises:
        NonFiniteError: a non-finite embedding, or one beyond the float16 range (names the text key).
    """
    todo = owned_units(~writer.done("text_emb"), rank=rank, world_size=world_size)
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
        for s in range(0, b - a, batch_size):
            idx = [i for i in range(s, min(s + batch_size, b - a)) if valid[i]]
            if not idx:
                continue
            tokens = {k: v.to(device) for k, v in teacher.tokenize([caps[i] for i in idx]).items()}
            with autocast(device, precision):
                out = teacher.encode_text(tokens)
            emb[idx] = out.float().cpu().numpy()
        keys = [str(k) for k in text_keys[a:b].tolist()]
        writer.write("text_emb", a, emb, keys=keys, valid=valid)
        writer.write("text_valid", a, valid)
        writer.mark_done("text_emb", unit)


__all__ = ["pass_image_embeddings", "pass_text_embeddings"]
