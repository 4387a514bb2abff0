"""The two parent caches of an integration run, joined by key into teacher-side tensors (``losses.TeacherTargets``).

Rows are addressed in the dual-stream (CLIP) parent's order, which is also the derived cache's order. Candidates
come from the single-stream parent (it holds the ITM logits and fused [CLS] of its top-k pairs); their CLIP
embeddings are found by key in the CLIP parent, never by row position.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from mcad_cache.cache import CacheReader
from mcad_cache.cache.manifest import fingerprint_diff, format_diff
from mcad_cache.errors import CacheMismatchError, CacheSchemaError
from mcad_cache.losses import TeacherTargets, duplicate_positives, itm_scores

VIEW_FIELDS = ("image_size", "resize_mode", "crop")  # what makes two image views different pixels


def check_caches_match(clip: Any, single: Any) -> None:
    """The two teachers' caches must hold the same image and text keys (rows may be ordered differently).

    Raises:
        CacheMismatchError: the key sets differ; names a few keys on each side.
    """
    for what in ("image_keys", "text_keys"):
        a = {str(x) for x in getattr(clip, what).tolist()}
        b = {str(x) for x in getattr(single, what).tolist()}
        if a != b:
            only_a, only_b = sorted(a - b)[:5], sorted(b - a)[:5]
            raise CacheMismatchError(
                f"the caches {clip.path} and {single.path} hold different {what}: {len(a - b)} only in the first "
                f"(e.g. {only_a}), {len(b - a)} only in the second (e.g. {only_b}); build both on the same shards"
            )


def teacher_view(reader: Any) -> dict[str, Any]:
    """The image view a cache's teacher saw: ``{image_size, resize_mode, crop}`` from its recorded preprocessing."""
    pre = dict(reader.fingerprint.get("preprocess", {}) or {})
    return {k: pre.get(k) for k in VIEW_FIELDS if k in pre}


def view_diff(found: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    """Readable lines for the view fields that differ (``fingerprint_diff`` over :data:`VIEW_FIELDS`)."""
    return fingerprint_diff({k: found.get(k) for k in VIEW_FIELDS}, {k: expected.get(k) for k in VIEW_FIELDS})


def caption_ids(captions: np.ndarray) -> np.ndarray:
    """int64 [N_t]: one id per distinct caption text after ``strip().lower()`` (as ``duplicate_positives``)."""
    ids: dict[str, int] = {}
    return np.fromiter((ids.setdefault(str(c).strip().lower(), len(ids)) for c in captions.tolist()), np.int64)


class Parents:
    """Both parents, checked and joined by key.

    Args:
        clip: the dual-stream parent (complete).
        single: the single-stream parent (complete, with fused features).
    Raises:
        CacheSchemaError: a parent of the wrong kind, or a single-stream parent without fused features.
        CacheMismatchError: the parents hold different keys or captions, or saw different image views.
    """

    def __init__(self, clip: CacheReader, single: CacheReader) -> None:
        if clip.kind != "dual":
            raise CacheSchemaError(
                f"{clip.path}: the first parent must be a dual-stream (CLIP) cache, found {clip.kind}"
            )
        if single.kind != "single":
            raise CacheSchemaError(f"{single.path}: expected a single-stream (ALBEF/BLIP) cache, found {single.kind}")
        if not single.layout.has_fused:
            raise CacheSchemaError(
                f"{single.path}: no fused [CLS] features stored (built with --fused-dtype none); modified features "
                "need them: rebuild it with --fused-dtype fp16 or int8"
            )
        check_caches_match(clip, single)
        self.clip, self.single = clip, single
        self.img_c2s = single.image_rows(clip.image_keys).astype(np.int64)
        self.txt_c2s = single.text_rows(clip.text_keys).astype(np.int64)
        self.img_s2c = clip.image_rows(single.image_keys).astype(np.int64)
        self.txt_s2c = clip.text_rows(single.text_keys).astype(np.int64)
        if not np.array_equal(single.captions[self.txt_c2s], clip.captions):
            raise CacheMismatchError(f"{clip.path} and {single.path} store different caption texts for the same keys")
        self.image_valid = clip.image_valid & single.image_valid[self.img_c2s]
        self.text_valid = clip.text_valid & single.text_valid[self.txt_c2s]
        self.k = min(clip.k, single.k)
        self.caption_id = caption_ids(clip.captions)
        self.txt2img = clip.txt2img.astype(np.int64)
        self.offsets = clip.img2txt_offsets.astype(np.int64)
        self.clip_dim = clip.layout.emb_dim
        self.fused_dim = single.layout.fused_dim
        self._image_emb = clip.image_emb()
        self._text_emb = clip.text_emb()

    def views(self) -> dict[str, dict[str, Any]]:
        """Each parent's teacher view (``teacher_view``)."""
        return {"clip": teacher_view(self.clip), "single": teacher_view(self.single)}

    # ---------------------------------------------------------------------------------------------- one direction
    def direction(
        self, direction: str, rows: np.ndarray, *, k: int, force_positive: bool = False, itm_score: str = "pos_logit"
    ) -> dict[str, Any]:
        """Teacher-side tensors of query ``rows`` (CLIP order) for one direction, over ``k`` candidates.

        Args:
            direction: ``"i2t"`` (rows are image rows) or ``"t2i"`` (text rows).
            rows: [B] int query rows of the CLIP parent.
            k: candidates kept (``<=`` both parents' k).
            force_positive: a query without a positive among its first k gets its best-ITM positive among the
                parent's cached K in the last slot (our choice of slot).
            itm_score: how ITM logits become a score (``losses.itm_scores``), to pick the best-ITM positive.
        Returns:
            ``query_emb`` [B, Dc], ``cand_emb`` [B, k, Dc] CLIP embeddings; ``itm_logits`` [B, k, 2];
            ``fused`` [B, k, C]; ``ss_sims`` [B, k] the single-stream ITC cosines; ``valid``, ``is_positive``
            (duplicate caption texts included), ``forced`` [B, k] bool; ``cand_rows`` [B, k] int64 candidate
            rows in CLIP order (-1 = empty) — all CPU tensors / numpy.
        """
        rows = np.asarray(rows, dtype=np.int64)
        srows = self.img_c2s[rows] if direction == "i2t" else self.txt_c2s[rows]
        top = self.single.topk(direction, srows, fused=True)
        idx = top["idx"].astype(np.int64)
        valid = idx >= 0
        cand = np.where(valid, (self.txt_s2c if direction == "i2t" else self.img_s2c)[np.where(valid, idx, 0)], -1)
        cand_ok = valid & (
            self.text_valid[np.maximum(cand, 0)] if direction == "i2t" else self.image_valid[np.maximum(cand, 0)]
        )
        cand = np.where(cand_ok, cand, -1)
        pos = self._positives(direction, rows, cand)
        itm, fused, ss_sims = top["itm_logits"], top["fused_cls"], top["sims"]
        forced = np.zeros_like(cand_ok)
        if force_positive and k < idx.shape[1]:
            score = itm_scores(torch.from_numpy(np.nan_to_num(itm)), kind=itm_score).numpy()
            score = np.where(pos, score, -np.inf)
            need = ~pos[:, :k].any(1) & pos[:, k:].any(1)
            for b in np.nonzero(need)[0]:
                j = int(np.argmax(score[b]))
                for arr in (cand, pos, itm, fused, ss_sims):
                    arr[b, k - 1] = arr[b, j]
                forced[b, k - 1] = True
        cand, pos, itm, fused, forced = cand[:, :k], pos[:, :k], itm[:, :k], fused[:, :k], forced[:, :k]
        ss_sims = ss_sims[:, :k]
        valid = cand >= 0
        safe = np.maximum(cand, 0)
        gallery = self._text_emb if direction == "i2t" else self._image_emb
        queries = self._image_emb if direction == "i2t" else self._text_emb
        cand_emb = np.where(valid[..., None], gallery[safe], 0.0)
        return {
            "query_emb": torch.from_numpy(np.ascontiguousarray(queries[rows], dtype=np.float32)),
            "cand_emb": torch.from_numpy(np.ascontiguousarray(cand_emb, dtype=np.float32)),
            "itm_logits": torch.from_numpy(np.ascontiguousarray(np.where(valid[..., None], itm, 0.0), np.float32)),
            "fused": torch.from_numpy(np.ascontiguousarray(np.where(valid[..., None], fused, 0.0), np.float32)),
            "ss_sims": torch.from_numpy(np.ascontiguousarray(np.where(valid, ss_sims, 0.0), np.float32)),
            "valid": torch.from_numpy(valid),
            "is_positive": torch.from_numpy(pos & valid),
            "forced": forced & valid,
            "cand_rows": cand,
        }

    def _positives(self, direction: str, rows: np.ndarray, cand: np.ndarray) -> np.ndarray:
        """[B, K] bool: the candidate is a ground-truth pair of the query, or has the same caption text."""
        safe = np.maximum(cand, 0)
        if direction == "i2t":
            same = self.txt2img[safe] == rows[:, None]
            texts = [set(self.caption_id[self.offsets[r] : self.offsets[r + 1]].tolist()) for r in rows.tolist()]
            dup = np.array([[int(c) in s for c in self.caption_id[safe[b]]] for b, s in enumerate(texts)], dtype=bool)
        else:
            same = safe == self.txt2img[rows][:, None]
            qid = self.caption_id[rows]
            dup = np.zeros(cand.shape, dtype=bool)
            for b in range(cand.shape[0]):
                for j, img in enumerate(safe[b].tolist()):
                    dup[b, j] = qid[b] in self.caption_id[self.offsets[img] : self.offsets[img + 1]]
        return (same | dup) & (cand >= 0)

    # ---------------------------------------------------------------------------------------------- training batch
    def batch(
        self, image_rows: np.ndarray, text_rows: np.ndarray, *, k: int, itm_score: str = "pos_logit"
    ) -> tuple[TeacherTargets, Tensor]:
        """``TeacherTargets`` of B anchor pairs (image row i with text row i, CLIP order), both directions, plus the
        [B, B] in-batch positives (same sample or same caption text)."""
        i2t = self.direction("i2t", image_rows, k=k, itm_score=itm_score)
        t2i = self.direction("t2i", text_rows, k=k, itm_score=itm_score)
        t = TeacherTargets(
            clip_image_emb=i2t["query_emb"],
            clip_text_emb=t2i["query_emb"],
            clip_logit_scale=float(self.clip.logit_scale),
            clip_topk_text_emb=i2t["cand_emb"],
            clip_topk_image_emb=t2i["cand_emb"],
            itm_logits_i2t=i2t["itm_logits"],
            itm_logits_t2i=t2i["itm_logits"],
            fused_cls_i2t=i2t["fused"],
            fused_cls_t2i=t2i["fused"],
            valid_i2t=i2t["valid"],
            valid_t2i=t2i["valid"],
            is_positive_i2t=i2t["is_positive"],
            is_positive_t2i=t2i["is_positive"],
        )
        keys = [str(x) for x in self.clip.image_keys[image_rows].tolist()]
        caps = [str(x) for x in self.clip.captions[text_rows].tolist()]
        return t, duplicate_positives(keys, caps)

    def fingerprints(self) -> dict[str, Any]:
        """Both parents' fingerprints (what the derived cache records, and compares on a rerun)."""
        return {"clip": self.clip.fingerprint, "single": self.single.fingerprint}


def parents_diff(recorded: dict[str, Any], now: dict[str, Any]) -> str:
    """A readable diff of recorded vs current parent fingerprints ('' when equal)."""
    lines = fingerprint_diff(recorded, now)
    return format_diff(lines) if lines else ""


__all__ = ["VIEW_FIELDS", "Parents", "caption_ids", "check_caches_match", "parents_diff", "teacher_view", "view_diff"]
