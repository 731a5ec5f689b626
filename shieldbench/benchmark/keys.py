"""Cache keys: each artifact is keyed by the hash of exactly the inputs that determine it.

An input is the part of the spec a stage reads, and also the code and the
files behind it:

- code: the package's version, torch's and open_clip's versions, and the
  ``version`` of every plugin involved (attack, defense, dataset, model);
  a plugin author bumps its ``version`` when a change moves its numbers;
- files named by the spec (local weights, a knowledge file, a key image):
  their content (SHA-256), not their path;
- a corpus on disk: its manifest fingerprint (image references and
  captions, see :mod:`shieldbench.data.corpus`).

| artifact | key |
|---|---|
| ``base`` | data (as the base model sees it), model (+ weights file), base training, code |
| ``plans`` | data, attack (+ its files), seed, code; the base key too for an attack that optimises its plan on the base model (``uses_surrogate``) |
| ``train`` | base key, data, model, training, attack, seed, the defense if it trains (+ its files), code |
| ``repair`` | train key, defense (+ its files), data, seed, code |
| ``base_eval`` | base key, data, attack, plan hash, evaluation spec, seed, code |
"""

from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from importlib import metadata
from typing import Any, Mapping

from shieldbench.data.datasets import build_dataset
from shieldbench.errors import UserError
from shieldbench.registry import ATTACKS, DATASETS, DEFENSES, MODELS
from shieldbench.spec import ExperimentSpec, digest


@lru_cache(maxsize=1)
def package_versions() -> dict[str, str]:
    out = {}
    for pkg in ("shieldbench", "torch", "open_clip_torch"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = ""
    return out


@lru_cache(maxsize=64)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    # size and mtime_ns are unused in the body: they are the memo key, so an edited file is hashed again.
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def file_digest(path: str) -> str:
    """SHA-256 of a file's content (memoised per path, size and mtime); "" if it is not a file."""
    if not path or not os.path.isfile(path):
        return ""
    st = os.stat(path)
    return _file_digest(os.path.abspath(path), st.st_size, st.st_mtime_ns)


def option_files(options: Mapping[str, Any]) -> dict[str, str]:
    """Content hashes of the files a plugin's options name (``*_path`` options)."""
    return {k: file_digest(str(v)) for k, v in sorted(options.items()) if k.endswith("_path") and v}


def plugin_version(registry: Any, name: str) -> str:
    try:
        return str(getattr(registry.get(name), "version", ""))
    except UserError:  # not registered (an open_clip architecture is not in the model registry)
        return ""


def data_identity(spec: ExperimentSpec) -> dict[str, Any]:
    """The data spec, the dataset's version and, for a corpus on disk, its manifest's content hash."""
    version = plugin_version(DATASETS, spec.data.dataset)
    content = build_dataset(spec.data, spec.eval).info.get("fingerprint", "") if spec.data.dataset != "synthetic" else ""
    return {"spec": spec.data, "version": version, "content": content}


def model_identity(spec: ExperimentSpec) -> dict[str, Any]:
    m = spec.model
    return {"spec": m, "version": plugin_version(MODELS, m.name) if m.name in MODELS else "",
            "weights": file_digest(m.pretrained)}


def attack_identity(spec: ExperimentSpec) -> dict[str, Any]:
    return {"spec": spec.attack, "version": plugin_version(ATTACKS, spec.attack.name),
            "files": option_files(spec.attack.options)}


def defense_identity(spec: ExperimentSpec) -> dict[str, Any]:
    return {"spec": spec.defense, "version": plugin_version(DEFENSES, spec.defense.name),
            "files": option_files(spec.defense.options)}


def base_key(spec: ExperimentSpec) -> str:
    d = spec.data
    version = plugin_version(DATASETS, d.dataset)
    data_part = {"dataset": d.dataset, "version": version, "seed": d.seed, "image_size": d.image_size,
                 "n_pretrain": d.n_pretrain, "path": d.path}
    return digest({"data": data_part, "model": model_identity(spec), "base": spec.base, "code": package_versions()})


def plan_key(spec: ExperimentSpec) -> str:
    parts = {"data": data_identity(spec), "attack": attack_identity(spec), "seed": spec.seed,
             "code": package_versions()}
    # A plan optimised on the clean base model (BadCLIP's patch) depends on that model too;
    # only such attacks add it, so no other plan's key moves.
    if _attack_uses_surrogate(spec.attack.name):
        parts["surrogate"] = base_key(spec)
    return digest(parts)


def _attack_uses_surrogate(name: str) -> bool:
    try:
        return bool(getattr(ATTACKS.get(name), "uses_surrogate", False))
    except UserError:
        return False


def train_key(spec: ExperimentSpec, defense_trains: bool) -> str:
    defense_part = defense_identity(spec) if defense_trains else {"name": "none", "options": {}}
    return digest({"base": base_key(spec), "data": data_identity(spec), "model": model_identity(spec),
                   "base_spec": spec.base, "train": spec.train, "attack": attack_identity(spec), "seed": spec.seed,
                   "defense": defense_part, "code": package_versions()})


def repair_key(spec: ExperimentSpec, trained_key: str) -> str:
    return digest({"trained": trained_key, "defense": defense_identity(spec), "data": data_identity(spec),
                   "seed": spec.seed, "code": package_versions()})


def base_eval_key(spec: ExperimentSpec, plan_hash: str) -> str:
    return digest({"base": base_key(spec), "data": data_identity(spec), "attack": attack_identity(spec),
                   "plan": plan_hash, "eval": spec.eval, "seed": spec.seed, "code": package_versions()})


__all__ = ["base_eval_key", "base_key", "data_identity", "file_digest", "plan_key", "repair_key", "train_key"]
