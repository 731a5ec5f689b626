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
  descriptor, so a crash leaves at most one truncated last line; a rerun
  resumes from what is there.

The cache file is not trusted: a line counts as done only if it is a JSON
object whose ``key`` is the SHA-256 of its own ``caption``, with exactly
``k`` phrases, each a printable string of 1 to :data:`MAX_PHRASE_CHARS`
characters (see :func:`check_cache_line`). Any other line (torn by a crash,
edited by hand, written for another caption, padded with a 5,000-character
"phrase") is rejected: its caption is extracted again, one warning line
gives the number rejected and why, and the next write under the cache's
lock rewrites the file without them.

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
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Iterable, Sequence

from shieldbench.fileio import atomic_write_text, sweep_temps, write_all, writing
from shieldbench.locks import locked

__all__ = [
    "MAX_PHRASE_CHARS",
    "KnowledgeCache",
    "KnowledgeRecord",
    "KnowledgeSource",
    "caption_key",
    "check_cache_line",
    "clean_phrase",
    "fit_to_k",
]


def caption_key(caption: str) -> str:
    """SHA-256 hex digest of the caption text (UTF-8): the cache key."""
    return hashlib.sha256(caption.encode("utf-8")).hexdigest()


#: The longest knowledge element a cache line may hold. Real ones are a few
#: words (the LLM parser keeps at most 8); 200 characters leaves room for long
#: words and non-Latin scripts while refusing a paragraph, which a text encoder
#: would truncate to its context anyway and which can only come from a damaged
#: or edited file.
MAX_PHRASE_CHARS = 200

_SPACES = re.compile(r"\s+")
_EDGE_PUNCT = " \t\"'`*_.,;:!?()[]{}<>"


def clean_phrase(text: str) -> str:
    """Lower-case, collapse spaces, strip quotes/markdown/punctuation at the ends."""
    text = _SPACES.sub(" ", str(text)).strip().strip(_EDGE_PUNCT).strip()
    return text.lower()


def fit_to_k(found: Sequence[str], k: int, fallback: Iterable[str] = ()) -> tuple[str, ...]:
    """Exactly ``k`` distinct phrases: the first ``k`` of ``found``, padded from ``fallback``.

    Padding comes from ``fallback`` (the rule-based phrases of the same caption
    text, then generic phrases), never from another caption. Duplicates, empty
    strings and phrases the cache would reject (over :data:`MAX_PHRASE_CHARS`
    characters, not printable) are skipped, so every record written is one a
    reader accepts.
    """
    out: list[str] = []
    for phrase in list(found) + list(fallback):
        p = clean_phrase(phrase)
        if _good_phrase(p) and p not in out:
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


def _good_phrase(p: object) -> bool:
    return isinstance(p, str) and 0 < len(p) <= MAX_PHRASE_CHARS and bool(p.strip()) and p.isprintable()


def check_cache_line(obj: object, k: int | None) -> str | None:
    """Why a parsed cache line is not a finished record (None: it is one).

    The checks are the ones a reader needs to trust the line without
    re-deriving it: it belongs to the caption it claims (the key is that
    caption's SHA-256, so a line copied from another caption or edited is
    caught), and its phrases are what a source could have produced (exactly
    ``k``, each a printable string of 1 to :data:`MAX_PHRASE_CHARS` characters).
    ``k=None`` accepts any non-zero number of phrases.
    """
    if not isinstance(obj, dict):
        return "not a JSON object"
    caption, key = obj.get("caption"), obj.get("key")
    if not isinstance(caption, str):
        return "no caption text"
    if not isinstance(key, str) or key != caption_key(caption):
        return "key is not the SHA-256 of its caption"
    knowledge = obj.get("knowledge")
    if not isinstance(knowledge, list) or (len(knowledge) != k if k is not None else not knowledge):
        return f"not exactly {k} phrases" if k is not None else "no phrases"
    if not all(_good_phrase(p) for p in knowledge):
        return f"a phrase that is empty, not printable text or over {MAX_PHRASE_CHARS} characters"
    found = obj.get("found", [])
    if not isinstance(found, list) or not all(isinstance(p, str) for p in found):
        return "found is not a list of strings"
    if not isinstance(obj.get("raw", ""), str) or not isinstance(obj.get("flagged", False), bool):
        return "raw or flagged of the wrong type"
    return None


class KnowledgeCache:
    """Append-only JSONL cache: ``{"key", "caption", "knowledge", ...}`` per line.

    The last valid record for a key wins. Lines that fail
    :func:`check_cache_line` against ``k`` (a crash mid-write, a tampered or
    foreign line) are not loaded: :attr:`rejected` counts them by reason, and
    their captions count as missing. ``path=None`` keeps the cache in memory only.
    """

    def __init__(self, path: str | Path | None, k: int | None = None) -> None:
        self.path = Path(path) if path else None
        self.k = k
        self._records: dict[str, KnowledgeRecord] = {}
        self.rejected: Counter[str] = Counter()
        if self.path is not None and self.path.is_file():
            self._load()

    @property
    def rejected_lines(self) -> int:
        """How many non-blank lines of the file were not loaded."""
        return sum(self.rejected.values())

    skipped_lines = rejected_lines  # the name before lines were checked

    def _load(self) -> None:
        assert self.path is not None
        with open(self.path, "r", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                line = line.strip()
                if not line:
                    continue
                try:
                    obj = json.loads(line)
                except (json.JSONDecodeError, RecursionError):
                    self.rejected["torn or not JSON"] += 1
                    continue
                why = check_cache_line(obj, self.k)
                if why is not None:
                    self.rejected[why] += 1
                    continue
                self._records[obj["key"]] = KnowledgeRecord.from_json(obj)

    def rejection_message(self) -> str:
        """One line: how many lines were rejected, why, and what happens to them ("" if none)."""
        if not self.rejected:
            return ""
        why = "; ".join(f"{n} {reason}" for reason, n in self.rejected.most_common())
        return (f"warning: knowledge cache {self.path}: {self.rejected_lines} line(s) rejected ({why}); "
                f"their captions are extracted again and the lines dropped from the file")

    def compact(self) -> None:
        """Rewrite the file with the loaded records only (atomic); call it holding the cache's lock."""
        if self.path is None:
            return
        text = "".join(json.dumps(rec.to_json(), ensure_ascii=False) + "\n" for rec in self._records.values())
        atomic_write_text(self.path, text)
        self.rejected.clear()

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
        # A full disk is one line naming the file; a line it cut short is torn, and the reader rejects it.
        with writing(self.path):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)  # the umask applies
            try:
                # A previous crash may have left a line without its newline: start a
                # fresh line so the new record is not glued onto the broken one.
                if os.fstat(fd).st_size > 0:
                    with open(self.path, "rb") as fh:
                        fh.seek(-1, os.SEEK_END)
                        if fh.read(1) != b"\n":
                            write_all(fd, b"\n")
                for rec in records:
                    write_all(fd, (json.dumps(rec.to_json(), ensure_ascii=False) + "\n").encode("utf-8"))
                os.fsync(fd)
            finally:
                os.close(fd)


def _warn(message: str) -> None:
    """One warning line on stderr (rich, not print: library code; no markup, no wrapping)."""
    from rich.console import Console

    Console(stderr=True).print(message, markup=False, highlight=False, soft_wrap=True)


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
        self._cache = KnowledgeCache(path, self.k)
        self._reported_rejects = 0
        self._report_rejects()

    def _report_rejects(self) -> None:
        """Warn about rejected cache lines once: not again for the same lines when the cache is re-read."""
        n = self._cache.rejected_lines
        if n and n != self._reported_rejects:
            _warn(self._cache.rejection_message())
        self._reported_rejects = n

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
        processes appended, so concurrent runs extract each caption once;
        rejected lines are then dropped from the file (their captions are
        missing, so they are extracted again here).
        """
        if self._cache.path is None or (not self.missing(captions) and not self._cache.rejected_lines):
            return self._run(captions, progress, limit)
        with locked(str(self._cache.path) + ".lock"):
            # Compaction writes the file under this lock alone: a temp file of it is a killed write's.
            sweep_temps(self._cache.path.parent, (self._cache.path.name,))
            self._cache = KnowledgeCache(self._cache.path, self.k)
            self._report_rejects()
            if self._cache.rejected_lines:
                self._cache.compact()
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
                if len(rec.knowledge) != self.k or not all(_good_phrase(p) for p in rec.knowledge):
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
            if _good_phrase(q) and q not in cleaned:
                cleaned.append(q)
        flagged = len(cleaned) < (self.min_k or 0)
        knowledge = fit_to_k(cleaned, self.k, lexicon_phrases(caption) + list(GENERIC))
        return KnowledgeRecord(caption, knowledge, tuple(cleaned), raw, flagged)
