"""The CSV, zero-shot and retrieval readers on real files (scikit-learn's digits, see tests/digits.py)."""

from __future__ import annotations

import csv
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from digits import NAMES
from shieldbench.data.formats.csv import read_csv_pairs
from shieldbench.data.formats.zeroshot import (COCO_CLASSNAMES, balanced_prefix, load_classnames, load_templates,
                                               read_retrieval_csv, read_zeroshot)
from shieldbench.data.images import FileImages
from shieldbench.errors import UserError

SORTED_NAMES = ["eight", "five", "four", "nine", "one", "seven", "six", "three", "two", "zero"]


def rows_of(path: Path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f, delimiter="\t"))[1:]


def png_pixels(path: str | Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as img:
        return np.asarray(img.convert("RGB").resize((32, 32))).transpose(2, 0, 1)


def one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


# -- read_csv_pairs -------------------------------------------------------------------------------
def test_csv_pairs_rows_captions_and_pixels(digits):
    pairs = read_csv_pairs(str(digits.train_csv), "filepath", "title", "\t", 32, 0)
    rows = rows_of(digits.train_csv)
    assert len(pairs) == digits.n_train == 1438 == len(rows)
    assert isinstance(pairs.images, FileImages) and pairs.images.shape == (1438, 3, 32, 32)
    assert pairs.captions == [r[1] for r in rows]
    assert pairs.ids == [r[0] for r in rows] and pairs.ids[0] == "images/00000.png"
    assert pairs.labels is None
    for i in (0, 7, 1437):
        got = pairs.images[i]
        assert got.dtype == torch.uint8
        assert np.array_equal(got.numpy(), png_pixels(digits.root / rows[i][0]))
    batch = pairs.images[[3, 4]]
    assert batch.shape == (2, 3, 32, 32) and torch.equal(batch[1], pairs.images[4])


def test_csv_pairs_relative_paths_from_another_cwd_and_escaped_tab(digits, tmp_path, monkeypatch):
    rel = os.path.relpath(digits.train_csv, tmp_path)
    monkeypatch.chdir(tmp_path)
    pairs = read_csv_pairs(rel, "filepath", "title", "\\t", 32, 5)  # the spec's two-character "\t"
    assert len(pairs) == 5 and pairs.captions == [r[1] for r in rows_of(digits.train_csv)[:5]]
    monkeypatch.chdir(digits.root / "coco")  # decoding must not depend on the cwd either
    assert np.array_equal(pairs.images[2].numpy(), png_pixels(digits.root / "images" / "00002.png"))


def test_csv_pairs_absolute_paths_and_empty_captions(tmp_path, digits):
    png = digits.root / "images" / "00001.png"
    (tmp_path / "abs.csv").write_text(f"img,text\n{png},\n{png},NA\n")
    pairs = read_csv_pairs(str(tmp_path / "abs.csv"), "img", "text", ",", 32, 0)
    assert pairs.captions == ["", "NA"] and pairs.ids == [str(png)] * 2
    assert pairs.images.paths[0] == str(png)


def test_csv_pairs_errors(digits, tmp_path):
    with pytest.raises(UserError) as exc:
        read_csv_pairs(str(digits.train_csv), "path", "title", "\t", 32, 0)
    msg = one_line(exc)
    assert "'path'" in msg and "data.csv_img_key" in msg and "filepath, title" in msg
    with pytest.raises(UserError) as exc:
        read_csv_pairs(str(digits.train_csv), "filepath", "title", ",", 32, 0)  # wrong separator
    assert "has no column 'filepath'" in one_line(exc) and "separator" in str(exc.value)
    with pytest.raises(UserError) as exc:
        read_csv_pairs(str(tmp_path / "nope.csv"), "filepath", "title", "\t", 32, 0)
    assert one_line(exc) == f"CSV file not found: {tmp_path / 'nope.csv'}"
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(UserError) as exc:
        read_csv_pairs(str(tmp_path / "empty.csv"), "filepath", "title", "\t", 32, 0)
    assert "empty" in one_line(exc)
    (tmp_path / "header.csv").write_text("filepath\ttitle\n")
    with pytest.raises(UserError) as exc:
        read_csv_pairs(str(tmp_path / "header.csv"), "filepath", "title", "\t", 32, 0)
    assert "no rows" in one_line(exc)
    (tmp_path / "bad.csv").write_text('filepath,title\na.png,"unterminated\n')
    with pytest.raises(UserError) as exc:
        read_csv_pairs(str(tmp_path / "bad.csv"), "filepath", "title", ",", 32, 0)
    assert one_line(exc).startswith(f"cannot read CSV {tmp_path / 'bad.csv'}:")


# -- zero-shot sets -------------------------------------------------------------------------------
def test_zeroshot_folder(digits):
    z = read_zeroshot(str(digits.test_dir), 32, "", "openai", "filepath", "label", 0)
    assert z.classnames == SORTED_NAMES == sorted(NAMES)
    assert len(z) == digits.n_test and z.labels.dtype == torch.long
    paths = z.images.paths.tolist()
    assert [z.classnames[y] for y in z.labels.tolist()] == [Path(p).parent.name for p in paths]
    assert z.labels.tolist() == sorted(z.labels.tolist())  # class by class, files sorted within
    assert np.array_equal(z.images[0].numpy(), png_pixels(paths[0]))
    assert len(z.templates) == 80 and all(t.count("{}") == 1 for t in z.templates)
    assert z.templates[0].format("cat") == "a bad photo of a cat."


def test_zeroshot_csv_matches_folder(digits):
    folder = read_zeroshot(str(digits.test_dir), 32, "", "simple", "filepath", "label", 0)
    table = read_zeroshot(str(digits.test_csv), 32, "", "simple", "filepath", "label", 0)
    assert table.classnames == folder.classnames and table.templates == ["a photo of a {}."]
    by_file = {Path(p).name: int(y) for p, y in zip(folder.images.paths.tolist(), folder.labels)}
    got = {Path(p).name: int(y) for p, y in zip(table.images.paths.tolist(), table.labels)}
    assert got == by_file
    folder_row = {Path(p).name: j for j, p in enumerate(folder.images.paths.tolist())}
    i = 11
    assert torch.equal(table.images[i], folder.images[folder_row[Path(table.images.paths[i]).name]])


def test_zeroshot_csv_comma_indices_and_named_classes(digits, tmp_path):
    rows = rows_of(digits.test_csv)[:6]
    src = digits.root / "images"
    # Comma separated, absolute paths, class indices into a names file.
    names = tmp_path / "names.txt"
    names.write_text("\n".join(NAMES) + "\n\n")
    (tmp_path / "idx.csv").write_text("image,y\n" + "".join(f"{src / Path(p).name},{NAMES.index(c)}\n"
                                                            for p, c in rows))
    z = read_zeroshot(str(tmp_path / "idx.csv"), 32, str(names), "simple", "image", "y", 0)
    assert z.classnames == NAMES and [NAMES[y] for y in z.labels.tolist()] == [c for _, c in rows]
    with pytest.raises(UserError) as exc:  # indices need names
        read_zeroshot(str(tmp_path / "idx.csv"), 32, "", "simple", "image", "y", 0)
    assert "eval.classnames" in one_line(exc)
    # Names mapped onto a given vocabulary; an unknown name is an error.
    (tmp_path / "names.csv").write_text("image,y\n" + "".join(f"{src / Path(p).name},{c}\n" for p, c in rows))
    z = read_zeroshot(str(tmp_path / "names.csv"), 32, str(names), "simple", "image", "y", 0)
    assert [NAMES[y] for y in z.labels.tolist()] == [c for _, c in rows]
    (tmp_path / "bad.csv").write_text(f"image,y\n{src / '00000.png'},eleven\n")
    with pytest.raises(UserError) as exc:
        read_zeroshot(str(tmp_path / "bad.csv"), 32, str(names), "simple", "image", "y", 0)
    assert "'eleven' is not a known class" in one_line(exc)
    with pytest.raises(UserError) as exc:
        read_zeroshot(str(tmp_path / "bad.csv"), 32, "", "simple", "image", "label", 0)
    assert "'label' (eval.csv_label_key)" in one_line(exc) and "image, y" in str(exc.value)


def test_zeroshot_max_images_is_class_balanced(digits):
    z = read_zeroshot(str(digits.test_dir), 32, "", "simple", "filepath", "label", 20)
    assert len(z) == 20 and torch.bincount(z.labels, minlength=10).tolist() == [2] * 10
    full = read_zeroshot(str(digits.test_dir), 32, "", "simple", "filepath", "label", 0)
    assert set(z.images.paths.tolist()) <= set(full.images.paths.tolist())
    assert balanced_prefix(np.array([0, 0, 0, 1, 2, 2]), 4).tolist() == [0, 1, 3, 4]
    assert balanced_prefix(np.array([1, 0]), 5).tolist() == [0, 1]


def test_zeroshot_errors(digits, tmp_path):
    with pytest.raises(UserError) as exc:
        read_zeroshot(str(tmp_path / "missing"), 32, "", "simple", "filepath", "label", 0)
    assert str(tmp_path / "missing") in one_line(exc)
    (tmp_path / "flat").mkdir()
    with pytest.raises(UserError) as exc:
        read_zeroshot(str(tmp_path / "flat"), 32, "", "simple", "filepath", "label", 0)
    assert "no class sub-folders" in one_line(exc)
    (tmp_path / "flat" / "cat").mkdir()  # an empty class is fine, an empty set is not
    (tmp_path / "flat" / "cat" / "notes.txt").write_text("x")
    with pytest.raises(UserError) as exc:
        read_zeroshot(str(tmp_path / "flat"), 32, "", "simple", "filepath", "label", 0)
    assert "no images" in one_line(exc)
    (tmp_path / "flat" / "dog").mkdir()
    (tmp_path / "flat" / "dog" / "a.PNG").write_bytes((digits.root / "images" / "00000.png").read_bytes())
    z = read_zeroshot(str(tmp_path / "flat"), 32, "", "simple", "filepath", "label", 0)
    assert z.classnames == ["cat", "dog"] and z.labels.tolist() == [1]
    names = tmp_path / "three.txt"
    names.write_text("a\nb\nc\n")
    with pytest.raises(UserError) as exc:
        read_zeroshot(str(tmp_path / "flat"), 32, str(names), "simple", "filepath", "label", 0)
    assert "3 class names" in one_line(exc) and "2 class folders" in str(exc.value)


# -- class names and templates --------------------------------------------------------------------
def test_load_classnames(tmp_path):
    import open_clip

    wnids = [f"n{i:08d}" for i in range(1000)]
    assert load_classnames("", wnids) == list(open_clip.IMAGENET_CLASSNAMES)
    assert load_classnames("", wnids[:10]) == wnids[:10]  # not ImageNet-1K: the folder names
    assert load_classnames("imagenet", None)[:2] == ["tench", "goldfish"]
    assert load_classnames("coco", None) == COCO_CLASSNAMES and len(COCO_CLASSNAMES) == 80
    assert len(set(COCO_CLASSNAMES)) == 80 and "banana" in COCO_CLASSNAMES
    with pytest.raises(UserError) as exc:
        load_classnames(str(tmp_path / "none.txt"), None)
    assert str(tmp_path / "none.txt") in one_line(exc)


def test_load_templates(tmp_path):
    openai = load_templates("openai")
    assert len(openai) == 80 and all("{}" in t for t in openai)
    assert load_templates("simple") == ["a photo of a {}."]
    good = tmp_path / "t.txt"
    good.write_text("a {} here.\n\nthere is a {}.\n")
    assert load_templates(str(good)) == ["a {} here.", "there is a {}."]
    bad = tmp_path / "bad.txt"
    bad.write_text("a {} here.\nno slot\n")
    with pytest.raises(UserError) as exc:
        load_templates(str(bad))
    assert "line 2" in one_line(exc) and "no slot" in str(exc.value)
    with pytest.raises(UserError) as exc:
        load_templates(str(tmp_path / "missing.txt"))
    assert str(tmp_path / "missing.txt") in one_line(exc)


# -- retrieval ------------------------------------------------------------------------------------
def test_retrieval_csv(digits):
    r = read_retrieval_csv(str(digits.retrieval_csv), 32, "filepath", "title", "\t", SORTED_NAMES)
    rows = rows_of(digits.retrieval_csv)
    assert len(r) == digits.n_test and len(r.captions) == 2 * digits.n_test == len(rows)
    assert r.caption_image.tolist() == [j // 2 for j in range(len(rows))]
    assert r.captions == [c for _, c in rows]
    named = [next(n for n in NAMES if re.search(rf"\b{n}\b", c)) for c in r.captions]
    assert r.caption_labels.tolist() == [SORTED_NAMES.index(n) for n in named]
    assert r.image_labels.tolist() == r.caption_labels[::2].tolist()
    assert np.array_equal(r.images[1].numpy(), png_pixels(digits.root / rows[2][0]))
    # The separator is sniffed when the one given does not split the header.
    comma = read_retrieval_csv(str(digits.retrieval_csv), 32, "filepath", "title", ",", SORTED_NAMES)
    assert comma.captions == r.captions


def test_retrieval_csv_unlabelled_and_errors(digits, tmp_path):
    png = digits.root / "images" / "00000.png"
    other = digits.root / "images" / "00001.png"
    (tmp_path / "r.csv").write_text(f"filepath,title\n{png},a blank page\n{other},a cat\n{png},a seven\n")
    r = read_retrieval_csv(str(tmp_path / "r.csv"), 32, "filepath", "title", "\t", ["seven", "cat"])
    assert r.caption_image.tolist() == [0, 1, 0] and r.image_labels.tolist() == [0, 1]
    assert r.caption_labels.tolist() == [-1, 1, 0]
    with pytest.raises(UserError) as exc:
        read_retrieval_csv(str(tmp_path / "r.csv"), 32, "filepath", "caption", "\t", ["seven"])
    assert "'caption'" in one_line(exc) and "filepath, title" in str(exc.value)
    with pytest.raises(UserError) as exc:
        read_retrieval_csv(str(tmp_path / "x.csv"), 32, "filepath", "title", "\t", ["seven"])
    assert one_line(exc) == f"CSV file not found: {tmp_path / 'x.csv'}"
