"""Validation during distill, tracking (--report-to) and the run plots, through the real CLI on tiny shards."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from distill_fixtures import make_shards
from safetensors.torch import load_file
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))
import fake_teacher  # noqa: E402,F401  (registers the "fake" teacher)

from mcad_cache.cli.main import app  # noqa: E402
from mcad_cache.distill import plots, validation  # noqa: E402
from mcad_cache.distill.checkpoint import TrainState  # noqa: E402
from mcad_cache.distill.tracking import CsvTracker, create_trackers  # noqa: E402
from mcad_cache.distill.validation import Validator  # noqa: E402
from mcad_cache.errors import ConfigError  # noqa: E402

COMMON = ["--workers", "0", "--device", "cpu"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("tracking")
    make_shards(root / "train", num_samples=12, per_shard=6)
    make_shards(root / "val", num_samples=6, per_shard=6, prefix="v")
    train, val = str(root / "train" / "train-*.tar"), str(root / "val" / "train-*.tar")
    res = CliRunner().invoke(
        app, ["build", "--teacher", "fake", "--data", train, "--out", str(root / "clip"), "--k", "4", *COMMON]
    )
    assert res.exit_code == 0, res.output
    return root, train, val


def _distill(root: Path, train: str, out: Path, *extra: str):
    args = [
        "distill", "--cache", str(root / "clip"), "--train-data", train, "--out", str(out), "--student", "tiny",
        "--preset", "clip-kd", "--batch-size", "4", "--steps", "4", "--warmup-steps", "1", "--log-every", "1",
        "--k", "3", *COMMON, *extra,
    ]  # fmt: skip
    return CliRunner().invoke(app, args)


def test_val_data_writes_val_recall_best_checkpoint_and_tensorboard(setup):
    root, train, val = setup
    run = root / "run-val"
    res = _distill(root, train, run, "--val-data", val, "--eval-every", "2", "--report-to", "tensorboard")
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    val_rows = [r for r in rows if "val_rsum" in r]
    assert [r["step"] for r in val_rows] == [2, 4]
    best_row = max(val_rows, key=lambda r: r["val_rsum"])
    summary = json.loads((run / "summary.json").read_text())
    assert summary["best"]["step"] == best_row["step"] and summary["best"]["val_rsum"] == best_row["val_rsum"]
    assert (run / "best" / "model.safetensors").is_file() and (run / "final" / "model.safetensors").is_file()
    # the recorded val recall is what `eval` measures on the saved best student with the same shards
    out = root / "best-eval.json"
    res = CliRunner().invoke(
        app, ["eval", "--model", str(run / "best"), "--data", val, "--out", str(out), *COMMON, "--format", "json"]
    )
    assert res.exit_code == 0, res.output
    evaluated = json.loads(out.read_text())["metrics"]
    for key, value in evaluated.items():
        assert best_row[f"val_{key}"] == pytest.approx(value, abs=1e-9), key
    # tensorboard's own reader loads the event files
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert "loss/loss" in tags and "val/rsum" in tags and "train/grad_norm" in tags
    assert [e.step for e in acc.Scalars("loss/loss")] == [1, 2, 3, 4]
    assert [e.value for e in acc.Scalars("val/rsum")] == pytest.approx([r["val_rsum"] for r in val_rows])
    assert (run / "loss_curves.png").stat().st_size > 10_000


def test_validation_never_changes_training(setup):
    """Same weights with and without --val-data (RNG and train mode restored after each validation)."""
    root, train, val = setup
    res = _distill(root, train, root / "plain")
    assert res.exit_code == 0, res.output
    res = _distill(root, train, root / "with-val", "--val-data", val, "--eval-every", "1", "--report-to", "csv")
    assert res.exit_code == 0, res.output
    a = load_file(str(root / "plain" / "final" / "model.safetensors"))
    b = load_file(str(root / "with-val" / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    header = (root / "with-val" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert header[0] == "step" and "val_rsum" in header and "loss" in header


def test_eval_every_without_val_data_is_one_line_error(setup):
    root, train, _ = setup
    res = _distill(root, train, root / "bad", "--eval-every", "2")
    assert res.exit_code == 1 and "--val-data" in res.output and "Traceback" not in res.output


def test_early_stopping_rule(tmp_path, monkeypatch):
    """Patience 2: stop at the second validation in a row without a better RSUM; the best is kept."""
    scores = iter([10.0, 12.0, 11.0, 12.0, 30.0])
    monkeypatch.setattr(Validator, "evaluate", lambda self: {"rsum": next(scores)})
    monkeypatch.setattr(Validator, "_save_best", lambda self, row: None)
    monkeypatch.setattr(validation, "expand_shards", list)
    v = Validator(None, shards=[], run_dir=tmp_path, every=1, total_steps=100, patience=2)
    stops = [v(TrainState(step=s)) for s in range(1, 5)]
    assert stops == [False, False, False, True]
    assert v.best["step"] == 2 and v.best["val_rsum"] == 12.0


def test_csv_tracker_widens_and_resumes(tmp_path):
    t = CsvTracker(tmp_path)
    t.log({"step": 1, "loss": 2.0})
    t.log({"step": 2, "loss": 1.5, "val_rsum": 40.0})
    t.log({"step": 3, "loss": 1.0})
    lines = (tmp_path / "metrics.csv").read_text().splitlines()
    assert lines == ["step,loss,val_rsum", "1,2.0,", "2,1.5,40.0", "3,1.0,"]
    CsvTracker(tmp_path, resume_step=2).log({"step": 3, "loss": 0.5})
    assert (tmp_path / "metrics.csv").read_text().splitlines()[-2:] == ["2,1.5,40.0", "3,0.5,"]


def test_unknown_or_missing_tracker(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="unknown"):
        create_trackers("mlflow", tmp_path, run_name="r", config={})
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match="pip install wandb"):
        create_trackers("wandb", tmp_path, run_name="r", config={})


def test_plot_grouping_and_log_scale():
    names = ["feat_loss", "itc_loss", "kd_i2t_loss", "kd_t2i_loss", "loss", "topk_i2t_loss", "x_loss"]
    assert plots.group_losses(names) == [
        ("total loss", ["loss"]),
        ("contrastive (ITC)", ["itc_loss"]),
        ("in-batch KD", ["kd_i2t_loss", "kd_t2i_loss"]),
        ("top-k KD", ["topk_i2t_loss"]),
        ("features", ["feat_loss"]),
        ("other losses", ["x_loss"]),
    ]
    assert plots.wants_log_scale([[5.0, 4.0], [0.01]])  # 500x apart
    assert not plots.wants_log_scale([[5.0, 4.0], [0.1]])  # 50x
    assert not plots.wants_log_scale([[5.0, 0.0]])  # a zero cannot go on a log axis
