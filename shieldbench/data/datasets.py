"""Dataset factories registered by name.

``synthetic`` is the embedded procedural world (no download). A factory takes
a :class:`~shieldbench.spec.DataSpec` and returns a
:class:`~shieldbench.data.types.DatasetBundle`.
"""

from __future__ import annotations

from functools import lru_cache

from shieldbench.data.types import DatasetBundle
from shieldbench.registry import DATASETS, register_dataset
from shieldbench.spec import DataSpec


# Bumped whenever generation changes, so cached models of an older world are not reused.
SYNTHETIC_VERSION = "2"


@register_dataset("synthetic")
def synthetic_world(spec: DataSpec) -> DatasetBundle:
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


synthetic_world.version = SYNTHETIC_VERSION  # type: ignore[attr-defined]


@lru_cache(maxsize=4)
def build_dataset(spec: DataSpec) -> DatasetBundle:
    """The bundle for ``spec`` (memoised: a grid builds each world once per process)."""
    return DATASETS.get(spec.dataset)(spec)
