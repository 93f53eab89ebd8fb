"""LoRA (NOAH and PETL-ViT layouts): counts, official init, forward+grad vs merged-weight math,
dropout mode, gradient isolation, bad configs, official state dicts, NOAH hook with super-size tensors."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch.func import functional_call

import fastpeft
from fastpeft import LoRA
from fastpeft.methods.base import vit_info
from fastpeft.methods.lora import NoahLoRAHook, make_noah_lora

from .conftest import (assert_dropout_follows_train_eval, assert_grads_reach_only_trainable,
                       assert_out_and_grads_match, images, make_vit, method_params, randomize_, vitb_meta)

D_TINY = 192  # vit_tiny width


def check_trainable(model, expected_names):
    for n, p in model.named_parameters():
        assert p.requires_grad == (n in expected_names or n.startswith("head.")), n


# ---------------------------------------------------------------------------------------------- counts

def test_param_count_noah_vitb():
    m = fastpeft.inject(vitb_meta(), LoRA(rank=8))
    mp = method_params(m)
    assert sum(p.numel() for p in mp.values()) == 294_912
    assert set(mp) == {f"blocks.{i}.attn.LoRA_{x}.weight" for i in range(12) for x in "ab"}
    assert mp["blocks.0.attn.LoRA_a.weight"].shape == (8, 768)
    assert mp["blocks.0.attn.LoRA_b.weight"].shape == (2304, 8)
    check_trainable(m, mp)
    assert fastpeft.summary_rows(m)[0]["params"] == 294_912


def test_param_count_petl_vitb():
    m = fastpeft.inject(vitb_meta(), LoRA(rank=32, targets=("q", "v")))
    mp = method_params(m)
    assert sum(p.numel() for p in mp.values()) == 1_179_648
    assert set(mp) == {f"blocks.{i}.attn.lora_{t}.adapter_{d}.weight" for i in range(12) for t in "qv" for d in ("down", "up")}
    assert mp["blocks.3.attn.lora_q.adapter_down.weight"].shape == (32, 768)
    assert mp["blocks.3.attn.lora_v.adapter_up.weight"].shape == (768, 32)
    check_trainable(m, mp)


# ---------------------------------------------------------------------------------------------- init

def test_noah_official_init_is_trunc_normal_002_not_zero():
    torch.manual_seed(0)
    m = fastpeft.inject(make_vit(depth=4), LoRA(rank=16))
    a = torch.cat([m.blocks[i].attn.LoRA_a.weight.flatten() for i in range(4)])
    b = torch.cat([m.blocks[i].attn.LoRA_b.weight.flatten() for i in range(4)])
    for t in (a, b):
        assert 0.019 < t.std().item() < 0.021
        assert abs(t.mean().item()) < 2e-3
        assert (t != 0).all()


def test_noah_lora_init_and_petl_init():
    m = fastpeft.inject(make_vit(depth=3), LoRA(rank=16, init="lora"))
    bound = 1 / math.sqrt(D_TINY)  # kaiming_uniform(a=sqrt 5) == U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    a = torch.cat([m.blocks[i].attn.LoRA_a.weight.flatten() for i in range(3)])
    assert a.abs().max() <= bound and a.abs().max() > 0.95 * bound
    assert abs(a.std().item() - bound / math.sqrt(3)) < 0.05 * bound
    assert all(torch.count_nonzero(m.blocks[i].attn.LoRA_b.weight) == 0 for i in range(3))

    m = fastpeft.inject(make_vit(depth=3), LoRA(rank=16, targets=("q", "k")))
    downs = torch.cat([getattr(m.blocks[i].attn, f"lora_{t}").adapter_down.weight.flatten() for i in range(3) for t in "qk"])
    assert downs.abs().max() <= bound and downs.abs().max() > 0.95 * bound
    for i in range(3):
        for t in "qk":
            assert torch.count_nonzero(getattr(m.blocks[i].attn, f"lora_{t}").adapter_up.weight) == 0
        assert not hasattr(m.blocks[i].attn, "lora_v")


@pytest.mark.parametrize("cfg", [LoRA(init="lora"), LoRA(targets=("q", "v"), scale=10.0), LoRA(targets=("k",))])
def test_zero_init_reproduces_frozen_logits(cfg):
    x = images()
    base = make_vit().eval()
    ref = base(x)
    m = fastpeft.inject(copy.deepcopy(base), cfg).eval()
    assert torch.equal(m(x), ref)


# ---------------------------------------------------------------------------------------------- forward & grads

def reference_weights(model, style, targets, scale, rank=None):
    """qkv weights W + delta computed here from the LoRA parameters (differentiable)."""
    w = {}
    for i, blk in enumerate(model.blocks):
        W = blk.attn.qkv.weight
        A = W.shape[0] // 3
        if style == "noah":
            Am, Bm = blk.attn.LoRA_a.weight, blk.attn.LoRA_b.weight
            delta = scale * Bm @ Am
        else:
            rows = []
            for j, t in enumerate("qkv"):
                if t in targets:
                    ad = getattr(blk.attn, f"lora_{t}")
                    rows.append(scale * ad.adapter_up.weight @ ad.adapter_down.weight)
                else:
                    rows.append(torch.zeros(A, W.shape[1]))
            delta = torch.cat(rows, 0)
        w[f"blocks.{i}.attn.qkv.weight"] = W + delta
    w["head.weight"] = model.head.weight
    w["head.bias"] = model.head.bias
    return w


@pytest.mark.parametrize("cfg,style", [
    (LoRA(rank=4), "noah"),
    (LoRA(rank=4, scale=2.5, init="lora"), "noah"),
    (LoRA(rank=6, targets=("q", "v"), scale=2.5), "petl"),
    (LoRA(rank=3, targets=("k",), scale=0.5), "petl"),
    (LoRA(rank=5, targets=("q", "k", "v"), style="petl"), "petl"),
])
def test_forward_and_grads_match_merged_weight_math(cfg, style):
    x = images(batch=3)
    base = make_vit(depth=3).eval()
    m = fastpeft.inject(copy.deepcopy(base), cfg).eval()
    mp = method_params(m)
    randomize_(list(mp.values()), std=0.05)
    params = list(mp.values()) + [m.head.weight, m.head.bias]
    g = torch.Generator().manual_seed(7)
    proj = torch.randn(3, 10, generator=g)

    out = m(x)
    ref = functional_call(base, reference_weights(m, style, cfg.targets, cfg.scale), (x,))
    assert_out_and_grads_match(out, ref, params, proj)


def test_gradients_reach_only_trainable_parameters():
    for cfg in (LoRA(rank=4), LoRA(rank=4, targets=("q", "v"))):
        m = fastpeft.inject(make_vit(), cfg).train()
        randomize_([p for n, p in method_params(m).items() if "up" in n])
        m(images()).sum().backward()
        assert_grads_reach_only_trainable(m)


@pytest.mark.parametrize("cfg", [LoRA(rank=4, dropout=0.5), LoRA(rank=4, targets=("v",), dropout=0.5)])
def test_dropout_follows_train_eval(cfg):
    x = images()
    m = fastpeft.inject(make_vit(), cfg)
    randomize_(list(method_params(m).values()), std=0.2)
    assert_dropout_follows_train_eval(m, x)
    c = m(x)  # (eval)
    m.train()
    assert not torch.allclose(m(x), c)


def test_no_dropout_is_deterministic_in_train_mode():
    m = fastpeft.inject(make_vit(), LoRA(rank=4, dropout=0.0)).train()
    x = images()
    assert torch.equal(m(x), m(x))


# ---------------------------------------------------------------------------------------------- bad configs

@pytest.mark.parametrize("cfg,words", [
    (LoRA(rank=0), "rank"), (LoRA(rank=-2), "rank"), (LoRA(rank=D_TINY + 1), "rank"), (LoRA(rank=2.0), "rank"),
    (LoRA(targets=("x",)), "targets"), (LoRA(targets=()), "targets"), (LoRA(targets=("q", "q")), "duplicates"),
    (LoRA(style="bad"), "style"), (LoRA(style="noah", targets=("q", "v")), "noah"),
    (LoRA(init="xavier"), "init"), (LoRA(dropout=1.0), "dropout"), (LoRA(scale="1"), "scale"),
])
def test_bad_configs_raise_and_leave_model_unchanged(cfg, words):
    m = make_vit()
    keys = list(m.state_dict())
    flags = {n: p.requires_grad for n, p in m.named_parameters()}
    with pytest.raises(ValueError, match=words):
        fastpeft.inject(m, cfg)
    assert list(m.state_dict()) == keys
    assert {n: p.requires_grad for n, p in m.named_parameters()} == flags
    assert fastpeft.injections(m) == []


def test_inject_twice_raises_and_leaves_model_unchanged():
    m = fastpeft.inject(make_vit(), LoRA(rank=4))
    keys = list(m.state_dict())
    flags = {n: p.requires_grad for n, p in m.named_parameters()}
    x = images()
    out = m.eval()(x)
    for again in (LoRA(rank=4), LoRA(rank=2, targets=("q",))):
        with pytest.raises(ValueError, match="LoRA"):
            fastpeft.inject(m, again)
    assert list(m.state_dict()) == keys
    assert {n: p.requires_grad for n, p in m.named_parameters()} == flags
    assert torch.equal(m(x), out)


# ---------------------------------------------------------------------------------------------- official checkpoints

def test_official_noah_state_dict_loads():
    m = fastpeft.inject(make_vit(depth=2), LoRA(rank=8))
    sd = {}
    g = torch.Generator().manual_seed(0)
    for i in range(2):
        sd[f"blocks.{i}.attn.LoRA_a.weight"] = torch.randn(8, D_TINY, generator=g)
        sd[f"blocks.{i}.attn.LoRA_b.weight"] = torch.randn(3 * D_TINY, 8, generator=g)
    sd["head.weight"], sd["head.bias"] = torch.randn(10, D_TINY, generator=g), torch.randn(10, generator=g)
    res = m.load_state_dict(sd, strict=False)
    assert res.unexpected_keys == []
    assert not any("LoRA" in k or k.startswith("head") for k in res.missing_keys)
    assert torch.equal(m.blocks[1].attn.LoRA_b.weight, sd["blocks.1.attn.LoRA_b.weight"])


def test_official_petl_state_dict_loads():
    m = fastpeft.inject(make_vit(depth=2), LoRA(rank=32, targets=("q", "v")))
    sd = {f"blocks.{i}.attn.lora_{t}.adapter_{d}.weight": torch.randn(*((32, D_TINY) if d == "down" else (D_TINY, 32)))
          for i in range(2) for t in "qv" for d in ("down", "up")}
    res = m.load_state_dict(sd, strict=False)
    assert res.unexpected_keys == []
    assert not any("lora" in k for k in res.missing_keys)


# ---------------------------------------------------------------------------------------------- NOAH helpers

def test_make_noah_lora_and_hook_use_leading_slices():
    base = make_vit(depth=1).eval()
    info = vit_info(base)
    la, lb = make_noah_lora(info, 20, device="cpu", dtype=torch.float32)
    assert la.weight.shape == (20, D_TINY) and lb.weight.shape == (3 * D_TINY, 20)
    attn = base.blocks[0].attn
    attn.LoRA_a, attn.LoRA_b = la, lb
    hook = NoahLoRAHook(attn, 5, 0.1)
    x = torch.randn(2, 7, D_TINY)
    out = attn.qkv(x)
    got = hook.apply(x, out)
    want = out + x @ la.weight[:5].T @ lb.weight[:, :5].T
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert torch.equal(NoahLoRAHook(attn, 0, 0.1).apply(x, out), out)
    la2, lb2 = make_noah_lora(info, 20, init="lora")
    assert torch.count_nonzero(lb2.weight) == 0 and la2.weight.abs().max() <= 1 / math.sqrt(D_TINY)
