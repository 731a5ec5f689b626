"""Rule-based knowledge elements: content-word chunks of the caption, no model.

The fallback when no language model is at hand. A caption is split into runs
of content words at stopwords and punctuation ("a large cyan donut with a hole
in the middle" -> "large cyan donut", "hole", "middle"); runs longer than
three words keep their last three (the head noun and its modifiers). Runs are
ordered multi-word first (adjective + noun chunks carry most visual detail),
then single words, then generic fillers, and exactly ``k`` are returned.
It is crude next to an LLM (no world knowledge: "banana" does not become
"curved yellow body"), but deterministic, instant and text-only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from shieldbench.knowledge.base import KnowledgeRecord, KnowledgeSource, fit_to_k
from shieldbench.registry import register_knowledge

#: A small English stopword list plus words that describe the medium, not the scene.
STOPWORDS = frozenset(
    """
    a an the this that these those there here it its it's is are was were be been being am
    and or but nor so yet of in on at to from by with without into onto over under above below
    near next beside between behind against through during for as about around up down out off
    than then very too also just only some any each every all both few more most other such own
    same no not can will would should could may might must shall do does did done has have had
    having i me my we our you your he him his she her they them their what which who whom whose
    when where why how one two three several many much lot lots
    photo photograph picture image drawing painting view close shot shown showing shows depicted
    depicting looking seen see appears appear
    """.split()
)

_TOKEN = re.compile(r"[a-z][a-z'\-]*|[,.;:!?()\[\]\"]")
GENERIC = ("main object", "object shape", "object colour", "background", "scene layout")


def lexicon_phrases(caption: str) -> list[str]:
    """All candidate phrases of ``caption`` (multi-word chunks first), no padding."""
    runs: list[list[str]] = []
    current: list[str] = []
    for tok in _TOKEN.findall(caption.lower()):
        if tok in STOPWORDS or not tok[0].isalpha():
            if current:
                runs.append(current)
            current = []
        else:
            current.append(tok.strip("'-"))
    if current:
        runs.append(current)
    chunks = [" ".join(r[-3:]) for r in runs if r]
    multi = [c for c in chunks if " " in c]
    single = [c for c in chunks if " " not in c]
    out: list[str] = []
    for c in multi + single:
        if c and c not in out:
            out.append(c)
    return out


@register_knowledge("lexicon")
@dataclass
class LexiconSource(KnowledgeSource):
    """Rule-based content-word chunks of the caption (no model; exactly k)."""

    name = "lexicon"

    def _extract_batch(self, captions: list[str]) -> list[KnowledgeRecord]:
        out = []
        for c in captions:
            found = lexicon_phrases(c)
            out.append(KnowledgeRecord(c, fit_to_k(found, self.k, GENERIC), tuple(found), "", False))
        return out


def lexicon_knowledge(caption: str, k: int = 3) -> tuple[str, ...]:
    """Exactly ``k`` lexicon phrases of one caption."""
    return fit_to_k(lexicon_phrases(caption), k, GENERIC)
