"""Student towers by name or path (issue 15, item 6): ``distill --student-image / --student-text`` load timm and
transformers weights saved in those libraries' own formats, through the real CLI; relative paths in a student JSON
are relative to the JSON file; a hub name that is neither cached nor reachable fails at once with one line."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from distill_fixtures import make_shards
from safetensors.torch import load_file
from typer.testing import CliRunner

from mcad_cache.cli.main import app
from mcad_cache.errors import InputPathError, UnknownModelError
from mcad_cache.student import create_student, get_student_config, load_student


@pytest.fixture(scope="module")
def timm_saved(tmp_path_factory) -> dict:
    """A tiny timm model (resnet10t, not the tiny student's mobilevitv2_050) saved as timm saves it: a save_for_hf
    folder (config.json + model.safetensors) and a bare safetensors file of mobilevitv2_050."""
    import timm
    from timm.models import save_for_hf

    root = tmp_path_factory.mktemp("timm")
    torch.manual_seed(3)
    resnet = timm.create_model("resnet10t", num_classes=0)
    save_for_hf(resnet, str(root / "resnet10t"), safe_serialization=True)
    mvit = timm.create_model("mobilevitv2_050", num_classes=0)
    torch.save(mvit.state_dict(), root / "mvit.pth")
    return {"folder": root / "resnet10t", "file": root / "mvit.pth", "resnet": resnet.state_dict(),
            "mvit": mvit.state_dict()}  # fmt: skip


def _equal(loaded: dict, saved: dict, atol: float = 0.0) -> None:
    assert set(loaded) == set(saved)
    for name, value in saved.items():
        if atol:  # a trained copy: only steps of ~lr moved it
            torch.testing.assert_close(loaded[name].cpu(), value.cpu(), rtol=0, atol=atol, msg=name)
        else:
            assert torch.equal(loaded[name].cpu(), value.cpu()), name


def test_towers_by_path_load_the_saved_weights(timm_saved, tiny_hf_bert_dir):
    from transformers import BertModel

    model = create_student("tiny", image=str(timm_saved["folder"]), text=str(tiny_hf_bert_dir))
    assert model.config.image_model.startswith("local-dir:") and model.image_feat_dim == 512  # resnet10t's width
    _equal(model.image_tower.state_dict(), timm_saved["resnet"])
    bert = {k: v for k, v in BertModel.from_pretrained(str(tiny_hf_bert_dir)).state_dict().items() if "pooler" not in k}
    _equal(model.text_tower.state_dict(), bert)
    assert model.tokenize(["a dog"])["input_ids"].max() < len(model.tokenizer) <= 200  # the folder's tiny vocab
    # a bare weights file keeps the config's architecture (tiny: mobilevitv2_050); .pth as timm reads it
    _equal(create_student("tiny", image=str(timm_saved["file"])).image_tower.state_dict(), timm_saved["mvit"])


def test_a_saved_student_needs_none_of_the_sources(timm_saved, tiny_hf_bert_dir, tmp_path):
    model = create_student("tiny", image=str(timm_saved["folder"]), text=str(tiny_hf_bert_dir))
    cfg = json.loads((model.save(tmp_path / "ckpt") / "student_config.json").read_text())
    assert cfg["image_model"] == "resnet10t" and cfg["text_model"] == "" and cfg["image_pretrained"] == ""
    back = load_student(tmp_path / "ckpt")
    assert back.preprocess_cfg == model.preprocess_cfg
    _equal(back.state_dict(), model.state_dict())


def test_bad_tower_specs_are_named(tmp_path):
    with pytest.raises(InputPathError, match="no such file"):
        get_student_config("tiny", image=str(tmp_path / "missing.safetensors"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputPathError, match="no config.json"):
        get_student_config("tiny", image=str(tmp_path / "empty"))
    with pytest.raises(UnknownModelError, match="not a timm model name"):
        get_student_config("tiny", image="no_such_timm_model")
    with pytest.raises(InputPathError, match="not a folder"):
        get_student_config("tiny", text=str(tmp_path / "x.json"))
    assert get_student_config("tiny", image="mobilevitv2_050.cvnets_in1k").image_pretrained is True  # resolved lazily


def test_relative_paths_are_relative_to_the_student_json(timm_saved, tmp_path, monkeypatch):
    folder = tmp_path / "configs"
    (folder / "weights").mkdir(parents=True)
    (folder / "weights" / "mvit.pth").write_bytes(timm_saved["file"].read_bytes())
    spec = json.loads(_tiny_json().read_text())
    spec.update(image_pretrained="weights/mvit.pth")
    (folder / "student.json").write_text(json.dumps(spec))
    monkeypatch.chdir(tmp_path)  # neither the JSON's folder nor anything under it
    cfg = get_student_config("configs/student.json")
    assert cfg.image_pretrained == str((folder / "weights" / "mvit.pth").resolve())
    _equal(create_student("configs/student.json").image_tower.state_dict(), timm_saved["mvit"])


def _tiny_json() -> Path:
    from mcad_cache.student import CONFIG_DIR

    return CONFIG_DIR / "tiny.json"


def test_distill_cli_trains_the_towers_it_was_given(timm_saved, tiny_hf_bert_dir, tmp_path):
    from transformers import BertModel

    data = make_shards(tmp_path / "shards", num_samples=4, per_shard=4)
    res = CliRunner().invoke(
        app,
        ["distill", "--data", data[0], "--out", str(tmp_path / "run"), "--preset", "contrastive", "--student", "tiny",
         "--student-image", str(timm_saved["folder"]), "--student-text", str(tiny_hf_bert_dir), "--lr", "1e-30",
         "--warmup-steps", "0", "--steps", "1", "--batch-size", "4", "--device", "cpu", "--workers", "0"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    final = tmp_path / "run" / "final"
    state = load_file(str(final / "model.safetensors"))
    tower = {k.removeprefix("image_tower."): v for k, v in state.items() if k.startswith("image_tower.")}
    # one AdamW step of lr 1e-30 moves a weight by ~1e-30 (random init would differ by ~1e-2); BatchNorm statistics
    # stay frozen (a pretrained tower)
    _equal(tower, timm_saved["resnet"], atol=1e-20)
    text = {k.removeprefix("text_tower."): v for k, v in state.items() if k.startswith("text_tower.")}
    bert = {k: v for k, v in BertModel.from_pretrained(str(tiny_hf_bert_dir)).state_dict().items() if "pooler" not in k}
    _equal(text, bert, atol=1e-20)
    resolved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert resolved["student_image"] == str(timm_saved["folder"])


@pytest.mark.parametrize("flag, name", [("--student-text", "no-such-org/no-such-bert"),
                                        ("--student-image", "mobilevitv2_050.cvnets_in1k")])  # fmt: skip
def test_an_uncached_hub_name_offline_fails_fast_in_one_line(tmp_path, monkeypatch, flag, name):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # what HF_HUB_OFFLINE=1 sets (this machine has no network)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))  # an empty cache
    data = make_shards(tmp_path / "shards", num_samples=4, per_shard=4)
    start = time.perf_counter()
    res = CliRunner().invoke(
        app,
        ["distill", "--data", data[0], "--out", str(tmp_path / "run"), "--preset", "contrastive", "--student", "tiny",
         flag, name, "--steps", "1", "--batch-size", "4", "--device", "cpu", "--workers", "0"],
    )  # fmt: skip
    elapsed = time.perf_counter() - start
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit), res.output
    text = " ".join(res.output.split())
    assert "Traceback" not in text and "the weights are not local" in text and name in text, text
    assert "save_pretrained folder" in text and constants.HF_HUB_OFFLINE is True  # restored after the load
    assert elapsed < 20  # no retries against the hub (huggingface_hub retries ~25 s per file when unreachable)
