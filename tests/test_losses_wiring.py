"""Issue 10's wiring faults, each with a test that fails on the old behaviour: both directions of the modified
features are fetched and trained; duplicate captions are in-batch positives; feature alignment on normalised
features with a gradient of the order of a KD term; the student's loss is logged apart from the teacher side;
BatchNorm running statistics in the student's image tower are frozen by option (default for pretrained towers)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from distill_fixtures import MemoryCache, make_shards
from fake_teacher import FakeTeacher

from mcad_cache.distill import TargetJoiner, step_generator
from mcad_cache.losses import MCADLoss, StudentOutputs, TeacherTargets, itc_loss, preset
from mcad_cache.student import create_student


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    shards = make_shards(tmp_path_factory.mktemp("wiring"), num_samples=24, per_shard=12)
    clip = MemoryCache(shards, FakeTeacher(kind="dual"), k=4, path="clip")
    albef = MemoryCache(shards, FakeTeacher(kind="single", seed=1), k=4, permute=True, path="albef")
    return {"clip": clip, "albef": albef}


def _batch(clip, keys):
    captions = [[str(c) for c in clip.captions[clip.img2txt(clip.image_rows([k])[0])]] for k in keys]
    return {"key": keys, "captions": captions, "image": torch.zeros(len(keys), 3, 2, 2)}


def _student(b: int, k: int, d: int = 16, seed: int = 0) -> StudentOutputs:
    g = torch.Generator().manual_seed(seed)
    unit = [F.normalize(torch.randn(*s, d, generator=g), dim=-1) for s in ((b,), (b,), (b, k), (b, k))]
    return StudentOutputs(unit[0], unit[1], torch.tensor(14.0), topk_text_emb=unit[2], topk_image_emb=unit[3])


def test_text_side_modification_is_fetched_and_trained_with_topk_t2i_off(world):
    # fault 1: with w_topk_t2i = 0 the joiner skipped the t2i direction, so proj_text / gate_text got no gradient
    clip, albef = world["clip"], world["albef"]
    cfg = preset("mcad-online", w_topk_t2i=0.0)
    joiner = TargetJoiner(clip=clip, single=albef, loss_config=cfg, k=3)  # no candidate images: t2i is teacher-only
    keys = [str(k) for k in clip.image_keys.tolist()[:6]]
    batch = joiner(_batch(clip, keys), generator=step_generator(0, 1))
    t = batch.targets
    assert t.fused_cls_t2i is not None and t.clip_topk_image_emb is not None and t.itm_logits_t2i is not None
    assert batch.topk_image_index is None and batch.extra_images is None  # no pixels fetched for the student
    loss = MCADLoss(cfg, student_dim=16, clip_dim=clip.layout.emb_dim, fused_dim=albef.layout.fused_dim)
    out = loss(_student(6, 3), t)
    out["loss"].backward()
    assert loss.integration.proj_text.weight.grad.abs().sum() > 0 and loss.integration.gate_text.grad.abs() > 0
    # a loader that drops a field the module needs is an error naming it, never a silently unmodified side
    t.fused_cls_t2i = None
    with pytest.raises(ValueError, match="fused_cls_t2i"):
        loss(_student(6, 3), t)


def test_duplicate_captions_are_in_batch_positives(world):
    # fault 2: duplicate_positives was never passed to the loss. s0000 and s0012 carry the same caption text.
    clip = world["clip"]
    keys = ["s0000", "s0012", "s0001", "s0005"]
    batch = TargetJoiner(clip=None, single=None, loss_config=preset("contrastive"), k=3)(
        _batch(clip, keys), generator=step_generator(0, 1)
    )
    assert batch.texts[0] == batch.texts[1]
    pos = batch.targets.positives
    assert pos.tolist()[0] == [True, True, False, False] and pos.tolist()[1][0]
    student = _student(4, 3)
    out = MCADLoss(preset("contrastive"), student_dim=16)(student, batch.targets)
    logits = student.logit_scale * student.image_emb @ student.text_emb.t()
    assert out["itc_loss"].item() == pytest.approx(itc_loss(logits, positives=pos).item(), rel=1e-6)
    assert out["itc_loss"].item() < itc_loss(logits).item()  # the duplicate is no longer pushed away


def test_duplicate_captions_share_one_target_in_derived_kd():
    from mcad_cache.integrate.engine import _share_duplicates

    feats = F.normalize(torch.randn(4, 8, generator=torch.Generator().manual_seed(0)), dim=-1).numpy()
    ids = torch.tensor([0, 1, 0, 2]).numpy()
    out = _share_duplicates(feats, ids, torch.ones(4, dtype=torch.bool).numpy())
    assert (out[0] == out[2]).all() and (out[1] == feats[1]).all()  # equal in-batch teacher mass for duplicates


def _grad_norms(cfg) -> dict[str, float]:
    torch.manual_seed(0)
    b, d, dc = 32, 256, 512
    loss = MCADLoss(cfg, student_dim=d, clip_dim=dc)
    v = F.normalize(torch.randn(b, dc), dim=-1)
    t = F.normalize(v + 0.8 * F.normalize(torch.randn(b, dc), dim=-1), dim=-1)
    norms = {}
    for term in ("kd_i2t_loss", "feat_loss"):
        img = F.normalize(torch.randn(b, d), dim=-1).requires_grad_()
        s = StudentOutputs(img, F.normalize(torch.randn(b, d), dim=-1), torch.tensor(1 / 0.07))
        out = loss(s, TeacherTargets(clip_image_emb=v, clip_text_emb=t, clip_logit_scale=100.0))
        (g,) = torch.autograd.grad(out[term], img)
        norms[term] = g.norm().item()
    return norms


def test_feature_alignment_gradient_is_of_the_order_of_a_kd_term():
    # fault 3: mse on the unnormalised head output gave a gradient ~1/600 of a KD term (0.002 vs 1.6)
    norms = _grad_norms(preset("clip-kd-feat"))
    assert 0.5 <= norms["feat_loss"] / norms["kd_i2t_loss"] <= 2.0, norms
    old = _grad_norms(preset("clip-kd-feat", w_feat=1.0, feat_kind="cosine"))
    assert old["feat_loss"] / old["kd_i2t_loss"] < 0.1  # the former default: feature alignment did nothing


def test_logged_loss_is_the_students_and_the_module_still_trains():
    # fault 4: integration_loss was summed into the logged `loss`
    g = torch.Generator().manual_seed(3)
    b, k, dc, c = 6, 4, 8, 5
    unit = lambda *s: F.normalize(torch.randn(*s, generator=g), dim=-1)  # noqa: E731
    t = TeacherTargets(
        clip_image_emb=unit(b, dc), clip_text_emb=unit(b, dc), clip_logit_scale=100.0,
        clip_topk_text_emb=unit(b, k, dc), clip_topk_image_emb=unit(b, k, dc),
        itm_logits_i2t=torch.randn(b, k, 2, generator=g), itm_logits_t2i=torch.randn(b, k, 2, generator=g),
        fused_cls_i2t=torch.randn(b, k, c, generator=g), fused_cls_t2i=torch.randn(b, k, c, generator=g),
    )  # fmt: skip
    loss = MCADLoss(preset("mcad-online", gate_init=0.2), student_dim=16, clip_dim=dc, fused_dim=c)
    out = loss(_student(b, k), t)
    student_terms = sum(v for key, v in out.items() if key.endswith("_loss") and key != "integration_loss")
    assert out["integration_loss"].item() > 0.1
    assert out["loss"].item() == pytest.approx(student_terms.item(), rel=1e-6)
    out["loss"].backward()
    grad_total = loss.integration.gate_image.grad.clone()
    loss.zero_grad()
    loss(_student(b, k), t)["integration_loss"].backward()
    assert grad_total.item() == pytest.approx(loss.integration.gate_image.grad.item(), rel=1e-5)


def test_batchnorm_running_stats_frozen_by_option():
    # fault 5: in train mode BatchNorm saw anchors plus candidate images under mcad, anchors only otherwise
    images = torch.rand(6, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    for bn_stats, changes in (("frozen", False), ("train", True)):
        model = create_student("tiny", bn_stats=bn_stats).train()
        bns = [m for m in model.image_tower.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        assert bns, "the tiny student's tower has BatchNorm layers"
        before = [m.running_mean.clone() for m in bns]
        model.forward_image(images)
        moved = any(not torch.equal(a, m.running_mean) for a, m in zip(before, bns, strict=True))
        assert moved is changes, bn_stats
        assert model.saved_config().bn_stats == bn_stats  # the resolved choice is recorded in checkpoints
    assert not create_student("tiny").freeze_bn_stats  # auto: a randomly initialised tower trains its statistics


def test_student_view_must_match_the_teachers_view():
    # item 5: teachers squash-resize; a student with shortest-side resize + centre crop sees other pixels
    from types import SimpleNamespace

    from mcad_cache.distill.join import check_student_view
    from mcad_cache.errors import ConfigError

    teacher = SimpleNamespace(path="clip.zarr", fingerprint={"preprocess": {"image_size": 224, "resize_mode": "squash",
                                                                             "crop": None}})  # fmt: skip
    crop_student = create_student("tiny", resize_mode="shortest").preprocess_cfg
    assert crop_student["resize_mode"] == "shortest" and crop_student["crop"] == "center"
    with pytest.raises(ConfigError, match="clip.zarr \\(resize_mode='squash', crop=None\\)") as err:
        check_student_view([teacher, None], crop_student)
    assert "\n" not in str(err.value) and "--allow-view-mismatch" in str(err.value)  # one line, names the flag
    lines = check_student_view([teacher], crop_student, allow_mismatch=True)  # warned and returned for the record
    assert len(lines) == 2
    squash_student = create_student("tiny").preprocess_cfg  # squash (tiny.json), another resolution: the same view
    assert squash_student["image_size"] != 224 and check_student_view([teacher], squash_student) == []
