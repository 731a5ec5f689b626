"""Speed paths: runtime switches, the bounded token cache, lazy tokenisation of a CSV, the zero-shot classifier once.

What each switch may do to the numbers is the contract of
:mod:`shieldbench.training.acceleration`: the defaults train what the plain
loop trains; channels-last and compile agree with them to rounding;
activation checkpointing computes the same numbers.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

from shieldbench.data.views import TrainView
from shieldbench.errors import UserError
from shieldbench.models import build_model
from shieldbench.spec import RuntimeSpec, build_spec
from shieldbench.training import acceleration
from shieldbench.training.acceleration import Acceleration
from shieldbench.training.schedule import make_optimizer
from shieldbench.training.trainer import TrainConfig, Trainer


def _view(world, n: int = 64, knowledge: bool = False) -> TrainView:
    p = world.train
    return TrainView(p.images[:n], p.captions[:n], p.knowledge[:n] if knowledge else None)


def _fit(world, model_name: str = "micro-vit", accel: Acceleration | None = None, objective=None,
         knowledge: bool = False, epochs: int = 1) -> tuple[Trainer, torch.nn.Module]:
    torch.manual_seed(0)
    model = build_model(model_name)
    cfg = TrainConfig(epochs=epochs, batch_size=32, lr=1e-3, warmup_steps=1, precision="fp32", accel=accel)
    trainer = Trainer(model, _view(world, knowledge=knowledge), cfg, objective=objective,
                      device=torch.device("cpu"), show_progress=False)
    trainer.fit()
    return trainer, model


def _losses(trainer: Trainer) -> list[float]:
    return [row["loss"] for row in trainer.history]


# -- the spec -------------------------------------------------------------------------------------
def test_runtime_switches_are_validated_and_default_to_the_plain_path():
    spec = build_spec("smoke")
    assert (spec.runtime.fused_adamw, spec.runtime.channels_last, spec.runtime.grad_checkpointing,
            spec.runtime.compile) == (True, False, False, False)
    on = build_spec("smoke", overrides={"runtime": {"channels_last": "true", "compile": 1, "grad_checkpointing": "yes",
                                                    "fused_adamw": "false"}})
    assert on.runtime == RuntimeSpec(channels_last=True, compile=True, grad_checkpointing=True, fused_adamw=False)
    assert on.hash() == spec.hash()  # how to run, not what to compute
    for bad in ("maybe", "2", None):
        with pytest.raises(UserError, match="runtime.channels_last"):
            build_spec("smoke", overrides={"runtime": {"channels_last": bad}})


def test_switches_reach_every_trainer_of_a_cell():
    runtime = RuntimeSpec(channels_last=True, grad_checkpointing=True)
    spec = build_spec("smoke")
    cfg = TrainConfig.from_spec(spec.train, 0, runtime=runtime)
    assert cfg.accel == Acceleration(channels_last=True, grad_checkpointing=True)
    model = build_model("micro-vit")
    view = TrainView(torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8), [f"thing {i}" for i in range(16)])

    def trainer() -> Trainer:
        return Trainer(model, view, TrainConfig(epochs=1, batch_size=8, lr=1e-3), device=torch.device("cpu"),
                       show_progress=False)

    # A trainer a defense configures itself (CleanCLIP's repair) takes the cell's switches from the runner's block.
    with acceleration.active(Acceleration.from_runtime(runtime)):
        inner = trainer()
    assert inner.accel.channels_last and inner.accel.grad_checkpointing
    assert trainer().accel == Acceleration()


def test_fused_adamw_switch():
    model = build_model("micro-vit")
    assert make_optimizer(model, 1e-3, 0.1).defaults["fused"] is True
    assert not make_optimizer(model, 1e-3, 0.1, fused=False).defaults["fused"]


# -- numbers --------------------------------------------------------------------------------------
def test_defaults_train_the_plain_loop(smoke_world):
    a, ma = _fit(smoke_world)
    b, mb = _fit(smoke_world, accel=Acceleration())
    assert _losses(a) == _losses(b)
    assert all(torch.equal(x, y) for x, y in zip(ma.state_dict().values(), mb.state_dict().values()))


@pytest.mark.parametrize("model_name", ["micro-vit", "tiny-rn"])
def test_channels_last_gives_the_default_loss(smoke_world, model_name):
    a, ma = _fit(smoke_world, model_name)
    b, mb = _fit(smoke_world, model_name, accel=Acceleration(channels_last=True))
    assert _losses(b) == pytest.approx(_losses(a), rel=1e-4)
    for (name, x), y in zip(ma.state_dict().items(), mb.state_dict().values()):
        assert torch.allclose(x, y, atol=1e-4), name
        # Undone after fit: what is saved and evaluated is in the ordinary layout.
        assert y.is_contiguous(), name


def test_grad_checkpointing_gives_the_same_numbers(smoke_world):
    a, ma = _fit(smoke_world, "tiny-vit")
    b, mb = _fit(smoke_world, "tiny-vit", accel=Acceleration(grad_checkpointing=True))
    assert _losses(b) == pytest.approx(_losses(a), rel=1e-6)
    assert all(torch.allclose(x, y, atol=1e-6) for x, y in zip(ma.state_dict().values(), mb.state_dict().values()))
    assert not mb.clip.transformer.grad_checkpointing and not mb.clip.visual.transformer.grad_checkpointing


def test_grad_checkpointing_with_attention_capture(smoke_world):
    # Semantic Shield captures the last block's attention through hooks; a recomputed block would run
    # without them, so a capturing call keeps its image tower's activations.
    from shieldbench.defenses.semantic_shield import SemanticShield
    from shieldbench.spec import DefenseSpec

    def objective():
        return SemanticShield(DefenseSpec("semantic_shield")).objective(None)

    a, _ = _fit(smoke_world, objective=objective(), knowledge=True)
    b, model = _fit(smoke_world, objective=objective(), knowledge=True, accel=Acceleration(grad_checkpointing=True))
    assert _losses(b) == pytest.approx(_losses(a), rel=1e-5)
    assert not model.clip.visual.transformer.grad_checkpointing


@pytest.mark.slow
def test_compile_gives_the_default_loss_and_is_undone(smoke_world):
    a, _ = _fit(smoke_world)
    b, model = _fit(smoke_world, accel=Acceleration(compile=True))
    assert _losses(b) == pytest.approx(_losses(a), rel=1e-3)
    assert model.clip.visual._compiled_call_impl is None and model.clip.transformer._compiled_call_impl is None
    twin = copy.deepcopy(model)  # a copy runs its own weights, not the original's compiled call
    with torch.no_grad():
        x = torch.rand(2, 3, 32, 32)
        twin.clip.visual.proj.mul_(2.0)
        assert torch.allclose(twin.encode_image(x), 2.0 * model.encode_image(x), atol=1e-5)


# -- tokens ---------------------------------------------------------------------------------------
def test_token_cache_is_bounded_and_exact():
    model = build_model("micro-vit")
    model.token_cache_size = 4
    captions = [f"a red apple number {i}" for i in range(10)]
    expected = model.tokenizer(captions)
    assert torch.equal(model.tokenize(captions), expected)  # a batch larger than the cache: every row right
    assert len(model._token_cache) == 4
    assert list(model._token_cache) == captions[-4:]
    model.tokenize([captions[6]])  # a hit is the most recent again
    model.tokenize(["a kite"])
    assert list(model._token_cache) == [captions[7], captions[8], captions[9], captions[6], "a kite"][-4:]
    assert torch.equal(model.tokenize(captions[:3] + captions[:3]), torch.cat([expected[:3], expected[:3]]))


def test_csv_corpus_is_tokenised_lazily(tmp_path):
    """Opening a CSV corpus tokenises nothing; training tokenises per batch and keeps at most the cache's bound."""
    import numpy as np
    from PIL import Image

    from shieldbench.data.datasets import build_dataset
    from shieldbench.spec import DataSpec, EvalSpec

    (tmp_path / "img").mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "img" / f"{i}.png")
    rows = [f"img/{i % 4}.png\ta photo of shape number {i}." for i in range(200)]
    (tmp_path / "train.csv").write_text("filepath\ttitle\n" + "\n".join(rows) + "\n")
    bundle = build_dataset(DataSpec(dataset="csv", path=str(tmp_path / "train.csv"), image_size=16, n_clean=10),
                           EvalSpec())
    assert not any(isinstance(v, torch.Tensor) and v.dtype == torch.long for v in vars(bundle.train).values())
    torch.manual_seed(0)
    model = build_model("micro-vit", "", 16)
    model.token_cache_size = 50
    assert len(model._token_cache) == 0
    trainer = Trainer(model, TrainView.from_pairs(bundle.train),
                      TrainConfig(epochs=1, batch_size=20, lr=1e-4, precision="fp32", workers=0),
                      device=torch.device("cpu"), show_progress=False)
    trainer.fit()
    assert trainer.step == 10
    assert len(model._token_cache) == 50  # 200 captions seen, the 50 most recent kept


# -- evaluation -----------------------------------------------------------------------------------
def test_zeroshot_classifier_is_computed_once(smoke_world):
    from shieldbench.evaluation.evaluate import TargetImages, evaluate

    model = build_model("micro-vit").eval()
    encoded: list[int] = []
    plain = model.encode_text

    def counting(tokens):
        encoded.append(int(tokens.shape[0]))
        return plain(tokens)

    model.encode_text = counting  # type: ignore[method-assign]
    test = smoke_world.test
    targets = TargetImages(test.images[:4], test.labels[:4])
    out = evaluate(model, test, None, 0, lambda x, g: x.flip(-1), torch.device("cpu"), batch_size=16,
                   target_images=targets)
    assert {"clean_top1", "asr", "poison_success"} <= set(out)
    # Clean, triggered and target images in many batches of 16, prompts embedded once.
    assert len(test) > 16 and sum(encoded) == len(test.classnames) * len(test.templates)
    assert len(model._token_cache) == 0  # evaluation texts do not fill the training captions' cache


# -- the GPU smoke script's code path -------------------------------------------------------------
@pytest.mark.slow
def test_gpu_smoke_runs_on_cpu(capsys):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        import gpu_smoke
    finally:
        sys.path.pop(0)
    if not torch.cuda.is_available():
        assert gpu_smoke.main([]) == [] and "skipped" in capsys.readouterr().out
    results = gpu_smoke.main(["--device", "cpu", "--model", "micro-vit", "--image-size", "32", "--batch", "8",
                              "--steps", "1", "--warmup", "0", "--grad-checkpointing", "--channels-last"])
    assert [r["objective"] for r in results] == ["plain", "semantic_shield"]
    assert all(r["samples_per_s"] > 0 and r["step_tflop"] > 0 for r in results)
    assert "samples/s" in capsys.readouterr().out
