"""MCADLoss(gather=True) on two CPU ranks (gloo) equals the single-process loss on the whole batch."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mcad_cache.losses import MCADLoss, StudentOutputs, TeacherTargets, preset

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


def _worker(rank: int, world: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        img, txt, (v, t) = _data()
        part = slice(rank * N // world, (rank + 1) * N // world)
        losses, g_img, g_scale, g_head = _loss_and_grads(img[part], txt[part], v[part], t[part], gather=True)
        # DDP averages parameter gradients over ranks; do the same here for the shared ones.
        for g in (g_scale, g_head):
            dist.all_reduce(g)
            g /= world
        # Plain lists: tensors in a Queue live in shared memory that vanishes when this process exits.
        queue.put((rank, losses, (g_img / world).tolist(), g_scale.tolist(), g_head.tolist()))
    finally:
        dist.destroy_process_group()


def test_gathered_loss_matches_single_process():
    img, txt, (v, t) = _data()
    ref, ref_g_img, ref_g_scale, ref_g_head = _loss_and_grads(img, txt, v, t, gather=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=300) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    for rank, losses, *grads in results:
        g_img, g_scale, g_head = (torch.tensor(x) for x in grads)
        # In-batch terms are global on every rank; the feature term is local (its rank mean is the global mean).
        for key in ("itc_loss", "kd_i2t_loss", "kd_t2i_loss"):
            assert abs(losses[key] - ref[key]) < 1e-5, (rank, key)
        part = slice(rank * N // 2, (rank + 1) * N // 2)
        # Gradients after DDP-style averaging equal the single-process gradients of the global loss.
        torch.testing.assert_close(g_img, ref_g_img[part], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(g_scale, ref_g_scale, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(g_head, ref_g_head, rtol=1e-4, atol=1e-6)
    feat_mean = sum(r[1]["feat_loss"] for r in results) / 2
    assert abs(feat_mean - ref["feat_loss"]) < 1e-5
