"""torchrun's environment: the rank and world size it sets, and the process group a run joins.

The library reads no environment variables: the pipelines pass ``os.environ`` to :func:`torchrun_env`, which reads
torchrun's ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` from it (``MASTER_ADDR`` / ``MASTER_PORT`` are read by
``torch.distributed`` itself). Backends: NCCL for CUDA runs, gloo on CPU (the build's barriers always use gloo,
``build.coordination``).
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
import torch.distributed as dist

from mcad_cache.config import BuildConfig
from mcad_cache.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class TorchrunEnv:
    """What torchrun (or any launcher with its variables) says about this process."""

    rank: int  # global rank, RANK
    world_size: int  # WORLD_SIZE
    local_rank: int  # LOCAL_RANK: this process's GPU on its node


def torchrun_env(environ: Mapping[str, str]) -> TorchrunEnv | None:
    """The launcher's ranks when ``environ`` (the process environment) has ``WORLD_SIZE`` > 1, else None.

    Raises:
        ConfigError: ``RANK`` missing or not an integer, or not in [0, WORLD_SIZE).
    """
    world = environ.get("WORLD_SIZE", "")
    if not world.isdigit() or int(world) <= 1:
        return None
    try:
        rank = int(environ["RANK"])
        local = int(environ.get("LOCAL_RANK", "0"))
    except (KeyError, ValueError) as err:
        raise ConfigError(
            f"WORLD_SIZE={world} is set but RANK is missing or not an integer ({err}); use torchrun"
        ) from err
    if not 0 <= rank < int(world):
        raise ConfigError(f"RANK={rank} is outside [0, WORLD_SIZE={world}); use torchrun")
    return TorchrunEnv(rank=rank, world_size=int(world), local_rank=local)


def build_ranks(config: BuildConfig, env: TorchrunEnv | None) -> BuildConfig:
    """``config`` with ``rank`` / ``world_size`` from torchrun's ``env`` (:func:`torchrun_env`) when there is one.

    A flag that disagrees with torchrun is refused rather than silently replaced (``--world-size 3`` under
    ``--nproc-per-node 2`` would leave units nobody writes); the defaults (rank 0, world size 1) mean "not given".

    Raises:
        ConfigError: ``--rank`` / ``--world-size`` given and different from torchrun's ``RANK`` / ``WORLD_SIZE``.
    """
    if env is None:
        return config
    if config.world_size not in (1, env.world_size) or config.rank not in (0, env.rank):
        raise ConfigError(
            f"--rank {config.rank} --world-size {config.world_size} disagree with torchrun's RANK={env.rank} "
            f"WORLD_SIZE={env.world_size}; under torchrun leave --rank / --world-size out (they come from torchrun)"
        )
    return dataclasses.replace(config, rank=env.rank, world_size=env.world_size)


@contextmanager
def process_group(env: TorchrunEnv | None, *, device: str, timeout_s: float) -> Iterator[None]:
    """Join torchrun's process group for the duration of a run (nothing without torchrun, or when the caller has
    already initialised one), and leave it afterwards.

    Args:
        env: from :func:`torchrun_env`.
        device: the run's ``--device`` string: CUDA runs pin ``cuda:LOCAL_RANK`` and use NCCL; else gloo.
        timeout_s: the group's collective timeout (seconds).
    """
    if env is None or dist.is_initialized():
        yield
        return
    cuda = device != "cpu" and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(env.local_rank)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s))
    try:
        yield
    finally:
        dist.destroy_process_group()


__all__ = ["TorchrunEnv", "build_ranks", "process_group", "torchrun_env"]
