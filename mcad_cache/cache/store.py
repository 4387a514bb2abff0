"""Zarr v3 cache storage: ``CacheWriter`` (used by the build), ``CacheReader`` / ``open_cache`` (used by training,
evaluation and ``inspect``), and the consistency checks of ``inspect --check``.

Layout and meaning of every array: ``mcad_cache.cache.schema`` and ``docs/cache-format.md``.

Crash safety: the builder commits work in *units* of ``rows_per_chunk`` rows along the query dimension: one chunk of
each array (several whole chunks of the fused arrays, which are chunked finer for fast training reads), written by
exactly one writer. After a unit's data is written, its
done marker (one element = one chunk of ``build/done_<stage>``) is written. Zarr's ``LocalStore`` writes each chunk
file atomically (temporary file + rename), so a killed build leaves every chunk either old or new, and a unit whose
marker is set is fully written. The manifest's ``complete`` flag is written last.
"""

from __future__ import annotations

import logging
import shutil
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from mcad_cache.cache.manifest import fingerprint_diff, format_diff, to_jsonable, utc_now
from mcad_cache.cache.schema import (
    BUILD_GROUP,
    DIRECTIONS,
    FP16_MAX,
    INT8_LEVELS,
    MANIFEST_ATTR,
    SCHEMA_VERSION,
    ArraySpec,
    CacheLayout,
    array_specs,
    validate,
)
from mcad_cache.errors import (
    CacheIncompleteError,
    CacheKeyError,
    CacheMismatchError,
    CacheNotFoundError,
    CacheSchemaError,
    NonFiniteError,
)

_logger = logging.getLogger(__name__)

# Build stages, each committed per unit of rows along one dimension.
STAGES: dict[str, str] = {
    "layout": "one",  # keys, captions, maps (written once, from the cheap pass 0)
    "image_emb": "image",  # pass 1: image embeddings + validity + skip codes
    "text_emb": "text",  # pass 1: text embeddings + validity
    "topk_i2t": "image",  # pass 2: candidates, similarities, positive flags
    "topk_t2i": "text",
    "itm_i2t": "image",  # pass 3 (single-stream): ITM logits and fused features for the image queries
    "itm_scratch": "image",  # pass 3a: t2i pair results grouped by image, in scratch files
    "itm_t2i": "text",  # pass 3b: t2i pair results gathered per text unit
}


def num_units(n: int, rows_per_unit: int) -> int:
    """Number of units of ``rows_per_unit`` rows covering ``n`` rows."""
    return (n + rows_per_unit - 1) // rows_per_unit


def unit_range(unit: int, n: int, rows_per_unit: int) -> tuple[int, int]:
    """Row range ``[start, stop)`` of ``unit``."""
    start = unit * rows_per_unit
    return start, min(start + rows_per_unit, n)


def quantize_int8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric absmax int8 quantisation per vector (last axis).

    ``scale = max|x| / 127``; ``q = round(x / scale)`` in [-127, 127]; ``x ~= q * scale`` with
    ``|x - q * scale| <= scale / 2`` per element (absmax quantisation, e.g. Dettmers et al. 2022, LLM.int8(), Sec. 2).
    An all-zero vector gets scale 0 and q 0. NaN vectors (missing) get scale NaN and q 0.

    Args:
        x: [..., C] float array.
    Returns:
        ``(q [..., C] int8, scale [...] float32)``.
    """
    x = np.asarray(x, dtype=np.float32)
    amax = np.abs(x).max(axis=-1)
    scale = (amax / INT8_LEVELS).astype(np.float32)
    safe = np.where(np.isfinite(scale) & (scale > 0), scale, 1.0)[..., None]
    q = np.clip(np.rint(np.nan_to_num(x / safe)), -INT8_LEVELS, INT8_LEVELS).astype(np.int8)
    return q, scale


def dequantize_int8(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Inverse of :func:`quantize_int8`: ``q * scale[..., None]`` as float32 (NaN where the scale is NaN)."""
    return q.astype(np.float32) * np.asarray(scale, dtype=np.float32)[..., None]


def _store_path(path: str | Path) -> str:
    return str(Path(path))


class CacheWriter:
    """Writes one cache. Create with :meth:`create` (fresh) or :meth:`open` (resume).

    Every write covers whole units (``[unit * rows_per_chunk, ...)``), so no two writes ever touch the same chunk.
    Float values are checked before they are stored: a NaN / inf in a valid row, or a value beyond the float16 range
    for a float16 array, raises :class:`NonFiniteError` naming the array and the sample key.
    """

    def __init__(self, group: zarr.Group, layout: CacheLayout) -> None:
        self.group = group
        self.layout = layout
        self.specs = array_specs(layout)

    # ----------------------------------------------------------------------------------------------- create / open
    @classmethod
    def create(
        cls, path: str | Path, *, layout: CacheLayout, manifest: dict[str, Any], overwrite: bool = False
    ) -> CacheWriter:
        """Create a new cache with every array of ``layout`` (filled with the fill values) and the manifest.

        Args:
            path: directory of the Zarr v3 store.
            layout: sizes and storage choices.
            manifest: JSON-able dict; ``schema_version``, ``layout`` and ``complete=False`` are set here.
            overwrite: delete whatever is at ``path`` first.
        Raises:
            FileExistsError: ``path`` exists and ``overwrite`` is False.
        """
        path = Path(path)
        if path.exists():
            if not overwrite:
                raise FileExistsError(f"{path} already exists")
            shutil.rmtree(path)
        group = zarr.open_group(_store_path(path), mode="w-", zarr_format=3)
        manifest = to_jsonable(
            {**manifest, "schema_version": SCHEMA_VERSION, "layout": layout.to_dict(), "complete": False}
        )
        group.attrs[MANIFEST_ATTR] = manifest
        for spec in array_specs(layout).values():
            cls._create_array(group, spec, layout)
        build = group.create_group(BUILD_GROUP, attributes={"doc": "per-unit done markers of the cache build"})
        for stage, dim in STAGES.items():
            if stage.startswith("itm") and layout.kind != "single":
                continue
            n = 1 if dim == "one" else num_units(layout.dim_sizes()[dim], layout.rows_per_chunk)
            build.create_array(
                f"done_{stage}",
                shape=(n,),
                chunks=(1,),
                dtype="bool",
                fill_value=False,
                dimension_names=(f"{stage}_unit",),
            )
        _logger.info(
            "created cache %s (%d images, %d texts, k=%d)", path, layout.num_images, layout.num_texts, layout.k
        )
        return cls(group, layout)

    @staticmethod
    def _create_array(group: zarr.Group, spec: ArraySpec, layout: CacheLayout) -> None:
        dtype: Any = str if spec.dtype == "str" else spec.dtype
        group.create_array(
            spec.name,
            shape=spec.shape(layout),
            chunks=spec.chunks(layout),
            dtype=dtype,
            fill_value=spec.fill_value,
            compressors=None if spec.small_chunks else "auto",
            dimension_names=spec.dims,
            attributes={"doc": spec.doc},
        )

    @classmethod
    def open(cls, path: str | Path) -> CacheWriter:
        """Open an existing cache for writing (resume).

        Raises:
            CacheNotFoundError: no cache at ``path``.
            CacheSchemaError: the cache does not match this code's schema.
        """
        group = _open_group(path, mode="r+")
        manifest = validate(group)
        return cls(group, CacheLayout.from_dict(manifest["layout"]))

    # ------------------------------------------------------------------------------------------------- manifest
    @property
    def manifest(self) -> dict[str, Any]:
        """The manifest currently stored (a copy)."""
        return dict(self.group.attrs[MANIFEST_ATTR])

    def update_manifest(self, updates: dict[str, Any]) -> None:
        """Merge ``updates`` into the manifest's top level (never sets ``complete``; see :meth:`mark_complete`)."""
        if "complete" in updates:
            raise ValueError("use mark_complete() to set the complete flag")
        self.group.attrs[MANIFEST_ATTR] = to_jsonable({**self.manifest, **updates})

    def mark_complete(self, updates: dict[str, Any] | None = None) -> None:
        """Write the final manifest with ``complete=True`` and ``finished_at`` (the build's last write)."""
        manifest = {**self.manifest, **(updates or {}), "finished_at": utc_now(), "complete": True}
        self.group.attrs[MANIFEST_ATTR] = to_jsonable(manifest)

    # ---------------------------------------------------------------------------------------------------- units
    def rows(self, dim: str) -> int:
        """Number of rows along ``dim`` ("image", "text" or "one")."""
        return 1 if dim == "one" else self.layout.dim_sizes()[dim]

    def units(self, stage: str) -> int:
        """Number of commit units of ``stage``."""
        dim = STAGES[stage]
        return 1 if dim == "one" else num_units(self.rows(dim), self.layout.rows_per_chunk)

    def unit_range(self, stage: str, unit: int) -> tuple[int, int]:
        """Row range ``[start, stop)`` of ``unit`` of ``stage``."""
        return unit_range(unit, self.rows(STAGES[stage]), self.layout.rows_per_chunk)

    def done(self, stage: str) -> np.ndarray:
        """[num_units] bool: which units of ``stage`` are committed."""
        return np.asarray(self.group[f"{BUILD_GROUP}/done_{stage}"][:], dtype=bool)

    def mark_done(self, stage: str, unit: int) -> None:
        """Mark ``unit`` of ``stage`` committed (call after its data is written)."""
        self.group[f"{BUILD_GROUP}/done_{stage}"][unit : unit + 1] = np.array([True])

    # ---------------------------------------------------------------------------------------------------- writes
    def write(
        self,
        name: str,
        start: int,
        values: np.ndarray,
        *,
        keys: Sequence[str] | None = None,
        valid: np.ndarray | None = None,
        check: bool = True,
    ) -> None:
        """Write rows ``[start, start + len(values))`` of array ``name``: whole chunks only.

        Args:
            name: array name (``schema.array_specs``).
            start: first row, a multiple of ``rows_per_chunk`` (or 0 for whole-array writes).
            values: [R, ...] values; float values as float32 (converted to the storage dtype here).
            keys: sample key of each row, named in error messages.
            valid: [R] bool; float values of invalid rows are not checked (they should be NaN).
            check: check float values (off for arrays whose NaN marks empty slots, checked by the caller).
        Raises:
            ValueError: the range is not chunk-aligned, or the shape is wrong.
            NonFiniteError: a non-finite value in a valid row, or one beyond the float16 range of a float16 array.
        """
        spec = self.specs[name]
        arr = self.group[name]
        values = np.asarray(values)
        n = arr.shape[0]
        stop = start + values.shape[0]
        rpc = self.layout.rows_per_chunk  # a unit; a whole number of chunks of every array
        if start % rpc or (stop % rpc and stop != n) or stop > n:
            raise ValueError(f"{name}: write [{start}, {stop}) is not aligned to {rpc}-row chunks of {n} rows")
        if values.shape[1:] != tuple(arr.shape[1:]):
            raise ValueError(f"{name}: values {values.shape[1:]} per row, array has {tuple(arr.shape[1:])}")
        if check and values.dtype.kind == "f":
            self._check_float(name, spec, start, values, keys=keys, valid=valid)
        if spec.dtype != "str":
            values = values.astype(spec.dtype)
        arr[start:stop] = values

    def _check_float(self, name: str, spec: ArraySpec, start: int, values: np.ndarray, *, keys, valid) -> None:
        check = values if valid is None else values[np.asarray(valid, dtype=bool)]
        rows = np.arange(values.shape[0]) if valid is None else np.nonzero(valid)[0]
        bad = ~np.isfinite(check)
        what = "not finite"
        if not bad.any() and spec.dtype == "float16":
            bad = np.abs(check) > FP16_MAX
            what = f"beyond the float16 range (|x| > {FP16_MAX:g})"
        if bad.any():
            flat = bad.reshape(bad.shape[0], -1).any(axis=1)
            first = int(rows[np.argmax(flat)])
            key = keys[first] if keys is not None else f"row {start + first}"
            bad_value = check[np.argmax(flat)].reshape(-1)[np.argmax(bad[np.argmax(flat)].reshape(-1))]
            raise NonFiniteError(
                f"array {name!r}: value {float(bad_value)!r} {what} for sample {key!r} (row {start + first}; "
                f"{int(flat.sum())} row(s) in this unit)"
            )

    def write_fused(
        self,
        direction: str,
        start: int,
        fused: np.ndarray,
        *,
        keys: Sequence[str] | None = None,
        valid: np.ndarray | None = None,
    ) -> None:
        """Write fused [CLS] features [R, K, C] float32 of ``direction`` in the layout's storage dtype.

        NaN marks empty candidate slots. fp16: values beyond the float16 range are an error. int8: per-vector
        absmax quantisation (:func:`quantize_int8`), scale stored in ``<direction>_fused_scale``.

        Raises:
            NonFiniteError: an inf, or an fp16 overflow, in a filled slot (names the sample key).
        """
        if not self.layout.has_fused:
            return
        fused = np.asarray(fused, dtype=np.float32)
        slot_filled = ~np.isnan(fused).all(axis=-1)  # [R, K]
        if valid is not None:
            slot_filled &= np.asarray(valid, dtype=bool)[:, None]
        row_ok = slot_filled.any(axis=1)
        check = np.where(slot_filled[..., None], fused, 0.0)
        self._check_float(f"{direction}_fused", self.specs[f"{direction}_fused"], start, check, keys=keys, valid=row_ok)
        if self.layout.fused_dtype == "int8":
            q, scale = quantize_int8(fused)
            scale = np.where(slot_filled, scale, np.nan).astype(np.float32)
            self.write(f"{direction}_fused", start, q)
            self.write(f"{direction}_fused_scale", start, scale, check=False)
        else:
            self.write(f"{direction}_fused", start, fused, check=False)


def _open_group(path: str | Path, *, mode: str) -> zarr.Group:
    p = Path(path)
    if not (p / "zarr.json").is_file():
        raise CacheNotFoundError(f"no cache at {p} (no zarr.json); build one with `mcad-cache build`")
    try:
        return zarr.open_group(_store_path(p), mode=mode, zarr_format=3)
    except (FileNotFoundError, ValueError, TypeError, KeyError) as err:
        raise CacheNotFoundError(f"{p} is not a readable Zarr v3 group: {err}") from err


class CacheReader:
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
        self.path = Path(path)
        self._check_schema = check_schema
        self._group: zarr.Group | None = None
        self._mem: dict[str, np.ndarray] = {}
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
        self.path = Path(state["path"])
        self._check_schema = False
        self._group = None
        self._mem = {}
        self._key_index = {}
        self.manifest = state["manifest"]
        self.layout = CacheLayout.from_dict(self.manifest["layout"])

    @property
    def group(self) -> zarr.Group:
        """The open Zarr group (opened read-only on first use in each process)."""
        if self._group is None:
            self._group = _open_group(self.path, mode="r")
        return self._group

    def array(self, name: str) -> zarr.Array:
        """The raw Zarr array ``name`` (see ``docs/cache-format.md``)."""
        return self.group[name]

    def _load(self, name: str) -> np.ndarray:
        if name not in self._mem:
            self._mem[name] = np.asarray(self.group[name][:])
        return self._mem[name]

    # --------------------------------------------------------------------------------------------- properties
    @property
    def fingerprint(self) -> dict[str, Any]:
        """The build's fingerprint (what ``require(expect=...)`` compares)."""
        return self.manifest.get("fingerprint", {})

    @property
    def complete(self) -> bool:
        """True once the build finished (the manifest's last write)."""
        return bool(self.manifest.get("complete"))

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


# ------------------------------------------------------------------------------------------------- inspection
def _nbytes(arr: zarr.Array) -> int:
    try:
        return int(arr.nbytes_stored())
    except (AttributeError, NotImplementedError, TypeError):
        return 0


def describe_cache(reader: CacheReader) -> dict[str, Any]:
    """Summary for ``inspect``: manifest, per-array shape / dtype / stored bytes, bytes per sample, statistics.

    Statistics are over valid rows: min / max / mean of similarities and ITM logits, mean L2 norm of embeddings,
    fraction of positives among candidates, fraction of filled candidate slots.
    """
    arrays = {}
    total = 0
    for name in sorted(array_specs(reader.layout)):
        arr = reader.array(name)
        stored = _nbytes(arr)
        total += stored
        arrays[name] = {
            "shape": list(arr.shape),
            "dtype": str(arr.dtype),
            "dims": list(arr.metadata.dimension_names or ()),
            "chunks": list(arr.chunks),
            "stored_bytes": stored,
        }
    n = max(1, reader.num_images)
    stats: dict[str, Any] = {}
    iv, tv = reader.image_valid, reader.text_valid
    stats["valid_images"] = int(iv.sum())
    stats["valid_texts"] = int(tv.sum())
    for which, valid in (("image", iv), ("text", tv)):
        emb = reader.image_emb() if which == "image" else reader.text_emb()
        if valid.any():
            stats[f"{which}_emb_norm_mean"] = float(np.linalg.norm(emb[valid], axis=1).mean())
    for d, valid in (("i2t", iv), ("t2i", tv)):
        res = reader.topk(d, np.nonzero(valid)[0], fused=False)
        filled = res["valid"]
        if filled.any():
            s = res["sims"][filled]
            stats[f"{d}_sims"] = {"min": float(s.min()), "max": float(s.max()), "mean": float(s.mean())}
            stats[f"{d}_positive_fraction"] = float(res["is_positive"][filled].mean())
            stats[f"{d}_queries_with_positive"] = float(res["is_positive"].any(axis=1).mean())
            if "itm_logits" in res:
                m = res["itm_logits"][..., 1][filled] - res["itm_logits"][..., 0][filled]
                stats[f"{d}_itm_margin"] = {"min": float(m.min()), "max": float(m.max()), "mean": float(m.mean())}
        stats[f"{d}_filled_fraction"] = float(filled.mean()) if filled.size else 0.0
    return {
        "path": str(reader.path),
        "manifest": reader.manifest,
        "arrays": arrays,
        "stored_bytes": total,
        "bytes_per_sample": total / n,
        "stats": stats,
    }


def check_cache(reader: CacheReader) -> list[str]:
    """Consistency checks of ``inspect --check``; returns one line per problem (empty: all good).

    Checks: manifest complete; every build unit done; key uniqueness (images and texts); maps (offsets monotone from
    0 to N_t, ``txt2img`` consistent with them, text keys ``<image key>#<j>``); validity (text valid iff its image is
    valid; valid rows have finite, unit-norm embeddings; invalid rows are NaN); candidate ids in range, valid, unique
    per row and -1 only in trailing slots; similarities finite where ids are set, NaN elsewhere, sorted descending and
    equal to the dot product of the stored embeddings (fp16 tolerance); ``is_positive`` equal to the maps; ITM logits
    and fused features finite where ids are set.
    """
    problems: list[str] = []
    lay = reader.layout
    if not reader.complete:
        problems.append("manifest: complete is not true (interrupted build)")
    try:
        build = reader.group[BUILD_GROUP]
        for name in build.array_keys():
            done = np.asarray(build[name][:])
            if not done.all():
                problems.append(f"build/{name}: {int((~done).sum())} of {done.size} unit(s) not done")
    except KeyError:
        problems.append("build group missing")
    ik, tk = reader.image_keys, reader.text_keys
    for which, keys in (("image_keys", ik), ("text_keys", tk)):
        vals = [str(x) for x in keys.tolist()]
        if len(set(vals)) != len(vals):
            dup = sorted(x for x, c in Counter(vals).items() if c > 1)[:5]
            problems.append(f"{which}: {len(vals) - len(set(vals))} duplicate key(s), e.g. {dup}")
        if any(v == "" for v in vals):
            problems.append(f"{which}: empty key(s)")
    off, t2i_map = reader.img2txt_offsets.astype(np.int64), reader.txt2img.astype(np.int64)
    if off[0] != 0 or off[-1] != lay.num_texts or (np.diff(off) < 1).any():
        problems.append("img2txt_offsets: not 0..N_t with >= 1 caption per image")
    else:
        expect = np.repeat(np.arange(lay.num_images), np.diff(off))
        if not np.array_equal(expect, t2i_map):
            problems.append("txt2img: disagrees with img2txt_offsets")
        else:
            j = np.arange(lay.num_texts) - off[t2i_map]
            want = [f"{ik[i]}#{jj}" for i, jj in zip(t2i_map.tolist(), j.tolist(), strict=True)]
            if [str(x) for x in tk.tolist()] != want:
                problems.append("text_keys: not '<image key>#<caption index>' in row order")
    iv, tv = reader.image_valid, reader.text_valid
    if (t2i_map >= 0).all() and t2i_map.size and not np.array_equal(tv, iv[t2i_map]):
        problems.append("text_valid: differs from image_valid of the text's image")
    for which, emb, valid in (("image_emb", reader.image_emb(), iv), ("text_emb", reader.text_emb(), tv)):
        if valid.any():
            ev = emb[valid]
            if not np.isfinite(ev).all():
                problems.append(f"{which}: non-finite values in {int((~np.isfinite(ev).all(1)).sum())} valid row(s)")
            else:
                norms = np.linalg.norm(ev, axis=1)
                if np.abs(norms - 1).max() > 1e-2:
                    lo, hi = norms.min(), norms.max()
                    problems.append(f"{which}: valid rows not L2-normalised (norms {lo:.4f}..{hi:.4f})")
        if (~valid).any() and not np.isnan(emb[~valid]).all():
            problems.append(f"{which}: invalid rows hold values (expected NaN)")
    for d, n_gal, q_valid, g_valid in (
        ("i2t", lay.num_texts, iv, tv),
        ("t2i", lay.num_images, tv, iv),
    ):
        n_q = q_valid.shape[0]
        res = reader.topk(d, np.arange(n_q), fused=False)
        idx, sims, pos = res["idx"].astype(np.int64), res["sims"], res["is_positive"]
        filled = idx >= 0
        if ((idx < -1) | (idx >= n_gal)).any():
            problems.append(f"{d}_idx: ids outside [-1, {n_gal})")
            continue
        if (filled[~q_valid]).any():
            problems.append(f"{d}_idx: invalid query rows have candidates")
        if filled.any() and not g_valid[idx[filled]].all():
            problems.append(f"{d}_idx: candidates that are invalid rows")
        if (np.diff(filled.astype(np.int8), axis=1) > 0).any():
            problems.append(f"{d}_idx: -1 slots before filled ones")
        srt = np.sort(np.where(filled, idx, -np.arange(1, lay.k + 1)[None, :] - 1), axis=1)
        if (np.diff(srt, axis=1) == 0).any():
            problems.append(f"{d}_idx: a candidate repeated within a row")
        if not np.isfinite(sims[filled]).all() or not np.isnan(sims[~filled]).all():
            problems.append(f"{d}_sims: not finite exactly where ids are set")
        s_f = np.where(filled, sims, -np.inf)
        with np.errstate(invalid="ignore"):  # -inf - -inf in trailing empty slots
            unsorted = (np.diff(s_f, axis=1) > 1e-6).any()
        if unsorted:
            problems.append(f"{d}_sims: rows not sorted in descending order")
        if q_valid.any() and filled.any():
            q_emb = reader.image_emb() if d == "i2t" else reader.text_emb()
            g_emb = reader.text_emb() if d == "i2t" else reader.image_emb()
            qr, sl = np.nonzero(filled)
            err = 0.0
            for s in range(0, qr.size, 65536):  # bounded memory: [65536, D] at a time
                q_s, s_s = qr[s : s + 65536], sl[s : s + 65536]
                dots = np.einsum("nd,nd->n", q_emb[q_s], g_emb[idx[q_s, s_s]])
                err = max(err, float(np.abs(dots - sims[q_s, s_s]).max()))
            if err > 1e-3:
                problems.append(f"{d}_sims: differ from the stored embeddings' dot products by up to {err:.2e}")
        owner = np.arange(n_q)[:, None] if d == "i2t" else t2i_map[:, None]
        if d == "i2t":
            truth = filled & (t2i_map[np.where(filled, idx, 0)] == owner)
        else:
            truth = filled & (idx == owner)
        if not np.array_equal(truth, pos):
            problems.append(f"{d}_is_positive: disagrees with the caption-image maps")
        if reader.kind == "single":
            itm = res["itm_logits"]
            if not np.isfinite(itm[filled]).all() or not np.isnan(itm[~filled]).all():
                problems.append(f"{d}_itm_logits: not finite exactly where ids are set")
        if lay.has_fused:
            bad_rows = 0
            for start in range(0, n_q, lay.rows_per_chunk):
                rows = np.arange(start, min(start + lay.rows_per_chunk, n_q))
                f = reader.fused(d, rows)
                ff = filled[rows]
                if not np.isfinite(f[ff]).all() or not np.isnan(f[~ff]).all():
                    bad_rows += 1
            if bad_rows:
                problems.append(f"{d}_fused: not finite exactly where ids are set ({bad_rows} unit(s))")
    return problems


__all__ = [
    "STAGES",
    "CacheReader",
    "CacheWriter",
    "check_cache",
    "dequantize_int8",
    "describe_cache",
    "num_units",
    "open_cache",
    "quantize_int8",
    "unit_range",
]
