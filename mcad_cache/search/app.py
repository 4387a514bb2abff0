"""The local search page: a FastAPI app over a ``SearchIndex`` and an encoder (``mcad-cache serve INDEX``).

Endpoints (all GET unless noted):

- ``/``: the page. Type a query or pick an image; results show as thumbnails with captions and cosine scores.
- ``/api/search?q=TEXT&k=10``: text -> images (t2i). JSON ``{"query", "k", "results": [{"rank", "key", "score",
  "captions", "thumb"}], "timing_ms": {"encode", "search"}}``.
- ``POST /api/search/image`` (multipart field ``file``): image -> images, same JSON.
- ``/thumb/{key}``: a JPEG thumbnail of an **indexed** image, read from the index's shards by its WebDataset key.
  Only keys in the index are served; nothing in a request is used as a path.

Bad requests get a JSON ``{"error": message}`` with status 400 (empty / too long query, k out of range), 413
(upload too large), 415 (not a decodable image) or 404 (unknown key), never a 500. The server binds 127.0.0.1 by
default (``pipelines/search.py``).
"""

from __future__ import annotations

import io
import time
from dataclasses import fields
from typing import Annotated, Any

from fastapi import FastAPI, File, Query, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response

from mcad_cache.data.decode import DecodePolicy, decode_image
from mcad_cache.data.index import ShardIndex
from mcad_cache.data.skips import SampleSkip
from mcad_cache.export.runtime import Encoder
from mcad_cache.search.index import QueryError, SearchIndex, check_text_query

MAX_K = 100  # results per query (our choice)
MAX_UPLOAD_BYTES = 10 * 1024 * 1024  # query image upload limit (our choice)
THUMB_PX = 192  # longest thumbnail side in pixels (our choice)


def decode_policy_from_dict(values: dict[str, Any]) -> DecodePolicy:
    """``DecodePolicy`` from its ``to_dict()`` form (unknown keys such as ``decode_version`` are ignored)."""
    names = {f.name for f in fields(DecodePolicy)}
    clean = {k: v for k, v in values.items() if k in names}
    if "background" in clean:
        clean["background"] = tuple(clean["background"])
    return DecodePolicy(**clean)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def create_app(index: SearchIndex, encoder: Encoder, *, shards: list[str] | None = None) -> FastAPI:
    """The FastAPI app (module docstring).

    Args:
        index: the opened index.
        encoder: its encoder (exported or PyTorch); must have the index's D.
        shards: shard paths for thumbnails (default: those recorded in the index).
    Raises:
        QueryError: the encoder's D differs from the index's.
    """
    if encoder.embed_dim != index.emb.shape[1]:
        raise QueryError(
            f"encoder D={encoder.embed_dim} but index D={index.emb.shape[1]}: index built with another model"
        )
    app = FastAPI(title="mcad-cache search", docs_url=None, redoc_url=None)
    policy = decode_policy_from_dict(encoder.decode_policy)
    rows = {item["key"]: i for i, item in enumerate(index.items)}
    shard_paths = shards if shards is not None else sorted({item["shard"] for item in index.items})
    state: dict[str, Any] = {"reader": None}

    def results(query_emb: Any, k: int, query: str, t_encode: float) -> dict[str, Any]:
        t0 = time.perf_counter()
        sims, idx = index.search(query_emb, k=k)
        t_search = time.perf_counter() - t0
        out = []
        for rank, (s, i) in enumerate(zip(sims[0].tolist(), idx[0].tolist(), strict=True), start=1):
            if i < 0:
                continue
            item = index.items[i]
            out.append({"rank": rank, "key": item["key"], "score": round(float(s), 4), "captions": item["captions"],
                        "thumb": f"thumb/{item['key']}"})  # fmt: skip
        timing = {"encode": round(1000 * t_encode, 2), "search": round(1000 * t_search, 2)}
        return {"query": query, "k": k, "results": out, "timing_ms": timing}

    @app.exception_handler(QueryError)
    async def _query_error(request: Any, err: QueryError) -> JSONResponse:
        return _error(400, str(err))

    @app.exception_handler(RequestValidationError)
    async def _bad_request(request: Any, err: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in err.errors())
        return _error(400, f"bad request: {problems}")

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return PAGE.replace("{{num_items}}", str(len(index.items))).replace("{{source}}", _source_label(encoder))

    @app.get("/api/search")
    def search_text(q: str = "", k: Annotated[int, Query()] = 10) -> Any:
        if not 1 <= k <= MAX_K:
            raise QueryError(f"k must be between 1 and {MAX_K}, got {k}")
        query = check_text_query(q)
        t0 = time.perf_counter()
        emb = encoder.encode_text([query])
        return results(emb, k, query, time.perf_counter() - t0)

    @app.post("/api/search/image")
    async def search_image(file: Annotated[UploadFile, File()], k: Annotated[int, Query()] = 10) -> Any:
        if not 1 <= k <= MAX_K:
            raise QueryError(f"k must be between 1 and {MAX_K}, got {k}")
        data = await file.read(MAX_UPLOAD_BYTES + 1)
        if len(data) > MAX_UPLOAD_BYTES:
            return _error(413, f"the uploaded file is over {MAX_UPLOAD_BYTES // (1024 * 1024)} MB")
        if not data:
            return _error(400, "the uploaded file is empty: choose an image file")
        try:
            image = decode_image(data, policy=policy)
        except SampleSkip as err:
            return _error(415, f"the uploaded file {file.filename!r} is not a readable image ({err.reason})")
        t0 = time.perf_counter()
        emb = encoder.encode_images([image])
        return results(emb, k, f"image: {file.filename}", time.perf_counter() - t0)

    @app.get("/thumb/{key}")
    def thumb(key: str) -> Response:
        if key not in rows:
            return _error(404, f"no indexed image with key {key!r}")
        if state["reader"] is None:
            state["reader"] = ShardIndex(shard_paths)
        try:
            data = state["reader"].read_image_bytes(key)
            image = decode_image(data, policy=policy)
        except (SampleSkip, KeyError, FileNotFoundError) as err:
            return _error(404, f"image {key!r} cannot be read from the index's shards: {err}")
        image.thumbnail((THUMB_PX, THUMB_PX))
        buf = io.BytesIO()
        image.save(buf, "JPEG", quality=85)
        return Response(buf.getvalue(), media_type="image/jpeg")

    return app


def _source_label(encoder: Encoder) -> str:
    src = encoder.source
    if src.get("kind") == "export":
        return f"{src.get('format')} export ({src.get('quantize', 'none')})"
    return "PyTorch student"


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>mcad-cache search</title>
<style>
body{font-family:system-ui,sans-serif;margin:1.2rem;color:#222;background:#fafafa}
h1{font-size:1.2rem;margin:0 0 .6rem}
form{display:flex;gap:.5rem;flex-wrap:wrap;align-items:center;margin-bottom:.8rem}
input[type=text]{width:22rem;padding:.35rem}
#meta{color:#666;font-size:.85rem;margin-bottom:.6rem}
#err{color:#b00020;font-weight:600}
#grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(200px,1fr));gap:.8rem}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:.4rem;font-size:.8rem}
.card img{width:100%;height:150px;object-fit:contain;background:#eee}
.score{color:#555;font-variant-numeric:tabular-nums}
</style></head><body>
<h1>mcad-cache search</h1>
<div id="meta">{{num_items}} indexed images &middot; encoder: {{source}}</div>
<form id="tf"><input type="text" id="q" placeholder="a red bicycle" maxlength="1000">
<label>k <input type="number" id="k" value="10" min="1" max="100" style="width:4rem"></label>
<button type="submit">Search</button>
<label>or by image <input type="file" id="f" accept="image/*"></label></form>
<div id="err"></div><div id="info" class="score"></div><div id="grid"></div>
<script>
const $ = (id) => document.getElementById(id);
function show(data) {
  $("err").textContent = data.error || "";
  $("grid").innerHTML = "";
  if (data.error) { $("info").textContent = ""; return; }
  $("info").textContent = `${data.results.length} results for "${data.query}" (encode ${data.timing_ms.encode} ms, ` +
    `search ${data.timing_ms.search} ms)`;
  for (const r of data.results) {
    const card = document.createElement("div"); card.className = "card";
    const img = document.createElement("img"); img.src = r.thumb; img.alt = r.key; card.appendChild(img);
    const head = document.createElement("div");
    head.innerHTML = `<b>#${r.rank}</b> <span class="score">${r.score.toFixed(3)}</span> `;
    head.appendChild(document.createTextNode(r.key)); card.appendChild(head);
    for (const c of r.captions) { const p = document.createElement("div"); p.textContent = c; card.appendChild(p); }
    $("grid").appendChild(card);
  }
}
$("tf").addEventListener("submit", async (e) => {
  e.preventDefault();
  const url = `api/search?q=${encodeURIComponent($("q").value)}&k=${$("k").value}`;
  show(await (await fetch(url)).json());
});
$("f").addEventListener("change", async () => {
  const body = new FormData(); body.append("file", $("f").files[0]);
  show(await (await fetch(`api/search/image?k=${$("k").value}`, {method: "POST", body})).json());
});
const initial = new URLSearchParams(location.search).get("q");
if (initial) { $("q").value = initial; $("tf").requestSubmit(); }
</script></body></html>
"""
