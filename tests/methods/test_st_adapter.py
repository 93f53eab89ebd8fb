"""ST-Adapter (fastpeft.STAdapter) on timm ViTs, CLIP-style included, over video clips.

The reference recomputes the video model with plain tensor ops: frames as a batch, each block
written out (LayerNorm, attention, MLP with the model's own activation), the adapter's depthwise
temporal conv as an explicit sum of the taps over zero-padded neighbouring frames, the class
token passed through, then the official head: the mean over frames of the pre-norm class tokens,
the final LayerNorm and the linear head."""
from __future__ import annotations

import copy
import pickle

import pytest
import timm
import torch
import torch.nn.functional as F

import fastpeft
from fastpeft import STAdapter

from .test_adapter import _attn, _ln


def _mlp(blk, h):
    m = blk.mlp
    return F.linear(m.act(F.linear(h, m.fc1.weight, m.fc1.bias)), m.fc2.weight, m.fc2.bias)


def adapter_ref(mod, x, T):
    """x [B*T, 1 + N, D] -> x with patch tokens + fc2(temporal conv(fc1(patches)))."""
    BT, L, D = x.shape
    B = BT // T
    u = F.linear(x[:, 1:], mod.fc1.weight, mod.fc1.bias).reshape(B, T, L - 1, -1)
    k = mod.conv.weight.shape[2]
    w = mod.conv.weight.reshape(-1, k)  # [C, k]
    c = mod.conv.bias.expand_as(u).clone()
    for j in range(k):
        off = j - k // 2  # tap j reads frame t + off (zero outside the clip)
        for t in range(T):
            if 0 <= t + off < T:
                c[:, t] = c[:, t] + u[:, t + off] * w[:, j]
    v = F.linear(c.reshape(BT, L - 1, -1), mod.fc2.weight, mod.fc2.bias)
    return torch.cat([x[:, :1], x[:, 1:] + v], 1)


def video_ref(model, clips, adapted=True):
    B, T = clips.shape[:2]
    x = model.norm_pre(model._pos_embed(model.patch_embed(clips.flatten(0, 1))))
    for blk in model.blocks:
        if adapted and hasattr(blk, "adapter_pre_attn"):
            x = adapter_ref(blk.adapter_pre_attn, x, T)
        y = x + _attn(blk, _ln(x, blk.norm1))
        if adapted and hasattr(blk, "adapter_pre_mlp"):
            y = adapter_ref(blk.adapter_pre_mlp, y, T)
        x = y + _mlp(blk, _ln(y, blk.norm2))
    cls = x[:, 0].reshape(B, T, -1).mean(1)
    return F.linear(_ln(cls, model.norm), model.head.weight, model.head.bias)


def _clip_vit(depth=2, img=64, seed=0, name="vit_base_patch16_clip_quickgelu_224", **kw):
    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False, num_classes=7, depth=depth, img_size=img, **kw)


def _clips(B=2, T=4, img=64, seed=1):
    return torch.randn(B, T, 3, img, img, generator=torch.Generator().manual_seed(seed))


def _dead(model, name):
    """The last block's pre-MLP adapter: it changes only patch tokens, after which the block's
    MLP is per-token and the head reads the class tokens, so it gets no gradient (officially too:
    the released 12x384 model's last adapter never trains)."""
    return name.startswith(f"blocks.{len(model.blocks) - 1}.adapter_pre_mlp.")


def _randomize(model, seed=5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".adapter_pre_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


# ------------------------------------------------------------------------------------------------
# counts, names, trainable set
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("positions, total", [(("mlp",), 7_110_144), (("attn", "mlp"), 14_220_288)])
def test_clip_vit_b16_counts_and_names(positions, total):
    with torch.device("meta"):
        m = timm.create_model("vit_base_patch16_clip_quickgelu_224", pretrained=False, num_classes=400)
    fastpeft.inject(m, STAdapter(width=384, positions=positions, frames=8))
    named = dict(m.named_parameters())
    ad = {n: p for n, p in named.items() if ".adapter_pre_" in n}
    assert sum(p.numel() for p in ad.values()) == total
    assert sum(p.numel() for n, p in ad.items() if n.startswith("blocks.3.adapter_pre_mlp.")) == 592_512
    shapes = {n.split("adapter_pre_mlp.")[1]: tuple(p.shape) for n, p in ad.items() if n.startswith("blocks.0.adapter_pre_mlp.")}
    assert shapes == {"fc1.weight": (384, 768), "fc1.bias": (384,), "conv.weight": (384, 1, 3, 1, 1),
                      "conv.bias": (384,), "fc2.weight": (768, 384), "fc2.bias": (768,)}
    trainable = {n for n, _ in fastpeft.trainable_parameters(m)}
    assert trainable == set(ad) | {"head.weight", "head.bias"}  # the final norm (ln_post) stays frozen
    assert fastpeft.summary_rows(m)[0]["params"] == total


def test_layers_places_adapters_in_the_last_blocks():
    with torch.device("meta"):
        m = timm.create_model("vit_base_patch16_clip_quickgelu_224", pretrained=False, num_classes=4)
    fastpeft.inject(m, STAdapter(positions=("attn",), layers=3))
    assert [i for i, b in enumerate(m.blocks) if hasattr(b, "adapter_pre_attn")] == [9, 10, 11]


# ------------------------------------------------------------------------------------------------
# zero init: exactly the frozen model
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["vit_base_patch16_clip_quickgelu_224", "vit_tiny_patch16_224"])
def test_zero_init_equals_frozen_model(name):
    m = _clip_vit(name=name)
    clips = _clips()
    frozen = copy.deepcopy(m).eval()
    fastpeft.inject(m, STAdapter(width=16, positions=("attn", "mlp"), frames=4))
    m.eval()
    with torch.no_grad():
        B, T = clips.shape[:2]
        x = frozen.blocks(frozen.norm_pre(frozen._pos_embed(frozen.patch_embed(clips.flatten(0, 1)))))
        want = frozen.head(frozen.norm(x[:, 0].reshape(B, T, -1).mean(1)))
        assert torch.equal(m(clips), want)
    # at step 0 only conv.* and fc2.bias get gradients (the zero conv gates fc1 and fc2.weight);
    # the last block's pre-MLP adapter never does (_dead)
    m(clips).square().sum().backward()
    g = {n: p.grad for n, p in m.named_parameters() if ".adapter_pre_" in n}
    for n, t in g.items():
        live = (".conv." in n or n.endswith("fc2.bias")) and not _dead(m, n)
        assert (t.abs().max() > 0) == live, n


# ------------------------------------------------------------------------------------------------
# forward and every trainable gradient against the independent formulation
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("positions, T, kt, B", [(("mlp",), 4, 3, 2), (("attn", "mlp"), 3, 3, 1),
                                                (("attn",), 5, 5, 2), (("mlp",), 1, 3, 3)])
def test_matches_reference(positions, T, kt, B):
    m = _clip_vit(embed_dim=64, num_heads=2)
    fastpeft.inject(m, STAdapter(width=24, positions=positions, frames=T, temporal_kernel=kt))
    _randomize(m)
    m.eval()
    clips = _clips(B=B, T=T)
    out = m(clips)
    ref = video_ref(m, clips)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    names, params = zip(*fastpeft.trainable_parameters(m))
    got = torch.autograd.grad((out * w).sum(), params)
    want = torch.autograd.grad((ref * w).sum(), params)
    for n, a, b in zip(names, got, want):
        assert (b.abs().max() > 0) != _dead(m, n), n
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda s, n=n: f"{n}: {s}")


def test_remove_restores_and_copies():
    m = _clip_vit(name="vit_tiny_patch16_224").eval()
    img = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        plain = m(img)
    keys = set(m.state_dict())
    fastpeft.inject(m, STAdapter(width=8, frames=2))
    _randomize(m)
    clips = _clips(B=1, T=2)
    with torch.no_grad():
        out = m(clips)
        torch.testing.assert_close(copy.deepcopy(m)(clips), out, rtol=0, atol=0)
        torch.testing.assert_close(pickle.loads(pickle.dumps(m))(clips), out, rtol=0, atol=0)
    fastpeft.remove(m)
    assert set(m.state_dict()) == keys and "forward" not in m.__dict__
    with torch.no_grad():
        torch.testing.assert_close(m(img), plain, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------
def test_bad_input_and_configs():
    m = _clip_vit(name="vit_tiny_patch16_224")
    fastpeft.inject(m, STAdapter(width=8, frames=4))
    with pytest.raises(ValueError, match="injected for clips of 4 frames, got 3"):
        m(_clips(T=3))
    with pytest.raises(ValueError, match=r"takes clips \[B, T=4, C, H, W\]"):
        m(torch.randn(2, 3, 64, 64))
    with pytest.raises(ValueError, match="4 frames per clip; 6 frames"):
        m.blocks[0].adapter_pre_mlp(torch.randn(6, 17, 192))
    with pytest.raises(ValueError, match="patch grid"):
        m.blocks[0].adapter_pre_mlp(torch.randn(4, 10, 192))
    fresh = _clip_vit(name="vit_tiny_patch16_224", depth=1)
    for kw, msg in [(dict(positions=("ffn",)), "positions"), (dict(positions=()), "positions"),
                    (dict(positions=("mlp", "mlp")), "positions"), (dict(width=0), "width"),
                    (dict(frames=0), "frames"), (dict(frames=2.0), "integer"), (dict(temporal_kernel=2), "odd"),
                    (dict(layers=2), "depth")]:
        with pytest.raises(ValueError, match=msg):
            fastpeft.inject(fresh, STAdapter(**kw))
    assert fastpeft.injections(fresh) == []
    gap = _clip_vit(name="vit_tiny_patch16_224", depth=1, global_pool="avg")
    with pytest.raises(ValueError, match="class token"):
        fastpeft.inject(gap, STAdapter())
    fastpeft.inject(fresh, STAdapter(width=8))
    with pytest.raises(ValueError, match="cannot be combined"):
        fastpeft.inject(fresh, fastpeft.VPT(num_tokens=2))
    with pytest.raises(ValueError, match="cannot merge"):
        fastpeft.merge(fresh)


def test_load_official_names():
    m = _clip_vit(embed_dim=64, num_heads=2)
    fastpeft.inject(m, STAdapter(width=8, positions=("attn", "mlp"), frames=2))
    own = m.state_dict()
    official = {"class_embedding": torch.randn(64), "positional_embedding": torch.randn(17, 64),
                "conv1.weight": torch.randn(64, 3, 16, 16), "ln_post.weight": torch.randn(64),
                "proj": torch.randn(64, 32), "fc.weight": torch.randn(7, 64), "fc.bias": torch.randn(7),
                "transformer.resblocks.1.attn.in_proj_weight": torch.randn(192, 64),
                "transformer.resblocks.1.mlp.c_proj.bias": torch.randn(64)}
    for p in ("attn", "mlp"):
        for n in ("fc1.weight", "fc1.bias", "conv.weight", "conv.bias", "fc2.weight", "fc2.bias"):
            official[f"transformer.resblocks.0.adapter_pre_{p}.{n}"] = torch.randn(own[f"blocks.0.adapter_pre_{p}.{n}"].shape)
    with pytest.warns(UserWarning, match="proj"):
        fastpeft.load_official(m, official, "st_adapter")
    sd = m.state_dict()
    assert torch.equal(sd["cls_token"].flatten(), official["class_embedding"])
    assert torch.equal(sd["pos_embed"][0], official["positional_embedding"])
    assert torch.equal(sd["head.weight"], official["fc.weight"])
    assert torch.equal(sd["blocks.1.attn.qkv.weight"], official["transformer.resblocks.1.attn.in_proj_weight"])
    assert torch.equal(sd["blocks.0.adapter_pre_mlp.conv.weight"],
                       official["transformer.resblocks.0.adapter_pre_mlp.conv.weight"])
    with pytest.raises(ValueError, match="no st_adapter mapping"):
        fastpeft.load_official(m, {"transformer.resblocks.0.adapter_pre_ffn.fc1.weight": torch.zeros(1)}, "st_adapter")
