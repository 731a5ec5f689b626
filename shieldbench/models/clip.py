"""A thin wrapper over an open_clip CLIP model.

The wrapper owns what every other module needs to agree on:

- **pixel space**: callers pass float images in ``[0, 1]``; normalisation
  (mean/std) is applied inside :meth:`ClipModel.encode_image`, so triggers and
  attacks never see normalised tensors;
- **tokenisation**: :meth:`ClipModel.tokenize`, lazily per batch, with a
  bounded per-caption cache (the most recently used
  :data:`TOKEN_CACHE_SIZE` captions): a small corpus is tokenised once for
  all its epochs, and a corpus of millions never holds every caption's
  tokens (a cached 77-token row takes ~1.5 KB with its tensor, measured:
  3M captions would take ~4.5 GB, the bound ~100 MB);
- **extra outputs on request**: patch tokens projected into the joint space
  and the last block's CLS->patch attention (needed by Semantic Shield). ViT
  towers return their tokens for the duration of a call that asks (they are
  computed anyway, so this costs nothing); the attention hooks, which force the slow
  non-fused attention path, are installed only for a call that asks for them.
"""

from __future__ import annotations

from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn


TOKEN_CACHE_SIZE = 1 << 16
"""Captions whose tokens :meth:`ClipModel.tokenize` keeps (least recently used dropped first)."""


@dataclass
class ImageOutput:
    """Image-tower outputs. ``patches``/``attention`` are None unless requested.

    - ``embedding``: (B, D) pooled image embedding in the joint space (unnormalised);
    - ``patches``: (B, P, D) patch tokens projected into the joint space;
    - ``attention``: (B, heads, P) CLS->patch attention of the last block
      (rows of the softmax, so each head's row sums to at most 1 over patches).
    """

    embedding: torch.Tensor
    patches: torch.Tensor | None = None
    attention: torch.Tensor | None = None


class ClipModel(nn.Module):
    """open_clip CLIP + normalisation + tokenizer + optional patch outputs."""

    def __init__(
        self,
        clip: nn.Module,
        tokenizer,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        name: str = "",
    ) -> None:
        super().__init__()
        self.clip = clip
        self.tokenizer = tokenizer
        self.image_size = int(image_size)
        self.name = name
        self.register_buffer("pixel_mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        self._token_cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.token_cache_size = TOKEN_CACHE_SIZE
        visual = clip.visual
        self.is_vit = hasattr(visual, "transformer") and hasattr(visual, "class_embedding")

    # -- text ------------------------------------------------------------------
    @property
    def context_length(self) -> int:
        return int(getattr(self.clip, "context_length", 77))

    def tokenize(self, captions: Sequence[str]) -> torch.Tensor:
        """Token ids (N, context_length), cached per caption string (the most recent ``token_cache_size``)."""
        cache = self._token_cache
        unique = list(dict.fromkeys(captions))
        missing = [c for c in unique if c not in cache]
        fresh: dict[str, torch.Tensor] = {}
        if missing:
            # Each row its own storage: a cached view would keep its whole batch's tensor alive.
            fresh = {c: t.clone() for c, t in zip(missing, self.tokenizer(missing))}
        # Looked up before anything is evicted, so a batch larger than the cache still gets every row.
        rows = [fresh[c] if c in fresh else cache[c] for c in captions]
        for c in unique:
            if c in fresh:
                cache[c] = fresh[c]
            else:
                cache.move_to_end(c)
        while len(cache) > self.token_cache_size:
            cache.popitem(last=False)
        return torch.stack(rows)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_text(tokens.to(self.pixel_mean.device))

    def encode_captions(self, captions: Sequence[str]) -> torch.Tensor:
        return self.encode_text(self.tokenize(captions))

    # -- images ----------------------------------------------------------------
    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return (images - self.pixel_mean) / self.pixel_std

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled embedding of float images in [0, 1]."""
        return self.image_outputs(images).embedding

    def image_outputs(self, images: torch.Tensor, patches: bool = False, attention: bool = False,
                      patch_projection_grad: bool = True) -> ImageOutput:
        """Pooled embedding, plus patch tokens and attention when asked for.

        ``patch_projection_grad=False`` projects the patch tokens with the
        projection's weights detached: a loss on the patches then trains the
        trunk below them but not the projection that also makes the pooled
        embedding (the pooled path keeps its gradient either way).
        """
        x = self.normalize(images.to(self.pixel_mean.device))
        visual = self.clip.visual
        if not self.is_vit:
            if patches or attention:
                return self._resnet_outputs(x, patches, attention, patch_projection_grad)
            return ImageOutput(visual(x))
        # The tower computes its tokens anyway; asking it to return them is free.
        # The flag is set per call so that open_clip's own API keeps its contract.
        visual.output_tokens = True
        # Activation checkpointing (runtime.grad_checkpointing) would recompute the blocks in the
        # backward pass without the capture hooks, i.e. on another attention path than the forward's:
        # a call that captures attention keeps its image tower's activations instead.
        trunk = visual.transformer
        suspend = attention and bool(getattr(trunk, "grad_checkpointing", False))
        if suspend:
            trunk.grad_checkpointing = False
        try:
            with self._attention_capture(attention) as store:
                # A compiled tower (runtime.compile) would not run the capture hooks: a call that
                # captures attention runs the tower's eager forward (its blocks are not compiled).
                pooled, tokens = visual.forward(x) if attention else visual(x)
        finally:
            visual.output_tokens = False
            if suspend:
                trunk.grad_checkpointing = True
        proj_patches = None
        if patches:
            proj = visual.proj
            if proj is not None and not patch_projection_grad:
                proj = proj.detach()
            proj_patches = tokens @ proj if proj is not None else tokens
        attn = store[0][:, :, 0, 1:] if attention else None
        return ImageOutput(pooled, proj_patches, attn)

    @contextmanager
    def _attention_capture(self, enabled: bool) -> Iterator[list[torch.Tensor]]:
        store: list[torch.Tensor] = []
        if not enabled:
            yield store
            return
        attn_mod = self.clip.visual.transformer.resblocks[-1].attn
        if not isinstance(attn_mod, nn.MultiheadAttention):
            raise ValueError("attention maps need the default (nn.MultiheadAttention) block type")

        def pre(_mod, args, kwargs):
            kwargs["need_weights"] = True
            kwargs["average_attn_weights"] = False
            return args, kwargs

        def post(_mod, _args, output):
            store.append(output[1])

        h1 = attn_mod.register_forward_pre_hook(pre, with_kwargs=True)
        h2 = attn_mod.register_forward_hook(post)
        try:
            yield store
        finally:
            h1.remove()
            h2.remove()

    def _resnet_outputs(self, x: torch.Tensor, patches: bool, attention: bool,
                        patch_projection_grad: bool = True) -> ImageOutput:
        """ResNet towers: the attention pool's query (the mean token) plays CLS.

        Mirrors ``open_clip.modified_resnet.AttentionPool2d`` but keeps the
        per-head weights over the spatial grid and the projected grid tokens.
        """
        visual = self.clip.visual
        x = visual.stem(x) if hasattr(visual, "stem") else x
        for layer in (visual.layer1, visual.layer2, visual.layer3, visual.layer4):
            x = layer(x)
        pool = visual.attnpool
        tokens = x.flatten(start_dim=2).permute(2, 0, 1)  # (HW, B, C)
        tokens = torch.cat([tokens.mean(dim=0, keepdim=True), tokens], dim=0)
        tokens = tokens + pool.positional_embedding[:, None, :].to(tokens.dtype)
        out, weights = F.multi_head_attention_forward(
            query=tokens[:1], key=tokens, value=tokens,
            embed_dim_to_check=tokens.shape[-1], num_heads=pool.num_heads,
            q_proj_weight=pool.q_proj.weight, k_proj_weight=pool.k_proj.weight,
            v_proj_weight=pool.v_proj.weight, in_proj_weight=None,
            in_proj_bias=torch.cat([pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias]),
            bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0.0,
            out_proj_weight=pool.c_proj.weight, out_proj_bias=pool.c_proj.bias,
            use_separate_proj_weight=True, training=self.training,
            need_weights=True, average_attn_weights=False,
        )
        pooled = out.squeeze(0)
        proj_patches = None
        if patches:
            # Each grid token through the pool's value and output projections:
            # the same linear map that carries it into the pooled embedding.
            keep = (lambda t: t) if patch_projection_grad else torch.Tensor.detach
            v = F.linear(tokens[1:], keep(pool.v_proj.weight), keep(pool.v_proj.bias))
            proj_patches = F.linear(v, keep(pool.c_proj.weight), keep(pool.c_proj.bias)).permute(1, 0, 2)
        attn = weights[:, :, 0, 1:] if attention else None
        return ImageOutput(pooled, proj_patches, attn)

    # -- both ------------------------------------------------------------------
    @property
    def logit_scale(self) -> torch.Tensor:
        return self.clip.logit_scale

    def clamp_logit_scale(self, max_scale: float = 100.0) -> None:
        """CLIP's clamp: the learned temperature never exceeds ``max_scale``."""
        with torch.no_grad():
            self.clip.logit_scale.clamp_(0, torch.log(torch.tensor(max_scale)).item())
