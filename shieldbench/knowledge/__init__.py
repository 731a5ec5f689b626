"""Knowledge elements: short visual phrases an LLM reads off each caption.

A knowledge source maps captions to exactly ``k`` phrases per caption (see
:class:`~shieldbench.knowledge.base.KnowledgeSource`). Built-in sources,
registered by name in the ``knowledge`` registry:

- ``synthetic``: the embedded world's vocabulary (caption text only);
- ``llm``: a transformers causal LM (the paper's method);
- ``file``: a JSONL file, per caption or per class (the paper's COCO setting);
- ``lexicon``: rule-based content-word chunks, no model.

``knowledge_source_for`` picks the default source for a dataset: the embedded
world's own vocabulary (derived from caption *text*, never from the image).
"""

from __future__ import annotations

from typing import Any, Callable

from shieldbench.spec import DataSpec

KnowledgeFn = Callable[[list[str]], list[tuple[str, ...]]]


def make_knowledge_source(name: str, k: int = 3, cache_dir: str | None = None, **options: Any):
    """Build the registered source ``name`` (``options`` are its fields: model, path, min_k, ...)."""
    from shieldbench.errors import UserError
    from shieldbench.registry import KNOWLEDGE

    cls = KNOWLEDGE.get(name)
    try:
        return cls(k=k, cache_dir=cache_dir or None, **{key: v for key, v in options.items() if v not in (None, "")})
    except TypeError as exc:
        raise UserError(f"knowledge source {name!r}: {exc}") from None


def knowledge_source_for(spec: DataSpec, source: str | None = None, cache_dir: str | None = None,
                         **options: Any) -> KnowledgeFn | None:
    """The knowledge source for a dataset, or None if it has none.

    ``source`` (or a ``knowledge_source`` field on the spec, if present) names
    a registered source explicitly; otherwise the synthetic world uses its own
    vocabulary and other datasets have no default (a defense that needs
    knowledge then picks one, e.g. ``lexicon``).
    """
    source = source or getattr(spec, "knowledge_source", None) or None
    if source is None:
        if spec.dataset != "synthetic":
            return None
        source = "synthetic"
    return make_knowledge_source(source, k=spec.knowledge_k, cache_dir=cache_dir, **options)
