"""Which tower loses clean accuracy under a defense: zero-shot top-1 with the towers mixed.

    python scripts/diagnose_semantic_shield_cost.py RESULTS [RUN_ID_SUBSTRING ...]

For each finished record in RESULTS (optionally only run ids containing one
of the substrings), loads the clean base model and the trained (or repaired)
checkpoint from the store and prints, on the record's test split:

- ``ca``: the trained model (its image tower, its text tower): the record's clean top-1;
- ``ca_img``: the trained image tower with the *base* model's text tower;
- ``ca_txt``: the base image tower with the *trained* text tower;
- ``drift``: mean over classes of 1 - cos(class prompt embedding before, after);
- ``ca_base``: the base model itself.

A defense that damages the text tower's class prompts shows ``ca_img`` above
``ca`` and a large ``drift``; one that damages the image tower, the reverse.
Reads the store only; writes nothing (one line per run on stdout, JSON).
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch

from shieldbench.benchmark.runner import new_model
from shieldbench.benchmark.store import ArtifactStore
from shieldbench.data.datasets import build_dataset
from shieldbench.evaluation import metrics as M
from shieldbench.evaluation.evaluate import class_embeddings, embed_images
from shieldbench.spec import spec_from_dict


def top1(image_emb: torch.Tensor, classifier: torch.Tensor, labels: torch.Tensor) -> float:
    logits = torch.nn.functional.normalize(image_emb, dim=-1) @ classifier.t()
    return M.topk_accuracy(logits, labels, ks=(1,))[1].value


def main(results: Path, wanted: list[str]) -> None:
    store = ArtifactStore(results / "cache")
    device = torch.device("cpu")
    bundles: dict[str, object] = {}
    for path in sorted((results / "runs").glob("*/record.json")):
        record = json.loads(path.read_text())
        if record.get("status") != "ok" or (wanted and not any(w in record["run_id"] for w in wanted)):
            continue
        spec = spec_from_dict(record["spec"])
        data_key = json.dumps(record["spec"]["data"], sort_keys=True) + json.dumps(record["spec"]["eval"], sort_keys=True)
        if data_key not in bundles:
            bundles[data_key] = build_dataset(spec.data, spec.eval)
        bundle = bundles[data_key]
        art = record["artifacts"]
        kind, key = ("repair", art["repair"]["key"]) if "repair" in art else ("train", art["train"]["key"])
        base = new_model(spec)
        store.load_model_into("base", art["base"]["key"], base)
        trained = copy.deepcopy(base)
        store.load_model_into(kind, key, trained)
        test = bundle.test
        with torch.no_grad():
            cls_base = class_embeddings(base.eval(), test.classnames, test.templates, device)
            cls_trained = class_embeddings(trained.eval(), test.classnames, test.templates, device)
            img_base = embed_images(base, test.images, 512, device)
            img_trained = embed_images(trained, test.images, 512, device)
        labels = test.labels
        row = {
            "run_id": record["run_id"], "attack": record["attack"], "defense": record["defense"],
            "data_seed": spec.data.seed, "seed": spec.seed,
            "options": {k: v for k, v in record["spec"]["defense"].get("options", {}).items()
                        if k in ("variant", "lambda_ke", "lambda_attn", "ke_text", "ke_image")},
            "ca": top1(img_trained, cls_trained, labels), "ca_img": top1(img_trained, cls_base, labels),
            "ca_txt": top1(img_base, cls_trained, labels), "ca_base": top1(img_base, cls_base, labels),
            "drift": float((1 - (cls_base * cls_trained).sum(dim=1)).mean()),
            "record_ca": record["metrics"].get("clean_top1"),
        }
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
