"""An adversarial defense: nothing it is handed marks a poison by position, type, metadata or file.

What the interface guarantees is tested here; what an in-process plugin could
still reach through private attributes or the interpreter is stated in
docs/architecture.md ("Threat-model enforcement").
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from shieldbench import api
from shieldbench.benchmark.runner import make_attack
from shieldbench.data.datasets import build_dataset
from shieldbench.defenses.base import Defense
from shieldbench.registry import DEFENSES

SEEN: dict = {}


class Snoop(Defense):
    """Records everything it is handed, then trains like `none`."""

    def prepare_data(self, data, ctx):
        SEEN["public"] = {n for n in dir(data) if not n.startswith("_")}
        SEEN["types"] = {type(data.uint8_images([i])).__name__ for i in range(len(data))}
        SEEN["ctx"] = {k: v for k, v in vars(ctx).items()}
        root = Path(ctx.cache_dir)
        SEEN["files"] = [str(p) for p in root.rglob("*")] if root.exists() else []
        return data

    def objective(self, ctx):  # a training defense, so the hooks above run
        return super().objective(ctx)


@pytest.fixture
def snoop():
    DEFENSES.add("snoop", Snoop, override=True)
    yield
    DEFENSES._entries.pop("snoop", None)


def test_the_defense_is_handed_nothing_that_marks_a_poison(snoop, tmp_path):
    spec = api.make_spec(attack="badnets", defense="snoop", preset="smoke", overrides=["attack.mix=append"])
    record = api.run(spec, tmp_path, show_progress=False)
    assert record["status"] == "ok", record.get("error")
    assert SEEN["public"] <= {"captions", "caption", "captions_at", "image_size", "images", "knowledge",
                              "knowledge_at", "subset", "uint8_images", "with_knowledge", "from_pairs", "fetch",
                              "in_memory"}
    assert SEEN["types"] == {"Tensor"}  # every row comes back the same way
    ctx_values = " ".join(map(str, SEEN["ctx"].values())).replace(str(tmp_path), "").lower()
    for word in ("plan", "poison", "trigger", "is_poison", "badnets"):
        assert word not in ctx_values, word
    assert not any("plan" in Path(f).name for f in SEEN["files"])  # its folder holds nothing of the plan


def test_appended_poisons_are_not_found_by_position(smoke_world):
    spec = api.make_spec(attack="badnets", defense="none", preset="smoke",
                         overrides=["attack.mix=append", "attack.poison_rate=0.1"])
    bundle = build_dataset(spec.data, spec.eval)
    atk = make_attack(spec, bundle)
    poisoned = atk.poison(atk.plan(0))
    n, rows = len(poisoned.view), poisoned.is_poison.nonzero().flatten().numpy()
    m = len(rows)
    # Not the tail, not the head: the positions look like a uniform draw over the whole index.
    assert not np.array_equal(rows, np.arange(n - m, n)) and not np.array_equal(rows, np.arange(m))
    assert stats.kstest(rows / n, "uniform").pvalue > 0.01
    # And the rows around them are the corpus in its own order.
    clean = (~poisoned.is_poison).nonzero().flatten()
    assert torch.equal(poisoned.view.uint8_images(clean), bundle.train.images)
