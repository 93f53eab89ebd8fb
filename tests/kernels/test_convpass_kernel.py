"""Fused Convpass bypass (fastpeft/ops/convpass.py, kernels/convpass.py) against its plain-torch reference (the official
module math: prefix tokens as 1x1 images through the conv).

Triton kernels run through the interpreter (tests/conftest.py sets TRITON_INTERPRET=1) on CPU
tensors with backend "triton"; the torch fallback (backend "torch") is checked the same way. fp32
and fp16 go through the kernels; bf16 goes through the torch path only (the interpreter's bf16
emulation is unreliable, engineering guide §3), compared with the fp32-upcast reference. Token
counts are odd (1, 7, 13, 37 rows per image), widths 64..768, bypass dims 5 and 8.
"""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import fastpeft.ops.convpass as C  # noqa: E402
from fastpeft.kernels import backend  # noqa: E402
from tests.kernels.conftest import assert_matches_reference, assert_close, check_aot_smoke, interpreter_only  # noqa: E402

pytestmark = interpreter_only

# Tolerances vs the fp32-upcast reference, per dtype (output and every grad); atol is scaled by
# max(1, max|reference|).
TOL = {
    torch.float32: dict(atol=2e-5, rtol=1e-4),
    torch.float16: dict(atol=1e-2, rtol=1e-2),
    torch.bfloat16: dict(atol=6e-2, rtol=4e-2),
}

# (batch, grid, prefix, D, d, p, with base)
CASES = [
    (1, (1, 1), 0, 768, 8, 0.0, True),      # one token, no prefix
    (2, (2, 3), 1, 192, 8, 0.1, False),     # 7 tokens
    (1, (6, 6), 1, 384, 8, 0.1, True),      # 37 tokens
    (1, (4, 3), 1, 200, 5, 0.3, True),      # odd width and bypass dim
    (2, (3, 2), 2, 64, 8, 0.0, True),       # two prefix tokens (CLS + register)
]
IDS = [f"B{c[0]}-g{c[1][0]}x{c[1][1]}-P{c[2]}-D{c[3]}-d{c[4]}-p{c[5]}{'-base' if c[6] else ''}" for c in CASES]
NAMES = ("h", "w_down", "b_down", "conv_w", "conv_b", "w_up", "b_up")


def make(case, dtype, seed=0):
    B, grid, P, D, d, p, with_base = case
    g = torch.Generator().manual_seed(seed)
    N = P + grid[0] * grid[1]

    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, generator=g) * std).to(dtype)

    t = {"h": rnd(B, N, D), "w_down": rnd(d, D, std=D ** -0.5), "b_down": rnd(d, std=0.1),
         "conv_w": rnd(d, d, 3, 3, std=0.3), "conv_b": rnd(d, std=0.1), "w_up": rnd(D, d, std=0.3),
         "b_up": rnd(D, std=0.1)}
    if with_base:
        t["base"] = rnd(B, N, D)
    return t, rnd(B, N, D)


def run(fn, t, grad, case, seed_t, **extra):
    B, grid, P, D, d, p, _ = case
    lv = {k: v.clone().requires_grad_(True) for k, v in t.items()}
    out = fn(*(lv[k] for k in NAMES), grid=grid, num_prefix=P, scale=3.0, base=lv.get("base"), dropout_p=p,
             seed=seed_t, **extra)
    out.backward(grad)
    return out.detach(), {k: v.grad for k, v in lv.items()}


def check(case, dtype, which):
    t, grad = make(case, dtype)
    seed_t = torch.tensor([41], dtype=torch.int64)
    with backend(which):
        out, grads = run(C.convpass, t, grad, case, seed_t, training=True)
    ref_out, ref_grads = run(C.convpass_ref, {k: v.float() for k, v in t.items()}, grad.float(), case, seed_t)
    assert_matches_reference(out, grads, ref_out, ref_grads, t, dtype, TOL[dtype])


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("which", ["triton", "torch"])
def test_convpass_fp32(case, which):
    check(case, torch.float32, which)


@pytest.mark.parametrize("case", [CASES[1], CASES[2]], ids=[IDS[1], IDS[2]])
def test_convpass_fp16_triton(case):
    check(case, torch.float16, "triton")


@pytest.mark.parametrize("case", [CASES[2]], ids=[IDS[2]])
def test_convpass_bf16_torch_path(case):
    """bf16 through the torch path (the interpreter's bf16 is unreliable), vs the fp32 reference."""
    check(case, torch.bfloat16, "torch")


def test_matches_the_method_module():
    """The fused functional equals fastpeft.methods.convpass.ConvpassModule (eval, official init
    variants aside: random weights), times the scale."""
    from fastpeft.methods.convpass import ConvpassModule
    torch.manual_seed(0)
    mod = ConvpassModule(96, 8, (3, 4), 1, xavier_init=True, dropout=0.1).eval()
    with torch.no_grad():
        for prm in mod.parameters():
            prm.normal_(0, 0.2)
    h = torch.randn(2, 13, 96)
    with backend("triton"):
        got = C.convpass(h, mod.adapter_down.weight, mod.adapter_down.bias, mod.adapter_conv.weight,
                         mod.adapter_conv.bias, mod.adapter_up.weight, mod.adapter_up.bias, grid=(3, 4),
                         num_prefix=1, scale=0.5)
    assert_close("module", got, mod(h) * 0.5, TOL[torch.float32])


def test_wide_bypass_uses_torch_path():
    """d > MAX_DIM runs the torch math of the same ops (no kernel config for it)."""
    check((1, (2, 3), 1, 64, C.MAX_DIM + 8, 0.1, True), torch.float32, "triton")


def test_dropout_is_a_function_of_the_seed():
    case = CASES[1]
    t, _ = make(case, torch.float32)
    B, grid, P, D, d, p, _ = case
    args = [t[k] for k in NAMES]

    def f(seed, training=True):
        return C.convpass(*args, grid=grid, num_prefix=P, dropout_p=0.5, training=training, seed=seed)

    s1, s2 = torch.tensor([1], dtype=torch.int64), torch.tensor([2], dtype=torch.int64)
    with backend("triton"):
        o1, o1b, o2, ev = f(s1), f(s1.clone()), f(s2), f(s1, training=False)
    assert torch.equal(o1, o1b) and not torch.allclose(o1, o2)
    assert_close("eval", ev, C.convpass_ref(*args, grid=grid, num_prefix=P), TOL[torch.float32])
    with backend("torch"):
        assert_close("torch path", f(s1), o1, TOL[torch.float32])


def test_saved_tensors_are_the_input_and_rank_d_intermediates():
    case = CASES[2]
    t, _ = make(case, torch.float32)
    B, grid, P, D, d, p, _ = case
    lv = {k: v.clone().requires_grad_(True) for k, v in t.items()}
    saved = []
    with backend("torch"), torch.autograd.graph.saved_tensors_hooks(lambda s: saved.append(s) or s, lambda s: s):
        C.convpass(*(lv[k] for k in NAMES), grid=grid, num_prefix=P, base=lv["base"], dropout_p=0.1, training=True,
                   seed=torch.tensor([3], dtype=torch.int64))
    params = [lv[k] for k in NAMES[1:]]
    act = [s for s in saved if s.numel() > 1 and not any(s is q for q in params)]
    big = [tuple(s.shape) for s in act if s.shape[-1] == D]
    assert big == [(B, 37, D)], big          # h only: no D-wide intermediate is kept
    assert all(s.numel() <= B * 37 * 9 * d for s in act if s.shape[-1] != D)


@pytest.mark.parametrize("which", ["triton", "torch"])
def test_opcheck(which, device="cpu"):
    case = CASES[1]
    t, grad = make(case, torch.float32)
    t = {k: v.to(device) for k, v in t.items()}
    seed = torch.tensor([5], dtype=torch.int64, device=device)
    h2 = t["h"].reshape(-1, t["h"].shape[-1])
    with backend(which):
        torch.library.opcheck(torch.ops.fastpeft.convpass_down,
                              (h2.clone().requires_grad_(), t["w_down"].clone().requires_grad_(),
                               t["b_down"].clone().requires_grad_()))
        u, a = torch.ops.fastpeft.convpass_down(h2, t["w_down"], t["b_down"])
        torch.library.opcheck(torch.ops.fastpeft.convpass_down_backward, (torch.randn_like(u), h2, a, t["w_down"]))
        c = torch.randn_like(u)
        base = torch.randn_like(h2)
        torch.library.opcheck(torch.ops.fastpeft.convpass_up,
                              (c.requires_grad_(), t["w_up"].clone().requires_grad_(),
                               t["b_up"].clone().requires_grad_(), base.requires_grad_(), 2.0, 0.2, seed))
        torch.library.opcheck(torch.ops.fastpeft.convpass_up_backward,
                              (torch.randn_like(h2), c.detach(), t["w_up"], 2.0, 0.2, seed))


def test_torch_compile_fullgraph():
    case = CASES[1]
    t, _ = make(case, torch.float32)
    B, grid, P, D, d, p, _ = case
    args = [t[k] for k in NAMES]

    def f(*a):
        return C.convpass(*a, grid=grid, num_prefix=P, scale=2.0, dropout_p=0.1, training=True,
                          seed=torch.tensor([9], dtype=torch.int64)).sum()

    torch._dynamo.reset()
    with backend("torch"):
        got = torch.compile(f, fullgraph=True, backend="aot_eager")(*args)
        want = f(*args)
    assert_close("compiled", got, want, TOL[torch.float32])


def test_errors():
    t, _ = make(CASES[1], torch.float32)
    args = {k: t[k] for k in NAMES}
    with backend("triton"):
        with pytest.raises(ValueError, match=r"expected 1 prefix \+ 3x3 patch tokens = 10"):
            C.convpass(*args.values(), grid=(3, 3), num_prefix=1)
        with pytest.raises(ValueError, match=r"w_down must be \[d, D\]"):
            C.convpass(args["h"], torch.zeros(8, 100), *list(args.values())[2:], grid=(2, 3))
        with pytest.raises(ValueError, match="base must have shape"):
            C.convpass(*args.values(), grid=(2, 3), base=torch.zeros(2, 7, 100))
        with pytest.raises(ValueError, match="must be 3-D"):
            C.convpass(args["h"][0], *list(args.values())[1:], grid=(2, 3))
        with pytest.raises(ValueError, match="unsupported dtype torch.float64"):
            C.convpass(args["h"].double(), *list(args.values())[1:], grid=(2, 3))
        with pytest.raises(ValueError, match="device mismatch"):
            C.convpass(args["h"], args["w_down"].to("meta"), *list(args.values())[2:], grid=(2, 3))
        with pytest.raises(ValueError, match="needs an int64 seed"):
            torch.ops.fastpeft.convpass_up(torch.zeros(3, 8), args["w_up"], None, None, 1.0, 0.1, None)


AOT_KERNELS = ("convpass_up_fwd", "convpass_up_bwd", "convpass_down_bwd")


def test_aot_smoke(tmp_path):
    check_aot_smoke(tmp_path, AOT_KERNELS)
