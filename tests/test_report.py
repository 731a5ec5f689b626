"""The HTML report: header facts, the leaderboard in percent, the smoke note, real figures, a page that renders.

The end-to-end tests run three smoke cells through the installed command
(badnets without and with Semantic Shield, blended on another seed), then
``shieldbench report`` under umask 002; the others build leaderboards by hand.
"""

from __future__ import annotations

import html
import json
import math
import os
import shutil
import stat
import subprocess
from importlib import resources
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from cli_helpers import needs_cli, sb
from shieldbench.benchmark import leaderboard as L
from shieldbench.benchmark import plots, report
from shieldbench.benchmark.tables import SMOKE_NOTE

FIGURES = ("asr_heatmap.png", "tradeoff.png", "attention.png")
UMASK = 0o002  # not the usual 022, so a file that merely got a default mode is told apart


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("report")
    for args in (("-a", "badnets", "-d", "none"), ("-a", "badnets", "-d", "semantic_shield"),
                 ("-a", "blended", "-d", "none", "--seed", "1")):
        proc = sb("run", "--preset", "smoke", *args, "-q", "-o", "R", cwd=root)
        assert proc.returncode == 0, proc.stderr[-3000:]
    old = os.umask(UMASK)  # the child inherits it
    try:
        proc = sb("report", "-o", "R", cwd=root)
    finally:
        os.umask(old)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root / "R"


@pytest.mark.slow
@needs_cli
def test_page_says_what_was_run_and_shows_the_leaderboard_in_percent(results):
    page_path = results / "report" / "index.html"
    assert mode(page_path) == 0o666 & ~UMASK  # the umask's mode, not mkstemp's 0600
    page = page_path.read_text(encoding="utf-8")
    record = json.loads(next((results / "runs").glob("badnets__none__*/record.json")).read_text())
    for fact in ("badnets", "blended", "semantic_shield", "micro-vit", "synthetic", "smoke",
                 f"torch {record['versions']['torch']}", f"shieldbench {record['versions']['shieldbench']}",
                 f"open_clip {record['versions']['open_clip_torch']}", str(results.resolve())):
        assert html.escape(fact) in page, fact
    assert ">3 (3 ok)<" in page  # three runs, all finished
    # Percent with one decimal, as the markdown and LaTeX tables print them; n per row.
    board = pd.read_csv(results / "leaderboard.csv")
    row = board[(board["attack"] == "badnets") & (board["defense"] == "none")].iloc[0]
    assert f">{100 * row['clean_top1_mean']:.1f}</td>" in page and f">{100 * row['asr_mean']:.1f}</td>" in page
    assert 'title="seeds averaged">n</th>' in page and '<td class="num">1</td>' in page
    assert "mean ± std" in page
    # The smoke note sits above the table.
    note = page.index(html.escape(SMOKE_NOTE))
    assert note < page.index("<table")
    for name in FIGURES:
        assert f'src="{name}"' in page
    assert "Not drawn" not in page


@pytest.mark.slow
@needs_cli
def test_figures_are_real_pictures(results):
    for name in FIGURES:
        path = results / "report" / name
        assert mode(path) == 0o666 & ~UMASK, name
        with Image.open(path) as im:
            assert im.format == "PNG"
            assert im.width >= 400 and im.height >= 250, (name, im.size)
            colours = im.convert("RGB").getcolors(maxcolors=1 << 20)
            assert colours is None or len(colours) > 50, name  # not one flat colour
    # The attention figure has both panels: clean/triggered x 4 images, without and with the defense.
    with Image.open(results / "report" / "attention.png") as im:
        assert im.width > 2 * im.height


def _browser() -> str | None:
    return next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


@pytest.mark.slow
@needs_cli
@pytest.mark.skipif(_browser() is None, reason="no chromium, chromium-browser or google-chrome on PATH: "
                                               "the headless screenshot of the report is not taken")
def test_page_renders_in_a_headless_browser(results, tmp_path):
    shot = tmp_path / "shot.png"
    proc = subprocess.run(
        [_browser(), "--headless", "--disable-gpu", "--no-sandbox", f"--user-data-dir={tmp_path / 'profile'}",
         f"--screenshot={shot}", "--window-size=1400,1800", (results / "report" / "index.html").resolve().as_uri()],
        capture_output=True, text=True, timeout=180)
    assert shot.is_file(), proc.stderr[-2000:]
    with Image.open(shot) as im:
        rgb = im.convert("RGB")
        assert rgb.size == (1400, 1800)
        colours = rgb.getcolors(maxcolors=1 << 22)
        assert colours is None or len(colours) > 100  # text, table rules, figures
        grey = rgb.convert("L")
        non_white = sum(n for v, n in enumerate(grey.histogram()) if v < 245) / (rgb.width * rgb.height)
        assert non_white > 0.03, non_white


# -- without the command: leaderboards by hand ------------------------------------------------------------
def _record(attack: str, defense: str, seed: int, asr: float, ca: float, preset: str = "small",
            status: str = "ok", variant: str | None = None) -> dict:
    options = {"variant": variant} if variant else {}
    spec = {"preset": preset, "seed": seed, "attack": {"name": attack, "target": "banana"},
            "defense": {"name": defense, "options": options}}
    return {"run_id": f"{attack}__{defense}__{variant}__{preset}__seed{seed}", "status": status, "attack": attack,
            "defense": defense, "model": "tiny-vit", "dataset": "synthetic", "preset": preset, "seed": seed,
            "spec": spec, "metrics": {"asr": asr, "clean_top1": ca} if status == "ok" else {},
            "error": "RuntimeError: <script>alert(1)</script>" if status != "ok" else "",
            "artifacts": {"train": {"key": f"k{attack}{defense}{seed}"}},
            "versions": {"shieldbench": "9.9.9", "torch": "2.0.0", "open_clip_torch": "2.24.0"},
            "finished": f"2026-01-0{seed + 1}T10:00:00+00:00"}


def _folder(root: Path, records: list[dict]) -> Path:
    for r in records:
        path = root / "runs" / r["run_id"] / "record.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(r))
    L.rebuild(root)
    return root


def test_heatmap_columns_start_with_the_undefended_model():
    records = [_record(a, d, 0, 0.5, 0.9) for a in ("wanet", "badnets", "none")
               for d in ("roclip", "semantic_shield", "none", "cleanclip")]
    board = L.leaderboard_frame(L.runs_frame(records))
    table = plots.heatmap_table(board)
    assert list(table.columns) == ["none", "cleanclip", "roclip", "semantic_shield"]
    assert list(table.index) == ["none", "badnets", "wanet"]  # the no-attack control first too
    # Settings of the control stay with it; missing names (a corrupt record's row) are left out.
    assert plots.control_first(["b", "none [x=1]", "a", "none", float("nan"), ""]) == ["none", "none [x=1]", "a", "b"]


def test_cells_are_percent_mean_std_with_n_and_smoke_rows_are_marked():
    records = [_record("badnets", "none", s, asr, ca) for s, asr, ca in ((0, 0.97, 0.968), (1, 0.96, 0.970))]
    records += [_record("badnets", "semantic_shield", 0, 0.1, 0.9, preset="smoke")]
    board = L.leaderboard_frame(L.runs_frame(records))
    t = report.table(board, report.shown_metrics(board))
    assert t["context"] == ["preset"]  # the only column that varies is shown; model and dataset go to the header
    none = next(r for r in t["rows"] if r["defense"] == "none")
    clean, asr = none["cells"][0], none["cells"][1]
    assert none["n"] == 2 and clean["text"] == "96.9 ± 0.1" and asr["text"] == "96.5 ± 0.7"
    assert "n=2" in clean["title"] and "95% t-interval" in clean["title"]
    shield = next(r for r in t["rows"] if r["defense"] == "semantic_shield")
    assert shield["cells"][0]["text"] == "90.0" and shield["mark"] == "†" and none["mark"] == ""
    assert report.smoke_note(board).startswith("1 of 2 rows (marked †)") and SMOKE_NOTE in report.smoke_note(board)
    assert report.smoke_note(board[board["preset"] == "small"]) == ""


def test_report_without_a_usable_shield_model_says_why_and_escapes_user_text(tmp_path):
    records = [_record("badnets", "none", 0, 0.9, 0.9), _record("badnets", "none", 1, 0.8, 0.9),
               _record("badnets", "semantic_shield", 0, 0.1, 0.9),  # its model was never in this cache
               _record("blended", "none", 0, 0.0, 0.0, status="failed")]
    root = _folder(tmp_path / "R", records)
    (root / "runs" / "broken").mkdir()
    (root / "runs" / "broken" / "record.json").write_text("{not json")
    page = report.write_report(root).read_text(encoding="utf-8")
    assert "Not drawn: the model of badnets__semantic_shield" in page and "no longer in the cache" in page
    assert not (root / "report" / "attention.png").exists()
    assert (root / "report" / "asr_heatmap.png").is_file() and (root / "report" / "tradeoff.png").is_file()
    assert "&lt;script&gt;" in page and "<script>" not in page  # autoescaped
    assert "1 unreadable record skipped" in page and "broken" in page
    assert "shieldbench 9.9.9" in page and "2026-01-02 10:00 UTC" in page
    assert "85.0 ± 7.1" in page  # badnets/none over two seeds
    assert html.escape(SMOKE_NOTE) not in page  # no smoke rows, no note

    no_shield = [r for r in records if r["defense"] != "semantic_shield"]
    path, why = plots.attention_figure(root, no_shield, tmp_path / "a.png")
    assert path is None and "no finished semantic_shield run" in why


def test_pick_attention_pair_prefers_same_model_and_seed():
    shield = _record("badnets", "semantic_shield", 1, 0.1, 0.9)
    other_seed, same_seed = _record("badnets", "none", 0, 0.9, 0.9), _record("badnets", "none", 1, 0.9, 0.9)
    assert plots.pick_attention_pair([other_seed, shield, same_seed]) == (shield, same_seed)
    assert plots.pick_attention_pair([shield, _record("blended", "none", 1, 0.9, 0.9)]) == (shield, None)
    assert plots.pick_attention_pair([same_seed]) == (None, None)


def test_tradeoff_error_bars_only_where_there_is_a_spread(tmp_path):
    records = [_record(a, d, s, 0.5 + 0.1 * s, 0.8 + 0.01 * s) for a in ("badnets", "blended", "wanet", "label_consistent")
               for d in ("none", "roclip") for s in (0, 1)]
    records.append(_record("targeted", "cleanclip", 0, 0.2, 0.7))  # n=1: no error bar, still a point
    board = L.leaderboard_frame(L.runs_frame(records))
    assert plots._std(board["asr_std"].iloc[0]) is not None and plots._std(math.nan) is None
    path = plots.tradeoff(board, tmp_path / "t.png")
    with Image.open(path) as im:
        assert im.width > im.height  # five panels on a 3-column grid


def test_template_ships_with_the_package():
    assert resources.files("shieldbench").joinpath("templates", "report.html.j2").is_file()
