"""Evaluation sets on disk: zero-shot classification sets, retrieval CSVs, class names and prompt templates.

- :func:`read_zeroshot`: an ImageNet-style folder (one sub-folder per class,
  the sorted folder names give the class indices, as torchvision's
  ``ImageFolder`` does) or a CSV of image path and label (a class index or a
  class name), into a :class:`~shieldbench.data.types.LabelledSet`;
- :func:`read_retrieval_csv`: a CSV of image path and caption, several rows per
  image allowed, into a :class:`~shieldbench.data.types.RetrievalSet`;
- :func:`load_classnames` / :func:`load_templates`: the ``eval.classnames`` and
  ``eval.templates`` options (built-in lists or a file, one entry per line).

Images are lazy (:class:`~shieldbench.data.images.FileImages`); paths in a
CSV are relative to the CSV's folder. Every problem a user can cause is a
one-line :class:`~shieldbench.errors.UserError`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from shieldbench.data.formats.csv import check_file, read_columns, resolve_paths, sniff_sep, unescape_sep
from shieldbench.data.images import FileImages
from shieldbench.data.text import caption_labels
from shieldbench.data.types import LabelledSet, RetrievalSet
from shieldbench.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif")

# The 80 COCO 2017 object categories, in category-id order (the standard detection list).
COCO_CLASSNAMES = [
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush",
]

_WNID = re.compile(r"n\d{8}")


def _read_lines(path: str, what: str) -> list[tuple[int, str]]:
    """Non-blank lines of a text file with their 1-based line numbers (one-line UserError if unreadable)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{what} file not found: {path} (expected a built-in name or a file, one entry per line)")
    try:
        text = p.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read {what} file {path}: {type(exc).__name__}: {exc}") from None
    return [(k + 1, line.strip()) for k, line in enumerate(text.splitlines()) if line.strip()]


def load_templates(option: str) -> list[str]:
    """Prompt templates with ``{}`` for the class name: "openai" (80), "simple" (1), or a file (one per line)."""
    if option == "openai":
        from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

        # open_clip keeps them as callables c -> str; calling with "{}" gives the format string back.
        return [t("{}") for t in OPENAI_IMAGENET_TEMPLATES]
    if option == "simple":
        return ["a photo of a {}."]
    lines = _read_lines(option, "templates")
    if not lines:
        raise UserError(f"templates file {option} has no templates")
    for lineno, t in lines:
        try:
            ok = "{}" in t and t.format("x") is not None
        except (IndexError, KeyError, ValueError):
            ok = False  # other braces ("{0}", "{name}", a lone "{") would break str.format at eval time
        if not ok:
            raise UserError(f"templates file {option} line {lineno}: {t!r} needs exactly one '{{}}' for the class name")
    return [t for _, t in lines]


def load_classnames(option: str, folder_names: list[str] | None) -> list[str]:
    """Class names: "" (the folder names), "imagenet", "coco", or a file (one name per line).

    With ``""``, 1000 WordNet-id folders (``n01440764`` ...) are ImageNet-1K and
    get open_clip's readable names, which are listed in sorted-wnid order, the
    order of the sorted folders. When ``folder_names`` is given, the result
    must name exactly one class per folder.
    """
    if option == "":
        if folder_names is None:
            raise UserError("no class names: set eval.classnames (imagenet, coco or a file with one name per line)")
        if len(folder_names) == 1000 and all(_WNID.fullmatch(n) for n in folder_names):
            import open_clip

            return list(open_clip.IMAGENET_CLASSNAMES)
        return list(folder_names)
    if option == "imagenet":
        import open_clip

        names, where = list(open_clip.IMAGENET_CLASSNAMES), "eval.classnames=imagenet"
    elif option == "coco":
        names, where = list(COCO_CLASSNAMES), "eval.classnames=coco"
    else:
        names, where = [n for _, n in _read_lines(option, "class names")], f"class names file {option}"
        if not names:
            raise UserError(f"class names file {option} has no names")
    if folder_names is not None and len(names) != len(folder_names):
        raise UserError(f"{where} has {len(names)} class names but the zero-shot set has {len(folder_names)} "
                        "class folders")
    return names


def balanced_prefix(labels: np.ndarray, n: int) -> np.ndarray:
    """Rows kept by ``max_images=n``: the first ``n`` after interleaving classes round-robin, in their original order.

    Round-robin (first image of every class, then the second of every
    class, ...) makes any prefix class-balanced, so a capped evaluation still
    sees every class; the kept rows are returned sorted, so ``n`` >= the set
    size keeps everything in the original order.
    """
    if n <= 0 or n >= len(labels):
        return np.arange(len(labels))
    order = np.argsort(labels, kind="stable")
    sorted_labels = labels[order]
    rank = np.empty(len(labels), dtype=np.int64)
    # Position of each row within its class: index in the class-sorted order minus where its class starts.
    rank[order] = np.arange(len(labels)) - np.searchsorted(sorted_labels, sorted_labels, side="left")
    keep = np.lexsort((labels, rank))[:n]  # primary key rank, then class index
    return np.sort(keep)


def _scan_folder(root: Path) -> tuple[list[str], list[str], list[int]]:
    """Class folder names (sorted; hidden ones skipped) and every image's path and class index."""
    try:
        classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    except OSError as exc:
        raise UserError(f"cannot list zero-shot folder {root}: {exc}") from None
    if not classes:
        raise UserError(f"zero-shot folder {root} has no class sub-folders (expected one folder of images per class)")
    paths: list[str] = []
    labels: list[int] = []
    for k, cls in enumerate(classes):
        folder = root / cls
        files = sorted(e.name for e in os.scandir(folder)
                       if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS))
        paths.extend(str(folder / f) for f in files)
        labels.extend([k] * len(files))
    return classes, paths, labels


def _csv_labels(path: str, raw: list[str], classnames_opt: str) -> tuple[list[int], list[str]]:
    """Class indices and class names for a zero-shot CSV's label column (indices or names)."""
    values = [v.strip() for v in raw]
    if all(re.fullmatch(r"-?\d+", v) for v in values):
        if classnames_opt == "":
            raise UserError(f"zero-shot CSV {path} has class-index labels: set eval.classnames "
                            "(imagenet, coco or a file with one name per line) to name them")
        classnames = load_classnames(classnames_opt, None)
        labels = [int(v) for v in values]
        for row, y in enumerate(labels):
            if not 0 <= y < len(classnames):
                raise UserError(f"zero-shot CSV {path} row {row + 1}: label {y} is not a known class "
                                f"(0..{len(classnames) - 1})")
        return labels, classnames
    classnames = sorted(set(values)) if classnames_opt == "" else load_classnames(classnames_opt, None)
    index = {c: k for k, c in enumerate(classnames)}
    # Exact names first; a case/space-insensitive match is a fallback for hand-written CSVs.
    loose = {" ".join(c.lower().split()): k for k, c in reversed(list(enumerate(classnames)))}
    labels = []
    for row, v in enumerate(values):
        k = index.get(v, loose.get(" ".join(v.lower().split())))
        if k is None:
            shown = ", ".join(classnames[:10]) + (", ..." if len(classnames) > 10 else "")
            raise UserError(f"zero-shot CSV {path} row {row + 1}: label {v!r} is not a known class ({shown})")
        labels.append(k)
    return labels, classnames


def read_zeroshot(path: str, image_size: int, classnames_opt: str, templates_opt: str, img_key: str,
                  label_key: str, max_images: int) -> LabelledSet:
    """A zero-shot classification set from an ImageNet-style folder or a CSV (see the module docstring).

    ``max_images`` > 0 keeps a class-balanced prefix (:func:`balanced_prefix`).
    A CSV's separator (tab or comma) is sniffed from its header.
    """
    p = Path(path)
    if not p.exists():
        raise UserError(f"zero-shot set not found: {path} (eval.path: a folder of class folders or a CSV)")
    templates = load_templates(templates_opt)
    if p.is_dir():
        folders, paths, labels = _scan_folder(p)
        classnames = load_classnames(classnames_opt, folders)
    else:
        check_file(p)
        sep = sniff_sep(p, (img_key, label_key))
        cols = read_columns(p, sep, {img_key: "eval.csv_img_key", label_key: "eval.csv_label_key"})
        labels, classnames = _csv_labels(path, cols[label_key], classnames_opt)
        paths = resolve_paths(p, cols[img_key])
    if not paths:
        raise UserError(f"zero-shot set {path} has no images ({', '.join(IMAGE_EXTENSIONS)})")
    y = np.asarray(labels, dtype=np.int64)
    keep = balanced_prefix(y, max_images)
    return LabelledSet(images=FileImages([paths[i] for i in keep], image_size),
                       labels=torch.as_tensor(y[keep], dtype=torch.long), classnames=classnames, templates=templates)


def read_retrieval_csv(path: str, image_size: int, img_key: str, caption_key: str, sep: str,
                       classnames: Sequence[str]) -> RetrievalSet:
    """A retrieval set from a CSV of image path and caption (rows grouped by image, first-appearance order).

    ``caption_labels`` are the classes the captions name; an image's label is
    that of its first caption naming a class (-1 if none does). The separator
    is ``sep`` if it splits the header into the needed columns, else tab or
    comma, whichever does.
    """
    check_file(path)
    sep = sniff_sep(path, (img_key, caption_key), first=unescape_sep(sep))
    cols = read_columns(path, sep, {img_key: "eval.csv_img_key", caption_key: "data.csv_caption_key"})
    image_index: dict[str, int] = {}
    caption_image = []
    for p in cols[img_key]:
        caption_image.append(image_index.setdefault(p, len(image_index)))
    captions = cols[caption_key]
    cap_labels = caption_labels(captions, classnames)
    image_labels = torch.full((len(image_index),), -1, dtype=torch.long)
    # Walk captions backwards so the first labelled caption of each image is written last and wins.
    for j in range(len(captions) - 1, -1, -1):
        if cap_labels[j] >= 0:
            image_labels[caption_image[j]] = cap_labels[j]
    return RetrievalSet(images=FileImages(resolve_paths(path, list(image_index)), image_size),
                        image_labels=image_labels, captions=captions,
                        caption_image=torch.as_tensor(caption_image, dtype=torch.long), caption_labels=cap_labels)


__all__ = ["COCO_CLASSNAMES", "IMAGE_EXTENSIONS", "balanced_prefix", "load_classnames", "load_templates",
           "read_retrieval_csv", "read_zeroshot"]
