"""Frozen run configurations and their loader.

Precedence (STYLE.md): dataclass defaults, then a ``--config run.json`` file, then explicit CLI flags. Flags map 1:1
to field names. The resolved config is written to ``config.json`` in each run directory (and into a cache's
attributes for a build).
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from mcad_cache.constants import DEFAULT_K
from mcad_cache.errors import ConfigError
from mcad_cache.preflight import check_input_file

T = TypeVar("T")


@dataclass(frozen=True)
class ImportConfig:
    source: str = "openclipart"  # importer registry name (data.importers.list_importers(); openclipart: the demo)
    out: str = ".work/shards"  # output folder for shards, index.json and the import report
    root: str = ""  # openclipart: extracted Debian packages folder; karpathy: image root; folder: image folder
    annotations: str = ""  # karpathy: dataset_*.json; folder: captions .jsonl or .csv
    samples_per_shard: int = 1000  # samples per output tar
    max_samples: int = 0  # 0 = all; otherwise the first N (deterministic order) for small runs
    image_size_px: int = 256  # re-encode so the longer side is at most this many pixels (0 = keep original bytes)
    seed: int = 0  # deterministic split seed (openclipart)
    workers: int = 2  # processes that decode and re-encode images (1 = in the calling process); output is identical
    max_drop_share: float = 0.5  # fail (exit 1) when more than this share of candidates is dropped (our choice)


@dataclass(frozen=True)
class BuildConfig:
    teacher: str = "clip"  # teacher registry name (mcad_cache.teachers.list_teachers())
    data: tuple[str, ...] = ()  # WebDataset shards (paths, globs or brace patterns)
    out: str = ".work/cache"  # Zarr v3 store to write (resumed if it exists with the same fingerprint)
    model: str = ""  # teacher model: open_clip name or JSON config, ALBEF config JSON, BLIP hub name or path
    pretrained: str = ""  # weights: open_clip tag or file, ALBEF .pth, BLIP folder; "" = random init (tests)
    random_init: bool = False  # allow a teacher without --pretrained weights (recorded as weights_source: random)
    k: int = DEFAULT_K  # top-k candidates per query stored in both directions (students may use k' <= k)
    force_positives: bool = False  # put every ground-truth positive into its query's candidate list
    candidate_source: str = ""  # another cache whose ITC similarities choose the candidates ("" = own ITC)
    batch_size: int = 64  # teacher batch size (images or captions)
    workers: int = 2  # DataLoader worker processes that decode images
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16 | fp16
    fused_dtype: str = "fp16"  # storage of fused [CLS] features: fp16 | int8 (per-vector scale) | none
    emb_dtype: str = "fp16"  # storage of unimodal embeddings: fp16 | fp32
    topk_backend: str = "torch"  # torch (chunked matmul) | faiss (exact inner-product index)
    chunk_size: int = 4096  # query rows per similarity chunk in the global top-k
    rows_per_chunk: int = 1024  # rows per Zarr chunk / commit unit
    strict: bool = False  # stop at the first bad sample instead of skipping and counting it
    threads: int = 0  # torch intra-op CPU threads (0 = torch's default; 1 beside decode workers on a small CPU)
    overwrite: bool = False  # replace a cache at `out` built with another fingerprint (default: refuse with a diff)
    rank: int = 0  # this build process's index among world_size processes writing one cache (disjoint units)
    world_size: int = 1  # number of build processes sharing the work (each launched with its own --rank)
    wait_timeout_s: float = 1800.0  # seconds a rank waits for missing ranks between passes before it fails
    views: int = 1  # V image views stored per image (1 = canonical only; > 1 needs augment; docs/cache-format.md)
    augment: str = ""  # view augmentation spec, e.g. rrc:scale=0.35-1,ratio=0.75-1.3333,flip=0.5;v1 (mcad_cache.views)
    view_seed: int = 0  # seed of the per-view crop / flip draws (with the sample key and view index)
    view_targets: str = "canonical"  # single-stream ITM / fused targets: of the canonical view only (per view: x V)
    token_scratch_gib: float = 8.0  # cap of pass 1's single-stream image-token scratch on disk, GiB (0 = off: pass 3a
    # runs the image tower again); changes speed and disk use only, never the arrays: not in the fingerprint


@dataclass(frozen=True)
class DistillConfig:
    cache: tuple[str, ...] = ()  # teacher caches (one dual-stream, optionally one single-stream)
    data: tuple[str, ...] = ()  # training shards (the same data the caches were built on)
    out: str = ".work/runs/student"  # run directory
    student: str = "mobilevitv2_tinybert"  # student config name (student/configs/*.json) or a JSON path
    student_image: str = ""  # image tower by timm name, weights file or timm folder ("" = the student config's)
    student_text: str = ""  # text tower by transformers name or save_pretrained folder ("" = the student config's)
    preset: str = "mcad"  # mcad | contrastive | clip-kd | clip-kd-feat | single-topk
    k: int = 0  # k' <= cached k candidates used by the top-k distillation (0 = the caches' k, resolved in config.json)
    batch_size: int = 32  # image-caption pairs per step
    steps: int = 0  # optimiser steps; 0 = epochs * steps per epoch
    epochs: int = 1  # passes over the data when steps = 0
    lr: float = 1e-4  # peak AdamW learning rate
    weight_decay: float = 0.05  # AdamW weight decay
    warmup_steps: int = 50  # linear warmup steps before the cosine decay
    grad_clip: float = 1.0  # max global gradient norm (0 = off)
    workers: int = -1  # DataLoader decode processes (-1 = auto from the core count; never changes the sample order)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16 | fp16
    seed: int = 0  # seeds model init, shuffling, caption choice
    shuffle_buffer: int = 1000  # WebDataset sample shuffle buffer (0 = off)
    checkpoint_every: int = 0  # steps between resumable checkpoints (0 = only at the end)
    log_every: int = 10  # steps between metric lines in metrics.jsonl
    resume: bool = True  # resume from the run directory's last checkpoint when present
    threads: int = 0  # torch intra-op CPU threads (0 = auto: the cores the workers leave, runtime.resolve_cpu_budget)
    loss: dict[str, Any] = field(default_factory=dict)  # loss weights and temperatures (docs/losses.md)
    candidates: str = "online"  # top-k candidate embeddings: online (encoded in the step, exact) | bank (distill.md)
    bank_text: str = "bank"  # with --candidates bank: caption candidates from the bank | online (encoded in the step)
    bank_ema: float = 0.0  # momentum of the EMA student that refreshes the bank, in [0, 1) (0 = the live student)
    bank_refresh_every: int = 0  # steps between full re-encodes of the bank (0 = initial fill, then anchors only)
    val_data: tuple[str, ...] = ()  # validation shards: retrieval recall every eval_every steps (() = no validation)
    eval_every: int = 0  # steps between validations (0 = only after the last step); needs val_data
    early_stopping: int = 0  # stop after this many validations without a better val RSUM (0 = never; our choice)
    report_to: str = "none"  # extra tracking beside metrics.jsonl: none | csv | tensorboard | wandb (offline-safe)
    run_name: str = ""  # name in plots and trackers ("" = the run directory's name)
    augment: str = ""  # augmentation the student asks for: "" = replay the cache's stored views (if any), else a spec
    allow_aug_mismatch: bool = False  # train although the cache holds no views of `augment` (warned and recorded)
    allow_view_mismatch: bool = False  # train a student whose resize / crop differs from its teachers (warned, kept)
    in_batch: str = "global"  # under DDP, in-batch ITC/KD over all ranks' samples (global) or each rank's own (rank)


@dataclass(frozen=True)
class EvalConfig:
    model: str = ""  # a run directory / student checkpoint, a cache built on the test shards, or the teacher's model
    teacher: str = ""  # evaluate a teacher: a list_teachers() name (then `model` / `pretrained` are its arguments)
    pretrained: str = ""  # teacher weights (open_clip tag or file, ALBEF .pth, BLIP folder); "" = the teacher's default
    data: tuple[str, ...] = ()  # test shards
    out: str = ""  # results JSON path ("" = <run dir>/eval.json)
    batch_size: int = 64  # encoding batch size
    workers: int = 2  # DataLoader worker processes
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    k_test: int = 16  # single-stream teachers: ITC top-k re-ranked by ITM (clamped to the gallery size)
    itm_score: str = "itm+itc"  # single-stream rank score: itm | itm+itc
    chunk_size: int = 1024  # query rows per similarity chunk
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16 | fp16
    threads: int = 0  # torch intra-op CPU threads (0 = torch's default)


def _coerce(tp: Any, value: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin is tuple and isinstance(value, (list, tuple)):
        return tuple(value)
    if origin is tuple and isinstance(value, str):
        return (value,)
    if origin in (typing.Union, types.UnionType):
        return value
    if tp is float and isinstance(value, int):
        return float(value)
    return value


def load_config(cls: type[T], path: str | Path | None = None, **overrides: Any) -> T:
    """Resolve a config: dataclass defaults, then the JSON file at ``path``, then ``overrides`` (``None`` = unset).

    Raises:
        InputPathError: ``path`` does not exist or is not a readable file (a ``FileNotFoundError``).
        ConfigError: the file is not JSON, or it or the overrides name a field the dataclass does not have, or give
            a value of the wrong type.
    """
    values: dict[str, Any] = {}
    if path:
        text = check_input_file(path, option="--config").read_text()
        try:
            values.update(json.loads(text))
        except json.JSONDecodeError as err:
            raise ConfigError(f"config {path}: not valid JSON: {err}") from err
    values.update({k: v for k, v in overrides.items() if v is not None})
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"{cls.__name__}: unknown field(s) {unknown}; known: {sorted(names)}")
    resolved = {k: _coerce(hints[k], v) for k, v in values.items()}
    for key, value in resolved.items():
        default = getattr(cls, key, None) if not isinstance(getattr(cls, key, None), dataclasses.Field) else None
        if (
            default is not None
            and not isinstance(value, type(default))
            and not (isinstance(default, float) and isinstance(value, int))
        ):
            raise ConfigError(f"{cls.__name__}.{key}: expected {type(default).__name__}, got {value!r}")
    return cls(**resolved)


def config_to_dict(config: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config dataclass (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))
