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
import importlib
from importlib import metadata
from typing import Callable, Generic, Iterator, TypeVar

from shieldbench.errors import UserError

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> object (usually a class or factory) for one plugin kind."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T | str] = {}
        self._entry_points_loaded = False

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
        existing = self._entries.get(name)
        if existing is not None and not override and existing is not obj:
            # A lazy entry being resolved into its object is not a clash.
            if not (isinstance(existing, str) and not isinstance(obj, str)):
                raise ValueError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = obj

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


def load_plugin(module_name: str) -> None:
    """Import a user module so its ``@register_*`` decorators run (``--plugin``)."""
    try:
        importlib.import_module(module_name)
    except ImportError as exc:
        raise UserError(f"cannot import plugin module {module_name!r}: {exc}") from exc


ATTACKS: Registry = Registry("attacks")
DEFENSES: Registry = Registry("defenses")
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
