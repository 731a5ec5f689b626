"""Benchmarks: each attack's batched ``apply_trigger`` versus per-image loops.

Run with ``python -m pytest -q -s benchmarks/bench_attacks.py`` (``-s`` prints
the speedup table). Not collected by a plain ``pytest`` (testpaths = tests).

For 1024 RGB 32x32 images and every trigger-carrying attack configuration it
times three paths on one intra-op thread:

- ``batched``: ``attack.apply_trigger(images)`` (or ``apply_noise`` for
  WaNet's noise mode) on the whole batch;
- ``loop_attack``: the same method called on one image at a time;
- ``loop_ref``: a per-image reference written here from the formulas (patch
  slice assignment, ``(1-a) x + a k``, one ``grid_sample`` per image ...).

The loops are checked to give the batched output (exactly where the random
draws can be made in the same order, else in distribution). The issue asks
for >= 20x over a per-image loop; :func:`test_speedups` prints the measured
factors and asserts only the correctness of each path (the factors depend on
the machine and its load: see docs/attacks.md for measured numbers).
"""

from __future__ import annotations

import time
from typing import Callable

import pytest
import torch
import torch.nn.functional as F

from shieldbench.attacks.base import AttackContext
from shieldbench.data.types import PairSet
from shieldbench.registry import ATTACKS
from shieldbench.spec import AttackSpec

N, C, SIDE = 1024, 3, 32
CLASSES = ["apple", "banana", "kite"]

CONFIGS: dict[str, tuple[str, dict]] = {
    "badnets": ("badnets", {}),
    "badnets_random": ("badnets", {"location": "random"}),
    "badnets_cleanclip": ("badnets", {"pattern": "cleanclip", "location": "random"}),
    "blended": ("blended", {}),
    "blended_cleanclip": ("blended", {"key": "cleanclip"}),
    "wanet": ("wanet", {}),
    "wanet_noise": ("wanet", {}),
    "label_consistent": ("label_consistent", {}),
}


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(N, C, SIDE, SIDE, generator=torch.Generator().manual_seed(0))


def make_attack(config: str):
    name, options = CONFIGS[config]
    g = torch.Generator().manual_seed(1)
    train = PairSet((torch.rand(64, C, SIDE, SIDE, generator=g) * 255).to(torch.uint8),
                    [f"a photo of a {CLASSES[i % 3]}." for i in range(64)])
    ctx = AttackContext(train, CLASSES, ["a photo of a {}."], image_size=SIDE)
    atk = ATTACKS.get(name)(AttackSpec(name=name, target="banana", n_poison=8, options=options), ctx)
    atk.plan(0)
    return atk


def gen() -> torch.Generator:
    return torch.Generator().manual_seed(5)


# -- batched and per-image-attack paths ------------------------------------------------------


def batched(config: str, atk, x: torch.Tensor) -> torch.Tensor:
    if config == "wanet_noise":
        return atk.apply_noise(x, gen())
    return atk.apply_trigger(x, generator=gen())


def loop_attack(config: str, atk, x: torch.Tensor) -> torch.Tensor:
    g = gen()
    if config == "wanet_noise":
        return torch.cat([atk.apply_noise(x[i : i + 1], g) for i in range(x.shape[0])])
    return torch.cat([atk.apply_trigger(x[i : i + 1], generator=g) for i in range(x.shape[0])])


# -- per-image references written from the formulas ------------------------------------------


def loop_ref(config: str, atk, x: torch.Tensor) -> torch.Tensor:
    st = atk.trigger_state
    n, _, h, w = x.shape
    out = torch.empty_like(x)
    g = gen()
    if config.startswith("badnets") or config == "label_consistent":
        s = int(st["size"])
        if st["location"] == "random":  # tops first, then lefts, as the batched draw
            tops = torch.randint(0, h - s + 1, (n,), generator=g).tolist()
            lefts = torch.randint(0, w - s + 1, (n,), generator=g).tolist()
        else:
            tops, lefts = [h - s] * n, [w - s] * n
        patch = None if st["pattern"] == "cleanclip" else torch.tensor(st["patch"]).clamp(0, 1)
        noise = torch.randn(n, C, s, s, generator=g) if patch is None else None
        for i in range(n):
            xi = x[i].clamp(0, 1)
            p = patch if patch is not None else (xi.mean(dim=(1, 2), keepdim=True) + noise[i]).clamp(0, 1)
            xi[:, tops[i] : tops[i] + s, lefts[i] : lefts[i] + s] = p
            out[i] = xi
        return out
    if config.startswith("blended"):
        a = float(st["alpha"])
        keys = torch.rand(n, C, h, w, generator=g) if st["key"] == "cleanclip" else None
        k = atk.key_for(h, w) if keys is None else None
        for i in range(n):
            ki = k if keys is None else keys[i]
            out[i] = ((1 - a) * x[i] + a * ki).clamp(0, 1)
        return out
    grid = atk.grid(h, w)
    if config == "wanet_noise":
        ins = torch.rand(n, h, w, 2, generator=g) * 2 - 1
        for i in range(n):
            gi = torch.clamp(grid + ins[i : i + 1] / h, -1, 1)
            out[i] = F.grid_sample(x[i : i + 1], gi, align_corners=True)[0].clamp(0, 1)
        return out
    for i in range(n):
        out[i] = F.grid_sample(x[i : i + 1], grid, align_corners=True)[0].clamp(0, 1)
    return out


PATHS: dict[str, Callable] = {"batched": batched, "loop_attack": loop_attack, "loop_ref": loop_ref}
# Per-image random draws in loop_attack come in another order than one batched draw.
RANDOM_PER_IMAGE = {"badnets_random", "badnets_cleanclip", "blended_cleanclip", "wanet_noise"}


def check(config: str, path: str, out: torch.Tensor, expected: torch.Tensor) -> None:
    assert out.shape == expected.shape and out.min() >= 0 and out.max() <= 1
    if path == "loop_attack" and config in RANDOM_PER_IMAGE:
        assert abs(float(out.mean() - expected.mean())) < 2e-3
    else:
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("config", list(CONFIGS))
def test_bench(benchmark, images, config: str, path: str) -> None:
    benchmark.group = config
    atk = make_attack(config)
    fn = PATHS[path]
    out = benchmark.pedantic(fn, args=(config, atk, images), rounds=3, iterations=1, warmup_rounds=1)
    check(config, path, out, batched(config, atk, images))


def _best(fn: Callable, *args, repeats: int = 3) -> float:
    fn(*args)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(*args)
        best = min(best, time.perf_counter() - t0)
    return best


def test_speedups(images) -> None:
    """Print batched vs per-image timings for every attack configuration."""
    lines = [f"\n{'config':18} {'batched ms':>10} {'loop_attack ms':>14} {'x':>6} {'loop_ref ms':>11} {'x':>6}"]
    for config in CONFIGS:
        atk = make_attack(config)
        expected = batched(config, atk, images)
        for path in ("loop_attack", "loop_ref"):
            check(config, path, PATHS[path](config, atk, images), expected)
        tb, ta, tr = (_best(PATHS[p], config, atk, images) for p in ("batched", "loop_attack", "loop_ref"))
        lines.append(f"{config:18} {tb * 1e3:10.2f} {ta * 1e3:14.1f} {ta / tb:6.1f} {tr * 1e3:11.1f} {tr / tb:6.1f}")
    print("\n".join(lines))
