"""``StudyConfig``: the run config of ``mcad-cache study`` (loaded with ``mcad_cache.config.load_config``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mcad_cache.constants import DEFAULT_K
from mcad_cache.losses import preset as loss_preset
from mcad_cache.study.runner import CORE_PRESETS, SINGLE_TEACHER_PRESETS


@dataclass(frozen=True)
class StudyConfig:
    cache: tuple[str, ...] = ()  # teacher caches shared by every run (one dual-stream, optionally one single-stream)
    targets: str = ""  # derived cache (`mcad-cache integrate`) read instead of `cache` by fixed-target presets (mcad)
    data: tuple[str, ...] = ()  # training shards (the data the caches were built on)
    test: tuple[str, ...] = ()  # test shards every run is evaluated on (no cache needed)
    out: str = ".work/study"  # study folder: context.json, runs/<preset>/seed-<s>/, study.json, study.md, plots
    presets: tuple[str, ...] = CORE_PRESETS  # loss presets, each trained once per seed (issue 12's five core ones)
    seeds: int = 10  # paired seeds 0 .. seeds-1 (same init and batch order in every preset); more = only new runs
    target: str = "mcad"  # the preset compared against every other one
    baseline: str = "contrastive"  # the no-teacher preset of the first headline line
    single_teacher: tuple[str, ...] = SINGLE_TEACHER_PRESETS  # the best of these (mean RSUM) is the second line
    target_mde: float = 3.0  # RSUM points the study should detect at 80 % power (issue 12); the report says if not
    student: str = "mobilevitv2_tinybert"  # student config name (student/configs/*.json) or a JSON path
    k: int = DEFAULT_K  # k' <= cached k candidates used by the top-k distillation
    batch_size: int = 32  # image-caption pairs per step
    steps: int = 100  # optimiser steps per run
    lr: float = 1e-4  # peak AdamW learning rate
    weight_decay: float = 0.05  # AdamW weight decay
    warmup_steps: int = 10  # linear warmup steps before the cosine decay
    grad_clip: float = 1.0  # max global gradient norm (0 = off)
    shuffle_buffer: int = 1000  # WebDataset sample shuffle buffer (0 = off)
    loss: dict[str, Any] = field(default_factory=dict)  # LossConfig overrides for every preset (docs/losses.md)
    frozen_towers: bool = False  # freeze the student's towers: outputs computed once per split, projections train
    val: tuple[str, ...] = ()  # frozen_towers: val shards; each run logs val RSUM (its val curve) in metrics.jsonl
    eval_batch_size: int = 64  # test images per encoding batch
    workers: int = 2  # DataLoader worker processes
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16 | fp16
    threads: int = 0  # torch intra-op CPU threads per run (0 = torch's default; with jobs > 1: cpus // jobs)
    jobs: int = 1  # runs at a time, each in a spawned worker process when > 1 (same results as serial)
    log_every: int = 10  # steps between lines in each run's metrics.jsonl

    def caches_for(self, preset: str) -> tuple[str, ...]:
        """The caches of one run: the derived cache ``targets`` for presets that read fixed targets (``mcad``,
        ``mcad-rank``), the teacher caches ``cache`` for every other preset.

        Raises:
            ValueError: an unknown preset (lists the known ones).
        """
        if self.targets and loss_preset(preset).integration == "derived":
            return (self.targets,)
        return tuple(self.cache)
