"""Cache writer / reader round trip, schema and fingerprint rejection, k slicing, int8 error bound, checks."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
import zarr

from mcad_cache.cache import CacheLayout, CacheWriter, check_cache, chunked_topk, describe_cache, open_cache
from mcad_cache.cache.codecs import dequantize_int8, quantize_int8
from mcad_cache.cache.schema import MANIFEST_ATTR
from mcad_cache.cache.topk import positives_i2t, positives_t2i
from mcad_cache.errors import (
    CacheIncompleteError,
    CacheKeyError,
    CacheMismatchError,
    CacheNotFoundError,
    CacheSchemaError,
    NonFiniteError,
)

CAPTIONS_PER_IMAGE = [3, 1, 2, 2, 1]  # multi-caption maps: images with 3, 1, 2 ... captions
FINGERPRINT = {"teacher": {"name": "fake", "weights_sha256": "ab" * 32}, "k": 3, "data": {"shards": ["a.tar"]}}


def _normed(n, d, gen):
    x = torch.randn(n, d, generator=gen)
    return (x / x.norm(dim=1, keepdim=True)).numpy()


def _write_cache(path, *, kind="single", fused_dtype="fp16", invalid_image=None, complete=True):
    """A small cache written through CacheWriter the way the build does; returns (layout, expected values)."""
    gen = torch.Generator().manual_seed(0)
    n_i, counts = len(CAPTIONS_PER_IMAGE), np.array(CAPTIONS_PER_IMAGE)
    n_t = int(counts.sum())
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    txt2img = np.repeat(np.arange(n_i), counts).astype(np.int32)
    keys = [f"s{i:03d}" for i in range(n_i)]
    text_keys = [f"{keys[i]}#{j}" for i in range(n_i) for j in range(counts[i])]
    layout = CacheLayout(
        kind=kind,
        num_images=n_i,
        num_texts=n_t,
        emb_dim=4,
        k=3,
        fused_dim=6 if kind == "single" else 0,
        fused_dtype=fused_dtype if kind == "single" else "none",
        rows_per_chunk=2,
        fused_rows_per_chunk=1,
    )
    w = CacheWriter.create(path, layout=layout, manifest={"fingerprint": FINGERPRINT, "logit_scale": 100.0})
    iv = np.ones(n_i, bool)
    if invalid_image is not None:
        iv[invalid_image] = False
    tv = iv[txt2img]
    img = _normed(n_i, 4, gen).astype(np.float16).astype(np.float32)
    txt = _normed(n_t, 4, gen).astype(np.float16).astype(np.float32)
    img[~iv], txt[~tv] = np.nan, np.nan
    w.write("image_keys", 0, np.array(keys))
    w.write("text_keys", 0, np.array(text_keys))
    w.write("captions", 0, np.array([f"caption {t}" for t in text_keys]))
    w.write("img2txt_offsets", 0, offsets)
    w.write("txt2img", 0, txt2img)
    w.write("image_shard", 0, np.zeros(n_i, np.int32))
    w.write("image_valid", 0, iv)
    w.write("text_valid", 0, tv)
    w.mark_done("layout", 0)
    for u in range(w.units("image_emb")):
        a, b = w.unit_range("image_emb", u)
        w.write("image_emb", a, img[a:b], keys=keys[a:b], valid=iv[a:b])
        w.mark_done("image_emb", u)
    for u in range(w.units("text_emb")):
        a, b = w.unit_range("text_emb", u)
        w.write("text_emb", a, txt[a:b], keys=text_keys[a:b], valid=tv[a:b])
        w.mark_done("text_emb", u)
    expected = {"image_emb": img, "text_emb": txt, "txt2img": txt2img, "offsets": offsets}
    for d, q, g, qv, gv in (("i2t", img, txt, iv, tv), ("t2i", txt, img, tv, iv)):
        sims, idx = chunked_topk(q, g, k=3, query_valid=qv, gallery_valid=gv)
        pos = positives_i2t(idx, txt2img) if d == "i2t" else positives_t2i(idx, txt2img)
        rng = np.random.default_rng(0)
        itm = np.where((idx >= 0)[..., None], rng.normal(size=(*idx.shape, 2)), np.nan).astype(np.float32)
        fused = np.where((idx >= 0)[..., None], rng.normal(size=(*idx.shape, 6)) * 3, np.nan).astype(np.float32)
        expected[d] = {"idx": idx, "sims": sims, "is_positive": pos, "itm_logits": itm, "fused": fused}
        stage = "image_emb" if d == "i2t" else "text_emb"
        for u in range(w.units(stage)):
            a, b = w.unit_range(stage, u)
            w.write(f"{d}_idx", a, idx[a:b])
            w.write(f"{d}_sims", a, sims[a:b], check=False)
            w.write(f"{d}_is_positive", a, pos[a:b])
            w.mark_done(f"topk_{d}", u)
            if kind == "single":
                w.write(f"{d}_itm_logits", a, itm[a:b], check=False)
                w.write_fused(d, a, fused[a:b])
                w.mark_done(f"itm_{d}", u)
    if kind == "single":
        for u in range(w.units("itm_scratch")):
            w.mark_done("itm_scratch", u)
    if complete:
        w.mark_complete()
    return layout, expected


def test_round_trip_multi_caption_maps(tmp_path):
    layout, exp = _write_cache(tmp_path / "c.zarr")
    r = open_cache(tmp_path / "c.zarr")
    assert (r.kind, r.k, r.num_images, r.num_texts, r.logit_scale, r.teacher) == ("single", 3, 5, 9, 100.0, "fake")
    assert r.complete
    np.testing.assert_array_equal(r.img2txt_offsets, exp["offsets"])
    np.testing.assert_array_equal(r.txt2img, exp["txt2img"])
    np.testing.assert_array_equal(r.img2txt(0), [0, 1, 2])
    np.testing.assert_array_equal(r.img2txt(1), [3])
    np.testing.assert_array_equal(r.img2txt(2), [4, 5])
    assert r.captions[4] == "caption s002#0"
    np.testing.assert_array_equal(r.image_rows(["s004", "s000", "s002"]), [4, 0, 2])
    np.testing.assert_array_equal(r.text_rows(["s002#1", "s000#0"]), [5, 0])
    np.testing.assert_array_equal(r.image_emb([1, 3]), exp["image_emb"][[1, 3]])
    assert r.image_emb([0]).dtype == np.float32
    np.testing.assert_array_equal(r.text_emb(), exp["text_emb"])
    for d in ("i2t", "t2i"):
        rows = np.array([3, 0, 3, 1])  # unsorted, repeated
        out = r.topk(d, rows)
        np.testing.assert_array_equal(out["idx"], exp[d]["idx"][rows])
        np.testing.assert_array_equal(out["sims"], exp[d]["sims"][rows])
        np.testing.assert_array_equal(out["is_positive"], exp[d]["is_positive"][rows])
        np.testing.assert_array_equal(out["itm_logits"], exp[d]["itm_logits"][rows])
        np.testing.assert_array_equal(out["fused_cls"], exp[d]["fused"][rows].astype(np.float16).astype(np.float32))
        assert out["fused_cls"].dtype == np.float32 and out["sims"].dtype == np.float32
    assert check_cache(r) == []
    desc = describe_cache(r)
    assert desc["arrays"]["i2t_fused"]["dims"] == ["image", "k", "fused_dim"]
    assert desc["bytes_per_sample"] > 0
    # plain zarr sees dimension_names on every array
    g = zarr.open_group(str(tmp_path / "c.zarr"), mode="r")
    for name in g.array_keys():
        assert g[name].metadata.dimension_names, name


def test_k_slicing_and_too_large_k(tmp_path):
    _, exp = _write_cache(tmp_path / "c.zarr")
    r = open_cache(tmp_path / "c.zarr")
    out = r.topk("t2i", [0, 5], k=2)
    assert out["idx"].shape == (2, 2) and out["fused_cls"].shape == (2, 2, 6)
    np.testing.assert_array_equal(out["idx"], exp["t2i"]["idx"][[0, 5], :2])
    with pytest.raises(CacheSchemaError, match="k=3"):
        r.topk("i2t", [0], k=4)
    with pytest.raises(CacheSchemaError, match="direction"):
        r.topk("x2y", [0])


def test_missing_keys_are_named(tmp_path):
    _write_cache(tmp_path / "c.zarr")
    r = open_cache(tmp_path / "c.zarr")
    with pytest.raises(CacheKeyError, match="nope"):
        r.image_rows(["s000", "nope"])
    with pytest.raises(KeyError):
        r.text_rows(["s000#7"])


def test_wrong_schema_version_incomplete_and_mismatch(tmp_path):
    with pytest.raises(CacheNotFoundError):
        open_cache(tmp_path / "none.zarr")
    _write_cache(tmp_path / "inc.zarr", complete=False)
    r = open_cache(tmp_path / "inc.zarr")
    with pytest.raises(CacheIncompleteError, match="resume"):
        r.require()
    assert "manifest: complete is not true (interrupted build)" in check_cache(r)
    _write_cache(tmp_path / "c.zarr")
    r = open_cache(tmp_path / "c.zarr")
    assert r.require(expect={"teacher": {"name": "fake"}, "k": 3}) is r
    with pytest.raises(CacheMismatchError) as err:
        r.require(expect={"teacher": {"weights_sha256": "cd" * 32}, "k": 3})
    assert "teacher.weights_sha256: cache has" in str(err.value) and "k:" not in str(err.value)
    g = zarr.open_group(str(tmp_path / "c.zarr"), mode="r+")
    g.attrs[MANIFEST_ATTR] = {**dict(g.attrs[MANIFEST_ATTR]), "schema_version": 999}
    with pytest.raises(CacheSchemaError, match="schema version 999"):
        open_cache(tmp_path / "c.zarr")


def test_schema_rejects_misshapen_array(tmp_path):
    _write_cache(tmp_path / "c.zarr", kind="dual")
    g = zarr.open_group(str(tmp_path / "c.zarr"), mode="r+")
    del g["i2t_sims"]
    g.create_array("i2t_sims", shape=(5, 2), dtype="float32", dimension_names=("image", "k"))
    with pytest.raises(CacheSchemaError, match=r"i2t_sims: shape \(5, 2\), expected \(5, 3\)"):
        open_cache(tmp_path / "c.zarr")


def test_invalid_rows_are_marked_not_zero(tmp_path):
    _write_cache(tmp_path / "c.zarr", invalid_image=1)
    r = open_cache(tmp_path / "c.zarr")
    assert not r.image_valid[1] and not r.text_valid[3]
    assert np.isnan(r.image_emb([1])).all() and np.isnan(r.text_emb([3])).all()
    out = r.topk("i2t", [1])
    assert (out["idx"] == -1).all() and np.isnan(out["sims"]).all() and np.isnan(out["fused_cls"]).all()
    assert not out["valid"].any()
    assert not (r.topk("t2i", np.arange(9))["idx"] == 1).any()
    assert check_cache(r) == []


def test_int8_round_trip_error_bound(tmp_path):
    x = np.random.default_rng(0).normal(size=(50, 7, 32)).astype(np.float32) * 5
    x[0, 0] = 0.0
    q, scale = quantize_int8(x)
    back = dequantize_int8(q, scale)
    bound = np.abs(x).max(axis=-1, keepdims=True) / 127 / 2
    assert (np.abs(back - x) <= bound + 1e-6).all()
    assert (back[0, 0] == 0).all()
    _, exp = _write_cache(tmp_path / "c.zarr", fused_dtype="int8")
    r = open_cache(tmp_path / "c.zarr")
    out = r.topk("i2t", np.arange(5))
    ref, filled = exp["i2t"]["fused"], exp["i2t"]["idx"] >= 0
    err = np.abs(out["fused_cls"][filled] - ref[filled])
    assert (err <= np.abs(ref[filled]).max(axis=-1, keepdims=True) / 254 + 1e-6).all()
    assert np.isnan(out["fused_cls"][~filled]).all()
    assert r.array("i2t_fused").dtype == np.int8
    assert check_cache(r) == []


def test_reader_pickles_and_reopens(tmp_path):
    _, exp = _write_cache(tmp_path / "c.zarr")
    r = open_cache(tmp_path / "c.zarr")
    _ = r.image_keys  # loaded arrays are not pickled
    assert "i2t_fused" not in open_cache(tmp_path / "c.zarr", preload=True)._mem  # fused: read per call
    assert "i2t_itm_logits" in open_cache(tmp_path / "c.zarr", preload=True)._mem
    r2 = pickle.loads(pickle.dumps(r))
    assert r2._group is None and r2._mem == {}
    np.testing.assert_array_equal(r2.topk("i2t", [2])["fused_cls"], r.topk("i2t", [2])["fused_cls"])
    np.testing.assert_array_equal(r2.image_rows(["s001"]), [1])


def test_writer_checks_values_and_alignment(tmp_path):
    layout = CacheLayout(
        kind="single", num_images=3, num_texts=3, emb_dim=2, k=2, fused_dim=2, rows_per_chunk=2, fused_rows_per_chunk=2
    )
    w = CacheWriter.create(tmp_path / "c.zarr", layout=layout, manifest={"fingerprint": {}})
    with pytest.raises(ValueError, match="aligned"):
        w.write("image_emb", 1, np.zeros((2, 2), np.float32))
    bad = np.array([[0.6, 0.8], [np.inf, 0.0]], np.float32)
    with pytest.raises(NonFiniteError, match=r"'image_emb'.*'k1'"):
        w.write("image_emb", 0, bad, keys=["k0", "k1"])
    w.write("image_emb", 0, bad, keys=["k0", "k1"], valid=np.array([True, False]))  # invalid rows unchecked
    big = np.full((1, 2, 2), np.nan, np.float32)
    big[0, 0] = [1e5, 0.0]
    with pytest.raises(NonFiniteError, match=r"'t2i_fused'.*float16 range.*'q2'"):
        w.write_fused("t2i", 2, big, keys=["q2"])
    with pytest.raises(FileExistsError):
        CacheWriter.create(tmp_path / "c.zarr", layout=layout, manifest={})


def test_check_finds_each_problem(tmp_path):
    _write_cache(tmp_path / "c.zarr")
    g = zarr.open_group(str(tmp_path / "c.zarr"), mode="r+")
    keys = g["image_keys"][:]
    keys[1] = keys[0]
    g["image_keys"][:] = keys
    emb = g["text_emb"][:]
    emb[2, 0] = np.nan
    g["text_emb"][:] = emb
    pos = g["i2t_is_positive"][:]
    pos[0, 0] = not pos[0, 0]
    g["i2t_is_positive"][:] = pos
    sims = g["i2t_sims"][:]
    sims[0] = sims[0, ::-1]
    g["i2t_sims"][:] = sims
    idx = g["t2i_idx"][:]
    idx[4, 1] = 99
    g["t2i_idx"][:] = idx
    problems = "\n".join(check_cache(open_cache(tmp_path / "c.zarr")))
    assert "image_keys: 1 duplicate key(s), e.g. ['s000']" in problems
    assert "text_emb: non-finite values in 1 valid row(s)" in problems
    assert "i2t_is_positive: disagrees" in problems
    assert "i2t_sims: rows not sorted" in problems
    assert "t2i_idx: ids outside [-1, 5)" in problems
