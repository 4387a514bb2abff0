"""blip teacher: BlipForImageTextRetrieval through transformers, loaded from a save_pretrained folder."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from mcad_cache.data.transforms import make_image_transform
from mcad_cache.errors import CheckpointError
from mcad_cache.hashing import folder_weights_sha256
from mcad_cache.teachers import create_teacher
from mcad_cache.teachers.base import SingleStreamTeacher

CAPTIONS = ["a dog on the grass", "two cats sitting on a red car", "a man"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def blip(tiny_blip_dir):
    return create_teacher("blip", pretrained=str(tiny_blip_dir), device="cpu", local_files_only=True)


def test_protocol_and_shapes(blip):
    t = blip
    assert isinstance(t, SingleStreamTeacher) and t.kind == "single" and t.name == "blip"
    assert t.itm_first_token == "enc"  # the saved tokenizer has BLIP's [ENC]
    tokens = t.tokenize(CAPTIONS)
    assert tokens["input_ids"].shape == (3, 35) and tokens["input_ids"].dtype == torch.int64
    vocab = t.tokenizer.get_vocab()
    assert tokens["input_ids"][0, :7].tolist() == [
        vocab[w] for w in ("[CLS]", "a", "dog", "on", "the", "grass", "[SEP]")
    ]
    images = _images(3, 32)
    image_tokens = t.image_tokens(images)
    assert image_tokens.shape == (3, 17, 32) and image_tokens.dtype == torch.float32
    image_emb, text_emb = t.encode_image(images), t.encode_text(tokens)
    assert image_emb.shape == (3, 16) and text_emb.shape == (3, 16)
    torch.testing.assert_close(image_emb.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(text_emb.norm(dim=-1), torch.ones(3))
    assert torch.equal(t.encode_image_from_tokens(image_tokens), image_emb)
    itm_logits, fused_cls = t.itm_from_tokens(image_tokens, tokens)
    assert itm_logits.shape == (3, 2) and fused_cls.shape == (3, 32) and itm_logits.dtype == torch.float32
    assert torch.equal(t.itm(images, tokens)[0], itm_logits)
    with pytest.raises(ValueError, match="row-wise"):
        t.itm_from_tokens(image_tokens[:1], tokens)


def test_matches_transformers_forward(blip):
    # ITC: image_emb @ text_emb.T is BlipForImageTextRetrieval(use_itm_head=False).itm_score.
    # ITM: row-wise itm_logits are its use_itm_head=True output, with [ENC] as the first token (original BLIP).
    t = blip
    images, tokens = _images(3, 32, seed=1), t.tokenize(CAPTIONS)
    with torch.no_grad():
        itc = t.model(
            input_ids=tokens["input_ids"],
            pixel_values=images,
            attention_mask=tokens["attention_mask"],
            use_itm_head=False,
        ).itm_score
        enc_ids = tokens["input_ids"].clone()
        enc_ids[:, 0] = t.tokenizer.convert_tokens_to_ids("[ENC]")
        itm = t.model(input_ids=enc_ids, pixel_values=images, attention_mask=tokens["attention_mask"]).itm_score
        itm_cls = t.model(
            input_ids=tokens["input_ids"], pixel_values=images, attention_mask=tokens["attention_mask"]
        ).itm_score
    torch.testing.assert_close(t.encode_image(images) @ t.encode_text(tokens).T, itc, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(t.itm(images, tokens)[0], itm, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(itm, itm_cls)  # the first token matters
    hf_semantics = create_teacher("blip", pretrained=str(t.weights_file), itm_first_token="cls", device="cpu")
    torch.testing.assert_close(hf_semantics.itm(images, tokens)[0], itm_cls, rtol=1e-5, atol=1e-6)
    assert hf_semantics.fingerprint() != t.fingerprint()


def test_preprocess_cfg_reproduces_the_processor(blip):
    img = Image.fromarray(
        torch.randint(0, 256, (45, 70, 3), generator=torch.Generator().manual_seed(2), dtype=torch.uint8).numpy()
    )
    assert blip.preprocess_cfg["resize_mode"] == "squash" and blip.preprocess_cfg["image_size"] == 32
    ours = make_image_transform(blip.preprocess_cfg)(img)
    ref = blip.image_processor(images=img, return_tensors="pt")["pixel_values"][0]
    # In gray levels: our transform (the original BLIP one: torchvision Resize on the PIL image) and transformers'
    # PIL-backend processor agree to within one level of rounding, on all but a handful of pixels exactly.
    std = torch.tensor(blip.preprocess_cfg["std"])[:, None, None]
    levels = ((ours - ref.float()) * std * 255).abs()
    assert float(levels.max()) <= 1.0 + 1e-3
    assert float((levels > 1e-3).float().mean()) < 0.01


def test_fingerprint_hashes_the_weight_files(blip, tiny_blip_dir):
    fp = blip.fingerprint()
    assert fp["weights_source"] == "file" and fp["weights_sha256"] == folder_weights_sha256(tiny_blip_dir)
    assert fp["architecture"]["config"]["vision_config"]["image_size"] == 32
    assert fp["tokenizer_cfg"]["context_length"] == 35
    assert blip.logit_scale == pytest.approx(1 / 0.07, rel=1e-3)


def test_tiny_config_random_init_is_seeded(tiny_bert_tokenizer_dir):
    a = create_teacher("blip", model="tiny", tokenizer=str(tiny_bert_tokenizer_dir), device="cpu")
    b = create_teacher("blip", config="tiny", tokenizer=str(tiny_bert_tokenizer_dir), device="cpu")
    assert a.fingerprint() == b.fingerprint() and a.fingerprint()["weights_source"] == "random"
    assert a.itm_first_token == "cls"  # no [ENC] in this tokenizer
    images = _images(2, 32)
    assert torch.equal(a.encode_image(images), b.encode_image(images))


def test_bad_folder_and_offline_hub_name(tmp_path, tiny_blip_dir):
    (tmp_path / "config.json").write_text((tiny_blip_dir / "config.json").read_text())
    with pytest.raises(CheckpointError):
        create_teacher("blip", pretrained=str(tmp_path), device="cpu", local_files_only=True)
    with pytest.raises(OSError):  # the hub path is real code; offline it fails before any download
        create_teacher("blip", pretrained="Salesforce/blip-itm-base-coco", device="cpu", local_files_only=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_blip_under_bf16_autocast_on_cuda(blip, tiny_blip_dir):
    t = create_teacher("blip", pretrained=str(tiny_blip_dir), device="cuda")
    images, tokens = _images(2, 32), t.tokenize(CAPTIONS[:2])
    with torch.autocast("cuda", dtype=torch.bfloat16):
        image_emb = t.encode_image(images)
        itm_logits, fused_cls = t.itm(images, tokens)
    assert image_emb.dtype == itm_logits.dtype == fused_cls.dtype == torch.float32
    torch.testing.assert_close(itm_logits.cpu(), blip.itm(images, tokens)[0], rtol=0.1, atol=0.1)


def test_folder_without_processor_files(tmp_path, tiny_blip_dir, tiny_bert_tokenizer_dir):
    # Model weights + a tokenizer only: the image processor comes from the config's image size (32 px squash).
    import shutil

    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_blip_dir / name, tmp_path / name)
    for f in tiny_bert_tokenizer_dir.iterdir():
        if f.is_file():
            shutil.copy(f, tmp_path / f.name)
    t = create_teacher("blip", pretrained=str(tmp_path), device="cpu", local_files_only=True)
    assert t.preprocess_cfg["image_size"] == 32 and t.preprocess_cfg["resize_mode"] == "squash"
    assert t.itm_first_token == "cls"
    reference = create_teacher("blip", pretrained=str(tiny_blip_dir), device="cpu", local_files_only=True)
    images = _images(2, 32)
    assert torch.equal(t.encode_image(images), reference.encode_image(images))


def test_blip_under_bf16_autocast_on_cpu(blip):
    images, tokens = _images(2, 32), blip.tokenize(CAPTIONS[:2])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        image_emb, text_emb = blip.encode_image(images), blip.encode_text(tokens)
        itm_logits, fused_cls = blip.itm(images, tokens)
    assert image_emb.dtype == text_emb.dtype == itm_logits.dtype == fused_cls.dtype == torch.float32
    torch.testing.assert_close(image_emb, blip.encode_image(images), rtol=0.05, atol=0.02)
    torch.testing.assert_close(text_emb, blip.encode_text(tokens), rtol=0.05, atol=0.02)
    torch.testing.assert_close(itm_logits, blip.itm(images, tokens)[0], rtol=0.05, atol=0.02)
