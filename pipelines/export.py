"""``mcad-cache export RUN --format onnx|torchscript|executorch|coreml|open_clip [--quantize int8] --out DIR``.

Loads the student of a distill run directory (or a student checkpoint folder), writes the export folder
(``mcad_cache.export.bundle.export_student``: two encoder files, ``preprocess.json``, ``tokenizer/``,
``manifest.json`` with the run's provenance) and, for formats that run here (onnx, torchscript, executorch),
measures parity against the PyTorch student on real images and captions (``--data`` shards) or, without data, on
generated images and fixed captions. The parity result goes into ``manifest.json`` under ``"parity"``.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from mcad_cache.data.decode import DecodePolicy
from mcad_cache.data.webdataset import iter_samples
from mcad_cache.export.bundle import export_student, find_student_folder, measure_parity, run_provenance
from mcad_cache.export.formats import MANIFEST_FILE, get_format
from mcad_cache.export.runtime import ExportedEncoder
from mcad_cache.student.model import DualEncoder

_logger = logging.getLogger(__name__)

RUNNABLE = ("onnx", "torchscript", "executorch")  # formats this machine can run for the parity check
FIXED_CAPTIONS = (
    "a red bicycle leaning against a wall",
    "two dogs running on the beach",
    "a man riding a bus down a long street with many trees on both sides of the road",
    "cat",
)


@dataclass(frozen=True)
class ExportConfig:
    """One export. Flags map 1:1 to these fields."""

    run: str = ""  # distill run directory or student checkpoint folder
    format: str = "onnx"  # onnx | torchscript | executorch | coreml | open_clip
    quantize: str = "none"  # none | int8 (dynamic int8; see docs/export.md per format)
    out: str = ""  # export folder (default: RUN/export-<format>[-int8])
    data: tuple[str, ...] = ()  # shards with real images + captions for the parity check ("" = generated inputs)
    parity_samples: int = 16  # images (and their captions) used for the parity check
    overwrite: bool = False  # replace an existing, non-empty --out folder
    threads: int = 1  # CPU threads for the export and the parity run


def default_out(config: ExportConfig) -> Path:
    """``RUN/export-<format>`` (``-int8`` appended when quantised)."""
    suffix = "" if config.quantize == "none" else f"-{config.quantize}"
    return Path(config.run) / f"export-{config.format}{suffix}"


def generated_images(num: int) -> list[Image.Image]:
    """``num`` deterministic RGB images of varied sizes and aspect ratios (for parity without data)."""
    rng = np.random.default_rng(0)
    images = []
    for i in range(num):
        h, w = 48 + 17 * (i % 5), 64 + 23 * (i % 3)
        base = np.linspace(0, 255, w, dtype=np.float32)[None, :, None] * rng.random(3, dtype=np.float32)
        noise = rng.integers(0, 60, (h, w, 3))
        images.append(Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB"))
    return images


def parity_inputs(config: ExportConfig, policy: DecodePolicy) -> tuple[list[Image.Image], list[str], str]:
    """``(images, captions, origin)`` for the parity check: the first ``parity_samples`` usable samples of
    ``--data``, or generated images and ``FIXED_CAPTIONS``."""
    if config.data:
        samples = islice((s for s in iter_samples(config.data, policy=policy) if s.skip is None), config.parity_samples)
        samples = list(samples)
        captions = [c for s in samples for c in s.captions]
        return [s.image for s in samples], captions, f"{len(samples)} samples of --data"
    return generated_images(config.parity_samples), list(FIXED_CAPTIONS), "generated images, fixed captions"


def run(config: ExportConfig) -> dict[str, Any]:
    """Export the student of ``config.run``.

    Returns:
        ``{"out", "format", "quantize", "files", "parity" (or None), "seconds"}``.
    Raises:
        ExportError: bad run folder, format, quantization or out folder.
        FormatUnavailableError: the format's package is not installed.
    """
    get_format(config.format, quantize=config.quantize)  # refuse before loading anything
    student_folder = find_student_folder(config.run)
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    out = Path(config.out) if config.out else default_out(config)
    t0 = time.perf_counter()
    student = DualEncoder.load(student_folder)
    policy = DecodePolicy()
    provenance = run_provenance(student_folder) | {"export_config": asdict(config)}
    manifest = export_student(
        student, out, fmt=config.format, quantize=config.quantize, decode_policy=policy.to_dict(),
        provenance=provenance, overwrite=config.overwrite,
    )  # fmt: skip
    parity = None
    if config.format in RUNNABLE:
        images, captions, origin = parity_inputs(config, policy)
        parity = measure_parity(student, ExportedEncoder(out, threads=config.threads), images, captions)
        parity["inputs"] = origin
        manifest["parity"] = parity
        (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
        if not parity["ok"]:
            _logger.warning("parity below %.4f: %s", parity["threshold"], parity)
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    return {"out": str(out), "format": config.format, "quantize": config.quantize, "files": files,
            "parity": parity, "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip
