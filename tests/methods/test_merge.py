"""merge / unmerge for every linear method and for combinations: merged forward == injected eval
forward, plain timm state-dict keys, no hooks left, bit-exact restore, refusal of non-mergeable
methods (model unchanged), rollback of partial merges and failed injects, deepcopy / torch.save."""
from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch

import fastpeft
from fastpeft import AdaptFormer, BitFit, FacT, KAdaptation, LinearProbe, LoRA, SSF
from fastpeft.methods.base import OutputHook

from .conftest import images, make_vit, randomize_


def _inject(m, cfg):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # KAdaptation's official-init warning
        return fastpeft.inject(m, cfg)


def _randomize_method_params(m, std=0.05):
    randomize_([p for n, p in m.named_parameters() if p.requires_grad and not n.startswith("head.")], std=std)


def _no_fastpeft_hooks(m):
    return not any(isinstance(h, OutputHook) for mod in m.modules() for h in mod._forward_hooks.values())


def _close(a, b):
    scale = b.abs().max().clamp_min(1.0)
    torch.testing.assert_close(a / scale, b / scale, atol=1e-5, rtol=0)


CONFIGS = [
    [LoRA(rank=4)],
    [LoRA(rank=4, init="lora", scale=2.0)],
    [LoRA(rank=4, targets=("q", "v"), scale=3.0)],
    [FacT(kind="tt", rank=4, scale=2.0)],
    [FacT(kind="tk", rank=4, scale=2.0)],
    [KAdaptation(phm_dim=16)],
    [KAdaptation(phm_dim=16, init="trainable", v_uses_q_factors=False)],
    [SSF()],
    [BitFit()],
    [LinearProbe()],
    [SSF(), LoRA(rank=4, targets=("q", "v"))],
    [LoRA(rank=4, targets=("q", "v")), SSF()],
    [SSF(), FacT(kind="tk", rank=4), KAdaptation(phm_dim=16, init="trainable"), LoRA(rank=3), BitFit()],
]


@pytest.mark.parametrize("cfgs", CONFIGS, ids=lambda c: "+".join(type(x).__name__ for x in c))
def test_merge_matches_and_unmerge_restores(cfgs):
    x = images(batch=3)
    base = make_vit(depth=2)
    plain_keys = list(base.state_dict())
    m = copy.deepcopy(base)
    for c in cfgs:
        _inject(m, c)
    _randomize_method_params(m)
    m.train()  # merge must use eval math whatever the mode, and keep the mode
    frozen = {k: v.clone() for k, v in m.state_dict().items() if k in set(plain_keys)}
    flags = {n: p.requires_grad for n, p in m.named_parameters()}
    out = m.eval()(x)
    m.train()
    fastpeft.merge(m)
    assert m.training
    assert list(m.state_dict()) == plain_keys
    assert _no_fastpeft_hooks(m)
    _close(m.eval()(x), out)
    assert all(i.merged for i in fastpeft.injections(m))
    fastpeft.unmerge(m)
    sd = m.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in frozen.items())
    assert {n: p.requires_grad for n, p in m.named_parameters()} == flags
    assert torch.equal(m.eval()(x), out)


def test_non_mergeable_combination_refuses_and_leaves_model_unchanged():
    x = images()
    m = make_vit()
    _inject(m, LoRA(rank=4))
    _inject(m, AdaptFormer(dim=8))
    _randomize_method_params(m)
    m.eval()
    out = m(x)
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match="AdaptFormer"):
        fastpeft.merge(m)
    assert not any(i.merged for i in fastpeft.injections(m))
    assert list(m.state_dict()) == list(sd) and all(torch.equal(m.state_dict()[k], v) for k, v in sd.items())
    assert torch.equal(m(x), out)


def test_failed_merge_rolls_back_methods_already_merged():
    """LoRA merges first, then SSF cannot (qkv has no bias): LoRA must be unmerged again."""
    x = images()
    m = make_vit(qkv_bias=False)
    _inject(m, LoRA(rank=4))
    _inject(m, SSF())
    _randomize_method_params(m)
    m.eval()
    out = m(x)
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match="blocks.0.attn.qkv"):
        fastpeft.merge(m)
    assert not any(i.merged for i in fastpeft.injections(m))
    assert list(m.state_dict()) == list(sd) and all(torch.equal(m.state_dict()[k], v) for k, v in sd.items())
    assert torch.equal(m(x), out)


def test_failed_inject_midway_leaves_model_unchanged():
    m = make_vit()
    m.blocks[1].attn.LoRA_a = torch.nn.Linear(4, 4)  # a clash that only shows up at block 1
    keys = list(m.state_dict())
    flags = {n: p.requires_grad for n, p in m.named_parameters()}
    with pytest.raises(ValueError, match="blocks.1.attn.LoRA_a"):
        fastpeft.inject(m, LoRA(rank=4))
    assert list(m.state_dict()) == keys
    assert {n: p.requires_grad for n, p in m.named_parameters()} == flags
    assert not hasattr(m.blocks[0].attn, "LoRA_a") and _no_fastpeft_hooks(m)
    assert fastpeft.injections(m) == []


def test_merge_then_inject_needs_unmerge():
    m = _inject(make_vit(), LoRA(rank=4))
    fastpeft.merge(m)
    with pytest.raises(ValueError, match="unmerge"):
        fastpeft.inject(m, SSF())


@pytest.mark.parametrize("cfg", [LoRA(rank=4, targets=("q", "v")), FacT(kind="tk", rank=4),
                                 KAdaptation(phm_dim=16, init="trainable"), SSF()])
def test_deepcopy_and_torch_save_keep_the_method(cfg):
    x = images()
    m = _inject(make_vit(), cfg)
    _randomize_method_params(m)
    m.eval()
    out = m(x)
    c = copy.deepcopy(m)
    assert torch.equal(c(x), out)
    # the copy's hooks use the copy's parameters, not the original's
    with torch.no_grad():
        for n, p in c.named_parameters():
            if p.requires_grad and not n.startswith("head."):
                p.mul_(3.0)
    assert not torch.allclose(c(x), out) and torch.equal(m(x), out)
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    r = torch.load(buf, weights_only=False)
    assert torch.equal(r.eval()(x), out)
