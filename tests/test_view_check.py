"""Issue 10 item 5, one view for teacher and student, through the real CLI: ``distill`` refuses a student whose
resize / crop differs from the view its teachers' cache records (one line naming both views and the flag), unless
``--allow-view-mismatch`` is given; then it warns and records the mismatch in config.json and summary.json.

The fake teacher squash-resizes (no crop); the ``tiny`` student squash-resizes too, and a copy of it with
``resize_mode: shortest`` (shortest side + centre crop) sees other pixels.
"""

from __future__ import annotations

import json
from pathlib import Path

import fake_teacher  # noqa: F401  (registers the "fake" teacher)
import pytest
from distill_fixtures import make_shards
from typer.testing import CliRunner

from mcad_cache.config import BuildConfig
from mcad_cache.pipelines import build_cache
from mcad_cache.student import CONFIG_DIR

TEACHER_VIEW = "(resize_mode='squash', crop=None)"
CROP_VIEW = "(resize_mode='shortest', crop='center')"


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("view")
    make_shards(root / "shards", num_samples=8, per_shard=8)
    data = str(root / "shards" / "train-*.tar")
    cache = root / "clip.zarr"
    build_cache.run(
        BuildConfig(teacher="fake", data=(data,), out=str(cache), k=3, batch_size=8, workers=0, device="cpu")
    )
    crop = json.loads((CONFIG_DIR / "tiny.json").read_text()) | {"resize_mode": "shortest"}
    (root / "crop_student.json").write_text(json.dumps(crop))
    return {"root": root, "data": data, "cache": str(cache), "crop": str(root / "crop_student.json")}


def _distill(world: dict, out: Path, student: str, *args: str):
    from mcad_cache.cli.main import app

    return CliRunner().invoke(
        app,
        ["distill", "--cache", world["cache"], "--data", world["data"], "--out", str(out), "--student", student,
         "--preset", "clip-kd", "--batch-size", "4", "--steps", "1", "--workers", "0", "--threads", "1",
         "--device", "cpu", "--shuffle-buffer", "0", *args],
    )  # fmt: skip


def test_a_student_with_another_view_is_refused_in_one_line(world, tmp_path):
    """Old code trained it (exit 0): KD targets of squashed images for a student that sees centre crops."""
    res = _distill(world, tmp_path / "run", world["crop"])
    text = " ".join(res.output.split())
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output and text.count("error:") == 1, res.output
    assert f"the student's image view {CROP_VIEW} differs from its teachers' ({world['cache']} {TEACHER_VIEW})" in text
    assert "set the student's resize_mode to 'squash', or pass --allow-view-mismatch" in text
    assert not (tmp_path / "run").exists()  # refused before the run dir is made


def test_allow_view_mismatch_warns_and_records(world, tmp_path):
    run = tmp_path / "run"
    res = _distill(world, run, world["crop"], "--allow-view-mismatch")
    assert res.exit_code == 0, res.output
    lines = [
        f"resize_mode: the teacher of {world['cache']} saw 'squash', the student sees 'shortest'",
        f"crop: the teacher of {world['cache']} saw None, the student sees 'center'",
    ]
    logged = "".join(res.output.split())  # log lines are folded at the terminal width, long paths mid-word
    assert "".join(f"view mismatch allowed (--allow-view-mismatch): {lines[0]}".split()) in logged, res.output
    config = json.loads((run / "config.json").read_text())
    assert config["allow_view_mismatch"] is True and config["view_mismatch"] == lines
    assert json.loads((run / "summary.json").read_text())["view_mismatch"] == lines


def test_the_same_view_trains_and_records_no_mismatch(world, tmp_path):
    run = tmp_path / "run"
    res = _distill(world, run, "tiny")  # squash, at 64 px against the teacher's 32: another size is the same view
    assert res.exit_code == 0, res.output
    assert "view_mismatch" not in json.loads((run / "config.json").read_text())
    assert json.loads((run / "summary.json").read_text())["view_mismatch"] == []


def test_teachers_that_disagree_check_the_student_against_the_dual_stream_view(caplog):
    """Real CLIP crops and real ALBEF squashes: no student matches both, so the first (dual-stream) cache's view is
    the one checked, with a warning naming both (as ``integrate`` records the dual-stream parent's view)."""
    import logging
    from types import SimpleNamespace

    from mcad_cache.distill.join import check_student_view
    from mcad_cache.errors import ConfigError

    def cache(path: str, resize_mode: str, crop: str | None) -> SimpleNamespace:
        pre = {"image_size": 224, "resize_mode": resize_mode, "crop": crop}
        return SimpleNamespace(path=path, fingerprint={"preprocess": pre})

    clip, albef = cache("clip.zarr", "shortest", "center"), cache("albef.zarr", "squash", None)
    cropping = {"resize_mode": "shortest", "crop": "center"}
    with caplog.at_level(logging.WARNING, logger="mcad_cache.distill.join"):
        assert check_student_view([clip, albef], cropping) == []
    assert "the teachers' caches saw different image views" in caplog.text
    assert "checked against the first, clip.zarr" in caplog.text
    with pytest.raises(ConfigError, match=r"clip.zarr \(resize_mode='shortest', crop='center'\)"):
        check_student_view([clip, albef], {"resize_mode": "squash", "crop": None})
