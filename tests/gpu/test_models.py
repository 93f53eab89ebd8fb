"""`fastpeft.patch` on CUDA models: every method's patched ViT (Triton kernels, compiled) gives the
reference model's logits and parameter gradients, by default and with recompute=True; bf16 models
stay as close to the fp32 reference as the bf16 reference itself; torch.compile(fullgraph=True)
runs over a patched model, also as CUDA graphs (mode="reduce-overhead": the eager step's
gradients, fresh dropout masks per replay); the class-token-only last block draws eager's
dropout masks; VQT uses the CUDA extension and keeps the frozen tokens bit-identical.
"""
from __future__ import annotations

import copy

import pytest
import torch

import fastpeft
from tests.gpu.conftest import on_gpu
from tests.methods.conftest import grads_of, images, make_vit, randomize_
from tests.patch.test_fused_rules import CASES

pytestmark = on_gpu

# fp32: the kernels accumulate in fp32 (ieee dots) in another order than cuBLAS; atol scaled by
# max(1, max|reference|) as in the kernel tests.
ATOL, RTOL = 2e-5, 1e-4


def build(case, dtype=torch.float32, **kw):
    m = make_vit(**kw)
    fastpeft.inject(m, CASES[case]())
    randomize_([p for _, p in fastpeft.trainable_parameters(m)])
    return m.to(device="cuda", dtype=dtype).train()


def step(m, x):
    m.zero_grad(set_to_none=True)
    out = m(x)
    out.float().square().mean().backward()
    return out.detach().float(), {n: g.float() for n, g in grads_of(m).items()}


def close(name, got, want, atol=ATOL, rtol=RTOL):
    torch.testing.assert_close(got, want, atol=atol * max(1.0, want.abs().max().item()), rtol=rtol,
                               msg=lambda m: f"{name}: {m}")


def rel_err(got, want):
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("recompute", [False, True], ids=["default", "recompute"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_patched_model_matches_reference(case, recompute):
    m, x = build(case, img_size=224, depth=2), images(img_size=224).cuda()  # 197 tokens: odd tiles
    out0, g0 = step(m, x)
    params = dict(m.named_parameters())
    keys = list(m.state_dict())
    report = fastpeft.patch(m, recompute=recompute)
    assert report.patched, str(report)
    if case != "ssf":  # SSF's fusions are the LayerNorm / scale-shift kernels, named differently
        assert "triton" in str(report), str(report)
    assert all(p is params[n] for n, p in m.named_parameters())
    assert list(m.state_dict()) == keys
    out1, g1 = step(m, x)
    close("logits", out1, out0)
    assert g1.keys() == g0.keys() and g0
    for n in g0:
        close(n, g1[n], g0[n])


@pytest.mark.parametrize("case", ["adaptformer-parallel", "lora-noah", "ssf", "fact-tk", "kadaptation",
                                  "convpass", "adapter-noah"])
def test_bf16_patched_model_is_as_close_as_the_bf16_reference(case):
    """A bf16 model is judged against the fp32 reference: the patched bf16 model's logits and
    gradients may be off by no more than twice the eager bf16 model's own error (plus 1e-3):
    different, equally valid bf16 roundings (the kernels round once after fp32 accumulation)."""
    ref32 = build(case, img_size=224)
    x = images(img_size=224).cuda()
    out32, g32 = step(ref32, x)
    ref16 = copy.deepcopy(ref32).to(torch.bfloat16)
    out16, g16 = step(ref16, x.bfloat16())
    fastpeft.patch(ref16)
    outp, gp = step(ref16, x.bfloat16())
    assert rel_err(outp, out32) <= 2 * rel_err(out16, out32) + 1e-3
    for n in g32:
        assert rel_err(gp[n], g32[n]) <= 2 * rel_err(g16[n], g32[n]) + 1e-3, n


@pytest.mark.parametrize("case", ["adaptformer-parallel", "lora-noah", "ssf", "fact-tt", "convpass"])
def test_compile_fullgraph_over_patched_model(case):
    m = build(case, img_size=224)
    x = images(img_size=224).cuda()
    fastpeft.patch(m)
    out0, g0 = step(m, x)
    compiled = torch.compile(m, fullgraph=True)
    m.zero_grad(set_to_none=True)
    out1 = compiled(x)
    out1.float().square().mean().backward()
    out1, g1 = out1.detach().float(), grads_of(m)
    close("logits", out1, out0, atol=1e-4, rtol=1e-3)  # inductor re-fuses the frozen ops around ours
    for n in g0:
        close(n, g1[n], g0[n], atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("case", ["adaptformer-parallel", "lora-petl-qv"])
def test_graphed_train_step_over_patched_model(case):
    # the README's recipe: torch.compile(patch(model), mode="reduce-overhead") replays the forward
    # and the backward as CUDA graphs; each replay's gradients are the eager patched step's (two
    # op families: each case is a compile and CUDA-graph recording, out of a lent GPU's short
    # session; the fullgraph test above covers the others under compile)
    m = build(case, img_size=224)
    x = images(img_size=224).cuda()
    fastpeft.patch(m)
    out0, g0 = step(m, x)
    graphed = torch.compile(m, mode="reduce-overhead", fullgraph=True)
    for _ in range(3):  # record, then replay
        torch.compiler.cudagraph_mark_step_begin()
        m.zero_grad(set_to_none=True)
        out1 = graphed(x)
        out1.float().square().mean().backward()
        out1, g1 = out1.detach().float().clone(), grads_of(m)
        close("logits", out1, out0, atol=1e-4, rtol=1e-3)
        for n in g0:
            close(n, g1[n], g0[n], atol=1e-4, rtol=1e-3)


def test_graphed_step_draws_new_dropout_masks_each_replay():
    # a fused op's dropout seed is a random op inside the graph, not a constant of the recording
    m = make_vit(img_size=224)
    fastpeft.inject(m, fastpeft.LoRA(rank=8, dropout=0.5))
    randomize_([p for _, p in fastpeft.trainable_parameters(m)])
    m = m.cuda().train()
    fastpeft.patch(m)
    graphed = torch.compile(m, mode="reduce-overhead", fullgraph=True)
    x = images(img_size=224).cuda()
    outs = []
    for _ in range(4):
        torch.compiler.cudagraph_mark_step_begin()
        outs.append(graphed(x).detach().clone())
    assert all(not torch.equal(a, b) for a, b in zip(outs[1:], outs[2:]))  # replays: new masks


@pytest.mark.parametrize("case", ["adaptformer", "noah", "fact-tk", "convpass", "mlp-dropout"])
def test_class_token_only_last_block_draws_the_reference_masks_on_cuda(case):
    # (fastpeft/class_row.py) the torch backend keeps the reference slots and hooks, whose torch
    # dropout on the class row must draw the CUDA generator's numbers for every row, as eager does
    from tests.patch import test_class_row as lt

    m = lt.build(lt.ELIGIBLE[case], img_size=224, **lt.BUILD_KW.get(case, {})).cuda()
    x = images(batch=3, img_size=224).cuda()
    out0, g0 = lt.step(m, x)
    report = fastpeft.patch(m, backend="torch")
    assert "class token row only" in str(report), str(report)
    out1, g1 = lt.step(m, x)
    close("logits", out1, out0)
    assert g1.keys() == g0.keys() and g0
    for n in g0:
        close(n, g1[n], g0[n])


def held_for_backward(m, x):
    """Device bytes a forward leaves allocated (what autograd holds for backward, plus the
    logits): seen by the CUDA allocator, so it counts what selective checkpointing keeps too."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    out = m(x)
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated() - before
    out.sum().backward()
    m.zero_grad(set_to_none=True)
    return held


@pytest.mark.parametrize("case", ["adaptformer-parallel", "lora-noah", "ssf", "convpass", "fact-tk"])
def test_patch_holds_no_more_on_cuda(case):
    m = build(case, img_size=224, depth=4)
    x = torch.randn(8, 3, 224, 224, device="cuda")
    ref = held_for_backward(m, x)
    fastpeft.patch(m)
    assert held_for_backward(m, x) <= ref
    fastpeft.patch(m, recompute=True)
    assert held_for_backward(m, x) <= 0.5 * ref


# --- VQT through the CUDA extension -----------------------------------------------------------

def _vqt(Q, dtype=torch.float32):
    m = fastpeft.inject(make_vit(depth=3, img_size=224), fastpeft.VQT(num_queries=Q, dropout=0.0))
    with torch.no_grad():
        m.head.bias.normal_(0, 0.1)
    return m.to(device="cuda", dtype=dtype)


def _vqt_step(m, x, call=None):
    """(logits, grads) of one step of `m`, run through `call` (e.g. a compiled m) where given."""
    for p in m.parameters():
        p.grad = None
    logits = (call or m)(x)
    (logits.float() * torch.linspace(-1, 1, logits.shape[1], device="cuda")).sum().backward()
    return logits.detach().float(), {n: p.grad.float() for n, p in m.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("Q", [1, 10, 50])
def test_vqt_patched_matches_reference(Q):
    from fastpeft import _ext

    assert _ext.load().has_cuda, _ext.load()
    ref = _vqt(Q)
    fused = copy.deepcopy(ref)
    report = fastpeft.patch(fused)
    assert any("VQT block" in what for _, what, _ in report.patched), str(report)
    x = images(img_size=224).cuda()
    l0, g0 = _vqt_step(ref, x)
    l1, g1 = _vqt_step(fused, x)
    close("logits", l1, l0)
    assert set(g1) == set(g0) == {"query_prompt_embeddings", "head.weight", "head.bias"}
    for n in g0:
        close(n, g1[n], g0[n])


def test_vqt_compile_fullgraph_matches_eager_patch():
    # under tracing the query attention is the registered op (its CUDA kernel and formulas)
    fused = _vqt(4)
    fastpeft.patch(fused)
    x = images(img_size=224).cuda()
    l0, g0 = _vqt_step(fused, x)
    l1, g1 = _vqt_step(fused, x, torch.compile(fused, fullgraph=True))
    close("logits", l1, l0, atol=1e-4, rtol=1e-3)
    assert set(g1) == set(g0)
    for n in g0:
        close(n, g1[n], g0[n], atol=1e-4, rtol=1e-3)


def test_vqt_frozen_tokens_bit_identical():
    from tests.test_vqt_patch import _block_io

    frozen = make_vit(depth=3, img_size=224).cuda()
    fused = fastpeft.inject(copy.deepcopy(frozen), fastpeft.VQT(num_queries=5))
    fastpeft.patch(fused)
    ref, got = _block_io(frozen), _block_io(fused)
    x = images(img_size=224).cuda()
    with torch.no_grad():
        frozen(x)
    fused(x).sum().backward()
    assert len(got["in"]) == len(ref["in"]) == 3
    for a, b in zip(got["in"], ref["in"]):  # every key/value the queries read
        assert torch.equal(a, b) and not a.requires_grad
    for a, b in zip(got["out"][:-1], ref["out"][:-1]):
        assert torch.equal(a, b)
    close("class token", got["out"][-1], ref["out"][-1][:, :1])  # the last block: its CLS row only


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_vqt_low_precision(dtype):
    ref32 = _vqt(4)
    x = images(img_size=224).cuda()
    l32, g32 = _vqt_step(ref32, x)
    ref = copy.deepcopy(ref32).to(dtype)
    l16, g16 = _vqt_step(ref, x.to(dtype))
    fastpeft.patch(ref)
    lp, gp = _vqt_step(ref, x.to(dtype))
    assert rel_err(lp, l32) <= 2 * rel_err(l16, l32) + 1e-3
    for n in g32:
        assert rel_err(gp[n], g32[n]) <= 2 * rel_err(g16[n], g32[n]) + 1e-3, n
