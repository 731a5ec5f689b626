"""The common interface of knowledge sources, and their on-disk cache.

A :class:`KnowledgeSource` maps captions to knowledge elements (KEs): short
low-level visual phrases ("curved body", "shaggy hair"). Every source

- reads the caption *text only* (never the image, its label or any poison flag),
  so a poisoned pair gets the KEs of its poisoned caption;
- returns **exactly** ``k`` phrases per caption from :meth:`extract` (the
  training losses need a fixed number per caption, and a variable number would
  leak which captions are odd ones, e.g. short templated poison captions);
- caches results in a JSONL file keyed by the SHA-256 of the caption, one
  object per line, appended with a single ``write`` on an ``O_APPEND`` file
  descriptor, so a crash leaves at most one truncated last line, which the
  loader skips; a rerun resumes from what is there.

Sources that can find *fewer* than the minimum number of phrases for a caption
(the LLM and file sources) do not drop it silently: the caption is flagged
(``n_found < min_k``), listed in :attr:`KnowledgeSource.report`, and padded to
``k`` (see :func:`fit_to_k`). Dropping it instead would change the training set
and, for a defense, make the attack decide which rows are trained on.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Iterable, Sequence

from shieldbench.locks import locked

__all__ = [
    "KnowledgeCache",
    "KnowledgeRecord",
    "KnowledgeSource",
    "caption_key",
    "clean_phrase",
    "fit_to_k",
]


def caption_key(caption: str) -> str:
    """SHA-256 hex digest of the caption text (UTF-8): the cache key."""
    return hashlib.sha256(caption.encode("utf-8")).hexdigest()


_SPACES = re.compile(r"\s+")
_EDGE_PUNCT = " \t\"'`*_.,;:!?()[]{}<>"


def clean_phrase(text: str) -> str:
    """Lower-case, collapse spaces, strip quotes/markdown/punctuation at the ends."""
    text = _SPACES.sub(" ", str(text)).strip().strip(_EDGE_PUNCT).strip()
    return text.lower()


def fit_to_k(found: Sequence[str], k: int, fallback: Iterable[str] = ()) -> tuple[str, ...]:
    """Exactly ``k`` distinct phrases: the first ``k`` of ``found``, padded from ``fallback``.

    Padding comes from ``fallback`` (the rule-based phrases of the same caption
    text, then generic phrases), never from another caption. Duplicates and
    empty strings are skipped.
    """
    out: list[str] = []
    for phrase in list(found) + list(fallback):
        p = clean_phrase(phrase)
        if p and p not in out:
            out.append(p)
        if len(out) == k:
            return tuple(out)
    # Still short (a tiny fallback): repeat generic fillers with an index.
    i = 1
    while len(out) < k:
        filler = f"visual detail {i}"
        if filler not in out:
            out.append(filler)
        i += 1
    return tuple(out)


@dataclass
class KnowledgeRecord:
    """One caption's extraction: what was found and the exactly-k training tuple."""

    caption: str
    knowledge: tuple[str, ...]
    found: tuple[str, ...] = ()
    raw: str = ""
    flagged: bool = False

    def to_json(self) -> dict:
        return {"key": caption_key(self.caption), "caption": self.caption, "knowledge": list(self.knowledge),
                "found": list(self.found), "raw": self.raw, "flagged": self.flagged}

    @classmethod
    def from_json(cls, obj: dict) -> "KnowledgeRecord":
        return cls(str(obj["caption"]), tuple(str(x) for x in obj["knowledge"]),
                   tuple(str(x) for x in obj.get("found", obj["knowledge"])), str(obj.get("raw", "")),
                   bool(obj.get("flagged", False)))


class KnowledgeCache:
    """Append-only JSONL cache: ``{"key", "caption", "knowledge", ...}`` per line.

    The last record for a key wins. Lines that do not parse (a crash mid-write)
    are skipped on load. ``path=None`` keeps the cache in memory only.
    """

    def __init__(self, path: str | Path | None) -> None:
        self.path = Path(path) if path else None
        self._records: dict[str, KnowledgeRecord] = {}
        self.skipped_lines = 0
        if self.path is not None and self.path.is_file():
            self._load()

    def _load(self) -> None:
        assert self.path is not None
        with open(self.path, "r", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                line = line.strip()
                if not line:
                    continue
                try:
                    obj = json.loads(line)
                    rec = KnowledgeRecord.from_json(obj)
                except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                    self.skipped_lines += 1
                    continue
                self._records[obj.get("key") or caption_key(rec.caption)] = rec

    def __contains__(self, caption: str) -> bool:
        return caption_key(caption) in self._records

    def __len__(self) -> int:
        return len(self._records)

    def get(self, caption: str) -> KnowledgeRecord | None:
        return self._records.get(caption_key(caption))

    def records(self) -> list[KnowledgeRecord]:
        return list(self._records.values())

    def add(self, records: Sequence[KnowledgeRecord]) -> None:
        """Remember ``records`` and append them to the file (one write per record)."""
        for rec in records:
            self._records[caption_key(rec.caption)] = rec
        if self.path is None or not records:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)  # the umask applies
        try:
            # A previous crash may have left a line without its newline: start a
            # fresh line so the new record is not glued onto the broken one.
            if os.fstat(fd).st_size > 0:
                with open(self.path, "rb") as fh:
                    fh.seek(-1, os.SEEK_END)
                    if fh.read(1) != b"\n":
                        os.write(fd, b"\n")
            for rec in records:
                os.write(fd, (json.dumps(rec.to_json(), ensure_ascii=False) + "\n").encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)


@dataclass
class KnowledgeSource:
    """Base class: caption text -> exactly ``k`` KEs, cached by caption hash.

    Subclasses implement :meth:`_extract_batch` (uncached captions in, one
    :class:`KnowledgeRecord` each out). ``cache_dir`` (or ``cache_file``)
    turns on the on-disk cache; the file name includes :meth:`cache_id`, so
    sources with different settings never share entries.
    """

    k: int = 3
    min_k: int | None = None
    cache_dir: str | None = None
    cache_file: str | None = None
    name: ClassVar[str] = ""
    report: list[dict] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        from shieldbench.errors import UserError

        if self.k < 1:
            raise UserError(f"knowledge k must be >= 1, got {self.k}")
        if self.min_k is None:
            self.min_k = self.k
        if not 0 <= self.min_k <= self.k:
            raise UserError(f"knowledge min_k must be in [0, k={self.k}], got {self.min_k}")
        path = self.cache_file
        if path is None and self.cache_dir:
            path = str(Path(self.cache_dir) / f"{self.cache_id()}.jsonl")
        self._cache = KnowledgeCache(path)

    # -- to override ---------------------------------------------------------------
    def cache_id(self) -> str:
        """A file-name-safe id of everything that changes the output."""
        return f"{self.name or type(self).__name__.lower()}-k{self.k}"

    def _extract_batch(self, captions: list[str]) -> list[KnowledgeRecord]:
        raise NotImplementedError

    def batch_size(self) -> int:
        return 1024

    # -- interface -----------------------------------------------------------------
    @property
    def cache(self) -> KnowledgeCache:
        return self._cache

    def extract(self, captions: Sequence[str], progress=None, limit: int | None = None) -> list[tuple[str, ...]]:
        """Exactly ``k`` KEs per caption, in order; uncached ones in batches.

        ``progress(n_done)`` is called after each batch. ``limit`` caps the
        number of *new* captions processed (the rest raise ``KeyError``
        unless cached): it exists to stop a long extraction early.
        """
        self.run(captions, progress=progress, limit=limit)
        out = []
        for c in captions:
            rec = self._cache.get(c)
            if rec is None:
                raise KeyError(f"no knowledge for caption {c!r} (extraction stopped early)")
            out.append(rec.knowledge)
        return out

    __call__ = extract

    def missing(self, captions: Sequence[str]) -> list[str]:
        """Distinct captions not in the cache, in first-seen order."""
        return [c for c in dict.fromkeys(captions) if c not in self._cache]

    def run(self, captions: Sequence[str], progress=None, limit: int | None = None) -> int:
        """Extract and cache every uncached caption; returns how many were new.

        With an on-disk cache, holds its lock and first reads what other
        processes appended, so concurrent runs extract each caption once.
        """
        if self._cache.path is None or not self.missing(captions):
            return self._run(captions, progress, limit)
        with locked(str(self._cache.path) + ".lock"):
            self._cache = KnowledgeCache(self._cache.path)
            return self._run(captions, progress, limit)

    def _run(self, captions: Sequence[str], progress=None, limit: int | None = None) -> int:
        todo = self.missing(captions)
        if limit is not None:
            todo = todo[: max(0, limit)]
        bs = max(1, self.batch_size())
        for start in range(0, len(todo), bs):
            chunk = todo[start : start + bs]
            records = self._extract_batch(chunk)
            if len(records) != len(chunk):
                raise RuntimeError(f"{type(self).__name__} returned {len(records)} records for {len(chunk)} captions")
            for rec in records:
                if len(rec.knowledge) != self.k:
                    rec.knowledge = fit_to_k(rec.knowledge, self.k)
                if rec.flagged:
                    self.report.append({"caption": rec.caption, "found": list(rec.found), "raw": rec.raw})
            self._cache.add(records)
            if progress is not None:
                progress(len(chunk))
        return len(todo)

    def flagged(self, captions: Sequence[str] | None = None) -> list[KnowledgeRecord]:
        """Cached records with fewer than ``min_k`` phrases found (all, or of ``captions``)."""
        if captions is None:
            return [r for r in self._cache.records() if r.flagged]
        recs = (self._cache.get(c) for c in dict.fromkeys(captions))
        return [r for r in recs if r is not None and r.flagged]

    def record(self, caption: str, found: Sequence[str], raw: str = "") -> KnowledgeRecord:
        """Build a record: clean/dedupe ``found``, flag if short, pad from the lexicon."""
        from shieldbench.knowledge.lexicon import GENERIC, lexicon_phrases

        cleaned: list[str] = []
        for p in found:
            q = clean_phrase(p)
            if q and q not in cleaned:
                cleaned.append(q)
        flagged = len(cleaned) < (self.min_k or 0)
        knowledge = fit_to_k(cleaned, self.k, lexicon_phrases(caption) + list(GENERIC))
        return KnowledgeRecord(caption, knowledge, tuple(cleaned), raw, flagged)
