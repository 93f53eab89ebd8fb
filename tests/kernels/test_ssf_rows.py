"""SSF's per-row forms (fastpeft/ops/ssf.py `ssf_rows`, `ssf_gelu_rows`, `layernorm_ssf_rows`; the
kernels' ROWS variants in kernels/ssf.py) for mixed multi-task batches: each image's rows with its
own scale / shift (and LayerNorm affine, when per image), against the plain-torch `*_rows_ref`,
forward and every gradient; and end to end, a patched multi-task SSF model's mixed batch against
each task's single-task model, with the per-row kernels counted.

Through the Triton interpreter on CPU: fp32 and fp16 (bf16 only runs the torch path in the
single-task tests, tests/kernels/test_ssf_kernels.py, whose tolerances these reuse). SSF draws no
random numbers, so there is no dropout to regenerate.
"""
from __future__ import annotations

import warnings

import pytest
import torch

import fastpeft
import fastpeft.ops.ssf as K
from fastpeft.kernels import _common, backend
from tests.kernels.conftest import assert_close
from tests.kernels.test_ssf_kernels import TOL

pytestmark = pytest.mark.usefixtures("needs_interpreter_unless_gpu")

LAUNCHERS = ("launch_ssf_rows_fwd", "launch_ssf_rows_bwd", "launch_ln_rows_fwd", "launch_ln_rows_bwd")
#: task of each image: images 0 and 2 share task 0's parameters; task 1 has no image
IDS = [0, 2, 0]
T = 3


def _leaf(shape, dtype, center, seed):
    g = torch.Generator().manual_seed(seed)
    return (center + 0.3 * torch.randn(shape, generator=g)).to(dtype).requires_grad_(True)


def _case(fn, b, n, d, dtype, shared=()):
    """(x, leaves, per-row args builder): each parameter a [T, D] task tensor gathered per image by IDS
    (as fastpeft/multitask.py does), or a [D] shared one for the names in `shared`."""
    ids = torch.tensor(IDS[:b] if b <= len(IDS) else [i % T for i in range(b)])
    names = ["ln_weight", "ln_bias", "scale", "shift"] if fn == "layernorm_ssf_rows" else ["scale", "shift"]
    leaves = {}
    for k, name in enumerate(names):
        center = 1.0 if name in ("ln_weight", "scale") else 0.0
        leaves[name] = _leaf((d,) if name in shared else (T, d), dtype, center, seed=k + 1)
    x = torch.randn(b, 1, n, d, generator=torch.Generator().manual_seed(7)).to(dtype)

    def args(ls):
        return [ls[nm] if nm in shared else ls[nm].index_select(0, ids) for nm in names]

    return x, leaves, args


def _run(f, b, x, leaves, args, grad):
    xl = x.clone().requires_grad_(True)
    for t in leaves.values():
        t.grad = None
    out = f(b, xl, *args(leaves))
    out.backward(grad)
    return out.detach(), {"x": xl.grad, **{k: t.grad.clone() for k, t in leaves.items()}}


def check_rows(fn, b, n, d, dtype, shared=()):
    x, leaves, args = _case(fn, b, n, d, dtype, shared)
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(9)).to(dtype)
    with backend("triton"):
        out, grads = _run(getattr(K, fn), b, x, leaves, args, grad)
    ref_leaves = {k: t.detach().float().requires_grad_(True) for k, t in leaves.items()}
    ref_out, ref_grads = _run(getattr(K, f"{fn}_ref"), b, x.float(), ref_leaves, args, grad.float())
    assert out.dtype == dtype and out.shape == x.shape and out.is_contiguous()
    assert_close("out", out, ref_out, TOL[dtype])
    assert grads.keys() == ref_grads.keys()
    for k in grads:
        assert grads[k].dtype == dtype and grads[k].shape == ref_grads[k].shape, k
        assert_close(f"grad {k}", grads[k], ref_grads[k], TOL[dtype])
    return grads


FNS = ["ssf_rows", "ssf_gelu_rows", "layernorm_ssf_rows"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("fn", FNS)
def test_per_row_forms_match_reference(fn, dtype):
    # 3 images of 5 tokens, width 200 (not a multiple of 16); images 0 and 2 share task 0's tensors
    grads = check_rows(fn, 3, 5, 200, dtype)
    # task 1 has no image: its gradients are exact zeros (the gather's backward scatters per image)
    for k in ("scale", "shift"):
        assert torch.count_nonzero(grads[k][1]) == 0, k


@pytest.mark.parametrize("fn", FNS)
def test_per_image_sums_over_several_row_splits_are_deterministic_and_leave_counters_zero(fn):
    # 70 tokens per image: two row splits per image and column block, the last to arrive finishes
    b, n, d = 2, 70, 200
    assert _common.row_splits(n, 32, 2 * b, torch.device("cpu")) > 1
    first = check_rows(fn, b, n, d, torch.float32)
    again = check_rows(fn, b, n, d, torch.float32)
    for k in first:
        assert torch.equal(first[k], again[k]), k
    locks = [lock for (dev, _), (_, lock) in _common._SPLIT_WS.items() if dev.type == "cpu"]
    assert locks and all(int(lock.abs().sum()) == 0 for lock in locks)


@pytest.mark.parametrize("fn,shared", [("ssf_gelu_rows", ("shift",)), ("ssf_rows", ("scale", "shift")),
                                       ("layernorm_ssf_rows", ("ln_weight",)),
                                       ("layernorm_ssf_rows", ("ln_weight", "ln_bias", "shift"))])
def test_shared_parameters_get_their_total_gradient(fn, shared):
    # a [D] parameter beside per-image ones (the frozen LayerNorm affine, when trainable: its sum)
    check_rows(fn, 3, 5, 200, torch.float32, shared=shared)


def test_layernorm_without_affine():
    x, leaves, args = _case("layernorm_ssf_rows", 3, 5, 200, torch.float32)
    sc, sh = args(leaves)[2:]
    with backend("triton"):
        out = K.layernorm_ssf_rows(3, x, None, None, sc, sh)
    assert_close("out", out, K.layernorm_ssf_rows_ref(3, x, None, None, sc, sh), TOL[torch.float32])


def test_each_image_is_its_own_single_task_op():
    # the per-row op on 3 images == the single-task op on each image with that image's parameters
    x, leaves, args = _case("layernorm_ssf_rows", 3, 5, 200, torch.float32)
    lw, lb, sc, sh = (t.detach() for t in args(leaves))
    with backend("triton"):
        rows = K.layernorm_ssf_rows(3, x, lw, lb, sc, sh)
        for i in range(3):
            one = K.layernorm_ssf(x[i], lw[i], lb[i], sc[i], sh[i])
            assert_close(f"image {i}", rows[i], one, TOL[torch.float32])


def _bad(fn):
    b, d = 3, 200
    x = torch.randn(b, 1, 5, d)
    p = torch.randn(b, d)
    ln = fn == "layernorm_ssf_rows"

    def call(bb=b, xx=x, sc=p, sh=p, **kw):
        f = getattr(K, fn)
        return f(bb, xx, p, p, sc, sh, **kw) if ln else f(bb, xx, sc, sh)

    cases = [
        (ValueError, lambda: call(bb=2)),                               # x holds 3 images, not 2
        (ValueError, lambda: call(sc=torch.randn(b + 1, d))),           # a row per image, or shared
        (ValueError, lambda: call(sh=torch.randn(b, d + 1))),           # width mismatch
        (ValueError, lambda: call(sc=torch.randn(b, 1, d))),            # 3-D parameter
        (ValueError, lambda: call(xx=x.double(), sc=p.double(), sh=p.double())),  # unsupported dtype
        (ValueError, lambda: call(sc=torch.ones(b, d, dtype=torch.int64))),
        (ValueError, lambda: call(bb=0, xx=x[:0], sc=p[:0], sh=p[:0])),  # no image
        (ValueError, lambda: call(xx=torch.randn(b, 0))),                # zero width
        (TypeError, lambda: call(bb=3.0)),
        (TypeError, lambda: call(xx=x.numpy())),
    ]
    if ln:
        cases += [(ValueError, lambda: call(eps=0.0)),
                  (ValueError, lambda: call(xx=torch.randn(b, 1, 9000), sc=torch.randn(9000), sh=torch.randn(9000)))]
    return cases


@pytest.mark.parametrize("fn", FNS)
def test_bad_input_is_refused_before_any_launch(fn, monkeypatch):
    for name in LAUNCHERS:
        monkeypatch.setattr(K, name, lambda *a, _n=name, **k: pytest.fail(f"{_n} launched on bad input"))
    for err, call in _bad(fn):
        with backend("triton"), pytest.raises(err):
            call()


# ---- end to end: a patched multi-task SSF model's mixed batch ---------------------------------

def test_patched_mixed_batch_runs_the_per_row_kernels_and_matches_each_tasks_single_model(monkeypatch):
    from fastpeft.methods.ssf import SSFHook
    from tests import test_multitask as tm
    from tests.methods.conftest import images

    counts = dict.fromkeys(LAUNCHERS, 0)
    for name in LAUNCHERS:
        real = getattr(K, name)

        def counted(*a, _n=name, _f=real, **k):
            counts[_n] += 1
            return _f(*a, **k)
        monkeypatch.setattr(K, name, counted)
    refs = []
    real_apply = SSFHook.apply
    monkeypatch.setattr(SSFHook, "apply", lambda self, x, out: refs.append(self) or real_apply(self, x, out))

    m = tm.multi_model("SSF")
    fastpeft.patch(m, backend="triton")
    x = images(batch=len(tm.IDS), img_size=tm.IMG)
    ids = fastpeft.task_index(m, [tm.TASKS[i] for i in tm.IDS])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # vmap's per-row fallback for CPU attention
        out, grads = tm.run_multi(m, x, ids)
    depth = tm.DEPTH
    # one launch per fused site for the whole mixed batch, forward and backward: the patch embed's
    # scale-shift and qkv / proj / fc2 / fc1+GELU of each block; norm1 / norm2 of each block + the final norm
    assert counts == {"launch_ssf_rows_fwd": 1 + 4 * depth, "launch_ssf_rows_bwd": 1 + 4 * depth,
                      "launch_ln_rows_fwd": 2 * depth + 1, "launch_ln_rows_bwd": 2 * depth + 1}, counts
    assert not refs  # the reference hooks never ran
    tm.assert_matches_singles("SSF", m, x, out, grads)


def test_patched_mixed_batch_on_the_cpu_backend_keeps_the_reference(monkeypatch):
    from tests import test_multitask as tm
    from tests.methods.conftest import images

    for name in LAUNCHERS:
        monkeypatch.setattr(K, name, lambda *a, _n=name, **k: pytest.fail(f"{_n} launched on the cpp backend"))
    m = tm.multi_model("SSF")
    fastpeft.patch(m, backend="cpp")
    x = images(batch=len(tm.IDS), img_size=tm.IMG)
    ids = fastpeft.task_index(m, [tm.TASKS[i] for i in tm.IDS])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        out, grads = tm.run_multi(m, x, ids)
    tm.assert_matches_singles("SSF", m, x, out, grads)
