"""fastpeft.load_official: official checkpoint layouts (built here from a fastpeft model with an
independently written inverse mapping) load back into a fresh model tensor for tensor."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

import fastpeft

from .conftest import make_vit

DEPTH = 2


# ----------------------------------------------------------------------------------------------
# Inverse mappings (fastpeft/timm names -> official names), written from the official sources
# ----------------------------------------------------------------------------------------------

def _split_qkv(t):
    d = t.shape[0] // 3
    return t[:d], t[d:2 * d], t[2 * d:]


def to_adaptformer(sd: dict) -> dict:
    """ShoufaChen/AdaptFormer: attn.{q,k,v}_proj, blocks.i.fc1/fc2, head.0 (BatchNorm1d) + head.1."""
    out = {}
    for k, v in sd.items():
        parts = k.split(".")
        if parts[0] == "blocks" and parts[2:4] == ["attn", "qkv"]:
            for name, piece in zip(("q_proj", "k_proj", "v_proj"), _split_qkv(v)):
                out[f"blocks.{parts[1]}.attn.{name}.{parts[4]}"] = piece.clone()
        elif parts[0] == "blocks" and parts[2] == "mlp":
            out[f"blocks.{parts[1]}.{parts[3]}.{parts[4]}"] = v
        elif parts[0] == "head":
            out[f"head.1.{parts[1]}"] = v
        else:
            out[k] = v
    d = sd["head.weight"].shape[1]
    out["head.0.running_mean"] = torch.zeros(d)
    out["head.0.running_var"] = torch.ones(d)
    out["head.0.num_batches_tracked"] = torch.tensor(0)
    return out


def to_jeonsworld(sd: dict) -> dict:
    """KMnP/vpt and andytu28/VQT: the jeonsworld ViT inside `enc.transformer.`, head `head.last_layer`."""
    T = "enc.transformer."
    L = T + "encoder.layer."
    top = {
        "pos_embed": T + "embeddings.position_embeddings",
        "cls_token": T + "embeddings.cls_token",
        "prompt_embeddings": T + "prompt_embeddings",
        "deep_prompt_embeddings": T + "deep_prompt_embeddings",
        "query_prompt_embeddings": T + "encoder.query_prompt_embeddings",
    }
    sub = {"norm1": "attention_norm", "attn.proj": "attn.out", "norm2": "ffn_norm", "mlp.fc1": "ffn.fc1",
           "mlp.fc2": "ffn.fc2", "adapter_downsample": "adapter_downsample", "adapter_upsample": "adapter_upsample"}
    out = {}
    for k, v in sd.items():
        if k in top:
            out[top[k]] = v
        elif k.startswith("patch_embed.proj."):
            out[T + "embeddings.patch_embeddings." + k.rsplit(".", 1)[1]] = v
        elif k.startswith("norm."):
            out[T + "encoder.encoder_norm." + k.rsplit(".", 1)[1]] = v
        elif k.startswith("head."):
            out["head.last_layer." + k.rsplit(".", 1)[1]] = v
        elif k.startswith("blocks."):
            _, i, rest = k.split(".", 2)
            mod, param = rest.rsplit(".", 1)
            if mod == "attn.qkv":
                for name, piece in zip(("query", "key", "value"), _split_qkv(v)):
                    out[f"{L}{i}.attn.{name}.{param}"] = piece.clone()
            else:
                out[f"{L}{i}.{sub[mod]}.{param}"] = v
        else:
            raise AssertionError(f"test inverse mapping has no rule for {k}")
    return out


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------

def _method(name: str, **kw):
    cls = getattr(fastpeft, name, None)
    if cls is None:
        pytest.skip(f"fastpeft.{name} is not available")
    return cls(**kw)


def _pair(methods_fn):
    """A source model (every tensor randomised) and a fresh target with the same methods."""
    src = make_vit(depth=DEPTH, seed=0)
    dst = make_vit(depth=DEPTH, seed=7)
    for meth in methods_fn():
        fastpeft.inject(src, meth)
    for meth in methods_fn():
        fastpeft.inject(dst, meth)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for t in src.state_dict().values():
            if t.is_floating_point():
                t.copy_(torch.randn(t.shape, generator=g))
    return src, dst


def _assert_same(src, dst):
    a, b = src.state_dict(), dst.state_dict()
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _snapshot(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def _unchanged(m, snap):
    sd = m.state_dict()
    return set(sd) == set(snap) and all(torch.equal(sd[k], snap[k]) for k in snap)


# ----------------------------------------------------------------------------------------------
# Round trips
# ----------------------------------------------------------------------------------------------

def test_adaptformer_round_trip():
    src, dst = _pair(lambda: [fastpeft.AdaptFormer(dim=4)])
    ckpt = to_adaptformer(src.state_dict())
    assert "blocks.1.attn.k_proj.weight" in ckpt and "blocks.0.fc2.bias" in ckpt and "head.1.weight" in ckpt
    with pytest.warns(UserWarning, match="BatchNorm1d.*head.0.running_mean"):
        res = fastpeft.load_official(dst, ckpt, "adaptformer")
    assert res.missing_keys == [] and res.unexpected_keys == []
    _assert_same(src, dst)


@pytest.mark.parametrize("deep", [True, False])
def test_vpt_round_trip(deep):
    src, dst = _pair(lambda: [_method("VPT", num_tokens=3, deep=deep)])
    ckpt = to_jeonsworld(src.state_dict())
    assert "enc.transformer.prompt_embeddings" in ckpt
    assert ("enc.transformer.deep_prompt_embeddings" in ckpt) == deep
    res = fastpeft.load_official(dst, ckpt, "vpt")
    assert res.missing_keys == [] and res.unexpected_keys == []
    _assert_same(src, dst)


def test_vpt_adapter_round_trip():
    src, dst = _pair(lambda: [_method("Adapter", style="vpt", dim=4, init="xavier")])
    ckpt = to_jeonsworld(src.state_dict())
    assert "enc.transformer.encoder.layer.1.adapter_upsample.weight" in ckpt
    res = fastpeft.load_official(dst, ckpt, "vpt")
    assert res.missing_keys == []
    _assert_same(src, dst)


@pytest.mark.parametrize("Q", [1, 3])
def test_vqt_round_trip(Q):
    src, dst = _pair(lambda: [fastpeft.VQT(num_queries=Q)])
    ckpt = to_jeonsworld(src.state_dict())
    assert ckpt["enc.transformer.encoder.query_prompt_embeddings"].shape == (DEPTH, Q, 192)
    assert ckpt["head.last_layer.weight"].shape == (10, 192 * (1 + DEPTH * Q))
    res = fastpeft.load_official(dst, ckpt, "vqt")
    assert res.missing_keys == []
    _assert_same(src, dst)


def test_jeonsworld_qkv_is_concatenated_in_q_k_v_order():
    src, dst = _pair(lambda: [])
    ckpt = to_jeonsworld(src.state_dict())
    fastpeft.load_official(dst, ckpt, "vpt")
    w = dst.blocks[1].attn.qkv.weight
    assert torch.equal(w[:192], ckpt["enc.transformer.encoder.layer.1.attn.query.weight"])
    assert torch.equal(w[192:384], ckpt["enc.transformer.encoder.layer.1.attn.key.weight"])
    assert torch.equal(w[384:], ckpt["enc.transformer.encoder.layer.1.attn.value.weight"])
    # conv weight is not transposed: both layouts are torch Conv2d [D, C, ph, pw]
    assert torch.equal(dst.patch_embed.proj.weight, ckpt["enc.transformer.embeddings.patch_embeddings.weight"])


@pytest.mark.parametrize("source,name,kw", [
    ("ssf", "SSF", {}),
    ("noah", "NOAH", {"adapter_dims": [2, 2], "lora_ranks": [2, 2], "prompt_lens": [1, 1]}),
    ("fact", "FacT", {}),
    ("convpass", "Convpass", {}),
])
def test_timm_named_sources_pass_through(source, name, kw):
    src, dst = _pair(lambda: [_method(name, **kw)])
    res = fastpeft.load_official(dst, src.state_dict(), source)
    assert res.missing_keys == [] and res.unexpected_keys == []
    _assert_same(src, dst)


def test_petl_only_checkpoint_reports_missing_backbone_keys():
    src, dst = _pair(lambda: [fastpeft.VQT()])
    ckpt = {k: v for k, v in to_jeonsworld(src.state_dict()).items()
            if "query_prompt" in k or k.startswith("head.")}
    backbone = {k: v.clone() for k, v in dst.state_dict().items() if k not in ("query_prompt_embeddings", "head.weight", "head.bias")}
    res = fastpeft.load_official(dst, ckpt, "vqt")
    assert set(res.missing_keys) == set(backbone) and res.unexpected_keys == []
    assert torch.equal(dst.query_prompt_embeddings, src.query_prompt_embeddings)
    assert all(torch.equal(dst.state_dict()[k], v) for k, v in backbone.items())


def test_wrapped_checkpoint():
    src, dst = _pair(lambda: [fastpeft.VQT()])
    fastpeft.load_official(dst, {"model": to_jeonsworld(src.state_dict())}, "vqt")
    _assert_same(src, dst)


# ----------------------------------------------------------------------------------------------
# Errors: ValueError naming the keys, nothing loaded
# ----------------------------------------------------------------------------------------------

def test_unknown_source():
    with pytest.raises(ValueError, match="unknown checkpoint source 'lora'.*adaptformer"):
        fastpeft.load_official(make_vit(), {}, "lora")


def test_keys_that_map_nowhere():
    src, dst = _pair(lambda: [])
    snap = _snapshot(dst)
    ckpt = to_jeonsworld(src.state_dict())
    ckpt["enc.side_projection.weight"] = torch.zeros(3)
    ckpt["enc.transformer.encoder.layer.0.attn.foo.weight"] = torch.zeros(3)
    ckpt["enc.transformer.encoder.layer.5.ffn_norm.weight"] = torch.zeros(192)  # block 5 of a 2-block model
    with pytest.raises(ValueError) as e:
        fastpeft.load_official(dst, ckpt, "vpt")
    msg = str(e.value)
    for k in ("enc.side_projection.weight", "layer.0.attn.foo.weight", "blocks.5.norm2.weight"):
        assert k in msg
    assert _unchanged(dst, snap)


def test_method_tensors_without_the_method_injected():
    src, _ = _pair(lambda: [fastpeft.VQT()])
    dst = make_vit(depth=DEPTH, seed=7)
    snap = _snapshot(dst)
    with pytest.raises(ValueError, match=r"query_prompt_embeddings.*inject the method first"):
        fastpeft.load_official(dst, to_jeonsworld(src.state_dict()), "vqt")
    assert _unchanged(dst, snap)


def test_shape_mismatch():
    src, _ = _pair(lambda: [fastpeft.VQT(num_queries=2)])
    dst = fastpeft.inject(make_vit(depth=DEPTH, seed=7), fastpeft.VQT(num_queries=1))
    snap = _snapshot(dst)
    with pytest.raises(ValueError) as e:
        fastpeft.load_official(dst, to_jeonsworld(src.state_dict()), "vqt")
    msg = str(e.value)
    assert "'enc.transformer.encoder.query_prompt_embeddings' -> 'query_prompt_embeddings'" in msg
    assert "(2, 2, 192) != model shape (2, 1, 192)" in msg
    assert "'head.last_layer.weight' -> 'head.weight'" in msg
    assert _unchanged(dst, snap)


def test_adaptformer_incomplete_qkv():
    src, dst = _pair(lambda: [fastpeft.AdaptFormer(dim=4)])
    snap = _snapshot(dst)
    ckpt = to_adaptformer(src.state_dict())
    del ckpt["blocks.1.attn.v_proj.bias"]
    with pytest.raises(ValueError, match=r"block 1 .*no v_proj bias"), warnings.catch_warnings():
        warnings.simplefilter("error")  # the BatchNorm warning comes only once loading goes ahead
        fastpeft.load_official(dst, ckpt, "adaptformer")
    assert _unchanged(dst, snap)


def test_pass_through_validates_too():
    src, dst = _pair(lambda: [])
    snap = _snapshot(dst)
    ckpt = copy.copy(src.state_dict())
    ckpt["blocks.0.adapter_attn.adapter_down.weight"] = torch.zeros(8, 192)  # Convpass not injected
    ckpt["head.weight"] = torch.zeros(3, 192)
    with pytest.raises(ValueError) as e:
        fastpeft.load_official(dst, ckpt, "convpass")
    assert "adapter_down.weight" in str(e.value) and "'head.weight': checkpoint shape (3, 192)" in str(e.value)
    assert _unchanged(dst, snap)
