"""A grid of cells (attacks x defenses x seeds), run in dependency order.

Cells whose defense does not change training are run after the ``none`` cell
of the same attack and seed, so they reuse its checkpoint; finished cells
(a record with status ``ok``) are skipped, so re-running a grid after a crash
resumes where it stopped and re-running a finished grid trains nothing.
With several workers the store's locks keep shared stages built once
(:mod:`shieldbench.benchmark.workers`).
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Sequence

from rich.console import Console

from shieldbench.benchmark import leaderboard
from shieldbench.benchmark.runner import finished_record, run_cell
from shieldbench.benchmark.workers import run_parallel
from shieldbench.registry import DEFENSES
from shieldbench.spec import ExperimentSpec


def expand(base: ExperimentSpec, attacks: Sequence[str], defenses: Sequence[str], seeds: Sequence[int]) -> list[ExperimentSpec]:
    """Every (attack, defense, seed) cell, training-time defenses first within each (attack, seed)."""
    def order(name: str) -> int:
        if name == "none":
            return 0
        return 1 if DEFENSES.get(name).trains() else 2

    cells = []
    for seed in seeds:
        for attack in attacks:
            for defense in sorted(defenses, key=order):
                cells.append(replace(base, seed=seed, attack=replace(base.attack, name=attack),
                                     defense=replace(base.defense, name=defense)))
    return cells


class Progress:
    """One line per finished cell: how many are done, how long it took, and an ETA for the rest.

    The ETA is the mean time of the cells that did work (reused records cost
    nothing) times the cells left, divided by the workers.
    """

    def __init__(self, total: int, workers: int, console: Console) -> None:
        self.total, self.workers, self.console = total, max(1, workers), console
        self.done = 0
        self.worked: list[float] = []
        self.start = time.perf_counter()

    def eta(self) -> str:
        left = self.total - self.done
        if not left:
            return "done"
        if not self.worked:
            return "ETA unknown"
        seconds = sum(self.worked) / len(self.worked) * left / self.workers
        return f"ETA {_clock(seconds)}"

    def cell(self, spec: ExperimentSpec, record: dict[str, Any], seconds: float) -> None:
        self.done += 1
        reused = bool(record.get("reused_record"))
        if not reused:
            self.worked.append(seconds)
        what = "reused its record" if reused else f"{record.get('status', '?')} in {_clock(seconds)}"
        self.console.print(f"[bold]{self.done}/{self.total}[/bold] {spec.attack.name} x {spec.defense.name}, "
                           f"seed {spec.seed}: {what}; elapsed {_clock(time.perf_counter() - self.start)}, "
                           f"{self.eta()}", highlight=False)


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def run_grid(
    cells: Sequence[ExperimentSpec],
    results_dir: str | Path,
    console: Console | None = None,
    show_progress: bool = True,
    on_cell: Callable[[ExperimentSpec, dict[str, Any]], None] | None = None,
    workers: int = 1,
    force: bool = False,
    plugins: Sequence[str] = (),
    executor: str = "local",
    slurm: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Run every cell; records in cell order.

    ``executor="local"``: in this process, or on ``workers`` processes
    (:mod:`.workers`); ``"slurm"``: job arrays through submitit
    (:mod:`.slurm`, ``slurm`` holds its options); ``"submitit-local"``: the
    Slurm path with submitit's local executor (subprocesses here).

    The leaderboard is rebuilt after every cell, so a crash leaves an
    up-to-date one; a finished cell is reused unless ``force``.
    """
    console = console or Console(stderr=True)
    results_dir = Path(results_dir)
    progress = Progress(len(cells), workers, console)

    def finished(spec: ExperimentSpec, rec: dict[str, Any], seconds: float) -> None:
        leaderboard.rebuild(results_dir)
        progress.cell(spec, rec, seconds)
        if on_cell:
            on_cell(spec, rec)

    def sequential() -> list[dict[str, Any]]:
        records = []
        for i, spec in enumerate(cells, 1):
            console.print(f"[bold]cell {i}/{len(cells)}[/bold] {spec.attack.name} x {spec.defense.name}, seed {spec.seed}",
                          highlight=False)
            t = time.perf_counter()
            rec = run_cell(spec, results_dir, console=console, show_progress=show_progress, force=force)
            records.append(rec)
            finished(spec, rec, time.perf_counter() - t)
        return records

    if executor == "local" and workers == 1:
        return sequential()
    # Finished cells are read here: starting processes or jobs for them would cost more than the cells.
    records: list[dict[str, Any] | None] = [None if force else finished_record(spec, results_dir) for spec in cells]
    todo = [i for i, rec in enumerate(records) if rec is None]
    if executor == "local" and len(todo) <= 1:
        return sequential()
    for i, rec in enumerate(records):
        if rec is not None:
            progress.cell(cells[i], rec, 0.0)

    def done(j: int, spec: ExperimentSpec, rec: dict[str, Any]) -> None:
        finished(spec, rec, rec.get("worker", {}).get("seconds", 0.0))

    if executor == "local":
        console.print(f"{len(todo)} cells to run on {workers} workers", highlight=False)
        ran = run_parallel([cells[i] for i in todo], results_dir, workers, force=force, plugins=plugins,
                           on_done=done)
    else:
        from shieldbench.benchmark.slurm import run_slurm

        progress.workers = max(1, int((slurm or {}).get("parallelism", 1)))
        console.print(f"{len(todo)} cells to run as Slurm job arrays"
                      + (" (submitit's local executor)" if executor == "submitit-local" else ""), highlight=False)
        ran = run_slurm([cells[i] for i in todo], results_dir, on_done=done, plugins=plugins, force=force,
                        cluster="local" if executor == "submitit-local" else "slurm", **(slurm or {}))
    for i, rec in zip(todo, ran):
        records[i] = rec
    return [r for r in records if r is not None]
