"""LoRA's per-row forms for a mixed multi-task batch (fastpeft/ops/lowrank.py `*_rows`,
kernels/lowrank.py `launch_rows_*`) against their references, and end to end under
`fastpeft.patch(model, backend="triton")` against each task's single-task model.

Triton kernels run through the interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1); the torch math of the same op (backend "torch") is checked the same way. As
in tests/kernels/test_lowrank_kernels.py: fp32 and fp16 through the kernels, bf16 through the
torch path only (the interpreter's bf16 emulation is unreliable), all against the fp32-upcast
reference with the GEMM tolerances of tests/kernels/conftest.py. Shapes are small and odd: B = 3
images of 5 tokens, D = 40, rank 3; rows of one task share its factors (gathered by task id as
fastpeft/multitask.py does, so the gradients are checked at the tasks' tensors).
"""
from __future__ import annotations

import warnings

import pytest
import torch

import fastpeft
import fastpeft.kernels.lowrank as K
import fastpeft.ops.lowrank as L
from fastpeft.kernels import backend
from tests.kernels.conftest import GEMM_TOL, assert_close, interpreter_only

pytestmark = interpreter_only

B, TOKENS, D, RANK = 3, 5, 40, 3
N = 3 * D
TASK_IDS = torch.tensor([0, 2, 0])  # rows 0 and 2 share task 0's factors; task 1 has no row


def rnd(g, *shape, std=1.0, dtype=torch.float32):
    return (torch.randn(*shape, generator=g) * std).to(dtype)


def gathered(t):
    """Each image's factor: its task's (as the mixed batch's index_select by task id)."""
    return t.index_select(0, TASK_IDS)


def run(fn, leaves: dict, grad, **kw):
    """fn(**leaves (cloned, requiring grad where marked), **kw), backward(grad): (out, {name: grad})."""
    lv = {k: (v.clone().requires_grad_(tr) if isinstance(v, torch.Tensor) else v) for k, (v, tr) in leaves.items()}
    out = fn(**lv, **kw)
    out.backward(grad)
    return out.detach(), {k: lv[k].grad for k, (_, tr) in leaves.items() if tr}


def check(fn, ref, leaves, grad, dtype, **kw):
    out, grads = run(fn, leaves, grad, **kw)
    up = {k: ((v.float() if isinstance(v, torch.Tensor) else v), tr) for k, (v, tr) in leaves.items()}
    ref_out, ref_grads = run(ref, up, grad.float(), **kw)
    assert out.dtype == dtype and out.shape == ref_out.shape
    assert_close("out", out, ref_out, GEMM_TOL[dtype])
    assert grads.keys() == ref_grads.keys()
    for k in grads:
        assert grads[k] is not None and grads[k].dtype == leaves[k][0].dtype, k
        assert_close(f"grad {k}", grads[k], ref_grads[k], GEMM_TOL[dtype])
    return out, grads


def base_leaves(g, dtype):
    return {"x": (rnd(g, B, 1, TOKENS, D, dtype=dtype), True),  # the physical [B, 1, N, D] of rows_call
            "weight": (rnd(g, N, D, std=D ** -0.5, dtype=dtype), False),
            "bias": (rnd(g, N, std=0.1, dtype=dtype), False)}


# ----------------------------------------------------------------------------------------------
# NOAH (input dropout) and PETL-ViT (rank dropout, q and v placed into the qkv columns)
# ----------------------------------------------------------------------------------------------
def _noah(x, weight, bias, lora_a, lora_b, p, seed):
    return L.lora_noah_qkv_rows(B, x, weight, bias, gathered(lora_a), gathered(lora_b), rank=RANK, scale=0.5,
                                dropout_p=p, training=True, seed=seed)


def _noah_ref(x, weight, bias, lora_a, lora_b, p, seed):
    return L.lora_noah_qkv_rows_ref(x, weight, bias, gathered(lora_a), gathered(lora_b), rank=RANK, scale=0.5,
                                    dropout_p=p, seed=seed)


def noah_leaves(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    leaves = base_leaves(g, dtype)
    # three tasks with a super-size rank 5, rank 3 used
    leaves["lora_a"] = (rnd(g, 3, 5, D, std=D ** -0.5, dtype=dtype), True)
    leaves["lora_b"] = (rnd(g, 3, N, 5, std=0.3, dtype=dtype), True)
    return leaves, rnd(g, B, 1, TOKENS, N, dtype=dtype)


def _petl(x, weight, bias, aq, av, bq, bv, p, seed):
    return L.lora_petl_qkv_rows(B, x, weight, bias, {"q": gathered(aq), "v": gathered(av)},
                                {"q": gathered(bq), "v": gathered(bv)}, scale={"q": 0.5, "v": 2.0}, dropout_p=p,
                                training=True, seed=seed)


def _petl_ref(x, weight, bias, aq, av, bq, bv, p, seed):
    return L.lora_petl_qkv_rows_ref(x, weight, bias, {"q": gathered(aq), "v": gathered(av)},
                                    {"q": gathered(bq), "v": gathered(bv)}, scale={"q": 0.5, "v": 2.0},
                                    dropout_p=p, seed=seed)


def petl_leaves(dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    leaves = base_leaves(g, dtype)
    for t in ("q", "v"):
        leaves[f"a{t}"] = (rnd(g, 3, RANK, D, std=D ** -0.5, dtype=dtype), True)
        leaves[f"b{t}"] = (rnd(g, 3, D, RANK, std=0.3, dtype=dtype), True)
    return leaves, rnd(g, B, 1, TOKENS, N, dtype=dtype)


METHODS = {"noah": (_noah, _noah_ref, noah_leaves), "petl": (_petl, _petl_ref, petl_leaves)}
CASES = ([(m, p, torch.float32, which) for m in METHODS for p in (0.0, 0.3) for which in ("triton", "torch")]
         + [(m, 0.3, torch.float16, "triton") for m in METHODS]
         + [(m, 0.3, torch.bfloat16, "torch") for m in METHODS])


@pytest.mark.parametrize("method, p, dtype, which", CASES,
                         ids=[f"{m}-p{p}-{str(d)[6:]}-{w}" for m, p, d, w in CASES])
def test_rows_form_matches_reference(method, p, dtype, which):
    fn, ref, make = METHODS[method]
    leaves, grad = make(dtype)
    with backend(which):
        out, grads = check(fn, ref, leaves, grad, dtype, p=p, seed=torch.tensor([21], dtype=torch.int64))
    # the task without rows gets exact zeros; the shared task its two rows' sum (checked above)
    for k, (_, tr) in leaves.items():
        if tr and k != "x":
            assert torch.count_nonzero(grads[k][1]) == 0, k


def test_reference_is_each_images_single_task_reference():
    """The rows reference (without dropout) is the single-task reference run per image with the
    image's own factors, so the per-row form is checked against the official per-task forward."""
    leaves, _ = noah_leaves(torch.float32)
    v = {k: t for k, (t, _) in leaves.items()}
    got = _noah_ref(**v, p=0.0, seed=None)
    for i in range(B):
        j = TASK_IDS[i]
        want = L.lora_noah_qkv_ref(v["x"][i], v["weight"], v["bias"], v["lora_a"][j], v["lora_b"][j], rank=RANK,
                                   scale=0.5)
        assert_close(f"noah image {i}", got[i], want, GEMM_TOL[torch.float32])
    leaves, _ = petl_leaves(torch.float32)
    v = {k: t for k, (t, _) in leaves.items()}
    got = _petl_ref(**v, p=0.0, seed=None)
    for i in range(B):
        j = TASK_IDS[i]
        want = L.lora_petl_qkv_ref(v["x"][i], v["weight"], v["bias"], {"q": v["aq"][j], "v": v["av"][j]},
                                   {"q": v["bq"][j], "v": v["bv"][j]}, scale={"q": 0.5, "v": 2.0})
        assert_close(f"petl image {i}", got[i], want, GEMM_TOL[torch.float32])
        assert_close("k untouched", got[i][..., D:2 * D], (v["x"][i] @ v["weight"].t() + v["bias"])[..., D:2 * D],
                     GEMM_TOL[torch.float32])


@pytest.mark.parametrize("drop_input", [True, False])
def test_generic_op_per_row_bias_and_shared_factors(drop_input):
    """lowrank_linear_rows with a per-image trainable bias [B, N] and factors shared by every image
    (2-D, expanded with a zero image stride): forward and every gradient vs the reference."""
    g = torch.Generator().manual_seed(4)
    leaves = {"x": (rnd(g, B, TOKENS, D), True), "weight": (rnd(g, N, D, std=D ** -0.5), False),
              "bias": (rnd(g, B, N, std=0.1), True), "a": (rnd(g, RANK, D, std=D ** -0.5), True),
              "b": (rnd(g, N, RANK, std=0.3), True)}

    def fn(x, weight, bias, a, b, ref=False):
        a3, b3 = a.expand(B, -1, -1), b.expand(B, -1, -1)
        if ref:
            return L.lowrank_linear_rows_ref(x, weight, bias, a3, b3, dropout_p=0.3, drop_input=drop_input,
                                             seed=torch.tensor([3], dtype=torch.int64))
        return L.lowrank_linear_rows(x, weight, bias, a3, b3, dropout_p=0.3, drop_input=drop_input, training=True,
                                     seed=torch.tensor([3], dtype=torch.int64))

    with backend("triton"):
        check(fn, lambda **kw: fn(**kw, ref=True), leaves, rnd(g, B, TOKENS, N), torch.float32)


def test_saves_only_x_and_u_and_rank_zero():
    """Autograd keeps x and the rank-R u [B*L, R] (plus the frozen weight / factors), never a mask;
    a NOAH subnet of rank 0 is the frozen projection (with the images' own biases)."""
    leaves, _ = noah_leaves(torch.float32)
    v = {k: t.clone().requires_grad_(tr) for k, (t, tr) in leaves.items()}
    saved = []
    with backend("triton"), torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        _noah(**v, p=0.3, seed=torch.tensor([1], dtype=torch.int64))
    # the task ids (twice: the two gathers), x, the frozen weight, the images' factors a [B, R, D]
    # and (scaled) b [B, N, R], u [B*L, R], the seed
    shapes = [tuple(t.shape) for t in saved]
    assert sorted(shapes) == sorted([(B,), (B,), (B, 1, TOKENS, D), (N, D), (B, RANK, D), (B, N, RANK),
                                     (B * TOKENS, RANK), (1,)]), shapes
    assert any(t is v["x"] for t in saved)
    bias = rnd(torch.Generator().manual_seed(9), B, N)
    with backend("triton"):
        out = L.lora_noah_qkv_rows(B, v["x"], v["weight"], bias, v["lora_a"], v["lora_b"], rank=0, dropout_p=0.3,
                                   training=True)
    assert_close("rank 0", out, v["x"] @ v["weight"].t() + bias[:, None, None], GEMM_TOL[torch.float32])


# ----------------------------------------------------------------------------------------------
# Dropout: the kernels' Philox masks, regenerated identically in backward, at rate p
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("drop_input", [True, False])
def test_dropout_mask_regenerated_in_backward_at_rate_p(drop_input):
    """W = 0, A = B = I (per image): out = drop(x) exactly, and dx = drop'(g) with the same mask
    (read back from the forward), kept elements scaled by 1/(1-p), the drop fraction ~ p; the
    mask is a function of the seed."""
    images, tokens, d, p = 4, 64, 32, 0.4
    x = torch.rand(images, tokens, d) + 0.5
    eye = torch.eye(d).expand(images, d, d)
    w = torch.zeros(d, d)

    def fwd(seed, xx):
        return L.lowrank_linear_rows(xx, w, None, eye, eye, dropout_p=p, drop_input=drop_input, training=True,
                                     seed=torch.tensor([seed], dtype=torch.int64))

    with backend("triton"):
        xr = x.clone().requires_grad_()
        out = fwd(7, xr)
        gy = torch.rand_like(out) + 0.5
        out.backward(gy)
        again = fwd(7, x)
        other = fwd(8, x)
    kept = out != 0
    assert torch.equal(again, out.detach()) and not torch.equal(other, out.detach())
    assert_close("kept scaled", out.detach()[kept], x[kept] / (1 - p), GEMM_TOL[torch.float32])
    assert torch.equal(xr.grad != 0, kept)  # the backward regenerated the forward's mask
    assert_close("dx", xr.grad[kept], gy[kept] / (1 - p), GEMM_TOL[torch.float32])
    frac = 1.0 - kept.float().mean().item()
    assert abs(frac - p) < 0.03, frac
    # the same mask as the single-task op on the batch's rows (same seed, same offsets)
    with backend("triton"):
        single = L.lowrank_linear(x.reshape(-1, d), w, None, torch.eye(d), torch.eye(d), dropout_p=p,
                                  drop_input=drop_input, training=True, seed=torch.tensor([7], dtype=torch.int64))
    assert torch.equal(single.view(out.shape) != 0, kept)


# ----------------------------------------------------------------------------------------------
# Bad input: ValueError / TypeError before any launch
# ----------------------------------------------------------------------------------------------
def test_errors_before_any_launch(monkeypatch):
    def no_launch(*a, **k):
        raise AssertionError("launched")

    for name in ("launch_rows_fwd", "launch_rows_bwd"):
        monkeypatch.setattr(L, name, no_launch)
    g = torch.Generator().manual_seed(0)
    x, w = rnd(g, B, TOKENS, D), rnd(g, N, D)
    a, b = rnd(g, B, RANK, D), rnd(g, B, N, RANK)
    with backend("triton"):
        with pytest.raises(ValueError, match=r"a \(down\) must be \[B, R, D\] = \[3, R, 40\]"):
            L.lowrank_linear_rows(x, w, None, rnd(g, B + 1, RANK, D), b)
        with pytest.raises(ValueError, match=r"a \(down\) must be \[B, R, D\]"):
            L.lowrank_linear_rows(x, w, None, rnd(g, B, RANK, D + 1), b)
        with pytest.raises(ValueError, match=r"a must be 3-D"):
            L.lowrank_linear_rows(x, w, None, rnd(g, RANK, D), b)
        with pytest.raises(ValueError, match=r"b must have shape \(3, 120, 3\)"):
            L.lowrank_linear_rows(x, w, None, a, rnd(g, B, N, RANK + 1))
        with pytest.raises(ValueError, match=r"bias must be \[N\] = \[120\] or \[B, N\] = \[3, 120\]"):
            L.lowrank_linear_rows(x, w, rnd(g, B + 1, N), a, b)
        with pytest.raises(ValueError, match=r"weight must be \[N, D\]"):
            L.lowrank_linear_rows(x, rnd(g, N, D + 1), None, a, b)
        with pytest.raises(ValueError, match="unsupported dtype torch.float64"):
            L.lowrank_linear_rows(x.double(), w, None, a, b)
        with pytest.raises(ValueError, match=r"x must be \[B, \.\.\., D\]"):
            L.lowrank_linear_rows(x[0, 0], w, None, a, b)
        with pytest.raises(ValueError, match=r"dropout p must be in \[0, 1\)"):
            L.lowrank_linear_rows(x, w, None, a, b, dropout_p=1.0, training=True)
        with pytest.raises(ValueError, match="frozen projection weight"):
            L.lowrank_linear_rows(x, w.clone().requires_grad_(), None, a, b)
        with pytest.raises(TypeError, match="must be a torch.Tensor"):
            L.lowrank_linear_rows(x, w, None, a.tolist(), b)
        # the methods' forms
        with pytest.raises(ValueError, match=r"x must be \[B = 4, \.\.\., D\]"):
            L.lora_noah_qkv_rows(4, x, w, None, rnd(g, 4, 5, D), rnd(g, 4, N, 5))
        with pytest.raises(ValueError, match=r"lora_a must be \[\., \.\] \(shared\) or \[B = 3"):
            L.lora_noah_qkv_rows(B, x, w, None, rnd(g, B + 1, 5, D), rnd(g, B, N, 5))
        with pytest.raises(ValueError, match="as many columns as lora_a"):
            L.lora_noah_qkv_rows(B, x, w, None, rnd(g, B, 5, D), rnd(g, B, N, 4))
        with pytest.raises(ValueError, match=r"rank must be an int in \[0, 5\]"):
            L.lora_noah_qkv_rows(B, x, w, None, rnd(g, B, 5, D), rnd(g, B, N, 5), rank=6)
        with pytest.raises(ValueError, match=r"ups\['v'\] must be \[B, 40, 3\]"):
            L.lora_petl_qkv_rows(B, x, w, None, {"q": a, "v": a}, {"q": rnd(g, B, D, RANK), "v": rnd(g, B, D + 1, RANK)})
        with pytest.raises(ValueError, match="not a fused qkv"):
            L.lora_petl_qkv_rows(B, x, rnd(g, N + 1, D), None, {"q": a}, {"q": rnd(g, B, D, RANK)})
        with pytest.raises(ValueError, match="must name the same targets"):
            L.lora_petl_qkv_rows(B, x, w, None, {"q": a}, {"v": rnd(g, B, D, RANK)})


# ----------------------------------------------------------------------------------------------
# End to end: a multi-task model, patched on the Triton backend, mixed batch under the interpreter
# ----------------------------------------------------------------------------------------------
@pytest.fixture
def launches(monkeypatch):
    """Counts of the per-row launchers (and of the LoRA reference hooks, which must not run)."""
    from fastpeft.methods import lora

    counts = {"fwd": 0, "bwd": 0, "down": 0, "reference": 0}

    def counting(key, fn):
        def wrapped(*a, **k):
            counts[key] += 1
            return fn(*a, **k)
        return wrapped

    monkeypatch.setattr(L, "launch_rows_fwd", counting("fwd", L.launch_rows_fwd))
    monkeypatch.setattr(L, "launch_rows_bwd", counting("bwd", L.launch_rows_bwd))
    monkeypatch.setattr(K, "launch_rows_down", counting("down", K.launch_rows_down))
    for cls in (lora.NoahLoRAHook, lora.PetlLoRAHook):
        monkeypatch.setattr(cls, "apply", counting("reference", cls.apply))
    return counts


@pytest.mark.parametrize("label", ["LoRA qkv", "LoRA q,v", "NOAH"])
def test_patched_mixed_batch_matches_each_tasks_single_model(label, launches):
    from tests.test_multitask import DEPTH, IDS, IMG, TASKS, assert_matches_singles, images, multi_model, run_multi

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # vmap's per-row fallback for CPU attention
        m = multi_model(label)
        fastpeft.patch(m, backend="triton")
        x = images(batch=len(IDS), img_size=IMG)
        ids = fastpeft.task_index(m, [TASKS[i] for i in IDS])
        out, grads = run_multi(m, x, ids)
        # one per-row forward and backward per patched qkv, the reference hooks never ran
        assert launches == {"fwd": DEPTH, "bwd": DEPTH, "down": 0, "reference": 0}, launches
        assert_matches_singles(label, m, x, out, grads)
        if label == "NOAH":  # (its LoRA is "LoRA qkv"'s; the training step below is checked there)
            return
        # training: the dropout masks come from the per-row Triton kernel (forward; PETL's rank
        # dropout regenerates them by the same kernel in backward), the grads reach every task
        m.train()
        for k in launches:
            launches[k] = 0
        m.zero_grad(set_to_none=True)
        m(x, task=ids).square().sum().backward()
    petl = label == "LoRA q,v"
    assert launches == {"fwd": DEPTH, "bwd": DEPTH, "down": DEPTH * (2 if petl else 1), "reference": 0}, launches
    for n, p in m.named_parameters():
        if p.requires_grad and "lora" in n.lower():
            task = n.split(".")[1]
            assert p.grad is not None and torch.isfinite(p.grad).all(), n
            assert (torch.count_nonzero(p.grad) == 0) == (task == "t3"), n  # t3 has no rows
