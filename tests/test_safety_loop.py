"""Issue 13 items 14-15, lost work: the distill loop checkpoints by time by default, checkpoints and stops with a
one-line error on SIGINT / SIGTERM, and prints plain progress lines when stderr is not a terminal."""

from __future__ import annotations

import logging
import os
import signal

import pytest
import torch
from torch import nn

from mcad_cache.distill.checkpoint import TrainState
from mcad_cache.distill.loop import train_loop
from mcad_cache.errors import McadError, RunInterruptedError


def _batches(epoch: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(epoch)
    return [torch.randn(4, 2, generator=gen) for _ in range(5)]


def _loop(total_steps: int, saved: list[int] | None = None, **kw) -> tuple[TrainState, list[int]]:
    torch.manual_seed(0)
    model = nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    saved = [] if saved is None else saved
    state = train_loop(
        model, None, batches_for_epoch=_batches, prepare=lambda raw, step: (raw, ["k"] * 4, 4),
        forward=lambda m, _loss, b: {"loss": m(b).pow(2).mean()}, optimizer=optimizer, scheduler=scheduler,
        state=TrainState(), total_steps=total_steps, device=torch.device("cpu"), precision="fp32",
        on_checkpoint=lambda s: saved.append(s.step), **kw,
    )  # fmt: skip
    return state, saved


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_checkpoints_after_the_current_step_and_stops_with_one_line(sig):
    """Old code: SIGTERM killed the run and SIGINT raised KeyboardInterrupt mid-step, with no checkpoint."""

    def send_at_step_3(state: TrainState) -> bool:
        if state.step == 3:
            os.kill(os.getpid(), sig)
        return False

    previous = signal.getsignal(sig)
    saved: list[int] = []
    with pytest.raises(RunInterruptedError) as err:  # the signal arrives after step 3: step 4 finishes, is saved
        _loop(12, saved, callbacks=[send_at_step_3], checkpoint_every_s=0)
    assert isinstance(err.value, McadError)  # the CLI prints it as one line and exits 1
    assert f"{signal.Signals(sig).name} received: stopped after step 4 of 12; a checkpoint was saved" in str(err.value)
    assert saved == [4] and signal.getsignal(sig) == previous  # handlers are restored


def test_time_based_checkpoints_are_on_by_default(monkeypatch):
    """Old code: ``checkpoint_every`` 0 (the default) meant no checkpoint before the end."""
    clock = iter(range(0, 10_000, 400))  # every perf_counter() call advances 400 s
    monkeypatch.setattr("mcad_cache.distill.loop.time.perf_counter", lambda: float(next(clock)))
    _, saved = _loop(6, plain_progress_s=0)
    assert saved and saved[0] < 6
    _, none = _loop(6, plain_progress_s=0, checkpoint_every_s=0)
    assert none == []


def test_plain_progress_lines_when_stderr_is_not_a_terminal(caplog, monkeypatch):
    monkeypatch.setattr("sys.stderr.isatty", lambda: False, raising=False)
    clock = iter(range(0, 10_000, 40))
    monkeypatch.setattr("mcad_cache.distill.loop.time.perf_counter", lambda: float(next(clock)))
    with caplog.at_level(logging.INFO, logger="mcad_cache.distill.loop"):
        _loop(5, checkpoint_every_s=0)
    lines = [r.getMessage() for r in caplog.records if r.name == "mcad_cache.distill.loop"]
    assert lines and lines[0].startswith("step 1/5 (20%), loss ") and "pairs/s" in lines[0]
