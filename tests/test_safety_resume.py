"""Issue 13 item 5 and the CLI rough edges around it, all through the real CLI (typer's ``CliRunner``):

- a resume prints one line saying where it resumed;
- ``distill --out RUN --steps larger`` on a finished run extends it (open_clip / timm behaviour: the cosine is
  recomputed over the new total from the current step on), recorded as ``schedule_history``; a total at or below the
  steps already run is one line that says how;
- a batch larger than the data is one line naming ``--batch-size``, the sample count and the fix;
- ``--k`` defaults to the caches' k (``distill --preset clip-kd`` on a k=3 cache needed ``--k 3`` before);
- ``--in-batch`` is a checked CLI flag (issue 15).

A fake-teacher cache (k=3) over 12 samples and the ``tiny`` student (squash-resized, the fake teacher's view).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import fake_teacher  # noqa: F401  (registers the "fake" teacher)
import pytest
from distill_fixtures import make_shards
from typer.testing import CliRunner

from mcad_cache.config import BuildConfig
from mcad_cache.pipelines import build_cache
from mcad_cache.schedules import warmup_cosine

LR, WARMUP = 1e-3, 1


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("resume")
    make_shards(root / "shards", num_samples=12, per_shard=6)
    data = str(root / "shards" / "train-*.tar")
    cache = root / "clip.zarr"
    build_cache.run(
        BuildConfig(teacher="fake", data=(data,), out=str(cache), k=3, batch_size=6, workers=0, device="cpu")
    )
    return {"root": root, "data": data, "cache": str(cache)}


def _distill(world: dict, out: Path, *args: str):
    from mcad_cache.cli.main import app

    return CliRunner().invoke(
        app,
        ["distill", "--cache", world["cache"], "--data", world["data"], "--out", str(out), "--student", "tiny",
         "--preset", "clip-kd", "--batch-size", "4", "--lr", str(LR), "--warmup-steps", str(WARMUP), "--workers", "0",
         "--threads", "1", "--device", "cpu", "--shuffle-buffer", "0", "--log-every", "1", *args],
    )  # fmt: skip


def _text(res) -> str:
    return " ".join(res.output.split())  # rich wraps long lines at the terminal width


def _logged(res, line: str) -> bool:
    """``line`` is in the output's log lines, which rich folds at the terminal width, long paths mid-word."""
    return "".join(line.split()) in "".join(res.output.split())


def _one_line_error(res, *needles: str) -> None:
    assert res.exit_code == 1, res.output
    text = _text(res)
    assert "Traceback" not in res.output and text.count("error:") == 1, res.output
    for needle in needles:
        assert needle in text, (needle, res.output)


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def _lrs(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["lr"] for r in rows if "lr" in r}


def test_a_finished_run_extends_to_more_steps_with_the_new_schedule_recorded(world, tmp_path):
    """Old code: ``--steps 4`` on a finished 2-step run was refused as "another config" (and, let through, the
    restored scheduler would have trained steps 3-4 at LR 0: LambdaLR restores the old total)."""
    run, ref = tmp_path / "run", tmp_path / "ref"
    assert _distill(world, run, "--steps", "2").exit_code == 0
    res = _distill(world, run, "--steps", "4")
    assert res.exit_code == 0, res.output
    assert _logged(res, f"resumed {run} at step 2 of 4 (epoch 0, sample 8 of the epoch)"), res.output
    assert _logged(res, "schedule extended: steps 1-2 ran under a total of 2, steps 3-4 follow the cosine over 4")
    summary = _json(run / "summary.json")
    assert summary["steps"] == 4 and summary["steps_this_session"] == 2
    assert summary["schedule_history"] == [
        {"from_step": 0, "total_steps": 2, "warmup_steps": WARMUP},
        {"from_step": 2, "total_steps": 4, "warmup_steps": WARMUP},
    ]
    assert _json(run / "config.json")["steps"] == 4
    lrs = _lrs(run)  # steps 1-2 on the 2-step curve, 3-4 on the 4-step curve (step n runs at multiplier(n - 1))
    want = {n: LR * warmup_cosine(n - 1, warmup_steps=WARMUP, total_steps=2 if n <= 2 else 4) for n in range(1, 5)}
    assert lrs == pytest.approx(want, rel=1e-6) and lrs[3] > 0.4 * LR
    assert _distill(world, ref, "--steps", "4").exit_code == 0  # an uninterrupted 4-step run: same LR at steps 3-4
    assert {n: _lrs(ref)[n] for n in (3, 4)} == pytest.approx({n: lrs[n] for n in (3, 4)}, rel=1e-6)
    assert _json(ref / "summary.json")["schedule_history"] == [{"from_step": 0, "total_steps": 4, "warmup_steps": 1}]

    again = _distill(world, run, "--steps", "4")  # the same command on the finished run: nothing to do, no entry
    assert again.exit_code == 0 and len(_json(run / "summary.json")["schedule_history"]) == 2
    shorter = _distill(world, run, "--steps", "3")
    _one_line_error(shorter, "the run already ran 4 steps (of 4); --steps 3 makes 3: pass a total above 4 to extend "
                             "it, or a new --out")  # fmt: skip


def test_a_resume_prints_where_it_resumed(world, tmp_path):
    """Old code logged "resuming RUN at step N (epoch e, batch b)": no total, and a batch count, not a sample."""
    run = tmp_path / "run"
    assert _distill(world, run, "--steps", "4", "--checkpoint-every", "2").exit_code == 0
    shutil.rmtree(run / "checkpoints" / "step_00000004")  # as if killed after the step-2 checkpoint
    res = _distill(world, run, "--steps", "4", "--checkpoint-every", "2")
    assert res.exit_code == 0, res.output
    assert _logged(res, f"resumed {run} at step 2 of 4 (epoch 0, sample 8 of the epoch)"), res.output
    assert not _logged(res, "schedule extended")
    assert _json(run / "summary.json")["schedule_history"] == [{"from_step": 0, "total_steps": 4, "warmup_steps": 1}]


@pytest.mark.parametrize("steps", [[], ["--steps", "3"]])
def test_a_batch_larger_than_the_data_is_one_line(world, tmp_path, steps):
    """Old code: with --steps, a RuntimeError traceback from the loop; without, "lower --batch-size or set --steps"
    (setting --steps did not help)."""
    res = _distill(world, tmp_path / "run", *steps, "--batch-size", "16")
    _one_line_error(res, "--batch-size 16 is larger than the 12 training samples", "use --batch-size 12 or less")
    assert not (tmp_path / "run").exists()  # refused before the run dir (and the student) is made


def test_k_defaults_to_the_caches_k(world, tmp_path):
    """Old code: k defaulted to 11, so `distill --preset clip-kd` on a k=3 cache was refused without --k 3."""
    res = _distill(world, tmp_path / "run", "--steps", "1")
    assert res.exit_code == 0, res.output
    assert _json(tmp_path / "run" / "config.json")["k"] == 3  # recorded resolved
    assert _json(tmp_path / "run" / "summary.json")["k"] == 3
    _one_line_error(_distill(world, tmp_path / "run5", "--steps", "1", "--k", "5"),
                    "requested k=5, but the cache holds k=3")  # fmt: skip


def test_in_batch_is_a_checked_flag(world, tmp_path):
    """Old code: `--in-batch` was a --config field only (click: "No such option")."""
    res = _distill(world, tmp_path / "run", "--steps", "1", "--in-batch", "rank")
    assert res.exit_code == 0, res.output
    assert _json(tmp_path / "run" / "config.json")["in_batch"] == "rank"
    bad = _distill(world, tmp_path / "bad", "--steps", "1", "--in-batch", "all")
    assert bad.exit_code == 2 and "'all' is not one of 'global', 'rank'" in _text(bad)
