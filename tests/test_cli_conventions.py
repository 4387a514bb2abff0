"""CLI conventions through the real typer app: defaults in --help, flag > --config file > default, choices refused
at parse time with the allowed list, --version, list, --format on stdout with logs on stderr, eval result files that
never collide."""

from __future__ import annotations

import csv
import io
import json
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
from distill_fixtures import make_shards
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))
import fake_teacher  # noqa: E402,F401  (registers the "fake" teacher)

from mcad_cache.cli.main import app  # noqa: E402
from mcad_cache.config import DistillConfig  # noqa: E402

RUNNER = CliRunner()
WIDE = {"COLUMNS": "200"}


def invoke(*args: str):
    return RUNNER.invoke(app, list(args), env=WIDE)


def test_help_shows_defaults_and_choices():
    res = invoke("distill", "--help")
    assert res.exit_code == 0
    out = " ".join(res.output.split())
    assert f"[default: {DistillConfig.batch_size}]" in out and f"[default: {DistillConfig.lr}]" in out
    assert "--train-data, --data SHARDS" in out and "--val-data SHARDS" in out
    assert "[contrastive|clip-kd|clip-kd-feat|single-topk|mcad|mcad-rank|mcad-online]" in out
    assert "<str>" not in RUNNER.invoke(app, ["eval", "--help"], env=WIDE).output


def test_every_command_with_a_config_shows_its_defaults():
    """study used to default every option to None (no default in --help) while the other commands showed theirs."""
    from mcad_cache.pipelines.study import StudyConfig

    out = " ".join(invoke("study", "--help").output.split())
    for text in ("--seeds", f"[default: {StudyConfig.seeds}]", f"[default: {StudyConfig.steps}]"):
        assert text in out, text
    assert "[auto|fp32|bf16|fp16]" in out


@pytest.mark.parametrize(
    ("args", "allowed"),
    [
        (["distill", "--preset", "mcad2"], ["'mcad'", "'clip-kd'", "'contrastive'"]),
        (["build", "--teacher", "clipp"], ["'clip'", "'albef'", "'blip'"]),
        (["build", "--precision", "fp8"], ["'auto'", "'fp32'", "'bf16'", "'fp16'"]),
        (["eval", "--device", "gpu0"], ["'cuda:N'"]),
        (["distill", "--report-to", "mlflow"], ["'tensorboard'", "'wandb'"]),
        (["data", "import", "--source", "coco"], ["'karpathy'", "'folder'"]),
    ],
)
def test_wrong_choice_is_refused_at_parse_time_with_the_allowed_list(args, allowed):
    res = invoke(*args)
    assert res.exit_code == 2, res.output  # click's usage error: nothing ran
    assert all(a in res.output for a in allowed), res.output


def test_registered_teacher_is_accepted_after_import():
    """Choices are read when the command line is parsed: the test's ``fake`` teacher passes the --teacher check."""
    res = invoke("build", "--teacher", "fake", "--data", "/nonexistent/x-*.tar", "--out", "/nonexistent/c.zarr")
    assert res.exit_code == 1 and "--teacher" not in res.output


def test_version_and_list():
    res = invoke("--version")
    assert res.exit_code == 0 and res.stdout.strip() == f"mcad-cache {version('mcad-cache')}"
    res = invoke("list", "teachers", "--format", "json")
    assert res.exit_code == 0
    assert {"albef", "blip", "clip", "fake"} <= {r["name"] for r in json.loads(res.stdout)}
    res = invoke("list", "presets", "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(res.stdout)))
    assert [r["name"] for r in rows][:5] == ["contrastive", "clip-kd", "clip-kd-feat", "single-topk", "mcad"]
    assert "w_kd_i2t=0.0" in rows[0]["description"]  # contrastive switches KD off
    for what in ("students", "integrations", "importers"):
        res = invoke("list", what, "--format", "md")
        assert res.exit_code == 0 and res.stdout.startswith("| name"), res.output
    assert invoke("list", "teacher").exit_code == 2


def test_flag_beats_config_file_beats_default(tmp_path, monkeypatch):
    """The value that reaches the pipeline: default (none given), the file's, then the flag's."""
    from mcad_cache.pipelines import build_cache

    seen = []

    def fake_run(config, *, progress):
        seen.append(config)
        raise build_cache.ConfigError("stop here")

    monkeypatch.setattr(build_cache, "run", fake_run)
    cfg = tmp_path / "run.json"
    cfg.write_text(json.dumps({"k": 5, "batch_size": 7, "teacher": "fake"}))
    base = ["build", "--data", "x.tar"]
    assert invoke(*base).exit_code == 1
    assert invoke(*base, "--config", str(cfg)).exit_code == 1
    assert invoke(*base, "--config", str(cfg), "--k", "3", "--batch-size", "64").exit_code == 1
    assert [(c.k, c.batch_size, c.teacher) for c in seen] == [(11, 64, "clip"), (5, 7, "fake"), (3, 64, "fake")]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("conv")
    make_shards(root / "test", num_samples=6, per_shard=6)
    make_shards(root / "other", num_samples=6, per_shard=3, prefix="o")
    cache = root / "cache.zarr"
    res = invoke("build", "--teacher", "fake", "--data", str(root / "test"), "--out", str(cache), "--k", "3",
                 "--workers", "0", "--device", "cpu")  # fmt: skip
    assert res.exit_code == 0, res.output
    return root, cache


def test_inspect_format_json_on_stdout_only(built):
    _, cache = built
    res = invoke("inspect", str(cache), "--format", "json")
    assert res.exit_code == 0
    desc = json.loads(res.stdout)  # stdout is exactly the JSON
    assert desc["manifest"]["complete"] is True and desc["problems"] is None
    assert "{" not in res.stderr
    res = invoke("inspect", str(cache), "--format", "csv")
    names = [r["name"] for r in csv.DictReader(io.StringIO(res.stdout))]
    assert "image_emb" in names and "i2t_idx" in names


def test_eval_results_on_stdout_logs_on_stderr_and_files_never_collide(built, tmp_path, monkeypatch):
    root, cache = built
    monkeypatch.chdir(tmp_path)  # teachers' and caches' default results go under ./.work/eval
    common = ["--workers", "0", "--device", "cpu"]
    a = invoke("eval", "--teacher", "fake", "--data", str(root / "test"), *common, "--format", "json")
    assert a.exit_code == 0, a.output
    result_a = json.loads(a.stdout)
    assert "protocol:" in a.stderr and "protocol:" not in a.stdout
    b = invoke("eval", "--teacher", "fake", "--data", str(root / "other"), *common, "--format", "json")
    c = invoke("eval", "--teacher", "fake", "--model", "single", "--data", str(root / "test"), *common,
               "--format", "json")  # fmt: skip
    d = invoke("eval", "--model", str(cache), "--data", str(root / "test"), *common, "--format", "json")
    outs = [json.loads(r.stdout)["out"] for r in (a, b, c, d)]
    assert len(set(outs)) == 4 and all(Path(o).is_file() for o in outs)  # other data / other model: other files
    again = invoke("eval", "--teacher", "fake", "--data", str(root / "test"), *common, "--format", "json")
    assert json.loads(again.stdout)["out"] == result_a["out"]  # the same evaluation rewrites its own file
    assert json.loads(Path(outs[0]).read_text())["metrics"] == result_a["metrics"]
    # compare: every format on stdout; --plot writes grouped bars
    png = tmp_path / "bars.png"
    res = invoke("compare", *outs[:3], "--format", "json", "--plot", str(png))
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)
    assert [r["metrics"]["rsum"] for r in rows] == [
        json.loads(Path(o).read_text())["metrics"]["rsum"] for o in outs[:3]
    ]
    assert png.stat().st_size > 5_000
    res = invoke("compare", *outs[:2], "--format", "csv")
    table = list(csv.DictReader(io.StringIO(res.stdout)))
    assert len(table) == 2 and float(table[0]["rsum"]) == pytest.approx(result_a["metrics"]["rsum"], abs=1e-4)
    res = invoke("compare", *outs[:2], "--format", "md")
    assert res.stdout.startswith("| model") and res.stderr == ""
    res = invoke("compare", *outs[:2])  # the rich table also goes to stdout: 2>/dev/null keeps it
    assert "RSUM" in res.stdout and "RSUM" not in res.stderr


def test_docs_cli_md_lists_every_command_and_option():
    """docs/cli.md's reference is generated from the app (regenerate: `python -m mcad_cache.cli.docs docs/cli.md`):
    every command has its section and every option of it is in that section."""
    import typer

    from mcad_cache.cli.docs import MARKER, _commands

    text = (Path(__file__).resolve().parents[1] / "docs" / "cli.md").read_text()
    assert MARKER in text
    sections = {s.split("`", 1)[0]: s for s in text.split("### `")[1:]}
    for path, cmd in _commands(typer.main.get_command(app)):
        assert path in sections, f"docs/cli.md has no section for {path}: regenerate it"
        for p in cmd.params:
            for opt in [*p.opts, *p.secondary_opts]:
                if opt.startswith("-"):
                    assert opt in sections[path], f"docs/cli.md: {path} lacks {opt}: regenerate it"
