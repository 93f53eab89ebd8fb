"""`fastpeft.patch` on a token-pooled model: the last block computes the class token's row only
inside `model(x)` (fastpeft/last_token.py). Same logits and gradients as the reference within the
fp32 tolerance (the same math on B rows instead of B * N), dropout / DropPath / the methods' own
dropout on; only where nothing random or row-mixing sits after the last block's attention."""
from __future__ import annotations

import pytest
import torch

import fastpeft
from tests.methods.conftest import grads_of, images, make_vit, randomize_

ATOL, RTOL = 1e-5, 1e-4  # fp32, as for the fused rules

ELIGIBLE = {
    "bitfit": lambda d: fastpeft.BitFit(),
    "lora": lambda d: fastpeft.LoRA(rank=4),
    "kadaptation": lambda d: fastpeft.KAdaptation(init="trainable"),
    "linear-probe": lambda d: fastpeft.LinearProbe(),
    "vpt-deep": lambda d: fastpeft.VPT(num_tokens=5),  # (its last block drops the prompt rows)
}


def build(method, depth: int = 3, drop_path_rate: float = 0.1, **kw):
    m = make_vit(depth=depth, drop_path_rate=drop_path_rate, **kw)
    fastpeft.inject(m, method(depth))
    randomize_([p for _, p in fastpeft.trainable_parameters(m)])
    return m.train()


def step(m, x, seed=3):
    m.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the same dropout / DropPath draws in both runs
    out = m(x)
    out.square().mean().backward()
    return out.detach(), grads_of(m)


@pytest.mark.parametrize("recompute", [False, True], ids=["default", "recompute"])
@pytest.mark.parametrize("case", sorted(ELIGIBLE))
def test_last_block_computes_the_class_token_only_with_the_reference_results(case, recompute):
    m, x = build(ELIGIBLE[case]), images()
    out0, g0 = step(m, x)
    feats0 = m.forward_features(x)
    report = fastpeft.patch(m, backend="torch", recompute=recompute)
    assert "class token row only" in str(report), str(report)
    rows = []
    handle = m.blocks[-1].mlp.fc1.register_forward_pre_hook(lambda mod, args: rows.append(args[0].shape[:-1]))
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
    assert "forward" not in m.__dict__ and "_fastpeft_cls_only" not in m.blocks[-1].__dict__
    out2, g2 = step(m, x)
    assert torch.equal(out2, out0) and all(torch.equal(g2[n], g0[n]) for n in g0)


@pytest.mark.parametrize(("case", "why"), [
    ("avg-pool", "global_pool='avg' reads every token"),
    ("adaptformer", "a method slot after the last block's attention"),
    ("noah", "a method slot after the last block's attention"),
    ("ssf", "the last block draws random numbers (or runs method hooks) after its attention"),
    ("mlp-dropout", "the last block draws random numbers"),
])
def test_left_alone_where_other_rows_or_their_draws_matter(case, why):
    if case == "avg-pool":
        m = build(ELIGIBLE["bitfit"], global_pool="avg")
    elif case == "mlp-dropout":
        m = build(ELIGIBLE["bitfit"], proj_drop_rate=0.1)
    else:
        m = build({"adaptformer": lambda d: fastpeft.AdaptFormer(dim=8), "ssf": lambda d: fastpeft.SSF(),
                   "noah": lambda d: fastpeft.NOAH(adapter_dims=[8] * d, lora_ranks=[4] * d,
                                                   prompt_lens=[3] * d)}[case])
    cls = type(m.blocks[-1])
    report = fastpeft.patch(m, backend="torch")
    assert "forward" not in m.__dict__
    assert any(what.startswith("model.forward") and reason.startswith(why) for what, reason in report.left_alone), str(report)
    if case in ("avg-pool", "mlp-dropout"):  # (nothing else re-classes a BitFit block)
        assert type(m.blocks[-1]) is cls


def test_vqt_keeps_its_own_class_token_pass():
    m = build(lambda d: fastpeft.VQT(num_queries=2), drop_path_rate=0.0)
    report = fastpeft.patch(m, backend="torch")
    assert "VQT: last block computes the class token row only" in str(report)
    assert type(m.__dict__["forward"]).__name__ == "FusedVQTForward"
    assert any(what.startswith("model.forward") for what, _ in report.left_alone), str(report)
