"""Model factory: tiny CPU configs and every open_clip architecture.

``build_model(spec.model, image_size)`` returns a :class:`ClipModel`. Names
registered here (``tiny-vit``, ``micro-vit``, ``tiny-rn``) are small configs
built from open_clip's own ``CLIP`` class so that the CPU path runs the same
code as the paper-scale models. Any other name is looked up in open_clip's
model list (``ViT-B-32``, ``RN50``, ...), randomly initialised or loaded from
``pretrained`` = an open_clip tag (``openai``, ``laion2b_s34b_b79k``) or a
local weights file. Offline, a tag that is not cached fails with one line
instead of hanging on the hub.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.model import CLIPTextCfg, CLIPVisionCfg

from shieldbench.errors import UserError
from shieldbench.models.clip import ClipModel
from shieldbench.registry import MODELS, register_model


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


def _make_tiny_factory(name: str):
    def factory(pretrained: str = "", image_size: int = 32) -> ClipModel:
        model = _tiny(TINY_CONFIGS[name], image_size)
        model.name = name
        if pretrained:
            load_weights_file(model, pretrained)
        return model

    factory.__doc__ = TINY_CONFIGS[name].description
    return factory


tiny_vit = register_model("tiny-vit")(_make_tiny_factory("tiny-vit"))
micro_vit = register_model("micro-vit")(_make_tiny_factory("micro-vit"))
tiny_rn = register_model("tiny-rn")(_make_tiny_factory("tiny-rn"))


def load_weights_file(model: ClipModel, path: str) -> None:
    """Load a state dict (safetensors or weights-only torch file) into ``model.clip``."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"weights file not found: {p}")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(p))
        else:
            state = torch.load(p, map_location="cpu", weights_only=True)
            if isinstance(state, dict) and "state_dict" in state:
                state = state["state_dict"]
    except Exception as exc:  # corrupt or foreign file: one line, with its path
        raise UserError(f"cannot read weights file {p}: {type(exc).__name__}: {exc}") from exc
    target = model.clip
    state = {k.removeprefix("module.").removeprefix("clip."): v for k, v in state.items()}
    try:
        target.load_state_dict(state)
    except RuntimeError as exc:
        raise UserError(f"weights file {p} does not match model {model.name}: {str(exc).splitlines()[0]}") from exc


def _open_clip_model(name: str, pretrained: str, image_size: int) -> ClipModel:
    is_file = bool(pretrained) and (os.sep in pretrained or Path(pretrained).suffix in (".pt", ".bin", ".safetensors", ".pth"))
    try:
        clip = open_clip.create_model(
            name,
            pretrained=None if (not pretrained or is_file) else pretrained,
            force_image_size=image_size,
        )
    except RuntimeError as exc:
        raise UserError(f"cannot load pretrained weights {pretrained!r} for {name}: {str(exc).splitlines()[0]}") from exc
    except Exception as exc:  # hub errors when offline and not cached
        if "offline" in str(exc).lower() or type(exc).__name__ in ("LocalEntryNotFoundError", "OfflineModeIsEnabled", "OSError"):
            raise UserError(
                f"cannot load pretrained weights {pretrained!r} for {name}: not in the local cache and the hub is unreachable "
                f"(pass a local file with model.pretrained=PATH)"
            ) from exc
        raise
    tokenizer = open_clip.get_tokenizer(name)
    pp = getattr(clip.visual, "preprocess_cfg", {}) or {}
    mean = pp.get("mean", open_clip.OPENAI_DATASET_MEAN)
    std = pp.get("std", open_clip.OPENAI_DATASET_STD)
    model = ClipModel(clip, tokenizer, image_size, mean=mean, std=std, name=name)
    if is_file:
        load_weights_file(model, pretrained)
    return model


def build_model(name: str, pretrained: str = "", image_size: int = 32) -> ClipModel:
    """A ClipModel by registered name or any open_clip architecture name."""
    if name in MODELS:
        return MODELS.get(name)(pretrained=pretrained, image_size=image_size)
    if name in open_clip.list_models():
        return _open_clip_model(name, pretrained, image_size)
    raise UserError(MODELS.unknown_message(name) + ", or any open_clip architecture (see `shieldbench list models --verbose`)")
