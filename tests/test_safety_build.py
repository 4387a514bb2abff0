"""Issue 13, build safety: --overwrite never deletes a folder that is not a cache; PIL's lenient truncated-image flag
is reset and recorded; a half-written done marker is redone; a teacher with no weights needs --random-init; k larger
than the data warns with the fill rate. CLI cases run through the real typer app."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import zarr
from PIL import ImageFile
from test_build import _config, write_shards
from typer.testing import CliRunner

from mcad_cache.cache import open_cache
from mcad_cache.cache.schema import MANIFEST_ATTR
from mcad_cache.cli.main import app
from mcad_cache.errors import ConfigError
from mcad_cache.pipelines import build_cache
from mcad_cache.pipelines.build_cache import run

runner = CliRunner()


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> tuple[Path, dict]:
    folder = tmp_path_factory.mktemp("shards")
    return folder, write_shards(folder)


def _cli_build(shard_dir: Path, out: Path, *extra: str):
    args = ["build", "--teacher", "fake", "--data", str(shard_dir / "shard-*.tar"), "--out", str(out)]
    return runner.invoke(app, [*args, "--k", "3", "--batch-size", "4", "--workers", "0", "--device", "cpu", *extra])


@pytest.mark.parametrize("flags", [(), ("--overwrite",)])
def test_build_never_deletes_a_folder_that_is_not_a_cache(shards, tmp_path, flags):
    """Old code: ``--overwrite`` warned and deleted the whole folder, a user's notes included."""
    shard_dir, _ = shards
    out = tmp_path / "my_project"
    out.mkdir()
    (out / "notes.txt").write_text("months of notes")
    result = _cli_build(shard_dir, out, *flags)
    assert result.exit_code == 1 and "not an mcad-cache cache" in result.output and "Traceback" not in result.output
    assert (out / "notes.txt").read_text() == "months of notes" and sorted(p.name for p in out.iterdir()) == [
        "notes.txt"
    ]


def test_overwrite_still_replaces_a_cache(shards, tmp_path):
    shard_dir, _ = shards
    out = tmp_path / "c.zarr"
    assert _cli_build(shard_dir, out).exit_code == 0
    result = _cli_build(shard_dir, out, "--overwrite", "--emb-dtype", "fp32")
    assert result.exit_code == 0, result.output
    assert open_cache(out).manifest["fingerprint"]["storage"]["emb_dtype"] == "fp32"


def test_lenient_pil_flag_is_reset_and_recorded(shards, tmp_path):
    """Old code: with ``LOAD_TRUNCATED_IMAGES = True`` the truncated PNG (key 00004) was cached as a valid grey row."""
    shard_dir, _ = shards
    ImageFile.LOAD_TRUNCATED_IMAGES = True
    try:
        run(_config(shard_dir, tmp_path / "c.zarr"))
        flag_after = ImageFile.LOAD_TRUNCATED_IMAGES
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = False
    reader = open_cache(tmp_path / "c.zarr")
    row = int(reader.image_rows(["00004"])[0])
    assert not reader.image_valid[row] and reader.manifest["skips"]["counts"].get("decode_error") == 2  # + 00010
    assert reader.manifest["pil_flags_reset"] == [{"LOAD_TRUNCATED_IMAGES": True}] and flag_after is False


def test_half_written_done_marker_is_redone(shards, tmp_path):
    """Old code: a corrupt ``build/done_*`` chunk made every resume crash with a raw Zstd traceback."""
    shard_dir, _ = shards
    out = tmp_path / "c.zarr"
    cfg = _config(shard_dir, out)
    run(cfg)
    before = {n: np.asarray(a[:]) for n, a in zarr.open_group(str(out), mode="r").arrays()}
    g = zarr.open_group(str(out), mode="r+")
    g.attrs[MANIFEST_ATTR] = {**g.attrs[MANIFEST_ATTR], "complete": False}  # as if killed before the end
    marker = out / "build" / "done_image_emb" / "c" / "0"
    assert marker.is_file()
    marker.write_bytes(marker.read_bytes()[:3])  # half-written
    g["image_emb"][:4] = np.zeros((4, g["image_emb"].shape[1]), dtype=g["image_emb"].dtype)  # unit 0 is redone
    assert run(cfg).status == "resumed"
    after = {n: np.asarray(a[:]) for n, a in zarr.open_group(str(out), mode="r").arrays()}
    assert all(np.array_equal(before[n], after[n], equal_nan=before[n].dtype.kind == "f") for n in before)
    assert open_cache(out).complete


def test_teacher_without_weights_needs_random_init(shards, tmp_path, tiny_albef_teacher, monkeypatch):
    """Old code: ``build --teacher albef --model tiny`` without --pretrained built silently from random weights and
    ``inspect`` showed ``weights_source: state_dict``, as for real weights."""
    shard_dir, _ = shards
    monkeypatch.setattr(build_cache, "create_teacher", lambda *_, **__: tiny_albef_teacher)
    out = tmp_path / "albef.zarr"
    result = runner.invoke(
        app, ["build", "--teacher", "albef", "--model", "tiny", "--data", str(shard_dir / "shard-*.tar"), "--out",
              str(out), "--k", "2", "--workers", "0", "--device", "cpu"],
    )  # fmt: skip
    assert result.exit_code == 1 and "--random-init" in result.output and "Traceback" not in result.output
    assert not out.exists()
    with pytest.raises(ConfigError, match="no weights were loaded"):
        run(_config(shard_dir, out, teacher="albef", model="tiny", k=2))
    run(_config(shard_dir, out, teacher="albef", model="tiny", k=2, random_init=True))
    manifest = open_cache(out).manifest
    assert manifest["fingerprint"]["teacher"]["weights_source"] == "random"
    truncation = manifest["truncation"]["teacher"]  # counted with the teacher's own tokenizer and context
    assert truncation["context_length"] == 16 and truncation["num_captions"] == open_cache(out).num_texts
    shown = runner.invoke(app, ["inspect", str(out), "--json"])
    assert shown.exit_code == 0 and '"weights_source": "random"' in shown.output


def test_k_larger_than_the_data_warns_with_the_fill_rate(tmp_path, caplog):
    """Old code: ``build --k 99`` on 16 images left most candidate slots empty without a word."""
    shard_dir = tmp_path / "shards"
    write_shards(shard_dir, num_shards=1, per_shard=6)  # 6 images (one fails to decode in pass 1), 12 captions
    with caplog.at_level(logging.WARNING, logger="mcad_cache"):
        run(_config(shard_dir, tmp_path / "c.zarr", k=6))
    reader = open_cache(tmp_path / "c.zarr")
    num_valid_images = int(reader.image_valid.sum())  # 5 (00004 fails to decode) for k=6 slots per caption
    t2i = reader.array("t2i_idx")[:][reader.text_valid]
    assert num_valid_images == 5 and float((t2i >= 0).mean()) == pytest.approx(5 / 6)
    assert reader.manifest["topk_fill"] == {"i2t": 1.0, "t2i": pytest.approx(5 / 6, abs=1e-4)}
    assert any("k=6 exceeds what the data can fill for t2i" in r.getMessage() for r in caplog.records)
    assert json.dumps(reader.manifest["topk_fill"])  # JSON-able, shown by inspect
