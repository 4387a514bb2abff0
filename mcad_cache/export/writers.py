"""Write a student (``DualEncoder``) as two static-shape encoder files, or as an open_clip checkpoint folder.

Each encoder is a small ``nn.Module`` around the student (``ImageTower``, ``TextTower``) with batch 1 and fixed
H, W and L (the phone convention: MobileCLIP's two CoreML models, Immich's ``visual/`` and ``textual/`` ONNX files,
Qualcomm AI Hub's CLIP encoders). Writers, one per format, are looked up by name in ``WRITERS``:

- ``onnx``: ``torch.onnx.export(..., dynamo=False)`` (the TorchScript-based exporter: seconds on CPU; the dynamo
  exporter gave the same embeddings but took 36 s for the 64 px test student), opset 17. ``int8``: onnxruntime
  ``quantize_dynamic`` (int8 weights, activations quantised per call), see ``formats.FORMATS``.
- ``torchscript``: ``torch.jit.trace``. ``int8``: ``torch.ao.quantization.quantize_dynamic`` on the text tower's
  ``nn.Linear`` layers.
- ``executorch``: ``torch.export`` -> ``to_edge_transform_and_lower(partitioner=[XnnpackPartitioner()])`` -> ``.pte``
  (ExecuTorch's documented XNNPACK flow).
- ``coreml``: ``coremltools.convert`` of the traced towers to ``.mlpackage`` (conversion only; runs on macOS). With
  coremltools 9.0 the text tower does not convert, and the export stops with an ``ExportError`` naming the op.
- ``open_clip``: see ``open_clip_checkpoint``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mcad_cache.export.formats import IMAGE_INPUT, IMAGE_OUTPUT, TEXT_INPUTS, TEXT_OUTPUT, ExportError
from mcad_cache.student.model import DualEncoder

_logger = logging.getLogger(__name__)

ONNX_OPSET = 17  # onnxruntime >= 1.14 runs it; LayerNormalization is a single op from opset 17


class ImageTower(nn.Module):
    """``images [1, 3, H, W]`` float32 (preprocessed) -> ``image_emb [1, D]`` float32, L2-normalised."""

    def __init__(self, student: DualEncoder) -> None:
        super().__init__()
        self.student = student

    def forward(self, images: Tensor) -> Tensor:
        return self.student.encode_image(images)


class TextTower(nn.Module):
    """``input_ids, attention_mask [1, L]`` int64 -> ``text_emb [1, D]`` float32, L2-normalised."""

    def __init__(self, student: DualEncoder) -> None:
        super().__init__()
        self.student = student

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.student.encode_text(input_ids, attention_mask)


def example_inputs(student: DualEncoder) -> dict[str, tuple[Tensor, ...]]:
    """Static-shape example inputs: ``{"image": ([1, 3, H, W],), "text": ([1, L], [1, L])}`` (a real caption's
    tokens, so the traced attention mask has padding in it)."""
    size = student.preprocess_cfg["image_size"]
    h, w = (size, size) if isinstance(size, int) else size
    gen = torch.Generator().manual_seed(0)
    tokens = student.tokenize(["a photo of a dog"])
    return {
        "image": (torch.rand(1, 3, h, w, generator=gen),),
        "text": (tokens["input_ids"], tokens["attention_mask"]),
    }


def _towers(student: DualEncoder) -> dict[str, nn.Module]:
    student = copy.deepcopy(student).cpu().float().eval()
    if student.config.channels_last:  # tracing records the layout change; exported graphs take plain NCHW
        student.config = dataclasses.replace(student.config, channels_last=False)
        student.image_tower.to(memory_format=torch.contiguous_format)
    return {"image": ImageTower(student).eval(), "text": TextTower(student).eval()}


def _io_names(which: str) -> tuple[list[str], list[str]]:
    return ([IMAGE_INPUT], [IMAGE_OUTPUT]) if which == "image" else (list(TEXT_INPUTS), [TEXT_OUTPUT])


def write_onnx(module: nn.Module, args: tuple[Tensor, ...], path: Path, *, which: str, quantize: str) -> None:
    """One tower to ONNX (static shapes); ``int8``: onnxruntime dynamic quantisation of the written file."""
    inputs, outputs = _io_names(which)
    fp32 = path if quantize == "none" else path.with_suffix(".fp32.onnx")
    with torch.no_grad():
        torch.onnx.export(
            module, args, str(fp32), input_names=inputs, output_names=outputs, opset_version=ONNX_OPSET, dynamo=False
        )
    if quantize == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        # Text: every MatMul/Gemm and the embedding Gather; image: MatMul/Gemm only (ConvInteger has no fast CPU
        # kernel in onnxruntime, and int8 convolutions cost this student's parity; measured in docs/export.md).
        ops = ["MatMul", "Gemm", "Gather"] if which == "text" else ["MatMul", "Gemm"]
        quantize_dynamic(str(fp32), str(path), weight_type=QuantType.QInt8, op_types_to_quantize=ops)
        fp32.unlink()


def write_torchscript(module: nn.Module, args: tuple[Tensor, ...], path: Path, *, which: str, quantize: str) -> None:
    """One tower traced to TorchScript; ``int8``: dynamic int8 ``nn.Linear`` in the text tower first."""
    if quantize == "int8" and which == "text":
        module = torch.ao.quantization.quantize_dynamic(module, {nn.Linear}, dtype=torch.qint8)
    with torch.no_grad():
        traced = torch.jit.trace(module, args, check_trace=False)
    traced.save(str(path))


def write_executorch(module: nn.Module, args: tuple[Tensor, ...], path: Path, *, which: str, quantize: str) -> None:
    """One tower to an ExecuTorch ``.pte`` program with XNNPACK-delegated kernels."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    with torch.no_grad():
        program = torch.export.export(module, args)
    lowered = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()]).to_executorch()
    with open(path, "wb") as f:
        lowered.write_to_file(f)


def write_coreml(module: nn.Module, args: tuple[Tensor, ...], path: Path, *, which: str, quantize: str) -> None:
    """One tower converted to a CoreML ``.mlpackage`` (ML Program); runs only on Apple platforms."""
    import coremltools as ct

    with torch.no_grad():
        traced = torch.jit.trace(module, args, check_trace=False)
    inputs = [ct.TensorType(name=n, shape=tuple(a.shape)) for n, a in zip(_io_names(which)[0], args, strict=True)]
    try:
        converted = ct.convert(traced, inputs=inputs, convert_to="mlprogram")
    except Exception as err:  # coremltools raises assorted types for unsupported ops; report it as one line
        # Measured with coremltools 9.0 / torch 2.14: the image tower converts; the BERT text tower fails on its
        # embeddings ("int" op from TorchScript; "new_ones" from torch.export), so --format coreml is refused.
        raise ExportError(
            f"--format coreml: coremltools {ct.__version__} cannot convert the {which} tower "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); use --format onnx or executorch"
        ) from err
    converted.save(str(path))


WRITERS: dict[str, Callable[..., None]] = {
    "onnx": write_onnx,
    "torchscript": write_torchscript,
    "executorch": write_executorch,
    "coreml": write_coreml,
}


def write_encoders(student: DualEncoder, out: Path, *, fmt: str, quantize: str, files: dict[str, str]) -> dict:
    """Write ``out/files["image"]`` and ``out/files["text"]`` in ``fmt``.

    Returns:
        ``{"image": {"inputs": {name: shape}, "output": ...}, "text": ...}`` for the manifest.
    Raises:
        ExportError: ``fmt`` has no writer.
    """
    if fmt not in WRITERS:
        raise ExportError(f"--format {fmt}: no encoder writer (known: {', '.join(WRITERS)})")
    towers, args = _towers(student), example_inputs(student)
    shapes = {}
    for which in ("image", "text"):
        WRITERS[fmt](towers[which], args[which], out / files[which], which=which, quantize=quantize)
        inputs, outputs = _io_names(which)
        pairs = zip(inputs, args[which], strict=True)
        shapes[which] = {
            "file": files[which],
            "inputs": {n: [list(a.shape), str(a.dtype).removeprefix("torch.")] for n, a in pairs},
            "output": {outputs[0]: [[1, student.embed_dim], "float32"]},
        }
    return shapes


def open_clip_checkpoint(student: DualEncoder, out: Path) -> dict[str, Any]:
    """Write an open_clip ``local-dir:`` folder: ``open_clip.create_model_and_transforms("local-dir:OUT")`` and
    ``open_clip.get_tokenizer("local-dir:OUT")`` load the student (and CLIP_benchmark with ``--model_type open_clip
    --model local-dir:OUT``).

    Mapping (open_clip 3.x ``TimmModel`` / ``HFTextEncoder``, checked in tests/test_export.py):

    - ``vision_cfg``: ``timm_model_name`` = the student's timm name, ``timm_pool="avg"``, ``timm_proj="linear"``,
      ``timm_proj_bias=False``; keys ``image_tower.*`` -> ``visual.trunk.*``, ``image_proj`` -> ``visual.head.proj``.
    - ``text_cfg``: ``hf_model_name`` = the absolute path of OUT (its ``config.json`` is the BERT config),
      ``hf_model_pretrained=False``, ``hf_proj_type="linear"`` (bias-free, as ours), ``hf_pooler_type`` =
      ``cls_last_hidden_state_pooler`` or ``mean_pooler``; keys ``text_tower.*`` -> ``text.transformer.*``,
      ``text_proj`` -> ``text.proj``. open_clip derives the mask from ``input_ids != pad_token_id``, which equals
      our tokenizer's mask.
    - ``log_logit_scale`` -> ``logit_scale`` (both are the log of the linear scale; open_clip clamps at log 100 in
      training, we clamp on read).

    Moving OUT breaks ``hf_model_name`` (an absolute path, as open_clip resolves it from the working directory):
    export again or edit the path.

    Returns:
        ``{"files": [...], "load": "<python>"}`` for the manifest.
    """
    from safetensors.torch import save_file

    cfg = student.config
    pooler = {"cls": "cls_last_hidden_state_pooler", "mean": "mean_pooler"}[cfg.text_pool]
    model_cfg = {
        "embed_dim": student.embed_dim,
        "vision_cfg": {"timm_model_name": cfg.image_model, "timm_model_pretrained": False, "timm_pool": "avg",
                       "timm_proj": "linear", "timm_proj_bias": False, "image_size": cfg.image_size},
        "text_cfg": {"hf_model_name": str(out.resolve()), "hf_tokenizer_name": str(out.resolve()),
                     "hf_model_pretrained": False, "hf_proj_type": "linear", "hf_pooler_type": pooler,
                     "context_length": cfg.context_length},
        "custom_text": True,
    }  # fmt: skip
    pre = student.preprocess_cfg
    preprocess = {"size": pre["image_size"], "mode": "RGB", "mean": pre["mean"], "std": pre["std"],
                  "interpolation": pre["interpolation"], "resize_mode": pre["resize_mode"]}  # fmt: skip
    oc_config = {"model_cfg": model_cfg, "preprocess_cfg": preprocess}
    (out / "open_clip_config.json").write_text(json.dumps(oc_config, indent=2) + "\n")
    student.text_tower.config.save_pretrained(str(out))
    student.tokenizer.save_pretrained(str(out))
    state = {}
    for key, value in student.state_dict().items():
        if key.startswith("image_tower."):
            new = "visual.trunk." + key.removeprefix("image_tower.")
        elif key.startswith("text_tower."):
            new = "text.transformer." + key.removeprefix("text_tower.")
        else:
            new = {"image_proj.weight": "visual.head.proj.weight", "text_proj.weight": "text.proj.weight",
                   "log_logit_scale": "logit_scale"}[key]  # fmt: skip
        state[new] = value.detach().contiguous().cpu().float()
    save_file(state, str(out / "open_clip_model.safetensors"))
    return {
        "files": ["open_clip_config.json", "open_clip_model.safetensors", "config.json", "tokenizer.json"],
        "load": f"open_clip.create_model_and_transforms('local-dir:{out.resolve()}')",
    }
