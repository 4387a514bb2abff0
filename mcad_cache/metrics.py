"""Image-text retrieval metrics: ranks, Recall@K and RSUM for any number of captions per image.

Protocol (the COCO / Flickr30k Karpathy protocol of ALBEF's ``evaluation()`` and open_clip's
``get_clip_metrics``, generalised to uneven captions per image):

- **i2t** (an image query retrieves texts): the query's rank is the best (lowest) rank among *all* of that image's
  captions, i.e. the number of *non-matching* captions scored at least as high as the image's best-scored caption.
- **t2i** (a caption query retrieves images): the rank of the caption's one image among all images.
- ``R@K`` = percentage of queries whose 0-based rank is ``< K``; ``rsum`` = the sum of the six recalls (0..600).

**Tie policy: pessimistic (ties count against).** A non-matching item whose score *equals* the best matching score
is ranked above it. A constant score matrix therefore gives the worst possible rank, not the best, so a degenerate
model can never look good. Other captions of the *same* image never count against an i2t query. NaN scores are
rejected. ``-inf`` is a valid score (e.g. candidates outside an ITM re-ranked top-k); it ties with other ``-inf``
scores, which then count against the query.

Chunked forms never hold more than ``chunk_size x N`` scores (plus a same-sized boolean mask) at once, so a 5k x 25k
gallery fits in bounded memory.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

_logger = logging.getLogger(__name__)

RECALL_KS: tuple[int, ...] = (1, 5, 10)
METRIC_KEYS: tuple[str, ...] = tuple(f"{d}_R@{k}" for d in ("i2t", "t2i") for k in RECALL_KS) + ("rsum",)


def _check_scores(scores: Tensor, name: str) -> Tensor:
    if scores.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D score matrix, got shape {tuple(scores.shape)}")
    scores = scores.float()
    if bool(torch.isnan(scores.sum())) and bool(torch.isnan(scores).any()):  # cheap test first: a NaN sum
        raise ValueError(f"{name}: NaN scores (ranks are undefined)")
    return scores


def _check_txt2img(txt2img: Tensor | Sequence[int], num_images: int, num_texts: int) -> Tensor:
    txt2img = torch.as_tensor(txt2img).long()
    if txt2img.ndim != 1 or txt2img.numel() != num_texts:
        raise ValueError(f"txt2img: expected shape [{num_texts}], got {tuple(txt2img.shape)}")
    if num_texts and (int(txt2img.min()) < 0 or int(txt2img.max()) >= num_images):
        raise ValueError(
            f"txt2img: image ids must lie in [0, {num_images}), got [{int(txt2img.min())}, {int(txt2img.max())}]"
        )
    counts = torch.bincount(txt2img, minlength=num_images)
    if num_images and int(counts.min()) == 0:
        missing = torch.nonzero(counts == 0).flatten()[:5].tolist()
        raise ValueError(f"txt2img: every image needs at least one caption; images without any: {missing} ...")
    return txt2img


_COUNT_BLOCK = 2048  # columns per block when counting: temporaries stay at C x 2048 (torch sums bools as int64)


def _count_at_least(scores: Tensor, threshold: Tensor) -> Tensor:
    """Per row, how many entries of ``scores`` [C, N] are ``>= threshold`` [C, 1]; counted in column blocks."""
    count = torch.zeros(scores.shape[0], dtype=torch.long, device=scores.device)
    for j in range(0, scores.shape[1], _COUNT_BLOCK):
        count += (scores[:, j : j + _COUNT_BLOCK] >= threshold).sum(dim=1)
    return count


def caption_table(txt2img: Tensor, num_images: int) -> Tensor:
    """Padded image -> captions table: row i lists the text indices of image i, then -1.

    Args:
        txt2img: [N_t] int64, the image index of each text.
        num_images: N_i.
    Returns:
        [N_i, M] int64 with M the largest number of captions of one image.
    """
    txt2img = torch.as_tensor(txt2img).long().cpu()
    counts = torch.bincount(txt2img, minlength=num_images)
    width = int(counts.max()) if txt2img.numel() else 0
    order = torch.argsort(txt2img, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(txt2img.numel()) - starts[txt2img[order]]
    table = torch.full((num_images, max(width, 1)), -1, dtype=torch.long)
    table[txt2img[order], slot] = order
    return table


def i2t_ranks_chunk(
    scores_i2t: Tensor, image_ids: Tensor, txt2img: Tensor, *, captions: Tensor | None = None
) -> Tensor:
    """0-based i2t ranks for a chunk of image queries (pessimistic ties; other own captions never count).

    Memory: nothing of size ``[C, N_t]`` beside the scores (the image's captions are gathered, not masked, and
    counts are taken in column blocks).

    Args:
        scores_i2t: [C, N_t] float scores of C image queries against all N_t texts (any scale; higher = better).
        image_ids: [C] int64, the image index of each query row (its captions are ``txt2img == image_ids[c]``).
        txt2img: [N_t] int64, the image index of each text.
        captions: :func:`caption_table` of ``txt2img`` (computed here when None; pass it when calling per chunk).
    Returns:
        [C] int64 ranks: number of non-matching texts scored ``>=`` the query's best matching text.
    Raises:
        ValueError: a query has no matching text, or the shapes disagree.
    """
    if scores_i2t.shape != (image_ids.numel(), txt2img.numel()):
        raise ValueError(f"scores_i2t shape {tuple(scores_i2t.shape)} != ({image_ids.numel()}, {txt2img.numel()})")
    if captions is None:
        num_images = int(max(int(image_ids.max()) + 1, int(txt2img.max()) + 1)) if image_ids.numel() else 0
        captions = caption_table(txt2img, num_images)
    caps = captions[image_ids.cpu().long()].to(scores_i2t.device)  # [C, M]
    has = caps >= 0
    if not bool(has.any(dim=1).all()):
        raise ValueError("i2t_ranks_chunk: an image query has no caption")
    own = scores_i2t.gather(1, caps.clamp(min=0)).masked_fill(~has, float("-inf"))  # [C, M]
    best = own.amax(dim=1, keepdim=True)  # [C, 1]
    at_least = _count_at_least(scores_i2t, best)  # own captions included
    own_at_least = ((own >= best) & has).sum(dim=1)
    return (at_least - own_at_least).cpu()


def t2i_ranks_chunk(scores_t2i: Tensor, target_image: Tensor) -> Tensor:
    """0-based t2i ranks for a chunk of caption queries (pessimistic ties).

    Args:
        scores_t2i: [C, N_i] float scores of C caption queries against all N_i images.
        target_image: [C] int64, the index of each caption's image.
    Returns:
        [C] int64 ranks: number of other images scored ``>=`` the caption's image.
    """
    if scores_t2i.ndim != 2 or scores_t2i.shape[0] != target_image.numel():
        raise ValueError(f"scores_t2i shape {tuple(scores_t2i.shape)} does not fit {target_image.numel()} queries")
    target_image = target_image.to(scores_t2i.device).long()
    target = scores_t2i.gather(1, target_image[:, None])  # [C, 1]
    at_least = _count_at_least(scores_t2i, target)  # includes the target itself
    return (at_least - 1).cpu()


def recall_from_ranks(ranks_i2t: Tensor, ranks_t2i: Tensor, *, ks: Iterable[int] = RECALL_KS) -> dict[str, float]:
    """``{"i2t_R@K", "t2i_R@K", "rsum"}`` in percent from 0-based ranks.

    Args:
        ranks_i2t: [N_i] int ranks of the image queries.
        ranks_t2i: [N_t] int ranks of the caption queries.
        ks: the K of R@K; ``rsum`` sums every recall returned.
    Returns:
        Dict of floats in [0, 100] (``rsum`` in [0, 100 * 2 * len(ks)]).
    """
    out: dict[str, float] = {}
    for direction, ranks in (("i2t", ranks_i2t), ("t2i", ranks_t2i)):
        ranks = torch.as_tensor(ranks)
        for k in ks:
            out[f"{direction}_R@{k}"] = 100.0 * float((ranks < k).double().mean()) if ranks.numel() else 0.0
    out["rsum"] = sum(out.values())
    return out


def retrieval_ranks(
    sims_i2t: Tensor, txt2img: Tensor | Sequence[int], *, chunk_size: int = 1024
) -> tuple[Tensor, Tensor]:
    """i2t and t2i ranks from a full score matrix, processed in row chunks.

    Args:
        sims_i2t: [N_i, N_t] scores, image rows x text columns (cosine, logits or ITM scores; higher = better).
        txt2img: [N_t] int, the image index of each text.
        chunk_size: query rows per chunk.
    Returns:
        (ranks_i2t [N_i] int64, ranks_t2i [N_t] int64), 0-based.
    Raises:
        ValueError: NaN scores, an image without captions, or shapes that disagree.
    """
    sims_i2t = _check_scores(sims_i2t, "sims_i2t")
    num_images, num_texts = sims_i2t.shape
    txt2img = _check_txt2img(txt2img, num_images, num_texts)
    captions = caption_table(txt2img, num_images)
    ranks_i2t = [
        i2t_ranks_chunk(
            sims_i2t[s : s + chunk_size], torch.arange(s, min(s + chunk_size, num_images)), txt2img, captions=captions
        )
        for s in range(0, num_images, chunk_size)
    ]
    ranks_t2i = [
        t2i_ranks_chunk(sims_i2t[:, s : s + chunk_size].T, txt2img[s : s + chunk_size])
        for s in range(0, num_texts, chunk_size)
    ]
    return _cat(ranks_i2t), _cat(ranks_t2i)


def retrieval_metrics(
    sims_i2t: Tensor, txt2img: Tensor | Sequence[int], *, ks: Iterable[int] = RECALL_KS, chunk_size: int = 1024
) -> dict[str, float]:
    """R@K and RSUM from a full [N_i, N_t] score matrix (see the module docstring for the protocol and ties).

    Args:
        sims_i2t: [N_i, N_t] scores, image rows x text columns; any float dtype (compared in float32).
        txt2img: [N_t] int, the image index of each text; every image needs at least one text.
        ks: the K of R@K.
        chunk_size: query rows per chunk.
    Returns:
        ``{"i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10", "rsum"}`` in percent.
    Raises:
        ValueError: NaN scores, an image without captions, or shapes that disagree.
    """
    return recall_from_ranks(*retrieval_ranks(sims_i2t, txt2img, chunk_size=chunk_size), ks=ks)


@torch.no_grad()
def retrieval_ranks_from_embeddings(
    image_emb: Tensor, text_emb: Tensor, txt2img: Tensor | Sequence[int], *, chunk_size: int = 1024
) -> tuple[Tensor, Tensor]:
    """i2t / t2i ranks from embeddings by chunked similarity (at most ``chunk_size x N`` scores at once).

    Args:
        image_emb: [N_i, D] float image embeddings (L2-normalised for cosine similarity; not normalised here).
        text_emb: [N_t, D] float text embeddings, same space.
        txt2img: [N_t] int, the image index of each text.
        chunk_size: query rows per chunk.
    Returns:
        (ranks_i2t [N_i] int64, ranks_t2i [N_t] int64), 0-based, pessimistic ties.
    Raises:
        ValueError: dims disagree, NaN scores, an image without captions.
    """
    if image_emb.ndim != 2 or text_emb.ndim != 2 or image_emb.shape[1] != text_emb.shape[1]:
        raise ValueError(f"embedding shapes {tuple(image_emb.shape)} and {tuple(text_emb.shape)} do not match")
    image_emb, text_emb = image_emb.float(), text_emb.to(image_emb.device).float()
    num_images, num_texts = image_emb.shape[0], text_emb.shape[0]
    txt2img = _check_txt2img(txt2img, num_images, num_texts)
    ranks_i2t, ranks_t2i = [], []
    captions = caption_table(txt2img, num_images)
    # Contiguous [D, N] galleries, made once: a matmul with a transposed view copies it on every call.
    text_t, image_t = text_emb.T.contiguous(), image_emb.T.contiguous()
    # One preallocated [chunk, N] score buffer per direction, filled with torch.mm(out=): the allocator never holds
    # more than that, whatever the number of chunks.
    buffer = torch.empty(
        min(chunk_size, max(num_images, num_texts)) * max(num_images, num_texts), device=image_emb.device
    )
    for s in range(0, num_images, chunk_size):
        rows = torch.arange(s, min(s + chunk_size, num_images))
        scores = buffer[: len(rows) * num_texts].view(len(rows), num_texts)
        torch.mm(image_emb[s : s + len(rows)], text_t, out=scores)
        ranks_i2t.append(i2t_ranks_chunk(_check_scores(scores, "sims_i2t"), rows, txt2img, captions=captions))
    for s in range(0, num_texts, chunk_size):
        n = min(chunk_size, num_texts - s)
        scores = buffer[: n * num_images].view(n, num_images)
        torch.mm(text_emb[s : s + n], image_t, out=scores)
        ranks_t2i.append(t2i_ranks_chunk(_check_scores(scores, "sims_t2i"), txt2img[s : s + n]))
    return _cat(ranks_i2t), _cat(ranks_t2i)


def retrieval_metrics_from_embeddings(
    image_emb: Tensor,
    text_emb: Tensor,
    txt2img: Tensor | Sequence[int],
    *,
    ks: Iterable[int] = RECALL_KS,
    chunk_size: int = 1024,
) -> dict[str, float]:
    """R@K and RSUM by chunked cosine similarity; equals ``retrieval_metrics(image_emb @ text_emb.T)``.

    Args:
        image_emb: [N_i, D] float, L2-normalised.
        text_emb: [N_t, D] float, L2-normalised.
        txt2img: [N_t] int, the image index of each text.
        ks: the K of R@K.
        chunk_size: query rows per chunk.
    Returns:
        The seven metric keys of :data:`METRIC_KEYS` (for the default ``ks``), in percent.
    Raises:
        ValueError: see :func:`retrieval_ranks_from_embeddings`.
    """
    return recall_from_ranks(
        *retrieval_ranks_from_embeddings(image_emb, text_emb, txt2img, chunk_size=chunk_size), ks=ks
    )


def topk_ranks_i2t(topk_idx_i2t: Tensor, topk_scores_i2t: Tensor, txt2img: Tensor | Sequence[int]) -> Tensor:
    """i2t ranks when only K re-ranked candidates per image query carry a score (all other texts score ``-inf``).

    This is the ALBEF / BLIP re-ranking protocol (salesforce/ALBEF ``Retrieval.py`` ``evaluation()``: the score
    matrix is filled with -100, then the ITC top-k entries get ITM scores), with ``-inf`` as the fill. Equal to
    :func:`retrieval_ranks` on that dense matrix, computed without building it.

    Args:
        topk_idx_i2t: [N_i, K] int text indices (unique per row; -1 = no candidate).
        topk_scores_i2t: [N_i, K] float scores of those candidates (any scale; higher = better).
        txt2img: [N_t] int, the image index of each text.
    Returns:
        [N_i] int64 ranks, 0-based, pessimistic ties. A query none of whose captions is a candidate gets the
        dense rank: its number of non-matching texts (all tie at ``-inf``).
    Raises:
        ValueError: NaN scores or shapes that disagree.
    """
    txt2img = torch.as_tensor(txt2img).long()
    idx, scores = torch.as_tensor(topk_idx_i2t).long(), _check_scores(torch.as_tensor(topk_scores_i2t), "scores")
    if idx.shape != scores.shape:
        raise ValueError(f"topk idx {tuple(idx.shape)} and scores {tuple(scores.shape)} differ in shape")
    num_images = idx.shape[0]
    valid = idx >= 0
    scores = scores.masked_fill(~valid, float("-inf"))
    positive = valid & (txt2img[idx.clamp(min=0)] == torch.arange(num_images)[:, None])  # [N_i, K]
    best = scores.masked_fill(~positive, float("-inf")).amax(dim=1, keepdim=True)
    ranks = ((scores >= best) & valid & ~positive).sum(dim=1)
    num_negatives = txt2img.numel() - torch.bincount(txt2img, minlength=num_images)[:num_images]
    # No candidate caption, or the best one at -inf: every non-matching text ties or beats it (dense semantics).
    fallback = ~positive.any(dim=1) | torch.isneginf(best[:, 0])
    return torch.where(fallback, num_negatives, ranks)


def topk_ranks_t2i(
    topk_idx_t2i: Tensor, topk_scores_t2i: Tensor, txt2img: Tensor | Sequence[int], *, num_images: int
) -> Tensor:
    """t2i ranks when only K re-ranked candidate images per caption query carry a score (others ``-inf``).

    Args:
        topk_idx_t2i: [N_t, K] int image indices (unique per row; -1 = no candidate).
        topk_scores_t2i: [N_t, K] float scores of those candidates.
        txt2img: [N_t] int, the image index of each text.
        num_images: N_i, the gallery size.
    Returns:
        [N_t] int64 ranks, 0-based, pessimistic ties; ``num_images - 1`` when the caption's image is no candidate.
    Raises:
        ValueError: NaN scores or shapes that disagree.
    """
    txt2img = torch.as_tensor(txt2img).long()
    idx, scores = torch.as_tensor(topk_idx_t2i).long(), _check_scores(torch.as_tensor(topk_scores_t2i), "scores")
    if idx.shape != scores.shape or idx.shape[0] != txt2img.numel():
        raise ValueError(
            f"topk idx {tuple(idx.shape)} / scores {tuple(scores.shape)} do not fit {txt2img.numel()} texts"
        )
    valid = idx >= 0
    scores = scores.masked_fill(~valid, float("-inf"))
    target = valid & (idx == txt2img[:, None])
    target_score = scores.masked_fill(~target, float("-inf")).amax(dim=1, keepdim=True)
    ranks = ((scores >= target_score) & valid & ~target).sum(dim=1)
    fallback = ~target.any(dim=1) | torch.isneginf(target_score[:, 0])
    return torch.where(fallback, torch.full_like(ranks, num_images - 1), ranks)


def _cat(parts: list[Tensor]) -> Tensor:
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


__all__ = [
    "METRIC_KEYS",
    "RECALL_KS",
    "caption_table",
    "i2t_ranks_chunk",
    "recall_from_ranks",
    "retrieval_metrics",
    "retrieval_metrics_from_embeddings",
    "retrieval_ranks",
    "retrieval_ranks_from_embeddings",
    "t2i_ranks_chunk",
    "topk_ranks_i2t",
    "topk_ranks_t2i",
]
