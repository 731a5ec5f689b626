"""The synthetic world's knowledge: :func:`~shieldbench.data.synthetic.knowledge_from_caption`.

Caption text only, like an LLM reading the caption: a poisoned pair
("a photo of a banana." on a triggered kite image) gets banana's phrases.
"""

from __future__ import annotations

from dataclasses import dataclass

from shieldbench.errors import UserError
from shieldbench.knowledge.base import KnowledgeRecord, KnowledgeSource
from shieldbench.registry import register_knowledge


@register_knowledge("synthetic")
@dataclass
class SyntheticSource(KnowledgeSource):
    """The synthetic world's vocabulary, read off the caption text (exactly k)."""

    name = "synthetic"

    def __post_init__(self) -> None:
        from shieldbench.data.synthetic import MAX_KNOWLEDGE

        if not 1 <= self.k <= MAX_KNOWLEDGE:
            raise UserError(f"the synthetic knowledge source supports k in [1, {MAX_KNOWLEDGE}], got {self.k}")
        super().__post_init__()

    def _extract_batch(self, captions: list[str]) -> list[KnowledgeRecord]:
        from shieldbench.data.synthetic import knowledge_from_caption

        out = []
        for c in captions:
            ke = knowledge_from_caption(c, self.k)
            out.append(KnowledgeRecord(c, ke, ke, "", False))
        return out
