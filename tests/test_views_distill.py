"""Distill replays stored views (issue 16): the student's decode applies the chosen view's crop and flip, the target is
that view's cached embedding, and the choice is the same across worker counts and across an interrupted + resumed
run; an augmentation the cache does not hold is refused unless --allow-aug-mismatch (then recorded)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from test_views_build import SPEC, _config, write_view_shards

import mcad_cache.pipelines.distill as distill
from mcad_cache.cache import open_cache
from mcad_cache.config import DistillConfig
from mcad_cache.data.decode import DecodePolicy
from mcad_cache.data.transforms import make_image_transform
from mcad_cache.data.webdataset import SkipReport
from mcad_cache.distill.stream import EpochStream
from mcad_cache.distill.views import ViewReplay, ViewTargets, choose_view, stored_view_params
from mcad_cache.errors import CacheMismatchError
from mcad_cache.pipelines.build_cache import run as build
from mcad_cache.views import apply_view

TRANSFORM_CFG = {"image_size": 24, "resize_mode": "squash", "crop": None, "interpolation": "bilinear",
                 "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}  # fmt: skip


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("views_distill")
    pngs = write_view_shards(root / "shards", num_shards=2, per_shard=6)
    build(_config(root / "shards", root / "cache.zarr"))
    return root, pngs


def _stream(root, *, workers: int, replay: ViewReplay) -> EpochStream:
    shards = sorted(str(p) for p in (root / "shards").glob("*.tar"))
    stream = EpochStream(shards, transform=make_image_transform(TRANSFORM_CFG), policy=DecodePolicy(), batch_size=4,
                         workers=workers, seed=3, shuffle_buffer=5, report=SkipReport())  # fmt: skip
    stream.dataset.view_replay = replay
    return stream


def test_student_decode_applies_the_chosen_stored_view_for_any_worker_count(world):
    root, pngs = world
    reader = open_cache(root / "cache.zarr")
    stored = stored_view_params(reader)
    transform = make_image_transform(TRANSFORM_CFG)
    runs = {}
    for workers in (0, 2):
        replay = ViewReplay(seed=3, params=stored)
        runs[workers] = [
            (epoch, key, image) for epoch in (0, 1, 2) for batch in _stream(root, workers=workers, replay=replay)(epoch)
            for key, image in zip(batch["key"], batch["image"], strict=True) if batch["epoch"] == epoch
        ]  # fmt: skip
    assert len(runs[0]) == 3 * 12
    assert [(e, k) for e, k, _ in runs[0]] == [(e, k) for e, k, _ in runs[2]]
    assert all(torch.equal(a, b) for (_, _, a), (_, _, b) in zip(runs[0], runs[2], strict=True))
    chosen = {}
    for epoch, key, image in runs[0]:
        view = choose_view(3, epoch, key, 4)
        source = Image.open(io.BytesIO(pngs[key])).convert("RGB")
        expect = transform(apply_view(source, stored[key][view]))
        assert torch.equal(image, expect), (epoch, key, view)
        chosen.setdefault(key, set()).add(view)
    assert any(len(v) > 1 for v in chosen.values())  # the choice changes with the epoch
    # the join's targets are the cached embeddings of the same views
    targets = ViewTargets(reader, seed=3)
    keys = [k for e, k, _ in runs[0] if e == 1][:5]
    rows = reader.image_rows(keys)
    emb = np.asarray(reader.array("image_emb_views")[:], dtype=np.float32)
    expect = np.stack([emb[r, choose_view(3, 1, k, 4)] for r, k in zip(rows, keys, strict=True)])
    assert np.array_equal(targets.image_emb(rows, keys, epoch=1).numpy(), expect)


def _cfg(root, out, **kw) -> DistillConfig:
    base = dict(cache=(str(root / "cache.zarr"),), data=(str(root / "shards" / "*.tar"),), out=str(out),
                student="tiny", preset="clip-kd", k=3, batch_size=4, steps=5, warmup_steps=1, workers=0,
                shuffle_buffer=5, log_every=1, seed=0, checkpoint_every=2)  # fmt: skip
    return DistillConfig(**{**base, **kw})


class StopAfter:
    """A progress callable that interrupts the run when step ``n + 1`` is about to start."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __call__(self, iterable, description="", total=None):
        for i, item in enumerate(iterable):
            if i == self.n:
                raise KeyboardInterrupt
            yield item


def _metrics(path):
    rows = [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("samples_per_s", "elapsed_s")} for r in rows]


def test_replayed_views_resume_exactly_and_differ_from_canonical(world, tmp_path):
    root, _ = world
    distill.run(_cfg(root, tmp_path / "a"))
    with pytest.raises(KeyboardInterrupt):
        distill.run(_cfg(root, tmp_path / "b"), progress=StopAfter(3))
    distill.run(_cfg(root, tmp_path / "b", workers=2))  # resumed with another worker count
    assert _metrics(tmp_path / "b") == _metrics(tmp_path / "a")
    assert json.loads((tmp_path / "a" / "config.json").read_text())["views"]["mode"] == "replay"
    distill.run(_cfg(root, tmp_path / "c", augment="none"))  # canonical view only: other images and targets
    assert [r["loss"] for r in _metrics(tmp_path / "c")] != [r["loss"] for r in _metrics(tmp_path / "a")]
    assert distill.run(_cfg(root, tmp_path / "d", augment=SPEC, steps=1))["steps"] == 1  # the spec the cache holds


def test_augmentation_the_cache_lacks_is_refused_unless_allowed(world, tmp_path):
    root, _ = world
    other = "rrc:scale=0.5-1,ratio=0.75-1.3333,flip=0.5;v1"
    with pytest.raises(CacheMismatchError, match="--allow-aug-mismatch"):
        distill.run(_cfg(root, tmp_path / "a", augment=other, steps=1))
    distill.run(_cfg(root, tmp_path / "b", augment=other, steps=1, allow_aug_mismatch=True))
    views = json.loads((tmp_path / "b" / "config.json").read_text())["views"]
    assert views["mode"].startswith("drawn") and "4 views of" in views["mismatch"]
