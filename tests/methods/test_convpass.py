"""Convpass (fastpeft.Convpass), spec §6.

The reference recomputes every block with plain tensor ops; the bypass's 3x3 conv is written as a
sum of nine shifted matrix products over the zero-padded patch grid, and every prefix token (CLS,
registers) goes through an explicit per-token loop using only the centre tap and the bias.
"""
from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F

import fastpeft
from fastpeft import Convpass, VPT
from fastpeft.methods.base import PetlBlock

from .conftest import (assert_matches_formulation, assert_merge_refused, images, load_official_state_dict,
                       make_vit, randomize_)
from .test_adapter import _attn, _head, _ln, _mlp, _qgelu, _snapshot


def _conv3x3(u, weight, bias):
    """u [B, d, H, W] -> [B, d, H, W]: sum over the 9 taps of W[:, :, r, c] @ u_pad[.., i+r, j+c]."""
    B, d, H, W = u.shape
    up = F.pad(u, (1, 1, 1, 1))
    out = bias.view(1, -1, 1, 1).expand(B, -1, H, W).clone()
    for r in range(3):
        for c in range(3):
            out = out + torch.einsum("oi,bihw->bohw", weight[:, :, r, c], up[:, :, r:r + H, c:c + W])
    return out


def bypass_ref(mod, h, grid, P, drop=None):
    dn, cv, upl = mod.adapter_down, mod.adapter_conv, mod.adapter_up
    B, N, _ = h.shape
    gh, gw = grid
    u = _qgelu(F.linear(h, dn.weight, dn.bias))
    prefix = [F.linear(u[:, j], cv.weight[:, :, 1, 1], cv.bias) for j in range(P)]  # centre tap only
    pg = u[:, P:].reshape(B, gh, gw, -1).permute(0, 3, 1, 2)
    pg = _conv3x3(pg, cv.weight, cv.bias).permute(0, 2, 3, 1).reshape(B, gh * gw, -1)
    v = _qgelu(torch.cat([torch.stack(prefix, 1), pg], 1) if P else pg)
    if drop is not None:
        v = drop(v)
    return F.linear(v, upl.weight, upl.bias)


def reference_features(model, img, s, attn=True, mlp=True, train=False):
    """Eval reference, or (train=True) the same computation drawing DropPath / dropout masks in the
    order the module documents: attn DP, bypass dropout, bypass DP, MLP DP, bypass dropout, bypass DP."""
    grid, P = model.patch_embed.grid_size, model.num_prefix_tokens
    drop = (lambda t: F.dropout(t, 0.1, training=True)) if train else None
    x = model.norm_pre(model._pos_embed(model.patch_embed(img)))
    for blk in model.blocks:
        dp1 = blk.drop_path1 if train else (lambda t: t)
        dp2 = blk.drop_path2 if train else (lambda t: t)
        h = _ln(x, blk.norm1)
        y = x + dp1(_attn(blk, h))
        if attn:
            y = y + dp1(bypass_ref(blk.adapter_attn, h, grid, P, drop)) * s
        h2 = _ln(y, blk.norm2)
        z = y + dp2(_mlp(blk, h2))
        if mlp:
            z = z + dp2(bypass_ref(blk.adapter_mlp, h2, grid, P, drop)) * s
        x = z
    return x


def _check(model, img, s, **kw):
    model.eval()
    out = model(img)
    ref = _head(model, reference_features(model, img, s, **kw))
    assert_matches_formulation(model, out, ref)


def _randomize(model, std=0.2):
    randomize_([p for n, p in model.named_parameters() if "adapter_" in n], std=std)


# ------------------------------------------------------------------------------------------
# 1. counts
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mlp,count", [(True, 327_552), (False, 163_776)])
def test_vit_b16_counts_and_freezing(mlp, count):
    model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=10)
    fastpeft.inject(model, Convpass(dim=8, mlp=mlp))
    method = {n for n, _ in model.named_parameters() if ".adapter_" in n}
    assert sum(model.get_parameter(n).numel() for n in method) == count
    assert {n for n, p in model.named_parameters() if p.requires_grad} == method | {"head.weight", "head.bias"}
    blk = model.blocks[3]
    assert blk.adapter_attn.adapter_conv.weight.shape == (8, 8, 3, 3)
    assert blk.adapter_attn.adapter_down.weight.shape == (8, 768)
    assert blk.adapter_attn.adapter_up.weight.shape == (768, 8)
    assert hasattr(blk, "adapter_mlp") == mlp
    assert blk.adapter_attn.grid == (14, 14)


# ------------------------------------------------------------------------------------------
# 2. init
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dim", [8, 5])
def test_official_init_identity_centre_tap(dim):
    model = make_vit(depth=1)
    fastpeft.inject(model, Convpass(dim=dim))
    m = model.blocks[0].adapter_attn
    w = m.adapter_conv.weight
    expected = torch.zeros(dim, dim, 3, 3)
    expected[:, :, 1, 1] = torch.eye(dim)
    assert torch.equal(w, expected)
    assert torch.count_nonzero(m.adapter_conv.bias) == 0
    assert torch.count_nonzero(m.adapter_up.weight) == 0 and torch.count_nonzero(m.adapter_up.bias) == 0
    assert torch.count_nonzero(m.adapter_down.bias) == 0
    bound = math.sqrt(6 / (192 + dim))  # xavier_uniform on [dim, 192]
    assert m.adapter_down.weight.abs().max() <= bound and m.adapter_down.weight.abs().max() > 0.9 * bound


def test_xavier_init_conv():
    model = make_vit(depth=1)
    fastpeft.inject(model, Convpass(dim=8, xavier_init=True))
    w = model.blocks[0].adapter_mlp.adapter_conv.weight
    bound = math.sqrt(6 / (8 * 9 + 8 * 9))
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
    assert w[:, :, 0, 0].abs().sum() > 0  # not the identity init


@pytest.mark.parametrize("cfg", [dict(), dict(mlp=False), dict(attn=False), dict(xavier_init=True)])
def test_zero_bypass_reproduces_frozen_logits_exactly(cfg, x):
    model = make_vit(depth=2).eval()
    frozen = model(x)
    fastpeft.inject(model, Convpass(**cfg))
    assert torch.equal(model(x), frozen)


# ------------------------------------------------------------------------------------------
# 3. forward and gradients; train mode
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", [
    dict(), dict(mlp=False), dict(attn=False, scale=0.5), dict(xavier_init=True, dim=5, scale=1.0),
])
def test_forward_and_grads_match_reference(cfg, x):
    model = make_vit(depth=2)
    fastpeft.inject(model, Convpass(**cfg))
    _randomize(model)
    c = Convpass(**cfg)
    _check(model, x, c.scale, attn=c.attn, mlp=c.mlp)


def test_train_mode_separate_droppath_draws_and_dropout():
    """Seeded train-mode forward equals a reference drawing a fresh DropPath mask for each bypass
    (the block's own DropPath module, called again) and the bypass dropout, in forward order."""
    img = images(batch=6)
    model = make_vit(depth=2, drop_path_rate=0.6)
    fastpeft.inject(model, Convpass(scale=2.0))
    _randomize(model)
    model.train()
    assert model.blocks[1].adapter_attn.training
    torch.manual_seed(0)
    out = model.forward_features(img)
    torch.manual_seed(0)
    ref = model.norm(reference_features(model, img, 2.0, train=True))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.manual_seed(1)
    assert not torch.allclose(model.forward_features(img), out)
    model.eval()
    assert not model.blocks[1].adapter_attn.training
    a = model.forward_features(img)
    torch.testing.assert_close(a, model.norm(reference_features(model, img, 2.0)), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------
# 4. gradient routing
# ------------------------------------------------------------------------------------------

def test_grads_reach_only_trainable(x):
    model = make_vit(depth=2)
    fastpeft.inject(model, Convpass())
    model(x).sum().backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, n
    # zero up-projection at init: its gradient is non-zero, everything upstream is exactly zero
    m = model.blocks[0].adapter_attn
    assert torch.count_nonzero(m.adapter_up.weight.grad) > 0
    assert torch.count_nonzero(m.adapter_down.weight.grad) == 0


# ------------------------------------------------------------------------------------------
# 5. registers, non-square grid
# ------------------------------------------------------------------------------------------

def test_register_tokens(x):
    model = make_vit("vit_small_patch16_224", depth=2, reg_tokens=4, class_token=True)
    fastpeft.inject(model, Convpass(scale=1.0))
    assert model.blocks[0].adapter_attn.num_prefix == 5
    _randomize(model)
    _check(model, x, 1.0)


def test_no_class_token_avg_pool(x):
    model = make_vit(depth=2, class_token=False, global_pool="avg")
    fastpeft.inject(model, Convpass(scale=1.0))
    assert model.blocks[0].adapter_attn.num_prefix == 0
    _randomize(model)
    _check(model, x, 1.0)


def test_non_square_grid():
    img = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(2))
    model = make_vit(depth=2, img_size=(64, 96))
    fastpeft.inject(model, Convpass(scale=1.0))
    assert model.blocks[0].adapter_attn.grid == (4, 6)
    _randomize(model)
    _check(model, img, 1.0)


def test_wrong_token_count_is_a_clear_error():
    model = make_vit(depth=1)
    fastpeft.inject(model, Convpass())
    with pytest.raises(RuntimeError, match="4x4"):
        model.blocks[0](torch.randn(1, 20, 192))


# ------------------------------------------------------------------------------------------
# 6. bad configs, clashes, merge
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg,needle", [
    (dict(dim=0), "dim"), (dict(dim=193), "dim=193"), (dict(scale=float("nan")), "scale"),
    (dict(scale="10"), "scale"), (dict(attn=False, mlp=False), "attn=True and/or mlp=True"),
    (dict(dropout=-0.1), "dropout"), (dict(xavier_init=1), "xavier_init"),
])
def test_bad_config_raises_and_leaves_model_unchanged(cfg, needle):
    model = make_vit(depth=2)
    before = _snapshot(model)
    with pytest.raises(ValueError, match=needle):
        fastpeft.inject(model, Convpass(**cfg))
    assert _snapshot(model) == before
    assert not any(isinstance(b, PetlBlock) for b in model.blocks)


@pytest.mark.parametrize("second", [Convpass(mlp=False), VPT()])
def test_clashes_refused(second):
    model = make_vit(depth=2)
    fastpeft.inject(model, Convpass())
    before = _snapshot(model)
    with pytest.raises(ValueError, match="Convpass"):
        fastpeft.inject(model, second)
    assert _snapshot(model) == before


def test_merge_refused():
    model = make_vit(depth=1)
    fastpeft.inject(model, Convpass())
    assert_merge_refused(model, "Convpass: .*3x3 conv")


# ------------------------------------------------------------------------------------------
# 7. official state dict
# ------------------------------------------------------------------------------------------

def test_official_state_dict_loads(x):
    model = make_vit(depth=2)
    fastpeft.inject(model, Convpass(scale=1.0))
    g = torch.Generator().manual_seed(5)
    shapes = {"adapter_conv.weight": (8, 8, 3, 3), "adapter_conv.bias": (8,), "adapter_down.weight": (8, 192),
              "adapter_down.bias": (8,), "adapter_up.weight": (192, 8), "adapter_up.bias": (192,)}
    sd = {f"blocks.{i}.{which}.{k}": 0.2 * torch.randn(s, generator=g)
          for i in range(2) for which in ("adapter_attn", "adapter_mlp") for k, s in shapes.items()}
    load_official_state_dict(model, sd)
    for k, v in sd.items():
        assert torch.equal(model.get_parameter(k), v)
    _check(model, x, 1.0)
