"""Multi-process training under ``torchrun``: process group, ranks, DDP, barriers and broadcasts.

``torchrun --nproc-per-node N -m pacsai train EXPERIMENT.yaml`` starts N copies of ``pacsai train`` with the
environment variables ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``;
:func:`setup` reads them and joins the process group (NCCL when CUDA is available, Gloo on CPUs;
``PACSAI_DIST_BACKEND`` overrides). Without ``WORLD_SIZE`` (or with 1) nothing is initialised and every helper is
a no-op, so one code path serves a laptop and a GPU node.

How :func:`pacsai.learning.train.train` uses it:

- the local main process of each node (``LOCAL_RANK`` 0) pulls and preprocesses the cohort first
  (:func:`main_first`); the others wait at a barrier and then read the same cache entries, so no two processes
  of a node fetch or write one case at the same time (the caches' atomic renames would survive it, but the work
  would be done N times);
- the network is wrapped in :class:`~torch.nn.parallel.DistributedDataParallel` (:func:`wrap`): gradients are
  averaged over the ranks, so one optimiser step sees ``world × batch_size`` patches;
- each rank draws patches from its own share of the training cases (:func:`shard`) with its own random stream
  (seed, rank): the equivalent of a ``DistributedSampler`` for a sampler that draws with replacement;
- rank 0 alone validates, writes checkpoints and talks to MLflow; the best epoch it selects is broadcast
  (:func:`broadcast`) so every rank ends with the same one.

The wait for the main process's preprocessing can be long on a big cohort: the process group's timeout is
``PACSAI_DIST_TIMEOUT_S`` seconds (default 7200), not PyTorch's 10-30 minutes.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar, cast

import torch

from pacsai.errors import ConfigError

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: seconds a rank waits at a collective (barrier, broadcast, gradient all-reduce) before the job fails
DEFAULT_TIMEOUT_S = 7200.0
BACKENDS = ("gloo", "nccl")


@dataclass(frozen=True)
class Distributed:
    """Where this process stands in the job.

    Attributes
    ----------
    world
        Number of processes (1: not distributed).
    rank
        This process's global rank, 0 … world - 1.
    local_rank
        Its rank on this node (the GPU index on a GPU node).
    device
        The device it trains on (``cuda:LOCAL_RANK`` on a GPU node, else the CPU).
    backend
        ``"nccl"``, ``"gloo"``, or ``""`` when not distributed.
    """

    world: int = 1
    rank: int = 0
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str = ""

    @property
    def main(self) -> bool:
        """Rank 0: validates, checkpoints and writes to MLflow."""
        return self.rank == 0

    @property
    def local_main(self) -> bool:
        """Local rank 0: prepares this node's cache."""
        return self.local_rank == 0

    @property
    def active(self) -> bool:
        """Whether a process group is in use (more than one process)."""
        return self.world > 1

    @property
    def amp(self) -> bool:
        """Mixed precision: on CUDA only (CPU autocast is slower than float32 on most CPUs)."""
        return self.device.type == "cuda"

    def run_params(self) -> dict[str, str | int]:
        """What the training run records (``distributed.world_size``, ``distributed.backend``)."""
        return {
            "distributed.world_size": self.world,
            "distributed.backend": self.backend or "none",
            "distributed.device": self.device.type,
            "distributed.amp": str(self.amp).lower(),
        }


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError as err:
        raise ConfigError(f"{name}={raw!r} is not an integer; torchrun sets it, unset it outside torchrun") from err


def _backend(cuda: bool) -> str:
    chosen = os.environ.get("PACSAI_DIST_BACKEND", "").strip().lower() or ("nccl" if cuda else "gloo")
    if chosen not in BACKENDS:
        raise ConfigError(f"PACSAI_DIST_BACKEND={chosen!r}: use one of {', '.join(BACKENDS)}")
    if chosen == "nccl" and not cuda:
        raise ConfigError("PACSAI_DIST_BACKEND=nccl needs CUDA GPUs; none is visible here: use gloo")
    return chosen


def _timeout() -> datetime.timedelta:
    raw = os.environ.get("PACSAI_DIST_TIMEOUT_S", "").strip()
    try:
        seconds = float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError as err:
        raise ConfigError(f"PACSAI_DIST_TIMEOUT_S={raw!r} is not a number of seconds") from err
    if seconds <= 0:
        raise ConfigError(f"PACSAI_DIST_TIMEOUT_S={raw!r} must be positive")
    return datetime.timedelta(seconds=seconds)


def _cuda_device(local_rank: int) -> torch.device:
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise ConfigError(
            f"LOCAL_RANK {local_rank} has no GPU: this node has {count}; start at most {count} processes per "
            "node (torchrun --nproc-per-node)"
        )
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def setup() -> Distributed:
    """This process's place in the job, joining the process group on first call under ``torchrun``.

    Idempotent: a second call (the CLI's, then :func:`pacsai.learning.train.train`'s) reuses the group.

    Raises
    ------
    ConfigError
        ``WORLD_SIZE`` > 1 without the rest of torchrun's variables, more processes than GPUs on a node, or a
        bad ``PACSAI_DIST_BACKEND`` / ``PACSAI_DIST_TIMEOUT_S``.
    """
    world = _env_int("WORLD_SIZE", 1)
    cuda = torch.cuda.is_available()
    if world <= 1:
        return Distributed(device=torch.device("cuda" if cuda else "cpu"))
    import torch.distributed as dist

    missing = [v for v in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
    if missing:
        raise ConfigError(
            f"WORLD_SIZE={world} but {', '.join(missing)} unset: start multi-process training with torchrun "
            "(see docs/distributed.md), or unset WORLD_SIZE"
        )
    local_rank = _env_int("LOCAL_RANK", 0)
    if dist.is_initialized():
        backend = str(dist.get_backend())
    else:
        backend = _backend(cuda)
        dist.init_process_group(backend=backend, timeout=_timeout())
    device = _cuda_device(local_rank) if backend == "nccl" else torch.device("cpu")
    here = Distributed(world=world, rank=dist.get_rank(), local_rank=local_rank, device=device, backend=backend)
    if here.rank == 0:
        logger.info("distributed training: %d processes, %s back end on %s", world, backend, device.type)
    return here


def is_main() -> bool:
    """Whether this process is rank 0 (true outside ``torchrun``); reads the environment, joins nothing."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return _env_int("RANK", 0) == 0


def rank() -> int:
    """This process's global rank (0 outside ``torchrun``)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return int(dist.get_rank())
    return _env_int("RANK", 0)


def world_size() -> int:
    """Number of processes in the job (1 outside ``torchrun``)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return int(dist.get_world_size())
    return max(1, _env_int("WORLD_SIZE", 1))


def barrier(here: Distributed) -> None:
    """Wait until every rank is here (no-op for one process)."""
    if here.active:
        import torch.distributed as dist

        if here.backend == "nccl":
            dist.barrier(device_ids=[here.local_rank])
        else:
            dist.barrier()


@contextlib.contextmanager
def main_first(here: Distributed, *, local: bool = True) -> Iterator[None]:
    """Run the body on the (local) main process first, then on the others.

    For work that fills a cache: the main process does it; the others wait at a barrier and then run the same
    body, which finds everything cached. With ``local`` (default), the first process of every node goes first
    (node-local caches); otherwise rank 0 alone (a cache shared by all nodes).
    """
    first = here.local_main if local else here.main
    if not first:
        barrier(here)
    yield
    if first:
        barrier(here)


def broadcast(value: T, here: Distributed, *, src: int = 0) -> T:
    """Rank ``src``'s ``value`` on every rank (picklable objects; the input is returned for one process)."""
    if not here.active:
        return value
    import torch.distributed as dist

    box: list[object] = [value]
    dist.broadcast_object_list(box, src=src, device=here.device if here.backend == "nccl" else None)
    return cast(T, box[0])  # rank src's value: a T unpickled in place


def shard(items: Sequence[T], here: Distributed) -> list[T]:
    """This rank's share of ``items`` (every ``world``-th from its rank), or all of them when there are fewer
    items than ranks (a smoke cohort with one training case: every rank draws from it, with its own stream).

    The patch sampler draws with replacement, so shards need not be equal: a case is as likely on every rank.
    """
    if not here.active or len(items) < here.world:
        return list(items)
    return list(items[here.rank :: here.world])


def wrap(net: torch.nn.Module, here: Distributed) -> torch.nn.Module:
    """``net`` in :class:`~torch.nn.parallel.DistributedDataParallel` (``net`` itself for one process).

    Validation and saving use the unwrapped ``net``: its parameters are the same tensors.
    """
    if not here.active:
        return net
    from torch.nn.parallel import DistributedDataParallel

    if here.device.type == "cuda":
        return DistributedDataParallel(net, device_ids=[here.device.index], output_device=here.device.index)
    return DistributedDataParallel(net)


def shutdown() -> None:
    """Leave the process group (end of a torchrun job); no-op when none was joined."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
