"""Serial FFN adapters (fastpeft.Adapter, styles "noah" and "vpt"), spec §3.

The reference below recomputes every block with plain tensor ops (layer norms, attention, MLP and
the adapter written out) from the same parameter objects, so forward values and gradients of the
injected model are checked against an independent formulation.
"""
from __future__ import annotations

import math
import warnings

import pytest
import timm
import torch
import torch.nn.functional as F

import fastpeft
from fastpeft import AdaptFormer, Adapter
from fastpeft.methods.base import PetlBlock

from .conftest import assert_merge_refused, images, make_vit, randomize_, assert_train_forward_deterministic


# ------------------------------------------------------------------------------------------
# reference
# ------------------------------------------------------------------------------------------

def _ln(x, mod):
    return F.layer_norm(x, mod.normalized_shape, mod.weight, mod.bias, mod.eps)


def _attn(blk, h):
    a = blk.attn
    B, N, C = h.shape
    qkv = F.linear(h, a.qkv.weight, a.qkv.bias).reshape(B, N, 3, a.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    w = (q @ k.transpose(-2, -1)) * a.head_dim ** -0.5
    o = (w.softmax(-1) @ v).transpose(1, 2).reshape(B, N, -1)
    return F.linear(o, a.proj.weight, a.proj.bias)


def _mlp(blk, h):
    m = blk.mlp
    return F.linear(F.gelu(F.linear(h, m.fc1.weight, m.fc1.bias)), m.fc2.weight, m.fc2.bias)


def _qgelu(x):
    return x * torch.sigmoid(1.702 * x)


def reference_logits(model, img, style):
    x = model.norm_pre(model._pos_embed(model.patch_embed(img)))
    for blk in model.blocks:
        y = x + _attn(blk, _ln(x, blk.norm1))
        m = _mlp(blk, _ln(y, blk.norm2))
        if style == "noah":  # z = y + [f + ln2(QuickGELU(ln1 f))]
            ad = blk.adapter
            f = m + F.linear(_qgelu(F.linear(m, ad.ln1.weight, ad.ln1.bias)), ad.ln2.weight, ad.ln2.bias)
        else:  # z = y + (m + up(GELU(down m)))
            d, u = blk.adapter_downsample, blk.adapter_upsample
            f = m + F.linear(F.gelu(F.linear(m, d.weight, d.bias)), u.weight, u.bias)
        x = y + f
    return _head(model, x)


def _head(model, x):
    """timm's final norm, pooling (token: CLS; avg: patch tokens), fc_norm and linear head."""
    x = model.norm(x)
    feat = x[:, 0] if model.global_pool == "token" else x[:, model.num_prefix_tokens:].mean(1)
    return F.linear(model.fc_norm(feat), model.head.weight, model.head.bias)


def _trainable(model):
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _check_against_reference(model, img, style):
    model.eval()
    out = model(img)
    ref = reference_logits(model, img, style)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    names, params = zip(*_trainable(model))
    g_out = torch.autograd.grad((out * w).sum(), params)
    g_ref = torch.autograd.grad((ref * w).sum(), params)
    for n, a, b in zip(names, g_out, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m: f"grad of {n}: {m}")


def _snapshot(model):
    return {n: p.requires_grad for n, p in model.named_parameters()}, list(model.state_dict())


# ------------------------------------------------------------------------------------------
# 1. parameter counts, freezing
# ------------------------------------------------------------------------------------------

def test_vit_b16_counts_and_freezing():
    model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=10)
    fastpeft.inject(model, Adapter(dim=8))
    method = {n: p for n, p in model.named_parameters() if ".adapter." in n}
    assert sum(p.numel() for p in method.values()) == 156_768  # 12 * 13,064 (spec §3.1)
    assert fastpeft.summary_rows(model)[0]["params"] == 156_768
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(method) | {"head.weight", "head.bias"}
    assert model.blocks[0].adapter.ln1.weight.shape == (8, 768)
    assert model.blocks[0].adapter.ln2.weight.shape == (768, 8)


def test_vpt_style_count_reduction_8():
    model = make_vit("vit_base_patch16_224", depth=12, img_size=32)
    with pytest.warns(UserWarning):
        fastpeft.inject(model, Adapter(dim=96, style="vpt"))
    method = [p for n, p in model.named_parameters() if "adapter_" in n]
    assert sum(p.numel() for p in method) == 12 * 148_320  # spec §3.2, reduction factor 8
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        {n for n, _ in model.named_parameters() if "adapter_" in n} | {"head.weight", "head.bias"}


# ------------------------------------------------------------------------------------------
# 2. init
# ------------------------------------------------------------------------------------------

def test_noah_official_init_is_trunc_normal_002_zero_bias():
    model = make_vit(depth=2)
    fastpeft.inject(model, Adapter(dim=64))
    ad = model.blocks[0].adapter
    for w in (ad.ln1.weight, ad.ln2.weight):
        assert 0.018 < w.std().item() < 0.022 and w.abs().max() < 0.2
    assert torch.count_nonzero(ad.ln1.bias) == 0 and torch.count_nonzero(ad.ln2.bias) == 0


def test_noah_xavier_init():
    model = make_vit(depth=2)
    fastpeft.inject(model, Adapter(dim=64, init="xavier"))
    ad = model.blocks[1].adapter
    bound = math.sqrt(6 / (192 + 64))
    for w in (ad.ln1.weight, ad.ln2.weight):
        assert w.abs().max() <= bound and w.abs().max() > 0.95 * bound
    for b in (ad.ln1.bias, ad.ln2.bias):
        assert 0 < b.abs().max() < 1e-5


def test_vpt_official_init_all_zero_and_one_warning():
    model = make_vit(depth=3)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        fastpeft.inject(model, Adapter(dim=16, style="vpt"))
    msgs = [w for w in rec if issubclass(w.category, UserWarning) and "adapter_upsample.bias" in str(w.message)]
    assert len(msgs) == 1
    for blk in model.blocks:
        for t in (blk.adapter_downsample.weight, blk.adapter_downsample.bias,
                  blk.adapter_upsample.weight, blk.adapter_upsample.bias):
            assert torch.count_nonzero(t) == 0


def test_lora_init_zero_up_nonzero_down():
    model = make_vit(depth=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no quirk warning for a trainable init
        fastpeft.inject(model, Adapter(dim=16, style="vpt", init="lora"))
    blk = model.blocks[0]
    assert torch.count_nonzero(blk.adapter_upsample.weight) == 0
    assert torch.count_nonzero(blk.adapter_upsample.bias) == 0
    assert torch.count_nonzero(blk.adapter_downsample.bias) == 0
    bound = 1 / math.sqrt(192)  # kaiming_uniform(a=sqrt 5)
    w = blk.adapter_downsample.weight
    assert w.abs().max() <= bound and w.abs().max() > 0.95 * bound


@pytest.mark.parametrize("cfg", [
    dict(style="noah", init="lora"), dict(style="vpt", init="lora"), dict(style="vpt", init="official"),
])
def test_zero_branch_reproduces_frozen_logits_exactly(cfg, x):
    model = make_vit(depth=2).eval()
    frozen = model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fastpeft.inject(model, Adapter(dim=8, **cfg))
    assert torch.equal(model(x), frozen)


# ------------------------------------------------------------------------------------------
# 3. forward and gradients against the reference; train mode
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("style,init", [("noah", "official"), ("noah", "xavier"), ("vpt", "lora")])
def test_forward_and_grads_match_reference(style, init, x):
    model = make_vit(depth=2)
    fastpeft.inject(model, Adapter(dim=8, style=style, init=init))
    randomize_([p for n, p in model.named_parameters() if "adapter" in n], std=0.1)
    _check_against_reference(model, x, style)


def test_gelu_act_option(x):
    model = make_vit(depth=1)
    fastpeft.inject(model, Adapter(dim=8, act="gelu", dropout=0.0))
    randomize_([p for n, p in model.named_parameters() if "adapter" in n], std=0.1)
    model.eval()
    ad = model.blocks[0].adapter
    out = model(x)
    # swap QuickGELU for GELU in the reference adapter and compare
    blk = model.blocks[0]
    xx = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    y = xx + _attn(blk, _ln(xx, blk.norm1))
    f = _mlp(blk, _ln(y, blk.norm2))
    f = f + F.linear(F.gelu(F.linear(f, ad.ln1.weight, ad.ln1.bias)), ad.ln2.weight, ad.ln2.bias)
    ref = F.linear(_ln(y + f, model.norm)[:, 0], model.head.weight, model.head.bias)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_dropout_follows_train_eval(x):
    model = make_vit(depth=2)
    fastpeft.inject(model, Adapter(dim=8))  # dropout 0.1 (noah default), backbone has no dropout
    randomize_([p for n, p in model.named_parameters() if "adapter" in n], std=0.3)
    model.train()
    assert model.blocks[0].adapter.training
    torch.manual_seed(0)
    a = model(x)
    torch.manual_seed(1)
    b = model(x)
    assert not torch.allclose(a, b)
    model.eval()
    assert not model.blocks[0].adapter.training
    torch.testing.assert_close(model(x), reference_logits(model, x, "noah"), rtol=1e-5, atol=1e-5)
    # with dropout 0 the train-mode forward is deterministic: the randomness above was the adapter's
    model2 = make_vit(depth=2)
    fastpeft.inject(model2, Adapter(dim=8, dropout=0.0))
    assert_train_forward_deterministic(model2, x)


def test_vpt_style_droppath_wraps_adapter():
    """VPT's timm block applies DropPath to m + adapter(m) (one draw for both); replayed with the
    same seed by a reference that calls the block's DropPath modules in forward order."""
    img = images(batch=8)
    model = make_vit(depth=2, drop_path_rate=0.5)  # block 1 drop-path rate 0.5
    fastpeft.inject(model, Adapter(dim=8, style="vpt", init="lora"))
    randomize_([p for n, p in model.named_parameters() if "adapter" in n], std=1.0)
    model.train()
    torch.manual_seed(0)
    out = model.forward_features(img)
    torch.manual_seed(0)
    xx = model.norm_pre(model._pos_embed(model.patch_embed(img)))
    for blk in model.blocks:
        y = xx + blk.drop_path1(_attn(blk, _ln(xx, blk.norm1)))
        m = _mlp(blk, _ln(y, blk.norm2))
        d, u = blk.adapter_downsample, blk.adapter_upsample
        xx = y + blk.drop_path2(m + F.linear(F.gelu(F.linear(m, d.weight, d.bias)), u.weight, u.bias))
    torch.testing.assert_close(out, _ln(xx, model.norm), rtol=1e-5, atol=1e-5)
    model.eval()
    assert not torch.allclose(model.forward_features(img), out)  # some samples were dropped


# ------------------------------------------------------------------------------------------
# 4. gradient routing; the VPT zero-init quirk
# ------------------------------------------------------------------------------------------

def test_grads_reach_only_trainable(x):
    model = make_vit(depth=2)
    fastpeft.inject(model, Adapter(dim=8))
    model(x).sum().backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, n
        else:
            assert p.grad is None, n


def test_vpt_official_zero_init_only_up_bias_learns(x):
    model = make_vit(depth=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fastpeft.inject(model, Adapter(dim=8, style="vpt"))
    model.train()
    model(x).pow(2).sum().backward()
    for n, p in model.named_parameters():
        if "adapter_" not in n:
            continue
        if n.endswith("adapter_upsample.bias"):
            assert torch.count_nonzero(p.grad) > 0, n
        else:
            assert torch.count_nonzero(p.grad) == 0, n


# ------------------------------------------------------------------------------------------
# 5. register tokens / avg pooling
# ------------------------------------------------------------------------------------------

def test_register_tokens_and_avg_pool(x):
    model = make_vit("vit_small_patch16_224", depth=2, reg_tokens=4, class_token=True, global_pool="avg")
    fastpeft.inject(model, Adapter(dim=8))
    _check_against_reference(model, x, "noah")


# ------------------------------------------------------------------------------------------
# 6. bad configs, merge refusal
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg,needle", [
    (dict(dim=0), "dim"), (dict(dim=-3), "dim"), (dict(dim=193), "dim=193"), (dict(dim=2.5), "dim"),
    (dict(act="relu"), "act"), (dict(style="houlsby"), "style"), (dict(init="zeros"), "init"),
    (dict(dropout=1.0), "dropout"),
])
def test_bad_config_raises_and_leaves_model_unchanged(cfg, needle):
    model = make_vit(depth=2)
    before = _snapshot(model)
    with pytest.raises(ValueError, match=needle):
        fastpeft.inject(model, Adapter(**cfg))
    assert _snapshot(model) == before
    assert not any(isinstance(b, PetlBlock) for b in model.blocks)


@pytest.mark.parametrize("second", [Adapter(dim=4), Adapter(style="vpt", init="lora"), AdaptFormer(dim=4)])
def test_double_injection_refused(second):
    model = make_vit(depth=2)
    fastpeft.inject(model, Adapter(dim=8))
    before = _snapshot(model)
    with pytest.raises(ValueError, match="Adapter"):
        fastpeft.inject(model, second)
    assert _snapshot(model) == before


def test_merge_refused():
    model = make_vit(depth=1)
    fastpeft.inject(model, Adapter())
    assert_merge_refused(model, "Adapter: .*nonlinearity")


# ------------------------------------------------------------------------------------------
# 7. official state dicts load
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("style", ["noah", "vpt"])
def test_official_state_dict_loads(style, x):
    model = make_vit(depth=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fastpeft.inject(model, Adapter(dim=8, style=style))
    D, a = 192, 8
    g = torch.Generator().manual_seed(5)
    sd = {}
    for i in range(2):
        if style == "noah":
            shapes = {"adapter.ln1.weight": (a, D), "adapter.ln1.bias": (a,),
                      "adapter.ln2.weight": (D, a), "adapter.ln2.bias": (D,)}
        else:
            shapes = {"adapter_downsample.weight": (a, D), "adapter_downsample.bias": (a,),
                      "adapter_upsample.weight": (D, a), "adapter_upsample.bias": (D,)}
        sd.update({f"blocks.{i}.{k}": torch.randn(s, generator=g) for k, s in shapes.items()})
    res = model.load_state_dict(sd, strict=False)
    assert res.unexpected_keys == []
    assert not set(sd) & set(res.missing_keys)
    for k, v in sd.items():
        assert torch.equal(model.get_parameter(k), v)
    _check_against_reference(model, x, style)
