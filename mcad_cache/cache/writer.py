"""Writing a cache: ``CacheWriter`` (used by the build) and the build stages it commits unit by unit.

Layout and meaning of every array: ``mcad_cache.cache.schema`` and ``docs/cache-format.md``.

Crash safety: the builder commits work in *units* of ``rows_per_chunk`` rows along the query dimension: one chunk of
each array (several whole chunks of the fused arrays, which are chunked finer for fast training reads), written by
exactly one writer. After a unit's data is written, its done marker (one element = one chunk of
``build/done_<stage>``) is written. Zarr's ``LocalStore`` writes each chunk file atomically (temporary file +
rename), so a killed build leaves every chunk either old or new, and a unit whose marker is set is fully written. The
manifest's ``complete`` flag is written last.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from mcad_cache.cache.codecs import quantize_int8
from mcad_cache.cache.manifest import to_jsonable, utc_now
from mcad_cache.cache.reader import open_group
from mcad_cache.cache.schema import (
    BUILD_GROUP,
    FP16_MAX,
    MANIFEST_ATTR,
    SCHEMA_VERSION,
    ArraySpec,
    CacheLayout,
    array_specs,
    validate,
)
from mcad_cache.errors import NonFiniteError, OutputPathError

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
    "image_views": "image",  # pass 1v (layout.num_views > 0): per-view embeddings and params (build/views.py)
}


def num_units(n: int, rows_per_unit: int) -> int:
    """Number of units of ``rows_per_unit`` rows covering ``n`` rows."""
    return (n + rows_per_unit - 1) // rows_per_unit


def unit_range(unit: int, n: int, rows_per_unit: int) -> tuple[int, int]:
    """Row range ``[start, stop)`` of ``unit``."""
    start = unit * rows_per_unit
    return start, min(start + rows_per_unit, n)


def is_cache_dir(path: str | Path) -> bool:
    """True when ``path`` is a folder whose root ``zarr.json`` holds an mcad-cache manifest (the only kind of
    folder ``--overwrite`` may delete). Reads one small JSON file; opens no array."""
    meta = Path(path) / "zarr.json"
    try:
        doc = json.loads(meta.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(doc, dict) and isinstance(doc.get("attributes"), dict) and MANIFEST_ATTR in doc["attributes"]


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
            overwrite: delete the cache at ``path`` first (never anything that is not a cache: :func:`is_cache_dir`).
        Raises:
            FileExistsError: ``path`` exists and ``overwrite`` is False.
            OutputPathError: ``overwrite`` and ``path`` holds something that is not an mcad-cache cache.
        """
        path = Path(path)
        if path.exists():
            if not overwrite:
                raise FileExistsError(f"{path} already exists")
            if not is_cache_dir(path):
                raise OutputPathError(
                    f"--out {path}: --overwrite replaces only an mcad-cache cache and {path} is not one (no manifest); "
                    "choose another --out"
                )
            shutil.rmtree(path)
        group = zarr.open_group(str(path), mode="w-", zarr_format=3)
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
            if stage == "image_views" and not layout.num_views:  # issue 16
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
        group = open_group(path, mode="r+")
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
        """[num_units] bool: which units of ``stage`` are committed.

        A marker chunk that cannot be decoded (half-written: a full disk, a copy cut short, a file system without
        atomic renames) counts as not done, so its unit is redone and the marker rewritten; it is logged.
        """
        markers = self.group[f"{BUILD_GROUP}/done_{stage}"]
        try:
            return np.asarray(markers[:], dtype=bool)
        except Exception:  # noqa: BLE001  (codec errors have no common class: zstd, numcodecs, zarr)
            out = np.zeros(markers.shape, dtype=bool)
            for unit in range(markers.shape[0]):
                try:
                    out[unit] = bool(markers[unit])
                except Exception as err:  # noqa: BLE001
                    _logger.warning(
                        "%s: done marker of %s unit %d is unreadable (%s: %s): redoing the unit",
                        self.group.store,
                        stage,
                        unit,
                        type(err).__name__,
                        err,
                    )
            return out

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


__all__ = ["STAGES", "CacheWriter", "is_cache_dir", "num_units", "unit_range"]
