"""Train every built-in defense's objective for a few steps; run alone or under ``torchrun``.

Used by tests/test_distributed.py: one process with a global batch of 16 and
two gloo processes with 8 rows each must give the same per-step losses and
the same final weights. Writes ``<out>/<defense>.pt`` (rank 0 only).
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from shieldbench.data.datasets import build_dataset  # noqa: E402
from shieldbench.data.views import TrainView  # noqa: E402
from shieldbench.defenses.base import DefenseContext  # noqa: E402
from shieldbench.knowledge import knowledge_source_for  # noqa: E402
from shieldbench.models import build_model  # noqa: E402
from shieldbench.registry import DEFENSES  # noqa: E402
from shieldbench.spec import DefenseSpec, TrainSpec, build_spec  # noqa: E402
from shieldbench.training import distributed as D  # noqa: E402
from shieldbench.training.contracts import Callback  # noqa: E402
from shieldbench.training.trainer import TrainConfig, Trainer  # noqa: E402

CASES = {
    "none": ("none", {}),
    "semantic_shield": ("semantic_shield", {}),
    "semantic_shield_memory": ("semantic_shield", {"weight_score": "own", "weight_memory": "first",
                                                   "weight_form": "softmax"}),
    "roclip": ("roclip", {"pool_size": 24, "match_every": 2}),
    "roclip_text_grad": ("roclip", {"pool_size": 24, "match_every": 2, "text_grad_on_match": True}),
    "cleanclip": ("cleanclip", {}),
    # `none`, killed after step 7 and resumed from the mid-epoch checkpoint of step 6.
    "none_resumed": ("none", {}),
}


class Crash(Callback):
    def on_step_end(self, trainer, batch, out) -> None:
        if trainer.step == 7:
            raise KeyboardInterrupt  # every rank stops at the same step, as under a kill of the job


class StepLosses(Callback):
    """The global batch's loss at every step (the mean over ranks of their local losses)."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_step_end(self, trainer, batch, out) -> None:
        self.losses.append(D.all_reduce_mean({"loss": out.logs["loss"]})["loss"])


def main(out_dir: str, names: list[str]) -> None:
    torch.set_num_threads(1)
    D.init_from_env()
    import shieldbench.builtins  # noqa: F401  (registers the built-in plugins)

    spec = build_spec("smoke")
    world = build_dataset(spec.data)
    view = TrainView.from_pairs(world.train.subset(range(64)))
    for case in names:
        name, options = CASES[case]
        torch.manual_seed(0)
        model = build_model("micro-vit")
        defense = DEFENSES.get(name)(DefenseSpec(name, options))
        ctx = DefenseContext(seed=0, train=TrainSpec(), device=torch.device("cpu"), knowledge_k=spec.data.knowledge_k,
                             knowledge_source=knowledge_source_for(spec.data))
        if name == "cleanclip":  # a repair: its objective, trained directly
            data, objective, callbacks = view, defense.make_objective(ctx), []
        else:
            data, objective, callbacks = defense.prepare_data(view, ctx), defense.objective(ctx), defense.callbacks(ctx)
        record = StepLosses()
        config = TrainConfig(epochs=2, batch_size=16, lr=2e-3, warmup_steps=2, checkpoint_every=3)
        ckpt = os.path.join(out_dir, f"{case}.ckpt") if case == "none_resumed" else None
        if ckpt:
            try:
                Trainer(model, data, config, objective=objective, callbacks=[*callbacks, Crash()], checkpoint_path=ckpt,
                        device=torch.device("cpu"), show_progress=False).fit()
            except KeyboardInterrupt:
                pass
            torch.manual_seed(123)  # the resumed run must not depend on the fresh model's init
            model = build_model("micro-vit")
        result = Trainer(model, data, config, objective=objective, callbacks=[*callbacks, record], checkpoint_path=ckpt,
                         device=torch.device("cpu"), show_progress=False).fit()
        if D.is_main():
            torch.save({"losses": record.losses, "history": result.history, "world_size": result.world_size,
                        "resumed_from_epoch": result.resumed_from_epoch, "steps": result.steps,
                        "params": {k: v.detach().clone() for k, v in model.clip.state_dict().items()}},
                       os.path.join(out_dir, f"{case}.pt"))
    D.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2].split(",") if len(sys.argv) > 2 else list(CASES))
