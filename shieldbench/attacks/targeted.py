"""Targeted poisoning without a trigger (Carlini & Terzis, ICLR 2022; RoCLIP, Yang et al. 2023).

The attacker wants specific images -- held out of training -- to be read as
the target class. ``n_targets`` images (default 16, as RoCLIP evaluates) are
drawn from the context's target pool (held-out labelled images, not in the
training set) among those whose true label is *not* the target; each is
paired with ``num_captions`` (default 100, RoCLIP's value) captions naming the
target class: random templates filled with the class name, or real training
captions that mention it (``attack.caption_source=caption_set``). Images are
inserted unchanged (``transform="none"``, ``source="pool"``); success is the
fraction of target images whose zero-shot top-1 prediction is the target, plus
text-to-image Hit@k / rank (see evaluation).

Budget: ``poison_rate`` / ``n_poison`` do NOT apply to this attack; the number
of poisoned rows is ``n_targets * num_captions`` (``plan.n_requested`` and
``plan.n_poisoned`` report it). Mix: ``append`` by default (the training set
grows by that many rows, as in RoCLIP); ``mix=replace`` overwrites that many
random training rows instead (dataset size fixed).

Differences from the reference code: Carlini & Terzis poison with 1-3 target
images; RoCLIP pairs every target with 100 captions and reports success over
16 targets. Here both counts are options. The pool is the benchmark's
labelled test set, so the target images also appear in clean-accuracy
evaluation (16 of 1000 test images in the small preset).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from shieldbench.attacks.base import Attack, PoisonEdit, PoisonPlan
from shieldbench.errors import UserError
from shieldbench.registry import register_attack
from shieldbench.spec import param


@register_attack("targeted")
class TargetedPoisoning(Attack):
    """Held-out target images paired with many target-class captions, no trigger (Carlini & Terzis 2022; RoCLIP)."""

    threat_model: ClassVar[str] = "targeted"
    paper: ClassVar[str] = "Carlini & Terzis, Poisoning and Backdooring Contrastive Learning, ICLR 2022; Yang et al., RoCLIP, NeurIPS 2023"
    default_mix: ClassVar[str] = "append"
    has_trigger: ClassVar[bool] = False

    @dataclass(frozen=True)
    class Params:
        n_targets: int = param(16, "target images drawn from the held-out pool (label != target)", lo=1, hi=100000)
        num_captions: int = param(100, "target-class captions paired with each target image (RoCLIP: 100)",
                                  lo=1, hi=100000)

    def n_requested(self) -> int:
        """``n_targets * num_captions``; attack.poison_rate / n_poison are ignored."""
        return self.params.n_targets * self.params.num_captions

    def candidates(self) -> np.ndarray:
        pool = self.ctx.target_pool
        if pool is None:
            raise UserError("attack targeted needs a pool of held-out labelled images (the test set); none was given")
        return (pool.labels != self.target_index).nonzero().flatten().numpy()

    def plan(self, seed: int) -> PoisonPlan:
        self.trigger_state = {}
        rng = np.random.default_rng(seed)
        cand = self.candidates()
        if len(cand) == 0:
            raise UserError("attack targeted: the held-out pool has no image outside the target class")
        p = self.params
        targets = sorted(int(i) for i in rng.choice(cand, size=min(p.n_targets, len(cand)), replace=False))
        n = len(targets) * p.num_captions
        rows: list[int | None] = [None] * n
        if self.mix == "replace":
            if n > len(self.ctx.train):
                raise UserError(f"attack targeted with mix=replace needs {n} training rows, there are {len(self.ctx.train)}")
            rows = [int(r) for r in rng.choice(len(self.ctx.train), size=n, replace=False)]
        edits = []
        k = 0
        for t in targets:
            for cap in self.target_captions(p.num_captions, rng):
                edits.append(PoisonEdit(rows[k], "pool", t, "none", cap))
                k += 1
        return self._new_plan(seed, edits, n_targets=len(targets), num_captions=p.num_captions,
                              target_labels=[int(self.ctx.target_pool.labels[t]) for t in targets])


__all__ = ["TargetedPoisoning"]
