"""``mcad-cache study``: presets x paired seeds from the same caches, each run evaluated on the test split, then the
paired statistics and the report (``mcad_cache.study``; docs/results.md).

Each run (``mcad_cache.study.runs.run_arm``) is wired by the library factory ``create_distill`` (the same wiring as
``distill``), so a seed fixes the student's initialisation, the shuffle and the per-step anchor captions whatever
the preset: the runs of one seed are paired. ``--jobs N`` trains N runs at a time in worker processes. Finished runs
are reused; the test images (or the frozen-tower tables) are made once per study.

A ``presets`` entry is an arm: a preset plus overrides (``mcad_cache.study.arms``: ``clip-kd@views=4``,
``bank=clip-kd@w_topk_i2t=0.5,candidates=bank``); its name is the run folder and its label in the report.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from pathlib import Path
from typing import Any

from mcad_cache.cache import open_cache
from mcad_cache.config import config_to_dict
from mcad_cache.data.webdataset import expand_shards
from mcad_cache.errors import ConfigError
from mcad_cache.integrate.derived import is_derived, open_derived
from mcad_cache.progress import ProgressFn, no_progress
from mcad_cache.study import StudyPlan, run_study, runs, summarise_study, write_study
from mcad_cache.study.arms import arm_name, parse_arms
from mcad_cache.study.config import StudyConfig
from mcad_cache.study.runs import (  # noqa: F401  (re-exported: the pipeline's public names)
    EVAL_FILE,
    TestSet,
    distill_config,
    run_arm,
    train_and_evaluate,
    train_and_evaluate_frozen,
)
from mcad_cache.study.tables import frozen_tables, replays_views, stored_views

_logger = logging.getLogger(__name__)


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
        runs.TABLES[config.out] = frozen_tables(config, out, views=views, progress=progress)
    else:
        runs.TEST_SETS[config.out] = test
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
