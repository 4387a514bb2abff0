"""Tiny shards and an in-memory stand-in for ``CacheReader`` (the reader contract of docs/architecture.md), computed
from the registered ``fake`` teacher, for the distill / eval tests. Rows of a cache can be permuted to prove that
caches are joined by key, never by row position."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from mcad_cache.data.transforms import make_image_transform
from mcad_cache.data.webdataset import iter_samples
from mcad_cache.errors import CacheIncompleteError, CacheKeyError, CacheSchemaError

WORDS = "red blue green dog cat car tree man woman bus beach street".split()
COLORS = [
    (220, 20, 20),
    (20, 200, 20),
    (20, 20, 220),
    (200, 200, 20),
    (200, 20, 200),
    (20, 200, 200),
    (240, 140, 20),
    (120, 60, 10),
    (90, 90, 90),
    (250, 250, 250),
    (10, 10, 10),
    (160, 100, 220),
]


def make_shards(folder: Path, *, num_samples: int = 12, per_shard: int = 6, prefix: str = "s") -> list[str]:
    """Write ``num_samples`` samples (32 x 24 px PNG, 1..3 captions) into tar shards; returns the shard paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(0, num_samples, per_shard):
        path = folder / f"train-{s // per_shard:04d}.tar"
        with wds.TarWriter(str(path), encoder=False, mtime=0) as writer:
            for i in range(s, min(s + per_shard, num_samples)):
                im = Image.new("RGB", (32, 24), COLORS[i % len(COLORS)])
                im.paste((255 - COLORS[i % len(COLORS)][0], 128, 64), (4 * (i % 5), 3, 4 * (i % 5) + 10, 13))
                buf = io.BytesIO()
                im.save(buf, "PNG")
                caps = [f"a {WORDS[i % len(WORDS)]} {WORDS[(i * 5 + j) % len(WORDS)]} {j}" for j in range(1 + i % 3)]
                writer.write(
                    {
                        "__key__": f"{prefix}{i:04d}",
                        "png": buf.getvalue(),
                        "json": json.dumps({"captions": caps}).encode(),
                    }
                )
        paths.append(str(path))
    return paths


class MemoryCache:
    """Implements the ``CacheReader`` members the distill / eval code reads, from a teacher run in memory."""

    def __init__(
        self,
        shards: list[str],
        teacher: Any,
        *,
        k: int = 4,
        permute: bool = False,
        complete: bool = True,
        path: str = "mem",
    ) -> None:
        self.path = Path(path)
        self._complete = complete
        self.kind = teacher.kind
        self.k = k
        self.logit_scale = float(teacher.logit_scale)
        transform = make_image_transform(teacher.preprocess_cfg)
        samples = [s for s in iter_samples(shards) if s.skip is None]
        if permute:
            samples = samples[::-1]
        keys = [s.key for s in samples]
        texts, text_keys, txt2img, offsets = [], [], [], [0]
        for i, s in enumerate(samples):
            for j, c in enumerate(s.captions):
                texts.append(c)
                text_keys.append(f"{s.key}#{j}")
                txt2img.append(i)
            offsets.append(len(texts))
        images = torch.stack([transform(s.image) for s in samples])
        with torch.no_grad():
            img = teacher.encode_image(images)
            txt = teacher.encode_text(teacher.tokenize(texts))
        self.image_keys = np.array(keys, dtype=object)
        self.text_keys = np.array(text_keys, dtype=object)
        self.captions = np.array(texts, dtype=object)
        self.txt2img = np.array(txt2img, dtype=np.int32)
        self.img2txt_offsets = np.array(offsets, dtype=np.int32)
        self.image_valid = np.ones(len(keys), bool)
        self.text_valid = np.ones(len(texts), bool)
        self._img, self._txt = img.numpy().astype(np.float32), txt.numpy().astype(np.float32)
        self.num_images, self.num_texts = len(keys), len(texts)
        sims = img @ txt.T
        self._top = {}
        for d, s in (("i2t", sims), ("t2i", sims.T)):
            v, idx = s.topk(k, dim=1)
            pos = (
                (torch.as_tensor(self.txt2img)[idx] == torch.arange(len(keys))[:, None])
                if d == "i2t"
                else (idx == torch.as_tensor(self.txt2img)[:, None].long())
            )
            out = {"idx": idx.int().numpy(), "sims": v.numpy(), "is_positive": pos.numpy()}
            if self.kind == "single":
                logits, fused = [], []
                for q in range(idx.shape[0]):
                    if d == "i2t":
                        ims, tx = images[q : q + 1].repeat(k, 1, 1, 1), [texts[t] for t in idx[q].tolist()]
                    else:
                        ims, tx = images[idx[q]], [texts[q]] * k
                    lg, fu = teacher.itm(ims, teacher.tokenize(tx))
                    logits.append(lg)
                    fused.append(fu)
                out["itm_logits"] = torch.stack(logits).numpy()
                out["fused_cls"] = torch.stack(fused).numpy()
            self._top[d] = out
        emb_dim = img.shape[1]
        fused_dim = self._top["i2t"]["fused_cls"].shape[-1] if self.kind == "single" else 0
        self.layout = type("Layout", (), {"emb_dim": emb_dim, "fused_dim": fused_dim, "has_fused": fused_dim > 0})()
        self.fingerprint = {"teacher": {"name": teacher.name}, "data": {"shards": [Path(p).name for p in shards]}}
        self.manifest = {"fingerprint": self.fingerprint, "complete": complete}
        self.teacher = teacher.name
        self._index = {"image": {k: i for i, k in enumerate(keys)}, "text": {k: i for i, k in enumerate(text_keys)}}

    @property
    def complete(self) -> bool:
        return self._complete

    def require(self, *, complete: bool = True, expect: dict | None = None) -> MemoryCache:
        if complete and not self._complete:
            raise CacheIncompleteError(f"{self.path}: the cache is incomplete")
        return self

    def _rows(self, which: str, keys) -> np.ndarray:
        missing = [k for k in keys if k not in self._index[which]]
        if missing:
            raise CacheKeyError(f"{self.path}: {len(missing)} {which} key(s) not in the cache, e.g. {missing[:5]}")
        return np.array([self._index[which][k] for k in keys], dtype=np.int32)

    def image_rows(self, keys):
        return self._rows("image", [str(k) for k in keys])

    def text_rows(self, keys):
        return self._rows("text", [str(k) for k in keys])

    def img2txt(self, row):
        return np.arange(self.img2txt_offsets[row], self.img2txt_offsets[row + 1], dtype=np.int32)

    def image_emb(self, rows=None):
        return self._img if rows is None else self._img[np.asarray(rows, dtype=np.int64)]

    def text_emb(self, rows=None):
        return self._txt if rows is None else self._txt[np.asarray(rows, dtype=np.int64)]

    def topk(self, direction, rows, *, k=None, fused=None):
        kk = self.k if k is None else int(k)
        if kk > self.k:
            raise CacheSchemaError(f"{self.path}: requested k={kk}, but the cache holds k={self.k}")
        r = np.asarray(rows, dtype=np.int64)
        top = self._top[direction]
        out = {name: top[name][r, :kk] for name in ("idx", "sims", "is_positive")}
        out["valid"] = out["idx"] >= 0
        if self.kind == "single":
            out["itm_logits"] = top["itm_logits"][r, :kk]
            if fused or fused is None:
                out["fused_cls"] = top["fused_cls"][r, :kk]
        return out


def ddp_worker(rank: int, world: int, init_file: str, config: dict, out: str) -> None:
    """One rank of a CPU gloo run of ``distill.run`` (for ``torch.multiprocessing.spawn``); writes its summary."""
    import torch.distributed as dist

    from mcad_cache.config import DistillConfig
    from mcad_cache.pipelines import distill

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        try:
            summary = distill.run(DistillConfig(**config))
        except Exception as err:  # report it to the test instead of a bare non-zero exit
            summary = {"error": f"{type(err).__name__}: {err}"}
        Path(out, f"rank{rank}.json").write_text(json.dumps(summary))
    finally:
        dist.destroy_process_group()
