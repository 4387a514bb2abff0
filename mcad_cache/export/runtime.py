"""Run an export folder: tokenizer (``tokenizers``), preprocessing (numpy + PIL) and the two encoder files.

This is what an app does with the files, so that ``index`` / ``search`` / ``serve`` given an export measure what
ships. The ONNX path imports neither torch nor transformers (a text-query process stays small; docs/benchmarks.md).

Backends by format: ``onnx`` -> onnxruntime ``InferenceSession`` (CPU provider, ``threads`` intra-op threads);
``torchscript`` -> ``torch.jit.load``; ``executorch`` -> ``executorch.runtime.Runtime`` (XNNPACK kernels).
Encoders take batch 1 (static shapes, the phone convention); batches are looped.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from mcad_cache.export.formats import (
    FORMATS,
    IMAGE_INPUT,
    MANIFEST_FILE,
    PREPROCESS_FILE,
    TEXT_INPUTS,
    TOKENIZER_DIR,
    ExportError,
    FormatUnavailableError,
)
from mcad_cache.export.preprocess import preprocess_image


class Encoder(Protocol):
    """What index / search / serve need from a student, exported or in PyTorch."""

    embed_dim: int
    preprocess_cfg: dict[str, Any]
    decode_policy: dict[str, Any]
    source: dict[str, Any]

    def encode_text(self, texts: Sequence[str]) -> np.ndarray:
        """``B`` captions -> ``[B, D]`` float32, L2-normalised."""
        ...

    def encode_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """``B`` decoded RGB images -> ``[B, D]`` float32, L2-normalised."""
        ...


def load_tokenizer(folder: str | Path, *, context_length: int) -> Any:
    """``tokenizers.Tokenizer`` from ``folder/tokenizer.json``, padded and truncated to ``context_length``.

    Gives the same ids and mask as the student's transformers tokenizer (``DualEncoder.tokenize``; tested).

    Raises:
        ExportError: no ``tokenizer.json`` in ``folder``.
    """
    from tokenizers import Tokenizer

    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        raise ExportError(f"{path} is missing: the export's tokenizer must be a fast (tokenizer.json) tokenizer")
    tok = Tokenizer.from_file(str(path))
    config_path = Path(folder) / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    pad_token = config.get("pad_token") or "[PAD]"
    pad_id = tok.token_to_id(pad_token)
    tok.enable_truncation(max_length=context_length)
    tok.enable_padding(length=context_length, pad_id=0 if pad_id is None else pad_id, pad_token=pad_token)
    return tok


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The ``manifest.json`` of an export folder.

    Raises:
        ExportError: ``folder`` is not an export (no manifest), or was written by a newer layout.
    """
    path = Path(folder) / MANIFEST_FILE
    if not path.is_file():
        raise ExportError(f"{folder} is not an export folder: no {MANIFEST_FILE} (run `mcad-cache export` first)")
    manifest = json.loads(path.read_text())
    if manifest.get("format") not in FORMATS:
        raise ExportError(f"{path}: unknown format {manifest.get('format')!r}")
    return manifest


class _OnnxRunner:
    def __init__(self, path: Path, *, threads: int) -> None:
        try:
            import onnxruntime as ort
        except ImportError as err:
            raise FormatUnavailableError("onnxruntime is not installed: pip install 'mcad-cache[export]'") from err
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])

    def __call__(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        return self.session.run(None, feeds)[0]


class _TorchScriptRunner:
    def __init__(self, path: Path, *, threads: int) -> None:
        import torch

        if threads > 0:
            torch.set_num_threads(threads)
        self.module = torch.jit.load(str(path), map_location="cpu").eval()
        self._torch = torch

    def __call__(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        with self._torch.inference_mode():
            return self.module(*(self._torch.from_numpy(v) for v in feeds.values())).numpy()


class _ExecuTorchRunner:
    def __init__(self, path: Path, *, threads: int) -> None:
        try:
            import torch
            from executorch.runtime import Runtime
        except ImportError as err:
            raise FormatUnavailableError("executorch is not installed: pip install 'mcad-cache[executorch]'") from err
        self.method = Runtime.get().load_program(str(path)).load_method("forward")
        self._torch = torch

    def __call__(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        return self.method.execute([self._torch.from_numpy(v) for v in feeds.values()])[0].numpy()


_RUNNERS = {"onnx": _OnnxRunner, "torchscript": _TorchScriptRunner, "executorch": _ExecuTorchRunner}


class ExportedEncoder:
    """An export folder, loaded: ``encode_text`` / ``encode_images`` as an app would run them.

    Attributes:
        folder: the export folder.
        manifest: its ``manifest.json``.
        preprocess_cfg: its ``preprocess.json`` minus the decode policy.
        decode_policy: ``DecodePolicy`` fields used to decode image bytes.
        embed_dim: D.
        context_length: L, tokens per caption.
        source: ``{"kind": "export", "path", "format", "quantize"}`` (recorded in an index).
    """

    def __init__(self, folder: str | Path, *, threads: int = 1) -> None:
        """Args:
            folder: an export folder written by ``mcad-cache export``.
            threads: intra-op CPU threads of each encoder (1 = the benchmark setting).

        Raises:
            ExportError: not an export folder, or an ``open_clip`` / ``coreml`` export (not runnable here).
            FormatUnavailableError: the runtime package is not installed.
        """
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        fmt = self.manifest["format"]
        if fmt not in _RUNNERS:
            raise ExportError(
                f"{folder}: a {fmt} export is not run by mcad-cache (load it with {fmt}); index / search need an "
                "onnx, torchscript or executorch export, or the run directory"
            )
        pre = json.loads((self.folder / PREPROCESS_FILE).read_text())
        self.decode_policy = pre.pop("decode_policy", {})
        self.preprocess_cfg = pre
        self.embed_dim = int(self.manifest["embed_dim"])
        self.context_length = int(self.manifest["context_length"])
        self.tokenizer = load_tokenizer(self.folder / TOKENIZER_DIR, context_length=self.context_length)
        files = self.manifest["files"]
        self._text = _RUNNERS[fmt](self.folder / files["text"], threads=threads)
        self._image = _RUNNERS[fmt](self.folder / files["image"], threads=threads)
        self.source = {"kind": "export", "path": str(self.folder.resolve()), "format": fmt,
                       "quantize": self.manifest.get("quantize", "none")}  # fmt: skip

    def tokenize(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """``B`` captions -> ``{"input_ids", "attention_mask"}``, each ``[B, L]`` int64."""
        enc = self.tokenizer.encode_batch(list(texts))
        return {
            "input_ids": np.asarray([e.ids for e in enc], dtype=np.int64),
            "attention_mask": np.asarray([e.attention_mask for e in enc], dtype=np.int64),
        }

    def encode_text(self, texts: Sequence[str]) -> np.ndarray:
        """``B`` captions -> ``[B, D]`` float32 text_emb, L2-normalised (one encoder call per caption)."""
        tokens = self.tokenize(texts)
        rows = [
            self._text({name: tokens[name][i : i + 1] for name in TEXT_INPUTS}) for i in range(len(texts))
        ]  # fmt: skip
        return np.concatenate(rows, 0).astype(np.float32) if rows else np.zeros((0, self.embed_dim), np.float32)

    def encode_arrays(self, images: np.ndarray) -> np.ndarray:
        """``[B, 3, H, W]`` float32 preprocessed images -> ``[B, D]`` float32 image_emb, L2-normalised."""
        rows = [self._image({IMAGE_INPUT: np.ascontiguousarray(images[i : i + 1])}) for i in range(len(images))]
        return np.concatenate(rows, 0).astype(np.float32) if rows else np.zeros((0, self.embed_dim), np.float32)

    def encode_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """``B`` decoded RGB images -> ``[B, D]`` float32 image_emb, L2-normalised."""
        if not images:
            return np.zeros((0, self.embed_dim), np.float32)
        return self.encode_arrays(np.stack([preprocess_image(im, self.preprocess_cfg) for im in images]))
