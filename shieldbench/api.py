"""The Python API shared by the CLI and notebooks.

    from shieldbench import api
    spec = api.make_spec(attack="badnets", defense="none", preset="smoke")
    record = api.run(spec)

Heavy modules (torch, open_clip, pandas) are imported inside the functions
that need them, so listing plugins and the one-line errors for unknown names
and presets answer without them.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from shieldbench.errors import UserError
from shieldbench.fileio import read_json
from shieldbench.registry import ATTACKS, DATASETS, DEFENSES, KINDS, MODELS, load_plugin
from shieldbench.spec import (DEFAULT_POISON_RATE, PRESET_PLUGIN_DEFAULTS, ExperimentSpec, build_spec, describe_params, load_toml,
                              keyed_options, merge_tree, params_from_schema, parse_overrides,
                              validate_options)

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    from rich.console import Console


def load_plugins(modules: Iterable[str]) -> None:
    for m in modules:
        load_plugin(m)


def make_spec(attack: str | None = None, defense: str | None = None, model: str | None = None,
              dataset: str | None = None, preset: str | None = None, config: str | Path | None = None,
              seed: int | None = None, overrides: list[str] | None = None,
              resolved: bool = True) -> ExperimentSpec:
    """Preset -> config file -> --set overrides -> explicit arguments; names checked.

    The returned spec holds every attack and defense parameter *resolved* (the
    plugin's defaults filled in), so its hash, and every cache key derived from
    it, changes when a default changes: an old result is never silently reused.
    """
    tree = parse_overrides(overrides or [])
    # An unset flag (None) changes nothing: a config file's attack/defense stand unless a flag names another.
    for key, value in (("attack.name", attack), ("defense.name", defense), ("model.name", model),
                       ("data.dataset", dataset), ("seed", seed)):
        if value is not None:
            merge_tree(tree, key, value)
    spec = build_spec(preset, config, tree)
    for reg, name in ((ATTACKS, spec.attack.name), (DEFENSES, spec.defense.name), (DATASETS, spec.data.dataset)):
        if name not in reg:  # before any plugin is imported: an unknown name is answered at once
            raise UserError(reg.unknown_message(name))
    from shieldbench.data.datasets import check_options

    check_options(spec.data.dataset, user_set_keys(load_toml(config) if config else {}, tree))
    return resolve(spec) if resolved else spec


def user_set_keys(*trees: dict[str, Any]) -> dict[str, set[str]]:
    """The ``data.*`` / ``eval.*`` keys a config file or ``--set`` names (the preset's are not counted)."""
    out: dict[str, set[str]] = {"data": set(), "eval": set()}
    for tree in trees:
        for section in out:
            value = tree.get(section)
            if isinstance(value, dict):
                out[section] |= set(value)
    return out


def resolve(spec: ExperimentSpec) -> ExperimentSpec:
    """Check every plugin name and fill in the plugins' default parameters."""
    for reg, name in ((ATTACKS, spec.attack.name), (DEFENSES, spec.defense.name), (DATASETS, spec.data.dataset)):
        if name not in reg:
            raise UserError(reg.unknown_message(name))
    preset = PRESET_PLUGIN_DEFAULTS.get(spec.preset, {})
    attack_defaults = dict(preset.get("attack", {}).get(spec.attack.name, {}))
    rate = attack_defaults.pop("poison_rate", DEFAULT_POISON_RATE)
    if spec.attack.poison_rate is None:
        spec = replace(spec, attack=replace(spec.attack, poison_rate=rate))
    attack_given = {**attack_defaults, **spec.attack.options}
    defense_given = {**preset.get("defense", {}).get(spec.defense.name, {}), **spec.defense.options}
    # Option values first, from the declared schema where there is one: a bad value is one line
    # before any plugin module (and torch) is imported.
    for reg, name, given, prefix in ((ATTACKS, spec.attack.name, attack_given, "attack"),
                                     (DEFENSES, spec.defense.name, defense_given, "defense")):
        schema = reg.params_schema(name)
        if schema is not None:
            validate_options(params_from_schema(schema), given, prefix)
    attack_cls = ATTACKS.get(spec.attack.name)
    defense_cls = DEFENSES.get(spec.defense.name)
    DATASETS.get(spec.data.dataset)
    if spec.model.name not in MODELS:
        import open_clip  # only for a name that is not one of ours

        if spec.model.name not in open_clip.list_models():
            raise UserError(MODELS.unknown_message(spec.model.name) + ", or any open_clip architecture")
    attack_opts = keyed_options(validate_options(attack_cls.Params, attack_given, "attack"))
    defense_opts = keyed_options(defense_cls(replace(spec.defense, options=defense_given)).params)
    return replace(spec, attack=replace(spec.attack, options=attack_opts),
                   defense=replace(spec.defense, options=defense_opts))


def run(spec: ExperimentSpec, results_dir: str | Path = "results", console: Console | None = None,
        show_progress: bool = True, force: bool = False) -> dict[str, Any]:
    """Run one cell, then rebuild the leaderboard from all records (rank 0 under torchrun)."""
    from shieldbench.benchmark import leaderboard
    from shieldbench.benchmark.runner import run_cell
    from shieldbench.training import distributed as D

    record = run_cell(spec, results_dir, console=console, show_progress=show_progress, force=force)
    if D.is_main():
        leaderboard.rebuild(results_dir)
    D.barrier()  # every rank returns once the leaderboard is written
    return record


def dry_run(spec: ExperimentSpec, measure: bool = True) -> dict[str, Any]:
    """Check the spec's data and print-ready stages, steps, memory and time; trains nothing."""
    from shieldbench.benchmark.dryrun import dry_run as _dry_run

    return _dry_run(spec, measure=measure)


def grid_names(kind: str, names: list[str]) -> list[str]:
    """``all`` -> every registered name of ``kind`` (``attacks`` | ``defenses``); other names are checked."""
    reg = KINDS[kind]
    if names == ["all"]:
        return list(reg.names())
    for n in names:
        if n not in reg:  # one line naming the registered names (nothing imported)
            raise UserError(reg.unknown_message(n))
    return names


def grid_cells(base: ExperimentSpec, attacks: list[str], defenses: list[str], seeds: list[int]) -> list[ExperimentSpec]:
    from shieldbench.benchmark.grid import expand

    return [resolve(cell) for cell in expand(base, attacks, defenses, seeds)]


def run_grid(base: ExperimentSpec, attacks: list[str], defenses: list[str], seeds: list[int],
             results_dir: str | Path = "results", console: Console | None = None,
             show_progress: bool = True, workers: int = 1, force: bool = False,
             plugins: Iterable[str] = (), executor: str = "local",
             slurm: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every attack x defense x seed cell; finished cells are reused, not retrained.

    ``workers`` > 1 runs the cells on that many processes (``plugins`` are
    imported in each); ``executor="slurm"`` submits job arrays through
    submitit with the ``slurm`` options (partition, gpus_per_job,
    cpus_per_job, time_min, parallelism); shared stages are still built once.
    """
    from shieldbench.benchmark.grid import run_grid as _run_grid

    return _run_grid(grid_cells(base, attacks, defenses, seeds), results_dir, console=console,
                     show_progress=show_progress, workers=workers, force=force, plugins=list(plugins),
                     executor=executor, slurm=slurm)


def plan_grid(base: ExperimentSpec, attacks: list[str], defenses: list[str], seeds: list[int],
              results_dir: str | Path = "results", force: bool = False) -> Any:
    """The grid's stages (each shared one once), cached or to run; runs nothing."""
    from shieldbench.benchmark.stages import plan_grid as _plan_grid

    return _plan_grid(grid_cells(base, attacks, defenses, seeds), results_dir, force=force)


def write_report(results_dir: str | Path = "results") -> Path:
    from shieldbench.benchmark.report import write_report as _write

    read_leaderboard(results_dir)  # one clear line if there is none
    return _write(results_dir)


def rebuild_leaderboard(results_dir: str | Path = "results") -> tuple["pd.DataFrame", "pd.DataFrame"]:
    from shieldbench.benchmark import leaderboard

    return leaderboard.rebuild(results_dir)


def read_leaderboard(results_dir: str | Path = "results") -> "pd.DataFrame":
    import pandas as pd

    path = Path(results_dir) / "leaderboard.csv"
    if not path.is_file():
        raise UserError(f"no leaderboard at {path}; run `shieldbench run` first")
    try:
        df = pd.read_csv(path)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        raise UserError(f"corrupt leaderboard file {path}: {exc}") from exc
    missing = [c for c in ("attack", "defense", "model", "preset", "n_seeds") if c not in df.columns]
    if missing:
        raise UserError(f"corrupt leaderboard file {path}: no {missing[0]!r} column (delete it and run "
                        f"`shieldbench leaderboard` to rebuild it from the records)")
    return df


def read_record(path: str | Path) -> dict[str, Any]:
    return read_json(path)


def _rounded(value: Any) -> Any:
    """A default as a person reads it: 0.0784313725 -> 0.0784."""
    return float(f"{value:.4g}") if isinstance(value, float) else value


def list_plugins(kind: str, verbose: bool = False, preset: str = "small") -> list[dict[str, Any]]:
    """The registered plugins of ``kind``; ``verbose``: their parameters with ``preset``'s effective defaults."""
    from shieldbench.spec import PRESETS

    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    if kind not in KINDS:
        raise UserError(f"unknown kind {kind!r}; choose one of: {', '.join(KINDS)}")
    reg = KINDS[kind]
    rows = []
    for name in reg.names():
        # Without --verbose nothing is imported: built-ins declare what is listed (builtins.py).
        row: dict[str, Any] = {"name": name, **reg.metadata(name, load=verbose)}
        if not verbose:
            rows.append(row)
            continue
        obj = reg.get(name)
        if hasattr(obj, "Params"):
            section = {"attacks": "attack", "defenses": "defense"}.get(kind, "")
            overrides = PRESET_PLUGIN_DEFAULTS.get(preset, {}).get(section, {}).get(name, {})
            row["params"] = []
            for p in describe_params(obj.Params):
                p["preset"] = p["name"] in overrides  # the preset departs from the plugin's own default
                p["default"] = _rounded(overrides.get(p["name"], p["default"]))
                row["params"].append(p)
        if verbose and isinstance(getattr(obj, "uses", None), dict):  # a dataset: the options it reads
            row["options"] = [f"{sec}.{k}" for sec in ("data", "eval") for k in sorted(obj.uses[sec]) if k != "dataset"]
        rows.append(row)
    return rows
