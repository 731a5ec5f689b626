"""Model wrapper: pixel-space input, patch tokens, attention on request, weight loading."""

from __future__ import annotations

import pytest
import torch

from shieldbench.errors import UserError
from shieldbench.models import build_model


def test_vit_outputs_and_attention_only_on_request():
    torch.manual_seed(0)
    m = build_model("micro-vit").eval()
    x = torch.rand(3, 3, 32, 32)
    plain = m.image_outputs(x)
    assert plain.patches is None and plain.attention is None
    full = m.image_outputs(x, patches=True, attention=True)
    assert full.patches.shape == (3, 16, 64)  # (32/8)^2 patches, projected to embed_dim
    assert full.attention.shape == (3, 2, 16)  # heads x patches, CLS row without CLS itself
    assert torch.allclose(full.embedding, plain.embedding, atol=1e-5)
    assert (full.attention.sum(-1) <= 1 + 1e-5).all() and (full.attention >= 0).all()
    # Hooks are removed after the call: the plain path keeps fused attention.
    attn = m.clip.visual.transformer.resblocks[-1].attn
    assert not attn._forward_hooks and not attn._forward_pre_hooks


def test_patch_tokens_are_projected_with_the_towers_proj():
    torch.manual_seed(0)
    m = build_model("micro-vit").eval()
    x = torch.rand(2, 3, 32, 32)
    out = m.image_outputs(x, patches=True)
    m.clip.visual.output_tokens = True
    _, tokens = m.clip.visual(m.normalize(x))
    m.clip.visual.output_tokens = False
    assert torch.allclose(out.patches, tokens @ m.clip.visual.proj, atol=1e-5)


def test_gradients_flow_through_attention():
    m = build_model("micro-vit")
    out = m.image_outputs(torch.rand(2, 3, 32, 32), attention=True)
    out.attention.sum().backward()
    assert m.clip.visual.transformer.resblocks[-1].attn.in_proj_weight.grad.abs().sum() > 0


def test_normalisation_lives_in_the_model():
    m = build_model("micro-vit").eval()
    x = torch.rand(2, 3, 32, 32)
    direct = m.clip.encode_image((x - 0.5) / 0.25)
    assert torch.allclose(m.encode_image(x), direct, atol=1e-5)


def test_resnet_attention_pool_outputs():
    torch.manual_seed(0)
    m = build_model("tiny-rn", image_size=64).eval()
    x = torch.rand(2, 3, 64, 64)
    out = m.image_outputs(x, patches=True, attention=True)
    assert torch.allclose(out.embedding, m.encode_image(x), atol=1e-4)
    assert out.patches.shape == (2, 4, 128) and out.attention.shape[-1] == 4


def test_tokenizer_cache_and_context():
    m = build_model("micro-vit")
    t = m.tokenize(["a red apple", "a red apple", "a kite"])
    assert t.shape == (3, 24) and torch.equal(t[0], t[1])


def test_weights_file_roundtrip_and_errors(tmp_path):
    torch.manual_seed(0)
    a = build_model("micro-vit")
    path = tmp_path / "w.pt"
    torch.save(a.clip.state_dict(), path)
    b = build_model("micro-vit", pretrained=str(path))
    for k, v in a.clip.state_dict().items():
        assert torch.equal(v, b.clip.state_dict()[k])
    from safetensors.torch import save_file

    st = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in a.clip.state_dict().items()}, str(st))
    build_model("micro-vit", pretrained=str(st))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match=str(bad)):
        build_model("micro-vit", pretrained=str(bad))
    with pytest.raises(UserError, match="weights file not found"):
        build_model("micro-vit", pretrained=str(tmp_path / "missing.pt"))
    with pytest.raises(UserError, match="does not match"):
        build_model("tiny-vit", pretrained=str(path))


def test_open_clip_architecture_by_name_and_offline_tag(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    m = build_model("RN50", image_size=64)
    assert m.encode_image(torch.rand(1, 3, 64, 64)).shape == (1, 1024)
    with pytest.raises(UserError, match="cannot load pretrained weights 'openai'"):
        build_model("ViT-B-32", pretrained="openai", image_size=224)
    with pytest.raises(UserError, match="unknown model 'nosuch'"):
        build_model("nosuch")
