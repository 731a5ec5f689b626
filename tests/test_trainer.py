"""Trainer: LR schedule (warmup really runs), no-decay groups, resume, NaN guard."""

from __future__ import annotations

import math

import pytest
import torch

from shieldbench.data.views import TrainView
from shieldbench.models import build_model
from shieldbench.training.contracts import Callback, LossOutput
from shieldbench.training.schedule import exclude_from_decay, make_optimizer, warmup_cosine
from shieldbench.training.trainer import TrainConfig, Trainer, TrainingDiverged


def test_warmup_cosine_hand_values():
    # warmup 4 steps to lr 1.0, then cosine over the remaining 6 steps to 0.
    lrs = [warmup_cosine(s, 10, 1.0, 4) for s in range(10)]
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[4] == pytest.approx(1.0)
    assert lrs[7] == pytest.approx(0.5 * (1 + math.cos(math.pi * 3 / 6)))
    assert warmup_cosine(10, 10, 1.0, 4) == pytest.approx(0.0)
    assert warmup_cosine(10, 10, 1.0, 4, min_lr_ratio=0.1) == pytest.approx(0.1)


def test_no_weight_decay_on_norms_biases_logit_scale():
    model = build_model("micro-vit")
    opt = make_optimizer(model, 1e-3, 0.1)
    no_decay, decay = opt.param_groups
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.1
    names = {id(p): n for n, p in model.named_parameters()}
    nd_names = [names[id(p)] for p in no_decay["params"]]
    assert any("logit_scale" in n for n in nd_names)
    assert any("ln_" in n for n in nd_names) and any("bias" in n for n in nd_names)
    assert all(p.ndim >= 2 for p in decay["params"])
    assert exclude_from_decay("visual.proj", torch.nn.Parameter(torch.zeros(3, 3))) is False


def _view(smoke_world, n=96):
    return TrainView.from_pairs(smoke_world.pretrain.subset(range(n)))


class LRRecorder(Callback):
    def __init__(self):
        self.lrs = []

    def on_step_end(self, trainer, batch, out):
        self.lrs.append(trainer.optimizer.param_groups[0]["lr"])


def test_warmup_runs_in_training(smoke_world):
    torch.manual_seed(0)
    rec = LRRecorder()
    cfg = TrainConfig(epochs=2, batch_size=32, lr=1e-3, warmup_steps=3)
    Trainer(build_model("micro-vit"), _view(smoke_world), cfg, callbacks=[rec], show_progress=False).fit()
    assert rec.lrs[:3] == pytest.approx([1e-3 / 3, 2e-3 / 3, 1e-3])
    assert len(rec.lrs) == 6 and rec.lrs[-1] < 1e-3


def test_training_lowers_the_loss(smoke_world):
    torch.manual_seed(0)
    cfg = TrainConfig(epochs=6, batch_size=32, lr=2e-3, warmup_steps=2)
    res = Trainer(build_model("micro-vit"), _view(smoke_world), cfg, show_progress=False).fit()
    assert res.history[-1]["clip"] < res.history[0]["clip"] - 0.2


def test_logit_scale_clamped_at_100(smoke_world):
    model = build_model("micro-vit")
    with torch.no_grad():
        model.clip.logit_scale.fill_(math.log(500.0))
    cfg = TrainConfig(epochs=1, batch_size=32, lr=1e-4)
    Trainer(model, _view(smoke_world, 32), cfg, show_progress=False).fit()
    assert model.logit_scale.exp().item() == pytest.approx(100.0, rel=1e-5)


def test_resume_gives_the_same_weights(smoke_world, tmp_path):
    view = _view(smoke_world)
    cfg = TrainConfig(epochs=3, batch_size=32, lr=1e-3, warmup_steps=2, seed=5)

    torch.manual_seed(0)
    full = build_model("micro-vit")
    Trainer(full, view, cfg, show_progress=False).fit()

    class Crash(Callback):
        def on_epoch_end(self, trainer, epoch):
            if epoch == 1:
                raise KeyboardInterrupt

    torch.manual_seed(0)
    ckpt = tmp_path / "ckpt.pt"
    part = build_model("micro-vit")
    # Crash after epoch 1 finished, *before* its checkpoint is written; epoch 0's is on disk.
    with pytest.raises(KeyboardInterrupt):
        Trainer(part, view, cfg, callbacks=[Crash()], checkpoint_path=ckpt, show_progress=False).fit()
    assert ckpt.is_file()
    torch.manual_seed(0)
    resumed = build_model("micro-vit")
    res = Trainer(resumed, view, cfg, checkpoint_path=ckpt, show_progress=False).fit()
    assert res.resumed_from_epoch == 1 and res.epochs_run == 2
    for (n, a), b in zip(full.clip.state_dict().items(), resumed.clip.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), n


def test_callback_state_is_checkpointed_and_restored_after_train_start(smoke_world, tmp_path):
    view = _view(smoke_world)
    cfg = TrainConfig(epochs=3, batch_size=32, lr=1e-3, seed=5)

    class Counter(Callback):
        def __init__(self, crash_at=None):
            self.seen, self.crash_at = [], crash_at

        def on_train_start(self, trainer):
            self.seen = []  # would wipe restored state if it ran after load_state_dict

        def on_step_end(self, trainer, batch, out):
            self.seen.extend(batch.index.tolist())

        def on_epoch_end(self, trainer, epoch):
            if epoch == self.crash_at:
                raise KeyboardInterrupt

        def state_dict(self):
            return {"seen": torch.tensor(self.seen)}

        def load_state_dict(self, state):
            self.seen = state["seen"].tolist()

    full = Counter()
    Trainer(build_model("micro-vit"), view, cfg, callbacks=[full], show_progress=False).fit()
    ckpt = tmp_path / "ckpt.pt"
    with pytest.raises(KeyboardInterrupt):
        Trainer(build_model("micro-vit"), view, cfg, callbacks=[Counter(crash_at=1)], checkpoint_path=ckpt,
                show_progress=False).fit()
    resumed = Counter()
    Trainer(build_model("micro-vit"), view, cfg, callbacks=[resumed], checkpoint_path=ckpt, show_progress=False).fit()
    assert resumed.seen == full.seen  # epoch 0 restored from the checkpoint, epochs 1-2 re-run


def test_nan_guard_stops_with_clear_status(smoke_world):
    class NaNObjective:
        def __call__(self, model, batch):
            return LossOutput(model.encode_image(batch.images).sum() * float("nan"))

    cfg = TrainConfig(epochs=1, batch_size=32, lr=1e-3)
    with pytest.raises(TrainingDiverged, match="nan"):
        Trainer(build_model("micro-vit"), _view(smoke_world, 32), cfg, objective=NaNObjective(), show_progress=False).fit()
