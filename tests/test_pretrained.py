"""Pretrained weights through open_clip's own API: files, tags, image size, errors.

Two tiny open_clip architectures are registered from JSON configs written to
a temporary folder (open_clip.add_model_config), so every load goes through
``open_clip.create_model`` offline and in well under a second. Registering
extra names leaves open_clip's own configs untouched.
"""

from __future__ import annotations

import json
import logging

import open_clip
import pytest
import torch

from shieldbench.errors import UserError
from shieldbench.models import build_model
from shieldbench.models.factory import native_image_size

VIT = "sbtest-vit-p16"
RN = "sbtest-rn"
TEXT = {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
CONFIGS = {
    VIT: {"embed_dim": 32, "vision_cfg": {"image_size": 64, "layers": 1, "width": 32, "patch_size": 16,
                                          "head_width": 16}, "text_cfg": TEXT},
    RN: {"embed_dim": 32, "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8}, "text_cfg": TEXT},
}


@pytest.fixture(scope="module", autouse=True)
def tiny_open_clip_configs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("open_clip_configs")
    for name, cfg in CONFIGS.items():
        (folder / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(folder)
    assert VIT in open_clip.list_models() and RN in open_clip.list_models()


def _random(name: str, image_size: int = 0):
    torch.manual_seed(0)
    return build_model(name, "", image_size)


def _same_weights(a, b) -> None:
    sa, sb = a.clip.state_dict(), b.clip.state_dict()
    assert sa.keys() == sb.keys()
    for k, v in sa.items():
        assert torch.equal(v, sb[k]), k


def test_weights_file_loads_through_open_clip(tmp_path):
    src = _random(VIT)
    assert src.image_size == 64  # random init at 0: the config's size
    plain = tmp_path / "plain.pt"
    torch.save(src.clip.state_dict(), plain)
    wrapped = tmp_path / "wrapped.pt"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in src.clip.state_dict().items()}}, wrapped)
    from safetensors.torch import save_file

    st = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in src.clip.state_dict().items()}, str(st))
    for path, size in ((plain, 64), (wrapped, 0), (st, 64)):
        m = build_model(VIT, str(path), size)
        _same_weights(src, m)
        assert m.image_size == 64 and m.clip.visual.preprocess_cfg["size"] == (64, 64)
        # A weights file carries no preprocessing: open_clip's defaults, read from the created model.
        assert m.pixel_mean.flatten().tolist() == pytest.approx(open_clip.OPENAI_DATASET_MEAN)
        assert m.pixel_std.flatten().tolist() == pytest.approx(open_clip.OPENAI_DATASET_STD)
        assert m.encode_image(torch.rand(1, 3, 64, 64)).shape == (1, 32)
    assert native_image_size(VIT, str(plain)) == 64


def test_pretrained_image_size_is_the_weights_own(tmp_path):
    small = _random(VIT, 32)  # random init takes any size: a 2x2 grid
    path = tmp_path / "at32.pt"
    torch.save(small.clip.state_dict(), path)
    assert native_image_size(VIT, str(path)) == 32 and native_image_size(VIT, "") == 64
    _same_weights(small, build_model(VIT, str(path), 32))
    assert build_model(VIT, str(path), 0).image_size == 32
    assert build_model(VIT, str(path), 40).image_size == 40  # same 2x2 grid: loads unchanged
    with pytest.raises(UserError, match=rf"^model {VIT} with pretrained weights expects image size 32; "
                                        r"set data.image_size=32$"):
        build_model(VIT, str(path), 64)


def test_resnet_checkpoint_size_from_the_attention_pool(tmp_path):
    src = _random(RN)
    path = tmp_path / "rn.pt"
    torch.save(src.clip.state_dict(), path)
    _same_weights(src, build_model(RN, str(path), 0))
    with pytest.raises(UserError, match="expects image size 64; set data.image_size=64"):
        build_model(RN, str(path), 96)


def test_tag_gets_its_size_and_normalisation_from_open_clip(tmp_path, monkeypatch):
    src = _random(VIT)
    path = tmp_path / "tagged.pt"
    torch.save(src.clip.state_dict(), path)
    # A pretrained tag whose weights are a local file: open_clip resolves it like any tag.
    tag = {"file": str(path), "mean": (0.1, 0.2, 0.3), "std": (0.4, 0.5, 0.6), "quick_gelu": True}
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, VIT, {"sbtag": tag})
    assert native_image_size(VIT, "sbtag") == 64
    m = build_model(VIT, "sbtag", 0)
    _same_weights(src, m)
    assert m.image_size == 64
    assert m.pixel_mean.flatten().tolist() == pytest.approx([0.1, 0.2, 0.3])
    assert m.pixel_std.flatten().tolist() == pytest.approx([0.4, 0.5, 0.6])
    # The tag was trained with QuickGELU; open_clip alone would only warn.
    assert isinstance(m.clip.visual.transformer.resblocks[0].mlp.gelu, open_clip.model.QuickGELU)
    with pytest.raises(UserError, match=rf"^model {VIT} with pretrained weights expects image size 64"):
        build_model(VIT, "sbtag", 32)
    with pytest.raises(UserError, match=rf"unknown pretrained tag 'nonsense' for {VIT}; open_clip knows: sbtag"):
        build_model(VIT, "nonsense", 0)


def test_file_errors_name_the_file(tmp_path):
    rn = tmp_path / "rn.pt"
    torch.save(_random(RN).clip.state_dict(), rn)
    with pytest.raises(UserError, match=rf"weights file {rn} does not match model {VIT}") as info:
        build_model(VIT, str(rn), 64)
    assert "\n" not in str(info.value)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(torch.randint(0, 256, (512,), dtype=torch.uint8).numpy().tobytes())
    with pytest.raises(UserError, match=rf"^cannot read weights file {bad}: "):
        build_model(VIT, str(bad), 64)
    with pytest.raises(UserError, match=rf"^cannot read weights file {bad}: "):
        native_image_size(VIT, str(bad))
    missing = tmp_path / "missing.pt"
    with pytest.raises(UserError, match=rf"^weights file not found: {missing}$"):
        build_model(VIT, str(missing), 64)
    no_state = tmp_path / "no_state.pt"
    torch.save({"model": {"epoch": 1}}, no_state)
    with pytest.raises(UserError, match=rf"weights file {no_state} holds no state dict"):
        build_model(VIT, str(no_state), 64)


def test_random_init_keeps_open_clip_quiet(caplog):
    # open_clip warns through the root logger, which reaches stderr when logging is unconfigured.
    with caplog.at_level(logging.INFO):
        _random(VIT, 32)
    assert not [r for r in caplog.records if "open_clip" in r.pathname and r.levelno >= logging.WARNING]


def test_offline_tag_is_one_line(tmp_path, monkeypatch):
    import huggingface_hub.constants as hub

    # An empty cache and no network: hermetic even where ViT-B-32 weights are cached.
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError) as info:
        build_model("ViT-B-32", "laion2b_s34b_b79k", 224)
    msg = str(info.value)
    assert msg.startswith("cannot load pretrained weights 'laion2b_s34b_b79k' for ViT-B-32: not in the local cache")
    assert "model.pretrained=PATH" in msg and "\n" not in msg


def test_unknown_tag_lists_open_clips_tags_and_size_checks_come_first():
    with pytest.raises(UserError, match="unknown pretrained tag 'nonsense' for ViT-B-32; open_clip knows: openai, ") as info:
        build_model("ViT-B-32", "nonsense", 224)
    assert "laion2b_s34b_b79k" in str(info.value)
    # No download is attempted for a size the weights were not trained at.
    with pytest.raises(UserError, match=r"^model ViT-B-32 with pretrained weights expects image size 224; "
                                        r"set data.image_size=224$"):
        build_model("ViT-B-32", "openai", 32)
    assert native_image_size("ViT-B-32", "openai") == 224
    assert native_image_size("RN50", "") == 224
    assert native_image_size("micro-vit") == 32
    with pytest.raises(UserError, match="unknown model 'nosuch'"):
        native_image_size("nosuch", "")


def test_tiny_configs_use_open_clips_loader_and_keep_their_size(tmp_path):
    torch.manual_seed(0)
    src = build_model("micro-vit", "", 32)
    path = tmp_path / "micro.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in src.clip.state_dict().items()}}, path)
    m = build_model("micro-vit", str(path), 0)
    _same_weights(src, m)
    assert m.image_size == 32 and native_image_size("micro-vit", str(path)) == 32
    with pytest.raises(UserError, match="^model micro-vit with pretrained weights expects image size 32; "
                                        "set data.image_size=32$"):
        build_model("micro-vit", str(path), 64)
    with pytest.raises(UserError, match=rf"weights file {path} does not match model tiny-vit"):
        build_model("tiny-vit", str(path), 32)
