"""Semantic Shield's clean-accuracy cost: the diagnosis runs and the choice of a fix, by rules fixed beforehand.

    VAL=results/validation python scripts/semantic_shield_cost.py diagnose
    VAL=results/validation python scripts/semantic_shield_cost.py select CANDIDATE
    VAL=results/validation python scripts/semantic_shield_cost.py screen CANDIDATE [CANDIDATE ...]
    REP=results/reported  python scripts/semantic_shield_cost.py report CANDIDATE

``diagnose`` (validation world 2, BadNets, master seed 0): no defense, the
default, and the default with the KE phrases encoded by the model's text
tower without gradient (``ke_text=detached``) or by the text tower as it was
at the start (``ke_text=frozen``); round 2 (added after round 1 located the
damage in the image tower): the KE loss kept off the image tower
(``ke_image=detached``), no KE loss, no attention loss; then the
tower-mixing diagnosis (scripts/diagnose_semantic_shield_cost.py) on each.

``select CANDIDATE`` (a ``--set`` list such as ``defense.ke_text=frozen``):
validation worlds 1 and 2 (``data.seed``), master seeds 0 and 1, BadNets,
Blended and WaNet, for no defense, the default and the candidate; targeted
poisoning for the default and the candidate. The rule, fixed before any of
these runs: the candidate replaces the default if, on each world and
attack (mean over the two seeds), its ASR is at most 5% (WaNet: at most 3
points above the clean base model's ASR), its targeted success is 0 of 16
on every run, and its mean clean-accuracy cost against no defense (over
worlds, attacks, seeds) is smaller than the default's. Otherwise the
default stays and the candidate is an option.

``screen CANDIDATE [CANDIDATE ...]`` (each a comma-separated ``--set``
list; added after ``select`` rejected ``ke_image=detached``): the three
validation cells where that candidate or the default failed or cost most,
one run each: BadNets in world 2, master seed 0 (clean accuracy), WaNet in
world 1, master seed 1 (``ke_image=detached``: 19.3% against a bar of
7.7%), targeted poisoning in world 2, master seed 0 (5 of 16). Rule, fixed
before the runs: a candidate passes the screen if its WaNet ASR is at most
3 points above the clean base model's, its targeted success is at most the
default's on that run, and its BadNets clean accuracy is above the
default's; passing candidates go to ``select`` in order of that accuracy.

``report CANDIDATE``: the reported world (data seed 0), master seeds 0, 1,
2, BadNets, Blended, WaNet and targeted, once, after the choice.

Every run goes through ``shieldbench run`` into $VAL or $REP (finished cells
are reused); every line printed also goes to ``<folder>/cost.log``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from statistics import mean

ATTACKS = ("badnets", "blended", "wanet")


def log(folder: Path, line: str) -> None:
    print(line, flush=True)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "cost.log", "a") as f:
        f.write(line + "\n")


def run(folder: Path, attack: str, defense: str, world: int, seed: int, sets: list[str]) -> dict:
    cmd = ["shieldbench", "run", "-a", attack, "-d", defense, "--seed", str(seed), "-o", str(folder), "-q", "--json",
           "--set", f"data.seed={world}"]
    for s in sets:
        cmd += ["--set", s]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        log(folder, f"FAILED {' '.join(cmd)}: {proc.stderr.strip().splitlines()[-1:]}")
        raise SystemExit(1)
    r = json.loads(proc.stdout)
    m = r["metrics"]
    log(folder, json.dumps({"attack": attack, "defense": defense, "world": world, "seed": seed, "sets": sets,
                            "ca": m.get("clean_top1"), "asr": m.get("asr"), "asr_base": m.get("asr_base_model"),
                            "poison_success": m.get("poison_success"), "run_id": r["run_id"]}))
    return r


def diagnose(folder: Path) -> None:
    ids = []
    for defense, sets in (("none", []), ("semantic_shield", []), ("semantic_shield", ["defense.ke_text=detached"]),
                          ("semantic_shield", ["defense.ke_text=frozen"]),
                          # Round 2, after round 1 showed the damage in the image tower (docs/semantic_shield.md):
                          ("semantic_shield", ["defense.ke_image=detached"]),
                          ("semantic_shield", ["defense.lambda_ke=0"]),
                          ("semantic_shield", ["defense.lambda_attn=0"])):
        ids.append(run(folder, "badnets", defense, 2, 0, sets)["run_id"])
    subprocess.run([sys.executable, str(Path(__file__).with_name("diagnose_semantic_shield_cost.py")), str(folder), *ids],
                   check=True)


def select(folder: Path, candidate: list[str]) -> None:
    rows = []
    for world in (1, 2):
        for seed in (0, 1):
            for attack in ATTACKS:
                for name, defense, sets in (("none", "none", []), ("default", "semantic_shield", []),
                                            ("candidate", "semantic_shield", candidate)):
                    r = run(folder, attack, defense, world, seed, sets)
                    rows.append((name, attack, world, seed, r["metrics"]))
            for name, sets in (("default", []), ("candidate", candidate)):
                r = run(folder, "targeted", "semantic_shield", world, seed, sets)
                rows.append((name, "targeted", world, seed, r["metrics"]))

    def metric(name, attack, world, key):
        return [m[key] for n, a, w, _, m in rows if (n, a, w) == (name, attack, world)]

    ok = True
    for world in (1, 2):
        for attack in ATTACKS:
            asr = mean(metric("candidate", attack, world, "asr"))
            bar = mean(metric("candidate", attack, world, "asr_base_model")) + 0.03 if attack == "wanet" else 0.05
            log(folder, f"world {world} {attack}: candidate ASR {asr:.3f} (bar {bar:.3f})")
            ok &= asr <= bar
        ps = metric("candidate", "targeted", world, "poison_success")
        log(folder, f"world {world} targeted: candidate poison success {ps}")
        ok &= all(p == 0 for p in ps)

    def cost(name):
        return mean(n_ca - d_ca for n_ca, d_ca in zip(
            [m["clean_top1"] for n, a, w, s, m in rows if n == "none"],
            [m["clean_top1"] for n, a, w, s, m in rows if n == name and a != "targeted"]))

    c_default, c_candidate = cost("default"), cost("candidate")
    log(folder, f"mean CA cost vs none: default {c_default:.4f}, candidate {c_candidate:.4f}")
    verdict = "candidate becomes the default" if ok and c_candidate < c_default else "the default stays"
    log(folder, f"rule: {verdict} ({' '.join(candidate)})")


SCREEN_CELLS = (("badnets", 2, 0), ("wanet", 1, 1), ("targeted", 2, 0))


def screen(folder: Path, candidates: list[list[str]]) -> None:
    default = {attack: run(folder, attack, "semantic_shield", world, seed, [])["metrics"]
               for attack, world, seed in SCREEN_CELLS}
    passed = []
    for candidate in candidates:
        m = {attack: run(folder, attack, "semantic_shield", world, seed, candidate)["metrics"]
             for attack, world, seed in SCREEN_CELLS}
        wanet_ok = m["wanet"]["asr"] <= m["wanet"]["asr_base_model"] + 0.03
        targeted_ok = m["targeted"]["poison_success"] <= default["targeted"]["poison_success"]
        ca_ok = m["badnets"]["clean_top1"] > default["badnets"]["clean_top1"]
        log(folder, f"screen {' '.join(candidate)}: badnets CA {m['badnets']['clean_top1']:.3f} (default "
                    f"{default['badnets']['clean_top1']:.3f}) ASR {m['badnets']['asr']:.3f}; wanet ASR "
                    f"{m['wanet']['asr']:.3f} (bar {m['wanet']['asr_base_model'] + 0.03:.3f}); targeted "
                    f"{m['targeted']['poison_success']:.4f} (default {default['targeted']['poison_success']:.4f})"
                    f" -> {'pass' if wanet_ok and targeted_ok and ca_ok else 'fail'}")
        if wanet_ok and targeted_ok and ca_ok:
            passed.append((m["badnets"]["clean_top1"], candidate))
    for ca, candidate in sorted(passed, key=lambda t: -t[0]):
        log(folder, f"screen passed: {' '.join(candidate)} (CA {ca:.3f})")


def report(folder: Path, candidate: list[str]) -> None:
    for seed in (0, 1, 2):
        for attack in (*ATTACKS, "targeted"):
            run(folder, attack, "semantic_shield", 0, seed, candidate)


if __name__ == "__main__":
    stage = sys.argv[1]
    sets = sys.argv[2:]
    if stage == "diagnose":
        diagnose(Path(os.environ.get("VAL", "results/validation")))
    elif stage == "select":
        select(Path(os.environ.get("VAL", "results/validation")), sets)
    elif stage == "screen":
        screen(Path(os.environ.get("VAL", "results/validation")), [c.split(",") for c in sets])
    elif stage == "report":
        report(Path(os.environ.get("REP", "results/reported")), sets)
    else:
        raise SystemExit(f"unknown stage {stage!r}: diagnose, select or report")
