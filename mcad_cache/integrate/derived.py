"""The derived target cache: fixed teacher targets written by ``mcad-cache integrate`` (docs/cache-format.md).

A derived cache is a Zarr v3 group keyed like its parents (rows follow the dual-stream parent's ``image_keys`` /
``text_keys``). It holds what a student run reads as **fixed targets**: the target anchor features (modified, or
CLIP's for fusion / mixture / none), each query's K candidates (ids into this cache's own rows) with the target,
CLIP-only and ITM log-probabilities over them, and the positive flags (duplicate caption texts included). Its
manifest (group attribute :data:`DERIVED_ATTR`) fingerprints both parents and the integration config, and holds the
diagnostics; ``complete`` is written last. A teacher cache's attribute (``mcad_cache``) is absent, so a derived cache
is never mistaken for a teacher cache.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from mcad_cache.cache.manifest import fingerprint_diff, format_diff, to_jsonable, utc_now
from mcad_cache.cache.reader import GroupReader
from mcad_cache.errors import (
    CacheIncompleteError,
    CacheKeyError,
    CacheMismatchError,
    CacheNotFoundError,
    CacheSchemaError,
)

DERIVED_ATTR = "mcad_cache_derived"  # group attribute holding a derived cache's manifest
DERIVED_SCHEMA_VERSION = 1
DIRECTIONS = ("i2t", "t2i")


@dataclass(frozen=True)
class DerivedLayout:
    """Sizes of a derived cache (stored in its manifest)."""

    num_images: int  # N_i image rows (the dual-stream parent's)
    num_texts: int  # N_t text rows
    emb_dim: int  # Dc, width of the target features (the CLIP teacher's)
    k: int  # K candidates per query, both directions
    rows_per_chunk: int = 4096  # rows per Zarr chunk
    kind: str = "derived"

    def dim_sizes(self) -> dict[str, int]:
        return {
            "image": self.num_images,
            "text": self.num_texts,
            "image_offsets": self.num_images + 1,
            "emb_dim": self.emb_dim,
            "k": self.k,
        }


# name -> (dims, dtype, fill value, meaning); the one table of the derived schema.
ARRAYS: dict[str, tuple[tuple[str, ...], str, Any, str]] = {
    "image_keys": (("image",), "str", "", "sample key of each image row (the dual-stream parent's order)"),
    "text_keys": (("text",), "str", "", "'<sample key>#<caption index>' of each text row"),
    "captions": (("text",), "str", "", "caption string of each text row"),
    "txt2img": (("text",), "int32", -1, "image row of each text row"),
    "img2txt_offsets": (("image_offsets",), "int32", -1, "CSR: texts of image i are rows o[i]:o[i+1]"),
    "image_valid": (("image",), "bool", False, "row usable (valid in both parents)"),
    "text_valid": (("text",), "bool", False, "row usable (valid in both parents)"),
    "image_emb": (("image", "emb_dim"), "float32", np.nan, "target image feature v' (L2-normalised; NaN = invalid)"),
    "text_emb": (("text", "emb_dim"), "float32", np.nan, "target text feature t' (L2-normalised; NaN = invalid)"),
}
for _d, _q in (("i2t", "image"), ("t2i", "text")):
    ARRAYS.update(
        {
            f"{_d}_idx": ((_q, "k"), "int32", -1, f"{_d} candidate rows of this cache (-1 = empty slot)"),
            f"{_d}_logits": ((_q, "k"), "float32", np.nan, "target log-probabilities over the K candidates (τ = 1)"),
            f"{_d}_clip_logits": ((_q, "k"), "float32", np.nan, "CLIP-only log-probabilities (c / tau_clip)"),
            f"{_d}_itm_logits": ((_q, "k"), "float32", np.nan, "single-stream ITM log-probabilities (a / tau_itm)"),
            f"{_d}_is_positive": ((_q, "k"), "bool", False, "ground-truth pair, or the same caption text"),
            f"{_d}_forced": ((_q, "k"), "bool", False, "slot holds a positive forced in by force_positive"),
        }
    )


def is_derived(path: str | Path) -> bool:
    """True when ``path`` holds a derived cache (a Zarr v3 group with the derived manifest attribute)."""
    p = Path(path) / "zarr.json"
    if not p.is_file():
        return False
    try:
        return DERIVED_ATTR in dict(zarr.open_group(str(Path(path)), mode="r", zarr_format=3).attrs)
    except (FileNotFoundError, ValueError, TypeError, KeyError):
        return False


def read_manifest(path: str | Path) -> dict[str, Any] | None:
    """The manifest of the derived cache at ``path``, or None when there is none."""
    if not is_derived(path):
        return None
    return dict(zarr.open_group(str(Path(path)), mode="r", zarr_format=3).attrs[DERIVED_ATTR])


class DerivedWriter:
    """Writes one derived cache into a fresh directory (see :func:`create`); chunk-aligned row writes."""

    def __init__(self, group: zarr.Group, layout: DerivedLayout) -> None:
        self.group = group
        self.layout = layout

    @classmethod
    def create(cls, path: str | Path, *, layout: DerivedLayout, manifest: dict[str, Any]) -> DerivedWriter:
        """Create every array (filled with its fill value) and the manifest (``complete=False``) at ``path``.

        Raises:
            FileExistsError: ``path`` exists.
        """
        path = Path(path)
        if path.exists():
            raise FileExistsError(f"{path} already exists")
        group = zarr.open_group(str(path), mode="w-", zarr_format=3)
        group.attrs[DERIVED_ATTR] = to_jsonable(
            {**manifest, "schema_version": DERIVED_SCHEMA_VERSION, "layout": layout.__dict__, "complete": False}
        )
        sizes = layout.dim_sizes()
        for name, (dims, dtype, fill, doc) in ARRAYS.items():
            shape = tuple(sizes[d] for d in dims)
            group.create_array(
                name,
                shape=shape,
                chunks=(max(1, min(layout.rows_per_chunk, shape[0])), *(max(1, s) for s in shape[1:])),
                dtype=str if dtype == "str" else dtype,
                fill_value=fill,
                dimension_names=dims,
                attributes={"doc": doc},
            )
        return cls(group, layout)

    def write(self, name: str, start: int, values: np.ndarray) -> None:
        """Rows ``[start, start + len(values))`` of ``name`` (``start`` a multiple of ``rows_per_chunk``)."""
        arr = self.group[name]
        if start % self.layout.rows_per_chunk:
            raise ValueError(f"{name}: write at row {start} is not aligned to {self.layout.rows_per_chunk}-row chunks")
        dtype = ARRAYS[name][1]
        values = np.asarray(values)
        arr[start : start + values.shape[0]] = values if dtype == "str" else values.astype(dtype)

    def mark_complete(self, updates: dict[str, Any]) -> None:
        """Write the final manifest with ``complete=True`` (the last write)."""
        manifest = {**dict(self.group.attrs[DERIVED_ATTR]), **updates, "finished_at": utc_now(), "complete": True}
        self.group.attrs[DERIVED_ATTR] = to_jsonable(manifest)


def replace_dir(src: Path, dst: Path) -> None:
    """Move the finished ``src`` to ``dst``, replacing whatever is there (the derived cache appears whole)."""
    if dst.exists():
        shutil.rmtree(dst)
    src.rename(dst)


class DerivedReader(GroupReader):
    """Read access to a derived cache; the members the distill join reads, as ``cache.CacheReader`` names them.

    Float outputs are float32 numpy arrays; every array but the features is loaded on first use (features too: a
    derived cache holds one vector per row, not per candidate).
    """

    kind = "derived"

    def __init__(self, path: str | Path) -> None:
        """Raises:
        CacheNotFoundError: no derived cache at ``path``.
        CacheSchemaError: another derived schema version, or an array missing / misshapen.
        """
        self._reset(path)
        manifest = read_manifest(self.path)
        if manifest is None:
            raise CacheNotFoundError(
                f"no derived target cache at {self.path}; write one with `mcad-cache integrate --out {self.path}`"
            )
        if manifest.get("schema_version") != DERIVED_SCHEMA_VERSION:
            raise CacheSchemaError(
                f"{self.path}: derived cache schema version {manifest.get('schema_version')!r}, this code reads "
                f"{DERIVED_SCHEMA_VERSION}; rerun `mcad-cache integrate`"
            )
        self.manifest = manifest
        lay = dict(manifest["layout"])
        self.layout = DerivedLayout(**lay)
        self._index: dict[str, dict[str, int]] = {}
        sizes = self.layout.dim_sizes()
        problems = []
        for name, (dims, _, _, _) in ARRAYS.items():
            if name not in set(self.group.array_keys()):
                problems.append(f"{name}: missing")
            elif tuple(self.group[name].shape) != tuple(sizes[d] for d in dims):
                problems.append(f"{name}: shape {tuple(self.group[name].shape)}")
        if problems:
            raise CacheSchemaError(f"{self.path}: not a valid derived cache: " + "; ".join(problems))

    def __getstate__(self) -> dict[str, Any]:
        return {"path": str(self.path)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"])

    # ------------------------------------------------------------------------------------------------ properties
    @property
    def teacher(self) -> str:
        """``"derived:<integration>"``."""
        return f"derived:{self.fingerprint.get('integration', {}).get('integration', '?')}"

    @property
    def k(self) -> int:
        return self.layout.k

    @property
    def logit_scale(self) -> float:
        """The dual-stream (CLIP) parent's linear logit scale (in-batch targets are ``S · v' t'ᵀ``)."""
        return float(self.manifest["logit_scale"])

    @property
    def view(self) -> dict[str, Any]:
        """The teachers' image view (the dual-stream parent's preprocessing: size, resize mode, crop, ...)."""
        return dict(self.manifest.get("view", {}))

    @property
    def num_images(self) -> int:
        return self.layout.num_images

    @property
    def num_texts(self) -> int:
        return self.layout.num_texts

    image_keys = property(lambda self: self._load("image_keys"))
    text_keys = property(lambda self: self._load("text_keys"))
    captions = property(lambda self: self._load("captions"))
    txt2img = property(lambda self: self._load("txt2img"))
    img2txt_offsets = property(lambda self: self._load("img2txt_offsets"))
    image_valid = property(lambda self: self._load("image_valid"))
    text_valid = property(lambda self: self._load("text_valid"))

    def _rows(self, which: str, keys: Sequence[str]) -> np.ndarray:
        if which not in self._index:
            names = self.image_keys if which == "image" else self.text_keys
            self._index[which] = {str(k): i for i, k in enumerate(names.tolist())}
        index = self._index[which]
        missing = [str(k) for k in keys if str(k) not in index]
        if missing:
            raise CacheKeyError(
                f"{self.path}: {len(missing)} {which} key(s) not in the derived cache, e.g. {missing[:5]}"
            )
        return np.fromiter((index[str(k)] for k in keys), dtype=np.int32, count=len(keys))

    def image_rows(self, keys: Sequence[str]) -> np.ndarray:
        """Image rows of sample ``keys``, int32 [B]. Raises: CacheKeyError naming missing keys."""
        return self._rows("image", keys)

    def text_rows(self, keys: Sequence[str]) -> np.ndarray:
        """Text rows of ``"<key>#<j>"`` keys, int32 [B]. Raises: CacheKeyError naming missing keys."""
        return self._rows("text", keys)

    def image_emb(self, rows: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """Target image features [B, Dc] float32, L2-normalised."""
        emb = self._load("image_emb")
        return emb if rows is None else emb[np.asarray(rows, dtype=np.int64)]

    def text_emb(self, rows: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """Target text features [B, Dc] float32, L2-normalised."""
        emb = self._load("text_emb")
        return emb if rows is None else emb[np.asarray(rows, dtype=np.int64)]

    def topk(self, direction: str, rows: Sequence[int] | np.ndarray, *, k: int | None = None, **_: Any) -> dict:
        """The first ``k`` candidates of query ``rows``.

        Returns:
            ``idx`` [B, k] int32 (-1 = empty), ``valid`` [B, k] bool, ``is_positive`` [B, k] bool, ``logits`` [B, k]
            float32 target log-probabilities at τ = 1, ``clip_logits`` and ``itm_logits`` [B, k] (CLIP-only and ITM
            log-probabilities), ``forced`` [B, k] bool. Log-probabilities are over all cached K; a softmax over the
            first k renormalises them.
        Raises:
            CacheSchemaError: k above the cache's k, or an unknown direction.
        """
        if direction not in DIRECTIONS:
            raise CacheSchemaError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
        kk = self.k if k is None else int(k)
        if not 0 < kk <= self.k:
            raise CacheSchemaError(
                f"{self.path}: requested k={kk}, but the derived cache holds k={self.k} candidates per query; "
                f"use --k {self.k} or less, or rerun `mcad-cache integrate --k {kk}`"
            )
        r = np.asarray(rows, dtype=np.int64)
        idx = self._load(f"{direction}_idx")[r, :kk].astype(np.int32)
        out = {"idx": idx, "valid": idx >= 0}
        for name in ("logits", "clip_logits", "itm_logits", "is_positive", "forced"):
            out[name] = self._load(f"{direction}_{name}")[r, :kk]
        return out

    def require(self, *, complete: bool = True, expect: dict[str, Any] | None = None) -> DerivedReader:
        """Refuse an incomplete derived cache, or one whose fingerprint differs from ``expect`` (a subset).

        Raises:
            CacheIncompleteError, CacheMismatchError (with a readable diff).
        """
        if complete and not self.complete:
            raise CacheIncompleteError(
                f"{self.path}: the derived cache is incomplete; rerun the same `mcad-cache integrate` command"
            )
        if expect:
            lines = fingerprint_diff(self.fingerprint, expect, subset=True)
            if lines:
                raise CacheMismatchError(f"{self.path}: the derived cache was made differently:{format_diff(lines)}")
        return self

    def __repr__(self) -> str:
        return f"DerivedReader({str(self.path)!r}, {self.teacher}, images={self.num_images}, k={self.k})"


def open_derived(path: str | Path) -> DerivedReader:
    """Open a derived cache (``DerivedReader``). Raises: CacheNotFoundError, CacheSchemaError."""
    return DerivedReader(path)


def describe_derived(reader: DerivedReader) -> dict[str, Any]:
    """``inspect``'s summary of a derived cache, in the shape of ``cache.describe_cache``: manifest, arrays, bytes,
    and the integration diagnostics as statistics (gates, KL to CLIP-only and ITM, ranking agreement)."""
    arrays, total = {}, 0
    for name in ARRAYS:
        arr = reader.array(name)
        try:
            stored = int(arr.nbytes_stored())
        except (AttributeError, NotImplementedError, TypeError):
            stored = 0
        total += stored
        arrays[name] = {
            "shape": list(arr.shape),
            "dtype": str(arr.dtype),
            "dims": list(arr.metadata.dimension_names or ()),
            "chunks": list(arr.chunks),
            "stored_bytes": stored,
        }
    stats: dict[str, Any] = {
        "valid_images": int(reader.image_valid.sum()),
        "valid_texts": int(reader.text_valid.sum()),
    }
    diag = reader.manifest.get("diagnostics", {})
    for key, value in diag.items():
        if isinstance(value, (int, float, str)):
            stats[key] = value
        elif isinstance(value, dict) and all(isinstance(v, (int, float)) for v in value.values()):
            stats[key] = value
    return {
        "path": str(reader.path),
        "manifest": reader.manifest,
        "arrays": arrays,
        "stored_bytes": total,
        "bytes_per_sample": total / max(1, reader.num_images),
        "stats": stats,
    }


__all__ = [
    "ARRAYS",
    "DERIVED_ATTR",
    "DERIVED_SCHEMA_VERSION",
    "DerivedLayout",
    "DerivedReader",
    "DerivedWriter",
    "describe_derived",
    "is_derived",
    "open_derived",
    "read_manifest",
    "replace_dir",
]
