"""BitFit and LinearProbe: exact trainable sets and counts, unchanged forward, gradient isolation,
trivial merge, remove."""
from __future__ import annotations

import copy

import pytest
import torch

import fastpeft
from fastpeft import BitFit, LinearProbe

from .conftest import assert_grads_reach_only_trainable, images, make_vit, vitb_meta


def test_bitfit_count_vitb():
    m = fastpeft.inject(vitb_meta(), BitFit())
    enc = {n: p for n, p in m.named_parameters() if p.requires_grad and not n.startswith("head.")}
    assert sum(p.numel() for p in enc.values()) == 102_912
    assert 102_912 == 12 * (3 * 768 + 768 + 3072 + 768 + 2 * 768) + 768 + 768
    assert all(n.endswith(".bias") for n in enc)
    assert "patch_embed.proj.bias" in enc and "norm.bias" in enc and "blocks.11.mlp.fc1.bias" in enc
    for n, p in m.named_parameters():
        assert p.requires_grad == (n in enc or n.startswith("head.")), n
    assert fastpeft.summary_rows(m)[0]["params"] == 102_912


def test_bitfit_includes_fc_norm_bias():
    m = fastpeft.inject(make_vit(global_pool="avg"), BitFit())
    assert m.fc_norm.bias.requires_grad and not m.fc_norm.weight.requires_grad


def test_linear_probe_trains_only_the_head():
    x = images()
    base = make_vit().eval()
    m = fastpeft.inject(copy.deepcopy(base), LinearProbe()).eval()
    assert {n for n, p in m.named_parameters() if p.requires_grad} == {"head.weight", "head.bias"}
    assert torch.equal(m(x), base(x))
    assert set(m.state_dict()) == set(base.state_dict())


@pytest.mark.parametrize("cfg", [BitFit(), LinearProbe()])
def test_gradients_reach_only_trainable(cfg):
    m = fastpeft.inject(make_vit(), cfg).train()
    m(images()).sum().backward()
    assert_grads_reach_only_trainable(m)


@pytest.mark.parametrize("cfg", [BitFit(), LinearProbe()])
def test_forward_unchanged_and_trivial_merge(cfg):
    x = images()
    base = make_vit().eval()
    m = fastpeft.inject(copy.deepcopy(base), cfg).eval()
    assert torch.equal(m(x), base(x))
    keys = list(m.state_dict())
    fastpeft.merge(m)
    assert list(m.state_dict()) == keys and torch.equal(m(x), base(x))
    fastpeft.unmerge(m)
    assert torch.equal(m(x), base(x))


def test_twice_and_remove():
    m = fastpeft.inject(make_vit(), BitFit())
    flags = {n: p.requires_grad for n, p in m.named_parameters()}
    with pytest.raises(ValueError, match="BitFit"):
        fastpeft.inject(m, BitFit())
    assert {n: p.requires_grad for n, p in m.named_parameters()} == flags
    fastpeft.remove(m)
    assert all(p.requires_grad for p in m.parameters())
