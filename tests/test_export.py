"""Export: numpy preprocessing and the tokenizers tokenizer against the PyTorch path, ONNX / TorchScript parity in
fp32 and int8 on real shard images and captions, the open_clip checkpoint loaded by open_clip itself, refusals, and
ExecuTorch (marked slow: its export takes minutes here)."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import onnx
import pytest
import torch
from export_fixtures import gallery_shards, make_run
from PIL import Image
from typer.testing import CliRunner

from mcad_cache.cli.main import app
from mcad_cache.data.transforms import make_image_transform
from mcad_cache.export import formats
from mcad_cache.export.formats import ExportError, FormatUnavailableError, get_format
from mcad_cache.export.preprocess import preprocess_image
from mcad_cache.export.runtime import ExportedEncoder, load_tokenizer
from mcad_cache.hashing import file_sha256
from mcad_cache.student import DualEncoder

runner = CliRunner()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return gallery_shards(tmp_path_factory.mktemp("shards"))


@pytest.mark.parametrize(
    ("mode", "size", "interp"),
    [("shortest", 64, "bicubic"), ("shortest", [48, 64], "bilinear"), ("squash", 56, "bicubic"),
     ("longest", [40, 64], "bicubic")],
)  # fmt: skip
def test_numpy_preprocess_equals_torchvision(mode, size, interp):
    cfg = {"image_size": size, "resize_mode": mode, "crop": None if mode == "squash" else "center",
           "interpolation": interp, "mean": [0.48, 0.45, 0.40], "std": [0.27, 0.26, 0.28]}  # fmt: skip
    if mode == "longest":
        cfg["fill"] = 7
    rng = np.random.default_rng(0)
    transform = make_image_transform(cfg)
    for h, w in ((24, 32), (97, 31), (64, 64), (200, 150), (13, 90)):
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")
        ref = transform(img).numpy()
        out = preprocess_image(img, cfg)
        assert out.shape == ref.shape and out.dtype == np.float32
        np.testing.assert_allclose(out, ref, atol=1e-6, err_msg=f"{mode} {size} {h}x{w}")


def test_tokenizers_tokenizer_equals_the_students(run_dir):
    student = DualEncoder.load(run_dir / "final").eval()
    texts = ["A red Bicycle!", "", "two dogs " * 30, "naïve café", "x"]
    tok = load_tokenizer(run_dir / "final" / "tokenizer", context_length=student.config.context_length)
    enc = tok.encode_batch(texts)
    ref = student.tokenize(texts)
    assert np.array_equal(np.array([e.ids for e in enc]), ref["input_ids"].numpy())
    assert np.array_equal(np.array([e.attention_mask for e in enc]), ref["attention_mask"].numpy())


def _export(run_dir, tmp_path, shards, *args):
    out = tmp_path / "exp"
    result = runner.invoke(app, ["export", str(run_dir), "--out", str(out), "--data", shards[0], *args])
    assert result.exit_code == 0, result.output
    return out, json.loads((out / "manifest.json").read_text())


def test_onnx_fp32_export_matches_pytorch(run_dir, shards, tmp_path):
    out, manifest = _export(run_dir, tmp_path, shards, "--format", "onnx")
    for name in ("image_encoder.onnx", "text_encoder.onnx", "preprocess.json", "tokenizer/tokenizer.json"):
        assert (out / name).is_file(), name
    parity = manifest["parity"]
    assert parity["ok"] and parity["num_images"] == 6 and parity["num_captions"] == 12  # real shard samples
    assert parity["image_min_cosine"] >= 0.9999 and parity["text_min_cosine"] >= 0.9999
    src = manifest["source"]
    assert src["weights_sha256"] == file_sha256(run_dir / "final" / "model.safetensors")
    assert src["cache"] == ["caches/clip", "caches/albef"]
    pre = json.loads((out / "preprocess.json").read_text())
    assert pre["image_size"] == 64 and pre["decode_policy"]["max_pixels"] == 50_000_000
    assert manifest["tensors"]["image"]["inputs"]["images"] == [[1, 3, 64, 64], "float32"]
    assert manifest["tensors"]["text"]["inputs"]["input_ids"] == [[1, 16], "int64"]
    # Independent of the pipeline's own check: an image and caption it never saw.
    student, exported = DualEncoder.load(run_dir / "final").eval(), ExportedEncoder(out)
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (50, 70, 3), dtype=np.uint8), "RGB")
    with torch.no_grad():
        ref_img = student.encode_image(make_image_transform(student.preprocess_cfg)(img)[None]).numpy()
        ref_txt = student.encode_text(**student.tokenize(["a blue bus on the street"])).numpy()
    assert float((exported.encode_images([img]) * ref_img).sum()) > 0.9999
    assert float((exported.encode_text(["a blue bus on the street"]) * ref_txt).sum()) > 0.9999


def test_onnx_int8_is_quantized_and_close(run_dir, shards, tmp_path):
    out, manifest = _export(run_dir, tmp_path, shards, "--format", "onnx", "--quantize", "int8")
    assert manifest["quantize"] == "int8"
    parity = manifest["parity"]
    assert parity["threshold"] == 0.99 and parity["ok"]
    assert parity["text_min_cosine"] < 1.0 - 1e-6  # int8 changed the numbers: it is really quantised
    ops = {n.op_type for n in onnx.load(str(out / "text_encoder.onnx")).graph.node}
    assert {"DynamicQuantizeLinear", "MatMulInteger"} & ops, ops


def test_torchscript_and_channels_last_student(tmp_path, shards):
    run = make_run(tmp_path / "run_cl", channels_last=True)
    _, manifest = _export(run, tmp_path, shards, "--format", "torchscript")
    assert manifest["parity"]["ok"], manifest["parity"]


def test_open_clip_checkpoint_loads_in_open_clip(run_dir, tmp_path):
    open_clip = pytest.importorskip("open_clip")
    out = tmp_path / "oc"
    result = runner.invoke(app, ["export", str(run_dir), "--format", "open_clip", "--out", str(out)])
    assert result.exit_code == 0, result.output
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{out}")
    model.eval()
    student = DualEncoder.load(run_dir / "final").eval()
    texts = ["a red bicycle", "two dogs running on the beach by the sea", "x"]
    rng = np.random.default_rng(2)
    images = [Image.fromarray(rng.integers(0, 256, (40 + 9 * i, 60, 3), dtype=np.uint8), "RGB") for i in range(3)]
    transform = make_image_transform(student.preprocess_cfg)
    with torch.no_grad():
        oc_txt = model.encode_text(tokenizer(texts), normalize=True)
        oc_img = model.encode_image(torch.stack([preprocess(im) for im in images]), normalize=True)
        ref_txt = student.encode_text(**student.tokenize(texts))
        ref_img = student.encode_image(torch.stack([transform(im) for im in images]))
    assert (oc_txt * ref_txt).sum(1).min() > 0.9999
    assert (oc_img * ref_img).sum(1).min() > 0.9999
    assert torch.isclose(model.logit_scale.exp(), student.logit_scale)


def test_refusals(run_dir, tmp_path, monkeypatch):
    result = runner.invoke(app, ["export", str(run_dir), "--format", "tflite", "--out", str(tmp_path / "a")])
    assert result.exit_code == 1 and "--format 'tflite' is not known" in result.output
    assert len(result.output.strip().splitlines()) == 1
    result = runner.invoke(app, ["export", str(tmp_path), "--out", str(tmp_path / "b")])
    assert result.exit_code == 1 and "neither a distill run directory" in result.output
    with pytest.raises(ExportError, match="int8 is not supported for --format executorch"):
        get_format("executorch", quantize="int8")
    monkeypatch.setattr(formats.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FormatUnavailableError, match=r"mcad-cache\[export\]"):
        get_format("onnx")


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("executorch") is None, reason="executorch not installed")
def test_executorch_export_matches_pytorch(run_dir, shards, tmp_path):
    """Minutes on a 2-core CPU (torch.export + XNNPACK lowering); run with -m slow."""
    out, manifest = _export(run_dir, tmp_path, shards, "--format", "executorch")
    assert (out / "image_encoder.pte").is_file() and (out / "text_encoder.pte").is_file()
    assert manifest["parity"]["ok"], manifest["parity"]
