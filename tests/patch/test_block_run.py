"""The patched block run (fastpeft/block.py `PATCHED`, and the recompute / class-row runs built on
`PatchedRun`): the reference's ops on the same tensors, in its order, without the calls of timm's
no-op modules (nn.Identity; nn.Dropout and DropPath at rate 0 or out of training), and with the
module calls back wherever something could see them (a hook of the module's own or a global one).
The reference (`inject` without `patch`) keeps calling every module."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from timm.layers import DropPath
from torch import nn

import fastpeft
from fastpeft.block import PATCHED
from tests.methods.conftest import grads_of, images, make_vit, randomize_

METHODS = {
    "bitfit": lambda: fastpeft.BitFit(),
    "adapter": lambda: fastpeft.Adapter(dim=8, dropout=0.0),
    "lora": lambda: fastpeft.LoRA(rank=4, targets=("q", "v")),
}


def injected(method: str, **kw):
    m = make_vit(depth=3, img_size=32, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fastpeft.inject(m, METHODS[method]())
    randomize_([p for _, p in fastpeft.trainable_parameters(m)])
    return m.train()


def step(m, x, seed=5):
    torch.manual_seed(seed)
    out = m(x)
    out.square().mean().backward()
    grads = grads_of(m)
    m.zero_grad(set_to_none=True)
    return out, grads


@pytest.fixture
def noop_calls(monkeypatch):
    """The modules whose forward ran, for nn.Identity / nn.Dropout / DropPath (the classes'
    forward replaced, not an instance's: the patched run still regards them as no-ops)."""
    seen: list[nn.Module] = []
    for cls in (nn.Identity, nn.Dropout, DropPath):
        def counted(self, x, _orig=cls.forward):
            seen.append(self)
            return _orig(self, x)
        monkeypatch.setattr(cls, "forward", counted)
    return seen


#: timm's no-op slots in a block: what the reference's Block / Attention / Mlp forwards call
NOOP_SLOTS = ("ls1", "drop_path1", "ls2", "drop_path2", "attn.q_norm", "attn.k_norm", "attn.norm", "attn.proj_drop",
              "mlp.drop1", "mlp.norm", "mlp.drop2")


def _slot_calls(model, seen) -> list[nn.Module]:
    slots = {id(b.get_submodule(n)) for b in model.blocks for n in NOOP_SLOTS}
    return [m for m in seen if id(m) in slots]


def _calling_every_module(monkeypatch):
    """The patched runs with every module called, as if each had a hook: the elision undone."""
    monkeypatch.setattr(fastpeft.block, "called_for_more", lambda mod: True)


@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_patched_blocks_skip_noop_calls_with_the_same_results(method, recompute, noop_calls, monkeypatch):
    ref = injected(method)
    m = copy.deepcopy(ref)
    x = images(batch=2, img_size=32)
    step(ref, x)
    assert len(_slot_calls(ref, noop_calls)) == len(NOOP_SLOTS) * len(ref.blocks)  # (the reference: every one, once)

    fastpeft.patch(m, backend="torch", recompute=recompute)
    assert all(type(b).__name__.startswith("Injected") for b in m.blocks)
    noop_calls.clear()
    got_out, got = step(m, x)
    assert _slot_calls(m, noop_calls) == []
    with monkeypatch.context() as mp:
        _calling_every_module(mp)
        noop_calls.clear()
        want_out, want = step(m, x)
        assert len(_slot_calls(m, noop_calls)) >= len(NOOP_SLOTS) * (len(m.blocks) - 1)
    assert torch.equal(got_out, want_out)
    assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in want)


def test_patched_run_is_set_where_no_other_run_is_and_unpatch_removes_it():
    m = injected("bitfit")
    classes = [type(b) for b in m.blocks]
    names = list(m.state_dict())
    params = [id(p) for p in m.parameters()]
    report = fastpeft.patch(m, backend="torch")
    assert all(b.__dict__["_fastpeft_run"] is PATCHED for b in m.blocks)
    assert any(what == "blocks 0-2" and "no-op modules" in how for what, how, _ in report.patched), str(report)
    assert list(m.state_dict()) == names and [id(p) for p in m.parameters()] == params
    fastpeft.unpatch(m)
    assert [type(b) for b in m.blocks] == classes
    assert not any("_fastpeft_run" in b.__dict__ for b in m.blocks)

    fastpeft.patch(m, backend="torch", recompute=True)  # recompute's own run, not PATCHED
    assert all(b.__dict__["_fastpeft_run"] is not PATCHED for b in m.blocks)


@pytest.mark.parametrize("where", ["ls1", "attn.proj_drop", "attn.q_norm", "mlp.drop2", "drop_path2", "attn", "mlp"])
@pytest.mark.parametrize("recompute", [False, True])
def test_a_hook_on_a_noop_module_or_its_parent_still_runs(where, recompute):
    # a user's hook registered after patch: the module is called for it in forward, as in the
    # reference (recompute may call it again in backward, as torch's checkpointing does)
    ref = injected("adapter")
    m = copy.deepcopy(ref)
    fastpeft.patch(m, backend="torch", recompute=recompute)
    x = images(batch=2, img_size=32)
    seen = {}
    for name, model in (("ref", ref), ("patched", m)):
        hits = []
        model.blocks[0].get_submodule(where).register_forward_hook(lambda mod, args, out: hits.append(out.shape))
        model.blocks[1].get_submodule(where).register_forward_pre_hook(lambda mod, args: hits.append("pre"))
        seen[name] = (hits, model(x))
    assert seen["patched"][0] == seen["ref"][0] and len(seen["ref"][0]) == 2
    torch.testing.assert_close(seen["patched"][1], seen["ref"][1], atol=1e-5, rtol=1e-4)


def test_a_global_module_hook_sees_every_module_call(noop_calls):
    ref = injected("lora")
    m = copy.deepcopy(ref)
    fastpeft.patch(m, backend="torch")
    x = images(batch=2, img_size=32)
    seen = {}
    for name, model in (("ref", ref), ("patched", m)):
        called = []
        handle = nn.modules.module.register_module_forward_hook(lambda mod, args, out: called.append(type(mod)))
        try:
            with torch.no_grad():
                model(x)
        finally:
            handle.remove()
        seen[name] = called
    assert nn.Identity in seen["ref"]
    assert seen["patched"].count(nn.Identity) == seen["ref"].count(nn.Identity)
    assert seen["patched"].count(nn.Dropout) == seen["ref"].count(nn.Dropout)


@pytest.mark.parametrize("recompute", [False, True])
def test_dropout_and_drop_path_that_draw_are_called_and_draw_the_same_masks(recompute, noop_calls, monkeypatch):
    # rate > 0 in training: not no-ops; the same draws in the same order as with every module called
    m = injected("adapter", proj_drop_rate=0.1, drop_path_rate=0.2)
    fastpeft.patch(m, backend="torch", recompute=recompute)  # (recompute: runs the reference on probe images)
    x = images(batch=2, img_size=32)
    noop_calls.clear()
    got_out, got = step(m, x)
    called = _slot_calls(m, noop_calls)
    assert any(type(c) is DropPath for c in called) and any(type(c) is nn.Dropout for c in called)
    assert not any(type(c) is nn.Identity for c in called)
    with monkeypatch.context() as mp:
        _calling_every_module(mp)
        want_out, want = step(m, x)
    assert torch.equal(got_out, want_out)
    assert all(torch.equal(got[n], want[n]) for n in want)
    # out of training the same modules are no-ops again
    m.eval()
    with torch.no_grad():
        noop_calls.clear()
        got_eval = m(x)
        assert _slot_calls(m, noop_calls) == []
        with monkeypatch.context() as mp:
            _calling_every_module(mp)
            assert torch.equal(got_eval, m(x))


@pytest.mark.parametrize("case", ["plain", "qk-norm", "mask", "causal", "attn-dropout", "eval"])
def test_inline_attention_and_mlp_are_timms_forwards_bit_for_bit(case):
    # the patched run's copies of timm's Attention / Mlp forwards (fastpeft/block.py
    # `attention_forward`, `mlp_forward`) against the installed timm's own, so that a timm whose
    # forwards change fails here
    from timm.layers import Attention, Mlp

    from fastpeft.block import attention_forward, copied_forward, mlp_forward

    # the pinned timm's forwards are the copied ones (a timm whose forwards differ: re-check the
    # copies against it, then add its sources' hashes to fastpeft.block.COPIED_FORWARDS)
    assert copied_forward(Attention) and copied_forward(Mlp)
    kw = {"qk_norm": True} if case == "qk-norm" else {"attn_drop_rate": 0.2} if case == "attn-dropout" else {}
    blk = make_vit(depth=1, img_size=32, proj_drop_rate=0.1 if case == "attn-dropout" else 0.0, **kw).blocks[0]
    blk.train(case != "eval")
    h = torch.randn(2, 5, blk.attn.qkv.in_features, requires_grad=True)
    call = {}
    if case == "mask":
        call["attn_mask"] = torch.rand(2, 1, 5, 5) > 0.3
    elif case == "causal":
        call["is_causal"] = True
    results = []
    for fn in (lambda: blk.attn(h, **call), lambda: attention_forward(blk.attn, h, call),
               lambda: blk.mlp(h), lambda: mlp_forward(blk.mlp, h)):
        torch.manual_seed(0)
        out = fn()
        (g,) = torch.autograd.grad(out.square().sum(), h)
        results.append((out, g))
    for (want, want_g), (got, got_g) in (results[:2], results[2:]):
        assert torch.equal(got, want) and torch.equal(got_g, want_g)


@pytest.mark.parametrize("recompute", [False, True])
def test_a_timm_forward_not_copied_is_not_inlined(recompute, noop_calls):
    # another timm's Attention / Mlp forward (none of the copied sources' hashes): patch inlines
    # neither, so no class-row pass and no lean recompute halves, and the patched run calls those
    # modules (their no-op submodules then run inside them)
    ref = injected("bitfit")
    m = copy.deepcopy(ref)
    x = images(batch=2, img_size=32)
    want_out, want = step(ref, x)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(fastpeft.block, "COPIED_FORWARDS", frozenset())
            fastpeft.block._copied_forward.cache_clear()
            report = fastpeft.patch(m, backend="torch", recompute=recompute)
            assert any(what.startswith("model.forward") and "forward fastpeft copies" in why
                       for what, why in report.left_alone), str(report)
            assert not any("lean recompute" in how for _, how, _ in report.patched), str(report)
            noop_calls.clear()
            got_out, got = step(m, x)
    finally:
        fastpeft.block._copied_forward.cache_clear()
    names = {id(b.get_submodule(n)) for b in m.blocks for n in ("attn.q_norm", "attn.proj_drop", "mlp.drop1")}
    assert {id(c) for c in noop_calls} >= names
    torch.testing.assert_close(got_out, want_out, atol=1e-5, rtol=1e-4)
    assert want.keys() == got.keys()
    for n in want:
        torch.testing.assert_close(got[n], want[n], atol=1e-5, rtol=1e-4)
