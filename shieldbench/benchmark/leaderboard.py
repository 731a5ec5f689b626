"""Leaderboard tables, always rebuilt from the run records.

``runs.csv`` has one row per run (seed level, failed runs included with their
status and error); its ``asr_ci_low`` / ``asr_ci_high`` are the run's own
Wilson interval over test images. ``leaderboard.csv`` has one row per
setting (everything but the seed) over the successful runs: for each
headline metric the mean, the std over seeds (ddof=1) and a 95% Student-t
interval over seeds (``<metric>_seed_ci_low`` / ``_seed_ci_high``), plus
n_seeds, the seeds, the target, the poison rate and the number of failed
runs. With one seed there is no spread: std and interval are empty, not 0.
Intervals stay inside what a metric can be: [0, 1] for fractions, >= 0 for
times and memory, >= 1 for ranks. Neither file is ever edited in place.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import pandas as pd
from scipy import stats

from shieldbench.locks import locked
from shieldbench.fileio import atomic_write_text, sweep_temps

GROUP = ["attack", "defense", "model", "dataset", "preset"]
HEADLINE = [
    "clean_top1", "clean_top5", "asr", "asr_base_model", "asr_top5", "robust_acc", "hit@1", "hit@5", "hit@10",
    "i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10",
    "poison_success", "poison_success_base_model", "poison_hit@1", "poison_mean_rank",
    "asr_before_repair", "clean_top1_before_repair",
    # A defense that reports suspicion scores (the runner scores them against the poison flags).
    "detection_auroc", "detection_precision", "detection_recall", "detection_n_dropped",
    "prepare_s", "train_s", "cost_train_s", "total_s", "peak_memory_mb",
]


def load_records(results_dir: str | Path) -> list[dict[str, Any]]:
    """Every readable record under ``results/runs``; unreadable or malformed ones become ``corrupt`` rows.

    Malformed: not a JSON object, or a ``metrics`` / ``timings`` / ``plan`` /
    ``artifacts`` / ``spec`` field that is not an object. Such a record is
    one row saying what is wrong; the rest of the leaderboard is built.
    """
    records = []
    for path in sorted(Path(results_dir, "runs").glob("*/record.json")):
        try:
            record = json.loads(path.read_text())
            problem = _malformed(record)
        except (json.JSONDecodeError, UnicodeDecodeError, OSError) as exc:
            problem = f"{type(exc).__name__}: {exc}"
        if problem:
            records.append({"run_id": path.parent.name, "status": "corrupt", "error": f"{path}: {problem}"})
        else:
            records.append(record)
    return records


def report_corrupt(records: list[dict[str, Any]]) -> None:
    """One warning line if some records could not be read: how many, the first one and why; the rest is built."""
    bad = [r for r in records if r.get("status") == "corrupt"]
    if not bad:
        return
    from rich.console import Console

    more = f" (and {len(bad) - 1} more; see runs.csv)" if len(bad) > 1 else ""
    Console(stderr=True).print(f"warning: {len(bad)} unreadable record(s) left out of the leaderboard: "
                               f"{bad[0]['error']}{more}", markup=False, highlight=False, soft_wrap=True)


def _malformed(record: Any) -> str:
    if not isinstance(record, dict):
        return f"not a JSON object but {type(record).__name__}"
    for key in ("metrics", "metrics_before_repair", "timings", "plan", "artifacts", "spec"):
        if record.get(key) is not None and not isinstance(record[key], dict):
            return f"{key!r} is {type(record[key]).__name__}, not an object"
    for key, value in (record.get("metrics") or {}).items():
        if value is not None and not isinstance(value, (int, float)):
            return f"metric {key!r} is {type(value).__name__}, not a number"
    return ""


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{"defense": {"options": {"variant": "ke"}}} -> {"defense.options.variant": "ke"}."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for k, v in tree.items():
        out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def config_of(spec: dict[str, Any] | None) -> dict[str, str]:
    """Everything in a spec that defines the experiment except the seed (values as JSON text)."""
    flat = flatten(spec or {})
    flat.pop("seed", None)
    return {k: json.dumps(v, sort_keys=True) for k, v in flat.items()}


def config_id(config: dict[str, str]) -> str:
    """Short hash of a :func:`config_of` result: runs that differ only in their seed share it."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:10]


def settings(runs: pd.DataFrame, specs: dict[str, dict[str, str]]) -> pd.Series:
    """Per run, the spec entries that differ between configs of the same attack x defense x model x data x preset.

    Two settings of one defense (a variant, a temperature) are different rows
    of the leaderboard, labelled by what differs; they are never averaged
    as if they were seeds.
    """
    label = pd.Series("", index=runs.index, dtype=object)
    for _, family in runs.groupby(GROUP, dropna=False, sort=False):
        configs = {c: specs[c] for c in family["config"].unique() if c in specs}
        if len(configs) < 2:
            continue
        keys = sorted({k for cfg in configs.values() for k in cfg})
        # A key varies if configs that have it disagree (records written before a parameter existed
        # lack it: that alone does not make a difference worth a label).
        varying = [k for k in keys if len({cfg[k] for cfg in configs.values() if k in cfg}) > 1]
        names = {c: ", ".join(f"{k.replace('.options.', '.')}={json.loads(cfg[k])}" for k in varying if k in cfg)
                 for c, cfg in configs.items()}
        clash = {n for n in names.values() if list(names.values()).count(n) > 1}
        for idx, cfg_id in family["config"].items():
            name = names.get(cfg_id, "")
            label[idx] = f"{name} (config {cfg_id})".strip() if name in clash else name
    return label


def runs_frame(records: list[dict[str, Any]]) -> pd.DataFrame:
    rows = []
    specs: dict[str, dict[str, str]] = {}
    for r in records:
        row: dict[str, Any] = {k: r.get(k) for k in ["run_id", "status", *GROUP, "seed", "error"]}
        if isinstance(r.get("spec"), dict):
            config = config_of(r["spec"])
            row["config"] = config_id(config)
            specs[row["config"]] = config
        else:  # a corrupt record: its own row
            row["config"] = str(r.get("run_id"))
        row.update(r.get("metrics", {}) or {})
        for k, v in (r.get("metrics_before_repair") or {}).items():
            row[f"{k}_before_repair"] = v
        row.update({k: v for k, v in (r.get("timings") or {}).items()})
        row["peak_memory_mb"] = r.get("peak_memory_mb")
        plan = r.get("plan") or {}
        attack_spec = (r.get("spec") or {}).get("attack") or {}
        row["target"] = attack_spec.get("target")
        row["poison_rate"] = attack_spec.get("poison_rate")
        row["n_poison"] = attack_spec.get("n_poison")
        row["n_poisoned"] = plan.get("n_poisoned")
        row["plan_hash"] = plan.get("hash")
        row["train_reused"] = ((r.get("artifacts") or {}).get("train") or {}).get("reused")
        rows.append(row)
    frame = pd.DataFrame(rows)
    if not frame.empty:
        frame.insert(frame.columns.get_loc("seed"), "setting", settings(frame, specs))
    return frame


# Metrics that are not fractions, with the range they live in.
BOUNDS: dict[str, tuple[float, float]] = {
    "prepare_s": (0.0, math.inf), "train_s": (0.0, math.inf), "cost_train_s": (0.0, math.inf), "total_s": (0.0, math.inf),
    "peak_memory_mb": (0.0, math.inf), "poison_mean_rank": (1.0, math.inf), "detection_n_dropped": (0.0, math.inf),
}


def bounds(metric: str) -> tuple[float, float]:
    """Where a metric's values can lie: [0, 1] for fractions unless listed in BOUNDS."""
    return BOUNDS.get(metric, (0.0, 1.0))


def t_interval(values: pd.Series, confidence: float = 0.95,
               lo: float = -math.inf, hi: float = math.inf) -> tuple[float, float]:
    """Student-t interval of the mean over seeds, clipped to [lo, hi]; empty (NaN) below two values."""
    v = values.dropna().astype(float)
    n = len(v)
    if n < 2:
        return math.nan, math.nan
    half = stats.t.ppf(0.5 + confidence / 2, n - 1) * v.std(ddof=1) / math.sqrt(n)
    return float(max(lo, v.mean() - half)), float(min(hi, v.mean() + half))


def leaderboard_frame(runs: pd.DataFrame) -> pd.DataFrame:
    # A record that could not be read names no attack, defense or setting: it stays in runs.csv with its
    # error, but is no leaderboard row (it was a row of "nan" in every column).
    if not runs.empty:
        runs = runs[runs["status"] != "corrupt"]
    if runs.empty:
        return pd.DataFrame(columns=[*GROUP, "setting", "config", "n_seeds", "n_failed"])
    ok = runs[runs["status"] == "ok"]
    out = []
    for key, group in runs.groupby([*GROUP, "setting", "config"], dropna=False, sort=True):
        good = ok.loc[ok.index.intersection(group.index)]
        row: dict[str, Any] = dict(zip([*GROUP, "setting", "config"], key))
        row["n_seeds"] = int(good["seed"].nunique()) if len(good) else 0
        row["seeds"] = ",".join(str(int(x)) for x in sorted(good["seed"].dropna().unique())) if len(good) else ""
        for col in ("target", "poison_rate", "n_poison"):
            if col in group.columns:
                vals = group[col].dropna().unique()
                row[col] = vals[0] if len(vals) == 1 else ""
        row["n_failed"] = int((group["status"] != "ok").sum())
        for m in HEADLINE:
            if m not in good.columns or good[m].dropna().empty:
                continue
            vals = good[m].astype(float)
            row[f"{m}_mean"] = float(vals.mean())
            row[f"{m}_std"] = float(vals.std(ddof=1)) if len(vals.dropna()) > 1 else math.nan
            lo, hi = t_interval(vals, lo=bounds(m)[0], hi=bounds(m)[1])
            row[f"{m}_seed_ci_low"], row[f"{m}_seed_ci_high"] = lo, hi
        out.append(row)
    return pd.DataFrame(out)


STATS = ("mean", "std", "seed_ci_low", "seed_ci_high")


def long_frame(board: pd.DataFrame) -> pd.DataFrame:
    """The leaderboard tidy: one row per setting x metric, with mean, std and the seed interval."""
    ids = [c for c in [*GROUP, "setting", "config", "n_seeds", "seeds", "target", "poison_rate", "n_poison"]
           if c in board.columns]
    rows = []
    for _, r in board.iterrows():
        for m in HEADLINE:
            if f"{m}_mean" not in board.columns or pd.isna(r.get(f"{m}_mean")):
                continue
            rows.append({**{c: r[c] for c in ids}, "metric": m, **{st: r.get(f"{m}_{st}") for st in STATS}})
    return pd.DataFrame(rows, columns=[*ids, "metric", *STATS])


#: The files :func:`rebuild` writes, under ``.leaderboard.lock`` alone.
LEADERBOARD_FILES = ("runs.csv", "leaderboard.csv", "leaderboard_long.csv")


def rebuild(results_dir: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Rewrite runs.csv, leaderboard.csv and its tidy form leaderboard_long.csv from the records (atomically)."""
    results_dir = Path(results_dir)
    # Under a lock: two writers finishing together would otherwise each write a
    # leaderboard from the records they saw, and the later, staler one could win.
    with locked(results_dir / ".leaderboard.lock"):
        # These files are written under this lock alone: a temp file of theirs is a killed write's.
        sweep_temps(results_dir, LEADERBOARD_FILES)
        records = load_records(results_dir)
        report_corrupt(records)
        runs = runs_frame(records)
        board = leaderboard_frame(runs)
        atomic_write_text(results_dir / "runs.csv", runs.to_csv(index=False))
        atomic_write_text(results_dir / "leaderboard.csv", board.to_csv(index=False))
        atomic_write_text(results_dir / "leaderboard_long.csv", long_frame(board).to_csv(index=False))
    return runs, board
