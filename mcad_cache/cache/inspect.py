"""Inspecting a cache: ``describe_cache`` (the summary of ``mcad-cache inspect``) and ``check_cache`` (the
consistency checks of ``inspect --check``)."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import zarr

from mcad_cache.cache.reader import CacheReader
from mcad_cache.cache.schema import BUILD_GROUP, array_specs
from mcad_cache.views import views_summary


def _nbytes(arr: zarr.Array) -> int:
    try:
        return int(arr.nbytes_stored())
    except (AttributeError, NotImplementedError, TypeError):
        return 0


def describe_cache(reader: CacheReader) -> dict[str, Any]:
    """Summary for ``inspect``: manifest, per-array shape / dtype / stored bytes, bytes per sample, statistics.

    Statistics are over valid rows: min / max / mean of similarities and ITM logits, mean L2 norm of embeddings,
    fraction of positives among candidates, fraction of filled candidate slots.
    """
    arrays = {}
    total = 0
    for name in sorted(array_specs(reader.layout)):
        arr = reader.array(name)
        stored = _nbytes(arr)
        total += stored
        arrays[name] = {
            "shape": list(arr.shape),
            "dtype": str(arr.dtype),
            "dims": list(arr.metadata.dimension_names or ()),
            "chunks": list(arr.chunks),
            "stored_bytes": stored,
        }
    n = max(1, reader.num_images)
    stats: dict[str, Any] = {}
    iv, tv = reader.image_valid, reader.text_valid
    stats["valid_images"] = int(iv.sum())
    stats["valid_texts"] = int(tv.sum())
    for which, valid in (("image", iv), ("text", tv)):
        emb = reader.image_emb() if which == "image" else reader.text_emb()
        if valid.any():
            stats[f"{which}_emb_norm_mean"] = float(np.linalg.norm(emb[valid], axis=1).mean())
    for d, valid in (("i2t", iv), ("t2i", tv)):
        res = reader.topk(d, np.nonzero(valid)[0], fused=False)
        filled = res["valid"]
        if filled.any():
            s = res["sims"][filled]
            stats[f"{d}_sims"] = {"min": float(s.min()), "max": float(s.max()), "mean": float(s.mean())}
            stats[f"{d}_positive_fraction"] = float(res["is_positive"][filled].mean())
            stats[f"{d}_queries_with_positive"] = float(res["is_positive"].any(axis=1).mean())
            if "itm_logits" in res:
                m = res["itm_logits"][..., 1][filled] - res["itm_logits"][..., 0][filled]
                stats[f"{d}_itm_margin"] = {"min": float(m.min()), "max": float(m.max()), "mean": float(m.mean())}
        stats[f"{d}_filled_fraction"] = float(filled.mean()) if filled.size else 0.0
    return {
        "path": str(reader.path),
        "manifest": reader.manifest,
        "arrays": arrays,
        "stored_bytes": total,
        "bytes_per_sample": total / n,
        "stats": stats,
        **views_summary(reader.manifest.get("views"), arrays=arrays, num_images=n),  # issue 16: V, spec, bytes
    }


def check_cache(reader: CacheReader, *, fused: bool = True) -> list[str]:
    """Consistency checks of ``inspect --check``; returns one line per problem (empty: all good).

    Checks: manifest complete; every build unit done; key uniqueness (images and texts); maps (offsets monotone from
    0 to N_t, ``txt2img`` consistent with them, text keys ``<image key>#<j>``); validity (text valid iff its image is
    valid; valid rows have finite, unit-norm embeddings; invalid rows are NaN); candidate ids in range, valid, unique
    per row and -1 only in trailing slots; similarities finite where ids are set, NaN elsewhere, sorted descending and
    equal to the dot product of the stored embeddings (fp16 tolerance); ``is_positive`` equal to the maps; ITM logits
    and fused features finite where ids are set.

    Args:
        reader: the cache.
        fused: also scan the fused features (the one check that reads ``N x k x C`` values; ``eval --model CACHE``
            turns it off: evaluation does not read them).
    """
    problems: list[str] = []
    lay = reader.layout
    if not reader.complete:
        problems.append("manifest: complete is not true (interrupted build)")
    try:
        build = reader.group[BUILD_GROUP]
        for name in build.array_keys():
            try:
                done = np.asarray(build[name][:])
            except Exception as err:  # noqa: BLE001  (a half-written marker chunk: codec errors have no common class)
                problems.append(f"build/{name}: unreadable done marker(s) ({type(err).__name__}); resume the build")
                continue
            if not done.all():
                problems.append(f"build/{name}: {int((~done).sum())} of {done.size} unit(s) not done")
    except KeyError:
        problems.append("build group missing")
    ik, tk = reader.image_keys, reader.text_keys
    for which, keys in (("image_keys", ik), ("text_keys", tk)):
        vals = [str(x) for x in keys.tolist()]
        if len(set(vals)) != len(vals):
            dup = sorted(x for x, c in Counter(vals).items() if c > 1)[:5]
            problems.append(f"{which}: {len(vals) - len(set(vals))} duplicate key(s), e.g. {dup}")
        if any(v == "" for v in vals):
            problems.append(f"{which}: empty key(s)")
    off, t2i_map = reader.img2txt_offsets.astype(np.int64), reader.txt2img.astype(np.int64)
    if off[0] != 0 or off[-1] != lay.num_texts or (np.diff(off) < 1).any():
        problems.append("img2txt_offsets: not 0..N_t with >= 1 caption per image")
    else:
        expect = np.repeat(np.arange(lay.num_images), np.diff(off))
        if not np.array_equal(expect, t2i_map):
            problems.append("txt2img: disagrees with img2txt_offsets")
        else:
            j = np.arange(lay.num_texts) - off[t2i_map]
            want = [f"{ik[i]}#{jj}" for i, jj in zip(t2i_map.tolist(), j.tolist(), strict=True)]
            if [str(x) for x in tk.tolist()] != want:
                problems.append("text_keys: not '<image key>#<caption index>' in row order")
    iv, tv = reader.image_valid, reader.text_valid
    if (t2i_map >= 0).all() and t2i_map.size and not np.array_equal(tv, iv[t2i_map]):
        problems.append("text_valid: differs from image_valid of the text's image")
    for which, emb, valid in (("image_emb", reader.image_emb(), iv), ("text_emb", reader.text_emb(), tv)):
        if valid.any():
            ev = emb[valid]
            if not np.isfinite(ev).all():
                problems.append(f"{which}: non-finite values in {int((~np.isfinite(ev).all(1)).sum())} valid row(s)")
            else:
                norms = np.linalg.norm(ev, axis=1)
                if np.abs(norms - 1).max() > 1e-2:
                    lo, hi = norms.min(), norms.max()
                    problems.append(f"{which}: valid rows not L2-normalised (norms {lo:.4f}..{hi:.4f})")
        if (~valid).any() and not np.isnan(emb[~valid]).all():
            problems.append(f"{which}: invalid rows hold values (expected NaN)")
    for d, n_gal, q_valid, g_valid in (
        ("i2t", lay.num_texts, iv, tv),
        ("t2i", lay.num_images, tv, iv),
    ):
        n_q = q_valid.shape[0]
        res = reader.topk(d, np.arange(n_q), fused=False)
        idx, sims, pos = res["idx"].astype(np.int64), res["sims"], res["is_positive"]
        filled = idx >= 0
        if ((idx < -1) | (idx >= n_gal)).any():
            problems.append(f"{d}_idx: ids outside [-1, {n_gal})")
            continue
        if (filled[~q_valid]).any():
            problems.append(f"{d}_idx: invalid query rows have candidates")
        if filled.any() and not g_valid[idx[filled]].all():
            problems.append(f"{d}_idx: candidates that are invalid rows")
        if (np.diff(filled.astype(np.int8), axis=1) > 0).any():
            problems.append(f"{d}_idx: -1 slots before filled ones")
        srt = np.sort(np.where(filled, idx, -np.arange(1, lay.k + 1)[None, :] - 1), axis=1)
        if (np.diff(srt, axis=1) == 0).any():
            problems.append(f"{d}_idx: a candidate repeated within a row")
        if not np.isfinite(sims[filled]).all() or not np.isnan(sims[~filled]).all():
            problems.append(f"{d}_sims: not finite exactly where ids are set")
        s_f = np.where(filled, sims, -np.inf)
        with np.errstate(invalid="ignore"):  # -inf - -inf in trailing empty slots
            unsorted = (np.diff(s_f, axis=1) > 1e-6).any()
        if unsorted:
            problems.append(f"{d}_sims: rows not sorted in descending order")
        if q_valid.any() and filled.any():
            q_emb = reader.image_emb() if d == "i2t" else reader.text_emb()
            g_emb = reader.text_emb() if d == "i2t" else reader.image_emb()
            qr, sl = np.nonzero(filled)
            err = 0.0
            for s in range(0, qr.size, 65536):  # bounded memory: [65536, D] at a time
                q_s, s_s = qr[s : s + 65536], sl[s : s + 65536]
                dots = np.einsum("nd,nd->n", q_emb[q_s], g_emb[idx[q_s, s_s]])
                err = max(err, float(np.abs(dots - sims[q_s, s_s]).max()))
            if err > 1e-3:
                problems.append(f"{d}_sims: differ from the stored embeddings' dot products by up to {err:.2e}")
        owner = np.arange(n_q)[:, None] if d == "i2t" else t2i_map[:, None]
        if d == "i2t":
            truth = filled & (t2i_map[np.where(filled, idx, 0)] == owner)
        else:
            truth = filled & (idx == owner)
        if not np.array_equal(truth, pos):
            problems.append(f"{d}_is_positive: disagrees with the caption-image maps")
        if reader.kind == "single":
            itm = res["itm_logits"]
            if not np.isfinite(itm[filled]).all() or not np.isnan(itm[~filled]).all():
                problems.append(f"{d}_itm_logits: not finite exactly where ids are set")
        if lay.has_fused and fused:
            bad_rows = 0
            for start in range(0, n_q, lay.rows_per_chunk):
                rows = np.arange(start, min(start + lay.rows_per_chunk, n_q))
                f = reader.fused(d, rows)
                ff = filled[rows]
                if not np.isfinite(f[ff]).all() or not np.isnan(f[~ff]).all():
                    bad_rows += 1
            if bad_rows:
                problems.append(f"{d}_fused: not finite exactly where ids are set ({bad_rows} unit(s))")
    return problems


__all__ = ["check_cache", "describe_cache"]
