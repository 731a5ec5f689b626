"""The report's figures (matplotlib, no display needed).

- :func:`asr_heatmap`: attack x defense, the ``none`` defense first, values in percent;
- :func:`tradeoff`: clean accuracy vs attack success, one subplot per attack, one
  marker and colour per defense, error bars = std over seeds (none with one seed);
- :func:`attention_figure`: the last block's CLS->patch attention of a Semantic
  Shield model and of the undefended one on clean and triggered test images.

Every figure function returns the file it wrote, or None (with a reason for
the attention figure) when the results cannot make it. PNGs are written
atomically with the umask's mode, like every other results file.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable

import matplotlib

matplotlib.use("Agg")  # headless: files only
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from shieldbench.fileio import atomic_write  # noqa: E402

# The control comes first on every axis: a defense (or an attack) is read against it.
CONTROL = "none"
# What can differ between leaderboard rows of one attack x defense besides the setting.
CONTEXT = ("model", "dataset", "preset")
DPI = 120
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")
TITLES = {"asr": "attack success rate", "hit@1": "backdoor hit@1"}


def save_png(fig: Figure, path: Path) -> Path:
    """Write ``fig`` to ``path`` atomically (temp file + rename), with the umask's mode; close it."""
    try:
        atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=DPI))
    finally:
        plt.close(fig)
    return path


def text(values: pd.Series) -> pd.Series:
    """A column as text, missing values as "" (``astype(str)`` keeps NaN under pandas 3 and writes "nan" under 2)."""
    return values.map(lambda v: "" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v))


def control_first(names: Iterable[Any]) -> list[str]:
    """Unique names sorted, with ``none`` (and ``none [setting]`` labels) first; missing or empty names left out."""
    unique = sorted({str(n) for n in names if n is not None and not (isinstance(n, float) and math.isnan(n))} - {""})
    is_control = [n == CONTROL or n.startswith(f"{CONTROL} [") for n in unique]
    return [n for n, c in zip(unique, is_control) if c] + [n for n, c in zip(unique, is_control) if not c]


def defense_label(board: pd.DataFrame) -> pd.Series:
    """The defense name, plus the leaderboard's setting where several settings were run."""
    setting = text(board["setting"]) if "setting" in board.columns else pd.Series("", index=board.index)
    # Long settings would push the axes off the figure: keep the start, which names the first difference.
    short = setting.map(lambda s: s if len(s) <= 48 else s[:47] + "...")
    return (text(board["defense"]) + short.map(lambda s: f" [{s}]" if s else "")).rename("label")


def varying_context(board: pd.DataFrame) -> list[str]:
    """The model / dataset / preset columns that take more than one value on this leaderboard."""
    # Empty values (a corrupt record's row) are no second model.
    return [c for c in CONTEXT if c in board.columns and len(set(text(board[c])) - {""}) > 1]


def attack_label(board: pd.DataFrame) -> pd.Series:
    """The attack name, plus the model / dataset / preset where the leaderboard has several.

    Rows of different models must not be averaged into one heatmap cell or
    share a subplot as if they were one experiment.
    """
    extra = varying_context(board)
    label = text(board["attack"])
    if extra:
        label = label + " (" + board[extra].apply(text).agg(", ".join, axis=1) + ")"
    return label.rename("attack_label")


def heatmap_table(board: pd.DataFrame, metric: str = "asr_mean") -> pd.DataFrame:
    """Attack (rows) x defense (columns) of one metric, ``none`` first on both axes, other names sorted."""
    frame = pd.concat([board, defense_label(board), attack_label(board)], axis=1)
    # Attacks without the metric (no trigger: no ASR) are dropped, not shown as a row of blanks.
    table = frame.pivot_table(index="attack_label", columns="label", values=metric, aggfunc="mean")
    return table.reindex(index=control_first(table.index), columns=control_first(table.columns))


def asr_heatmap(board: pd.DataFrame, path: Path, metric: str = "asr_mean") -> Path | None:
    """Heatmap of ``metric`` (percent) over attack x defense; None if the leaderboard has no such values."""
    if metric not in board.columns or board[metric].dropna().empty:
        return None
    table = heatmap_table(board, metric)
    values = 100 * table.to_numpy(dtype=float)
    width = 2.4 + 1.25 * table.shape[1] + 0.06 * max(len(str(a)) for a in table.index)
    fig, ax = plt.subplots(figsize=(min(width, 11.5), 1.6 + 0.5 * table.shape[0]))
    cmap = matplotlib.colormaps["Reds"].with_extremes(bad="#eeeeee")  # grey: not run, not a 0% ASR
    im = ax.imshow(np.ma.masked_invalid(values), vmin=0, vmax=100, cmap=cmap, aspect="auto")
    ax.set_xticks(range(table.shape[1]), table.columns, rotation=25, ha="right")
    ax.set_yticks(range(table.shape[0]), table.index)
    ax.set_xlabel("defense")
    ax.set_ylabel("attack")
    for r in range(values.shape[0]):
        for c in range(values.shape[1]):
            v = values[r, c]
            label, colour = ("not run", "#777777") if math.isnan(v) else (f"{v:.1f}%", "black" if v < 60 else "white")
            ax.text(c, r, label, ha="center", va="center", color=colour, fontsize=9)
    name = metric.removesuffix("_mean")
    ax.set_title(f"{TITLES.get(name, name)} (%), mean over seeds")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02, label="%")
    fig.tight_layout()
    return save_png(fig, path)


def _std(value: Any) -> float | None:
    """A std cell as an error-bar half-width in percent; None where there is no spread (one seed)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(v) else 100 * v


def tradeoff(board: pd.DataFrame, path: Path) -> Path | None:
    """Clean top-1 vs ASR, one subplot per attack, one marker/colour per defense, std over seeds as error bars."""
    if not {"clean_top1_mean", "asr_mean"} <= set(board.columns):
        return None
    frame = pd.concat([board, defense_label(board), attack_label(board)], axis=1)
    frame = frame.dropna(subset=["clean_top1_mean", "asr_mean"])
    if frame.empty:
        return None
    attacks = control_first(frame["attack_label"])
    defenses = control_first(frame["label"])
    # One style per defense across every subplot, so the legend is read once.
    colours = matplotlib.colormaps["tab10"].colors
    style = {d: (colours[i % len(colours)], MARKERS[i % len(MARKERS)]) for i, d in enumerate(defenses)}
    ncols = min(3, len(attacks))
    nrows = math.ceil(len(attacks) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.9 * ncols + 0.4, 3.2 * nrows + 0.9), sharex=True, sharey=True,
                             squeeze=False)
    for ax, attack in zip(axes.flat, attacks):
        for _, r in frame[frame["attack_label"] == attack].iterrows():
            colour, marker = style[r["label"]]
            xerr, yerr = _std(r.get("asr_std")), _std(r.get("clean_top1_std"))
            ax.errorbar(100 * r["asr_mean"], 100 * r["clean_top1_mean"], xerr=xerr, yerr=yerr, fmt=marker,
                        color=colour, markersize=7, capsize=3, elinewidth=1)
        ax.set_title(attack, fontsize=10)
        ax.set_xlim(-4, 104)  # ASR is a fraction: the whole range, so subplots compare at a glance
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(attacks):]:
        ax.set_visible(False)
    for col in range(ncols):
        # The lowest panel of each column carries the x axis (the last row may be short of panels).
        lowest = max(r for r in range(nrows) if r * ncols + col < len(attacks))
        axes[lowest, col].xaxis.set_tick_params(labelbottom=True)
        axes[lowest, col].set_xlabel("attack success rate (%)")
    for ax in axes[:, 0]:
        ax.set_ylabel("clean zero-shot top-1 (%)")
    handles = [Line2D([], [], color=style[d][0], marker=style[d][1], linestyle="", markersize=7, label=d)
               for d in defenses]
    # Long setting labels need fewer legend columns to stay inside the figure.
    legend_cols = min(len(defenses), 3 if max(len(d) for d in defenses) > 30 else 5)
    fig.legend(handles=handles, title="defense", loc="lower center", ncol=legend_cols, fontsize=9,
               frameon=False, bbox_to_anchor=(0.5, 0.0))
    fig.suptitle("clean accuracy vs attack success (error bars: std over seeds)", fontsize=11)
    # Leave room at the bottom for the figure-level legend.
    legend_rows = math.ceil(len(defenses) / legend_cols)
    fig.tight_layout(rect=(0, min(0.4, (0.35 + 0.25 * legend_rows) / fig.get_figheight()), 1, 1))
    return save_png(fig, path)


# -- attention maps ------------------------------------------------------------------------
SHIELD = "semantic_shield"
N_IMAGES = 4


def _finished(record: dict[str, Any]) -> bool:
    return record.get("status") == "ok" and isinstance(record.get("spec"), dict) and bool(
        ((record.get("artifacts") or {}).get("train") or {}).get("key"))


def pick_attention_pair(records: list[dict[str, Any]]) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """A finished Semantic Shield record and, if any, the undefended record closest to it.

    The undefended partner has the same attack and the same data (so both
    models see the very same images); the same model, preset and seed are
    preferred, in that order. Among equals the run ids decide, so the figure
    does not change between two reports of the same results.
    """
    shields = sorted((r for r in records if _finished(r) and r.get("defense") == SHIELD and r.get("attack") != CONTROL),
                     key=lambda r: str(r.get("run_id")))
    controls = [r for r in records if _finished(r) and r.get("defense") == CONTROL]
    pairs = [((c.get("model") != s.get("model"), c.get("preset") != s.get("preset"), c.get("seed") != s.get("seed"),
               str(s.get("run_id")), str(c.get("run_id"))), s, c)
             for s in shields for c in controls
             if c.get("attack") == s.get("attack") and c["spec"].get("data") == s["spec"].get("data")]
    if pairs:
        _, shield, control = min(pairs, key=lambda p: p[0])
        return shield, control
    return (shields[0], None) if shields else (None, None)


def attention_figure(results_dir: str | Path, records: list[dict[str, Any]], path: Path) -> tuple[Path | None, str]:
    """Patch attention of a Semantic Shield model (and the undefended one) on clean and triggered test images.

    Returns ``(path, "")`` or ``(None, why)``: a report never fails for this
    figure (no Semantic Shield run, an attack without a trigger, a model
    without a square attention grid, a cache that was deleted...). torch is
    imported here only, so the rest of the report does not need it.
    """
    shield, control = pick_attention_pair(records)
    if shield is None:
        return None, "no finished semantic_shield run with a trigger attack in these results"
    try:
        return _attention_figure(Path(results_dir), shield, control, path)
    except _Skip as exc:
        return None, str(exc)
    except Exception as exc:  # a figure is not worth a failed report: say why and go on
        return None, f"could not draw it from {shield.get('run_id')}: {type(exc).__name__}: {exc}"


class _Skip(Exception):
    """A reason to leave the attention figure out, shown as is on the page."""


def _attention_figure(results_dir: Path, shield: dict[str, Any], control: dict[str, Any] | None,
                      path: Path) -> tuple[Path, str]:
    import torch

    from shieldbench.attacks.base import PoisonPlan
    from shieldbench.benchmark.keys import plan_key
    from shieldbench.benchmark.runner import make_attack
    from shieldbench.benchmark.store import ArtifactStore
    from shieldbench.data.datasets import build_dataset
    from shieldbench.data.types import to_float
    from shieldbench.spec import spec_from_dict

    store = ArtifactStore(results_dir / "cache")
    # The cheap checks first: a cache that was cleaned should not cost a dataset build to find out.
    if not _has_model(store, shield):
        raise _Skip(f"the model of {shield['run_id']} is no longer in the cache ({store.root})")
    note = ""
    if control is None:
        note = f"no finished run of attack {shield.get('attack')} without defense on the same data"
    elif not _has_model(store, control):
        note = f"the model of {control['run_id']} is no longer in the cache"
        control = None
    spec = spec_from_dict(shield["spec"])
    bundle = build_dataset(spec.data, spec.eval)
    if bundle.test is None or len(bundle.test) == 0:
        raise _Skip(f"{shield['run_id']}: its data has no labelled test images")
    attack = make_attack(spec, bundle)
    if not attack.has_trigger:
        raise _Skip(f"attack {spec.attack.name} has no trigger to show")
    plan_dict = store.load_json("plans", plan_key(spec), "plan.json") or _plan_by_hash(store, shield)
    if plan_dict is None:
        raise _Skip(f"the poison plan of {shield['run_id']} is no longer in {store.root / 'plans'}")
    plan = PoisonPlan.from_dict(plan_dict)
    attack.restore(plan)

    # A few test images, one per class and none of the target class (its triggered image says nothing).
    labels = bundle.test.labels.tolist()
    idx: list[int] = []
    for i, y in enumerate(labels):
        if y != plan.target_index and all(labels[j] != y for j in idx):
            idx.append(i)
        if len(idx) == N_IMAGES:
            break
    if not idx:
        raise _Skip("every test image is of the target class")
    clean = to_float(bundle.test.images[torch.tensor(idx)])
    triggered = attack.apply_trigger(clean.clone(), generator=torch.Generator().manual_seed(0))

    panels: list[tuple[str, dict[str, Any]]] = [(SHIELD, shield)]
    if control is not None:
        panels.insert(0, (f"{CONTROL} (no defense)", control))
    maps: list[tuple[str, Any]] = []
    for title, record in panels:
        heat = _attention_maps(store, record, torch.cat([clean, triggered]))
        maps.append((f"{title}\n{record['run_id']}", heat))

    images = torch.cat([clean, triggered]).permute(0, 2, 3, 1).clamp(0, 1).numpy()
    names = [bundle.test.classnames[labels[i]] for i in idx]
    fig = plt.figure(figsize=(2.0 * len(idx) * len(maps) + 0.6 * len(maps), 5.0), layout="constrained")
    subfigs = np.atleast_1d(fig.subfigures(1, len(maps), wspace=0.04))
    for sub, (title, heat) in zip(subfigs, maps):
        axes = sub.subplots(2, len(idx), squeeze=False)
        for row, row_name in enumerate(("clean", "triggered")):
            for col in range(len(idx)):
                ax = axes[row, col]
                k = row * len(idx) + col
                ax.imshow(images[k], interpolation="nearest")
                ax.imshow(heat[k], cmap="inferno", alpha=0.55, vmin=0, vmax=1, interpolation="bilinear")
                ax.set_xticks([])
                ax.set_yticks([])
                if row == 0:
                    ax.set_title(names[col], fontsize=9)
                if col == 0:
                    ax.set_ylabel(row_name, fontsize=10)
        sub.suptitle(title, fontsize=10)
    fig.suptitle(f"last-block CLS->patch attention (mean over heads), attack {spec.attack.name}, "
                 f"target {plan.target}", fontsize=11)
    return save_png(fig, path), note


def _plan_by_hash(store: Any, record: dict[str, Any]) -> dict[str, Any] | None:
    """The cached plan whose hash the record names: plan keys hash the code versions, which may have moved on."""
    from shieldbench.attacks.base import PoisonPlan
    from shieldbench.fileio import read_json

    want = (record.get("plan") or {}).get("hash")
    if not want:
        return None
    for p in sorted((store.root / "plans").glob("*/plan.json")):
        try:
            d = read_json(p)
            if PoisonPlan.from_dict(d).hash() == want:
                return d
        except Exception:  # an unreadable plan is simply not the one
            continue
    return None


def _evaluated_model(record: dict[str, Any]) -> tuple[str, str]:
    """(kind, key) of the model the record's metrics were computed on: the repaired one for a post-training defense."""
    artifacts = record.get("artifacts") or {}
    kind = "repair" if (artifacts.get("repair") or {}).get("key") else "train"
    return kind, str(artifacts[kind]["key"])


def _has_model(store: Any, record: dict[str, Any]) -> bool:
    return bool(store.has_model(*_evaluated_model(record)))


def _attention_maps(store: Any, record: dict[str, Any], images: Any) -> Any:
    """(N, H, W) attention of the record's evaluated model, averaged over heads, upsampled, scaled to [0, 1] per image."""
    import torch
    import torch.nn.functional as F

    from shieldbench.benchmark.runner import new_model
    from shieldbench.spec import spec_from_dict

    spec = spec_from_dict(record["spec"])
    kind, key = _evaluated_model(record)
    model = new_model(spec)
    store.load_model_into(kind, key, model)
    model.eval()
    with torch.no_grad():
        out = model.image_outputs(images, attention=True)
    if out.attention is None:
        raise _Skip(f"model {spec.model.name} returns no patch attention")
    attn = out.attention.float().mean(dim=1)  # (N, M): heads averaged
    side = math.isqrt(attn.shape[-1])
    if side * side != attn.shape[-1] or side < 2:
        # A ResNet's attention pool at a small input size attends over a single position: nothing to map.
        raise _Skip(f"model {spec.model.name}: attention over {attn.shape[-1]} tokens is not a square patch grid "
                    "of at least 2 x 2")
    grid = attn.reshape(-1, 1, side, side)
    heat = F.interpolate(grid, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    lo = heat.flatten(1).min(dim=1).values[:, None, None]
    hi = heat.flatten(1).max(dim=1).values[:, None, None]
    # Per image: where a model looks, not how peaked its softmax is, is what the figure compares.
    return ((heat - lo) / (hi - lo).clamp_min(1e-12)).numpy()


def write_report(results_dir: str | Path) -> Path:
    """Kept for callers of the old location: the report now lives in :mod:`shieldbench.benchmark.report`."""
    from shieldbench.benchmark.report import write_report as _write

    return _write(results_dir)
