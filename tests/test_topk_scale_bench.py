"""Smoke tests of benchmarks/topk_scale.py and benchmarks/scale_plan.py (quick mode) against references: exact FAISS
equals the chunked top-k, IVF-Flat searching every list equals it too, recall is a fraction of true neighbours, and
the FLOP counter counts attention that eval-mode fast paths would hide."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
pytest.importorskip("faiss")


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_recall_at_k_counts_shared_ids():
    ts = load("topk_scale")
    exact = np.array([[0, 1, 2, 3], [4, 5, 6, 7]])
    approx = np.array([[3, 2, 9, -1], [7, 6, 5, 4]])  # row 0: 2 of 4 (order and -1 do not count); row 1: 4 of 4
    assert ts.recall_at_k(approx, exact) == pytest.approx((2 / 4 + 4 / 4) / 2)


def test_embeddings_are_unit_rows_and_clustered_rows_share_centres():
    ts = load("topk_scale")
    rng = np.random.default_rng(0)
    centres = ts.make_embeddings(4, 32, distribution="uniform", sigma=0, centres=None, rng=rng)
    x = ts.make_embeddings(500, 32, distribution="clustered", sigma=0.5, centres=centres, rng=rng, block=128)
    assert np.allclose(np.linalg.norm(x, axis=1), 1, atol=1e-5)
    # sigma = 0.5: every row lies near one of the 4 centres (cos ~ 1 / sqrt(1 + 0.25) = 0.89)
    assert (x @ centres.T).max(axis=1).min() > 0.75


def test_topk_scale_quick(tmp_path):
    ts = load("topk_scale")
    payload = ts.main(["--quick", "--out", str(tmp_path)])
    written = json.loads((tmp_path / "topk_scale_quick.json").read_text())
    for field in ts.REQUIRED_FIELDS:
        assert field in written
    (point,) = payload["points"]
    m, n = point["methods"], point["n"]
    # Exact FAISS (IndexFlatIP + float64 re-scoring) returns the chunked top-k's ids exactly.
    assert m["exact-faiss"]["recall_at_k"] == 1.0 and m["exact-faiss"]["identical_to_exact"]
    nlist = point["nlist"]
    assert str(nlist) in m["ivf-flat"]["nprobe"]  # quick mode probes every list once
    for method in ts.APPROX_METHODS:
        for r in m[method]["nprobe"].values():
            assert 0.0 <= r["recall_at_k"] <= 1.0 and r["ids_valid"]
    # IVF-Flat over all lists is an exhaustive float32 search: the same neighbours as the exact top-k.
    assert m["ivf-flat"]["nprobe"][str(nlist)]["recall_at_k"] == 1.0
    # PQ codes give approximate inner products: even over all lists some true neighbours are missed.
    assert m["ivf-pq"]["nprobe"][str(nlist)]["recall_at_k"] < 1.0
    assert m["ivf-pq"]["index_bytes"] < m["ivf-flat"]["index_bytes"]  # 8 B codes vs 256 B float32 rows (64-d)
    h = written["headline"][f"clustered_{n}"]
    assert h["exact_s"] == pytest.approx(m["exact"]["seconds"])
    assert h["ivf_flat_recall_at_k"] == 1.0  # headline reports the largest nprobe


def test_flop_count_sees_eval_mode_attention():
    sp = load("scale_plan")
    torch.manual_seed(0)
    length, dim = 10, 16
    mha = torch.nn.MultiheadAttention(dim, 2, batch_first=True).eval()
    x = torch.randn(1, length, dim)
    # in-projection (3 E x E), scores (L x L x E), weighted sum (L x L x E), out-projection (E x E); 2 FLOPs per MAC
    expected = 2 * (3 * length * dim * dim + 2 * length * length * dim + length * dim * dim)
    assert sp.count(lambda: mha(x, x, x, need_weights=False), mha) == expected
    assert not mha.training  # mode restored
    lin = torch.nn.Linear(4, 3)
    assert sp.count(lambda: lin(torch.zeros(2, 4)), lin) == 2 * 2 * 4 * 3


@pytest.mark.slow  # builds a full-size ViT-B/16 (about 10 s on a quiet core; run with -m slow)
def test_flop_count_of_vit_b16_matches_open_clip_profile():
    """open_clip's docs/model_profile.csv lists ViT-B-16 at 35.13 image and 5.96 text GFLOPs; the plan's teacher
    GPU-hours rest on this count (an eval-mode count read 22.5)."""
    sp = load("scale_plan")
    from mcad_cache.teachers import create_teacher

    clip = create_teacher("clip", model="ViT-B-16", device="cpu")
    image = sp.count(lambda: clip.encode_image(torch.zeros(1, 3, 224, 224)), clip.model)
    text = sp.count(lambda: clip.encode_text(clip.tokenize(["a dog on a beach"])), clip.model)
    assert image / 1e9 == pytest.approx(35.13, abs=0.01)
    assert text / 1e9 == pytest.approx(5.96, abs=0.01)
