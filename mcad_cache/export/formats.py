"""The export formats, their file names and the packages each needs, in one table; the export error classes.

Pure data (no torch import): both the writer (``export/writers.py``, torch side) and the runtime
(``export/runtime.py``, numpy / onnxruntime side) read it.

Layout of an export folder (docs/export.md)::

    OUT/manifest.json        format, files, quantization, tensor names and shapes, parity, provenance (run, caches)
    OUT/preprocess.json      image size, resize mode, crop, mean/std, interpolation, decode policy
    OUT/tokenizer/           tokenizer.json (+ tokenizer_config.json), as transformers' save_pretrained writes it
    OUT/image_encoder.<ext>  [1, 3, H, W] float32 -> image_emb [1, D] float32, L2-normalised
    OUT/text_encoder.<ext>   input_ids [1, L] int64, attention_mask [1, L] int64 -> text_emb [1, D], L2-normalised

``--format open_clip`` writes an open_clip ``local-dir:`` folder instead (``open_clip_config.json``,
``open_clip_model.safetensors``, ``text_config/``), not the two encoder files.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from mcad_cache.errors import McadError

MANIFEST_FILE = "manifest.json"
PREPROCESS_FILE = "preprocess.json"
TOKENIZER_DIR = "tokenizer"
EXPORT_VERSION = 1  # bump when the folder layout or tensor names change
IMAGE_INPUT = "images"  # [1, 3, H, W] float32, preprocessed
TEXT_INPUTS = ("input_ids", "attention_mask")  # [1, L] int64 each
IMAGE_OUTPUT = "image_emb"
TEXT_OUTPUT = "text_emb"
QUANTIZE = ("none", "int8")


class ExportError(McadError, ValueError):
    """A bad export request or export folder: unknown format, unsupported quantization, a missing or foreign file."""


class FormatUnavailableError(McadError, ModuleNotFoundError):
    """The package a format needs is not installed here (the message names the pip extra)."""


@dataclass(frozen=True)
class FormatSpec:
    """One export format.

    Attributes:
        name: the ``--format`` value.
        suffix: file extension of the two encoder files ("" for open_clip, which writes a checkpoint folder).
        packages: import names that must be importable to write the format.
        runtime: import name that runs the files here ("" = cannot run on this OS / not run by us).
        int8: what ``--quantize int8`` does in this format ("" = refused).
        extra: the pip extra that installs the packages.
    """

    name: str
    suffix: str
    packages: tuple[str, ...]
    runtime: str
    int8: str
    extra: str


FORMATS: dict[str, FormatSpec] = {
    spec.name: spec
    for spec in (
        FormatSpec(
            "onnx", ".onnx", ("onnx", "onnxruntime"), "onnxruntime",
            "onnxruntime quantize_dynamic: text tower all MatMul/Gemm/Gather int8 (dynamic activations); image "
            "tower MatMul/Gemm weights int8, convolutions fp32", "export",
        ),
        FormatSpec(
            "torchscript", ".pt", ("torch",), "torch",
            "torch.ao quantize_dynamic: nn.Linear int8 in the text tower; image tower fp32", "export",
        ),
        FormatSpec("executorch", ".pte", ("executorch", "torchao"), "executorch", "", "executorch"),
        FormatSpec("coreml", ".mlpackage", ("coremltools",), "", "", "coreml"),
        FormatSpec("open_clip", "", ("open_clip",), "open_clip", "", ""),
    )
}  # fmt: skip


def get_format(name: str, *, quantize: str = "none") -> FormatSpec:
    """The spec of ``name``, checked against ``quantize`` and the installed packages.

    Raises:
        ExportError: unknown format or quantization, or ``int8`` asked for a format that does not support it.
        FormatUnavailableError: a package the format needs is not installed.
    """
    if name not in FORMATS:
        raise ExportError(f"--format {name!r} is not known; use one of {' | '.join(FORMATS)}")
    if quantize not in QUANTIZE:
        raise ExportError(f"--quantize {quantize!r} is not known; use one of {' | '.join(QUANTIZE)}")
    spec = FORMATS[name]
    if quantize == "int8" and not spec.int8:
        supported = [s.name for s in FORMATS.values() if s.int8]
        raise ExportError(
            f"--quantize int8 is not supported for --format {name}; use --format {' or '.join(supported)}"
        )
    missing = [p for p in spec.packages if importlib.util.find_spec(p) is None]
    if missing:
        hint = f"pip install 'mcad-cache[{spec.extra}]'" if spec.extra else f"pip install {' '.join(missing)}"
        raise FormatUnavailableError(f"--format {name} needs {', '.join(missing)}, not installed here: {hint}")
    return spec


def encoder_files(spec: FormatSpec) -> dict[str, str]:
    """``{"image": "image_encoder<suffix>", "text": "text_encoder<suffix>"}`` (file names inside the export)."""
    return {"image": f"image_encoder{spec.suffix}", "text": f"text_encoder{spec.suffix}"}
