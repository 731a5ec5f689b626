"""The experiment specification: frozen, validated, canonically hashed.

An :class:`ExperimentSpec` is built from a preset (``smoke`` or ``small``),
optionally a TOML file, and ``section.key=value`` overrides, in that order.
Every numeric field declares its allowed range and every enumerated field its
choices, so a bad value produces one line naming the field and what is
allowed. Attack- and defense-specific parameters live in ``options`` and are
validated by the plugin itself (see ``Attack.Params`` / ``Defense.Params``).

The spec's canonical JSON (sorted keys, no whitespace) is hashed with SHA-256;
artifacts are keyed by hashes of exactly the sub-specs that determine them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Mapping

from shieldbench.errors import UserError


def _rng(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False) -> dict:
    return {"range": (lo, hi, lo_open)}


def _choices(*values: str) -> dict:
    return {"choices": values}


@dataclass(frozen=True)
class DataSpec:
    dataset: str = "synthetic"
    seed: int = field(default=0, metadata=_rng(0))
    image_size: int = field(default=32, metadata=_rng(8, 1024))
    n_pretrain: int = field(default=12000, metadata=_rng(1))
    n_train: int = field(default=8000, metadata=_rng(1))
    n_clean: int = field(default=2000, metadata=_rng(1))
    n_test_per_class: int = field(default=100, metadata=_rng(1))
    n_retrieval: int = field(default=500, metadata=_rng(1))
    knowledge_k: int = field(default=3, metadata=_rng(1, 16))
    path: str = ""
    """The corpus on disk: a CSV file, a brace-expanded shard list, a COCO or Flickr30k folder."""
    on_error: str = field(default="skip", metadata=_choices("skip", "fail"))
    """An unreadable image (missing, undecodable): left out and counted, or the run fails."""
    csv_img_key: str = "filepath"
    """CSV column of image paths (relative to the CSV file), open_clip_train's default name."""
    csv_caption_key: str = "title"
    """CSV column of captions, open_clip_train's default name."""
    csv_separator: str = "\t"
    """CSV field separator (tab, as open_clip_train)."""
    clean_path: str = ""
    """A separate clean corpus (same format) for repair defenses; "" = n_clean rows drawn from the corpus."""
    annotations: str = ""
    """COCO / Flickr30k: the Karpathy-split JSON (dataset_coco.json / dataset_flickr30k.json); "" = look in data.path."""
    max_rows: int = field(default=0, metadata=_rng(0))
    """Read only the first this many rows of the corpus (0 = all)."""


@dataclass(frozen=True)
class ModelSpec:
    name: str = "tiny-vit"
    pretrained: str = ""
    """An open_clip pretrained tag, a local weights file, or "" (random init)."""


@dataclass(frozen=True)
class TrainSpec:
    """One optimisation phase (the clean base model, or the victim's training)."""

    epochs: int = field(default=3, metadata=_rng(0, 10000))
    batch_size: int = field(default=128, metadata=_rng(2, 65536))
    lr: float = field(default=5e-4, metadata=_rng(0, 1, lo_open=True))
    weight_decay: float = field(default=0.1, metadata=_rng(0, 10))
    warmup_steps: int = field(default=20, metadata=_rng(0))
    min_lr_ratio: float = field(default=0.0, metadata=_rng(0, 1))
    grad_clip: float = field(default=1.0, metadata=_rng(0))
    precision: str = field(default="auto", metadata=_choices("auto", "fp32", "bf16", "fp16"))


@dataclass(frozen=True)
class AttackSpec:
    name: str = "badnets"
    target: str = "banana"
    poison_rate: float | None = field(default=None, metadata=_rng(0, 1))
    """Fraction of training pairs to poison; unset = the preset's default for
    the attack (``DEFAULT_POISON_RATE`` unless PRESET_PLUGIN_DEFAULTS says otherwise)."""
    n_poison: int = field(default=0, metadata=_rng(0))
    """Absolute number of poisons; overrides ``poison_rate`` when positive."""
    mix: str = field(default="auto", metadata=_choices("auto", "replace", "append"))
    caption_source: str = field(default="templates", metadata=_choices("templates", "caption_set"))
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DefenseSpec:
    name: str = "none"
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class EvalSpec:
    batch_size: int = field(default=512, metadata=_rng(1))
    n_backdoor_queries: int = field(default=0, metadata=_rng(0))
    """Triggered queries for Hit@k (0 = every non-target retrieval image)."""
    path: str = ""
    """Zero-shot set on disk: an ImageNet-style folder (one folder per class) or a CSV of image and label."""
    classnames: str = ""
    """Class names: "" = the folder names (ImageNet-1K names for WordNet-id folders), "imagenet", or a file (one per line)."""
    templates: str = "openai"
    """Prompt templates: "openai" (the 80 ImageNet templates), "simple" ("a photo of a {}."), or a file (one per line, with {})."""
    csv_img_key: str = "filepath"
    """Zero-shot / retrieval CSV column of image paths."""
    csv_label_key: str = "label"
    """Zero-shot CSV column of labels (a class index or a class name)."""
    retrieval_path: str = ""
    """Retrieval set for corpora without one: a CSV of image and caption (several rows per image allowed)."""
    max_images: int = field(default=0, metadata=_rng(0))
    """Use only this many zero-shot images, a class-balanced prefix (classes taken round-robin; 0 = all)."""


@dataclass(frozen=True)
class RuntimeSpec:
    """How to run, not what to compute: never part of a cache key or a run id."""

    workers: int = field(default=-1, metadata=_rng(-1, 256))
    """DataLoader worker processes (-1: none for in-memory data, up to 4 for data on disk)."""
    checkpoint_every: int = field(default=0, metadata=_rng(0))
    """Also checkpoint training every this many steps (0: at each epoch's end only)."""
    tracker: str = field(default="none", metadata=_choices("none", "tensorboard"))
    """Log every training's loss terms and learning rate per step (``tensorboard``: under ``runs/<run id>/tensorboard``)."""
    # Speed switches (shieldbench.training.acceleration). At their defaults a training computes
    # exactly what it computed before they existed; the others change numbers only by rounding.
    fused_adamw: bool = True
    """torch's fused AdamW kernel (false: torch's default AdamW, whose rounding differs in the last bits)."""
    channels_last: bool = False
    """Image batches and convolution weights in channels-last layout (ResNet towers on GPUs; rounding-level changes on CPU)."""
    grad_checkpointing: bool = False
    """Recompute each transformer block in the backward pass instead of keeping its activations (less memory, same numbers)."""
    compile: bool = False
    """torch.compile the image tower and the text transformer while training (the first steps compile; rounding-level changes)."""


@dataclass(frozen=True)
class ExperimentSpec:
    preset: str = "small"
    seed: int = field(default=0, metadata=_rng(0))
    data: DataSpec = field(default_factory=DataSpec)
    model: ModelSpec = field(default_factory=ModelSpec)
    base: TrainSpec = field(default_factory=lambda: TrainSpec(epochs=6, lr=1e-3, warmup_steps=50))
    train: TrainSpec = field(default_factory=TrainSpec)
    attack: AttackSpec = field(default_factory=AttackSpec)
    defense: DefenseSpec = field(default_factory=DefenseSpec)
    eval: EvalSpec = field(default_factory=EvalSpec)
    runtime: RuntimeSpec = field(default_factory=RuntimeSpec)

    # -- serialisation --------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return to_plain(self)

    def canonical_json(self) -> str:
        return canonical_json(self.to_dict())

    def hash(self) -> str:
        """Hash of what is computed (the ``runtime`` section is left out)."""
        d = self.to_dict()
        d.pop("runtime", None)
        return digest(d)


SECTIONS = {
    "data": DataSpec,
    "model": ModelSpec,
    "base": TrainSpec,
    "train": TrainSpec,
    "attack": AttackSpec,
    "defense": DefenseSpec,
    "eval": EvalSpec,
    "runtime": RuntimeSpec,
}


def to_plain(obj: Any) -> Any:
    """Dataclasses/mappings/tuples -> JSON-ready builtins (recursively)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_plain(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    return obj


def canonical_json(obj: Any) -> str:
    return json.dumps(to_plain(obj), sort_keys=True, separators=(",", ":"), allow_nan=False)


def digest(obj: Any, length: int = 16) -> str:
    """Stable content hash of a JSON-able object."""
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()[:length]


# -- presets ------------------------------------------------------------------
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # Seconds: for tests. Still real: poisons are present and metrics computed.
    "smoke": {
        "data": {"n_pretrain": 512, "n_train": 384, "n_clean": 128, "n_test_per_class": 10, "n_retrieval": 60},
        "model": {"name": "micro-vit"},
        "base": {"epochs": 2, "batch_size": 64, "lr": 2e-3, "warmup_steps": 2},
        "train": {"epochs": 1, "batch_size": 64, "lr": 1e-3, "warmup_steps": 2},
        "attack": {"poison_rate": 0.05},
        "eval": {"batch_size": 256},
    },
    # The default: embedded world + tiny CLIP on CPU, a run in a few minutes.
    "small": {},
}


DEFAULT_POISON_RATE = 0.02

# Per-preset defaults for plugin parameters, applied under the user's own
# options. Only where a paper default cannot work at the preset's scale; each
# departure is measured and explained in docs/attacks.md. The plugin classes
# (and hence any TOML protocol) keep the papers' values.
PRESET_PLUGIN_DEFAULTS: dict[str, dict[str, dict[str, dict[str, Any]]]] = {
    "small": {
        "attack": {
            # RoCLIP's 100 captions per target would append 1,600 rows to 8,000
            # (20% of the data; the paper's are < 0.1%). Chosen on validation
            # worlds 1 and 2 by a rule fixed beforehand (docs/attacks.md): the
            # fewest of 5, 10, 25, 50, 100 with >= 15/16 targets poisoned on both.
            "targeted": {"num_captions": 25},
            # At 32 px the paper's warp (s = 0.5) moves pixels by about 0.2 px and
            # does not take. Chosen on validation worlds 1 and 2 by a rule fixed
            # beforehand (docs/attacks.md): the first of s = 4, 6, 8, 12 x 5%, 10%
            # poisons (no noise mode) with ASR >= 80% on both worlds. 10% is the
            # WaNet paper's own poison rate.
            "wanet": {"s": 12.0, "cross_ratio": 0.0, "poison_rate": 0.1},
        },
        "defense": {
            # The synthetic world has no scale or translation jitter, so RoCLIP's
            # crops (area 0.08-1) are far out of distribution for a 3-epoch fine-tune.
            # Chosen on validation worlds 1 and 2, clean data (attack none), by the
            # rule "highest mean clean top-1" (docs/baselines.md): crop 0.08 -> 52.1 /
            # 23.3, 0.5 -> 66.8 / 30.2, 1.0 -> 90.1 / 64.4.
            "roclip": {"crop_min_scale": 1.0},
        },
    },
}


def _coerce(value: Any, typ: Any, name: str) -> Any:
    """Parse a CLI/TOML value into the field's type, or raise a UserError."""
    typ_name = typ if isinstance(typ, str) else getattr(typ, "__name__", str(typ))
    typ_name = typ_name.replace(" | None", "")
    try:
        if typ_name in ("int",):
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value) if not isinstance(value, str) else int(value.strip())
        if typ_name in ("float",):
            if isinstance(value, bool):
                raise ValueError
            out = float(value)
            if not math.isfinite(out):  # NaN or +-inf: no option means "unbounded" by infinity
                raise UserError(f"{name}: {value!r} is not a finite number")
            return out
        if typ_name in ("str",):
            # A number is text the user typed (a class named "7"); a list, table or null is not a name or a path.
            if value is None or isinstance(value, (list, tuple, dict, Mapping)):
                raise ValueError
            return str(value)
        if typ_name in ("bool",):
            if isinstance(value, bool):
                return value
            low = str(value).lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError
    except UserError:
        raise
    except (TypeError, ValueError):
        raise UserError(f"{name}: {value!r} is not a valid {typ_name}") from None
    return value


def parse_scalar(text: str) -> Any:
    """``--set`` values: JSON/TOML-ish scalars (1, 0.5, true, "x") or a bare string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        low = text.lower()
        if low in ("true", "false"):
            return low == "true"
        return text


def _check(section_cls: type, name: str, value: Any, where: str) -> Any:
    f = {f.name: f for f in fields(section_cls)}[name]
    value = _coerce(value, f.type, where)
    meta = f.metadata
    if "range" in meta:
        lo, hi, lo_open = meta["range"]
        bad = (lo is not None and (value < lo or (lo_open and value == lo))) or (hi is not None and value > hi)
        if bad:
            lo_s = "-inf" if lo is None else repr(lo)
            hi_s = "inf" if hi is None else repr(hi)
            br = "(" if lo_open else "["
            raise UserError(f"{where}={value!r} is out of range; allowed {br}{lo_s}, {hi_s}]")
    if "choices" in meta and value not in meta["choices"]:
        raise UserError(f"{where}={value!r} is not allowed; choose one of: {', '.join(meta['choices'])}")
    return value


def _build_section(section_cls: type, base: Any, values: Mapping[str, Any], prefix: str) -> Any:
    names = {f.name for f in fields(section_cls)}
    updates: dict[str, Any] = {}
    opts = dict(getattr(base, "options", {}) or {})
    for key, value in values.items():
        if key == "options" and "options" in names:
            if not isinstance(value, Mapping):
                raise UserError(f"{prefix}.options must be a table of key = value")
            opts.update(value)
        elif key in names and key != "options":
            updates[key] = _check(section_cls, key, value, f"{prefix}.{key}")
        elif "options" in names:
            # Plugin-specific parameter: validated by the plugin's Params.
            opts[key] = value
        else:
            raise UserError(f"unknown setting {prefix}.{key}; allowed: {', '.join(sorted(names))}")
    if "options" in names:
        updates["options"] = opts
    return replace(base, **updates)


def merge_tree(tree: dict[str, Any], key: str, value: Any) -> None:
    """Set a dotted key (``section.key``) in a nested dict."""
    parts = key.split(".")
    if len(parts) < 2 and parts[0] not in ("seed", "preset"):
        raise UserError(f"--set {key}: expected section.key=value, sections: {', '.join(SECTIONS)}, or seed")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise UserError(f"--set {key}: {p} is not a section")
    node[parts[-1]] = value


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``--set section.key=value`` items as a nested dict; each key may be given once.

    A repeated key is an error, not "the last one wins": with two values on
    one command line (often one from a script's defaults and one typed) either
    reading is a guess, and the run would be recorded under the one not meant.
    """
    tree: dict[str, Any] = {}
    seen: dict[str, str] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set {item!r}: expected section.key=value")
        key = key.strip()
        if key in seen:
            raise UserError(f"--set {key} is given twice ({seen[key]!r} and {raw.strip()!r}); give each key once")
        seen[key] = raw.strip()
        merge_tree(tree, key, parse_scalar(raw.strip()))
    return tree


def load_toml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file not found: {p}")
    try:
        return tomllib.loads(p.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot parse config file {p}: {exc}") from exc


def build_spec(
    preset: str | None = None,
    config: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> ExperimentSpec:
    """Preset -> TOML file -> overrides, validated at each layer."""
    layers: list[dict[str, Any]] = []
    file_tree = load_toml(config) if config else {}
    over = dict(overrides or {})
    # An explicit --preset beats --set preset=..., which beats the file's; an empty one is an error, not "small".
    given = [p for p in (preset, over.pop("preset", None), file_tree.pop("preset", None)) if p is not None]
    preset = given[0] if given else "small"
    if not isinstance(preset, str) or preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    layers = [PRESETS[preset], file_tree, over]
    spec = ExperimentSpec(preset=preset)
    for layer in layers:
        spec = apply_tree(spec, layer)
    return spec


def apply_tree(spec: ExperimentSpec, tree: Mapping[str, Any]) -> ExperimentSpec:
    updates: dict[str, Any] = {}
    for key, value in tree.items():
        if key == "seed":
            updates["seed"] = _check(ExperimentSpec, "seed", value, "seed")
        elif key == "preset":
            continue
        elif key in SECTIONS:
            if not isinstance(value, Mapping):
                raise UserError(f"[{key}] must be a table")
            updates[key] = _build_section(SECTIONS[key], updates.get(key, getattr(spec, key)), value, key)
        else:
            raise UserError(f"unknown section {key!r}; allowed: seed, {', '.join(SECTIONS)}")
    return replace(spec, **updates)


def spec_from_dict(tree: Mapping[str, Any]) -> ExperimentSpec:
    """Rebuild a spec from its ``to_dict`` form (records, caches)."""
    tree = dict(tree)
    preset = tree.pop("preset", "small")
    return apply_tree(ExperimentSpec(preset=preset), tree)


def validate_options(params_cls: type, options: Mapping[str, Any], prefix: str) -> Any:
    """Build a plugin's ``Params`` dataclass from ``options``, validating each.

    Unknown keys name the allowed ones; values are coerced and range-checked
    with the same rules (field metadata ``range``/``choices``) as the spec.
    """
    names = [f.name for f in fields(params_cls)]
    values: dict[str, Any] = {}
    for key, value in (options or {}).items():
        if key not in names:
            allowed = ", ".join(names) if names else "(none)"
            raise UserError(f"unknown option {prefix}.{key}; allowed: {allowed}")
        values[key] = _check(params_cls, key, value, f"{prefix}.{key}")
    return params_cls(**values)


def keyed_options(params: Any) -> dict[str, Any]:
    """A plugin's resolved options as they enter the spec: every field, except ``added`` ones at their default."""
    out = dataclasses.asdict(params)
    for f in fields(params):
        if f.metadata.get("added") and out[f.name] == f.default:
            del out[f.name]
    return out


def params_schema(params_cls: type) -> list[dict[str, Any]]:
    """What validating a plugin's options needs, as JSON: each field's name, type, default, range, choices.

    Built-in plugins ship this (``shieldbench/builtin_params.json``) so that a
    bad option value is answered before the plugin module (and torch) is imported.
    """
    out = []
    for f in fields(params_cls):
        row: dict[str, Any] = {"name": f.name, "type": f.type if isinstance(f.type, str) else f.type.__name__,
                               "default": f.default}
        if "range" in f.metadata:
            row["range"] = list(f.metadata["range"])
        if "choices" in f.metadata:
            row["choices"] = list(f.metadata["choices"])
        out.append(row)
    return out


def params_from_schema(schema: list[dict[str, Any]], name: str = "Params") -> type:
    """A frozen ``Params`` dataclass equivalent to the one ``schema`` was made from (for validation)."""
    specs = []
    for row in schema:
        meta: dict[str, Any] = {}
        if "range" in row:
            meta["range"] = tuple(row["range"])
        if "choices" in row:
            meta["choices"] = tuple(row["choices"])
        specs.append((row["name"], row["type"], field(default=row["default"], metadata=meta)))
    return dataclasses.make_dataclass(name, specs, frozen=True)


def describe_params(params_cls: type) -> list[dict[str, Any]]:
    """Name, default, allowed values and help of each plugin parameter."""
    out = []
    for f in fields(params_cls):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)  # type: ignore[misc]
        allowed = ""
        if "range" in f.metadata:
            lo, hi, lo_open = f.metadata["range"]
            allowed = f"{'(' if lo_open else '['}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]"
        elif "choices" in f.metadata:
            allowed = " | ".join(f.metadata["choices"])
        out.append({"name": f.name, "default": default, "allowed": allowed, "help": f.metadata.get("help", "")})
    return out


def param(default: Any, help: str = "", *, lo: float | None = None, hi: float | None = None,
          lo_open: bool = False, choices: tuple[str, ...] | None = None, added: bool = False) -> Any:
    """A plugin parameter with its default, allowed values and help text.

    ``added``: an option added to a plugin after runs were recorded, whose
    default reproduces the earlier code exactly. While it is at its default it
    is left out of the resolved spec (:func:`keyed_options`), so run ids and
    cache keys of earlier runs stay valid; any other value is in them as
    usual. Changing such an option's default later moves numbers, so it needs
    the plugin's ``version`` bumped (as any change that moves numbers does).
    """
    meta: dict[str, Any] = {"help": help}
    if added:
        meta["added"] = True
    if choices:
        meta["choices"] = choices
    if lo is not None or hi is not None:
        meta["range"] = (lo, hi, lo_open)
    return field(default=default, metadata=meta)


def derive_seed(master: int, *names: str) -> int:
    """An independent sub-seed for one component (attack plan, trigger, ...)."""
    return int(hashlib.sha256(canonical_json([master, *names]).encode()).hexdigest()[:8], 16)
