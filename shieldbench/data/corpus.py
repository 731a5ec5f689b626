"""Assemble a DatasetBundle from a corpus on disk and its evaluation sets.

A corpus on disk has no ``pretrain`` split: the clean model is a pretrained
checkpoint (or a random init when training from scratch). The pieces:

- ``train``: every row of the corpus (``data.max_rows`` caps it), read by a
  format reader with lazy images;
- ``clean`` (repair defenses): ``data.clean_path`` in the same format, or
  ``data.n_clean`` rows drawn (seeded by ``data.seed``) from the corpus'
  clean rows; the defender is assumed to hold clean copies of them;
- ``test`` (zero-shot CA and ASR): ``eval.path``, an ImageNet-style folder
  or a CSV; absent, those metrics are not computed;
- ``retrieval`` (Recall@k, backdoor Hit@k): the format's own test split
  (COCO / Flickr30k Karpathy test) or ``eval.retrieval_path`` (a CSV);
  absent, those metrics are not computed.

The target vocabulary (``classnames``) is the zero-shot set's classes; with
no zero-shot set it is ``eval.classnames`` if given, else COCO's 80 category
names for COCO / Flickr30k and ImageNet-1K's names otherwise (the
CleanCLIP lineage's target, "banana", is an ImageNet class).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from shieldbench.data.types import DatasetBundle, LabelledSet, PairSet, RetrievalSet
from shieldbench.errors import UserError
from shieldbench.spec import DataSpec, EvalSpec, digest


def _pairs_fingerprint(pairs: PairSet) -> dict:
    images = pairs.images
    part = images.fingerprint() if hasattr(images, "fingerprint") else {"n": len(pairs)}
    return {"images": part, "captions": digest(pairs.captions)}


def fingerprint(train: PairSet, clean: PairSet, test: LabelledSet | None, retrieval: RetrievalSet | None) -> str:
    """A content hash of the corpus manifest (image references and captions, labels of the eval sets).

    It enters every cache key built from the data, so an edited CSV or a
    re-written shard set is never mistaken for the old one. Image files'
    bytes are not hashed (a corpus has millions); shards are identified by
    name and size, files by path.
    """
    parts: dict = {"train": _pairs_fingerprint(train), "clean": _pairs_fingerprint(clean)}
    if test is not None:
        fp = test.images.fingerprint() if hasattr(test.images, "fingerprint") else {}
        parts["test"] = {"images": fp, "labels": test.labels.tolist(), "classes": list(test.classnames),
                         "templates": list(test.templates)}
    if retrieval is not None:
        fp = retrieval.images.fingerprint() if hasattr(retrieval.images, "fingerprint") else {}
        parts["retrieval"] = {"images": fp, "captions": digest(retrieval.captions),
                              "caption_image": digest(retrieval.caption_image.tolist())}
    return digest(parts)


def require_path(name: str, path: str, what: str = "data.path") -> Path:
    if not path:
        raise UserError(f"dataset {name!r} needs {what}=PATH")
    return Path(path)


def clean_subset(train: PairSet, n_clean: int, seed: int) -> PairSet:
    """``n_clean`` rows of the corpus (all of them if it has fewer), seeded by the data seed."""
    n = min(n_clean, len(train))
    rng = np.random.default_rng([seed, 0xC1EA])
    rows = np.sort(rng.choice(len(train), size=n, replace=False))
    return train.subset(rows.tolist())


def zeroshot_set(eval_spec: EvalSpec, image_size: int) -> LabelledSet | None:
    if not eval_spec.path:
        return None
    from shieldbench.data.formats.zeroshot import read_zeroshot

    return read_zeroshot(eval_spec.path, image_size, eval_spec.classnames, eval_spec.templates,
                         eval_spec.csv_img_key, eval_spec.csv_label_key, eval_spec.max_images)


def vocabulary(test: LabelledSet | None, eval_spec: EvalSpec, default: str) -> tuple[list[str], list[str]]:
    """Class names and templates of the target vocabulary (see the module docstring)."""
    if test is not None:
        return list(test.classnames), list(test.templates)
    from shieldbench.data.formats.zeroshot import load_classnames, load_templates

    return load_classnames(eval_spec.classnames or default, None), load_templates(eval_spec.templates)


def assemble(name: str, read: Callable[[str], PairSet], spec: DataSpec, eval_spec: EvalSpec,
             retrieval: RetrievalSet | None = None, default_vocabulary: str = "imagenet") -> DatasetBundle:
    """Bundle a corpus read by ``read(path)`` with its clean subset and evaluation sets."""
    require_path(name, spec.path)
    train = read(spec.path)
    if len(train) == 0:
        raise UserError(f"data.path {spec.path}: the corpus has no rows")
    clean = read(spec.clean_path) if spec.clean_path else clean_subset(train, spec.n_clean, spec.seed)
    test = zeroshot_set(eval_spec, spec.image_size)
    classnames, templates = vocabulary(test, eval_spec, default_vocabulary)
    if retrieval is None and eval_spec.retrieval_path:
        from shieldbench.data.formats.zeroshot import read_retrieval_csv

        retrieval = read_retrieval_csv(eval_spec.retrieval_path, spec.image_size, eval_spec.csv_img_key,
                                       getattr(spec, "csv_caption_key", "title"), getattr(spec, "csv_separator", "\t"),
                                       classnames)
    info = {"n_train": len(train), "n_clean": len(clean), "n_test": 0 if test is None else len(test),
            "n_retrieval_images": 0 if retrieval is None else len(retrieval),
            "clean_source": spec.clean_path or f"{len(clean)} corpus rows",
            "fingerprint": fingerprint(train, clean, test, retrieval)}
    return DatasetBundle(name=name, pretrain=None, train=train, clean=clean, test=test, retrieval=retrieval,
                         classnames=classnames, templates=templates, info=info)


def assemble_karpathy(name: str, spec: DataSpec, eval_spec: EvalSpec) -> DatasetBundle:
    """COCO / Flickr30k: one training row per caption; retrieval on the held-out split (5 captions per image)."""
    from shieldbench.data.formats.karpathy import read_captions_corpus

    root = require_path(name, spec.path)
    test = zeroshot_set(eval_spec, spec.image_size)
    classnames, _ = vocabulary(test, eval_spec, "coco")
    train, retrieval = read_captions_corpus(name, root, spec.annotations, spec.image_size, spec.max_rows, classnames)

    def read(path: str) -> PairSet:
        if path == spec.path:
            return train
        from shieldbench.data.formats.csv import read_csv_pairs  # clean_path: a CSV of clean pairs

        return read_csv_pairs(path, "filepath", "title", "\t", spec.image_size, 0)

    return assemble(name, read, spec, eval_spec, retrieval=retrieval, default_vocabulary="coco")


__all__ = ["assemble", "assemble_karpathy", "clean_subset", "require_path", "vocabulary", "zeroshot_set"]
