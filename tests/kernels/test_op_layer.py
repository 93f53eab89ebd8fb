"""The eager op layer (fastpeft/ops/adapter.py, lowrank.py, ssf.py): one torch.autograd.Function per
fused call outside torch.compile, argument checks once per call signature (re-run for anything
that changed), and fp32 `tl.dot` precision following torch's TF32 setting."""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import fastpeft.ops.adapter as A  # noqa: E402
import fastpeft.ops.lowrank as L  # noqa: E402
import fastpeft.ops.ssf as S  # noqa: E402
from fastpeft.kernels import backend  # noqa: E402
from fastpeft.kernels._common import CheckedSignatures, dot_precision  # noqa: E402
from tests.kernels.conftest import interpreter_only  # noqa: E402


def _inputs(seed=0, rows=5, d=32, r=4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, rows, d, generator=g, requires_grad=True)
    wd = (torch.randn(r, d, generator=g) * d ** -0.5).requires_grad_()
    wu = (torch.randn(d, r, generator=g) * r ** -0.5).requires_grad_()
    return x, wd, wu


@interpreter_only
@pytest.mark.parametrize("which", ["triton", "torch"])
def test_eager_call_is_one_autograd_function(which):
    x, wd, wu = _inputs()
    with backend(which):
        out = A.adapter(x, wd, None, wu, None, residual=x, act="gelu", dropout_p=0.1, training=True)
        lo = L.lowrank_linear(x, torch.randn(48, 32), None, wd, torch.randn(48, 4), dropout_p=0.1, training=True)
        y = S.layernorm_ssf(x, None, None, torch.ones(32, requires_grad=True), torch.zeros(32, requires_grad=True))
    assert type(out.grad_fn).__name__ == "_AdapterFunctionBackward"
    assert type(lo.grad_fn).__name__ == "_LowRankFunctionBackward"
    assert type(y.grad_fn).__name__ == "_LayerNormSSFFunctionBackward"


@interpreter_only
def test_backward_keeps_the_forward_path(monkeypatch):
    # the path (Triton / torch math) is chosen once in forward; backward, which runs outside the
    # backend context the forward ran in, takes the same one
    calls = []
    real = A.launch_bwd
    monkeypatch.setattr(A, "launch_bwd", lambda *a, **k: calls.append(1) or real(*a, **k))
    x, wd, wu = _inputs(1)
    with backend("triton"):
        out = A.adapter(x, wd, None, wu, None, act="relu", dropout_p=0.2, training=True)
    with backend("torch"):
        out.square().sum().backward()
    assert calls == [1] and x.grad is not None and wd.grad is not None


@interpreter_only
def test_checks_rerun_when_the_signature_changes():
    x, wd, wu = _inputs(2)
    w, b = torch.randn(48, 32), torch.randn(48, 4)
    with backend("triton"):
        A.adapter(x, wd, None, wu, None)  # a good call: its signature is now known
        L.lowrank_linear(x, w, None, wd, b)
        with pytest.raises(ValueError, match=r"w_up must have shape"):
            A.adapter(x, wd, None, wu[:, :3], None)
        with pytest.raises(ValueError, match="device mismatch"):
            A.adapter(x, wd, None, wu.to("meta"), None)
        with pytest.raises(ValueError, match="unsupported dtype"):
            A.adapter(x.double(), wd, None, wu, None)
        with pytest.raises(ValueError, match=r"b must have shape"):
            L.lowrank_linear(x, w, None, wd, b[:, :3])
        with pytest.raises(ValueError, match="device mismatch"):
            L.lowrank_linear(x, w.to("meta"), None, wd, b)
        with pytest.raises(ValueError, match=r"dropout p must be in"):
            L.lowrank_linear(x, w, None, wd, b, dropout_p=1.0, training=True)


def test_checked_signatures_key():
    c = CheckedSignatures(maxsize=2)
    x = torch.zeros(2, 3)
    k = c.key(x, None, extra=(1,))
    assert not c.seen(k)
    c.add(k)
    assert c.seen(k) and c.seen(c.key(torch.ones(2, 3), None, extra=(1,)))
    assert not c.seen(c.key(x.half(), None, extra=(1,)))
    assert not c.seen(c.key(torch.zeros(2, 4), None, extra=(1,)))
    assert not c.seen(c.key(x, None, extra=(2,)))
    assert c.key(x, [1, 2]) is None and not c.seen(None)  # a non-tensor argument: always checked
    c.add(c.key(torch.zeros(1)))
    c.add(c.key(torch.zeros(2)))  # past maxsize: forgets
    assert not c.seen(k)


def test_dot_precision_follows_torch_tf32_setting():
    cuda = torch.device("cuda")
    old_flag, old_prec = torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision()
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.set_float32_matmul_precision("highest")
        assert dot_precision(torch.float32, cuda) == "ieee"
        torch.set_float32_matmul_precision("high")
        assert dot_precision(torch.float32, cuda) == "tf32"
        torch.set_float32_matmul_precision("highest")
        torch.backends.cuda.matmul.allow_tf32 = True
        assert dot_precision(torch.float32, cuda) == "tf32"
        assert dot_precision(torch.float16, cuda) == "ieee"      # no effect on fp16/bf16 dots
        assert dot_precision(torch.float32, torch.device("cpu")) == "ieee"  # interpreter: exact
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old_flag
        torch.set_float32_matmul_precision(old_prec)
