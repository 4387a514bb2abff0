"""``mcad-cache distill``: train a student from cached teacher targets (docs/distill.md).

The run directory (``config.out``) holds::

    config.json         resolved DistillConfig (+ the resolved LossConfig under "loss_config")
    metrics.jsonl       one JSON line per logged step: losses, lr, grad norm, throughput
    loss_curves.png     loss terms against step (matplotlib, Agg backend)
    checkpoints/step_N/ resumable checkpoints (model + loss module in safetensors, optimizer/scheduler/RNG/data state)
    final/              the student (model.safetensors, student_config.json, tokenizer/) + loss.safetensors
    summary.json        steps, samples, time, final losses, caches used, skip counts

Running the same command again resumes from the last checkpoint (``resume=True``) and reaches the same weights and
metrics as an uninterrupted run; a changed config is refused.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn
from torch.utils.data import DataLoader

from mcad_cache.cache import open_cache
from mcad_cache.config import DistillConfig, config_to_dict
from mcad_cache.data.decode import DecodePolicy
from mcad_cache.data.index import ShardIndex
from mcad_cache.data.transforms import make_image_transform
from mcad_cache.data.webdataset import SampleDataset, SkipReport, collate_samples, expand_shards
from mcad_cache.errors import CacheMismatchError, CacheSchemaError, CheckpointError
from mcad_cache.losses import PRESETS, MCADLoss, preset
from mcad_cache.progress import no_progress
from mcad_cache.student import create_student
from mcad_cache.targets import CandidateImages, TargetJoiner, distill_forward
from mcad_cache.teachers.base import resolve_device
from mcad_cache.train import (
    TrainState,
    checkpoint_path,
    create_optimizer,
    create_scheduler,
    latest_checkpoint,
    load_checkpoint,
    rank_state,
    save_checkpoint,
    step_generator,
    train_loop,
)

_logger = logging.getLogger(__name__)
T = TypeVar("T")

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "loss_curves.png"
SUMMARY_FILE = "summary.json"
FINAL_DIR = "final"
# Fields that may change between a run and its resumption without changing what is trained.
PREFETCH_BATCHES = 2  # batches joined (cache reads, candidate images) ahead of the step, in a background thread
RESUME_FREE_FIELDS = ("resume", "workers", "log_every", "checkpoint_every", "device", "threads")


# ------------------------------------------------------------------------------------------------- data stream
class EpochStream:
    """Deterministic batches of usable samples for one epoch: WebDataset shards through a DataLoader, a seeded
    sample shuffle buffer in the main process, batches of exactly ``batch_size`` (a final partial batch is dropped,
    so every in-batch loss sees the same B). Skipped samples are counted in ``report``, never trained on.

    The order depends on (seed, epoch, shards, worker count), not on timing, so a resumed run re-reads the same
    batches.
    """

    def __init__(
        self,
        shards: list[str],
        *,
        transform: Callable[[Any], torch.Tensor],
        policy: DecodePolicy,
        batch_size: int,
        workers: int,
        seed: int,
        shuffle_buffer: int,
        report: SkipReport,
    ) -> None:
        self.dataset = SampleDataset(shards, image_transform=transform, policy=policy)
        self.batch_size, self.workers, self.seed = batch_size, workers, seed
        self.shuffle_buffer = shuffle_buffer
        self.report = report

    def __call__(self, epoch: int) -> Iterator[dict[str, Any]]:
        loader = DataLoader(
            self.dataset,
            batch_size=None,
            num_workers=self.workers,
            generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch),
        )
        rng = random.Random(self.seed * 7919 + epoch)
        buffer: list[dict[str, Any]] = []
        batch: list[dict[str, Any]] = []

        def emit(item: dict[str, Any]) -> Iterator[dict[str, Any]]:
            batch.append(item)
            if len(batch) == self.batch_size:
                out = collate_samples(batch)
                batch.clear()
                yield out

        for sample in loader:
            self.report.add(sample)
            if sample["skip"] is not None:
                continue
            if self.shuffle_buffer <= 1:
                yield from emit(sample)
                continue
            buffer.append(sample)
            if len(buffer) >= self.shuffle_buffer:
                i = rng.randrange(len(buffer))
                buffer[i], buffer[-1] = buffer[-1], buffer[i]
                yield from emit(buffer.pop())
        while buffer:
            i = rng.randrange(len(buffer))
            buffer[i], buffer[-1] = buffer[-1], buffer[i]
            yield from emit(buffer.pop())


# ------------------------------------------------------------------------------------------------- caches
def open_caches(
    paths: Iterable[str], *, shards: list[str], index: ShardIndex | None = None
) -> tuple[Any | None, Any | None]:
    """Open and check the run's caches: at most one dual-stream and one single-stream, complete, built on the run's
    shards (per-shard sha256 when the cache records it, and the sample keys).

    Returns:
        (clip reader or None, single-stream reader or None).
    Raises:
        CacheNotFoundError, CacheSchemaError, CacheIncompleteError, CacheMismatchError.
    """
    clip = single = None
    for path in paths:
        reader = open_cache(path).require(complete=True)
        check_cache_data(reader, shards, index=index)
        if reader.kind == "dual":
            if clip is not None:
                raise CacheSchemaError(f"two dual-stream caches given ({clip.path}, {reader.path}); pass one")
            clip = reader
        else:
            if single is not None:
                raise CacheSchemaError(f"two single-stream caches given ({single.path}, {reader.path}); pass one")
            single = reader
    if single is not None and clip is None:
        raise CacheSchemaError(f"{single.path} is single-stream; distillation also needs a dual-stream (CLIP) cache")
    return clip, single


def _shard_records(fingerprint: dict[str, Any]) -> list[dict[str, Any]] | None:
    data = fingerprint.get("data")
    if not isinstance(data, dict):
        return None
    shards = data.get("shards")
    if isinstance(shards, list) and shards and all(isinstance(s, dict) for s in shards):
        return shards
    return None


def check_cache_data(reader: Any, shards: list[str], *, index: ShardIndex | None = None) -> None:
    """Refuse a cache built on other data than ``shards``: per-shard sha256 (when the cache records shard records
    ``{"name", "sha256"}``) and the sample keys (every cached key must be in the run's shards).

    Raises:
        CacheMismatchError: a readable diff of shards (name, sha256) or the missing keys.
    """
    from mcad_cache.cache.manifest import file_sha256

    records = _shard_records(reader.fingerprint)
    if records is not None:
        want = {Path(s).name: s for s in shards}
        have = {str(r.get("name", "")): r for r in records}
        lines = []
        for name in sorted(set(want) | set(have)):
            if name not in have:
                lines.append(f"shard {name}: in the run's data, not in the cache")
            elif name not in want:
                lines.append(f"shard {name}: in the cache, not in the run's data")
            elif have[name].get("sha256") and file_sha256(want[name]) != have[name]["sha256"]:
                lines.append(f"shard {name}: sha256 differs (the file changed since the cache was built)")
        if lines:
            raise CacheMismatchError(f"{reader.path}: the cache was built on other data:\n  " + "\n  ".join(lines))
    index = index if index is not None else ShardIndex(shards)
    missing = [str(k) for k in reader.image_keys.tolist() if str(k) not in index]
    if missing:
        raise CacheMismatchError(
            f"{reader.path}: {len(missing)} cached sample key(s) are not in the run's shards, e.g. {missing[:5]}; "
            "the cache was built on other data"
        )


# ------------------------------------------------------------------------------------------------- run dir
def _check_resume_config(run_dir: Path, resolved: dict[str, Any]) -> None:
    saved_path = run_dir / CONFIG_FILE
    if not saved_path.is_file():
        return
    saved = json.loads(saved_path.read_text())
    diff = [
        f"{k}: run dir has {saved.get(k)!r}, now {resolved.get(k)!r}"
        for k in sorted(set(saved) | set(resolved))
        if k not in RESUME_FREE_FIELDS and saved.get(k) != resolved.get(k)
    ]
    if diff:
        raise CheckpointError(
            f"{run_dir} holds a run with another config; use a new --out or the same settings:\n  " + "\n  ".join(diff)
        )


def _truncate_metrics(path: Path, step: int) -> None:
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in keep))


def plot_curves(metrics_path: Path, out_path: Path) -> Path | None:
    """Plot every ``*_loss`` and ``loss`` from metrics.jsonl against step into a PNG (matplotlib Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    if not rows:
        return None
    names = sorted({k for r in rows for k in r if k == "loss" or k.endswith("_loss")})
    fig, (ax, ax_lr) = plt.subplots(2, 1, figsize=(8, 7), sharex=True, height_ratios=(3, 1))
    steps = [r["step"] for r in rows]
    for name in names:
        ax.plot(steps, [r.get(name, float("nan")) for r in rows], label=name, lw=2.0 if name == "loss" else 1.0)
    ax.set_ylabel("loss (weighted)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    ax_lr.plot(steps, [r.get("lr", float("nan")) for r in rows], color="k")
    ax_lr.set_ylabel("lr")
    ax_lr.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path


# ------------------------------------------------------------------------------------------------- run
def run(config: DistillConfig, *, progress: Callable[..., Iterable[Any]] = no_progress) -> dict[str, Any]:
    """Distil a student from the caches in ``config.cache`` on ``config.data``; see the module docstring.

    Returns:
        The summary dict (also written to ``summary.json``).
    Raises:
        ValueError: bad config values (unknown preset, batch size < 2, no data).
        CacheSchemaError: k above a cache's k, a preset that needs a single-stream cache without one, caches of
            the wrong kinds.
        CacheIncompleteError / CacheMismatchError / CacheKeyError: stale, partial or foreign caches (readable
            diff, named keys).
        CheckpointError: resuming a run directory written with another config.
        NonFiniteError: a NaN/inf loss (names the step and the batch's keys).
    """
    if config.preset not in PRESETS:
        raise ValueError(f"unknown preset {config.preset!r}; known: {', '.join(PRESETS)}")
    if config.batch_size < 2:
        raise ValueError(f"batch_size must be >= 2 (in-batch contrastive terms), got {config.batch_size}")
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    loss_config = preset(config.preset, **dict(config.loss))
    shards = expand_shards(config.data)
    run_dir = Path(config.out)
    device = resolve_device(config.device)
    rank, world = _dist_info()
    is_main = rank == 0
    if world > 1 and len(shards) < world * max(1, config.workers):
        raise ValueError(
            f"{len(shards)} shard(s) for {world} ranks x {max(1, config.workers)} workers: every reader needs at least "
            "one shard (a rank without data would leave the others waiting in the gradient all-reduce)"
        )
    if world > 1 and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())  # the launcher set this rank's GPU
    resolved = config_to_dict(config) | {"loss_config": dataclasses.asdict(loss_config)}

    index = ShardIndex(shards)  # tar headers read once: key checks and candidate images
    clip, single = open_caches(config.cache, shards=shards, index=index)
    needs_teacher = bool(loss_config.required_inputs()["teacher"])
    if needs_teacher and clip is None:
        raise CacheSchemaError(f"preset {config.preset!r} needs a dual-stream (CLIP) cache: pass --cache")
    if loss_config.uses_single_stream and loss_config.w_topk_i2t + loss_config.w_topk_t2i > 0 and single is None:
        raise CacheSchemaError(
            f"preset {config.preset!r} (integration {loss_config.integration!r}) needs a single-stream (ALBEF/BLIP) "
            "cache: pass a second --cache, or use --preset clip-kd / clip-kd-feat / contrastive"
        )

    torch.manual_seed(config.seed)
    random.seed(config.seed)
    model = create_student(config.student).to(device)
    loss_module = MCADLoss(
        loss_config,
        student_dim=model.embed_dim,
        student_image_feat_dim=model.image_feat_dim,
        student_text_feat_dim=model.text_feat_dim,
        clip_dim=clip.layout.emb_dim if clip is not None else None,
        fused_dim=(single.layout.fused_dim or None) if single is not None else None,
    ).to(device)
    if world > 1:
        torch.manual_seed(config.seed + 1_000 * rank)  # same init on every rank, own dropout stream per rank
    transform = make_image_transform(model.preprocess_cfg)
    policy = DecodePolicy()
    joiner = TargetJoiner(
        clip=clip,
        single=single,
        loss_config=loss_config,
        k=config.k,
        candidate_images=CandidateImages(index, transform=transform, policy=policy, threads=max(1, config.workers)),
        tokenize=model.tokenize,
    )
    report = SkipReport()
    stream = EpochStream(
        shards,
        transform=transform,
        policy=policy,
        batch_size=config.batch_size,
        workers=config.workers,
        seed=config.seed,
        shuffle_buffer=config.shuffle_buffer,
        report=report,
    )
    num_samples = int(clip.image_valid.sum()) if clip is not None else len(index)
    steps_per_epoch = num_samples // (config.batch_size * world)
    total_steps = config.steps if config.steps > 0 else config.epochs * steps_per_epoch
    if total_steps < 1:
        raise ValueError(
            f"no training step: {num_samples} samples make {steps_per_epoch} batch(es) of {config.batch_size}; "
            "lower --batch-size or set --steps"
        )
    optimizer = create_optimizer([model, loss_module], lr=config.lr, weight_decay=config.weight_decay)
    scheduler = create_scheduler(optimizer, warmup_steps=min(config.warmup_steps, total_steps), total_steps=total_steps)

    run_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = run_dir / METRICS_FILE
    state, rng_state = TrainState(), None
    latest = latest_checkpoint(run_dir) if config.resume else None
    if latest is not None:
        _check_resume_config(run_dir, resolved)
        state, rng_state, _ = load_checkpoint(
            latest, model=model, loss_module=loss_module, optimizer=optimizer, scheduler=scheduler,
            map_location=device, rank=rank, world_size=world,
        )  # fmt: skip
        if is_main:
            _truncate_metrics(metrics_path, state.step)
        _logger.info(
            "resuming %s at step %d (epoch %d, batch %d)", run_dir, state.step, state.epoch, state.batch_in_epoch
        )
    elif is_main:
        metrics_path.write_text("")
    if world > 1:  # every rank has read the run dir before rank 0 rewrites config.json
        torch.distributed.barrier()
    if is_main:
        (run_dir / CONFIG_FILE).write_text(json.dumps(resolved, indent=2) + "\n")
    _logger.info(
        "distill: preset %s, %d steps (%d per epoch), batch %d x %d rank(s), k %d, device %s, student %s (%d params)",
        config.preset, total_steps, steps_per_epoch, config.batch_size, world, config.k, device, config.student,
        model.num_params()["total"],
    )  # fmt: skip

    def prepare(raw: dict[str, Any], step: int) -> tuple[Any, list[str], int]:
        if len(raw["key"]) < config.batch_size:
            return None, [], 0
        batch = joiner(raw, generator=step_generator(config.seed, step))
        return batch, batch.keys, batch.num_pairs

    last: dict[str, Any] = {}

    def on_log(values: dict[str, Any]) -> None:
        values = {**values, **loss_module.diagnostics(), "logit_scale": float(model.logit_scale.detach())}
        last.update(values)
        if is_main:  # rank 0's own batch losses
            with metrics_path.open("a") as f:
                f.write(json.dumps(values) + "\n")

    def on_checkpoint(st: TrainState) -> None:
        states = [rank_state(st)]
        if world > 1:  # every rank's data position and RNG go into rank 0's checkpoint
            states = [None] * world
            torch.distributed.all_gather_object(states, rank_state(st))
        if is_main:
            save_checkpoint(
                checkpoint_path(run_dir, st.step), model=model, loss_module=loss_module, optimizer=optimizer,
                scheduler=scheduler, state=st, rank_states=states if world > 1 else None,
            )  # fmt: skip
            _prune_checkpoints(run_dir, keep=2)
        if world > 1:
            torch.distributed.barrier()

    trained: nn.Module = model
    forward: Callable[..., Any] = distill_forward
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        # Student and loss module (feature heads, integration module) in one DDP module: one gradient all-reduce.
        trained = DistributedDataParallel(_DistillStep(model, loss_module), find_unused_parameters=True)
        forward = _ddp_forward

    t0 = time.perf_counter()
    start_step = state.step
    state = train_loop(
        trained, None if world > 1 else loss_module, batches_for_epoch=stream, prepare=prepare, forward=forward,
        optimizer=optimizer, scheduler=scheduler, state=state, total_steps=total_steps, rng_state=rng_state,
        grad_clip=config.grad_clip, precision=config.precision, device=device, log_every=config.log_every,
        checkpoint_every=config.checkpoint_every, on_log=on_log, on_checkpoint=on_checkpoint,
        progress=progress if is_main else None, prefetch=PREFETCH_BATCHES,
    )  # fmt: skip
    elapsed = time.perf_counter() - t0
    just_saved = config.checkpoint_every > 0 and state.step % config.checkpoint_every == 0 and state.step > start_step
    if not just_saved and (state.step > start_step or latest is None):
        on_checkpoint(state)
    in_sync = _replicas_in_sync(model, loss_module) if world > 1 else True
    if not is_main:
        return {"run_dir": str(run_dir), "rank": rank, "steps": state.step, "replicas_in_sync": in_sync}
    final = run_dir / FINAL_DIR
    model.save(final)
    from safetensors.torch import save_file

    save_file(
        {k: v.detach().contiguous().cpu() for k, v in loss_module.state_dict().items()}, str(final / "loss.safetensors")
    )
    curves = plot_curves(metrics_path, run_dir / CURVES_FILE)
    summary = {
        "run_dir": str(run_dir),
        "preset": config.preset,
        "student": config.student,
        "num_params": model.num_params(),
        "steps": state.step,
        "steps_this_session": state.step - start_step,
        "epochs_started": state.epoch + 1,
        "samples_seen": state.samples_seen,
        "world_size": world,
        "replicas_in_sync": in_sync,
        "elapsed_s": elapsed,
        "final": {k: v for k, v in last.items() if k.endswith("_loss") or k in ("loss", "lr", "logit_scale")},
        "caches": [
            {"path": str(r.path), "teacher": r.teacher, "kind": r.kind, "k": r.k}
            for r in (clip, single)
            if r is not None
        ],
        "k": config.k,
        "device": str(device),
        "skips": report.to_dict() | {"note": "samples read by this session (skipped-over batches included)"},
        "checkpoint": str(final),
        "loss_curves": str(curves) if curves else None,
    }
    (run_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _dist_info() -> tuple[int, int]:
    """(rank, world size) of an initialised ``torch.distributed`` process group, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class _DistillStep(nn.Module):
    """Student + loss module as one module, so DDP all-reduces both modules' gradients together."""

    def __init__(self, model: nn.Module, loss_module: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.loss_module = loss_module

    def forward(self, batch: Any) -> dict[str, torch.Tensor]:
        return distill_forward(self.model, self.loss_module, batch)


def _ddp_forward(wrapper: nn.Module, loss_module: Any, batch: Any) -> dict[str, torch.Tensor]:
    return wrapper(batch)


@torch.no_grad()
def _replicas_in_sync(model: nn.Module, loss_module: nn.Module) -> bool:
    """Every rank holds the same weights (a float64 checksum of all parameters, gathered)."""
    total = sum(float(p.detach().double().sum()) for m in (model, loss_module) for p in m.parameters())
    sums = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(sums, total)
    if len(set(sums)) != 1:
        _logger.error("replicas diverged: parameter checksums %s", sums)
        return False
    return True


def _prune_checkpoints(run_dir: Path, *, keep: int) -> None:
    import shutil

    root = run_dir / "checkpoints"
    done = sorted(
        (p for p in root.glob("step_*") if p.is_dir() and p.name[5:].isdigit()), key=lambda p: int(p.name[5:])
    )
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


__all__ = ["EpochStream", "check_cache_data", "open_caches", "plot_curves", "run"]
