"""The HTML report, ``results/report/index.html``: what was run, the leaderboard, the figures.

The page is rendered from ``templates/report.html.j2`` with jinja2
(autoescaped: run ids, settings and error messages are user text). It has

- a header of facts from the run records (``runs/*/record.json``): runs and
  their status, attacks, defenses, models, datasets, presets, seeds, the
  newest record's date and the package versions the records name;
- the leaderboard in percent, ``mean ± std`` over seeds and n per row, for
  the headline metrics the results have (the cells of
  :func:`shieldbench.benchmark.tables.cell`, so the page, the terminal and
  the paper tables agree to the digit), with the smoke-preset note above it
  whenever smoke rows are shown;
- the figures of :mod:`shieldbench.benchmark.plots`; one that cannot be drawn
  is replaced by one line saying why, never by a failed report.

The page is self-contained (embedded CSS, figures beside it as PNGs) and
fits a 1400-px window without horizontal scrolling. Columns that take a
single value over the whole leaderboard (model, dataset, preset) move to
the header instead of repeating on every row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

import pandas as pd
from jinja2 import Environment, PackageLoader, StrictUndefined

from shieldbench.benchmark import plots
from shieldbench.benchmark.tables import SMOKE_NOTE, cell
from shieldbench.errors import UserError
from shieldbench.fileio import atomic_write_text, read_json


@dataclass(frozen=True)
class Metric:
    name: str  # the leaderboard's metric (columns ``<name>_mean`` / ``_std``)
    label: str  # the column header
    better: str  # "↑" or "↓" from the victim's side; "" where neither is better
    meaning: str  # one line for the legend under the table


# The headline subset that fits the page: utility, backdoor and poisoning success, one of each kind.
METRICS: tuple[Metric, ...] = (
    Metric("clean_top1", "clean top-1", "↑", "zero-shot top-1 accuracy on clean test images"),
    Metric("asr", "ASR", "↓", "attack success rate: triggered non-target test images classified as the target"),
    Metric("asr_base_model", "ASR base", "", "the same ASR on the clean base model: what the trigger does with no backdoor"),
    Metric("robust_acc", "robust acc.", "↑", "triggered non-target test images still classified as their true class"),
    Metric("hit@1", "hit@1", "↓", "backdoor retrieval: triggered images whose top caption is of the target class"),
    Metric("i2t_R@1", "I→T R@1", "↑", "image-to-text retrieval recall@1 on clean images"),
    Metric("t2i_R@1", "T→I R@1", "↑", "text-to-image retrieval recall@1 on clean images"),
    Metric("poison_success", "poison success", "↓", "targeted poisoning: target images classified as the target class"),
)
VERSION_PACKAGES = (("shieldbench", "shieldbench"), ("torch", "torch"), ("open_clip_torch", "open_clip"))
TEMPLATE = "report.html.j2"
FIGURES = ("asr_heatmap.png", "tradeoff.png", "attention.png")


def read_records(results_dir: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """The readable records under ``runs/*/record.json``, and the names of the unreadable ones (skipped)."""
    records, skipped = [], []
    for path in sorted((results_dir / "runs").glob("*/record.json")):
        try:
            record = read_json(path)
        except UserError:  # corrupt or vanished since the glob: the header counts it, nothing else needs it
            skipped.append(path.parent.name)
            continue
        if isinstance(record, dict):
            records.append(record)
        else:
            skipped.append(path.parent.name)
    return records, skipped


def _names(values: Any) -> list[str]:
    """Unique non-empty values, ``none`` first (the control), the others sorted."""
    return plots.control_first(str(v) for v in values if v is not None and str(v) not in ("", "nan"))


def _when(record: dict[str, Any]) -> datetime | None:
    for key in ("finished", "started"):
        try:
            return datetime.fromisoformat(str(record[key]))
        except (KeyError, ValueError):
            continue
    return None


def run_facts(results_dir: Path, records: list[dict[str, Any]], skipped: list[str],
              board: pd.DataFrame) -> list[tuple[str, str]]:
    """The header: (fact, value) pairs saying what was run, from the records and the leaderboard."""
    status = pd.Series([str(r.get("status", "unknown")) for r in records], dtype=object)
    counts = status.value_counts()
    runs = f"{len(records)} ({', '.join(f'{n} {s}' for s, n in counts.items())})" if records else "0"
    if skipped:
        runs += f"; {len(skipped)} unreadable record{'s' if len(skipped) > 1 else ''} skipped"

    def field(name: str) -> str:
        values = [r.get(name) for r in records] + (list(board[name]) if name in board.columns else [])
        return ", ".join(_names(values)) or "-"

    seeds = sorted({r["seed"] for r in records if isinstance(r.get("seed"), int) and not isinstance(r["seed"], bool)})
    times = [t for t in (_when(r) for r in records) if t is not None]
    # timestamp(): records with and without a time zone compare without a TypeError.
    newest = max(times, key=lambda t: t.timestamp()) if times else None
    versions = []
    for pkg, shown in VERSION_PACKAGES:
        found = sorted({str((r.get("versions") or {}).get(pkg)) for r in records if (r.get("versions") or {}).get(pkg)})
        # Records of several versions are worth seeing at once: their numbers may not be comparable.
        versions.append(f"{shown} {', '.join(found)}{' (mixed)' if len(found) > 1 else ''}" if found else f"{shown} ?")
    commits = sorted({str(r["git_commit"])[:10] for r in records if r.get("git_commit")})
    facts = [
        ("results folder", str(results_dir.resolve())),
        ("runs", runs),
        ("leaderboard rows", f"{len(board)} (attack x defense x model x data x preset x setting; seeds averaged)"),
        ("attacks", field("attack")),
        ("defenses", field("defense")),
        ("models", field("model")),
        ("datasets", field("dataset")),
        ("presets", field("preset")),
        ("seeds", ", ".join(map(str, seeds)) or "-"),
        ("newest record", newest.strftime("%Y-%m-%d %H:%M %Z").strip() if newest else "-"),
        ("versions", " · ".join(versions)),
    ]
    if commits:
        facts.append(("git commit" + ("s" if len(commits) > 1 else ""), ", ".join(commits)))
    return facts


def shown_metrics(board: pd.DataFrame) -> list[Metric]:
    """The headline metrics that some leaderboard row has a value for."""
    return [m for m in METRICS if f"{m.name}_mean" in board.columns and board[f"{m.name}_mean"].notna().any()]


def _text(value: Any) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)


def _tooltip(row: pd.Series, metric: Metric) -> str:
    """A cell's details on hover: the 95% t-interval over seeds where there are several."""
    lo, hi = row.get(f"{metric.name}_seed_ci_low"), row.get(f"{metric.name}_seed_ci_high")
    n = int(row.get("n_seeds", 0) or 0)
    text = f"{metric.label} in %: mean ± std over n={n} seeds" if n > 1 else f"{metric.label} in %: n={n} seed, no spread"
    if _text(lo) and _text(hi):
        text += f"; 95% t-interval {100 * float(lo):.1f} to {100 * float(hi):.1f}"
    return text


def ordered(board: pd.DataFrame) -> pd.DataFrame:
    """Rows by attack then defense (``none`` first in both: the controls), then setting and context."""
    attack, defense = plots.text(board["attack"]), plots.text(board["defense"])
    attacks = {a: i for i, a in enumerate(plots.control_first(attack))}
    defenses = {d: i for i, d in enumerate(plots.control_first(defense))}
    # A corrupt record's row has no attack or defense: it sorts last (map gives NaN, sorted after numbers).
    keys = pd.DataFrame({"_a": attack.map(attacks), "_d": defense.map(defenses),
                         "_s": plots.text(board["setting"]) if "setting" in board.columns else ""}, index=board.index)
    for c in plots.CONTEXT:
        if c in board.columns:
            keys[c] = plots.text(board[c])
    # The keys sorted on their own: assigning them to the wide leaderboard would copy every column.
    return board.loc[keys.sort_values(list(keys.columns), kind="stable").index]


def table(board: pd.DataFrame, metrics: list[Metric]) -> dict[str, Any]:
    """The leaderboard for the template: which key columns to show, and one dict per row."""
    context = plots.varying_context(board)
    has_setting = ("setting" in board.columns and plots.text(board["setting"]).ne("").any()) or (
        plots.text(board["attack"]).eq("").any())
    has_failed = "n_failed" in board.columns and pd.to_numeric(board["n_failed"], errors="coerce").fillna(0).gt(0).any()
    smoke = plots.text(board["preset"]).eq("smoke") if "preset" in board.columns else pd.Series(False, index=board.index)
    # Only a mixed leaderboard needs its smoke rows marked: the note says so when all rows are.
    mark = "†" if smoke.any() and not smoke.all() else ""
    rows, previous = [], None
    for _, r in ordered(board).iterrows():
        attack = _text(r.get("attack"))
        # A corrupt record's row has no attack or defense; the leaderboard keys it by its run id.
        setting = _text(r.get("setting")) if attack else f"run {_text(r.get('config'))}"
        rows.append({
            "attack": attack or "(unreadable record)", "defense": _text(r.get("defense")) or "-", "setting": setting,
            "context": [_text(r.get(c)) for c in context],
            "n": int(r["n_seeds"]) if _text(r.get("n_seeds")) else 0,
            "failed": int(float(r["n_failed"])) if has_failed and _text(r.get("n_failed")) else 0,
            "smoke": _text(r.get("preset")) == "smoke",
            "mark": mark if _text(r.get("preset")) == "smoke" else "",
            "group_start": attack != previous,  # a rule above each attack's block of defenses
            "cells": [{"text": cell(r, m.name), "title": _tooltip(r, m)} for m in metrics],
        })
        previous = attack
    return {"context": context, "has_setting": has_setting, "has_failed": has_failed, "rows": rows}


def smoke_note(board: pd.DataFrame) -> str:
    """The smoke warning for the rows it concerns; "" without smoke rows."""
    if "preset" not in board.columns:
        return ""
    smoke = plots.text(board["preset"]).eq("smoke")
    if not smoke.any():
        return ""
    who = f"All {len(board)} rows are" if smoke.all() else f"{int(smoke.sum())} of {len(board)} rows (marked †) are"
    return f"{who} of the smoke preset: {SMOKE_NOTE}."


def failures(records: list[dict[str, Any]], skipped: Sequence[str] = (), limit: int = 20) -> list[dict[str, str]]:
    """Runs that did not finish, with the first line of their error, then unreadable records (at most ``limit``)."""
    bad = [{"run_id": str(r.get("run_id", "?")), "status": str(r.get("status", "?")),
            "error": (str(r.get("error") or "").strip().splitlines() or [""])[0][:300]}
           for r in records if r.get("status") != "ok"]
    bad += [{"run_id": name, "status": "unreadable", "error": "record.json is not valid JSON"} for name in skipped]
    return bad[:limit]


def figures(board: pd.DataFrame, results_dir: Path, records: list[dict[str, Any]],
            out: Path) -> list[dict[str, str]]:
    """Draw the figures into ``out``; one entry per figure: its file, or why it is missing."""
    entries = []
    heat = plots.asr_heatmap(board, out / "asr_heatmap.png")
    entries.append({"title": "Attack success rate, attack x defense", "file": heat.name if heat else "",
                    "caption": "ASR in percent, mean over seeds; the no-defense column first. Grey: not run.",
                    "why": "" if heat else "no ASR in these results (no attack with a trigger)"})
    trade = plots.tradeoff(board, out / "tradeoff.png")
    entries.append({"title": "Clean accuracy vs attack success", "file": trade.name if trade else "",
                    "caption": "One panel per attack, one marker per defense; error bars: std over seeds "
                               "(none where a row has one seed). Up and to the left is better for the defender.",
                    "why": "" if trade else "no row has both clean top-1 and ASR"})
    attn, why = plots.attention_figure(results_dir, records, out / "attention.png")
    entries.append({"title": "Where the image tower looks: patch attention",
                    "file": attn.name if attn else "",
                    "caption": "Last-block CLS→patch attention averaged over heads, scaled per image, on clean "
                               "(top) and triggered (bottom) test images; without and with Semantic Shield."
                               + (f" Note: {why}." if attn and why else ""),
                    "why": "" if attn else why})
    # A figure that could not be drawn this time must not survive from an earlier report.
    drawn = {e["file"] for e in entries if e["file"]}
    for name in FIGURES:
        if name not in drawn:
            (out / name).unlink(missing_ok=True)
    return entries


def environment() -> Environment:
    # StrictUndefined: a misspelt variable fails the report in tests instead of rendering blank.
    return Environment(loader=PackageLoader("shieldbench", "templates"), autoescape=True,
                       undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)


def render(board: pd.DataFrame, results_dir: Path, records: list[dict[str, Any]], skipped: list[str],
           figure_entries: list[dict[str, str]]) -> str:
    metrics = shown_metrics(board)
    return environment().get_template(TEMPLATE).render(
        facts=run_facts(results_dir, records, skipped, board), metrics=metrics, table=table(board, metrics),
        smoke_note=smoke_note(board), failures=failures(records, skipped),
        n_failed_runs=sum(r.get("status") != "ok" for r in records) + len(skipped), figures=figure_entries,
    )


def write_report(results_dir: str | Path) -> Path:
    """Write ``results/report/index.html`` (and its figures) from the leaderboard and the run records."""
    results_dir = Path(results_dir)
    out = results_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    board = pd.read_csv(results_dir / "leaderboard.csv")
    records, skipped = read_records(results_dir)
    page = render(board, results_dir, records, skipped, figures(board, results_dir, records, out))
    atomic_write_text(out / "index.html", page)
    return out / "index.html"


__all__ = ["METRICS", "read_records", "render", "run_facts", "smoke_note", "table", "write_report"]
