"""The one factory that wires a distillation run: caches, student, loss module, join, stream, optimiser, schedule.

``pipelines.distill``, the benchmarks and the tests all call :func:`create_distill`, so there is one wiring.

Plug-in points (issue 10/11): the **candidate source** is ``DistillRun.candidates`` (``distill.forward``: online
encoding, ``--candidates online``; or ``distill.bank``: a bank of student embeddings, ``--candidates bank``, wired
by :func:`create_bank_candidates`); **fixed derived targets** replace the ``TargetJoiner`` built in
:func:`create_distill` (``DistillRun.joiner``) by one that fills the same ``TeacherTargets`` fields from a derived
cache, with ``LossConfig.required_inputs()`` naming the fields.
"""

from __future__ import annotations

import dataclasses
import functools
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from mcad_cache.cache import CacheReader
from mcad_cache.config import DistillConfig, config_to_dict
from mcad_cache.data.decode import DecodePolicy
from mcad_cache.data.index import ShardIndex
from mcad_cache.data.transforms import make_image_transform
from mcad_cache.data.webdataset import SkipReport, expand_shards
from mcad_cache.distill.bank import (
    CANDIDATE_MODES,
    BankCandidates,
    CandidateBank,
    ItemEncoder,
    NoCandidateImages,
    attach_candidate_rows,
)
from mcad_cache.distill.batch import DistillBatch
from mcad_cache.distill.ddp import create_ddp_step, in_batch_gather
from mcad_cache.distill.forward import ONLINE_CANDIDATES, CandidateSource, distill_forward
from mcad_cache.distill.join import CandidateImages, TargetJoiner, check_student_view, open_caches
from mcad_cache.distill.optim import create_optimizer
from mcad_cache.distill.step import step_generator
from mcad_cache.distill.stream import EpochStream
from mcad_cache.distill.views import attach_views
from mcad_cache.errors import CacheSchemaError, ConfigError
from mcad_cache.losses import PRESETS, LossConfig, MCADLoss, preset
from mcad_cache.runtime import available_cores, resolve_cpu_budget, resolve_device, resolve_precision
from mcad_cache.schedules import create_warmup_cosine
from mcad_cache.student import DualEncoder, create_student


def create_loss_module(
    loss_config: LossConfig, *, model: DualEncoder, clip: CacheReader | None, single: CacheReader | None
) -> MCADLoss:
    """``MCADLoss`` sized for ``model`` and the caches (CLIP embedding width, fused [CLS] width), on the model's
    device.

    Raises:
        ValueError: a dimension the config needs is missing (e.g. no CLIP cache for feature alignment).
    """
    return MCADLoss(
        loss_config,
        student_dim=model.embed_dim,
        student_image_feat_dim=model.image_feat_dim,
        student_text_feat_dim=model.text_feat_dim,
        clip_dim=clip.layout.emb_dim if clip is not None else None,
        fused_dim=(single.layout.fused_dim or None) if single is not None else None,
    ).to(next(model.parameters()).device)


@dataclass
class DistillRun:
    """Every component of one distillation run, wired. Attributes are the components; methods are the glue the
    training loop takes (``prepare``, ``forward``)."""

    config: DistillConfig  # the run's config, k resolved (resolve_k)
    loss_config: LossConfig
    resolved: dict[str, Any]  # config_to_dict(config) + the resolved LossConfig: what config.json holds
    shards: list[str]
    index: ShardIndex | None  # candidate images by key (--candidates online only; the bank reads no pixels)
    clip: CacheReader | None
    single: CacheReader | None
    device: torch.device
    model: DualEncoder
    loss_module: MCADLoss
    joiner: TargetJoiner
    stream: EpochStream
    report: SkipReport
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    num_samples: int
    steps_per_epoch: int
    total_steps: int
    rank: int = 0
    world_size: int = 1
    candidates: CandidateSource = field(default=ONLINE_CANDIDATES)
    bank: BankCandidates | None = None  # the candidate source when it is a bank (--candidates bank)
    threads: int = 1  # torch intra-op threads this run set (resolved from --threads and the core count)
    workers: int = 0  # DataLoader decode processes (resolved from --workers and the core count)

    @property
    def stateful(self) -> dict[str, BankCandidates]:
        """Run state saved with each checkpoint beside the weights (``checkpoint.save_checkpoint(stateful=)``)."""
        return {"candidates": self.bank} if self.bank is not None else {}

    def join(self, raw: dict[str, Any], step: int) -> DistillBatch:
        """Join one collated stream batch with the caches, with the generator of optimiser step ``step``."""
        batch = self.joiner(raw, generator=step_generator(self.config.seed, step))
        if self.bank is not None:
            attach_candidate_rows(batch, self.joiner.cand, k=self.config.k)
        return batch

    def prepare(self, raw: dict[str, Any], step: int) -> tuple[DistillBatch | None, list[str], int]:
        """``train_loop``'s ``prepare``: a partial batch is skipped (None), else the joined batch."""
        if len(raw["key"]) < self.config.batch_size:
            return None, [], 0
        batch = self.join(raw, step)
        return batch, batch.keys, batch.num_pairs

    def forward(self, model: nn.Module, loss_module: nn.Module | None, batch: DistillBatch) -> dict[str, Tensor]:
        """``train_step``'s ``forward`` on one process: ``distill_forward`` with this run's candidate source."""
        assert loss_module is not None
        return distill_forward(model, loss_module, batch, candidates=self.candidates)

    def trained_module(self) -> tuple[nn.Module, nn.Module | None, Callable[..., dict[str, Tensor]]]:
        """``(module, loss module or None, forward)`` for ``train_loop``: the student and loss module as they are on
        one process; under DDP one ``DistributedDataParallel(DistillStep)`` (one gradient all-reduce for both; global
        in-batch positives with ``--in-batch global``, ``distill.ddp``)."""
        if self.world_size <= 1:
            return self.model, self.loss_module, self.forward
        from mcad_cache.distill.forward import wrapped_forward

        ddp = create_ddp_step(
            self.model, self.loss_module, candidates=self.candidates, global_in_batch=self.loss_module.gather
        )
        return ddp, None, wrapped_forward


def _check_config(config: DistillConfig, loss_config: LossConfig) -> None:
    if config.batch_size < 2:
        raise ConfigError(f"--batch-size must be >= 2 (in-batch contrastive terms), got {config.batch_size}")
    if config.candidates not in CANDIDATE_MODES:
        raise ConfigError(f"--candidates {config.candidates!r} is unknown; use {' | '.join(CANDIDATE_MODES)}")
    if config.bank_text not in ("bank", "online"):
        raise ConfigError(f"--bank-text {config.bank_text!r} is unknown; use bank | online")
    if not 0.0 <= config.bank_ema < 1.0:
        raise ConfigError(f"--bank-ema must be in [0, 1) (0 = no EMA copy), got {config.bank_ema}")
    if config.bank_refresh_every < 0:
        raise ConfigError(f"--bank-refresh-every must be >= 0 (0 = never), got {config.bank_refresh_every}")
    if config.k < 0:
        raise ConfigError(f"--k must be >= 0 (0 = the caches' k), got {config.k}")


def resolve_k(config: DistillConfig, readers: list[Any]) -> DistillConfig:
    """``config`` with ``k = 0`` replaced by the smallest k of ``readers`` (the run's caches), so ``config.json``
    and the summary record the k the run used. An explicit k is kept (``TargetJoiner`` refuses one above a cache's
    k); with no cache, k stays 0 (no top-k term reads candidates)."""
    if config.k > 0 or not readers:
        return config
    return dataclasses.replace(config, k=min(int(r.k) for r in readers))


def check_batch_fits(num_samples: int, *, batch_size: int, world_size: int) -> None:
    """Refuse a batch (times the ranks) larger than the training data: partial batches are dropped, so no step
    could run (``RuntimeError`` deep in the loop before; issue 13). ``num_samples``: the samples in the run's shards
    (a sample that fails to decode is still counted: the loop then stops with its own error).

    Raises:
        ConfigError: one line naming ``--batch-size``, the sample count and the largest batch that fits.
    """
    if num_samples >= batch_size * world_size:
        return
    fits = num_samples // world_size
    ranks = f" x {world_size} ranks" if world_size > 1 else ""
    fix = f"use --batch-size {fits} or less" if fits >= 2 else "use more training samples or fewer ranks"
    raise ConfigError(
        f"--batch-size {batch_size}{ranks} is larger than the {num_samples} training samples: a partial batch is "
        f"dropped, so no step can run; {fix}"
    )


def cpu_budget(config: DistillConfig, *, device: torch.device, world_size: int) -> tuple[int, int]:
    """``(torch threads, DataLoader workers)`` for this process: ``runtime.resolve_cpu_budget`` over this rank's share
    of the cores (ranks on one machine: ``world_size`` on a CPU, at most one per visible GPU on CUDA). Auto threads
    never exceed torch's current setting, which a launcher's ``OMP_NUM_THREADS`` (torchrun sets 1) or a test's
    ``torch.set_num_threads`` already lowered."""
    local_ranks = min(world_size, max(1, torch.cuda.device_count())) if device.type == "cuda" else world_size
    cores = max(1, available_cores() // max(1, local_ranks))
    threads, workers = resolve_cpu_budget(threads=config.threads, workers=config.workers, device=device, cores=cores)
    if config.threads <= 0:
        threads = max(1, min(threads, torch.get_num_threads()))
    return threads, workers


def create_bank_candidates(
    config: DistillConfig,
    *,
    model: DualEncoder,
    reader: CacheReader,
    shards: list[str],
    transform: Callable[[Any], Tensor],
    policy: DecodePolicy,
    tokenize: Callable[[list[str]], dict[str, Tensor]],
    workers: int,
    world_size: int,
) -> BankCandidates:
    """The ``--candidates bank`` source: a bank over ``reader``'s rows (the candidate cache), filled by the student.

    Under DDP (``world_size > 1``) every rank gathers all ranks' anchors into its bank (the banks stay equal).
    """
    bank = CandidateBank(
        num_images=reader.num_images, num_texts=reader.num_texts, dim=model.embed_dim,
        device=next(model.parameters()).device,
    )  # fmt: skip
    encoder = ItemEncoder(
        reader, shards=shards, transform=transform, policy=policy, tokenize=tokenize,
        batch_size=max(64, config.batch_size), workers=workers, precision=config.precision,
    )  # fmt: skip
    return BankCandidates(
        bank, model=model, encoder=encoder, text_online=config.bank_text == "online", ema=config.bank_ema,
        refresh_every=config.bank_refresh_every, gather=world_size > 1,
    )  # fmt: skip


def create_distill(
    config: DistillConfig,
    *,
    rank: int = 0,
    world_size: int = 1,
    wrap_candidate_images: Callable[[CandidateImages], Callable[[list[str]], Tensor]] | None = None,
) -> DistillRun:
    """Wire a distillation run from ``config`` (no run directory is touched; ``pipelines.distill`` owns that).

    Seeds ``torch`` and ``random`` with ``config.seed`` before the student is created (same init on every rank),
    then, under DDP, with ``seed + 1000 * rank`` (own dropout stream per rank).

    Args:
        config: the run's settings.
        rank, world_size: this process's rank and the number of ranks (1 = no DDP).
        wrap_candidate_images: optional wrapper around the ``CandidateImages`` fetcher (benchmarks time it).
    Returns:
        The :class:`DistillRun`; its ``config`` is ``config`` with ``k = 0`` resolved to the caches' k
        (:func:`resolve_k`).
    Raises:
        ConfigError: unknown preset, bad ``--loss`` field, batch size < 2 or larger than the data, a precision the
            device cannot run, too few shards for the ranks and workers, no training step, a student whose image view
            differs from the teachers' without ``allow_view_mismatch``.
        CacheSchemaError: a preset that needs a cache kind that is not given, k above a cache's k.
        CacheNotFoundError / CacheIncompleteError / CacheMismatchError / CacheKeyError: missing, partial or foreign
            caches (readable diff, named keys).
        DeviceError: a device that is not available.
    """
    if config.preset not in PRESETS:
        raise ConfigError(f"--preset {config.preset!r} is unknown; known: {', '.join(PRESETS)}")
    if not isinstance(config.loss, dict):
        raise ConfigError(
            f"--loss must be a JSON object of LossConfig fields, e.g. '{{\"w_feat\": 0.5}}'; got {config.loss!r}"
        )
    try:
        loss_config = preset(config.preset, **config.loss)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"--loss: {err}") from err
    _check_config(config, loss_config)
    shards = expand_shards(config.data)
    device = resolve_device(config.device)
    threads, workers = cpu_budget(config, device=device, world_size=world_size)
    torch.set_num_threads(threads)
    try:
        resolve_precision(config.precision, device)
    except ValueError as err:
        raise ConfigError(f"--precision: {err}") from err
    if world_size > 1 and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())  # the launcher set this rank's GPU

    bank_mode = config.candidates == "bank"
    reads_images = "topk_image_emb" in loss_config.required_inputs()["student"]  # candidate images by key
    index = None if bank_mode else ShardIndex(shards, keys_only=not reads_images)  # tar offsets (online only)
    policy = DecodePolicy()
    report = SkipReport()
    stream = EpochStream(  # the student's transform is set once the student exists
        shards, transform=_no_transform, policy=policy, batch_size=config.batch_size, workers=workers,
        seed=config.seed, shuffle_buffer=config.shuffle_buffer, report=report, rank=rank, world_size=world_size,
    )  # fmt: skip
    keys = index if index is not None else stream.keys
    check_batch_fits(len(keys), batch_size=config.batch_size, world_size=world_size)  # before any cache or model
    clip, single = open_caches(config.cache, shards=shards, index=keys)
    if loss_config.required_inputs()["teacher"] and clip is None:
        raise CacheSchemaError(f"preset {config.preset!r} needs a dual-stream (CLIP) cache: pass --cache")
    if loss_config.uses_single_stream and loss_config.w_topk_i2t + loss_config.w_topk_t2i > 0 and single is None:
        raise CacheSchemaError(
            f"preset {config.preset!r} (integration {loss_config.integration!r}) needs a single-stream (ALBEF/BLIP) "
            "cache: pass a second --cache, or use --preset clip-kd / clip-kd-feat / contrastive"
        )
    config = resolve_k(config, [r for r in (clip, single) if r is not None])
    resolved = config_to_dict(config) | {"loss_config": dataclasses.asdict(loss_config)}

    torch.manual_seed(config.seed)
    random.seed(config.seed)
    model = create_student(config.student, image=config.student_image, text=config.student_text).to(device)
    view_mismatch = check_student_view(  # issue 10: KD targets describe the teachers' view of the image
        (clip, single), model.preprocess_cfg, allow_mismatch=config.allow_view_mismatch
    )
    if view_mismatch:
        resolved["view_mismatch"] = view_mismatch  # recorded in config.json and summary.json
    loss_module = create_loss_module(loss_config, model=model, clip=clip, single=single)
    loss_module.gather = in_batch_gather(config.in_batch, world_size=world_size)  # DDP: in-batch terms over all ranks
    if world_size > 1:
        torch.manual_seed(config.seed + 1_000 * rank)  # same init on every rank, own dropout stream per rank
    transform = make_image_transform(model.preprocess_cfg)
    tokenize = functools.partial(model.tokenize, padding="longest")  # dynamic padding: pad to the batch's longest
    candidate_images: Any = (
        NoCandidateImages()
        if index is None
        else CandidateImages(index, transform=transform, policy=policy, threads=max(1, workers))
    )
    if wrap_candidate_images is not None:
        candidate_images = wrap_candidate_images(candidate_images)
    joiner = TargetJoiner(
        clip=clip, single=single, loss_config=loss_config, k=config.k, candidate_images=candidate_images,
        tokenize=tokenize,
    )  # fmt: skip
    stream.dataset.image_transform = transform
    resolved |= attach_views(config, stream=stream, joiner=joiner, clip=clip)  # issue 16: replay stored views
    bank = None
    if bank_mode and joiner.directions:
        bank = create_bank_candidates(
            config, model=model, reader=joiner.cand, shards=shards, transform=transform, policy=policy,
            tokenize=tokenize, workers=workers, world_size=world_size,
        )  # fmt: skip
    num_samples = int(clip.image_valid.sum()) if clip is not None else len(keys)
    steps_per_epoch = num_samples // (config.batch_size * world_size)
    total_steps = config.steps if config.steps > 0 else config.epochs * steps_per_epoch
    if total_steps < 1:
        raise ConfigError(
            f"no training step: --steps {config.steps}, --epochs {config.epochs}, {steps_per_epoch} step(s) per epoch "
            f"({num_samples} cached samples, batch {config.batch_size} x {world_size} rank(s)); set --steps >= 1"
        )
    optimizer = create_optimizer([model, loss_module], lr=config.lr, weight_decay=config.weight_decay)
    scheduler = create_warmup_cosine(
        optimizer, warmup_steps=min(config.warmup_steps, total_steps), total_steps=total_steps
    )
    return DistillRun(
        config=config, loss_config=loss_config, resolved=resolved, shards=shards, index=index, clip=clip,
        single=single, device=device, model=model, loss_module=loss_module, joiner=joiner, stream=stream,
        report=report, optimizer=optimizer, scheduler=scheduler, num_samples=num_samples,
        steps_per_epoch=steps_per_epoch, total_steps=total_steps, rank=rank, world_size=world_size,
        candidates=bank if bank is not None else ONLINE_CANDIDATES, bank=bank, threads=threads, workers=workers,
    )  # fmt: skip


def _no_transform(image: Any) -> Any:
    """Placeholder transform of the stream until the student (and so its preprocessing) exists."""
    return image


__all__ = [
    "DistillRun",
    "check_batch_fits",
    "cpu_budget",
    "create_bank_candidates",
    "create_distill",
    "create_loss_module",
    "resolve_k",
]
