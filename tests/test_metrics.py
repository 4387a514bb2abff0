"""Recall@K / RSUM: hand-computed matrices, uneven captions per image, ties, slow reference, chunked == full."""

from __future__ import annotations

import pytest
import torch

from mcad_cache.metrics import (
    METRIC_KEYS,
    recall_from_ranks,
    retrieval_metrics,
    retrieval_metrics_from_embeddings,
    retrieval_ranks,
    retrieval_ranks_from_embeddings,
    topk_ranks_i2t,
    topk_ranks_t2i,
)


def slow_ranks(sims: list[list[float]], txt2img: list[int]) -> tuple[list[int], list[int]]:
    """Reference in plain Python: sort each query's gallery worst-case (ties: non-matching item first)."""
    num_images, num_texts = len(sims), len(txt2img)
    ranks_i2t = []
    for i in range(num_images):
        # Sort texts by score descending; among equal scores a non-matching text comes first (pessimistic).
        order = sorted(range(num_texts), key=lambda t: (-sims[i][t], txt2img[t] == i))
        # The first matching text in that order is the image's best caption; everything before it is non-matching.
        ranks_i2t.append(next(r for r, t in enumerate(order) if txt2img[t] == i))
    ranks_t2i = []
    for t in range(num_texts):
        order = sorted(range(num_images), key=lambda i: (-sims[i][t], i == txt2img[t]))
        ranks_t2i.append(order.index(txt2img[t]))
    return ranks_i2t, ranks_t2i


def slow_metrics(sims, txt2img):
    ri, rt = slow_ranks(sims, txt2img)
    out = {}
    for name, ranks in (("i2t", ri), ("t2i", rt)):
        for k in (1, 5, 10):
            out[f"{name}_R@{k}"] = 100.0 * sum(r < k for r in ranks) / len(ranks)
    out["rsum"] = sum(out.values())
    return out


def test_hand_computed_uneven_captions():
    # 3 images; image 0 has 1 caption (t0), image 1 has 3 (t1, t2, t3), image 2 has 2 (t4, t5).
    txt2img = [0, 1, 1, 1, 2, 2]
    sims = torch.tensor(
        [
            # t0   t1   t2   t3   t4   t5
            [0.9, 0.1, 0.2, 0.3, 0.4, 0.5],  # img0: own caption first -> rank 0
            [0.8, 0.1, 0.7, 0.2, 0.9, 0.3],  # img1: best own caption t2 (0.7) below t4, t0 -> rank 2
            [0.1, 0.2, 0.3, 0.4, 0.0, 0.6],  # img2: best own t5 (0.6) is top -> rank 0
        ]
    )
    ranks_i2t, ranks_t2i = retrieval_ranks(sims, txt2img)
    assert ranks_i2t.tolist() == [0, 2, 0]
    # t2i columns: t0 [.9,.8,.1] -> img0 rank 0; t1 [.1,.1,.2] own img1 (.1) ties img0 (.1), below img2 -> 2;
    # t2 [.2,.7,.3] -> 0; t3 [.3,.2,.4] img1 lowest -> 2; t4 [.4,.9,0] img2 lowest -> 2; t5 [.5,.3,.6] -> 0.
    assert ranks_t2i.tolist() == [0, 2, 0, 2, 2, 0]
    metrics = retrieval_metrics(sims, txt2img)
    assert list(metrics) == list(METRIC_KEYS)
    assert metrics["i2t_R@1"] == pytest.approx(200 / 3)
    assert metrics["i2t_R@5"] == pytest.approx(100.0)
    assert metrics["t2i_R@1"] == pytest.approx(50.0)
    assert metrics["t2i_R@5"] == pytest.approx(100.0)
    assert metrics["rsum"] == pytest.approx(200 / 3 + 100 + 100 + 50 + 100 + 100)
    assert metrics == pytest.approx(slow_metrics(sims.tolist(), txt2img))


def test_ties_count_against():
    # A constant matrix: every query gets the worst rank, not the best.
    txt2img = [0, 0, 1, 2]
    sims = torch.zeros(3, 4)
    ranks_i2t, ranks_t2i = retrieval_ranks(sims, txt2img)
    assert ranks_i2t.tolist() == [2, 3, 3]  # own captions never count; all other captions tie and count
    assert ranks_t2i.tolist() == [2, 2, 2, 2]
    assert retrieval_metrics(sims, txt2img)["i2t_R@1"] == 0.0
    # A single tie with the matching item: pessimistic rank 1 instead of 0.
    sims = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.5, 0.0], [0.0, 0.0, 0.5, 1.0]])
    ranks_i2t, ranks_t2i = retrieval_ranks(sims, txt2img)
    assert ranks_i2t.tolist() == [1, 0, 0]  # img0's best own caption t0 (1.0) ties t2 (1.0) -> rank 1
    assert ranks_t2i.tolist() == [0, 2, 2, 0]  # t1: all 0 -> 2; t2: img0 (1.0) above, img2 (0.5) ties -> 2


def test_minus_inf_scores_tie_against():
    txt2img = [0, 1, 2]
    inf = float("-inf")
    sims = torch.tensor([[inf, 0.5, inf], [inf, 0.9, inf], [inf, inf, inf]])
    ranks_i2t, ranks_t2i = retrieval_ranks(sims, txt2img)
    assert ranks_i2t.tolist() == [2, 0, 2]  # img0: t1 (0.5) above, t2 (-inf) ties its -inf caption
    assert ranks_t2i.tolist() == [2, 0, 2]


def test_random_matrices_match_slow_reference():
    gen = torch.Generator().manual_seed(0)
    for trial in range(5):
        num_images = 7 + trial
        caps = torch.randint(1, 4, (num_images,), generator=gen)
        txt2img = torch.repeat_interleave(torch.arange(num_images), caps)
        txt2img = txt2img[torch.randperm(len(txt2img), generator=gen)]
        # Coarse integer scores so that ties are frequent.
        sims = torch.randint(0, 4, (num_images, len(txt2img)), generator=gen).float()
        ri, rt = retrieval_ranks(sims, txt2img, chunk_size=3)
        ref_i, ref_t = slow_ranks(sims.tolist(), txt2img.tolist())
        assert ri.tolist() == ref_i
        assert rt.tolist() == ref_t
        assert retrieval_metrics(sims, txt2img, chunk_size=2) == pytest.approx(
            slow_metrics(sims.tolist(), txt2img.tolist())
        )


@pytest.mark.parametrize("chunk_size", [1, 3, 5, 64])
def test_chunked_embeddings_equal_full(chunk_size):
    gen = torch.Generator().manual_seed(1)
    num_images = 11
    caps = torch.randint(1, 6, (num_images,), generator=gen)
    txt2img = torch.repeat_interleave(torch.arange(num_images), caps)
    # Dyadic values: every dot product is exact in float32, so chunked and full matmuls give identical scores,
    # and the coarse grid makes ties common.
    image_emb = torch.randint(-2, 3, (num_images, 4), generator=gen).float() / 4
    text_emb = torch.randint(-2, 3, (len(txt2img), 4), generator=gen).float() / 4
    full = retrieval_ranks(image_emb @ text_emb.T, txt2img, chunk_size=10_000)
    chunked = retrieval_ranks_from_embeddings(image_emb, text_emb, txt2img, chunk_size=chunk_size)
    assert torch.equal(full[0], chunked[0]) and torch.equal(full[1], chunked[1])
    ref = slow_ranks((image_emb @ text_emb.T).tolist(), txt2img.tolist())
    assert chunked[0].tolist() == ref[0] and chunked[1].tolist() == ref[1]
    assert retrieval_metrics_from_embeddings(image_emb, text_emb, txt2img, chunk_size=chunk_size) == (
        retrieval_metrics(image_emb @ text_emb.T, txt2img)
    )


def test_perfect_and_recall_from_ranks():
    emb = torch.eye(4)
    txt2img = torch.tensor([0, 1, 2, 3, 0])
    text_emb = emb[txt2img]
    metrics = retrieval_metrics_from_embeddings(emb, text_emb, txt2img)
    assert metrics["rsum"] == pytest.approx(600.0)
    out = recall_from_ranks(torch.tensor([0, 4, 9, 10]), torch.tensor([0, 0, 5]))
    assert out["i2t_R@1"] == 25.0 and out["i2t_R@5"] == 50.0 and out["i2t_R@10"] == 75.0
    assert out["t2i_R@1"] == pytest.approx(200 / 3) and out["t2i_R@10"] == 100.0


def test_errors():
    with pytest.raises(ValueError, match="NaN"):
        retrieval_metrics(torch.tensor([[float("nan"), 0.0]]), [0, 0])
    with pytest.raises(ValueError, match="at least one caption"):
        retrieval_metrics(torch.zeros(2, 2), [0, 0])
    with pytest.raises(ValueError, match="txt2img"):
        retrieval_metrics(torch.zeros(2, 2), [0, 1, 1])
    with pytest.raises(ValueError, match="do not match"):
        retrieval_metrics_from_embeddings(torch.zeros(2, 3), torch.zeros(2, 4), [0, 1])


def _dense_from_topk(idx, scores, num_cols):
    dense = torch.full((idx.shape[0], num_cols), float("-inf"))
    for r in range(idx.shape[0]):
        for c in range(idx.shape[1]):
            if idx[r, c] >= 0:
                dense[r, idx[r, c]] = scores[r, c]
    return dense


@pytest.mark.parametrize("k", [1, 2, 4, 9])
def test_topk_ranks_equal_dense_minus_inf_fill(k):
    gen = torch.Generator().manual_seed(k)
    num_images = 9
    caps = torch.randint(1, 4, (num_images,), generator=gen)
    txt2img = torch.repeat_interleave(torch.arange(num_images), caps)
    num_texts = len(txt2img)
    k_i2t, k_t2i = min(k, num_texts), min(k, num_images)
    idx_i2t = torch.stack([torch.randperm(num_texts, generator=gen)[:k_i2t] for _ in range(num_images)])
    idx_t2i = torch.stack([torch.randperm(num_images, generator=gen)[:k_t2i] for _ in range(num_texts)])
    sc_i2t = torch.randint(0, 3, idx_i2t.shape, generator=gen).float()
    sc_t2i = torch.randint(0, 3, idx_t2i.shape, generator=gen).float()
    idx_i2t[0, -1] = -1  # a missing candidate
    dense_i2t = _dense_from_topk(idx_i2t, sc_i2t, num_texts)
    dense_t2i = _dense_from_topk(idx_t2i, sc_t2i, num_images)
    ref_i2t = slow_ranks(dense_i2t.tolist(), txt2img.tolist())[0]
    ref_t2i = slow_ranks(dense_t2i.T.tolist(), txt2img.tolist())[1]
    assert topk_ranks_i2t(idx_i2t, sc_i2t, txt2img).tolist() == ref_i2t
    assert topk_ranks_t2i(idx_t2i, sc_t2i, txt2img, num_images=num_images).tolist() == ref_t2i
