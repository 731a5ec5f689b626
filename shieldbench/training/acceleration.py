"""How a training runs fast: the ``runtime`` switches that the Trainer applies.

Four switches, all in :class:`~shieldbench.spec.RuntimeSpec` and so in no
cache key and no run id. Each either leaves the computed numbers as they are
or is off by default, so the default path trains bit for bit the weights it
trained before the switches existed:

- ``fused_adamw`` (on): torch's fused AdamW kernel, the trainer's optimizer
  since before the switch (several times faster on CPU for the token table;
  on CUDA one kernel per step instead of one per tensor). Off: torch's
  default implementation, whose rounding differs in the last bits;
- ``channels_last`` (off): image batches and 4-D weights in NHWC. It helps
  convolutional towers (open_clip's ResNets) on GPUs; a ViT only has its patch
  embedding as a convolution. On CPU the convolution kernels differ, so the
  loss agrees with the default only to rounding;
- ``grad_checkpointing`` (off): open_clip's per-block activation
  checkpointing of both transformers (memory for compute: each block is
  recomputed in the backward pass). The same numbers; ResNet image towers
  ignore it (open_clip has no checkpointing for them);
- ``compile`` (off): ``torch.compile`` of the image tower and of the text
  transformer for the duration of a ``fit`` (fused kernels; the first steps
  pay for the compilation). Numbers agree with the default only to rounding.

bf16 autocast is not here: it changes the numbers, so it is the hashed
``train.precision`` (``auto`` = bf16 on CUDA, fp32 on CPU).

The runner makes a cell's switches current with :func:`active` (as
:mod:`shieldbench.training.tracking` does for the tracker), so every Trainer
in the cell, a repair defense's own included, trains with them.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn


@dataclass(frozen=True)
class Acceleration:
    """The Trainer's speed switches (see the module docstring for what each does to the numbers)."""

    fused_adamw: bool = True
    channels_last: bool = False
    grad_checkpointing: bool = False
    compile: bool = False

    @classmethod
    def from_runtime(cls, runtime: Any) -> "Acceleration":
        """From a :class:`~shieldbench.spec.RuntimeSpec` (None: the defaults)."""
        if runtime is None:
            return cls()
        return cls(fused_adamw=runtime.fused_adamw, channels_last=runtime.channels_last,
                   grad_checkpointing=runtime.grad_checkpointing, compile=runtime.compile)


_CURRENT: ContextVar[Acceleration] = ContextVar("shieldbench_acceleration", default=Acceleration())


def current() -> Acceleration:
    """The switches of the block :func:`active` is in (the defaults outside any)."""
    return _CURRENT.get()


@contextmanager
def active(accel: Acceleration) -> Iterator[None]:
    """Trainers configured inside the block without switches of their own use ``accel``."""
    token = _CURRENT.set(accel)
    try:
        yield
    finally:
        _CURRENT.reset(token)


def image_format(accel: Acceleration) -> torch.memory_format:
    """The memory format image batches are handed to the model in."""
    return torch.channels_last if accel.channels_last else torch.contiguous_format


def _compiled_towers(clip: nn.Module) -> list[nn.Module]:
    """The modules worth compiling: the image tower and the text transformer (the encoders' bulk).

    Not the whole CLIP: the objectives call ``encode_image`` / ``encode_text``
    and the wrapper's patch-token path, never the CLIP's own forward.
    """
    towers = [clip.visual]
    # open_clip's CLIP keeps its text trunk as ``transformer``; CustomTextCLIP its whole text tower as ``text``.
    text = getattr(clip, "transformer", None)
    if not isinstance(text, nn.Module):
        text = getattr(clip, "text", None)
    if isinstance(text, nn.Module):
        towers.append(text)
    return towers


@contextmanager
def applied(model: nn.Module, accel: Acceleration) -> Iterator[None]:
    """``model`` (a ClipModel) set up for ``accel`` inside the block, and as it was after it.

    Undone on the way out because what leaves a ``fit`` is saved, deep-copied
    and evaluated: a checkpoint in channels-last strides, a module whose
    compiled call still points at the original's bound method after a
    ``deepcopy``, or a flag left on would each outlive the training.
    """
    clip = model.clip
    if accel.channels_last:
        model.to(memory_format=torch.channels_last)
    if accel.grad_checkpointing:
        clip.set_grad_checkpointing(True)
    towers = _compiled_towers(clip) if accel.compile else []
    for tower in towers:
        tower.compile()
    try:
        yield
    finally:
        for tower in towers:
            # nn.Module.compile() stores the compiled call here; None is the uncompiled module again.
            tower._compiled_call_impl = None
        if accel.grad_checkpointing:
            clip.set_grad_checkpointing(False)
        if accel.channels_last:
            model.to(memory_format=torch.contiguous_format)


__all__ = ["Acceleration", "active", "applied", "current", "image_format"]
