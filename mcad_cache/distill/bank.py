"""Candidate embeddings from a bank: an MCAD step that costs what a contrastive step costs.

The top-k KD and ranking terms need the student's embedding of every cached candidate of every query. Encoding them
in the step (``--candidates online``, :class:`mcad_cache.distill.forward.OnlineCandidates`) made a step about 8x a
contrastive step on the same anchors (docs/benchmarks.md, section 2). ``--candidates bank`` reads them from an
**item-indexed bank** of detached student embeddings instead, as the MoCo (He et al. 2020) and ALBEF (Li et al.
2021) queues do: the candidate side gets no gradient.

Bank contents and refresh policy (docs/distill.md, "Candidates: online or bank"):

1. **Rows** are the candidate cache's rows (the single-stream cache when there is one, else the CLIP cache): one
   image row per training image, one text row per training caption; ``top-k`` ids from the cache index it directly,
   so any batch size, shuffle or k' <= cached k works.
2. **Initial fill**: at the first step (or when a run starts without a bank checkpoint) every training image and
   caption that is some query's cached candidate is encoded by the student in eval mode, no gradient (one inference
   pass over the data; only rows a top-k list names can ever be read, so the others are skipped: 32 % of the images
   and 89 % of the captions of the 1,024-sample benchmark set, 12 % / 21 % of the demo's 500-image CLIP cache). With
   text candidates online (item 5) no caption is filled.
3. **Every step** writes the step's anchor embeddings (detached, current weights) into their rows *before* the
   candidates are read, so a candidate that is an anchor of the same batch has its current value; such in-batch
   candidates also keep their gradient (the anchor's live embedding is used). Under DDP the anchors of every rank are
   gathered first, so every rank holds the same bank.
4. **Optional full refresh** every ``refresh_every`` steps: the whole bank is re-encoded, by an EMA copy of the
   student when ``ema > 0`` (momentum ``ema``, updated once per step), else by the live student.
5. **Text candidates online** (``text_online=True``, a recorded option): captions are cheap to encode, so their
   candidates can still be encoded in the step with gradient; only image candidates then come from the bank.

The bank (embeddings, the step each row was last written, the EMA copy) is part of a checkpoint
(:meth:`BankCandidates.state_dict`), so a resumed run continues with the same bank and stays exact.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from mcad_cache.cache import CacheReader
from mcad_cache.data.decode import DecodePolicy
from mcad_cache.distill.batch import DistillBatch
from mcad_cache.distill.chunks import ChunkDataset, iter_chunk_samples
from mcad_cache.runtime import autocast

_logger = logging.getLogger(__name__)

CANDIDATE_MODES = ("online", "bank")  # --candidates: encode the candidates in the step (exact) | read them from a bank


class CandidateBank:
    """Detached student embeddings of every training image and caption, indexed by candidate-cache row.

    Args:
        num_images, num_texts: rows of the candidate cache (N_i, N_t).
        dim: the student's embedding width D.
        device: where the bank lives (the student's device: reads and writes stay on it).
    Attributes:
        image_emb: [N_i, D] float32, L2-normalised student image embeddings (zeros before the fill).
        text_emb: [N_t, D] float32, L2-normalised student caption embeddings.
        image_step, text_step: [N] int64, the step whose weights wrote the row (0 = initial fill, -1 = never).
        steps: candidate reads so far (one per training step).
    """

    def __init__(self, *, num_images: int, num_texts: int, dim: int, device: torch.device | str = "cpu") -> None:
        self.image_emb = torch.zeros(num_images, dim, device=device)
        self.text_emb = torch.zeros(num_texts, dim, device=device)
        self.image_step = torch.full((num_images,), -1, dtype=torch.int64, device=device)
        self.text_step = torch.full((num_texts,), -1, dtype=torch.int64, device=device)
        self.steps = 0

    @property
    def filled(self) -> bool:
        """True once the initial fill (or a loaded checkpoint) has written the bank."""
        return bool((self.image_step >= 0).any()) or bool((self.text_step >= 0).any())

    def write(self, which: str, rows: Tensor, emb: Tensor, *, step: int) -> None:
        """Store detached embeddings ``emb [n, D]`` at ``rows [n]`` (int64; rows < 0 are ignored) of ``which``
        (``"image"`` | ``"text"``). A row given twice keeps its last value."""
        table, stamp = (self.image_emb, self.image_step) if which == "image" else (self.text_emb, self.text_step)
        rows = rows.to(table.device)
        keep = rows >= 0
        table[rows[keep]] = emb.detach()[keep.to(emb.device)].to(table.device, table.dtype)
        stamp[rows[keep]] = int(step)

    def read(self, which: str, rows: Tensor) -> Tensor:
        """``[*rows.shape, D]`` embeddings of ``rows`` (int64, any shape; -1 = empty slot, read as zeros)."""
        table = self.image_emb if which == "image" else self.text_emb
        rows = rows.to(table.device)
        out = table[rows.clamp(min=0)]
        return out * (rows >= 0).unsqueeze(-1).to(out.dtype)

    def age(self, which: str, rows: Tensor) -> Tensor:
        """Steps since each row of ``rows`` was written (float32; NaN for empty slots and rows never written)."""
        stamp = self.image_step if which == "image" else self.text_step
        rows = rows.to(stamp.device)
        age = (self.steps - stamp[rows.clamp(min=0)]).float()
        return torch.where((rows >= 0) & (stamp[rows.clamp(min=0)] >= 0), age, torch.full_like(age, float("nan")))

    def state_dict(self) -> dict[str, Tensor]:
        """CPU tensors for a checkpoint (safetensors)."""
        return {
            "image_emb": self.image_emb.cpu(),
            "text_emb": self.text_emb.cpu(),
            "image_step": self.image_step.cpu(),
            "text_step": self.text_step.cpu(),
            "steps": torch.tensor([self.steps], dtype=torch.int64),
        }

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Restore :meth:`state_dict` (shapes must match).

        Raises:
            ValueError: a shape differs (another dataset or student width).
        """
        for name in ("image_emb", "text_emb", "image_step", "text_step"):
            mine = getattr(self, name)
            if tuple(state[name].shape) != tuple(mine.shape):
                found, want = tuple(state[name].shape), tuple(mine.shape)
                raise ValueError(f"bank {name}: the checkpoint has shape {found}, this run {want}")
            mine.copy_(state[name].to(mine.device))
        self.steps = int(state["steps"][0])


class EmaModel:
    """An exponential moving average copy of the student (momentum ``m``: ``ema = m * ema + (1 - m) * live``, per
    parameter and floating buffer, after every step; MoCo's momentum encoder). Always in eval mode, no gradient."""

    def __init__(self, model: nn.Module, *, momentum: float) -> None:
        if not 0.0 < momentum < 1.0:
            raise ValueError(f"EMA momentum must be in (0, 1), got {momentum}")
        self.momentum = float(momentum)
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        live = dict(model.state_dict())
        for name, value in self.model.state_dict().items():
            if value.is_floating_point():
                value.mul_(self.momentum).add_(live[name].detach().to(value.dtype), alpha=1.0 - self.momentum)
            else:
                value.copy_(live[name])

    def state_dict(self) -> dict[str, Tensor]:
        return {f"ema.{k}": v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        own = {k[len("ema.") :]: v for k, v in state.items() if k.startswith("ema.")}
        self.model.load_state_dict(own, strict=True)


# ---------------------------------------------------------------------------------------------------- the fill
class ItemEncoder:
    """Encodes every training image and caption with a student, for the bank's fill and refreshes.

    Images are streamed from the shards in order (no random access, no ``ShardIndex``) and placed by key; captions are
    the candidate cache's ``captions`` array. Only **candidate rows** are encoded: the image rows some caption's
    cached t2i list names and the text rows some image's i2t list names (all k cached columns, so any k' <= k is
    covered); the bank reads no other row (anchors are written by the step itself). ``candidates_only=False``
    encodes every valid row (the fill before this change; same values in the rows both write).

    Args:
        reader: the candidate cache (its rows index the bank).
        shards: the training shards.
        transform: the student's image transform.
        policy: the run's decode policy.
        tokenize: ``texts -> {"input_ids", "attention_mask"}`` (the student's, dynamic padding).
        batch_size: images / captions per forward.
        workers: DataLoader decode workers.
        precision: autocast precision (``runtime.autocast``).
        candidates_only: encode only rows that some cached top-k list names (default; see above).
    """

    def __init__(
        self,
        reader: CacheReader,
        *,
        shards: list[str],
        transform: Callable[[Any], Tensor],
        policy: DecodePolicy,
        tokenize: Callable[[list[str]], dict[str, Tensor]],
        batch_size: int = 64,
        workers: int = 0,
        precision: str = "auto",
        candidates_only: bool = True,
    ) -> None:
        self.reader, self.shards, self.transform, self.policy = reader, shards, transform, policy
        self.tokenize, self.batch_size, self.workers, self.precision = tokenize, batch_size, workers, precision
        self.candidates_only = bool(candidates_only)
        self.last_counts: dict[str, int] = {}  # rows encoded by the last call: {"images": n, "texts": n}

    def candidate_rows(self, which: str) -> np.ndarray:
        """Sorted unique rows of ``which`` (``"image"`` | ``"text"``) that some cached top-k list names: image rows
        from the t2i lists of every text row, text rows from the i2t lists of every image row (int64)."""
        direction, queries = ("t2i", self.reader.num_texts) if which == "image" else ("i2t", self.reader.num_images)
        idx = np.asarray(self.reader.topk(direction, np.arange(queries), fused=False)["idx"], dtype=np.int64)
        return np.unique(idx[idx >= 0])

    def wanted_text_rows(self) -> np.ndarray:
        """The text rows the fill encodes: valid rows, and among them only candidates with ``candidates_only``."""
        valid = np.nonzero(np.asarray(self.reader.text_valid))[0].astype(np.int64)
        return np.intersect1d(valid, self.candidate_rows("text")) if self.candidates_only else valid

    def wanted_image_keys(self) -> set[str]:
        """Keys of the image rows the fill encodes (every row's key, or the candidates' with ``candidates_only``)."""
        keys = np.asarray(self.reader.image_keys)
        rows = self.candidate_rows("image") if self.candidates_only else np.arange(keys.shape[0])
        return {str(k) for k in keys[rows].tolist()}

    def _image_batches(self) -> Iterable[tuple[list[str], Tensor]]:
        dataset = ChunkDataset(self.shards, image_transform=self.transform, policy=self.policy)  # every chunk
        keys: list[str] = []
        images: list[Tensor] = []
        known = self.wanted_image_keys()
        for sample in iter_chunk_samples(dataset, workers=self.workers):  # its own generator: no global RNG draw
            if sample["skip"] is not None or sample["key"] not in known:
                continue
            keys.append(sample["key"])
            images.append(sample["image"])
            if len(keys) == self.batch_size:
                yield keys, torch.stack(images)
                keys, images = [], []
        if keys:
            yield keys, torch.stack(images)

    @torch.no_grad()
    def __call__(self, model: nn.Module, bank: CandidateBank, *, step: int, texts: bool = True) -> None:
        """Encode the items (see the class docstring) with ``model`` (eval mode for the pass, its mode restored
        after) into ``bank``; ``texts=False`` skips the captions (text candidates encoded online)."""
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        self.last_counts = {"images": 0, "texts": 0}
        try:
            with autocast(device, self.precision):
                for keys, images in self._image_batches():
                    rows = torch.from_numpy(self.reader.image_rows(keys).astype(np.int64))
                    emb = model.forward_image(images.to(device))[0].float()
                    bank.write("image", rows, emb, step=step)
                    self.last_counts["images"] += len(keys)
                valid = self.wanted_text_rows() if texts else np.zeros(0, np.int64)
                captions = self.reader.captions
                self.last_counts["texts"] = int(valid.shape[0])
                for start in range(0, len(valid), self.batch_size):
                    rows_np = valid[start : start + self.batch_size]
                    tokens = self.tokenize([str(c) for c in captions[rows_np].tolist()])
                    emb = model.forward_text(tokens["input_ids"].to(device), tokens["attention_mask"].to(device))[0]
                    bank.write("text", torch.from_numpy(rows_np.astype(np.int64)), emb.float(), step=step)
        finally:
            model.train(was_training)


# ---------------------------------------------------------------------------------------------------- the rows
class NoCandidateImages:
    """The join's candidate-image fetcher for ``--candidates bank``: fetches nothing and returns None (candidate
    images are read from the bank by row, so the shards need no random access and no ``ShardIndex``)."""

    def __call__(self, keys: list[str]) -> None:
        return None


def attach_candidate_rows(batch: DistillBatch, reader: CacheReader, *, k: int) -> DistillBatch:
    """Set ``batch.anchor_image_rows``, ``anchor_text_rows`` [B] and ``topk_text_rows`` / ``topk_image_rows`` [B, K]
    (int64, -1 = empty slot): rows of ``reader``, the candidate cache the joiner took the candidates from.

    The anchor caption's row is the first of its image's captions whose text equals the anchor text (two equal
    captions of one image have the same embedding). Top-k rows are read for each direction the batch has
    candidates in (``topk_text_index`` / ``topk_image_index`` set).

    Raises:
        CacheKeyError: a key missing from ``reader`` (the joiner has checked them already).
    """
    b = batch.num_pairs
    img_rows = reader.image_rows(batch.keys).astype(np.int64)
    offsets = reader.img2txt_offsets
    txt_rows = np.empty(b, np.int64)
    for i, row in enumerate(img_rows.tolist()):
        lo, hi = int(offsets[row]), int(offsets[row + 1])
        caps = [str(c) for c in reader.captions[lo:hi].tolist()]
        txt_rows[i] = lo + caps.index(batch.texts[i])
    batch.anchor_image_rows = torch.from_numpy(img_rows)
    batch.anchor_text_rows = torch.from_numpy(txt_rows)
    for d, query, index in (("i2t", img_rows, batch.topk_text_index), ("t2i", txt_rows, batch.topk_image_index)):
        if index is None:
            continue
        top = reader.topk(d, query, k=k, fused=False)
        rows = torch.from_numpy(np.where(top["valid"], top["idx"], -1).astype(np.int64))
        if d == "i2t":
            batch.topk_text_rows = rows
        else:
            batch.topk_image_rows = rows
    return batch


# ---------------------------------------------------------------------------------------------------- the source
def _gather_rows(rows: Tensor, emb: Tensor) -> tuple[Tensor, Tensor]:
    """All ranks' (rows [B], emb [B, D]) concatenated in rank order (equal B on every rank: DDP runs equal steps)."""
    world = torch.distributed.get_world_size()
    rows_all = [torch.empty_like(rows) for _ in range(world)]
    emb_all = [torch.empty_like(emb) for _ in range(world)]
    torch.distributed.all_gather(rows_all, rows.contiguous())
    torch.distributed.all_gather(emb_all, emb.contiguous())
    return torch.cat(rows_all), torch.cat(emb_all)


def _live_where_anchor(cand: Tensor, cand_rows: Tensor, anchor_rows: Tensor, live: Tensor) -> Tensor:
    """Replace bank rows that are anchors of this batch by the anchors' live embeddings (with gradient).

    Args:
        cand: [B, K, D] bank embeddings; cand_rows: [B, K] int64 (-1 empty); anchor_rows: [B] int64; live: [B, D].
    """
    match = cand_rows.unsqueeze(-1) == anchor_rows.view(1, 1, -1)  # [B, K, B]
    hit = match.any(-1) & (cand_rows >= 0)
    if not bool(hit.any()):
        return cand
    pos = match.float().argmax(-1)  # first matching anchor
    return torch.where(hit.unsqueeze(-1), live[pos].to(cand.dtype), cand)


class BankCandidates:
    """``CandidateSource`` (``distill.forward``) that reads candidate embeddings from a :class:`CandidateBank`.

    Called once per training step with the step's forward embeddings (anchors first). See the module docstring for
    the refresh policy.

    Args:
        bank: the bank.
        model: the student (unwrapped), for the fill, refreshes and the EMA copy.
        encoder: the :class:`ItemEncoder` that fills the bank.
        text_online: text candidates are encoded in the step (``DistillBatch.topk_text_index``), not read.
        ema: EMA momentum of the refreshing copy (0 = refresh with the live student).
        refresh_every: steps between full re-encodes of the bank (0 = never after the initial fill).
        gather: under DDP, gather every rank's anchors before writing (same bank on every rank).
    """

    online_images = False  # candidate images are never encoded in the step

    def __init__(
        self,
        bank: CandidateBank,
        *,
        model: nn.Module,
        encoder: ItemEncoder | Callable[[nn.Module, CandidateBank], None],
        text_online: bool = False,
        ema: float = 0.0,
        refresh_every: int = 0,
        gather: bool = False,
    ) -> None:
        self.bank, self.model, self.encoder = bank, model, encoder
        self.online_texts = bool(text_online)
        self.ema = EmaModel(model, momentum=ema) if ema > 0 else None
        self.refresh_every = int(refresh_every)
        self.gather = gather
        self.last_age: dict[str, float] = {}

    def fill(self) -> None:
        """(Re-)encode every item: by the EMA copy when there is one, else by the live student."""
        source = self.ema.model if self.ema is not None else self.model
        _logger.info("bank: encoding the training items that are candidates (step %d)", self.bank.steps)
        if isinstance(self.encoder, ItemEncoder):
            self.encoder(source, self.bank, step=self.bank.steps, texts=not self.online_texts)
        else:
            self.encoder(source, self.bank, step=self.bank.steps)

    def _write(self, which: str, rows: Tensor | None, emb: Tensor) -> None:
        if rows is None:
            return
        rows = rows.to(emb.device)
        if self.gather and torch.distributed.is_available() and torch.distributed.is_initialized():
            rows, emb = _gather_rows(rows, emb.detach().float())
        self.bank.write(which, rows, emb.detach().float(), step=self.bank.steps)

    def __call__(self, batch: DistillBatch, image_emb: Tensor, text_emb: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """Returns ``(topk_text_emb [B, K, D] | None, topk_image_emb [B, K, D] | None)``, L2-normalised (zeros in
        empty slots); bank rows are detached, in-batch candidates keep their gradient.

        Raises:
            ValueError: the batch carries no candidate-cache rows (a joiner without row output).
        """
        if batch.topk_text_index is None and batch.topk_image_index is None:
            return None, None  # a batch without candidates (e.g. a contrastive step): nothing to read or write
        if batch.anchor_image_rows is None or batch.anchor_text_rows is None:
            raise ValueError("candidates=bank needs DistillBatch candidate-cache rows (bank.attach_candidate_rows)")
        with torch.no_grad():
            if not self.bank.filled:
                self.fill()
            elif self.ema is not None:
                self.ema.update(self.model)  # weights after the previous optimiser step
            if self.refresh_every > 0 and self.bank.steps > 0 and self.bank.steps % self.refresh_every == 0:
                self.fill()
        b = batch.num_pairs
        self.bank.steps += 1
        self._write("image", batch.anchor_image_rows, image_emb[:b])
        self._write("text", batch.anchor_text_rows, text_emb[:b])
        device = image_emb.device
        topk_text = topk_image = None
        if self.online_texts and batch.topk_text_index is not None:  # text candidates encoded in this step
            topk_text = text_emb[batch.topk_text_index.to(device)]
        elif batch.topk_text_rows is not None:
            rows = batch.topk_text_rows.to(device)
            topk_text = _live_where_anchor(
                self.bank.read("text", rows), rows, batch.anchor_text_rows.to(device), text_emb[:b]
            )
            self.last_age["text"] = float(torch.nanmean(self.bank.age("text", rows)))
        if batch.topk_image_rows is not None:
            rows = batch.topk_image_rows.to(device)
            topk_image = _live_where_anchor(
                self.bank.read("image", rows), rows, batch.anchor_image_rows.to(device), image_emb[:b]
            )
            self.last_age["image"] = float(torch.nanmean(self.bank.age("image", rows)))
        return topk_text, topk_image

    def state_dict(self) -> dict[str, Tensor]:
        """The bank and the EMA copy, CPU tensors (saved beside a checkpoint)."""
        out = {f"bank.{k}": v for k, v in self.bank.state_dict().items()}
        if self.ema is not None:
            out.update(self.ema.state_dict())
        return out

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Restore :meth:`state_dict`.

        Raises:
            ValueError: shapes differ, or the EMA copy is missing / unexpected.
        """
        self.bank.load_state_dict({k[len("bank.") :]: v for k, v in state.items() if k.startswith("bank.")})
        has_ema = any(k.startswith("ema.") for k in state)
        if has_ema != (self.ema is not None):
            raise ValueError(f"bank checkpoint {'has' if has_ema else 'lacks'} an EMA copy; this run's ema differs")
        if self.ema is not None:
            self.ema.load_state_dict(state)


__all__ = [
    "CANDIDATE_MODES",
    "BankCandidates",
    "CandidateBank",
    "EmaModel",
    "ItemEncoder",
    "NoCandidateImages",
    "attach_candidate_rows",
]
