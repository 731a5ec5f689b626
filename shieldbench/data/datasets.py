"""Dataset factories registered by name, and the options each one reads.

A factory takes the :class:`~shieldbench.spec.DataSpec` and
:class:`~shieldbench.spec.EvalSpec` and returns a
:class:`~shieldbench.data.types.DatasetBundle`. It declares, with
:func:`dataset`, which ``data.*`` and ``eval.*`` options it reads: an option
the user sets that the chosen dataset does not read is an error
(:func:`check_options`), never silently ignored. ``version`` enters the cache
keys of everything built from the dataset.

Built in:

- ``synthetic``: the embedded procedural world (no download; in memory);
- ``csv``: open_clip_train's CSV convention (image path + caption columns);
- ``webdataset``: tar shards as img2dataset writes them;
- ``coco``: COCO 2017 captions (Karpathy split when its JSON is there);
- ``flickr30k``: the Karpathy-split Flickr30k JSON.

The on-disk formats are read lazily (images decoded on demand, see
:mod:`shieldbench.data.images`) and assembled by
:mod:`shieldbench.data.corpus`.
"""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING, Callable, Iterable

from shieldbench.errors import UserError
from shieldbench.registry import DATASETS, register_dataset
from shieldbench.spec import DataSpec, EvalSpec

if TYPE_CHECKING:  # pragma: no cover  (the factories import torch only when they build a bundle)
    from shieldbench.data.types import DatasetBundle

# Read by every dataset (or by the runner for every dataset).
COMMON_DATA = ("dataset", "seed", "image_size", "knowledge_k", "on_error")
COMMON_EVAL = ("batch_size", "n_backdoor_queries")
# What each on-disk corpus reads besides its own options.
CORPUS_DATA = ("path", "n_clean", "clean_path", "max_rows")
ZEROSHOT_EVAL = ("path", "classnames", "templates", "csv_img_key", "csv_label_key", "max_images")


def dataset(name: str, version: str, data: Iterable[str] = (), eval: Iterable[str] = ()) -> Callable:
    """Register a dataset factory with its version and the options it reads."""

    def deco(fn: Callable) -> Callable:
        fn.version = version  # type: ignore[attr-defined]
        fn.uses = {"data": set(COMMON_DATA) | set(data), "eval": set(COMMON_EVAL) | set(eval)}  # type: ignore[attr-defined]
        return register_dataset(name)(fn)

    return deco


def check_options(dataset_name: str, user_set: dict[str, set[str]]) -> None:
    """Raise a UserError for a ``data.*`` / ``eval.*`` option the dataset does not read.

    ``user_set`` maps a section to the keys the user set (config file or
    ``--set``); preset values are not checked (a preset sizes every dataset).
    """
    factory = DATASETS.get(dataset_name)
    uses = getattr(factory, "uses", None)
    if uses is None:  # a plugin that does not declare its options
        return
    for section in ("data", "eval"):
        unused = sorted(set(user_set.get(section, ())) - uses[section])
        if unused:
            key = unused[0]
            hint = " (on-disk corpora: --dataset csv | webdataset | coco | flickr30k)" if dataset_name == "synthetic" else ""
            raise UserError(f"{section}.{key} is not used by dataset {dataset_name!r}{hint}; "
                            f"it reads: {', '.join(sorted(uses[section] - {'dataset'}))}")


# Bumped whenever generation changes, so cached models of an older world are not reused.
SYNTHETIC_VERSION = "2"


@dataset("synthetic", SYNTHETIC_VERSION,
         data=("n_pretrain", "n_train", "n_clean", "n_test_per_class", "n_retrieval"))
def synthetic_world(spec: DataSpec, eval_spec: EvalSpec | None = None) -> DatasetBundle:
    """Embedded procedural shapes world: 10 classes, captions, knowledge elements (no download)."""
    from shieldbench.data.synthetic import make_world

    return make_world(
        seed=spec.seed,
        image_size=spec.image_size,
        n_pretrain=spec.n_pretrain,
        n_train=spec.n_train,
        n_clean=spec.n_clean,
        n_test_per_class=spec.n_test_per_class,
        n_retrieval=spec.n_retrieval,
        knowledge_k=spec.knowledge_k,
    )


@dataset("csv", "1", data=CORPUS_DATA + ("csv_img_key", "csv_caption_key", "csv_separator"),
         eval=ZEROSHOT_EVAL + ("retrieval_path",))
def csv_corpus(spec: DataSpec, eval_spec: EvalSpec) -> DatasetBundle:
    """Image paths and captions in a CSV (open_clip_train's convention: filepath / title, tab separated)."""
    from shieldbench.data.corpus import assemble
    from shieldbench.data.formats.csv import read_csv_pairs

    def read(path: str):
        return read_csv_pairs(path, spec.csv_img_key, spec.csv_caption_key, spec.csv_separator, spec.image_size,
                              spec.max_rows)

    return assemble("csv", read, spec, eval_spec)


@dataset("webdataset", "1", data=CORPUS_DATA, eval=ZEROSHOT_EVAL + ("retrieval_path",))
def webdataset_corpus(spec: DataSpec, eval_spec: EvalSpec) -> DatasetBundle:
    """Tar shards as img2dataset writes them (<key>.jpg/.png + <key>.txt), brace-expanded shard lists."""
    from shieldbench.data.corpus import assemble
    from shieldbench.data.formats.webdataset import read_shards

    def read(path: str):
        return read_shards(path, spec.image_size, spec.max_rows)

    return assemble("webdataset", read, spec, eval_spec)


@dataset("coco", "1", data=CORPUS_DATA + ("annotations",), eval=ZEROSHOT_EVAL)
def coco_corpus(spec: DataSpec, eval_spec: EvalSpec) -> DatasetBundle:
    """COCO 2017 captions, one training row per caption; retrieval on the Karpathy test split (5K images)."""
    from shieldbench.data.corpus import assemble_karpathy

    return assemble_karpathy("coco", spec, eval_spec)


@dataset("flickr30k", "1", data=CORPUS_DATA + ("annotations",), eval=ZEROSHOT_EVAL)
def flickr30k_corpus(spec: DataSpec, eval_spec: EvalSpec) -> DatasetBundle:
    """Flickr30k, Karpathy split: one training row per caption; retrieval on its 1K test images."""
    from shieldbench.data.corpus import assemble_karpathy

    return assemble_karpathy("flickr30k", spec, eval_spec)


@lru_cache(maxsize=4)
def build_dataset(spec: DataSpec, eval_spec: EvalSpec | None = None) -> DatasetBundle:
    """The bundle for ``spec`` (memoised: a grid builds each corpus once per process)."""
    return DATASETS.get(spec.dataset)(spec, eval_spec or EvalSpec())


__all__ = ["build_dataset", "check_options", "dataset", "synthetic_world"]
