"""Detection AUROC of every detect_filter score on a world's poisoned training view, without training a victim.

    python scripts/diagnose_detect_filter.py --results results/validation --data-seed 1 --attacks badnets,blended,wanet

Loads (or trains) the clean base model the runner would use, poisons the
training pairs as the run would, embeds them with the base model once
(detector = base) and scores them with each score and scoring batch size,
then measures AUROC and the recall at 1-20% of the data against the poison
flags. A diagnosis for validation worlds (never data seed 0): the defense
itself never sees the flags; this script does, to measure it.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from rich.console import Console

from shieldbench import api
from shieldbench.benchmark.runner import RunContext, defense_context, make_attack, plan_attack, train_base_model
from shieldbench.data.datasets import build_dataset
from shieldbench.defenses.detect_filter import SCORES, DetectFilter, batched_scores, embed_images
from shieldbench.evaluation.metrics import detection_metrics
from shieldbench.spec import DefenseSpec, derive_seed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", required=True)
    ap.add_argument("--data-seed", type=int, required=True)
    ap.add_argument("--attacks", default="badnets")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--batch-sizes", default="256,512,0")
    ap.add_argument("--detectors", default="base", help="base and/or warmup (the defense's own warm-up, 1 epoch)")
    args = ap.parse_args()
    if args.data_seed == 0:
        raise SystemExit("data seed 0 is the reported world: diagnose on validation worlds only")
    console = Console(stderr=True)
    print("attack,detector,score,batch_size,auroc,recall_at_0.01,recall_at_0.02,recall_at_0.05,recall_at_0.1,n_poison,n_rows")
    for attack_name in args.attacks.split(","):
        spec = api.make_spec(attack=attack_name, defense="detect_filter", preset=args.preset,
                             overrides=[f"data.seed={args.data_seed}"])
        rc = RunContext(spec, Path(args.results), console, show_progress=False)
        bundle = build_dataset(spec.data, spec.eval)
        base, _ = train_base_model(rc, bundle)
        attack = make_attack(spec, bundle, base)
        plan, _ = plan_attack(rc, attack)
        poisoned = attack.poison(plan)
        for detector in args.detectors.split(","):
            t = time.perf_counter()
            ctx = defense_context(rc, "train", reference=base)
            model = DetectFilter(DefenseSpec(name="detect_filter", options={"detector": detector})).detector_model(
                poisoned.view, ctx)
            emb, readable, _ = embed_images(model, poisoned.view, rc.device)
            flags = poisoned.is_poison.cpu().numpy()[readable]
            console.print(f"[dim]{attack_name}/{detector}: {len(readable)} images in {time.perf_counter() - t:.1f} s[/dim]")
            report(attack_name, detector, emb, flags, args, spec)


def report(attack_name: str, detector: str, emb, flags, args: argparse.Namespace, spec) -> None:
    """One CSV row per score and scoring batch size."""
    for score in SCORES:
        for bs in (int(b) for b in args.batch_sizes.split(",")):
            # the seed the defense would use (its ctx.seed is derived the same way by the runner)
            s = batched_scores(emb, score, args.k, bs,
                               derive_seed(derive_seed(spec.seed, "defense", "train"), "detect-filter-batches"))
            m = detection_metrics(s, flags)
            print(f"{attack_name},{detector},{score},{bs},{m['auroc']:.4f},{m['recall_at_0.01']:.3f},{m['recall_at_0.02']:.3f},"
                  f"{m['recall_at_0.05']:.3f},{m['recall_at_0.1']:.3f},{m['n_poison']},{m['n_rows']}", flush=True)


if __name__ == "__main__":
    main()
