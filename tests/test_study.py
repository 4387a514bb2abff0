"""The study: paired statistics against scipy / known answers, resumable runs, the report."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy import stats

from mcad_cache.errors import ConfigError, DataError
from mcad_cache.metrics import METRIC_KEYS
from mcad_cache.study import (
    RunSpec,
    StudyMismatchError,
    StudyPlan,
    holm,
    minimal_detectable_delta,
    paired_delta,
    pairs_needed,
    run_study,
    summarise_study,
    write_study,
)
from mcad_cache.study.report import study_markdown

# The seed study of the old docs/demo.md (RSUM of seeds 0, 1, 2).
MCAD = [80.7, 82.3, 78.6]
CONTRASTIVE = [80.1, 76.7, 79.8]


def test_paired_delta_matches_t_formula_and_scipy():
    d = paired_delta(MCAD, CONTRASTIVE, a="mcad", b="contrastive")
    diff = np.subtract(MCAD, CONTRASTIVE)
    sd = diff.std(ddof=1)
    half = stats.t.ppf(0.975, df=2) * sd / math.sqrt(3)  # the textbook t-interval, from the t quantile
    assert d.num_pairs == 3
    assert d.mean_delta == pytest.approx(5 / 3)
    assert d.std_delta == pytest.approx(sd)
    assert (d.ci_low, d.ci_high) == pytest.approx((5 / 3 - half, 5 / 3 + half))
    assert d.t_p == pytest.approx(stats.ttest_1samp(diff, 0.0).pvalue)
    assert d.t_p == pytest.approx(0.4987, abs=1e-4)  # the "paired p ≈ 0.5" the issue quotes
    # Wilcoxon: d = 0.6, 5.6, -1.2 have |d| ranks 1, 3, 2, so W+ = 4; of the 8 equally likely sign patterns,
    # 3 give W+ >= 4 and 3 give W+ <= 2: exact two-sided p = 6/8
    assert d.wilcoxon_p == pytest.approx(0.75)


def test_wilcoxon_exact_known_answer_and_all_zero():
    # All five differences positive: P(W+ = 15) = 1/32 per side, two-sided 2/32.
    d = paired_delta([1, 2, 3, 4, 5], [0, 0, 0, 0, 0])
    assert d.wilcoxon_p == pytest.approx(2 / 32)
    same = paired_delta([3.0, 4.0], [3.0, 4.0])
    assert same.wilcoxon_p == 1.0 and same.mean_delta == 0.0 and same.mde == 0.0
    assert math.isnan(paired_delta([1.0], [0.0]).ci_low)


def test_paired_delta_rejects_bad_input():
    with pytest.raises(ValueError, match="equal"):
        paired_delta([1, 2], [1])
    with pytest.raises(ValueError, match="finite"):
        paired_delta([1, float("nan")], [1, 2])


def test_holm_known_answer():
    ds = [paired_delta([1, 2], [0, 0], b=str(i)) for i in range(3)]
    ds = [d.__class__(**{**d.to_dict(), "wilcoxon_p": p}) for d, p in zip(ds, [0.01, 0.04, 0.03], strict=True)]
    out = holm(ds)
    # sorted 0.01, 0.03, 0.04 times 3, 2, 1 -> 0.03, 0.06, 0.04 -> running max 0.03, 0.06, 0.06
    assert [d.wilcoxon_p_holm for d in out] == pytest.approx([0.03, 0.06, 0.06])
    assert [d.b for d in out] == ["0", "1", "2"]


def _power_noncentral_t(delta: float, sd: float, n: int, alpha: float = 0.05) -> float:
    """Two-sided paired t-test power from scipy's noncentral t (the reference for statsmodels' solver)."""
    df, nc = n - 1, delta / sd * math.sqrt(n)
    crit = stats.t.ppf(1 - alpha / 2, df)
    far_tail = float(np.nan_to_num(stats.nct.cdf(-crit, df, nc)))  # NaN in scipy when it underflows (large nc)
    return float(stats.nct.sf(crit, df, nc)) + far_tail


@pytest.mark.parametrize(("sd", "n"), [(3.52, 3), (2.0, 10), (5.0, 25)])
def test_mde_has_80_percent_power(sd, n):
    mde = minimal_detectable_delta(sd, n)
    assert _power_noncentral_t(mde, sd, n) == pytest.approx(0.8, abs=1e-6)
    assert _power_noncentral_t(0.9 * mde, sd, n) < 0.8


def test_pairs_needed_reaches_target():
    sd = paired_delta(MCAD, CONTRASTIVE).std_delta
    n = pairs_needed(sd, 3.0)
    assert n == 13  # the issue: "about 12 paired seeds" at this spread
    assert minimal_detectable_delta(sd, n) <= 3.0 < minimal_detectable_delta(sd, n - 1)
    with pytest.raises(ValueError):
        pairs_needed(sd, 0.0)
    # fewer pairs as the spread shrinks, also where statsmodels' noncentral t gives NaN (large effects)
    needed = [pairs_needed(s, 3.0) for s in np.linspace(4.0, 0.05, 80)]
    assert needed == sorted(needed, reverse=True) and needed[-1] == 2
    assert pairs_needed(0.55, 3.0) == 3
    assert _power_noncentral_t(3.0, 0.55, 3) >= 0.8 > _power_noncentral_t(3.0, 0.55, 2)


# ---- runner -----------------------------------------------------------------------------------------------------

GAIN = {"contrastive": 0.0, "clip-kd": 1.0, "clip-kd-feat": 1.5, "single-topk": 0.5, "mcad": 2.0}


def _fake_metrics(preset: str, seed: int) -> dict[str, float]:
    rng = np.random.default_rng(seed)  # the seed's own "difficulty", shared by every preset: a paired design
    base = rng.normal(10.0, 3.0, size=6)
    noise = np.random.default_rng(1000 * seed + len(preset)).normal(0.0, 0.2, size=6)
    values = base + GAIN[preset] / 6 + noise
    out = dict(zip(METRIC_KEYS[:-1], values.tolist(), strict=True))
    out["rsum"] = float(values.sum())
    return out


class FakeRun:
    def __init__(self, fail_at: int | None = None):
        self.calls: list[tuple[str, int]] = []
        self.fail_at = fail_at

    def __call__(self, spec: RunSpec) -> dict[str, float]:
        if self.fail_at is not None and len(self.calls) == self.fail_at:
            raise RuntimeError("killed")
        self.calls.append((spec.preset, spec.seed))
        assert spec.run_dir.is_dir()
        (spec.run_dir / "student.txt").write_text(spec.preset)
        return {**_fake_metrics(spec.preset, spec.seed), "final_logit_scale": 20.0}


def test_resume_reuses_finished_runs_and_more_seeds_adds_only_new(tmp_path):
    context = {"caches": ["a", "b"], "steps": 10}
    first = FakeRun()
    plan2 = StudyPlan(seeds=(0, 1))
    res2 = run_study(plan2, first, out=tmp_path, context=context)
    assert len(first.calls) == 10 and not any(r.reused for r in res2)
    assert first.calls[:5] == [(p, 0) for p in plan2.presets]  # seed by seed: complete pairs first

    second = FakeRun()
    res3 = run_study(StudyPlan(seeds=(0, 1, 2)), second, out=tmp_path, context=context)
    assert second.calls == [(p, 2) for p in plan2.presets]
    reused = {(r.preset, r.seed): r for r in res3 if r.reused}
    assert len(reused) == 10
    for r in res2:
        assert reused[(r.preset, r.seed)].metrics == pytest.approx(r.metrics)
        assert reused[(r.preset, r.seed)].wall_s == pytest.approx(r.wall_s)
    assert res3[0].extra == {"final_logit_scale": 20.0}


def test_interrupted_study_resumes_after_last_finished_run(tmp_path):
    context = {"steps": 10}
    with pytest.raises(RuntimeError, match="killed"):
        run_study(StudyPlan(seeds=(0, 1)), FakeRun(fail_at=7), out=tmp_path, context=context)
    again = FakeRun()
    results = run_study(StudyPlan(seeds=(0, 1)), again, out=tmp_path, context=context)
    assert len(again.calls) == 3 and sum(r.reused for r in results) == 7


def test_other_context_is_refused_with_a_diff(tmp_path):
    run_study(StudyPlan(seeds=(0,)), FakeRun(), out=tmp_path, context={"steps": 10})
    with pytest.raises(StudyMismatchError, match="steps"):
        run_study(StudyPlan(seeds=(0,)), FakeRun(), out=tmp_path, context={"steps": 20})


def test_plan_validation():
    from mcad_cache.errors import ConfigError

    with pytest.raises(ConfigError, match="target"):
        StudyPlan(presets=("contrastive", "clip-kd"))
    with pytest.raises(ConfigError, match="duplicate"):
        StudyPlan(seeds=(0, 0))


def test_run_function_must_return_every_metric(tmp_path):
    with pytest.raises(ValueError, match="rsum"):
        run_study(StudyPlan(seeds=(0,)), lambda spec: {"i2t_R@1": 1.0}, out=tmp_path, context={})


# ---- summary and report -----------------------------------------------------------------------------------------


def test_summary_and_report(tmp_path):
    plan = StudyPlan(seeds=tuple(range(6)))
    results = run_study(plan, FakeRun(), out=tmp_path, context={})
    summary = summarise_study(plan, results)
    comps = {c["b"]: c for c in summary["comparisons"]}
    assert set(comps) == {"contrastive", "clip-kd", "clip-kd-feat", "single-topk"}
    m = [_fake_metrics("mcad", s)["rsum"] for s in range(6)]
    c = [_fake_metrics("contrastive", s)["rsum"] for s in range(6)]
    assert comps["contrastive"]["mean_delta"] == pytest.approx(np.mean(np.subtract(m, c)))
    assert summary["presets"]["mcad"]["metrics"]["rsum"]["mean"] == pytest.approx(np.mean(m))
    assert summary["presets"]["mcad"]["metrics"]["rsum"]["std"] == pytest.approx(np.std(m, ddof=1))
    # Holm over the 4 comparisons, against statsmodels' own call on the raw p-values
    from statsmodels.stats.multitest import multipletests

    raw = [x["wilcoxon_p"] for x in summary["comparisons"]]
    assert [x["wilcoxon_p_holm"] for x in summary["comparisons"]] == pytest.approx(multipletests(raw, method="holm")[1])
    # best single-teacher preset by mean RSUM: clip-kd-feat has the largest built-in gain
    assert summary["best_single"] == "clip-kd-feat"
    assert summary["headline"][0].startswith("mcad vs contrastive: Δ RSUM = +")
    assert "best single-teacher" in summary["headline"][1] and "clip-kd-feat" in summary["headline"][1]
    assert summary["mde"]["observed"] == pytest.approx(comps["contrastive"]["mde"])

    paths = write_study(tmp_path / "report", summary)
    md = (tmp_path / "report" / "study.md").read_text()
    assert md.splitlines()[2] == f"- {summary['headline'][0]}"
    assert json.loads((tmp_path / "report" / "study.json").read_text())["best_single"] == "clip-kd-feat"
    for key in ("forest", "paired"):
        assert (tmp_path / "report" / paths[key].rsplit("/", 1)[-1]).read_bytes()[:4] == b"\x89PNG"


def test_mde_sentence_says_what_would_reach_the_target(tmp_path):
    plan = StudyPlan(presets=("contrastive", "mcad"), seeds=(0, 1, 2), single_teacher=())
    results = run_study(plan, FakeRun(), out=tmp_path, context={})
    summary = summarise_study(plan, results, target_mde=0.01)
    assert not summary["mde"]["met"]
    assert f"about {summary['mde']['seeds_needed']} paired seeds" in study_markdown(summary)
    assert summary["headline"][1] == "mcad vs a single-teacher preset: none in this study"


# ---- the study pipeline on tiny shards and real (fake-teacher) caches ------------------------------------------


@pytest.fixture(scope="module")
def tiny_study_data(tmp_path_factory):
    import fake_teacher  # noqa: F401  (registers the "fake" teacher)
    from distill_fixtures import make_shards

    from mcad_cache.config import BuildConfig
    from mcad_cache.pipelines import build_cache

    root = tmp_path_factory.mktemp("study_data")
    train = make_shards(root / "train", num_samples=12, per_shard=6)
    test = make_shards(root / "test", num_samples=6, per_shard=6, prefix="t")
    caches = []
    for name, extra in (("clip", {}), ("albef", {"model": "single", "emb_dtype": "fp32"})):
        out = root / f"{name}.zarr"
        build_cache.run(
            BuildConfig(teacher="fake", data=tuple(train), out=str(out), k=4, batch_size=6, workers=0, device="cpu",
                        **extra)
        )  # fmt: skip
        caches.append(str(out))
    return {"train": train, "test": test, "caches": caches}


def _study_config(data, out, **kw):
    from mcad_cache.pipelines.study import StudyConfig

    base = dict(
        cache=tuple(data["caches"]), data=tuple(data["train"]), test=tuple(data["test"]), out=str(out),
        presets=("contrastive", "clip-kd", "mcad-online"), seeds=2, single_teacher=("clip-kd",), target="mcad-online",
        student="tiny", k=3,
        batch_size=4, steps=2, warmup_steps=1, workers=0, shuffle_buffer=5, log_every=1, device="cpu",
    )  # fmt: skip
    base.update(kw)
    return StudyConfig(**base)


def test_same_seed_same_init_and_batch_keys_in_every_preset(tiny_study_data, tmp_path):
    """Pairing: the library factory gives one seed the same student init and the same batch keys (and anchor
    captions) whatever the preset; another seed changes them."""
    from mcad_cache.distill import create_distill
    from mcad_cache.pipelines.study import distill_config

    def keys_and_init(preset, seed):
        d = create_distill(distill_config(_study_config(tiny_study_data, tmp_path), preset=preset, seed=seed, out="x"))
        batches = []
        for epoch in range(2):
            for raw in d.stream(epoch):
                batch, keys, _ = d.prepare(raw, len(batches) + 1)
                if batch is not None:
                    anchors = batch.texts[: len(keys)]  # DistillBatch: the B anchor captions come first
                    batches.append((keys, anchors, float(batch.images.double().sum())))
        return batches, {k: v.clone() for k, v in d.model.state_dict().items()}

    ref_batches, ref_init = keys_and_init("contrastive", 0)
    assert len(ref_batches) >= 4
    for preset in ("clip-kd", "single-topk", "mcad-online"):
        batches, init = keys_and_init(preset, 0)
        assert batches == ref_batches, preset
        assert init.keys() == ref_init.keys() and all(torch.equal(init[k], ref_init[k]) for k in init), preset
    other_batches, other_init = keys_and_init("mcad-online", 1)
    assert other_batches != ref_batches
    assert not all(torch.equal(other_init[k], ref_init[k]) for k in other_init)


def test_study_pipeline_runs_reports_and_resumes(tiny_study_data, tmp_path):
    from mcad_cache.pipelines import study

    summary = study.run(_study_config(tiny_study_data, tmp_path / "s"))
    assert len(summary["runs"]) == 6 and not any(r["reused"] for r in summary["runs"])
    run_dir = tmp_path / "s" / "runs" / "mcad-online" / "seed-1"
    saved = json.loads((run_dir / "eval.json").read_text())
    assert saved["metrics"]["rsum"] == pytest.approx(
        summary["presets"]["mcad-online"]["metrics"]["rsum"]["by_seed"]["1"]
    )
    assert saved["protocol"]["num_images"] == 6
    assert (run_dir / "final" / "student_config.json").is_file()
    md = (tmp_path / "s" / "study.md").read_text()
    assert md.splitlines()[2].startswith("- mcad-online vs contrastive: Δ RSUM = ")

    more = study.run(_study_config(tiny_study_data, tmp_path / "s", seeds=3))
    assert [(r["preset"], r["seed"]) for r in more["runs"] if not r["reused"]] == [
        ("contrastive", 2), ("clip-kd", 2), ("mcad-online", 2)
    ]  # fmt: skip
    with pytest.raises(StudyMismatchError, match="steps"):
        study.run(_study_config(tiny_study_data, tmp_path / "s", steps=3))


def test_cli_study(tiny_study_data, tmp_path):
    from typer.testing import CliRunner

    from mcad_cache.cli.main import app

    common = ["--data", tiny_study_data["train"][0], "--data", tiny_study_data["train"][1]]
    common += ["--test", tiny_study_data["test"][0], "--out", str(tmp_path / "s")]
    common += [a for c in tiny_study_data["caches"] for a in ("--cache", c)]
    res = CliRunner().invoke(app, ["study", *common, "--seeds", "0"])
    assert res.exit_code == 1 and "--seeds must be >= 1" in res.output and "Traceback" not in res.output
    args = ["--preset", "contrastive", "--preset", "mcad-online", "--target", "mcad-online", "--seeds", "2"]
    args += ["--student", "tiny", "--k", "3"]
    args += ["--batch-size", "4", "--steps", "1", "--warmup-steps", "1", "--workers", "0", "--device", "cpu"]
    res = CliRunner().invoke(app, ["study", *common, *args])
    assert res.exit_code == 0, res.output
    assert "mcad-online vs contrastive: Δ RSUM = " in res.output
    assert "mcad-online vs a single-teacher preset: none in this study" in res.output


# ---- frozen-tower students (the demo's fast study path) ---------------------------------------------------------


def test_frozen_tower_step_equals_the_image_path(tiny_study_data, tmp_path):
    """Slow reference vs fast path: on the same batch (same keys, same step generator), the loss terms of the real
    student on decoded images equal those of its projections on the precomputed tower outputs."""
    from mcad_cache.distill import create_distill
    from mcad_cache.pipelines.study import distill_config
    from mcad_cache.study.frozen import FrozenTowerStudent, encode_frozen

    cfg = distill_config(_study_config(tiny_study_data, tmp_path), preset="mcad-online", seed=0, out="x")
    d = create_distill(cfg)
    d.model.eval()
    table = encode_frozen(d.model, tiny_study_data["train"])
    raw = next(iter(d.stream(0)))
    slow = d.forward(d.model, d.loss_module, d.join(raw, 1))
    student = FrozenTowerStudent(d.model, table)
    from mcad_cache.distill import TargetJoiner

    fast_run = d.__class__(
        **{
            **d.__dict__,
            "model": student,
            "joiner": TargetJoiner(
                clip=d.clip, single=d.single, loss_config=d.loss_config, k=cfg.k, candidate_images=table.images,
                tokenize=student.tokenize,
            ),
        }
    )  # fmt: skip
    feature_batch = {"key": raw["key"], "captions": raw["captions"], "image": table.images(raw["key"]), "skipped": []}
    fast = fast_run.forward(student, d.loss_module, fast_run.join(feature_batch, 1))
    assert set(fast) == set(slow) and len(slow) > 3
    for name in slow:
        assert float(fast[name].detach()) == pytest.approx(float(slow[name].detach()), rel=1e-4, abs=1e-5), name


def test_train_frozen_trains_only_the_projections(tiny_study_data, tmp_path):
    from mcad_cache.pipelines.study import distill_config
    from mcad_cache.student import create_student
    from mcad_cache.study.frozen import FeatureStream, encode_frozen, evaluate_frozen, train_frozen

    cfg = distill_config(_study_config(tiny_study_data, tmp_path, steps=3), preset="mcad-online", seed=0, out="x")
    torch.manual_seed(0)
    ref = create_student("tiny")
    table = encode_frozen(ref, tiny_study_data["train"])
    test = encode_frozen(ref, tiny_study_data["test"])
    lines = []
    model, student, state = train_frozen(cfg, train=table, val=test, on_log=lines.append)
    assert state.step == 3 and [x["step"] for x in lines] == [1, 2, 3] and all("val_rsum" in x for x in lines)
    after = model.state_dict()
    for name, value in ref.state_dict().items():
        changed = not torch.equal(value, after[name])
        assert changed == (name.startswith(("image_proj", "text_proj")) or name == "log_logit_scale"), name
    # the saved student is a real DualEncoder: its image path gives the same test recall as the table
    from mcad_cache.eval import encode_retrieval_set, evaluate_dual
    from mcad_cache.pipelines.study import TestSet

    batches = TestSet(tiny_study_data["test"], batch_size=4, workers=0).batches(model.preprocess_cfg)
    assert evaluate_dual(encode_retrieval_set(model, batches))["metrics"] == pytest.approx(evaluate_frozen(model, test))
    # the stream's order depends on the seed only
    a, b = FeatureStream(table, batch_size=4, seed=0), FeatureStream(table, batch_size=4, seed=1)
    assert [x["key"] for x in a(0)] == [x["key"] for x in FeatureStream(table, batch_size=4, seed=0)(0)]
    assert [x["key"] for x in a(0)] != [x["key"] for x in b(0)]


def test_study_pipeline_frozen_towers(tiny_study_data, tmp_path, monkeypatch):
    from mcad_cache.pipelines import study

    cfg = _study_config(tiny_study_data, tmp_path / "s", frozen_towers=True, val=tuple(tiny_study_data["test"]))
    summary = study.run(cfg)
    assert len(summary["runs"]) == 6 and (tmp_path / "s" / "tables" / "data.pt").is_file()
    lines = [json.loads(x) for x in (tmp_path / "s" / "runs" / "clip-kd" / "seed-0" / "metrics.jsonl").open()]
    assert [x["step"] for x in lines] == [1, 2] and all(math.isfinite(x["val_rsum"]) for x in lines)
    # the saved student, run on the test images, gives the recall recorded for the run
    from mcad_cache.eval import encode_retrieval_set, evaluate_dual
    from mcad_cache.student import DualEncoder

    model = DualEncoder.load(tmp_path / "s" / "runs" / "clip-kd" / "seed-0" / "final").eval()
    batches = study.TestSet(tiny_study_data["test"], batch_size=4, workers=0).batches(model.preprocess_cfg)
    rsum = evaluate_dual(encode_retrieval_set(model, batches))["metrics"]["rsum"]
    assert rsum == pytest.approx(summary["presets"]["clip-kd"]["metrics"]["rsum"]["by_seed"]["0"], abs=1e-3)
    # tables are reused: a rerun with one more seed encodes nothing
    from mcad_cache.study import frozen

    monkeypatch.setattr(frozen, "encode_frozen", lambda *a, **k: (_ for _ in ()).throw(AssertionError("re-encoded")))
    more = study.run(_study_config(tiny_study_data, tmp_path / "s", frozen_towers=True, seeds=3,
                                   val=tuple(tiny_study_data["test"])))  # fmt: skip
    assert sum(not r["reused"] for r in more["runs"]) == 3


def test_study_context_takes_pipe_shards(tiny_study_data, tmp_path):
    """A ``pipe:`` test shard (webdataset users' spec) is recorded as written; the context used to stat() every
    shard path and crashed with FileNotFoundError (a traceback) on a stream spec."""
    from mcad_cache.pipelines.study import study_context

    test = tiny_study_data["test"]
    cfg = _study_config(tiny_study_data, tmp_path, test=tuple(f"pipe:cat {p}" for p in test))
    context = study_context(cfg)
    assert context["shards"]["test"] == [(f"pipe:cat {p}", None) for p in test]
    assert [s for s, _ in context["shards"]["data"]] == list(tiny_study_data["train"])
    assert all(size and size > 0 for _, size in context["shards"]["data"])


def test_parallel_jobs_give_the_serial_results(tiny_study_data, tmp_path):
    """``jobs=2`` (spawned workers, tables loaded from disk in each) gives every run the serial run's metrics: runs
    depend on their seed alone, whichever process runs them."""
    from mcad_cache.pipelines import study

    kw = dict(frozen_towers=True, val=tuple(tiny_study_data["test"]), threads=1)
    serial = study.run(_study_config(tiny_study_data, tmp_path / "serial", **kw))
    parallel = study.run(_study_config(tiny_study_data, tmp_path / "parallel", jobs=2, **kw))
    assert [(r["preset"], r["seed"]) for r in parallel["runs"]] == [(r["preset"], r["seed"]) for r in serial["runs"]]
    for a, b in zip(serial["runs"], parallel["runs"], strict=True):
        assert b["metrics"] == pytest.approx(a["metrics"], abs=1e-6), (a["preset"], a["seed"])
    with pytest.raises(ConfigError, match="--jobs must be >= 1"):
        study.run(_study_config(tiny_study_data, tmp_path / "zero", jobs=0, **kw))


def _fail_on_seed_one(spec: RunSpec) -> dict[str, float]:
    if spec.seed == 1:
        raise DataError("decode_error", shard="s.tar", key="k1")
    return _fake_metrics(spec.preset, spec.seed)


def test_parallel_worker_error_reaches_the_caller_whole(tmp_path):
    """An error in a worker process is raised here with its fields (DataError pickles with shard and key); the runs
    that finished stay recorded."""
    with pytest.raises(DataError) as err:
        run_study(StudyPlan(seeds=(0, 1)), _fail_on_seed_one, out=tmp_path, context={"x": 1}, jobs=2)
    assert (err.value.reason, err.value.shard, err.value.key) == ("decode_error", "s.tar", "k1")
    assert str(err.value) == "shard 's.tar', key 'k1': decode_error"
    assert (tmp_path / "runs" / "contrastive" / "seed-0" / "result.json").is_file()
