"""The cache build pipeline on tiny shards with the fake teacher: values, maps, skips, resume after SIGKILL, CLI."""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
import zarr
from fake_teacher import FakeTeacher
from PIL import Image

from mcad_cache.build.coordination import BuildLock as _BuildLock
from mcad_cache.cache import check_cache, chunked_topk, open_cache
from mcad_cache.config import BuildConfig
from mcad_cache.data.transforms import make_image_transform
from mcad_cache.errors import (
    BuildLockedError,
    CacheMismatchError,
    CacheSchemaError,
    DataError,
    DataSourceError,
    NonFiniteError,
)
from mcad_cache.pipelines.build_cache import run

CAPTION_COUNTS = [3, 1, 2]  # repeated: images with 3, 1 and 2 captions


def _png(color: tuple[int, int, int], size: int = 32) -> bytes:
    gen = torch.Generator().manual_seed(sum(color))
    noise = (torch.rand(size, size, 3, generator=gen) * 40).to(torch.uint8).numpy()
    arr = np.clip(np.array(color, np.int16)[None, None, :] + noise, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def write_shards(folder: Path, *, num_shards: int = 2, per_shard: int = 6) -> dict[str, dict]:
    """Shards of coloured 32 px PNGs with 1-3 captions, and three bad samples: a truncated PNG (its header is fine, so
    it fails only when decoded in pass 1: decode_error, keeps an invalid row), bytes that are no image at all and a
    sample without captions (both found in pass 0 from headers: no row). Returns key -> {"png", "captions"} of the
    samples that get a row."""
    folder.mkdir(parents=True, exist_ok=True)
    names = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black", "grey", "pink", "cyan", "brown"]
    truth = {}
    n = 0
    for s in range(num_shards):
        with wds.TarWriter(str(folder / f"shard-{s:03d}.tar")) as tw:
            for _ in range(per_shard):
                key = f"{n:05d}"
                name = names[n % len(names)]
                color = ((n * 97) % 256, (n * 53 + 80) % 256, (n * 31 + 160) % 256)
                caps = [f"a {name} square {j}" for j in range(CAPTION_COUNTS[n % 3])]
                sample = {"__key__": key, "png": _png(color), "json": json.dumps({"captions": caps}).encode()}
                if n == 4:
                    sample["png"] = sample["png"][: len(sample["png"]) // 2]
                if n == 7:
                    del sample["json"]
                if n == 10:
                    sample["png"] = b"this is not an image"
                tw.write(sample)
                if n not in (7, 10):
                    truth[key] = {"png": sample["png"], "captions": caps}
                n += 1
    return truth


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> tuple[Path, dict]:
    folder = tmp_path_factory.mktemp("shards")
    return folder, write_shards(folder)


def _config(shard_dir: Path, out: Path, **kw) -> BuildConfig:
    base = {
        "teacher": "fake",
        "data": (str(shard_dir / "shard-*.tar"),),
        "out": str(out),
        "k": 3,
        "batch_size": 3,
        "workers": 0,
        "rows_per_chunk": 4,
        "chunk_size": 5,
        "device": "cpu",
    }
    return BuildConfig(**{**base, **kw})


def _all_arrays(path: Path) -> dict[str, np.ndarray]:
    g = zarr.open_group(str(path), mode="r")
    return {name: np.asarray(g[name][:]) for name in sorted(g.array_keys())}


def test_dual_build_values_maps_and_skips(shards, tmp_path):
    shard_dir, truth = shards
    result = run(_config(shard_dir, tmp_path / "c.zarr"))
    assert result.status == "built"
    r = open_cache(tmp_path / "c.zarr").require(expect={"teacher": {"name": "fake"}, "k": 3})
    assert r.kind == "dual" and r.num_images == 10 and r.logit_scale == 50.0
    keys = [str(k) for k in r.image_keys.tolist()]
    assert keys == sorted(truth)  # shards in sorted order, tar order inside
    counts = np.diff(r.img2txt_offsets)
    np.testing.assert_array_equal(counts, [len(truth[k]["captions"]) for k in keys])
    assert set(counts.tolist()) == {1, 2, 3}
    assert [str(c) for c in r.captions[r.img2txt(0)].tolist()] == truth[keys[0]]["captions"]
    # the corrupt image keeps an invalid row; the caption-less sample has none; both are counted
    bad = r.image_rows(["00004"])[0]
    assert not r.image_valid[bad] and not r.text_valid[r.img2txt(bad)].any()
    assert r.array("image_skip")[bad] > 0
    skips = r.manifest["skips"]["counts"]
    assert skips == {"missing_caption": 1, "decode_error": 2}
    for example in (
        ["shard-001.tar", "00007", "missing_caption"],
        ["shard-001.tar", "00010", "decode_error"],
        ["shard-000.tar", "00004", "decode_error"],
    ):
        assert example in r.manifest["skips"]["examples"]
    # embeddings equal the teacher's on the teacher's own transform (stored fp16)
    teacher = FakeTeacher(kind="dual")
    transform = make_image_transform(teacher.preprocess_cfg)
    good = [k for k in keys if k != "00004"]
    images = torch.stack([transform(Image.open(io.BytesIO(truth[k]["png"])).convert("RGB")) for k in good])
    ref = teacher.encode_image(images).numpy()
    np.testing.assert_allclose(r.image_emb(r.image_rows(good)), ref, atol=2e-3)
    caps = [c for k in good for c in truth[k]["captions"]]
    ref_t = teacher.encode_text(teacher.tokenize(caps)).numpy()
    rows_t = np.concatenate([r.img2txt(i) for i in r.image_rows(good)])
    np.testing.assert_allclose(r.text_emb(rows_t), ref_t, atol=2e-3)
    # top-k equals a full-matrix reference over the stored embeddings, both directions
    for d, q, g, qv, gv in (
        ("i2t", r.image_emb(), r.text_emb(), r.image_valid, r.text_valid),
        ("t2i", r.text_emb(), r.image_emb(), r.text_valid, r.image_valid),
    ):
        sims, idx = chunked_topk(q, g, k=3, chunk_size=1000, query_valid=qv, gallery_valid=gv)
        out = r.topk(d, np.arange(q.shape[0]))
        np.testing.assert_array_equal(out["idx"], idx)
        np.testing.assert_array_equal(out["sims"], sims)
    assert check_cache(r) == []
    m = r.manifest
    assert m["complete"] and m["finished_at"] >= m["started_at"]
    assert [s["name"] for s in m["shards"]] == ["shard-000.tar", "shard-001.tar"]
    assert [(s["num_rows"], s["num_valid"], s["num_skipped_pass0"], s["num_skipped_pass1"]) for s in m["shards"]] == [
        (6, 5, 0, 1),
        (4, 4, 2, 0),
    ]
    assert all(len(s["sha256"]) == 64 for s in m["fingerprint"]["data"]["shards"])


def test_rerun_noop_mismatch_and_overwrite(shards, tmp_path, caplog):
    shard_dir, _ = shards
    cfg = _config(shard_dir, tmp_path / "c.zarr")
    run(cfg)
    before = _all_arrays(tmp_path / "c.zarr")
    assert run(cfg).status == "complete"
    with pytest.raises(CacheMismatchError) as err:
        run(_config(shard_dir, tmp_path / "c.zarr", k=2))
    assert "k: cache has 3, expected 2" in str(err.value)
    with pytest.raises(CacheMismatchError, match="storage.emb_dtype"):
        run(_config(shard_dir, tmp_path / "c.zarr", emb_dtype="fp32"))
    after = _all_arrays(tmp_path / "c.zarr")
    assert all(np.array_equal(before[n], after[n], equal_nan=before[n].dtype.kind == "f") for n in before)
    assert run(_config(shard_dir, tmp_path / "c.zarr", k=2, overwrite=True)).status == "built"
    assert open_cache(tmp_path / "c.zarr").k == 2


@pytest.mark.parametrize("fused_dtype", ["fp16", "int8"])
def test_single_stream_itm_both_directions(shards, tmp_path, fused_dtype):
    shard_dir, truth = shards
    run(_config(shard_dir, tmp_path / "c.zarr", model="single", fused_dtype=fused_dtype, force_positives=True))
    r = open_cache(tmp_path / "c.zarr")
    assert r.kind == "single" and check_cache(r) == []
    teacher = FakeTeacher(kind="single")
    transform = make_image_transform(teacher.preprocess_cfg)
    keys = [str(k) for k in r.image_keys.tolist()]
    # forced positives: every valid image's candidates hold all its valid captions (<= k), every text its image
    i2t = r.topk("i2t", np.arange(r.num_images))
    for i in np.nonzero(r.image_valid)[0]:
        assert set(r.img2txt(i).tolist()) <= set(i2t["idx"][i].tolist())
    t2i = r.topk("t2i", np.arange(r.num_texts))
    assert t2i["is_positive"][r.text_valid].any(axis=1).all()
    for d, res in (("i2t", i2t), ("t2i", t2i)):
        rows, slots = np.nonzero(res["valid"])
        q, c = rows, res["idx"][rows, slots]
        img_rows, txt_rows = (q, c) if d == "i2t" else (c, q)
        images = torch.stack(
            [transform(Image.open(io.BytesIO(truth[keys[i]]["png"])).convert("RGB")) for i in img_rows]
        )
        itm, fused = teacher.itm(images, teacher.tokenize([str(r.captions[t]) for t in txt_rows]))
        np.testing.assert_allclose(res["itm_logits"][rows, slots], itm.numpy(), atol=1e-5)
        ref = fused.numpy()
        tol = np.abs(ref).max(axis=-1, keepdims=True) / 254 + 1e-6 if fused_dtype == "int8" else 4e-3
        assert (np.abs(res["fused_cls"][rows, slots] - ref) <= tol).all()
        assert np.isnan(res["fused_cls"][~res["valid"]]).all()
    assert not (Path(tmp_path / "c.zarr") / "build" / "scratch").exists()


def test_non_finite_teacher_output_names_array_and_key(shards, tmp_path, monkeypatch):
    shard_dir, _ = shards
    original = FakeTeacher.encode_text

    def bad_encode_text(self, tokens):
        out = original(self, tokens)
        out[0, 0] = float("inf")  # first caption of every batch
        return out

    monkeypatch.setattr(FakeTeacher, "encode_text", bad_encode_text)
    with pytest.raises(NonFiniteError, match=r"array 'text_emb'.*sample '00000#0'"):
        run(_config(shard_dir, tmp_path / "c.zarr"))


def test_strict_stops_at_first_bad_sample(shards, tmp_path):
    shard_dir, _ = shards
    with pytest.raises(DataError, match="00007"):
        run(_config(shard_dir, tmp_path / "c.zarr", strict=True))


def test_faiss_backend_build_equals_torch(shards, tmp_path):
    pytest.importorskip("faiss")  # optional extra: mcad-cache[faiss]
    shard_dir, _ = shards
    run(_config(shard_dir, tmp_path / "t.zarr"))
    run(_config(shard_dir, tmp_path / "f.zarr", topk_backend="faiss"))
    a, b = _all_arrays(tmp_path / "t.zarr"), _all_arrays(tmp_path / "f.zarr")
    for name in ("i2t_idx", "i2t_sims", "t2i_idx", "t2i_sims", "i2t_is_positive", "t2i_is_positive"):
        assert np.array_equal(a[name], b[name], equal_nan=True), name


def test_candidates_from_another_cache(shards, tmp_path):
    shard_dir, _ = shards
    run(_config(shard_dir, tmp_path / "dual.zarr", k=4))
    run(_config(shard_dir, tmp_path / "single.zarr", model="single", candidate_source=str(tmp_path / "dual.zarr")))
    a, b = open_cache(tmp_path / "dual.zarr"), open_cache(tmp_path / "single.zarr")
    assert b.fingerprint["candidates"]["source"] == "cache"
    assert b.fingerprint["candidates"]["source_cache"]["teacher"]["name"] == "fake"
    for d, n in (("i2t", b.num_images), ("t2i", b.num_texts)):
        got, src = b.topk(d, np.arange(n)), a.topk(d, np.arange(n), k=3)
        np.testing.assert_array_equal(got["idx"], src["idx"])  # the source's candidates, in its order
        np.testing.assert_array_equal(got["is_positive"], src["is_positive"])
    assert check_cache(b) == []
    with pytest.raises(CacheSchemaError, match="k=4"):
        run(_config(shard_dir, tmp_path / "x.zarr", k=5, candidate_source=str(tmp_path / "dual.zarr")))


def test_no_usable_sample_is_an_error(tmp_path):
    with wds.TarWriter(str(tmp_path / "bad.tar")) as tw:
        tw.write({"__key__": "a", "json": b'{"captions": ["no image"]}'})
    with pytest.raises(DataSourceError, match="missing_image"):
        run(_config(tmp_path, tmp_path / "c.zarr", data=(str(tmp_path / "bad.tar"),)))


def test_lock_refuses_a_second_writer(shards, tmp_path):
    shard_dir, _ = shards
    with _BuildLock(tmp_path / "c.zarr", rank=0, world_size=1):
        with pytest.raises(BuildLockedError, match="another build"):
            run(_config(shard_dir, tmp_path / "c.zarr"))
    assert run(_config(shard_dir, tmp_path / "c.zarr")).status == "built"
    assert not (tmp_path / "c.zarr.lock").exists()


@pytest.fixture(scope="module")
def preloaded() -> multiprocessing.context.ForkServerContext:
    """Processes for builds that run beside or after each other: forked from one server process that has imported
    the library and the fake teacher once (a fresh interpreter per process imports torch and the library again,
    seconds each); each process is still its own, with its own locks, and dies alone."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["fake_teacher", "test_build"])  # ignored when the server already runs: then slower
    return ctx


def _fields(cfg: BuildConfig) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.__dict__.items()}


def _build_rank(fields: dict, status_file: str) -> None:
    """One rank's build (a ``preloaded`` process); writes its status to ``status_file``."""
    torch.set_num_threads(1)
    Path(status_file).write_text(run(BuildConfig(**fields)).status)


def test_two_ranks_equal_one_process(shards, tmp_path, preloaded):
    shard_dir, _ = shards
    kw = {"model": "single", "fused_dtype": "fp16"}
    run(_config(shard_dir, tmp_path / "one.zarr", **kw))
    cfg = _config(shard_dir, tmp_path / "two.zarr", **kw)
    procs = [
        preloaded.Process(target=_build_rank, args=({**_fields(cfg), "rank": r, "world_size": 2}, tmp_path / str(r)))
        for r in (1, 0)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0, 0]
    assert (tmp_path / "1").read_text() == "rank-done" and (tmp_path / "0").read_text() == "built"
    a, b = _all_arrays(tmp_path / "one.zarr"), _all_arrays(tmp_path / "two.zarr")
    for name in a:
        assert np.array_equal(a[name], b[name], equal_nan=a[name].dtype.kind == "f"), name
    assert check_cache(open_cache(tmp_path / "two.zarr")) == []


def _build_until_killed(fields: dict, kill_after: int, mode: str) -> None:
    """The build of ``fields`` in a ``preloaded`` process that SIGKILLs itself: in ``"progress"`` mode after
    ``kill_after`` progress items of passes 1-3 (between two items), in ``"marker"`` mode after ``kill_after`` units'
    data are written but before the done marker of the next (the unit is then rewritten by the next run)."""
    from mcad_cache.cache.writer import CacheWriter

    torch.set_num_threads(1)
    seen = [0]

    def progress(iterable, description="", total=None):
        for item in iterable:
            if mode == "progress" and description.startswith("pass") and not description.startswith("pass 0"):
                seen[0] += 1
                if seen[0] > kill_after:
                    os.kill(os.getpid(), signal.SIGKILL)
            yield item

    mark_done = CacheWriter.mark_done

    def mark_done_or_die(self, stage, unit):
        if mode == "marker" and stage != "layout":
            seen[0] += 1
            if seen[0] > kill_after:
                os.kill(os.getpid(), signal.SIGKILL)
        mark_done(self, stage, unit)

    CacheWriter.mark_done = mark_done_or_die  # this process only
    run(BuildConfig(**fields), progress=progress)


def test_kill_and_resume_equals_uninterrupted(shards, tmp_path, preloaded):
    shard_dir, _ = shards
    kw = {"model": "single", "fused_dtype": "int8"}
    ref_cfg = _config(shard_dir, tmp_path / "ref.zarr", **kw)
    run(ref_cfg)
    cfg = _config(shard_dir, tmp_path / "killed.zarr", **kw)
    kills = 0
    for attempt in range(12):
        # each run commits some units of passes 1-3, then dies: between two progress items, or between a unit's data
        # and its done marker (the unit is then rewritten by the next run)
        args = (8, "progress") if attempt % 2 == 0 else (5, "marker")
        proc = preloaded.Process(target=_build_until_killed, args=(_fields(cfg), *args))
        proc.start()
        proc.join(timeout=300)
        if proc.exitcode == 0:
            break
        assert proc.exitcode == -signal.SIGKILL, proc.exitcode
        kills += 1
        assert not open_cache(tmp_path / "killed.zarr").complete
    assert kills >= 3 and proc.exitcode == 0
    ref, got = _all_arrays(tmp_path / "ref.zarr"), _all_arrays(tmp_path / "killed.zarr")
    assert sorted(ref) == sorted(got)
    for name in ref:
        assert ref[name].dtype == got[name].dtype, name
        assert np.array_equal(ref[name], got[name], equal_nan=ref[name].dtype.kind == "f"), name
    assert run(cfg).status == "complete"
    r = open_cache(tmp_path / "killed.zarr")
    assert r.manifest["resumed_at"] and check_cache(r) == []
    assert r.manifest["skips"] == open_cache(tmp_path / "ref.zarr").manifest["skips"]


def test_cli_build_then_inspect_check(shards, tmp_path):
    from typer.testing import CliRunner

    from mcad_cache.cli.main import app

    shard_dir, _ = shards
    out = tmp_path / "cli.zarr"
    runner = CliRunner()
    res = runner.invoke(
        app,
        [
            "build",
            "--teacher",
            "fake",
            "--data",
            str(shard_dir / "shard-*.tar"),
            "--out",
            str(out),
            "--k",
            "3",
            "--batch-size",
            "4",
            "--workers",
            "0",
            "--device",
            "cpu",
            "--model",
            "single",
            "--fused-dtype",
            "int8",
        ],
    )
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["inspect", str(out), "--check"])
    assert res.exit_code == 0, res.output
    assert "bytes per sample" in res.output and "decode_error" in res.output
    res = runner.invoke(app, ["inspect", str(out), "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["manifest"]["complete"] is True
    # a broken cache fails the check
    g = zarr.open_group(str(out), mode="r+")
    g["i2t_idx"][0:4] = np.full((4, 3), 999, np.int32)
    res = runner.invoke(app, ["inspect", str(out), "--check"])
    assert res.exit_code == 1 and "i2t_idx" in res.output
    # the same build again is a no-op that says so; a different one is refused with a diff
    args = [
        "build",
        "--teacher",
        "fake",
        "--data",
        str(shard_dir / "shard-*.tar"),
        "--out",
        str(out),
        "--k",
        "3",
        "--batch-size",
        "4",
        "--workers",
        "0",
        "--device",
        "cpu",
        "--model",
        "single",
        "--fused-dtype",
        "int8",
    ]
    res = runner.invoke(app, args)
    assert res.exit_code == 0 and "nothing to do" in res.output
    res = runner.invoke(app, [*args[:-1], "fp16"])
    assert res.exit_code == 1 and "storage.fused_dtype: cache has" in res.output
