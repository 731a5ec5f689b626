"""Write shieldbench/builtin_params.json: the options' schema of every built-in attack and defense.

    python scripts/write_builtin_params.py

Run it after changing a built-in's ``Params``; tests/test_cli_light.py fails
until the file matches the classes. The CLI validates option values against
this file before it imports a plugin (and with it torch).
"""

from __future__ import annotations

import json
from pathlib import Path

from shieldbench.builtins import BUILTIN_ATTACKS, BUILTIN_DEFENSES
from shieldbench.registry import ATTACKS, DEFENSES
from shieldbench.spec import params_schema


def current() -> dict[str, dict[str, list[dict]]]:
    return {reg.kind: {name: params_schema(reg.get(name).Params) for name in sorted(names)}
            for reg, names in ((ATTACKS, BUILTIN_ATTACKS), (DEFENSES, BUILTIN_DEFENSES))}


if __name__ == "__main__":
    path = Path(__file__).resolve().parents[1] / "shieldbench" / "builtin_params.json"
    path.write_text(json.dumps(current(), indent=1, sort_keys=True) + "\n")
    print(f"wrote {path}")
