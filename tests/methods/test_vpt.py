"""VPT shallow/deep (fastpeft.VPT), spec §8.

The reference builds the token sequence explicitly -- [prefix, prompts, patches], deep prompts
replacing positions P..P+p-1 before blocks 1..L-1, prompts removed at the end -- and recomputes the
blocks with plain tensor ops from the same parameters.
"""
from __future__ import annotations

import copy
import io
import math

import pytest
import torch

import fastpeft
from fastpeft import VPT
from fastpeft.methods.base import PetlBlock

from .conftest import (assert_matches_formulation, assert_merge_refused, assert_train_forward_deterministic,
                       load_official_state_dict, make_vit)
from .test_adapter import _attn, _head, _ln, _mlp, _snapshot


def reference_tokens(model, img, deep, p):
    """Final hidden states with the prompts removed: [B, P + M, D]."""
    P = model.num_prefix_tokens
    B = img.shape[0]
    x = model.norm_pre(model._pos_embed(model.patch_embed(img)))
    x = torch.cat([x[:, :P], model.prompt_embeddings.expand(B, -1, -1), x[:, P:]], 1)
    for i, blk in enumerate(model.blocks):
        if deep and i > 0:
            x = torch.cat([x[:, :P], model.deep_prompt_embeddings[i - 1].expand(B, -1, -1), x[:, P + p:]], 1)
        y = x + _attn(blk, _ln(x, blk.norm1))
        x = y + _mlp(blk, _ln(y, blk.norm2))
    return torch.cat([x[:, :P], x[:, P + p:]], 1)


def _check(model, img, deep, p):
    model.eval()
    out = model(img)
    ref = _head(model, reference_tokens(model, img, deep, p)) if model.num_classes else \
        model.fc_norm(model.pool(model.norm(reference_tokens(model, img, deep, p))))
    assert_matches_formulation(model, out, ref)


# ------------------------------------------------------------------------------------------
# 1-2. counts, init, head
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("deep,count", [(True, 92_160), (False, 7_680)])
def test_vit_b16_counts_init_and_freezing(deep, count):
    model = make_vit("vit_base_patch16_224", depth=12, img_size=224, num_classes=10)
    fastpeft.inject(model, VPT(num_tokens=10, deep=deep))
    method = {n for n in ("prompt_embeddings", "deep_prompt_embeddings") if hasattr(model, n)}
    assert sum(model.get_parameter(n).numel() for n in method) == count  # 9,216 p deep, 768 p shallow
    assert {n for n, p in model.named_parameters() if p.requires_grad} == method | {"head.weight", "head.bias"}
    assert model.prompt_embeddings.shape == (1, 10, 768)
    if deep:
        assert model.deep_prompt_embeddings.shape == (11, 10, 768)
    v = math.sqrt(6 / (3 * 16 * 16 + 768))
    assert v == 0.0625
    for n in method:
        e = model.get_parameter(n)
        assert e.abs().max() <= v and e.abs().max() > 0.99 * v and abs(e.mean().item()) < 0.01


def test_head_init_vpt_and_keep():
    model = make_vit(depth=1, num_classes=50)
    fastpeft.inject(model, VPT())
    assert torch.all(model.head.bias == -math.log(99))
    std = model.head.weight.std().item()  # kaiming_normal fan_out: sqrt(2 / 50)
    assert abs(std - math.sqrt(2 / 50)) < 0.05 * math.sqrt(2 / 50)
    model = make_vit(depth=1, num_classes=50)
    before = {k: v.clone() for k, v in model.head.state_dict().items()}
    fastpeft.inject(model, VPT(head_init="keep"))
    assert all(torch.equal(before[k], v) for k, v in model.head.state_dict().items())


def test_init_bound_uses_model_patch_and_channels():
    model = make_vit(depth=1, patch_size=8, in_chans=1)
    fastpeft.inject(model, VPT(num_tokens=50))
    v = math.sqrt(6 / (1 * 8 * 8 + 192))
    assert model.prompt_embeddings.abs().max() <= v and model.prompt_embeddings.abs().max() > 0.98 * v


# ------------------------------------------------------------------------------------------
# 3. forward and gradients; train mode
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("deep,p", [(True, 3), (False, 3), (True, 1)])
def test_forward_and_grads_match_reference(deep, p, x):
    model = make_vit(depth=3)
    fastpeft.inject(model, VPT(num_tokens=p, deep=deep))
    _check(model, x, deep, p)


def test_sequence_layout_seen_by_blocks(x):
    """Each block sees P + p + M tokens with the prompts right after the CLS token; the final norm
    sees P + M."""
    model = make_vit(depth=3).eval()
    fastpeft.inject(model, VPT(num_tokens=4))
    seen = []
    for blk in model.blocks:
        blk.norm1.register_forward_hook(lambda m, i, o: seen.append(i[0]))
    model.norm.register_forward_hook(lambda m, i, o: seen.append(i[0]))
    model(x)
    assert [t.shape[1] for t in seen] == [21, 21, 21, 17]
    torch.testing.assert_close(seen[1][:, 1:5], model.deep_prompt_embeddings[0].expand(2, -1, -1))
    torch.testing.assert_close(seen[0][:, 1:5], model.prompt_embeddings.expand(2, -1, -1))


def test_prompt_dropout_follows_model_mode(x):
    model = make_vit(depth=2)
    fastpeft.inject(model, VPT(num_tokens=5, dropout=0.5))
    model.train()
    torch.manual_seed(0)
    a = model(x)
    torch.manual_seed(1)
    assert not torch.allclose(a, model(x))
    # VPT's own regime: backbone in eval, prompt dropout still on (owner = the model)
    model.blocks.eval()
    torch.manual_seed(1)
    b = model(x)
    torch.manual_seed(2)
    assert not torch.allclose(b, model(x))
    model.eval()
    torch.testing.assert_close(model(x), _head(model, reference_tokens(model, x, True, 5)), rtol=1e-5, atol=1e-5)
    # no dropout: the train-mode forward is deterministic (the randomness above was the prompts')
    m2 = make_vit(depth=2)
    fastpeft.inject(m2, VPT(num_tokens=5, dropout=0.0))
    assert_train_forward_deterministic(m2, x)


# ------------------------------------------------------------------------------------------
# 4. gradient routing
# ------------------------------------------------------------------------------------------

def test_grads_reach_only_trainable(x):
    model = make_vit(depth=3)
    fastpeft.inject(model, VPT(num_tokens=2))
    model(x).sum().backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, n
    # the last block's prompt outputs are discarded, yet its input prompts reach the CLS token
    assert torch.count_nonzero(model.deep_prompt_embeddings.grad[-1]) > 0


# ------------------------------------------------------------------------------------------
# 5. registers / avg pool / no head; copy and pickle
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("deep", [True, False])
def test_register_tokens_avg_pool_no_head(deep, x):
    model = make_vit("vit_small_patch16_224", depth=2, reg_tokens=4, class_token=True,
                     global_pool="avg", num_classes=0)
    fastpeft.inject(model, VPT(num_tokens=3, deep=deep))
    _check(model, x, deep, 3)


def test_register_tokens_token_pool(x):
    model = make_vit("vit_small_patch16_224", depth=2, reg_tokens=4, class_token=True)
    fastpeft.inject(model, VPT(num_tokens=3))
    _check(model, x, True, 3)


def test_deepcopy_and_pickle(x):
    model = make_vit(depth=2).eval()
    fastpeft.inject(model, VPT(num_tokens=3))
    out = model(x)
    clone = copy.deepcopy(model)
    with torch.no_grad():
        clone.prompt_embeddings.add_(1.0)  # the clone's slots must read the clone's prompts
    assert torch.equal(model(x), out) and not torch.allclose(clone(x), out)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    assert torch.equal(torch.load(buf, weights_only=False)(x), out)


# ------------------------------------------------------------------------------------------
# 6. bad configs, merge
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg,needle", [
    (dict(num_tokens=0), "num_tokens"), (dict(num_tokens=-2), "num_tokens"), (dict(num_tokens=2.0), "num_tokens"),
    (dict(deep="yes"), "deep"), (dict(dropout=1.0), "dropout"), (dict(head_init="zero"), "head_init"),
])
def test_bad_config_raises_and_leaves_model_unchanged(cfg, needle):
    model = make_vit(depth=2)
    before = _snapshot(model)
    with pytest.raises(ValueError, match=needle):
        fastpeft.inject(model, VPT(**cfg))
    assert _snapshot(model) == before
    assert not any(isinstance(b, PetlBlock) for b in model.blocks)


def test_twice_refused_and_merge_refused():
    model = make_vit(depth=2)
    fastpeft.inject(model, VPT())
    before = _snapshot(model)
    with pytest.raises(ValueError, match="VPT"):
        fastpeft.inject(model, VPT(deep=False))
    assert _snapshot(model) == before
    assert_merge_refused(model, "VPT: .*extra tokens")


# ------------------------------------------------------------------------------------------
# 7. official state dict (timm layout of enc.transformer.{prompt,deep_prompt}_embeddings)
# ------------------------------------------------------------------------------------------

def test_official_state_dict_loads(x):
    model = make_vit(depth=3)
    fastpeft.inject(model, VPT(num_tokens=4))
    g = torch.Generator().manual_seed(5)
    sd = {"prompt_embeddings": torch.randn(1, 4, 192, generator=g),
          "deep_prompt_embeddings": torch.randn(2, 4, 192, generator=g)}
    load_official_state_dict(model, sd)
    assert torch.equal(model.deep_prompt_embeddings, sd["deep_prompt_embeddings"])
    _check(model, x, True, 4)
