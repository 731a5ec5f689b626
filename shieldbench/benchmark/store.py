"""Content-addressed artifact store under ``results/cache``.

Each artifact lives at ``cache/<kind>/<key>/`` where ``key`` hashes exactly
the inputs that determine it: the clean base model, poison plans, trained
checkpoints, repaired checkpoints. A finished artifact (its ``model.pt`` or
``plan.json`` present) is never overwritten; an unfinished one holds a
resumable ``ckpt.pt``.

Builders hold :meth:`ArtifactStore.lock` while they look for and build an
artifact, so concurrent workers build each one once; every build is noted in
``cache/builds.jsonl`` (kind, key, process).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from shieldbench.locks import locked, note_build

from shieldbench.fileio import atomic_write_json, read_json
from shieldbench.models.clip import ClipModel
from shieldbench.training.checkpoint import atomic_torch_save, safe_load


class ArtifactStore:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def dir(self, kind: str, key: str) -> Path:
        return self.root / kind / key

    def lock(self, kind: str, key: str) -> AbstractContextManager[None]:
        """The inter-process lock of one artifact: hold it to look for the artifact and build it."""
        return locked(self.root / kind / f"{key}.lock")

    @property
    def builds_log(self) -> Path:
        return self.root / "builds.jsonl"

    # -- models ---------------------------------------------------------------------
    def model_path(self, kind: str, key: str) -> Path:
        return self.dir(kind, key) / "model.pt"

    def checkpoint_path(self, kind: str, key: str) -> Path:
        return self.dir(kind, key) / "ckpt.pt"

    def has_model(self, kind: str, key: str) -> bool:
        return self.model_path(kind, key).is_file()

    def save_model(self, kind: str, key: str, model: ClipModel, meta: dict[str, Any]) -> None:
        path = self.model_path(kind, key)
        if path.is_file():
            return  # finished artifacts are immutable
        atomic_torch_save({k: v.detach().cpu() for k, v in model.clip.state_dict().items()}, path)
        atomic_write_json(self.dir(kind, key) / "meta.json", meta)
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
        p = self.json_path(kind, key, name)
        return read_json(p) if p.is_file() else None

    def save_json(self, kind: str, key: str, name: str, obj: Any) -> None:
        p = self.json_path(kind, key, name)
        if not p.is_file():
            atomic_write_json(p, obj)
            note_build(self.builds_log, kind, key)


__all__ = ["ArtifactStore"]
