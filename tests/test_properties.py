"""Property-based checks (hypothesis, derandomized: the same examples on every run).

1. `patch` changes how, never what: on random method configs x small timm ViT variants (class /
   register tokens, average pooling, qk-norm, layer scale, no class token), batch sizes,
   train / eval, dropout on / off, recompute on / off and the torch / cpp backends (Triton under
   the interpreter, fp32, dropout off, for a few), the patched model's logits and every gradient
   match the unpatched model's within the fp32 tolerance of the fused-rule tests.
2. Any sequence of inject / patch / unpatch / merge / unmerge / remove either succeeds, with the
   state dict and the outputs as each call promises, or raises ValueError / TypeError with the
   model unchanged (state dict names and values, parameter objects, module classes, hooks and the
   outputs).

Each example builds a depth-2 ViT of width 32 on 32 px images; the example counts are bounded so
the file runs in a couple of minutes on 2 CPU cores (see MAX_EXAMPLES).
"""
from __future__ import annotations

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

import fastpeft
from tests.methods.conftest import assert_grads_close, grads_of, randomize_
from tests.test_reliability import assert_same, out_eval, snapshot

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

ATOL, RTOL = 1e-5, 1e-4  # fp32, as tests/patch/test_fused_rules.py
MAX_EXAMPLES = {"equivalence": 25, "triton": 3, "lifecycle": 15}
SETTINGS = dict(derandomize=True, deadline=None, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
HAS_CPP = fastpeft.backends()["extension_cpu"]

# --------------------------------------------------------------------------------------------
# strategies
# --------------------------------------------------------------------------------------------

VARIANTS = {
    "class-token": dict(),
    "registers": dict(reg_tokens=2),
    "avg-pool": dict(global_pool="avg"),
    "qk-norm": dict(qk_norm=True),
    "layer-scale": dict(init_values=0.1),
    "no-class-token": dict(class_token=False, global_pool="avg"),
}


def build_vit(variant: str, dropout: bool, seed: int) -> VisionTransformer:
    torch.manual_seed(seed)
    kw = dict(VARIANTS[variant])
    if dropout:
        kw.update(proj_drop_rate=0.1, drop_path_rate=0.1)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5, **kw)


def _p(draw, dropout: bool):
    return draw(st.sampled_from([0.1, 0.5])) if dropout else 0.0


@st.composite
def method_configs(draw, dropout: bool):
    """One method config (valid for the width-32, depth-2 models above)."""
    name = draw(st.sampled_from(["lora", "lora-petl", "fact", "kadaptation", "ssf", "bitfit", "adaptformer",
                                 "adapter", "convpass", "vpt", "noah", "vqt", "linear-probe"]))
    p = _p(draw, dropout)
    r = draw(st.integers(1, 8))
    if name == "lora":
        return fastpeft.LoRA(rank=r, dropout=p, scale=draw(st.sampled_from([1.0, 0.5, 4])))
    if name == "lora-petl":
        t = draw(st.sampled_from([("q",), ("q", "v"), ("k", "v"), ("q", "k", "v")]))
        return fastpeft.LoRA(rank=r, targets=t, dropout=p, style="petl", scale=draw(st.sampled_from([1.0, 10.0])))
    if name == "fact":
        return fastpeft.FacT(kind=draw(st.sampled_from(["tt", "tk"])), rank=r, dropout=p)
    if name == "kadaptation":
        return fastpeft.KAdaptation(phm_dim=draw(st.sampled_from([2, 4, 8])), rank=1, lora_dim=draw(st.integers(1, 4)),
                                    dropout=p, init="trainable", v_uses_q_factors=draw(st.booleans()))
    if name == "ssf":
        return fastpeft.SSF()
    if name == "bitfit":
        return fastpeft.BitFit()
    if name == "linear-probe":
        return fastpeft.LinearProbe()
    if name == "adaptformer":
        return fastpeft.AdaptFormer(dim=r, dropout=p, mode=draw(st.sampled_from(["parallel", "sequential"])),
                                    learnable_scale=draw(st.booleans()),
                                    layernorm_option=draw(st.sampled_from(["none", "in", "out"])))
    if name == "adapter":
        return fastpeft.Adapter(dim=r, dropout=p, style=draw(st.sampled_from(["noah", "vpt"])))
    if name == "convpass":
        return fastpeft.Convpass(dim=r, dropout=p, mlp=draw(st.booleans()))
    if name == "vpt":
        return fastpeft.VPT(num_tokens=draw(st.integers(1, 4)), deep=draw(st.booleans()), dropout=p)
    if name == "noah":
        lists = [draw(st.lists(st.integers(0, 4), min_size=2, max_size=2)) for _ in range(3)]
        if not any(any(v) for v in lists):
            lists[0] = [2, 2]
        return fastpeft.NOAH(adapter_dims=lists[0], lora_ranks=lists[1], prompt_lens=lists[2], dropout=p, lora_dropout=p)
    return fastpeft.VQT(num_queries=draw(st.integers(1, 3)), dropout=p)


def try_inject(model, method) -> bool:
    """Inject, or tell hypothesis to skip a combination the library refuses by design (e.g.
    Convpass without a square patch grid is fine here, VQT without a class token is not)."""
    try:
        fastpeft.inject(model, method)
    except ValueError:
        return False
    return True


def run(model, x, seed: int):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the same dropout / DropPath draws in both runs
    out = model(x)
    out.square().mean().backward()
    return out.detach(), grads_of(model)


def assert_equivalent(model, x, backend: str, recompute: bool, training: bool) -> None:
    model.train(training)
    ref, gref = run(model, x, seed=7)
    fastpeft.patch(model, backend=backend, recompute=recompute)
    out, g = run(model, x, seed=7)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)
    assert_grads_close(g, gref, atol=ATOL, rtol=RTOL)
    fastpeft.unpatch(model)
    out2, _ = run(model, x, seed=7)
    assert torch.equal(out2, ref)


# --------------------------------------------------------------------------------------------
# 1. patched == unpatched
# --------------------------------------------------------------------------------------------

@settings(max_examples=MAX_EXAMPLES["equivalence"], **SETTINGS)
@given(data=st.data(), variant=st.sampled_from(sorted(VARIANTS)), dropout=st.booleans(), batch=st.integers(1, 3),
       training=st.booleans(), recompute=st.booleans(),
       backend=st.sampled_from(["torch", "cpp"] if HAS_CPP else ["torch"]))
def test_patched_equals_unpatched(data, variant, dropout, batch, training, recompute, backend):
    model = build_vit(variant, dropout, seed=batch)
    method = data.draw(method_configs(dropout))
    hypothesis.assume(try_inject(model, method))
    randomize_([p for _, p in fastpeft.trainable_parameters(model)], seed=batch)
    x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))
    assert_equivalent(model, x, backend, recompute, training)


@settings(max_examples=MAX_EXAMPLES["triton"], **SETTINGS)
@given(data=st.data(), variant=st.sampled_from(["class-token", "avg-pool", "registers"]), batch=st.integers(1, 2))
def test_patched_equals_unpatched_triton_interpreter(data, variant, batch):
    model = build_vit(variant, dropout=False, seed=batch)
    method = data.draw(method_configs(dropout=False))
    hypothesis.assume(try_inject(model, method))
    randomize_([p for _, p in fastpeft.trainable_parameters(model)], seed=batch)
    x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))
    assert_equivalent(model, x, "triton", recompute=False, training=True)


# --------------------------------------------------------------------------------------------
# 2. lifecycle sequences
# --------------------------------------------------------------------------------------------

OPS = st.one_of(
    st.tuples(st.just("inject"), method_configs(dropout=False)),
    st.tuples(st.just("patch"), st.sampled_from(["torch", "cpp"] if HAS_CPP else ["torch"]), st.booleans()),
    st.tuples(st.just("unpatch")),
    st.tuples(st.just("merge")),
    st.tuples(st.just("unmerge")),
    st.tuples(st.just("remove"), st.sampled_from([None, "LoRA", "SSF", "VPT", "FacT", "nope", 3])),
)


@settings(max_examples=MAX_EXAMPLES["lifecycle"], **SETTINGS)
@given(variant=st.sampled_from(sorted(VARIANTS)), ops=st.lists(OPS, min_size=1, max_size=6))
def test_lifecycle_sequences(variant, ops):
    model = build_vit(variant, dropout=False, seed=0)
    plain_keys = list(model.state_dict())
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for op in ops:
        before = snapshot(model)
        out_before = out_eval(model, x)
        patched_before = "_fastpeft_patch" in model.__dict__
        injected_before = [i.method.name for i in fastpeft.injections(model)]
        try:
            if op[0] == "inject":
                fastpeft.inject(model, op[1])
                randomize_([p for n, p in fastpeft.trainable_parameters(model) if not n.startswith("head")], seed=1)
            elif op[0] == "patch":
                fastpeft.patch(model, backend=op[1], recompute=op[2])
            elif op[0] == "unpatch":
                fastpeft.unpatch(model)
            elif op[0] == "merge":
                fastpeft.merge(model)
            elif op[0] == "unmerge":
                fastpeft.unmerge(model)
            else:
                fastpeft.remove(model, op[1])
        except (ValueError, TypeError):
            assert_same(model, before)  # a clear error, and the model exactly as it was
            assert torch.equal(out_eval(model, x), out_before)
            continue
        out = out_eval(model, x)
        assert out.isfinite().all()
        sd = model.state_dict()
        if op[0] in ("patch", "unpatch"):  # how, not what
            assert list(sd) == list(before["sd"])
            for k, v in before["sd"].items():
                assert torch.equal(sd[k], v), k
            assert [(n, id(p)) for n, p in model.named_parameters()] == [(n, i) for n, i, _ in before["params"]]
            torch.testing.assert_close(out, out_before, atol=ATOL, rtol=RTOL)
        elif op[0] in ("merge", "unmerge"):  # the same function, folded or not
            assert not patched_before
            torch.testing.assert_close(out, out_before, atol=ATOL, rtol=RTOL)
            if op[0] == "merge":
                assert list(sd) == plain_keys
        elif op[0] == "remove":
            assert not patched_before
            left = [i.method.name for i in fastpeft.injections(model)]
            assert len(left) < len(injected_before)
            if not left:
                assert list(sd) == plain_keys
        else:
            assert not patched_before
            assert len(fastpeft.injections(model)) == len(injected_before) + 1
        # whatever state it is in, the model trains
        model.train()
        model.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
