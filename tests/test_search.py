"""Search: the faiss index against a numpy brute-force reference, IVF recall, save/open round trip, and the index /
search commands on an ONNX export of the tiny student (gallery images find themselves; CLI errors are one line)."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
from export_fixtures import gallery_shards, make_run
from PIL import Image
from typer.testing import CliRunner

from mcad_cache.cli.main import app
from mcad_cache.data.index import ShardIndex
from mcad_cache.search.index import (
    QueryError,
    SearchIndex,
    SearchIndexError,
    build_faiss,
    check_text_query,
    ivf_params,
    recall_vs_exact,
)

pytest.importorskip("faiss")
runner = CliRunner()


def _unit(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_flat_index_equals_brute_force():
    rng = np.random.default_rng(0)
    gallery, queries = _unit(rng, 500, 32), _unit(rng, 20, 32)
    items = [{"key": f"k{i}", "shard": "s.tar", "captions": [f"c{i}"]} for i in range(500)]
    index = SearchIndex.create(gallery, items, kind="flat")
    sims, idx = index.search(queries, k=10)
    ref = queries.astype(np.float64) @ gallery.T.astype(np.float64)
    ref_idx = np.argsort(-ref, axis=1, kind="stable")[:, :10]
    assert np.array_equal(idx, ref_idx)
    np.testing.assert_allclose(sims, np.take_along_axis(ref, ref_idx, 1), atol=1e-5)
    assert index.search(queries[:1], k=10_000)[1].shape == (1, 500)  # k capped at N


def test_ivf_recall_and_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    gallery = _unit(rng, 2000, 16)
    items = [{"key": f"k{i}", "shard": "s.tar", "captions": []} for i in range(2000)]
    assert ivf_params(2000) == (51, 6)  # 4 sqrt(N) = 178.9 capped at N / 39 = 51 lists; nprobe = 51 // 8
    full = SearchIndex.create(gallery, items, kind="ivf", nlist=16, nprobe=16)  # every list probed: exact
    assert full.meta["recall@10_vs_exact"] == 1.0
    index = SearchIndex.create(gallery, items, kind="ivf", nlist=64, nprobe=2, recall_queries=200)
    recall = index.meta["recall@10_vs_exact"]
    assert 0.0 < recall < 1.0  # 2 of 64 lists on uniform random data miss some true neighbours
    index.save(tmp_path / "ix")
    again = SearchIndex.open(tmp_path / "ix")
    q = gallery[:50]
    assert np.array_equal(again.search(q, k=5)[1], index.search(q, k=5)[1])
    exact = build_faiss(gallery, kind="flat")
    assert recall_vs_exact(exact, exact, q, k=5) == 1.0
    assert recall_vs_exact(again.faiss_index, exact, q, k=10) <= 1.0


def test_index_and_query_refusals(tmp_path):
    with pytest.raises(SearchIndexError, match="not a search index"):
        SearchIndex.open(tmp_path)
    with pytest.raises(SearchIndexError, match="kind 'hnsw'"):
        SearchIndex.create(np.zeros((2, 4), np.float32), [{}, {}], kind="hnsw")
    with pytest.raises(QueryError, match="empty"):
        check_text_query("   ")
    with pytest.raises(QueryError, match="1001 characters"):
        check_text_query("a" * 1001)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(run dir, onnx export, shards, index folder) built through the CLI."""
    root = tmp_path_factory.mktemp("search")
    run, shards = make_run(root / "run"), gallery_shards(root / "shards")
    export = root / "export"
    result = runner.invoke(app, ["export", str(run), "--format", "onnx", "--out", str(export)])
    assert result.exit_code == 0, result.output
    index = root / "index"
    result = runner.invoke(app, ["index", str(export), "--data", str(root / "shards"), "--out", str(index)])
    assert result.exit_code == 0, result.output
    return run, export, shards, index


def test_index_from_export_matches_run(built, tmp_path):
    run, export, shards, index = built
    meta = json.loads((index / "index.json").read_text())
    assert meta["num_items"] == 12 and meta["kind"] == "flat" and meta["source"]["format"] == "onnx"
    assert meta["images_per_s"] > 0
    # The same gallery encoded by the PyTorch student of the run: the exported files give the same embeddings.
    args = ["index", str(run), "--data", shards[0], "--data", shards[1], "--out", str(tmp_path / "ix_run")]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    a, b = SearchIndex.open(index), SearchIndex.open(tmp_path / "ix_run")
    assert [it["key"] for it in a.items] == [it["key"] for it in b.items]
    assert (a.emb * b.emb).sum(1).min() > 0.9999


def test_search_cli_text_and_image(built, tmp_path):
    _, _, shards, index = built
    result = runner.invoke(app, ["search", str(index), "a red dog", "-k", "3"])
    assert result.exit_code == 0, result.output
    keys_shown = [line for line in result.output.splitlines() if "s00" in line]
    assert len(keys_shown) >= 3  # three results with their keys
    # Query by each of three gallery images: it must come back first (cosine ~1 with itself).
    reader = ShardIndex(shards)
    for key in ("s0000", "s0005", "s0011"):
        path = tmp_path / f"{key}.png"
        Image.open(io.BytesIO(reader.read_image_bytes(key))).save(path)
        result = runner.invoke(app, ["search", str(index), "--image", str(path), "-k", "2"])
        assert result.exit_code == 0, result.output
        cells = [[c.strip() for c in line.split("│")[1:-1]] for line in result.output.splitlines() if "│" in line]
        assert [c[2] for c in cells if c[0] == "1"] == [key], result.output


def test_search_cli_format_json_csv_md(built):
    _, _, _, index = built
    table = runner.invoke(app, ["search", str(index), "a red dog", "-k", "3"])
    result = runner.invoke(app, ["search", str(index), "a red dog", "-k", "3", "--format", "json"])
    assert result.exit_code == 0, result.output
    parsed = json.loads(result.stdout)
    assert parsed["query"] == "a red dog" and [r["rank"] for r in parsed["results"]] == [1, 2, 3]
    assert all(r["key"] in table.stdout for r in parsed["results"])  # the table shows the same keys
    csv_out = runner.invoke(app, ["search", str(index), "a red dog", "-k", "3", "--format", "csv"]).stdout
    rows = list(csv.DictReader(io.StringIO(csv_out)))
    assert [r["key"] for r in rows] == [r["key"] for r in parsed["results"]]
    assert [float(r["score"]) for r in rows] == [round(r["score"], 4) for r in parsed["results"]]
    md = runner.invoke(app, ["search", str(index), "a red dog", "-k", "3", "--format", "md"]).stdout
    header = [c.strip() for c in md.splitlines()[0].strip("|").split("|")]
    assert header == ["rank", "score", "key", "captions"] and len(md.splitlines()) == 5  # header, rule, 3 rows


def test_search_cli_errors_are_one_line(built, tmp_path):
    _, _, _, index = built
    for args, needle in (
        (["search", str(index), "   "], "either a text query"),
        (["search", str(index), "x" * 2000], "limit is 1000"),
        (["search", str(tmp_path), "dog"], "not a search index"),
        (["search", str(index), "--image", str(tmp_path / "none.png")], "no such file"),
    ):
        result = runner.invoke(app, args)
        assert result.exit_code == 1, result.output
        assert needle in result.output and len(result.output.strip().splitlines()) == 1, result.output
