"""NOAH subnets (fastpeft.NOAH), spec §9.

The reference is a literal transcription of the official forward: the model-level prompts are
appended (then dropped by block 0, `sample_last_prompt_tuning_dim = p_0`), each block with p_l > 0
drops its last p_{l-1} tokens and appends p_l prompts, attention adds the sliced LoRA delta to q, k
and v, the sliced adapter follows the FFN -- all with plain tensor ops on the same parameters.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import fastpeft
from fastpeft import NOAH, VPT, AdaptFormer, Adapter, Convpass, LoRA
from fastpeft.methods.base import PetlBlock, vit_info

from .conftest import (assert_merge_refused, assert_train_forward_deterministic, load_official_state_dict,
                       make_vit, randomize_)
from .test_adapter import _head, _ln, _mlp, _qgelu, _snapshot


def _attn_lora(blk, h, r):
    a = blk.attn
    B, N, C = h.shape
    qkv = F.linear(h, a.qkv.weight, a.qkv.bias)
    if r:
        qkv = qkv + F.linear(F.linear(h, a.LoRA_a.weight[:r]), a.LoRA_b.weight[:, :r])
    qkv = qkv.reshape(B, N, 3, a.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    o = (((q @ k.transpose(-2, -1)) * a.head_dim ** -0.5).softmax(-1) @ v).transpose(1, 2).reshape(B, N, -1)
    return F.linear(o, a.proj.weight, a.proj.bias)


def reference_tokens(model, img, ad, lr, pl):
    B = img.shape[0]
    x = model.norm_pre(model._pos_embed(model.patch_embed(img)))
    n_orig = x.shape[1]
    if pl[0]:  # the official model-level prompts (+ pos embed): dead, block 0 drops them
        x = torch.cat([x, torch.full((B, pl[0], x.shape[2]), 123.0)], 1)
    for i, blk in enumerate(model.blocks):
        if pl[i]:
            last = pl[i - 1] if i > 0 else pl[0]
            prompts = blk.visual_prompt_token[:, :pl[i]].expand(B, -1, -1)
            x = torch.cat([x, prompts] if last == 0 else [x[:, :-last], prompts], 1)
        y = x + _attn_lora(blk, _ln(x, blk.norm1), lr[i])
        f = _mlp(blk, _ln(y, blk.norm2))
        if ad[i]:
            a, n = ad[i], blk.adapter
            f = f + F.linear(_qgelu(F.linear(f, n.ln1.weight[:a], n.ln1.bias[:a])), n.ln2.weight[:, :a], n.ln2.bias)
        x = y + f
    return x[:, :n_orig]


def _inject(model, ad, lr, pl, **kw):
    fastpeft.inject(model, NOAH(adapter_dims=ad, lora_ranks=lr, prompt_lens=pl, **kw))
    randomize_([p for n, p in model.named_parameters() if ".adapter." in n or "LoRA" in n], std=0.05)
    return model


def _check(model, img, ad, lr, pl):
    model.eval()
    out = model(img)
    ref = _head(model, reference_tokens(model, img, ad, lr, pl))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    names, params = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad])
    g_out = torch.autograd.grad((out * w).sum(), params, allow_unused=True)
    g_ref = torch.autograd.grad((ref * w).sum(), params, allow_unused=True)
    for n, a, b in zip(names, g_out, g_ref):
        assert (a is None) == (b is None), n
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m: f"grad of {n}: {m}")


# ------------------------------------------------------------------------------------------
# 1. counts
# ------------------------------------------------------------------------------------------

def test_vit_b16_counts_and_freezing():
    model = make_vit("vit_base_patch16_224", depth=12, img_size=224)
    cfg = NOAH(adapter_dims=[8] * 12, lora_ranks=[8] * 12, prompt_lens=[10] * 12)
    fastpeft.inject(model, cfg)
    method = {n for n, _ in model.named_parameters()
              if ".adapter." in n or ".LoRA_" in n or "visual_prompt_token" in n}
    # Adapter 156,768 (§3.1) + LoRA r=8 294,912 (§4.1) + prompts 12 * 10 * 768
    assert sum(model.get_parameter(n).numel() for n in method) == 156_768 + 294_912 + 92_160
    assert cfg.live_param_count(vit_info(model)) == 156_768 + 294_912 + 92_160
    assert fastpeft.summary_rows(model)[0]["params"] == 543_840
    assert {n for n, p in model.named_parameters() if p.requires_grad} == method | {"head.weight", "head.bias"}


def test_super_sizes_allocate_everywhere_live_count_counts_slices():
    model = make_vit(depth=3)
    ad, lr, pl = [8, 0, 4], [4, 4, 0], [5, 0, 3]
    cfg = NOAH(adapter_dims=ad, lora_ranks=lr, prompt_lens=pl, super_adapter_dim=16, super_lora_rank=10,
               super_prompt_len=7)
    fastpeft.inject(model, cfg)
    D = 192
    for blk in model.blocks:
        assert blk.visual_prompt_token.shape == (1, 7, D)
        assert blk.attn.LoRA_a.weight.shape == (10, D) and blk.attn.LoRA_b.weight.shape == (3 * D, 10)
        assert blk.adapter.ln1.weight.shape == (16, D) and blk.adapter.ln2.weight.shape == (D, 16)
    live = sum(p * D for p in pl) + sum(r * 4 * D for r in lr) + sum(2 * a * D + a + D for a in ad if a)
    assert cfg.live_param_count(vit_info(model)) == live


def test_disabled_module_types_allocate_nothing():
    model = make_vit(depth=2)
    fastpeft.inject(model, NOAH(lora_ranks=[2, 0]))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names == ["blocks.0.attn.LoRA_a.weight", "blocks.0.attn.LoRA_b.weight",
                     "blocks.1.attn.LoRA_a.weight", "blocks.1.attn.LoRA_b.weight", "head.weight", "head.bias"]


# ------------------------------------------------------------------------------------------
# 2. init
# ------------------------------------------------------------------------------------------

def test_official_init():
    model = make_vit(depth=1)
    fastpeft.inject(model, NOAH(adapter_dims=[64], lora_ranks=[64], prompt_lens=[20]))
    blk = model.blocks[0]
    for w in (blk.attn.LoRA_a.weight, blk.attn.LoRA_b.weight, blk.adapter.ln1.weight, blk.adapter.ln2.weight):
        assert 0.018 < w.std().item() < 0.022  # trunc_normal(.02): NOAH's global re-init
    assert torch.count_nonzero(blk.adapter.ln1.bias) == 0 and torch.count_nonzero(blk.adapter.ln2.bias) == 0
    bound = math.sqrt(6 / (20 * 192 + 192))  # xavier_uniform on [1, P, D]: fan_in P*D, fan_out D
    t = blk.visual_prompt_token
    assert t.abs().max() <= bound and t.abs().max() > 0.98 * bound


def test_written_init_and_exact_identity_for_lora_only(x):
    model = make_vit(depth=2).eval()
    frozen = model(x)
    fastpeft.inject(model, NOAH(lora_ranks=[4, 2], adapter_dims=[8, 0], init="written"))
    blk = model.blocks[0]
    assert torch.count_nonzero(blk.attn.LoRA_b.weight) == 0
    assert 0 < blk.adapter.ln1.bias.abs().max() < 1e-5  # N(0, 1e-6)
    model2 = make_vit(depth=2).eval()
    fastpeft.inject(model2, NOAH(lora_ranks=[4, 2], init="written"))
    assert torch.equal(model2(x), frozen)  # B = 0: the LoRA delta is exactly zero


# ------------------------------------------------------------------------------------------
# 3. forward/grad vs the official transcription; token layout; train mode
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ad,lr,pl", [
    ([8, 0, 4], [4, 4, 0], [5, 0, 3]),   # p_1 = 0: block 2 drops nothing, 8 prompts accumulate
    ([0, 2, 3], [0, 1, 2], [0, 2, 3]),   # no prompts in block 0
    ([1, 5, 10], [1, 5, 10], [10, 5, 1]),
    ([3, 3, 3], [0, 0, 0], [2, 2, 0]),   # last block passes prompts through
])
def test_forward_and_grads_match_official_transcription(ad, lr, pl, x):
    model = _inject(make_vit(depth=3), ad, lr, pl)
    _check(model, x, ad, lr, pl)


def test_supernet_sizes_use_leading_slices(x):
    ad, lr, pl = [3, 0, 2], [2, 3, 0], [4, 1, 0]
    model = _inject(make_vit(depth=3), ad, lr, pl, super_adapter_dim=100, super_lora_rank=100, super_prompt_len=100)
    _check(model, x, ad, lr, pl)
    out = model(x)
    out.sum().backward()
    blk = model.blocks[0]
    assert torch.count_nonzero(blk.attn.LoRA_a.weight.grad[2:]) == 0
    assert torch.count_nonzero(blk.attn.LoRA_b.weight.grad[:, 2:]) == 0
    assert torch.count_nonzero(blk.adapter.ln1.weight.grad[3:]) == 0
    assert torch.count_nonzero(blk.visual_prompt_token.grad[:, 4:]) == 0
    assert torch.count_nonzero(blk.visual_prompt_token.grad[:, :4]) > 0


def test_token_counts_per_block(x):
    model = make_vit(depth=4).eval()
    fastpeft.inject(model, NOAH(prompt_lens=[5, 0, 3, 2]))
    seen = []
    for blk in model.blocks:
        blk.norm1.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[1]))
    model.norm.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[1]))
    model(x)
    # 17 image tokens; +5; pass-through; +3 (p_1 = 0 drops nothing); -3 +2; removed at the end
    assert seen == [22, 22, 25, 24, 17]


@pytest.mark.parametrize("kw", [dict(prompt_lens=[4, 4]), dict(adapter_dims=[8, 8]), dict(lora_ranks=[8, 8])])
def test_dropouts_follow_train_eval(kw, x):
    model = make_vit(depth=2)
    fastpeft.inject(model, NOAH(dropout=0.5, lora_dropout=0.5, **kw))
    randomize_([p for n, p in model.named_parameters() if ".adapter." in n or "LoRA" in n], std=0.3)
    model.train()
    torch.manual_seed(0)
    a = model(x)
    torch.manual_seed(1)
    assert not torch.allclose(a, model(x))
    model.eval()
    full = {k: kw.get(k, [0, 0]) for k in ("adapter_dims", "lora_ranks", "prompt_lens")}
    torch.testing.assert_close(model(x), _head(model, reference_tokens(model, x, *full.values())),
                               rtol=1e-5, atol=1e-5)
    m2 = make_vit(depth=2)
    fastpeft.inject(m2, NOAH(dropout=0.0, lora_dropout=0.0, **kw))
    assert_train_forward_deterministic(m2, x)


# ------------------------------------------------------------------------------------------
# 4. gradient routing
# ------------------------------------------------------------------------------------------

def test_grads_reach_only_trainable(x):
    model = make_vit(depth=3)
    fastpeft.inject(model, NOAH(adapter_dims=[8, 0, 4], lora_ranks=[4, 4, 0], prompt_lens=[5, 0, 3]))
    model(x).sum().backward()
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, n
    assert model.blocks[1].visual_prompt_token.grad is None  # p_1 = 0: unused
    assert model.blocks[0].visual_prompt_token.grad is not None


# ------------------------------------------------------------------------------------------
# 5. register tokens
# ------------------------------------------------------------------------------------------

def test_register_tokens(x):
    ad, lr, pl = [4, 2], [2, 4], [3, 2]
    model = _inject(make_vit("vit_small_patch16_224", depth=2, reg_tokens=4, class_token=True), ad, lr, pl)
    _check(model, x, ad, lr, pl)


# ------------------------------------------------------------------------------------------
# 6. bad configs and clashes
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg,needle", [
    (dict(adapter_dims=[8, 8, 8]), "adapter_dims has 3 entries"),
    (dict(lora_ranks=[8]), "lora_ranks has 1 entries"),
    (dict(prompt_lens=[5, -1]), r"prompt_lens\[1\] = -1 is negative"),
    (dict(prompt_lens="55"), "prompt_lens must be a list"),
    (dict(adapter_dims=[8, 2.0]), r"adapter_dims\[1\] must be an int"),
    (dict(adapter_dims=[8, 9], super_adapter_dim=8), "exceeds super_adapter_dim"),
    (dict(prompt_lens=[3, 1], super_prompt_len=-1), "super_prompt_len"),
    (dict(lora_ranks=[1, 1], super_lora_rank=500), "LoRA rank 500 is larger than the embedding width"),
    (dict(adapter_dims=[193, 0]), "adapter size 193"),
    (dict(), "nothing to inject"),
    (dict(prompt_lens=[1, 1], dropout=1.0), "dropout"),
    (dict(prompt_lens=[1, 1], lora_dropout=-0.5), "lora_dropout"),
    (dict(prompt_lens=[1, 1], init="xavier"), "init"),
])
def test_bad_config_raises_and_leaves_model_unchanged(cfg, needle):
    model = make_vit(depth=2)
    before = _snapshot(model)
    with pytest.raises(ValueError, match=needle):
        fastpeft.inject(model, NOAH(**cfg))
    assert _snapshot(model) == before
    assert not any(isinstance(b, PetlBlock) for b in model.blocks)


@pytest.mark.parametrize("other", [LoRA(rank=4), LoRA(rank=4, targets=("q", "v")), Adapter(), AdaptFormer(dim=4),
                                   VPT(), Convpass(), NOAH(prompt_lens=[1, 1])])
@pytest.mark.parametrize("noah_first", [True, False])
def test_clashes_refused_either_order(other, noah_first):
    model = make_vit(depth=2)
    noah = NOAH(adapter_dims=[4, 4], lora_ranks=[2, 2], prompt_lens=[2, 2])
    first, second = (noah, other) if noah_first else (other, noah)
    fastpeft.inject(model, first)
    before = _snapshot(model)
    with pytest.raises(ValueError, match="NOAH"):
        fastpeft.inject(model, second)
    assert _snapshot(model) == before


def test_merge_refused():
    model = make_vit(depth=1)
    fastpeft.inject(model, NOAH(lora_ranks=[2]))
    assert_merge_refused(model, "NOAH: .*adapter")


# ------------------------------------------------------------------------------------------
# 7. official (supernet-sized) state dict
# ------------------------------------------------------------------------------------------

def test_official_supernet_state_dict_loads(x):
    ad, lr, pl = [5, 0], [1, 10], [10, 5]
    model = make_vit(depth=2)
    fastpeft.inject(model, NOAH(adapter_dims=ad, lora_ranks=lr, prompt_lens=pl,
                                super_adapter_dim=100, super_lora_rank=100, super_prompt_len=100))
    D, S = 192, 100
    g = torch.Generator().manual_seed(5)
    shapes = {"visual_prompt_token": (1, S, D), "attn.LoRA_a.weight": (S, D), "attn.LoRA_b.weight": (3 * D, S),
              "adapter.ln1.weight": (S, D), "adapter.ln1.bias": (S,), "adapter.ln2.weight": (D, S),
              "adapter.ln2.bias": (D,)}
    sd = {f"blocks.{i}.{k}": 0.05 * torch.randn(s, generator=g) for i in range(2) for k, s in shapes.items()}
    load_official_state_dict(model, sd)
    for k, v in sd.items():
        assert torch.equal(model.get_parameter(k), v)
    _check(model, x, ad, lr, pl)
    # the official model-level prompt tensors are dead (block 0 drops them): the only leftovers
    dead = {"visual_prompt_token": torch.zeros(1, S, D), "visual_prompt_token_pos_embed": torch.zeros(1, S, D)}
    assert sorted(model.load_state_dict({**sd, **dead}, strict=False).unexpected_keys) == sorted(dead)
