"""Semantic Shield: knowledge-element grounding of CLIP training (see ``defense.py``)."""

from shieldbench.defenses.semantic_shield.defense import SemanticShield, SemanticShieldObjective

__all__ = ["SemanticShield", "SemanticShieldObjective"]
