"""Build pass 3 (single-stream teachers), ITM logits and fused [CLS] features of every cached candidate pair.

3a, image-major (:func:`pass_itm_images`): each image's tokens are computed once and every pair that involves the
image is scored in both directions (i2t: its k candidate captions; t2i: every caption that lists it). i2t results
are written per image unit; t2i results go to scratch files grouped by image (``build/scratch/``, removed when the
cache is complete). 3b, text-major (:func:`pass_itm_texts`): each text unit gathers its t2i results from them.

**Image tokens of pass 1 (issue 11).** A single-stream teacher's image tower (ALBEF: a ViT at 384 px) is the largest
model call of the build; pass 1 needs its ITC embedding and pass 3a the tokens the fusion layers attend to. Pass 1
therefore runs ``image_tokens`` + ``encode_image_from_tokens`` and hands the tokens to a :class:`TokenScratch`, which
keeps them per batch slot under ``build/scratch/tokens/`` (one safetensors file per slot, written atomically), and
pass 3a scores a unit from them instead of decoding its images and running the tower again. The scratch is
**bounded**: a unit is kept only if it fits in ``max_bytes`` (``build --token-scratch-gib``, default 8 GiB: about
4,800 ALBEF-base images at 577 x 768 float32 tokens, 1.77 MB each, fp32 so that reuse gives bit-identical ITM logits);
the units that do not fit are recomputed as before. A cap of 0 turns the scratch off (:func:`token_scratch_for`):
pass 3a then runs the image tower again, as before issue 11. The cap is not in the fingerprint (the arrays are the
same with any cap), so a resumed build may use another one. It is **resume-safe**: pass 1 clears a unit's token
files before writing them again, pass 3a uses a unit's tokens only when every batch slot of the unit has its file
(otherwise it recomputes the unit), and deletes them once the unit is committed; the whole scratch folder is deleted
when the cache is complete.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mcad_cache.build.units import ImageSource, UnitAccumulator, owned_units, slots_in_unit
from mcad_cache.cache.schema import BUILD_GROUP
from mcad_cache.cache.writer import CacheWriter
from mcad_cache.errors import NonFiniteError
from mcad_cache.progress import ProgressFn
from mcad_cache.runtime import autocast
from mcad_cache.teachers.base import SingleStreamTeacher
from mcad_cache.teachers.text_states import TextStateCache, supports_text_states

TOKEN_SCRATCH_MAX_BYTES = 8 * 2**30  # bound of the pass-1 image-token scratch (our choice; docs/benchmarks.md, 1)
# (BuildConfig.token_scratch_gib's default, 8.0, is this bound in GiB: tests/test_itm_tokens.py checks they agree)


class TokenScratch:
    """Image tokens kept from pass 1 for pass 3a, one safetensors file per batch slot, at most ``max_bytes`` in all.

    Args:
        writer: the cache being built (the files live under its ``build/scratch/tokens/``).
        batch_size: the build's batch size (the slots of a unit are fixed row ranges of this size).
        max_bytes: bound of the scratch on disk (None: :data:`TOKEN_SCRATCH_MAX_BYTES`); a unit that would exceed
            it is not kept (pass 3a recomputes it).
    """

    def __init__(self, writer: CacheWriter, *, batch_size: int, max_bytes: int | None = None) -> None:
        self.dir = scratch_dir(writer) / "tokens"
        self.rows_per_unit = writer.layout.rows_per_chunk
        self.num_rows = writer.layout.num_images
        self.batch_size = int(batch_size)
        self.max_bytes = int(TOKEN_SCRATCH_MAX_BYTES if max_bytes is None else max_bytes)
        self._unit: int | None = None
        self._kept: bool | None = None  # whether the current unit is kept (None: no image seen yet)

    def _files(self, unit: int) -> list[Path]:
        return sorted(self.dir.glob(f"tokens_{unit:06d}_*.safetensors")) if self.dir.exists() else []

    def used_bytes(self) -> int:
        """Bytes of token files on disk now."""
        return sum(p.stat().st_size for p in self.dir.glob("*.safetensors")) if self.dir.exists() else 0

    def drop(self, unit: int) -> None:
        """Delete the token files of ``unit``."""
        for path in self._files(unit):
            path.unlink(missing_ok=True)

    def _slot_starts(self, unit: int) -> list[int]:
        a = unit * self.rows_per_unit
        b = min(a + self.rows_per_unit, self.num_rows)
        return list(range(a, b, self.batch_size))

    def __call__(self, unit: int, rows: list[int], slot_start: int, image_tokens: torch.Tensor) -> None:
        """Pass 1's hook: keep ``image_tokens`` [n, L, C] of the valid images ``rows`` of the batch slot starting at
        row ``slot_start`` of ``unit`` (n may be 0)."""
        from safetensors.torch import save_file

        if unit != self._unit:  # the unit's first batch: clear what a crashed run left
            self._unit, self._kept = unit, None
            self.drop(unit)
        if self._kept is None and rows:  # its first image: keep the unit only if all of it fits
            per_image = image_tokens[0].numel() * image_tokens.element_size()
            self._kept = self.used_bytes() + per_image * self.rows_per_unit <= self.max_bytes
            if not self._kept:
                self.drop(unit)
        if self._kept is False:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"tokens_{unit:06d}_{slot_start:012d}.safetensors"
        tmp = path.with_name(path.name + ".tmp")
        tensors = {"rows": torch.tensor(rows, dtype=torch.int64), "tokens": image_tokens.detach().cpu().contiguous()}
        save_file(tensors, str(tmp))
        os.replace(tmp, path)

    def load(self, unit: int) -> list[tuple[list[int], torch.Tensor]] | None:
        """``[(rows, image_tokens [n, L, C])]`` per batch slot of ``unit`` in row order, or None when any slot's
        file is missing (the unit was not kept, or pass 1 ran without the scratch)."""
        from safetensors.torch import load_file

        out = []
        for start in self._slot_starts(unit):
            path = self.dir / f"tokens_{unit:06d}_{start:012d}.safetensors"
            if not path.is_file():
                return None
            blob = load_file(str(path))
            out.append(([int(r) for r in blob["rows"].tolist()], blob["tokens"]))
        return out

    def clear(self) -> None:
        """Delete every token file."""
        shutil.rmtree(self.dir, ignore_errors=True)


def token_scratch_for(writer: CacheWriter, *, batch_size: int, cap_gib: float) -> TokenScratch | None:
    """The pass 1 -> 3a token scratch of a build with ``build --token-scratch-gib cap_gib``, or None when the cap is
    0 (off: pass 1 runs ``encode_image`` and pass 3a runs the image tower again, the behaviour before issue 11).

    The cap changes speed and disk use only: the arrays are bit-identical either way (fp32 tokens), so it is recorded
    in the manifest's ``build.config`` and not in the fingerprint; a resumed build may use another cap.

    Raises:
        ValueError: ``cap_gib`` < 0 (``build.fingerprint.check_config`` refuses it first, as a ConfigError).
    """
    if cap_gib < 0:
        raise ValueError(f"token_scratch_gib must be >= 0, got {cap_gib}")
    if cap_gib == 0:
        return None
    return TokenScratch(writer, batch_size=batch_size, max_bytes=int(cap_gib * 2**30))


def pair_plan(writer: CacheWriter) -> dict[str, np.ndarray]:
    """The t2i pairs grouped by image: for pair p = t * K + j (t2i_idx[t, j] >= 0), its rank in image-major order.

    Returns:
        ``order`` [P] int64 pair ids in image-major order (then (t, j) ascending), ``rank`` [N_t * K] int64 (-1 for
        empty slots), ``img_off`` [N_i + 1] int64 CSR offsets of each image's pairs in ``order``, ``k``.
    """
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


def scratch_dir(writer: CacheWriter) -> Path:
    """``<cache>/build/scratch``: pass 3a's t2i results, one file per image unit and kind."""
    return Path(str(writer.group.store.root)) / BUILD_GROUP / "scratch"


def save_scratch(path: Path, array: np.ndarray) -> None:
    """Write ``array`` as ``.npy`` atomically (temporary file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)


def check_itm(itm: np.ndarray, keys: list[str] | None, name: str) -> None:
    """Refuse non-finite ITM logits [..., 2] in filled slots (all-NaN slots are empty).

    Raises:
        NonFiniteError: names the array and the sample key (or the pair position when ``keys`` is None).
    """
    filled = ~np.isnan(itm).all(axis=-1)
    bad = filled & ~np.isfinite(itm).all(axis=-1)
    if bad.any():
        pos = np.argwhere(bad)[0]
        where = f"sample {keys[pos[0]]!r}" if keys is not None else f"pair {tuple(pos.tolist())}"
        raise NonFiniteError(f"array {name!r}: non-finite ITM logits for {where}")


def pass_itm_images(
    writer: CacheWriter,
    teacher: SingleStreamTeacher,
    *,
    images: ImageSource,
    batch_size: int,
    device: torch.device,
    precision: str,
    rank: int = 0,
    world_size: int = 1,
    tokens: TokenScratch | None = None,
) -> None:
    """Pass 3a: for every image unit of this rank not yet done, write ``i2t_itm_logits`` [N_i, k, 2] float32 raw
    [negative, positive] logits and ``i2t_fused`` [N_i, k, C] (storage dtype), and the unit's t2i results to scratch.
    Needs both top-k stages done. Pairs are scored in a fixed order (i2t pairs, then t2i pairs, image by image), in
    batches of ``batch_size`` pairs. A unit whose image tokens pass 1 kept in ``tokens`` is scored from them (no
    decode, no image tower); the others decode their images and run ``teacher.image_tokens``.

    Raises:
        NonFiniteError: non-finite ITM logits or fused features (names the sample key).
    """
    need = ~(writer.done("itm_i2t") & writer.done("itm_scratch"))
    todo = owned_units(need, rank=rank, world_size=world_size)
    if not todo:
        return
    lay = writer.layout
    g = writer.group
    idx_i2t = np.asarray(g["i2t_idx"][:], dtype=np.int64)
    captions = [str(c) for c in g["captions"][:].tolist()]
    keys = images.keys
    plan = pair_plan(writer)
    order, img_off, k = plan["order"], plan["img_off"], lay.k
    fdim = max(lay.fused_dim, 1)
    scratch_dtype = np.float16 if lay.fused_dtype == "fp16" else np.float32
    acc = UnitAccumulator(
        lambda u: slots_in_unit(
            u, stop=writer.unit_range("itm_i2t", u)[1], rows_per_unit=lay.rows_per_chunk, batch_size=batch_size
        )
    )
    sdir = scratch_dir(writer)
    text_states = TextStateCache(teacher, captions, block=batch_size) if supports_text_states(teacher) else None

    def make(unit: int) -> Callable[[], dict[str, Any]]:
        a, b = writer.unit_range("itm_i2t", unit)
        p = int(img_off[b] - img_off[a])
        return lambda: {
            "itm": np.full((b - a, k, 2), np.nan, np.float32),
            "fused": np.full((b - a, k, fdim), np.nan, np.float32),
            "s_itm": np.full((p, 2), np.nan, np.float32),
            "s_fused": np.full((p, fdim), np.nan, np.float32),
        }

    def score(unit: int, buf: dict[str, Any], rows: list[int], image_tokens: torch.Tensor) -> None:
        """Every pair of the images ``rows`` (their tokens [n, L, C]) into ``buf``."""
        a = writer.unit_range("itm_i2t", unit)[0]
        local, texts, dest = [], [], []
        for li, row in enumerate(rows):  # a fixed order: i2t pairs, then t2i pairs, image by image
            for j in range(k):
                if idx_i2t[row, j] >= 0:
                    local.append(li)
                    texts.append(int(idx_i2t[row, j]))
                    dest.append((0, row - a, j))
            for r in range(int(img_off[row]), int(img_off[row + 1])):
                local.append(li)
                texts.append(int(order[r] // k))
                dest.append((1, r - int(img_off[a]), 0))
        for s in range(0, len(local), batch_size):
            sl = slice(s, s + batch_size)
            sel = torch.as_tensor(local[sl], device=image_tokens.device)
            with autocast(device, precision):
                if text_states is not None:
                    text_tokens, mask = text_states.get(texts[sl])
                    itm, fused = teacher.itm_from_text_tokens(image_tokens[sel], text_tokens, mask)
                else:
                    tok = {kk: v.to(device) for kk, v in teacher.tokenize([captions[t] for t in texts[sl]]).items()}
                    itm, fused = teacher.itm_from_tokens(image_tokens[sel], tok)
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

    def commit(unit: int, full: dict[str, Any]) -> None:
        a, b = writer.unit_range("itm_i2t", unit)
        check_itm(full["itm"], keys[a:b], "i2t_itm_logits")
        check_itm(full["s_itm"], None, "t2i_itm_logits")
        writer.write("i2t_itm_logits", a, full["itm"], check=False)
        writer.write_fused("i2t", a, full["fused"], keys=keys[a:b])
        save_scratch(sdir / f"t2i_itm_{unit:06d}.npy", full["s_itm"])
        if lay.has_fused:
            save_scratch(sdir / f"t2i_fused_{unit:06d}.npy", full["s_fused"].astype(scratch_dtype))
        writer.mark_done("itm_i2t", unit)
        writer.mark_done("itm_scratch", unit)
        if tokens is not None:
            tokens.drop(unit)  # committed: its tokens are no longer needed

    recompute = []
    for unit in todo:
        kept = tokens.load(unit) if tokens is not None else None
        if kept is None:
            recompute.append(unit)
            continue
        buf = make(unit)()
        for rows, image_tokens in kept:
            if rows:
                score(unit, buf, rows, image_tokens.to(device))
        commit(unit, buf)

    for unit, slot_rows, batch_images, _ in images.batches(
        todo_units=recompute,
        rows_per_unit=lay.rows_per_chunk,
        batch_size=batch_size,
        description="pass 3a: ITM per image",
    ):
        buf = acc.get(unit, make(unit))
        ok = [i for i, im in enumerate(batch_images) if im is not None]
        if ok:
            batch = torch.stack([batch_images[i] for i in ok]).to(device)
            with autocast(device, precision):
                image_tokens = teacher.image_tokens(batch)
            score(unit, buf, [slot_rows[i] for i in ok], image_tokens)
        full = acc.slot_done(unit)
        if full is not None:
            commit(unit, full)


def pass_itm_texts(writer: CacheWriter, *, progress: ProgressFn, rank: int = 0, world_size: int = 1) -> None:
    """Pass 3b: for every text unit of this rank not yet done, gather its t2i pairs' results from the scratch files
    and write ``t2i_itm_logits`` [N_t, k, 2] float32 and ``t2i_fused`` [N_t, k, C]. Needs every ``itm_scratch``
    unit done. No teacher: pure reads and writes.

    Raises:
        NonFiniteError: an fp16 overflow of a fused feature (names the text key).
    """
    todo = owned_units(~writer.done("itm_t2i"), rank=rank, world_size=world_size)
    if not todo:
        return
    lay = writer.layout
    g = writer.group
    plan = pair_plan(writer)
    pair_rank, img_off, k = plan["rank"], plan["img_off"], lay.k
    idx_t2i = np.asarray(g["t2i_idx"][:], dtype=np.int64)
    sdir = scratch_dir(writer)
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
        image_rows = idx_t2i[a:b][t, j]
        ranks = pair_rank[(t + a) * k + j]
        img_units = image_rows // rpc
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


__all__ = [
    "TOKEN_SCRATCH_MAX_BYTES",
    "TokenScratch",
    "check_itm",
    "pair_plan",
    "pass_itm_images",
    "pass_itm_texts",
    "save_scratch",
    "scratch_dir",
    "token_scratch_for",
]
