"""Frozen-tower students: the towers run once per split, only the projections and the logit scale train.

A study trains the same student architecture many times (presets x seeds). When its image and text towers are
frozen (pretrained, eval mode, no augmentation: one canonical view, the one the caches' teachers saw), their pooled
outputs ``image_feat [N_i, F_img]`` and ``text_feat [N_t, F_txt]`` are the same in every run, so they are computed
once (:func:`encode_frozen`) and every run trains only ``image_proj``, ``text_proj`` and ``log_logit_scale`` on them
(our choice, for the demo's CPU budget; the study design of issue 12). The run is otherwise the library's:
``create_distill`` wires caches, loss module, optimiser groups and seeds; ``TargetJoiner`` joins the cached teacher
targets by key; ``distill_forward`` and ``train_loop`` train. Only three parts are swapped:

- the model: :class:`FrozenTowerStudent` (the student's own projection modules on table rows, same output dict as
  ``DualEncoder.forward``); its ``tokenize`` maps a caption to its table row;
- the stream: :class:`FeatureStream` (same batch dicts as ``EpochStream``; order depends on the seed only);
- the candidate images: rows of the table, by key.

The trained projections live in the real ``DualEncoder`` (shared parameters), so ``model.save`` writes a student that
``mcad-cache eval`` runs on images.

**Replayed views** (issue 16). With a multi-view cache, a real run gives each drawn sample one stored view, chosen by
``distill.views.choose_view(seed, epoch, key, V)``: the student decodes that crop + flip. Here each stored view of
every training image is encoded once (:func:`encode_views`: V x the image pass, ``FeatureTable.image_feat_views``
[N_i, V, F_img]) and the stream picks the row of the chosen view, while the joiner takes that view's cached teacher
target (``distill.views.ViewTargets``), as a real run does. ``views=N`` restricts the choice to the first N views.

**Candidate bank** (issue 11, ``--candidates bank``): the bank of ``distill.bank`` (initial fill from the starting
weights, then each anchor's detached embedding at its last visit), filled from the table by :class:`TableItemEncoder`
instead of decoding the shards; candidate images are then read from the bank, never from the table.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from mcad_cache.cache.reader import CacheReader
from mcad_cache.config import DistillConfig
from mcad_cache.data.transforms import make_image_transform
from mcad_cache.data.webdataset import SampleDataset, collate_samples
from mcad_cache.distill import DistillRun, TrainState, create_distill, create_optimizer, train_loop
from mcad_cache.distill.bank import BankCandidates, CandidateBank
from mcad_cache.distill.chunks import ChunkDataset, iter_chunk_samples
from mcad_cache.distill.views import StoredViews, ViewTargets, choose_view
from mcad_cache.errors import CacheKeyError, ConfigError, DataError
from mcad_cache.hashing import json_sha256
from mcad_cache.metrics import retrieval_metrics_from_embeddings
from mcad_cache.progress import ProgressFn, no_progress
from mcad_cache.runtime import autocast
from mcad_cache.schedules import create_warmup_cosine
from mcad_cache.student import DualEncoder
from mcad_cache.views import apply_view

_logger = logging.getLogger(__name__)


@dataclass
class FeatureTable:
    """Frozen-tower outputs of one split.

    Attributes:
        keys: N_i sample keys (shard order).
        captions: the captions of each sample, as in the shards.
        image_feat: [N_i, F_img] float32 pooled image-tower outputs (``DualEncoder.forward_image``'s second value).
        texts: N_t distinct caption strings.
        text_feat: [N_t, F_txt] float32 pooled text-tower outputs of ``texts``.
        image_feat_views: optional [N_i, V, F_img] float32 outputs of each stored view of each image
            (:func:`encode_views`; NaN rows for keys the cache has no views of), None without views.
    """

    keys: list[str]
    captions: list[list[str]]
    image_feat: Tensor
    texts: list[str]
    text_feat: Tensor
    image_feat_views: Tensor | None = None

    def __post_init__(self) -> None:
        self.row_of_key = {k: i for i, k in enumerate(self.keys)}
        self.row_of_text = {t: i for i, t in enumerate(self.texts)}

    def images(self, keys: Sequence[str]) -> Tensor:
        """``[n, F_img]`` rows of ``keys`` (the joiner's candidate-image fetcher).

        Raises:
            CacheKeyError: a key that is not in the table (the first few named).
        """
        missing = [k for k in keys if k not in self.row_of_key]
        if missing:
            raise CacheKeyError(f"{len(missing)} key(s) not in the frozen-feature table, e.g. {missing[:3]}")
        return self.image_feat[[self.row_of_key[k] for k in keys]]

    def retrieval_rows(self) -> tuple[Tensor, Tensor]:
        """``(text_rows [N_c] int64, txt2img [N_c] int64)``: every caption of every image, in order (eval protocol)."""
        rows, txt2img = [], []
        for i, caps in enumerate(self.captions):
            for c in caps:
                rows.append(self.row_of_text[c])
                txt2img.append(i)
        return torch.tensor(rows, dtype=torch.long), torch.tensor(txt2img, dtype=torch.long)


def save_table(table: FeatureTable, path: str | os.PathLike[str], *, fingerprint: Mapping[str, Any]) -> None:
    """Write ``table`` with the ``fingerprint`` of what made it (student, shards) to ``path`` (torch.save, atomic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fields = {f.name: getattr(table, f.name) for f in dataclasses.fields(table)}
    torch.save({"fingerprint": json_sha256(dict(fingerprint)), **fields}, tmp)
    os.replace(tmp, path)


def load_table(path: str | os.PathLike[str], *, fingerprint: Mapping[str, Any]) -> FeatureTable | None:
    """The table saved at ``path`` when it was made with the same ``fingerprint``, else None (recompute it)."""
    path = Path(path)
    if not path.is_file():
        return None
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if saved.pop("fingerprint") != json_sha256(dict(fingerprint)):
        _logger.info("%s was made from other data or another student: encoding again", path)
        return None
    return FeatureTable(**saved)


class FixedView:
    """``view_replay`` of a ``ChunkDataset`` that applies stored view ``view`` of every key (picklable)."""

    def __init__(self, params: StoredViews, view: int) -> None:
        self.params, self.view = params, int(view)

    def __call__(self, key: str, image: Any, *, epoch: int = 0) -> Any:
        return apply_view(image, self.params[key][self.view]) if key in self.params else image


@torch.no_grad()
def encode_views(
    model: DualEncoder,
    shards: Sequence[str],
    table: FeatureTable,
    params: StoredViews,
    *,
    batch_size: int = 64,
    workers: int = 0,
    precision: str = "auto",
    progress: ProgressFn = no_progress,
) -> Tensor:
    """Image-tower outputs of every stored view: ``[N_i, V, F_img]`` float32 in ``table.keys`` order.

    Each view v is one pass over the shards through the distill stream's own dataset (``distill.chunks``): decode,
    crop + flip of stored view v (``views.apply_view``), the student's transform, the image tower in eval mode. So a
    row equals what a real run's student computes for that replayed view (``tests/test_study_arms.py``). Keys the
    cache holds no views of stay NaN (a run never draws them: the join refuses keys missing from the cache).

    Raises:
        DataError: an unreadable sample.
    """
    model = model.eval()
    num_views = int(next(iter(params.values())).shape[0]) if len(params) else 1
    out = torch.full((len(table.keys), num_views, model.image_feat_dim), float("nan"))
    for v in range(num_views):
        dataset = ChunkDataset(list(shards), image_transform=make_image_transform(model.preprocess_cfg))
        dataset.view_replay = FixedView(params, v)
        samples = iter_chunk_samples(dataset, workers=workers)
        keys: list[str] = []
        images: list[Tensor] = []
        for sample in progress(samples, f"frozen towers: view {v + 1}/{num_views}", len(table.keys)):
            if sample["skip"] is not None:
                raise DataError(sample["skip"], shard=sample["shard"], key=sample["key"], detail="frozen views")
            if sample["key"] in params and sample["key"] in table.row_of_key:
                keys.append(sample["key"])
                images.append(sample["image"])
            if len(keys) == batch_size:
                _encode_into(model, out, keys, images, view=v, table=table, precision=precision)
                keys, images = [], []
        if keys:
            _encode_into(model, out, keys, images, view=v, table=table, precision=precision)
    return out


@torch.no_grad()
def encode_frozen(
    model: DualEncoder,
    shards: Sequence[str],
    *,
    batch_size: int = 64,
    text_batch_size: int = 256,
    workers: int = 0,
    precision: str = "auto",
    progress: ProgressFn = no_progress,
    description: str = "frozen towers",
) -> FeatureTable:
    """Run the student's towers once over ``shards`` (its own preprocessing, eval mode).

    Raises:
        DataError: an unreadable sample (a study never skips one silently: every run must see the same data).
    """
    model = model.eval()
    device = next(model.parameters()).device
    ds = SampleDataset(list(shards), image_transform=make_image_transform(model.preprocess_cfg))
    loader = DataLoader(ds, batch_size=batch_size, num_workers=workers, collate_fn=collate_samples)
    keys: list[str] = []
    captions: list[list[str]] = []
    feats: list[Tensor] = []
    with autocast(device, precision):
        batches = (b for b in loader)  # no len(): the shards' sample count is not known before reading them
        for batch in progress(batches, f"{description}: images", None):
            for item in batch.get("skipped") or []:
                raise DataError(item["skip"], shard=item.get("shard"), key=item.get("key"), detail="frozen towers")
            if not batch["key"]:
                continue
            keys += [str(k) for k in batch["key"]]
            captions += [list(c) for c in batch["captions"]]
            feats.append(model.forward_image(batch["image"].to(device))[1].float().cpu())
        texts = sorted({c for caps in captions for c in caps})
        text_feats = []
        for s in range(0, len(texts), text_batch_size):
            tok = model.tokenize(texts[s : s + text_batch_size])
            ids, mask = tok["input_ids"].to(device), tok["attention_mask"].to(device)
            text_feats.append(model.forward_text(ids, mask)[1].float().cpu())
    if not keys:
        raise DataError("missing_image", detail=f"no usable sample in {list(shards)[:3]}")
    return FeatureTable(keys, captions, torch.cat(feats), texts, torch.cat(text_feats))


class FrozenTowerStudent(nn.Module):
    """A ``DualEncoder``'s projections and logit scale applied to :class:`FeatureTable` rows.

    ``forward(images=[N, F_img] image_feat rows, input_ids=[T, 1] text-table rows)`` returns the dict of
    ``DualEncoder.forward`` (``image_emb``, ``text_emb`` L2-normalised [.., D], ``image_feat``, ``text_feat``,
    ``logit_scale`` linear). The projections and ``log_logit_scale`` are the DualEncoder's own parameter objects.
    """

    def __init__(self, model: DualEncoder, table: FeatureTable) -> None:
        super().__init__()
        self.image_proj = model.image_proj
        self.text_proj = model.text_proj
        self.log_logit_scale = model.log_logit_scale
        self.max_log_logit_scale = float(model.config.max_log_logit_scale)
        self.table = table

    @property
    def logit_scale(self) -> Tensor:
        """Linear logit scale with the DualEncoder's clamp."""
        return self.log_logit_scale.clamp(max=self.max_log_logit_scale).exp()

    def tokenize(self, texts: Sequence[str]) -> dict[str, Tensor]:
        """``{"input_ids": [T, 1] int64 text-table rows, "attention_mask": [T, 1] ones}``.

        Raises:
            CacheKeyError: a caption that is not in the table.
        """
        missing = [t for t in texts if t not in self.table.row_of_text]
        if missing:
            raise CacheKeyError(f"{len(missing)} caption(s) not in the frozen-feature table, e.g. {missing[:2]}")
        rows = torch.tensor([[self.table.row_of_text[t]] for t in texts], dtype=torch.long)
        return {"input_ids": rows, "attention_mask": torch.ones_like(rows)}

    def forward(
        self, images: Tensor | None = None, input_ids: Tensor | None = None, attention_mask: Tensor | None = None
    ) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {"logit_scale": self.logit_scale}
        if images is not None:
            out["image_feat"] = images
            out["image_emb"] = F.normalize(self.image_proj(images), dim=-1)
        if input_ids is not None:
            text_feat = self.table.text_feat[input_ids[:, 0].cpu()].to(self.text_proj.weight.device)
            out["text_feat"] = text_feat
            out["text_emb"] = F.normalize(self.text_proj(text_feat), dim=-1)
        return out


def _encode_into(
    model: DualEncoder, out: Tensor, keys: list[str], images: list[Tensor], *, view: int, table: FeatureTable,
    precision: str,
) -> None:  # fmt: skip
    device = next(model.parameters()).device
    with autocast(device, precision):
        feat = model.forward_image(torch.stack(images).to(device))[1].float().cpu()
    out[[table.row_of_key[k] for k in keys], view] = feat


class FeatureStream:
    """``epoch -> batches`` like ``EpochStream``: ``{"key", "captions", "image": [B, F_img], "skipped": [],
    "epoch"}``, full batches only, shuffled by ``torch.randperm`` seeded with (seed, epoch) alone: the same order in
    every preset. With ``views`` (N), each key's image row is that of view ``choose_view(seed, epoch, key, N)`` of
    ``table.image_feat_views``, the view a real run replays."""

    def __init__(self, table: FeatureTable, *, batch_size: int, seed: int, views: int | None = None) -> None:
        self.table, self.batch_size, self.seed, self.views = table, batch_size, seed, views
        if views is not None and (table.image_feat_views is None or not 1 <= views <= table.image_feat_views.shape[1]):
            held = 0 if table.image_feat_views is None else table.image_feat_views.shape[1]
            raise ConfigError(f"views={views}: the frozen-feature table holds {held} view(s) per image")

    def __call__(self, epoch: int) -> Iterator[dict[str, Any]]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.table.keys), generator=gen).tolist()
        for s in range(0, len(order) - self.batch_size + 1, self.batch_size):
            rows = order[s : s + self.batch_size]
            keys = [self.table.keys[r] for r in rows]
            if self.views is None:
                image = self.table.image_feat[rows]
            else:
                assert self.table.image_feat_views is not None
                chosen = [choose_view(self.seed, epoch, k, self.views) for k in keys]
                image = self.table.image_feat_views[rows, chosen]
            yield {
                "key": keys,
                "captions": [self.table.captions[r] for r in rows],
                "image": image,
                "skipped": [],
                "epoch": epoch,
            }


class TableItemEncoder:
    """The bank's fill (``distill.bank.ItemEncoder``'s call) from a :class:`FeatureTable`: the projections of every
    canonical image row and every caption of the candidate cache ``reader`` (rows the table lacks stay unwritten)."""

    def __init__(self, table: FeatureTable, reader: CacheReader) -> None:
        self.table = table
        known = [str(k) for k in reader.image_keys.tolist() if str(k) in table.row_of_key]
        self.image_rows = torch.from_numpy(reader.image_rows(known).astype("int64"))
        self.image_feat = table.image_feat[[table.row_of_key[k] for k in known]]
        texts = [(r, str(reader.captions[r])) for r in range(len(reader.captions)) if bool(reader.text_valid[r])]
        texts = [(r, t) for r, t in texts if t in table.row_of_text]
        self.text_rows = torch.tensor([r for r, _ in texts], dtype=torch.long)
        self.text_feat = table.text_feat[[table.row_of_text[t] for _, t in texts]]

    @torch.no_grad()
    def __call__(self, model: nn.Module, bank: CandidateBank, *, step: int) -> None:
        device = bank.image_emb.device
        bank.write("image", self.image_rows, F.normalize(model.image_proj(self.image_feat.to(device)), dim=-1),
                   step=step)  # fmt: skip
        bank.write("text", self.text_rows, F.normalize(model.text_proj(self.text_feat.to(device)), dim=-1), step=step)


@torch.no_grad()
def evaluate_frozen(student: FrozenTowerStudent | DualEncoder, table: FeatureTable) -> dict[str, float]:
    """Test recall (percent, ``metrics.METRIC_KEYS``) of the projections on a split's frozen features: every image
    against every caption, the eval protocol of ``mcad_cache.eval`` (pessimistic ties)."""
    text_rows, txt2img = table.retrieval_rows()
    image_emb = F.normalize(student.image_proj(table.image_feat), dim=-1)
    text_emb = F.normalize(student.text_proj(table.text_feat[text_rows]), dim=-1)
    return retrieval_metrics_from_embeddings(image_emb, text_emb, txt2img)


def train_frozen(
    config: DistillConfig,
    *,
    train: FeatureTable,
    val: FeatureTable | None = None,
    on_log: Any = None,
    views: int | None = None,
) -> tuple[DualEncoder, FrozenTowerStudent, TrainState]:
    """Train one frozen-tower student (module docstring). ``config.student`` must load pretrained towers: a random
    tower would be frozen at its random init.

    Args:
        config: the run (preset, seed, steps, lr, caches ...); ``data`` must be the shards ``train`` was encoded from.
        train: the train split's table (every anchor and candidate image and caption).
        val: optional val table: ``val_rsum`` is added to each logged line (the val curve).
        on_log: optional ``dict -> None`` receiving each logged line.
        views: when the run replays stored views (``config.augment`` "" on a multi-view cache): replay the first N
            (None = all V); ``train.image_feat_views`` must hold them. Ignored when the run replays none.
    Returns:
        ``(DualEncoder with the trained projections, the FrozenTowerStudent, final TrainState)``.
    Raises:
        ConfigError: views asked for beyond those the cache or the table holds, or drawn (mismatched) views, which
            the frozen path cannot serve. What ``create_distill`` and ``train_loop`` raise.
    """
    run, model, student = frozen_run(config, train=train, views=views)

    def log(values: Mapping[str, Any]) -> None:
        line = {**values, "logit_scale": float(student.logit_scale.detach())}
        if val is not None:
            line["val_rsum"] = evaluate_frozen(student, val)["rsum"]
        if on_log is not None:
            on_log(line)

    state = train_loop(
        student, run.loss_module, batches_for_epoch=run.stream, prepare=run.prepare, forward=run.forward,
        optimizer=run.optimizer, scheduler=run.scheduler, state=TrainState(), total_steps=run.total_steps,
        grad_clip=config.grad_clip, precision=config.precision, device=run.device, log_every=config.log_every,
        on_log=log,
    )  # fmt: skip
    return model, student, state


def frozen_run(
    config: DistillConfig, *, train: FeatureTable, views: int | None = None
) -> tuple[DistillRun, DualEncoder, FrozenTowerStudent]:
    """The library's ``DistillRun`` of ``config`` with the three parts swapped (module docstring): the model (a
    :class:`FrozenTowerStudent` on ``train``), the stream (:class:`FeatureStream`, replaying ``views``) and the
    candidates (table rows, or a bank filled from the table); fresh optimiser and schedule over the projections.

    Returns:
        ``(run, the DualEncoder whose projections train, the FrozenTowerStudent)``.
    Raises:
        See :func:`train_frozen`.
    """
    d = create_distill(config)
    model = d.model.eval()
    for tower in (model.image_tower, model.text_tower):
        tower.requires_grad_(False)
    student = FrozenTowerStudent(model, train)
    joiner = copy.copy(d.joiner)  # the factory's join (caches, derived targets, k), fed from the tables instead
    joiner.tokenize = student.tokenize
    if d.bank is None:  # with a bank the join fetches no candidate image (they come from the bank)
        joiner.candidate_images = train.images
    replay = replayed_views(d, views)
    if replay is not None:
        assert d.clip is not None
        joiner.views = ViewTargets(d.clip, seed=config.seed)
        joiner.views.num_views = replay
    total = d.total_steps
    optimizer = create_optimizer([student, d.loss_module], lr=config.lr, weight_decay=config.weight_decay)
    scheduler = create_warmup_cosine(optimizer, warmup_steps=min(config.warmup_steps, total), total_steps=total)
    stream = FeatureStream(train, batch_size=config.batch_size, seed=config.seed, views=replay)
    bank = None
    if d.bank is not None:
        bank = BankCandidates(
            CandidateBank(num_images=joiner.cand.num_images, num_texts=joiner.cand.num_texts, dim=model.embed_dim,
                          device=d.device),
            model=student, encoder=TableItemEncoder(train, joiner.cand), text_online=d.bank.online_texts,
            ema=config.bank_ema, refresh_every=config.bank_refresh_every,
        )  # fmt: skip
    run = dataclasses.replace(
        d, model=student, joiner=joiner, stream=stream, optimizer=optimizer, scheduler=scheduler, bank=bank,
        candidates=bank if bank is not None else d.candidates,
    )  # fmt: skip

    return run, model, student


def replayed_views(d: Any, views: int | None) -> int | None:
    """How many stored views a frozen run replays: None when the run trains on the canonical view (no views in the
    cache, or ``augment="none"``), else ``views`` (default: all V of the cache).

    Raises:
        ConfigError: drawn views (``--allow-aug-mismatch``: no stored view to encode once), or ``views`` > V.
    """
    mode = d.resolved.get("views", {}).get("mode")
    if mode is None:
        return None
    if mode != "replay":
        raise ConfigError(
            "frozen towers replay stored views only; drawn views (--allow-aug-mismatch) need the image path"
        )
    held = int(d.clip.layout.num_views)
    if views is not None and not 1 <= views <= held:
        raise ConfigError(f"views={views}: the cache {d.clip.path} holds {held} view(s) per image")
    return held if views is None else views


__all__ = [
    "FeatureStream",
    "FixedView",
    "TableItemEncoder",
    "encode_views",
    "frozen_run",
    "replayed_views",
    "FeatureTable",
    "FrozenTowerStudent",
    "encode_frozen",
    "evaluate_frozen",
    "load_table",
    "save_table",
    "train_frozen",
]
