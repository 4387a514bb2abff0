"""The tiny world of the distillation-on-several-ranks tests (tests/test_torchrun_distill.py, tests/test_losses_ddp.py):
two shards of ``B`` samples, a ``fake``-teacher cache built on them and a student without batch-coupled layers.
Built once per test session (the ``ddp_world`` fixture of conftest.py); the tests write their runs elsewhere."""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch
import webdataset as wds
from PIL import Image

B = 4  # pairs per rank; the one-process runs take 2 * B

# A student without batch-coupled layers (no BatchNorm, no dropout): one ViT block at 32 px, a 1-layer BERT. Then a
# sample's embedding does not depend on the other samples of its batch, so the comparisons test the loss wiring.
STUDENT = {
    "image_model": "vit_tiny_patch16_224",
    "image_model_kwargs": {"img_size": 32, "patch_size": 16, "depth": 1, "embed_dim": 32, "num_heads": 2},
    "image_size": 32,
    "resize_mode": "squash",
    "text_config": {
        "model_type": "bert",
        "vocab_size": 30522,
        "hidden_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "max_position_embeddings": 64,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
    },  # fmt: skip
    "text_pool": "cls",
    "context_length": 16,
    "embed_dim": 16,
}
WORDS = "red blue green dog cat car tree man".split()


def write_shards(folder: Path) -> None:
    """Two shards of B samples with one caption each (no random caption choice); sample 1 (shard 0, rank 0) and
    sample 5 (shard 1, rank 1) share a caption: a positive pair only when the in-batch terms span both ranks."""
    folder.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    for s in range(2):
        with wds.TarWriter(str(folder / f"train-{s}.tar"), encoder=False, mtime=0) as tw:
            for i in range(s * B, (s + 1) * B):
                arr = (torch.rand(24, 32, 3, generator=gen) * 255).to(torch.uint8).numpy()
                buf = io.BytesIO()
                Image.fromarray(arr).save(buf, "PNG")
                caption = "a red dog on the grass" if i in (1, 5) else f"a {WORDS[i]} {WORDS[(3 * i + 1) % 8]} {i}"
                tw.write({"__key__": f"k{i:03d}", "png": buf.getvalue(), "json": json.dumps([caption]).encode()})


def build_world(root: Path) -> dict[str, Path]:
    """``root/shards`` (write_shards), ``root/clip.zarr`` (the ``fake`` teacher, k 3) and ``root/student.json``."""
    import fake_teacher  # noqa: F401  (registers "fake")

    from mcad_cache.config import BuildConfig
    from mcad_cache.pipelines.build_cache import run as build

    write_shards(root / "shards")
    build(
        BuildConfig(
            teacher="fake", data=(str(root / "shards"),), out=str(root / "clip.zarr"), k=3, batch_size=8, workers=0,
            device="cpu",
        )
    )  # fmt: skip
    (root / "student.json").write_text(json.dumps(STUDENT))
    return {"shards": root / "shards", "cache": root / "clip.zarr", "student": root / "student.json"}
