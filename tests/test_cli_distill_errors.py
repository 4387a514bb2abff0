"""``distill`` / ``eval`` / ``compare`` on the CLI: a user mistake is one line and exit 1; a real bug keeps its
traceback (the commands no longer catch every ValueError / FileNotFoundError)."""

from __future__ import annotations

import pytest
from distill_fixtures import make_shards
from typer.testing import CliRunner

from mcad_cache.cli.main import app


@pytest.fixture
def data(tmp_path):
    make_shards(tmp_path / "shards", num_samples=6, per_shard=6)
    return str(tmp_path / "shards" / "train-*.tar")


def _one_line_error(res, *needles: str) -> None:
    assert res.exit_code == 1, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit)
    text = " ".join(res.output.split())
    assert "Traceback" not in res.output
    for needle in needles:
        assert needle in text, (needle, res.output)


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        # an unknown --preset is refused at parse time (exit 2, the allowed list): tests/test_cli_conventions.py
        (["--batch-size", "1"], ("--batch-size must be >= 2",)),
        (["--loss", "{not json"], ("--loss is not valid JSON",)),
        (["--loss", '{"w_nope": 1}'], ("--loss", "w_nope")),
        (["--loss", '{"w_feat": "high"}'], ("--loss", "w_feat", "must be a number")),  # was a TypeError traceback
        (["--loss", "[1, 2]"], ("--loss must be a JSON object",)),  # was a TypeError traceback
        (["--precision", "bf16"], ("--precision", "needs a CUDA device")),
    ],
)
def test_distill_user_mistakes_are_one_line(tmp_path, data, args, needles):
    res = CliRunner().invoke(
        app, ["distill", "--data", data, "--out", str(tmp_path / "run"), "--device", "cpu", "--workers", "0", *args]
    )
    _one_line_error(res, *needles)


def test_distill_unwritable_out_is_one_line(tmp_path, data):
    blocker = tmp_path / "file"
    blocker.write_text("")
    res = CliRunner().invoke(
        app,
        ["distill", "--data", data, "--out", str(blocker / "run"), "--preset", "contrastive", "--student", "tiny",
         "--device", "cpu", "--workers", "0", "--batch-size", "2", "--steps", "1"],
    )  # fmt: skip
    _one_line_error(res, "--out", "cannot be written")


def test_eval_and_compare_user_mistakes_are_one_line(tmp_path, data):
    res = CliRunner().invoke(app, ["eval", "--model", str(tmp_path / "nothing"), "--data", data, "--device", "cpu"])
    _one_line_error(res, "not a distill run dir")
    res = CliRunner().invoke(app, ["compare", str(tmp_path / "nothing")])
    _one_line_error(res, "no results")


def test_a_real_bug_keeps_its_traceback(tmp_path, data, monkeypatch):
    import mcad_cache.pipelines.distill as pipeline

    def broken(*args, **kwargs):
        raise ValueError("a bug, not a user mistake")

    monkeypatch.setattr(pipeline, "create_distill", broken)
    res = CliRunner().invoke(app, ["distill", "--data", data, "--out", str(tmp_path / "run"), "--device", "cpu"])
    assert isinstance(res.exception, ValueError) and "a bug" in str(res.exception)
