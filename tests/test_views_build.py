"""Multi-view build (issue 16): ``build --views V --augment SPEC`` with the tiny CLIP teacher (not flip-invariant).

Stored params equal the deterministic draw for every view of every sample; each stored view embedding equals the
teacher run fresh on the replayed view (cos >= 0.9999) while a mirrored view reusing the unmirrored entry fails that
check; view 0 is the canonical image; an interrupted multi-view build resumes to identical arrays.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import webdataset as wds
import zarr
from PIL import Image
from test_views import gradient_image

from mcad_cache.cache import check_cache, describe_cache, open_cache
from mcad_cache.cache.writer import CacheWriter
from mcad_cache.config import BuildConfig
from mcad_cache.data.transforms import make_image_transform
from mcad_cache.errors import CacheMismatchError, ConfigError
from mcad_cache.pipelines.build_cache import run
from mcad_cache.views import apply_view, draw_views, parse_augment

SPEC = "rrc:scale=0.35-1,ratio=0.75-1.3333,flip=0.5;v1"
SIZES = [(64, 48), (40, 56), (48, 48), (72, 40), (50, 62)]


def write_view_shards(folder: Path, *, num_shards: int = 2, per_shard: int = 5) -> dict[str, bytes]:
    """Shards of structured (not mirror-symmetric) PNGs of several sizes; returns key -> PNG bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    pngs = {}
    n = 0
    for s in range(num_shards):
        with wds.TarWriter(str(folder / f"views-{s:03d}.tar")) as tw:
            for _ in range(per_shard):
                key = f"v{n:04d}"
                buf = io.BytesIO()
                gradient_image(*SIZES[n % len(SIZES)], seed=n).save(buf, "PNG")
                pngs[key] = buf.getvalue()
                caps = [f"picture {n}", f"image number {n}"][: 1 + n % 2]
                tw.write({"__key__": key, "png": pngs[key], "json": json.dumps({"captions": caps}).encode()})
                n += 1
    return pngs


def _config(shard_dir: Path, out: Path, **kw) -> BuildConfig:
    base = {
        "teacher": "clip",
        "model": "tiny",
        "random_init": True,
        "data": (str(shard_dir / "*.tar"),),
        "out": str(out),
        "k": 3,
        "batch_size": 3,
        "workers": 0,
        "rows_per_chunk": 4,
        "device": "cpu",
        "threads": 1,
        "views": 4,
        "augment": SPEC,
        "view_seed": 7,
    }
    return BuildConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("views")
    pngs = write_view_shards(root / "shards")
    cfg = _config(root / "shards", root / "cache.zarr")
    result = run(cfg)
    assert result.status == "built"
    return root, pngs, cfg


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return F.cosine_similarity(torch.from_numpy(a).double(), torch.from_numpy(b).double(), dim=-1).numpy()


def test_view_arrays_params_and_manifest(built):
    root, pngs, cfg = built
    reader = open_cache(root / "cache.zarr")
    assert reader.complete and check_cache(reader) == []
    params = np.asarray(reader.array("view_params")[:])
    emb = np.asarray(reader.array("image_emb_views")[:], dtype=np.float32)
    n = reader.num_images
    assert params.shape == (n, 4, 5) and params.dtype == np.int32
    assert emb.shape == (n, 4, reader.layout.emb_dim)
    assert reader.array("image_emb_views").metadata.dimension_names == ("image", "view", "emb_dim")
    views = reader.manifest["views"]
    assert views["num_views"] == 4 and views["seed"] == 7 and views["augment"] == SPEC
    assert views["single_stream_targets"] == "canonical"
    assert reader.fingerprint["views"]["augment"] == SPEC
    spec = parse_augment(SPEC)
    for row, key in enumerate(reader.image_keys.tolist()):
        image = Image.open(io.BytesIO(pngs[key]))
        expect = draw_views(spec, seed=7, key=key, num_views=4, width=image.width, height=image.height)
        assert np.array_equal(params[row], expect), key
    assert (params[:, 1:, 4] == 1).any() and (params[:, 1:, 4] == 0).any()  # both flips occur
    # view 0 is the canonical image: the same pixels as image_emb (top-k is chosen from it)
    assert _cos(emb[:, 0], reader.image_emb()).min() >= 0.9999
    desc = describe_cache(reader)
    assert desc["views"]["num_views"] == 4 and desc["views"]["augment"] == SPEC
    assert desc["views"]["stored_bytes"] == sum(
        desc["arrays"][a]["stored_bytes"] for a in ("image_emb_views", "view_params")
    )


def test_replayed_view_matches_teacher_and_mirror_reuse_fails(built, tiny_clip_teacher):
    root, pngs, _ = built
    reader = open_cache(root / "cache.zarr")
    params = np.asarray(reader.array("view_params")[:])
    stored = np.asarray(reader.array("image_emb_views")[:], dtype=np.float32)
    transform = make_image_transform(tiny_clip_teacher.preprocess_cfg)
    fresh, unmirrored, flipped = [], [], []
    for row, key in enumerate(reader.image_keys.tolist()):
        image = Image.open(io.BytesIO(pngs[key])).convert("RGB")
        for v in range(4):
            p = params[row, v]
            with torch.no_grad():
                fresh.append(tiny_clip_teacher.encode_image(transform(apply_view(image, p))[None])[0].numpy())
                q = p.copy()
                q[4] = 1 - q[4]  # the same crop, mirrored the other way
                unmirrored.append(tiny_clip_teacher.encode_image(transform(apply_view(image, q))[None])[0].numpy())
            flipped.append(bool(p[4]))
    stored_flat = stored.reshape(-1, stored.shape[-1])
    assert _cos(np.stack(fresh), stored_flat).min() >= 0.9999
    # a mirrored view whose target is the unmirrored entry: the check fails for every such view
    mismatch = _cos(np.stack(unmirrored), stored_flat)
    assert mismatch.max() < 0.9999
    assert any(flipped)


def test_interrupted_build_resumes_to_identical_arrays(built, tmp_path, monkeypatch):
    root, _, _ = built
    cfg = _config(root / "shards", tmp_path / "resumed.zarr")
    mark_done = CacheWriter.mark_done
    count = [0]

    def die_after_one_view_unit(self, stage, unit):
        if stage == "image_views":
            count[0] += 1
            if count[0] > 1:
                raise KeyboardInterrupt("simulated crash after one image_views unit")
        mark_done(self, stage, unit)

    monkeypatch.setattr(CacheWriter, "mark_done", die_after_one_view_unit)
    with pytest.raises(KeyboardInterrupt):
        run(cfg)
    monkeypatch.setattr(CacheWriter, "mark_done", mark_done)
    partial = zarr.open_group(str(tmp_path / "resumed.zarr"), mode="r")
    assert np.asarray(partial["build/done_image_views"][:]).tolist() == [True, False, False]
    assert run(BuildConfig(**{**cfg.__dict__, "workers": 2})).status == "resumed"  # another worker count
    ref = zarr.open_group(str(root / "cache.zarr"), mode="r")
    got = zarr.open_group(str(tmp_path / "resumed.zarr"), mode="r")
    for name in ("view_params", "image_emb_views", "image_emb", "i2t_idx", "t2i_idx"):
        a, b = np.asarray(ref[name][:]), np.asarray(got[name][:])
        assert np.array_equal(a, b, equal_nan=a.dtype.kind == "f"), name
    # another V on the same --out is another fingerprint: refused with a diff
    with pytest.raises(CacheMismatchError, match="views"):
        run(_config(root / "shards", tmp_path / "resumed.zarr", views=8))


def test_views_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="--augment"):
        run(_config(tmp_path, tmp_path / "a.zarr", augment=""))
    with pytest.raises(ConfigError, match="--views"):
        run(_config(tmp_path, tmp_path / "b.zarr", views=0))
    with pytest.raises(ConfigError, match="scale"):
        run(_config(tmp_path, tmp_path / "c.zarr", augment="rrc:scale=2-3"))


def test_cli_build_views_and_inspect(built, tmp_path):
    from typer.testing import CliRunner

    from mcad_cache.cli.main import app

    root, _, _ = built
    out = tmp_path / "cli.zarr"
    args = ["build", "--teacher", "clip", "--model", "tiny", "--random-init", "--data", str(root / "shards" / "*.tar"),
            "--out", str(out), "--k", "3", "--batch-size", "3", "--workers", "0", "--rows-per-chunk", "4",
            "--device", "cpu", "--threads", "1", "--views", "4", "--augment", SPEC, "--view-seed", "7"]  # fmt: skip
    runner = CliRunner()
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    got = zarr.open_group(str(out), mode="r")
    ref = zarr.open_group(str(root / "cache.zarr"), mode="r")
    assert np.array_equal(np.asarray(got["view_params"][:]), np.asarray(ref["view_params"][:]))  # same seed, same views
    res = runner.invoke(app, ["inspect", str(out), "--json"])
    assert res.exit_code == 0, res.output
    views = json.loads(res.output)["views"]
    assert views["num_views"] == 4 and views["augment"] == SPEC and views["bytes_per_view"] > 0
    bad = runner.invoke(app, [*args[:-4], "--out", str(tmp_path / "bad.zarr")])  # --views 4 without --augment
    assert bad.exit_code == 1 and "--augment" in bad.output and "Traceback" not in bad.output
