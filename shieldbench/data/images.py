"""Image arrays: the image half of a map-style source.

Every split of a dataset holds its images in an *image array*: something
indexable like a ``uint8`` tensor of shape ``(N, 3, S, S)``. The embedded
synthetic world uses a real tensor (it fits in memory at 32 px); corpora on
disk use a :class:`LazyImages` subclass that decodes image ``i`` on demand at
the model's preprocessing size, so a 3M-row corpus costs its index, not its
pixels. Both answer ``len``, ``shape`` and ``[index]`` (an int gives one
``(3, S, S)`` image, a slice / list / tensor a stacked batch), which is all
that attacks, views, loaders and the evaluator ask of them.

Unreadable images: :meth:`LazyImages.fetch` returns the rows it could read
and the positions it could not, and the policy (``skip`` or ``fail``) is the
caller's: the training loader drops such rows from the batch and counts them,
the evaluator drops them from the metric and counts them. ``[index]`` raises
:class:`BadImage` (with the file's path) for a row it cannot read.
"""

from __future__ import annotations

import io
from abc import ABC, abstractmethod
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np
import torch

ImageArray = Union[torch.Tensor, "LazyImages"]

ON_ERROR = ("skip", "fail")


class BadImage(RuntimeError):
    """An image that cannot be read or decoded (missing file, corrupt bytes)."""


def as_index_list(index: Any, n: int) -> list[int]:
    """Normalise an int / slice / sequence / tensor index into a list of ints."""
    if isinstance(index, slice):
        return list(range(n))[index]
    if isinstance(index, torch.Tensor):
        if index.dtype == torch.bool:
            return index.nonzero().flatten().tolist()
        return index.flatten().tolist()
    if isinstance(index, np.ndarray):
        return index.reshape(-1).tolist()
    if isinstance(index, range):
        return list(index)
    return [int(i) for i in index]


class LazyImages(ABC):
    """``uint8 (N, 3, S, S)`` images produced on demand.

    Subclasses implement :meth:`__len__` and :meth:`load` (one image, or
    raise :class:`BadImage`). They must be picklable: DataLoader workers get
    a copy. Keep per-row state in numpy arrays, not Python lists, so forked
    workers do not copy a corpus' worth of pages on first touch.
    """

    image_size: int
    in_memory: bool = False
    """True when rows are computed from tensors already in memory (no I/O to overlap with workers)."""

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def load(self, i: int) -> torch.Tensor:
        """Image ``i`` as ``uint8 (3, S, S)``; raises :class:`BadImage` if unreadable."""

    def describe(self, i: int) -> str:
        """Where row ``i`` comes from (a path, a shard and key), for error messages."""
        return f"row {i}"

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self), 3, self.image_size, self.image_size))

    @property
    def dtype(self) -> torch.dtype:
        return torch.uint8

    def fetch(self, index: Any) -> tuple[torch.Tensor, list[int], list[str]]:
        """The readable rows of ``index`` stacked, and the positions (into ``index``) that failed.

        Returns ``(images (K, 3, S, S), failed_positions, failure_messages)``.
        """
        rows = as_index_list(index, len(self))
        out, failed, why = [], [], []
        for pos, i in enumerate(rows):
            try:
                out.append(self.load(i))
            except BadImage as exc:
                failed.append(pos)
                why.append(str(exc))
        s = self.image_size
        stacked = torch.stack(out) if out else torch.empty((0, 3, s, s), dtype=torch.uint8)
        return stacked, failed, why

    def __getitem__(self, index: Any) -> torch.Tensor:
        if isinstance(index, (int, np.integer)) or (isinstance(index, torch.Tensor) and index.ndim == 0):
            i = int(index)
            if i < 0:
                i += len(self)
            if not 0 <= i < len(self):
                raise IndexError(f"index {i} out of range for {len(self)} images")
            return self.load(i)
        images, failed, why = self.fetch(index)
        if failed:
            raise BadImage(why[0])
        return images

    def fingerprint(self) -> dict[str, Any]:
        """What identifies this array's content for cache keys (overridden by file sources)."""
        return {"type": type(self).__name__, "n": len(self), "size": self.image_size}


def fetch(images: ImageArray, index: Any) -> tuple[torch.Tensor, list[int], list[str]]:
    """:meth:`LazyImages.fetch` for either kind of array (a tensor never fails)."""
    if isinstance(images, LazyImages):
        return images.fetch(index)
    idx = torch.as_tensor(as_index_list(index, images.shape[0]), dtype=torch.long)
    return images[idx], [], []


# -- decoding -----------------------------------------------------------------------------
@lru_cache(maxsize=8)
def preprocess_for(image_size: int):
    """open_clip's evaluation preprocessing (resize shortest side, bicubic; centre crop) to [0, 1].

    Normalisation lives in the model, so mean 0 / std 1 here: the tensor is
    the centre crop in [0, 1], which :func:`quantize` turns back into exact
    8-bit values.
    """
    import open_clip

    return open_clip.image_transform(image_size, is_train=False, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def quantize(images: torch.Tensor) -> torch.Tensor:
    """Float [0,1] -> uint8, clamping first (CleanCLIP skips the clamp; we don't)."""
    return images.clamp(0, 1).mul(255).round().to(torch.uint8)


def decode_image(data: bytes | str | Path, image_size: int, where: str) -> torch.Tensor:
    """Decode a file or bytes into ``uint8 (3, S, S)`` with open_clip's preprocessing."""
    from PIL import Image, UnidentifiedImageError

    try:
        src = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
        with Image.open(src) as img:
            img.load()
            return quantize(preprocess_for(image_size)(img))
    except FileNotFoundError:
        raise BadImage(f"image not found: {where}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise BadImage(f"cannot decode image {where}: {type(exc).__name__}: {exc}") from None


class FileImages(LazyImages):
    """Images in files on disk (a CSV's or an annotation file's paths), decoded on demand."""

    def __init__(self, paths: Sequence[str | Path], image_size: int) -> None:
        # A fixed-width numpy array, not a list of str: no per-row refcounts for workers to copy.
        self.paths = np.asarray([str(p) for p in paths], dtype=np.str_)
        self.image_size = int(image_size)

    def __len__(self) -> int:
        return int(self.paths.shape[0])

    def load(self, i: int) -> torch.Tensor:
        path = str(self.paths[i])
        return decode_image(path, self.image_size, path)

    def describe(self, i: int) -> str:
        return str(self.paths[i])

    def fingerprint(self) -> dict[str, Any]:
        import hashlib

        h = hashlib.sha256("\n".join(self.paths.tolist()).encode()).hexdigest()[:16]
        return {"type": "files", "n": len(self), "size": self.image_size, "paths": h}


class SubsetImages(LazyImages):
    """Rows ``index`` of another image array (lazy: nothing is decoded here)."""

    def __init__(self, base: ImageArray, index: Sequence[int]) -> None:
        self.base = base
        self.index = np.asarray(list(index), dtype=np.int64)
        self.image_size = int(base.shape[-1])
        self.in_memory = isinstance(base, torch.Tensor) or getattr(base, "in_memory", False)

    def __len__(self) -> int:
        return int(self.index.shape[0])

    def load(self, i: int) -> torch.Tensor:
        return self.base[int(self.index[i])]

    def describe(self, i: int) -> str:
        j = int(self.index[i])
        return self.base.describe(j) if isinstance(self.base, LazyImages) else f"row {j}"


def take(images: ImageArray, index: Sequence[int] | torch.Tensor) -> ImageArray:
    """Rows ``index``: a tensor copy for in-memory arrays, a lazy subset otherwise."""
    if isinstance(images, torch.Tensor):
        return images[torch.as_tensor(index, dtype=torch.long)]
    return SubsetImages(images, as_index_list(index, len(images)))


__all__ = ["BadImage", "FileImages", "ImageArray", "LazyImages", "ON_ERROR", "SubsetImages", "as_index_list",
           "decode_image", "fetch", "quantize", "take"]
