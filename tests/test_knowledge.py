"""Knowledge sources: exactly-k output, caption-text only, cache/resume, LLM parser and CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from shieldbench.knowledge import knowledge_source_for, make_knowledge_source
from shieldbench.knowledge.base import KnowledgeCache, KnowledgeRecord, caption_key, fit_to_k
from shieldbench.knowledge.lexicon import lexicon_knowledge, lexicon_phrases
from shieldbench.knowledge.llm import parse_knowledge
from shieldbench.registry import KNOWLEDGE
from shieldbench.spec import DataSpec

EXE = shutil.which("shieldbench")


# -- registry / common interface --------------------------------------------------------------

def test_builtin_sources_registered():
    assert {"synthetic", "llm", "file", "lexicon"} <= set(KNOWLEDGE.names())


def test_knowledge_source_for_keeps_signature():
    src = knowledge_source_for(DataSpec(knowledge_k=4))
    out = src(["a red banana on a dark background", "a photo of a kite."])
    assert all(len(k) == 4 for k in out)
    assert knowledge_source_for(DataSpec(dataset="other")) is None
    assert knowledge_source_for(DataSpec(dataset="other"), source="lexicon")(["a red kite"])[0][0] == "red kite"


def test_synthetic_source_reads_caption_text_only():
    from shieldbench.data.synthetic import knowledge_from_caption

    src = make_knowledge_source("synthetic", k=3)
    poisoned = "a photo of a banana."  # e.g. on a triggered kite image: only the text matters
    assert src([poisoned]) == [knowledge_from_caption(poisoned, 3)]
    assert any("curved" in ke or "crescent" in ke for ke in src([poisoned])[0])
    # Same caption text -> same KEs, whatever the pair's image (the source never gets one).
    assert src([poisoned, poisoned])[0] == src([poisoned, poisoned])[1]


def test_lexicon_chunks_and_exactly_k():
    assert lexicon_phrases("a large cyan donut with a hole in the middle on a striped background") == [
        "large cyan donut", "striped background", "hole", "middle"]
    for k in (1, 3, 6):
        for cap in ("", "a photo.", "a dog", "two shaggy dogs playing with a red ball on green grass"):
            ke = lexicon_knowledge(cap, k)
            assert len(ke) == k and len(set(ke)) == k
    src = make_knowledge_source("lexicon", k=3)
    assert src(["a red kite"])[0] == lexicon_knowledge("a red kite", 3)


def test_fit_to_k_pads_and_truncates():
    assert fit_to_k(["a", "b", "c", "d"], 2) == ("a", "b")
    assert fit_to_k(["a", "A "], 3, ["x"]) == ("a", "x", "visual detail 1")


def test_file_source_per_caption_and_per_class(tmp_path):
    f = tmp_path / "ke.jsonl"
    f.write_text("\n".join(json.dumps(o) for o in [
        {"caption": "a dog on grass", "knowledge": ["shaggy fur", "wagging tail", "green grass", "four legs"]},
        {"class": "boat", "knowledge": [["hull", "sail"], "mast"]},
        {"class": "dog", "knowledge": ["snout", "floppy ears"]},
    ]) + "\n")
    src = make_knowledge_source("file", k=3, path=str(f))
    out = src(["a dog on grass", "A  dog on GRASS", "two boats and a dog", "a cat"])
    assert out[0] == ("shaggy fur", "wagging tail", "green grass")
    assert out[1] == out[0]  # whitespace/case-normalised match
    assert out[2] == ("hull", "snout", "sail")  # classes in order of mention, interleaved
    assert len(out[3]) == 3 and src.flagged(["a cat"])  # nothing found: flagged, padded, kept
    assert not src.flagged(["a dog on grass"])


def test_file_source_errors_are_user_errors(tmp_path):
    from shieldbench.errors import UserError

    with pytest.raises(UserError, match="not found"):
        make_knowledge_source("file", k=3, path=str(tmp_path / "none.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"knowledge": ["x"]}\n')
    with pytest.raises(UserError, match="bad.jsonl:1"):
        make_knowledge_source("file", k=3, path=str(bad))


# -- cache ------------------------------------------------------------------------------------

def test_cache_is_keyed_by_caption_hash_and_survives_a_torn_line(tmp_path):
    path = tmp_path / "c.jsonl"
    cache = KnowledgeCache(path)
    cache.add([KnowledgeRecord("a red kite", ("red kite", "x", "y"))])
    with open(path, "a") as fh:
        fh.write('{"key": "abc", "caption": "tor')  # crash mid-write
    again = KnowledgeCache(path)
    assert "a red kite" in again and again.skipped_lines == 1
    assert json.loads(path.read_text().splitlines()[0])["key"] == caption_key("a red kite")
    again.add([KnowledgeRecord("a blue tent", ("blue tent", "x", "y"))])
    third = KnowledgeCache(path)
    assert len(third) == 2 and third.get("a blue tent").knowledge == ("blue tent", "x", "y")


def test_source_cache_dir_resumes_without_recomputing(tmp_path):
    src = make_knowledge_source("lexicon", k=3, cache_dir=str(tmp_path))
    src(["a red kite", "a blue tent"])
    calls = []
    src2 = make_knowledge_source("lexicon", k=3, cache_dir=str(tmp_path))
    orig = src2._extract_batch
    src2._extract_batch = lambda caps: calls.append(list(caps)) or orig(caps)
    src2(["a red kite", "a blue tent", "a green star"])
    assert calls == [["a green star"]]


# -- LLM answer parser --------------------------------------------------------------------------

@pytest.mark.parametrize("answer, expected", [
    ("1. shaggy hair\n2. wagging tail\n3. green grass", ["shaggy hair", "wagging tail", "green grass"]),
    ("Sure! Here are 3 visual knowledge elements:\n\n1) Shaggy hair.\n2) **Wagging tail**\n3) Green grass\n\n"
     "Note: these are visible.", ["shaggy hair", "wagging tail", "green grass"]),
    ("- shaggy hair\n* wagging tail\n\u2022 green grass", ["shaggy hair", "wagging tail", "green grass"]),
    ("['shaggy hair', 'wagging tail', \"green grass\"]", ["shaggy hair", "wagging tail", "green grass"]),
    ('Answer: ["shaggy hair", "wagging tail"]', ["shaggy hair", "wagging tail"]),
    ("shaggy hair, wagging tail, green grass.", ["shaggy hair", "wagging tail", "green grass"]),
    ("Here you go:\nshaggy hair; wagging tail and green grass", ["shaggy hair", "wagging tail", "green grass"]),
    ("1. shaggy hair 2. wagging tail 3. green grass", ["shaggy hair", "wagging tail", "green grass"]),
    ("1. Shaggy hair - the dog's fur is long\n2. Knowledge element: wagging tail\n3. shaggy hair",
     ["shaggy hair", "wagging tail"]),
    ("", []),
    ("I cannot answer that because the caption is about an abstract idea of freedom and love in general.", []),
])
def test_parse_noisy_answers(answer, expected):
    assert parse_knowledge(answer) == expected


def test_llm_record_flags_short_answers_and_pads():
    from shieldbench.knowledge.llm import LlmSource

    src = LlmSource(k=3, model="unused")
    src.generate = lambda caps: ["1. wagging tail", "1. a\n2. b\n3. c\n4. d"][: len(caps)]
    src._lm = object()  # never loaded
    out = src(["a dog running on green grass", "x"])
    assert out[0][0] == "wagging tail" and len(out[0]) == 3
    assert out[1] == ("a", "b", "c")
    assert [r["caption"] for r in src.report] == ["a dog running on green grass"]


# -- a tiny real causal LM, built offline ----------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    torch = pytest.importorskip("torch")
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-lm")
    corpus = ["list strictly 3 low-level visual knowledge elements present in an image with this caption",
              "1. shaggy hair 2. wagging tail 3. green grass", "- red ball", "a dog on grass, a boat, a kite",
              "avoid abstract concepts answer as a list with one short phrase per line caption"]
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=["<unk>", "<pad>", "<eos>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>")
    fast.save_pretrained(folder)
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(fast), n_layer=1, n_embd=32, n_head=2, n_positions=256,
                     bos_token_id=fast.eos_token_id, eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id)
    GPT2LMHeadModel(cfg).save_pretrained(folder)
    return str(folder)


def _captions_csv(tmp_path, n=7):
    import pandas as pd

    path = tmp_path / "data.csv"
    pd.DataFrame({"caption": [f"a dog number {i} on grass" for i in range(n)], "other": range(n)}).to_csv(path, index=False)
    return path


def test_tiny_lm_extraction_is_batched_greedy_and_resumable(tiny_lm, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from shieldbench.knowledge.cli import extract_file
    from shieldbench.knowledge.llm import LlmSource

    csv = _captions_csv(tmp_path)
    out = tmp_path / "ke.jsonl"
    res = extract_file(csv, tiny_lm, out, k=3, batch_size=3, limit=4, show_progress=False, max_new_tokens=8)
    assert res["new"] == 4 and res["remaining"] == 3
    first = {json.loads(line)["caption"]: json.loads(line) for line in out.read_text().splitlines()}
    assert len(first) == 4 and all(len(v["knowledge"]) == 3 for v in first.values())

    # Rerun: only the 3 missing captions are generated, in batches of at most 3.
    seen: list[list[str]] = []
    src = LlmSource(k=3, cache_file=str(out), model=tiny_lm, batch=3, max_new_tokens=8)
    orig = src.generate
    src.generate = lambda caps: seen.append(list(caps)) or orig(caps)
    res2 = extract_file(csv, tiny_lm, out, source=src, show_progress=False)
    assert res2["new"] == 3 and res2["cached"] == 4 and res2["remaining"] == 0
    assert sorted(c for b in seen for c in b) == sorted(set(_all(csv)) - set(first))
    assert all(len(b) <= 3 for b in seen)

    # Greedy + left padding: a caption's answer does not depend on its batch-mates.
    solo = LlmSource(k=3, model=tiny_lm, batch=1, max_new_tokens=8)
    caps = _all(csv)[:3]
    assert [solo.generate([c])[0] for c in caps] == solo.generate(caps)


def _all(csv):
    import pandas as pd

    return pd.read_csv(csv)["caption"].tolist()


@pytest.mark.skipif(EXE is None, reason="shieldbench is not installed")
def test_cli_extract_and_one_line_errors(tiny_lm, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", COLUMNS="200")

    def sb(*args):
        return subprocess.run([EXE, "knowledge", "extract", *args], capture_output=True, text=True, env=env,
                              cwd=tmp_path, timeout=300)

    csv = _captions_csv(tmp_path, n=3)
    ok = sb("--captions", str(csv), "--model", tiny_lm, "--out", "ke.jsonl", "--k", "2", "--batch-size", "2",
            "--max-new-tokens", "6", "-q")
    assert ok.returncode == 0, ok.stderr
    assert len((tmp_path / "ke.jsonl").read_text().splitlines()) == 3
    again = sb("--captions", str(csv), "--model", tiny_lm, "--out", "ke.jsonl", "--k", "2", "-q")
    assert again.returncode == 0 and "0 extracted now, 3 already" in again.stdout
    for args, needle in [
        (("--captions", "missing.csv", "--model", tiny_lm, "--out", "o.jsonl"), "captions file not found"),
        (("--captions", str(csv), "--column", "text", "--model", tiny_lm, "--out", "o.jsonl"), "no column 'text'"),
        (("--captions", str(csv), "--model", "nosuch-org/nosuch-model", "--out", "o.jsonl"), "cannot load language model"),
    ]:
        proc = sb(*args)
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        assert proc.returncode == 2 and len(lines) == 1 and needle in lines[0], proc.stderr
