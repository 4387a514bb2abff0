"""Image-text retrieval evaluation of students, teachers and caches (plain functions of model and batches).

- Dual encoders (students and dual-stream teachers): encode every image and caption once, then chunked cosine
  similarity and R@K (:mod:`mcad_cache.metrics`).
- Single-stream teachers (ALBEF / BLIP): the ALBEF protocol (salesforce/ALBEF ``Retrieval.py`` ``evaluation()``,
  BLIP ``train_retrieval.py``): ITC top-``k_test`` candidates per query, re-scored by the ITM head; all other
  candidates score ``-inf``. The score is the positive-class ITM logit (``"itm"``, ALBEF) or that logit plus the ITC
  cosine similarity (``"itm+itc"``, BLIP's ``score + topk_sim``).
- A cache built on the test shards: its stored embeddings (and, for single-stream teachers, its stored ITM logits of
  the ITC top-k candidates) give the same numbers without running any model.

Every model is evaluated with its *own* ``preprocess_cfg`` and tokenizer; the caller builds the image batches with
``data.transforms.make_image_transform(model.preprocess_cfg)``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mcad_cache.errors import CacheSchemaError, ConfigError, DataError
from mcad_cache.metrics import (
    recall_from_ranks,
    retrieval_ranks_from_embeddings,
    topk_ranks_i2t,
    topk_ranks_t2i,
)
from mcad_cache.runtime import autocast
from mcad_cache.teachers.base import TextEncoder
from mcad_cache.teachers.text_states import TextStateCache, supports_text_states

_logger = logging.getLogger(__name__)

ITM_SCORES = ("itm", "itm+itc")


@dataclass
class RetrievalSet:
    """Encoded test set.

    Attributes:
        image_keys: N_i sample keys (``__key__``), in image-row order.
        image_emb: [N_i, D] float32 CPU, L2-normalised.
        text_emb: [N_t, D] float32 CPU, L2-normalised.
        captions: N_t caption strings, in text-row order (an image's captions are consecutive).
        txt2img: [N_t] int64, image row of each text.
    """

    image_keys: list[str]
    image_emb: Tensor
    text_emb: Tensor
    captions: list[str]
    txt2img: Tensor
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_images(self) -> int:
        return len(self.image_keys)

    @property
    def num_texts(self) -> int:
        return len(self.captions)


def encode_texts(model: TextEncoder, texts: list[str]) -> Tensor:
    """Tokenize and encode captions with the model's own tokenizer: ``encode_text(tokenize(texts))``, the signature
    teachers and students share (``teachers.base.TextEncoder``).

    Args:
        model: a teacher or a student ``DualEncoder``.
        texts: B captions.
    Returns:
        [B, D] text embeddings as the model returns them (L2-normalised), on the model's device.
    """
    device = _model_device(model)
    tokens = {k: v.to(device) for k, v in model.tokenize(texts).items()}
    return model.encode_text(tokens)


def _model_device(model: Any) -> torch.device:
    dev = getattr(model, "device", None)
    if isinstance(dev, torch.device):
        return dev
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


@torch.no_grad()
def encode_retrieval_set(
    model: Any,
    batches: Iterable[Mapping[str, Any]],
    *,
    text_batch_size: int = 256,
    precision: str = "auto",
) -> RetrievalSet:
    """Encode every image and every caption of a test set once.

    Args:
        model: teacher or student, already on its device and in eval mode.
        batches: ``data.collate_samples`` batches ``{"key": list[str], "image": [B, 3, H, W] float32 (the model's
            own preprocessing), "captions": list[list[str]], "skipped": list[dict]}`` (a per-item ``"skip"`` list
            is honoured too).
        text_batch_size: captions per text-encoder call.
        precision: ``auto | fp32 | bf16 | fp16`` (``runtime.autocast``); embeddings are float32 either way.
    Returns:
        The :class:`RetrievalSet`; captions keep sample order, an image's captions consecutive.
    Raises:
        DataError: a skipped sample in the batches (evaluation never skips silently), a duplicate key or an image
            without captions.
    """
    device = _model_device(model)
    keys: list[str] = []
    seen: set[str] = set()
    image_embs: list[Tensor] = []
    captions: list[str] = []
    txt2img: list[int] = []
    with autocast(device, precision):
        for batch in batches:
            for item in batch.get("skipped") or []:  # collate_samples puts unusable samples here
                raise DataError(
                    item["skip"],
                    shard=item.get("shard"),
                    key=item.get("key"),
                    detail=(item.get("detail") or "") + " (evaluation never skips a sample)",
                )
            if not batch["key"]:
                continue
            for j, key in enumerate(batch["key"]):
                skip = batch.get("skip", [None] * len(batch["key"]))[j]
                if skip:
                    raise DataError(skip, shard=_get(batch, "shard", j), key=key, detail="evaluation never skips")
                if key in seen:
                    raise DataError("duplicate_key", shard=_get(batch, "shard", j), key=key)
                if not batch["captions"][j]:
                    raise DataError("missing_caption", shard=_get(batch, "shard", j), key=key)
                seen.add(key)
                for caption in batch["captions"][j]:
                    captions.append(caption)
                    txt2img.append(len(keys))
                keys.append(key)
            images = batch["image"].to(device, non_blocking=True)
            image_embs.append(model.encode_image(images).float().cpu())
        text_embs = [
            encode_texts(model, captions[s : s + text_batch_size]).float().cpu()
            for s in range(0, len(captions), text_batch_size)
        ]
    if not keys:
        raise DataError("missing_image", detail="the test set is empty")
    return RetrievalSet(
        image_keys=keys,
        image_emb=torch.cat(image_embs),
        text_emb=torch.cat(text_embs),
        captions=captions,
        txt2img=torch.tensor(txt2img, dtype=torch.long),
    )


def _get(batch: Mapping[str, Any], name: str, j: int) -> Any:
    values = batch.get(name)
    return values[j] if values is not None else None


def protocol(txt2img: Tensor, num_images: int) -> dict[str, Any]:
    """The evaluation protocol: counts of images and captions, captions per image, tie policy."""
    counts = torch.bincount(txt2img, minlength=num_images)
    return {
        "num_images": int(num_images),
        "num_captions": int(txt2img.numel()),
        "captions_per_image": {
            "min": int(counts.min()) if num_images else 0,
            "max": int(counts.max()) if num_images else 0,
            "mean": float(counts.double().mean()) if num_images else 0.0,
        },
        "i2t": "best rank among the image's captions",
        "t2i": "rank of the caption's image",
        "ties": "pessimistic (a tie with a non-matching item counts against the query)",
        "units": "percent",
    }


def evaluate_dual(
    retrieval_set: RetrievalSet, *, chunk_size: int = 1024, device: torch.device | str | None = None
) -> dict[str, Any]:
    """R@1/5/10 and RSUM of a dual encoder by chunked cosine similarity.

    Args:
        retrieval_set: encoded test set (L2-normalised embeddings).
        chunk_size: query rows per similarity chunk (memory: ``chunk_size x max(N_i, N_t)`` floats).
        device: where the similarity chunks are computed (default: where the embeddings are, the CPU).
    Returns:
        ``{"metrics": {...}, "protocol": {...}}`` with score "cosine".
    """
    rs = retrieval_set
    image_emb, text_emb = (
        (rs.image_emb, rs.text_emb) if device is None else (rs.image_emb.to(device), rs.text_emb.to(device))
    )
    ranks = retrieval_ranks_from_embeddings(image_emb, text_emb, rs.txt2img, chunk_size=chunk_size)
    proto = protocol(retrieval_set.txt2img, retrieval_set.num_images) | {"score": "cosine (ITC)", "score_short": "cos"}
    return {"metrics": recall_from_ranks(*ranks), "protocol": proto}


@torch.no_grad()
def itc_topk(query_emb: Tensor, gallery_emb: Tensor, *, k: int, chunk_size: int = 1024) -> tuple[Tensor, Tensor]:
    """Top-k gallery items per query by cosine similarity, in query chunks.

    Args:
        query_emb: [N_q, D] float, L2-normalised.
        gallery_emb: [N_g, D] float, L2-normalised.
        k: candidates per query, ``1 <= k <= N_g``.
        chunk_size: query rows per chunk.
    Returns:
        (sims [N_q, k] float32 sorted descending, idx [N_q, k] int64).
    Raises:
        ValueError: k out of range.
    """
    if not 1 <= k <= gallery_emb.shape[0]:
        raise ValueError(f"k={k} must lie in [1, {gallery_emb.shape[0]}]")
    sims, idx = [], []
    gallery_t = gallery_emb.float().T.contiguous()  # [D, N_g], once (a transposed view is copied per matmul)
    for s in range(0, query_emb.shape[0], chunk_size):
        v, i = (query_emb[s : s + chunk_size].float() @ gallery_t).topk(k, dim=1)
        sims.append(v)
        idx.append(i)
    return torch.cat(sims), torch.cat(idx)


def clamp_k_test(k_test: int, num_images: int, num_texts: int) -> tuple[int, int, list[str]]:
    """Clamp the re-ranking depth to each gallery's size.

    Returns:
        (k for i2t, k for t2i, notices): a notice names each clamp.
    Raises:
        ConfigError: ``k_test < 1`` (a ValueError).
    """
    if k_test < 1:
        raise ConfigError(f"--k-test must be >= 1, got {k_test}")
    k_i2t, k_t2i = min(k_test, num_texts), min(k_test, num_images)
    notices = []
    if k_i2t < k_test:
        notices.append(f"k_test={k_test} clamped to {k_i2t} for i2t (the gallery has {num_texts} captions)")
    if k_t2i < k_test:
        notices.append(f"k_test={k_test} clamped to {k_t2i} for t2i (the gallery has {num_images} images)")
    for notice in notices:
        _logger.warning("%s", notice)
    return k_i2t, k_t2i, notices


def _combine(itm_logits: Tensor, itc_sims: Tensor, score: str) -> Tensor:
    if score not in ITM_SCORES:
        raise ValueError(f"score must be one of {ITM_SCORES}, got {score!r}")
    positive = itm_logits[..., 1] if itm_logits.ndim == itc_sims.ndim + 1 else itm_logits
    return positive.float() + (itc_sims.float() if score == "itm+itc" else 0.0)


def _score_name(score: str, k_i2t: int, k_t2i: int) -> str:
    what = "ITM positive-class logit" + (" + ITC cosine" if score == "itm+itc" else "")
    return f"{what} on the ITC top-k (k_i2t={k_i2t}, k_t2i={k_t2i}); other candidates -inf"


@torch.no_grad()
def evaluate_single_stream(
    teacher: Any,
    retrieval_set: RetrievalSet,
    batches: Iterable[Mapping[str, Any]],
    *,
    k_test: int = 16,
    score: str = "itm+itc",
    pair_batch_size: int = 64,
    chunk_size: int = 1024,
    precision: str = "auto",
    progress: Callable[..., Iterable[Any]] | None = None,
) -> dict[str, Any]:
    """ALBEF-protocol retrieval of a single-stream teacher: ITC top-k, then ITM re-ranking.

    Every (image, caption) pair named by either direction's top-k is scored once; images are read a second time from
    ``batches`` (matched by key, so order does not matter) and each image's tokens are computed once for all of its
    pairs. Memory: one batch of image tokens plus ``N x k`` scores.

    Args:
        teacher: single-stream teacher (``image_tokens``, ``itm_from_tokens``, ``tokenize``), eval mode.
        retrieval_set: ITC embeddings of the test set from :func:`encode_retrieval_set` with this teacher.
        batches: the test batches again (same keys; the teacher's own preprocessing).
        k_test: candidates re-ranked per query; clamped to the gallery sizes with a notice.
        score: ``"itm"`` (ALBEF) or ``"itm+itc"`` (BLIP).
        pair_batch_size: (image, caption) pairs per ITM call.
        chunk_size: query rows per ITC similarity chunk.
        precision: ``auto | fp32 | bf16 | fp16`` (``mcad_cache.runtime.autocast``).
        progress: optional ``progress(iterable, description, total)`` wrapper.
    Returns:
        ``{"metrics", "protocol", "notices"}``.
    Raises:
        ValueError: unknown score; DataError: a key of the set missing from ``batches``.
    """
    if score not in ITM_SCORES:
        raise ValueError(f"score must be one of {ITM_SCORES}, got {score!r}")
    rs = retrieval_set
    k_i2t, k_t2i, notices = clamp_k_test(k_test, rs.num_images, rs.num_texts)
    itc_i2t, idx_i2t = itc_topk(rs.image_emb, rs.text_emb, k=k_i2t, chunk_size=chunk_size)
    itc_t2i, idx_t2i = itc_topk(rs.text_emb, rs.image_emb, k=k_t2i, chunk_size=chunk_size)
    wanted: dict[int, set[int]] = {}
    for i, row in enumerate(idx_i2t.tolist()):
        wanted.setdefault(i, set()).update(row)
    for t, row in enumerate(idx_t2i.tolist()):
        for i in row:
            wanted.setdefault(i, set()).add(t)
    row_of = {key: i for i, key in enumerate(rs.image_keys)}
    itm: dict[tuple[int, int], float] = {}
    device = _model_device(teacher)
    done: set[int] = set()
    it: Iterable[Mapping[str, Any]] = batches
    if progress is not None:
        it = progress(batches, "ITM re-rank", None)
    text_states = TextStateCache(teacher, rs.captions, block=pair_batch_size) if supports_text_states(teacher) else None
    with autocast(device, precision):
        for batch in it:
            local = [(j, row_of[k]) for j, k in enumerate(batch["key"]) if k in row_of and row_of[k] in wanted]
            if not local:
                continue
            images = batch["image"][[j for j, _ in local]].to(device)
            image_tokens = teacher.image_tokens(images)
            pairs = [(pos, i, t) for pos, (_, i) in enumerate(local) for t in sorted(wanted[i])]
            for s in range(0, len(pairs), pair_batch_size):
                chunk = pairs[s : s + pair_batch_size]
                chunk_image_tokens = image_tokens[[pos for pos, _, _ in chunk]]
                if text_states is not None:  # text-only layers once per caption, not once per pair
                    text_tokens, mask = text_states.get([t for _, _, t in chunk])
                    logits, _ = teacher.itm_from_text_tokens(chunk_image_tokens, text_tokens, mask)
                else:
                    tokens = teacher.tokenize([rs.captions[t] for _, _, t in chunk])
                    tokens = {k: v.to(device) for k, v in tokens.items()}
                    logits, _ = teacher.itm_from_tokens(chunk_image_tokens, tokens)
                for (_, i, t), value in zip(chunk, logits[:, 1].float().cpu().tolist(), strict=True):
                    itm[(i, t)] = value
            done.update(i for _, i in local)
    missing = sorted(set(wanted) - done)
    if missing:
        raise DataError(
            "missing_image",
            key=rs.image_keys[missing[0]],
            detail=f"{len(missing)} test image(s) not found again for ITM re-ranking",
        )
    itm_i2t = torch.tensor([[itm[(i, t)] for t in row] for i, row in enumerate(idx_i2t.tolist())])
    itm_t2i = torch.tensor([[itm[(i, t)] for i in row] for t, row in enumerate(idx_t2i.tolist())])
    ranks_i2t = topk_ranks_i2t(idx_i2t, _combine(itm_i2t, itc_i2t, score), rs.txt2img)
    ranks_t2i = topk_ranks_t2i(idx_t2i, _combine(itm_t2i, itc_t2i, score), rs.txt2img, num_images=rs.num_images)
    proto = protocol(rs.txt2img, rs.num_images) | {
        "score": _score_name(score, k_i2t, k_t2i),
        "score_short": f"{score}@{max(k_i2t, k_t2i)}",
    }
    return {"metrics": recall_from_ranks(ranks_i2t, ranks_t2i), "protocol": proto, "notices": notices}


def evaluate_cache(
    reader: Any,
    *,
    k_test: int = 16,
    score: str = "itm+itc",
    chunk_size: int = 1024,
) -> dict[str, Any]:
    """Evaluate a teacher from a cache built on the test shards, without running the model.

    Dual-stream caches: chunked cosine over the cached embeddings. Single-stream caches: the cached ITM logits of the
    first ``k_test`` cached candidates (which are the teacher's ITC top-k, sorted by ITC similarity), re-ranked as
    in :func:`evaluate_single_stream`.

    Args:
        reader: a ``CacheReader`` (complete, built on the test shards: the caller checks ``require``).
        k_test: re-ranking depth; clamped to the gallery sizes; must be ``<=`` the cache's k.
        score: ``"itm"`` or ``"itm+itc"``.
        chunk_size: query rows per chunk.
    Returns:
        ``{"metrics", "protocol", "notices"}``.
    Raises:
        CacheSchemaError: ``k_test`` above the cache's k, or candidates not chosen by this teacher's own ITC
            (ground-truth positives forced into the lists, or another cache's similarities), which would not be
            the ALBEF protocol.
        DataError: the cache has invalid image rows (samples skipped at build; evaluation never skips).
    """
    num_images, num_texts = int(reader.num_images), int(reader.num_texts)
    image_valid = np.asarray(reader.image_valid, dtype=bool)
    if not image_valid.all():
        row = int(np.nonzero(~image_valid)[0][0])
        raise DataError(
            "decode_error",
            key=str(reader.image_keys[row]),
            detail=f"{int((~image_valid).sum())} image "
            "row(s) of the cache are invalid (skipped at build); evaluation never skips a sample",
        )
    txt2img = torch.as_tensor(reader.txt2img).long()
    image_emb = torch.as_tensor(reader.image_emb(torch.arange(num_images).numpy())).float()
    text_emb = torch.as_tensor(reader.text_emb(torch.arange(num_texts).numpy())).float()
    if reader.kind != "single":
        rs = RetrievalSet(list(map(str, reader.image_keys)), image_emb, text_emb, [], txt2img)
        ranks = retrieval_ranks_from_embeddings(rs.image_emb, rs.text_emb, txt2img, chunk_size=chunk_size)
        proto = protocol(txt2img, num_images) | {"score": "cosine (ITC), cached embeddings", "score_short": "cos"}
        return {"metrics": recall_from_ranks(*ranks), "protocol": proto, "notices": []}
    manifest = reader.manifest
    selection = _candidate_selection(manifest)
    if selection.get("force_positives"):
        raise CacheSchemaError(
            "cache was built with force_positives=true: its candidate lists contain the ground "
            "truth, so re-ranking them is not a retrieval evaluation; rebuild with "
            "--no-force-positives or evaluate the teacher model directly"
        )
    if selection.get("candidate_source"):
        raise CacheSchemaError(
            f"cache candidates were chosen by another cache ({selection['candidate_source']!r}), "
            "not by this teacher's ITC; evaluate the teacher model directly"
        )
    k_i2t, k_t2i, notices = clamp_k_test(k_test, num_images, num_texts)
    if max(k_i2t, k_t2i) > int(reader.k):
        raise CacheSchemaError(
            f"k_test={max(k_i2t, k_t2i)} exceeds the cache's k={reader.k}; pass --k-test "
            f"{reader.k} or less, or rebuild the cache with a larger k"
        )
    parts = {}
    for direction, k, n in (("i2t", k_i2t, num_images), ("t2i", k_t2i, num_texts)):
        idx, scores = [], []
        for s in range(0, n, chunk_size):
            rows = torch.arange(s, min(s + chunk_size, n)).numpy()
            top = reader.topk(direction, rows, k=k, fused=False)
            cand = torch.as_tensor(top["idx"]).long()
            valid = torch.as_tensor(top["valid"]).bool() if "valid" in top else cand >= 0
            combined = _combine(torch.as_tensor(top["itm_logits"]), torch.as_tensor(top["sims"]), score)
            idx.append(cand.masked_fill(~valid, -1))
            scores.append(combined.masked_fill(~valid, float("-inf")))
        parts[direction] = (torch.cat(idx), torch.cat(scores))
    ranks_i2t = topk_ranks_i2t(*parts["i2t"], txt2img)
    ranks_t2i = topk_ranks_t2i(*parts["t2i"], txt2img, num_images=num_images)
    proto = protocol(txt2img, num_images) | {
        "score": _score_name(score, k_i2t, k_t2i) + ", cached",
        "score_short": f"{score}@{max(k_i2t, k_t2i)}",
    }
    return {"metrics": recall_from_ranks(ranks_i2t, ranks_t2i), "protocol": proto, "notices": notices}


def _candidate_selection(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """``force_positives`` and a non-own candidate source, from the manifest's ``fingerprint.candidates`` record
    (``{"rule", "source": "own_itc" | "cache", "force_positives", ...}``, pipelines/build_cache.py)."""
    fingerprint = manifest.get("fingerprint") or {}
    record = fingerprint.get("candidates") or {}
    out: dict[str, Any] = {}
    if record.get("force_positives"):
        out["force_positives"] = True
    source = record.get("source", "own_itc")
    if source != "own_itc":
        out["candidate_source"] = (record.get("source_cache") or {}).get("teacher", {}).get("name") or source
    return out


__all__ = [
    "ITM_SCORES",
    "RetrievalSet",
    "clamp_k_test",
    "encode_retrieval_set",
    "encode_texts",
    "evaluate_cache",
    "evaluate_dual",
    "evaluate_single_stream",
    "itc_topk",
    "protocol",
]
