"""The bottleneck adapter's per-row form for a mixed multi-task batch (fastpeft/ops/adapter.py
`adapter_rows`, kernels/adapter.py `launch_rows_fwd` / `launch_rows_bwd`) against its plain-torch
reference `adapter_rows_ref`, and end to end: AdaptFormer / Adapter tasks on one patched backbone
(the Triton backend under the interpreter) give every row its own task's logits and gradients,
through the per-row kernels.

Rows of one task share its factors: each test stacks T tasks' tensors and gathers them per row
by the task ids (as fastpeft/multitask.py does), so the gradients checked are the tasks'.
Shapes are odd: B = 3 images of N = 5 tokens, D = 40 (not a multiple of any block), rank 3.
fp32 and fp16 run through the kernels (bf16: the interpreter's emulation is unreliable, as in
tests/kernels/test_adapter_kernel.py); tolerances are that file's.
"""
from __future__ import annotations

import warnings

import pytest
import torch

import fastpeft
import fastpeft.ops.adapter as K
from fastpeft.kernels import backend
from tests.kernels.conftest import assert_close
from tests.kernels.test_adapter_kernel import TOL

pytestmark = pytest.mark.usefixtures("needs_interpreter_unless_gpu")

B, N, D, R = 3, 5, 40, 3
IDS = torch.tensor([1, 0, 1])  # rows 0 and 2 share task 1's factors
T = 2

# (layout, act, dropout p, scale): scale "learn" = one learnable scalar per task
#   parallel: base + s * branch (base: the FFN branch), sequential: f + s * branch,
#   noah / vpt: serial adapters (s = 1, residual = x); "shared" weights: one copy for every row
CASES = [
    ("parallel", "relu", 0.0, 0.1),
    ("sequential", "relu", 0.1, "learn"),
    ("noah", "quick_gelu", 0.1, 1.0),
    ("vpt", "gelu", 0.0, 1.0),
    ("parallel", "relu", 0.3, "learn"),
]
CASE_IDS = [f"{c[0]}-{c[1]}-p{c[2]}-s{c[3]}" for c in CASES]


def task_tensors(dtype, learn, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, generator=g) * std).to(dtype)

    t = dict(w_down=rnd(T, R, D, std=D ** -0.5), b_down=rnd(T, R, std=0.1), w_up=rnd(T, D, R, std=R ** -0.5),
             b_up=rnd(T, D, std=0.1))
    if learn:
        t["scale"] = (torch.rand(T, 1, generator=g) + 0.5).to(dtype)
    return t, rnd(B, 1, N, D)


def run(fn, leaves, x0, layout, act, p, scale, seed, grad, **kw):
    """fn(B, x, per-row factors gathered from the tasks' tensors ...): output and the gradients of x
    and of every task tensor."""
    tasks = {k: v.clone().requires_grad_(True) for k, v in leaves.items()}
    x = x0.clone().requires_grad_(True)
    # parallel: the op adds the FFN branch as `base` (as the single-task op's parallel layout)
    base = (x0.flip(-1) * 0.5).requires_grad_(True) if layout == "parallel" else None
    rows = {k: v.index_select(0, IDS) for k, v in tasks.items()}
    out = fn(B, x, rows["w_down"], rows["b_down"], rows["w_up"], rows["b_up"], base=base,
             residual=x if layout != "parallel" else None,
             scale=rows["scale"] if scale == "learn" else scale, act=act, dropout_p=p, seed=seed, **kw)
    out.backward(grad)
    extra = {"base": base.grad} if base is not None else {}
    return out.detach(), {"x": x.grad, **extra, **{k: v.grad for k, v in tasks.items()}}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("layout,act,p,scale", CASES, ids=CASE_IDS)
def test_rows_match_reference(layout, act, p, scale, dtype):
    leaves, x0 = task_tensors(dtype, scale == "learn")
    seed = torch.tensor([1234], dtype=torch.int64)
    grad = torch.randn(x0.shape, generator=torch.Generator().manual_seed(7)).to(dtype)
    with backend("triton"):
        out, grads = run(K.adapter_rows, leaves, x0, layout, act, p, scale, seed, grad, training=True)
    # the reference in fp32 with the same Philox masks (seed) and the same gathers
    f32 = {k: v.float() for k, v in leaves.items()}
    ref, ref_grads = run(K.adapter_rows_ref, f32, x0.float(), layout, act, p, scale, seed, grad.float())
    assert out.dtype == dtype and out.shape == x0.shape
    assert_close("out", out, ref, TOL[dtype])
    assert grads.keys() == ref_grads.keys()
    for k in grads:
        assert grads[k].dtype == dtype and grads[k].shape == (x0 if k in ("x", "base") else leaves[k]).shape, k
        assert_close(f"grad {k}", grads[k], ref_grads[k], TOL[dtype])
    # a task's gradients come from its own rows only: task 0 has one row, task 1 two
    assert torch.count_nonzero(grads["w_down"][0]) and torch.count_nonzero(grads["w_down"][1])


def test_rows_differ_per_task_and_match_the_single_task_op():
    """Each image uses its own task's adapter: image b equals the single-task op with task ids[b]'s
    weights, dropout included (the per-row mask of a row is the single-task kernel's for the
    same seed and row number); shared weights ([r, D], no image dim) equal the single-task op
    over the whole batch, with gradients summed over the images."""
    leaves, x0 = task_tensors(torch.float32, learn=False)
    seed = torch.tensor([99], dtype=torch.int64)
    p = 0.2
    with backend("triton"):
        rows = {k: v.index_select(0, IDS) for k, v in leaves.items()}
        out = K.adapter_rows(B, x0, rows["w_down"], rows["b_down"], rows["w_up"], rows["b_up"], residual=x0,
                             scale=0.5, act="gelu", dropout_p=p, training=True, seed=seed)
        for b in range(B):
            t = int(IDS[b])
            # image b's rows are rows b N .. b N + N - 1 of the batch: run the whole batch with
            # task t's weights (same seed, same row numbers) and keep image b
            whole = K.adapter(x0, leaves["w_down"][t], leaves["b_down"][t], leaves["w_up"][t], leaves["b_up"][t],
                              residual=x0, scale=0.5, act="gelu", dropout_p=p, training=True, seed=seed)
            assert_close(f"image {b}", out[b], whole[b], TOL[torch.float32])
        assert not torch.allclose(out[0], K.adapter(
            x0, leaves["w_down"][0], leaves["b_down"][0], leaves["w_up"][0], leaves["b_up"][0], residual=x0,
            scale=0.5, act="gelu", dropout_p=p, training=True, seed=seed)[0])

        shared = {k: v[0].clone().requires_grad_(True) for k, v in leaves.items()}
        x = x0.clone().requires_grad_(True)
        got = K.adapter_rows(B, x, shared["w_down"], shared["b_down"], shared["w_up"], shared["b_up"], residual=x,
                             scale=0.5, act="gelu", dropout_p=p, training=True, seed=seed)
        got.sum().backward()
        single = {k: v[0].clone().requires_grad_(True) for k, v in leaves.items()}
        x1 = x0.clone().requires_grad_(True)
        want = K.adapter(x1, single["w_down"], single["b_down"], single["w_up"], single["b_up"], residual=x1,
                         scale=0.5, act="gelu", dropout_p=p, training=True, seed=seed)
        want.sum().backward()
    assert_close("shared out", got, want, TOL[torch.float32])
    assert_close("shared grad x", x.grad, x1.grad, TOL[torch.float32])
    for k in shared:
        assert shared[k].grad.shape == single[k].grad.shape
        assert_close(f"shared grad {k}", shared[k].grad, single[k].grad, TOL[torch.float32])


def test_dropout_mask_regenerated_in_backward_and_drop_fraction():
    """With a down projection that makes every pre-activation 1 (ReLU keeps it) and an up
    projection that copies the rank units to the first r outputs, out[..., :r] is the dropout
    multiplier itself: its zeros are the dropped fraction, its other values 1 / (1 - p). The
    backward regenerates that very mask: grad of b_down is the kept count per unit times s."""
    images, n, d, r, p = 4, 64, 48, 16, 0.3
    x = torch.randn(images, 1, n, d)
    w_down = torch.zeros(images, r, d)
    b_down = torch.ones(images, r, requires_grad=True)
    w_up = torch.zeros(images, d, r)
    w_up[:, :r] = torch.eye(r)
    seed = torch.tensor([2024], dtype=torch.int64)
    with backend("triton"):
        out = K.adapter_rows(images, x, w_down, b_down, w_up, None, scale=1.0, act="relu", dropout_p=p,
                             training=True, seed=seed)
        mult = out[..., :r]
        dropped = (mult == 0).float().mean().item()
        assert abs(dropped - p) < 0.03, dropped
        kept = mult[mult != 0]
        torch.testing.assert_close(kept, torch.full_like(kept, 1.0 / (1.0 - p)))
        assert torch.count_nonzero(out[..., r:]) == 0
        g = torch.zeros_like(out)
        g[..., :r] = 1.0
        out.backward(g)
    # d out[:, j] / d b_down[j] = mask / (1 - p) on each row: the same mask, summed per image
    torch.testing.assert_close(b_down.grad, mult.reshape(images, n, r).sum(1))
    # another seed draws another mask
    with backend("triton"):
        other = K.adapter_rows(images, x, w_down, b_down.detach(), w_up, None, act="relu", dropout_p=p,
                               training=True, seed=seed + 1)
    assert not torch.equal(other[..., :r], mult.detach())


def _bad_inputs():
    x = torch.randn(B, 1, N, D)
    wd, bd, wu, bu = torch.randn(B, R, D), torch.randn(B, R), torch.randn(B, D, R), torch.randn(B, D)
    ok = dict(images=B, x=x, w_down=wd, b_down=bd, w_up=wu, b_up=bu)
    return [
        (dict(ok, images=2), "B = images = 2 first"),
        (dict(ok, images=0), "positive int"),
        (dict(ok, w_down=torch.randn(B, R, D + 1)), "w_down must be"),
        (dict(ok, w_down=torch.randn(B + 1, R, D)), "w_down must be [3, 40] (shared) or [3, 3, 40]"),
        (dict(ok, w_up=torch.randn(B, D, R + 1)), "w_up must be"),
        (dict(ok, b_down=torch.randn(2, R)), "b_down must be"),
        (dict(ok, b_up=torch.randn(B, D - 1)), "b_up must be"),
        (dict(ok, w_down=torch.randn(B, 0, D), w_up=torch.randn(B, D, 0), b_down=None), "rank r = 0"),
        (dict(ok, residual=torch.randn(B, 1, N, D, dtype=torch.float16)), "dtype mismatch"),
        (dict(ok, residual=torch.randn(B, N, D)), "residual must have shape"),
        (dict(ok, scale=torch.ones(B + 1)), "one element (shared) or one per image"),
        (dict(ok, x=torch.randn(B, 1, N, D).to(torch.int32)), "unsupported dtype"),
        (dict(ok, act="tanh"), "act must be one of"),
        (dict(ok, dropout_p=1.0, training=True), "dropout p must be in"),
    ]


@pytest.mark.parametrize("kw,msg", _bad_inputs(), ids=[m for _, m in _bad_inputs()])
def test_bad_input_raises_before_any_launch(kw, msg, monkeypatch):
    def no_launch(*a, **k):
        raise AssertionError("a kernel was launched on bad input")

    monkeypatch.setattr(K, "launch_rows_fwd", no_launch)
    kw = dict(kw)
    args = [kw.pop(k) for k in ("images", "x", "w_down", "b_down", "w_up", "b_up")]
    with backend("triton"), pytest.raises(ValueError, match=msg.replace("[", r"\[").replace("(", r"\(")
                                          .replace(")", r"\)")):
        K.adapter_rows(*args, **kw)


# ----------------------------------------------------------------------------------------------
# End to end: a mixed batch through a patched multi-task model
# ----------------------------------------------------------------------------------------------
E2E = {
    "AdaptFormer": fastpeft.AdaptFormer(dim=8),
    "AdaptFormer sequential learnable": fastpeft.AdaptFormer(dim=8, mode="sequential", learnable_scale=True),
    "Adapter": fastpeft.Adapter(dim=8),
    "Adapter vpt": fastpeft.Adapter(dim=8, style="vpt"),
}


@pytest.fixture
def counted(monkeypatch):
    """Count the per-row launchers' calls (the ops module's references), running them as they are."""
    calls = {"fwd": 0, "bwd": 0}
    for name, key in (("launch_rows_fwd", "fwd"), ("launch_rows_bwd", "bwd")):
        real = getattr(K, name)

        def wrapped(*a, _real=real, _key=key, **k):
            calls[_key] += 1
            return _real(*a, **k)

        monkeypatch.setattr(K, name, wrapped)
    return calls


@pytest.mark.parametrize("label", sorted(E2E))
def test_mixed_batch_under_triton_patch_matches_singles_via_rows_kernels(label, counted, monkeypatch):
    tm = pytest.importorskip("tests.test_multitask")
    monkeypatch.setitem(tm.CONFIGS, label, E2E[label])
    monkeypatch.setattr(tm, "DEPTH", 1)  # one block: the interpreter runs every kernel program in Python
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        m = tm.multi_model(label)
        report = fastpeft.patch(m, backend="triton")
        assert any("adapter" in what for what, *_ in report.patched), report
        x = tm.images(batch=len(tm.IDS), img_size=tm.IMG)
        ids = fastpeft.task_index(m, [tm.TASKS[i] for i in tm.IDS])

        def never(*a, **k):
            raise AssertionError("the reference ran instead of the per-row kernels")

        real_ref = K.adapter_rows_ref
        monkeypatch.setattr(K, "adapter_rows_ref", never)
        out, grads = tm.run_multi(m, x, ids)
        monkeypatch.setattr(K, "adapter_rows_ref", real_ref)
        # one per-row launch set per adapter (one per block), forward and backward
        assert counted == {"fwd": tm.DEPTH, "bwd": tm.DEPTH}, counted
        tm.assert_matches_singles(label, m, x, out, grads)


def test_mixed_batch_training_draws_per_row_masks_through_the_kernels(counted):
    """Training mode (dropout on): two equal rows of one task differ (each row's mask is its own
    part of the kernel's Philox stream), the gradients flow, through the per-row kernels."""
    from tests.methods.conftest import images, make_vit
    m = make_vit(depth=1, img_size=32, seed=0)
    for t in ("a", "b"):
        fastpeft.inject(m, fastpeft.AdaptFormer(dim=8, dropout=0.5), task=t)
    fastpeft.patch(m, backend="triton")
    x = images(batch=1, img_size=32).repeat(4, 1, 1, 1)
    ids = fastpeft.task_index(m, ["a", "a", "b", "b"])
    m.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for p in m.fastpeft_tasks.parameters():
            torch.nn.init.normal_(p, std=0.1)
        out = m(x, task=ids)
        out.sum().backward()
    assert not torch.allclose(out[0], out[1]) and not torch.allclose(out[2], out[3])
    assert counted == {"fwd": 1, "bwd": 1}, counted
    assert all(p.grad is not None and torch.count_nonzero(p.grad) for p in m.fastpeft_tasks.parameters())
