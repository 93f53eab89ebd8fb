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
3. Every public functional (fastpeft.kernels.*, fastpeft.ops.*) and every raw
   `torch.ops.fastpeft.*` op, on a random bad argument (a fixed dim resized, dims dropped or
   added, a wrong dtype or device, a non-tensor), raises ValueError / TypeError naming it: never
   an internal exception, never a result (the cases: tests/bad_inputs.py).
4. A NaN / inf entry in any input of a functional makes its output non-finite wherever the
   plain-torch reference's is (never finite garbage), equal to it elsewhere.

Each example builds a depth-2 ViT of width 32 on 32 px images; the example counts are bounded so
the file runs in a couple of minutes on 2 CPU cores (see MAX_EXAMPLES).
"""
from __future__ import annotations

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

import fastpeft
from tests.methods.conftest import assert_grads_close, grads_of, randomize_
from tests.random_methods import random_method
from tests.test_reliability import assert_same, out_eval, snapshot

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

ATOL, RTOL = 1e-5, 1e-4  # fp32, as tests/patch/test_fused_rules.py
MAX_EXAMPLES = {"equivalence": 25, "triton": 3, "lifecycle": 15, "bad_inputs": 150, "raw_ops": 150, "nan": 60}
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


@st.composite
def method_configs(draw, dropout: bool):
    """One method config (valid for the width-32, depth-2 models above)."""
    return random_method(lambda options: draw(st.sampled_from(list(options))), dropout)


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
    plain = {k: v.clone() for k, v in model.state_dict().items()}
    plain_keys = list(plain)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    trains_own = False  # BitFit trains the model's own biases (randomized below): no way back to `plain`
    last_ok = None  # (the last call that succeeded, the state dict before it)
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
        if op[0] == "inject" and isinstance(op[1], fastpeft.BitFit):
            trains_own = True
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
            elif last_ok is not None and last_ok[0] == "merge":  # merge -> unmerge: bit for bit
                assert list(sd) == list(last_ok[1])
                for k, v in last_ok[1].items():
                    assert torch.equal(sd[k], v), k
        elif op[0] == "remove":
            assert not patched_before
            left = [i.method.name for i in fastpeft.injections(model)]
            assert len(left) < len(injected_before)
            if not left:
                assert list(sd) == plain_keys
                if not trains_own:  # every frozen weight as it was (VPT's re-initialised head too)
                    for k, v in plain.items():
                        assert torch.equal(sd[k], v), k
        else:
            assert not patched_before
            assert len(fastpeft.injections(model)) == len(injected_before) + 1
        last_ok = (op[0], before["sd"])
        # whatever state it is in, the model trains
        model.train()
        model.zero_grad(set_to_none=True)
        model(x).square().mean().backward()


# --------------------------------------------------------------------------------------------
# 3. bad inputs to every functional and raw op
# --------------------------------------------------------------------------------------------

from tests import bad_inputs  # noqa: E402

FUNCTIONALS = bad_inputs.functional_cases()
RAW_OPS = bad_inputs.raw_op_cases()
WRONG_DTYPES = [torch.int64, torch.int32, torch.bool, torch.complex64, torch.float64]


@st.composite
def bad_variants(draw, cases):
    """(label, thunk) of one random bad variant of one case: a fixed argument with a fixed dim
    resized by a random amount, its dims changed, a wrong dtype / device, or a non-tensor; or one
    of the case's bad scalars."""
    case = draw(st.sampled_from(cases))
    fn, args, kwargs = case.valid()
    choices = [("tensor", a) for a in case.args] + [("scalar", sc) for sc in case.scalars]
    kind, what = draw(st.sampled_from(choices))
    if kind == "scalar":
        path, value = what
        label = f"{case.name}: {'.'.join(map(str, path))} = {value!r}"
    else:
        arg, path = what, what.path
        t = bad_inputs._get(args, kwargs, path)
        fixed = [d for d in range(t.dim()) if d not in arg.free]
        how = draw(st.sampled_from((["resize"] if fixed else []) + ([] if arg.any_ndim else ["ndim"])
                                   + ["dtype", "meta", "non-tensor"]))
        if how == "resize":
            d = draw(st.sampled_from(fixed))
            size = draw(st.integers(0, t.shape[d] + 3).filter(lambda n: n != t.shape[d]))
            shape = list(t.shape)
            shape[d] = size
            value = torch.randn(shape)
        elif how == "ndim":
            extra = draw(st.sampled_from([-1, 1, 2]))
            value = t.reshape(-1)[:1].reshape(()) if t.dim() + extra < 0 else (
                t.unsqueeze(0).repeat(2, *[1] * t.dim()) if extra > 0 else t[0].clone())
            if extra == 2:
                value = value.unsqueeze(0)
        elif how == "dtype":
            dts = [dt for dt in WRONG_DTYPES if not (arg.cast and dt == torch.float64)]
            value = t.to(draw(st.sampled_from(dts)))
        elif how == "meta":
            value = t.to("meta")
        else:
            value = draw(st.sampled_from([t.tolist(), 1.5, "x"] + ([] if arg.optional else [None])))
        label = f"{case.name}: {'.'.join(map(str, path))} {how}: {type(value).__name__} " + (
            f"{tuple(value.shape)} {value.dtype} {value.device}" if isinstance(value, torch.Tensor) else repr(value)[:20])

    def thunk():
        f, a, k = case.valid()
        a = list(a)
        bad_inputs._set(a, k, path, value)
        return f, a, k
    return label, thunk


def assert_clear_error(variant) -> None:
    label, thunk = variant
    what, detail = bad_inputs.outcome(thunk)
    assert what == "clear", f"{label}: {what}: {detail}"


@settings(max_examples=MAX_EXAMPLES["bad_inputs"], **SETTINGS)
@given(variant=bad_variants(FUNCTIONALS))
def test_functionals_on_random_bad_inputs_raise_a_clear_error(variant):
    assert_clear_error(variant)


@settings(max_examples=MAX_EXAMPLES["raw_ops"], **SETTINGS)
@given(variant=bad_variants(RAW_OPS))
def test_raw_ops_on_random_bad_inputs_raise_a_clear_error(variant):
    assert_clear_error(variant)


# --------------------------------------------------------------------------------------------
# 4. NaN / inf propagation
# --------------------------------------------------------------------------------------------

@settings(max_examples=MAX_EXAMPLES["nan"], **SETTINGS)
@given(data=st.data(), value=st.sampled_from([float("nan"), float("inf"), float("-inf")]))
def test_nan_and_inf_propagate_through_every_functional(data, value):
    case = data.draw(st.sampled_from(FUNCTIONALS))
    fn, args, kwargs = case.valid()
    arg = data.draw(st.sampled_from([a for a in case.args if isinstance(bad_inputs._get(args, kwargs, a.path),
                                                                          torch.Tensor)]))
    n = bad_inputs._get(args, kwargs, arg.path).numel()
    index = data.draw(st.integers(0, n - 1))
    assert bad_inputs.propagation_mismatch(case, arg.path, index, value) is None
