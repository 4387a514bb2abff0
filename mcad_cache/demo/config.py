"""The demo app's run configs: ``DemoConfig`` (``mcad-cache demo run``) and ``TeachersConfig`` (``mcad-cache demo
teachers``). Loaded with ``mcad_cache.config.load_config`` like every other run config."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mcad_cache.constants import DEFAULT_K


@dataclass(frozen=True)
class TeachersConfig:
    train: tuple[str, ...] = (".work/shards/train",)  # training shards (paths, globs, or a folder of shard-*.tar)
    val: tuple[str, ...] = (".work/shards/val",)  # validation shards: recall in the report, choice of dual mode
    out: str = ".work/teachers"  # writes clip/ and albef/ (+ teachers.json); reused when the fingerprint matches
    max_train_images: int = 2000  # first N usable training images (0 = all)
    max_val_images: int = 500  # first N usable validation images (0 = all)
    image_size_px: int = 160  # square input of both teachers (EfficientNet-Lite0 feature map 5x5 at 160)
    embed_dim: int = 256  # ITC embedding width D of both teachers
    dual_mode: str = "auto"  # auto (the best val RSUM of the measured candidates) | bridge | tuned | bridge+tuned
    prompt_template: str = "a picture of a {}."  # ImageNet class prompt of the zero-shot bridge
    dual_steps: int = 400  # contrastive steps of the dual-stream projections (cached features)
    dual_batch_size: int = 256  # pairs per dual-stream step
    dual_lr: float = 1e-3  # peak AdamW learning rate of the dual-stream projections
    albef_steps: int = 300  # ITC + ITM steps of the single-stream teacher (cached tower outputs)
    albef_batch_size: int = 64  # pairs per single-stream step (ITM adds 2 hard negatives per pair)
    albef_lr: float = 1e-3  # peak AdamW learning rate of the freshly initialised single-stream parts
    albef_lr_pretrained: float = 1e-4  # peak learning rate of the fusion layers' MiniLM-initialised weights
    albef_easy_fraction: float = 0.5  # first fraction of steps with uniform ITM negatives, then ALBEF's hard ones
    fusion_layers: int = 1  # ALBEF fusion layers after MiniLM's 6 text layers (initialised from its last ones)
    context_length: int = 16  # tokenizer length of both teachers ([CLS] and [SEP] included; ~99% of captions fit)
    k_test: int = 16  # val ITM re-ranking depth of the single-stream teacher
    batch_size: int = 64  # image batch of the feature pass
    workers: int = 1  # DataLoader worker processes that decode images
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    seed: int = 0  # seeds heads init, batches, hard-negative draws
    force: bool = False  # retrain even when teachers with the same fingerprint exist


@dataclass(frozen=True)
class DemoConfig:
    work: str = ".work/demo"  # folder for shards, teachers, caches, study, eval results and report.md
    openclipart_root: str = ".work/openclipart"  # extracted Debian packages (fetched with apt-get when absent)
    max_samples: int = 0  # 0 = all 8,071 usable openclipart images: test 1,108 (needs no cache), val 397, rest train
    samples_per_shard: int = 500  # samples per shard tar
    image_size_px: int = 256  # longest side of the re-encoded images in the shards
    train_images: int = 500  # first N train images (whole shards) the caches and students use (0 = all 6,566)
    k: int = DEFAULT_K  # top-k candidates cached in both caches (MCAD default 11)
    distill_k: int = DEFAULT_K  # k' <= k candidates the students use (frozen towers: a candidate costs a table row)
    k_test: int = 8  # teachers' test eval: ALBEF's ITM-only re-rank of its ITC top-k_test (ITM pairs ~ k_test)
    build_batch_size: int = 64  # teacher batch size in build and eval; image batch of the frozen-tower pass
    fused_dtype: str = "fp16"  # fused-feature storage in the single-stream cache
    student: str = ""  # student config name / JSON; "" = packaged pretrained towers at the teachers' view (below)
    student_text_layers: int = 2  # "" student: first N of all-MiniLM-L6-v2's 6 layers (the teachers use 6 + fusion)
    teachers: dict[str, Any] = field(default_factory=dict)  # TeachersConfig overrides (demo.prepare_teachers)
    integration: str = "modified-features"  # `integrate` formulation of the derived targets (MCAD's own: modified
    # features; logit-fusion | mixture | none are the other documented ones)
    integrate_steps: int = 600  # max steps of the integration module (early-stopped on a held-out 10 %)
    presets: tuple[str, ...] = ("contrastive", "clip-kd", "clip-kd-feat", "single-topk", "mcad")  # issue 12's core 5
    target: str = "mcad"  # the MCAD preset compared with the others (mcad: fixed targets from the derived cache)
    seeds: int = 10  # paired seeds per preset (same init and batch order in every preset); issue 12: >= 10
    steps: int = 200  # optimiser steps per student (frozen towers: only the projections and logit scale train)
    batch_size: int = 64  # pairs per step
    lr: float = 2e-3  # peak AdamW learning rate (linear projections from random init)
    warmup_steps: int = 20  # linear warmup steps
    log_every: int = 25  # steps between metrics.jsonl lines; each line has the val RSUM (the val curve)
    workers: int = 2  # DataLoader worker processes
    seed: int = 0  # one seed for data split and teachers (students: the study's paired seeds)
    jobs: int = 2  # processes at a time: the study's runs (`study --jobs`); > 1 also runs the teacher evals (step 6)
    # in a background process beside steps 4, 5 and 7 (one process kept one of 2 cores busy: CPU s ~ wall s)
    threads: int = 1  # torch CPU threads of every step (0 = torch's default; 1 beside 2 decode workers: on 2 cores the
    # backbone measured 0.040 CPU-s per image at 1 thread, 0.058 at 2, under load; docs/demo.md)
    loss: dict[str, Any] = field(default_factory=dict)  # LossConfig overrides for every preset


QUICK: dict[str, Any] = {  # `mcad-cache demo run --quick`: the whole flow at test size (tests/test_demo.py)
    "max_samples": 160,
    "samples_per_shard": 40,
    "image_size_px": 64,
    "train_images": 80,
    "k": 3,
    "distill_k": 3,
    "k_test": 3,
    "build_batch_size": 16,
    "integrate_steps": 20,
    "seeds": 3,
    "steps": 4,
    "batch_size": 8,
    "warmup_steps": 1,
    "log_every": 2,
    "workers": 0,
    "teachers": {
        "max_train_images": 48,
        "max_val_images": 8,
        "image_size_px": 64,
        "dual_steps": 5,
        "dual_batch_size": 16,
        "albef_steps": 3,
        "albef_batch_size": 8,
        "k_test": 3,
        "batch_size": 16,
        "workers": 0,
    },
}
