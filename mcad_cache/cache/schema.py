"""The cache schema: array names, ``dimension_names``, dtypes, fill values, chunking, and ``validate(group)``.

One teacher's cache is a Zarr v3 group (``docs/cache-format.md``). Rows of every ``image`` array belong to the sample
key in ``image_keys`` of the same row; rows of every ``text`` array to ``text_keys`` (``"<sample key>#<caption
index>"``). Top-k arrays are sorted by descending ITC cosine similarity (ties: lower candidate row first). Missing
values are marked, never zero: ``-1`` ids, ``NaN`` floats, ``False`` validity.

The manifest (a JSON dict) lives in the group attributes under :data:`MANIFEST_ATTR`; its ``complete`` flag is written
last by the builder.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

from mcad_cache.constants import SCHEMA_VERSION
from mcad_cache.errors import CacheSchemaError

MANIFEST_ATTR = "mcad_cache"  # group attribute that holds the manifest
BUILD_GROUP = "build"  # subgroup with the builder's per-unit done markers (and scratch files while building)
DIRECTIONS = ("i2t", "t2i")
EMB_DTYPES = ("fp16", "fp32")
FUSED_DTYPES = ("fp16", "int8", "none")
FP16_MAX = float(np.finfo(np.float16).max)  # 65504
INT8_LEVELS = 127  # symmetric absmax quantisation: q = round(x / s), s = max|x| / 127, q in [-127, 127]

_NUMPY_DTYPE = {"fp16": "float16", "fp32": "float32", "int8": "int8"}

Kind = Literal["dual", "single"]


@dataclass(frozen=True)
class CacheLayout:
    """Sizes and storage choices that fix every array's shape, dtype and chunking (stored in the manifest)."""

    kind: Kind  # teacher kind: "dual" (ITC only) or "single" (also ITM logits and fused [CLS] features)
    num_images: int  # N_i image rows (one per sample that passed the cheap pass-0 checks)
    num_texts: int  # N_t text rows (one per caption of those samples)
    emb_dim: int  # D, ITC embedding width
    k: int  # K candidates per query stored in both directions
    fused_dim: int = 0  # C, fused [CLS] width (single-stream with fused_dtype != "none"; else 0)
    emb_dtype: str = "fp16"  # fp16 | fp32 storage of image_emb / text_emb
    fused_dtype: str = "fp16"  # fp16 | int8 (per-vector fp32 scale) | none
    rows_per_chunk: int = 1024  # rows per Zarr chunk and per build commit unit (fused arrays: see below)
    fused_rows_per_chunk: int = 4  # rows per chunk of the fused arrays (a training batch reads only its rows' chunks)
    num_views: int = 0  # V stored augmented views per image (0 = none: canonical image_emb only; mcad_cache.views)

    def __post_init__(self) -> None:
        if self.kind not in ("dual", "single"):
            raise ValueError(f"kind must be 'dual' or 'single', got {self.kind!r}")
        if self.emb_dtype not in EMB_DTYPES:
            raise ValueError(f"emb_dtype must be one of {EMB_DTYPES}, got {self.emb_dtype!r}")
        if self.fused_dtype not in FUSED_DTYPES:
            raise ValueError(f"fused_dtype must be one of {FUSED_DTYPES}, got {self.fused_dtype!r}")
        if min(self.num_images, self.num_texts) < 0 or self.emb_dim <= 0 or self.k <= 0 or self.rows_per_chunk <= 0:
            raise ValueError(f"invalid layout sizes: {self}")
        if self.has_fused and self.fused_dim <= 0:
            raise ValueError("a single-stream layout with stored fused features needs fused_dim > 0")
        if self.fused_rows_per_chunk <= 0 or self.rows_per_chunk % self.fused_rows_per_chunk:
            raise ValueError("fused_rows_per_chunk must divide rows_per_chunk")

    @property
    def has_fused(self) -> bool:
        """True if fused [CLS] features are stored."""
        return self.kind == "single" and self.fused_dtype != "none"

    def dim_sizes(self) -> dict[str, int]:
        """Size of every named dimension."""
        return {
            "image": self.num_images,
            "text": self.num_texts,
            "image_offsets": self.num_images + 1,
            "emb_dim": self.emb_dim,
            "k": self.k,
            "itm_class": 2,
            "fused_dim": self.fused_dim,
            "view": self.num_views,
            "view_param": 5,  # x0, y0, w, h, flip (mcad_cache.views)
        }

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (``from_dict`` inverts it); ``num_views`` only when views are stored."""
        return {k: v for k, v in asdict(self).items() if k != "num_views" or self.num_views}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CacheLayout:
        """Inverse of ``to_dict``.

        Raises:
            CacheSchemaError: a field is missing or invalid.
        """
        try:
            return cls(**dict(d))
        except (TypeError, ValueError) as err:
            raise CacheSchemaError(f"manifest 'layout' is invalid: {err}") from err


@dataclass(frozen=True)
class ArraySpec:
    """One array of the schema."""

    name: str
    dims: tuple[str, ...]  # dimension_names
    dtype: str  # numpy dtype name, or "str" for variable-length UTF-8
    fill_value: Any  # what an unwritten element reads as (-1 ids, NaN floats, False flags)
    doc: str  # meaning, units
    small_chunks: bool = False  # fused features: chunks of fused_rows_per_chunk rows (units span several chunks),
    # stored without compression (it saves nothing on fused features and halves random-read speed; docs)

    def shape(self, layout: CacheLayout) -> tuple[int, ...]:
        sizes = layout.dim_sizes()
        return tuple(sizes[d] for d in self.dims)

    def chunks(self, layout: CacheLayout) -> tuple[int, ...]:
        """Chunk shape: ``rows_per_chunk`` rows (``fused_rows_per_chunk`` for the fused arrays) along the first
        dimension, full extent along the others (never 0)."""
        shape = self.shape(layout)
        rows = layout.fused_rows_per_chunk if self.small_chunks else layout.rows_per_chunk
        return (max(1, rows), *(max(1, s) for s in shape[1:]))


def array_specs(layout: CacheLayout) -> dict[str, ArraySpec]:
    """Every array a cache with this layout holds, by name."""
    emb = _NUMPY_DTYPE[layout.emb_dtype]
    specs = [
        ArraySpec("image_keys", ("image",), "str", "", "WebDataset __key__ of each image row (unique)"),
        ArraySpec("image_shard", ("image",), "int32", -1, "index into manifest['shards'] of the row's shard"),
        ArraySpec("image_valid", ("image",), "bool", False, "True if the image decoded and its embedding is stored"),
        ArraySpec("image_skip", ("image",), "int8", 0, "0 = ok, else 1 + index into manifest['skip_reasons']"),
        ArraySpec("img2txt_offsets", ("image_offsets",), "int32", -1, "CSR: texts of image i are rows o[i]:o[i+1]"),
        ArraySpec("image_emb", ("image", "emb_dim"), emb, np.nan, "L2-normalised ITC image embedding"),
        ArraySpec("text_keys", ("text",), "str", "", "'<sample key>#<caption index>' of each text row (unique)"),
        ArraySpec("captions", ("text",), "str", "", "caption string of each text row (as cleaned by the data layer)"),
        ArraySpec("txt2img", ("text",), "int32", -1, "image row of each text row's sample"),
        ArraySpec("text_valid", ("text",), "bool", False, "True if the text's sample image is valid (row usable)"),
        ArraySpec("text_emb", ("text", "emb_dim"), emb, np.nan, "L2-normalised ITC text embedding"),
    ]
    if layout.num_views:  # issue 16: per-view image embeddings and the view params they were computed from
        specs += [
            ArraySpec("image_emb_views", ("image", "view", "emb_dim"), emb, np.nan, "ITC embedding of each view"),
            ArraySpec("view_params", ("image", "view", "view_param"), "int32", -1, "x0, y0, w, h (source px), flip"),
        ]
    for d, q in (("i2t", "image"), ("t2i", "text")):
        specs += [
            ArraySpec(f"{d}_idx", (q, "k"), "int32", -1, f"{d} candidate rows, sorted by descending ITC sims"),
            ArraySpec(f"{d}_sims", (q, "k"), "float32", np.nan, "ITC cosine similarity in [-1, 1], before scaling"),
            ArraySpec(f"{d}_is_positive", (q, "k"), "bool", False, "candidate is a ground-truth pair of the query"),
        ]
        if layout.kind == "single":
            specs.append(
                ArraySpec(
                    f"{d}_itm_logits",
                    (q, "k", "itm_class"),
                    "float32",
                    np.nan,
                    "raw 2-way ITM head logits [negative, positive] for (query, candidate), before any temperature",
                )
            )
        if layout.has_fused:
            if layout.fused_dtype == "int8":
                specs += [
                    ArraySpec(
                        f"{d}_fused",
                        (q, "k", "fused_dim"),
                        "int8",
                        0,
                        "fused [CLS], int8: x = q * scale",
                        small_chunks=True,
                    ),
                    ArraySpec(f"{d}_fused_scale", (q, "k"), "float32", np.nan, "per-vector scale max|x| / 127"),
                ]
            else:
                specs.append(
                    ArraySpec(
                        f"{d}_fused", (q, "k", "fused_dim"), "float16", np.nan, "fused [CLS] feature", small_chunks=True
                    )
                )
    return {s.name: s for s in specs}


def _dtype_ok(spec: ArraySpec, dtype: Any) -> bool:
    np_dtype = np.dtype(getattr(dtype, "to_native_dtype", lambda: dtype)())
    if spec.dtype == "str":
        return np_dtype.kind in ("T", "U", "O")
    return np_dtype == np.dtype(spec.dtype)


def validate(group: Any) -> dict[str, Any]:
    """Check a cache group against this schema; return its manifest.

    Checks the manifest's presence and schema version, then that every array of the layout exists with the expected
    shape, dtype and ``dimension_names``.

    Args:
        group: an open ``zarr.Group``.
    Returns:
        The manifest dict.
    Raises:
        CacheSchemaError: no manifest, another schema version, or a missing / misshapen / mistyped array (the message
            states what was found and what was expected).
    """
    attrs = dict(group.attrs)
    if MANIFEST_ATTR not in attrs:
        raise CacheSchemaError(f"{group.store_path}: no {MANIFEST_ATTR!r} manifest in the group attributes")
    manifest = attrs[MANIFEST_ATTR]
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise CacheSchemaError(
            f"{group.store_path}: cache schema version {version!r}, this code reads version {SCHEMA_VERSION}; "
            "rebuild the cache with this version of mcad-cache"
        )
    layout = CacheLayout.from_dict(manifest.get("layout") or {})
    names = set(group.array_keys())
    problems = []
    for name, spec in array_specs(layout).items():
        if name not in names:
            problems.append(f"{name}: missing")
            continue
        arr = group[name]
        if tuple(arr.shape) != spec.shape(layout):
            problems.append(f"{name}: shape {tuple(arr.shape)}, expected {spec.shape(layout)}")
        if not _dtype_ok(spec, arr.dtype):
            problems.append(f"{name}: dtype {arr.dtype}, expected {spec.dtype}")
        dims = tuple(arr.metadata.dimension_names or ())
        if dims != spec.dims:
            problems.append(f"{name}: dimension_names {dims}, expected {spec.dims}")
    if problems:
        where = f"{group.store_path}: not a valid mcad-cache v{SCHEMA_VERSION} cache: "
        raise CacheSchemaError(where + "; ".join(problems))
    return manifest


__all__ = [
    "BUILD_GROUP",
    "DIRECTIONS",
    "EMB_DTYPES",
    "FP16_MAX",
    "FUSED_DTYPES",
    "INT8_LEVELS",
    "MANIFEST_ATTR",
    "SCHEMA_VERSION",
    "ArraySpec",
    "CacheLayout",
    "array_specs",
    "validate",
]
