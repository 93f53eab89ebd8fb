"""Fused ST-Adapter (fastpeft/ops/st_adapter.py over kernels/st_adapter.py) against its plain-torch
reference (the official module math: Linear, depthwise (k_t, 1, 1) Conv3d over the frames of a clip, Linear, prefix tokens passed
through).

Triton kernels run through the interpreter (tests/conftest.py sets TRITON_INTERPRET=1) on CPU
tensors with backend "triton"; the torch twin (backend "torch") is checked the same way. fp32 and
fp16 go through the kernels; bf16 through the torch path only (the interpreter's bf16 emulation
is unreliable), compared with the fp32-upcast reference. Odd shapes: one
frame, one patch token, no prefix / two prefix tokens, widths not multiples of the tiles, k_t
1, 3, 5 and a 7-tap conv (no compiled config: the torch math).
"""
from __future__ import annotations

import pytest
import torch

import fastpeft.ops.st_adapter as S
from fastpeft.kernels import backend
from tests.kernels.conftest import (GEMM_TOL, assert_compiles_like_eager, assert_matches_reference,
                                    assert_close, check_aot_smoke, interpreter_only)

pytestmark = interpreter_only

TOL = GEMM_TOL

# (clips B, frames T, prefix P, patch tokens N, D, C, k_t)
CASES = [
    (1, 1, 1, 1, 64, 8, 3),      # one frame, one patch: only the centre tap acts
    (2, 3, 1, 5, 40, 12, 3),     # odd N, D, C
    (1, 8, 1, 7, 96, 40, 3),     # 8 frames, C over one K tile
    (2, 4, 0, 6, 48, 16, 5),     # no prefix, 5 taps
    (1, 5, 2, 3, 33, 7, 1),      # two prefix tokens, 1 tap, odd D
    (1, 2, 1, 4, 32, 8, 5),      # taps reaching past the clip on both sides
]
IDS = [f"B{c[0]}-T{c[1]}-P{c[2]}-N{c[3]}-D{c[4]}-C{c[5]}-k{c[6]}" for c in CASES]
NAMES = ("x", "w1", "b1", "conv_w", "conv_b", "w2", "b2")


def make(case, dtype, seed=0):
    B, T, P, N, D, C, kt = case
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, generator=g) * std).to(dtype)

    t = {"x": rnd(B * T, P + N, D), "w1": rnd(C, D, std=D ** -0.5), "b1": rnd(C, std=0.1),
         "conv_w": rnd(C, 1, kt, 1, 1, std=0.5), "conv_b": rnd(C, std=0.1), "w2": rnd(D, C, std=C ** -0.5),
         "b2": rnd(D, std=0.1)}
    return t, rnd(B * T, P + N, D)


def run(fn, t, grad, case):
    B, T, P = case[:3]
    lv = {k: v.clone().requires_grad_(True) for k, v in t.items()}
    out = fn(*(lv[k] for k in NAMES), frames=T, num_prefix=P)
    out.backward(grad)
    return out.detach(), {k: v.grad for k, v in lv.items()}


def check(case, dtype, which):
    t, grad = make(case, dtype)
    with backend(which):
        out, grads = run(S.st_adapter, t, grad, case)
    ref_out, ref_grads = run(S.st_adapter_ref, {k: v.float() for k, v in t.items()}, grad.float(), case)
    assert_matches_reference(out, grads, ref_out, ref_grads, t, dtype, TOL[dtype])
    P = case[2]
    assert torch.equal(out[:, :P], t["x"][:, :P])  # prefix tokens pass through exactly


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("which", ["triton", "torch"])
def test_st_adapter_fp32(case, which):
    check(case, torch.float32, which)


@pytest.mark.parametrize("case", [CASES[1], CASES[3]], ids=[IDS[1], IDS[3]])
def test_st_adapter_fp16_triton(case):
    check(case, torch.float16, "triton")


@pytest.mark.parametrize("case", [CASES[2]], ids=[IDS[2]])
def test_st_adapter_bf16_torch_path(case):
    check(case, torch.bfloat16, "torch")


def test_seven_taps_run_the_torch_math():
    assert 7 not in S.KT_SUPPORTED
    check((1, 4, 1, 3, 32, 8, 7), torch.float32, "triton")


def test_matches_the_method_module():
    from fastpeft.methods.st_adapter import STAdapterModule

    torch.manual_seed(0)
    mod = STAdapterModule(48, 16, frames=3, grid=(2, 3), num_prefix=1)
    with torch.no_grad():
        for prm in mod.parameters():
            prm.normal_(0, 0.2)
    x = torch.randn(6, 7, 48)
    with backend("triton"):
        got = S.st_adapter(x, mod.fc1.weight, mod.fc1.bias, mod.conv.weight, mod.conv.bias, mod.fc2.weight,
                           mod.fc2.bias, frames=3, num_prefix=1, grid=(2, 3))
    assert_close("module", got, mod(x), TOL[torch.float32])


@pytest.mark.parametrize("which", ["triton", "torch"])
def test_saves_only_the_input_and_the_rank_width_intermediate(which):
    case = (2, 4, 1, 9, 64, 16, 3)
    t, _ = make(case, torch.float32)
    B, T, P, N, D, C, _ = case
    lv = {k: v.clone().requires_grad_(True) for k, v in t.items()}
    saved = []
    with backend(which), torch.autograd.graph.saved_tensors_hooks(lambda s: saved.append(s) or s, lambda s: s):
        S.st_adapter(*(lv[k] for k in NAMES), frames=T, num_prefix=P)
    params = [lv[k] for k in NAMES[1:]]
    act = [s for s in saved if not any(s.data_ptr() == q.data_ptr() for q in params)]
    assert sorted(tuple(s.shape) for s in act) == sorted([(B * T, P + N, D), (B * T * N, C)])
    assert any(s.data_ptr() == lv["x"].data_ptr() for s in act)  # the input itself, not a copy


@pytest.mark.parametrize("which", ["triton", "torch"])
def test_opcheck(which):
    case = CASES[1]
    t, grad = make(case, torch.float32)
    B, T, P = case[:3]
    cw = t["conv_w"].reshape(t["conv_w"].shape[0], -1)
    args = [t["x"], t["w1"], t["b1"], cw, t["conv_b"], t["w2"], t["b2"]]
    with backend(which):
        torch.library.opcheck(torch.ops.fastpeft.st_adapter,
                              (*(a.clone().requires_grad_() for a in args), T, P))
        out, u = torch.ops.fastpeft.st_adapter(*args, T, P)
        torch.library.opcheck(torch.ops.fastpeft.st_adapter_backward,
                              (grad, t["x"], u, t["w1"], cw, t["conv_b"], t["w2"], T, P))


def test_torch_compile_fullgraph():
    case = CASES[1]
    t, _ = make(case, torch.float32)
    B, T, P = case[:3]
    args = [t[k].clone().requires_grad_() for k in NAMES]

    def f(*a):
        return S.st_adapter(*a, frames=T, num_prefix=P).square().sum()

    assert_compiles_like_eager(f, args, TOL[torch.float32], NAMES)


def test_errors():
    t, _ = make(CASES[1], torch.float32)
    a = [t[k] for k in NAMES]
    with backend("triton"):
        with pytest.raises(ValueError, match="not whole clips of 4 frames"):
            S.st_adapter(*a, frames=4)
        with pytest.raises(ValueError, match=r"expected 1 prefix \+ 2x2 patch tokens = 5"):
            S.st_adapter(*a, frames=3, grid=(2, 2))
        with pytest.raises(ValueError, match="w1 must be"):
            S.st_adapter(a[0], a[1][:, :-1], *a[2:], frames=3)
        with pytest.raises(ValueError, match="odd k_t"):
            S.st_adapter(*a[:3], torch.zeros(12, 1, 2, 1, 1), *a[4:], frames=3)
        with pytest.raises(ValueError, match=r"\(k_t, 1, 1\) Conv3d"):
            S.st_adapter(*a[:3], torch.zeros(12, 1, 3, 3, 1), *a[4:], frames=3)
        with pytest.raises(ValueError, match="unsupported dtype torch.float64"):
            S.st_adapter(a[0].double(), *a[1:], frames=3)
        with pytest.raises(ValueError, match="num_prefix"):
            S.st_adapter(*a, frames=3, num_prefix=6)


AOT_KERNELS = ("st_up_fwd", "st_tconv")


def test_aot_smoke(tmp_path):
    check_aot_smoke(tmp_path, AOT_KERNELS)
