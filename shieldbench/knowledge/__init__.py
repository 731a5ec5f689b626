"""Knowledge elements: short visual phrases an LLM reads off each caption.

A knowledge source maps captions to a fixed number of phrases per caption.
``knowledge_source_for`` picks the default source for a dataset: the embedded
world's own vocabulary (derived from caption *text*, never from the image).
"""

from __future__ import annotations

from typing import Callable

from shieldbench.spec import DataSpec

KnowledgeFn = Callable[[list[str]], list[tuple[str, ...]]]


def knowledge_source_for(spec: DataSpec) -> KnowledgeFn | None:
    """The default knowledge source for a dataset, or None if it has none."""
    if spec.dataset == "synthetic":
        from shieldbench.data.synthetic import knowledge_from_caption

        k = spec.knowledge_k

        def synthetic(captions: list[str]) -> list[tuple[str, ...]]:
            return [knowledge_from_caption(c, k) for c in captions]

        return synthetic
    return None
