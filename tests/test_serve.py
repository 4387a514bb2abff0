"""The search page's endpoints, in-process (FastAPI TestClient): results, thumbnails by key only, and a clear 4xx
for every bad query (never a 500)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from export_fixtures import gallery_shards, make_run
from PIL import Image

from mcad_cache.data.index import ShardIndex
from mcad_cache.export.bundle import open_encoder
from mcad_cache.search.app import MAX_K, create_app

pytest.importorskip("fastapi")
pytest.importorskip("faiss")
from fastapi.testclient import TestClient  # noqa: E402  (after the skip: needs httpx)

import mcad_cache.pipelines.search as search  # noqa: E402


@pytest.fixture(scope="module")
def client_and_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    run, shards = make_run(root / "run"), gallery_shards(root / "shards")
    search.build_index(search.IndexConfig(model=str(run), data=tuple(shards), out=str(root / "index")))
    index, encoder = search.open_index(str(root / "index"))
    return TestClient(create_app(index, encoder), raise_server_exceptions=True), shards


def test_page_and_text_search(client_and_shards):
    client, _ = client_and_shards
    page = client.get("/")
    assert page.status_code == 200 and "mcad-cache search" in page.text and "12 indexed images" in page.text
    r = client.get("/api/search", params={"q": "a red dog", "k": 5})
    assert r.status_code == 200
    body = r.json()
    scores = [x["score"] for x in body["results"]]
    assert len(scores) == 5 and scores == sorted(scores, reverse=True)
    assert all(
        x["key"].startswith("s00") and x["captions"] and x["thumb"] == f"thumb/{x['key']}" for x in body["results"]
    )
    assert body["query"] == "a red dog" and body["timing_ms"]["encode"] >= 0


def test_image_upload_finds_itself(client_and_shards):
    client, shards = client_and_shards
    data = ShardIndex(shards).read_image_bytes("s0007")
    r = client.post("/api/search/image", params={"k": 3}, files={"file": ("q.png", data, "image/png")})
    assert r.status_code == 200, r.text
    top = r.json()["results"][0]
    assert top["key"] == "s0007" and top["score"] > 0.999


def test_thumbnails_only_for_indexed_keys(client_and_shards):
    client, _ = client_and_shards
    r = client.get("/thumb/s0003")
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(r.content)).size == (32, 24)  # already under the thumbnail size
    for key in ("nope", "..%2F..%2Fetc%2Fpasswd", "%2Fetc%2Fpasswd"):
        r = client.get(f"/thumb/{key}")
        assert r.status_code == 404, (key, r.status_code)


@pytest.mark.parametrize(
    ("params", "status", "needle"),
    [({"q": ""}, 400, "empty"), ({"q": "   "}, 400, "empty"), ({"q": "dog " * 400}, 400, "limit is 1000"),
     ({"q": "dog", "k": 0}, 400, "between 1 and"), ({"q": "dog", "k": MAX_K + 1}, 400, "between 1 and"),
     ({"q": "dog", "k": "ten"}, 400, "bad request")],
)  # fmt: skip
def test_bad_text_queries_get_a_message(client_and_shards, params, status, needle):
    client, _ = client_and_shards
    r = client.get("/api/search", params=params)
    assert r.status_code == status and needle in r.json()["error"], r.text


def test_bad_uploads_get_a_message(client_and_shards):
    client, _ = client_and_shards
    r = client.post("/api/search/image", files={"file": ("notes.txt", b"hello, not an image", "text/plain")})
    assert r.status_code == 415 and "not a readable image" in r.json()["error"]
    r = client.post("/api/search/image", files={"file": ("empty.png", b"", "image/png")})
    assert r.status_code == 400 and "empty" in r.json()["error"]
    r = client.post("/api/search/image")
    assert r.status_code == 400 and "file" in r.json()["error"]
    big = np.zeros((8, 8, 3), np.uint8)
    buf = io.BytesIO()
    Image.fromarray(big).save(buf, "PNG")
    r = client.post("/api/search/image", params={"k": 0}, files={"file": ("a.png", buf.getvalue(), "image/png")})
    assert r.status_code == 400


def test_encoder_of_another_size_is_refused(tmp_path):
    from mcad_cache.search.index import QueryError, SearchIndex

    run = make_run(tmp_path / "run64", embed_dim=64)
    index = SearchIndex.create(
        np.eye(4, 32, dtype=np.float32), [{"key": str(i), "shard": "", "captions": []} for i in range(4)]
    )
    with pytest.raises(QueryError, match="D=64 but index D=32"):
        create_app(index, open_encoder(run))
