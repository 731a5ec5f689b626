"""WebDataset tar shards (as img2dataset writes them) read as a map-style corpus.

A shard holds samples ``<key>.<ext>``: an image (``jpg``, ``jpeg``, ``png`` or
``webp``), a caption (``txt``) and members the benchmark ignores (``json``,
...). Poisoning picks rows by index and must be deterministic, so the shards
are not streamed: :func:`read_shards` scans each shard's tar headers once and
records, per row, the shard, byte offset and byte length of the image; the
captions (small) are read during that scan. Images are then read on demand by
:class:`ShardImages` with a positioned read (``os.pread``) and decoded at the
model's preprocessing size.

webdataset 1.0.2 has no indexed (random-access) reader for local tars (its
``wids`` module is a separate, later package), so the index is built with the
standard library's ``tarfile``, which handles GNU / PAX long names.

Rows are samples in shard order, then in tar order (the order of a key's first
member). A sample without an image or a caption is skipped and counted in
:attr:`ShardImages.n_incomplete`. Keys follow webdataset's rule: the member
path up to the first dot of its base name.
"""

from __future__ import annotations

import os
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shieldbench.data.images import BadImage, LazyImages, decode_image
from shieldbench.data.types import PairSet
from shieldbench.errors import UserError

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
"""Image member extensions, in order of preference when a sample has several."""

CAPTION_EXTENSION = "txt"
_BLOCK = 512


def expand_pattern(pattern: str) -> list[Path]:
    """The shard paths of a brace pattern (``shards/{00000..00009}.tar``), in order; ``::`` also separates lists.

    webdataset's own expansion (``webdataset.shardlists.expand_urls``), so a
    pattern means here what it means to webdataset's loaders.
    """
    from webdataset.shardlists import expand_urls

    return [Path(os.path.expanduser(p)) for p in expand_urls(pattern.strip()) if p.strip()]


def split_key(name: str) -> tuple[str, str] | None:
    """``dir/000001.jpg`` -> ``("dir/000001", "jpg")``: webdataset's own rule (``base_plus_ext``),
    the key ends at the base name's first dot; None for a member without an extension or a hidden file."""
    from webdataset.tariterators import base_plus_ext

    if name.rsplit("/", 1)[-1].startswith("."):
        return None
    key, ext = base_plus_ext(name)
    if key is None:
        return None
    return key, ext.lower()


class _Corrupt(Exception):
    """Raised inside the scan; turned into a UserError that names the shard."""


def _check_end(f: Any, end: int, size: int) -> None:
    """After tarfile stops, an end-of-archive zero block must follow.

    tarfile ends its iteration silently on a missing, truncated or garbage
    header past the first one, so a shard cut short (even on a member
    boundary) would otherwise just look shorter and shift no error, only rows.
    Every tar writer (tarfile, GNU tar, webdataset's TarWriter) closes an
    archive with zero blocks, so their absence means the file was cut.
    """
    if end >= size:
        raise _Corrupt(f"unexpected end of file at offset {end} (no end-of-archive marker)")
    f.seek(end)
    block = f.read(_BLOCK)
    if len(block) < _BLOCK:
        raise _Corrupt(f"unexpected end of file after offset {end}")
    if block.strip(b"\0"):
        raise _Corrupt(f"unreadable tar header at offset {end}")


def index_shard(path: Path) -> tuple[list[str], list[int], list[int], list[str], int]:
    """Scan one shard's headers: ``(keys, image_offsets, image_lengths, captions, n_incomplete)``.

    Raises :class:`_Corrupt` for a truncated or corrupt shard.
    """
    size = path.stat().st_size
    # key -> {ext: (offset, length)}, in order of first appearance (dicts keep insertion order).
    samples: dict[str, dict[str, tuple[int, int]]] = {}
    with open(path, "rb") as f:
        try:
            with tarfile.open(fileobj=f, mode="r:") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    if member.offset_data + member.size > size:
                        raise _Corrupt(f"member {member.name} extends past the end of the file")
                    parts = split_key(member.name)
                    if parts is None:
                        continue
                    key, ext = parts
                    # Every key is a sample (one with only a .json counts as incomplete).
                    sample = samples.setdefault(key, {})
                    if ext in IMAGE_EXTENSIONS or ext == CAPTION_EXTENSION:
                        # First occurrence wins: a repeated member is a writer bug, not a second sample.
                        sample.setdefault(ext, (member.offset_data, member.size))
                end = tar.offset
        except (tarfile.TarError, EOFError) as exc:
            raise _Corrupt(f"{type(exc).__name__}: {exc}") from None
        _check_end(f, end, size)

        keys: list[str] = []
        offsets: list[int] = []
        lengths: list[int] = []
        captions: list[str] = []
        incomplete = 0
        for key, members in samples.items():
            image = next((members[e] for e in IMAGE_EXTENSIONS if e in members), None)
            text = members.get(CAPTION_EXTENSION)
            if image is None or text is None:
                incomplete += 1
                continue
            f.seek(text[0])
            data = f.read(text[1])
            if len(data) != text[1]:
                raise _Corrupt(f"unexpected end of file in {key}.{CAPTION_EXTENSION}")
            keys.append(key)
            offsets.append(image[0])
            lengths.append(image[1])
            captions.append(data.decode("utf-8", errors="replace").strip())
    return keys, offsets, lengths, captions, incomplete


class ShardImages(LazyImages):
    """Images stored as members of tar shards, read by offset and decoded on demand.

    Per-row state is numpy arrays (shard index, byte offset, byte length, key);
    file descriptors are opened lazily, per process, and never pickled.
    """

    def __init__(self, shards: list[str], shard_sizes: list[int], shard: np.ndarray, offset: np.ndarray,
                 length: np.ndarray, keys: list[str], image_size: int, n_incomplete: int = 0) -> None:
        self.shards = np.asarray(shards, dtype=np.str_)
        self.shard_sizes = np.asarray(shard_sizes, dtype=np.int64)
        self.shard = np.asarray(shard, dtype=np.int32)
        self.offset = np.asarray(offset, dtype=np.int64)
        self.length = np.asarray(length, dtype=np.int64)
        # UTF-8 bytes: a quarter of numpy's UCS-4 strings for the usual ASCII keys.
        self.keys = np.asarray([k.encode() for k in keys], dtype=np.bytes_) if len(keys) else np.zeros(0, "S1")
        self.image_size = int(image_size)
        self.n_incomplete = int(n_incomplete)
        """Samples skipped while indexing because they lacked an image or a caption."""
        self._fds: dict[int, int] = {}
        self._pid = os.getpid()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_fds"] = {}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._pid = os.getpid()

    def __len__(self) -> int:
        return int(self.offset.shape[0])

    def _fd(self, s: int) -> int:
        # A forked DataLoader worker inherits the parent's descriptors without pickling; pread
        # does not move the shared file position, but reopen anyway so each process owns its fds.
        if self._pid != os.getpid():
            self._fds = {}
            self._pid = os.getpid()
        fd = self._fds.get(s)
        if fd is None:
            fd = os.open(str(self.shards[s]), os.O_RDONLY)
            self._fds[s] = fd
        return fd

    def read_bytes(self, i: int) -> bytes:
        """The encoded image of row ``i``; raises :class:`BadImage` if the shard cannot be read."""
        s, off, n = int(self.shard[i]), int(self.offset[i]), int(self.length[i])
        try:
            data = os.pread(self._fd(s), n, off)
        except OSError as exc:
            raise BadImage(f"cannot read image {self.describe(i)}: {exc.strerror or exc}") from None
        if len(data) != n:
            raise BadImage(f"cannot read image {self.describe(i)}: shard is shorter than its index says")
        return data

    def load(self, i: int) -> torch.Tensor:
        return decode_image(self.read_bytes(i), self.image_size, self.describe(i))

    def describe(self, i: int) -> str:
        return f"{self.shards[int(self.shard[i])]}:{self.keys[i].decode()}"

    def fingerprint(self) -> dict[str, Any]:
        # Content, not mtimes: a copied corpus keeps its cache keys.
        return {"type": "shards", "n": len(self), "size": self.image_size,
                "shards": [Path(str(p)).name for p in self.shards.tolist()],
                "bytes": [int(b) for b in self.shard_sizes.tolist()]}

    def __del__(self) -> None:
        for fd in getattr(self, "_fds", {}).values():
            try:
                os.close(fd)
            except OSError:
                pass


def read_shards(pattern: str, image_size: int, max_rows: int) -> PairSet:
    """Index the shards of ``pattern`` into a PairSet with lazy images (``max_rows > 0`` caps the rows).

    ``ids`` are the sample keys; ``images.n_incomplete`` counts the samples skipped for lacking an
    image or a caption.
    """
    paths = expand_pattern(pattern)
    if not paths:
        raise UserError(f"shard pattern {pattern!r} names no files")
    missing = [p for p in paths if not p.is_file()]
    if len(missing) == len(paths):
        raise UserError(f"no shard of {pattern!r} exists (first: {missing[0]})")
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise UserError(f"shard {missing[0]} is missing{more} (pattern {pattern!r})")

    shards: list[str] = []
    sizes: list[int] = []
    shard_idx: list[np.ndarray] = []
    offsets: list[int] = []
    lengths: list[int] = []
    keys: list[str] = []
    captions: list[str] = []
    incomplete = 0
    for path in paths:
        if max_rows > 0 and len(keys) >= max_rows:
            break
        try:
            k, off, ln, cap, inc = index_shard(path)
        except _Corrupt as exc:
            raise UserError(f"truncated or corrupt shard {path}: {exc}") from None
        except OSError as exc:
            raise UserError(f"cannot read shard {path}: {exc.strerror or exc}") from None
        shard_idx.append(np.full(len(k), len(shards), dtype=np.int32))
        shards.append(str(path))
        sizes.append(path.stat().st_size)
        offsets += off
        lengths += ln
        keys += k
        captions += cap
        incomplete += inc

    n = len(keys) if max_rows <= 0 else min(len(keys), max_rows)
    shard = np.concatenate(shard_idx)[:n] if shard_idx else np.zeros(0, dtype=np.int32)
    images = ShardImages(shards, sizes, shard, np.asarray(offsets[:n], dtype=np.int64),
                         np.asarray(lengths[:n], dtype=np.int64), keys[:n],
                         image_size, incomplete)
    return PairSet(images=images, captions=captions[:n], ids=keys[:n])


__all__ = ["IMAGE_EXTENSIONS", "ShardImages", "expand_pattern", "index_shard", "read_shards", "split_key"]
