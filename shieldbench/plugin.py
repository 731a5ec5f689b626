"""Everything a plugin author needs, from one place.

    from shieldbench.plugin import Defense, DefenseContext, param, register_defense

An attack subclasses :class:`Attack` (``plan``, ``apply_trigger``); a
defense subclasses :class:`Defense` and overrides the hooks it needs
(``prepare_data``, ``objective``, ``callbacks``, ``repair``). Both declare
their options as a frozen ``Params`` dataclass of :func:`param` fields
(default, help text, range or choices: checked for every ``--set``). See
docs/plugins.md. Importing this module imports torch (the base classes need
it); the ``shieldbench`` package itself does not.
"""

from __future__ import annotations

from shieldbench.attacks import triggers
from shieldbench.attacks.base import Attack, AttackContext, PoisonEdit, PoisonPlan
from shieldbench.data.views import TrainView
from shieldbench.defenses.base import Defense, DefenseContext
from shieldbench.errors import UserError
from shieldbench.models.clip import ClipModel
from shieldbench.registry import register_attack, register_dataset, register_defense, register_knowledge, register_model
from shieldbench.spec import derive_seed, param
from shieldbench.training import distributed
from shieldbench.training.contracts import Batch, Callback, LossOutput, Objective
from shieldbench.training.losses import ClipObjective, clip_loss, per_pair_clip_loss
from shieldbench.training.trainer import TrainConfig, Trainer

__all__ = [
    "Attack", "AttackContext", "Batch", "Callback", "ClipModel", "ClipObjective", "Defense", "DefenseContext",
    "LossOutput", "Objective", "PoisonEdit", "PoisonPlan", "TrainConfig", "TrainView", "Trainer", "UserError",
    "clip_loss", "derive_seed", "distributed", "param", "per_pair_clip_loss", "register_attack", "register_dataset",
    "register_defense", "register_knowledge", "register_model", "triggers",
]
