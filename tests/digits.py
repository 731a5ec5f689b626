"""Real images for the data-format tests: scikit-learn's 1,797 handwritten digits.

:func:`write_digits` writes the digits (8x8 grey, upscaled with nearest
neighbour and turned into RGB PNG files) into every on-disk format the
benchmark reads, all from the same files so that the formats can be compared
row for row:

- ``train.csv`` (tab separated, ``filepath`` / ``title``, paths relative to
  the CSV) and ``clean.csv``;
- ``shards/shard-00000{0,1}.tar``: WebDataset shards as img2dataset writes them
  (``<key>.png`` + ``<key>.txt`` + ``<key>.json``), same rows in the same order;
- ``coco/``: COCO 2017 layout (``train2017/``, ``val2017/``,
  ``annotations/captions_*2017.json``, ``annotations/instances_*2017.json``)
  and a Karpathy-split ``dataset_coco.json``, one caption per train image (so
  its rows match the CSV's) and five per test image;
- ``flickr30k/``: ``flickr30k-images/`` + ``dataset_flickr30k.json``;
- ``test/<digit name>/*.png``: an ImageNet-style zero-shot folder, and
  ``test.csv`` (``filepath`` / ``label``) with the same images;
- ``retrieval.csv``: two captions per test image.

The train/test split is fixed (first 80% train), captions name the digit
("a photo of the digit seven.") in a few phrasings.
"""

from __future__ import annotations

import csv
import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
PHRASES = [
    "a photo of the digit {}.",
    "a handwritten {}.",
    "the number {} written by hand.",
    "a scan of a handwritten digit {}.",
    "a small grey picture of the digit {}.",
]


@dataclass
class Digits:
    root: Path
    train_csv: Path
    clean_csv: Path
    test_dir: Path
    test_csv: Path
    retrieval_csv: Path
    shards: str  # brace pattern
    coco_dir: Path
    flickr_dir: Path
    n_train: int
    n_test: int


def _png(img8: np.ndarray, size: int) -> bytes:
    from PIL import Image

    grey = (img8.astype(np.float32) * (255.0 / 16.0)).round().clip(0, 255).astype(np.uint8)
    rep = size // 8
    big = np.kron(grey, np.ones((rep, rep), dtype=np.uint8))
    rgb = np.stack([big] * 3, axis=-1)
    buf = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(buf, format="PNG")
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_digits(root: str | Path, size: int = 32, train_fraction: float = 0.8) -> Digits:
    from sklearn.datasets import load_digits

    root = Path(root)
    d = load_digits()
    images, labels = d.images, d.target.astype(int)
    n = len(labels)
    n_train = int(round(train_fraction * n))
    img_dir = root / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    pngs = []
    for i in range(n):
        data = _png(images[i], size)
        pngs.append(data)
        (img_dir / f"{i:05d}.png").write_bytes(data)
    caption = [PHRASES[i % len(PHRASES)].format(NAMES[labels[i]]) for i in range(n)]

    def write_csv(path: Path, rows: list[tuple[str, str]], header: tuple[str, str]) -> None:
        with open(path, "w", newline="") as f:
            w = csv.writer(f, delimiter="\t")
            w.writerow(header)
            w.writerows(rows)

    train_rows = [(f"images/{i:05d}.png", caption[i]) for i in range(n_train)]
    write_csv(root / "train.csv", train_rows, ("filepath", "title"))
    write_csv(root / "clean.csv", train_rows[: n_train // 4], ("filepath", "title"))

    # Zero-shot folder and CSV.
    test_dir = root / "test"
    test_rows = []
    for i in range(n_train, n):
        cls_dir = test_dir / NAMES[labels[i]]
        cls_dir.mkdir(parents=True, exist_ok=True)
        (cls_dir / f"{i:05d}.png").write_bytes(pngs[i])
        test_rows.append((f"images/{i:05d}.png", NAMES[labels[i]]))
    write_csv(root / "test.csv", test_rows, ("filepath", "label"))
    ret_rows = [(f"images/{i:05d}.png", PHRASES[(i + k) % len(PHRASES)].format(NAMES[labels[i]]))
                for i in range(n_train, n) for k in range(2)]
    write_csv(root / "retrieval.csv", ret_rows, ("filepath", "title"))

    # Two WebDataset shards of the training rows, in order.
    shard_dir = root / "shards"
    shard_dir.mkdir(exist_ok=True)
    half = (n_train + 1) // 2
    for s, (lo, hi) in enumerate(((0, half), (half, n_train))):
        with tarfile.open(shard_dir / f"shard-{s:06d}.tar", "w") as tar:
            for i in range(lo, hi):
                key = f"{i:09d}"
                _add(tar, f"{key}.png", pngs[i])
                _add(tar, f"{key}.txt", caption[i].encode())
                _add(tar, f"{key}.json", json.dumps({"key": key, "caption": caption[i]}).encode())

    # COCO 2017 layout + Karpathy split (one caption per train image, five per test image).
    coco = root / "coco"
    (coco / "annotations").mkdir(parents=True, exist_ok=True)
    karpathy = []
    for split, lo, hi, folder in (("train", 0, n_train, "train2017"), ("val", n_train, n, "val2017")):
        (coco / folder).mkdir(exist_ok=True)
        imgs, caps, inst = [], [], []
        for i in range(lo, hi):
            fname = f"{i:012d}.png"
            (coco / folder / fname).write_bytes(pngs[i])
            imgs.append({"id": i, "file_name": fname, "height": size, "width": size})
            sentences = [caption[i]] if split == "train" else [PHRASES[k].format(NAMES[labels[i]]) for k in range(5)]
            for k, c in enumerate(sentences):
                caps.append({"id": i * 10 + k, "image_id": i, "caption": c})
            inst.append({"id": i, "image_id": i, "category_id": int(labels[i]) + 1, "area": float(size * size),
                         "bbox": [0, 0, size, size], "iscrowd": 0})
            karpathy.append({"filepath": folder, "filename": fname, "cocoid": i,
                             "split": "train" if split == "train" else "test",
                             "sentences": [{"raw": c} for c in sentences]})
        cats = [{"id": k + 1, "name": NAMES[k], "supercategory": "digit"} for k in range(10)]
        (coco / "annotations" / f"captions_{folder}.json").write_text(json.dumps({"images": imgs, "annotations": caps}))
        (coco / "annotations" / f"instances_{folder}.json").write_text(
            json.dumps({"images": imgs, "annotations": inst, "categories": cats}))
    (coco / "dataset_coco.json").write_text(json.dumps({"images": karpathy, "dataset": "coco"}))

    # Flickr30k: images in flickr30k-images/, the Karpathy JSON beside them.
    flickr = root / "flickr30k"
    (flickr / "flickr30k-images").mkdir(parents=True, exist_ok=True)
    fl = []
    for k in karpathy:
        (flickr / "flickr30k-images" / k["filename"]).write_bytes((coco / k["filepath"] / k["filename"]).read_bytes())
        fl.append({"filename": k["filename"], "split": k["split"], "sentences": k["sentences"], "imgid": k["cocoid"]})
    (flickr / "dataset_flickr30k.json").write_text(json.dumps({"images": fl, "dataset": "flickr30k"}))

    return Digits(root=root, train_csv=root / "train.csv", clean_csv=root / "clean.csv", test_dir=test_dir,
                  test_csv=root / "test.csv", retrieval_csv=root / "retrieval.csv",
                  shards=str(shard_dir / "shard-{000000..000001}.tar"), coco_dir=coco, flickr_dir=flickr,
                  n_train=n_train, n_test=n - n_train)
