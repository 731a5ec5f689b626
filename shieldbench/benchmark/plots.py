"""Plots and an HTML report from the leaderboard (matplotlib, no display needed)."""

from __future__ import annotations

import html
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: files only
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from shieldbench.fileio import atomic_write_text  # noqa: E402


def defense_label(board: pd.DataFrame) -> pd.Series:
    """The defense name, plus the leaderboard's setting where several settings were run."""
    setting = board["setting"].fillna("").astype(str) if "setting" in board.columns else pd.Series("", index=board.index)
    # Long settings would push the axes off the figure: keep the start, which names the first difference.
    short = setting.map(lambda s: s if len(s) <= 48 else s[:47] + "...")
    return (board["defense"].astype(str) + short.map(lambda s: f" [{s}]" if s else "")).rename("label")


def asr_heatmap(board: pd.DataFrame, path: Path, metric: str = "asr_mean") -> Path | None:
    if metric not in board.columns or board[metric].dropna().empty:
        return None
    board = pd.concat([board, defense_label(board)], axis=1)
    table = board.pivot_table(index="attack", columns="label", values=metric, aggfunc="mean")
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * table.shape[1], 1.2 + 0.6 * table.shape[0]))
    im = ax.imshow(100 * table.values, vmin=0, vmax=100, cmap="Reds")
    ax.set_xticks(range(table.shape[1]), table.columns, rotation=30, ha="right")
    ax.set_yticks(range(table.shape[0]), table.index)
    for (r, c), v in pd.DataFrame(table.values).stack().items():
        ax.text(c, r, f"{100 * v:.1f}", ha="center", va="center", color="black" if v < 0.6 else "white")
    ax.set_title(f"{metric.removesuffix('_mean')} (%), attack x defense")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def tradeoff(board: pd.DataFrame, path: Path) -> Path | None:
    if not {"clean_top1_mean", "asr_mean"} <= set(board.columns):
        return None
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for defense, group in pd.concat([board, defense_label(board)], axis=1).groupby("label"):
        ax.scatter(100 * group["asr_mean"], 100 * group["clean_top1_mean"], label=defense)
        for _, r in group.iterrows():
            ax.annotate(r["attack"], (100 * r["asr_mean"], 100 * r["clean_top1_mean"]), fontsize=7)
    ax.set_xlabel("attack success rate (%)")
    ax.set_ylabel("clean zero-shot top-1 (%)")
    ax.legend(fontsize=8)
    ax.set_title("clean accuracy vs attack success")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(results_dir: str | Path) -> Path:
    """results/report/index.html with the leaderboard and the plots."""
    results_dir = Path(results_dir)
    out = results_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    board = pd.read_csv(results_dir / "leaderboard.csv")
    images = [p for p in (asr_heatmap(board, out / "asr_heatmap.png"), tradeoff(board, out / "tradeoff.png")) if p]
    cols = [c for c in board.columns if c in ("attack", "defense", "model", "preset", "n_seeds", "n_failed")
            or c.endswith("_mean")]
    body = board[cols].to_html(index=False, float_format=lambda v: f"{v:.4f}", border=0)
    imgs = "".join(f'<p><img src="{html.escape(p.name)}" alt="{html.escape(p.stem)}"></p>' for p in images)
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>shieldbench report</title></head>"
            f"<body><h1>shieldbench leaderboard</h1>{body}{imgs}</body></html>\n")
    atomic_write_text(out / "index.html", page)
    return out / "index.html"
