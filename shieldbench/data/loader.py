"""Batches for training and evaluation through ``torch.utils.data.DataLoader``.

- :class:`EpochBatchSampler`: full batches from a seeded per-epoch
  permutation (``seed * 100003 + epoch``), starting at any batch of the epoch,
  so a run resumed mid-epoch replays exactly the batches it had not yet seen.
  Under ``torch.distributed`` each rank takes a contiguous share of every
  global batch (rank r: rows ``r*B/W .. (r+1)*B/W``).
- :class:`RowBatches`: a map-style dataset over anything with a ``fetch``
  method (a :class:`~shieldbench.data.views.TrainView` or an image array)
  whose ``__getitems__`` reads a whole batch at once; unreadable rows are
  left out and reported, never silently replaced.
- :func:`make_loader`: worker processes, pinned memory on CUDA, the batch
  sampler above. Images travel as ``uint8`` (4x less than float) and are
  turned into float on the device.

Captions and knowledge elements stay in the main process: they are looked up
by the returned row indices, so workers only decode pixels.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from shieldbench.data.images import ImageArray, fetch


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The permutation of ``range(n)`` used for ``epoch`` (the trainer's order since v0.1)."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g)


class EpochBatchSampler(Sampler[list[int]]):
    """Full batches of a seeded per-epoch permutation; resumable at any batch."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        if batch_size < 1 or n < batch_size:
            raise ValueError(f"need at least one full batch: {n} rows, batch size {batch_size}")
        if batch_size % world_size:
            raise ValueError(f"batch size {batch_size} is not divisible by {world_size} processes")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.start_batch = 0

    @property
    def steps_per_epoch(self) -> int:
        # Contrastive losses need full batches: the ragged last one is dropped.
        return self.n // self.batch_size

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        return self.steps_per_epoch - self.start_batch

    def __iter__(self) -> Iterator[list[int]]:
        order = epoch_order(self.n, self.seed, self.epoch)
        b = self.batch_size
        for k in range(self.start_batch, self.steps_per_epoch):
            batch = order[k * b : (k + 1) * b]
            # Contiguous shares: the ranks' rows in rank order are the global batch in order,
            # so per-position draws (augmentations) match one process's.
            share = b // self.world_size
            yield batch[self.rank * share : (self.rank + 1) * share].tolist()


@dataclass
class RowBatch:
    """A batch as read by a worker: the rows it could read, and those it could not."""

    images: torch.Tensor  # uint8 (K, C, H, W)
    index: torch.Tensor  # (K,) rows of the source
    failed: list[int] = field(default_factory=list)  # rows of the source
    errors: list[str] = field(default_factory=list)

    def pin_memory(self) -> "RowBatch":
        self.images = self.images.pin_memory()
        return self


class RowBatches(Dataset):
    """Batched reads from ``source`` (anything with ``fetch(index)`` and ``len``)."""

    def __init__(self, source: Any) -> None:
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitems__(self, index: Sequence[int]) -> RowBatch:
        index = list(index)
        images, failed_pos, errors = _fetch(self.source, index)
        bad = set(failed_pos)
        keep = [i for p, i in enumerate(index) if p not in bad]
        return RowBatch(images, torch.tensor(keep, dtype=torch.long), [index[p] for p in failed_pos], errors)

    def __getitem__(self, i: int) -> RowBatch:
        return self.__getitems__([i])


def _fetch(source: Any, index: list[int]):
    if hasattr(source, "fetch"):
        return source.fetch(index)
    return fetch(source, index)


def _as_is(batch: RowBatch) -> RowBatch:
    return batch


def default_workers(images: ImageArray | Any) -> int:
    """0 for images in memory (a gather is faster than a process hop); else up to 4 per process."""
    if isinstance(images, torch.Tensor) or getattr(images, "in_memory", False):
        return 0
    return max(0, min(4, (os.cpu_count() or 1)))


def make_loader(source: Any, batch_sampler: Sampler, workers: int = 0, pin_memory: bool = False,
                persistent: bool = True) -> DataLoader:
    """A DataLoader that yields :class:`RowBatch` objects."""
    kwargs: dict[str, Any] = {}
    if workers > 0:
        kwargs.update(persistent_workers=persistent, prefetch_factor=4)
        # Fork keeps the (possibly unpicklable) trigger closures of an attack; CUDA is only used in the main process.
        if "fork" in mp.get_all_start_methods():
            kwargs["multiprocessing_context"] = "fork"
    return DataLoader(RowBatches(source), batch_sampler=batch_sampler, num_workers=workers,
                      collate_fn=_as_is, pin_memory=pin_memory, **kwargs)


class _Sequential(Sampler[list[int]]):
    def __init__(self, n: int, batch_size: int) -> None:
        self.n, self.batch_size = n, batch_size

    def __len__(self) -> int:
        return (self.n + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[list[int]]:
        for i in range(0, self.n, self.batch_size):
            yield list(range(i, min(i + self.batch_size, self.n)))


def iter_rows(images: ImageArray | Any, batch_size: int, workers: int | None = None) -> Iterator[RowBatch]:
    """Every row of ``images`` in order, in batches (evaluation)."""
    n = len(images) if not isinstance(images, torch.Tensor) else images.shape[0]
    if isinstance(images, torch.Tensor):  # in memory: no loader needed
        for i in range(0, n, batch_size):
            yield RowBatch(images[i : i + batch_size], torch.arange(i, min(i + batch_size, n)))
        return
    w = default_workers(images) if workers is None else workers
    yield from make_loader(images, _Sequential(n, batch_size), workers=w, persistent=False)


__all__ = ["EpochBatchSampler", "RowBatch", "RowBatches", "default_workers", "epoch_order", "iter_rows", "make_loader"]
