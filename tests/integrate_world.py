"""A test world where the single-stream teacher knows better than the dual-stream one (issue 10).

Teacher caches are written directly through ``CacheWriter`` for the keys and captions of tiny shards:

- CLIP: image and text embeddings are independent random unit vectors, so its similarities carry no information
  about which caption belongs to which image (noisy dual-stream teacher).
- single-stream: every query's K candidates hold its ground-truth pair(s) first when there are any (a duplicate
  caption text counts), then random others, in a shuffled slot order; its ITM logits follow the ground truth
  (``[-2, 3]`` for a match, ``[2, -3]`` otherwise, plus noise), and its fused [CLS] carries the match as a direction
  (``w_match`` or ``w_other``, plus noise).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mcad_cache.cache import CacheLayout, CacheWriter
from mcad_cache.data.identity import shard_records
from mcad_cache.data.webdataset import iter_samples

DIM, FUSED, LOGIT_SCALE = 8, 6, 50.0
VIEW = {"image_size": 32, "resize_mode": "squash", "crop": None}


def samples_of(shards: list[str]) -> tuple[list[str], list[list[str]]]:
    samples = [s for s in iter_samples(shards, decode_images=False) if s.skip is None]
    return [s.key for s in samples], [list(s.captions) for s in samples]


def _unit(rng: np.random.Generator, *shape: int) -> np.ndarray:
    x = rng.normal(size=shape)
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def write_world(folder: Path, shards: list[str], *, k: int = 4, seed: int = 0, view: dict | None = None) -> dict:
    """Write ``clip.zarr`` and ``albef.zarr`` under ``folder``; returns their paths."""
    rng = np.random.default_rng(seed)
    keys, captions = samples_of(shards)
    n_i = len(keys)
    counts = np.array([len(c) for c in captions])
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    txt2img = np.repeat(np.arange(n_i), counts).astype(np.int32)
    texts = [c for cs in captions for c in cs]
    text_keys = [f"{key}#{j}" for key, cs in zip(keys, captions, strict=True) for j in range(len(cs))]
    n_t = len(texts)
    norm = [t.strip().lower() for t in texts]
    img_texts = [set(norm[offsets[i] : offsets[i + 1]]) for i in range(n_i)]

    def matches(direction: str, q: int, c: int) -> bool:
        if direction == "i2t":
            return norm[c] in img_texts[q]
        return norm[q] in img_texts[c]

    w_match, w_other = _unit(rng, 2, FUSED)
    top: dict[str, dict[str, np.ndarray]] = {}
    for d, n_q, n_g in (("i2t", n_i, n_t), ("t2i", n_t, n_i)):
        idx = np.zeros((n_q, k), np.int64)
        for q in range(n_q):
            pos = [c for c in range(n_g) if matches(d, q, c)]
            neg = [c for c in range(n_g) if not matches(d, q, c)]
            chosen = pos[: max(1, k // 2)] + list(
                rng.choice(neg, size=k - min(len(pos), max(1, k // 2)), replace=False)
            )
            idx[q] = rng.permutation(chosen)
        m = np.array([[matches(d, q, c) for c in idx[q]] for q in range(n_q)])
        itm = np.where(m[..., None], [-2.0, 3.0], [2.0, -3.0]) + 0.5 * rng.normal(size=(n_q, k, 2))
        fused = np.where(m[..., None], w_match, w_other) + 0.3 * rng.normal(size=(n_q, k, FUSED))
        top[d] = {"idx": idx, "itm": itm.astype(np.float32), "fused": fused.astype(np.float32)}
    clip_img, clip_txt = _unit(rng, n_i, DIM), _unit(rng, n_t, DIM)
    paths = {}
    for name, kind in (("clip", "dual"), ("albef", "single")):
        paths[name] = str(folder / f"{name}.zarr")
        _write(
            paths[name], kind=kind, keys=keys, text_keys=text_keys, texts=texts, offsets=offsets, txt2img=txt2img,
            img=clip_img, txt=clip_txt, top=top, k=k, shards=shards, view=view or VIEW,
        )  # fmt: skip
    return paths


def _write(path, *, kind, keys, text_keys, texts, offsets, txt2img, img, txt, top, k, shards, view) -> None:
    n_i, n_t = len(keys), len(texts)
    layout = CacheLayout(
        kind=kind, num_images=n_i, num_texts=n_t, emb_dim=DIM, k=k, fused_dim=FUSED if kind == "single" else 0,
        fused_dtype="fp16" if kind == "single" else "none", emb_dtype="fp32", rows_per_chunk=max(n_i, n_t) + 4,
        fused_rows_per_chunk=1,
    )  # fmt: skip
    fingerprint = {
        "teacher": {"name": "world-" + kind},
        "preprocess": {**view, "mean": [0.5] * 3, "std": [0.5] * 3},
        "data": {"shards": shard_records(shards)},
        "k": k,
    }
    w = CacheWriter.create(path, layout=layout, manifest={"fingerprint": fingerprint, "logit_scale": LOGIT_SCALE})
    w.write("image_keys", 0, np.array(keys))
    w.write("text_keys", 0, np.array(text_keys))
    w.write("captions", 0, np.array(texts))
    w.write("img2txt_offsets", 0, offsets)
    w.write("txt2img", 0, txt2img)
    w.write("image_shard", 0, np.zeros(n_i, np.int32))
    w.write("image_valid", 0, np.ones(n_i, bool))
    w.write("text_valid", 0, np.ones(n_t, bool))
    w.write("image_emb", 0, img)
    w.write("text_emb", 0, txt)
    for d, q, g in (("i2t", img, txt), ("t2i", txt, img)):
        idx = top[d]["idx"]
        sims = np.einsum("qd,qkd->qk", q, g[idx])
        order = np.argsort(-sims, axis=1, kind="stable")  # cached top-k lists are sorted by ITC similarity
        idx = np.take_along_axis(idx, order, 1)
        pos = (txt2img[idx] == np.arange(len(q))[:, None]) if d == "i2t" else (idx == txt2img[:, None])
        w.write(f"{d}_idx", 0, idx.astype(np.int32))
        w.write(f"{d}_sims", 0, np.take_along_axis(sims, order, 1).astype(np.float32), check=False)
        w.write(f"{d}_is_positive", 0, pos)
        if kind == "single":
            w.write(f"{d}_itm_logits", 0, np.take_along_axis(top[d]["itm"], order[..., None], 1), check=False)
            w.write_fused(d, 0, np.take_along_axis(top[d]["fused"], order[..., None], 1))
    for stage in ("layout", "image_emb", "text_emb", "topk_i2t", "topk_t2i") + (
        ("itm_i2t", "itm_scratch", "itm_t2i") if kind == "single" else ()
    ):
        for u in range(w.units(stage)):
            w.mark_done(stage, u)
    w.mark_complete()
