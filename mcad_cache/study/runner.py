"""The study plan (presets x paired seeds) and its resumable runner.

A study runs every preset once per seed. A *paired* seed means the same initialisation and the same batch order in
every preset: the runner only hands the seed to the caller's run function, which must use it for both (the library
distill factory does: ``tests/test_study.py`` checks that one seed gives the same batch keys in every preset).

Bookkeeping (our choice, one JSON file per finished run, written atomically)::

    <out>/context.json                          what every run shares (caches, data, student, steps ...) + its sha256
    <out>/runs/<preset>/seed-<seed>/result.json  {"preset", "seed", "context_sha256", "metrics", "wall_s", "finished"}
    <out>/runs/<preset>/seed-<seed>/...          whatever the run function writes (student, eval.json ...)

A run with a ``result.json`` is finished and reused; a rerun with more seeds runs only the new (preset, seed) pairs.
A run without one (never started, or killed) is run again; the run function may resume inside its own folder.
Runs go seed by seed, every preset within a seed, so an interrupted study still holds complete pairs (with
``jobs > 1`` runs are started in that order and finish in any order: at most ``jobs - 1`` pairs are incomplete).

``jobs > 1`` runs that many runs at a time in worker processes (``spawn``, safe with CUDA and OpenMP); the run
function must then be picklable (a module-level function or a ``functools.partial`` of one). Runs are independent
and each depends on its seed alone, so the results equal the serial ones (``tests/test_study.py`` checks it).
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mcad_cache.cache.manifest import fingerprint_diff, to_jsonable, utc_now
from mcad_cache.errors import ConfigError, McadError
from mcad_cache.hashing import json_sha256
from mcad_cache.metrics import METRIC_KEYS
from mcad_cache.progress import ProgressFn, no_progress
from mcad_cache.runtime import init_spawned_logging, logging_levels

_logger = logging.getLogger(__name__)

CORE_PRESETS: tuple[str, ...] = ("contrastive", "clip-kd", "clip-kd-feat", "single-topk", "mcad")  # issue 12
SINGLE_TEACHER_PRESETS: tuple[str, ...] = ("clip-kd", "clip-kd-feat", "single-topk")  # one teacher's targets each
CONTEXT_FILE = "context.json"
RESULT_FILE = "result.json"


class StudyMismatchError(McadError, ValueError):
    """A study folder whose finished runs were made with other caches, data or settings; the message is a diff."""


@dataclass(frozen=True)
class StudyPlan:
    """Which runs a study makes and which comparisons it reports.

    Raises (on construction):
        ConfigError: no preset or seed, a duplicate, or ``target`` / ``baseline`` not among ``presets``.
    """

    presets: tuple[str, ...] = CORE_PRESETS  # loss presets, each trained once per seed
    seeds: tuple[int, ...] = tuple(range(10))  # paired seeds: same init and batch order in every preset
    target: str = "mcad"  # the preset whose gain is measured against every other one
    baseline: str = "contrastive"  # the no-teacher preset of the first headline line
    single_teacher: tuple[str, ...] = SINGLE_TEACHER_PRESETS  # the best of these (mean RSUM) is the second line

    def __post_init__(self) -> None:
        if not self.presets or not self.seeds:
            raise ConfigError(f"study: presets {list(self.presets)} and seeds {list(self.seeds)} must not be empty")
        for name, values in (("presets", self.presets), ("seeds", self.seeds)):
            if len(set(values)) != len(values):
                raise ConfigError(f"study: {name} {list(values)} has a duplicate")
        for name in ("target", "baseline"):
            if getattr(self, name) not in self.presets:
                raise ConfigError(f"study: {name} {getattr(self, name)!r} is not among --presets {list(self.presets)}")

    def runs(self) -> list[tuple[str, int]]:
        """Every (preset, seed) in run order: seed by seed, every preset within a seed."""
        return [(p, s) for s in self.seeds for p in self.presets]

    def single_teacher_present(self) -> tuple[str, ...]:
        """The single-teacher presets this study runs."""
        return tuple(p for p in self.presets if p in self.single_teacher)


@dataclass(frozen=True)
class RunSpec:
    """One run of a study, as handed to the run function."""

    preset: str  # loss preset
    seed: int  # the paired seed: init and batch order must depend on it alone, never on the preset
    run_dir: Path  # folder the run function may write into (its student, eval result, curves)


RunFn = Callable[[RunSpec], Mapping[str, float]]  # one (preset, seed) -> test metrics (METRIC_KEYS, percent)


@dataclass(frozen=True)
class RunResult:
    """A finished run's record (``result.json``)."""

    preset: str
    seed: int
    metrics: dict[str, float]  # test recall in percent: METRIC_KEYS (i2t/t2i R@1/5/10 and rsum)
    wall_s: float  # wall time of the run function, seconds (as measured when it ran, also when reused)
    reused: bool = False  # True when read back from an earlier invocation instead of run now
    extra: dict[str, Any] = field(default_factory=dict)  # anything else the run function returned (non-metric)


def run_dir(out: str | os.PathLike[str], preset: str, seed: int) -> Path:
    """The folder of one run: ``<out>/runs/<preset>/seed-<seed>``."""
    return Path(out) / "runs" / preset / f"seed-{seed}"


def _write_json_atomic(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(value, indent=2, allow_nan=True) + "\n")
    os.replace(tmp, path)


def check_context(out: str | os.PathLike[str], context: Mapping[str, Any]) -> str:
    """Record ``context`` in ``<out>/context.json`` (first call) or check it against the recorded one.

    Args:
        out: the study folder.
        context: JSON-able description of everything the runs share besides preset and seed (caches' fingerprints,
            training data, student, steps, batch size, eval data ...).
    Returns:
        The context's sha256 (``hashing.json_sha256``).
    Raises:
        StudyMismatchError: the folder's finished runs were made with another context; the message is the diff and
            says to use a new ``--out`` (or delete the folder).
    """
    ctx = to_jsonable(dict(context))
    sha = json_sha256(ctx)
    path = Path(out) / CONTEXT_FILE
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("sha256") != sha:
            diff = fingerprint_diff(saved.get("context", {}), ctx)
            raise StudyMismatchError(
                f"study folder {out} holds runs made with other settings ({'; '.join(diff[:5])}"
                f"{'; ...' if len(diff) > 5 else ''}): use a new --out, or delete {out} to start over"
            )
        return sha
    _write_json_atomic(path, {"sha256": sha, "context": ctx, "created": utc_now()})
    return sha


def load_result(
    out: str | os.PathLike[str],
    preset: str,
    seed: int,
    *,
    context_sha256: str,
    definition: Mapping[str, Any] | None = None,
) -> RunResult | None:
    """The finished run's record, or None when it has none (never run, or interrupted before it finished).

    Args:
        definition: the arm's definition (``study.arms.Arm.definition``); a record made with another one is refused.
            A record without one (made before arms existed) counts as the plain preset's.
    Raises:
        StudyMismatchError: the record was made with another context than ``context_sha256``, or another definition
            of the arm ``preset``.
    """
    path = run_dir(out, preset, seed) / RESULT_FILE
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    if saved.get("context_sha256") != context_sha256:
        raise StudyMismatchError(
            f"{path} was made with other settings (context {str(saved.get('context_sha256'))[:12]}, this study "
            f"{context_sha256[:12]}): use a new --out, or delete that run folder to run it again"
        )
    if definition is not None:
        recorded = saved.get("arm", {"preset": preset, "loss": {}, "run": {}, "views": None})
        if to_jsonable(recorded) != to_jsonable(dict(definition)):
            raise StudyMismatchError(
                f"{path} was made by arm {preset!r} defined as {recorded}, now {dict(definition)}: give the arm "
                "another name, or delete that run folder to run it again"
            )
    return RunResult(
        preset=preset,
        seed=seed,
        metrics={k: float(v) for k, v in saved["metrics"].items()},
        wall_s=float(saved["wall_s"]),
        reused=True,
        extra=saved.get("extra", {}),
    )


def _timed_run(run_one: RunFn, spec: RunSpec, clock: Callable[[], float]) -> tuple[dict[str, Any], float]:
    """``run_one(spec)`` and its wall seconds (module level: runs in a worker process when ``jobs > 1``)."""
    t0 = clock()
    returned = dict(run_one(spec))
    return returned, clock() - t0


def _outcomes(
    todo: list[RunSpec], run_one: RunFn, *, jobs: int, clock: Callable[[], float]
) -> Iterator[tuple[RunSpec, dict[str, Any], float]]:
    """``(spec, returned, wall_s)`` of every run in ``todo``: in order in this process (``jobs <= 1``), else as they
    finish in a pool of ``jobs`` spawned processes, started in ``todo`` order, at most ``jobs`` at a time. The first
    failure cancels the runs not started yet and is raised."""
    if jobs <= 1 or len(todo) <= 1:
        for spec in todo:
            yield (spec, *_timed_run(run_one, spec, clock))
        return
    pool = ProcessPoolExecutor(
        max_workers=min(jobs, len(todo)),
        mp_context=multiprocessing.get_context("spawn"),
        initializer=init_spawned_logging,
        initargs=(logging_levels(), "study worker"),
    )
    try:
        queue = list(todo)
        running: dict[Future, RunSpec] = {}
        while queue or running:
            while queue and len(running) < jobs:  # keep `jobs` runs going, in plan order
                spec = queue.pop(0)
                running[pool.submit(_timed_run, run_one, spec, clock)] = spec
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in sorted(done, key=lambda f: todo.index(running[f])):
                spec = running.pop(future)
                yield (spec, *future.result())
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def run_study(
    plan: StudyPlan,
    run_one: RunFn,
    *,
    out: str | os.PathLike[str],
    context: Mapping[str, Any],
    definitions: Mapping[str, Mapping[str, Any]] | None = None,
    progress: ProgressFn = no_progress,
    clock: Callable[[], float] = time.perf_counter,
    jobs: int = 1,
) -> list[RunResult]:
    """Run every (preset, seed) of ``plan`` that has no finished record in ``out``; reuse the others.

    Args:
        plan: presets x seeds.
        run_one: trains and evaluates one run; returns a mapping with at least the METRIC_KEYS (percent). Other
            JSON-able entries are kept in ``RunResult.extra``. It must derive init and batch order from the seed only.
            Picklable when ``jobs > 1``.
        out: the study folder (created).
        context: what every run shares (see ``check_context``).
        definitions: optional arm name -> definition (``study.arms.Arm.definition``), recorded in each
            ``result.json`` and checked when a run is reused (a renamed arm never reuses another's runs).
        progress: the progress convention (``mcad_cache.progress``).
        clock: seconds counter for the wall time of each run (picklable when ``jobs > 1``).
        jobs: runs at a time; above 1 in spawned worker processes (module docstring).
    Returns:
        One ``RunResult`` per run, in ``plan.runs()`` order.
    Raises:
        ConfigError: ``jobs < 1``.
        StudyMismatchError: ``out`` holds runs made with another context, or by another definition of an arm.
        ValueError: ``run_one`` returned no value for a metric key, or a non-finite one.
        Whatever ``run_one`` raises (the finished runs stay recorded; a rerun resumes after them).
    """
    if jobs < 1:
        raise ConfigError(f"study: --jobs must be >= 1, got {jobs}")
    sha = check_context(out, context)
    results: dict[tuple[str, int], RunResult] = {}
    todo: list[RunSpec] = []
    for preset, seed in plan.runs():
        definition = (definitions or {}).get(preset)
        done = load_result(out, preset, seed, context_sha256=sha, definition=definition)
        if done is not None:
            _logger.info("study: %s seed %d finished earlier (rsum %.1f), reused", preset, seed, done.metrics["rsum"])
            results[(preset, seed)] = done
            continue
        folder = run_dir(out, preset, seed)
        folder.mkdir(parents=True, exist_ok=True)
        todo.append(RunSpec(preset=preset, seed=seed, run_dir=folder))
    outcomes = _outcomes(todo, run_one, jobs=jobs, clock=clock)
    for spec, returned, wall_s in progress(outcomes, "study runs", len(todo)):
        preset, seed, definition = spec.preset, spec.seed, (definitions or {}).get(spec.preset)
        missing = [k for k in METRIC_KEYS if k not in returned]
        if missing:
            raise ValueError(f"study run {preset} seed {seed}: the run function returned no {missing}")
        metrics = {k: float(returned.pop(k)) for k in METRIC_KEYS}
        if not all(v == v and abs(v) != float("inf") for v in metrics.values()):
            raise ValueError(f"study run {preset} seed {seed}: non-finite metrics {metrics}")
        extra = to_jsonable({k: v for k, v in returned.items()})
        _write_json_atomic(
            spec.run_dir / RESULT_FILE,
            {
                "preset": preset,
                "seed": seed,
                "context_sha256": sha,
                "metrics": metrics,
                "wall_s": wall_s,
                "extra": extra,
                **({"arm": to_jsonable(dict(definition))} if definition is not None else {}),
                "finished": utc_now(),
            },
        )
        _logger.info("study: %s seed %d rsum %.1f in %.1f s", preset, seed, metrics["rsum"], wall_s)
        results[(preset, seed)] = RunResult(preset=preset, seed=seed, metrics=metrics, wall_s=wall_s, extra=extra)
    return [results[run] for run in plan.runs()]
