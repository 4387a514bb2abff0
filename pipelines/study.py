"""``mcad-cache study``: presets x paired seeds from the same caches, each run evaluated on the test split, then the
paired statistics and the report (``mcad_cache.study``; docs/results.md).

Each run is wired by the library factory ``mcad_cache.distill.create_distill`` (the same wiring as ``distill``), so a
seed fixes the student's initialisation, the shuffle and the per-step anchor captions whatever the preset: the runs
of one seed are paired. A run writes ``runs/<preset>/seed-<s>/`` (``config.json``, ``metrics.jsonl``,
``loss_curves.png``, ``final/`` student, ``eval.json``, ``result.json``). A run is short, so it keeps no intermediate
checkpoints: an interrupted run starts over, finished runs are reused.

The test images are decoded once per study (in the student's own preprocessing) and reused by every run.

A ``presets`` entry is an arm: a preset plus overrides (``mcad_cache.study.arms``: ``clip-kd@views=4``,
``bank=clip-kd@w_topk_i2t=0.5,candidates=bank``); its name is the run folder and its label in the report.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from mcad_cache.cache import open_cache
from mcad_cache.config import DistillConfig, config_to_dict
from mcad_cache.data.transforms import make_image_transform
from mcad_cache.data.webdataset import SampleDataset, collate_samples, expand_shards
from mcad_cache.distill import TrainState, create_distill, train_loop
from mcad_cache.distill import rundir as rd
from mcad_cache.errors import ConfigError
from mcad_cache.eval import encode_retrieval_set, evaluate_dual
from mcad_cache.integrate.derived import is_derived, open_derived
from mcad_cache.progress import ProgressFn, no_progress
from mcad_cache.study import RunSpec, StudyPlan, run_study, summarise_study, write_study
from mcad_cache.study.arms import Arm, arm_config, arm_name, parse_arm, parse_arms
from mcad_cache.study.config import StudyConfig
from mcad_cache.study.frozen import FeatureTable, evaluate_frozen, train_frozen
from mcad_cache.study.tables import frozen_tables, replays_views, stored_views

_logger = logging.getLogger(__name__)

EVAL_FILE = "eval.json"
PREFETCH_BATCHES = 2  # batches joined ahead of the step in a background thread (as in `distill`)


def plan_of(config: StudyConfig) -> StudyPlan:
    """The plan: ``config.presets`` (arms, by name) x seeds ``0 .. config.seeds - 1``.

    Raises:
        ConfigError: ``seeds < 1``, a bad arm (``study.arms.parse_arms``), or the plan's own checks (duplicates,
        target / baseline not among the arms' names).
    """
    if config.seeds < 1:
        raise ConfigError(f"--seeds must be >= 1 (paired seeds 0 .. N-1), got {config.seeds}")
    names = tuple(a.name for a in parse_arms(config.presets))
    return StudyPlan(
        presets=names,
        seeds=tuple(range(config.seeds)),
        target=arm_name(config.target, names),
        baseline=arm_name(config.baseline, names),
        single_teacher=tuple(config.single_teacher),
    )


def distill_config(config: StudyConfig, *, preset: str, seed: int, out: str, arm: Arm | None = None) -> DistillConfig:
    """The ``DistillConfig`` of one run: the study's shared settings plus the arm (``arm``, else the entry ``preset``:
    a preset, or a preset with overrides, ``study.arms``), the paired seed and the folder. Presets that read fixed
    targets get the derived cache (``StudyConfig.caches_for``).

    Raises:
        ConfigError: a bad arm.
    """
    arm = arm if arm is not None else parse_arm(preset)
    base = DistillConfig(
        cache=config.caches_for(arm.preset), data=tuple(config.data), out=out, student=config.student,
        preset="contrastive",
        k=config.k, batch_size=config.batch_size, steps=config.steps, lr=config.lr,
        weight_decay=config.weight_decay, warmup_steps=config.warmup_steps, grad_clip=config.grad_clip,
        workers=config.workers, device=config.device, precision=config.precision, seed=seed,
        shuffle_buffer=config.shuffle_buffer, log_every=config.log_every, resume=False, threads=config.threads,
        loss=dict(config.loss),
    )  # fmt: skip
    return arm_config(base, arm)


def study_context(config: StudyConfig) -> dict[str, Any]:
    """What every run of the study shares: the caches' fingerprints, the shards (names and sizes) and every training
    and evaluation setting that changes results. A study folder refuses runs made with another context."""
    shared = config_to_dict(config)
    plan_only = ("out", "presets", "seeds", "target", "baseline", "single_teacher", "target_mde")
    for name in (*plan_only, "workers", "threads", "jobs"):
        shared.pop(name)  # plan and report choices, or settings that do not change the results
    if not config.frozen_towers:
        shared.pop("val")  # only the frozen path reads it
    size = lambda p: Path(p).stat().st_size if Path(p).is_file() else None  # noqa: E731 (pipe:/URL shards: none)
    shards = {name: [(p, size(p)) for p in expand_shards(getattr(config, name))] for name in ("data", "test")}
    paths = [*config.cache, config.targets] if config.targets else list(config.cache)
    caches = [(open_derived if is_derived(p) else open_cache)(p).fingerprint for p in paths]
    return {"settings": shared, "shards": shards, "caches": caches}


class TestSet:
    """The test shards decoded once, in the students' preprocessing, for every run's evaluation."""

    def __init__(self, shards: list[str], *, batch_size: int, workers: int) -> None:
        self.shards, self.batch_size, self.workers = shards, batch_size, workers
        self._batches: list[dict[str, Any]] | None = None
        self._preprocess: dict[str, Any] | None = None

    def batches(self, preprocess_cfg: dict[str, Any]) -> list[dict[str, Any]]:
        """Collated test batches (``data.collate_samples``) in ``preprocess_cfg``; decoded on the first call."""
        if self._batches is None or self._preprocess != preprocess_cfg:
            ds = SampleDataset(self.shards, image_transform=make_image_transform(preprocess_cfg))
            loader = DataLoader(ds, batch_size=self.batch_size, num_workers=self.workers, collate_fn=collate_samples)
            self._batches, self._preprocess = list(loader), dict(preprocess_cfg)
        return self._batches


def train_and_evaluate(config: DistillConfig, test: TestSet, *, views: int | None = None) -> dict[str, Any]:
    """One study run: train with the library wiring (no intermediate checkpoints), save ``final/``, evaluate on the
    test set. Returns the test metrics (percent) plus ``final_logit_scale``, ``steps`` and ``train_s``.

    Raises:
        ConfigError: ``views`` other than 1 or the cache's V (only the frozen path replays a subset).
        What ``create_distill`` and ``train_loop`` raise (bad config, caches, non-finite loss); DataError: an
        unreadable test sample.
    """
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    run_dir = Path(config.out)
    d = create_distill(config)
    held = d.resolved.get("views", {}).get("num_views")
    if views is not None and views > 1 and views != held:
        raise ConfigError(f"views={views}: the image path replays all {held or 0} stored views; use --frozen-towers")
    rd.reset_metrics(run_dir)
    rd.write_config(run_dir, d.resolved)

    def on_log(values: dict[str, Any]) -> None:
        logit_scale = float(d.model.logit_scale.detach())
        rd.append_metrics(run_dir, {**values, **d.loss_module.diagnostics(), "logit_scale": logit_scale})

    t0 = time.perf_counter()
    state = train_loop(
        d.model, d.loss_module, batches_for_epoch=d.stream, prepare=d.prepare, forward=d.forward,
        optimizer=d.optimizer, scheduler=d.scheduler, state=TrainState(), total_steps=d.total_steps,
        grad_clip=config.grad_clip, precision=config.precision, device=d.device, log_every=config.log_every,
        on_log=on_log, prefetch=PREFETCH_BATCHES,
    )  # fmt: skip
    train_s = time.perf_counter() - t0
    rd.save_final(run_dir, model=d.model, loss_module=d.loss_module)
    rd.plot_curves(run_dir / rd.METRICS_FILE, run_dir / rd.CURVES_FILE)
    model = d.model.eval()
    rs = encode_retrieval_set(model, test.batches(model.preprocess_cfg), precision=config.precision)
    result = evaluate_dual(rs)
    (run_dir / EVAL_FILE).write_text(json.dumps({**result, "model": str(run_dir)}, indent=2) + "\n")
    return {
        **result["metrics"],
        "final_logit_scale": float(model.logit_scale.detach()),
        "steps": state.step,
        "train_s": train_s,
        "num_test_images": result["protocol"]["num_images"],
    }


def train_and_evaluate_frozen(
    config: DistillConfig, tables: dict[str, FeatureTable], *, views: int | None = None
) -> dict[str, Any]:
    """One frozen-tower run (``mcad_cache.study.frozen``): train the projections on the tables, save ``final/``,
    evaluate on the test table (``eval.json``); ``metrics.jsonl`` holds each logged step's ``val_rsum`` when a val
    table exists."""
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    run_dir = Path(config.out)
    rd.reset_metrics(run_dir)
    t0 = time.perf_counter()
    model, student, state = train_frozen(
        config, train=tables["data"], val=tables.get("val"), on_log=lambda line: rd.append_metrics(run_dir, line),
        views=views,
    )  # fmt: skip
    train_s = time.perf_counter() - t0
    rd.save_final(run_dir, model=model, loss_module=torch.nn.Module())
    rd.plot_curves(run_dir / rd.METRICS_FILE, run_dir / rd.CURVES_FILE)
    metrics = evaluate_frozen(student, tables["test"])
    (run_dir / EVAL_FILE).write_text(json.dumps({"metrics": metrics, "model": str(run_dir)}, indent=2) + "\n")
    return {
        **metrics,
        "final_logit_scale": float(student.logit_scale.detach()),
        "steps": state.step,
        "train_s": train_s,
        "num_test_images": len(tables["test"].keys),
    }


_TABLES: dict[str, dict[str, FeatureTable]] = {}  # this process's frozen tables, by study folder
_TEST_SETS: dict[str, TestSet] = {}  # this process's decoded test sets, by study folder


def run_arm(config: StudyConfig, views: bool, spec: RunSpec) -> dict[str, Any]:
    """One study run (``spec``: arm name, seed, folder) with the study's frozen tables or test set: those this
    process already holds, else loaded from ``<out>/tables/`` (frozen towers) or decoded once (a worker process of
    ``--jobs``). In a worker with ``threads=0``, torch gets ``cpus // jobs`` threads so the workers share the cores.

    Raises:
        What ``train_and_evaluate_frozen`` / ``train_and_evaluate`` raise.
    """
    arm = {a.name: a for a in parse_arms(config.presets)}[spec.preset]
    cfg = distill_config(config, preset=spec.preset, seed=spec.seed, out=str(spec.run_dir), arm=arm)
    if config.jobs > 1 and config.threads == 0:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // config.jobs))
    if config.frozen_towers:
        tables = _TABLES.get(config.out)
        if tables is None:
            tables = _TABLES[config.out] = frozen_tables(config, config.out, views=views)
        return train_and_evaluate_frozen(cfg, tables, views=arm.views)
    test = _TEST_SETS.get(config.out)
    if test is None:
        test = _TEST_SETS[config.out] = TestSet(
            expand_shards(config.test), batch_size=config.eval_batch_size, workers=config.workers
        )
    return train_and_evaluate(cfg, test, views=arm.views)


def run(config: StudyConfig, *, progress: ProgressFn = no_progress) -> dict[str, Any]:
    """Run (or resume) the study and write its report; see the module docstring.

    Returns:
        The summary (``mcad_cache.study.summarise_study``) plus ``"report"`` (written paths) and ``"wall_s"``.
    Raises:
        ConfigError: no caches / data / test shards, bad seeds or presets; StudyMismatchError: ``out`` holds runs made
        with other settings; what each run raises (finished runs stay recorded, a rerun resumes).
    """
    for name in ("data", "test"):
        if not getattr(config, name):
            raise ConfigError(f"study: --{name} is required (shards, globs or a folder)")
    if config.jobs < 1:
        raise ConfigError(f"study: --jobs must be >= 1, got {config.jobs}")
    plan = plan_of(config)
    arms = {a.name: a for a in parse_arms(config.presets)}
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config_to_dict(config), indent=2) + "\n")
    t0 = time.perf_counter()
    test = TestSet(expand_shards(config.test), batch_size=config.eval_batch_size, workers=config.workers)

    configs = {name: distill_config(config, preset=name, seed=0, out="", arm=a) for name, a in arms.items()}
    views = config.frozen_towers and replays_views(list(configs.values()), stored_views(config.cache))
    if config.frozen_towers:
        _TABLES[config.out] = frozen_tables(config, out, views=views, progress=progress)
    else:
        _TEST_SETS[config.out] = test
    definitions = {name: arm.definition() for name, arm in arms.items()}
    context = study_context(config)
    run_one = functools.partial(run_arm, config, views)
    results = run_study(
        plan, run_one, out=out, context=context, definitions=definitions, progress=progress, jobs=config.jobs
    )
    summary = summarise_study(plan, results, target_mde=config.target_mde)
    summary["arms"] = definitions
    summary["report"] = write_study(out, summary, title=f"Study: {len(plan.presets)} arms x {config.seeds} seeds")
    summary["wall_s"] = time.perf_counter() - t0
    for line in summary["headline"]:
        _logger.info("%s", line)
    return summary


__all__ = [
    "EVAL_FILE",
    "StudyConfig",
    "TestSet",
    "distill_config",
    "frozen_tables",
    "plan_of",
    "run",
    "run_arm",
    "study_context",
    "train_and_evaluate",
    "train_and_evaluate_frozen",
]
