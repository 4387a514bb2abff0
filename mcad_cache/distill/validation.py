"""Validation during ``distill``: retrieval recall on ``--val-data`` every ``--eval-every`` steps, the best student
by val RSUM kept beside the last, optional early stopping.

A :class:`Validator` is a step callback of :func:`mcad_cache.distill.loop.train_loop` (``callbacks=``): called with
the :class:`TrainState` after every optimiser step, it returns True to stop training. It never changes training:
the student is encoded under ``torch.no_grad`` in eval mode (train mode restored after), the val stream is read in
order without shuffling, and every RNG (torch CPU/CUDA, Python, numpy) is restored afterwards, so a run with
validation reaches the same weights as one without (tested).

The protocol is ``mcad-cache eval``'s (``eval.encode_retrieval_set`` + ``eval.evaluate_dual``: every caption a
query, pessimistic ties). Results go to ``metrics.jsonl`` as ``{"step", "val_i2t_R@1", ..., "val_rsum"}`` lines,
to the trackers, and the best student to ``RUN/best/`` (``model.safetensors``, ``student_config.json``,
``tokenizer/``, ``val.json``). On resume the best RSUM and the patience count are read back from metrics.jsonl.
Early stopping (our choice of rule, as in Keras' ``EarlyStopping(patience=N)``): stop after ``patience``
validations in a row without a higher val RSUM.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from mcad_cache.data.transforms import make_image_transform
from mcad_cache.data.webdataset import SampleDataset, collate_samples, expand_shards
from mcad_cache.distill import rundir as rd
from mcad_cache.distill.checkpoint import TrainState
from mcad_cache.eval import encode_retrieval_set, evaluate_dual
from mcad_cache.metrics import METRIC_KEYS

_logger = logging.getLogger(__name__)

BEST_DIR = "best"
VAL_FILE = "val.json"
VAL_PREFIX = "val_"


def read_val_history(run_dir: str | Path, *, up_to_step: int) -> list[dict[str, Any]]:
    """The validation lines of ``RUN/metrics.jsonl`` (those with ``val_rsum``) of steps ``<= up_to_step``."""
    path = Path(run_dir) / rd.METRICS_FILE
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if "val_rsum" in r and r["step"] <= up_to_step]


class Validator:
    """Step callback: validate every ``every`` steps (and at ``total_steps``), keep the best, maybe stop.

    Args:
        model: the student (unwrapped: ``encode_image``, ``encode_text``, ``tokenize``, ``preprocess_cfg``,
            ``save``), on its training device.
        shards: val shard patterns (``expand_shards``).
        run_dir: the run directory (metrics.jsonl, ``best/``).
        every: steps between validations (0 = only at ``total_steps``).
        total_steps: the run's last step (always validated).
        patience: early stopping after this many validations without improvement (0 = never).
        batch_size, workers: val DataLoader (order never depends on workers: one stream, no shuffle).
        precision: autocast precision (``runtime.autocast``).
        chunk_size: query rows per similarity chunk.
        log: receives each validation's dict (metrics.jsonl line + trackers); rank 0 only.
        is_main: rank 0 validates and writes; other ranks only take the stop decision (broadcast).
        start_step: the step training resumes from (history of steps <= it is read back).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        shards: Sequence[str],
        run_dir: str | Path,
        every: int,
        total_steps: int,
        patience: int = 0,
        batch_size: int = 64,
        workers: int = 0,
        precision: str = "auto",
        chunk_size: int = 1024,
        log: Callable[[dict[str, Any]], None] | None = None,
        is_main: bool = True,
        start_step: int = 0,
    ) -> None:
        self.model = model
        self.shards = expand_shards(shards)
        self.run_dir = Path(run_dir)
        self.every, self.total_steps, self.patience = every, total_steps, patience
        self.batch_size, self.workers, self.precision, self.chunk_size = batch_size, workers, precision, chunk_size
        self.log, self.is_main = log, is_main
        history = read_val_history(run_dir, up_to_step=start_step) if is_main else []
        self.best: dict[str, Any] | None = None
        self.bad_evals = 0
        for row in history:
            self._update_best(row)
        self.history = history

    def _update_best(self, row: Mapping[str, Any]) -> bool:
        if self.best is None or row["val_rsum"] > self.best["val_rsum"]:
            self.best = dict(row)
            self.bad_evals = 0
            return True
        self.bad_evals += 1
        return False

    def due(self, step: int) -> bool:
        return step == self.total_steps or (self.every > 0 and step % self.every == 0)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Val R@1/5/10 and RSUM (percent) of the current student; RNG states and train/eval mode are restored."""
        model = self.model
        was_training = model.training
        py_state, np_state = random.getstate(), np.random.get_state()
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
        with torch.random.fork_rng(devices=devices):
            model.eval()
            try:
                dataset = SampleDataset(  # every val shard: rank 0 validates alone, even under torchrun
                    self.shards, image_transform=make_image_transform(model.preprocess_cfg), rank=0, world_size=1
                )
                loader = DataLoader(
                    dataset, batch_size=self.batch_size, num_workers=self.workers, collate_fn=collate_samples
                )
                rs = encode_retrieval_set(model, loader, precision=self.precision)
                result = evaluate_dual(rs, chunk_size=self.chunk_size)
            finally:
                model.train(was_training)
        random.setstate(py_state)
        np.random.set_state(np_state)
        return {k: float(result["metrics"][k]) for k in METRIC_KEYS}

    def __call__(self, state: TrainState) -> bool:
        """Validate when due; returns True when early stopping says stop (the same answer on every rank)."""
        if not self.due(state.step):
            return False
        stop = False
        if self.is_main:
            metrics = self.evaluate()
            row = {"step": state.step, **{VAL_PREFIX + k: v for k, v in metrics.items()}}
            improved = self._update_best(row)
            if improved:
                self._save_best(row)
            row["val_best_rsum"] = self.best["val_rsum"] if self.best else row["val_rsum"]
            self.history.append(row)
            if self.log is not None:
                self.log(row)
            stop = self.patience > 0 and self.bad_evals >= self.patience
            _logger.info(
                "step %d: val RSUM %.2f (best %.2f at step %d)%s", state.step, row["val_rsum"],
                self.best["val_rsum"], self.best["step"], "; early stopping" if stop else "",
            )  # fmt: skip
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            flag = [stop]
            torch.distributed.broadcast_object_list(flag, src=0)
            stop = bool(flag[0])
        return stop

    def _save_best(self, row: Mapping[str, Any]) -> None:
        folder = self.run_dir / BEST_DIR
        self.model.save(folder)
        (folder / VAL_FILE).write_text(json.dumps({"step": row["step"], "data": self.shards, **row}, indent=2) + "\n")

    def summary(self) -> dict[str, Any] | None:
        """``{"step", "val_rsum", "metrics", "checkpoint"}`` of the best validation, or None before any."""
        if self.best is None:
            return None
        return {
            "step": self.best["step"],
            "val_rsum": self.best["val_rsum"],
            "metrics": {k: self.best[VAL_PREFIX + k] for k in METRIC_KEYS},
            "checkpoint": str(self.run_dir / BEST_DIR),
            "num_validations": len(self.history),
        }


__all__ = ["BEST_DIR", "VAL_FILE", "Validator", "read_val_history"]
