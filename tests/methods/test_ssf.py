"""SSF: count, official init statistics, forward+grads vs a ViT forward written out here with every
scale-shift site explicit (standard, fc_norm and patch-embed-norm models), gradient isolation,
the single `ssf_ada` entry point, merge edge cases, official state dict."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import fastpeft
from fastpeft import SSF
from fastpeft.methods import ssf as ssf_mod

from .conftest import (assert_grads_reach_only_trainable, assert_out_and_grads_match, images, make_vit,
                       method_params, randomize_, vitb_meta)

D = 192


# ---------------------------------------------------------------------------------------------- counts & init

def test_param_count_vitb():
    m = fastpeft.inject(vitb_meta(), SSF())
    mp = method_params(m)
    assert sum(p.numel() for p in mp.values()) == 205_824
    assert all("ssf_scale" in n or "ssf_shift" in n for n in mp)
    shapes = {n: tuple(p.shape) for n, p in mp.items()}
    assert shapes["patch_embed.ssf_scale_1"] == (768,) and "patch_embed.ssf_scale_2" not in shapes
    assert shapes["ssf_shift_1"] == (768,)
    assert shapes["blocks.3.ssf_scale_1"] == shapes["blocks.3.ssf_shift_2"] == (768,)
    assert shapes["blocks.3.attn.ssf_scale_1"] == (2304,) and shapes["blocks.3.attn.ssf_shift_2"] == (768,)
    assert shapes["blocks.3.mlp.ssf_shift_1"] == (3072,) and shapes["blocks.3.mlp.ssf_scale_2"] == (768,)
    for n, p in m.named_parameters():
        assert p.requires_grad == (n in mp or n.startswith("head.")), n


def test_init_statistics():
    m = fastpeft.inject(make_vit(depth=4), SSF())
    mp = method_params(m)
    scales = torch.cat([p.flatten() for n, p in mp.items() if "scale" in n])
    shifts = torch.cat([p.flatten() for n, p in mp.items() if "shift" in n])
    assert abs(scales.mean().item() - 1) < 2e-3 and 0.019 < scales.std().item() < 0.021
    assert abs(shifts.mean().item()) < 2e-3 and 0.019 < shifts.std().item() < 0.021


# ---------------------------------------------------------------------------------------------- reference forward

def ln(t, mod):
    return F.layer_norm(t, mod.normalized_shape, mod.weight, mod.bias, mod.eps)


def reference_forward(m, x):
    """The timm ViT forward written out, with SSF's official placements spelled out (scale * t + shift)."""
    def ss(owner, k, t):
        return t * getattr(owner, f"ssf_scale_{k}") + getattr(owner, f"ssf_shift_{k}")

    pe = m.patch_embed
    t = F.conv2d(x, pe.proj.weight, pe.proj.bias, stride=pe.proj.stride).flatten(2).transpose(1, 2)
    t = ss(pe, 1, t)  # after conv + flatten, before the patch-embed norm / pos-embed
    if not isinstance(pe.norm, torch.nn.Identity):
        t = ss(pe, 2, ln(t, pe.norm))
    t = torch.cat([m.cls_token.expand(t.shape[0], -1, -1), t], 1) + m.pos_embed
    for blk in m.blocks:
        a = blk.attn
        h = ss(blk, 1, ln(t, blk.norm1))
        qkv = ss(a, 1, F.linear(h, a.qkv.weight, a.qkv.bias))
        B, N, _ = qkv.shape
        q, k, v = qkv.reshape(B, N, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
        o = ((q @ k.transpose(-1, -2)) * a.head_dim ** -0.5).softmax(-1) @ v
        o = ss(a, 2, F.linear(o.transpose(1, 2).reshape(B, N, -1), a.proj.weight, a.proj.bias))
        t = t + o
        h2 = ss(blk, 2, ln(t, blk.norm2))
        f = F.gelu(ss(blk.mlp, 1, F.linear(h2, blk.mlp.fc1.weight, blk.mlp.fc1.bias)))  # before GELU
        t = t + ss(blk.mlp, 2, F.linear(f, blk.mlp.fc2.weight, blk.mlp.fc2.bias))
    if m.global_pool == "avg":
        z = ss(m, 1, ln(t[:, m.num_prefix_tokens:].mean(1), m.fc_norm))  # fastpeft: after fc_norm
    else:
        z = ss(m, 1, ln(t, m.norm))[:, 0]
    return F.linear(z, m.head.weight, m.head.bias)


@pytest.mark.parametrize("kw", [{}, {"global_pool": "avg"}, {"embed_norm_layer": "layernorm"}])
def test_forward_and_grads_match_explicit_math(kw):
    x = images(batch=2)
    m = fastpeft.inject(make_vit(depth=2, **kw), SSF()).eval()
    mp = method_params(m)
    randomize_(list(mp.values()), std=0.1)
    if kw.get("embed_norm_layer"):
        assert "patch_embed.ssf_scale_2" in mp
    params = list(mp.values()) + [m.head.weight, m.head.bias]
    proj = torch.randn(2, 10, generator=torch.Generator().manual_seed(4))
    out = m(x)
    ref = reference_forward(m, x)
    assert_out_and_grads_match(out, ref, params, proj)


def test_gradients_reach_only_trainable_parameters():
    m = fastpeft.inject(make_vit(), SSF()).train()
    m(images()).sum().backward()
    assert_grads_reach_only_trainable(m)


def test_identity_ssf_reproduces_frozen_logits():
    x = images()
    base = make_vit().eval()
    m = fastpeft.inject(copy.deepcopy(base), SSF()).eval()
    with torch.no_grad():
        for n, p in method_params(m).items():
            p.fill_(1.0 if "scale" in n else 0.0)
    assert torch.equal(m(x), base(x))


def test_every_site_goes_through_ssf_ada(monkeypatch):
    calls = []
    orig = ssf_mod.ssf_ada

    def counting(x, scale, shift):
        calls.append(scale.shape[0])
        return orig(x, scale, shift)

    monkeypatch.setattr(ssf_mod, "ssf_ada", counting)
    m = fastpeft.inject(make_vit(depth=3), SSF()).eval()
    m(images())
    assert len(calls) == 2 + 6 * 3
    assert sorted(set(calls)) == [D, 3 * D, 4 * D]


# ---------------------------------------------------------------------------------------------- merge edge cases

def test_merge_into_conv_ln_linear_and_fc_norm():
    for kw in ({}, {"global_pool": "avg"}, {"embed_norm_layer": "layernorm"}):
        x = images()
        m = fastpeft.inject(make_vit(**kw), SSF()).eval()
        randomize_(list(method_params(m).values()), std=0.1)
        out = m(x)
        orig = {k: v.clone() for k, v in m.state_dict().items() if "ssf" not in k}
        fastpeft.merge(m)
        assert set(m.state_dict()) == set(orig)
        torch.testing.assert_close(m(x), out, atol=1e-5, rtol=1e-5)
        fastpeft.unmerge(m)
        assert all(torch.equal(m.state_dict()[k], v) for k, v in orig.items())
        assert torch.equal(m(x), out)


@pytest.mark.parametrize("kw,layer", [({"qkv_bias": False}, "blocks.0.attn.qkv"), ({"final_norm": False}, "`norm`")])
def test_unmergeable_layers_raise_naming_the_layer(kw, layer):
    x = images()
    m = fastpeft.inject(make_vit(**kw), SSF()).eval()
    out = m(x)
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match=layer):
        fastpeft.merge(m)
    assert not fastpeft.injections(m)[0].merged
    assert all(torch.equal(m.state_dict()[k], v) for k, v in sd.items())
    assert torch.equal(m(x), out)


def test_bad_and_twice():
    m = fastpeft.inject(make_vit(), SSF())
    keys = list(m.state_dict())
    with pytest.raises(ValueError, match="SSF"):
        fastpeft.inject(m, SSF())
    assert list(m.state_dict()) == keys


def test_official_state_dict_loads():
    """Names/shapes as dongzelian/SSF's timm ViT saves them (plus the head)."""
    depth = 2
    sd = {"patch_embed.ssf_scale_1": torch.randn(D), "patch_embed.ssf_shift_1": torch.randn(D),
          "ssf_scale_1": torch.randn(D), "ssf_shift_1": torch.randn(D),
          "head.weight": torch.randn(10, D), "head.bias": torch.randn(10)}
    for i in range(depth):
        for k in (1, 2):
            sd[f"blocks.{i}.ssf_scale_{k}"] = torch.randn(D)
            sd[f"blocks.{i}.ssf_shift_{k}"] = torch.randn(D)
        for n, size in (("attn.ssf_{}_1", 3 * D), ("attn.ssf_{}_2", D), ("mlp.ssf_{}_1", 4 * D), ("mlp.ssf_{}_2", D)):
            for w in ("scale", "shift"):
                sd[f"blocks.{i}." + n.format(w)] = torch.randn(size)
    m = fastpeft.inject(make_vit(depth=depth), SSF())
    res = m.load_state_dict(sd, strict=False)
    assert res.unexpected_keys == []
    assert not any("ssf" in k or k.startswith("head") for k in res.missing_keys)
    assert torch.equal(m.blocks[1].mlp.ssf_scale_1, sd["blocks.1.mlp.ssf_scale_1"])
