"""``--dry-run``: resolve a spec, check its data, print the plan and its cost; train nothing.

What is checked: every path the spec names exists and is readable (the
corpus index, annotation files, shards, the zero-shot and retrieval sets),
and a sample of images from every split decodes. What is reported: the
stages with their step counts, the model's size, the memory training would
need (weights, gradients, AdamW moments and activations of one batch,
measured with the allocator on CUDA or counted from the forward's saved
tensors elsewhere), and the time: one training step at a small batch is
timed on this machine at two small batch sizes and extrapolated along the
line through them to the full batch and the step count, and the FLOPs of a
step are counted (``torch.utils.flop_counter``) so that the
time on another device can be read off its sustained throughput.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from shieldbench.attacks.base import PoisonPlan
from shieldbench.benchmark.runner import make_attack
from shieldbench.models.factory import build_model, native_image_size
from shieldbench.data.datasets import build_dataset
from shieldbench.data.images import LazyImages, fetch
from shieldbench.data.types import DatasetBundle
from shieldbench.errors import UserError
from shieldbench.registry import DEFENSES
from shieldbench.spec import ExperimentSpec, derive_seed
from shieldbench.training.trainer import pick_device

# A sustained bf16 training throughput to turn counted FLOPs into GPU hours:
# about 40% of an A100's 312 dense TFLOP/s, a common figure for CLIP training.
# It is an assumption, printed as such, not a measurement.
ASSUMED_GPU_TFLOPS = 125.0


def _sample_rows(n: int, k: int = 4) -> list[int]:
    if n <= k:
        return list(range(n))
    return sorted({0, n - 1, n // 2, n // 3})


def check_images(name: str, images: Any) -> dict[str, Any]:
    """Decode a few rows of an image array; an unreadable one is reported with its path."""
    n = int(images.shape[0])
    rows = _sample_rows(n)
    _, failed, why = fetch(images, rows)
    return {"split": name, "rows": n, "checked": len(rows), "unreadable": len(failed),
            "first_error": why[0] if why else "", "on_disk": isinstance(images, LazyImages)}


def step_cost(spec: ExperimentSpec, batches: tuple[int, int]) -> dict[str, float]:
    """Time one training step at two batch sizes on this machine and count the FLOPs per sample.

    Returns the fixed and per-sample seconds of a step (a line through the two
    timings, so a full batch is extrapolated, not the small batch scaled) and
    the counted FLOPs per sample.
    """
    from torch.utils.flop_counter import FlopCounterMode

    from shieldbench.training.contracts import Batch
    from shieldbench.training.losses import ClipObjective

    device = pick_device()
    # Random init: the weights do not change a step's cost, and nothing is downloaded.
    model = build_model(spec.model.name, "", spec.data.image_size).to(device).train()
    objective = ClipObjective()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)

    def make(n: int) -> Batch:
        size = model.image_size
        captions = ["a photo of a dog on a sofa."] * n
        return Batch(images=torch.rand(n, 3, size, size, device=device), captions=captions,
                     tokens=model.tokenize(captions).to(device), index=torch.arange(n))

    def step(b: Batch) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = objective(model, b)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    b1, b2 = make(batches[0]), make(batches[1])
    with FlopCounterMode(display=False) as counter:  # doubles as the warm-up step
        step(b1)
    flops = float(counter.get_total_flops()) / batches[0]
    t1, t2 = step(b1), step(b2)
    per_sample = max(0.0, (t2 - t1) / max(1, batches[1] - batches[0]))
    fixed = max(0.0, t1 - per_sample * batches[0])
    params = sum(p.numel() for p in model.parameters())
    return {"fixed_s": fixed, "per_sample_s": per_sample, "flops_per_sample": flops, "params": float(params),
            "device": str(device), "batches": list(batches)}


def plan_summary(spec: ExperimentSpec, bundle: DatasetBundle) -> dict[str, Any]:
    """How many poisons the attack would plan (the plan is computed, not cached, and thrown away)."""
    attack = make_attack(spec, bundle, None)
    if spec.attack.name == "label_consistent" and attack.params.pgd_steps > 0:  # type: ignore[attr-defined]
        return {"n_poisoned": "computed at run time (PGD hardening)", "mix": attack.mix}
    if getattr(attack, "uses_surrogate", False):  # its plan is optimised on the base model, not trained yet
        return {"n_poisoned": attack.n_requested(), "mix": attack.mix, "target": spec.attack.target,
                "note": "trigger optimised at run time on the clean base model"}
    plan: PoisonPlan = attack.plan(derive_seed(spec.seed, "attack"))
    n_appended = sum(1 for e in plan.edits if e.row is None)
    return {"n_poisoned": plan.n_poisoned, "n_rows_after": len(bundle.train) + n_appended, "mix": plan.mix,
            "target": plan.target}


def check_weights(spec: ExperimentSpec) -> str:
    """A tag open_clip knows or a readable weights file, trained at ``data.image_size``; else a UserError."""
    if not spec.model.pretrained:
        return "random init"
    size = native_image_size(spec.model.name, spec.model.pretrained)
    if size and size != spec.data.image_size:
        raise UserError(f"model {spec.model.name} with pretrained weights expects image size {size}; "
                        f"set data.image_size={size}")
    kind = "file" if Path(spec.model.pretrained).is_file() else "open_clip tag (downloaded on first use unless cached)"
    return f"{spec.model.pretrained}: {kind}, image size {size}"


def check_option_files(spec: ExperimentSpec) -> None:
    """Every ``*_path`` option of the attack and the defense (a key image, a knowledge file) exists."""
    for section in ("attack", "defense"):
        for key, value in getattr(spec, section).options.items():
            if key.endswith("_path") and value and not Path(str(value)).exists():
                raise UserError(f"{section}.{key}: file not found: {value}")


def dry_run(spec: ExperimentSpec, measure: bool = True) -> dict[str, Any]:
    """Everything ``--dry-run`` prints, as a dict (see the module docstring)."""
    weights = check_weights(spec)
    check_option_files(spec)
    bundle = build_dataset(spec.data, spec.eval)
    checks = [check_images("train", bundle.train.images), check_images("clean", bundle.clean.images)]
    if bundle.pretrain is not None:
        checks.append(check_images("pretrain", bundle.pretrain.images))
    if bundle.test is not None:
        checks.append(check_images("zero-shot", bundle.test.images))
    if bundle.retrieval is not None:
        checks.append(check_images("retrieval", bundle.retrieval.images))
    bad = [c for c in checks if c["unreadable"]]
    if bad and spec.data.on_error == "fail":
        raise UserError(f"{bad[0]['split']}: {bad[0]['first_error']}")
    plan = plan_summary(spec, bundle)
    defense_cls = DEFENSES.get(spec.defense.name)
    n_rows = int(plan.get("n_rows_after", len(bundle.train))) if isinstance(plan.get("n_rows_after"), int) else len(bundle.train)
    stages: list[dict[str, Any]] = []
    if spec.model.pretrained:
        stages.append({"stage": "clean model", "what": f"pretrained weights {spec.model.pretrained}", "steps": 0})
    elif bundle.pretrain is not None and spec.base.epochs > 0:
        steps = spec.base.epochs * (len(bundle.pretrain) // min(spec.base.batch_size, len(bundle.pretrain)))
        stages.append({"stage": "clean model", "what": f"train on {len(bundle.pretrain)} clean pairs", "steps": steps,
                       "batch": spec.base.batch_size})
    else:
        stages.append({"stage": "clean model", "what": "random init (trained from scratch on the poisoned corpus)", "steps": 0})
    poison_note = ""
    if plan["n_poisoned"] == 0 and spec.attack.name != "none":
        poison_note = " -- no poisons at this corpus size: raise attack.poison_rate or set attack.n_poison"
    stages.append({"stage": "poison", "what": f"{spec.attack.name}: {plan['n_poisoned']} poisoned rows ({plan['mix']}){poison_note}",
                   "steps": 0})
    train_steps = spec.train.epochs * (n_rows // min(spec.train.batch_size, n_rows))
    trains = defense_cls.trains()
    stages.append({"stage": "train", "what": f"{spec.train.epochs} epochs on {n_rows} rows"
                   + (f" under {spec.defense.name}" if trains else ""), "steps": train_steps, "batch": spec.train.batch_size})
    if defense_cls.repairs():
        opts = spec.defense.options
        rep_epochs = int(opts.get("epochs", 0) or spec.train.epochs)
        rep_batch = int(opts.get("batch_size", 0) or spec.train.batch_size)
        rep_steps = rep_epochs * (len(bundle.clean) // min(rep_batch, len(bundle.clean)))
        stages.append({"stage": "repair", "what": f"{spec.defense.name} on {len(bundle.clean)} clean pairs",
                       "steps": rep_steps, "batch": rep_batch})
    n_eval = (0 if bundle.test is None else 2 * len(bundle.test)) + (0 if bundle.retrieval is None else 2 * len(bundle.retrieval))
    stages.append({"stage": "evaluate", "what": f"{n_eval} image embeddings", "steps": 0})
    out: dict[str, Any] = {"spec_hash": spec.hash(), "weights": weights, "data": checks, "stages": stages,
                           "dataset": dict(bundle.info)}
    if measure:
        full = spec.train.batch_size
        cost = step_cost(spec, (min(2, full), min(8, full)))
        total_steps = sum(int(s["steps"]) for s in stages)
        per_step = cost["fixed_s"] + cost["per_sample_s"] * full
        flops_step = cost["flops_per_sample"] * full
        params = cost["params"]
        # fp32 weights + grads + two AdamW moments; activations are not included (see the docs).
        out["cost"] = {
            "params_m": params / 1e6,
            "weights_optimizer_gib": params * 16 / 2**30,
            "step_s_here": per_step, "device_here": cost["device"],
            "total_h_here": per_step * total_steps / 3600,
            "tflops_per_step": flops_step / 1e12,
            "gpu_h_at_assumed_throughput": flops_step * total_steps / (ASSUMED_GPU_TFLOPS * 1e12) / 3600,
            "assumed_gpu_tflops": ASSUMED_GPU_TFLOPS,
            "measured_at_batches": cost["batches"], "total_steps": total_steps,
        }
    return out


__all__ = ["ASSUMED_GPU_TFLOPS", "check_images", "dry_run", "step_cost"]
