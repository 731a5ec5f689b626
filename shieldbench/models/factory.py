"""Model factory: tiny CPU configs and every open_clip architecture.

``build_model(name, pretrained, image_size)`` returns a :class:`ClipModel`.
Names registered here (``tiny-vit``, ``micro-vit``, ``tiny-rn``) are small
configs built from open_clip's own ``CLIP`` class so that the CPU path runs
the same code as the paper-scale models. Any other name is looked up in
open_clip's model list (``ViT-B-32``, ``RN50``, ...) and created by
``open_clip.create_model``: randomly initialised, or with ``pretrained`` = an
open_clip tag (``openai``, ``laion2b_s34b_b79k``) or a local weights file,
both loaded by open_clip itself (which unwraps ``state_dict``, strips
``module.`` and converts foreign layouts).

Image size: random-init models take the size they are asked for. Pretrained
weights keep the size they were trained at, the tag's config size or the
patch grid stored in a weights file; asking for another size is a one-line
:class:`UserError` instead of a silent interpolation of the position
embedding. ``image_size=0`` means "the weights' own size"
(:func:`native_image_size` says which, without building the model).
Normalisation comes from the created model's ``visual.preprocess_cfg``.

Every failure a user can cause (unknown tag, tag not in the offline cache,
missing, corrupt or mismatched file) is one line that names the tag or path.
"""

from __future__ import annotations

import logging
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import open_clip
import torch
from open_clip.model import CLIPTextCfg, CLIPVisionCfg

from shieldbench.errors import UserError
from shieldbench.models.clip import ClipModel
from shieldbench.registry import MODELS, register_model

DEFAULT_IMAGE_SIZE = 32
"""Size of the tiny configs when none is asked for (``image_size=0``)."""

_WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".npz", ".npy")


@dataclass(frozen=True)
class TinyConfig:
    """A small open_clip CLIP for CPU runs."""

    embed_dim: int
    vision: dict[str, Any]
    text: dict[str, Any]
    description: str = ""


def _tiny(config: TinyConfig, image_size: int) -> ClipModel:
    vision = CLIPVisionCfg(image_size=image_size, **config.vision)
    text = CLIPTextCfg(**config.text)
    clip = open_clip.CLIP(embed_dim=config.embed_dim, vision_cfg=vision, text_cfg=text)
    tokenizer = open_clip.SimpleTokenizer(context_length=text.context_length)
    return ClipModel(clip, tokenizer, image_size, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


TINY_CONFIGS: dict[str, TinyConfig] = {
    "tiny-vit": TinyConfig(
        embed_dim=128,
        vision={"patch_size": 8, "width": 128, "layers": 4, "head_width": 32},
        text={"context_length": 24, "width": 128, "heads": 4, "layers": 4},
        description="ViT, patch 8 (16 tokens at 32 px), width 128, 4+4 layers (CPU default)",
    ),
    "micro-vit": TinyConfig(
        embed_dim=64,
        vision={"patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
        text={"context_length": 24, "width": 64, "heads": 2, "layers": 2},
        description="ViT, patch 8, width 64, 2+2 layers (tests)",
    ),
    "tiny-rn": TinyConfig(
        embed_dim=128,
        vision={"layers": (1, 1, 1, 1), "width": 16},
        text={"context_length": 24, "width": 128, "heads": 4, "layers": 2},
        description="ModifiedResNet (attention pool) with one block per stage",
    ),
}


# -- image size ------------------------------------------------------------------
@dataclass(frozen=True)
class _WeightsSize:
    """The image size some weights were trained at.

    ``step`` > 1 when the size is read from a stored position-embedding grid:
    every size in ``[size, size + step)`` gives that grid, so the weights load
    unchanged at any of them (``size`` is the smallest).
    """

    size: int
    step: int = 1

    def accepts(self, image_size: int) -> bool:
        return image_size // self.step == self.size // self.step


def _check_size(name: str, image_size: int, expected: _WeightsSize) -> int:
    """The size to build ``name`` at: ``image_size``, or the weights' own size for 0."""
    if image_size == 0:
        return expected.size
    if not expected.accepts(image_size):
        # open_clip would interpolate the position embedding; a benchmark should not do that silently.
        raise UserError(
            f"model {name} with pretrained weights expects image size {expected.size}; "
            f"set data.image_size={expected.size}"
        )
    return image_size


def _config_size(vision_cfg: dict[str, Any]) -> int:
    size = vision_cfg.get("image_size", 224)
    if isinstance(size, (list, tuple)):
        size = size[0]  # open_clip configs are square
    return int(size)


def _checkpoint_size(shapes: dict[str, tuple[int, ...]], vision_cfg: dict[str, Any]) -> _WeightsSize | None:
    """The size a checkpoint was trained at, from its stored position-embedding grid.

    None when the tower keeps no grid open_clip can read (timm towers and the
    like): the caller then falls back to the config's size.
    """
    if "timm_model_name" in vision_cfg:
        return None
    if isinstance(vision_cfg.get("layers"), (list, tuple)):
        # ModifiedResNet: a 32x downsampling before the attention pool.
        key, step = "visual.attnpool.positional_embedding", 32
    else:
        key, step = "visual.positional_embedding", vision_cfg.get("patch_size", 16)
    shape = shapes.get(key)
    if shape is None or not isinstance(step, int) or len(shape) != 2:
        return None
    grid = math.isqrt(shape[0] - 1)  # one class token, then a square grid
    if grid * grid != shape[0] - 1:
        return None
    return _WeightsSize(grid * step, step)


# -- weights files -----------------------------------------------------------------
def _existing_file(path: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"weights file not found: {p}")
    return p


def _checkpoint_shapes(p: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes in a weights file, keyed as open_clip will load them.

    Reads only the header (safetensors) or memory-maps the tensors (torch
    zip files), so checking a multi-GB checkpoint before building the model
    is cheap; it also turns an unreadable file into one line with its path.
    """
    if p.suffix in (".npz", ".npy"):  # big_vision weights: open_clip converts them itself
        return {}
    try:
        if p.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(p), framework="pt") as f:
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        try:
            state = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            state = torch.load(p, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except Exception as exc:  # corrupt or foreign file: one line, with its path
        raise UserError(f"cannot read weights file {p}: {type(exc).__name__}: {_first_line(exc)}") from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not any(isinstance(v, torch.Tensor) for v in state.values()):
        what = f"keys {sorted(map(str, state))[:8]}" if isinstance(state, dict) else type(state).__name__
        raise UserError(f"weights file {p} holds no state dict ({what})")
    return {k.removeprefix("module."): tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}


def load_weights_file(model: ClipModel, path: str) -> None:
    """Load a state dict file (safetensors or weights-only torch) into ``model.clip``.

    open_clip's ``load_checkpoint`` does the loading, so a file open_clip
    reads (``state_dict`` wrapper, ``module.`` prefix) reads here too.
    """
    p = _existing_file(path)
    _checkpoint_shapes(p)  # an unreadable file fails here, with its path
    try:
        open_clip.load_checkpoint(model.clip, str(p))
    except (RuntimeError, KeyError, ValueError, AssertionError) as exc:
        # AssertionError: open_clip asserts on a text position-embedding width mismatch.
        raise UserError(f"weights file {p} does not match model {model.name}: {_first_line(exc)}") from exc


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


# -- registered tiny configs ---------------------------------------------------------
def _make_tiny_factory(name: str) -> Callable[..., ClipModel]:
    def factory(pretrained: str = "", image_size: int = DEFAULT_IMAGE_SIZE) -> ClipModel:
        config = TINY_CONFIGS[name]
        if pretrained:
            expected = _checkpoint_size(_checkpoint_shapes(_existing_file(pretrained)), config.vision)
            if expected is not None:
                image_size = _check_size(name, image_size, expected)
        model = _tiny(config, image_size or DEFAULT_IMAGE_SIZE)
        model.name = name
        if pretrained:
            load_weights_file(model, pretrained)
        return model

    factory.__doc__ = TINY_CONFIGS[name].description
    factory.version = "1"  # type: ignore[attr-defined]  # bump when the config changes: it enters cache keys
    return factory


tiny_vit = register_model("tiny-vit")(_make_tiny_factory("tiny-vit"))
micro_vit = register_model("micro-vit")(_make_tiny_factory("micro-vit"))
tiny_rn = register_model("tiny-rn")(_make_tiny_factory("tiny-rn"))


# -- open_clip architectures -----------------------------------------------------------
@contextmanager
def _quiet_open_clip() -> Iterator[None]:
    """Drop open_clip's root-logger warnings and errors (not its info) for the duration.

    open_clip logs through the root logger, so with logging unconfigured its
    "initialized randomly" notice and its download errors reach stderr next
    to the one-line UserError this module raises for the same event.
    """
    package = os.path.dirname(open_clip.__file__)

    def keep(record: logging.LogRecord) -> bool:
        return record.levelno < logging.WARNING or not record.pathname.startswith(package)

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def _weights_file(name: str, pretrained: str) -> Path:
    """``pretrained`` as a file, or a one-line error: file not found, or unknown tag."""
    if os.path.isfile(pretrained):
        return Path(pretrained)
    if os.sep in pretrained or "/" in pretrained or Path(pretrained).suffix in _WEIGHT_SUFFIXES:
        raise UserError(f"weights file not found: {pretrained}")
    tags = open_clip.list_pretrained_tags_by_model(name)
    if not tags:
        raise UserError(f"open_clip has no pretrained tags for {name} and {pretrained!r} is not a file; "
                        f"pass a local weights file with model.pretrained=PATH")
    raise UserError(f"unknown pretrained tag {pretrained!r} for {name}; open_clip knows: {', '.join(tags)} "
                    f"(or pass a local weights file with model.pretrained=PATH)")


def _resolve(name: str, pretrained: str, image_size: int) -> tuple[int, dict[str, Any], Path | None]:
    """(size to build at, the tag's open_clip config or {}, the weights file or None)."""
    cfg = open_clip.get_model_config(name)
    config_size = _config_size(cfg["vision_cfg"])
    if not pretrained:
        return image_size or config_size, {}, None
    tag_cfg = open_clip.get_pretrained_cfg(name, pretrained)
    if tag_cfg:  # tags are trained at their config's size
        return _check_size(name, image_size, _WeightsSize(config_size)), tag_cfg, None
    path = _weights_file(name, pretrained)
    expected = _checkpoint_size(_checkpoint_shapes(path), cfg["vision_cfg"]) or _WeightsSize(config_size)
    return _check_size(name, image_size, expected), {}, path


def _open_clip_model(name: str, pretrained: str, image_size: int) -> ClipModel:
    size, tag_cfg, path = _resolve(name, pretrained, image_size)
    config_size = _config_size(open_clip.get_model_config(name)["vision_cfg"])
    try:
        with _quiet_open_clip():
            clip = open_clip.create_model(
                name,
                pretrained=str(path) if path is not None else (pretrained or None),
                force_image_size=None if size == config_size else size,
                # e.g. ViT-B-32 + openai was trained with QuickGELU; open_clip only warns.
                force_quick_gelu=bool(tag_cfg.get("quick_gelu", False)),
            )
    except Exception as exc:
        if path is not None:
            raise UserError(f"weights file {path} does not match model {name}: {_first_line(exc)}") from exc
        if tag_cfg and str(exc).startswith("Failed to download"):
            raise UserError(
                f"cannot load pretrained weights {pretrained!r} for {name}: not in the local cache and the hub "
                f"is unreachable (offline or HF_HUB_OFFLINE=1); fetch the file where the hub is reachable and "
                f"pass it with model.pretrained=PATH"
            ) from exc
        if tag_cfg:
            raise UserError(f"cannot load pretrained weights {pretrained!r} for {name}: {_first_line(exc)}") from exc
        if isinstance(exc, OSError):  # a hub-hosted text tower or config, offline
            raise UserError(f"cannot create {name}: {_first_line(exc)}") from exc
        raise
    try:
        with _quiet_open_clip():
            tokenizer = open_clip.get_tokenizer(name)
    except OSError as exc:  # a hub-hosted tokenizer, offline
        raise UserError(f"cannot load the tokenizer of {name}: {_first_line(exc)}") from exc
    pp = open_clip.get_model_preprocess_cfg(clip)
    mean = tuple(pp.get("mean", open_clip.OPENAI_DATASET_MEAN))
    std = tuple(pp.get("std", open_clip.OPENAI_DATASET_STD))
    return ClipModel(clip, tokenizer, size, mean=mean, std=std, name=name)


# -- entry points ------------------------------------------------------------------------
def native_image_size(name: str, pretrained: str = "") -> int:
    """The image size ``build_model(name, pretrained, 0)`` uses, without building it.

    A tag: its open_clip config's size (224 for ViT-B-32). A weights file:
    the size its stored position-embedding grid was trained at (read from
    the file's header), else the config's. No weights: the config's size
    (open_clip) or :data:`DEFAULT_IMAGE_SIZE` (tiny configs); random-init
    models accept any size. 0 for a plugin model, whose factory decides.
    """
    if name in TINY_CONFIGS:
        if not pretrained:
            return DEFAULT_IMAGE_SIZE
        expected = _checkpoint_size(_checkpoint_shapes(_existing_file(pretrained)), TINY_CONFIGS[name].vision)
        return expected.size if expected is not None else DEFAULT_IMAGE_SIZE
    if name in MODELS:
        return 0
    if name in open_clip.list_models():
        return _resolve(name, pretrained, 0)[0]
    raise UserError(MODELS.unknown_message(name) + ", or any open_clip architecture (see `shieldbench list models --verbose`)")


def build_model(name: str, pretrained: str = "", image_size: int = DEFAULT_IMAGE_SIZE) -> ClipModel:
    """A ClipModel by registered name or any open_clip architecture name.

    ``image_size`` 0 = the native size (see :func:`native_image_size`); with
    ``pretrained`` set, a size the weights were not trained at is a UserError.
    """
    if name in MODELS:
        return MODELS.get(name)(pretrained=pretrained, image_size=image_size)
    if name in open_clip.list_models():
        return _open_clip_model(name, pretrained, image_size)
    raise UserError(MODELS.unknown_message(name) + ", or any open_clip architecture (see `shieldbench list models --verbose`)")
