"""Leaderboard rows as cells and tables: one formatting for the terminal and for papers.

A cell is ``mean ± std`` over seeds; fractions are shown in percent, times in
seconds, ranks as they are. With one seed there is no spread and the cell is
the bare value. ``markdown`` writes the table that the docs paste, with the
number of seeds per row, so every published table can be regenerated from
the records (``shieldbench leaderboard --format markdown``).
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import pandas as pd

from shieldbench.benchmark.leaderboard import BOUNDS

KEY_COLUMNS = ("attack", "defense", "setting")


def _missing(x: Any) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x)) or x == ""


def cell(row: pd.Series | dict, metric: str, digits: int = 1) -> str:
    """``mean ± std`` of one metric (percent for fractions); ``-`` when the row lacks it."""
    mean, std = row.get(f"{metric}_mean"), row.get(f"{metric}_std")
    if _missing(mean):
        return "-"
    scale = 1.0 if metric in BOUNDS else 100.0
    text = f"{scale * float(mean):.{digits}f}"
    if not _missing(std):
        text += f" ± {scale * float(std):.{digits}f}"
    return text


def filter_rows(board: pd.DataFrame, attacks: Iterable[str] = (), defenses: Iterable[str] = (),
                settings: Iterable[str] = ()) -> pd.DataFrame:
    """The leaderboard rows of the given attacks / defenses (empty: all), in the given order.

    ``settings``: keep rows whose setting label contains any of these texts;
    ``-`` stands for the empty label (a family with a single setting).
    """
    out = board
    attacks, defenses, settings = list(attacks), list(defenses), list(settings)
    if attacks:
        out = out[out["attack"].isin(attacks)]
    if defenses:
        out = out[out["defense"].isin(defenses)]
    if settings:
        label = out["setting"].fillna("").astype(str)
        keep = pd.Series(False, index=out.index)
        for text in settings:
            keep |= label.eq("") if text == "-" else label.str.contains(text, regex=False)
        out = out[keep]
    order = {"attack": {a: i for i, a in enumerate(attacks)}, "defense": {d: i for i, d in enumerate(defenses)}}
    keys = [out[c].map(order[c]).fillna(len(order[c])) if order[c] else out[c] for c in ("attack", "defense")]
    return out.copy().assign(_a=keys[0], _d=keys[1]).sort_values(["_a", "_d", "setting"], kind="stable").drop(columns=["_a", "_d"])


SMOKE_NOTE = ("rows of the smoke preset test code paths, not science: their models are near chance "
              "and their numbers mean nothing")


def cells(board: pd.DataFrame, metrics: list[str], digits: int = 1) -> pd.DataFrame:
    """The table the formats share: attack, defense, setting, n (seeds), one ``mean ± std`` column per metric."""
    shown = [m for m in metrics if f"{m}_mean" in board.columns]
    rows = []
    for _, r in board.iterrows():
        setting = "" if _missing(r.get("setting")) else str(r["setting"])
        rows.append([str(r["attack"]), str(r["defense"]), setting, str(int(r["n_seeds"])),
                     *[cell(r, m, digits) for m in shown]])
    return pd.DataFrame(rows, columns=["attack", "defense", "setting", "n", *shown])


def latex(board: pd.DataFrame, metrics: list[str], digits: int = 1) -> str:
    """A booktabs LaTeX table (pandas' ``to_latex``): the same cells as :func:`markdown`, ``±`` as ``$\\pm$``."""
    text = cells(board, metrics, digits).to_latex(index=False, escape=True)
    return text.replace("±", r"$\pm$")


def markdown(board: pd.DataFrame, metrics: list[str], digits: int = 1) -> str:
    """A GitHub markdown table: attack, defense, setting, n (seeds), then one ``mean ± std`` column per metric."""
    t = cells(board, metrics, digits)
    lines = ["| " + " | ".join(t.columns) + " |", "|" + "---|" * len(t.columns)]
    lines += ["| " + " | ".join(row) + " |" for row in t.itertuples(index=False)]
    return "\n".join(lines) + "\n"
