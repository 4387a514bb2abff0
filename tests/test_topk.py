"""Chunked global top-k against a full-matrix torch reference, with deterministic ties."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mcad_cache.cache.topk import chunked_topk, faiss_topk, force_positives, positives_i2t, positives_t2i


def _reference(query: torch.Tensor, gallery: torch.Tensor, k: int, gallery_valid=None):
    """Slow oracle: full similarity matrix, ties broken by the lower gallery row via a stable full sort."""
    sims = (query.double() @ gallery.double().T).float()
    if gallery_valid is not None:
        sims[:, ~gallery_valid] = float("-inf")
    values, idx = sims.sort(dim=1, descending=True, stable=True)
    pad = max(0, k - values.shape[1])
    values = torch.nn.functional.pad(values[:, :k], (0, pad), value=float("-inf"))
    idx = torch.nn.functional.pad(idx[:, :k], (0, pad), value=-1)
    idx = torch.where(torch.isfinite(values), idx, torch.full_like(idx, -1))
    values = torch.where(torch.isfinite(values), values, torch.full_like(values, float("nan")))
    return values.numpy(), idx.numpy().astype(np.int32)


def _normed(n, d, gen):
    x = torch.randn(n, d, generator=gen)
    return x / x.norm(dim=1, keepdim=True)


@pytest.mark.parametrize(("chunk", "gchunk"), [(7, 5), (4, 64), (64, 3), (1000, 1000)])
def test_chunked_equals_full_topk(chunk, gchunk):
    gen = torch.Generator().manual_seed(0)
    q, g = _normed(23, 8, gen), _normed(37, 8, gen)  # N not a multiple of either chunk size
    sims, idx = chunked_topk(q, g, k=6, chunk_size=chunk, gallery_chunk_size=gchunk)
    ref_sims, ref_idx = _reference(q, g, 6)
    assert idx.dtype == np.int32 and sims.dtype == np.float32
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_allclose(sims, ref_sims, rtol=0, atol=1e-6)
    # plain torch.topk agrees on the values (no ties in random data)
    top = torch.topk(q @ g.T, 6)
    np.testing.assert_allclose(sims, top.values.numpy(), atol=1e-6)
    np.testing.assert_array_equal(idx, top.indices.numpy())


@pytest.mark.parametrize("gchunk", [2, 3, 5, 16])
def test_ties_broken_by_lower_row_for_any_chunking(gchunk):
    gen = torch.Generator().manual_seed(0)
    base = _normed(4, 6, gen)
    # gallery of 13 rows holding only 4 distinct vectors: many exact ties, across chunk borders
    g = base[torch.tensor([0, 1, 2, 0, 3, 1, 0, 2, 3, 3, 0, 1, 2])]
    q = _normed(9, 6, gen)
    sims, idx = chunked_topk(q, g, k=5, chunk_size=4, gallery_chunk_size=gchunk)
    ref_sims, ref_idx = _reference(q, g, 5)
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_array_equal(sims, ref_sims)
    # within each row, tied values appear in ascending row order
    for r in range(q.shape[0]):
        for j in range(4):
            if sims[r, j] == sims[r, j + 1]:
                assert idx[r, j] < idx[r, j + 1]


@pytest.mark.parametrize("rescore_margin", [0, 2])
def test_validity_masks_and_k_larger_than_gallery(rescore_margin):
    gen = torch.Generator().manual_seed(0)
    q, g = _normed(6, 4, gen), _normed(5, 4, gen)
    g[1] = float("nan")  # invalid rows may hold NaN: never returned, never poison other rows
    gv = torch.tensor([True, False, True, True, True])
    qv = torch.tensor([True, True, False, True, True, True])
    sims, idx = chunked_topk(
        q, g, k=6, chunk_size=4, gallery_chunk_size=2, query_valid=qv, gallery_valid=gv, rescore_margin=rescore_margin
    )
    ref_sims, ref_idx = _reference(q, torch.nan_to_num(g), 6, gallery_valid=gv)
    ref_idx[2], ref_sims[2] = -1, np.nan
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_allclose(sims, ref_sims, atol=1e-6)
    assert (idx[:, 4:] == -1).all() and np.isnan(sims[:, 4:]).all()  # only 4 valid gallery rows
    assert not (idx == 1).any()


def test_positive_flags_and_forcing():
    txt2img = np.array([0, 0, 0, 1, 2, 2], dtype=np.int32)  # images with 3, 1, 2 captions
    idx_i2t = np.array([[0, 3, 5], [4, 3, -1], [1, 2, 0]], dtype=np.int32)
    np.testing.assert_array_equal(
        positives_i2t(idx_i2t, txt2img), [[True, False, False], [False, True, False], [False, False, False]]
    )
    idx_t2i = np.array([[0, 1], [2, 0], [-1, 0], [1, 2], [2, 1], [0, 1]], dtype=np.int32)
    np.testing.assert_array_equal(
        positives_t2i(idx_t2i, txt2img),
        [[True, False], [False, True], [False, True], [True, False], [True, False], [False, False]],
    )
    sims = np.array([[0.9, 0.5, 0.4], [0.8, 0.7, np.nan], [0.5, 0.5, 0.5]], dtype=np.float32)
    pos = [np.array([0, 1, 2]), np.array([3]), np.array([4, 5])]
    pos_sims = [np.array([0.9, 0.1, 0.2]), np.array([0.7]), np.array([0.3, 0.3])]
    s2, i2 = force_positives(sims, idx_i2t, pos, pos_sims)
    np.testing.assert_array_equal(i2[0], [0, 2, 1])  # all three positives, sorted by similarity
    np.testing.assert_array_equal(i2[1], idx_i2t[1])  # already contained its positive
    np.testing.assert_array_equal(i2[2], [0, 4, 5])  # three-way tie at 0.5 keeps the lowest row 0
    np.testing.assert_allclose(s2[2], [0.5, 0.3, 0.3])


def test_faiss_backend_matches_chunked():
    pytest.importorskip("faiss")  # optional extra: mcad-cache[faiss]
    gen = torch.Generator().manual_seed(0)
    base = _normed(30, 8, gen)
    g = base[torch.randint(0, 30, (50,), generator=gen)]  # duplicates: exact ties
    q = _normed(17, 8, gen)
    gv = torch.ones(50, dtype=torch.bool)
    gv[::7] = False
    qv = torch.ones(17, dtype=torch.bool)
    qv[3] = False
    ref = chunked_topk(q, g, k=5, chunk_size=4, query_valid=qv, gallery_valid=gv)
    got = faiss_topk(q.numpy(), g.numpy(), k=5, chunk_size=6, query_valid=qv.numpy(), gallery_valid=gv.numpy())
    np.testing.assert_array_equal(got[1], ref[1])
    np.testing.assert_array_equal(got[0], ref[0])


@pytest.mark.parametrize(("chunk", "gchunk"), [(7, 5), (64, 3), (1000, 1000)])
def test_float32_retrieval_with_float64_rescoring_equals_exact(chunk, gchunk):
    gen = torch.Generator().manual_seed(0)
    base = _normed(20, 8, gen)
    g = torch.cat([_normed(30, 8, gen), base[torch.tensor([0, 1, 2, 0, 3, 1, 0, 2])]])  # duplicates: ties
    q = torch.cat([_normed(21, 8, gen), base[:3]])
    gv = torch.ones(g.shape[0], dtype=torch.bool)
    gv[5] = False
    ref = chunked_topk(q, g, k=6, chunk_size=1000, gallery_valid=gv)
    got = chunked_topk(q, g, k=6, chunk_size=chunk, gallery_chunk_size=gchunk, gallery_valid=gv, rescore_margin=4)
    np.testing.assert_array_equal(got[1], ref[1])
    np.testing.assert_array_equal(got[0], ref[0])
