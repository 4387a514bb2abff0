"""``mcad-cache index``, ``mcad-cache search`` and ``mcad-cache serve`` (docs/export.md).

- ``index EXPORT_OR_RUN --data SHARDS --out INDEX``: encode every usable image of the shards with the export's own
  files (or the PyTorch student of a run directory) into a ``SearchIndex`` folder (faiss flat or IVF).
- ``search INDEX "a red bicycle" [--image FILE] [-k 10]``: top-k indexed images with keys, captions and cosine.
- ``serve INDEX [--host 127.0.0.1] [--port 8000]``: the local search page (FastAPI app under uvicorn).

The encoder of a search or serve run is the one the index was built with (recorded in ``index.json``), unless
``--model`` names another one of the same D.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mcad_cache.data.decode import decode_image
from mcad_cache.data.skips import SampleSkip
from mcad_cache.data.webdataset import expand_shards, iter_samples
from mcad_cache.export.bundle import open_encoder
from mcad_cache.export.runtime import Encoder
from mcad_cache.progress import ProgressFn, no_progress
from mcad_cache.search.app import create_app, decode_policy_from_dict
from mcad_cache.search.index import QueryError, SearchIndex, SearchIndexError, check_text_query

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class IndexConfig:
    """One ``mcad-cache index`` run. Flags map 1:1 to these fields."""

    model: str = ""  # export folder (its files are run) or distill run directory / student checkpoint (PyTorch)
    data: tuple[str, ...] = ()  # gallery shards (paths, globs, braces, folders)
    out: str = ""  # index folder
    kind: str = "auto"  # auto | flat | ivf (auto: flat below 20k images)
    nlist: int = 0  # IVF lists (0 = 4 sqrt(N))
    nprobe: int = 0  # IVF lists probed per query (0 = nlist / 8)
    batch_size: int = 32  # images per encoder call (PyTorch student; exports run batch 1)
    threads: int = 1  # CPU threads of the encoder
    overwrite: bool = False  # replace an existing index folder


def build_index(config: IndexConfig, *, progress: ProgressFn = no_progress) -> dict[str, Any]:
    """Encode the gallery and write the index folder.

    Returns:
        ``{"out", "num_items", "num_skipped", "kind", "images_per_s", "seconds", ...index.json fields}``.
    Raises:
        SearchIndexError: no shards, no usable image, or ``out`` exists (without ``overwrite``).
        ExportError / FormatUnavailableError: ``model`` is not an export or run, or its runtime is missing.
    """
    out = Path(config.out)
    if not config.out:
        raise SearchIndexError("--out is required: the index folder to write")
    if out.exists() and any(out.iterdir()) and not config.overwrite:
        raise SearchIndexError(f"--out {out} exists and is not empty; choose another folder or pass --overwrite")
    try:
        shards = expand_shards(list(config.data))
    except ValueError as err:
        raise SearchIndexError(f"--data: {err}") from err
    encoder = open_encoder(config.model, threads=config.threads)
    policy = decode_policy_from_dict(encoder.decode_policy)
    items: list[dict[str, Any]] = []
    chunks, batch, skipped = [], [], 0
    t0 = time.perf_counter()
    for sample in progress(iter_samples(shards, policy=policy), "encode gallery", None):
        if sample.skip is not None:
            skipped += 1
            continue
        items.append({"key": sample.key, "shard": str(Path(sample.shard).resolve()), "captions": sample.captions})
        batch.append(sample.image)
        if len(batch) == config.batch_size:
            chunks.append(encoder.encode_images(batch))
            batch = []
    if batch:
        chunks.append(encoder.encode_images(batch))
    encode_s = time.perf_counter() - t0
    if not items:
        raise SearchIndexError(f"--data: no usable image in {len(shards)} shard(s) ({skipped} skipped)")
    emb = np.concatenate(chunks, 0)
    t1 = time.perf_counter()
    meta = {"source": encoder.source, "model": str(Path(config.model).resolve()), "shards": shards,
            "num_skipped": skipped, "encode_s": round(encode_s, 3),
            "images_per_s": round(len(items) / max(encode_s, 1e-9), 2)}  # fmt: skip
    index = SearchIndex.create(
        emb, items, kind=config.kind, nlist=config.nlist or None, nprobe=config.nprobe or None, meta=meta
    )
    index.meta["index_build_s"] = round(time.perf_counter() - t1, 3)
    index.save(out)
    return {"out": str(out), **index.meta}


def open_index(index_dir: str, *, model: str = "", threads: int = 1) -> tuple[SearchIndex, Encoder]:
    """The index and its encoder (``model`` overrides the one recorded in ``index.json``).

    Raises:
        SearchIndexError: not an index folder.
        ExportError: the recorded model folder is gone (pass ``--model``).
    """
    index = SearchIndex.open(index_dir)
    encoder = open_encoder(model or index.meta["model"], threads=threads)
    return index, encoder


def search(
    index_dir: str, *, text: str = "", image: str = "", k: int = 10, model: str = "", threads: int = 1
) -> dict[str, Any]:
    """One query against an index: text (t2i) or ``image`` file (i2i).

    Returns:
        ``{"query", "results": [{"rank", "key", "score", "captions"}], "timing_ms": {"encode", "search"}}``.
    Raises:
        QueryError: empty / too long text, both or neither of text and image, an unreadable image, bad k.
        SearchIndexError: not an index folder.
    """
    if bool(text.strip()) == bool(image):
        raise QueryError('give either a text query or --image FILE (e.g. mcad-cache search INDEX "a red bicycle")')
    index, encoder = open_index(index_dir, model=model, threads=threads)
    t0 = time.perf_counter()
    if image:
        path = Path(image)
        if not path.is_file():
            raise QueryError(f"--image {path}: no such file")
        try:
            decoded = decode_image(path.read_bytes(), policy=decode_policy_from_dict(encoder.decode_policy))
        except SampleSkip as err:
            raise QueryError(f"--image {path} is not a readable image ({err.reason})") from err
        query_emb, label = encoder.encode_images([decoded]), f"image: {path}"
    else:
        label = check_text_query(text)
        query_emb = encoder.encode_text([label])
    t1 = time.perf_counter()
    sims, idx = index.search(query_emb, k=k)
    t2 = time.perf_counter()
    results = [
        {"rank": r, "key": index.items[i]["key"], "score": float(s), "captions": index.items[i]["captions"]}
        for r, (s, i) in enumerate(zip(sims[0].tolist(), idx[0].tolist(), strict=True), start=1)
        if i >= 0
    ]
    return {"query": label, "results": results,
            "timing_ms": {"encode": 1000 * (t1 - t0), "search": 1000 * (t2 - t1)}}  # fmt: skip


def serve(index_dir: str, *, host: str = "127.0.0.1", port: int = 8000, model: str = "", threads: int = 1) -> None:
    """Run the search page until interrupted (uvicorn). Binds ``host`` (default loopback only).

    Raises:
        SearchIndexError / ExportError: as ``open_index``.
    """
    import uvicorn

    index, encoder = open_index(index_dir, model=model, threads=threads)
    if host not in ("127.0.0.1", "localhost", "::1"):
        _logger.warning("serving on %s: other machines on the network can reach the page", host)
    uvicorn.run(create_app(index, encoder), host=host, port=port, log_level="warning")
