"""One generic registry for every kind of plugin.

Attacks, defenses, models, datasets and knowledge sources are all looked up by
name in a :class:`Registry`. An entry can be

- registered in code with the decorator ``@REGISTRY.register("name")``;
- a lazy ``"module:attr"`` string, imported only when first used (so listing
  plugins does not import torch-heavy modules);
- discovered from the entry-point group ``shieldbench.<kind>`` of any installed
  package (scanned on first lookup);
- added by importing a module named with ``--plugin`` (:func:`load_plugin`).

An unknown name raises :class:`~shieldbench.errors.UserError` that lists the
registered names and suggests the closest one, in the style of
lm-evaluation-harness and timm.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import os
import sys
from importlib import metadata
from pathlib import Path
from typing import Callable, Generic, Iterator, TypeVar

from shieldbench.errors import UserError

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> object (usually a class or factory) for one plugin kind."""

    def __init__(self, kind: str, base: str = "") -> None:
        self.kind = kind
        # "module:Class" every registered class must subclass (checked on registration and on first lookup
        # of a lazy or entry-point entry), so a wrong class fails with one line, not a later AttributeError.
        self.base = base
        self._entries: dict[str, T | str] = {}
        self._metadata: dict[str, dict[str, str]] = {}
        self._schemas: dict[str, list[dict]] = {}
        self._entry_points_loaded = False

    def _check(self, name: str, obj: object) -> None:
        if not self.base or not isinstance(obj, type):
            return
        base = _import_attr(self.base, f"the {self.kind} base class")
        if not issubclass(obj, base):  # type: ignore[arg-type]
            raise UserError(f"{self.kind[:-1]} {name!r}: {obj.__module__}.{obj.__qualname__} is not a subclass of "
                            f"{self.base.replace(':', '.')}")

    # -- registration -------------------------------------------------------
    def register(self, name: str, *, override: bool = False) -> Callable[[T], T]:
        """Decorator: register ``obj`` under ``name``."""

        def deco(obj: T) -> T:
            self.add(name, obj, override=override)
            return obj

        return deco

    def add(self, name: str, obj: T | str, *, override: bool = False) -> None:
        """Register ``obj`` (or a lazy ``"module:attr"`` string) as ``name``."""
        if not name or not name.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"invalid {self.kind} name {name!r}")
        if not isinstance(obj, str):
            self._check(name, obj)
        existing = self._entries.get(name)
        if existing is not None and not override and existing is not obj:
            # A lazy entry being resolved into its object is not a clash.
            if not (isinstance(existing, str) and not isinstance(obj, str)):
                raise ValueError(f"{self.kind} {name!r} is already registered")
        elif existing is not None and override:
            # Another object under the same name: what was declared for the old one no longer holds.
            self._schemas.pop(name, None)
        self._entries[name] = obj

    def set_metadata(self, name: str, meta: dict[str, str]) -> None:
        """What listing shows for a lazy entry (description, paper, threat model) without importing it."""
        self._metadata[name] = dict(meta)

    def set_params_schema(self, name: str, schema: list[dict]) -> None:
        """The options' schema (:func:`shieldbench.spec.params_schema`) of a lazy entry, to validate without importing it."""
        self._schemas[name] = list(schema)

    def params_schema(self, name: str) -> list[dict] | None:
        """The declared options' schema of ``name``, or None (then only the class itself can validate)."""
        return self._schemas.get(name)

    def metadata(self, name: str, load: bool = False) -> dict[str, str]:
        """Description (and paper, threat model) of ``name``.

        From the declared metadata of a lazy entry, else from the object
        itself when it is already imported or ``load`` is set; otherwise only
        where it comes from (an entry point that has not been imported yet).
        """
        self._load_entry_points()
        if name not in self._entries:
            raise UserError(self.unknown_message(name))
        obj = self._entries[name]
        if isinstance(obj, str) and not load:
            return dict(self._metadata.get(name) or {"description": f"(plugin {obj}; `list -v` imports it)"})
        obj = self.get(name)
        describe = getattr(obj, "describe", None)
        doc = ((obj.__doc__ or "").strip().splitlines() or [""])[0]
        meta = {"description": describe() if callable(describe) else doc}
        for attr in ("threat_model", "paper"):
            if hasattr(obj, attr):
                meta[attr] = getattr(obj, attr)
        return meta

    # -- lookup -------------------------------------------------------------
    def _load_entry_points(self) -> None:
        if self._entry_points_loaded:
            return
        self._entry_points_loaded = True
        for ep in metadata.entry_points(group=f"shieldbench.{self.kind}"):
            if ep.name not in self._entries:
                self._entries[ep.name] = ep.value

    def names(self) -> list[str]:
        self._load_entry_points()
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        self._load_entry_points()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def get(self, name: str) -> T:
        """The object registered as ``name``; a did-you-mean UserError if none."""
        self._load_entry_points()
        if name not in self._entries:
            raise UserError(self.unknown_message(name))
        obj = self._entries[name]
        if isinstance(obj, str):
            obj = _import_attr(obj, f"{self.kind} {name!r}")
            self._check(name, obj)
            self._entries[name] = obj
        return obj  # type: ignore[return-value]

    def unknown_message(self, name: str) -> str:
        names = self.names()
        close = difflib.get_close_matches(name, names, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        return f"unknown {self.kind[:-1] if self.kind.endswith('s') else self.kind} {name!r}.{hint} Registered: {', '.join(names)}"


def _import_attr(target: str, what: str) -> object:
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
        return getattr(module, attr) if attr else module
    except (ImportError, AttributeError) as exc:
        raise UserError(f"cannot load {what} from {target!r}: {exc}") from exc


def load_plugin(target: str) -> None:
    """Import a user module so its ``@register_*`` decorators run (``--plugin``).

    ``target`` is a module name (the working directory is on the path, as for
    ``python -m``) or the path of a ``.py`` file. Whatever the plugin raises on
    import (a syntax error, a missing dependency, its own exception) is one
    line naming the plugin and the error.
    """
    if not target or not target.strip():
        raise UserError("--plugin: give a module name or the path of a .py file")
    path = Path(target)
    try:
        if target.endswith(".py") or path.is_file():
            if not path.is_file():
                raise UserError(f"plugin file not found: {path}")
            # One module name per file, so importing it twice (e.g. in a grid worker) is a no-op.
            name = "shieldbench_plugin_" + hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
            if name in sys.modules:
                return
            spec = importlib.util.spec_from_file_location(name, path)
            if spec is None or spec.loader is None:
                raise UserError(f"cannot import plugin file {path}: not a Python module")
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            try:
                spec.loader.exec_module(module)
            except BaseException:
                del sys.modules[name]
                raise
        else:
            if os.getcwd() not in sys.path and "" not in sys.path:
                sys.path.insert(0, os.getcwd())
            importlib.import_module(target)
    except UserError:
        raise
    except Exception as exc:
        detail = str(exc).splitlines()[0] if str(exc) else ""
        raise UserError(f"plugin {target!r} failed on import: {type(exc).__name__}: {detail}") from exc


ATTACKS: Registry = Registry("attacks", base="shieldbench.attacks.base:Attack")
DEFENSES: Registry = Registry("defenses", base="shieldbench.defenses.base:Defense")
MODELS: Registry = Registry("models")
DATASETS: Registry = Registry("datasets")
KNOWLEDGE: Registry = Registry("knowledge")

KINDS: dict[str, Registry] = {
    "attacks": ATTACKS,
    "defenses": DEFENSES,
    "models": MODELS,
    "datasets": DATASETS,
    "knowledge": KNOWLEDGE,
}


def register_attack(name: str) -> Callable:
    return ATTACKS.register(name)


def register_defense(name: str) -> Callable:
    return DEFENSES.register(name)


def register_model(name: str) -> Callable:
    return MODELS.register(name)


def register_dataset(name: str) -> Callable:
    return DATASETS.register(name)


def register_knowledge(name: str) -> Callable:
    return KNOWLEDGE.register(name)
