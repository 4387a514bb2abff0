"""Join streamed training samples with cached teacher targets, by key; fetch the cached candidates by id.

This module sits above both ``data`` and ``cache`` (which never import each other) and beside ``losses``. It also
opens and checks the run's caches against the run's shards (:func:`open_caches`).

Per batch (B usable samples of the stream, in stream order):

1. **Anchor caption.** Each image gets one of its captions as its anchor, drawn with the step's generator
   (``train.step_generator(seed, step)``); the anchor's text row in a cache is the row of key ``"<sample key>#<j>"``.
2. **Key checks.** Every sample key is looked up in each cache (``CacheKeyError`` names missing keys); the cached
   caption count and the anchor's cached caption string must equal the streamed ones (``CacheMismatchError`` names
   the key), so a cache built on other data cannot be joined silently.
3. **Candidates** come from the single-stream cache when there is one, else from the CLIP cache: K candidate text
   rows per image query and K candidate image rows per anchor-caption query. They are fetched **by id**: caption
   strings from the candidate cache's ``captions`` array; images by sample key through :class:`CandidateImages`
   (a ``data.ShardIndex``), deduplicated within the batch and never re-read when the image is already an anchor.
4. **CLIP targets** for the candidates are found by key in the CLIP cache (``text_rows`` / ``image_rows`` of the
   candidate keys), never by row position: the two caches may order rows differently.

5. **Teacher-only directions.** A direction whose student top-k term is off (``w_topk_t2i = 0``) is still joined
   when the loss reads a teacher field of it (the modified-features module modifies both sides), without fetching
   candidate pixels or captions for the student.
6. **In-batch positives.** ``TeacherTargets.positives = duplicate_positives(keys, anchor captions)``: the same caption
   text on two images is a positive in ITC, not a negative.

**Derived caches** (``mcad-cache integrate``) hold fixed targets: a run given one reads its target features as the
in-batch / feature targets, its stored log-probabilities as the top-k targets (``TeacherTargets.topk_logits_*``)
and its candidates; the parents it was made from are then only checked (a stale parent is refused with a diff).

The student side (``distill.forward.distill_forward``) encodes anchors and candidates and assembles
``losses.StudentOutputs``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mcad_cache.cache import CacheReader, open_cache
from mcad_cache.data.decode import DecodePolicy, decode_image
from mcad_cache.data.identity import shard_records, shard_records_diff
from mcad_cache.data.index import ShardIndex
from mcad_cache.distill.batch import DistillBatch
from mcad_cache.distill.views import ViewTargets
from mcad_cache.errors import CacheMismatchError, CacheSchemaError, ConfigError, NonFiniteError
from mcad_cache.integrate.derived import DerivedReader, is_derived, open_derived
from mcad_cache.integrate.parents import VIEW_FIELDS, check_caches_match, parents_diff, teacher_view
from mcad_cache.losses import LossConfig, TeacherTargets, duplicate_positives

# TeacherTargets fields a derived cache serves (everything else comes from teacher caches)
DERIVED_FIELDS = {
    "clip_image_emb", "clip_text_emb", "clip_logit_scale", "topk_logits_i2t", "topk_logits_t2i",
    "valid_i2t", "valid_t2i", "is_positive_i2t", "is_positive_t2i",
}  # fmt: skip

_logger = logging.getLogger(__name__)


class CandidateImages:
    """Candidate images by sample key: tar offsets from a ``ShardIndex``, the shared decode path, a transform.

    Args:
        shards: the training shards (paths, globs, brace patterns), or their ``ShardIndex``.
        transform: the student's ``make_image_transform(preprocess_cfg)``.
        policy: the run's decode policy (the stream's).
        threads: decode threads (PIL releases the GIL while decoding and resizing); 1 = inline.
    """

    def __init__(
        self,
        shards: str | Iterable[str] | ShardIndex,
        *,
        transform: Callable[[Any], Tensor],
        policy: DecodePolicy | None = None,
        threads: int = 1,
    ) -> None:
        self.index = shards if isinstance(shards, ShardIndex) else ShardIndex(shards)
        self.transform = transform
        self.policy = policy or DecodePolicy()
        self.threads = max(1, int(threads))
        self._pool: Any = None

    def _one(self, data: bytes) -> Tensor:
        return self.transform(decode_image(data, policy=self.policy))

    def __call__(self, keys: list[str]) -> Tensor:
        """[len(keys), 3, H, W] float32 images of ``keys``, in order.

        Raises:
            KeyError: a key not in the shards; SampleSkip: an image that no longer decodes.
        """
        blobs = [self.index.read_image_bytes(k) for k in keys]  # file reads stay in the calling thread
        if self.threads == 1 or len(keys) < 2:
            return torch.stack([self._one(b) for b in blobs])
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="mcad-candidates")
        return torch.stack(list(self._pool.map(self._one, blobs)))


def _t(x: np.ndarray, dtype: torch.dtype = torch.float32) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(x)).to(dtype)


def _finite_where_valid(name: str, values: Tensor, valid: Tensor, keys: list[str]) -> Tensor:
    """Zero the invalid slots (NaN by the cache's contract); a non-finite valid slot is an error naming the key."""
    v = valid.reshape(valid.shape + (1,) * (values.ndim - valid.ndim))
    bad = ~torch.isfinite(values) & v
    if bool(bad.any()):
        row = int(torch.nonzero(bad.reshape(bad.shape[0], -1).any(1))[0])
        raise NonFiniteError(f"cached {name} has a non-finite value for the valid candidate of sample {keys[row]!r}")
    return torch.where(v, values, torch.zeros((), dtype=values.dtype))


class TargetJoiner:
    """Builds :class:`DistillBatch` objects from collated stream batches and the caches.

    Args:
        clip: the dual-stream (CLIP) ``CacheReader``, or a ``DerivedReader`` (fixed targets of ``mcad-cache
            integrate``), or None when the loss needs no teacher (``contrastive``).
        single: the single-stream ``CacheReader``, or None.
        loss_config: decides which targets are read (``LossConfig.required_inputs()``).
        k: candidates per query (``<=`` each cache's k).
        candidate_images: ``keys -> [n, 3, H, W]`` (a :class:`CandidateImages`), needed for t2i top-k terms.
        tokenize: the student's ``tokenize``; when given, captions are tokenized here (off the training step).
    Raises:
        CacheSchemaError: k larger than a cache's k; a preset that needs a single-stream cache without one, or fixed
            targets without a derived cache, or fields a derived cache does not hold (named); a cache of the wrong
            kind in a slot.
    """

    def __init__(
        self,
        *,
        clip: CacheReader | None,
        single: CacheReader | None,
        loss_config: LossConfig,
        k: int,
        candidate_images: Callable[[list[str]], Tensor] | None = None,
        tokenize: Callable[[list[str]], dict[str, Tensor]] | None = None,
    ) -> None:
        need = loss_config.required_inputs()
        self.need_student = need["student"]
        self.need_teacher = need["teacher"]
        if clip is not None and clip.kind not in ("dual", "derived"):
            raise CacheSchemaError(f"{clip.path}: expected a dual-stream (CLIP) cache, found kind={clip.kind!r}")
        self.derived = clip is not None and clip.kind == "derived"
        fixed = {f for f in self.need_teacher if f.startswith("topk_logits_")}
        if fixed and not self.derived:
            raise CacheSchemaError(
                f"the loss reads fixed targets ({sorted(fixed)}) from a derived cache: run `mcad-cache integrate "
                "--cache CLIP_CACHE --cache SINGLE_CACHE --out TARGETS` and pass --cache TARGETS (or use "
                "--preset mcad-online to train the integration module inside this run)"
            )
        if self.derived and self.need_teacher - DERIVED_FIELDS:
            raise CacheSchemaError(
                f"{clip.path} is a derived cache; it does not hold {sorted(self.need_teacher - DERIVED_FIELDS)} that "
                f"this loss reads (integration {loss_config.integration!r}); pass the teacher caches instead"
            )
        if single is not None and single.kind != "single":
            raise CacheSchemaError(f"{single.path}: expected a single-stream cache, found kind={single.kind!r}")
        if self.need_teacher and clip is None:
            raise CacheSchemaError(f"the loss needs a dual-stream (CLIP) cache for {sorted(self.need_teacher)}")
        ss_fields = {"itm_logits_i2t", "itm_logits_t2i", "fused_cls_i2t", "fused_cls_t2i", "ss_sims_i2t", "ss_sims_t2i"}
        if single is None and self.need_teacher & ss_fields:
            raise CacheSchemaError(
                f"the loss needs a single-stream (ALBEF/BLIP) cache for {sorted(self.need_teacher & ss_fields)}; "
                "pass a second --cache built with --teacher albef or blip"
            )
        self.clip, self.single = clip, single
        self.cand = single if single is not None else clip
        self.k = int(k)
        self.directions = [
            d for d, cand in (("i2t", "text"), ("t2i", "image")) if f"topk_{cand}_emb" in self.need_student
        ]  # directions whose candidates the student encodes
        self.teacher_directions = [
            d for d in ("i2t", "t2i") if d in self.directions or any(f.endswith(f"_{d}") for f in self.need_teacher)
        ]  # directions with any teacher field read (the student may encode none of their candidates)
        for reader in (r for r in (clip, single) if r is not None):
            if self.k > reader.k:  # every preset: a run never records a k its caches cannot serve
                raise CacheSchemaError(
                    f"{reader.path}: requested k={self.k}, but the cache holds k={reader.k} candidates per query; "
                    f"use --k {reader.k} or less, or rebuild the cache with --k {self.k}"
                )
        if "t2i" in self.directions and candidate_images is None:
            raise ValueError("t2i top-k distillation needs candidate_images (keys -> images)")
        self.candidate_images = candidate_images
        self.tokenize = tokenize
        self.views: ViewTargets | None = None  # issue 16: targets of replayed views (distill.views.attach_views)
        if clip is not None and single is not None:
            check_caches_match(clip, single)

    # ------------------------------------------------------------------------------------------------ helpers
    def _anchors(self, keys: list[str], captions: list[list[str]], generator: torch.Generator) -> list[int]:
        counts = torch.tensor([len(c) for c in captions], dtype=torch.float64)
        if bool((counts == 0).any()):
            raise CacheMismatchError(f"sample {keys[int((counts == 0).nonzero()[0])]!r} has no caption")
        draws = torch.rand(len(keys), generator=generator, dtype=torch.float64)
        return (draws * counts).floor().long().clamp(max=counts.long() - 1).tolist()

    def _check_reader(
        self, reader: CacheReader, keys: list[str], captions: list[list[str]], anchors: list[int]
    ) -> tuple:
        img_rows = reader.image_rows(keys)  # CacheKeyError names missing keys
        found = reader.image_keys[img_rows]
        for key, got in zip(keys, found.tolist(), strict=True):
            if str(got) != key:  # the reader's own invariant; cheap to re-check on every batch
                raise CacheMismatchError(f"{reader.path}: row of key {key!r} holds key {got!r}")
        offsets = reader.img2txt_offsets
        n_cached = offsets[img_rows + 1] - offsets[img_rows]
        text_keys = [f"{k}#{j}" for k, j in zip(keys, anchors, strict=True)]
        txt_rows = reader.text_rows(text_keys)
        cached_caps = reader.captions[txt_rows]
        for b, key in enumerate(keys):
            if int(n_cached[b]) != len(captions[b]):
                raise CacheMismatchError(
                    f"{reader.path}: sample {key!r} has {len(captions[b])} caption(s) in the shards but "
                    f"{int(n_cached[b])} in the cache; the cache was built on other data"
                )
            if str(cached_caps[b]) != captions[b][anchors[b]]:
                raise CacheMismatchError(
                    f"{reader.path}: caption {anchors[b]} of sample {key!r} differs between the shards "
                    f"({captions[b][anchors[b]]!r}) and the cache ({str(cached_caps[b])!r})"
                )
        if not bool(reader.image_valid[img_rows].all()):
            bad = keys[int(np.nonzero(~reader.image_valid[img_rows])[0][0])]
            raise CacheMismatchError(f"{reader.path}: sample {bad!r} is marked invalid in the cache but decodes now")
        return img_rows, txt_rows

    # ------------------------------------------------------------------------------------------------ the join
    def __call__(self, batch: Mapping[str, Any], *, generator: torch.Generator) -> DistillBatch:
        """Join one collated stream batch (``data.collate_samples``) with the caches.

        Args:
            batch: ``{"key": list[str], "image": [B, 3, H, W], "captions": list[list[str]], ...}`` (B >= 1 usable).
            generator: the step's generator (anchor caption choice).
        Returns:
            The :class:`DistillBatch`.
        Raises:
            CacheKeyError: a streamed key is not in a cache (named).
            CacheMismatchError: caption count / text differs between shards and cache for a key (named).
            NonFiniteError: a non-finite cached value in a valid slot (names the key).
        """
        keys = [str(k) for k in batch["key"]]
        captions = [list(c) for c in batch["captions"]]
        anchors = self._anchors(keys, captions, generator)
        anchor_texts = [c[j] for c, j in zip(captions, anchors, strict=True)]
        texts = list(anchor_texts)
        t = TeacherTargets()
        rows: dict[str, tuple] = {}
        for name, reader in (("clip", self.clip), ("single", self.single)):
            if reader is not None:
                rows[name] = self._check_reader(reader, keys, captions, anchors)
        topk_text_index = topk_image_index = None
        extra_images = None
        if self.clip is not None:
            clip_img_rows, clip_txt_rows = rows["clip"]
            t.clip_image_emb = _t(self.clip.image_emb(clip_img_rows))
            if self.views is not None:  # issue 16: the cached embedding of the view the student was given
                t.clip_image_emb = self.views.image_emb(clip_img_rows, keys, epoch=int(batch["epoch"]))
            t.clip_text_emb = _t(self.clip.text_emb(clip_txt_rows))
            t.clip_logit_scale = float(self.clip.logit_scale)
            for name, value in (("clip_image_emb", t.clip_image_emb), ("clip_text_emb", t.clip_text_emb)):
                if not bool(torch.isfinite(value).all()):
                    row = int((~torch.isfinite(value)).any(1).nonzero()[0])
                    raise NonFiniteError(f"{self.clip.path}: cached {name} of sample {keys[row]!r} is not finite")
        t.positives = duplicate_positives(keys, anchor_texts)
        if self.single is not None:
            t.ss_logit_scale = float(self.single.logit_scale)
        cand_img_rows, cand_txt_rows = (
            rows["single" if self.single is not None else "clip"] if self.teacher_directions else (None, None)
        )
        for d in self.teacher_directions:
            query_rows = cand_img_rows if d == "i2t" else cand_txt_rows
            need_fused = f"fused_cls_{d}" in self.need_teacher
            top = self.cand.topk(d, query_rows, k=self.k, fused=need_fused)
            valid = _t(top["valid"], torch.bool)
            idx = top["idx"].astype(np.int64)
            safe = np.where(top["valid"], idx, 0)
            setattr(t, f"valid_{d}", valid)
            setattr(t, f"is_positive_{d}", _t(top["is_positive"], torch.bool) & valid)
            if self.derived:
                logits = _finite_where_valid(f"{d}_logits", _t(top["logits"]), valid, keys)
                setattr(t, f"topk_logits_{d}", logits)
            if self.single is not None:
                if "itm_logits" in top:
                    setattr(
                        t, f"itm_logits_{d}", _finite_where_valid(f"{d}_itm_logits", _t(top["itm_logits"]), valid, keys)
                    )
                setattr(t, f"ss_sims_{d}", _finite_where_valid(f"{d}_sims", _t(top["sims"]), valid, keys))
                if need_fused:
                    setattr(t, f"fused_cls_{d}", _finite_where_valid(f"{d}_fused", _t(top["fused_cls"]), valid, keys))
            student_side = d in self.directions
            if d == "i2t" and not student_side:
                cand_keys = [str(x) for x in self.cand.text_keys[safe.reshape(-1)].tolist()]
                clip_rows = self.clip.text_rows(cand_keys) if self.clip is not None and not self.derived else None
                cand_clip_emb = (
                    _t(self.clip.text_emb(clip_rows)).reshape(*idx.shape, -1) if clip_rows is not None else None
                )
            elif d == "t2i" and not student_side:
                cand_keys = [str(x) for x in self.cand.image_keys[safe.reshape(-1)].tolist()]
                clip_rows = self.clip.image_rows(cand_keys) if self.clip is not None and not self.derived else None
                cand_clip_emb = (
                    _t(self.clip.image_emb(clip_rows)).reshape(*idx.shape, -1) if clip_rows is not None else None
                )
            elif d == "i2t":
                cand_keys = [str(x) for x in self.cand.text_keys[safe.reshape(-1)].tolist()]
                cand_caps = [str(x) for x in self.cand.captions[safe.reshape(-1)].tolist()]
                position: dict[str, int] = {}
                index = []
                for cap, ok in zip(cand_caps, top["valid"].reshape(-1).tolist(), strict=True):
                    if not ok:  # empty slot: any row will do, it is masked out of every loss
                        index.append(0)
                        continue
                    if cap not in position:
                        position[cap] = len(texts)
                        texts.append(cap)
                    index.append(position[cap])
                topk_text_index = torch.tensor(index, dtype=torch.long).reshape(idx.shape)
                clip_rows = self.clip.text_rows(cand_keys) if self.clip is not None and not self.derived else None
                cand_clip_emb = (
                    _t(self.clip.text_emb(clip_rows)).reshape(*idx.shape, -1) if clip_rows is not None else None
                )
            else:
                cand_keys = [str(x) for x in self.cand.image_keys[safe.reshape(-1)].tolist()]
                in_batch = {k: b for b, k in enumerate(keys)}
                fetch = sorted(
                    {
                        k
                        for k, ok in zip(cand_keys, top["valid"].reshape(-1).tolist(), strict=True)
                        if ok and k not in in_batch
                    }
                )
                where = dict(in_batch)
                where.update({k: len(keys) + u for u, k in enumerate(fetch)})
                if fetch:
                    assert self.candidate_images is not None
                    extra_images = self.candidate_images(fetch)
                topk_image_index = torch.tensor([where.get(k, 0) for k in cand_keys], dtype=torch.long).reshape(
                    idx.shape
                )
                clip_rows = self.clip.image_rows(cand_keys) if self.clip is not None and not self.derived else None
                cand_clip_emb = (
                    _t(self.clip.image_emb(clip_rows)).reshape(*idx.shape, -1) if clip_rows is not None else None
                )
            if cand_clip_emb is not None:
                cand_clip_emb = _finite_where_valid(f"CLIP {d} candidate embeddings", cand_clip_emb, valid, keys)
                query = t.clip_image_emb if d == "i2t" else t.clip_text_emb
                cand = "text" if d == "i2t" else "image"
                setattr(t, f"clip_topk_{cand}_emb", cand_clip_emb)
                setattr(t, f"clip_topk_sims_{d}", torch.einsum("bd,bkd->bk", query, cand_clip_emb) * valid)
        return DistillBatch(
            keys=keys,
            images=batch["image"],
            texts=texts,
            extra_images=extra_images,
            topk_text_index=topk_text_index,
            topk_image_index=topk_image_index,
            targets=t,
            tokens=self.tokenize(texts) if self.tokenize is not None else None,
        )


# ------------------------------------------------------------------------------------------------- the run's caches
def open_caches(
    paths: Iterable[str], *, shards: list[str], index: ShardIndex | None = None
) -> tuple[CacheReader | DerivedReader | None, CacheReader | None]:
    """Open and check the run's caches: at most one dual-stream and one single-stream, complete, built on the run's
    shards (per-shard sha256 when the cache records it, and the sample keys); or one derived cache (``mcad-cache
    integrate``), optionally with the parent caches it was made from.

    A derived cache replaces its parents: it is returned in the dual-stream slot (``(derived, None)``), and any
    parent given beside it is compared with the fingerprint the derived cache recorded (a stale parent is refused).

    Returns:
        (clip reader, derived reader or None; single-stream reader or None).
    Raises:
        CacheNotFoundError, CacheSchemaError, CacheIncompleteError, CacheMismatchError (a readable diff).
    """
    clip = single = derived = None
    for path in paths:
        if is_derived(path):
            if derived is not None:
                raise CacheSchemaError(f"two derived caches given ({derived.path}, {path}); pass one")
            derived = open_derived(path).require(complete=True)
            check_cache_data(derived, shards, index=index)
            continue
        reader = open_cache(path).require(complete=True)
        check_cache_data(reader, shards, index=index)
        if reader.kind == "dual":
            if clip is not None:
                raise CacheSchemaError(f"two dual-stream caches given ({clip.path}, {reader.path}); pass one")
            clip = reader
        else:
            if single is not None:
                raise CacheSchemaError(f"two single-stream caches given ({single.path}, {reader.path}); pass one")
            single = reader
    if derived is not None:
        recorded = derived.fingerprint.get("parents", {})
        for name, reader in (("clip", clip), ("single", single)):
            if reader is not None:
                diff = parents_diff(recorded.get(name, {}), reader.fingerprint)
                if diff:
                    raise CacheMismatchError(
                        f"{derived.path} was made from another {name} parent than {reader.path}; rerun "
                        f"`mcad-cache integrate` on the current caches:{diff}"
                    )
        return derived, None
    if single is not None and clip is None:
        raise CacheSchemaError(f"{single.path} is single-stream; distillation also needs a dual-stream (CLIP) cache")
    return clip, single


def check_student_view(
    readers: Iterable[Any], student_preprocess: Mapping[str, Any], *, allow_mismatch: bool = False
) -> list[str]:
    """The student must see the image view its teachers saw (resize mode and crop; the resolution may differ):
    cached KD targets describe the teacher's pixels.

    Args:
        readers: the run's caches, dual-stream first (teacher caches record ``fingerprint.preprocess``; a derived
            cache its ``view``, the dual-stream parent's). A cache that records no view is skipped. When the caches
            saw different views (real CLIP crops, ALBEF squashes), no student matches them all: a warning names
            them and the student is checked against the first (the dual-stream teacher's, as ``integrate`` records).
        student_preprocess: the student's ``preprocess_cfg``.
        allow_mismatch: warn and return the differences instead of raising (``--allow-view-mismatch``; the run
            records them).
    Returns:
        One line per difference, ``"<field>: the teacher of <cache> saw <value>, the student sees <value>"``
        (empty: same view).
    Raises:
        ConfigError: a different view without ``allow_mismatch``: one line naming the teachers' and the student's
            view and the fix (the student's ``resize_mode``, or ``--allow-view-mismatch``).
    """
    fields = tuple(f for f in VIEW_FIELDS if f != "image_size")
    views = []
    for reader in readers:
        if reader is not None:
            view = reader.view if isinstance(reader, DerivedReader) else teacher_view(reader)
            views.append((reader, {f: view[f] for f in fields if f in view}))
    views = [(reader, view) for reader, view in views if view]  # caches that record a view
    if len({tuple(sorted(v.items(), key=str)) for _, v in views}) > 1:  # e.g. CLIP crops, ALBEF squashes
        _logger.warning(
            "the teachers' caches saw different image views (%s); no student view matches all: the student is "
            "checked against the first, %s",
            "; ".join(f"{r.path} {_view_text(v)}" for r, v in views),
            views[0][0].path,
        )
        views = views[:1]
    lines, teachers = [], {}
    for reader, view in views:
        for name in fields:
            if name in view and view[name] != student_preprocess.get(name):
                teachers.setdefault(str(reader.path), {f: view.get(f) for f in fields})
                lines.append(
                    f"{name}: the teacher of {reader.path} saw {view[name]!r}, the student sees "
                    f"{student_preprocess.get(name)!r}"
                )
    if lines and not allow_mismatch:
        student = {f: student_preprocess.get(f) for f in fields}
        seen = "; ".join(f"{path} {_view_text(v)}" for path, v in teachers.items())
        want = next(iter(teachers.values())).get("resize_mode")
        raise ConfigError(
            f"the student's image view {_view_text(student)} differs from its teachers' ({seen}): KD targets would "
            f"describe pixels the student never sees; set the student's resize_mode to {want!r}, or pass "
            "--allow-view-mismatch to train anyway (warned and recorded)"
        )
    for line in lines:
        _logger.warning("view mismatch allowed (--allow-view-mismatch): %s", line)
    return lines


def _view_text(view: Mapping[str, Any]) -> str:
    return "(" + ", ".join(f"{k}={v!r}" for k, v in view.items()) + ")"


def _shard_records(fingerprint: dict[str, Any]) -> list[dict[str, Any]] | None:
    data = fingerprint.get("data")
    if not isinstance(data, dict):
        return None
    shards = data.get("shards")
    if isinstance(shards, list) and shards and all(isinstance(s, dict) for s in shards):
        return shards
    return None


def check_cache_data(
    reader: CacheReader | DerivedReader, shards: list[str], *, index: ShardIndex | None = None
) -> None:
    """Refuse a cache built on other data than ``shards``: per-shard sha256 (when the cache records shard records
    ``{"name", "sha256"}``) and the sample keys (every cached key must be in the run's shards).

    Raises:
        CacheMismatchError: a readable diff of shards (name, sha256) or the missing keys.
    """
    records = _shard_records(reader.fingerprint)
    if records is not None:  # identity by content: sha256 + path under the data root (mcad_cache.data.identity)
        lines = shard_records_diff(records, shard_records(shards))
        if lines:
            raise CacheMismatchError(
                f"{reader.path}: the cache was built on other data than the run's shards; rebuild it on these shards "
                "or pass the shards it was built on:\n  " + "\n  ".join(lines)
            )
    index = index if index is not None else ShardIndex(shards, keys_only=True)
    missing = [str(k) for k in reader.image_keys.tolist() if str(k) not in index]
    if missing:
        raise CacheMismatchError(
            f"{reader.path}: {len(missing)} cached sample key(s) are not in the run's shards, e.g. {missing[:5]}; "
            "the cache was built on other data"
        )


__all__ = [
    "DERIVED_FIELDS",
    "CandidateImages",
    "TargetJoiner",
    "check_cache_data",
    "check_caches_match",
    "check_student_view",
    "open_caches",
]
