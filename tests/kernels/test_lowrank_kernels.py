"""Low-rank deltas fused into a frozen projection (fastpeft/ops/lowrank.py, kernels/lowrank.py) against the references.

Triton kernels run through the interpreter (tests/conftest.py sets TRITON_INTERPRET=1) on CPU
tensors with backend "triton"; the torch fallback (backend "torch") is checked the same way.
fp32 and fp16 go through the kernels; bf16 goes through the torch path only (the interpreter's
bf16 emulation is unreliable) and is compared with the fp32-upcast
reference. Shapes are small and odd (rows 1, 7, 37; widths 48..768 incl. 130/200; ranks 1..128 on
a subset, not the full product). Method-level functionals (NOAH / PETL-ViT LoRA, FacT-TT/TK,
KAdaptation) are compared with references that follow the official forward (not the effective
matrices the functionals build).
"""
from __future__ import annotations

import pytest
import torch

import fastpeft.ops.lowrank as L
from fastpeft.kernels import backend
from fastpeft.kernels.adapter import dropout_keep_mask
from fastpeft.methods.fact import fact_tk_cores
from tests.kernels.conftest import (GEMM_TOL, assert_close, assert_compiles_like_eager, check_aot_smoke,
                                    interpreter_only)

pytestmark = interpreter_only

# Tolerances of the fused op vs the fp32-upcast reference, per dtype (outputs and every grad).
# atol is scaled by max(1, max|reference|): weight grads are sums over rows and grow with them.
TOL = GEMM_TOL


def rnd(g, *shape, std=1.0, dtype=torch.float32):
    return (torch.randn(*shape, generator=g) * std).to(dtype)


def fwd_bwd(fn, leaves: dict, grad, **kw):
    """Run fn(**leaves (cloned, requiring grad), **kw), backward(grad): (out, {name: grad})."""
    lv = {k: (v.clone().requires_grad_(trainable) if isinstance(v, torch.Tensor) else v)
          for k, (v, trainable) in leaves.items()}
    out = fn(**lv, **kw)
    out.backward(grad)
    return out.detach(), {k: lv[k].grad for k, (v, t) in leaves.items() if t}


def check_against(fn, ref, leaves, grad, tol, **kw):
    out, grads = fwd_bwd(fn, leaves, grad, **kw)
    up = {k: ((v.float() if isinstance(v, torch.Tensor) else v), t) for k, (v, t) in leaves.items()}
    ref_out, ref_grads = fwd_bwd(ref, up, grad.float(), **kw)
    assert out.shape == ref_out.shape
    assert_close("out", out, ref_out, tol)
    assert grads.keys() == ref_grads.keys()
    for k in grads:
        assert grads[k] is not None, k
        assert_close(f"grad {k}", grads[k], ref_grads[k], tol)
    return out


# ----------------------------------------------------------------------------------------------
# The generic op: out = x W^T + b + drop(x A^T) B^T  |  x W^T + b + drop(x) A^T B^T
# ----------------------------------------------------------------------------------------------
# (rows, D, N, R, p, drop_input)
CASES = [
    (1, 768, 192, 1, 0.0, False),
    (7, 384, 384, 16, 0.1, False),
    (37, 192, 576, 8, 0.1, True),        # NOAH: input dropout
    (37, 200, 130, 5, 0.3, False),       # widths not a multiple of any block
    (7, 64, 48, 64, 0.2, True),
    (7, 48, 64, 128, 0.1, False),        # R_PAD 128
]
IDS = [f"M{c[0]}-D{c[1]}-N{c[2]}-r{c[3]}-p{c[4]}{'-in' if c[5] else ''}" for c in CASES]


def generic_inputs(rows, d, n, r, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"x": (rnd(g, rows, d, dtype=dtype), True),
            "weight": (rnd(g, n, d, std=d ** -0.5, dtype=dtype), False),
            "bias": (rnd(g, n, std=0.1, dtype=dtype), True),
            "a": (rnd(g, r, d, std=d ** -0.5, dtype=dtype), True),
            "b": (rnd(g, n, r, std=r ** -0.5, dtype=dtype), True)}, rnd(g, rows, n, dtype=dtype)


def _generic(x, weight, bias, a, b, p, drop_input, seed):
    return L.lowrank_linear(x, weight, bias, a, b, dropout_p=p, drop_input=drop_input, training=True, seed=seed)


def _generic_ref(x, weight, bias, a, b, p, drop_input, seed):
    return L.lowrank_linear_ref(x, weight, bias, a, b, dropout_p=p, drop_input=drop_input, seed=seed)


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("which", ["triton", "torch"])
def test_lowrank_linear_fp32(case, which):
    rows, d, n, r, p, drop_input = case
    leaves, grad = generic_inputs(rows, d, n, r, torch.float32)
    seed = torch.tensor([100 + rows], dtype=torch.int64)
    with backend(which):
        check_against(_generic, _generic_ref, leaves, grad, TOL[torch.float32], p=p, drop_input=drop_input, seed=seed)


LOW_PRECISION = ([(torch.float16, "triton", i) for i in (1, 2, 3)]
                 # bf16 through the torch path (the interpreter's bf16 is unreliable), vs the fp32 reference
                 + [(torch.bfloat16, "torch", i) for i in (0, 2)])


@pytest.mark.parametrize("dtype, which, i", LOW_PRECISION, ids=[f"{str(d)[6:]}-{w}-{IDS[i]}" for d, w, i in LOW_PRECISION])
def test_lowrank_linear_low_precision(dtype, which, i):
    rows, d, n, r, p, drop_input = CASES[i]
    leaves, grad = generic_inputs(rows, d, n, r, dtype)
    seed = torch.tensor([7], dtype=torch.int64)
    with backend(which):
        out = check_against(_generic, _generic_ref, leaves, grad, TOL[dtype], p=p, drop_input=drop_input, seed=seed)
    assert out.dtype == dtype


def test_rank_above_max_uses_torch_path():
    leaves, grad = generic_inputs(7, 64, 32, L.MAX_RANK + 2, torch.float32)
    with backend("triton"):
        check_against(_generic, _generic_ref, leaves, grad, TOL[torch.float32], p=0.1, drop_input=False,
                      seed=torch.tensor([3], dtype=torch.int64))


def test_leading_dims_and_zero_rows():
    g = torch.Generator().manual_seed(1)
    x = rnd(g, 2, 3, 5, 64)
    w, a, b = rnd(g, 96, 64), rnd(g, 4, 64), rnd(g, 96, 4)
    with backend("triton"):
        out = L.lowrank_linear(x, w, None, a, b)
        empty = L.lowrank_linear(x[:0], w, None, a, b)
    assert out.shape == (2, 3, 5, 96) and empty.shape == (0, 3, 5, 96)
    assert_close("out", out, L.lowrank_linear_ref(x, w, None, a, b), TOL[torch.float32])


@pytest.mark.parametrize("drop_input", [False, True])
def test_dropout_is_a_function_of_the_seed(drop_input):
    leaves, _ = generic_inputs(7, 64, 96, 8, torch.float32)
    args = {k: v for k, (v, _) in leaves.items()}
    s1, s2 = torch.tensor([11], dtype=torch.int64), torch.tensor([12], dtype=torch.int64)
    kw = dict(dropout_p=0.5, drop_input=drop_input, training=True)
    with backend("triton"):
        o1 = L.lowrank_linear(**args, seed=s1, **kw)
        o1b = L.lowrank_linear(**args, seed=s1.clone(), **kw)
        o2 = L.lowrank_linear(**args, seed=s2, **kw)
        ev = L.lowrank_linear(**args, seed=s1, dropout_p=0.5, drop_input=drop_input, training=False)
    assert torch.equal(o1, o1b)
    assert not torch.allclose(o1, o2)
    assert_close("eval", ev, L.lowrank_linear_ref(**args), TOL[torch.float32])
    # the torch path draws the very same mask
    with backend("torch"):
        assert_close("torch path", L.lowrank_linear(**args, seed=s1, **kw), o1, TOL[torch.float32])


def test_saves_only_x_and_u():
    """Autograd keeps x and the rank-R u (plus the frozen weight / parameters, the bias for `output_again`), never a mask."""
    leaves, _ = generic_inputs(37, 64, 96, 8, torch.float32)
    t = {k: v.clone().requires_grad_(tr) for k, (v, tr) in leaves.items()}
    saved = []
    with backend("torch"), torch.autograd.graph.saved_tensors_hooks(lambda s: saved.append(s) or s, lambda s: s):
        L.lowrank_linear(t["x"], t["weight"], t["bias"], t["a"], t["b"], dropout_p=0.1, drop_input=True,
                         training=True, seed=torch.tensor([1], dtype=torch.int64))
    act = [s for s in saved if s.numel() > 1 and not any(s is p for p in (t["weight"], t["bias"], t["a"], t["b"]))]
    shapes = sorted(tuple(s.shape) for s in act)
    assert shapes == [(37, 8), (37, 64)], shapes


@pytest.mark.parametrize("which", ["triton", "torch"])
def test_opcheck(which, device="cpu"):
    leaves, grad = generic_inputs(7, 64, 96, 8, torch.float32)
    x, w, bias, a, b, grad = (t.to(device) for t in [leaves[k][0] for k in ("x", "weight", "bias", "a", "b")] + [grad])
    seed = torch.tensor([5], dtype=torch.int64, device=device)
    with backend(which):
        for p, di in ((0.0, False), (0.2, True)):
            torch.library.opcheck(torch.ops.fastpeft.lowrank_linear,
                                  (x.requires_grad_(), w, bias.requires_grad_(), a.requires_grad_(),
                                   b.requires_grad_(), p, seed if p else None, di))
        _, u = torch.ops.fastpeft.lowrank_linear(x.detach(), w, bias.detach(), a.detach(), b.detach(), 0.2, seed, False)
        torch.library.opcheck(torch.ops.fastpeft.lowrank_linear_backward,
                              (grad, x.detach(), w, a.detach(), b.detach(), u, 0.2, seed, False))


def test_torch_compile_fullgraph():
    leaves, _ = generic_inputs(7, 64, 96, 8, torch.float32)
    args = {k: v for k, (v, _) in leaves.items()}

    def f(x, weight, bias, a, b):
        return L.lowrank_linear(x, weight, bias, a, b, dropout_p=0.1, training=True,
                                seed=torch.tensor([9], dtype=torch.int64)).sum()

    assert_compiles_like_eager(lambda *a: f(**dict(zip(args, a))), list(args.values()), TOL[torch.float32])


# ----------------------------------------------------------------------------------------------
# Errors (ValueError naming shapes/dtypes/devices, before any launch)
# ----------------------------------------------------------------------------------------------
def test_errors():
    g = torch.Generator().manual_seed(0)
    x, w, a, b = rnd(g, 4, 64), rnd(g, 96, 64), rnd(g, 8, 64), rnd(g, 96, 8)
    with backend("triton"):
        with pytest.raises(ValueError, match=r"weight must be \[N, D\]"):
            L.lowrank_linear(x, rnd(g, 96, 32), None, a, b)
        with pytest.raises(ValueError, match=r"a \(down\) must be \[R, D\]"):
            L.lowrank_linear(x, w, None, rnd(g, 8, 32), b)
        with pytest.raises(ValueError, match=r"b must have shape \(96, 8\)"):
            L.lowrank_linear(x, w, None, a, rnd(g, 96, 4))
        with pytest.raises(ValueError, match=r"bias must have shape \(96,\)"):
            L.lowrank_linear(x, w, rnd(g, 95), a, b)
        with pytest.raises(ValueError, match="unsupported dtype torch.float64"):
            L.lowrank_linear(x.double(), w, None, a, b)
        with pytest.raises(ValueError, match="device mismatch"):
            L.lowrank_linear(x, w.to("meta"), None, a, b)
        with pytest.raises(ValueError, match="dtype mismatch"):
            torch.ops.fastpeft.lowrank_linear(x, w, None, a.half(), b, 0.0, None, False)
        with pytest.raises(ValueError, match="needs an int64 seed"):
            torch.ops.fastpeft.lowrank_linear(x, w, None, a, b, 0.1, None, False)
        with pytest.raises(ValueError, match=r"dropout p must be in \[0, 1\)"):
            L.lowrank_linear(x, w, None, a, b, dropout_p=1.0, training=True)
        with pytest.raises(ValueError, match="frozen projection weight"):
            L.lowrank_linear(x, w.clone().requires_grad_(), None, a, b)
        with pytest.raises(ValueError, match="not a fused qkv"):
            L.lora_petl_qkv(x, rnd(g, 97, 64), None, {"q": a}, {"q": rnd(g, 32, 8)})
        # issue 17: a one-row-too-many up-projection, a scale dict missing a target, a non-finite
        # scale, and a NOAH rank outside the supernet's rows used to be accepted (or KeyError)
        qkv = rnd(g, 96, 64)
        with pytest.raises(ValueError, match=r"ups\['q'\] must have shape \(32, 8\)"):
            L.lora_petl_qkv(x, qkv, None, {"q": a}, {"q": rnd(g, 33, 8)})
        with pytest.raises(ValueError, match="scale dict must name exactly the targets"):
            L.lora_petl_qkv(x, qkv, None, {"q": a, "v": a}, {"q": rnd(g, 32, 8), "v": rnd(g, 32, 8)}, scale={"q": 1.0})
        with pytest.raises(ValueError, match="must be a finite number"):
            L.lora_petl_qkv(x, qkv, None, {"q": a}, {"q": rnd(g, 32, 8)}, scale=float("nan"))
        a4, b4 = rnd(g, 4, 64), rnd(g, 96, 4)
        for bad in (10, -1, 2.5, True):
            with pytest.raises(ValueError, match=r"rank must be an int in \[0, 4\]"):
                L.lora_noah_qkv(x, qkv, None, a4, b4, rank=bad)
        with pytest.raises(ValueError, match="as many columns as lora_a"):
            L.lora_noah_qkv(x, qkv, None, a4, rnd(g, 96, 5))
        with pytest.raises(ValueError, match="must be a finite number"):
            L.lora_noah_qkv(x, qkv, None, a4, b4, scale=float("inf"))
        with pytest.raises(ValueError, match="layer must be one of"):
            L.fact_linear(x, w, None, a, rnd(g, 64, 8), rnd(g, 8, 8), layer="fc3")


# ----------------------------------------------------------------------------------------------
# Methods: functionals vs references following the official forward
# ----------------------------------------------------------------------------------------------
def _noah(x, weight, bias, lora_a, lora_b, seed):
    return L.lora_noah_qkv(x, weight, bias, lora_a, lora_b, rank=8, scale=1.0, dropout_p=0.1, training=True, seed=seed)


def _noah_ref(x, weight, bias, lora_a, lora_b, seed):
    return L.lora_noah_qkv_ref(x, weight, bias, lora_a, lora_b, rank=8, scale=1.0, dropout_p=0.1, seed=seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_lora_noah(dtype):
    g = torch.Generator().manual_seed(2)
    D = 192
    leaves = {"x": (rnd(g, 37, D, dtype=dtype), True), "weight": (rnd(g, 3 * D, D, std=D ** -0.5, dtype=dtype), False),
              "bias": (rnd(g, 3 * D, std=0.1, dtype=dtype), False),
              "lora_a": (rnd(g, 16, D, std=0.02, dtype=dtype), True),      # super-size r_super = 16, rank 8
              "lora_b": (rnd(g, 3 * D, 16, std=0.02, dtype=dtype), True)}
    with backend("triton"):
        check_against(_noah, _noah_ref, leaves, rnd(g, 37, 3 * D, dtype=dtype), TOL[dtype],
                      seed=torch.tensor([4], dtype=torch.int64))


def _petl(x, weight, bias, aq, av, bq, bv, seed):
    return L.lora_petl_qkv(x, weight, bias, {"q": aq, "v": av}, {"q": bq, "v": bv}, scale={"q": 0.5, "v": 2.0},
                           dropout_p=0.1, training=True, seed=seed)


def _petl_ref(x, weight, bias, aq, av, bq, bv, seed):
    return L.lora_petl_qkv_ref(x, weight, bias, {"q": aq, "v": av}, {"q": bq, "v": bv}, scale={"q": 0.5, "v": 2.0},
                               dropout_p=0.1, seed=seed)


@pytest.mark.parametrize("rows,D,r", [(1, 192, 4), (37, 384, 1)])
def test_lora_petl(rows, D, r):
    g = torch.Generator().manual_seed(3)
    leaves = {"x": (rnd(g, rows, D), True), "weight": (rnd(g, 3 * D, D, std=D ** -0.5), False),
              "bias": (rnd(g, 3 * D, std=0.1), False),
              "aq": (rnd(g, r, D, std=D ** -0.5), True), "av": (rnd(g, r, D, std=D ** -0.5), True),
              "bq": (rnd(g, D, r, std=0.3), True), "bv": (rnd(g, D, r, std=0.3), True)}
    with backend("triton"):
        out = check_against(_petl, _petl_ref, leaves, rnd(g, rows, 3 * D), TOL[torch.float32],
                            seed=torch.tensor([8], dtype=torch.int64))
    # K untouched
    x, w, b = leaves["x"][0], leaves["weight"][0], leaves["bias"][0]
    assert_close("k", out[:, D:2 * D], (x @ w.t() + b)[:, D:2 * D], TOL[torch.float32])


@pytest.mark.parametrize("which", ["triton", "torch"])
@pytest.mark.parametrize("targets", [("q", "v"), ("v", "q"), ("k",), ("q", "k", "v"), ("v", "k")])
def test_lora_petl_any_targets(which, targets):
    """A and B are made inside the op from the targets' parameters (`_PetlLayout`: block-diagonal B
    when the targets come in q, k, v order, placed block by block otherwise) and their gradients
    mapped back per target: every order and subset against the reference, each target its own
    scale and rank."""
    g = torch.Generator().manual_seed(11)
    D, rows = 48, 7
    ranks, scales = {"q": 3, "k": 1, "v": 5}, {"q": 0.5, "k": 1.0, "v": 2.0}
    leaves = {"x": (rnd(g, rows, D), True), "weight": (rnd(g, 3 * D, D, std=D ** -0.5), False),
              "bias": (rnd(g, 3 * D, std=0.1), True)}
    for t in targets:
        leaves[f"d{t}"] = (rnd(g, ranks[t], D, std=D ** -0.5), True)
        leaves[f"u{t}"] = (rnd(g, D, ranks[t], std=0.3), True)

    def call(fn):
        def run(x, weight, bias, seed, **f):
            return fn(x, weight, bias, {t: f[f"d{t}"] for t in targets}, {t: f[f"u{t}"] for t in targets},
                      scale={t: scales[t] for t in targets}, dropout_p=0.1, seed=seed,
                      **({"training": True} if fn is L.lora_petl_qkv else {}))
        return run

    with backend(which):
        check_against(call(L.lora_petl_qkv), call(L.lora_petl_qkv_ref), leaves, rnd(g, rows, 3 * D),
                      TOL[torch.float32], seed=torch.tensor([6], dtype=torch.int64))


@pytest.mark.parametrize("rank,scale", [(16, 1.0), (16, 0.25), (5, 3.0)])
def test_lora_noah_fp32_factors_under_fp16(rank, scale):
    """NOAH's factors fp32 (as under autocast) with fp16 activations: the op casts (A, B) inside and
    gives the fp32 parameters fp32 gradients (zeros past a subnet rank), the reference's within
    fp16 tolerance; at the supernet rank the factors are the parameters themselves."""
    g = torch.Generator().manual_seed(12)
    D, rows = 64, 9
    leaves = {"x": (rnd(g, rows, D, dtype=torch.float16), True),
              "weight": (rnd(g, 3 * D, D, std=D ** -0.5, dtype=torch.float16), False),
              "bias": (rnd(g, 3 * D, std=0.1, dtype=torch.float16), False),
              "lora_a": (rnd(g, 16, D, std=0.1), True), "lora_b": (rnd(g, 3 * D, 16, std=0.1), True)}

    def noah(x, weight, bias, lora_a, lora_b, seed):
        return L.lora_noah_qkv(x, weight, bias, lora_a, lora_b, rank=rank, scale=scale, dropout_p=0.1,
                               training=True, seed=seed)

    def noah_ref(x, weight, bias, lora_a, lora_b, seed):
        return L.lora_noah_qkv_ref(x, weight, bias, lora_a, lora_b, rank=rank, scale=scale, dropout_p=0.1, seed=seed)

    seed = torch.tensor([9], dtype=torch.int64)
    with backend("triton"):
        out, grads = fwd_bwd(noah, leaves, rnd(g, rows, 3 * D, dtype=torch.float16), seed=seed)
    assert grads["lora_a"].dtype == grads["lora_b"].dtype == torch.float32
    if rank < 16:
        assert not grads["lora_a"][rank:].any() and not grads["lora_b"][:, rank:].any()
    with backend("triton"):
        check_against(noah, noah_ref, leaves, rnd(g, rows, 3 * D, dtype=torch.float16), TOL[torch.float16],
                      seed=seed)


@pytest.mark.parametrize("method", ["petl q,v", "noah"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_lora_functionals_keep_no_factor_copies(method, dtype):
    """The LoRA functionals build A and B from their parameters (concatenated, placed in the qkv
    rows, scaled, cast) inside the op: autograd keeps the parameters and x and u, never those
    copies, which backward remakes (`_NoahLayout` / `_PetlLayout`); the gradients stay the reference's
    (test_lora_petl / test_lora_noah)."""
    g = torch.Generator().manual_seed(5)
    D, r = 64, 4
    x = rnd(g, 9, D, dtype=dtype).requires_grad_()
    weight, bias = rnd(g, 3 * D, D, std=D ** -0.5, dtype=dtype), rnd(g, 3 * D, std=0.1, dtype=dtype)
    # (fp32 parameters under fp16 x: the cast to x's dtype is one of the copies)
    if method == "noah":
        params = [rnd(g, 2 * r, D, std=0.02).requires_grad_(), rnd(g, 3 * D, 2 * r, std=0.02).requires_grad_()]
        call = lambda: L.lora_noah_qkv(x, weight, bias, *params, rank=r, scale=2.0, training=True)  # noqa: E731
    else:
        params = [rnd(g, *shape, std=0.1).requires_grad_() for shape in ((r, D), (r, D), (D, r), (D, r))]
        call = lambda: L.lora_petl_qkv(x, weight, bias, {"q": params[0], "v": params[1]},  # noqa: E731
                                       {"q": params[2], "v": params[3]}, scale=0.5, training=True)
    saved = []
    with backend("triton"), torch.autograd.graph.saved_tensors_hooks(lambda s: saved.append(s) or s, lambda s: s):
        out = call()
    kept = sorted(tuple(s.shape) for s in saved if s.numel() > 1 and not any(s is t for t in (x, weight, bias, *params)))
    assert kept == [(9, r if method == "noah" else 2 * r)], kept  # u [M, R] alone (petl: [u_q | u_v])
    out.float().square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


def _fact(x, weight, bias, fact_u, fact_v, core, layer, seed):
    return L.fact_linear(x, weight, bias, fact_u, fact_v, core, layer=layer, scale=10.0, dropout_p=0.1,
                         training=True, seed=seed)


def _fact_ref(x, weight, bias, fact_u, fact_v, core, layer, seed):
    return L.fact_linear_ref(x, weight, bias, fact_u, fact_v, core, layer=layer, scale=10.0, dropout_p=0.1, seed=seed)


FACT_SHAPES = {"qkv": (64, 192), "proj": (64, 64), "fc1": (64, 256), "fc2": (256, 64)}


@pytest.mark.parametrize("kind,layer,rows,dtype", [
    ("tt", "qkv", 7, torch.float32), ("tt", "proj", 1, torch.float32), ("tt", "fc1", 37, torch.float32),
    ("tt", "fc2", 7, torch.float32), ("tk", "fc1", 7, torch.float32), ("tk", "fc2", 7, torch.float32),
    ("tk", "qkv", 7, torch.float32), ("tt", "fc2", 7, torch.float16),
])
def test_fact(kind, layer, rows, dtype):
    g = torch.Generator().manual_seed(4)
    D, r = 64, 4
    din, dout = FACT_SHAPES[layer]
    leaves = {"x": (rnd(g, rows, din, dtype=dtype), True),
              "weight": (rnd(g, dout, din, std=din ** -0.5, dtype=dtype), False),
              "bias": (rnd(g, dout, std=0.1, dtype=dtype), False),
              "fact_u": (rnd(g, r, D, std=D ** -0.5, dtype=dtype), True),
              "fact_v": (rnd(g, D, r, std=0.1, dtype=dtype), True)}
    if kind == "tt":
        shape = {"qkv": (3 * r, r), "proj": (r, r), "fc1": (4 * r, r), "fc2": (r, 4 * r)}[layer]
        leaves["core"] = (rnd(g, *shape, std=0.5, dtype=dtype), True)
        grad = rnd(g, rows, dout, dtype=dtype)
        with backend("triton"):
            check_against(_fact, _fact_ref, leaves, grad, TOL[dtype], layer=layer,
                          seed=torch.tensor([6], dtype=torch.int64))
        return
    # TK: the cores (official interleave) are built from FacTc / FacTp inside the call.
    depth = 2
    leaves["fact_c"] = (rnd(g, r, r, r, std=0.5, dtype=dtype), True)
    leaves["fact_p"] = (rnd(g, r, 12 * depth, std=0.5, dtype=dtype), True)

    def tk(fn):
        def call(x, weight, bias, fact_u, fact_v, fact_c, fact_p, layer, seed):
            c = fact_tk_cores(fact_c, fact_p, 1)
            core = [c["q"], c["k"], c["v"]] if layer == "qkv" else c[layer]
            return fn(x, weight, bias, fact_u, fact_v, core, layer, seed)
        return call

    with backend("triton"):
        check_against(tk(_fact), tk(_fact_ref), leaves, rnd(g, rows, dout, dtype=dtype), TOL[dtype], layer=layer,
                      seed=torch.tensor([6], dtype=torch.int64))


def test_fact_tk_fc1_official_interleave():
    """TK fc1 delta exactly as the official fact_tk.py writes it (FacTc @ FacTp slice, reshape(r, 4r),
    activation viewed (4, r)), against the fused functional (dropout off)."""
    g = torch.Generator().manual_seed(5)
    D, r, rows = 64, 4, 7
    x, W = rnd(g, rows, D), rnd(g, 4 * D, D, std=D ** -0.5)
    U, V = rnd(g, r, D), rnd(g, D, r)
    c, p = rnd(g, r, r, r), rnd(g, r, 24)
    i = 1
    c8 = c @ p[:, 12 * i + 4:12 * i + 12]
    t = (x @ U.t()) @ c8[:, :, :4].reshape(r, 4 * r)            # u -> u @ core, right-multiplied
    official = x @ W.t() + (t.reshape(rows, 4, r) @ V.t()).reshape(rows, 4 * D) * 3.0
    with backend("triton"):
        got = L.fact_linear(x, W, None, U, V, fact_tk_cores(c, p, i)["fc1"], layer="fc1", scale=3.0)
    assert_close("fc1", got, official, TOL[torch.float32])


def _kad(x, weight, bias, rl1, rr1, rl2, rr2, ql, qr, b_shared, p, seed):
    return L.kadaptation_qkv(x, weight, bias, (rl1, rr1), (rl2, rr2), (ql, qr), (ql, qr), b_shared, scale=160.0,
                             q_mult=8.0, dropout_p=p, training=True, seed=seed)


def _kad_ref(x, weight, bias, rl1, rr1, rl2, rr2, ql, qr, b_shared, p, seed):
    return L.kadaptation_qkv_ref(x, weight, bias, (rl1, rr1), (rl2, rr2), (ql, qr), (ql, qr), b_shared, scale=160.0,
                                 q_mult=8.0, dropout_p=p, seed=seed)


@pytest.mark.parametrize("rows,p,x_grad", [(7, 0.0, True), (37, 0.5, True), (37, 0.5, False)])
def test_kadaptation(rows, p, x_grad):
    """n = 8 Kronecker terms of [8, 8] (x) [8, 8] on D = 64; official-style rank-1 factors (v uses
    the q factors). p = 0: the fused rank-2R kernel; p = 0.5: the dense-H path (dropout on H),
    also where x needs no gradient (a first block's input: the H are then not saved)."""
    g = torch.Generator().manual_seed(6)
    n, m, D = 8, 8, 64
    leaves = {"x": (rnd(g, rows, D), x_grad), "weight": (rnd(g, 3 * D, D, std=D ** -0.5), False),
              "bias": (rnd(g, 3 * D, std=0.1), False),
              "rl1": (rnd(g, n, n, 1, std=0.1), True), "rr1": (rnd(g, n, 1, n, std=0.1), True),
              "rl2": (rnd(g, n, n, 1, std=0.1), True), "rr2": (rnd(g, n, 1, n, std=0.1), True),
              "ql": (rnd(g, n, m, 1, std=0.1), True), "qr": (rnd(g, n, 1, m, std=0.1), True),
              "b_shared": (rnd(g, D, std=0.1), True)}
    with backend("triton"):
        out = check_against(_kad, _kad_ref, leaves, rnd(g, rows, 3 * D), TOL[torch.float32], p=p,
                            seed=torch.tensor([21], dtype=torch.int64))
    x, w, b = leaves["x"][0], leaves["weight"][0], leaves["bias"][0]
    assert_close("k", out[:, D:2 * D], (x @ w.t() + b)[:, D:2 * D], TOL[torch.float32])


def test_kron_factors_match_dense_kron():
    g = torch.Generator().manual_seed(7)
    n, m, k1, k2 = 4, 6, 2, 3
    rl, rr, wl, wr = rnd(g, n, n, k1), rnd(g, n, k1, n), rnd(g, n, m, k2), rnd(g, n, k2, m)
    dn, up = L.kron_factors(rl, rr, wl, wr)
    assert dn.shape == (n * k1 * k2, n * m)
    assert_close("H", dn.t() @ up, L.kron_sum_ref(rl, rr, wl, wr), TOL[torch.float32])


def test_philox_mask_matches_dropout_keep_mask():
    """The [M, R] rank-dropout mask the kernels draw is `dropout_keep_mask(seed, M, R, p)`."""
    rows, d, r, p = 7, 64, 8, 0.5
    g = torch.Generator().manual_seed(8)
    x, a = rnd(g, rows, d), rnd(g, r, d)
    seed = torch.tensor([31], dtype=torch.int64)
    with backend("triton"):
        _, u = torch.ops.fastpeft.lowrank_linear(x, rnd(g, 16, d), None, a, rnd(g, 16, r), p, seed, False)
    keep = dropout_keep_mask(seed, rows, r, p)
    assert torch.equal(u != 0, keep)


# ----------------------------------------------------------------------------------------------
# Ahead-of-time compile: one small config per kernel for sm_80 and sm_90, no spills
# ----------------------------------------------------------------------------------------------
AOT_KERNELS = ("lowrank_down", "lowrank_down_indrop", "lowrank_gemm", "lowrank_gemm_dx", "lowrank_gemm_dx_drop",
               "lowrank_dw", "lowrank_rows_down", "lowrank_rows_down_indrop", "lowrank_rows_lr", "lowrank_rows_dw")


def test_aot_smoke(tmp_path):
    check_aot_smoke(tmp_path, AOT_KERNELS)
