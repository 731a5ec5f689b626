"""The small preset's WaNet and targeted defaults, chosen on validation worlds by rules fixed beforehand.

    VAL=results/validation python scripts/choose_small_defaults.py wanet|targeted

WaNet: candidates in order of departure from the paper (s first, then the
poison rate), no noise mode: (4, 5%) (4, 10%) (6, 5%) (6, 10%) (8, 5%) (8, 10%)
(12, 5%) (12, 10%); the first whose no-defense ASR is >= 80% on both
validation worlds (data.seed 1 and 2) is chosen. Targeted: the fewest of 5,
10, 25, 50, 100 captions per target image with >= 15 of 16 targets poisoned
on both worlds. A candidate that fails on world 1 is not run on world 2 (it
cannot be chosen). Master seed 0. Every line goes to ``$VAL/choices.log``.
See docs/attacks.md ("Small-preset departures") for the runs and their history.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

OUT = Path(os.environ.get("VAL", "results/validation"))
WANET = [(4, 0.05), (4, 0.10), (6, 0.05), (6, 0.10), (8, 0.05), (8, 0.10), (12, 0.05), (12, 0.10)]
CAPTIONS = [5, 10, 25, 50, 100]


def find(attack: str, world: int, **opts: float) -> dict | None:
    """The no-defense, master-seed-0 record of this attack setting on this world, if run."""
    for path in OUT.glob("runs/*/record.json"):
        r = json.loads(path.read_text())
        spec = r["spec"]
        if r["attack"] != attack or r["defense"] != "none" or spec["data"]["seed"] != world or spec["seed"] != 0:
            continue
        values = {**spec["attack"], **spec["attack"].get("options", {})}
        if all(abs(float(values.get(k, -1)) - float(v)) < 1e-9 for k, v in opts.items()):
            return r
    return None


def metrics(attack: str, world: int, sets: list[str], **opts: float) -> dict:
    """Run the setting unless its record exists; its metrics."""
    if find(attack, world, **opts) is None:
        args = ["shieldbench", "run", "-q", "-o", str(OUT), "-a", attack, "-d", "none", "--set", f"data.seed={world}"]
        for s in sets:
            args += ["--set", s]
        subprocess.run(args, check=True, stdout=subprocess.DEVNULL)
    return find(attack, world, **opts)["metrics"]


def say(line: str) -> None:
    print(line, flush=True)
    with open(OUT / "choices.log", "a") as f:
        f.write(line + "\n")


def choose_wanet() -> None:
    for s, rate in WANET:
        for world in (1, 2):
            m = metrics("wanet", world, [f"attack.s={s}", "attack.cross_ratio=0", f"attack.poison_rate={rate}"],
                        s=s, poison_rate=rate, cross_ratio=0)
            say(f"wanet s={s} rate={rate} world={world}: CA {100 * m['clean_top1']:.1f} "
                f"ASR {100 * m['asr']:.1f} floor {100 * m['asr_base_model']:.1f}")
            if m["asr"] < 0.80:
                break
        else:
            say(f"CHOSEN wanet s={s} rate={rate}")
            return
    say("no WaNet candidate meets the rule")


def choose_targeted() -> None:
    for n in CAPTIONS:
        for world in (1, 2):
            m = metrics("targeted", world, [f"attack.num_captions={n}"], num_captions=n)
            say(f"targeted n={n} world={world}: CA {100 * m['clean_top1']:.1f} "
                f"success {round(16 * m['poison_success'])}/16")
            if m["poison_success"] < 15 / 16 - 1e-9:
                break
        else:
            say(f"CHOSEN targeted num_captions={n}")
            return
    say("no caption count meets the rule")


if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    {"wanet": choose_wanet, "targeted": choose_targeted}[sys.argv[1]]()
