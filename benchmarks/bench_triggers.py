"""Benchmarks: batched triggers versus per-image Python loops.

Run with ``python -m pytest -q benchmarks/bench_triggers.py`` (add ``-s`` to
see the speedup table). The file is named ``bench_*.py`` so that plain
``pytest`` / ``pytest tests/`` never collect it; it runs only when named (or
when a config adds ``bench_*.py`` to ``python_files``).

For 1024 RGB 32x32 images it times the batched path of BadNets patch stamping
(random positions), blending and the WaNet warp against two per-image loop
references written here: one calling the same public function on one image at
a time (``fn(img[None], ...)``) and a tighter loop doing the same math with
plain slicing / one-image ops. :func:`test_speedups` asserts the batched patch
stamp is at least 20x faster than the per-image function loop. Timings use
one intra-op thread (see :func:`single_thread`).
"""

from __future__ import annotations

import time
from typing import Callable

import pytest
import torch
import torch.nn.functional as F

from shieldbench.attacks import triggers as T

N, C, SIDE = 1024, 3, 32
ALPHA = 0.2
PATHS = ("batched", "loop_fn", "loop_slice")


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """Time both paths on one intra-op thread.

    The loops are single-threaded anyway, so this measures vectorisation
    rather than parallelism; on small shared machines extra threads also make
    the batched ops *slower* (clamp of 1024x3x32x32: ~0.9 ms on 1 thread,
    ~7 ms on 2 contended threads).
    """
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def data() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    images = torch.rand(N, C, SIDE, SIDE, generator=g)
    size = T.patch_size_for(SIDE)
    patch = T.make_patch("grid", size, C)
    positions = T.random_positions(N, SIDE, size, g)
    key = T.noise_key(C, SIDE, SIDE, g)
    ident = T.wanet_identity_grid(SIDE, SIDE)
    flow = T.wanet_flow_field(T.wanet_control_grid(4, g), SIDE, SIDE)
    grid = T.wanet_grid(ident, flow, s=0.5)
    return {"images": images, "patch": patch, "positions": positions, "key": key, "grid": grid}


# -- batched paths -----------------------------------------------------------


def batched_stamp(d: dict) -> torch.Tensor:
    return T.stamp_patch(d["images"], d["patch"], d["positions"])


def batched_blend(d: dict) -> torch.Tensor:
    return T.blend(d["images"], d["key"], ALPHA)


def batched_wanet(d: dict) -> torch.Tensor:
    return T.wanet_warp(d["images"], d["grid"])


# -- per-image loop references -------------------------------------------------


def loop_stamp_fn(d: dict) -> torch.Tensor:
    """The same function, one image at a time."""
    x, p, pos = d["images"], d["patch"], d["positions"]
    return torch.cat([T.stamp_patch(x[i : i + 1], p, pos[i : i + 1]) for i in range(x.shape[0])])


def loop_stamp_slice(d: dict) -> torch.Tensor:
    """Tight naive loop: clamp once, then one slice assignment per image."""
    x, p = d["images"], d["patch"].clamp(0, 1)
    s = p.shape[-1]
    out = x.clamp(0, 1)
    for i, (top, left) in enumerate(d["positions"].tolist()):
        out[i, :, top : top + s, left : left + s] = p
    return out


def loop_blend_fn(d: dict) -> torch.Tensor:
    x = d["images"]
    return torch.cat([T.blend(x[i : i + 1], d["key"], ALPHA) for i in range(x.shape[0])])


def loop_blend_slice(d: dict) -> torch.Tensor:
    x, k = d["images"], d["key"]
    out = torch.empty_like(x)
    for i in range(x.shape[0]):
        out[i] = ((1 - ALPHA) * x[i] + ALPHA * k).clamp_(0, 1)
    return out


def loop_wanet_fn(d: dict) -> torch.Tensor:
    x = d["images"]
    return torch.cat([T.wanet_warp(x[i : i + 1], d["grid"]) for i in range(x.shape[0])])


def loop_wanet_slice(d: dict) -> torch.Tensor:
    x, g = d["images"], d["grid"]
    out = torch.empty_like(x)
    for i in range(x.shape[0]):
        out[i] = F.grid_sample(x[i : i + 1], g, align_corners=True)[0].clamp_(0, 1)
    return out


CASES: dict[str, tuple[Callable, Callable, Callable]] = {
    "stamp": (batched_stamp, loop_stamp_fn, loop_stamp_slice),
    "blend": (batched_blend, loop_blend_fn, loop_blend_slice),
    "wanet": (batched_wanet, loop_wanet_fn, loop_wanet_slice),
}


# -- pytest-benchmark timings ----------------------------------------------------


@pytest.mark.parametrize("trigger", list(CASES))
@pytest.mark.parametrize("path", PATHS)
def test_bench(benchmark, data, trigger: str, path: str) -> None:
    benchmark.group = trigger
    fn = CASES[trigger][PATHS.index(path)]
    out = benchmark.pedantic(fn, args=(data,), rounds=5, iterations=1, warmup_rounds=1)
    torch.testing.assert_close(out, CASES[trigger][0](data), atol=1e-6, rtol=0)


# -- speedup check -------------------------------------------------------------


def _best_time(fn: Callable, d: dict, repeats: int = 5) -> float:
    fn(d)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(d)
        best = min(best, time.perf_counter() - t0)
    return best


def test_speedups(data) -> None:
    """Batched vs per-image loops for 1024 images; stamping must be >= 20x."""
    speedups: dict[str, tuple[float, float]] = {}
    lines = [
        f"\n{'trigger':8} {'batched ms':>11} {'loop_fn ms':>11} {'x':>7} "
        f"{'loop_slice ms':>14} {'x':>7}"
    ]
    for name, (batched, loop_fn, loop_slice) in CASES.items():
        expected = batched(data)
        torch.testing.assert_close(loop_fn(data), expected, atol=1e-6, rtol=0)
        torch.testing.assert_close(loop_slice(data), expected, atol=1e-6, rtol=0)
        tb = _best_time(batched, data)
        tf = _best_time(loop_fn, data)
        ts = _best_time(loop_slice, data)
        speedups[name] = (tf / tb, ts / tb)
        lines.append(
            f"{name:8} {tb * 1e3:11.3f} {tf * 1e3:11.2f} {tf / tb:7.1f} "
            f"{ts * 1e3:14.2f} {ts / tb:7.1f}"
        )
    print("\n".join(lines))
    assert speedups["stamp"][0] >= 20, (
        f"batched stamp only {speedups['stamp'][0]:.1f}x faster than the per-image loop"
    )
