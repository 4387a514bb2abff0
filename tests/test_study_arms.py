"""Study arms (a preset plus overrides), replayed views on the frozen-tower path (issue 16) and the candidate bank on
it (issue 11): parse known answers, slow reference vs fast path, and the pair end to end at tiny size."""

from __future__ import annotations

import json

import pytest
import torch
from test_views_build import _config, write_view_shards

from mcad_cache.errors import ConfigError
from mcad_cache.study import RunSpec, StudyMismatchError, StudyPlan, run_study
from mcad_cache.study.arms import Arm, arm_config, parse_arm, parse_arms

# ---- parsing ----------------------------------------------------------------------------------------------------


def test_parse_arm_known_answers():
    assert parse_arm("clip-kd") == Arm(name="clip-kd", preset="clip-kd")
    arm = parse_arm("clip-kd@views=4")
    assert (arm.name, arm.preset, arm.views, arm.loss, arm.run) == ("clip-kd@views=4", "clip-kd", 4, {}, {})
    arm = parse_arm(" bank = clip-kd@w_topk_i2t=0.5, w-topk-t2i=1, candidates=bank, bank_ema=0 ")
    assert arm.name == "bank" and arm.preset == "clip-kd"
    assert arm.loss == {"w_topk_i2t": 0.5, "w_topk_t2i": 1}
    assert arm.run == {"candidates": "bank", "bank_ema": 0.0} and isinstance(arm.run["bank_ema"], float)
    assert parse_arm("x=contrastive@allow_aug_mismatch=true").run == {"allow_aug_mismatch": True}


@pytest.mark.parametrize(
    ("entry", "match"),
    [
        ("clip-kd@", "malformed"),
        ("=clip-kd", "malformed"),
        ("a/b=clip-kd", "malformed"),
        ("clipkd", "unknown preset 'clipkd'"),
        ("clip-kd@views", "not KEY=VALUE"),
        ("clip-kd@views=0", "views must be an integer >= 1"),
        ("clip-kd@views=2.5", "views must be an integer"),
        ("clip-kd@batch_size=8", "unknown key 'batch_size'"),
        ("clip-kd@seed=1", "unknown key 'seed'"),
        ("clip-kd@lr=fast", "lr must be float"),
        ("clip-kd@k=2.5", "k must be int"),
        ("clip-kd@w_feat=-1", "w_feat must be >= 0"),
        ("clip-kd@w_feat=1,w_feat=2", "given twice"),
        ("clip-kd@views=2,augment=none", "not both"),
    ],
)
def test_parse_arm_refuses_bad_entries_with_one_line(entry, match):
    with pytest.raises(ConfigError, match=match) as err:
        parse_arm(entry)
    assert "\n" not in str(err.value) and repr(entry.strip()) in str(err.value) or "malformed" in str(err.value)


def test_parse_arms_refuses_repeats_and_twins():
    with pytest.raises(ConfigError, match="given twice"):
        parse_arms(["a=clip-kd", "a=contrastive"])
    with pytest.raises(ConfigError, match="same run"):
        parse_arms(["clip-kd", "x=clip-kd"])


def test_arm_config_applies_overrides_on_the_shared_settings():
    from mcad_cache.config import DistillConfig

    base = DistillConfig(preset="contrastive", loss={"w_itc": 2.0, "w_feat": 1.0}, seed=3)
    cfg = arm_config(base, parse_arm("clip-kd@w_feat=0.5,candidates=bank,views=1"))
    assert (cfg.preset, cfg.candidates, cfg.augment, cfg.seed) == ("clip-kd", "bank", "none", 3)
    assert cfg.loss == {"w_itc": 2.0, "w_feat": 0.5}
    assert arm_config(base, parse_arm("clip-kd@views=4")).augment == ""
    assert arm_config(base, parse_arm("clip-kd")) == base.__class__(**{**base.__dict__, "preset": "clip-kd"})


def test_runs_record_their_arm_and_a_redefined_name_is_refused(tmp_path):
    from test_study import FakeRun

    arms = {a.name: a for a in parse_arms(["contrastive", "mcad", "clip-kd=clip-kd@w_feat=1"])}
    defs = {n: a.definition() for n, a in arms.items()}
    plan = StudyPlan(presets=tuple(arms), seeds=(0, 1))
    run_study(plan, FakeRun(), out=tmp_path, context={}, definitions=defs)
    saved = json.loads((tmp_path / "runs" / "clip-kd" / "seed-0" / "result.json").read_text())
    assert saved["arm"] == {"preset": "clip-kd", "loss": {"w_feat": 1}, "run": {}, "views": None}
    again = FakeRun()
    assert all(r.reused for r in run_study(plan, again, out=tmp_path, context={}, definitions=defs))
    redefined = {**defs, "clip-kd": parse_arm("clip-kd=clip-kd@w_feat=2").definition()}
    with pytest.raises(StudyMismatchError, match="arm 'clip-kd' defined as"):
        run_study(plan, FakeRun(), out=tmp_path, context={}, definitions=redefined)
    # a record made before arms existed counts as the plain preset's
    (tmp_path / "runs" / "mcad" / "seed-0" / "result.json").write_text(json.dumps({**saved, "preset": "mcad"}))
    record = json.loads((tmp_path / "runs" / "mcad" / "seed-0" / "result.json").read_text())
    record.pop("arm")
    (tmp_path / "runs" / "mcad" / "seed-0" / "result.json").write_text(json.dumps(record))
    from mcad_cache.study.runner import load_result

    sha = json.loads((tmp_path / "context.json").read_text())["sha256"]
    assert load_result(tmp_path, "mcad", 0, context_sha256=sha, definition=defs["mcad"]) is not None
    assert isinstance(RunSpec(preset="mcad", seed=0, run_dir=tmp_path), RunSpec)


# ---- replayed views and the bank on the frozen path --------------------------------------------------------------


@pytest.fixture(scope="module")
def view_world(tmp_path_factory):
    """12 images in 2 shards, a tiny random CLIP cache with 4 stored views each (k = 3)."""
    from mcad_cache.pipelines.build_cache import run as build

    root = tmp_path_factory.mktemp("study_views")
    write_view_shards(root / "shards", num_shards=2, per_shard=6)
    build(_config(root / "shards", root / "cache.zarr"))
    shards = sorted(str(p) for p in (root / "shards").glob("*.tar"))
    return {"root": root, "shards": shards, "cache": str(root / "cache.zarr")}


def _cfg(world, out, **kw):
    from mcad_cache.pipelines.study import StudyConfig

    base = dict(
        cache=(world["cache"],), data=tuple(world["shards"]), test=tuple(world["shards"]), out=str(out),
        presets=("contrastive", "clip-kd@views=1", "clip-kd@views=4"), seeds=2, target="clip-kd@views=4",
        single_teacher=(), student="tiny", k=3, batch_size=4, steps=3, warmup_steps=1, workers=0, shuffle_buffer=5,
        log_every=1, device="cpu", frozen_towers=True,
    )  # fmt: skip
    base.update(kw)
    return StudyConfig(**base)


def _tables(world, tmp_path, views=True):
    from mcad_cache.study.tables import frozen_tables

    return frozen_tables(_cfg(world, tmp_path), tmp_path, views=views)


def test_frozen_view_features_equal_the_real_students_replayed_view(view_world, tmp_path):
    """Slow reference vs fast path: for every sample of three epochs, the real run's student (its stream decodes the
    view chosen for (seed, epoch, key) and crops / flips it) gives the tower output that the frozen path's stream
    serves for that key and epoch; view 0 is the canonical image; the loss terms of both paths agree."""
    from mcad_cache.distill import create_distill
    from mcad_cache.distill.views import choose_view
    from mcad_cache.pipelines.study import distill_config
    from mcad_cache.study.frozen import FeatureStream, frozen_run

    tables = _tables(view_world, tmp_path)
    table = tables["data"]
    assert table.image_feat_views is not None and tuple(table.image_feat_views.shape[:2]) == (12, 4)
    torch.testing.assert_close(table.image_feat_views[:, 0], table.image_feat, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(table.image_feat_views[:, 1], table.image_feat, atol=1e-3)  # views differ

    cfg = distill_config(_cfg(view_world, tmp_path), preset="clip-kd@views=4", seed=0, out="x")  # table towers
    d = create_distill(cfg)
    d.model.eval()
    fast = FeatureStream(table, batch_size=4, seed=0, views=4)
    chosen = set()
    for epoch in range(3):
        served = {k: row for b in fast(epoch) for k, row in zip(b["key"], b["image"], strict=True)}
        for raw in d.stream(epoch):
            with torch.no_grad():
                real = d.model.forward_image(raw["image"])[1]
            for key, feat in zip(raw["key"], real, strict=True):
                v = choose_view(0, epoch, key, 4)
                chosen.add(v)
                torch.testing.assert_close(feat, table.image_feat_views[table.row_of_key[key], v], rtol=1e-4, atol=1e-5)
                if key in served:
                    torch.testing.assert_close(served[key], feat, rtol=1e-4, atol=1e-5)
    assert chosen == {0, 1, 2, 3}

    # the loss on one batch: real student on decoded views vs projections on the table rows, same step generator
    run, _, student = frozen_run(cfg, train=table, views=4)
    raw = next(iter(d.stream(1)))
    slow = d.forward(d.model, d.loss_module, d.join(raw, 7))
    rows = [table.row_of_key[k] for k in raw["key"]]
    picked = table.image_feat_views[rows, [choose_view(0, 1, k, 4) for k in raw["key"]]]
    batch = {"key": raw["key"], "captions": raw["captions"], "image": picked, "skipped": [], "epoch": 1}
    fast_terms = run.forward(student, run.loss_module, run.join(batch, 7))
    assert set(fast_terms) == set(slow) and "kd_i2t_loss" in slow
    for name in slow:
        assert float(fast_terms[name].detach()) == pytest.approx(float(slow[name].detach()), rel=1e-4, abs=1e-5)


def test_frozen_views_subset_and_canonical(view_world, tmp_path):
    from mcad_cache.distill.views import choose_view
    from mcad_cache.pipelines.study import distill_config
    from mcad_cache.study.frozen import FeatureStream, frozen_run

    table = _tables(view_world, tmp_path)["data"]
    for views, allowed in ((2, {0, 1}), (1, {0})):
        stream = FeatureStream(table, batch_size=4, seed=0, views=views)
        for batch in stream(0):
            for key, row in zip(batch["key"], batch["image"], strict=True):
                v = choose_view(0, 0, key, views)
                assert v in allowed
                assert torch.equal(row, table.image_feat_views[table.row_of_key[key], v])
    canonical = distill_config(_cfg(view_world, tmp_path), preset="clip-kd@views=1", seed=0, out="x")
    run, _, _ = frozen_run(canonical, train=table, views=1)
    assert run.joiner.views is None and run.stream.views is None
    with pytest.raises(ConfigError, match="views=5"):
        frozen_run(distill_config(_cfg(view_world, tmp_path), preset="clip-kd@views=5", seed=0, out="x"),
                   train=table, views=5)  # fmt: skip


TOPK = "w_topk_i2t=0.5,w_topk_t2i=0.5"


def test_frozen_bank_first_step_equals_online_and_rows_are_last_anchor_visits(view_world, tmp_path):
    """Filled from the same initial weights, the bank's first step gives the online loss; afterwards each anchor's
    bank row is its projection at its last visit (detached), the other rows keep the initial fill."""
    import torch.nn.functional as F

    from mcad_cache.pipelines.study import distill_config
    from mcad_cache.study.frozen import frozen_run

    table = _tables(view_world, tmp_path, views=False)["data"]
    terms, runs = {}, {}
    for mode in ("online", "bank"):
        cfg = distill_config(_cfg(view_world, tmp_path), preset=f"clip-kd@{TOPK},candidates={mode},views=1", seed=2,
                             out="x")  # fmt: skip
        run, _, student = frozen_run(cfg, train=table)
        batch, _, _ = run.prepare(next(iter(run.stream(0))), 1)
        terms[mode] = {k: float(v.detach()) for k, v in run.forward(student, run.loss_module, batch).items()}
        runs[mode] = (run, student)
    assert "topk_i2t_loss" in terms["online"] and "topk_t2i_loss" in terms["online"]
    assert terms["bank"] == pytest.approx(terms["online"], rel=1e-5, abs=1e-6)

    run, student = runs["bank"]
    bank = run.bank.bank
    initial_text = bank.text_emb.clone()
    visits = {}
    for step, raw in enumerate(run.stream(1), start=2):
        batch, keys, _ = run.prepare(raw, step)
        run.optimizer.zero_grad()
        run.forward(student, run.loss_module, batch)["loss"].backward()
        with torch.no_grad():  # the projection written at this visit (weights before this step's update)
            emb = F.normalize(student.image_proj(raw["image"]), dim=-1)
        for key, row in zip(keys, emb, strict=True):
            visits[key] = row.clone()
        run.optimizer.step()
    cache_rows = run.joiner.cand.image_rows(list(visits)).tolist()
    for row, key in zip(cache_rows, visits, strict=True):
        torch.testing.assert_close(bank.image_emb[row], visits[key], rtol=1e-5, atol=1e-6)
    assert bank.image_emb.requires_grad is False
    never = bank.text_step == 0  # captions never an anchor since the fill keep their initial rows
    assert bool(never.any()) and torch.equal(bank.text_emb[never], initial_text[never])


def test_study_pair_one_view_vs_four_views_end_to_end(view_world, tmp_path):
    from mcad_cache.pipelines import study

    summary = study.run(_cfg(view_world, tmp_path / "s"))
    assert len(summary["runs"]) == 6 and (tmp_path / "s" / "tables" / "data-views.pt").is_file()
    assert summary["arms"]["clip-kd@views=4"] == {"preset": "clip-kd", "loss": {}, "run": {}, "views": 4}
    comps = {c["b"]: c for c in summary["comparisons"]}
    assert set(comps) == {"contrastive", "clip-kd@views=1"} and comps["clip-kd@views=1"]["num_pairs"] == 2
    one = json.loads((tmp_path / "s" / "runs" / "clip-kd@views=1" / "seed-0" / "result.json").read_text())
    assert one["arm"]["views"] == 1
    # the two arms' runs differ (other views), the same seed in one arm reruns to the same result
    four = summary["presets"]["clip-kd@views=4"]["metrics"]["rsum"]["by_seed"]
    again = study.run(_cfg(view_world, tmp_path / "s2", presets=("contrastive", "clip-kd@views=4"), seeds=1))
    assert again["presets"]["clip-kd@views=4"]["metrics"]["rsum"]["by_seed"]["0"] == pytest.approx(four["0"])
    with pytest.raises(ConfigError, match="views=3"):
        study.run(_cfg(view_world, tmp_path / "s3", frozen_towers=False, presets=("contrastive", "clip-kd@views=3"),
                       target="clip-kd@views=3", seeds=1, steps=1))  # fmt: skip


def test_cli_study_arms_and_format(view_world, tmp_path):
    """Arms through the real CLI; --format json parses (the summary), csv / md give one row per arm on stdout, with
    the logs and headline on stderr; a bad arm is one line, exit 1."""
    import csv
    import io

    from typer.testing import CliRunner

    from mcad_cache.cli.main import app

    args = ["study", "--cache", view_world["cache"], "--out", str(tmp_path / "s"), "--frozen-towers"]
    args += [a for s in view_world["shards"] for a in ("--data", s, "--test", s)]
    args += ["--student", "tiny", "--k", "3", "--batch-size", "4", "--steps", "2", "--warmup-steps", "1"]
    args += ["--workers", "0", "--device", "cpu", "--seeds", "2", "--target", "one=clip-kd@views=1"]
    args += ["--arm", "contrastive", "--preset", "one=clip-kd@views=1"]
    res = CliRunner().invoke(app, [*args, "--format", "json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["arms"]["one"]["views"] == 1 and "one vs contrastive: Δ RSUM" in res.stderr
    assert "Δ RSUM" not in res.stdout.replace(json.dumps(summary["headline"][0])[1:-1], "")
    rows = {}
    for fmt in ("csv", "md"):
        res = CliRunner().invoke(app, [*args, "--format", fmt])  # every run reused
        assert res.exit_code == 0, res.output
        rows[fmt] = res.stdout
    table = list(csv.DictReader(io.StringIO(rows["csv"])))
    assert [r["arm"] for r in table] == ["contrastive", "one"]
    comp = summary["comparisons"][0]
    assert float(table[0]["delta"]) == pytest.approx(comp["mean_delta"], abs=0.006) and table[1]["delta"] == ""
    assert float(table[1]["rsum_mean"]) == pytest.approx(
        summary["presets"]["one"]["metrics"]["rsum"]["mean"], abs=0.006
    )
    assert rows["md"].startswith("| arm") and rows["md"].count("\n") >= 3
    res = CliRunner().invoke(app, [*args[:-6], "--arm", "clip-kd@batch_size=2"])
    assert res.exit_code == 1 and "unknown key 'batch_size'" in res.output and "Traceback" not in res.output
