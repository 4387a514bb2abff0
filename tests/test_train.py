"""Training loop: schedule, parameter groups, checkpoints, exact resume, non-finite loss."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mcad_cache.distill import (
    TrainState,
    checkpoint_path,
    create_optimizer,
    latest_checkpoint,
    load_checkpoint,
    param_groups,
    save_checkpoint,
    step_generator,
    train_loop,
)
from mcad_cache.errors import CheckpointError, NonFiniteError
from mcad_cache.schedules import create_warmup_cosine, warmup_cosine


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.drop = nn.Dropout(0.3)  # draws from the global RNG: resume must restore it
        self.log_logit_scale = nn.Parameter(torch.tensor(1.0))


class ToyLoss(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Parameter(torch.tensor(0.5))
        self.register_buffer("calls", torch.zeros(()))


def toy_batches(epoch: int, n: int = 5):
    gen = torch.Generator().manual_seed(100 + epoch)
    return [{"x": torch.randn(6, 4, generator=gen), "keys": [f"e{epoch}b{b}s{i}" for i in range(6)]} for b in range(n)]


def toy_prepare(raw, step):
    gen = step_generator(7, step)
    target = torch.randn(6, 3, generator=gen)  # per-step randomness from (seed, step)
    return {"x": raw["x"], "y": target}, raw["keys"], 6


def toy_forward(model, loss_module, batch):
    out = model.drop(model.lin(batch["x"])) * model.log_logit_scale.exp()
    loss_module.calls += 1
    return {"mse_loss": ((out - batch["y"]) ** 2).mean() * loss_module.gate, "aux_loss": loss_module.gate**2 * 0.1}


def make(seed=0, total=13):
    torch.manual_seed(seed)
    model, loss_module = Toy(), ToyLoss()
    opt = create_optimizer([model, loss_module], lr=1e-2, weight_decay=0.1)
    sched = create_warmup_cosine(opt, warmup_steps=3, total_steps=total)
    return model, loss_module, opt, sched


def run(tmp_path, total, *, stop_at=None, resume=False, log=None, prefetch=0):
    model, loss_module, opt, sched = make(total=total)
    state, rng = TrainState(), None
    if resume:
        state, rng, extra = load_checkpoint(
            latest_checkpoint(tmp_path), model=model, loss_module=loss_module, optimizer=opt, scheduler=sched
        )
        assert extra == {"note": "x"}
    torch.manual_seed(1234) if not resume else None

    def on_ckpt(st):
        save_checkpoint(
            checkpoint_path(tmp_path, st.step),
            model=model,
            loss_module=loss_module,
            optimizer=opt,
            scheduler=sched,
            state=st,
            extra={"note": "x"},
        )
        if stop_at is not None and st.step >= stop_at:
            raise KeyboardInterrupt

    log = [] if log is None else log
    try:
        state = train_loop(
            model, loss_module, batches_for_epoch=toy_batches, prepare=toy_prepare, forward=toy_forward,
            optimizer=opt, scheduler=sched, state=state, total_steps=total, rng_state=rng, log_every=1,
            checkpoint_every=4, on_log=log.append, on_checkpoint=on_ckpt, prefetch=prefetch,
        )  # fmt: skip
    except KeyboardInterrupt:
        pass
    return model, loss_module, state, log


@pytest.mark.parametrize("prefetch", [0, 2])
def test_exact_resume_reproduces_uninterrupted_run(tmp_path, prefetch):
    # 13 steps over epochs of 5 batches: the stop at step 8 (checkpoint_every=4) lies inside epoch 1. The reference
    # prepares batches inline; the interrupted + resumed run may prefetch them in a thread.
    ref_model, ref_loss, ref_state, ref_log = run(tmp_path / "a", 13)
    _, _, _, part_log = run(tmp_path / "b", 13, stop_at=8, prefetch=prefetch)
    assert len(part_log) == 8
    model, loss_module, state, resumed_log = run(tmp_path / "b", 13, resume=True, prefetch=prefetch)
    assert [r["step"] for r in resumed_log] == list(range(9, 14))
    strip = [{k: v for k, v in r.items() if k not in ("samples_per_s", "elapsed_s")} for r in ref_log]
    got = [{k: v for k, v in r.items() if k not in ("samples_per_s", "elapsed_s")} for r in part_log + resumed_log]
    assert got == strip  # bit-identical losses, lr, grad norms
    for a, b in zip(ref_model.state_dict().values(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(ref_loss.gate, loss_module.gate) and float(loss_module.calls) == float(ref_loss.calls)
    assert (state.step, state.epoch, state.batch_in_epoch, state.samples_seen) == (13, 2, 3, 78)
    assert state == ref_state


def test_resume_at_epoch_boundary(tmp_path):
    # checkpoint at step 4 with 4-batch epochs is the last batch of epoch 0
    def batches(epoch):
        return toy_batches(epoch, n=4)

    results = []
    for name, stop in (("a", None), ("b", 4)):
        model, loss_module, opt, sched = make(total=9)
        torch.manual_seed(5)

        def on_ckpt(st, model=model, loss_module=loss_module, opt=opt, sched=sched, name=name, stop=stop):
            save_checkpoint(
                checkpoint_path(tmp_path / name, st.step),
                model=model,
                loss_module=loss_module,
                optimizer=opt,
                scheduler=sched,
                state=st,
            )
            if stop is not None:
                raise KeyboardInterrupt

        try:
            train_loop(
                model,
                loss_module,
                batches_for_epoch=batches,
                prepare=toy_prepare,
                forward=toy_forward,
                optimizer=opt,
                scheduler=sched,
                state=TrainState(),
                total_steps=9,
                checkpoint_every=4,
                on_checkpoint=on_ckpt,
            )
        except KeyboardInterrupt:
            model, loss_module, opt, sched = make(total=9)
            state, rng, _ = load_checkpoint(
                latest_checkpoint(tmp_path / name), model=model, loss_module=loss_module, optimizer=opt, scheduler=sched
            )
            assert (state.epoch, state.batch_in_epoch) == (0, 4)
            train_loop(
                model,
                loss_module,
                batches_for_epoch=batches,
                prepare=toy_prepare,
                forward=toy_forward,
                optimizer=opt,
                scheduler=sched,
                state=state,
                total_steps=9,
                rng_state=rng,
            )
        results.append(model.lin.weight.detach().clone())
    assert torch.equal(results[0], results[1])


def test_non_finite_loss_names_step_and_keys(tmp_path):
    model, loss_module, opt, sched = make()

    def bad_forward(model, loss_module, batch):
        loss = ((model.lin(batch["x"]) - batch["y"]) ** 2).mean()
        return {"mse_loss": loss * (float("nan") if batch["x"][0, 0] > -100 and sched.last_epoch == 2 else 1.0)}

    with pytest.raises(NonFiniteError, match=r"step 3: non-finite loss .*e0b2s0, e0b2s1"):
        train_loop(
            model,
            loss_module,
            batches_for_epoch=toy_batches,
            prepare=toy_prepare,
            forward=bad_forward,
            optimizer=opt,
            scheduler=sched,
            state=TrainState(),
            total_steps=5,
        )


def test_schedule_and_param_groups():
    assert warmup_cosine(0, warmup_steps=4, total_steps=10) == pytest.approx(0.25)
    assert warmup_cosine(3, warmup_steps=4, total_steps=10) == pytest.approx(1.0)
    assert warmup_cosine(4, warmup_steps=4, total_steps=10) == pytest.approx(1.0)
    assert warmup_cosine(7, warmup_steps=4, total_steps=10) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert warmup_cosine(10, warmup_steps=4, total_steps=10) == pytest.approx(0.0)
    model = Toy()
    decay, no_decay = param_groups([model], weight_decay=0.1)
    assert [p.shape for p in decay["params"]] == [torch.Size([3, 4])]
    assert {id(p) for p in no_decay["params"]} == {id(model.lin.bias), id(model.log_logit_scale)}
    assert no_decay["weight_decay"] == 0.0


def test_checkpoint_errors(tmp_path):
    model, loss_module, opt, sched = make()
    folder = save_checkpoint(
        tmp_path / "c", model=model, loss_module=loss_module, optimizer=opt, scheduler=sched, state=TrainState(step=2)
    )
    assert latest_checkpoint(tmp_path) is None  # not under checkpoints/
    other = nn.Linear(2, 2)
    with pytest.raises(CheckpointError, match="does not fit"):
        load_checkpoint(folder, model=other, loss_module=loss_module)
    (folder / "train_state.pt").unlink()
    with pytest.raises(CheckpointError, match="missing train_state.pt"):
        load_checkpoint(folder, model=model, loss_module=loss_module)


def test_prefetch_reraises_prepare_errors():
    model, loss_module, opt, sched = make()

    def bad_prepare(raw, step):
        if step == 3:
            raise KeyError("sample e0b2s0 vanished")
        return toy_prepare(raw, step)

    with pytest.raises(KeyError, match="e0b2s0"):
        train_loop(
            model,
            loss_module,
            batches_for_epoch=toy_batches,
            prepare=bad_prepare,
            forward=toy_forward,
            optimizer=opt,
            scheduler=sched,
            state=TrainState(),
            total_steps=5,
            prefetch=2,
        )
