"""COCO and Flickr30k captions on disk: a training corpus and a retrieval test set.

The usual source is Karpathy's split file (``dataset_coco.json`` /
``dataset_flickr30k.json``): a list of images with ``split`` (``train``,
``restval``, ``val``, ``test``), ``filename`` (and for COCO ``filepath``) and
``sentences``. :func:`read_captions_corpus` turns it into

- a training :class:`PairSet` of the ``train`` + ``restval`` images, one row
  per sentence (rows image by image in JSON order), images decoded on demand;
- a :class:`RetrievalSet` of the ``test`` split (COCO 5K, Flickr30k 1K), every
  sentence of an image as its captions.

COCO without the Karpathy file falls back to the raw COCO 2017 layout
(``annotations/captions_{train,val}2017.json`` with ``train2017/`` and
``val2017/``): train on train2017, retrieval on val2017 (5K images, which is
*not* the Karpathy test split, so numbers are not comparable with papers').

COCO training rows get a class label (the category of the image's largest
instance annotation, index into the instances file's categories sorted by id)
when ``annotations/instances_{train,val}2017.json`` are there; the runner and
evaluator use it, defenses never see it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

import torch

from shieldbench.data.images import FileImages
from shieldbench.data.text import caption_labels
from shieldbench.data.types import PairSet, RetrievalSet
from shieldbench.errors import UserError

KARPATHY_FILES = {"coco": "dataset_coco.json", "flickr30k": "dataset_flickr30k.json"}
TRAIN_SPLITS = ("train", "restval")
TEST_SPLIT = "test"
FLICKR_IMAGE_DIRS = ("flickr30k-images", "images")


def load_json(path: Path) -> Any:
    """A JSON file, or a one-line UserError naming it."""
    try:
        with open(path, "rb") as f:
            return json.load(f)
    except FileNotFoundError:
        raise UserError(f"annotation file not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot parse JSON {path}: {exc}") from None
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None


def find_karpathy(name: str, root: Path, annotations: str) -> Path | None:
    """The Karpathy split file: ``annotations`` if given (must exist), else the default name under root."""
    if annotations:
        path = Path(annotations).expanduser()
        if not path.exists() and not path.is_absolute() and (root / path).exists():
            path = root / path
        if not path.is_file():
            raise UserError(f"data.annotations: file not found: {annotations}")
        return path
    fname = KARPATHY_FILES[name]
    for path in (root / fname, root / "annotations" / fname):
        if path.is_file():
            return path
    return None


def image_folder(name: str, root: Path) -> Path | None:
    """Flickr30k's image folder (the first of flickr30k-images/, images/, root that exists); None for COCO."""
    if name != "flickr30k":
        return None
    return next((root / d for d in FLICKR_IMAGE_DIRS if (root / d).is_dir()), root)


def _field(entry: dict, key: str, path: Path, i: int) -> Any:
    try:
        return entry[key]
    except (KeyError, TypeError):
        raise UserError(f"{path}: image entry {i} has no {key!r}") from None


def _sentences(entry: dict, path: Path, i: int) -> list[str]:
    out = []
    for s in _field(entry, "sentences", path, i):
        raw = s.get("raw") if isinstance(s, dict) else None
        if raw is None:
            raise UserError(f"{path}: image entry {i} has a sentence without 'raw'")
        out.append(str(raw).strip())
    return out


# -- COCO instance labels ------------------------------------------------------------------
def coco_instance_labels(root: Path, folders: Iterable[str]) -> dict[int, int] | None:
    """COCO image id -> category index of its largest instance (``instances_<folder>.json``); None if none exist.

    The category index is the position in the categories sorted by id (0..79 for COCO).
    """
    files = [root / "annotations" / f"instances_{f}.json" for f in dict.fromkeys(folders)]
    files = [f for f in files if f.is_file()]
    if not files:
        return None
    labels: dict[int, int] = {}
    for path in files:
        data = load_json(path)
        try:
            cats = sorted(int(c["id"]) for c in data["categories"])
            index = {c: k for k, c in enumerate(cats)}
            best: dict[int, float] = {}
            for a in data["annotations"]:
                img, area = int(a["image_id"]), float(a.get("area", 0.0))
                if img not in best or area > best[img]:
                    best[img] = area
                    labels[img] = index.get(int(a["category_id"]), -1)
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"{path}: not a COCO instances file ({type(exc).__name__}: {exc})") from None
        del data  # the instances files are large; free each before loading the next
    return labels


def _label_tensor(ids: list[int | None], table: dict[int, int] | None) -> torch.Tensor | None:
    if table is None:
        return None
    return torch.tensor([-1 if i is None else table.get(i, -1) for i in ids], dtype=torch.long)


def _retrieval(paths: list[Path], sentences: list[list[str]], image_size: int,
               classnames: list[str]) -> RetrievalSet:
    captions = [c for s in sentences for c in s]
    caption_image = torch.tensor([k for k, s in enumerate(sentences) for _ in s], dtype=torch.long)
    labels = caption_labels(captions, classnames)
    image_labels = torch.full((len(paths),), -1, dtype=torch.long)
    for j in range(len(captions) - 1, -1, -1):  # backwards, so the first labelled caption of an image wins
        if labels[j] >= 0:
            image_labels[caption_image[j]] = labels[j]
    return RetrievalSet(images=FileImages(paths, image_size), image_labels=image_labels, captions=captions,
                        caption_image=caption_image, caption_labels=labels)


def _train(paths: list[Path], sentences: list[list[str]], coco_ids: list[int | None], table: dict[int, int] | None,
           image_size: int, max_rows: int) -> PairSet:
    rows_path, rows_cap, rows_id, rows_coco = [], [], [], []
    for p, caps, cid in zip(paths, sentences, coco_ids):
        for k, c in enumerate(caps):
            rows_path.append(p)
            rows_cap.append(c)
            rows_id.append(f"{p.name}#{k}")
            rows_coco.append(cid)
    if max_rows > 0:
        rows_path, rows_cap, rows_id, rows_coco = (x[:max_rows] for x in (rows_path, rows_cap, rows_id, rows_coco))
    return PairSet(images=FileImages(rows_path, image_size), captions=rows_cap,
                   labels=_label_tensor(rows_coco, table), ids=rows_id)


# -- the two layouts -----------------------------------------------------------------------
def read_karpathy(name: str, root: Path, path: Path, image_size: int, max_rows: int,
                  classnames: list[str]) -> tuple[PairSet, RetrievalSet]:
    """Train (train + restval) and retrieval (test) from a Karpathy split file."""
    data = load_json(path)
    entries = data.get("images") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise UserError(f"{path}: not a Karpathy split file (no 'images' list)")
    folder = image_folder(name, root)
    train: tuple[list, list, list] = ([], [], [])
    test: tuple[list, list] = ([], [])
    for i, e in enumerate(entries):
        split = _field(e, "split", path, i)
        if split not in TRAIN_SPLITS and split != TEST_SPLIT:
            continue
        fname = _field(e, "filename", path, i)
        img = root / _field(e, "filepath", path, i) / fname if folder is None else folder / fname
        caps = _sentences(e, path, i)
        if split == TEST_SPLIT:
            test[0].append(img)
            test[1].append(caps)
        else:
            train[0].append(img)
            train[1].append(caps)
            cid = e.get("cocoid", e.get("id")) if name == "coco" else None
            train[2].append(None if cid is None else int(cid))
    table = None
    if name == "coco":
        # COCO ids are shared by the 2014 and 2017 releases, so Karpathy's (2014) ids index 2017 instances.
        table = coco_instance_labels(root, ("train2017", "val2017"))
    return (_train(*train, table, image_size, max_rows), _retrieval(*test, image_size, classnames))


def _coco_captions(root: Path, folder: str) -> tuple[list[Path], list[list[str]], list[int]]:
    """Images (in the images list's order) with their captions from ``captions_<folder>.json``."""
    path = root / "annotations" / f"captions_{folder}.json"
    data = load_json(path)
    try:
        caps: dict[int, list[str]] = {}
        for a in data["annotations"]:
            caps.setdefault(int(a["image_id"]), []).append(str(a["caption"]).strip())
        paths, sentences, ids = [], [], []
        for img in data["images"]:
            iid = int(img["id"])
            if iid in caps:  # an image without captions is no training row and no retrieval item
                paths.append(root / folder / img["file_name"])
                sentences.append(caps[iid])
                ids.append(iid)
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{path}: not a COCO captions file ({type(exc).__name__}: {exc})") from None
    return paths, sentences, ids


def read_coco_raw(root: Path, image_size: int, max_rows: int, classnames: list[str]) -> tuple[PairSet, RetrievalSet]:
    """COCO 2017 without the Karpathy file: train on train2017, retrieval on val2017 (not the Karpathy 5K)."""
    train_paths, train_caps, train_ids = _coco_captions(root, "train2017")
    table = coco_instance_labels(root, ("train2017",))
    val_paths, val_caps, _ = _coco_captions(root, "val2017")
    return (_train(train_paths, train_caps, train_ids, table, image_size, max_rows),
            _retrieval(val_paths, val_caps, image_size, classnames))


def read_captions_corpus(name: str, root: Path, annotations: str, image_size: int, max_rows: int,
                         classnames: list[str]) -> tuple[PairSet, RetrievalSet]:
    """COCO / Flickr30k under ``root``: the training pairs and the retrieval test set.

    ``annotations`` overrides the Karpathy split file's location. ``max_rows > 0`` keeps the first
    ``max_rows`` caption rows of the training set (the retrieval set is always whole).
    """
    if name not in KARPATHY_FILES:
        raise UserError(f"unknown captions corpus {name!r} (allowed: {', '.join(KARPATHY_FILES)})")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise UserError(f"data.path {root}: no such directory")
    path = find_karpathy(name, root, annotations)
    if path is not None:
        return read_karpathy(name, root, path, image_size, max_rows, classnames)
    expected = root / KARPATHY_FILES[name]
    if name == "coco":
        if (root / "annotations" / "captions_train2017.json").is_file():
            return read_coco_raw(root, image_size, max_rows, classnames)
        raise UserError(f"COCO at {root}: neither {expected} nor {root / 'annotations' / 'captions_train2017.json'} "
                        f"exists (or give data.annotations=PATH)")
    raise UserError(f"Flickr30k at {root}: Karpathy split file {expected} not found (or give data.annotations=PATH)")


__all__ = ["coco_instance_labels", "find_karpathy", "read_captions_corpus", "read_coco_raw", "read_karpathy"]
