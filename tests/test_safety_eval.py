"""Issue 13, stale or wrong targets: a cache is matched to the run's data by content and path (two splits'
``shard-000000.tar`` are never confused), k is checked for every preset, ``eval --model CACHE`` runs the cheap
checks of ``inspect --check``, and eval refuses an unwritable ``--out`` before computing any metric."""

from __future__ import annotations

import json
from pathlib import Path

import fake_teacher  # noqa: F401  (registers the "fake" teacher)
import numpy as np
import pytest
import zarr
from data_fixtures import good_sample, write_samples

from mcad_cache.cache import open_cache
from mcad_cache.config import BuildConfig, EvalConfig
from mcad_cache.distill import TargetJoiner
from mcad_cache.errors import CacheCorruptError, CacheMismatchError, CacheSchemaError, OutputPathError
from mcad_cache.losses import preset
from mcad_cache.pipelines import build_cache, evaluate


def _import_like(root: Path, *, captions: int) -> dict[str, str]:
    """An importer's layout: ``train/shard-000000.tar`` and ``test/shard-000000.tar`` with the same keys in every
    import (``captions`` changes the content), plus ``index.json``."""
    out = {}
    for split in ("train", "test"):
        (root / split).mkdir(parents=True)
        samples = [good_sample(f"{split}{i:02d}", n_captions=captions) for i in range(6)]
        out[split] = str(write_samples(root / split / "shard-000000.tar", samples))
    (root / "index.json").write_text(json.dumps({"format": "mcad-cache-shards"}))
    return out


def _build(data: list[str], out: Path, k: int = 3) -> Path:
    cfg = BuildConfig(teacher="fake", data=tuple(data), out=str(out), k=k, batch_size=4, workers=0, device="cpu")
    build_cache.run(cfg)
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("safety_eval")
    a = _import_like(root / "import_a", captions=1)
    b = _import_like(root / "import_b", captions=2)  # another import: same file names, same keys
    return {"root": root, "a": a, "b": b, "cache": _build([a["train"], a["test"]], root / "cache_a.zarr")}


def _eval(world: dict, data: list[str], out: str, model: str | None = None) -> dict:
    cfg = EvalConfig(model=model or str(world["cache"]), data=tuple(data), out=out, workers=0, device="cpu")
    return evaluate.run(cfg)


def test_eval_cache_refuses_a_replaced_split_with_the_same_names(world, tmp_path):
    """Old code keyed shards by file name: the two ``shard-000000.tar`` collapsed to one, so replacing the test split
    by another import's (same keys) was accepted with exit 0."""
    assert _eval(world, [world["a"]["train"], world["a"]["test"]], str(tmp_path / "ok.json"))["metrics"]
    with pytest.raises(CacheMismatchError) as err:
        _eval(world, [world["a"]["train"], world["b"]["test"]], str(tmp_path / "bad.json"))
    assert "test/shard-000000.tar: content differs" in str(err.value)
    assert "train/shard-000000.tar" not in str(err.value)  # the unchanged split is not blamed


def test_eval_cache_runs_the_consistency_checks(world, tmp_path):
    """Old code: a cache whose similarities no longer match its embeddings was evaluated without a word."""
    broken = tmp_path / "broken.zarr"
    _build([world["a"]["train"], world["a"]["test"]], broken)
    g = zarr.open_group(str(broken), mode="r+")
    sims = np.asarray(g["i2t_sims"][:])
    g["i2t_sims"][:] = np.where(np.isfinite(sims), sims * 0.5, sims).astype(sims.dtype)  # still sorted, but wrong
    with pytest.raises(CacheCorruptError, match="i2t_sims: differ from the stored embeddings"):
        _eval(world, [world["a"]["train"], world["a"]["test"]], str(tmp_path / "e.json"), model=str(broken))


def test_eval_refuses_an_unwritable_out_before_any_metric(world, tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    computed = []
    monkeypatch.setattr(evaluate, "evaluate_cache", lambda *a, **kw: computed.append(1))
    with pytest.raises(OutputPathError, match="is a file, not a folder"):
        _eval(world, [world["a"]["train"], world["a"]["test"]], str(blocker / "eval.json"))
    assert computed == []


@pytest.mark.parametrize("name", ["clip-kd", "contrastive", "clip-kd-feat"])
def test_k_larger_than_the_cache_is_refused_for_every_preset(world, name):
    """Old code: ``distill --preset clip-kd --k 11`` on a k=3 cache was accepted and the summary said k=11."""
    reader = open_cache(world["cache"])
    with pytest.raises(CacheSchemaError, match="requested k=11, but the cache holds k=3"):
        TargetJoiner(clip=reader, single=None, loss_config=preset(name), k=11, candidate_images=lambda keys: None)
