"""GPU smoke: ViT-B-32 at batch 256 through shieldbench's Trainer step, plain CLIP and Semantic Shield.

    python benchmarks/gpu_smoke.py                     # ViT-B-32, batch 256, 224 px, bf16 autocast
    python benchmarks/gpu_smoke.py --compile --channels-last --grad-checkpointing
    python benchmarks/gpu_smoke.py --device cpu --model tiny-vit --image-size 32 --batch 16 --steps 2   # the code path on CPU

Prints, for each objective, samples per second, peak GPU memory and the
model FLOP utilisation (MFU): the step's FLOPs, counted once by
``torch.utils.flop_counter.FlopCounterMode`` on a plain step (forward and
backward, no recomputation), times steps per second, over the device's peak
dense bf16 rate (a table of known GPUs, or ``--peak-tflops``). Without a CUDA
device (and without ``--device cpu``) it prints one line saying so and exits
0: ``bench_performance.py::test_gpu_smoke`` is skipped there.

The switches are the ``runtime`` ones a run takes (``runtime.compile``,
``runtime.channels_last``, ``runtime.grad_checkpointing``,
``runtime.fused_adamw``), applied the way ``Trainer.fit`` applies them.
Precision is ``train.precision=auto``: bf16 autocast on CUDA.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from typing import Any

import torch

# Peak dense bf16 tensor-core rates (TFLOP/s, no sparsity), from the vendors' data sheets.
PEAK_BF16_TFLOPS = {
    "H200": 989.0, "H100 SXM": 989.0, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 756.0,
    "A100": 312.0, "A10G": 70.0, "A10": 125.0, "L40S": 362.0, "L4": 121.0, "V100": 125.0,
    "RTX 4090": 165.0, "RTX 3090": 71.0,
}


def peak_tflops(device: torch.device, override: float = 0.0) -> float:
    """The device's peak dense bf16 TFLOP/s (0 when unknown: MFU is then not reported)."""
    if override > 0:
        return override
    if device.type != "cuda":
        return 0.0
    name = torch.cuda.get_device_name(device)
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):  # "H100 SXM" before "H100"
        if key in name:
            return PEAK_BF16_TFLOPS[key]
    return 0.0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_flops(trainer, batch) -> float:
    """FLOPs of one training step (forward + backward) as torch's flop counter counts them."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        trainer.train_step(batch)
    return float(counter.get_total_flops())


def measure(objective_name: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Samples/s, peak memory and MFU of ``args.steps`` steps of one objective."""
    from shieldbench.data.synthetic import generate_pairs, knowledge_from_caption
    from shieldbench.data.views import TrainView
    from shieldbench.models.factory import build_model
    from shieldbench.spec import DefenseSpec
    from shieldbench.training import acceleration
    from shieldbench.training.losses import ClipObjective
    from shieldbench.training.trainer import TrainConfig, Trainer

    torch.manual_seed(0)
    images, captions, _, _ = generate_pairs(args.batch, args.image_size, torch.Generator().manual_seed(0))
    knowledge = [knowledge_from_caption(c, 3) for c in captions] if objective_name != "plain" else None
    view = TrainView(images, captions, knowledge)
    model = build_model(args.model, "", args.image_size).to(device)
    if objective_name == "plain":
        objective = ClipObjective()
    else:
        from shieldbench.defenses.semantic_shield import SemanticShield

        objective = SemanticShield(DefenseSpec("semantic_shield")).objective(None)
    accel = acceleration.Acceleration(fused_adamw=not args.no_fused_adamw, channels_last=args.channels_last,
                                      grad_checkpointing=args.grad_checkpointing, compile=args.compile)
    cfg = TrainConfig(epochs=1, batch_size=args.batch, lr=1e-4, precision="auto", accel=accel, workers=0)
    trainer = Trainer(model, view, cfg, objective=objective, device=device, show_progress=False)
    model.train()
    batch = trainer.make_batch(torch.arange(args.batch), 0)
    # Model FLOPs from a plain eager step: no recomputation (checkpointing) and no compiled graph counted.
    flops = step_flops(trainer, batch)
    with acceleration.applied(model, accel):
        batch = trainer.make_batch(torch.arange(args.batch), 0)  # in the switches' memory format
        for _ in range(args.warmup):
            trainer.train_step(batch)
        _sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t = time.perf_counter()
        for _ in range(args.steps):
            out = trainer.train_step(batch)
        _sync(device)
        seconds = time.perf_counter() - t
    steps_per_s = args.steps / seconds
    peak = peak_tflops(device, args.peak_tflops)
    result = {
        "objective": objective_name, "model": args.model, "batch": args.batch, "image_size": args.image_size,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "precision": "bf16 autocast" if device.type == "cuda" else "fp32",
        "switches": dataclasses.asdict(accel),
        "samples_per_s": args.batch * steps_per_s, "step_s": 1.0 / steps_per_s,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan"),
        "step_tflop": flops / 1e12, "achieved_tflops": flops * steps_per_s / 1e12,
        "mfu": flops * steps_per_s / (peak * 1e12) if peak else float("nan"), "peak_tflops": peak,
        "loss": float(out.loss.detach()),
    }
    del trainer, model, batch
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def describe(r: dict[str, Any]) -> str:
    mfu = f"MFU {100 * r['mfu']:.1f}% of {r['peak_tflops']:.0f} TFLOP/s" if r["peak_tflops"] else "MFU n/a (peak unknown)"
    mem = f"peak memory {r['peak_memory_gib']:.1f} GiB" if r["peak_memory_gib"] == r["peak_memory_gib"] else "peak memory n/a (CPU)"
    return (f"{r['objective']}: {r['model']} batch {r['batch']} at {r['image_size']} px on {r['device']} ({r['precision']}): "
            f"{r['samples_per_s']:.0f} samples/s ({1e3 * r['step_s']:.0f} ms/step), {mem}, "
            f"{r['step_tflop'] * 1e3:.1f} GFLOP/step = {r['achieved_tflops']:.2f} TFLOP/s, {mfu}")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cuda")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--no-fused-adamw", action="store_true")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="the device's peak dense bf16 TFLOP/s (default: table)")
    p.add_argument("--objectives", default="plain,semantic_shield")
    p.add_argument("--json", action="store_true", help="one JSON line per objective instead of text")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_smoke: skipped, no CUDA device")
        return []
    results = []
    for name in args.objectives.split(","):
        r = measure(name, args, device)
        results.append(r)
        print(json.dumps(r) if args.json else describe(r), flush=True)
    if len(results) == 2:
        ratio = results[1]["step_s"] / results[0]["step_s"]
        print(f"{results[1]['objective']} / {results[0]['objective']} step time: {ratio:.2f}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
