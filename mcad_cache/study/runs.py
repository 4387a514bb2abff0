"""One study run, as the study's worker calls it: the ``DistillConfig`` of an arm and seed, training through the
library wiring (image path) or on the frozen-tower tables, and the test evaluation (``pipelines.study`` plans the runs
and writes the report; ``study.runner`` schedules them, in worker processes with ``--jobs``).

Each run is wired by the library factory ``mcad_cache.distill.create_distill`` (the same wiring as ``distill``), so a
seed fixes the student's initialisation, the shuffle and the per-step anchor captions whatever the preset. A run
writes ``runs/<preset>/seed-<s>/`` (``config.json``, ``metrics.jsonl``, ``loss_curves.png``, ``final/`` student,
``eval.json``); it keeps no intermediate checkpoints.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from mcad_cache.config import DistillConfig
from mcad_cache.data.transforms import make_image_transform
from mcad_cache.data.webdataset import SampleDataset, collate_samples, expand_shards
from mcad_cache.distill import TrainState, create_distill, train_loop
from mcad_cache.distill import rundir as rd
from mcad_cache.errors import ConfigError
from mcad_cache.eval import encode_retrieval_set, evaluate_dual
from mcad_cache.study.arms import Arm, arm_config, parse_arm, parse_arms
from mcad_cache.study.config import StudyConfig
from mcad_cache.study.frozen import FeatureTable, evaluate_frozen, train_frozen
from mcad_cache.study.runner import RunSpec
from mcad_cache.study.tables import frozen_tables

EVAL_FILE = "eval.json"
PREFETCH_BATCHES = 2  # batches joined ahead of the step in a background thread (as in `distill`)


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


TABLES: dict[str, dict[str, FeatureTable]] = {}  # this process's frozen tables, by study folder
TEST_SETS: dict[str, TestSet] = {}  # this process's decoded test sets, by study folder


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
        tables = TABLES.get(config.out)
        if tables is None:
            tables = TABLES[config.out] = frozen_tables(config, config.out, views=views)
        return train_and_evaluate_frozen(cfg, tables, views=arm.views)
    test = TEST_SETS.get(config.out)
    if test is None:
        test = TEST_SETS[config.out] = TestSet(
            expand_shards(config.test), batch_size=config.eval_batch_size, workers=config.workers
        )
    return train_and_evaluate(cfg, test, views=arm.views)


__all__ = [
    "EVAL_FILE",
    "TestSet",
    "distill_config",
    "run_arm",
    "train_and_evaluate",
    "train_and_evaluate_frozen",
]
