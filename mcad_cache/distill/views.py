"""Distill replays the cache's stored views (issue 16; ``docs/distill.md``, ``docs/cache-format.md``).

Each time a sample is drawn (once per epoch), one of its V stored views is chosen by :func:`choose_view` from
``(run seed, epoch, sample key)`` only, so the choice is the same for any worker count, and a resumed run (which
re-reads the epoch's batches from its checkpointed position) chooses the same views. The student's decode applies
exactly that view's crop box and flip (:class:`ViewReplay`, run in the DataLoader workers before the student's own
resize / normalise), and the teacher target is that view's cached embedding (:class:`ViewTargets`, in the join).

What the run asks for (``DistillConfig.augment``) is checked against what the cache holds (:func:`attach_views`):
``""`` replays the stored views (none stored: the canonical image, as before); ``"none"`` trains on the canonical
view only; a spec must equal the cache's recorded spec, else the run is refused unless ``allow_aug_mismatch`` is set:
then a warning is logged, ``views.mismatch`` is recorded in the resolved config, and the student draws its own views
(:func:`mcad_cache.views.draw_view` from ``(seed, epoch)`` and the key) against the canonical targets, knowingly
inconsistent (a mirrored view reusing the unmirrored target measured cos < 0.9999, ``tests/test_views.py``).
Top-k candidate images (t2i) and their targets stay canonical.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from mcad_cache.cache.reader import CacheReader
from mcad_cache.config import DistillConfig
from mcad_cache.errors import CacheMismatchError, NonFiniteError
from mcad_cache.views import AugmentSpec, apply_view, draw_view, parse_augment, view_rng

_logger = logging.getLogger(__name__)


def choose_view(seed: int, epoch: int, key: str, num_views: int) -> int:
    """The stored view (0..V-1) that sample ``key`` is trained on in ``epoch``: uniform, from :func:`view_rng`
    ``("choose", seed, epoch, key)`` (our choice: every view equally often in expectation, no state to checkpoint)."""
    if num_views <= 1:
        return 0
    return int(view_rng("choose", seed, epoch, key).integers(num_views))


class ViewReplay:
    """``(key, decoded image, epoch) -> cropped / flipped image``: the view of ``key`` chosen for ``epoch``.

    Picklable (DataLoader workers get a copy per epoch). Two modes: ``params`` (stored views: ``key -> int32
    [V, 5]`` from the cache) or ``spec`` (mismatch allowed: a view drawn here from ``(seed, epoch)``, the key and
    the image size).

    Raises (on call):
        KeyError: a key without stored views (the join names it first as a cache miss).
        ValueError: the stored box does not fit the decoded image (the shards changed since the build).
    """

    def __init__(self, *, seed: int, params: Mapping[str, np.ndarray] | None = None, spec: AugmentSpec | None = None):
        if (params is None) == (spec is None):
            raise ValueError("ViewReplay needs exactly one of params (stored views) or spec (drawn views)")
        self.seed, self.params, self.spec = seed, params, spec

    def view_params(self, key: str, epoch: int, *, width: int, height: int) -> np.ndarray:
        """``int32 [5] = (x0, y0, w, h, flip)`` applied to ``key`` in ``epoch``."""
        if self.params is not None:
            stored = self.params[key]
            return stored[choose_view(self.seed, epoch, key, stored.shape[0])]
        assert self.spec is not None
        return draw_view(self.spec, seed=self.seed * 1_000_003 + epoch, key=key, view=1, width=width, height=height)

    def __call__(self, key: str, image: Image.Image, *, epoch: int) -> Image.Image:
        return apply_view(image, self.view_params(key, epoch, width=image.width, height=image.height))


class ViewTargets:
    """The join's side: cached teacher embeddings of the chosen views.

    Args:
        reader: the dual-stream (CLIP) cache with ``image_emb_views`` [N_i, V, D].
        seed: the run's seed (the same as :class:`ViewReplay`'s).
    """

    def __init__(self, reader: CacheReader, *, seed: int) -> None:
        self.reader, self.seed = reader, seed
        self.num_views = int(reader.layout.num_views)
        self._emb: np.ndarray | None = None

    def views(self, keys: list[str], *, epoch: int) -> np.ndarray:
        """[B] int64 view index of each key in ``epoch``."""
        return np.array([choose_view(self.seed, epoch, k, self.num_views) for k in keys], dtype=np.int64)

    def image_emb(self, rows: np.ndarray, keys: list[str], *, epoch: int) -> Tensor:
        """Cached teacher image embeddings of the chosen views, ``[B, D]`` float32 (upcast from storage).

        Raises:
            NonFiniteError: a chosen view's embedding is not finite (names the key).
        """
        if self._emb is None:  # [N_i, V, D]; loaded once (the same size as V x image_emb)
            self._emb = np.asarray(self.reader.array("image_emb_views")[:], dtype=np.float32)
        out = self._emb[np.asarray(rows), self.views(keys, epoch=epoch)]
        bad = ~np.isfinite(out).all(axis=1)
        if bad.any():
            raise NonFiniteError(f"{self.reader.path}: cached view embedding of sample {keys[int(np.argmax(bad))]!r}")
        return torch.from_numpy(out)


class StoredViews(Mapping[str, np.ndarray]):
    """``key -> int32 [V, 5]`` view params of the valid rows of a cache, backed by one array (pickled to each
    DataLoader worker once per epoch: one ``[N_i, V, 5]`` array and a key -> row dict, not N_i small arrays)."""

    def __init__(self, keys: list[str], params: np.ndarray) -> None:
        self.rows = {k: i for i, k in enumerate(keys)}
        self.params = params

    def __getitem__(self, key: str) -> np.ndarray:
        return self.params[self.rows[key]]

    def __iter__(self) -> Iterator[str]:
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)


def stored_view_params(reader: CacheReader) -> StoredViews:
    """``key -> int32 [V, 5]`` of every valid image row of a cache with views."""
    valid = np.asarray(reader.image_valid, dtype=bool)
    params = np.asarray(reader.array("view_params")[:], dtype=np.int32)[valid]
    keys = [str(k) for k in reader.image_keys[valid].tolist()]
    return StoredViews(keys, params)


def attach_views(config: DistillConfig, *, stream: Any, joiner: Any, clip: CacheReader | None) -> dict[str, Any]:
    """Wire view replay into a run: ``stream.dataset.view_replay`` (crop / flip in the workers) and
    ``joiner.views`` (targets of the chosen views); check ``config.augment`` against the cache.

    Args:
        config: ``augment``, ``allow_aug_mismatch``, ``seed``.
        stream: the run's ``EpochStream``; joiner: its ``TargetJoiner``; clip: the dual-stream cache (or None).
    Returns:
        ``{"views": {...}}`` for the resolved config (mode, V, spec, mismatch), ``{}`` when nothing is replayed.
    Raises:
        CacheMismatchError: ``augment`` names a spec the cache does not hold (names both and the flag), unless
            ``allow_aug_mismatch``.
        ConfigError: ``augment`` is not a valid spec.
    """
    record = clip.manifest.get("views") if clip is not None and clip.kind == "dual" else None
    held = parse_augment(record["augment"]) if record else None
    asked = config.augment.strip()
    if asked == "none" or (asked == "" and held is None):
        return {}
    want = parse_augment(asked) if asked else held
    if held is not None and want == held:
        assert clip is not None and record is not None
        stream.dataset.view_replay = ViewReplay(seed=config.seed, params=stored_view_params(clip))
        joiner.views = ViewTargets(clip, seed=config.seed)
        return {"views": {"mode": "replay", "num_views": record["num_views"], "augment": record["augment"]}}
    assert want is not None
    held_text = f"{record['num_views']} views of {record['augment']}" if record else "no views"
    where = f"cache {clip.path if clip is not None else '(none)'} holds {held_text}"
    if not config.allow_aug_mismatch:
        raise CacheMismatchError(
            f"--augment {want.to_string()}: {where}; the teacher never saw these views. Rebuild the cache with "
            f"--views V --augment '{want.to_string()}', drop --augment to replay the cache's views, or pass "
            "--allow-aug-mismatch to train on views the targets do not belong to"
        )
    _logger.warning("--allow-aug-mismatch: %s, the student draws %s against canonical targets", where, want)
    stream.dataset.view_replay = ViewReplay(seed=config.seed, spec=want)
    return {"views": {"mode": "drawn (mismatch allowed)", "augment": want.to_string(), "mismatch": where}}


__all__ = ["StoredViews", "ViewReplay", "ViewTargets", "attach_views", "choose_view", "stored_view_params"]
