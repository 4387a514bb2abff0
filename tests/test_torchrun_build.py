"""The cache build on several ranks, through the real CLI: under torchrun (gloo, 2 CPU processes) it equals a
one-process build array by array; a killed rank makes the other exit with a message naming it and its units, and a
rerun completes; ranks with different world sizes are refused, and a wait without the missing rank times out naming
it (issue 17 item 1, issue 13 item 12)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from mcad_cache.cache import check_cache, open_cache
from mcad_cache.cli.main import app

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))
from test_build import write_shards  # noqa: E402  (tiny shards with bad samples; registers nothing)

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "1000"}  # one thread per rank; no wrapped log lines
# The CLI with the test's fake teacher registered; FAIL_RANK / FAIL_STAGE make that rank SIGKILL itself just before
# it would commit its first unit of that stage (its data written, its done marker not).
CLI = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    import fake_teacher  # registers "fake"
    from mcad_cache.cache.writer import CacheWriter
    from mcad_cache.cli.main import app

    fail_rank, fail_stage = os.environ.get("FAIL_RANK"), os.environ.get("FAIL_STAGE")
    if fail_rank is not None and os.environ.get("RANK") == fail_rank:
        mark_done = CacheWriter.mark_done

        def mark_done_or_die(self, stage, unit):
            if stage == fail_stage:
                os.kill(os.getpid(), signal.SIGKILL)
            mark_done(self, stage, unit)

        CacheWriter.mark_done = mark_done_or_die
    app()
    """
)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("shards")
    write_shards(folder, num_shards=2, per_shard=8)
    return folder


@pytest.fixture(scope="module")
def cli_script(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "cli.py"
    path.write_text(CLI.format(tests=str(TESTS)))
    return path


def build_args(shards: Path, out: Path, *extra: str) -> list[str]:
    return [
        "build", "--teacher", "fake", "--model", "single", "--fused-dtype", "fp16", "--data",
        str(shards / "shard-*.tar"), "--out", str(out), "--k", "3", "--batch-size", "3", "--workers", "0",
        "--rows-per-chunk", "4", "--chunk-size", "5", "--device", "cpu", "--threads", "1", *extra,
    ]  # fmt: skip


def torchrun(script: Path, args: list[str], *, env: dict[str, str] | None = None, monitor_s: float = 0.1):
    """``python -m torch.distributed.run --standalone --nproc-per-node 2 script args`` (gloo on CPU)."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "--monitor-interval", str(monitor_s), str(script), *args,
    ]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**ENV, **(env or {})})


def arrays(path: Path) -> dict[str, np.ndarray]:
    g = zarr.open_group(str(path), mode="r")
    return {name: np.asarray(g[name][:]) for name in sorted(g.array_keys())}


def assert_same_arrays(a: Path, b: Path) -> None:
    ref, got = arrays(a), arrays(b)
    assert sorted(ref) == sorted(got)
    for name in ref:
        assert ref[name].dtype == got[name].dtype, name
        assert np.array_equal(ref[name], got[name], equal_nan=ref[name].dtype.kind == "f"), name


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory) -> Path:
    import fake_teacher  # noqa: F401  (registers "fake" in this process)

    out = tmp_path_factory.mktemp("ref") / "one.zarr"
    res = CliRunner().invoke(app, build_args(shards, out))
    assert res.exit_code == 0, res.output
    return out


def test_torchrun_build_equals_one_process(shards, cli_script, reference, tmp_path):
    out = tmp_path / "two.zarr"
    proc = torchrun(cli_script, build_args(shards, out))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert_same_arrays(reference, out)
    assert check_cache(open_cache(out)) == []
    # rank 0's summary lists both ranks' pass times; rank 1 says it left the finalising to rank 0
    assert "rank 1: pass2_topk" in proc.stdout and "rank 0: pass1_images" in proc.stdout
    # each rank computed the top-k of its own query rows only: units 0, 2 (rows 0-3, 8-11) and 1, 3 (4-7, 12-13)
    n = open_cache(out).num_images
    assert n == 14
    assert f"rank 0 of 2: top-k i2t for 8 of {n} query rows (2 units)" in proc.stderr
    assert f"rank 1 of 2: top-k i2t for 6 of {n} query rows (2 units)" in proc.stderr


def test_killed_rank_fails_the_other_and_rerun_resumes(shards, cli_script, reference, tmp_path):
    out = tmp_path / "killed.zarr"
    # rank 1 dies in pass 2; rank 0 waits at the barrier after pass 2 and must fail at once, naming rank 1's units
    # (--monitor-interval 3: torchrun's agent stops the survivors only after rank 0 has had time to report)
    proc = torchrun(cli_script, build_args(shards, out), env={"FAIL_RANK": "1", "FAIL_STAGE": "topk_i2t"}, monitor_s=3)
    assert proc.returncode != 0
    err = proc.stdout + proc.stderr
    assert "rank 0 of 2: the ranks did not meet after pass 2 (top-k)" in err, err[-4000:]
    assert "not committed: rank 1 of 2: topk_i2t units [1, 3]" in err, err[-4000:]
    assert "Traceback" not in proc.stdout
    assert not open_cache(out).complete
    proc = torchrun(cli_script, build_args(shards, out))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert_same_arrays(reference, out)
    assert open_cache(out).manifest["resumed_at"]


def test_torchrun_flags_that_disagree_are_refused(shards, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    res = CliRunner().invoke(app, build_args(shards, tmp_path / "c.zarr", "--world-size", "3"))
    assert res.exit_code == 1
    assert "--world-size 3 disagree with torchrun's RANK=0 WORLD_SIZE=2" in res.output
    assert not (tmp_path / "c.zarr").exists()


def test_hand_started_ranks_with_other_world_sizes(shards, cli_script, reference, tmp_path):
    def start(out: Path, rank: int, world: int, timeout_s: float) -> subprocess.Popen:
        cfg = tmp_path / f"run-{rank}-{world}.json"
        cfg.write_text(json.dumps({"wait_timeout_s": timeout_s}))
        args = [*build_args(shards, out, "--rank", str(rank), "--world-size", str(world)), "--config", str(cfg)]
        cmd = [sys.executable, str(cli_script), *args]
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)

    out = tmp_path / "hand.zarr"
    rank0 = start(out, 0, 2, 300)
    deadline = time.monotonic() + 120
    while not (tmp_path / "hand.zarr.rank0.lock").exists():
        assert rank0.poll() is None and time.monotonic() < deadline, rank0.communicate()
        time.sleep(0.2)
    wrong = start(out, 1, 3, 300)  # a rank started with another --world-size is refused at once
    _, err = wrong.communicate(timeout=120)
    assert wrong.returncode == 1, err[-3000:]
    assert "rank 0 of --world-size 2 is building" in err and "start every rank with the same --world-size" in err
    right = start(out, 1, 2, 300)
    assert right.wait(timeout=180) == 0 and rank0.wait(timeout=180) == 0, rank0.communicate()[1][-3000:]
    assert_same_arrays(reference, out)

    # rank 0 alone: its wait for rank 1 gives up after wait_timeout_s, naming rank 1 and its units
    alone = start(tmp_path / "alone.zarr", 0, 2, 3)
    _, err = alone.communicate(timeout=180)
    assert alone.returncode == 1, err[-3000:]
    assert "rank(s) [1] have not run for 3 s" in err and "rank 1 of 2: image_emb units [1, 3] (2)" in err, err
