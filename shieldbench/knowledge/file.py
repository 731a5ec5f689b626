"""Knowledge elements from a JSONL file, per caption or per class.

Each line is one of

- ``{"caption": "...", "knowledge": ["...", ...]}``: per caption (what
  ``shieldbench knowledge extract`` writes; exact text match, then a match
  after lower-casing and collapsing spaces);
- ``{"class": "dog", "knowledge": ["...", ...]}``: per class, the paper's COCO
  setting (80 classes x 5 KEs; a nested list of sub-KEs is flattened). The
  defense never sees labels, so a caption's classes are the class names it
  *mentions* (word boundary, simple plurals, first mention first); the KEs of
  several classes are interleaved so each contributes.

A caption with fewer than ``min_k`` KEs found (no line, or no class named) is
flagged and padded from its lexicon phrases; it is never dropped.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from shieldbench.errors import UserError
from shieldbench.knowledge.base import KnowledgeRecord, KnowledgeSource, caption_key, clean_phrase
from shieldbench.registry import register_knowledge


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def _flatten(items) -> list[str]:
    out: list[str] = []
    if isinstance(items, str):
        return [items]
    for x in items or []:
        if isinstance(x, (list, tuple)):
            out += _flatten(x)
        elif isinstance(x, dict):
            out += _flatten(list(x.values()))
        elif x is not None:
            out.append(str(x))
    return out


def _plural_pattern(word: str) -> str:
    w = re.escape(word.lower())
    return rf"{w}(?:es|s)?"


@register_knowledge("file")
@dataclass
class FileSource(KnowledgeSource):
    """KEs from a JSONL file, per caption or per class (the paper's COCO setting)."""

    name = "file"
    path: str = ""

    def __post_init__(self) -> None:
        if not self.path:
            raise UserError("the file knowledge source needs a path (JSONL with caption/class and knowledge)")
        p = Path(self.path)
        if not p.is_file():
            raise UserError(f"knowledge file not found: {p}")
        self.by_caption: dict[str, list[str]] = {}
        self.by_norm: dict[str, list[str]] = {}
        self.by_class: dict[str, list[str]] = {}
        with open(p, encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise UserError(f"{p}:{n}: not valid JSON ({exc.msg})") from None
                if not isinstance(obj, dict) or "knowledge" not in obj or not ("caption" in obj or "class" in obj):
                    raise UserError(f"{p}:{n}: expected {{\"caption\" or \"class\": ..., \"knowledge\": [...]}}")
                ke = [clean_phrase(x) for x in _flatten(obj["knowledge"])]
                ke = [x for x in ke if x]
                if "caption" in obj:
                    self.by_caption[str(obj["caption"])] = ke
                    self.by_norm[_norm(str(obj["caption"]))] = ke
                else:
                    self.by_class[str(obj["class"]).lower().strip()] = ke
        self._class_re = None
        if self.by_class:
            names = sorted(self.by_class, key=len, reverse=True)
            self._class_re = re.compile(r"\b(" + "|".join(_plural_pattern(c) for c in names) + r")\b", re.IGNORECASE)
            self._class_of = {}
            for c in names:
                for form in (c, c + "s", c + "es"):
                    self._class_of.setdefault(form, c)
        super().__post_init__()

    def cache_id(self) -> str:
        p = Path(self.path)
        st = p.stat()
        tag = caption_key(f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}")[:12]
        return f"file-{tag}-k{self.k}-min{self.min_k}"

    def classes_in(self, caption: str) -> list[str]:
        if self._class_re is None:
            return []
        seen: list[str] = []
        for m in self._class_re.finditer(caption):
            c = self._class_of.get(m.group(1).lower())
            if c is not None and c not in seen:
                seen.append(c)
        return seen

    def lookup(self, caption: str) -> list[str]:
        if caption in self.by_caption:
            return self.by_caption[caption]
        if _norm(caption) in self.by_norm:
            return self.by_norm[_norm(caption)]
        lists = [self.by_class[c] for c in self.classes_in(caption)]
        out: list[str] = []
        for i in range(max((len(x) for x in lists), default=0)):
            for lst in lists:
                if i < len(lst) and lst[i] not in out:
                    out.append(lst[i])
        return out

    def _extract_batch(self, captions: list[str]) -> list[KnowledgeRecord]:
        return [self.record(c, self.lookup(c)) for c in captions]
