"""How many clean pairs Semantic Shield's gate silences, and where the poisons sit (offline, with the poison flags).

    python scripts/diagnose_semantic_shield_gate.py RESULTS RUN_ID_SUBSTRING [...]

For each finished Semantic Shield record in RESULTS whose run id contains one
of the substrings: rebuilds the record's poisoned training set (the cached
poison plan) and its knowledge elements, loads the clean base model and the
trained checkpoint from the store, and scores every training pair in batches
of ``train.batch_size`` (a fixed shuffle) with each grounding score and
the record's gate (``losses.grounding`` / ``losses.pair_weights``). Prints one JSON
line per (run, model): the share of clean pairs and of poisons whose weight
is under a tenth of the mean (``gated``), the AUC of the score for ranking
poisons below clean pairs, and quantiles of the clean and poison scores; in
the synthetic world also the gated share of clean pairs whose knowledge
elements include a colour phrase ("cyan banana") and of those that do not.

The poison flags are used here only, after training, to describe the gate;
the defense never sees them. Reads the store; writes nothing.
"""

from __future__ import annotations

import copy
from dataclasses import replace
import json
import sys
from pathlib import Path

import torch
from scipy.stats import mannwhitneyu

from shieldbench.benchmark.keys import plan_key
from shieldbench.benchmark.runner import make_attack, new_model
from shieldbench.benchmark.store import ArtifactStore
from shieldbench.data.datasets import build_dataset
from shieldbench.defenses.base import DefenseContext
from shieldbench.defenses.semantic_shield import SemanticShield
from shieldbench.defenses.semantic_shield import losses as L
from shieldbench.defenses.semantic_shield.defense import encode_texts
from shieldbench.attacks.base import PoisonPlan
from shieldbench.knowledge import knowledge_source_for
from shieldbench.spec import spec_from_dict


SCORES = ("own", "contrast", "column", "two_way", "phrase")


@torch.no_grad()
def scores(model, view, order: torch.Tensor, batch_size: int) -> dict[str, torch.Tensor]:
    """Every grounding score of every training pair, batch by batch in ``order`` (as training would)."""
    model.eval()
    out = {name: torch.full((len(view),), float("nan")) for name in SCORES}
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        kes = view.knowledge_at(idx)
        uniq: dict[str, int] = {}
        rows = [[uniq.setdefault(k, len(uniq)) for k in ks] for ks in kes]
        ke_emb = encode_texts(model, model.tokenize(list(uniq)))
        patches = model.image_outputs(view.images(idx), patches=True).patches
        s_all = L.alignment(patches, ke_emb)
        a = L.set_alignment(s_all, torch.tensor(rows))
        for name in SCORES:
            out[name][idx] = (L.phrase_contrast(s_all, torch.tensor(rows)) if name == "phrase"
                              else L.grounding_from_sets(a, name))
    return out


def describe(score: torch.Tensor, is_poison: torch.Tensor, order: torch.Tensor, batch_size: int, params,
             colour: torch.Tensor | None = None) -> dict:
    w = torch.empty_like(score)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        w[idx] = L.pair_weights(score[idx], params.weight_temperature, params.weight_form,
                                standardize=params.weight_score == "own")
    clean, poison = score[~is_poison], score[is_poison]
    gated = w < 0.1
    q = torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95])
    auc = float(mannwhitneyu(clean.numpy(), poison.numpy()).statistic) / (len(clean) * len(poison)) if len(poison) else None
    by_colour = {}
    if colour is not None:  # synthetic world: does the caption have a colour phrase ("cyan banana")?
        for name, mask in (("colour", colour), ("no_colour", ~colour)):
            by_colour[f"gated_clean_{name}"] = float(gated[~is_poison & mask].float().mean())
            by_colour[f"n_clean_{name}"] = int((~is_poison & mask).sum())
        by_colour["n_poison_colour"] = int((is_poison & colour).sum())
    return {**by_colour, "gated_clean": float(gated[~is_poison].float().mean()),
            "gated_poison": float(gated[is_poison].float().mean()) if len(poison) else None,
            "auc": auc, "n_poison": int(is_poison.sum()),
            "clean_q": [round(float(v), 3) for v in torch.quantile(clean, q)],
            "poison_q": [round(float(v), 3) for v in torch.quantile(poison, q)] if len(poison) else []}


def main(results: Path, wanted: list[str]) -> None:
    store = ArtifactStore(results / "cache")
    for path in sorted((results / "runs").glob("*/record.json")):
        record = json.loads(path.read_text())
        if (record.get("status") != "ok" or record["defense"] != "semantic_shield"
                or not any(w in record["run_id"] for w in wanted)):
            continue
        spec = spec_from_dict(record["spec"])
        bundle = build_dataset(spec.data, spec.eval)
        art = record["artifacts"]
        base = new_model(spec)
        store.load_model_into("base", art["base"]["key"], base)
        trained = copy.deepcopy(base)
        store.load_model_into("train", art["train"]["key"], trained)
        attack = make_attack(spec, bundle, base)
        plan = PoisonPlan.from_dict(store.load_json("plans", plan_key(spec), "plan.json"))
        attack.restore(plan)
        poisoned = attack.poison(plan)
        defense = SemanticShield(spec.defense)
        ctx = DefenseContext(seed=0, train=spec.train, device=torch.device("cpu"), knowledge_k=spec.data.knowledge_k,
                             knowledge_source=knowledge_source_for(spec.data),
                             cache_dir=str(results / "cache" / "knowledge"), show_progress=False)
        view = defense.prepare_data(poisoned.view, ctx)
        order = torch.randperm(len(view), generator=torch.Generator().manual_seed(0))
        flags = torch.as_tensor(poisoned.is_poison, dtype=torch.bool)
        colour = None
        if spec.data.dataset == "synthetic":
            from shieldbench.data.synthetic import COLOURS

            colour = torch.tensor([any(k.split()[0] in COLOURS for k in kes) for kes in view.knowledge])
        for name, model in (("base", base), ("trained", trained)):
            for score_name, s in scores(model, view, order, spec.train.batch_size).items():
                params = replace(defense.params, weight_score=score_name,
                                 weight_form="sigmoid" if score_name != "own" else defense.params.weight_form)
                if score_name == "phrase":  # not a registered option: gate it like the z-scores
                    params = replace(defense.params, weight_score="contrast")
                row = {"run_id": record["run_id"], "model": name, "score": score_name,
                       "clean_top1": record["metrics"].get("clean_top1"),
                       **describe(s, flags, order, spec.train.batch_size, params, colour)}
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
