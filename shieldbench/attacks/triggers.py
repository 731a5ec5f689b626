"""Pure, batched image triggers for backdoor attacks (METHODS.md section 2).

Every function here works on float images in ``[0, 1]`` of shape
``(N, C, H, W)``, returns a *new* tensor (inputs are never modified), clamps its
output to ``[0, 1]`` and is deterministic given its arguments. The only source
of randomness is an explicit :class:`torch.Generator`; random draws are made on
the generator's device and then moved to the requested device, so a seed gives
the same trigger on CPU and GPU.

Triggers
--------
* **BadNets** (Gu et al. 2017): ``x' = (1 - m) * x + m * p`` with ``m`` the
  patch area. :func:`make_patch` builds the fixed patterns (Huang et al.'s
  grid, seeded noise, a dense checkerboard, Semantic Shield's sparse one), :func:`stamp_patch`
  pastes a patch (shared or per image) at per-image positions without a Python
  loop, :func:`cleanclip_noise_patch` is CleanCLIP's per-image
  "channel mean + N(0, 1)" patch family.
* **Blended** (Chen et al. 2017): :func:`blend` computes
  ``x' = (1 - a) * x + a * k``; keys come from :func:`noise_key` or
  :func:`load_key_image`.
* **WaNet** (Nguyen & Tran, ICLR 2021), following the reference code exactly:
  :func:`wanet_control_grid` -> :func:`wanet_flow_field` ->
  :func:`wanet_grid` (with :func:`wanet_identity_grid`) -> :func:`wanet_warp`;
  :func:`wanet_noise_grid` gives the "cross"/noise-mode grids. CleanCLIP's
  "WaNet" corresponds to ``k = H, s = 1`` (a per-pixel jitter, not the paper's
  smooth warp); the paper's defaults are ``k = 4, s = 0.5, grid_rescale = 1``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal, Union

import torch
import torch.nn.functional as F

from shieldbench.errors import UserError

__all__ = [
    "PATCH_KINDS",
    "CORNERS",
    "make_patch",
    "patch_size_for",
    "stamp_patch",
    "corner_positions",
    "random_positions",
    "cleanclip_noise_patch",
    "blend",
    "noise_key",
    "load_key_image",
    "wanet_control_grid",
    "wanet_flow_field",
    "wanet_identity_grid",
    "wanet_grid",
    "wanet_warp",
    "wanet_noise_grid",
]

PatchKind = Literal["grid", "noise", "checkerboard", "sparse_checkerboard"]
Corner = Literal["top_left", "top_right", "bottom_left", "bottom_right"]
Size2 = Union[int, tuple[int, int]]

#: Patch patterns understood by :func:`make_patch`.
PATCH_KINDS: tuple[str, ...] = ("grid", "noise", "checkerboard", "sparse_checkerboard")
#: Corners understood by :func:`corner_positions`.
CORNERS: tuple[str, ...] = ("top_left", "top_right", "bottom_left", "bottom_right")


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def _hw(size: Size2) -> tuple[int, int]:
    """``int`` or ``(H, W)`` -> ``(H, W)``, validated positive."""
    if isinstance(size, int):
        h = w = size
    else:
        h, w = (int(v) for v in size)
    if h < 1 or w < 1:
        raise UserError(f"image size must be positive, got {size!r}")
    return h, w


def _check_images(images: torch.Tensor, name: str = "images") -> None:
    if images.dim() != 4:
        raise UserError(f"{name} must have shape (N, C, H, W), got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise UserError(f"{name} must be floating point in [0, 1], got {images.dtype}")


def _rand(
    shape: tuple[int, ...],
    generator: torch.Generator,
    device: torch.device | str | None,
    dtype: torch.dtype,
    normal: bool = False,
) -> torch.Tensor:
    """Uniform [0, 1) (or standard normal) draws made on the generator's device.

    Drawing in float32 on the generator's device and only then casting/moving
    makes the result independent of the target device and dtype.
    """
    if not isinstance(generator, torch.Generator):
        raise UserError(f"an explicit torch.Generator is required, got {type(generator).__name__}")
    fn = torch.randn if normal else torch.rand
    out = fn(shape, generator=generator, device=generator.device, dtype=torch.float32)
    return out.to(device=device if device is not None else generator.device, dtype=dtype)


# --------------------------------------------------------------------------
# BadNets patches
# --------------------------------------------------------------------------


def make_patch(
    kind: PatchKind | str,
    size: int,
    channels: int = 3,
    generator: torch.Generator | None = None,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """A fixed BadNets patch pattern of shape ``(channels, size, size)``.

    ``kind``:

    * ``"grid"`` -- Huang et al.'s grid: ``p[i, j] = 1`` where row ``i`` *and*
      column ``j`` are both even (0-based), ``0`` elsewhere.
    * ``"noise"`` -- uniform ``[0, 1)`` noise drawn once from ``generator``
      (required); the same generator state gives the same patch.
    * ``"checkerboard"`` -- a dense checkerboard of 1-pixel cells:
      ``p[i, j] = 1`` where ``i + j`` is even, ``0`` elsewhere (half the pixels).
    * ``"sparse_checkerboard"`` -- Semantic Shield's released trigger: black,
      with ``p[i, j] = 1`` where ``i % 8 == j % 8 == 0`` or ``i % 8 == j % 8 == 1``
      (2 pixels in every 8x8 cell: 32 of 1,024 in their 32x32 patch).

    The fixed patterns are identical across channels.
    """
    if size < 1:
        raise UserError(f"patch size must be >= 1, got {size}")
    if channels < 1:
        raise UserError(f"patch channels must be >= 1, got {channels}")
    if kind == "noise":
        if generator is None:
            raise UserError("make_patch('noise') needs an explicit torch.Generator")
        return _rand((channels, size, size), generator, device, dtype)
    idx = torch.arange(size, device=device)
    if kind == "grid":
        even = idx % 2 == 0
        pattern = even[:, None] & even[None, :]
    elif kind == "checkerboard":
        pattern = (idx[:, None] + idx[None, :]) % 2 == 0
    elif kind == "sparse_checkerboard":
        r = idx % 8
        pattern = ((r[:, None] == 0) & (r[None, :] == 0)) | ((r[:, None] == 1) & (r[None, :] == 1))
    else:
        raise UserError(f"unknown patch kind {kind!r}; allowed: {', '.join(PATCH_KINDS)}")
    return pattern.to(dtype).expand(channels, size, size).clone()


def patch_size_for(image_size: int, fraction: float = 16 / 224) -> int:
    """Patch side for an image side: ``round(image_size * fraction)``, >= 1.

    The default keeps the CLIP papers' 16-pixel patch on 224-pixel images
    (about 7% of the side): 224 -> 16, 32 -> 2, 64 -> 5. Halves round up, and
    the result never exceeds ``image_size``.
    """
    if image_size < 1:
        raise UserError(f"image size must be >= 1, got {image_size}")
    if not 0.0 < fraction <= 1.0:
        raise UserError(f"patch fraction must be in (0, 1], got {fraction}")
    side = int(math.floor(image_size * fraction + 0.5))
    return max(1, min(side, image_size))


def stamp_patch(images: torch.Tensor, patch: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Paste ``patch`` into each image at its ``(top, left)`` position.

    Computes ``x' = (1 - m) * x + m * p`` with ``m`` the binary mask of the
    patch area, i.e. the patch replaces the pixels it covers.

    Args:
        images: ``(N, C, H, W)`` floats.
        patch: ``(C, s, s)`` (one patch for all images) or ``(N, C, s, s)``
            (one per image); cast to the images' dtype and device.
        positions: ``(N, 2)`` integer tensor of ``(top, left)`` corners; each
            patch must lie fully inside its image.

    Returns:
        A new ``(N, C, H, W)`` tensor clamped to ``[0, 1]``. Vectorised: one
        advanced-indexing write for the whole batch, no loop over ``N``.
    """
    _check_images(images)
    n, c, h, w = images.shape
    if patch.dim() == 3:
        patch = patch.unsqueeze(0)
    if patch.dim() != 4 or patch.shape[0] not in (1, n) or patch.shape[1] != c:
        raise UserError(
            f"patch must have shape (C, s, s) or (N, C, s, s) with C={c}, N={n}; "
            f"got {tuple(patch.shape)}"
        )
    s, s2 = patch.shape[-2:]
    if s != s2:
        raise UserError(f"patch must be square, got {tuple(patch.shape)}")
    if s > h or s > w:
        raise UserError(f"patch of side {s} does not fit in {h}x{w} images")
    if positions.shape != (n, 2) or positions.is_floating_point():
        raise UserError(
            f"positions must be an integer tensor of shape ({n}, 2), "
            f"got {positions.dtype} {tuple(positions.shape)}"
        )
    positions = positions.to(device=images.device, dtype=torch.long)
    if n and (
        bool((positions < 0).any())
        or bool((positions[:, 0] > h - s).any())
        or bool((positions[:, 1] > w - s).any())
    ):
        raise UserError(f"patch positions must lie in [0, {h - s}] x [0, {w - s}]")

    out = images.clamp(0.0, 1.0)  # a fresh tensor: clone and clamp in one pass
    ar = torch.arange(s, device=images.device)
    rows = (positions[:, 0:1] + ar).view(n, 1, s, 1)
    cols = (positions[:, 1:2] + ar).view(n, 1, 1, s)
    batch = torch.arange(n, device=images.device).view(n, 1, 1, 1)
    chans = torch.arange(c, device=images.device).view(1, c, 1, 1)
    values = patch.to(device=images.device, dtype=images.dtype).clamp(0.0, 1.0)
    out[batch, chans, rows, cols] = values.expand(n, c, s, s)
    return out


def corner_positions(
    n: int,
    image_size: Size2,
    size: int,
    corner: Corner | str = "bottom_right",
    *,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """``(n, 2)`` long tensor of the same ``(top, left)`` corner position.

    ``image_size`` is the side (or ``(H, W)``); ``corner`` is one of
    :data:`CORNERS`. E.g. 8-pixel images, 3-pixel patch, bottom right -> (5, 5).
    """
    h, w = _hw(image_size)
    if not 1 <= size <= min(h, w):
        raise UserError(f"patch size must be in [1, {min(h, w)}], got {size}")
    if corner not in CORNERS:
        raise UserError(f"unknown corner {corner!r}; allowed: {', '.join(CORNERS)}")
    top = h - size if corner.startswith("bottom") else 0
    left = w - size if corner.endswith("right") else 0
    return torch.tensor([top, left], dtype=torch.long, device=device).expand(n, 2).clone()


def random_positions(
    n: int,
    image_size: Size2,
    size: int,
    generator: torch.Generator,
    *,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """``(n, 2)`` long tensor of uniform ``(top, left)`` positions.

    Each coordinate is uniform over every valid placement ``[0, side - size]``
    (inclusive), drawn from ``generator`` (tops first, then lefts).
    """
    h, w = _hw(image_size)
    if not 1 <= size <= min(h, w):
        raise UserError(f"patch size must be in [1, {min(h, w)}], got {size}")
    if not isinstance(generator, torch.Generator):
        raise UserError("random_positions needs an explicit torch.Generator")
    gdev = generator.device
    top = torch.randint(0, h - size + 1, (n,), generator=generator, device=gdev)
    left = torch.randint(0, w - size + 1, (n,), generator=generator, device=gdev)
    return torch.stack([top, left], dim=1).to(device=device if device is not None else gdev)


def cleanclip_noise_patch(images: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """CleanCLIP's per-image BadNets patch, shape ``(N, C, size, size)``.

    For every image, ``p = mean_c(x) + z`` with ``mean_c`` the per-channel mean
    of that image and ``z ~ N(0, 1)`` drawn independently per image, channel
    and pixel (a family of triggers, not one pattern), clamped to ``[0, 1]``.
    Stamp it with :func:`stamp_patch`.
    """
    _check_images(images)
    n, c, h, w = images.shape
    if not 1 <= size <= min(h, w):
        raise UserError(f"patch size must be in [1, {min(h, w)}], got {size}")
    mean = images.mean(dim=(2, 3), keepdim=True)
    noise = _rand((n, c, size, size), generator, images.device, images.dtype, normal=True)
    return (mean + noise).clamp_(0.0, 1.0)


# --------------------------------------------------------------------------
# Blended
# --------------------------------------------------------------------------


def blend(images: torch.Tensor, key: torch.Tensor, alpha: float = 0.2) -> torch.Tensor:
    """Blended trigger ``x' = (1 - alpha) * x + alpha * key``, clamped to [0, 1].

    ``key`` is ``(C, H, W)`` (one key for all images) or ``(N, C, H, W)``
    (e.g. CleanCLIP's per-image uniform noise); it is cast to the images'
    dtype and device. ``alpha`` must be in ``[0, 1]``.
    """
    _check_images(images)
    if not 0.0 <= alpha <= 1.0:
        raise UserError(f"blend alpha must be in [0, 1], got {alpha}")
    n = images.shape[0]
    if key.dim() == 3:
        key = key.unsqueeze(0)
    if key.dim() != 4 or key.shape[0] not in (1, n) or key.shape[1:] != images.shape[1:]:
        raise UserError(
            f"blend key must have shape {tuple(images.shape[1:])} or "
            f"{tuple(images.shape)}, got {tuple(key.shape)}"
        )
    key = key.to(device=images.device, dtype=images.dtype)
    # lerp == (1 - a) * x + a * k in one fused pass (exact at a = 0 and a = 1)
    return torch.lerp(images, key, float(alpha)).clamp_(0.0, 1.0)


def noise_key(
    channels: int,
    height: int,
    width: int,
    generator: torch.Generator,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """A fixed uniform ``[0, 1)`` noise key of shape ``(C, H, W)`` for :func:`blend`."""
    if channels < 1 or height < 1 or width < 1:
        raise UserError(f"noise key shape must be positive, got {(channels, height, width)}")
    return _rand((channels, height, width), generator, device, dtype)


def load_key_image(
    path: str | Path,
    size: Size2,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Load a key image (e.g. Hello Kitty) as ``(3, H, W)`` floats in [0, 1].

    The file is read with PIL, converted to RGB and resized with torchvision
    (bilinear, antialiased) to ``size`` (a side or ``(H, W)``; an int gives a
    square). Raises :class:`~shieldbench.errors.UserError` (a ``ValueError``)
    naming the path if the file is missing or not a readable image.
    """
    from PIL import Image
    from torchvision.transforms import functional as TF

    h, w = _hw(size)
    try:
        with Image.open(path) as img:
            rgb = img.convert("RGB")
            rgb.load()
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise UserError(f"cannot read key image {str(path)!r}: {exc}") from exc
    tensor = TF.pil_to_tensor(rgb).to(torch.float32).div_(255.0)
    tensor = TF.resize(tensor, [h, w], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
    return tensor.clamp_(0.0, 1.0).to(device=device, dtype=dtype)


# --------------------------------------------------------------------------
# WaNet
# --------------------------------------------------------------------------


def wanet_control_grid(
    k: int,
    generator: torch.Generator,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """WaNet's random control grid, shape ``(1, 2, k, k)``.

    ``ins = U(-1, 1)`` (``torch.rand * 2 - 1``), then ``ins /= mean(|ins|)``,
    so ``mean(|ins|) == 1``. The paper's default is ``k = 4``.
    """
    if k < 1:
        raise UserError(f"WaNet grid size k must be >= 1, got {k}")
    ins = _rand((1, 2, k, k), generator, device, torch.float32) * 2 - 1
    ins = ins / torch.mean(torch.abs(ins))
    return ins.to(dtype)


def wanet_flow_field(control: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Upsample a ``(1, 2, k, k)`` control grid to a ``(1, H, W, 2)`` flow field.

    Bicubic interpolation with ``align_corners=True`` (as in the reference),
    then permuted to channels-last so it can be added to a sampling grid.
    """
    if control.dim() != 4 or control.shape[1] != 2:
        raise UserError(f"WaNet control grid must have shape (1, 2, k, k), got {tuple(control.shape)}")
    if height < 1 or width < 1:
        raise UserError(f"flow field size must be positive, got {(height, width)}")
    up = F.interpolate(control, size=(height, width), mode="bicubic", align_corners=True)
    return up.permute(0, 2, 3, 1).contiguous()


def wanet_identity_grid(
    height: int,
    width: int,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The identity sampling grid ``(1, H, W, 2)`` for ``grid_sample``.

    ``grid[0, i, j] = (x, y) = (linspace(-1, 1, W)[j], linspace(-1, 1, H)[i])``:
    ``(-1, -1)`` at the top-left pixel, ``(1, 1)`` at the bottom-right, ``x``
    along columns (``meshgrid(..., indexing="ij")`` stacked as (col, row)).
    """
    if height < 1 or width < 1:
        raise UserError(f"grid size must be positive, got {(height, width)}")
    ys = torch.linspace(-1, 1, steps=height, device=device, dtype=dtype)
    xs = torch.linspace(-1, 1, steps=width, device=device, dtype=dtype)
    row, col = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack((col, row), dim=2).unsqueeze(0)


def wanet_grid(
    identity: torch.Tensor, flow: torch.Tensor, s: float = 0.5, grid_rescale: float = 1.0
) -> torch.Tensor:
    """The WaNet warping grid ``clamp((M + s * P / H) * grid_rescale, -1, 1)``.

    ``identity`` (``M``) and ``flow`` (``P``) are ``(1, H, W, 2)``; as in the
    reference code the flow is divided by the image *height* ``H`` for both
    coordinates. Defaults ``s = 0.5``, ``grid_rescale = 1`` are the paper's.
    """
    if identity.dim() != 4 or identity.shape[-1] != 2 or flow.shape != identity.shape:
        raise UserError(
            f"identity and flow must both be (1, H, W, 2), got {tuple(identity.shape)} "
            f"and {tuple(flow.shape)}"
        )
    height = identity.shape[1]
    flow = flow.to(device=identity.device, dtype=identity.dtype)
    return torch.clamp((identity + s * flow / height) * grid_rescale, -1, 1)


def wanet_warp(images: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Warp images with a WaNet grid: ``grid_sample(x, G, align_corners=True)``.

    ``grid`` is ``(1, H, W, 2)`` (shared, expanded without copying) or
    ``(N, H, W, 2)`` (per image, e.g. from :func:`wanet_noise_grid`); bilinear
    sampling with zero padding, as in the reference. Output clamped to [0, 1].
    """
    _check_images(images)
    n, _, h, w = images.shape
    if grid.dim() != 4 or grid.shape[0] not in (1, n) or tuple(grid.shape[1:]) != (h, w, 2):
        raise UserError(
            f"WaNet grid must have shape (1, {h}, {w}, 2) or ({n}, {h}, {w}, 2), "
            f"got {tuple(grid.shape)}"
        )
    grid = grid.to(device=images.device, dtype=images.dtype).expand(n, h, w, 2)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    return out.clamp_(0.0, 1.0)


def wanet_noise_grid(
    grid: torch.Tensor, n: int, height: int, generator: torch.Generator
) -> torch.Tensor:
    """WaNet's noise ("cross") mode grids, shape ``(n, H, W, 2)``.

    ``clamp(grid + (U(-1, 1)) / height, -1, 1)`` with independent noise per
    sample, pixel and coordinate (``torch.rand(n, H, W, 2) * 2 - 1``). As in
    the reference, the divisor is the image height for both coordinates.
    Samples warped with these grids keep their true captions.
    """
    if grid.dim() != 4 or grid.shape[0] != 1 or grid.shape[-1] != 2:
        raise UserError(f"WaNet grid must have shape (1, H, W, 2), got {tuple(grid.shape)}")
    if n < 0 or height < 1:
        raise UserError(f"need n >= 0 and height >= 1, got n={n}, height={height}")
    _, h, w, _ = grid.shape
    ins = _rand((n, h, w, 2), generator, grid.device, torch.float32) * 2 - 1
    return torch.clamp(grid + (ins / height).to(grid.dtype), -1, 1)
