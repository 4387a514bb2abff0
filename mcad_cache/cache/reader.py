"""Read access to a cache: ``CacheReader`` / ``open_cache`` (used by training, evaluation and ``inspect``), and
``open_group``, the one way this package opens a cache's Zarr v3 group.

Layout and meaning of every array: ``mcad_cache.cache.schema`` and ``docs/cache-format.md``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from mcad_cache.cache.codecs import dequantize_int8
from mcad_cache.cache.manifest import fingerprint_diff, format_diff
from mcad_cache.cache.schema import DIRECTIONS, MANIFEST_ATTR, CacheLayout, array_specs, validate
from mcad_cache.errors import (
    CacheIncompleteError,
    CacheKeyError,
    CacheMismatchError,
    CacheNotFoundError,
    CacheSchemaError,
)


def open_group(path: str | Path, *, mode: str) -> zarr.Group:
    """The Zarr v3 group of the cache at ``path`` (``mode`` as ``zarr.open_group``: "r", "r+").

    Raises:
        CacheNotFoundError: no ``zarr.json`` at ``path``, or not a readable Zarr v3 group.
    """
    p = Path(path)
    if not (p / "zarr.json").is_file():
        raise CacheNotFoundError(f"no cache at {p} (no zarr.json); build one with `mcad-cache build`")
    try:
        return zarr.open_group(str(p), mode=mode, zarr_format=3)
    except (FileNotFoundError, ValueError, TypeError, KeyError) as err:
        raise CacheNotFoundError(f"{p} is not a readable Zarr v3 group: {err}") from err


class GroupReader:
    """What every reader of a Zarr v3 cache group shares (``CacheReader``, ``integrate.derived.DerivedReader``):
    the lazily opened read-only group (through :func:`open_group`), raw arrays by name, whole arrays loaded into
    memory once, and the manifest's ``fingerprint`` / ``complete``. Subclasses set ``path`` and ``manifest``."""

    path: Path
    manifest: dict[str, Any]
    _group: zarr.Group | None = None

    def _reset(self, path: str | Path) -> None:
        self.path = Path(path)
        self._group = None
        self._mem: dict[str, np.ndarray] = {}

    @property
    def group(self) -> zarr.Group:
        """The open Zarr group (opened read-only on first use in each process)."""
        if self._group is None:
            self._group = open_group(self.path, mode="r")
        return self._group

    def array(self, name: str) -> zarr.Array:
        """The raw Zarr array ``name`` (see ``docs/cache-format.md``)."""
        return self.group[name]

    def _load(self, name: str) -> np.ndarray:
        if name not in self._mem:
            self._mem[name] = np.asarray(self.group[name][:])
        return self._mem[name]

    @property
    def fingerprint(self) -> dict[str, Any]:
        """The build's fingerprint (what ``require(expect=...)`` compares)."""
        return self.manifest.get("fingerprint", {})

    @property
    def complete(self) -> bool:
        """True once the build finished (the manifest's last write)."""
        return bool(self.manifest.get("complete"))


class CacheReader(GroupReader):
    """Read access to one teacher's cache (``open_cache``). All float outputs are float32 numpy arrays.

    Small arrays (keys, maps, validity, embeddings, top-k ids / similarities / flags / ITM logits) are loaded into
    memory on first use; fused features are read per call (chunks of ``fused_rows_per_chunk`` rows).
    Picklable: a pickled reader carries only its path and reopens the store lazily in the receiving process (one
    reader per DataLoader worker).
    """

    def __init__(self, path: str | Path, *, check_schema: bool = True, preload: bool = False) -> None:
        """Open the cache at ``path``.

        Args:
            path: the cache directory.
            check_schema: validate the manifest and every array against the schema (cheap: metadata only).
            preload: load the in-memory arrays now (keys, maps, validity, embeddings, top-k ids / similarities /
                flags / ITM logits / int8 scales) instead of on first use. A pickled reader drops them and loads what
                it uses in the receiving process.

        Raises:
            CacheNotFoundError: nothing (or no Zarr v3 group) at ``path``.
            CacheSchemaError: another schema version, or arrays that do not match the layout.
        """
        self._reset(path)
        self._check_schema = check_schema
        self._key_index: dict[str, dict[str, int]] = {}
        group = self.group
        if check_schema:
            self.manifest = validate(group)
        else:
            self.manifest = dict(group.attrs.get(MANIFEST_ATTR) or {})
        self.layout = CacheLayout.from_dict(self.manifest.get("layout") or {})
        if preload:
            self.preload()

    def preload(self) -> CacheReader:
        """Load every array that is served from memory (see the class docstring); returns self."""
        for name, spec in array_specs(self.layout).items():
            if not spec.small_chunks:
                self._load(name)
        return self

    # ------------------------------------------------------------------------------------------------ pickling
    def __getstate__(self) -> dict[str, Any]:
        return {"path": str(self.path), "check_schema": False, "manifest": self.manifest}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._reset(state["path"])
        self._check_schema = False
        self._key_index = {}
        self.manifest = state["manifest"]
        self.layout = CacheLayout.from_dict(self.manifest["layout"])

    # --------------------------------------------------------------------------------------------- properties
    @property
    def teacher(self) -> str:
        """Teacher registry name."""
        return self.fingerprint.get("teacher", {}).get("name", "")

    @property
    def kind(self) -> str:
        """``"dual"`` or ``"single"``."""
        return self.layout.kind

    @property
    def k(self) -> int:
        """Candidates per query stored in both directions."""
        return self.layout.k

    @property
    def logit_scale(self) -> float:
        """The teacher's linear ITC logit scale (logits = logit_scale * sims)."""
        return float(self.manifest["logit_scale"])

    @property
    def num_images(self) -> int:
        return self.layout.num_images

    @property
    def num_texts(self) -> int:
        return self.layout.num_texts

    @property
    def image_keys(self) -> np.ndarray:
        """[N_i] str: sample key of each image row."""
        return self._load("image_keys")

    @property
    def text_keys(self) -> np.ndarray:
        """[N_t] str: ``"<sample key>#<caption index>"`` of each text row."""
        return self._load("text_keys")

    @property
    def captions(self) -> np.ndarray:
        """[N_t] str: caption of each text row."""
        return self._load("captions")

    @property
    def txt2img(self) -> np.ndarray:
        """[N_t] int32: image row of each text row."""
        return self._load("txt2img")

    @property
    def img2txt_offsets(self) -> np.ndarray:
        """[N_i + 1] int32 CSR offsets: texts of image i are rows ``offsets[i]:offsets[i + 1]``."""
        return self._load("img2txt_offsets")

    @property
    def image_valid(self) -> np.ndarray:
        """[N_i] bool."""
        return self._load("image_valid")

    @property
    def text_valid(self) -> np.ndarray:
        """[N_t] bool."""
        return self._load("text_valid")

    def img2txt(self, row: int) -> np.ndarray:
        """Text rows of image ``row``: int32 [n] (n >= 1)."""
        o = self.img2txt_offsets
        return np.arange(o[row], o[row + 1], dtype=np.int32)

    # ---------------------------------------------------------------------------------------------- keyed access
    def _rows(self, which: str, keys: Sequence[str]) -> np.ndarray:
        if which not in self._key_index:
            names = self.image_keys if which == "image" else self.text_keys
            self._key_index[which] = {str(k): i for i, k in enumerate(names.tolist())}
        index = self._key_index[which]
        keys = [str(k) for k in keys]
        missing = [k for k in keys if k not in index]
        if missing:
            raise CacheKeyError(
                f"{self.path}: {len(missing)} of {len(keys)} {which} key(s) not in the cache, e.g. {missing[:5]} "
                f"(was the cache built on these shards? see `mcad-cache inspect {self.path}`)"
            )
        return np.fromiter((index[k] for k in keys), dtype=np.int32, count=len(keys))

    def image_rows(self, keys: Sequence[str]) -> np.ndarray:
        """Image rows of sample ``keys``: int32 [B].

        Raises:
            CacheKeyError: some keys are not in the cache (named in the message).
        """
        return self._rows("image", keys)

    def text_rows(self, keys: Sequence[str]) -> np.ndarray:
        """Text rows of text keys ``"<sample key>#<caption index>"``: int32 [B].

        Raises:
            CacheKeyError: some keys are not in the cache.
        """
        return self._rows("text", keys)

    def image_emb(self, rows: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """Image embeddings [B, D] float32, L2-normalised (NaN rows: invalid images). ``None``: all rows."""
        emb = self._load("image_emb")
        out = emb if rows is None else emb[np.asarray(rows, dtype=np.int64)]
        return out.astype(np.float32)

    def text_emb(self, rows: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """Text embeddings [B, D] float32, L2-normalised (NaN rows: invalid texts). ``None``: all rows."""
        emb = self._load("text_emb")
        out = emb if rows is None else emb[np.asarray(rows, dtype=np.int64)]
        return out.astype(np.float32)

    def topk(
        self,
        direction: str,
        rows: Sequence[int] | np.ndarray,
        *,
        k: int | None = None,
        fused: bool | None = None,
    ) -> dict[str, np.ndarray]:
        """Cached top-k candidates of query ``rows``, sliced to the first ``k`` (the k most similar by ITC).

        Args:
            direction: ``"i2t"`` (rows are image rows, candidates text rows) or ``"t2i"``.
            rows: [B] query rows (``image_rows`` / ``text_rows`` of the batch's keys).
            k: k' <= the cache's k (default: the cache's k).
            fused: also read fused [CLS] features (default: when the cache has them).
        Returns:
            ``idx`` [B, k] int32 candidate rows (-1 = empty slot), ``sims`` [B, k] float32 ITC cosine similarity
            (NaN = empty), ``is_positive`` [B, k] bool, ``valid`` [B, k] bool (idx >= 0); single-stream caches add
            ``itm_logits`` [B, k, 2] float32 raw ITM logits [negative, positive] and, with fused,
            ``fused_cls`` [B, k, C] float32 (upcast from fp16 or dequantised from int8).
        Raises:
            CacheSchemaError: k > the cache's k (the message says what the cache has), or an unknown direction.
            ValueError: fused=True on a cache without fused features.
        """
        if direction not in DIRECTIONS:
            raise CacheSchemaError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
        kk = self.k if k is None else int(k)
        if kk > self.k or kk <= 0:
            raise CacheSchemaError(
                f"{self.path}: requested k={kk}, but the cache holds k={self.k} candidates per query "
                f"(any 1 <= k' <= {self.k} works; rebuild with --k {kk} for more)"
            )
        r = np.asarray(rows, dtype=np.int64)
        idx = self._load(f"{direction}_idx")[r, :kk]
        out = {
            "idx": idx.astype(np.int32),
            "sims": self._load(f"{direction}_sims")[r, :kk].astype(np.float32),
            "is_positive": self._load(f"{direction}_is_positive")[r, :kk].astype(bool),
            "valid": idx >= 0,
        }
        if self.kind == "single":
            out["itm_logits"] = self._load(f"{direction}_itm_logits")[r, :kk].astype(np.float32)
        want_fused = self.layout.has_fused if fused is None else fused
        if want_fused:
            if not self.layout.has_fused:
                raise ValueError(f"{self.path}: this cache stores no fused features (kind={self.kind})")
            out["fused_cls"] = self.fused(direction, r, k=kk)
        return out

    def fused(self, direction: str, rows: Sequence[int] | np.ndarray, *, k: int | None = None) -> np.ndarray:
        """Fused [CLS] features [B, k, C] float32 of query ``rows`` (NaN for empty slots), read from disk."""
        kk = self.k if k is None else int(k)
        r = np.asarray(rows, dtype=np.int64)
        uniq, inverse = np.unique(r, return_inverse=True)
        arr = self.group[f"{direction}_fused"]
        data = np.asarray(arr.get_orthogonal_selection((uniq, slice(0, kk), slice(None))))
        if self.layout.fused_dtype == "int8":
            scale = self._load(f"{direction}_fused_scale")[uniq, :kk]
            data = dequantize_int8(data, scale)
        return data.astype(np.float32)[inverse]

    # ---------------------------------------------------------------------------------------------- requirements
    def require(self, *, complete: bool = True, expect: dict[str, Any] | None = None) -> CacheReader:
        """Refuse an incomplete cache, or one whose fingerprint disagrees with ``expect``.

        Args:
            complete: require the manifest's ``complete`` flag.
            expect: a (nested) subset of the fingerprint, e.g. ``{"teacher": {"weights_sha256": ...}, "k": 11}``;
                only the keys given are compared.
        Returns:
            self.
        Raises:
            CacheIncompleteError: the build did not finish (rerun the same build command to resume).
            CacheMismatchError: a differing fingerprint entry; the message lists each difference.
        """
        if complete and not self.complete:
            raise CacheIncompleteError(
                f"{self.path}: the cache is incomplete (its build was interrupted or is still running); "
                "rerun the same `mcad-cache build` command to resume it"
            )
        if expect:
            lines = fingerprint_diff(self.fingerprint, expect, subset=True)
            if lines:
                raise CacheMismatchError(f"{self.path}: the cache was built differently:{format_diff(lines)}")
        return self

    def __repr__(self) -> str:
        return (
            f"CacheReader({str(self.path)!r}, teacher={self.teacher!r}, kind={self.kind!r}, "
            f"images={self.num_images}, texts={self.num_texts}, k={self.k}, complete={self.complete})"
        )


def open_cache(path: str | Path, mode: str = "r", *, preload: bool = False) -> CacheReader:
    """Open a cache for reading (the builder uses :class:`CacheWriter`); ``preload`` loads the in-memory arrays now.

    Raises:
        CacheNotFoundError: nothing at ``path``.
        CacheSchemaError: another schema version or a malformed cache.
        ValueError: ``mode`` is not ``"r"``.
    """
    if mode != "r":
        raise ValueError(f"open_cache reads only (mode='r'); build caches with CacheWriter, got mode={mode!r}")
    return CacheReader(path, preload=preload)


__all__ = ["CacheReader", "open_cache", "open_group"]
