"""Bad inputs answered in one line, malformed files survived (issue: hardening). Each case is a named test."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cli_helpers import EXE, needs_cli
from shieldbench.benchmark import leaderboard as L
from shieldbench.errors import UserError
from shieldbench.spec import build_spec, parse_overrides


def _record(run_id: str, seed: int, asr: float) -> dict:
    spec = {"preset": "small", "seed": seed, "attack": {"name": "badnets", "target": "banana", "options": {}},
            "defense": {"name": "none", "options": {}}}
    return {"run_id": run_id, "status": "ok", "attack": "badnets", "defense": "none", "model": "tiny-vit",
            "dataset": "synthetic", "preset": "small", "seed": seed, "spec": spec,
            "metrics": {"asr": asr, "clean_top1": 0.9}}


@pytest.mark.parametrize("bad", ["[]", "42", '"text"', '{"status": "ok", "metrics": "x"}',
                                 '{"status": "ok", "metrics": {"asr": "high"}}', "{not json", "DIR"])
def test_a_malformed_record_is_one_corrupt_row_and_the_rest_is_built(tmp_path, bad):
    for i, asr in enumerate((0.9, 0.7)):
        d = tmp_path / "runs" / f"good{i}"
        d.mkdir(parents=True)
        (d / "record.json").write_text(json.dumps(_record(f"good{i}", i, asr)))
    broken = tmp_path / "runs" / "broken"
    broken.mkdir()
    if bad == "DIR":
        (broken / "record.json").mkdir()
    else:
        (broken / "record.json").write_text(bad)
    runs, board = L.rebuild(tmp_path)
    status = dict(zip(runs["run_id"], runs["status"]))
    assert status == {"good0": "ok", "good1": "ok", "broken": "corrupt"}
    row = board[board["attack"] == "badnets"].iloc[0]
    assert row["n_seeds"] == 2 and row["asr_mean"] == pytest.approx(0.8)


def test_a_corrupt_own_record_is_not_a_finished_cell(tmp_path):
    from shieldbench.benchmark.runner import finished_record, record_path, run_id_for

    spec = build_spec("smoke")
    path = record_path(tmp_path, run_id_for(spec))
    path.parent.mkdir(parents=True)
    for text in ("{not json", "[]", '{"status": "ok", "metrics": "x"}'):
        path.write_text(text)
        assert finished_record(spec, tmp_path) is None


@pytest.mark.parametrize("value", ["Infinity", "-Infinity", "1e999", "NaN", "inf"])
def test_non_finite_numbers_are_refused_with_the_field_named(value):
    with pytest.raises(UserError, match=r"train\.grad_clip.*not a finite number"):
        build_spec("smoke", None, parse_overrides([f"train.grad_clip={value}"]))


@pytest.mark.parametrize("preset", ["", "[1]", "nope"])
def test_a_bad_or_empty_preset_is_an_error_not_small(preset):
    with pytest.raises(UserError, match="unknown preset"):
        build_spec(preset)
    with pytest.raises(UserError, match="unknown preset"):
        build_spec(None, None, parse_overrides([f"preset={preset}"]))


def _one_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-1500:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


@needs_cli
def test_cli_bad_inputs_are_one_line(tmp_path):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "raises.py").write_text("raise RuntimeError('boom')\n")
    (tmp_path / "syntax.py").write_text("def (\n")
    (tmp_path / "c.toml").write_text("data = 1\n")
    cases = {
        ("run", "--preset", "smoke", "-o", "afile"): "not a folder",
        ("grid", "--preset", "smoke", "-o", "afile"): "not a folder",
        ("leaderboard", "-o", "afile"): "not a folder",
        ("grid", "--preset", "smoke", "--seeds", "-1", "--dry-run"): "allowed [0, inf]",
        ("run", "--preset", "", "--dry-run"): "unknown preset ''",
        ("run", "--set", "train.grad_clip=Infinity", "--dry-run"): "not a finite number",
        ("run", "--set", "preset=[1]", "--dry-run"): "unknown preset",
        ("list", "--plugin", "./raises.py"): "RuntimeError: boom",
        ("list", "--plugin", "./syntax.py"): "SyntaxError",
        ("list", "--plugin", ""): "--plugin",
        ("run", "-c", "c.toml", "--dry-run"): "[data] must be a table",  # not eaten as rich markup
    }
    for args, expected in cases.items():
        line = _one_line(subprocess.run([EXE, *args], cwd=tmp_path, capture_output=True, text=True, timeout=300))
        assert expected in line, (args, line)
    assert not (tmp_path / "results").exists()  # nothing was written by any of them


@needs_cli
def test_leaderboard_unknown_metric_and_columnless_csv(tmp_path):
    res = tmp_path / "r"
    (res / "runs" / "a").mkdir(parents=True)
    (res / "runs" / "a" / "record.json").write_text(json.dumps(_record("a", 0, 0.5)))
    line = _one_line(subprocess.run([EXE, "leaderboard", "-o", str(res), "--metrics", "nosuch"], capture_output=True,
                                    text=True, timeout=300))
    assert "nosuch" in line and "asr" in line
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "leaderboard.csv").write_text("x,y\n1,2\n")
    line = _one_line(subprocess.run([EXE, "leaderboard", "-o", str(tmp_path / "s"), "--no-rebuild"],
                                    capture_output=True, text=True, timeout=300))
    assert "corrupt leaderboard file" in line and "attack" in line


# -- the knowledge cache: no line trusted blindly -------------------------------------------------

def _lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_tampered_knowledge_cache_lines_are_rejected_and_re_extracted(tmp_path, capsys):
    from shieldbench.knowledge import make_knowledge_source
    from shieldbench.knowledge.base import MAX_PHRASE_CHARS, caption_key
    from shieldbench.knowledge.lexicon import lexicon_knowledge

    caps = ["a red kite in the sky", "a blue tent on grass", "a green star", "a small yellow boat", "an old brown dog"]
    src = make_knowledge_source("lexicon", k=3, cache_dir=str(tmp_path))
    truth = src(caps)
    path = src.cache.path
    good = _lines(path)
    assert [r["caption"] for r in good] == caps and capsys.readouterr().err == ""

    wrong_key = dict(good[0], key=caption_key(caps[1]), knowledge=["evil", "evil", "evil"])  # caption 0 under 1's key
    long_phrase = dict(good[1], knowledge=["x" * 5000, "blue tent", "grass"])
    too_few = dict(good[2], knowledge=["green star"])
    # Caption 3 keeps its good line; a later line for it with a phrase one over the bound must not replace it.
    late_bad = dict(good[3], knowledge=["y" * (MAX_PHRASE_CHARS + 1), "boat", "small"])
    torn = json.dumps(good[4])[:25]  # a crash mid-write: the last line cut short, no newline
    path.write_text("\n".join(json.dumps(o) for o in (wrong_key, long_phrase, too_few, good[3], late_bad)) + "\n" + torn)

    stale = path.parent / f".{path.name}.k1ll.tmp"  # a compaction killed mid-write
    stale.write_text("half")
    calls: list[list[str]] = []
    again = make_knowledge_source("lexicon", k=3, cache_dir=str(tmp_path))
    orig = again._extract_batch
    again._extract_batch = lambda c: calls.append(list(c)) or orig(c)
    assert again.cache.rejected_lines == 5 and len(again.cache) == 1
    assert again.cache.rejected == {"key is not the SHA-256 of its caption": 1, "not exactly 3 phrases": 1,
                                    f"a phrase that is empty, not printable text or over {MAX_PHRASE_CHARS} "
                                    "characters": 2, "torn or not JSON": 1}
    out = again(caps)
    # Exactly the four captions without a valid line are extracted again, and the answers are the true ones.
    assert calls == [[caps[0], caps[1], caps[2], caps[4]]]
    assert out == truth == [lexicon_knowledge(c, 3) for c in caps]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "5 line(s) rejected" in err[0] and str(path) in err[0], err
    # The file now holds one valid line per caption; a third reader warns about nothing and extracts nothing.
    assert sorted(r["caption"] for r in _lines(path)) == sorted(caps)
    assert not stale.exists()
    third = make_knowledge_source("lexicon", k=3, cache_dir=str(tmp_path))
    third._extract_batch = lambda c: pytest.fail(f"re-extracted {c}")
    assert third(caps) == truth and third.cache.rejected_lines == 0
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("line, reason", [
    ('["a list"]', "not a JSON object"),
    ('{"key": "k", "knowledge": ["a", "b", "c"]}', "no caption text"),
    ('{"caption": "a dog", "knowledge": ["a", "b", "c"]}', "key is not"),  # no key at all
    ('{"caption": "a dog", "key": "KEY", "knowledge": ["a", "", "c"]}', "a phrase"),
    ('{"caption": "a dog", "key": "KEY", "knowledge": ["a", "b", 7]}', "a phrase"),
    ('{"caption": "a dog", "key": "KEY", "knowledge": ["a", "b\\u0000", "c"]}', "a phrase"),
    ('{"caption": "a dog", "key": "KEY", "knowledge": "a, b, c"}', "not exactly 3"),
    ('{"caption": "a dog", "key": "KEY", "knowledge": ["a", "b", "c", "d"]}', "not exactly 3"),
    ('{"caption": "a dog", "key": "KEY", "knowledge": ["a", "b", "c"], "found": "a"}', "found"),
    ('{"caption": "a dog", "key": "KEY", "knowledge": ["a", "b", "c"], "flagged": "no"}', "flagged"),
])
def test_each_kind_of_bad_cache_line_is_named(tmp_path, line, reason):
    from shieldbench.knowledge.base import KnowledgeCache, caption_key

    path = tmp_path / "c.jsonl"
    ok = {"caption": "a cat", "key": caption_key("a cat"), "knowledge": ["fur", "whiskers", "tail"]}
    path.write_text(json.dumps(ok) + "\n" + line.replace("KEY", caption_key("a dog")) + "\n")
    cache = KnowledgeCache(path, k=3)
    assert "a cat" in cache and "a dog" not in cache and cache.rejected_lines == 1
    assert reason in next(iter(cache.rejected)), cache.rejected


def test_a_source_never_writes_a_line_its_reader_would_reject(tmp_path):
    from shieldbench.knowledge import make_knowledge_source
    from shieldbench.knowledge.base import MAX_PHRASE_CHARS, KnowledgeCache

    ke = tmp_path / "ke.jsonl"
    ke.write_text(json.dumps({"caption": "a dog", "knowledge": ["z" * (MAX_PHRASE_CHARS + 1), "fur", "ctrl\u0007x"]}))
    src = make_knowledge_source("file", k=3, path=str(ke), cache_dir=str(tmp_path / "cache"))
    (out,) = src(["a dog"])
    assert out[0] == "fur" and all(len(p) <= MAX_PHRASE_CHARS and p.isprintable() for p in out)
    assert src.flagged(["a dog"])  # only one usable phrase was found: flagged, padded from the caption's words
    assert KnowledgeCache(src.cache.path, k=3).rejected_lines == 0


# -- knowledge extract: the captions file is read as written, never re-split -------------------------

ONE_COLUMN = ('caption\na red kite, flying high\n"a dog, a cat and a ""ball"""\na blue tent\n\n'
              'stripes, dots, and a star\n')


@pytest.mark.parametrize("name, text, column, expected", [
    ("one.csv", ONE_COLUMN, "caption",
     ["a red kite, flying high", 'a dog, a cat and a "ball"', "a blue tent", "stripes, dots, and a star"]),
    # Every line holds a "t", the letter pandas' sniffer split the header "caption" at.
    ("plain.csv", "caption\na red kite\na blue tent\na green star\n", "caption",
     ["a red kite", "a blue tent", "a green star"]),
    ("two.tsv", "id\ttext\n1\ta red kite, flying high\n2\ta dog; a cat\n3\tthe end, at last.\n", "text",
     ["a red kite, flying high", "a dog; a cat", "the end, at last."]),
    ("two.txt", "caption\tother\na, b, c\t1\nd, e\t2\n", "caption", ["a, b, c", "d, e"]),
    ("two.csv", 'filepath,caption\nx.jpg,"a dog, running"\ny.jpg,a cat\n', "caption", ["a dog, running", "a cat"]),
    ("bom.csv", "\ufeffcaption\na dog, a cat\n", "caption", ["a dog, a cat"]),
])
def test_captions_files_are_not_mis_split(tmp_path, name, text, column, expected):
    from shieldbench.knowledge import make_knowledge_source
    from shieldbench.knowledge.cli import extract_file, read_captions

    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    assert read_captions(path, column) == expected
    out = tmp_path / "ke.jsonl"
    res = extract_file(path, "unused", out, column=column, show_progress=False,
                       source=make_knowledge_source("lexicon", k=3, cache_file=str(out)))
    assert res["new"] == len(expected) and [r["caption"] for r in _lines(out)] == expected


@pytest.mark.parametrize("text, needle", [
    ("id\tcaption\n1\ta dog\n2\ta cat\textra\n", ":3: 3 fields where the header has 2"),
    ("id,caption\n1,a dog, a cat\n", ":2: 3 fields where the header has 2 (delimiter ','); quote"),
    ("id,text\n1,a dog\n", "no column 'caption'; columns: id, text"),
    ("", "empty"),
])
def test_a_captions_file_that_does_not_fit_its_header_is_one_line(tmp_path, text, needle):
    from shieldbench.knowledge.cli import read_captions

    path = tmp_path / "c.csv"
    path.write_text(text)
    with pytest.raises(UserError) as info:
        read_captions(path, "caption")
    assert needle in str(info.value)


@needs_cli
def test_cli_extract_refuses_a_ragged_tsv_in_one_line(tmp_path):
    (tmp_path / "c.tsv").write_text("id\tcaption\n1\ta dog\n2\ta cat\textra\n")
    line = _one_line(subprocess.run([EXE, "knowledge", "extract", "--captions", "c.tsv", "--model", "none",
                                     "--out", "o.jsonl"], cwd=tmp_path, capture_output=True, text=True, timeout=300))
    assert "c.tsv:3: 3 fields where the header has 2" in line
    assert not (tmp_path / "o.jsonl").exists()


# -- --set: a key given twice is an error, never "the last wins" -------------------------------------

def test_a_set_key_given_twice_is_an_error_naming_it():
    with pytest.raises(UserError, match=r"--set train\.lr is given twice \('0\.1' and '0\.2'\)"):
        parse_overrides(["train.lr=0.1", "train.lr=0.2"])
    with pytest.raises(UserError, match="seed is given twice"):
        parse_overrides(["seed=1", " seed = 1"])  # the same value twice too: one rule, no guessing
    tree = parse_overrides(["train.lr=0.1", "base.lr=0.2", "attack.size=3", "attack.poison_rate=0.1"])
    assert tree == {"train": {"lr": 0.1}, "base": {"lr": 0.2}, "attack": {"size": 3, "poison_rate": 0.1}}


@needs_cli
def test_cli_set_key_given_twice_is_one_line(tmp_path):
    proc = subprocess.run([EXE, "run", "--preset", "smoke", "--set", "train.lr=0.1", "--set", "train.lr=0.2"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert "--set train.lr is given twice" in _one_line(proc)
    assert list(tmp_path.iterdir()) == []  # refused before anything was written
