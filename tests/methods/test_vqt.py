"""VQT (fastpeft/methods/vqt.py) against the official semantics (andytu28/VQT h2t_vit.py), an
independent plain-tensor formulation, and the frozen model it must leave untouched."""
from __future__ import annotations

import copy
import io
import math

import pytest
import timm
import torch
import torch.nn.functional as F

import fastpeft
from fastpeft.methods.base import PetlBlock

from .conftest import images, make_vit

QS = [1, 3]


def _vqt(model, **kw):
    return fastpeft.inject(model, fastpeft.VQT(**kw))


def _block_outputs(model):
    """Forward hooks on every block; returns (list that fills on forward, handles)."""
    outs: list[torch.Tensor] = []
    hs = [b.register_forward_hook(lambda mod, inp, out: outs.append(out.detach().clone())) for b in model.blocks]
    return outs, hs


# ----------------------------------------------------------------------------------------------
# Independent formulation: explicit per-layer loop with plain tensor ops (no timm modules inside
# the blocks, no fastpeft code). Embeddings and pooling are the frozen model's (not VQT's business).
# ----------------------------------------------------------------------------------------------

def _ln(x, mod):
    return F.layer_norm(x, (x.shape[-1],), mod.weight, mod.bias, mod.eps)


def manual_vqt(model, x, queries, head_w, head_b):
    """Returns (logits, [query outputs per layer], [original-token hidden state per layer])."""
    B = x.shape[0]
    L, Q, D = queries.shape
    t_x = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    q_outs, hidden = [], []
    for l, blk in enumerate(model.blocks):
        a = blk.attn
        H, hd = a.num_heads, a.head_dim
        t = torch.cat([queries[l].unsqueeze(0).expand(B, Q, D), t_x], dim=1)
        T = t.shape[1]
        h = _ln(t, blk.norm1)
        w, bias = a.qkv.weight, a.qkv.bias
        qm = h @ w[:D].t() + bias[:D]  # queries: every token
        km = h[:, Q:] @ w[D:2 * D].t() + bias[D:2 * D]  # keys / values: original tokens only
        vm = h[:, Q:] @ w[2 * D:].t() + bias[2 * D:]
        qh = qm.view(B, T, H, hd).transpose(1, 2)
        kh = km.view(B, T - Q, H, hd).transpose(1, 2)
        vh = vm.view(B, T - Q, H, hd).transpose(1, 2)
        if not isinstance(a.q_norm, torch.nn.Identity):
            qh, kh = _ln(qh, a.q_norm), _ln(kh, a.k_norm)
        att = torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(hd), dim=-1)
        o = (att @ vh).transpose(1, 2).reshape(B, T, D)
        t = t + (o @ a.proj.weight.t() + a.proj.bias)
        h2 = _ln(t, blk.norm2)
        m = F.gelu(h2 @ blk.mlp.fc1.weight.t() + blk.mlp.fc1.bias) @ blk.mlp.fc2.weight.t() + blk.mlp.fc2.bias
        t = t + m
        q_outs.append(t[:, :Q])
        t_x = t[:, Q:]
        hidden.append(t_x)
    final = model.norm(t_x)
    if model.global_pool == "token":
        pooled = final[:, 0]
    else:  # 'avg': mean over the non-prefix tokens, then fc_norm
        pooled = model.fc_norm(final[:, model.num_prefix_tokens:].mean(dim=1))
    pieces = [pooled] + [q.reshape(B, -1) for q in q_outs]
    feats = torch.cat([p / p.norm(dim=1, keepdim=True).clamp_min(1e-12) for p in pieces], dim=1)
    return feats @ head_w.t() + head_b, q_outs, hidden


def _check_against_manual(model, x, Q):
    model.eval()
    inj = _vqt(model, num_queries=Q)
    E = inj.query_prompt_embeddings.detach().clone().requires_grad_(True)
    W = inj.head.weight.detach().clone().requires_grad_(True)
    bias = inj.head.bias.detach().clone().requires_grad_(True)
    y = inj(x)
    y_ref, _, _ = manual_vqt(inj, x, E, W, bias)
    torch.testing.assert_close(y, y_ref, atol=2e-5, rtol=1e-5)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    (y_ref * g).sum().backward()
    torch.testing.assert_close(inj.query_prompt_embeddings.grad, E.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(inj.head.weight.grad, W.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(inj.head.bias.grad, bias.grad, atol=1e-5, rtol=1e-4)
    assert E.grad.abs().sum() > 0
    return inj


# ----------------------------------------------------------------------------------------------
# Parameters, names, init
# ----------------------------------------------------------------------------------------------

def test_param_count_vit_b16():
    """ViT-B/16, Q=1, 100 classes: 12*1*768 = 9,216 query params + head 768*13*100 + 100."""
    with torch.device("meta"):  # shapes only: no 86 M-parameter init on CPU
        m = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=100)
        _vqt(m, num_queries=1)
    named = dict(fastpeft.trainable_parameters(m))
    assert set(named) == {"query_prompt_embeddings", "head.weight", "head.bias"}
    assert named["query_prompt_embeddings"].shape == (12, 1, 768)
    assert named["head.weight"].shape == (100, 768 * 13)
    total = sum(p.numel() for p in named.values())
    assert total == 9_216 + 768 * 13 * 100 + 100 == 1_007_716
    rows = fastpeft.summary_rows(m)
    assert rows[0]["params"] == 9_216 and rows[-1]["params"] == 998_500


@pytest.mark.parametrize("Q", QS)
def test_state_dict_names_and_init(Q):
    m = make_vit(num_classes=7)
    frozen_keys = set(m.state_dict())
    _vqt(m, num_queries=Q)
    D, L = 192, 2
    assert set(m.state_dict()) == frozen_keys | {"query_prompt_embeddings"}
    e = m.query_prompt_embeddings
    assert e.shape == (L, Q, D)
    v = math.sqrt(6 / (3 * 16 * 16 + D))
    assert e.abs().max() <= v and e.abs().max() > 0.9 * v  # uniform(-v, v)
    assert m.head.weight.shape == (7, D * (1 + L * Q))
    assert torch.all(m.head.bias == -math.log(99))
    # kaiming_normal(fan_out): std sqrt(2 / 7)
    assert abs(m.head.weight.std().item() / math.sqrt(2 / 7) - 1) < 0.1


def test_vit_b16_init_bound_is_0_0625():
    with torch.device("meta"):
        m = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=10)
    info = fastpeft.vit_info(m)
    assert math.sqrt(6 / (3 * info.patch_size[0] * info.patch_size[1] + info.embed_dim)) == 0.0625


def test_zero_head_bias_option():
    m = _vqt(make_vit(), head_bias_init="zero")
    assert torch.all(m.head.bias == 0)


# ----------------------------------------------------------------------------------------------
# The frozen path is untouched: bit-identical hidden states
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("Q", QS)
@pytest.mark.parametrize("train", [False, True])
def test_original_tokens_bit_identical(Q, train, x):
    """After every block the original tokens' hidden states equal the frozen model's bit for bit
    (the queries never act as keys/values; the concatenated GEMMs/attention give the same rows)."""
    frozen = make_vit(depth=3)
    m = _vqt(copy.deepcopy(frozen), num_queries=Q, dropout=0.5)
    frozen.train(train)
    m.train(train)
    o_ref, h1 = _block_outputs(frozen)
    o, h2 = _block_outputs(m)
    with torch.no_grad():
        frozen(x)
    m(x).sum().backward()
    assert len(o) == len(o_ref) == 3
    for a, b in zip(o, o_ref):
        assert a.shape == b.shape
        assert torch.equal(a, b)


def test_original_tokens_bit_identical_vit_b_width():
    """The same at ViT-B/16 width and token count (768 wide, 197 tokens; 2 blocks, batch 3)."""
    frozen = make_vit("vit_base_patch16_224", depth=2, img_size=224).eval()
    m = _vqt(copy.deepcopy(frozen), num_queries=1).eval()
    xb = images(batch=3, img_size=224)
    o_ref, _ = _block_outputs(frozen)
    o, _ = _block_outputs(m)
    with torch.no_grad():
        frozen(xb)
        m(xb)
    assert all(torch.equal(a, b) for a, b in zip(o, o_ref))


# ----------------------------------------------------------------------------------------------
# Against the independent formulation (eval, fp32)
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("Q", QS)
@pytest.mark.parametrize("fused", [True, False])
def test_matches_manual_formulation(Q, fused, x):
    m = make_vit(depth=2)
    for blk in m.blocks:
        blk.attn.fused_attn = fused  # SDPA and the explicit softmax path of timm's Attention
    _check_against_manual(m, x, Q)


def test_query_outputs_and_hidden_states_match_manual(x):
    m = _vqt(make_vit(depth=2), num_queries=2).eval()
    got, _ = _block_outputs(m)
    with torch.no_grad():
        feats = m.forward_head(m.forward_features(x), pre_logits=True)
        _, q_outs, hidden = manual_vqt(m, x, m.query_prompt_embeddings, m.head.weight, m.head.bias)
    for a, b in zip(got, hidden):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # features: 1 + L*... pieces of D (pooled) and Q*D (each layer), each of unit norm
    D = 192
    assert feats.shape == (2, D * (1 + 2 * 2))
    norms = [feats[:, :D].norm(dim=1)] + [feats[:, D + i * 2 * D: D + (i + 1) * 2 * D].norm(dim=1) for i in range(2)]
    for n in norms:
        torch.testing.assert_close(n, torch.ones(2))
    torch.testing.assert_close(feats[:, D:3 * D], F.normalize(q_outs[0].flatten(1), dim=1), atol=1e-5, rtol=1e-5)


def _injected_and_frozen_block_outputs(m, x, num_queries):
    """The blocks' outputs of m injected with VQT (checked against the manual formulation) and of
    a frozen copy, on one forward each."""
    frozen = copy.deepcopy(m).eval()
    inj = _check_against_manual(m, x, num_queries)
    o_ref, _ = _block_outputs(frozen)
    o, _ = _block_outputs(inj)
    with torch.no_grad():
        frozen(x)
        inj(x)
    return o, o_ref


def test_qk_norm_model(x):
    m = make_vit("vit_small_patch16_224", depth=2, qk_norm=True)
    assert not isinstance(m.blocks[0].attn.q_norm, torch.nn.Identity)
    with torch.no_grad():  # make the qk-norm affine non-trivial
        for blk in m.blocks:
            blk.attn.q_norm.weight.uniform_(0.5, 1.5)
            blk.attn.k_norm.bias.uniform_(-0.2, 0.2)
    o, o_ref = _injected_and_frozen_block_outputs(m, x, 2)
    assert all(torch.equal(a, b) for a, b in zip(o, o_ref))


def test_register_tokens(x):
    m = make_vit(depth=2, reg_tokens=4)
    assert m.num_prefix_tokens == 5
    o, o_ref = _injected_and_frozen_block_outputs(m, x, 3)
    assert all(torch.equal(a, b) and a.shape[1] == 5 + 16 for a, b in zip(o, o_ref))


def test_avg_pool_without_cls_uses_timm_pooled_feature(x):
    m = make_vit(depth=2, class_token=False, global_pool="avg")
    assert m.cls_token is None and not isinstance(m.fc_norm, torch.nn.Identity)
    _check_against_manual(m, x, 1)


# ----------------------------------------------------------------------------------------------
# Gradients, modes
# ----------------------------------------------------------------------------------------------

def test_no_gradient_reaches_backbone(x):
    m = _vqt(make_vit(depth=2, drop_path_rate=0.1), num_queries=3).train()
    m(x).logsumexp(-1).mean().backward()
    with_grad = {n for n, p in m.named_parameters() if p.grad is not None}
    assert with_grad == {"query_prompt_embeddings", "head.weight", "head.bias"}
    assert all(not p.requires_grad for n, p in m.named_parameters() if n not in with_grad)
    assert m.query_prompt_embeddings.grad.abs().sum() > 0


def test_query_dropout_follows_model_mode(x):
    m = _vqt(make_vit(depth=2), dropout=0.5)
    m.eval()
    with torch.no_grad():
        assert torch.equal(m(x), m(x))
        m.train()
        torch.manual_seed(1)
        a = m(x)
        torch.manual_seed(2)
        b = m(x)
    assert not torch.allclose(a, b)


def test_forward_head_needs_the_same_forward(x):
    m = _vqt(make_vit(depth=2)).eval()
    with torch.no_grad():
        f = m.forward_features(x)
        m.forward_head(f)
        with pytest.raises(RuntimeError, match="query outputs"):
            m.forward_head(f)  # consumed


# ----------------------------------------------------------------------------------------------
# Lifecycle: copy, pickle, merge refusal, remove
# ----------------------------------------------------------------------------------------------

def test_deepcopy_pickle_and_remove(x):
    frozen = make_vit(depth=2).eval()
    m = copy.deepcopy(frozen)
    orig_head = m.head
    _vqt(m, num_queries=2)
    m.eval()
    with torch.no_grad():
        y = m(x)
        assert torch.equal(copy.deepcopy(m)(x), y)
        buf = io.BytesIO()
        torch.save(m, buf)
        buf.seek(0)
        assert torch.equal(torch.load(buf, weights_only=False)(x), y)
    with pytest.raises(ValueError, match="VQT"):
        fastpeft.merge(m)
    fastpeft.remove(m)
    assert m.head is orig_head
    assert "forward_head" not in m.__dict__
    assert not any(isinstance(b, PetlBlock) for b in m.blocks)
    assert set(m.state_dict()) == set(frozen.state_dict())
    with torch.no_grad():
        assert torch.equal(m(x), frozen(x))


# ----------------------------------------------------------------------------------------------
# Bad input: ValueError, model unchanged
# ----------------------------------------------------------------------------------------------

def _snapshot(m):
    return (set(m.state_dict()), m.head, type(m.blocks[0]), "forward_head" in m.__dict__, "_fastpeft" in m.__dict__)


@pytest.mark.parametrize("kw", [dict(num_queries=0), dict(num_queries=-1), dict(num_queries=1.5),
                                dict(num_queries=True), dict(dropout=1.0), dict(head_bias_init="nope")])
def test_bad_config(kw):
    m = make_vit()
    before = _snapshot(m)
    with pytest.raises(ValueError):
        _vqt(m, **kw)
    assert _snapshot(m) == before


def test_needs_a_classifier():
    m = make_vit(num_classes=0)
    before = _snapshot(m)
    with pytest.raises(ValueError, match="num_classes > 0"):
        _vqt(m)
    assert _snapshot(m) == before


def _others():
    out = []
    for name, kw in [("VPT", {}), ("NOAH", {"adapter_dims": [2, 2], "prompt_lens": [1, 1]}), ("AdaptFormer", {"dim": 4})]:
        cls = getattr(fastpeft, name, None)
        if cls is not None:
            out.append(pytest.param(cls, kw, id=name))
    return out


@pytest.mark.parametrize("cls,kw", _others())
@pytest.mark.parametrize("vqt_first", [True, False])
def test_refuses_combination(cls, kw, vqt_first):
    m = make_vit()
    first, second = (fastpeft.VQT(), cls(**kw)) if vqt_first else (cls(**kw), fastpeft.VQT())
    fastpeft.inject(m, first)
    before = _snapshot(m)
    slots = [dict(b._fastpeft_slots) for b in m.blocks]
    with pytest.raises(ValueError, match="cannot be combined"):
        fastpeft.inject(m, second)
    assert _snapshot(m) == before
    assert [dict(b._fastpeft_slots) for b in m.blocks] == slots
    assert len(fastpeft.injections(m)) == 1
