"""A grid as a plan of stages: which artifacts its cells need, which exist, which will be built.

Cells share stages: every cell of one data and model shares the clean base
model, the cells of one attack and seed share the poison plan and the base
model's evaluation, and a post-training defense (CleanCLIP) repairs the
``none`` cell's checkpoint instead of training its own. A stage is identified
by its cache key (:mod:`shieldbench.benchmark.keys`), so the plan counts each
shared stage once and knows from the store what is already built. This is
what ``shieldbench grid --dry-run`` prints; it builds the datasets (to know
whether a base stage exists) and reads cached plans, and trains nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from shieldbench.attacks.base import PoisonPlan
from shieldbench.benchmark.keys import base_eval_key, base_key, plan_key, repair_key, train_key
from shieldbench.benchmark.runner import finished_record, has_base_stage, run_id_for
from shieldbench.benchmark.store import ArtifactStore
from shieldbench.data.datasets import build_dataset
from shieldbench.errors import UserError
from shieldbench.registry import DEFENSES
from shieldbench.spec import ExperimentSpec

# In dependency order; "trains" marks the stages that run a training loop.
STAGES = ("base", "plans", "base_eval", "train", "repair", "evaluate")
TRAINING_STAGES = ("base", "train", "repair")


@dataclass
class Stage:
    kind: str
    key: str
    cached: bool
    cells: list[str] = field(default_factory=list)


@dataclass
class GridPlan:
    cells: int
    finished: list[str]
    stages: dict[tuple[str, str], Stage]

    def count(self, kind: str, cached: bool | None = None) -> int:
        return sum(1 for s in self.stages.values() if s.kind == kind and (cached is None or s.cached == cached))

    @property
    def trainings(self) -> int:
        """Training loops that will run: base models, victims and repairs not yet in the store."""
        return sum(self.count(k, cached=False) for k in TRAINING_STAGES)

    def summary(self) -> list[dict[str, Any]]:
        return [{"stage": k, "needed": self.count(k), "cached": self.count(k, True), "to_run": self.count(k, False)}
                for k in STAGES]


def _finished(spec: ExperimentSpec, results_dir: Path) -> bool:
    try:
        return finished_record(spec, results_dir) is not None
    except UserError:  # an unreadable record is not a finished cell
        return False


def plan_grid(cells: Sequence[ExperimentSpec], results_dir: str | Path, force: bool = False) -> GridPlan:
    """The stages ``cells`` need (each shared stage once), marked cached or to run."""
    results_dir = Path(results_dir)
    store = ArtifactStore(results_dir / "cache")
    stages: dict[tuple[str, str], Stage] = {}
    finished: list[str] = []

    def need(kind: str, key: str, cached: bool, cell: str) -> None:
        stage = stages.setdefault((kind, key), Stage(kind, key, cached))
        stage.cells.append(cell)

    for spec in cells:
        run_id = run_id_for(spec)
        if not force and _finished(spec, results_dir):
            finished.append(run_id)
            continue
        if has_base_stage(spec, build_dataset(spec.data, spec.eval)):  # memoised per data spec
            bkey = base_key(spec)
            need("base", bkey, store.has_model("base", bkey), run_id)
        pkey = plan_key(spec)
        plan_json = store.load_json("plans", pkey, "plan.json")
        need("plans", pkey, plan_json is not None, run_id)
        if plan_json is not None:
            ekey = base_eval_key(spec, PoisonPlan.from_dict(plan_json).hash())
            need("base_eval", ekey, store.load_json("base_eval", ekey, "metrics.json") is not None, run_id)
        else:  # its key holds the plan's hash, unknown until the plan is made: one per plan
            need("base_eval", f"after-plan-{pkey}", False, run_id)
        defense = DEFENSES.get(spec.defense.name)
        tkey = train_key(spec, defense.trains())
        need("train", tkey, store.has_model("train", tkey), run_id)
        if defense.repairs():
            rkey = repair_key(spec, tkey)
            need("repair", rkey, store.has_model("repair", rkey), run_id)
        need("evaluate", run_id, False, run_id)
    return GridPlan(cells=len(cells), finished=finished, stages=stages)


__all__ = ["GridPlan", "STAGES", "Stage", "TRAINING_STAGES", "plan_grid"]
