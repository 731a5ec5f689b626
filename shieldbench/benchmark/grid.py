"""A grid of cells (attacks x defenses x seeds), run in dependency order.

Cells whose defense does not change training are run after the ``none`` cell
of the same attack and seed, so they reuse its checkpoint; finished cells
(a record with status ``ok``) are skipped, so re-running a grid after a crash
resumes where it stopped and re-running a finished grid trains nothing.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Sequence

from rich.console import Console

from shieldbench.benchmark import leaderboard
from shieldbench.benchmark.runner import record_path, run_cell, run_id_for
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


def run_grid(
    cells: Sequence[ExperimentSpec],
    results_dir: str | Path,
    console: Console | None = None,
    show_progress: bool = True,
    on_cell: Callable[[ExperimentSpec, dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    console = console or Console(stderr=True)
    results_dir = Path(results_dir)
    records = []
    for i, spec in enumerate(cells, 1):
        done = record_path(results_dir, run_id_for(spec)).is_file()
        console.print(f"[bold]cell {i}/{len(cells)}[/bold] {spec.attack.name} x {spec.defense.name}, seed {spec.seed}"
                      + (" (finished: reusing its record)" if done else ""))
        rec = run_cell(spec, results_dir, console=console, show_progress=show_progress)
        records.append(rec)
        # Rebuilt after every cell, so a crash leaves an up-to-date leaderboard.
        leaderboard.rebuild(results_dir)
        if on_cell:
            on_cell(spec, rec)
    return records
