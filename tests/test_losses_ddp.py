"""MCADLoss(gather=True) on two CPU ranks (gloo) equals the single-process loss on the whole batch; so does the
distill factory's DDP step (``distill.ddp``), gradient by gradient. One spawn of the 2 ranks serves every test."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mcad_cache.distill import create_distill, total_loss
from mcad_cache.losses import MCADLoss, StudentOutputs, TeacherTargets, preset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ddp_world import B  # noqa: E402

N, D, DC = 6, 5, 4


def _data():
    g = torch.Generator().manual_seed(0)
    f = torch.nn.functional.normalize
    return (
        f(torch.randn(N, D, generator=g), dim=-1),
        f(torch.randn(N, D, generator=g), dim=-1),
        (
            f(torch.randn(N, DC, generator=g), dim=-1),
            f(torch.randn(N, DC, generator=g), dim=-1),
        ),
    )


def _loss_and_grads(img: torch.Tensor, txt: torch.Tensor, v: torch.Tensor, t: torch.Tensor, *, gather: bool):
    torch.manual_seed(1)
    loss_fn = MCADLoss(preset("clip-kd-feat"), student_dim=D, clip_dim=DC, gather=gather)
    img, txt = img.clone().requires_grad_(), txt.clone().requires_grad_()
    log_scale = torch.tensor(2.5, requires_grad=True)
    out = loss_fn(StudentOutputs(img, txt, log_scale.exp()), TeacherTargets(v, t, 50.0))
    out["loss"].backward()
    head = loss_fn.feat_head_image.weight.grad
    return {k: float(x.detach()) for k, x in out.items()}, img.grad, log_scale.grad, head


def _rank_worker(rank: int, world: int, init_file: str, configs: dict[str, dict], out: str) -> None:
    """One rank of the module's one 2-rank gloo group (``torch.multiprocessing.spawn``): the gathered loss on its
    slice of ``_data`` (``loss-rank<r>.pt``: loss terms, the image gradient and the DDP-style averaged gradients of
    the shared parameters), then one factory DDP step per config (``<name>/rank<r>.pt``, ``_step``)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        img, txt, (v, t) = _data()
        part = slice(rank * N // world, (rank + 1) * N // world)
        losses, g_img, g_scale, g_head = _loss_and_grads(img[part], txt[part], v[part], t[part], gather=True)
        # DDP averages parameter gradients over ranks; do the same here for the shared ones.
        for g in (g_scale, g_head):
            dist.all_reduce(g)
            g /= world
        torch.save({"losses": losses, "grads": (g_img / world, g_scale, g_head)}, f"{out}/loss-rank{rank}.pt")
        for name, config in configs.items():
            _step(rank, world, config, f"{out}/{name}")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(ddp_world, tmp_path_factory) -> Path:
    """One spawn of 2 gloo ranks for every comparison of this module (each process start costs seconds): the
    gathered loss, then the factory's DDP step with global (``global/``) and per-rank (``rank/``) in-batch terms,
    2 ranks x batch B each."""
    root = tmp_path_factory.mktemp("two_ranks")
    configs = {
        "global": _distill_config(ddp_world, root / "run-global", batch_size=B),
        "rank": _distill_config(ddp_world, root / "run-rank", batch_size=B, in_batch="rank"),
    }
    for name in configs:
        (root / name).mkdir()
    mp.spawn(_rank_worker, args=(2, str(root / "init"), configs, str(root)), nprocs=2, join=True)
    return root


def test_gathered_loss_matches_single_process(two_ranks):
    img, txt, (v, t) = _data()
    ref, ref_g_img, ref_g_scale, ref_g_head = _loss_and_grads(img, txt, v, t, gather=False)
    results = [torch.load(two_ranks / f"loss-rank{r}.pt") for r in range(2)]
    for rank, result in enumerate(results):
        losses, (g_img, g_scale, g_head) = result["losses"], result["grads"]
        # In-batch terms are global on every rank; the feature term is local (its rank mean is the global mean).
        for key in ("itc_loss", "kd_i2t_loss", "kd_t2i_loss"):
            assert abs(losses[key] - ref[key]) < 1e-5, (rank, key)
        part = slice(rank * N // 2, (rank + 1) * N // 2)
        # Gradients after DDP-style averaging equal the single-process gradients of the global loss.
        torch.testing.assert_close(g_img, ref_g_img[part], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(g_scale, ref_g_scale, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(g_head, ref_g_head, rtol=1e-4, atol=1e-6)
    feat_mean = sum(r["losses"]["feat_loss"] for r in results) / 2
    assert abs(feat_mean - ref["feat_loss"]) < 1e-5


def _distill_config(world: dict[str, Path], out: Path, **extra) -> dict:
    return {
        "cache": [str(world["cache"])], "data": [str(world["shards"])], "out": str(out),
        "student": str(world["student"]), "preset": "clip-kd-feat", "k": 3, "steps": 1, "workers": 0,
        "device": "cpu", "shuffle_buffer": 0, "threads": 1, **extra,
    }  # fmt: skip


def _step(rank: int, world: int, config: dict, out: str) -> None:
    """The factory's DDP step (``DistillRun.trained_module``) on one rank (in a process group when world > 1): one
    forward / backward on its first batch; saves the loss terms and every parameter's gradient after DDP's
    all-reduce to ``<out>/rank<r>.pt``."""
    from mcad_cache.config import DistillConfig

    d = create_distill(DistillConfig(**config), rank=rank, world_size=world)
    module, loss_module, forward = d.trained_module()
    batch, _, _ = d.prepare(next(iter(d.stream(0))), 0)
    losses = forward(module, loss_module, batch)
    total_loss(losses).backward()
    named = (
        module.module.named_parameters()
        if world > 1
        else [*((f"model.{n}", p) for n, p in d.model.named_parameters()),
              *((f"loss_module.{n}", p) for n, p in d.loss_module.named_parameters())]
    )  # fmt: skip
    grads = {n: p.grad.detach().double().clone() for n, p in named if p.grad is not None}
    torch.save({"losses": {k: float(v.detach()) for k, v in losses.items()}, "grads": grads}, f"{out}/rank{rank}.pt")


def test_factory_ddp_step_gradients_equal_one_process_double_batch(ddp_world, two_ranks, tmp_path):
    """The distill wiring (``create_distill`` + ``distill.ddp``): 2 gloo ranks x batch 4 with global in-batch terms
    give the same loss terms and the same gradient for every parameter (student and loss module) as 1 process x
    batch 8 on the same samples; per-rank terms do not."""
    import fake_teacher  # noqa: F401  (registers "fake")

    _step(0, 1, _distill_config(ddp_world, tmp_path / "run-one", batch_size=2 * B), str(tmp_path))
    one = torch.load(tmp_path / "rank0.pt")
    ranks = [torch.load(two_ranks / "global" / f"rank{r}.pt") for r in range(2)]
    for key, value in one["losses"].items():
        # in-batch terms are global on every rank; the per-sample feature term (and so the sum) is per rank, and
        # its mean over the ranks is the global batch's
        got = (
            [r["losses"][key] for r in ranks]
            if key.startswith(("itc", "kd_"))
            else [np.mean([r["losses"][key] for r in ranks])]
        )
        for v in got:
            assert abs(v - value) <= 1e-6 * max(1.0, abs(value)), (key, v, value)
    for got in ranks:
        assert sorted(got["grads"]) == sorted(one["grads"])
        for name, grad in one["grads"].items():
            torch.testing.assert_close(got["grads"][name], grad, rtol=1e-5, atol=1e-6, msg=name)
    per_rank = torch.load(two_ranks / "rank" / "rank0.pt")
    assert abs(per_rank["losses"]["itc_loss"] - one["losses"]["itc_loss"]) > 1e-3
