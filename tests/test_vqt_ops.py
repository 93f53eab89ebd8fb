"""fastpeft.ops.vqt (query-only attention, aggregate) against the plain-torch references (CPU).

With the extension built these exercise the C++ CPU kernels, i.e. the host/device math header
(csrc/include/fastpeft/vqt.h) the CUDA kernels also compile; without it, the registered
references.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from fastpeft import _ext
from fastpeft.ops import vqt_aggregate, vqt_aggregate_ref, vqt_query_attention, vqt_query_attention_ref
from fastpeft.ops.vqt import SCHEMAS, vqt_aggregate_backward_ref, vqt_query_attention_backward_ref

# (atol, rtol) of the op's out / grad_q against the reference computed in fp32 on the same
# (upcast) inputs. The kernels accumulate in fp32 and round each output once, so low precision
# is off by about half an ulp of |out| <= max|v| (2**-11 fp16, 2**-8 bf16) plus the fp32
# reordering error (~1e-6 relative). lse is fp32 for every dtype: LSE_TOL.
TOLERANCES = {
    torch.float32: (2e-5, 2e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}
LSE_TOL = (2e-5, 2e-5)

# (B, H, Q, N, d): Q 1/7/64, N 5/197/1025 (1025 only for small B*H), d 32/64/128, plus odd
# sizes (d 40, N 65 = one key past a tile) and the [B, 1, H*Q, D=768] shape of the fused VQT
# block's backward (fastpeft/fused/vqt.py).
SHAPES = [
    (1, 1, 1, 5, 32),
    (2, 3, 7, 197, 64),
    (1, 2, 64, 5, 128),
    (2, 1, 7, 1025, 32),
    (1, 1, 64, 1025, 64),
    (3, 2, 1, 197, 128),
    (2, 3, 1, 65, 40),
    (2, 1, 12, 197, 768),
]


def _ext_has_vqt_kernels() -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key("fastpeft::vqt_query_attention", "CPU")


def _attention_inputs(shape, dtype, generator, strided_kv=False):
    B, H, Q, N, d = shape
    q = torch.randn(B, H, Q, d, generator=generator).to(dtype)
    if strided_kv:  # views of a timm qkv output [B, N, 3, H, d], as the fused VQT block passes
        qkv = torch.randn(B, N, 3, H, d, generator=generator).to(dtype)
        k, v = qkv[:, :, 1].transpose(1, 2), qkv[:, :, 2].transpose(1, 2)
    else:
        k = torch.randn(B, H, N, d, generator=generator).to(dtype)
        v = torch.randn(B, H, N, d, generator=generator).to(dtype)
    grad_out = torch.randn(B, H, Q, d, generator=generator).to(dtype)
    return q, k, v, grad_out


def _run(fn, q, k, v, grad_out, scale):
    q = q.detach().clone().requires_grad_()
    out, lse = fn(q, k, v, scale)
    out.backward(grad_out)
    return out.detach(), lse.detach(), q.grad


@pytest.mark.skipif(not _ext.load().available, reason="extension not loaded")
def test_the_extension_provides_the_cpu_kernels():
    # Otherwise every test below silently checks the reference against itself: rebuild.
    assert _ext_has_vqt_kernels(), "fastpeft._C predates the VQT ops: `make build`"
    ops = torch.ops.fastpeft
    for qualname in SCHEMAS:
        op = getattr(ops, qualname.split("::")[1]).default
        assert str(op._schema) == qualname + SCHEMAS[qualname]


@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_attention_matches_reference(shape, dtype, generator):
    q, k, v, grad_out = _attention_inputs(shape, dtype, generator)
    scale = shape[-1] ** -0.5
    out, lse, grad_q = _run(vqt_query_attention, q, k, v, grad_out, scale)
    r_out, r_lse, r_grad = _run(vqt_query_attention_ref, q.float(), k.float(), v.float(), grad_out.float(), scale)
    atol, rtol = TOLERANCES[dtype]
    assert out.dtype == dtype and grad_q.dtype == dtype and lse.dtype == torch.float32
    assert out.shape == q.shape and lse.shape == q.shape[:3] and out.is_contiguous()
    torch.testing.assert_close(out.float(), r_out, atol=atol, rtol=rtol)
    torch.testing.assert_close(lse, r_lse, atol=LSE_TOL[0], rtol=LSE_TOL[1])
    # grad_q sums N terms of size |k| * |dp|: scale the tolerance with its magnitude.
    torch.testing.assert_close(grad_q.float(), r_grad, atol=atol * r_grad.abs().max().item(), rtol=rtol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_strided_keys_values_and_query(dtype, generator):
    q, k, v, grad_out = _attention_inputs((2, 4, 5, 70, 16), dtype, generator, strided_kv=True)
    assert not k.is_contiguous() and k.stride(-1) == 1
    q = q.transpose(2, 3).contiguous().transpose(2, 3)  # non-contiguous q
    out, lse, grad_q = _run(vqt_query_attention, q, k, v, grad_out, 0.3)
    r_out, r_lse, r_grad = _run(vqt_query_attention_ref, q.float(), k.float(), v.float(), grad_out.float(), 0.3)
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(out.float(), r_out, atol=atol, rtol=rtol)
    torch.testing.assert_close(grad_q.float(), r_grad, atol=atol * r_grad.abs().max().item(), rtol=rtol)
    # A non-unit stride on the head dim is copied, not misread.
    k2 = k.float().transpose(-1, -2).contiguous().transpose(-1, -2).to(dtype)
    torch.testing.assert_close(vqt_query_attention(q, k2, v, 0.3)[0], out)


def test_gradient_through_lse(generator):
    q, k, v, grad_out = _attention_inputs((2, 3, 4, 33, 8), torch.float32, generator)

    def loss(fn):
        qq = q.clone().requires_grad_()
        out, lse = fn(qq, k, v, 0.5)
        ((out * grad_out).sum() + (lse * lse).sum()).backward()
        return qq.grad

    torch.testing.assert_close(loss(vqt_query_attention), loss(vqt_query_attention_ref), atol=1e-5, rtol=1e-5)


def test_backward_op_matches_reference_backward(generator):
    q, k, v, grad_out = _attention_inputs((2, 2, 3, 40, 16), torch.float32, generator)
    _, lse = vqt_query_attention_ref(q, k, v, 0.25)
    delta = torch.randn(2, 2, 3, generator=generator)
    got = torch.ops.fastpeft.vqt_query_attention_backward(grad_out, q, k, v, lse, delta, 0.25)
    want = vqt_query_attention_backward_ref(grad_out, q, k, v, lse, delta, 0.25)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_reference_backward_is_the_reference_forward_gradient(generator):
    # The backward reference is what runs without the extension: pin it to autograd.
    q, k, v, grad_out = _attention_inputs((2, 2, 3, 9, 8), torch.float32, generator)
    out, lse, want = _run(vqt_query_attention_ref, q, k, v, grad_out, 0.7)
    delta = (grad_out * out).sum(-1)
    torch.testing.assert_close(vqt_query_attention_backward_ref(grad_out, q, k, v, lse, delta, 0.7), want)


def test_large_logits_are_stable(generator):
    # Softmax over logits ~ +-1e3: the online max subtraction must keep everything finite.
    q, k, v, grad_out = _attention_inputs((1, 2, 3, 100, 16), torch.float32, generator)
    out, lse, grad_q = _run(vqt_query_attention, q * 40, k, v, grad_out, 1.0)
    r_out, r_lse, r_grad = _run(vqt_query_attention_ref, q * 40, k, v, grad_out, 1.0)
    assert torch.isfinite(out).all() and torch.isfinite(grad_q).all()
    torch.testing.assert_close(out, r_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, r_lse, atol=1e-4, rtol=1e-6)
    # Logits ~1e3 carry ~6e-5 absolute fp32 rounding, which p (nearly one-hot) inherits.
    torch.testing.assert_close(grad_q, r_grad, atol=1e-3 * r_grad.abs().max().item(), rtol=1e-3)


def test_empty_batch():
    q, k = torch.zeros(0, 2, 3, 8), torch.zeros(0, 2, 5, 8)
    out, lse = vqt_query_attention(q, k, k)
    assert out.shape == (0, 2, 3, 8) and lse.shape == (0, 2, 3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck_attention(dtype, generator):
    q, k, v, _ = _attention_inputs((2, 3, 5, 11, 8), dtype, generator)
    op = torch.ops.fastpeft.vqt_query_attention.default
    torch.library.opcheck(op, (q.requires_grad_(), k, v, 0.35))
    torch.library.opcheck(op, (q.detach(), k.transpose(0, 1).contiguous().transpose(0, 1), v, 0.35))
    _, lse = vqt_query_attention_ref(q.detach(), k, v, 0.35)
    delta = torch.randn(2, 3, 5, generator=generator)
    torch.library.opcheck(torch.ops.fastpeft.vqt_query_attention_backward.default,
                          (torch.randn_like(q.detach()), q.detach(), k, v, lse, delta, 0.35))


# --- aggregate -----------------------------------------------------------------------------

AGG_SHAPES = [(1, 3, 1, 1), (2, 64, 3, 7), (4, 768, 12, 1), (3, 40, 2, 5)]  # (B, D, L, Q)


def _aggregate_inputs(shape, dtype, generator):
    B, D, L, Q = shape
    cls = torch.randn(B, D, generator=generator).to(dtype)
    queries = torch.randn(L, B, Q, D, generator=generator).to(dtype)
    grad = torch.randn(B, D * (1 + L * Q), generator=generator).to(dtype)
    return cls, queries, grad


def _run_aggregate(fn, cls, queries, grad):
    cls, queries = cls.detach().clone().requires_grad_(), queries.detach().clone().requires_grad_()
    out = fn(cls, queries)
    out.backward(grad)
    return out.detach(), cls.grad, queries.grad


def _features(cls, queries):
    # The method's own definition (fastpeft/methods/vqt.py): F.normalize per piece, then cat.
    from fastpeft.methods.vqt import vqt_features

    return vqt_features(cls, list(queries.unbind(0)))


@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
@pytest.mark.parametrize("shape", AGG_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_aggregate_matches_reference(shape, dtype, generator):
    cls, queries, grad = _aggregate_inputs(shape, dtype, generator)
    got = _run_aggregate(vqt_aggregate, cls, queries, grad)
    want = _run_aggregate(_features, cls.float(), queries.float(), grad.float())
    atol, rtol = TOLERANCES[dtype]
    for name, g, w in zip(("out", "grad_cls", "grad_queries"), got, want):
        assert g.dtype == dtype and g.shape == w.shape, name
        torch.testing.assert_close(g.float(), w, atol=atol * max(1.0, w.abs().max().item()), rtol=rtol,
                                   msg=lambda m: f"{name}: {m}")


def test_aggregate_zero_segment_and_list_input(generator):
    cls, queries, grad = _aggregate_inputs((3, 16, 2, 2), torch.float32, generator)
    cls[1] = 0.0  # below eps: y = x / eps, grad = g / eps (F.normalize's clamp_min)
    queries[1, 2] = 1e-14
    got = _run_aggregate(lambda c, q: vqt_aggregate(c, list(q.unbind(0))), cls, queries, grad)
    want = _run_aggregate(_features, cls, queries, grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-5)


def test_aggregate_reference_pair_is_consistent(generator):
    cls, queries, grad = _aggregate_inputs((2, 8, 3, 2), torch.float32, generator)
    out, norms = vqt_aggregate_ref(cls, queries)
    _, g_cls, g_q = _run_aggregate(_features, cls, queries, grad)
    got = vqt_aggregate_backward_ref(grad, out, norms, 2, 1e-12)
    torch.testing.assert_close(got[0], g_cls)
    torch.testing.assert_close(got[1], g_q)
    torch.testing.assert_close(norms[:, 0], cls.norm(dim=1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck_aggregate(dtype, generator):
    cls, queries, grad = _aggregate_inputs((2, 8, 3, 2), dtype, generator)
    torch.library.opcheck(torch.ops.fastpeft.vqt_aggregate.default,
                          (cls.requires_grad_(), queries.requires_grad_(), 1e-12))
    out, norms = vqt_aggregate_ref(cls.detach(), queries.detach())
    torch.library.opcheck(torch.ops.fastpeft.vqt_aggregate_backward.default, (grad, out, norms, 2, 1e-12))


# --- errors --------------------------------------------------------------------------------

def _qkv(q=(2, 3, 4, 8), k=(2, 3, 5, 8), v=None, **kw):
    return torch.randn(*q, **kw), torch.randn(*k, **kw), torch.randn(*(v or k), **kw)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: _qkv(k=(2, 3, 5, 16)), "head dims differ"),
        (lambda: _qkv(v=(2, 3, 5, 16)), "head dims differ"),
        (lambda: _qkv(v=(2, 3, 6, 8)), "different lengths"),
        (lambda: _qkv(k=(2, 2, 5, 8), v=(2, 2, 5, 8)), "batch/heads differ"),
        (lambda: _qkv(k=(2, 3, 0, 8), v=(2, 3, 0, 8)), "at least one key"),
        (lambda: (torch.randn(3, 4, 8),) + _qkv()[1:], "must be 4-D"),
        (lambda: (torch.randn(2, 3, 4, 8),) + _qkv(device="meta")[1:], "device mismatch"),
        (lambda: (torch.randn(2, 3, 4, 8).half(),) + _qkv()[1:], "dtype mismatch"),
        (lambda: tuple(t.double() for t in _qkv()), "unsupported dtype"),
        (lambda: (torch.randn(2, 3, 4, 8), torch.randn(2, 3, 5, 8, requires_grad=True), torch.randn(2, 3, 5, 8)),
         "frozen"),
    ],
    ids=["k_dim", "v_dim", "lengths", "heads", "no_keys", "rank", "device", "dtype", "float64", "k_grad"],
)
def test_attention_errors(make, message):
    with pytest.raises(ValueError, match=message):
        vqt_query_attention(*make())


def test_direct_op_call_with_bad_shapes_is_refused_by_the_kernel():
    # Bypassing the functional still cannot read out of bounds: the C++ checks (TORCH_CHECK_VALUE) and
    # the reference ops' checks raise a ValueError naming the shapes.
    q, k, v = _qkv(v=(2, 3, 6, 8))
    with pytest.raises(ValueError, match="shape|lengths"):
        torch.ops.fastpeft.vqt_query_attention(q, k, v, 1.0)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((torch.randn(2, 8), torch.randn(3, 2, 1, 4)), r"must be \[L, B, Q, D\]"),
        ((torch.randn(2, 8), torch.randn(3, 5, 1, 8)), r"must be \[L, B, Q, D\]"),
        ((torch.randn(2, 8), torch.randn(3, 2, 1, 8, device="meta")), "device mismatch"),
        ((torch.randn(2, 8), torch.randn(3, 2, 1, 8).bfloat16()), "dtype mismatch"),
        ((torch.randn(2, 8), [torch.randn(2, 1, 8), torch.randn(2, 2, 8)]), "one shape"),
        ((torch.randn(2, 8), torch.randn(3, 2, 0, 8)), "at least one query"),
    ],
    ids=["dim", "batch", "device", "dtype", "ragged_list", "no_queries"],
)
def test_aggregate_errors(args, message):
    with pytest.raises(ValueError, match=message):
        vqt_aggregate(*args)


# --- no extension --------------------------------------------------------------------------

FALLBACK_SCRIPT = textwrap.dedent(
    """
    import json, warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import torch
        from fastpeft.ops import vqt_query_attention, vqt_query_attention_ref, vqt_aggregate
        torch.manual_seed(0)
        q = torch.randn(2, 3, 4, 8, requires_grad=True)
        k, v = torch.randn(2, 3, 9, 8), torch.randn(2, 3, 9, 8)
        out, lse = vqt_query_attention(q, k, v)
        out.sum().backward()
        q2 = q.detach().clone().requires_grad_()
        r_out, r_lse = vqt_query_attention_ref(q2, k, v, 8 ** -0.5)
        r_out.sum().backward()
        atol, rtol = %r
        close = (torch.allclose(out, r_out, atol=atol, rtol=rtol)
                 and torch.allclose(q.grad, q2.grad, atol=atol * q2.grad.abs().max().item(), rtol=rtol))
        feats = vqt_aggregate(torch.randn(2, 8), torch.randn(3, 2, 1, 8))
    print(json.dumps({
        "warnings": [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)],
        "loaded_so": __import__("sys").modules.get("fastpeft._C") is not None,
        "close": close, "feats": list(feats.shape),
        "schemas": [str(getattr(torch.ops.fastpeft, n.split("::")[1]).default._schema) for n in %r],
    }))
    """
) % (TOLERANCES[torch.float32], list(SCHEMAS))


def test_disabled_extension_uses_the_reference_with_one_warning(tmp_path):
    env = {**os.environ, "FASTPEFT_DISABLE_EXT": "1"}
    out = subprocess.run([sys.executable, "-c", FALLBACK_SCRIPT], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(report["warnings"]) == 1 and "FASTPEFT_DISABLE_EXT" in report["warnings"][0], report
    assert not report["loaded_so"]
    assert report["close"], "the FASTPEFT_DISABLE_EXT fallback is off the reference beyond the fp32 tolerance"
    assert report["feats"] == [2, 8 * 4]
    assert report["schemas"] == [q + s for q, s in SCHEMAS.items()]
