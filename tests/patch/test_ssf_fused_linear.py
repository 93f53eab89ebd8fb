"""SSF under `patch` on the Triton backend: a plain frozen nn.Linear whose only hook is its SSF
(qkv, proj, fc2; fc1 with the Mlp's GELU) becomes one `FusedLinearSSF` op (fastpeft/fused/ssf.py),
with the reference's logits and gradients, an exact `unpatch`, torch.compile, and the other cases
(recompute, a foreign hook on the Linear) keeping the separate ops. Also: a fused call runs with the
class-row pass's dropout mode popped (fastpeft/fused/common.py `kernel_call`), any other mode kept."""
from __future__ import annotations

import torch
from torch import nn

import fastpeft
from fastpeft.class_row import _ClassRowDraws
from fastpeft.fused.common import AbsorbedHook, kernel_call
from fastpeft.fused.ssf import FusedLinearSSF, FusedSSFHook, SSFGELU
from fastpeft.methods.ssf import SSFHook
from tests.methods.conftest import images, make_vit, randomize_
from tests.patch.conftest import assert_compiled_step_matches, assert_step_close, forward_backward, train_step

ATOL, RTOL = 1e-5, 1e-4
LINEARS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")


def ssf_vit(depth=2):
    m = make_vit(depth=depth, img_size=32)
    fastpeft.inject(m, fastpeft.SSF())
    randomize_([p for _, p in fastpeft.trainable_parameters(m)])
    return m.train()


run = forward_backward


def test_frozen_linears_fuse_with_their_ssf_and_unpatch_restores():
    m, x = ssf_vit(), images(batch=2, img_size=32)
    hooks = {p: list(m.get_submodule(f"blocks.0.{p}")._forward_hooks.items()) for p in LINEARS}
    out0, g0 = run(m, x)
    report = fastpeft.patch(m, backend="triton")
    assert "Linear -> SSF as one op" in str(report) and "fc1 -> SSF -> GELU as one op" in str(report)
    for blk in m.blocks:
        for p in LINEARS:
            layer = blk.get_submodule(p)
            assert type(layer) is FusedLinearSSF, p
            assert [type(fn) for fn in layer._forward_hooks.values()] == [AbsorbedHook], p
        assert type(blk.mlp.act) is nn.Identity
    assert_step_close(m, x, out0, g0, ATOL, RTOL)
    fastpeft.unpatch(m)
    for p in LINEARS:
        layer = m.get_submodule(f"blocks.0.{p}")
        assert type(layer) is nn.Linear and "_fastpeft_ssf" not in layer.__dict__
        assert list(layer._forward_hooks.items()) == hooks[p]  # the same hook objects under the same ids
    assert type(m.blocks[0].mlp.act) is nn.GELU
    out2, g2 = run(m, x)
    assert torch.equal(out2, out0) and all(torch.equal(g2[n], g0[n]) for n in g0)


def test_compiled_fused_linears_match_eager():
    m, x = ssf_vit(depth=1), images(batch=2, img_size=32)
    fastpeft.patch(m, backend="triton")
    assert type(m.blocks[0].attn.qkv) is FusedLinearSSF
    loss0, g0 = train_step(m, x)
    assert_compiled_step_matches(m, x, loss0, g0)


def test_recompute_and_foreign_hooks_keep_the_separate_ops():
    m = ssf_vit(depth=1)
    fastpeft.patch(m, backend="triton", recompute=True)
    blk = m.blocks[0]
    assert type(blk.attn.qkv) is nn.Linear and type(blk.mlp.act) is SSFGELU
    fastpeft.unpatch(m)

    m, x = ssf_vit(depth=1), images(batch=2, img_size=32)
    seen = []
    m.blocks[0].attn.proj.register_forward_hook(lambda mod, inp, out: seen.append(out.detach().clone()))
    out0, g0 = run(m, x)
    ref_seen = seen.pop()
    fastpeft.patch(m, backend="triton")
    proj = m.blocks[0].attn.proj
    assert type(proj) is nn.Linear  # its SSF stays a hook, ahead of the user's
    assert [type(fn) for fn in proj._forward_hooks.values()][0] is FusedSSFHook
    assert type(m.blocks[0].attn.qkv) is FusedLinearSSF
    out1, g1 = run(m, x)
    torch.testing.assert_close(seen.pop(), ref_seen, atol=ATOL, rtol=RTOL)  # the user's hook saw SSF's output
    torch.testing.assert_close(out1, out0, atol=ATOL, rtol=RTOL)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], atol=ATOL, rtol=RTOL, msg=n)


class _Counting(torch.overrides.TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


def test_fused_calls_run_outside_the_class_row_dropout_mode_only():
    x = torch.randn(2, 3)

    def probe(t):
        return torch._C._len_torch_function_stack(), t + 1

    with _ClassRowDraws(5) as mode:
        depth, _ = kernel_call("torch", "cpu", probe, x)
        assert depth == 0  # popped for the call
        assert torch.overrides._get_current_function_mode() is mode  # and back after it
        try:
            kernel_call("torch", "cpu", lambda t: 1 / 0, x)
        except ZeroDivisionError:
            pass
        assert torch.overrides._get_current_function_mode() is mode  # also after an error
    with _Counting() as user:
        depth, _ = kernel_call("torch", "cpu", probe, x)
    assert depth == 1 and user.calls == 1  # a mode that is not the class-row pass's sees the op's calls


def test_class_row_pass_keeps_its_dropout_redirection_around_fused_ops():
    # the class-row pass (last block on the class token's row) with fused SSF ops in its tail and an
    # active nn.Dropout there: the same loss and gradients as the full reference
    m, x = ssf_vit(), images(batch=2, img_size=32)
    m.blocks[-1].mlp.drop1.p = 0.25
    loss0, g0 = train_step(m, x, seed=7)
    report = fastpeft.patch(m, backend="triton")
    assert "class-row pass" in str(report)
    assert type(m.blocks[-1].mlp.fc2) is FusedLinearSSF
    loss1, g1 = train_step(m, x, seed=7)
    torch.testing.assert_close(loss1, loss0, atol=ATOL, rtol=RTOL)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], atol=ATOL, rtol=RTOL, msg=n)


def test_ssf_hook_sites_other_than_linears_stay_hooks():
    m = ssf_vit(depth=1)
    fastpeft.patch(m, backend="triton")
    assert [type(fn) for fn in m.patch_embed._forward_hooks.values()] == [FusedSSFHook]
    fastpeft.unpatch(m)
    assert [type(fn) for fn in m.patch_embed._forward_hooks.values()] == [SSFHook]
