"""`fastpeft.patch` on VQT models (fastpeft/fused/vqt.py) against the reference VQT
(fastpeft/methods/vqt.py): logits, query/head gradients, the frozen tokens' hidden states, saved
activation bytes, unpatch, and the no-extension fallback."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fastpeft
from fastpeft import _ext
from fastpeft.fused.vqt import FusedVQTBlock, FusedVQTForwardHead, use_absorbed_backward
from fastpeft.profile import saved_activation_bytes

from .methods.conftest import images, make_vit

# fp32 on CPU: the fused path computes the query rows' GEMMs on Q rows instead of Q + N, and the
# attention with another summation order (and, in the absorbed backward, in the LN1 basis).
ATOL, RTOL = 2e-5, 1e-4


def _vqt_pair(Q=2, depth=3, backend="auto", dropout=0.0, name="vit_tiny_patch16_224", img_size=64, **kw):
    ref = fastpeft.inject(make_vit(name, depth=depth, img_size=img_size, **kw), fastpeft.VQT(num_queries=Q, dropout=dropout))
    with torch.no_grad():  # a non-trivial head bias/weights so every feature matters
        ref.head.bias.normal_(0, 0.1)
    fused = copy.deepcopy(ref)
    report = fastpeft.patch(fused, backend=backend)
    return ref, fused, report


def _step(model, x, seed=0):
    torch.manual_seed(seed)
    for p in model.parameters():
        p.grad = None
    logits = model(x)
    (logits * torch.linspace(-1, 1, logits.shape[1])).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


def _assert_same_step(ref, fused, x, seed=0):
    l_ref, g_ref = _step(ref, x, seed)
    l_fused, g_fused = _step(fused, x, seed)
    torch.testing.assert_close(l_fused, l_ref, atol=ATOL, rtol=RTOL)
    assert set(g_fused) == set(g_ref) == {"query_prompt_embeddings", "head.weight", "head.bias"}
    for n in g_ref:
        torch.testing.assert_close(g_fused[n], g_ref[n], atol=ATOL * g_ref[n].abs().max().item(), rtol=RTOL,
                                   msg=lambda m: f"{n}: {m}")


def _backends():
    out = ["torch"]
    if _ext.load().available:
        out.append("cpp")
    return out


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("Q", [1, 3])
def test_patched_matches_reference(Q, backend):
    ref, fused, report = _vqt_pair(Q=Q, backend=backend)
    assert any("VQT block" in what for _, what, _ in report.patched), str(report)
    assert all(isinstance(b._fastpeft_slots["block_fn"][0], FusedVQTBlock) for b in fused.blocks)
    assert isinstance(fused.forward_head, FusedVQTForwardHead)
    _assert_same_step(ref, fused, images())


@pytest.mark.parametrize("Q", [1, 150])
def test_both_backward_forms_match_reference(Q, monkeypatch):
    # Absorbed (few queries) and K/V-rebuild (many queries) backward: pin each form and compare.
    assert use_absorbed_backward(torch.device("cpu"), 3, 1, 64, 192)
    assert not use_absorbed_backward(torch.device("cpu"), 3, 150, 64, 192)
    ref, fused, _ = _vqt_pair(Q=Q, depth=2)
    _assert_same_step(ref, fused, images())


def test_qkv_without_bias_and_train_mode_dropout():
    # qkv_bias=False (no bias folding) and query dropout active: same RNG draws in both paths.
    ref, fused, _ = _vqt_pair(Q=2, dropout=0.3, qkv_bias=False)
    ref.train()
    fused.train()
    _assert_same_step(ref, fused, images(), seed=5)


def _block_io(model, last_by_forward=False):
    """Record every block's input and output for the next forward; the last block's through its
    forward instead of a hook when `last_by_forward` (a user's hook there is shown every row, as by
    the unpatched model, so the class-token pass steps aside while one is registered)."""
    rec = {"in": [], "out": []}

    def hook(mod, inp, out):
        rec["in"].append(inp[0].detach().clone())
        rec["out"].append(out.detach().clone())

    for blk in model.blocks[:-1] if last_by_forward else model.blocks:
        blk.register_forward_hook(hook)
    if last_by_forward:
        last = model.blocks[-1]
        inner = last.forward

        def forward(x):
            out = inner(x)
            hook(last, (x,), out)
            return out

        last.forward = forward
    return rec


def test_original_tokens_bit_identical_to_frozen_model():
    frozen = make_vit(depth=3)
    fused = fastpeft.inject(copy.deepcopy(frozen), fastpeft.VQT(num_queries=2))
    report = fastpeft.patch(fused)
    assert any("class token row only" in what for _, what, _ in report.patched), str(report)
    ref, got = _block_io(frozen), _block_io(fused, last_by_forward=True)
    x = images()
    with torch.no_grad():
        frozen(x)
    fused(x).sum().backward()
    # model(x): every hidden state the queries read (each block's input, so every key/value) is
    # the frozen model's, bit for bit; nothing on the token path carries autograd
    assert len(got["in"]) == len(ref["in"]) == 3
    for a, b in zip(got["in"], ref["in"]):
        assert torch.equal(a, b)
        assert not a.requires_grad
    for a, b in zip(got["out"][:-1], ref["out"][:-1]):
        assert torch.equal(a, b)
    # the last block computes only the class token's row (what the head reads): same math on
    # one row instead of N, equal to fp32 rounding
    last = got["out"][-1]
    assert last.shape == (x.shape[0], 1, ref["out"][-1].shape[-1]) and not last.requires_grad
    torch.testing.assert_close(last, ref["out"][-1][:, :1], atol=1e-5, rtol=1e-5)
    # forward_features is the whole token path, bit-identical in every block
    for rec in (ref, got):
        rec["in"].clear(), rec["out"].clear()
    with torch.no_grad():
        frozen.forward_features(x)
        fused.forward_features(x)
    for a, b in zip(got["out"], ref["out"], strict=True):
        assert torch.equal(a, b)
    # a user's hook on the last block sees every row, the frozen model's, as without `patch`
    seen = []
    fused.blocks[-1].register_forward_hook(lambda mod, inp, out: seen.append(out.detach().clone()))
    with torch.no_grad():
        fused(x)
    assert torch.equal(seen[0], ref["out"][-1])


def test_class_token_shortcut_only_where_the_head_reads_the_class_token_alone():
    for kw, why in (({"global_pool": "avg"}, "reads every token"), ({"proj_drop_rate": 0.1}, "dropout")):
        ref, fused, report = _vqt_pair(Q=1, depth=2, **kw)
        assert "forward" not in fused.__dict__
        assert any(why in reason for _, reason in report.left_alone), str(report)
        _assert_same_step(ref.eval(), fused.eval(), images())


def test_saved_bytes_at_most_a_fifth_of_the_reference():
    ref, fused, _ = _vqt_pair(Q=1, depth=4, name="vit_small_patch16_224", img_size=224)
    x = images(batch=2, img_size=224)
    b_ref = saved_activation_bytes(lambda: ref(x).sum().backward(), exclude=[ref])
    b_fused = saved_activation_bytes(lambda: fused(x).sum().backward(), exclude=[fused])
    assert b_fused <= 0.2 * b_ref, (b_fused, b_ref)
    # What the fused step keeps per block: LN1 output [B, N, D] plus small query-row tensors.
    B, N, D = 2, 197, 384
    assert b_fused < 4 * (B * N * D * 4) * 1.25


def test_unpatch_restores_the_reference_and_patch_is_idempotent():
    ref, fused, report = _vqt_pair(Q=1, depth=2)
    assert fastpeft.patch(fused) is report
    fastpeft.unpatch(fused)
    assert not any(isinstance(b._fastpeft_slots["block_fn"][0], FusedVQTBlock) for b in fused.blocks)
    assert not isinstance(fused.forward_head, FusedVQTForwardHead)
    x = images()
    torch.testing.assert_close(fused(x), ref(x), atol=0, rtol=0)


def test_patched_model_deepcopies_and_pickles():
    import io

    _, fused, _ = _vqt_pair(Q=1, depth=2)
    x = images()
    want = fused(x).detach()
    twin = copy.deepcopy(fused)
    torch.testing.assert_close(twin(x), want, atol=0, rtol=0)
    buf = io.BytesIO()
    torch.save(fused, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    torch.testing.assert_close(loaded(x), want, atol=0, rtol=0)


def test_unfrozen_backbone_falls_back_to_the_reference_per_call():
    ref, fused, _ = _vqt_pair(Q=1, depth=2)
    for m in (ref, fused):
        m.blocks[1].mlp.fc2.weight.requires_grad_(True)
    x = images()
    l_ref, g_ref = _step(ref, x)
    l_fused, g_fused = _step(fused, x)
    torch.testing.assert_close(l_fused, l_ref, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(g_fused["blocks.1.mlp.fc2.weight"], g_ref["blocks.1.mlp.fc2.weight"], atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize(
    ("kw", "why"),
    [({"qk_norm": True}, "qk-norm"), ({"attn_drop_rate": 0.1}, "attention dropout"),
     ({"drop_path_rate": 0.1}, "drop_path")],
)
def test_unsupported_blocks_are_left_to_the_reference(kw, why):
    ref, fused, report = _vqt_pair(Q=1, depth=2, **kw)
    assert any(why in reason for _, reason in report.left_alone), str(report)
    # (stochastic depth grows linearly from 0: block 0 has no DropPath and is fused)
    assert not isinstance(fused.blocks[-1]._fastpeft_slots["block_fn"][0], FusedVQTBlock)
    ref.eval()
    fused.eval()
    x = images()
    # The blocks are the reference's; only the head's features come from the fused op.
    torch.testing.assert_close(fused(x), ref(x), atol=ATOL, rtol=RTOL)


# --- no extension --------------------------------------------------------------------------

FALLBACK_SCRIPT = textwrap.dedent(
    """
    import copy, json, sys, warnings
    sys.path.insert(0, %r)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import torch, fastpeft
        from tests.methods.conftest import make_vit, images
        ref = fastpeft.inject(make_vit(depth=2), fastpeft.VQT(num_queries=2, dropout=0.0))
        fused = copy.deepcopy(ref)
        report = fastpeft.patch(fused)
        x = images()
        err = (fused(x) - ref(x)).abs().max().item()
        fused(x).sum().backward()
    print(json.dumps({
        "warnings": [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)],
        "backend": report.backend, "patched": [list(p) for p in report.patched], "err": err,
        "grad": fused.query_prompt_embeddings.grad is not None,
    }))
    """
)


def test_without_the_extension_vqt_runs_on_the_reference_with_one_warning(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "FASTPEFT_DISABLE_EXT": "1"}
    out = subprocess.run([sys.executable, "-c", FALLBACK_SCRIPT % root], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(report["warnings"]) == 1 and "FASTPEFT_DISABLE_EXT" in report["warnings"][0], report
    assert report["backend"] == "torch"
    assert [p[2] for p in report["patched"] if "VQT" in p[1]] == ["torch", "torch", "torch"]
    assert report["err"] < 1e-4 and report["grad"]


# --- the one-node block (fastpeft/fused/vqt.py _QueryTokenBlock / _QueryBlock) ---------------

def test_plain_blocks_run_queries_and_tokens_in_one_node(monkeypatch):
    import fastpeft.fused.vqt as fv

    ref, fused, _ = _vqt_pair(Q=2, depth=3, dropout=0.0)
    generic = copy.deepcopy(fused)
    x = images()
    seen = []
    real = fv._QueryTokenBlock.apply

    def spy(*args):
        out = real(*args)
        seen.append(out[0].grad_fn.name())
        return out

    monkeypatch.setattr(fv._QueryTokenBlock, "apply", spy)
    l_fused, g_fused = _step(fused, x)
    # blocks 0 and 1 in one node each (block 2 is the class-row pass: its queries in `_QueryBlock`)
    assert seen == ["_QueryTokenBlockBackward"] * 2
    monkeypatch.setattr(fv, "_query_block_plan", lambda block: None)
    for blk in generic.blocks:  # (patch bound each block's plan: bind again, without one)
        blk._fastpeft_slots["block_fn"][0].bind(blk)
    l_gen, g_gen = _step(generic, x)
    assert len(seen) == 2  # the generic path: the modules op by op
    torch.testing.assert_close(l_fused, l_gen, atol=1e-6, rtol=1e-6)
    for n in g_gen:
        torch.testing.assert_close(g_fused[n], g_gen[n], atol=1e-6 * g_gen[n].abs().max().item(), rtol=1e-5)
    _assert_same_step(ref, fused, x)


def test_one_node_block_tokens_bit_identical_with_layer_scale_and_batch():
    # LayerScale (init_values) and batch 3: the tokens' rows of the concatenated GEMMs are the
    # frozen model's, and the step matches the reference
    frozen = make_vit(depth=2, init_values=0.5)
    fused = fastpeft.inject(copy.deepcopy(frozen), fastpeft.VQT(num_queries=3, dropout=0.0))
    ref = copy.deepcopy(fused)
    fastpeft.patch(fused)
    x = images(batch=3)
    got = []
    fused.blocks[0].register_forward_hook(lambda m, a, out: got.append(out.detach().clone()))
    want = []
    frozen.blocks[0].register_forward_hook(lambda m, a, out: want.append(out.detach().clone()))
    with torch.no_grad():
        frozen(x)
    _assert_same_step(ref, fused, x)
    assert torch.equal(got[0], want[0])


def test_a_hook_on_a_block_module_after_patch_sees_its_calls():
    ref, fused, _ = _vqt_pair(Q=2, depth=2, dropout=0.0)
    shapes = []
    handle = fused.blocks[0].mlp.fc1.register_forward_hook(lambda m, a, out: shapes.append(tuple(out.shape)))
    x = images()
    _assert_same_step(ref, fused, x)
    handle.remove()
    # the generic path: the frozen tokens' fc1 call, then the query rows' (batch 2, Q = 2)
    assert shapes == [(2, 17, 768), (2, 2, 768)]


def test_small_token_counts_rebuild_keys_and_values():
    cpu = torch.device("cpu")
    # the K/V GEMM of 5 token rows at width 192 is smaller than the absorbed form's extra ops
    assert not use_absorbed_backward(cpu, 3, 1, 64, 192, rows=5)
    assert use_absorbed_backward(cpu, 3, 1, 64, 192, rows=34)
    assert use_absorbed_backward(cpu, 3, 1, 64, 192)
    ref, fused, _ = _vqt_pair(Q=1, depth=2, img_size=32)
    _assert_same_step(ref, fused, images(batch=1, img_size=32))
