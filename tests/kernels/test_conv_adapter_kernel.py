"""Fused Conv-Adapter epilogue (fastpeft/ops/conv_adapter.py over kernels/conv_adapter.py) against
its plain-torch reference (the official module math: grouped conv, act, 1x1 conv, per-channel scale, added to the frozen branch).

Triton kernels run through the interpreter on CPU tensors with backend "triton"; the torch twin
(backend "torch") is checked the same way. fp32 and fp16 go through the kernels, bf16 through the
torch path (the interpreter's bf16 emulation is unreliable). Odd shapes:
strides 1 / 2, kernels 1..7, adapter widths 1..40 (not multiples of the K tile), one pixel, spatial
sizes not multiples of the tiles; ReLU (ResNet) and exact GELU (ConvNeXt).
"""
from __future__ import annotations

import pytest
import torch

import fastpeft.ops.conv_adapter as K
from fastpeft.kernels import backend
from tests.kernels.conftest import (GEMM_TOL, assert_compiles_like_eager, assert_matches_reference,
                                    assert_close, check_aot_smoke, interpreter_only)

pytestmark = interpreter_only

TOL = GEMM_TOL

# (B, C_in, H, W, reduction, C_out, k, stride, padding, act)
CASES = [
    (2, 16, 7, 5, 4, 16, 3, 2, 1, "relu"),     # ResNet block, stride 2, odd grid
    (1, 24, 6, 6, 8, 40, 2, 2, 0, "gelu"),     # ConvNeXt downsample: C_in -> C_out, k2 s2
    (1, 12, 5, 5, 1, 12, 7, 1, 3, "gelu"),     # ConvNeXt block at reduction 1 (depthwise)
    (3, 64, 1, 1, 8, 64, 3, 1, 1, "relu"),     # one pixel
    (1, 80, 9, 11, 2, 80, 3, 1, 1, "relu"),    # adapter width 40: three K tiles
]
IDS = [f"B{c[0]}-C{c[1]}-{c[2]}x{c[3]}-g{c[4]}-O{c[5]}-k{c[6]}s{c[7]}-{c[9]}" for c in CASES]
NAMES = ("x", "base", "w1", "b1", "w2", "b2", "se")


def make(case, dtype, seed=0):
    B, Cin, H, W, g, C, k, s, p, act = case
    gen = torch.Generator().manual_seed(seed)
    w = Cin // g
    Ho, Wo = (H + 2 * p - k) // s + 1, (W + 2 * p - k) // s + 1

    def rnd(*shape, std=1.0, mean=0.0):
        return (torch.randn(*shape, generator=gen) * std + mean).to(dtype)

    t = {"x": rnd(B, Cin, H, W), "base": rnd(B, C, Ho, Wo), "w1": rnd(w, g, k, k, std=(g * k * k) ** -0.5),
         "b1": rnd(w, std=0.1), "w2": rnd(C, w, 1, 1, std=w ** -0.5), "b2": rnd(C, std=0.1),
         "se": rnd(1, C, 1, 1, std=0.2, mean=1.0)}
    return t, rnd(B, C, Ho, Wo)


def run(fn, t, grad, case):
    *_, k, s, p, act = case
    lv = {n: v.clone().requires_grad_(True) for n, v in t.items()}
    out = fn(*(lv[n] for n in NAMES), stride=s, padding=p, act=act)
    out.backward(grad)
    return out.detach(), {n: v.grad for n, v in lv.items()}


def check(case, dtype, which):
    t, grad = make(case, dtype)
    with backend(which):
        out, grads = run(K.conv_adapter, t, grad, case)
    ref_out, ref_grads = run(K.conv_adapter_ref, {n: v.float() for n, v in t.items()}, grad.float(), case)
    assert_matches_reference(out, grads, ref_out, ref_grads, t, dtype, TOL[dtype])
    assert set(grads) == set(NAMES)


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("which", ["triton", "torch"])
def test_conv_adapter_fp32(case, which):
    check(case, torch.float32, which)


@pytest.mark.parametrize("case", [CASES[0], CASES[1]], ids=[IDS[0], IDS[1]])
def test_conv_adapter_fp16_triton(case):
    check(case, torch.float16, "triton")


@pytest.mark.parametrize("case", [CASES[4]], ids=[IDS[4]])
def test_conv_adapter_bf16_torch_path(case):
    check(case, torch.bfloat16, "torch")



@pytest.mark.parametrize("x_grad", [True, False], ids=["x-grad", "no-x-grad"])
def test_torch_path_channels_last_input(x_grad):
    """The torch path (a channels_last depthwise conv inside) on a channels_last x, with and
    without x's gradient: the reference's values and gradients, dx in x's layout."""
    case = CASES[0]
    *_, k, s, p, act = case
    t, grad = make(case, torch.float32)
    t["x"] = t["x"].contiguous(memory_format=torch.channels_last)
    lv = {n: v.clone().requires_grad_(n != "x" or x_grad) for n, v in t.items()}
    with backend("torch"):
        out = K.conv_adapter(*(lv[n] for n in NAMES), stride=s, padding=p, act=act)
    out.backward(grad)
    ref_out, ref_grads = run(K.conv_adapter_ref, t, grad, case)
    assert_close("out", out, ref_out, TOL[torch.float32])
    for n in NAMES:
        if n == "x" and not x_grad:
            assert lv[n].grad is None
            continue
        assert_close(f"grad {n}", lv[n].grad, ref_grads[n], TOL[torch.float32])
    if x_grad:
        assert lv["x"].grad.is_contiguous(memory_format=torch.channels_last)

def test_matches_the_method_module():
    from fastpeft.methods.conv_adapter import ConvAdapterModule

    torch.manual_seed(0)
    mod = ConvAdapterModule(32, 48, 8, 3, stride=2, padding=1, act="gelu", init="trunc_normal")
    with torch.no_grad():
        mod.se.uniform_(0.5, 1.5)
        mod.conv2.bias.normal_()
    x, base = torch.randn(2, 32, 9, 7), torch.randn(2, 48, 5, 4)
    with backend("triton"):
        got = K.conv_adapter(x, base, mod.conv1.weight, mod.conv1.bias, mod.conv2.weight, mod.conv2.bias, mod.se,
                             stride=2, padding=1, act="gelu")
    assert_close("module", got, base + mod(x), TOL[torch.float32])


@pytest.mark.parametrize("which", ["triton", "torch"])
def test_saves_the_narrow_conv_output_not_the_wide_ones(which):
    case = CASES[4]
    t, _ = make(case, torch.float32)
    lv = {n: v.clone().requires_grad_(True) for n, v in t.items()}
    saved = []
    with backend(which), torch.autograd.graph.saved_tensors_hooks(lambda s: saved.append(s) or s, lambda s: s):
        K.conv_adapter(*(lv[n] for n in NAMES), stride=1, padding=1, act="relu")
    params = [lv[n] for n in NAMES[2:]]
    act = {s.data_ptr(): tuple(s.shape) for s in saved if not any(s.data_ptr() == q.data_ptr() for q in params)}
    B, Cin, H, W = t["x"].shape
    # the conv's input (saved by the vendor conv) and its w-wide output; nothing C_out-wide
    assert sorted(act.values()) == sorted([(B, Cin, H, W), (B, Cin // 2, H, W)])


@pytest.mark.parametrize("which", ["triton", "torch"])
def test_opcheck(which):
    t, grad = make(CASES[0], torch.float32)
    h = torch.randn(2, 4, 4, 3)
    w2, b2, se = t["w2"].reshape(16, 4), t["b2"], t["se"].reshape(-1)
    base = torch.randn(2, 16, 4, 3)
    with backend(which):
        torch.library.opcheck(torch.ops.fastpeft.conv_adapter_up,
                              (h.requires_grad_(), w2.clone().requires_grad_(), b2.clone().requires_grad_(),
                               se.clone().requires_grad_(), base.requires_grad_(), "relu"))
        torch.library.opcheck(torch.ops.fastpeft.conv_adapter_up_backward,
                              (torch.randn_like(base), h.detach(), w2, b2, se, "gelu"))


def test_torch_compile_fullgraph():
    case = CASES[1]
    t, _ = make(case, torch.float32)
    args = [t[n].clone().requires_grad_() for n in NAMES]

    def f(*a):
        return K.conv_adapter(*a, stride=2, padding=0, act="gelu").square().sum()

    assert_compiles_like_eager(f, args, TOL[torch.float32], NAMES)


def test_errors():
    t, _ = make(CASES[0], torch.float32)
    a = [t[n] for n in NAMES]
    with backend("triton"):
        with pytest.raises(ValueError, match="base must have shape"):
            K.conv_adapter(a[0], a[1][:, :, :-1], *a[2:], stride=2, padding=1)
        with pytest.raises(ValueError, match="grouped conv weight"):
            K.conv_adapter(a[0], a[1], torch.zeros(5, 3, 3, 3), *a[3:], stride=2, padding=1)
        with pytest.raises(ValueError, match="w2 must be"):
            K.conv_adapter(*a[:4], torch.zeros(16, 3, 1, 1), *a[5:], stride=2, padding=1)
        with pytest.raises(ValueError, match="act must be"):
            K.conv_adapter(*a, stride=2, padding=1, act="silu")
        with pytest.raises(ValueError, match="unsupported dtype torch.float64"):
            K.conv_adapter(a[0].double(), *a[1:], stride=2, padding=1)


AOT_KERNELS = ("conv_adapter_up_fwd",)


def test_aot_smoke(tmp_path):
    check_aot_smoke(tmp_path, AOT_KERNELS)
