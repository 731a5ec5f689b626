"""Spec: presets, TOML, overrides, validation messages, stable hash."""

from __future__ import annotations

import pytest

from shieldbench.errors import UserError
from shieldbench.spec import build_spec, parse_overrides, spec_from_dict


def test_default_preset_is_small():
    s = build_spec()
    assert s.preset == "small"
    assert s.model.name == "tiny-vit"


def test_overrides_and_plugin_options():
    s = build_spec("smoke", overrides=parse_overrides(["attack.poison_rate=0.1", "attack.size=6", "seed=3"]))
    assert s.attack.poison_rate == 0.1
    assert s.attack.options == {"size": 6}
    assert s.seed == 3


@pytest.mark.parametrize(
    "item, needle",
    [
        ("attack.poison_rate=1.5", "attack.poison_rate=1.5 is out of range; allowed [0, 1]"),
        ("train.epochs=-1", "train.epochs=-1 is out of range"),
        ("train.lr=0", "allowed (0, 1]"),
        ("train.precision=fp8", "choose one of: auto, fp32, bf16, fp16"),
        ("data.nosuch=1", "unknown setting data.nosuch"),
        ("train.epochs=abc", "not a valid int"),
    ],
)
def test_bad_values_name_field_and_range(item, needle):
    with pytest.raises(UserError) as exc:
        build_spec(overrides=parse_overrides([item]))
    assert needle in str(exc.value)


def test_toml_file_then_overrides(tmp_path):
    cfg = tmp_path / "exp.toml"
    cfg.write_text('preset = "smoke"\nseed = 4\n[train]\nepochs = 2\n[attack]\nname = "badnets"\nsize = 5\n')
    s = build_spec(config=cfg, overrides=parse_overrides(["train.epochs=3"]))
    assert s.preset == "smoke" and s.seed == 4 and s.train.epochs == 3 and s.attack.options == {"size": 5}


def test_missing_and_corrupt_toml(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        build_spec(config=tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nepochs=")
    with pytest.raises(UserError, match=str(bad)):
        build_spec(config=bad)


def test_hash_is_stable_and_sensitive():
    a = build_spec("smoke")
    b = build_spec("smoke")
    assert a.hash() == b.hash()
    assert a.hash() != build_spec("smoke", overrides={"seed": 1}).hash()
    assert spec_from_dict(a.to_dict()) == a
    assert spec_from_dict(a.to_dict()).hash() == a.hash()


def test_preset_plugin_defaults_resolve_and_yield_to_the_user():
    from shieldbench import api

    small = api.make_spec(attack="wanet", defense="roclip")
    assert small.attack.options["s"] == 12.0 and small.attack.poison_rate == 0.1
    assert small.defense.options["crop_min_scale"] == 1.0
    smoke = api.make_spec(attack="wanet", defense="roclip", preset="smoke")
    assert smoke.attack.options["s"] == 0.5 and smoke.defense.options["crop_min_scale"] == 0.08
    mine = api.make_spec(attack="wanet", defense="roclip", overrides=["defense.crop_min_scale=0.3", "attack.s=2"])
    assert mine.defense.options["crop_min_scale"] == 0.3 and mine.attack.options["s"] == 2.0
    assert small.hash() != mine.hash()


# -- precedence: preset < config file < --set < explicit flags; an unset flag changes nothing ------------
def _config(tmp_path, text: str):
    path = tmp_path / "exp.toml"
    path.write_text(text)
    return path


def test_config_file_beats_preset(tmp_path):
    from shieldbench import api

    cfg = _config(tmp_path, '[model]\nname = "tiny-vit"\n[train]\nepochs = 2\n')
    spec = api.make_spec(preset="smoke", config=cfg)
    assert spec.model.name == "tiny-vit" and spec.train.epochs == 2  # the smoke preset says micro-vit, 1 epoch
    assert spec.data.n_train == 384  # what the file leaves alone stays the preset's


def test_set_beats_config_file(tmp_path):
    from shieldbench import api

    cfg = _config(tmp_path, '[attack]\nname = "blended"\n[train]\nepochs = 2\n')
    spec = api.make_spec(preset="smoke", config=cfg, overrides=["attack.name=wanet", "train.epochs=4"])
    assert spec.attack.name == "wanet" and spec.train.epochs == 4


def test_explicit_flags_beat_set(tmp_path):
    from shieldbench import api

    cfg = _config(tmp_path, '[attack]\nname = "blended"\n')
    spec = api.make_spec(attack="badnets", defense="roclip", seed=5, preset="smoke", config=cfg,
                         overrides=["attack.name=wanet", "defense.name=cleanclip", "seed=2"])
    assert (spec.attack.name, spec.defense.name, spec.seed) == ("badnets", "roclip", 5)


def test_unset_flags_change_nothing(tmp_path):
    from shieldbench import api

    cfg = _config(tmp_path, 'seed = 3\n[attack]\nname = "blended"\n[defense]\nname = "semantic_shield"\n')
    spec = api.make_spec(attack=None, defense=None, model=None, dataset=None, seed=None, preset="smoke", config=cfg)
    assert (spec.attack.name, spec.defense.name, spec.seed) == ("blended", "semantic_shield", 3)
