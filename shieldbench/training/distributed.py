"""Distributed data parallel under ``torchrun``: the process group and its collectives.

One process per device; ``torchrun`` sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``. :func:`init_from_env`
joins the group (NCCL on CUDA, gloo on CPU) when ``WORLD_SIZE`` > 1 and does
nothing otherwise, so every helper here is the identity in a single process.

What "the batch" means across ranks is the *global* batch: ``train.batch_size``
rows, split into equal shares by :class:`~shieldbench.data.loader.EpochBatchSampler`.
Every loss is written so that the mean of the ranks' local losses is the
loss of the global batch in one process, and each local loss's gradient
reaches the features of every rank (the gathers below keep autograd). With
DDP's gradient averaging, a step on W processes is the step of one process
on the same global batch, up to floating-point reassociation; a test checks
it for every built-in defense.

- :func:`gather` - all ranks' rows in rank order; ``grad=True`` keeps the
  gradient to every rank's rows (``torch.distributed.nn.all_gather``: its
  backward sums the gradients of all ranks' losses, as open_clip's
  ``gather_with_grad`` does); rows may differ in number between ranks.
- :func:`rank_offset` - where this rank's rows sit in the gathered batch.
- :func:`all_reduce_mean` / :func:`broadcast_object` / :func:`barrier`.
- :func:`rank_zero_first` - rank 0 runs a block first (building a cache),
  then the others run it (finding the cache).
"""

from __future__ import annotations

import datetime
import os
import warnings
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_MIN = 120
"""Collective timeout: ranks wait at a barrier while rank 0 evaluates or builds a cache alone."""


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """True on rank 0 (and in a single process): the one process that writes files."""
    return rank() == 0


def env_world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def init_from_env(timeout_min: float | None = None) -> torch.device | None:
    """Join the process group that ``torchrun`` describes; return this rank's device.

    Returns None (and does nothing) when ``WORLD_SIZE`` is unset or 1. On
    CUDA each rank takes ``cuda:LOCAL_RANK``; on CPU the backend is gloo.
    """
    if env_world_size() <= 1:
        return None
    if is_distributed():
        return local_device()
    timeout = timeout_min or float(os.environ.get("SHIELDBENCH_DIST_TIMEOUT_MIN", DEFAULT_TIMEOUT_MIN))
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_device())
    dist.init_process_group(backend="nccl" if use_cuda else "gloo",
                            timeout=datetime.timedelta(minutes=timeout))
    return local_device()


def local_device() -> torch.device:
    if torch.cuda.is_available():
        # Modulo the visible count: a scheduler that binds one GPU per task leaves only cuda:0 visible.
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return torch.device("cpu")


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def _sizes(n: int, device: torch.device) -> list[int]:
    t = torch.tensor([n], dtype=torch.long, device=device)
    out = [torch.zeros_like(t) for _ in range(world_size())]
    dist.all_gather(out, t)
    return [int(x) for x in out]


def gather(t: torch.Tensor, grad: bool = False) -> torch.Tensor:
    """All ranks' ``t`` concatenated along dim 0, in rank order (``t`` itself in one process).

    ``grad=True``: the result is differentiable with respect to every rank's
    rows; the backward sums, over ranks, the gradients each rank's loss sends
    to a row. Ranks may hold different numbers of rows (padded for transport).
    """
    if not is_distributed():
        return t
    sizes = _sizes(t.shape[0], t.device)
    top = max(sizes)
    x = t if t.shape[0] == top else torch.cat([t, t.new_zeros((top - t.shape[0], *t.shape[1:]))])
    if grad:
        import torch.distributed.nn.functional as dist_fn

        with warnings.catch_warnings():
            # Deprecated in favour of a functional collective without this backward (the sum of
            # every rank's gradient), which is the one we need; open_clip's ClipLoss uses it too.
            warnings.simplefilter("ignore", FutureWarning)
            parts = dist_fn.all_gather(x.contiguous())
    else:
        parts = [torch.empty_like(x) for _ in range(len(sizes))]
        dist.all_gather(parts, x.detach().contiguous())
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


def rank_offset(n_local: int, device: torch.device | str = "cpu") -> int:
    """Index of this rank's first row in a :func:`gather` of ``n_local`` rows per rank."""
    if not is_distributed():
        return 0
    return sum(_sizes(n_local, torch.device(device))[: rank()])


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's picklable ``obj``, in rank order."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (a decision taken once, e.g. "this artifact is cached")."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_mean(values: dict[str, float], device: torch.device | str = "cpu") -> dict[str, float]:
    """The mean over ranks of each value (keys must match on every rank)."""
    if not is_distributed() or not values:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    t /= world_size()
    return dict(zip(keys, t.tolist()))


def all_reduce_min(n: int, device: torch.device | str = "cpu") -> int:
    if not is_distributed():
        return n
    t = torch.tensor([n], dtype=torch.long, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t)


@contextmanager
def rank_zero_first() -> Iterator[None]:
    """Rank 0 runs the block, then the other ranks do: rank 0 builds a cache the others then read."""
    if not is_distributed():
        yield
        return
    if rank() != 0:
        dist.barrier()
    yield
    if rank() == 0:
        dist.barrier()


def global_positions(n_local: int, device: torch.device | str = "cpu") -> slice:
    """This rank's slice of the gathered batch."""
    start = rank_offset(n_local, device)
    return slice(start, start + n_local)


def stable_ids(strings: Sequence[str]) -> torch.Tensor:
    """A 63-bit id per string, equal on every rank (Python's ``hash`` is salted per process)."""
    import hashlib

    return torch.tensor([int.from_bytes(hashlib.blake2b(s.encode("utf-8"), digest_size=8).digest(), "big") >> 1
                         for s in strings], dtype=torch.long)


__all__ = [
    "DEFAULT_TIMEOUT_MIN", "all_reduce_mean", "all_reduce_min", "barrier", "broadcast_object", "env_world_size",
    "gather", "gather_objects", "global_positions", "init_from_env", "is_distributed", "is_main",
    "local_device", "rank", "rank_offset", "rank_zero_first", "shutdown", "stable_ids", "world_size",
]
