"""Tests for shieldbench.attacks.triggers.

Expected values are written by hand or computed by independent code in this
file (explicit loops, a hand-written bicubic interpolator), never by calling
the function under test a second way.
"""

from __future__ import annotations

import math

import pytest
import torch

from shieldbench.attacks import triggers as T


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------
# patch patterns
# --------------------------------------------------------------------------


def test_grid_pattern_values():
    p = T.make_patch("grid", 4, channels=3)
    expected = torch.tensor(
        [[1, 0, 1, 0], [0, 0, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]], dtype=torch.float32
    )
    assert p.shape == (3, 4, 4)
    for c in range(3):
        assert torch.equal(p[c], expected)


def test_grid_pattern_odd_size():
    p = T.make_patch("grid", 3, channels=1)
    assert torch.equal(p[0], torch.tensor([[1.0, 0, 1], [0, 0, 0], [1, 0, 1]]))


def test_checkerboard_pattern_values():
    p = T.make_patch("checkerboard", 3, channels=2)
    expected = torch.tensor([[1.0, 0, 1], [0, 1, 0], [1, 0, 1]])
    assert p.shape == (2, 3, 3)
    assert torch.equal(p[0], expected) and torch.equal(p[1], expected)


def test_sparse_checkerboard_is_semantic_shields_released_trigger():
    # Their code: patch = zeros((32, 32, 3)); patch[::8, ::8] = 255; patch[1::8, 1::8] = 255.
    p = T.make_patch("sparse_checkerboard", 32)
    assert p.shape == (3, 32, 32) and int(p[0].sum()) == 32
    ones = {(i, j) for i in range(32) for j in range(32) if p[0, i, j] == 1}
    assert ones == {(i, j) for i in range(0, 32, 8) for j in range(0, 32, 8)} | {
        (i, j) for i in range(1, 32, 8) for j in range(1, 32, 8)}
    assert torch.equal(p[0], p[2])
    small = T.make_patch("sparse_checkerboard", 4)[0]
    assert small.nonzero().tolist() == [[0, 0], [1, 1]]


def test_noise_patch_seeded_fixed_and_in_range():
    a = T.make_patch("noise", 5, generator=gen(1))
    b = T.make_patch("noise", 5, generator=gen(1))
    c = T.make_patch("noise", 5, generator=gen(2))
    assert a.shape == (3, 5, 5)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert a.min() >= 0 and a.max() <= 1


def test_make_patch_errors():
    with pytest.raises(ValueError, match="unknown patch kind"):
        T.make_patch("stars", 4)
    with pytest.raises(ValueError, match="Generator"):
        T.make_patch("noise", 4)
    with pytest.raises(ValueError):
        T.make_patch("grid", 0)


def test_make_patch_dtype():
    assert T.make_patch("grid", 4, dtype=torch.float64).dtype == torch.float64


@pytest.mark.parametrize(
    "image_size,expected", [(224, 16), (32, 2), (64, 5), (1, 1), (8, 1), (112, 8)]
)
def test_patch_size_for(image_size, expected):
    assert T.patch_size_for(image_size) == expected


def test_patch_size_for_custom_fraction():
    assert T.patch_size_for(32, 0.25) == 8
    assert T.patch_size_for(10, 0.25) == 3  # 2.5 rounds up
    with pytest.raises(ValueError):
        T.patch_size_for(32, 0.0)


# --------------------------------------------------------------------------
# stamping
# --------------------------------------------------------------------------


def _manual_expected(images, patches, positions):
    """Independent per-pixel reference: explicit loops."""
    out = images.clone()
    n, c, _, _ = images.shape
    s = patches.shape[-1]
    for i in range(n):
        top, left = (int(v) for v in positions[i])
        for ch in range(c):
            for r in range(s):
                for q in range(s):
                    out[i, ch, top + r, left + q] = patches[i, ch, r, q]
    return out


def test_stamp_exact_pixels_several_positions():
    n, c, size, s = 4, 3, 8, 3
    images = torch.full((n, c, size, size), 0.25)
    patch = (torch.arange(c * s * s, dtype=torch.float32) / (c * s * s)).view(c, s, s)
    positions = torch.tensor([[0, 0], [2, 3], [5, 5], [0, 5]])  # incl. bottom-right
    out = T.stamp_patch(images, patch, positions)
    expected = _manual_expected(images, patch.expand(n, c, s, s), positions)
    assert torch.equal(out, expected)
    # hand check: image 2 bottom-right corner pixel is the patch's last pixel
    assert out[2, 2, 7, 7] == patch[2, 2, 2]
    assert out[2, 0, 5, 5] == patch[0, 0, 0]
    assert out[2, 0, 4, 4] == 0.25 and out[2, 0, 4, 7] == 0.25
    # everything outside the patch is untouched
    mask = torch.zeros(n, 1, size, size, dtype=torch.bool)
    for i, (t, l) in enumerate(positions.tolist()):
        mask[i, :, t : t + s, l : l + s] = True
    assert torch.all(out.masked_select(~mask.expand_as(out)) == 0.25)
    # input unchanged
    assert torch.all(images == 0.25)


def test_stamp_bottom_right_corner():
    images = torch.zeros(2, 3, 6, 6)
    patch = torch.ones(3, 2, 2)
    pos = T.corner_positions(2, 6, 2)
    out = T.stamp_patch(images, patch, pos)
    assert torch.all(out[:, :, 4:, 4:] == 1)
    assert out.sum() == 2 * 3 * 4


def test_stamp_per_image_patches():
    images = torch.zeros(2, 1, 4, 4)
    patches = torch.tensor([[[[0.1, 0.2], [0.3, 0.4]]], [[[0.5, 0.6], [0.7, 0.8]]]])
    pos = torch.tensor([[1, 2], [2, 0]])
    out = T.stamp_patch(images, patches, pos)
    assert torch.equal(out[0, 0, 1:3, 2:4], patches[0, 0])
    assert torch.equal(out[1, 0, 2:4, 0:2], patches[1, 0])
    assert out[0].sum().item() == pytest.approx(1.0)
    assert out[1].sum().item() == pytest.approx(2.6)


def test_stamp_clamps_patch_and_images():
    images = torch.full((1, 1, 4, 4), 1.5)
    patch = torch.tensor([[[2.0, -1.0], [0.5, 1.0]]])
    out = T.stamp_patch(images, patch, torch.tensor([[0, 0]]))
    assert torch.equal(out[0, 0, :2, :2], torch.tensor([[1.0, 0.0], [0.5, 1.0]]))
    assert out.max() <= 1 and out.min() >= 0


def test_stamp_float64_and_bad_positions():
    images = torch.zeros(1, 3, 5, 5, dtype=torch.float64)
    out = T.stamp_patch(images, T.make_patch("grid", 2), torch.tensor([[3, 3]]))
    assert out.dtype == torch.float64 and out[0, 0, 3, 3] == 1
    with pytest.raises(ValueError, match="positions"):
        T.stamp_patch(images, T.make_patch("grid", 2), torch.tensor([[4, 0]]))
    with pytest.raises(ValueError, match="positions"):
        T.stamp_patch(images, T.make_patch("grid", 2), torch.tensor([[-1, 0]]))
    with pytest.raises(ValueError, match="patch"):
        T.stamp_patch(images, torch.ones(1, 2, 2), torch.tensor([[0, 0]]))


def test_corner_positions():
    assert T.corner_positions(2, 8, 3).tolist() == [[5, 5], [5, 5]]
    assert T.corner_positions(1, 8, 3, "top_left").tolist() == [[0, 0]]
    assert T.corner_positions(1, 8, 3, "top_right").tolist() == [[0, 5]]
    assert T.corner_positions(1, 8, 3, "bottom_left").tolist() == [[5, 0]]
    assert T.corner_positions(1, (6, 10), 2).tolist() == [[4, 8]]
    assert T.corner_positions(3, 8, 3).dtype == torch.long
    with pytest.raises(ValueError, match="corner"):
        T.corner_positions(1, 8, 3, "middle")


def test_random_positions_range_and_determinism():
    a = T.random_positions(500, 8, 3, gen(0))
    b = T.random_positions(500, 8, 3, gen(0))
    c = T.random_positions(500, 8, 3, gen(1))
    assert a.shape == (500, 2) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() == 0 and a.max() == 5  # every valid placement, inclusive
    assert set(a[:, 0].tolist()) == set(range(6))


def test_cleanclip_noise_patch():
    images = torch.zeros(4, 3, 16, 16)
    images[:, 1] = 0.5
    images[:, 2] = 1.0
    p = T.cleanclip_noise_patch(images, 16, gen(0))
    q = T.cleanclip_noise_patch(images, 16, gen(0))
    r = T.cleanclip_noise_patch(images, 16, gen(1))
    assert p.shape == (4, 3, 16, 16)
    assert torch.equal(p, q) and not torch.equal(p, r)
    # N(0,1) noise goes outside [0,1]: clamped, so exact 0s and 1s appear
    assert p.min() == 0 and p.max() == 1
    assert (p == 0).any() and (p == 1).any()
    # resampled per image
    assert not torch.equal(p[0], p[1])
    # per-channel mean drives the patch: E[clamp(m+Z,0,1)] = phi(0)-phi(1)+P(Z>1) = 0.316 / 0.5 / 0.684
    means = p.mean(dim=(0, 2, 3))
    assert abs(means[0] - 0.316) < 0.04
    assert abs(means[1] - 0.5) < 0.04
    assert abs(means[2] - 0.684) < 0.04


# --------------------------------------------------------------------------
# blended
# --------------------------------------------------------------------------


def test_blend_constant_arithmetic():
    x = torch.full((2, 3, 4, 4), 0.5)
    k = torch.ones(3, 4, 4)
    out = T.blend(x, k, alpha=0.2)
    torch.testing.assert_close(out, torch.full_like(x, 0.6))
    torch.testing.assert_close(T.blend(x, torch.zeros(3, 4, 4), 0.2), torch.full_like(x, 0.4))
    assert torch.equal(T.blend(x, k, 0.0), x)
    assert torch.equal(T.blend(x, k, 1.0), torch.ones_like(x))
    assert torch.all(x == 0.5)  # input untouched


def test_blend_clamps():
    x = torch.ones(1, 3, 4, 4)
    out = T.blend(x, torch.ones(3, 4, 4), alpha=0.2)
    assert out.max() <= 1.0
    out = T.blend(x, torch.full((3, 4, 4), 1.5), alpha=0.2)  # raw 1.1
    assert torch.equal(out, torch.ones_like(x))
    out = T.blend(torch.zeros(1, 3, 4, 4), torch.full((3, 4, 4), -2.0), alpha=0.3)
    assert torch.equal(out, torch.zeros(1, 3, 4, 4))


def test_blend_per_image_key_and_errors():
    x = torch.zeros(2, 1, 2, 2)
    keys = torch.stack([torch.ones(1, 2, 2), torch.full((1, 2, 2), 0.5)])
    out = T.blend(x, keys, alpha=0.5)
    torch.testing.assert_close(out[0], torch.full((1, 2, 2), 0.5))
    torch.testing.assert_close(out[1], torch.full((1, 2, 2), 0.25))
    with pytest.raises(ValueError, match="key"):
        T.blend(x, torch.ones(1, 3, 3), 0.2)
    with pytest.raises(ValueError, match="alpha"):
        T.blend(x, torch.ones(1, 2, 2), 1.5)


def test_noise_key():
    a = T.noise_key(3, 4, 5, gen(3))
    assert a.shape == (3, 4, 5) and a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, T.noise_key(3, 4, 5, gen(3)))
    assert not torch.equal(a, T.noise_key(3, 4, 5, gen(4)))


def test_load_key_image(tmp_path):
    from PIL import Image

    path = tmp_path / "key.png"
    Image.new("RGB", (6, 4), (255, 0, 0)).save(path)
    key = T.load_key_image(path, 8)
    assert key.shape == (3, 8, 8) and key.dtype == torch.float32
    torch.testing.assert_close(key[0], torch.ones(8, 8))
    torch.testing.assert_close(key[1:], torch.zeros(2, 8, 8))
    assert T.load_key_image(path, (5, 7)).shape == (3, 5, 7)
    # grayscale input becomes 3 channels
    gray = tmp_path / "gray.png"
    Image.new("L", (4, 4), 128).save(gray)
    torch.testing.assert_close(T.load_key_image(gray, 4), torch.full((3, 4, 4), 128 / 255))


def test_load_key_image_unreadable(tmp_path):
    bad = tmp_path / "not_an_image.png"
    bad.write_text("hello")
    with pytest.raises(ValueError, match="not_an_image.png"):
        T.load_key_image(bad, 8)
    missing = tmp_path / "missing.jpg"
    with pytest.raises(ValueError, match="missing.jpg"):
        T.load_key_image(missing, 8)


# --------------------------------------------------------------------------
# WaNet
# --------------------------------------------------------------------------


def _cubic_weights(t: float, a: float = -0.75) -> list[float]:
    """Keys cubic convolution weights for offsets -1, 0, 1, 2 (PyTorch's A)."""

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return [far(t + 1), near(t), near(1 - t), far(2 - t)]


def _bicubic_align_corners(src: list[list[float]], out_h: int, out_w: int) -> list[list[float]]:
    """Independent bicubic upsampling (align_corners=True, border-replicate)."""
    in_h, in_w = len(src), len(src[0])

    def taps(dst: int, n_in: int, n_out: int):
        real = dst * (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
        base = math.floor(real)
        w = _cubic_weights(real - base)
        idx = [min(max(base + o, 0), n_in - 1) for o in (-1, 0, 1, 2)]
        return idx, w

    out = [[0.0] * out_w for _ in range(out_h)]
    for i in range(out_h):
        ri, rw = taps(i, in_h, out_h)
        for j in range(out_w):
            ci, cw = taps(j, in_w, out_w)
            out[i][j] = sum(
                rw[a] * cw[b] * src[ri[a]][ci[b]] for a in range(4) for b in range(4)
            )
    return out


CONTROL = torch.tensor(
    [
        [[1.0, -0.5, 0.25, 2.0], [0.0, 1.5, -2.0, 0.5], [-1.0, 0.75, 1.0, -0.25], [0.5, -1.5, 0.0, 1.0]],
        [[-0.5, 1.0, 2.0, 0.0], [1.25, -1.0, 0.5, -2.0], [0.0, 0.5, -0.75, 1.5], [2.0, 1.0, -1.0, 0.25]],
    ]
).unsqueeze(0)


def test_wanet_flow_field_matches_independent_bicubic():
    h, w = 6, 10
    flow = T.wanet_flow_field(CONTROL, h, w)
    assert flow.shape == (1, h, w, 2)
    for ch in range(2):
        exp = torch.tensor(_bicubic_align_corners(CONTROL[0, ch].tolist(), h, w))
        torch.testing.assert_close(flow[0, :, :, ch], exp, atol=1e-5, rtol=1e-5)
    # align_corners=True: corners reproduce the control points exactly
    torch.testing.assert_close(flow[0, 0, 0], CONTROL[0, :, 0, 0])
    torch.testing.assert_close(flow[0, -1, -1], CONTROL[0, :, -1, -1])


@pytest.mark.parametrize("s,rescale", [(0.5, 1.0), (4.0, 1.0), (0.5, 1.1)])
def test_wanet_grid_matches_formula(s, rescale):
    h, w = 6, 10
    flow = T.wanet_flow_field(CONTROL, h, w)
    grid = T.wanet_grid(T.wanet_identity_grid(h, w), flow, s=s, grid_rescale=rescale)
    assert grid.shape == (1, h, w, 2)
    up = [_bicubic_align_corners(CONTROL[0, ch].tolist(), h, w) for ch in range(2)]
    for i in range(h):
        for j in range(w):
            ident = (-1 + 2 * j / (w - 1), -1 + 2 * i / (h - 1))  # (x=col, y=row)
            for ch in range(2):
                # divisor is the image HEIGHT for both coordinates (reference)
                v = (ident[ch] + s * up[ch][i][j] / h) * rescale
                v = min(1.0, max(-1.0, v))
                assert grid[0, i, j, ch].item() == pytest.approx(v, abs=1e-5)
    assert grid.min() >= -1 and grid.max() <= 1


def test_wanet_identity_grid_orientation():
    g = T.wanet_identity_grid(4, 5)
    assert g.shape == (1, 4, 5, 2)
    assert g[0, 0, 0].tolist() == [-1.0, -1.0]
    assert g[0, -1, -1].tolist() == [1.0, 1.0]
    assert g[0, 0, -1].tolist() == [1.0, -1.0]  # top-right: x=+1, y=-1
    assert g[0, -1, 0].tolist() == [-1.0, 1.0]
    assert g[0, 0, 1, 0].item() == pytest.approx(-0.5)  # x steps along columns
    assert g[0, 1, 0, 1].item() == pytest.approx(-1 / 3)  # y steps along rows


def test_wanet_warp_identity_returns_image():
    x = torch.rand(3, 3, 7, 9, generator=gen(0))
    ident = T.wanet_identity_grid(7, 9)
    grid = T.wanet_grid(ident, T.wanet_flow_field(CONTROL, 7, 9), s=0.0)
    out = T.wanet_warp(x, grid)
    torch.testing.assert_close(out, x, atol=1e-5, rtol=0)


def test_wanet_warp_one_pixel_shift():
    x = torch.rand(2, 1, 4, 5, generator=gen(0))
    grid = T.wanet_identity_grid(4, 5).clone()
    grid[..., 0] += 2 / (5 - 1)  # sample one column to the right
    out = T.wanet_warp(x, grid)
    torch.testing.assert_close(out[..., :-1], x[..., 1:], atol=1e-5, rtol=0)
    # last column samples one pixel beyond the border: zero padding
    torch.testing.assert_close(out[..., -1], torch.zeros(2, 1, 4), atol=1e-5, rtol=0)


def test_wanet_warp_per_image_grid_and_clamp():
    x = torch.ones(2, 1, 4, 4) * 1.2  # out-of-range input is clamped
    ident = T.wanet_identity_grid(4, 4)
    grids = T.wanet_noise_grid(ident, 2, 4, gen(0))
    out = T.wanet_warp(x, grids)
    assert out.shape == x.shape and out.max() <= 1 and out.min() >= 0
    with pytest.raises(ValueError, match="grid"):
        T.wanet_warp(x, T.wanet_identity_grid(5, 4))


def test_wanet_control_grid_properties():
    a = T.wanet_control_grid(4, gen(0))
    assert a.shape == (1, 2, 4, 4)
    assert a.abs().mean().item() == pytest.approx(1.0, abs=1e-6)
    assert torch.equal(a, T.wanet_control_grid(4, gen(0)))
    assert not torch.equal(a, T.wanet_control_grid(4, gen(1)))
    # exact reference recipe: rand*2-1 then divided by mean(|.|)
    raw = torch.rand(1, 2, 4, 4, generator=gen(0)) * 2 - 1
    ratio = a / raw
    assert torch.allclose(ratio, ratio.flatten()[0].expand_as(ratio))
    assert ratio.flatten()[0] > 0


def test_wanet_noise_grid():
    h, w = 6, 10  # non-square: the noise divisor is the height
    grid = T.wanet_grid(
        T.wanet_identity_grid(h, w), T.wanet_flow_field(T.wanet_control_grid(4, gen(0)), h, w)
    )
    noisy = T.wanet_noise_grid(grid, 5, h, gen(1))
    assert noisy.shape == (5, h, w, 2)
    assert noisy.min() >= -1 and noisy.max() <= 1
    dev = (noisy - grid).abs().max().item()
    assert 1 / w < dev <= 1 / h + 1e-6
    assert not torch.equal(noisy[0], noisy[1])  # independent per sample
    assert torch.equal(noisy, T.wanet_noise_grid(grid, 5, h, gen(1)))
    assert not torch.equal(noisy, T.wanet_noise_grid(grid, 5, h, gen(2)))
    # borders: identity at +-1 plus noise is clamped back into [-1, 1]
    assert (noisy[..., 0, :, 1] == -1).any()


def test_wanet_float64():
    x = torch.rand(2, 3, 6, 6, generator=gen(0), dtype=torch.float64)
    ident = T.wanet_identity_grid(6, 6, dtype=torch.float64)
    flow = T.wanet_flow_field(T.wanet_control_grid(4, gen(0), dtype=torch.float64), 6, 6)
    out = T.wanet_warp(x, T.wanet_grid(ident, flow))
    assert out.dtype == torch.float64 and out.shape == x.shape


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    x = torch.rand(4, 3, 8, 8, generator=gen(0))
    xc = x.cuda()
    pos = T.random_positions(4, 8, 2, gen(1))
    patch = T.make_patch("noise", 2, generator=gen(2))
    torch.testing.assert_close(T.stamp_patch(xc, patch, pos.cuda()).cpu(), T.stamp_patch(x, patch, pos))
    key = T.noise_key(3, 8, 8, gen(3), device="cuda")
    torch.testing.assert_close(T.blend(xc, key).cpu(), T.blend(x, key.cpu()))
    ctrl = T.wanet_control_grid(4, gen(4), device="cuda")
    grid = T.wanet_grid(T.wanet_identity_grid(8, 8, device="cuda"), T.wanet_flow_field(ctrl, 8, 8))
    ctrl_cpu = T.wanet_control_grid(4, gen(4))
    grid_cpu = T.wanet_grid(T.wanet_identity_grid(8, 8), T.wanet_flow_field(ctrl_cpu, 8, 8))
    torch.testing.assert_close(T.wanet_warp(xc, grid).cpu(), T.wanet_warp(x, grid_cpu), atol=1e-5, rtol=0)
