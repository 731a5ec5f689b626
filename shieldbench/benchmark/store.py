"""Content-addressed artifact store under ``results/cache``, with integrity manifests.

Each artifact lives at ``cache/<kind>/<key>/`` where ``key`` hashes exactly
the inputs that determine it: the clean base model, poison plans, trained
checkpoints, repaired checkpoints, the base model's metrics under a trigger.
A finished artifact is never overwritten; an unfinished one holds a
resumable ``ckpt.pt``.

Every file of an artifact is listed, with its SHA-256 and size, in the
artifact's ``manifest.json``, written last: an artifact is finished when its
manifest is there and every file matches it. The store does not trust the
files it finds. Under the artifact's lock (:meth:`ArtifactStore.finished_model`,
:meth:`ArtifactStore.finished_json`):

- a file that does not match its manifest (edited, swapped for another
  model, truncated), a manifest that does not parse or names a file that is
  missing: one warning line, the artifact's files are removed, and the stage
  builds it again. Every artifact in the store is *derived* (rebuilt from the
  spec and the user's inputs), so rebuilding is always possible. The user's
  own inputs (weights, key images, knowledge files, corpora) are never
  stored here: they enter the keys by content, so an edited input is a
  different key, and a corrupt one is refused where it is read;
- an artifact written before manifests existed (its files complete, no
  manifest) is accepted once, as it is, and given a manifest (trust on first
  use: a file tampered with before the upgrade is not detected); one with a
  file missing (a crash between the writes of an old version) is rebuilt;
- temp files of writes killed mid-way (``.<name>.*.tmp``) are removed, and
  so is the resume checkpoint ``ckpt.pt`` of a finished model (a kill between
  the final write and its removal). Every writer into an artifact's folder
  holds its lock, so under the lock no such file belongs to a live process.

The cheap read-only checks :meth:`ArtifactStore.has_model` and
:meth:`ArtifactStore.load_json` (``--dry-run`` plans, reports, scripts) look
for the files only: they neither hash nor repair.

Builders hold :meth:`ArtifactStore.lock` while they look for and build an
artifact, so concurrent workers build each one once; every build is noted in
``cache/builds.jsonl`` (kind, key, process).
"""

from __future__ import annotations

import hashlib
import json
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from shieldbench.fileio import atomic_write_json, read_json, sweep_temps
from shieldbench.locks import locked, note_build
from shieldbench.models.clip import ClipModel
from shieldbench.training.checkpoint import atomic_torch_save, safe_load

MANIFEST = "manifest.json"
#: The files of a model artifact: the weights and their metadata (steps, history).
MODEL_FILES = ("model.pt", "meta.json")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class Verdict:
    """What :meth:`ArtifactStore.verify` found: ``absent``, ``ok``, ``legacy`` or ``bad`` (with why)."""

    state: str
    why: str = ""


def _warn(message: str) -> None:
    """One warning line on stderr (rich, not print: library code; no markup, no wrapping)."""
    from rich.console import Console

    Console(stderr=True).print(message, markup=False, highlight=False, soft_wrap=True)


class ArtifactStore:
    def __init__(self, root: str | Path, warn: Callable[[str], None] = _warn) -> None:
        self.root = Path(root)
        self.warn = warn

    def dir(self, kind: str, key: str) -> Path:
        return self.root / kind / key

    def lock(self, kind: str, key: str) -> AbstractContextManager[None]:
        """The inter-process lock of one artifact: hold it to look for the artifact and build it."""
        return locked(self.root / kind / f"{key}.lock")

    @property
    def builds_log(self) -> Path:
        return self.root / "builds.jsonl"

    # -- integrity ------------------------------------------------------------------
    def manifest_path(self, kind: str, key: str) -> Path:
        return self.dir(kind, key) / MANIFEST

    def write_manifest(self, kind: str, key: str, names: tuple[str, ...]) -> None:
        """Hash the artifact's files (those of ``names`` present) into its manifest, written last."""
        folder = self.dir(kind, key)
        files = {n: {"sha256": sha256_file(folder / n), "bytes": (folder / n).stat().st_size}
                 for n in names if (folder / n).is_file()}
        atomic_write_json(self.manifest_path(kind, key),
                          {"format": 1, "kind": kind, "key": key, "files": files, "written": time.time()})

    def verify(self, kind: str, key: str, names: tuple[str, ...]) -> Verdict:
        """Whether the artifact whose files are ``names`` (the first one is its main file) is intact. Read-only."""
        folder = self.dir(kind, key)
        if not (folder / names[0]).is_file():
            return Verdict("absent")
        mpath = folder / MANIFEST
        if not mpath.is_file():
            missing = [n for n in names if not (folder / n).is_file()]
            return Verdict("bad", f"{missing[0]} missing and no manifest") if missing else Verdict("legacy")
        try:
            manifest = json.loads(mpath.read_text(encoding="utf-8"))
            files = manifest["files"]
            entries = {str(n): (str(e["sha256"]), int(e["bytes"])) for n, e in files.items()}
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
            return Verdict("bad", f"{MANIFEST} is unreadable")
        for n in names:
            if n not in entries:
                return Verdict("bad", f"{n} is not in {MANIFEST}")
        for n, (digest, size) in entries.items():
            # Only the artifact's own file names: a manifest must not send the store to hash any other path.
            if n not in names:
                return Verdict("bad", f"{MANIFEST} names an unexpected file {n!r}")
            path = folder / n
            if not path.is_file():
                return Verdict("bad", f"{n} is missing")
            if path.stat().st_size != size or sha256_file(path) != digest:
                return Verdict("bad", f"{n} does not match its SHA-256 in {MANIFEST}")
        return Verdict("ok")

    def _finished(self, kind: str, key: str, names: tuple[str, ...]) -> bool:
        """Whether the artifact is finished and intact; repairs what it can. Call it holding the artifact's lock."""
        folder = self.dir(kind, key)
        if folder.is_dir():
            sweep_temps(folder)  # under the lock no writer is alive in this folder
        verdict = self.verify(kind, key, names)
        if verdict.state == "legacy":
            why = self._unreadable(folder, names)
            if why:
                verdict = Verdict("bad", why)
            else:
                self.write_manifest(kind, key, names)  # written before manifests existed: accepted once, as it is
        if verdict.state == "bad":
            self.discard(kind, key, names, verdict.why)
            return False
        if verdict.state == "absent":
            return False
        if names == MODEL_FILES:
            # A kill between the final model's write and the checkpoint's removal left it behind.
            self.checkpoint_path(kind, key).unlink(missing_ok=True)
        return True

    @staticmethod
    def _unreadable(folder: Path, names: tuple[str, ...]) -> str:
        """Why a file of an artifact without a manifest cannot be read ("" if all can): checked before adopting it."""
        from shieldbench.errors import UserError

        for n in names:
            try:
                safe_load(folder / n) if n.endswith(".pt") else read_json(folder / n)
            except UserError:
                return f"{n} is unreadable and has no manifest"
        return ""

    def discard(self, kind: str, key: str, names: tuple[str, ...], why: str) -> None:
        """Say why, and remove a damaged artifact's files so that its stage builds it again (hold the lock)."""
        folder = self.dir(kind, key)
        self.warn(f"warning: artifact {folder}: {why} (tampered or damaged); it is rebuilt")
        # A resume checkpoint beside a finished model is an orphan: the rebuild starts afresh.
        for n in (*names, MANIFEST, "ckpt.pt" if names == MODEL_FILES else ""):
            if n:
                (folder / n).unlink(missing_ok=True)

    # -- models ---------------------------------------------------------------------
    def model_path(self, kind: str, key: str) -> Path:
        return self.dir(kind, key) / "model.pt"

    def checkpoint_path(self, kind: str, key: str) -> Path:
        return self.dir(kind, key) / "ckpt.pt"

    def has_model(self, kind: str, key: str) -> bool:
        """The model file is there (read-only, no hashing: for plans and reports)."""
        return self.model_path(kind, key).is_file()

    def finished_model(self, kind: str, key: str) -> bool:
        """The model artifact is finished and matches its manifest; a damaged one is removed (hold the lock)."""
        return self._finished(kind, key, MODEL_FILES)

    def save_model(self, kind: str, key: str, model: ClipModel, meta: dict[str, Any]) -> None:
        path = self.model_path(kind, key)
        if path.is_file():
            return  # finished artifacts are immutable
        atomic_torch_save({k: v.detach().cpu() for k, v in model.clip.state_dict().items()}, path)
        atomic_write_json(self.dir(kind, key) / "meta.json", meta)
        self.write_manifest(kind, key, MODEL_FILES)
        # The resumable checkpoint is no longer needed once the model is final.
        self.checkpoint_path(kind, key).unlink(missing_ok=True)
        note_build(self.builds_log, kind, key)

    def load_model_into(self, kind: str, key: str, model: ClipModel) -> dict[str, Any]:
        state = safe_load(self.model_path(kind, key))
        model.clip.load_state_dict(state)
        meta_path = self.dir(kind, key) / "meta.json"
        return read_json(meta_path) if meta_path.is_file() else {}

    # -- json -----------------------------------------------------------------------
    def json_path(self, kind: str, key: str, name: str) -> Path:
        return self.dir(kind, key) / name

    def load_json(self, kind: str, key: str, name: str) -> Any | None:
        """The JSON file if it is there (read-only, not checked against the manifest)."""
        p = self.json_path(kind, key, name)
        return read_json(p) if p.is_file() else None

    def finished_json(self, kind: str, key: str, name: str) -> Any | None:
        """The JSON artifact if it is finished and matches its manifest, else None (hold the lock)."""
        return self.load_json(kind, key, name) if self._finished(kind, key, (name,)) else None

    def save_json(self, kind: str, key: str, name: str, obj: Any) -> None:
        p = self.json_path(kind, key, name)
        if not p.is_file():
            atomic_write_json(p, obj)
            self.write_manifest(kind, key, (name,))
            note_build(self.builds_log, kind, key)


__all__ = ["MANIFEST", "MODEL_FILES", "ArtifactStore", "Verdict", "sha256_file"]
