"""The ``shieldbench`` command line (Typer + rich). Thin: parse, build a spec, call the API.

Every user error is one line on stderr and exit code 2.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.markup import escape as rich_escape
from rich.table import Table

from shieldbench.errors import UserError
from shieldbench.knowledge.cli import knowledge_app

app = typer.Typer(
    help="Backdoor and poisoning attacks on CLIP, and the defenses against them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(knowledge_app, name="knowledge", help="Extract knowledge elements (Semantic Shield) with a language model.")
out = Console()
err = Console(stderr=True)


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        out.print(f"shieldbench {version('shieldbench')}", highlight=False)
        raise typer.Exit()


@app.callback()
def _root(
    show_version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                      help="print the version and exit"),
) -> None:
    """Backdoor and poisoning attacks on CLIP, and the defenses against them."""


DEFAULT_METRICS = "clean_top1,asr,asr_base_model,asr_before_repair,hit@1,i2t_R@1,poison_success,cost_train_s"


def _pct(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{100 * float(v):.1f}%"


def metrics_table(record: dict[str, Any]) -> Table:
    m = record.get("metrics", {})
    before = record.get("metrics_before_repair") or {}
    t = Table(title=f"{record['attack']} x {record['defense']}  ({record['model']}, {record['dataset']}, {record['preset']}, seed {record['seed']})")
    t.add_column("metric")
    t.add_column("value", justify="right")
    if before:
        t.add_column("before repair", justify="right")

    def row(name: str, key: str, fmt=_pct, extra: str = "") -> None:
        if key not in m:
            return
        cells = [name, fmt(m[key]) + extra]
        if before:
            cells.append(fmt(before.get(key)))
        t.add_row(*cells)

    row("clean top-1", "clean_top1")
    row("clean top-5", "clean_top5")
    if "asr" in m:
        ci = f"  [{_pct(m['asr_ci_low'])}, {_pct(m['asr_ci_high'])}]"
        row("attack success (top-1)", "asr", extra=ci)
        row("  same trigger, clean base model", "asr_base_model")
        row("robust accuracy", "robust_acc")
        for k in (1, 5, 10):
            row(f"backdoor Hit@{k}", f"hit@{k}")
    if "poison_success" in m:
        ci = f"  [{_pct(m['poison_success_ci_low'])}, {_pct(m['poison_success_ci_high'])}]"
        row("poisoning success (top-1)", "poison_success", extra=ci)
        row("  clean base model", "poison_success_base_model")
        row("target image Hit@1 (text->image)", "poison_hit@1")
    for d in ("i2t", "t2i"):
        for k in (1, 5, 10):
            row(f"{d} Recall@{k}", f"{d}_R@{k}")
    tm = record.get("timings", {})
    if tm.get("prepare_s", 0) >= 0.05:  # a defense that works on the data before training (a detector's warm-up)
        t.add_row("defense preparation", f"{tm['prepare_s']:.1f} s")
    t.add_row("train time", f"{tm.get('train_s', 0):.1f} s")
    if "repair_s" in tm:
        t.add_row("repair time", f"{tm.get('repair_s', 0):.1f} s")
    t.add_row("total time", f"{tm.get('total_s', 0):.1f} s")
    t.add_row("peak memory", f"{record.get('peak_memory_mb', 0):.0f} MiB")
    plan = record.get("plan", {})
    if plan:
        t.add_row("poisons", f"{plan.get('n_poisoned')} of {plan.get('n_train')} pairs")
    return t


@app.command()
def run(
    attack: Optional[str] = typer.Option(None, "--attack", "-a", help="attack name (default: the config's, else badnets; see `shieldbench list attacks`)"),
    defense: Optional[str] = typer.Option(None, "--defense", "-d", help="defense name (default: the config's, else none; see `shieldbench list defenses`)"),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="model name (default: the preset's)"),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="synthetic (default) | csv | webdataset | coco | flickr30k "
                                          "(with --set data.path=...)"),
    preset: Optional[str] = typer.Option(None, "--preset", "-p", help="smoke | small (default small)"),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="TOML experiment file"),
    seed: Optional[int] = typer.Option(None, "--seed", "-s", help="master seed"),
    set_: list[str] = typer.Option([], "--set", help="override, e.g. --set train.epochs=5 --set attack.size=6"),
    tracker: Optional[str] = typer.Option(None, "--tracker", help="none | tensorboard: log every training's loss "
                                          "terms and LR per step under RESULTS/runs/<run id>/tensorboard"),
    plugin: list[str] = typer.Option([], "--plugin", help="import a module that registers plugins"),
    results: Path = typer.Option(Path("results"), "--results", "-o", help="results folder"),
    force: bool = typer.Option(False, "--force", help="re-evaluate even if a finished record exists"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars"),
    as_json: bool = typer.Option(False, "--json", help="print the record as JSON instead of a table"),
    dry_run: bool = typer.Option(False, "--dry-run", help="check the spec and every data path, print the stages, "
                                 "steps, memory and time estimate; train nothing"),
) -> None:
    """Train under one attack and defense, evaluate, record, update the leaderboard.

    Examples:

      shieldbench run --attack badnets --defense none

      shieldbench run -a wanet -d semantic_shield --seed 1

      shieldbench run -a blended -d none --preset smoke --set attack.poison_rate=0.05

      shieldbench run -c configs/semantic_shield_coco.toml --set data.path=/data/coco --dry-run
    """
    from shieldbench import api

    if tracker is not None:
        set_ = [*set_, f"runtime.tracker={tracker}"]
    _results_folder(results)
    api.load_plugins(plugin)
    spec = api.make_spec(attack=attack, defense=defense, model=model, dataset=dataset, preset=preset,
                         config=config, seed=seed, overrides=set_)
    from shieldbench.training import distributed as D  # imports torch: after the spec's one-line errors

    if D.env_world_size() > 1 and not dry_run:
        # Under torchrun: one process per device; rank 0 prints and writes (see docs/scaling.md).
        D.init_from_env()
        if not D.is_main():
            try:
                record = api.run(spec, results, console=err, show_progress=False, force=force)
            finally:
                D.shutdown()
            raise typer.Exit(0 if record["status"] == "ok" else 1)
    if dry_run and D.env_world_size() > 1 and os.environ.get("RANK", "0") != "0":
        return  # one plan is printed, by rank 0
    if dry_run:
        report = api.dry_run(spec)
        if as_json:
            out.print_json(json.dumps(report, default=str))
        else:
            print_dry_run(spec, report)
        return
    if not quiet:
        with err.status("[dim]importing torch and open_clip[/dim]", spinner="dots"):  # seconds of silence otherwise
            import shieldbench.benchmark.runner  # noqa: F401
    try:
        record = api.run(spec, results, console=err, show_progress=not quiet, force=force)
    finally:
        D.shutdown()  # a no-op in one process
    if as_json:
        out.print_json(json.dumps(record, default=str))
    else:
        out.print(metrics_table(record))
        out.print(f"record: {results / 'runs' / record['run_id'] / 'record.json'}")
        if record.get("reused_record"):
            out.print("(finished earlier: reused its record; --force to re-run)")
    if record["status"] != "ok":
        err.print(f"[red]run {record['status']}:[/red] {record.get('error', '')}", highlight=False)
        raise typer.Exit(1)


def print_dry_run(spec: Any, report: dict[str, Any]) -> None:
    out.print(f"[bold]{spec.attack.name} x {spec.defense.name}[/bold]  model {spec.model.name}"
              f"{' (' + spec.model.pretrained + ')' if spec.model.pretrained else ''}, dataset {spec.data.dataset}, "
              f"preset {spec.preset}, seed {spec.seed}, spec {report['spec_hash'][:8]}")
    out.print(f"weights: {report['weights']}")
    t = Table(title="data (a sample of each split decoded)")
    for c in ("split", "rows", "on disk", "sample unreadable"):
        t.add_column(c)
    for d in report["data"]:
        t.add_row(d["split"], str(d["rows"]), "yes" if d["on_disk"] else "no",
                  f"{d['unreadable']} of {d['checked']}" + (f": {d['first_error']}" if d["first_error"] else ""))
    out.print(t)
    st = Table(title="stages")
    for c in ("stage", "what", "steps", "batch"):
        st.add_column(c)
    for s in report["stages"]:
        st.add_row(s["stage"], s["what"], str(s["steps"]), str(s.get("batch", "")))
    out.print(st)
    c = report.get("cost")
    if c:
        out.print(f"model: {c['params_m']:.1f} M parameters; weights + grads + AdamW moments {c['weights_optimizer_gib']:.2f} GiB "
                  f"(activations not included)")
        out.print(f"time here ({c['device_here']}): {c['step_s_here']:.2f} s per step -> {c['total_h_here']:.2f} h for "
                  f"{c['total_steps']} steps (steps at batch {c['measured_at_batches'][0]} and {c['measured_at_batches'][1]} timed, "
                  f"extrapolated linearly)")
        out.print(f"compute: {c['tflops_per_step']:.2f} TFLOP per step (counted) -> {c['gpu_h_at_assumed_throughput']:.2f} GPU h "
                  f"at an assumed {c['assumed_gpu_tflops']:.0f} TFLOP/s sustained (an assumption, not a measurement)")
    out.print("dry run: nothing was trained")


def _results_folder(results: Path) -> Path:
    """--results must be a folder (or not exist yet): checked before anything is trained or written."""
    if results.exists() and not results.is_dir():
        raise UserError(f"--results {results}: exists and is not a folder")
    return results


def _names(text: str, what: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise UserError(f"--{what}: give at least one name, comma-separated")
    return names


@app.command()
def grid(
    attacks: str = typer.Option("none,badnets", "--attacks", help="comma-separated attack names, or all"),
    defenses: str = typer.Option("none", "--defenses", help="comma-separated defense names, or all"),
    seeds: str = typer.Option("0", "--seeds", help="comma-separated seeds, e.g. 0,1,2"),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="model name (default: the preset's)"),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="dataset name (default: the config's, else synthetic)"),
    preset: Optional[str] = typer.Option(None, "--preset", "-p", help="smoke | small (default small)"),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="TOML experiment file"),
    set_: list[str] = typer.Option([], "--set", help="override applied to every cell"),
    tracker: Optional[str] = typer.Option(None, "--tracker", help="none | tensorboard (see `run --help`)"),
    plugin: list[str] = typer.Option([], "--plugin", help="import a module that registers plugins"),
    results: Path = typer.Option(Path("results"), "--results", "-o", help="results folder"),
    workers: int = typer.Option(1, "--workers", "-w", help="worker processes (one GPU each when there are GPUs)"),
    executor: str = typer.Option("local", "--executor", help="local (this machine, --workers processes) | slurm "
                                 "(job arrays through submitit) | submitit-local (the slurm path run here, for testing)"),
    slurm_partition: str = typer.Option("", "--slurm-partition", help="Slurm partition (default: the cluster's)"),
    slurm_gpus_per_job: int = typer.Option(1, "--slurm-gpus-per-job", help="GPUs per job; above 1 a cell trains "
                                           "data-parallel on them (one task per GPU)"),
    slurm_cpus_per_job: int = typer.Option(8, "--slurm-cpus-per-job", help="CPUs per job"),
    slurm_time: int = typer.Option(720, "--slurm-time", help="time limit per job, minutes"),
    slurm_parallelism: int = typer.Option(64, "--slurm-parallelism", help="most jobs of an array running at once"),
    force: bool = typer.Option(False, "--force", help="re-run cells that have a finished record (artifacts are reused)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the plan (stages needed, cached, to run); run nothing"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars"),
) -> None:
    """Run every attack x defense x seed cell, then write the leaderboard and report.

    Finished cells are reused (re-running a grid after a crash resumes it), the
    clean base model is trained once, and post-training defenses (CleanCLIP)
    repair the `none` cell's checkpoint instead of retraining. With --workers N
    the cells run on N processes, with --executor slurm as Slurm job arrays
    (submitit); shared stages are still built once (each artifact has a
    lock), and two grids on one results folder are safe.

    Examples:

      shieldbench grid --attacks badnets,blended --defenses none,semantic_shield --seeds 0,1,2

      shieldbench grid --attacks all --defenses all --seeds 0,1,2 --workers 8 --dry-run

      shieldbench grid --attacks all --defenses all --seeds 0,1,2 --executor slurm --slurm-partition gpu

      shieldbench grid --preset smoke --attacks none,badnets --defenses none
    """
    from shieldbench import api

    if workers < 1:
        raise UserError(f"--workers {workers}: must be >= 1")
    if executor not in ("local", "slurm", "submitit-local"):
        raise UserError(f"--executor {executor!r}: choose one of local, slurm, submitit-local")
    for flag, value in (("--slurm-time", slurm_time), ("--slurm-cpus-per-job", slurm_cpus_per_job),
                        ("--slurm-parallelism", slurm_parallelism)):
        if value < 1:
            raise UserError(f"{flag} {value}: must be >= 1")
    if not 0 <= slurm_gpus_per_job <= 64:
        raise UserError(f"--slurm-gpus-per-job {slurm_gpus_per_job}: must be 0 (CPU jobs) to 64; with more than one, "
                        f"each cell trains data-parallel on the job's GPUs")
    if slurm_gpus_per_job > 1 and executor == "local":
        raise UserError("--slurm-gpus-per-job > 1 needs --executor slurm or submitit-local; locally, run one cell "
                        "data-parallel with `torchrun --nproc_per_node=N -m shieldbench run ...`")
    if os.environ.get("WORLD_SIZE", "1") not in ("", "1"):
        raise UserError("grid does not run under torchrun: use --workers N (one GPU per cell), --executor slurm "
                        "--slurm-gpus-per-job N (each cell data-parallel), or torchrun with `shieldbench run`")
    api.load_plugins(plugin)
    try:
        seed_list = [int(s) for s in _names(seeds, "seeds")]
    except ValueError:
        raise UserError(f"--seeds {seeds!r}: expected comma-separated integers") from None
    if any(s < 0 for s in seed_list):  # as `run --seed` says
        raise UserError(f"--seeds {seeds!r}: a seed is out of range; allowed [0, inf]")
    _results_folder(results)
    # Unresolved: each cell fills in its own attack's and defense's defaults.
    if tracker is not None:
        set_ = [*set_, f"runtime.tracker={tracker}"]
    # Names first: an unknown one is answered before anything heavy is imported.
    attack_names, defense_names = api.grid_names("attacks", _names(attacks, "attacks")), api.grid_names("defenses", _names(defenses, "defenses"))
    base = api.make_spec(model=model, dataset=dataset, preset=preset, config=config, overrides=set_, resolved=False)
    if dry_run:
        print_grid_plan(api.plan_grid(base, attack_names, defense_names, seed_list, results, force=force), workers)
        return
    slurm = {"partition": slurm_partition, "gpus_per_job": slurm_gpus_per_job, "cpus_per_job": slurm_cpus_per_job,
             "time_min": slurm_time, "parallelism": slurm_parallelism}
    records = api.run_grid(base, attack_names, defense_names, seed_list, results, console=err,
                           show_progress=not quiet, workers=workers, force=force, plugins=plugin,
                           executor=executor, slurm=slurm if executor != "local" else None)
    failed = [r for r in records if r["status"] != "ok"]
    report = api.write_report(results)
    out.print(f"{len(records) - len(failed)} of {len(records)} cells ok; leaderboard: {results / 'leaderboard.csv'}; report: {report}")
    leaderboard(results=results, metrics=DEFAULT_METRICS, attacks="", defenses="", setting="", fmt="table", rebuild=False)
    if failed:
        raise typer.Exit(1)


def print_grid_plan(plan: Any, workers: int) -> None:
    t = Table(title=f"grid plan: {plan.cells} cells, {len(plan.finished)} finished (reused)")
    for col in ("stage", "needed", "cached", "to run"):
        t.add_column(col, justify="left" if col == "stage" else "right")
    for row in plan.summary():
        t.add_row(row["stage"], str(row["needed"]), str(row["cached"]), str(row["to_run"]))
    out.print(t)
    out.print(f"{plan.trainings} training runs will run (clean base models, victims and repairs not in the store), "
              f"on {workers} worker{'s' if workers > 1 else ''}; dry run: nothing was run")


@app.command()
def report(
    results: Path = typer.Option(Path("results"), "--results", "-o", help="results folder"),
) -> None:
    """Write results/report/index.html: what was run, the leaderboard (mean ± std), ASR heatmap, CA-vs-ASR plot, attention maps.

    Examples:

      shieldbench report -o results
    """
    from shieldbench import api

    _results_folder(results)
    if (results / "runs").is_dir():
        api.rebuild_leaderboard(results)
    out.print(f"report: {api.write_report(results)}")


@app.command("list")
def list_cmd(
    kind: str = typer.Argument("attacks", help="attacks | defenses | models | datasets | knowledge"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="show parameters with defaults and meaning"),
    preset: str = typer.Option("small", "--preset", "-p", help="smoke | small: whose effective defaults -v shows"),
    plugin: list[str] = typer.Option([], "--plugin", help="import a module that registers plugins"),
) -> None:
    """List registered plugins of one kind.

    Examples:

      shieldbench list attacks --verbose

      shieldbench list defenses
    """
    from shieldbench import api

    api.load_plugins(plugin)
    rows = api.list_plugins(kind, verbose, preset)
    t = Table(title=kind)
    t.add_column("name", style="bold")
    for col in ("threat_model", "paper"):
        if any(col in r for r in rows):
            t.add_column(col.replace("_", " "))
    t.add_column("description")
    for r in rows:
        cells = [r["name"]]
        for col in ("threat_model", "paper"):
            if any(col in x for x in rows):
                cells.append(str(r.get(col, "")))
        cells.append(r["description"])
        t.add_row(*cells)
    out.print(t)
    if verbose:
        for r in rows:
            if r.get("options"):
                out.print(f"[bold]{r['name']}[/bold] reads: {', '.join(r['options'])}")
            if r.get("params"):
                pt = Table(title=f"{r['name']} parameters (--set {'attack' if kind == 'attacks' else 'defense'}.NAME=VALUE); "
                                 f"defaults of the {preset} preset, * = the preset's own")
                for c in ("name", "default", "allowed", "help"):
                    pt.add_column(c)
                for p in r["params"]:
                    pt.add_row(p["name"], repr(p["default"]) + (" *" if p.get("preset") else ""), p["allowed"], p["help"])
                out.print(pt)
    if kind == "models":
        out.print("Any open_clip architecture name also works (e.g. ViT-B-32, RN50), with --set model.pretrained=TAG|FILE.")


@app.command()
def leaderboard(
    results: Path = typer.Option(Path("results"), "--results", "-o", help="results folder"),
    metrics: str = typer.Option(DEFAULT_METRICS, help="comma-separated metrics"),
    attacks: str = typer.Option("", help="only these attacks, in this order (comma-separated)"),
    defenses: str = typer.Option("", help="only these defenses, in this order (comma-separated)"),
    setting: str = typer.Option("", help="only settings whose label contains one of these texts (comma-separated; "
                                "'-' = no label)"),
    fmt: str = typer.Option("table", "--format", help="table (terminal) | markdown (docs) | latex (papers, booktabs) | csv"),
    rebuild: bool = typer.Option(True, help="rebuild the CSVs from the records first"),
) -> None:
    """Show the leaderboard (mean +- std over seeds) as a table.

    One row per experiment setting: runs that differ in more than the seed
    (a defense variant, an attack option) are separate rows, labelled by what
    differs. Fractions are in percent; n is the number of seeds.

    Examples:

      shieldbench leaderboard

      shieldbench leaderboard --metrics clean_top1,asr --results my_results

      shieldbench leaderboard --attacks badnets,wanet --defenses none,semantic_shield --format markdown
    """
    from shieldbench import api
    from shieldbench.benchmark.tables import SMOKE_NOTE, cell, filter_rows, latex, markdown

    if fmt == "md":
        fmt = "markdown"
    if fmt not in ("table", "markdown", "latex", "csv"):
        raise UserError(f"--format {fmt!r}: choose table, markdown (md), latex or csv")
    _results_folder(results)
    if rebuild and (results / "runs").is_dir():
        api.rebuild_leaderboard(results)
    df = api.read_leaderboard(results)
    split = lambda text: [x.strip() for x in text.split(",") if x.strip()]  # noqa: E731
    df = filter_rows(df, split(attacks), split(defenses), split(setting))
    wanted = split(metrics)
    unknown = [m for m in wanted if f"{m}_mean" not in df.columns]
    if unknown and metrics != DEFAULT_METRICS:  # the default list names metrics some results do not have
        have = sorted(c.removesuffix("_mean") for c in df.columns if c.endswith("_mean"))
        raise UserError(f"--metrics: no metric {unknown[0]!r} in this leaderboard; it has: {', '.join(have)}")
    smoke = "preset" in df.columns and df["preset"].astype(str).eq("smoke").any()
    if fmt in ("markdown", "latex"):
        # stdout stays pasteable; the note goes to stderr.
        text = markdown(df, wanted) if fmt == "markdown" else latex(df, wanted)
        out.print(text, end="", markup=False, highlight=False, soft_wrap=True)
        if smoke:
            err.print(f"note: {SMOKE_NOTE}", highlight=False, soft_wrap=True)
        return
    if fmt == "csv":
        sys.stdout.write(df.to_csv(index=False))
        return
    t = Table(title=f"leaderboard ({results / 'leaderboard.csv'})")
    has_setting = "setting" in df.columns and df["setting"].fillna("").astype(str).str.len().gt(0).any()
    for c in ("attack", "defense", *(["setting"] if has_setting else []), "model", "preset", "n_seeds"):
        t.add_column(c)
    shown = [m for m in wanted if f"{m}_mean" in df.columns]
    for m in shown:
        t.add_column(m, justify="right")
    for _, r in df.iterrows():
        setting_label = r.get("setting")
        setting_label = "" if setting_label is None or (isinstance(setting_label, float) and math.isnan(setting_label)) \
            else str(setting_label)
        cells = [str(r["attack"]), str(r["defense"]), *([setting_label] if has_setting else []), str(r["model"]),
                 str(r["preset"]), str(r["n_seeds"])]
        t.add_row(*cells, *[cell(r, m) for m in shown])
    out.print(t)
    if smoke:
        out.print(f"[yellow]note:[/yellow] {SMOKE_NOTE}", highlight=False)


def _on_interrupt(signum: int, frame: Any) -> None:
    # Said here, not in an `except KeyboardInterrupt`: Click catches the interrupt and exits 130 silently.
    # Finished artifacts are immutable and checkpoints are written atomically, so nothing is lost.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    err.print("interrupted: finished stages and the last checkpoint are kept; "
              "run the same command again to resume", highlight=False, soft_wrap=True)
    raise KeyboardInterrupt


def main() -> None:
    signal.signal(signal.SIGINT, _on_interrupt)
    try:
        try:
            app()
        except OSError as exc:
            # A full disk where no writer named its file (a lock, a library's own write) is still one line.
            from shieldbench.fileio import no_room

            full = no_room(exc)
            if full is None:
                raise
            raise full from exc
    except UserError as exc:
        # Escaped: a message quoting "[data]" or "[1]" is text, not rich markup.
        err.print(f"[red]error:[/red] {rich_escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
