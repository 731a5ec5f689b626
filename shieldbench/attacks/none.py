"""The control row: no poisons. Its ASR measures what the trigger alone does.

``none`` plans no edits, so the victim trains on clean data; at evaluation
the runner still applies the BadNets trigger (by default) to measure the
baseline rate at which triggered images land in the target class.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar


from shieldbench.attacks.badnets import BadNets
from shieldbench.attacks.base import PoisonPlan
from shieldbench.registry import register_attack


@register_attack("none")
class NoAttack(BadNets):
    """No poisons (clean training); evaluated with the BadNets trigger as a control."""

    threat_model: ClassVar[str] = "none"
    paper: ClassVar[str] = "control"

    @dataclass(frozen=True)
    class Params(BadNets.Params):
        pass

    def plan(self, seed: int) -> PoisonPlan:
        self._setup_trigger(seed)
        return self._new_plan(seed, [])

    def n_requested(self) -> int:
        return 0


__all__ = ["NoAttack"]
