"""The local grid executor: cells on N worker processes, one device each.

Each worker is a fresh (``spawn``) process that sees one GPU through
``CUDA_VISIBLE_DEVICES`` (worker i gets GPU ``i mod n_gpus``) or, with no GPU,
``threads // N`` CPU threads. Cells are handed out in the grid's order. No
scheduler tracks dependencies between cells: the store's locks do. Every
stage takes its artifact's lock and looks for the artifact before building it,
so when two cells share a stage (the clean base model, the ``none``
checkpoint a post-training defense repairs), one worker builds it and the
others wait and reuse it. The same locks make two grids on one results
folder safe.

Only the parent writes the leaderboard (after each finished cell, under its
lock); the workers write their cells' records and artifacts.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any, Callable, Sequence

from rich.console import Console

from shieldbench.spec import ExperimentSpec

_SLOT: dict[str, Any] = {}


def _init_worker(slots: Any, gpus: int, threads: int, plugins: Sequence[str]) -> None:
    # Runs before the worker touches CUDA, so CUDA_VISIBLE_DEVICES still takes effect.
    slot = slots.get()
    _SLOT["slot"] = slot
    if gpus > 0:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(slot % gpus)
    import torch

    torch.set_num_threads(max(1, threads))
    from shieldbench.registry import load_plugin

    for module in plugins:
        load_plugin(module)


def run_timed(spec: ExperimentSpec, results_dir: str, force: bool, console: Console) -> dict[str, Any]:
    """One cell in a worker process or job, its wall time in ``record["worker"]`` (for the parent's ETA)."""
    from shieldbench.benchmark.runner import run_cell

    start = time.perf_counter()
    record = run_cell(spec, results_dir, console=console, show_progress=False, force=force)
    record["worker"] = {"pid": os.getpid(), "seconds": time.perf_counter() - start}
    return record


def _run_one(spec: ExperimentSpec, results_dir: str, force: bool) -> dict[str, Any]:
    # Workers show no bars (N bars on one terminal are unreadable); the parent prints a line per cell.
    record = run_timed(spec, results_dir, force, Console(stderr=True, quiet=True))
    record["worker"]["slot"] = _SLOT.get("slot")
    return record


def gpu_count() -> int:
    """GPUs visible to this process (0 without CUDA)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def run_parallel(
    cells: Sequence[ExperimentSpec],
    results_dir: str | Path,
    workers: int,
    on_done: Callable[[int, ExperimentSpec, dict[str, Any]], None],
    plugins: Sequence[str] = (),
    force: bool = False,
    threads: int | None = None,
) -> list[dict[str, Any]]:
    """Run ``cells`` on ``workers`` processes; ``on_done(i, spec, record)`` in the parent as each finishes.

    Returns the records in the order of ``cells``.
    """
    import torch

    gpus = gpu_count()
    if threads is None:
        threads = max(1, torch.get_num_threads() // workers)
    ctx = mp.get_context("spawn")
    slots = ctx.Manager().Queue()
    for i in range(workers):
        slots.put(i)
    records: list[dict[str, Any] | None] = [None] * len(cells)
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker,
                             initargs=(slots, gpus, threads, list(plugins))) as pool:
        pending: dict[Future, int] = {pool.submit(_run_one, spec, str(results_dir), force): i
                                      for i, spec in enumerate(cells)}
        try:
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    i = pending.pop(fut)
                    records[i] = fut.result()  # a UserError in a worker is raised here, in the parent
                    on_done(i, cells[i], records[i])
        except BaseException:
            # Do not start queued cells after a failure or Ctrl-C; running ones stop with their process.
            for fut in pending:
                fut.cancel()
            raise
    return [r for r in records if r is not None]


__all__ = ["gpu_count", "run_parallel", "run_timed"]
