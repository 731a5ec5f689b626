"""Caption text helpers shared by attacks, readers and the evaluator."""

from __future__ import annotations

import re
from typing import Sequence

import torch


def class_pattern(name: str) -> re.Pattern[str]:
    """Word-boundary, plural-aware match of a class name in a caption."""
    words = [re.escape(w) for w in name.lower().split()]
    stem = r"\s+".join(words)
    return re.compile(rf"\b{stem}(?:s|es)?\b", re.IGNORECASE)


def caption_labels(captions: Sequence[str], classnames: Sequence[str]) -> torch.Tensor:
    """For each caption, the index of the first class it names (word-boundary match), else -1.

    Longer class names are tried first so that "hot dog" wins over "dog".
    """
    order = sorted(range(len(classnames)), key=lambda k: -len(classnames[k]))
    pats = [(k, class_pattern(classnames[k])) for k in order]
    out = torch.full((len(captions),), -1, dtype=torch.long)
    for j, c in enumerate(captions):
        for k, pat in pats:
            if pat.search(c):
                out[j] = k
                break
    return out


__all__ = ["caption_labels", "class_pattern"]
