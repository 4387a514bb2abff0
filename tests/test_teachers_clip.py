"""clip teacher: open_clip models (built-in names, JSON configs with timm / local HF towers, checkpoint files)."""

from __future__ import annotations

import json

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from mcad_cache.data.transforms import make_image_transform
from mcad_cache.errors import CheckpointError, UnknownModelError
from mcad_cache.hashing import file_sha256
from mcad_cache.teachers import Teacher, create_teacher, list_teachers

CAPTIONS = ["a dog on the grass", "two cats sitting on a red car", "a photo"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _images(n: int, size: int) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))


def _pil(w: int, h: int) -> Image.Image:
    g = torch.Generator().manual_seed(1)
    return Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy(), mode="RGB")


def test_registry_lists_builtin_teachers():
    assert {"clip", "albef", "blip"} <= set(list_teachers())
    with pytest.raises(UnknownModelError, match="clip"):
        create_teacher("no-such-teacher")


def test_tiny_clip_protocol(tiny_clip_teacher):
    t = tiny_clip_teacher
    assert isinstance(t, Teacher)
    assert t.name == "clip" and t.kind == "dual"
    assert t.logit_scale == pytest.approx(1 / 0.07, rel=1e-5)  # open_clip's init_logit_scale = log(1 / 0.07)
    tokens = t.tokenize(CAPTIONS)
    assert tokens["input_ids"].dtype == torch.int64 and tokens["input_ids"].shape == (3, 16)
    # SimpleTokenizer: [SOT] words [EOT] then 0 padding; the mask counts non-pad tokens.
    assert tokens["input_ids"][0, 0] == 49406
    assert torch.equal(tokens["attention_mask"], (tokens["input_ids"] != 0).long())
    image_emb = t.encode_image(_images(4, 32))
    text_emb = t.encode_text(tokens)
    assert image_emb.shape == (4, 32) and text_emb.shape == (3, 32)
    assert image_emb.dtype == torch.float32 and text_emb.dtype == torch.float32
    torch.testing.assert_close(image_emb.norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(text_emb.norm(dim=-1), torch.ones(3))
    # Same as open_clip's own normalised outputs; deterministic across calls.
    ref = t.model.encode_image(_images(4, 32), normalize=True)
    torch.testing.assert_close(image_emb, ref, rtol=1e-5, atol=1e-6)
    assert torch.equal(t.encode_image(_images(4, 32)), image_emb)
    assert not any(p.requires_grad for p in t.model.parameters()) and not t.model.training


def test_tiny_clip_seeded_init_is_reproducible(tiny_clip_teacher):
    again = create_teacher("clip", config="tiny", device="cpu")
    assert again.fingerprint() == tiny_clip_teacher.fingerprint()
    other = create_teacher("clip", config="tiny", device="cpu", seed=1)
    assert other.fingerprint()["weights_sha256"] != tiny_clip_teacher.fingerprint()["weights_sha256"]
    fp = tiny_clip_teacher.fingerprint()
    assert fp["weights_source"] == "random"
    assert fp["preprocess_cfg"] == tiny_clip_teacher.preprocess_cfg
    assert fp["architecture"]["model_cfg"]["vision_cfg"]["width"] == 64
    json.dumps(fp)  # JSON-able


def test_preprocess_cfg_reproduces_open_clip_preprocess(tiny_clip_teacher):
    # Our transform from the teacher's preprocess_cfg equals open_clip's own preprocess for the same model; the tiny
    # JSON's preprocess_cfg asks for squash (the tests' students squash too), which open_clip applies when forced.
    assert (
        tiny_clip_teacher.preprocess_cfg["resize_mode"] == "squash" and tiny_clip_teacher.preprocess_cfg["crop"] is None
    )
    _, _, oc_preprocess = open_clip.create_model_and_transforms(
        tiny_clip_teacher.architecture["open_clip_name"], image_resize_mode="squash"
    )
    assert tiny_clip_teacher.preprocess_cfg["image_size"] == 32
    ours = make_image_transform(tiny_clip_teacher.preprocess_cfg)
    for img in (_pil(53, 40), _pil(20, 70)):
        torch.testing.assert_close(ours(img), oc_preprocess(img), rtol=0, atol=0)


def test_checkpoint_file_round_trip(tiny_clip_teacher, tmp_path):
    path = tmp_path / "tiny_clip.pt"
    torch.save({"state_dict": tiny_clip_teacher.model.state_dict()}, path)
    loaded = create_teacher("clip", model="tiny", pretrained=str(path), seed=123, device="cpu")
    images, tokens = _images(2, 32), loaded.tokenize(CAPTIONS)
    assert torch.equal(loaded.encode_image(images), tiny_clip_teacher.encode_image(images))
    assert torch.equal(loaded.encode_text(tokens), tiny_clip_teacher.encode_text(tokens))
    fp = loaded.fingerprint()
    assert fp["weights_source"] == "file" and fp["weights_sha256"] == file_sha256(path)


def test_checkpoint_missing_key_raises(tiny_clip_teacher, tmp_path):
    sd = dict(tiny_clip_teacher.model.state_dict())
    del sd["text_projection"]
    path = tmp_path / "broken.pt"
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match="text_projection"):
        create_teacher("clip", model="tiny", pretrained=str(path), device="cpu")


def test_unknown_name_tag_and_file():
    with pytest.raises(UnknownModelError, match="no-such-model"):
        create_teacher("clip", model="no-such-model", device="cpu")
    with pytest.raises(UnknownModelError, match="openai"):  # lists the known tags; nothing is downloaded
        create_teacher("clip", model="ViT-B-32", pretrained="no-such-tag", device="cpu")
    with pytest.raises(FileNotFoundError):
        create_teacher("clip", model="ViT-B-32", pretrained="/nonexistent/ckpt.pt", device="cpu")
    with pytest.raises(FileNotFoundError):
        create_teacher("clip", model="/nonexistent/config.json", device="cpu")


def test_json_config_with_timm_vision_and_local_hf_text_tower(tiny_hf_bert_dir, tmp_path):
    # The offline demo layout: timm vision tower + a LOCAL Hugging Face text tower named by a relative path.
    import shutil

    from transformers import AutoTokenizer, BertModel

    shutil.copytree(tiny_hf_bert_dir, tmp_path / "bert")
    cfg = {
        "embed_dim": 24,
        "vision_cfg": {
            "timm_model_name": "efficientnet_lite0",
            "timm_model_pretrained": False,
            "timm_pool": "avg",
            "timm_proj": "linear",
            "image_size": 32,
        },
        "text_cfg": {
            "hf_model_name": "bert",
            "hf_tokenizer_name": "bert",
            "hf_pooler_type": "mean_pooler",
            "hf_proj_type": "linear",
            "context_length": 12,
        },
        "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "resize_mode": "squash"},
    }
    path = tmp_path / "demo_teacher.json"
    path.write_text(json.dumps(cfg))
    t = create_teacher("clip", model=str(path), device="cpu")
    assert t.preprocess_cfg == {
        "image_size": 32,
        "resize_mode": "squash",
        "crop": None,
        "interpolation": "bicubic",
        "mean": [0.5, 0.5, 0.5],
        "std": [0.25, 0.25, 0.25],
    }
    # The HF tower's weights are the saved ones (loaded offline from the local folder).
    hf = BertModel.from_pretrained(str(tiny_hf_bert_dir))
    torch.testing.assert_close(
        t.model.text.transformer.embeddings.word_embeddings.weight, hf.embeddings.word_embeddings.weight
    )
    # Tokenizer: the local folder's WordPiece tokenizer, padded to the context length.
    tokens = t.tokenize(["a dog on the grass"])
    ref = AutoTokenizer.from_pretrained(str(tiny_hf_bert_dir))(
        ["a dog on the grass"], padding="max_length", truncation=True, max_length=12
    )
    assert tokens["input_ids"].tolist() == ref["input_ids"]
    assert tokens["attention_mask"].tolist() == ref["attention_mask"]
    assert t.tokenizer_cfg["context_length"] == 12 and t.tokenizer_cfg["name"].startswith("open_clip.HFTokenizer")
    image_emb, text_emb = t.encode_image(_images(2, 32)), t.encode_text(t.tokenize(CAPTIONS))
    assert image_emb.shape == (2, 24) and text_emb.shape == (3, 24)
    np.testing.assert_allclose(text_emb.norm(dim=-1).numpy(), 1.0, rtol=1e-5)
    # Text embedding = normalize(proj(mean over non-pad tokens of the BERT states)) (open_clip MeanPooler).
    with torch.no_grad():
        ids, mask = tokens["input_ids"], tokens["attention_mask"]
        states = hf(input_ids=ids, attention_mask=mask).last_hidden_state
        pooled = (states * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        expected = torch.nn.functional.normalize(t.model.text.proj(pooled), dim=-1)
    torch.testing.assert_close(t.encode_text(tokens), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_tiny_clip_under_bf16_autocast_on_cuda(tiny_clip_teacher):
    t = create_teacher("clip", model="tiny", device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        emb = t.encode_image(_images(2, 32))
    assert emb.dtype == torch.float32
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2, device="cuda"))
    torch.testing.assert_close(emb.cpu(), tiny_clip_teacher.encode_image(_images(2, 32)), rtol=0.05, atol=0.05)


def test_tiny_clip_under_bf16_autocast_on_cpu(tiny_clip_teacher):
    # The same code path as CUDA autocast: outputs stay float32 and normalised, close to the fp32 ones.
    t, images, tokens = tiny_clip_teacher, _images(2, 32), tiny_clip_teacher.tokenize(CAPTIONS[:2])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        image_emb, text_emb = t.encode_image(images), t.encode_text(tokens)
    assert image_emb.dtype == text_emb.dtype == torch.float32
    torch.testing.assert_close(image_emb.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(image_emb, t.encode_image(images), rtol=0.05, atol=0.02)
    torch.testing.assert_close(text_emb, t.encode_text(tokens), rtol=0.05, atol=0.02)
