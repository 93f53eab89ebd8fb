"""`fastpeft.patch` on a token-pooled model: the last block computes the class token's row only
inside `model(x)` (fastpeft/class_row.py). Same logits and gradients as the reference within the
fp32 tolerance (the same math on B rows instead of B * N), dropout / DropPath / the methods' own
dropout on (the class row's masks drawn over every row, as the reference draws them); only where
everything after the last block's attention is row-local."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastpeft
from fastpeft.block import PATCHED
from fastpeft.class_row import _ClassRowDraws
from tests.methods.conftest import grads_of, images, make_vit, randomize_

ATOL, RTOL = 1e-5, 1e-4  # fp32, as for the fused rules

ELIGIBLE = {
    "bitfit": lambda d: fastpeft.BitFit(),
    "lora": lambda d: fastpeft.LoRA(rank=4),
    "kadaptation": lambda d: fastpeft.KAdaptation(init="trainable"),
    "linear-probe": lambda d: fastpeft.LinearProbe(),
    "vpt-deep": lambda d: fastpeft.VPT(num_tokens=5),  # (its last block drops the prompt rows)
    # a method slot or hook after the attention, each with its dropout on (0.1 unless said; 0.5
    # where a rank-8 mask would too often keep every unit of a class row under the wrong draws)
    "adaptformer": lambda d: fastpeft.AdaptFormer(dim=8, dropout=0.5),
    "adaptformer-seq-ln": lambda d: fastpeft.AdaptFormer(dim=8, dropout=0.5, mode="sequential", layernorm_option="in"),
    "adapter-noah": lambda d: fastpeft.Adapter(dim=8, dropout=0.5),
    "adapter-vpt": lambda d: fastpeft.Adapter(dim=8, style="vpt", dropout=0.2, init="lora"),  # mlp_out slot
    "noah": lambda d: fastpeft.NOAH(adapter_dims=[8] * d, lora_ranks=[4] * d, prompt_lens=[3] * d),
    "ssf": lambda d: fastpeft.SSF(),
    "fact-tt": lambda d: fastpeft.FacT(kind="tt", rank=4),
    "fact-tk": lambda d: fastpeft.FacT(kind="tk", rank=4),
    "convpass": lambda d: fastpeft.Convpass(dim=8, dropout=0.5),  # (the class token's centre-tap conv)
    # timm's own dropout after the attention (attn.proj_drop, Mlp drop1 / drop2)
    "mlp-dropout": lambda d: fastpeft.BitFit(),
}
BUILD_KW = {"mlp-dropout": {"proj_drop_rate": 0.1}}


def build(method, depth: int = 3, drop_path_rate: float = 0.1, **kw):
    m = make_vit(depth=depth, drop_path_rate=drop_path_rate, **kw)
    fastpeft.inject(m, method(depth))
    randomize_([p for _, p in fastpeft.trainable_parameters(m)])
    return m.train()


class record_rows:
    """Records the rows `mod` computes on, through its forward (a user's hook on a module inside
    the last block would keep every row: fastpeft/class_row.py `has_user_hooks`). `.remove()`."""

    def __init__(self, mod: nn.Module, rows: list):
        self.mod, self.had = mod, mod.__dict__.get("forward")
        inner = mod.forward

        def forward(x, *a, **k):
            rows.append(x.shape[:-1])
            return inner(x, *a, **k)

        mod.forward = forward

    def remove(self):
        if self.had is None:
            del self.mod.forward
        else:
            self.mod.forward = self.had


def step(m, x, seed=3):
    m.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the same dropout / DropPath draws in both runs
    out = m(x)
    out.square().mean().backward()
    return out.detach(), grads_of(m)


@pytest.mark.parametrize("recompute", [False, True], ids=["default", "recompute"])
@pytest.mark.parametrize("case", sorted(ELIGIBLE))
def test_last_block_computes_the_class_token_only_with_the_reference_results(case, recompute):
    m, x = build(ELIGIBLE[case], **BUILD_KW.get(case, {})), images(batch=3)
    out0, g0 = step(m, x)
    feats0 = m.forward_features(x)
    report = fastpeft.patch(m, backend="torch", recompute=recompute)
    assert "class token row only" in str(report), str(report)
    rows = []
    handle = record_rows(m.blocks[-1].mlp.fc1, rows)
    out1, g1 = step(m, x)
    handle.remove()
    assert rows == [torch.Size([x.shape[0], 1])]  # the last block's MLP ran on the class token's row
    torch.testing.assert_close(out1, out0, atol=ATOL, rtol=RTOL)
    assert g0.keys() == g1.keys()
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], atol=ATOL, rtol=RTOL, msg=n)
    torch.manual_seed(3)
    with torch.no_grad():  # forward_features is not affected: every token, the reference's values
        m.train(False)
        feats1 = m.forward_features(x)
        m.train(True)
    assert feats1.shape == feats0.shape
    fastpeft.unpatch(m)
    assert "forward" not in m.__dict__ and "_fastpeft_run" not in m.blocks[-1].__dict__
    out2, g2 = step(m, x)
    assert torch.equal(out2, out0) and all(torch.equal(g2[n], g0[n]) for n in g0)


@pytest.mark.parametrize(("case", "why"), [
    ("avg-pool", "global_pool='avg' reads every token"),
    ("attn-dropout", "the last block has attention dropout"),
    ("foreign-hook", "after the last block's attention, <lambda> hook on mlp.fc2 is not row-local"),
    ("foreign-module", "after the last block's attention, Conv1dish (mlp.act) is not row-local"),
])
def test_left_alone_where_other_rows_or_their_draws_matter(case, why):
    if case == "avg-pool":
        m = build(ELIGIBLE["bitfit"], global_pool="avg")
    elif case == "attn-dropout":
        m = build(ELIGIBLE["bitfit"], attn_drop_rate=0.1)
    else:
        m = build(ELIGIBLE["bitfit"])
        if case == "foreign-hook":  # a user's hook: fastpeft cannot know what it reads or draws
            m.blocks[-1].mlp.fc2.register_forward_hook(lambda mod, args, out: out)
        else:
            class Conv1dish(nn.Module):  # a user's module: fastpeft cannot know it is row-local
                def forward(self, x):
                    return F.gelu(x)
            m.blocks[-1].mlp.act = Conv1dish()
    cls = type(m.blocks[-1])
    report = fastpeft.patch(m, backend="torch")
    assert "forward" not in m.__dict__
    assert any(what.startswith("model.forward") and reason.startswith(why) for what, reason in report.left_alone), str(report)
    # (the block runs as every patched block does, and unpatch gives it its class back)
    assert m.blocks[-1].__dict__["_fastpeft_run"] is PATCHED
    fastpeft.unpatch(m)
    assert type(m.blocks[-1]) is cls


@pytest.mark.parametrize("case", ["adaptformer", "adapter-noah", "fact-tk", "convpass"])
def test_fused_slots_and_projections_take_the_class_row_pass_with_their_seeded_dropout(case):
    # (Triton interpreter) the fused ops' dropout is their own seeded stream, never eager's masks:
    # on the class row they draw a fresh one and leave torch's generator where the full block does
    # (fused Convpass: its class row runs the reference's path, whose torch dropout draws more).
    # With dropout off they give the reference's values (the fused-rule tests); with it on, the
    # class-row pass must draw (the logits move) and take exactly the full block's draws from torch.
    m, x = build(ELIGIBLE[case]), images(batch=3)
    report = fastpeft.patch(m, backend="triton")
    assert "class token row only" in str(report) and "[triton]" in str(report), str(report)
    rows = []
    handle = record_rows(m.blocks[-1].mlp.fc1, rows)
    torch.manual_seed(3)
    out = m(x)
    after_cls = torch.rand(4)
    handle.remove()
    assert rows == [torch.Size([x.shape[0], 1])]
    torch.manual_seed(3)
    full = type(m).forward(m, x)  # the full last block, the same patched ops
    # (the fused bypass has no one-row kernel: its class row is the reference's, eager's torch draws)
    assert torch.equal(torch.rand(4), after_cls) != (case == "convpass")
    m.eval()
    no_drop = m(x)
    m.train()
    assert torch.isfinite(out).all() and not torch.allclose(out, no_drop, atol=1e-4)
    torch.testing.assert_close(out.mean(), full.mean(), atol=0.5 * full.std().item(), rtol=0)  # (sanity)
    out.square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for _, p in fastpeft.trainable_parameters(m) if p.grad is not None)


@pytest.mark.parametrize("shape", [(2, 7, 5), (3, 11, 4, 6), (1, 197, 8)])
@pytest.mark.parametrize("how", ["functional", "module", "inplace"])
def test_class_row_dropout_draws_the_reference_mask_over_every_row(shape, how):
    p = 0.3
    full = torch.randn(shape)
    drop = {"functional": lambda t: F.dropout(t, p, True), "module": nn.Dropout(p),
            "inplace": lambda t: F.dropout(t, p, True, inplace=True)}[how]
    torch.manual_seed(11)
    ref = drop(full.clone())
    after_ref = torch.rand(3)  # the generator moved on by the same amount
    torch.manual_seed(11)
    with _ClassRowDraws(shape[1]):
        row = drop(full[:, :1].clone())
    assert torch.equal(torch.rand(3), after_ref)
    assert row.shape == (shape[0], 1, *shape[2:])
    assert torch.equal(row, ref[:, :1])  # bit for bit: the same mask and the same product
    assert (ref[:, :1] == 0).any() and (ref[:, :1] != 0).any()  # (a mask that drops some)


def test_class_row_dropout_refuses_a_tensor_that_is_not_a_class_row():
    with _ClassRowDraws(9), pytest.raises(RuntimeError, match="not a class-token row"):
        F.dropout(torch.ones(2, 9, 4), 0.1, True)
    with _ClassRowDraws(9), pytest.raises(RuntimeError, match="alpha_dropout in the class-row pass"):
        F.alpha_dropout(torch.ones(2, 1, 4), 0.1, True)
    with _ClassRowDraws(9):  # eval-mode / p=0 dropout draws nothing: passed through
        x = torch.ones(2, 9, 4)
        assert torch.equal(F.dropout(x, 0.1, False), x) and torch.equal(F.dropout(x, 0.0, True), x)


def test_vqt_keeps_its_own_class_token_pass():
    m = build(lambda d: fastpeft.VQT(num_queries=2), drop_path_rate=0.0)
    report = fastpeft.patch(m, backend="torch")
    assert "VQT: last block computes the class token row only" in str(report)
    assert type(m.__dict__["forward"]).__name__ == "FusedVQTForward"
    assert any(what.startswith("model.forward") for what, _ in report.left_alone), str(report)


@pytest.mark.parametrize("num_prefix", [1, 3])  # (the class token, or the class token and registers)
@pytest.mark.parametrize("dropout", [0.0, 0.4])
def test_convpass_class_row_is_row_0_of_its_forward(num_prefix, dropout):
    from fastpeft.methods.convpass import ConvpassModule

    conv = ConvpassModule(48, 6, (3, 4), num_prefix, xavier_init=True, dropout=dropout).train()
    randomize_(list(conv.parameters()))
    h = torch.randn(3, num_prefix + 12, 48, requires_grad=True)
    w = torch.randn(3, 1, 48)  # a loss on the class row only
    torch.manual_seed(5)
    full = conv(h)
    (full[:, :1] * w).sum().backward()
    g_full = {"h": h.grad.clone(), **{n: p.grad.clone() for n, p in conv.named_parameters()}}
    conv.zero_grad(set_to_none=True)
    h0 = h.detach()[:, :1].clone().requires_grad_()
    torch.manual_seed(5)
    with _ClassRowDraws(h.shape[1]):
        row = conv.class_row(h0)
    (row * w).sum().backward()
    torch.testing.assert_close(row, full[:, :1], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(h0.grad, g_full["h"][:, :1], atol=ATOL, rtol=RTOL)
    assert not g_full["h"][:, 1:].any()  # (the class row reads no other row)
    for n, p in conv.named_parameters():
        torch.testing.assert_close(p.grad, g_full[n], atol=ATOL, rtol=RTOL, msg=n)
    with pytest.raises(RuntimeError, match="one row"):
        conv.class_row(h[:, :2])
