"""No defense: plain CLIP training. The baseline every defense is compared to."""

from __future__ import annotations

from shieldbench.defenses.base import Defense
from shieldbench.registry import register_defense


@register_defense("none")
class NoDefense(Defense):
    """Plain CLIP training, no defense (the baseline)."""

    paper = "Radford et al., CLIP, 2021"
