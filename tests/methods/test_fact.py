"""FacT-TT / FacT-TK: counts, official init, forward+grad vs an independent per-slice construction
(TK built element-wise from FacTc/FacTp without the official reshapes), dropout modules, gradient
isolation, shape requirements, bad configs, official checkpoints."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch.func import functional_call

import fastpeft
from fastpeft import FacT

from .conftest import (assert_dropout_follows_train_eval, assert_grads_reach_only_trainable,
                       assert_inject_refused_unchanged, assert_out_and_grads_match, images, make_vit,
                       method_params, randomize_, vitb_meta)

D = 192


# ---------------------------------------------------------------------------------------------- counts

@pytest.mark.parametrize("kind,r,expected", [("tt", 8, 21_504), ("tk", 8, 13_952), ("tt", 4, 8_448), ("tk", 32, 86_528)])
def test_param_count_vitb(kind, r, expected):
    m = fastpeft.inject(vitb_meta(), FacT(kind=kind, rank=r))
    mp = method_params(m)
    assert sum(p.numel() for p in mp.values()) == expected
    assert expected == (1536 * r + 144 * r * r if kind == "tt" else 1680 * r + r ** 3)
    for n, p in m.named_parameters():
        assert p.requires_grad == ("FacT" in n or n.startswith("head.")), n
    if kind == "tk":
        assert m.FacTp.shape == (r, 144) and m.FacTc.shape == (r, r, r)
    else:
        assert m.blocks[11].mlp.fc1_FacTs.weight.shape == (4 * r, r)
        assert m.blocks[11].mlp.fc2_FacTs.weight.shape == (r, 4 * r)


# ---------------------------------------------------------------------------------------------- init

def test_official_init():
    m = fastpeft.inject(make_vit(depth=3), FacT(kind="tt", rank=16))
    assert torch.count_nonzero(m.FacTv.weight) == 0
    bu = 1 / math.sqrt(D)  # default nn.Linear init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert bu * 0.95 < m.FacTu.weight.abs().max() <= bu
    cores = torch.cat([getattr(m.blocks[i].attn, f"{n}_FacTs").weight.flatten() for i in range(3) for n in ("q", "k", "v", "proj")]
                      + [m.blocks[i].mlp.fc1_FacTs.weight.flatten() for i in range(3)])
    assert 0.95 / 4 < cores.abs().max() <= 1 / 4  # fan_in r = 16
    fc2 = torch.cat([m.blocks[i].mlp.fc2_FacTs.weight.flatten() for i in range(3)])
    assert 0.95 / 8 < fc2.abs().max() <= 1 / 8  # fan_in 4r = 64

    m = fastpeft.inject(make_vit(depth=3), FacT(kind="tk", rank=16))
    assert torch.count_nonzero(m.FacTv.weight) == 0
    bc = math.sqrt(6 / (16 * 16 + 16 * 16))  # xavier on [r, r, r]: fan_in = fan_out = r*r
    bp = math.sqrt(6 / (16 + 36))  # xavier on [r, 12*depth]
    assert 0.95 * bc < m.FacTc.abs().max() <= bc
    assert 0.9 * bp < m.FacTp.abs().max() <= bp
    assert m.FacTp.shape == (16, 36)


@pytest.mark.parametrize("kind", ["tt", "tk"])
def test_zero_init_reproduces_frozen_logits(kind):
    x = images()
    base = make_vit().eval()
    m = fastpeft.inject(copy.deepcopy(base), FacT(kind=kind, rank=4, scale=10.0)).eval()
    assert torch.equal(m(x), base(x))


# ---------------------------------------------------------------------------------------------- independent math

def slice_cores_tt(m, i, r):
    """{slice name: [r, r] core K} with delta_slice = s V K U, straight from the TT Linear weights."""
    a, p = m.blocks[i].attn, m.blocks[i].mlp
    cores = {n: getattr(a, f"{n}_FacTs").weight for n in ("q", "k", "v", "proj")}
    for c in range(4):
        cores[f"fc1_{c}"] = p.fc1_FacTs.weight[c * r:(c + 1) * r, :]  # output chunk c <- rows c*r..
        cores[f"fc2_{c}"] = p.fc2_FacTs.weight[:, c * r:(c + 1) * r]  # input chunk c -> columns c*r..
    return cores


def slice_cores_tk(m, i, r):
    """Element-wise from FacTc / FacTp with explicit index arithmetic (no reshapes):
    core of global slice column k: C_k[a, b] = sum_m FacTc[a, b, m] FacTp[m, k]; attention uses
    u -> u @ C (so K = C^T); fc1 chunk c, position q takes column c*r+q of the (b, m)->b*4+m
    flattening of slices 12i+4..12i+7; fc2 likewise over 12i+8..12i+11."""
    Fc, Fp = m.FacTc, m.FacTp

    def C(k):
        return torch.einsum("abm,m->ab", Fc, Fp[:, k])

    cores = {n: C(12 * i + j).t() for j, n in enumerate(("q", "k", "v", "proj"))}
    for c in range(4):
        k1 = torch.empty(r, r)
        k2 = torch.empty(r, r)
        rows1, rows2 = [], []
        for q in range(r):
            col = c * r + q
            b, mm = divmod(col, 4)
            # fc1: t[c*r+q] = sum_a u[a] * F1[a, col],   F1[a, col] = C_{12i+4+mm}[a, b]
            rows1.append(C(12 * i + 4 + mm)[:, b])
            # fc2: t[bb] = sum_{c,q} w[c*r+q] * F2[bb, col],   F2[bb, col] = C_{12i+8+mm}[bb, b]
            rows2.append(C(12 * i + 8 + mm)[:, b])
        k1 = torch.stack(rows1, 0)  # [q, a]
        k2 = torch.stack(rows2, 1)  # [bb, q]
        cores[f"fc1_{c}"] = k1
        cores[f"fc2_{c}"] = k2
    return cores


def reference_weights(m, kind, r, s):
    U, V = m.FacTu.weight, m.FacTv.weight
    w = {"head.weight": m.head.weight, "head.bias": m.head.bias}
    for i, blk in enumerate(m.blocks):
        cores = slice_cores_tt(m, i, r) if kind == "tt" else slice_cores_tk(m, i, r)
        dW = {n: s * V @ K @ U for n, K in cores.items()}  # every slice is a D x D matrix
        w[f"blocks.{i}.attn.qkv.weight"] = blk.attn.qkv.weight + torch.cat([dW["q"], dW["k"], dW["v"]], 0)
        w[f"blocks.{i}.attn.proj.weight"] = blk.attn.proj.weight + dW["proj"]
        w[f"blocks.{i}.mlp.fc1.weight"] = blk.mlp.fc1.weight + torch.cat([dW[f"fc1_{c}"] for c in range(4)], 0)
        w[f"blocks.{i}.mlp.fc2.weight"] = blk.mlp.fc2.weight + torch.cat([dW[f"fc2_{c}"] for c in range(4)], 1)
    return w


@pytest.mark.parametrize("kind,r,s", [("tt", 4, 3.0), ("tk", 4, 3.0), ("tk", 6, 0.5), ("tt", 5, 1.0)])
def test_forward_and_grads_match_per_slice_math(kind, r, s):
    x = images(batch=2)
    base = make_vit(depth=3).eval()
    m = fastpeft.inject(copy.deepcopy(base), FacT(kind=kind, rank=r, scale=s)).eval()
    randomize_([m.FacTv.weight], std=0.05)
    params = list(method_params(m).values()) + [m.head.weight, m.head.bias]
    proj = torch.randn(2, 10, generator=torch.Generator().manual_seed(5))
    out = m(x)
    ref = functional_call(base, reference_weights(m, kind, r, s), (x,))
    assert_out_and_grads_match(out, ref, params, proj)


def test_tk_interleave_is_not_the_naive_chunking():
    """Guards the official reshape: assigning slice 12i+4+c to fc1 chunk c would give other weights."""
    m = fastpeft.inject(make_vit(depth=1), FacT(kind="tk", rank=4))
    cores = slice_cores_tk(m, 0, 4)
    naive = torch.einsum("abm,m->ab", m.FacTc, m.FacTp[:, 4]).t()
    assert not torch.allclose(cores["fc1_0"], naive)


# ---------------------------------------------------------------------------------------------- modes, grads

@pytest.mark.parametrize("kind", ["tt", "tk"])
def test_dropout_modules_follow_train_eval(kind):
    m = fastpeft.inject(make_vit(), FacT(kind=kind, rank=4, dropout=0.5))
    assert isinstance(m.blocks[0].attn.dp, torch.nn.Dropout) and m.blocks[0].attn.dp.p == 0.5
    assert isinstance(m.blocks[1].mlp.dp, torch.nn.Dropout)
    randomize_([m.FacTv.weight], std=0.5)
    assert_dropout_follows_train_eval(m, images())


@pytest.mark.parametrize("kind", ["tt", "tk"])
def test_gradients_reach_only_trainable_parameters(kind):
    m = fastpeft.inject(make_vit(), FacT(kind=kind, rank=4)).train()
    randomize_([m.FacTv.weight])
    m(images()).sum().backward()
    assert_grads_reach_only_trainable(m)


def test_v_zero_means_only_v_gets_gradient_at_start():
    m = fastpeft.inject(make_vit(), FacT(kind="tt", rank=4)).eval()
    m(images()).sum().backward()
    assert m.FacTv.weight.grad.abs().max() > 0
    assert torch.count_nonzero(m.FacTu.weight.grad) == 0


# ---------------------------------------------------------------------------------------------- shapes & configs

def test_other_depth_and_width():
    m = fastpeft.inject(make_vit("vit_small_patch16_224", depth=5), FacT(kind="tk", rank=3))
    assert m.FacTp.shape == (3, 60)
    assert m(images()).shape == (2, 10)


def test_requires_4x_mlp():
    m = make_vit(mlp_ratio=2.0)
    keys = list(m.state_dict())
    with pytest.raises(ValueError, match="mlp_hidden"):
        fastpeft.inject(m, FacT())
    assert list(m.state_dict()) == keys


@pytest.mark.parametrize("cfg,words", [
    (FacT(kind="cp"), "kind"), (FacT(rank=0), "rank"), (FacT(rank=-1), "rank"), (FacT(rank=D + 1), "rank"),
    (FacT(dropout=1.5), "dropout"), (FacT(scale=None), "scale"),
])
def test_bad_configs(cfg, words):
    assert_inject_refused_unchanged(make_vit(), cfg, words)


def test_inject_twice_raises():
    m = fastpeft.inject(make_vit(), FacT(kind="tt"))
    keys = list(m.state_dict())
    with pytest.raises(ValueError, match="FacT"):
        fastpeft.inject(m, FacT(kind="tk"))
    assert list(m.state_dict()) == keys


# ---------------------------------------------------------------------------------------------- checkpoints

@pytest.mark.parametrize("kind", ["tt", "tk"])
def test_official_checkpoint_loads(kind):
    """What fact_tt.py / fact_tk.py save: every name containing 'FacT' or 'head'."""
    r, depth = 8, 2
    g = torch.Generator().manual_seed(1)
    sd = {"FacTu.weight": torch.randn(r, D, generator=g), "FacTv.weight": torch.randn(D, r, generator=g),
          "head.weight": torch.randn(10, D, generator=g), "head.bias": torch.randn(10, generator=g)}
    if kind == "tt":
        for i in range(depth):
            for n in ("q", "k", "v", "proj"):
                sd[f"blocks.{i}.attn.{n}_FacTs.weight"] = torch.randn(r, r, generator=g)
            sd[f"blocks.{i}.mlp.fc1_FacTs.weight"] = torch.randn(4 * r, r, generator=g)
            sd[f"blocks.{i}.mlp.fc2_FacTs.weight"] = torch.randn(r, 4 * r, generator=g)
    else:
        sd["FacTp"] = torch.randn(r, 12 * depth, generator=g)
        sd["FacTc"] = torch.randn(r, r, r, generator=g)
    m = fastpeft.inject(make_vit(depth=depth), FacT(kind=kind, rank=r))
    res = m.load_state_dict(sd, strict=False)
    assert res.unexpected_keys == []
    assert not any("FacT" in k or k.startswith("head") for k in res.missing_keys)
    ours = {n: p for n, p in m.state_dict().items() if "FacT" in n or n.startswith("head")}
    assert set(ours) == set(sd)
    assert all(torch.equal(ours[k], sd[k]) for k in sd)


def test_tk_matches_a_literal_transcription_of_the_official_forward():
    """fact_tk.py's fact_forward_attn / fact_forward_mlp, re-typed for one block (eval, dp = id)."""
    r, s = 4, 2.0
    m = fastpeft.inject(make_vit(depth=2), FacT(kind="tk", rank=r, scale=s)).eval()
    randomize_([m.FacTv.weight], std=0.1)
    blk, idx = m.blocks[1], 12
    x = torch.randn(2, 5, D, generator=torch.Generator().manual_seed(3))
    B, N, C = x.shape
    with torch.no_grad():
        # attention: only the qkv / proj deltas (the rest is timm's own attention)
        FacTc = m.FacTc @ m.FacTp[:, idx:idx + 4]
        q_c, k_c, v_c, p_c = FacTc[:, :, 0], FacTc[:, :, 1], FacTc[:, :, 2], FacTc[:, :, 3]
        want_qkv = torch.nn.functional.linear(x, blk.attn.qkv.weight, blk.attn.qkv.bias) + torch.cat(
            [m.FacTv(m.FacTu(x) @ q_c), m.FacTv(m.FacTu(x) @ k_c), m.FacTv(m.FacTu(x) @ v_c)], dim=2) * s
        torch.testing.assert_close(blk.attn.qkv(x), want_qkv, atol=1e-5, rtol=1e-5)
        want_proj = torch.nn.functional.linear(x, blk.attn.proj.weight, blk.attn.proj.bias) + m.FacTv(m.FacTu(x) @ p_c) * s
        torch.testing.assert_close(blk.attn.proj(x), want_proj, atol=1e-5, rtol=1e-5)
        # mlp
        FacTc = m.FacTc @ m.FacTp[:, idx + 4:idx + 12]
        fc1_c, fc2_c = FacTc[:, :, :4].reshape(r, r * 4), FacTc[:, :, 4:].reshape(r, r * 4)
        h = torch.nn.functional.linear(x, blk.mlp.fc1.weight, blk.mlp.fc1.bias)
        h = h + m.FacTv((m.FacTu(x) @ fc1_c).reshape(B, N, 4, r)).reshape(B, N, 4 * C) * s
        a = blk.mlp.act(h)
        h2 = torch.nn.functional.linear(a, blk.mlp.fc2.weight, blk.mlp.fc2.bias)
        h2 = h2 + m.FacTv(m.FacTu(a.reshape(B, N, 4, C)).reshape(B, N, 4 * r) @ fc2_c.t()) * s
        torch.testing.assert_close(blk.mlp(x), h2, atol=1e-5, rtol=1e-5)
