"""Run one cell: data -> base model -> plan -> poison -> train -> repair -> evaluate -> record.

Every stage's output is an artifact keyed by the hash of exactly its inputs
(:mod:`shieldbench.benchmark.keys`, code versions and file contents included):

- ``base/<key>``: the clean base model (stand-in for a web-pretrained CLIP);
  shared by every attack, defense and seed;
- ``plans/<key>``: the poison plan, per data, attack and seed;
- ``train/<key>``: the victim's checkpoint; the defense is in the key only
  *if it changes training* (a post-training defense reuses the ``none``
  checkpoint);
- ``repair/<key>``: the repaired checkpoint of a post-training defense;
- ``base_eval/<key>``: the clean base model's metrics under the trigger.

The runner alone sees the poison flags and the trigger. The defense gets a
TrainView and a DefenseContext; the evaluator gets the trigger as a function.

Under ``torchrun`` every rank runs the cell together: rank 0 alone takes
the locks, decides whether an artifact is cached (and tells the others),
writes artifacts, evaluates and writes the record; the ranks train each
stage together (:mod:`shieldbench.training.distributed`). A cache that a
stage fills (the poison plan, knowledge elements, a corpus manifest) is
built by rank 0 first and then read by the others.
"""

from __future__ import annotations

import contextlib
import copy
import platform
import resource
import subprocess
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch
from rich.console import Console

from shieldbench.attacks.base import Attack, AttackContext, PoisonPlan
from shieldbench.benchmark.keys import base_eval_key, base_key, plan_key, repair_key, train_key
from shieldbench.locks import locked
from shieldbench.benchmark.store import ArtifactStore
from shieldbench.data.datasets import build_dataset
from shieldbench.data.types import DatasetBundle
from shieldbench.data.views import TrainView
from shieldbench.defenses.base import Defense, DefenseContext
from shieldbench.errors import UserError
from shieldbench.evaluation.evaluate import TargetImages, evaluate
from shieldbench.evaluation.metrics import detection_metrics
from shieldbench.fileio import atomic_write_json, atomic_write_text, read_json, sweep_temps
from shieldbench.knowledge import knowledge_source_for
from shieldbench.models.clip import ClipModel
from shieldbench.models.factory import build_model
from shieldbench.registry import ATTACKS, DEFENSES
from shieldbench.spec import ExperimentSpec, derive_seed
from shieldbench.training import acceleration
from shieldbench.training import distributed as D
from shieldbench.training import tracking
from shieldbench.training.trainer import TrainConfig, Trainer, TrainingDiverged, pick_device


def run_id_for(spec: ExperimentSpec) -> str:
    return "__".join([
        spec.attack.name, spec.defense.name, spec.model.name, spec.data.dataset, spec.preset,
        f"seed{spec.seed}", spec.hash()[:8],
    ])


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("shieldbench", "torch", "torchvision", "open_clip_torch", "transformers", "numpy", "pandas", "scipy"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def peak_memory_mb() -> float:
    """Peak resident memory of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


@dataclass
class RunContext:
    spec: ExperimentSpec
    results_dir: Path
    console: Console
    show_progress: bool = True
    device: torch.device = field(default_factory=pick_device)

    @property
    def store(self) -> ArtifactStore:
        return ArtifactStore(self.results_dir / "cache")

    def status(self, text: str) -> Any:
        """A spinner line on stderr for a stage that has no progress bar (data, plan, evaluation)."""
        if self.show_progress and D.is_main():
            return self.console.status(f"[dim]{text}[/dim]", spinner="dots")
        return contextlib.nullcontext()

    def lock(self, kind: str, key: str) -> Any:
        """The artifact's lock, held by rank 0 alone (the other ranks follow its decisions)."""
        return self.store.lock(kind, key) if D.is_main() else contextlib.nullcontext()

    def has_model(self, kind: str, key: str) -> bool:
        """Whether the artifact is finished and intact, as rank 0 sees it (so every rank takes the same branch).

        Rank 0 holds the artifact's lock here: a file that does not match its
        manifest is removed and the stage builds it again.
        """
        return bool(D.broadcast_object(self.store.finished_model(kind, key) if D.is_main() else None))

    def save_model(self, kind: str, key: str, model: ClipModel, meta: dict[str, Any]) -> None:
        if D.is_main():
            self.store.save_model(kind, key, model, meta)


# -- stages --------------------------------------------------------------------------------
def new_model(spec: ExperimentSpec) -> ClipModel:
    return build_model(spec.model.name, spec.model.pretrained, spec.data.image_size)


def has_base_stage(spec: ExperimentSpec, bundle: DatasetBundle) -> bool:
    """Whether a clean base model is trained: not with pretrained weights, ``base.epochs = 0`` or no pretraining split."""
    return spec.base.epochs > 0 and bundle.pretrain is not None and not spec.model.pretrained


def train_base_model(rc: RunContext, bundle: DatasetBundle) -> tuple[ClipModel, dict[str, Any]]:
    """The clean base model: trained once per (data, model, base spec), then cached."""
    spec, store = rc.spec, rc.store
    key = base_key(spec)
    # Held while looking for the artifact and building it: a concurrent worker waits, then reuses it.
    with rc.lock("base", key):
        torch.manual_seed(derive_seed(spec.data.seed, "base-init"))
        model = new_model(spec)
        if rc.has_model("base", key):
            meta = store.load_model_into("base", key, model)
            return model, {"key": key, "cached": True, "seconds": 0.0, "steps": meta.get("steps", 0)}
        if not has_base_stage(spec, bundle):
            # No base stage: the pretrained weights (or the random init) are the clean model.
            return model, {"key": key, "cached": False, "seconds": 0.0, "steps": 0,
                           "source": "pretrained" if spec.model.pretrained else ("random init" if bundle.pretrain is None or spec.base.epochs == 0 else "")}
        trainer = Trainer(
            model, TrainView.from_pairs(bundle.pretrain),
            TrainConfig.from_spec(spec.base, derive_seed(spec.data.seed, "base"), spec.data.on_error, spec.runtime),
            checkpoint_path=store.checkpoint_path("base", key), checkpoint_owner=f"base/{key}", device=rc.device,
            description="clean base model", show_progress=rc.show_progress,
        )
        result = trainer.fit()
        meta = {"steps": result.steps, "seconds": result.seconds, "history": result.history,
                "world_size": result.world_size}
        rc.save_model("base", key, model, meta)
        return model, {"key": key, "cached": False, "seconds": result.seconds, "steps": result.steps,
                       "resumed_from_epoch": result.resumed_from_epoch}


def make_attack(spec: ExperimentSpec, bundle: DatasetBundle, base: ClipModel | None = None,
                knowledge_cache_dir: str | None = None) -> Attack:
    """The attack over the bundle's training pairs (the zero-shot set is the targeted attack's pool).

    The knowledge source is built lazily by the attacks that ask for it (a
    defense-aware attack), with the knowledge cache a defense would use.
    """
    cls = ATTACKS.get(spec.attack.name)
    surrogate = (lambda: copy.deepcopy(base).eval()) if base is not None else None
    ctx = AttackContext(train=bundle.train, classnames=bundle.classnames, templates=bundle.templates,
                        target_pool=bundle.test, image_size=spec.data.image_size, surrogate=surrogate,
                        knowledge_source=_lazy_knowledge(spec, knowledge_cache_dir), knowledge_k=spec.data.knowledge_k)
    return cls(spec.attack, ctx)


def _lazy_knowledge(spec: ExperimentSpec, cache_dir: str | None) -> Callable[[list[str]], list[tuple[str, ...]]] | None:
    """The dataset's knowledge source, made on first use (an LLM source is not loaded for attacks that never ask)."""
    if spec.data.dataset != "synthetic" and not getattr(spec.data, "knowledge_source", None):
        return None
    made: list[Any] = []

    def source(captions: list[str]) -> list[tuple[str, ...]]:
        if not made:
            made.append(knowledge_source_for(spec.data, cache_dir=cache_dir))
        return made[0](captions)
    return source


def plan_attack(rc: RunContext, attack: Attack) -> tuple[PoisonPlan, bool]:
    spec = rc.spec
    key = plan_key(spec)
    # Held while looking for the artifact and building it: a concurrent worker waits, then reuses it.
    with rc.store.lock("plans", key):
        cached = rc.store.finished_json("plans", key, "plan.json")
        if cached is not None:
            try:
                plan = PoisonPlan.from_dict(cached)
            except (TypeError, KeyError, ValueError, AttributeError) as exc:
                # A derived artifact (only one without a manifest can get here): planned again.
                rc.store.discard("plans", key, ("plan.json",), f"plan.json does not parse as a plan ({exc})")
            else:
                # restore() refuses, naming the path, a user's file that changed since (a key image).
                attack.restore(plan)
                return plan, True
        # Not keyed by the attack name: `none` and `badnets` with one seed share the
        # trigger pattern, so the control row measures the very trigger BadNets uses.
        plan = attack.plan(derive_seed(spec.seed, "attack"))
        rc.store.save_json("plans", key, "plan.json", plan.to_dict())
        return plan, False


def defense_context(rc: RunContext, phase: str, reference: ClipModel | None = None) -> DefenseContext:
    """The defense's context for ``phase``; ``reference`` (the clean base model) backs ``ctx.reference_model``.

    The factory hands out a fresh eval-mode copy on each call, so a defense
    that fine-tunes or moves its copy cannot change the model the victim
    starts from (nor the next copy).
    """
    spec = rc.spec
    factory = None
    if reference is not None:
        def factory() -> ClipModel:
            return copy.deepcopy(reference).eval()
    return DefenseContext(
        seed=derive_seed(spec.seed, "defense", phase), train=spec.train, device=rc.device,
        knowledge_k=spec.data.knowledge_k, knowledge_source=knowledge_source_for(spec.data),
        cache_dir=str(rc.results_dir / "cache" / "knowledge"), show_progress=rc.show_progress,
        reference_model=factory,
    )


def detection_from(ctx: DefenseContext, view: TrainView, is_poison: np.ndarray | None) -> dict[str, Any] | None:
    """Detection metrics of any defense that reported suspicion scores, against the flags the runner holds."""
    report = ctx.suspicion()
    if report is None or is_poison is None:
        return None
    if len(report.scores) != len(view):
        raise ValueError(f"the defense reported {len(report.scores)} suspicion scores for a view of {len(view)} rows")
    return detection_metrics(report.scores, is_poison, report.kept)


def train_victim(rc: RunContext, base: ClipModel, view: TrainView, defense: Defense,
                 is_poison: np.ndarray | None = None) -> tuple[ClipModel, dict[str, Any]]:
    """Train (or reuse) the victim; ``is_poison`` (the runner's, never the defense's) scores a detection report.

    The detection metrics are stored in the checkpoint's meta, so a reused
    checkpoint reports them too.
    """
    spec, store = rc.spec, rc.store
    key = train_key(spec, type(defense).trains())
    # Held while looking for the artifact and building it: a concurrent worker waits, then reuses it.
    with rc.lock("train", key):
        model = copy.deepcopy(base)
        if rc.has_model("train", key):
            meta = store.load_model_into("train", key, model)
            return model, {"key": key, "reused": True, "reused_from": meta.get("run_id", ""), "seconds": 0.0,
                           "steps": meta.get("steps", 0), "history": meta.get("history", []),
                           "n_skipped_images": meta.get("n_skipped_images", 0),
                           "detection": meta.get("detection")}
        trains = type(defense).trains()
        d = defense if trains else DEFENSES.get("none")(spec.defense.__class__(name="none"))
        # ``base`` itself is never trained (the victim is ``model``, a copy): the factory copies it clean.
        ctx = defense_context(rc, "train", reference=base)
        t_prepare = time.perf_counter()
        with D.rank_zero_first():  # a knowledge cache is filled once, by rank 0
            data = d.prepare_data(view, ctx)
        # The defense's own work before training (a detector's warm-up and scoring, knowledge
        # extraction not yet cached) is part of what it costs, beside the training itself.
        prepare_seconds = time.perf_counter() - t_prepare
        detection = detection_from(ctx, view, is_poison)
        trainer = Trainer(
            model, data, TrainConfig.from_spec(spec.train, derive_seed(spec.seed, "train"), spec.data.on_error, spec.runtime),
            objective=d.objective(ctx), callbacks=d.callbacks(ctx),
            checkpoint_path=store.checkpoint_path("train", key), checkpoint_owner=f"train/{key}", device=rc.device,
            description=f"train ({d.spec.name})", show_progress=rc.show_progress,
        )
        result = trainer.fit()
        meta = {"steps": result.steps, "seconds": result.seconds, "history": result.history, "run_id": run_id_for(spec),
                "defense": d.spec.name, "n_skipped_images": result.n_skipped_images, "data_wait_s": result.data_wait_s,
                "world_size": result.world_size, "n_trimmed_rows": result.n_trimmed_rows}
        if detection is not None:  # only then: an existing defense's meta stays as it was
            meta["detection"] = detection
        rc.save_model("train", key, model, meta)
        return model, {"key": key, "reused": False, "seconds": result.seconds, "prepare_seconds": prepare_seconds,
                       "steps": result.steps,
                       "resumed_from_epoch": result.resumed_from_epoch, "history": result.history,
                       "n_skipped_images": result.n_skipped_images, "data_wait_s": result.data_wait_s,
                       "detection": detection}


def repair_victim(rc: RunContext, model: ClipModel, bundle: DatasetBundle, defense: Defense, trained_key: str) -> tuple[ClipModel, dict[str, Any]]:
    spec, store = rc.spec, rc.store
    key = repair_key(spec, trained_key)
    # Held while looking for the artifact and building it: a concurrent worker waits, then reuses it.
    with rc.lock("repair", key):
        repaired = copy.deepcopy(model)
        if rc.has_model("repair", key):
            meta = store.load_model_into("repair", key, repaired)
            return repaired, {"key": key, "cached": True, "seconds": 0.0, "steps": meta.get("steps", 0)}
        start = time.perf_counter()
        ctx = defense_context(rc, "repair")
        ctx.extras["checkpoint_path"] = str(store.checkpoint_path("repair", key))
        ctx.extras["checkpoint_owner"] = f"repair/{key}"
        repaired = defense.repair(repaired, TrainView.from_pairs(bundle.clean), ctx)
        seconds = time.perf_counter() - start
        meta = {"seconds": seconds, "steps": int(ctx.extras.get("steps", 0)), "history": ctx.extras.get("history", []),
                "world_size": D.world_size()}
        rc.save_model("repair", key, repaired, meta)
        return repaired, {"key": key, "cached": False, "seconds": seconds, "steps": meta["steps"]}


def run_evaluation(rc: RunContext, model: ClipModel, bundle: DatasetBundle, attack: Attack, plan: PoisonPlan) -> dict[str, float]:
    trigger: Callable | None = None
    if attack.has_trigger:
        def trigger(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
            return attack.apply_trigger(x, generator=g)
    pool_idx = sorted({e.source_index for e in plan.edits if e.source == "pool"})
    targets = None
    if pool_idx and bundle.test is not None:
        idx = torch.tensor(pool_idx, dtype=torch.long)
        targets = TargetImages(bundle.test.images[idx], bundle.test.labels[idx])
    return evaluate(
        model, bundle.test, bundle.retrieval, plan.target_index, trigger, rc.device,
        batch_size=rc.spec.eval.batch_size, trigger_seed=derive_seed(rc.spec.seed, "eval-trigger"),
        n_backdoor_queries=rc.spec.eval.n_backdoor_queries, target_images=targets,
        classnames=bundle.classnames, templates=bundle.templates, on_error=rc.spec.data.on_error,
    )


def evaluate_base_model(rc: RunContext, base: ClipModel, bundle: DatasetBundle, attack: Attack,
                        plan: PoisonPlan) -> dict[str, float]:
    """The clean base model under the same trigger: what the trigger does with no backdoor at all.

    Shared by every defense under one attack and seed, so it is cached next
    to the plan instead of being re-evaluated for each of them.
    """
    spec = rc.spec
    key = base_eval_key(spec, plan.hash())
    # Held while looking for the artifact and building it: a concurrent worker waits, then reuses it.
    with rc.store.lock("base_eval", key):
        cached = rc.store.finished_json("base_eval", key, "metrics.json")
        if cached is not None:
            return cached
        metrics = run_evaluation(rc, base, bundle, attack, plan)
        rc.store.save_json("base_eval", key, "metrics.json", metrics)
        return metrics


# -- the cell ------------------------------------------------------------------------------
def record_path(results_dir: Path, run_id: str) -> Path:
    return results_dir / "runs" / run_id / "record.json"


def finished_record(spec: ExperimentSpec, results_dir: str | Path) -> dict[str, Any] | None:
    """The cell's record if it finished (status ``ok``), marked ``reused_record``; else None."""
    rpath = record_path(Path(results_dir), run_id_for(spec))
    if not rpath.is_file():
        return None
    try:
        record = read_json(rpath)
    except UserError:  # a corrupt record is not a finished one: the cell runs again and rewrites it
        return None
    if not isinstance(record, dict) or record.get("status") != "ok" or not isinstance(record.get("metrics"), dict):
        return None
    record["reused_record"] = True
    return record


def run_cell(spec: ExperimentSpec, results_dir: str | Path = "results", console: Console | None = None,
             show_progress: bool = True, force: bool = False) -> dict[str, Any]:
    """Run (or reuse) one cell and write its record. Returns the record.

    Holds the cell's lock throughout, so a second worker or grid asking for
    the same cell waits, then reuses the finished record. Under ``torchrun``
    every rank calls this; rank 0 holds the lock and writes the record, and
    every rank returns rank 0's record.
    """
    results_dir = Path(results_dir)
    tracking.check_available(spec.runtime.tracker)
    lock = locked(results_dir / ".locks" / f"{run_id_for(spec)}.lock") if D.is_main() else contextlib.nullcontext()
    log_dir = results_dir / "runs" / run_id_for(spec) / "tensorboard" if spec.runtime.tracker == "tensorboard" else None
    # Every Trainer of the cell, a repair defense's own included, takes the runtime's speed switches.
    with lock, tracking.active(log_dir), acceleration.active(acceleration.Acceleration.from_runtime(spec.runtime)):
        record = _run_cell(spec, results_dir, console, show_progress, force)
    return D.broadcast_object(record)


def _run_cell(spec: ExperimentSpec, results_dir: Path, console: Console | None, show_progress: bool,
              force: bool) -> dict[str, Any]:
    console = console or Console(stderr=True)
    run_id = run_id_for(spec)
    rpath = record_path(results_dir, run_id)
    if D.is_main() and rpath.parent.is_dir():
        # Held: the cell's lock, under which alone its record and log are written; a temp file here is a killed write's.
        sweep_temps(rpath.parent, ("record.json", "train_log.csv"))
    if not force:
        done = D.broadcast_object(finished_record(spec, results_dir) if D.is_main() else None)
        if done is not None:
            return done
    # Fail on bad names before any work.
    ATTACKS.get(spec.attack.name)
    defense_cls = DEFENSES.get(spec.defense.name)
    defense: Defense = defense_cls(spec.defense)
    rc = RunContext(spec, results_dir, console, show_progress)
    record: dict[str, Any] = {
        "run_id": run_id, "status": "running", "error": "", "spec": spec.to_dict(), "spec_hash": spec.hash(),
        "attack": spec.attack.name, "defense": spec.defense.name, "model": spec.model.name,
        "dataset": spec.data.dataset, "preset": spec.preset, "seed": spec.seed,
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(), "git_commit": git_commit(), "device": str(rc.device),
        "world_size": D.world_size(), "threads": torch.get_num_threads(), "timings": {}, "artifacts": {}, "metrics": {},
        "evaluated_checkpoint": "last epoch",
    }
    timings = record["timings"]
    t_all = time.perf_counter()
    try:
        t = time.perf_counter()
        with D.rank_zero_first(), rc.status(f"data: {spec.data.dataset} (seed {spec.data.seed})"):
            # A manifest or corpus cache is written once, by rank 0.
            bundle = build_dataset(spec.data, spec.eval)
        timings["data_s"] = time.perf_counter() - t
        record["data"] = dict(bundle.info)
        base, base_info = train_base_model(rc, bundle)
        timings["base_train_s"] = base_info["seconds"]
        record["artifacts"]["base"] = {k: v for k, v in base_info.items() if k != "history"}
        attack = make_attack(spec, bundle, base, str(results_dir / "cache" / "knowledge"))
        t = time.perf_counter()
        with D.rank_zero_first(), rc.status(f"poison plan: {spec.attack.name}"):
            # Rank 0 plans and saves; the others read the saved plan.
            plan, plan_cached = plan_attack(rc, attack)
        poisoned = attack.poison(plan)
        timings["plan_s"] = time.perf_counter() - t
        record["plan"] = {"hash": plan.hash(), "cached": plan_cached, "n_requested": plan.n_requested,
                          "n_poisoned": int(poisoned.is_poison.sum()), "n_train": len(poisoned.view),
                          "mix": plan.mix, "target": plan.target, "threat_model": plan.threat_model,
                          "notes": plan.notes}
        # Before training, which updates ``base`` in place.
        # Evaluation runs on rank 0 alone; the others wait at the next stage's first collective.
        t = time.perf_counter()
        if D.is_main():
            with rc.status("evaluating the clean base model under the trigger"):
                record["metrics_base_model"] = evaluate_base_model(rc, base, bundle, attack, plan)
        timings["eval_base_s"] = time.perf_counter() - t
        model, train_info = train_victim(rc, base, poisoned.view, defense, poisoned.is_poison.cpu().numpy())
        timings["train_s"] = train_info["seconds"]
        timings["prepare_s"] = train_info.get("prepare_seconds", 0.0)
        record["data"]["n_unreadable_train"] = int(train_info.get("n_skipped_images", 0))
        record["artifacts"]["train"] = {k: v for k, v in train_info.items() if k not in ("history", "detection")}
        if train_info.get("detection") is not None:
            record["detection"] = train_info["detection"]
        record["train_history"] = train_info.get("history", [])
        if defense_cls.repairs():
            t = time.perf_counter()
            if D.is_main():
                with rc.status("evaluating before the repair"):
                    record["metrics_before_repair"] = run_evaluation(rc, model, bundle, attack, plan)
            timings["eval_before_repair_s"] = time.perf_counter() - t
            model, repair_info = repair_victim(rc, model, bundle, defense, train_info["key"])
            timings["repair_s"] = repair_info["seconds"]
            record["artifacts"]["repair"] = repair_info
        t = time.perf_counter()
        if D.is_main():
            with rc.status("evaluating"):
                record["metrics"] = run_evaluation(rc, model, bundle, attack, plan)
            for key in ("asr", "poison_success"):
                if key in record["metrics_base_model"]:
                    record["metrics"][f"{key}_base_model"] = record["metrics_base_model"][key]
            record["metrics"].update(detection_columns(record.get("detection")))
        timings["eval_s"] = time.perf_counter() - t
        record["status"] = "ok"
    except TrainingDiverged as exc:  # every rank diverges together (the trainer agrees on it)
        record["status"], record["error"] = "diverged", str(exc)
    except UserError:
        raise
    except Exception as exc:  # a failed run is a row with its error, not silence
        record["status"] = "failed"
        record["error"] = f"{type(exc).__name__}: {exc}"
        record["traceback"] = traceback.format_exc()
        if D.is_distributed():
            # One rank's failure leaves the others inside a collective: write the record (rank 0)
            # and exit, so torchrun stops the whole group instead of letting it hang.
            if D.is_main():
                _finish_record(record, timings, t_all, rpath)
            raise
    if not D.is_main():
        return record  # rank 0's record is the one returned (run_cell broadcasts it)
    _finish_record(record, timings, t_all, rpath)
    return record


#: Detection entries that become leaderboard metrics, and the names of their columns.
DETECTION_COLUMNS = {"auroc": "detection_auroc", "precision": "detection_precision", "recall": "detection_recall",
                     "n_dropped": "detection_n_dropped"}


def detection_columns(detection: dict[str, Any] | None) -> dict[str, float]:
    """The record's detection entries that are numbers, under their metric names (none without a report)."""
    if not detection:
        return {}
    return {col: detection[k] for k, col in DETECTION_COLUMNS.items() if isinstance(detection.get(k), (int, float))}


def _finish_record(record: dict[str, Any], timings: dict[str, float], t_all: float, rpath: Path) -> None:
    """Timings, memory and the finish time; write the record and its training log (rank 0)."""
    timings["total_s"] = time.perf_counter() - t_all
    # What the defense cost this run: its preparation of the training data, the victim's training
    # and any repair (0 for a stage reused from the cache).
    timings["cost_train_s"] = timings.get("prepare_s", 0.0) + timings.get("train_s", 0.0) + timings.get("repair_s", 0.0)
    record["peak_memory_mb"] = peak_memory_mb()
    if torch.cuda.is_available():
        record["peak_gpu_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
    record["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    # The record last: it marks the cell finished, so a failed log write (a full disk) reruns the cell.
    if record.get("train_history"):
        atomic_write_text(rpath.parent / "train_log.csv", pd.DataFrame(record["train_history"]).to_csv(index=False))
    atomic_write_json(rpath, record)
