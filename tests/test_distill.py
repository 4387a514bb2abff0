"""Distillation end to end on tiny shards: run dir, exact resume, cache refusals, key checks, non-finite loss."""

from __future__ import annotations

import json

import pytest
import torch
from distill_fixtures import MemoryCache, make_shards
from fake_teacher import FakeTeacher

import mcad_cache.distill.join as join
import mcad_cache.pipelines.distill as distill
from mcad_cache.config import DistillConfig
from mcad_cache.errors import CacheKeyError, CacheMismatchError, CacheSchemaError, NonFiniteError
from mcad_cache.student import DualEncoder


@pytest.fixture(autouse=True)
def _one_thread():
    # Two shared CPU cores: more threads only oversubscribe them.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("shards"), num_samples=12, per_shard=6)


@pytest.fixture(scope="module")
def caches(shards):
    # The single-stream cache stores its rows in reverse order: the join must go by key.
    return {
        "clip": MemoryCache(shards, FakeTeacher(kind="dual"), k=4, path="clip"),
        "albef": MemoryCache(shards, FakeTeacher(kind="single", seed=1), k=4, permute=True, path="albef"),
    }


@pytest.fixture
def use_caches(monkeypatch, caches):
    registry = dict(caches)
    monkeypatch.setattr(join, "open_cache", lambda path: registry[str(path)])
    return registry


def cfg(tmp_path, shards, **kw):
    base = dict(
        cache=("clip", "albef"),
        data=tuple(shards),
        out=str(tmp_path / "run"),
        student="tiny",
        preset="mcad-online",
        k=3,
        batch_size=4,
        steps=3,
        warmup_steps=1,
        workers=0,
        shuffle_buffer=5,
        log_every=1,
        seed=0,
    )
    base.update(kw)
    return DistillConfig(**base)


def test_distill_writes_run_dir(tmp_path, shards, use_caches):
    summary = distill.run(cfg(tmp_path, shards))
    run = tmp_path / "run"
    for name in (
        "config.json",
        "metrics.jsonl",
        "loss_curves.png",
        "summary.json",
        "final/model.safetensors",
        "final/student_config.json",
        "final/loss.safetensors",
    ):
        assert (run / name).is_file(), name
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3]
    keys = {"itc_loss", "kd_i2t_loss", "kd_t2i_loss", "topk_i2t_loss", "topk_t2i_loss", "feat_loss", "integration_loss"}
    assert keys <= set(lines[0]) and all(torch.isfinite(torch.tensor(r["loss"])) for r in lines)
    assert summary["steps"] == 3 and summary["samples_seen"] == 12
    assert json.loads((run / "config.json").read_text())["loss_config"]["integration"] == "modified_features"
    model = DualEncoder.load(run / "final")
    assert model.embed_dim == 32


def _strip(rows):
    return [{k: v for k, v in r.items() if k not in ("samples_per_s", "elapsed_s")} for r in rows]


class StopAfter:
    """A progress callable that interrupts the run when step ``n + 1`` is about to start."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __call__(self, iterable, description="", total=None):
        for i, item in enumerate(iterable):
            if i == self.n:
                raise KeyboardInterrupt
            yield item


def test_resume_reproduces_uninterrupted_run(tmp_path, shards, use_caches):
    # 5 steps of 4 pairs over 12 samples: epoch 0 has 3 batches, the stop after step 2 is mid-epoch, the checkpoint
    # at step 4 in epoch 1.
    kw = dict(steps=5, checkpoint_every=2)
    distill.run(cfg(tmp_path / "a", shards, **kw))
    with pytest.raises(KeyboardInterrupt):
        distill.run(cfg(tmp_path / "b", shards, **kw), progress=StopAfter(3))
    assert len((tmp_path / "b/run/metrics.jsonl").read_text().splitlines()) == 3  # step 3 logged, not checkpointed
    distill.run(cfg(tmp_path / "b", shards, **kw))
    ref = _strip(json.loads(x) for x in (tmp_path / "a/run/metrics.jsonl").read_text().splitlines())
    got = _strip(json.loads(x) for x in (tmp_path / "b/run/metrics.jsonl").read_text().splitlines())
    assert got == ref
    from safetensors.torch import load_file

    wa = load_file(str(tmp_path / "a/run/final/model.safetensors"))
    wb = load_file(str(tmp_path / "b/run/final/model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    la = load_file(str(tmp_path / "a/run/final/loss.safetensors"))
    lb = load_file(str(tmp_path / "b/run/final/loss.safetensors"))
    assert all(torch.equal(la[k], lb[k]) for k in la)


def test_resume_refuses_changed_config(tmp_path, shards, use_caches):
    distill.run(cfg(tmp_path, shards, steps=1))
    with pytest.raises(Exception, match="lr: run dir has 0.0001, now 0.001"):
        distill.run(cfg(tmp_path, shards, steps=1, lr=1e-3))


def test_k_larger_than_cache_is_refused(tmp_path, shards, use_caches):
    with pytest.raises(CacheSchemaError, match="holds k=4"):
        distill.run(cfg(tmp_path, shards, k=5))


def test_single_stream_preset_without_single_cache(tmp_path, shards, use_caches):
    with pytest.raises(CacheSchemaError, match="single-stream"):
        distill.run(cfg(tmp_path, shards, preset="single-topk", cache=("clip",)))
    # clip-kd needs only the CLIP cache
    assert distill.run(cfg(tmp_path, shards, preset="clip-kd", cache=("clip",), steps=1))["steps"] == 1


def test_incomplete_cache_is_refused(tmp_path, shards, use_caches, monkeypatch):
    partial = MemoryCache(shards, FakeTeacher(kind="dual"), k=4, complete=False, path="partial")
    use_caches["partial"] = partial
    with pytest.raises(Exception, match="incomplete"):
        distill.run(cfg(tmp_path, shards, cache=("partial",), preset="clip-kd"))


def test_cache_on_other_data_is_refused(tmp_path, shards, use_caches):
    other = make_shards(tmp_path / "other", num_samples=6, per_shard=6, prefix="x")
    use_caches["other"] = MemoryCache(other, FakeTeacher(kind="dual"), k=4, path="other")
    with pytest.raises(CacheMismatchError, match="x0000"):
        distill.run(cfg(tmp_path, shards, cache=("other",), preset="clip-kd"))


def test_shard_key_missing_from_cache_is_named(tmp_path, use_caches, caches):
    # The run's data has one sample more (s0012) than the CLIP cache was built on (the first 12 are identical).
    more = make_shards(tmp_path / "more", num_samples=13, per_shard=13)
    with pytest.raises(CacheKeyError, match="s0012"):
        distill.run(cfg(tmp_path, more, cache=("clip",), preset="clip-kd", steps=1, batch_size=13))


def test_changed_caption_is_detected(tmp_path, shards, use_caches):
    cache = MemoryCache(shards, FakeTeacher(kind="dual"), k=4, path="edited")
    cache.captions = cache.captions.copy()
    cache.captions[:] = [c + " edited" for c in cache.captions]
    use_caches["edited"] = cache
    with pytest.raises(CacheMismatchError, match="differs between the shards"):
        distill.run(cfg(tmp_path, shards, cache=("edited",), preset="clip-kd"))


def test_non_finite_loss_stops_the_run(tmp_path, shards, use_caches):
    with pytest.raises(NonFiniteError, match=r"step \d+: non-finite .*batch keys \[s00"):
        distill.run(
            cfg(tmp_path, shards, preset="clip-kd", cache=("clip",), lr=1e30, warmup_steps=0, grad_clip=0, steps=3)
        )


def test_cli_build_distill_eval_compare(tmp_path):
    """The real path: `build` two caches with the fake teacher, `distill --k 3`, `eval` the run, the cache and the
    live teacher, `compare`; then a stale shard and a too-large k are refused with readable messages."""
    import shutil

    import fake_teacher  # noqa: F401  (registers the "fake" teacher)
    from typer.testing import CliRunner

    from mcad_cache.cli.main import app

    shard_dir = tmp_path / "shards"
    make_shards(shard_dir, num_samples=12, per_shard=6)
    data = str(shard_dir / "train-*.tar")
    runner = CliRunner()
    common = ["--data", data, "--workers", "0", "--device", "cpu"]
    for name, extra in (("clip", []), ("albef", ["--model", "single", "--emb-dtype", "fp32"])):
        res = runner.invoke(
            app,
            [
                "build",
                "--teacher",
                "fake",
                "--out",
                str(tmp_path / name),
                "--k",
                "4",
                "--batch-size",
                "6",
                *common,
                *extra,
            ],
        )
        assert res.exit_code == 0, res.output
    run_dir = tmp_path / "run"
    caches = ["--cache", str(tmp_path / "clip"), "--cache", str(tmp_path / "albef")]
    res = runner.invoke(
        app,
        [
            "distill",
            *caches,
            *common,
            "--preset",
            "mcad-online",
            "--out",
            str(run_dir),
            "--k",
            "3",
            "--student",
            "tiny",
            "--batch-size",
            "4",
            "--steps",
            "2",
            "--warmup-steps",
            "1",
            "--log-every",
            "1",
        ],
    )
    assert res.exit_code == 0, res.output
    for name in ("config.json", "metrics.jsonl", "loss_curves.png", "summary.json", "final/model.safetensors"):
        assert (run_dir / name).is_file(), name
    res = runner.invoke(app, ["eval", "--model", str(run_dir), *common, "--batch-size", "5"])
    assert res.exit_code == 0, res.output
    assert "12 images, 24 captions" in res.output
    student_eval = json.loads((run_dir / "eval.json").read_text())
    assert student_eval["kind"] == "student" and 0 <= student_eval["metrics"]["rsum"] <= 600
    cached_json, live_json = tmp_path / "cached.json", tmp_path / "live.json"
    res = runner.invoke(
        app, ["eval", "--model", str(tmp_path / "albef"), *common, "--k-test", "3", "--out", str(cached_json)]
    )
    assert res.exit_code == 0, res.output
    res = runner.invoke(
        app, ["eval", "--teacher", "fake", "--model", "single", *common, "--k-test", "3", "--out", str(live_json)]
    )
    assert res.exit_code == 0, res.output
    cached, live = json.loads(cached_json.read_text()), json.loads(live_json.read_text())
    assert cached["metrics"] == pytest.approx(live["metrics"])  # the cache reproduces the live ALBEF protocol
    res = runner.invoke(app, ["eval", "--model", str(tmp_path / "albef"), *common, "--k-test", "5"])
    assert res.exit_code == 1 and "k=4" in res.output
    res = runner.invoke(app, ["compare", str(run_dir), str(cached_json), str(live_json)])
    assert res.exit_code == 0, res.output
    assert "RSUM" in res.output and all(name in res.output for name in ("run", "cached", "live", "itm+itc@3"))
    # k above the caches' k
    res = runner.invoke(
        app,
        [
            "distill",
            *caches,
            *common,
            "--preset",
            "mcad-online",
            "--out",
            str(tmp_path / "r2"),
            "--k",
            "5",
            "--student",
            "tiny",
            "--batch-size",
            "4",
            "--steps",
            "1",
        ],
    )
    assert res.exit_code == 1 and "holds k=4" in res.output
    # a shard rewritten after the build: refused with the shard named
    stale = tmp_path / "stale"
    shutil.copytree(shard_dir, stale)
    make_shards(stale, num_samples=5, per_shard=5)  # rewrites train-0000.tar without its last sample
    res = runner.invoke(
        app,
        [
            "distill",
            *caches,
            "--data",
            str(stale / "train-*.tar"),
            "--workers",
            "0",
            "--device",
            "cpu",
            "--out",
            str(tmp_path / "r3"),
            "--k",
            "3",
            "--student",
            "tiny",
            "--batch-size",
            "4",
            "--steps",
            "1",
        ],
    )
    out = " ".join(res.output.split())
    assert res.exit_code == 1 and "train-0000.tar: content differs" in out, res.output


def test_contrastive_needs_no_cache(tmp_path, shards):
    summary = distill.run(cfg(tmp_path, shards, cache=(), preset="contrastive", steps=0, epochs=1))
    assert summary["steps"] == 3 and summary["caches"] == []  # 12 samples // 4
    rows = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert all(set(k for k in r if k.endswith("_loss")) == {"itc_loss"} for r in rows)


def test_join_is_by_key_and_dedups_candidate_images(shards, caches):
    from mcad_cache.distill import TargetJoiner, step_generator
    from mcad_cache.losses import preset

    clip, albef = caches["clip"], caches["albef"]  # albef rows are stored in reverse order
    all_keys = [str(k) for k in clip.image_keys.tolist()]
    fetched: list[list[str]] = []

    def candidate_images(keys):
        fetched.append(list(keys))
        return torch.stack([torch.full((3, 2, 2), float(all_keys.index(k))) for k in keys])

    joiner = TargetJoiner(
        clip=clip, single=albef, loss_config=preset("mcad-online"), k=3, candidate_images=candidate_images
    )
    keys = all_keys[2:7]
    captions = [[str(c) for c in clip.captions[clip.img2txt(clip.image_rows([k])[0])]] for k in keys]
    images = torch.stack([torch.full((3, 2, 2), float(all_keys.index(k))) for k in keys])
    batch = joiner({"key": keys, "captions": captions, "image": images}, generator=step_generator(0, 1))
    again = joiner({"key": keys, "captions": captions, "image": images}, generator=step_generator(0, 1))
    assert batch.texts == again.texts  # the anchor choice is a function of (seed, step)
    t = batch.targets
    for b, key in enumerate(keys):
        anchor = batch.texts[b]
        j = captions[b].index(anchor)
        assert torch.allclose(t.clip_text_emb[b], torch.from_numpy(clip.text_emb(clip.text_rows([f"{key}#{j}"])))[0])
        # i2t candidates: the single-stream cache's own candidates, CLIP targets found by key
        top = albef.topk("i2t", albef.image_rows([key]), k=3)
        for slot, row in enumerate(top["idx"][0].tolist()):
            cand_key = str(albef.text_keys[row])
            assert batch.texts[batch.topk_text_index[b, slot]] == str(albef.captions[row])
            clip_emb = torch.from_numpy(clip.text_emb(clip.text_rows([cand_key])))[0]
            assert torch.allclose(t.clip_topk_text_emb[b, slot], clip_emb)
            assert t.clip_topk_sims_i2t[b, slot] == pytest.approx(float(t.clip_image_emb[b] @ clip_emb), abs=1e-6)
            assert torch.allclose(t.itm_logits_i2t[b, slot], torch.from_numpy(top["itm_logits"][0, slot]))
        # t2i candidates: images by key, anchors reused, others fetched once
        top = albef.topk("t2i", albef.text_rows([f"{key}#{j}"]), k=3)
        all_images = torch.cat([batch.images, batch.extra_images])
        for slot, row in enumerate(top["idx"][0].tolist()):
            cand_key = str(albef.image_keys[row])
            assert float(all_images[batch.topk_image_index[b, slot], 0, 0, 0]) == all_keys.index(cand_key)
            clip_emb = torch.from_numpy(clip.image_emb(clip.image_rows([cand_key])))[0]
            assert torch.allclose(t.clip_topk_image_emb[b, slot], clip_emb)
    assert len(fetched) == 2 and all(len(f) == len(set(f)) and not set(f) & set(keys) for f in fetched)


def test_two_ranks_gloo(tmp_path):
    """DDP on CPU with gloo: each rank reads its own shard; replicas stay in sync; rank 0 writes the run dir and a
    checkpoint holding both ranks' data positions; resuming with another number of ranks is refused."""
    import torch.multiprocessing as mp
    from distill_fixtures import ddp_worker

    from mcad_cache.config import BuildConfig
    from mcad_cache.distill import latest_checkpoint
    from mcad_cache.errors import CheckpointError
    from mcad_cache.pipelines import build_cache

    shard_paths = make_shards(tmp_path / "shards", num_samples=12, per_shard=6)
    build_cache.run(
        BuildConfig(
            teacher="fake",
            data=tuple(shard_paths),
            out=str(tmp_path / "clip"),
            k=3,
            batch_size=6,
            workers=0,
            device="cpu",
        )
    )
    config = dict(
        cache=[str(tmp_path / "clip")],
        data=shard_paths,
        out=str(tmp_path / "run"),
        student="tiny",
        preset="clip-kd",
        k=3,  # the cache's k: distill refuses a k above it for every preset (issue 13 item 4)
        batch_size=2,
        steps=4,
        warmup_steps=1,
        workers=0,
        shuffle_buffer=0,
        log_every=1,
        checkpoint_every=2,
        device="cpu",
    )
    mp.spawn(ddp_worker, args=(2, str(tmp_path / "init"), config, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert "error" not in r0 and "error" not in r1, (r0, r1)
    assert r0["world_size"] == 2 and r0["replicas_in_sync"] and r1["replicas_in_sync"] and r1["steps"] == 4
    assert (tmp_path / "run/final/model.safetensors").is_file()
    blob = torch.load(latest_checkpoint(tmp_path / "run") / "train_state.pt", weights_only=True)
    positions = [r["train_state"] for r in blob["ranks"]]
    assert [p["step"] for p in positions] == [4, 4] and all(p["samples_seen"] == 8 for p in positions)
    with pytest.raises(CheckpointError, match="2 rank"):
        distill.run(DistillConfig(**{**config, "cache": tuple(config["cache"]), "data": tuple(shard_paths)}))
