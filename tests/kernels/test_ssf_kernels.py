"""SSF family (fastpeft/ops/ssf.py, kernels/ssf.py) against the plain-torch references.

Kernels run through the Triton interpreter on CPU (backend "triton"); the torch fallback
(backend "torch") is checked the same way. fp32 and fp16 go through the kernels; bf16 only
through the torch path, because the interpreter's bf16 emulation is unreliable (engineering
guide §3) — its numerics are compared with the fp32-upcast reference. Rows 1, 7, 37 (never a
multiple of a block), widths 192/384/768/1024 and odd ones (200, 1000, 3072) on a subset.
"""
from __future__ import annotations

import pytest
import torch

import fastpeft.ops.ssf as K
from fastpeft.kernels import backend
from tests.kernels.conftest import INTERPRETING, assert_close

pytestmark = pytest.mark.usefixtures("needs_interpreter_unless_gpu")

# vs the fp32-upcast reference; atol is scaled by max(1, max|reference|) (column sums grow with rows)
TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-4),
    torch.float16: dict(atol=4e-3, rtol=4e-3),
    torch.bfloat16: dict(atol=3e-2, rtol=2e-2),
}

SHAPES = [(1, 192), (7, 384), (37, 768), (7, 1024), (37, 200), (5, 1000)]
SHAPE_IDS = [f"M{m}-D{d}" for m, d in SHAPES]


def params(d, dtype, seed=0, n=2):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        center = 1.0 if i % 2 == 0 else 0.0
        out.append((center + 0.1 * torch.randn(d, generator=g)).to(dtype))
    return out


def fwd_bwd(fn, tensors, grad, **kw):
    """fn(*leaves, **kw) -> (out, [grad of each leaf or None])."""
    leaves = [t.clone().requires_grad_(True) if t is not None else None for t in tensors]
    out = fn(*leaves, **kw)
    out.backward(grad)
    return out.detach(), [t.grad if t is not None else None for t in leaves]


def check(fn, ref, tensors, grad, dtype, names, **kw):
    out, grads = fwd_bwd(fn, tensors, grad, **kw)
    ref_out, ref_grads = fwd_bwd(ref, [t.float() if t is not None else None for t in tensors],
                                 grad.float(), **kw)
    assert out.dtype == dtype and out.shape == tensors[0].shape and out.is_contiguous()
    assert_close("out", out, ref_out, TOL[dtype])
    for name, g, rg in zip(names, grads, ref_grads):
        if rg is None:
            assert g is None
            continue
        assert g.dtype == dtype, name
        assert_close(f"grad {name}", g, rg, TOL[dtype])


BACKENDS = [(torch.float32, "triton"), (torch.float32, "torch"), (torch.float16, "triton"),
            (torch.bfloat16, "torch")]
BACKEND_IDS = ["fp32-triton", "fp32-torch", "fp16-triton", "bf16-torch"]


# ---- ssf: y = x * γ + β ---------------------------------------------------------------------

@pytest.mark.parametrize("dtype,which", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("m,d", SHAPES[:4], ids=SHAPE_IDS[:4])
def test_ssf(m, d, dtype, which):
    x = torch.randn(m, d).to(dtype)
    grad = torch.randn(m, d).to(dtype)
    with backend(which):
        check(K.ssf, K.ssf_ref, [x, *params(d, dtype)], grad, dtype, ["x", "scale", "shift"])


# ---- ssf_gelu: g = GELU(z * γ + β) ------------------------------------------------------------

@pytest.mark.parametrize("dtype,which", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("m,d", [(7, 3072), (37, 200), (1, 768)], ids=["M7-D3072", "M37-D200", "M1-D768"])
def test_ssf_gelu(m, d, dtype, which):
    z = (2 * torch.randn(m, d)).to(dtype)
    grad = torch.randn(m, d).to(dtype)
    with backend(which):
        check(K.ssf_gelu, K.ssf_gelu_ref, [z, *params(d, dtype)], grad, dtype, ["z", "scale", "shift"])


# ---- layernorm_ssf: y = LN(x; a, c) * γ + β -------------------------------------------------

@pytest.mark.parametrize("dtype,which", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("m,d", SHAPES, ids=SHAPE_IDS)
def test_layernorm_ssf(m, d, dtype, which):
    x = (3 * torch.randn(m, d) + 0.5).to(dtype)
    grad = torch.randn(m, d).to(dtype)
    lnw, lnb, scale, shift = params(d, dtype, n=4)
    with backend(which):
        check(K.layernorm_ssf, K.layernorm_ssf_ref, [x, lnw, lnb, scale, shift], grad, dtype,
              ["x", "ln_weight", "ln_bias", "scale", "shift"], eps=1e-6)


@pytest.mark.parametrize("which", ["triton", "torch"])
def test_layernorm_ssf_without_ln_affine_and_frozen_ln(which):
    m, d = 7, 192
    x = torch.randn(m, d)
    grad = torch.randn(m, d)
    scale, shift = params(d, torch.float32)
    with backend(which):
        check(K.layernorm_ssf, K.layernorm_ssf_ref, [x, None, None, scale, shift], grad, torch.float32,
              ["x", "ln_weight", "ln_bias", "scale", "shift"], eps=1e-5)
        # frozen LN affine (the SSF setting): no grads for a, c; grads for x, γ, β still exact
        lnw, lnb = params(d, torch.float32, seed=1)
        xs = x.clone().requires_grad_(True)
        sc, sh = scale.clone().requires_grad_(True), shift.clone().requires_grad_(True)
        K.layernorm_ssf(xs, lnw, lnb, sc, sh).backward(grad)
    xr = x.clone().requires_grad_(True)
    scr, shr = scale.clone().requires_grad_(True), shift.clone().requires_grad_(True)
    K.layernorm_ssf_ref(xr, lnw, lnb, scr, shr).backward(grad)
    for got, want in ((xs.grad, xr.grad), (sc.grad, scr.grad), (sh.grad, shr.grad)):
        assert_close("grad", got, want, TOL[torch.float32])


def test_leading_dims_noncontiguous_and_empty():
    d = 384
    x = torch.randn(2, 5, 3, d).transpose(1, 2)
    lnw, lnb, scale, shift = params(d, torch.float32, n=4)
    with backend("triton"):
        y = K.layernorm_ssf(x, lnw, lnb, scale, shift)
        s = K.ssf(x, scale, shift)
        e = K.layernorm_ssf(x[:0], lnw, lnb, scale, shift)
        eg = K.ssf_gelu(x[:0], scale, shift)
    assert_close("ln", y, K.layernorm_ssf_ref(x, lnw, lnb, scale, shift), TOL[torch.float32])
    assert_close("ssf", s, K.ssf_ref(x, scale, shift), TOL[torch.float32])
    assert y.shape == x.shape and e.shape == (0, 3, 5, d) and eg.shape == (0, 3, 5, d)


def test_params_cast_to_activation_dtype():
    x = torch.randn(7, 192, dtype=torch.float16)
    scale, shift = params(192, torch.float32)
    scale.requires_grad_(True)
    with backend("triton"):
        y = K.ssf(x, scale, shift)
        y.float().sum().backward()
    assert y.dtype == torch.float16 and scale.grad.dtype == torch.float32


# ---- memory: what autograd keeps -----------------------------------------------------------

def _saved_activation_shapes(fn, *args, **kw):
    saved = []
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fn(*args, **kw)
    ptrs = {p.data_ptr() for p in leaves[1:]}
    return [(tuple(t.shape), t.dtype) for t in saved if t.data_ptr() not in ptrs]


def test_saved_tensors():
    m, d = 7, 384
    x = torch.randn(m, d, requires_grad=True)
    lnw, lnb, scale, shift = (p.requires_grad_(True) for p in params(d, torch.float32, n=4))
    # layernorm_ssf: x and fp32 mean/rstd only (eager LN + mul + add also saves the LN output)
    assert sorted(_saved_activation_shapes(K.layernorm_ssf, x, lnw, lnb, scale, shift), key=str) == \
        sorted([((m, d), torch.float32), ((m,), torch.float32), ((m,), torch.float32)], key=str)
    # ssf_gelu: z only (eager saves z, z*γ+β for GELU)
    assert _saved_activation_shapes(K.ssf_gelu, x, scale, shift) == [((m, d), torch.float32)]
    assert _saved_activation_shapes(K.ssf, x, scale, shift) == [((m, d), torch.float32)]


# ---- custom-op machinery ---------------------------------------------------------------

@pytest.mark.parametrize("which", ["torch", "triton"])
def test_opcheck(which):
    m, d = 7, 200
    x = torch.randn(m, d, requires_grad=True)
    lnw, lnb, scale, shift = (p.requires_grad_(True) for p in params(d, torch.float32, n=4))
    with backend(which):
        torch.library.opcheck(torch.ops.fastpeft.scale_shift.default, (x, scale, shift))
        torch.library.opcheck(torch.ops.fastpeft.ssf_gelu.default, (x, scale, shift))
        torch.library.opcheck(torch.ops.fastpeft.layernorm_ssf.default, (x, lnw, lnb, scale, shift, 1e-6))
        torch.library.opcheck(torch.ops.fastpeft.layernorm_ssf.default, (x, None, None, scale, shift, 1e-6))


def test_torch_compile_fullgraph_traces_the_ops():
    d = 192
    lnw, lnb, g1, b1, g2, b2 = params(d, torch.float32, n=6)

    def block(x, lnw, lnb, g1, b1, g2, b2):
        h = K.layernorm_ssf(x, lnw, lnb, g1, b1)
        return K.ssf(K.ssf_gelu(h, g2, b2), g1, b2)

    args = [torch.randn(7, d), lnw, lnb, g1, b1, g2, b2]
    args = [a.clone().requires_grad_(True) for a in args]
    out = torch.compile(block, fullgraph=True, backend="aot_eager")(*args)
    out.sum().backward()
    ref_args = [a.detach().clone().requires_grad_(True) for a in args]
    block(*ref_args).sum().backward()
    for a, b in zip(args, ref_args):
        torch.testing.assert_close(a.grad, b.grad)


# ---- errors -------------------------------------------------------------------------------

def test_bad_arguments_raise_value_error():
    x = torch.randn(7, 192)
    scale, shift = params(192, torch.float32)
    with pytest.raises(ValueError, match=r"scale must have shape \(192,\)"):
        K.ssf(x, torch.ones(191), shift)
    with pytest.raises(ValueError, match=r"shift must be 1-D|shift must have shape"):
        K.ssf_gelu(x, scale, torch.ones(1, 192))
    with pytest.raises(ValueError, match=r"unsupported dtype torch.int64"):
        K.ssf(torch.ones(7, 192, dtype=torch.int64), scale, shift)
    with pytest.raises(ValueError, match=r"device mismatch"):
        K.ssf(x, scale.to("meta"), shift)
    with pytest.raises(ValueError, match=r"ln_weight must have shape"):
        K.layernorm_ssf(x, torch.ones(10), None, scale, shift)
    with pytest.raises(ValueError, match=r"exceeds the supported maximum 8192"):
        K.layernorm_ssf(torch.randn(2, 8200), None, None, torch.ones(8200), torch.zeros(8200))
    with pytest.raises(ValueError, match=r"eps must be > 0"):
        K.layernorm_ssf(x, None, None, scale, shift, eps=0.0)
    # launchers validate on their own too
    with pytest.raises(ValueError, match=r"dtype mismatch"):
        K.ssf_fwd(x, scale.half(), shift, 0)


# ---- linear_ssf: y = act(linear(x; W, b) * γ + β) for a frozen W, b --------------------------

def _linear_args(dtype, k=96, n=200, seed=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 7, k, generator=g).to(dtype)
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(dtype)
    b = (0.1 * torch.randn(n, generator=g)).to(dtype)
    return x, w, b, *params(n, dtype, seed=seed)


@pytest.mark.parametrize("act", [0, 1], ids=["none", "gelu"])
@pytest.mark.parametrize("dtype,which", BACKENDS, ids=BACKEND_IDS)
def test_linear_ssf(act, dtype, which):
    x, w, b, scale, shift = _linear_args(dtype)
    grad = torch.randn(2, 7, 200).to(dtype)
    # the reference: torch's Linear in the same dtype, then the fp32 scale-shift (+ GELU)
    with backend(which):
        out, grads = fwd_bwd(lambda x, s, t: K.linear_ssf(x, w, b, s, t, act), [x, scale, shift], grad)
    ref_out, ref_grads = fwd_bwd(lambda x, s, t: K.linear_ssf_ref(x, w, b, s, t, act), [x, scale, shift], grad)
    assert out.dtype == dtype and out.shape == (2, 7, 200) and out.is_contiguous()
    assert_close("out", out, ref_out, TOL[dtype])
    for name, g, rg in zip(["x", "scale", "shift"], grads, ref_grads):
        assert g.dtype == dtype, name
        assert_close(f"grad {name}", g, rg, TOL[dtype])


def test_linear_ssf_is_one_autograd_node_over_a_frozen_linear():
    x, w, b, scale, shift = _linear_args(torch.float32)
    x.requires_grad_(True)
    with backend("triton"):
        y = K.linear_ssf(x, w, b, scale.requires_grad_(True), shift.requires_grad_(True), 1)
    assert type(y.grad_fn).__name__ == "_LinearSSFFunctionBackward"
    assert y.grad_fn.next_functions[0][0] is not None and y.grad_fn.next_functions[0][0].variable is x
    # what it keeps besides the parameters: the Linear's output only (as Linear + ssf_gelu)
    saved = []
    with backend("triton"), torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        K.linear_ssf(x, w, b, scale, shift, 1)
    params = {t.data_ptr() for t in (w, b, scale, shift)}
    assert [(tuple(t.shape), t.dtype) for t in saved if t.data_ptr() not in params] == [((2, 7, 200), torch.float32)]


@pytest.mark.parametrize("which", ["triton", "torch"])
def test_linear_ssf_trainable_weight_and_autocast_take_the_separate_ops(which):
    x, w, b, scale, shift = _linear_args(torch.float32)
    grad = torch.randn(2, 7, 200)
    with backend(which):
        out, grads = fwd_bwd(lambda x, w, b, s, t: K.linear_ssf(x, w, b, s, t, 0), [x, w, b, scale, shift], grad)
    ref_out, ref_grads = fwd_bwd(lambda x, w, b, s, t: K.linear_ssf_ref(x, w, b, s, t, 0),
                                 [x, w, b, scale, shift], grad)
    assert_close("out", out, ref_out, TOL[torch.float32])
    for name, g, rg in zip(["x", "weight", "bias", "scale", "shift"], grads, ref_grads):
        assert_close(f"grad {name}", g, rg, TOL[torch.float32])
    with backend(which), torch.autocast("cpu", dtype=torch.bfloat16):
        y = K.linear_ssf(x, w, b, scale, shift, 0)
        ref = K.linear_ssf_ref(x, w, b, scale, shift, 0)
    assert y.dtype == ref.dtype == torch.bfloat16
    assert_close("autocast out", y, ref, TOL[torch.bfloat16])


def test_linear_ssf_bad_arguments_raise_before_a_launch(monkeypatch):
    import fastpeft.ops.ssf as ops

    monkeypatch.setattr(ops, "launch_ssf_fwd", lambda *a: pytest.fail("launched with bad arguments"))
    x, w, b, scale, shift = _linear_args(torch.float32)
    with backend("triton"):
        with pytest.raises(ValueError, match=r"weight must be \[N, 96\]"):
            K.linear_ssf(x, torch.ones(200, 95), b, scale, shift)
        with pytest.raises(ValueError, match=r"scale must have shape \(200,\)"):
            K.linear_ssf(x, w, b, torch.ones(199), shift)
        with pytest.raises(ValueError, match=r"bias must have shape \(200,\)"):
            K.linear_ssf(x, w, torch.ones(3), scale, shift)
        with pytest.raises(ValueError, match=r"dtype mismatch"):
            K.linear_ssf(x, w.half(), b, scale, shift)
        with pytest.raises(ValueError, match=r"device mismatch"):
            K.linear_ssf(x, w, b, scale, shift.to("meta"))
        with pytest.raises(ValueError, match=r"act code 2"):
            K.linear_ssf(x, w, b, scale, shift, 2)
        with pytest.raises(TypeError, match=r"x must be a torch.Tensor"):
            K.linear_ssf([1.0], w, b, scale, shift)


def test_linear_ssf_checks_again_when_a_dtype_or_device_changes():
    import fastpeft.ops.ssf as ops

    x, w, b, scale, shift = _linear_args(torch.float32)
    with backend("torch"):
        K.linear_ssf(x, w, b, scale, shift)  # a checked signature
        with pytest.raises(ValueError, match=r"dtype mismatch"):
            K.linear_ssf(x.half(), w, b, scale, shift)  # the weight stayed fp32
        with pytest.raises(ValueError, match=r"device mismatch"):
            K.linear_ssf(x, w, b.to("meta"), scale, shift)
    assert ops._CHECKED.seen(ops._CHECKED.key(x, w, b, scale, shift, extra=("linear_ssf",)))


# ---- compiled kernels on a GPU (skipped without one; run with TRITON_INTERPRET=0) ------------

@pytest.mark.gpu
@pytest.mark.skipif(INTERPRETING, reason="needs compiled Triton kernels: run with TRITON_INTERPRET=0")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d", [768, 1000, 3072])
def test_gpu_matches_reference(dtype, d):
    m = 2 * 197 + 1
    x = (2 * torch.randn(m, d, device="cuda")).to(dtype)
    grad = torch.randn(m, d, device="cuda").to(dtype)
    lnw, lnb, scale, shift = (p.cuda() for p in params(d, dtype, n=4))
    check(K.ssf, K.ssf_ref, [x, scale, shift], grad, dtype, ["x", "scale", "shift"])
    check(K.ssf_gelu, K.ssf_gelu_ref, [x, scale, shift], grad, dtype, ["z", "scale", "shift"])
    check(K.layernorm_ssf, K.layernorm_ssf_ref, [x, lnw, lnb, scale, shift], grad, dtype,
          ["x", "ln_weight", "ln_bias", "scale", "shift"], eps=1e-6)
