"""Default `fastpeft.patch` on each method: same logits and gradients as the reference (fp32),
never more saved activation bytes, the same Parameter objects and state_dict names, and an exact
`unpatch`. The Triton backend is exercised through the interpreter on a one-block model."""
from __future__ import annotations

import pytest
import torch

import fastpeft
from fastpeft.profile import saved_activation_bytes
from tests.methods.conftest import images, make_vit, randomize_
from tests.patch.conftest import assert_step_close, forward_backward

# fp32 tolerances: the fused ops accumulate in a different order than the eager chain
ATOL, RTOL = 1e-5, 1e-4

CASES = {
    "ssf": lambda: fastpeft.SSF(),
    "adaptformer-parallel": lambda: fastpeft.AdaptFormer(dim=8, dropout=0.0),
    "adaptformer-sequential": lambda: fastpeft.AdaptFormer(dim=8, dropout=0.0, mode="sequential"),
    "adaptformer-learnable-scale": lambda: fastpeft.AdaptFormer(dim=8, dropout=0.0, learnable_scale=True),
    "adapter-noah": lambda: fastpeft.Adapter(dim=8, dropout=0.0),
    "adapter-vpt": lambda: fastpeft.Adapter(dim=8, style="vpt", init="lora"),
    "noah": lambda: fastpeft.NOAH(adapter_dims=[4, 8], lora_ranks=[2, 8], prompt_lens=[0, 0], dropout=0.0,
                                  lora_dropout=0.0),
    "lora-noah": lambda: fastpeft.LoRA(rank=4, dropout=0.0),
    "lora-petl-qv": lambda: fastpeft.LoRA(rank=4, targets=("q", "v"), scale=0.5, dropout=0.0),
    "fact-tt": lambda: fastpeft.FacT(kind="tt", rank=4, scale=2.0, dropout=0.0),
    "fact-tk": lambda: fastpeft.FacT(kind="tk", rank=4, scale=2.0, dropout=0.0),
    "kadaptation": lambda: fastpeft.KAdaptation(init="trainable", dropout=0.0),
    "convpass": lambda: fastpeft.Convpass(dim=8, scale=2.0, dropout=0.0),
}


def build(case: str, **kw):
    m = make_vit(**kw)
    fastpeft.inject(m, CASES[case]())
    randomize_([p for _, p in fastpeft.trainable_parameters(m)])
    return m.train()


run = forward_backward


@pytest.mark.parametrize("case", sorted(CASES))
def test_patch_matches_reference(case):
    m, x = build(case), images()
    out0, g0 = run(m, x)
    params = {n: p for n, p in m.named_parameters()}
    keys = list(m.state_dict())
    report = fastpeft.patch(m, backend="torch")
    assert report, str(report)
    if case == "kadaptation":  # the one CPU low-rank fusion: H folded into the frozen qkv weight
        assert "folded into the frozen weight" in str(report), str(report)
    elif case != "ssf":
        assert "CPU path: the eager reference" in str(report)  # speed fusions are Triton-only
    assert all(p is params[n] for n, p in m.named_parameters())
    assert list(m.state_dict()) == keys
    assert_step_close(m, x, out0, g0, ATOL, RTOL)
    fastpeft.unpatch(m)
    out2, g2 = run(m, x)
    assert torch.equal(out2, out0)
    assert all(torch.equal(g2[n], g0[n]) for n in g0)


@pytest.mark.parametrize("case", sorted(CASES))
def test_patch_never_saves_more(case):
    # 197 tokens: low-rank ops keep their effective [R, D] factors (parameter-sized, independent
    # of batch and tokens); a toy 17-token input would let those dominate the comparison
    m, x = build(case, img_size=224), images(batch=2, img_size=224)
    ref = saved_activation_bytes(lambda: m(x).sum(), exclude=[m])
    fastpeft.patch(m, backend="torch")
    fused = saved_activation_bytes(lambda: m(x).sum(), exclude=[m])
    assert fused <= ref


# training dropout on (the kernels regenerate masks from a seed; KAdaptation's dropout acts on
# the D x D matrix H and takes its dense path)
DROPOUT_CASES = {
    "adaptformer": lambda: fastpeft.AdaptFormer(dim=16, dropout=0.1),
    "adapter-noah": lambda: fastpeft.Adapter(dim=8, dropout=0.1),
    "lora-noah": lambda: fastpeft.LoRA(rank=8, dropout=0.1),
    "fact-tt": lambda: fastpeft.FacT(kind="tt", rank=8, dropout=0.1),
    "fact-tk": lambda: fastpeft.FacT(kind="tk", rank=8, dropout=0.1),
    "kadaptation": lambda: fastpeft.KAdaptation(init="trainable", dropout=0.1),
    "convpass": lambda: fastpeft.Convpass(dim=8, dropout=0.1),
}


@pytest.mark.parametrize("case", sorted(DROPOUT_CASES))
def test_triton_path_never_saves_more(case):
    # What the GPU runs (the Triton kernels, here through the interpreter) at 197 tokens, two
    # blocks (the first block's input needs no grad, the second's does). KAdaptation at ViT-B
    # width: its dense path's D x D intermediates weigh as they do in the bench.
    m = make_vit("vit_base_patch16_224" if case == "kadaptation" else "vit_tiny_patch16_224", depth=2, img_size=224)
    fastpeft.inject(m, DROPOUT_CASES[case]())
    m.train()
    x = images(batch=2, img_size=224)
    ref = saved_activation_bytes(lambda: m(x).sum(), exclude=[m])
    report = fastpeft.patch(m, backend="triton")
    assert "[triton]" in str(report), str(report)
    fused = saved_activation_bytes(lambda: m(x).sum(), exclude=[m])
    assert fused <= ref, (fused / ref, fused, ref)


def test_ssf_fusion_saves_at_most_three_quarters_at_base_width():
    # ViT-B/16 width and token count (2 blocks to stay fast): the issue's <= 0.75x SSF target
    m = make_vit("vit_base_patch16_224", depth=2, img_size=224)
    fastpeft.inject(m, fastpeft.SSF())
    m.train()
    x = images(batch=2, img_size=224)
    ref = saved_activation_bytes(lambda: m(x).sum(), exclude=[m])
    report = fastpeft.patch(m, backend="torch")
    assert "LayerNorm + SSF" in str(report) and "fc1 -> SSF -> GELU" in str(report)
    fused = saved_activation_bytes(lambda: m(x).sum(), exclude=[m])
    assert fused <= 0.75 * ref, (fused, ref)


def test_recompute_on_top_of_fusion_is_exact_and_small():
    m, x = build("ssf"), images()
    ref_bytes = saved_activation_bytes(lambda: m(x).sum(), exclude=[m])
    out0, g0 = run(m, x)
    fastpeft.patch(m, backend="torch", recompute=True)
    assert_step_close(m, x, out0, g0, ATOL, RTOL)
    assert saved_activation_bytes(lambda: m(x).sum(), exclude=[m]) <= 0.4 * ref_bytes


@pytest.mark.parametrize("case", ["ssf", "adaptformer-parallel", "adapter-noah", "lora-noah", "lora-petl-qv",
                                  "fact-tt", "fact-tk", "kadaptation", "convpass"])
def test_triton_backend_through_the_interpreter(case):
    m, x = build(case, depth=1, img_size=32), images(batch=1, img_size=32)
    out0, g0 = run(m, x)
    report = fastpeft.patch(m, backend="triton")
    assert report.backend == "triton"
    assert_step_close(m, x, out0, g0, ATOL, RTOL)


def test_train_mode_dropout_is_active_in_fused_adapter():
    m = make_vit()
    fastpeft.inject(m, fastpeft.AdaptFormer(dim=8, dropout=0.5))
    randomize_([p for _, p in fastpeft.trainable_parameters(m)], std=0.5)
    fastpeft.patch(m, backend="torch")
    x = images()
    m.train()
    a, b = m(x), m(x)
    assert not torch.equal(a, b)
    m.eval()
    assert torch.equal(m(x), m(x))


def test_linear_probe_head_saves_pooled_features_only_and_recompute_adds_nothing():
    m = make_vit()
    fastpeft.inject(m, fastpeft.LinearProbe())
    m.train()
    x = images()
    tokens = 1 + (64 // 16) ** 2
    ref = saved_activation_bytes(lambda: m(x).sum(), exclude=[m])
    out0 = m(x)
    report = fastpeft.patch(m, backend="torch")
    assert "head" in str(report)
    compact = saved_activation_bytes(lambda: m(x).sum(), exclude=[m])
    assert compact * tokens <= ref  # [B, D] instead of the [B, N, D] token tensor
    # (the last block computes the class token's row only: the same math on fewer rows)
    torch.testing.assert_close(m(x), out0, atol=ATOL, rtol=RTOL)
    # nothing in the blocks needs a gradient: selective recompute must not keep anything there
    fastpeft.patch(m, backend="torch", recompute=True)
    assert saved_activation_bytes(lambda: m(x).sum(), exclude=[m]) == compact


def test_convpass_fused_bypass_checks_each_new_signature():
    # the fused bypass checks its arguments once per signature (h's shape / dtype / device and the
    # parameters'), then calls the op's autograd.Function directly: a new signature is checked again
    from fastpeft.fused.convpass import FusedBypass

    m = build("convpass", depth=1, img_size=32)
    fastpeft.patch(m, backend="triton")
    fn = m.blocks[0]._fastpeft_slots["attn_branch"][0]
    assert isinstance(fn, FusedBypass)
    for batch in (1, 2):
        h = torch.randn(batch, 5, m.embed_dim, requires_grad=True)
        got = fn(h, h)
        want = fn.original(h, h)
        torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(torch.autograd.grad(got.sum(), h)[0], torch.autograd.grad(want.sum(), h)[0],
                                   atol=ATOL, rtol=RTOL)
    with pytest.raises(ValueError, match="patch tokens"):
        fn(torch.randn(1, 6, m.embed_dim), torch.randn(1, 6, m.embed_dim))
    # parameters in another dtype than h: the functional's casting path, same values
    with torch.no_grad():
        conv = fn.original.conv
        conv.adapter_up.weight.data = conv.adapter_up.weight.data.double()
    h = torch.randn(1, 5, m.embed_dim)
    out = fn(h, h)
    assert out.dtype == torch.float32
    conv.adapter_up.weight.data = conv.adapter_up.weight.data.float()
    torch.testing.assert_close(out, fn.original(h, h), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("case", ["lora-noah", "lora-petl-qv"])
def test_lora_fused_layer_checks_each_new_signature_and_setting(case, monkeypatch):
    # the fused LoRA layer makes its op's layout once per hook setting and runs the functional's
    # argument checks once per call signature (fastpeft/ops/lowrank.py lowrank_bound): a new
    # shape, dtype or setting is checked (and the layout made) again, bad parameters still raise
    import fastpeft.ops.lowrank as L

    m = build(case, depth=1, img_size=32)
    fastpeft.patch(m, backend="triton")
    layer = m.blocks[0].attn.qkv
    hook = layer._fastpeft_hook
    name = "noah_layout" if case == "lora-noah" else "petl_layout"
    calls = []
    real = getattr(L, name)
    monkeypatch.setattr(L, name, lambda *a, **k: calls.append(1) or real(*a, **k))

    def check(batch):
        x = torch.randn(batch, 5, m.embed_dim, requires_grad=True)
        got = layer(x)
        want = hook.apply(x, torch.nn.functional.linear(x, layer.weight, layer.bias))
        torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(torch.autograd.grad(got.square().sum(), x)[0],
                                   torch.autograd.grad(want.square().sum(), x)[0], atol=ATOL, rtol=RTOL)

    check(1)
    first = len(calls)
    assert first >= 1  # the first call of a signature runs the functional's checks
    check(1)
    assert len(calls) == first  # the same signature: none
    check(2)
    assert len(calls) > first  # a new shape: checked again
    # a changed setting: the layout is made (and checked) again, the result follows it
    before = len(calls)
    if case == "lora-noah":
        hook.rank = 2
    else:
        hook.scale = 3.0
    check(2)
    assert len(calls) > before
    # an input of another dtype after patch: checked again, a clear error before anything launches
    with pytest.raises(ValueError, match="unsupported dtype"):
        layer(torch.randn(2, 5, m.embed_dim, dtype=torch.float64))
    # a parameter of the wrong shape: the functional's clear error before anything launches
    if case == "lora-noah":
        bad, match = m.blocks[0].attn.LoRA_b, r"lora_b .* must have as many columns"
    else:
        bad, match = m.blocks[0].attn.lora_v.adapter_up, r"ups\['v'\] must have shape"
    with torch.no_grad():
        bad.weight = torch.nn.Parameter(bad.weight[:, :-1].clone())
    with pytest.raises(ValueError, match=match):
        layer(torch.randn(2, 5, m.embed_dim))
