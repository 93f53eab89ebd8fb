"""KAdaptation: counts, the official zero-init trap (warned, only `b` learns), trainable init,
forward+grads vs an independent torch.kron construction, the official q-after-scaling placement
re-typed from PEViT's attention, v-factor quirk, H-dropout mode, bad configs, official key map."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch.func import functional_call

import fastpeft
from fastpeft import KAdaptation
from fastpeft.methods.base import vit_info

from .conftest import (assert_dropout_follows_train_eval, assert_inject_refused_unchanged, images, make_vit,
                       method_params, randomize_, vitb_meta)

D = 192  # vit_tiny: 3 heads of 64


def inject(model, cfg):
    with pytest.warns(UserWarning, match="only the") if cfg.init == "official" else _nullcontext():
        return fastpeft.inject(model, cfg)


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def H_ref(rule_l, rule_r, w_l, w_r):
    """sum_i kron(rule_l[i] @ rule_r[i], w_l[i] @ w_r[i]) with torch.kron."""
    return sum(torch.kron(rule_l[i] @ rule_r[i], w_l[i] @ w_r[i]) for i in range(rule_l.shape[0]))


# ---------------------------------------------------------------------------------------------- counts, init

def test_param_count_vitb_and_names():
    m = inject(vitb_meta(), KAdaptation())
    mp = method_params(m)
    assert sum(p.numel() for p in mp.values()) == 4 * 32 * 32 + 12 * (4 * 32 * 24 + 768) == 50_176
    assert mp["phm_rule1_left"].shape == (32, 32, 1) and mp["phm_rule2_right"].shape == (32, 1, 32)
    assert mp["blocks.5.attn.q_proj_adapter1_left"].shape == (32, 24, 1)
    assert mp["blocks.5.attn.v_proj_adapter1_right"].shape == (32, 1, 24)
    assert mp["blocks.5.attn.b"].shape == (768,)
    for n, p in m.named_parameters():
        assert p.requires_grad == (n in mp or n.startswith("head.")), n


def test_official_init_is_the_zero_trap_and_warns():
    x = images()
    base = make_vit().eval()
    with pytest.warns(UserWarning, match="only the bias"):
        m = fastpeft.inject(copy.deepcopy(base), KAdaptation(phm_dim=16))
    for k in (1, 2):
        for s in ("left", "right"):
            t = getattr(m, f"phm_rule{k}_{s}")
            assert 0.009 < t.abs().max() <= 0.01
    for blk in m.blocks:
        for n in ("q_proj_adapter1_left", "q_proj_adapter1_right", "v_proj_adapter1_left", "v_proj_adapter1_right", "b"):
            assert torch.count_nonzero(getattr(blk.attn, n)) == 0
    m.eval()
    out = m(x)
    assert torch.equal(out, base(x))
    # the trap: gradients of everything but b (and the head) are exactly zero, in train mode too
    m.train()
    m(x).sum().backward()
    for n, p in method_params(m).items():
        if n.endswith(".b"):
            assert p.grad.abs().max() > 0, n
        else:
            assert p.grad is None or torch.count_nonzero(p.grad) == 0, n


def test_trainable_init_starts_at_zero_and_every_factor_learns():
    x = images()
    base = make_vit().eval()
    m = fastpeft.inject(copy.deepcopy(base), KAdaptation(phm_dim=16, init="trainable", v_uses_q_factors=False)).eval()
    assert torch.equal(m(x), base(x))
    left = m.blocks[0].attn.q_proj_adapter1_left  # [16, 12, 1]: glorot-uniform per slice, gain sqrt 2
    bound = math.sqrt(2) * math.sqrt(6 / (12 + 1))
    assert 0.5 * bound < left.abs().max() <= bound
    assert torch.count_nonzero(m.blocks[0].attn.q_proj_adapter1_right) == 0
    m(x).sum().backward()
    for n, p in method_params(m).items():
        if "adapter1_right" in n or n.endswith(".b"):  # phm rules get gradient once H != 0
            assert p.grad is not None and p.grad.abs().max() > 0, n


# ---------------------------------------------------------------------------------------------- forward & grads

def reference_weights(m, cfg, info):
    s = cfg.lora_alpha / cfg.lora_dim * 5
    c = math.sqrt(info.head_dim) if cfg.q_delta_after_scaling else 1.0
    w = {"head.weight": m.head.weight, "head.bias": m.head.bias}
    for i, blk in enumerate(m.blocks):
        a = blk.attn
        Hq = H_ref(m.phm_rule1_left, m.phm_rule1_right, a.q_proj_adapter1_left, a.q_proj_adapter1_right)
        vl, vr = (a.q_proj_adapter1_left, a.q_proj_adapter1_right) if cfg.v_uses_q_factors else \
            (a.v_proj_adapter1_left, a.v_proj_adapter1_right)
        Hv = H_ref(m.phm_rule2_left, m.phm_rule2_right, vl, vr)
        W, bias = a.qkv.weight, a.qkv.bias
        zero = torch.zeros(D, D)
        # delta = x @ H (H is [in, out]) -> weight increment H^T
        w[f"blocks.{i}.attn.qkv.weight"] = W + torch.cat([c * s * Hq.t(), zero, s * Hv.t()], 0)
        w[f"blocks.{i}.attn.qkv.bias"] = bias + torch.cat([c * a.b, torch.zeros(D), a.b])
    return w


@pytest.mark.parametrize("cfg", [
    KAdaptation(phm_dim=16, init="trainable"),
    KAdaptation(phm_dim=16, init="trainable", v_uses_q_factors=False),
    KAdaptation(phm_dim=8, rank=2, init="trainable", v_uses_q_factors=False, q_delta_after_scaling=False, lora_alpha=8.0),
    KAdaptation(phm_dim=32),
])
def test_forward_and_grads_match_kron_construction(cfg):
    x = images(batch=2)
    base = make_vit(depth=2).eval()
    m = inject(copy.deepcopy(base), cfg).eval()
    mp = method_params(m)
    randomize_(list(mp.values()), std=0.05)
    params = list(mp.values()) + [m.head.weight, m.head.bias]
    proj = torch.randn(2, 10, generator=torch.Generator().manual_seed(9))
    out = m(x)
    ref = functional_call(base, reference_weights(m, cfg, vit_info(base)), (x,))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    g1 = torch.autograd.grad((out * proj).sum(), params, allow_unused=True)
    g2 = torch.autograd.grad((ref * proj).sum(), params, allow_unused=True)
    for (n, _), a, b in zip(list(mp.items()) + [("head", None)] * 2, g1, g2):
        if cfg.v_uses_q_factors and "v_proj_adapter1" in n:
            assert a is None and b is None, n  # the official v branch never reads them
            continue
        assert a.abs().max() > 0, n
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_q_delta_is_added_after_the_1_over_sqrt_dh_scaling_like_pevit():
    """Re-typed PEViT attention (q = q / sqrt(E) then q + q_delta; v + v_delta), correct layout."""
    cfg = KAdaptation(phm_dim=16, init="trainable", v_uses_q_factors=False)
    m = fastpeft.inject(make_vit(depth=1), cfg).eval()
    randomize_(list(method_params(m).values()), std=0.05)
    attn = m.blocks[0].attn
    x = torch.randn(2, 5, D, generator=torch.Generator().manual_seed(2))
    B, N, C = x.shape
    h, hd = attn.num_heads, attn.head_dim
    s = 160.0
    with torch.no_grad():
        q, k, v = torch.nn.functional.linear(x, attn.qkv.weight, attn.qkv.bias).chunk(3, -1)
        Hq = H_ref(m.phm_rule1_left, m.phm_rule1_right, attn.q_proj_adapter1_left, attn.q_proj_adapter1_right)
        Hv = H_ref(m.phm_rule2_left, m.phm_rule2_right, attn.v_proj_adapter1_left, attn.v_proj_adapter1_right)
        heads = lambda t: t.reshape(B, N, h, hd).transpose(1, 2)  # noqa: E731
        q = heads(q) / math.sqrt(hd) + heads(x @ Hq * s + attn.b)
        v = heads(v) + heads(x @ Hv * s + attn.b)
        o = (q @ heads(k).transpose(-1, -2)).softmax(-1) @ v
        want = attn.proj(o.transpose(1, 2).reshape(B, N, C))
        torch.testing.assert_close(attn(x), want, atol=1e-5, rtol=1e-5)


def test_dropout_on_H_follows_train_eval():
    m = fastpeft.inject(make_vit(), KAdaptation(phm_dim=16, init="trainable", dropout=0.5))
    randomize_(list(method_params(m).values()), std=0.3)
    assert_dropout_follows_train_eval(m, images())
    assert isinstance(m.blocks[0].attn.kdropout, torch.nn.Dropout)


# ---------------------------------------------------------------------------------------------- configs, keys

@pytest.mark.parametrize("cfg,words", [
    (KAdaptation(phm_dim=7), "divide"), (KAdaptation(phm_dim=0), "phm_dim"), (KAdaptation(rank=0), "rank"),
    (KAdaptation(phm_dim=32, rank=7), "rank"), (KAdaptation(init="glorot"), "init"),
    (KAdaptation(dropout=1.0), "dropout"), (KAdaptation(v_uses_q_factors=1), "v_uses_q_factors"),
    (KAdaptation(lora_dim=0), "lora_dim"),
])
def test_bad_configs(cfg, words):
    assert_inject_refused_unchanged(make_vit(), cfg, words)


def test_inject_twice_raises():
    m = inject(make_vit(), KAdaptation())
    keys = list(m.state_dict())
    with pytest.raises(ValueError, match="KAdaptation"):
        fastpeft.inject(m, KAdaptation(init="trainable"))
    assert list(m.state_dict()) == keys


def test_official_keys_map_a_pevit_state_dict():
    m = inject(make_vit(depth=2), KAdaptation())
    cfg = fastpeft.injections(m)[0].method
    g = torch.Generator().manual_seed(0)
    official = {"visual.transformer.phm_rule1_left": torch.randn(32, 32, 1, generator=g),
                "visual.transformer.phm_rule2_right": torch.randn(32, 1, 32, generator=g)}
    for i in range(2):
        official[f"visual.transformer.resblocks.{i}.attn.q_proj_adapter1_left"] = torch.randn(32, 6, 1, generator=g)
        official[f"visual.transformer.resblocks.{i}.attn.b"] = torch.randn(D, generator=g)
    mapping = cfg.official_keys(vit_info(m))
    res = m.load_state_dict({mapping[k]: v for k, v in official.items()}, strict=False)
    assert res.unexpected_keys == []
    assert torch.equal(m.blocks[1].attn.b, official["visual.transformer.resblocks.1.attn.b"])
    assert set(mapping.values()) == set(method_params(m))
