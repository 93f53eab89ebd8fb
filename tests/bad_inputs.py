"""Bad-input cases for every public functional (fastpeft.ops.*) and every raw
`torch.ops.fastpeft.*` op, shared by tests/test_properties.py (hypothesis draws from them),
tests/test_reliability.py and tools/reliability_table.py (the whole sweep, by category).

Each entry builds a valid call on small inputs (`valid()` -> (fn, args, kwargs)) and names the
arguments whose shape is fixed by the others (`Arg(path, free=dims)`: `free` are the dims that may
take any size, e.g. x's leading dims). A mutation changes one such argument so that the call is
invalid: one fixed dim one larger, a dim dropped or added, an integer (or, where the op does not
cast it, float64) dtype, a meta-device tensor, a non-tensor. The call must raise ValueError or
TypeError naming the problem: never an internal exception from deep inside torch, never a result.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

B, N, D, R = 2, 5, 8, 2  # batch, tokens (1 + a 2 x 2 grid), width, rank


def _t(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed + sum(shape)))


@dataclass
class Arg:
    path: tuple  # positional index or kwarg name, then keys into a dict / tuple argument
    free: tuple = ()  # dims of any size
    cast: bool = False  # a float64 value is cast to x's dtype (not an error)
    optional: bool = False  # None is a valid value
    any_ndim: bool = False  # [..., D]: any number of leading dims


@dataclass
class Case:
    name: str
    valid: Callable[[], tuple]  # -> (fn, args list, kwargs dict)
    args: list = field(default_factory=list)
    scalars: list = field(default_factory=list)  # (path, bad value)


# ----------------------------------------------------------------------------------------------
# mutations
# ----------------------------------------------------------------------------------------------

def tensor_mutations(t: torch.Tensor, arg: Arg) -> list[tuple[str, Any]]:
    out = []
    for d in range(t.dim()):
        if d not in arg.free and (d - t.dim()) not in arg.free:
            shape = list(t.shape)
            shape[d] += 1
            out.append((f"dim {d} + 1", torch.randn(shape, dtype=t.dtype)))
    if not arg.any_ndim:
        if t.dim() > 0:
            out.append(("a dim fewer", t[0].clone()))
        out.append(("a dim more", t.unsqueeze(0).expand(3, *t.shape).clone()))
    out.append(("int64", t.round().long()))
    if not arg.cast:
        out.append(("float64", t.double()))
    out.append(("meta device", t.to("meta")))
    out.append(("a list", t.tolist()))
    if not arg.optional:
        out.append(("None", None))
    return out


def _get(args, kwargs, path):
    head, *rest = path
    v = kwargs[head] if isinstance(head, str) else args[head]
    for k in rest:
        v = v[k]
    return v


def _set(args, kwargs, path, value):
    head, *rest = path
    if not rest:
        if isinstance(head, str):
            kwargs[head] = value
        else:
            args[head] = value
        return
    container = _get(args, kwargs, (head,))
    copy = dict(container) if isinstance(container, dict) else list(container)
    cur = copy
    for k in rest[:-1]:
        cur[k] = dict(cur[k]) if isinstance(cur[k], dict) else list(cur[k])
        cur = cur[k]
    cur[rest[-1]] = value
    _set(args, kwargs, (head,), copy if isinstance(container, dict) else type(container)(copy))


def mutations(case: Case) -> list[tuple[str, Callable[[], tuple]]]:
    """(label, thunk -> (fn, args, kwargs)) for every bad variant of `case`."""
    fn, args, kwargs = case.valid()
    out = []
    for arg in case.args:
        t = _get(args, kwargs, arg.path)
        for label, value in tensor_mutations(t, arg):
            def thunk(arg=arg, value=value):
                f, a, k = case.valid()
                a = list(a)
                _set(a, k, arg.path, value)
                return f, a, k
            out.append((f"{case.name}: {'.'.join(map(str, arg.path))} {label}", thunk))
    for path, value in case.scalars:
        def thunk(path=path, value=value):
            f, a, k = case.valid()
            a = list(a)
            _set(a, k, path, value)
            return f, a, k
        out.append((f"{case.name}: {'.'.join(map(str, path))} = {value!r}", thunk))
    return out


def outcome(thunk) -> tuple[str, str]:
    """("clear" | "silent" | "internal", detail) of calling a bad variant."""
    fn, args, kwargs = thunk()
    try:
        fn(*args, **kwargs)
    except (ValueError, TypeError) as e:
        msg = str(e)
        # a clear error names the op or the argument, not just an internal shape mismatch
        internal = ("mat1 and mat2" in msg or "size of tensor a" in msg or "must match the size" in msg
                    or "could not be broadcast" in msg)
        return ("internal" if internal else "clear"), f"{type(e).__name__}: {msg[:160]}"
    except RuntimeError as e:
        # a non-tensor where a raw op's schema says Tensor: the dispatcher's own argument check
        # (before any fastpeft code; a RuntimeError naming the op, the argument and the type)
        if " Expected a value of type " in str(e) and str(e).startswith("fastpeft::"):
            return "clear", f"RuntimeError (schema): {str(e).splitlines()[0][:160]}"
        return "internal", f"{type(e).__name__}: {str(e)[:160]}"
    except Exception as e:  # noqa: BLE001 - what we are looking for
        return "internal", f"{type(e).__name__}: {str(e)[:160]}"
    return "silent", "returned a result"


# ----------------------------------------------------------------------------------------------
# functionals
# ----------------------------------------------------------------------------------------------

def _functional_cases() -> list[Case]:
    from fastpeft.ops import scale_shift, vqt_aggregate, vqt_query_attention
    from fastpeft.ops import adapter as A, convpass as C, lowrank as L, ssf as S

    x = lambda: _t(B, N, D)  # noqa: E731
    cases = [
        Case("adapter", lambda: (A.adapter, [x(), _t(R, D), _t(R), _t(D, R), _t(D)], {"base": _t(B, N, D, seed=1)}),
             [Arg((0,), free=(0, 1), any_ndim=True), Arg((1,), cast=True), Arg((2,), cast=True, optional=True),
              Arg((3,), cast=True), Arg((4,), cast=True, optional=True), Arg(("base",), optional=True)],
             [(("act",), "swish"), (("dropout_p",), 1.5), (("dropout_p",), math.nan)]),
        Case("lowrank_linear", lambda: (L.lowrank_linear, [x(), _t(6, D), _t(6), _t(R, D), _t(6, R)], {}),
             [Arg((0,), free=(0, 1), any_ndim=True), Arg((1,), cast=True), Arg((2,), cast=True, optional=True), Arg((3,), cast=True),
              Arg((4,), cast=True)],
             [(("dropout_p",), -0.1)]),
        Case("lora_noah_qkv", lambda: (L.lora_noah_qkv, [x(), _t(3 * D, D), _t(3 * D), _t(4, D), _t(3 * D, 4)],
                                       {"rank": 2}),
             [Arg((0,), free=(0, 1), any_ndim=True), Arg((1,), cast=True), Arg((2,), cast=True, optional=True), Arg((3,), cast=True),
              Arg((4,), cast=True)],
             [(("rank",), 5), (("rank",), -1), (("scale",), math.inf), (("scale",), "x")]),
        Case("lora_petl_qkv", lambda: (L.lora_petl_qkv, [x(), _t(3 * D, D), _t(3 * D), {"q": _t(R, D)}, {"q": _t(D, R)}],
                                       {}),
             [Arg((0,), free=(0, 1), any_ndim=True), Arg((1,), cast=True), Arg((2,), cast=True, optional=True),
              Arg((3, "q"), cast=True), Arg((4, "q"), cast=True)],
             [((3,), {"z": _t(R, D)}), ((4,), {}), (("scale",), {"k": 1.0}), (("scale",), math.nan)]),
        Case("fact_linear", lambda: (L.fact_linear, [x(), _t(D, D), _t(D), _t(R, D), _t(D, R), _t(R, R)],
                                     {"layer": "proj"}),
             [Arg((0,), free=(0, 1), any_ndim=True), Arg((1,), cast=True), Arg((2,), cast=True, optional=True), Arg((3,), cast=True),
              Arg((4,), cast=True), Arg((5,), cast=True)],
             [(("layer",), "fc3"), (("scale",), math.nan)]),
        Case("fact_linear-qkv", lambda: (L.fact_linear, [x(), _t(3 * D, D), None, _t(R, D), _t(D, R), _t(3 * R, R)],
                                         {"layer": "qkv"}),
             [Arg((1,), cast=True), Arg((3,), cast=True), Arg((4,), cast=True), Arg((5,), cast=True)]),
        Case("kadaptation_qkv", lambda: (L.kadaptation_qkv, [x(), _t(3 * D, D), _t(3 * D), (_t(2, 2, 1), _t(2, 1, 2)),
                                                             (_t(2, 2, 1, seed=1), _t(2, 1, 2, seed=1)),
                                                             (_t(2, 4, 1), _t(2, 1, 4)),
                                                             (_t(2, 4, 1, seed=1), _t(2, 1, 4, seed=1)), _t(D)],
                                         {"scale": 1.0}),
             [Arg((0,), free=(0, 1), any_ndim=True), Arg((1,), cast=True), Arg((3, 0), cast=True), Arg((3, 1), cast=True),
              Arg((5, 0), cast=True), Arg((6, 1), cast=True), Arg((7,), cast=True)],
             [(("scale",), math.nan), (("dropout_p",), 1.0)]),
        Case("convpass", lambda: (C.convpass, [x(), _t(R, D), _t(R), _t(R, R, 3, 3), _t(R), _t(D, R), _t(D)],
                                  {"grid": (2, 2), "num_prefix": 1}),
             [Arg((0,), free=(0,)), Arg((1,), cast=True), Arg((2,), cast=True, optional=True), Arg((3,), cast=True),
              Arg((4,), cast=True, optional=True), Arg((5,), cast=True), Arg((6,), cast=True, optional=True)],
             [((3,), _t(R, R, 1, 1)), ((3,), _t(R, R, 5, 5)), (("grid",), (2, 3)), (("grid",), (-2, -2)), (("grid",), "2x2"), (("num_prefix",), -1),
              (("num_prefix",), 2), (("dropout_p",), 1.0), (("scale",), math.nan)]),
        Case("ssf", lambda: (S.ssf, [x(), _t(D), _t(D)], {}),
             [Arg((0,), free=(0, 1), any_ndim=True), Arg((1,), cast=True), Arg((2,), cast=True)]),
        Case("ssf_gelu", lambda: (S.ssf_gelu, [x(), _t(D), _t(D)], {}),
             [Arg((0,), free=(0, 1), any_ndim=True), Arg((1,), cast=True), Arg((2,), cast=True)]),
        Case("layernorm_ssf", lambda: (S.layernorm_ssf, [x(), _t(D), _t(D), _t(D), _t(D)], {}),
             [Arg((0,), free=(0, 1), any_ndim=True), Arg((1,), cast=True, optional=True), Arg((2,), cast=True, optional=True),
              Arg((3,), cast=True), Arg((4,), cast=True)],
             [(("eps",), 0.0), (("eps",), math.nan), (("eps",), "x")]),
        Case("scale_shift", lambda: (scale_shift, [x(), _t(D), _t(D)], {}),
             [Arg((0,), free=(0, 1), any_ndim=True), Arg((1,), cast=True), Arg((2,), cast=True)]),
        Case("vqt_query_attention", lambda: (vqt_query_attention, [_t(B, 2, 3, 4), _t(B, 2, N, 4), _t(B, 2, N, 4, seed=1)],
                                             {}),
             [Arg((0,), free=(2,)), Arg((1,)), Arg((2,))],
             [(("scale",), math.nan), (("scale",), "x")]),
        Case("vqt_aggregate", lambda: (vqt_aggregate, [_t(B, D), _t(2, B, 3, D)], {}),
             [Arg((0,)), Arg((1,), free=(0, 2))],
             [(("eps",), 0.0), (("eps",), -1.0), (("eps",), math.nan)]),
    ]
    return cases


# ----------------------------------------------------------------------------------------------
# raw ops
# ----------------------------------------------------------------------------------------------

def _raw_cases() -> list[Case]:
    import fastpeft.ops  # noqa: F401  (registers every fastpeft:: op)

    F = torch.ops.fastpeft
    M = B * N
    x = lambda: _t(M, D)  # noqa: E731
    seed = torch.tensor([7], dtype=torch.int64)

    def with_fwd(fwd, fwd_args, make):
        def valid():
            outs = fwd(*fwd_args())
            return make(outs)
        return valid

    def adapter_args():
        return [x(), _t(R, D), _t(R), _t(D, R), _t(D), None, None, None, 1.0, 0, 0.0, None, True]

    def adapter_bwd(outs):
        a = adapter_args()
        return F.adapter_backward, [_t(M, D, seed=3), a[0], outs[1], a[1], a[3], a[4], None, 1.0, 0, 0.0, None], {}

    def lowrank_args():
        return [x(), _t(6, D), _t(6), _t(R, D), _t(6, R), 0.0, None, False]

    def lowrank_bwd(outs):
        a = lowrank_args()
        return F.lowrank_linear_backward, [_t(M, 6, seed=3), a[0], a[1], a[3], a[4], outs[1], 0.0, None, False], {}

    def ln_bwd(outs):
        return F.layernorm_ssf_backward, [_t(M, D, seed=3), ln_args()[0], _t(D), _t(D, seed=1), _t(D, seed=2),
                                          outs[1], outs[2]], {}

    def ln_args():
        return [x(), _t(D), _t(D, seed=1), _t(D, seed=2), _t(D, seed=3), 1e-6]

    def cp_down_bwd(outs):
        return F.convpass_down_backward, [_t(M, R, seed=3), x(), outs[1], _t(R, D)], {}

    def vqt_attn_bwd(outs):
        q, k, v = _t(B, 2, 3, 4), _t(B, 2, N, 4), _t(B, 2, N, 4, seed=1)
        return F.vqt_query_attention_backward, [_t(B, 2, 3, 4, seed=2), q, k, v, outs[1], _t(B, 2, 3), 0.5], {}

    def vqt_agg_bwd(outs):
        return F.vqt_aggregate_backward, [_t(*outs[0].shape, seed=2), outs[0], outs[1], 3, 1e-12], {}

    g_md = lambda: _t(M, D, seed=3)  # noqa: E731
    return [
        Case("op adapter", lambda: (F.adapter, adapter_args(), {}),
             [Arg((0,), free=(0,), any_ndim=True), Arg((1,)), Arg((2,), optional=True), Arg((3,)),
              Arg((4,), optional=True)],
             [((9,), 7), ((10,), 1.0)]),
        Case("op adapter_backward", with_fwd(F.adapter, adapter_args, adapter_bwd),
             [Arg((0,)), Arg((1,)), Arg((2,)), Arg((3,)), Arg((4,)), Arg((5,), optional=True)]),
        Case("op lowrank_linear", lambda: (F.lowrank_linear, lowrank_args(), {}),
             [Arg((0,), free=(0,), any_ndim=True), Arg((1,)), Arg((2,), optional=True), Arg((3,)), Arg((4,))],
             [((5,), 2.0)]),
        Case("op lowrank_linear_backward", with_fwd(F.lowrank_linear, lowrank_args, lowrank_bwd),
             [Arg((0,)), Arg((1,)), Arg((2,)), Arg((3,)), Arg((4,)), Arg((5,))]),
        Case("op ssf_gelu", lambda: (F.ssf_gelu, [x(), _t(D), _t(D)], {}),
             [Arg((0,), free=(0,), any_ndim=True), Arg((1,)), Arg((2,))]),
        Case("op ssf_gelu_backward", lambda: (F.ssf_gelu_backward, [g_md(), x(), _t(D), _t(D)], {}),
             [Arg((0,)), Arg((1,)), Arg((2,)), Arg((3,))]),
        Case("op layernorm_ssf", lambda: (F.layernorm_ssf, ln_args(), {}),
             [Arg((0,), free=(0,), any_ndim=True), Arg((1,), optional=True), Arg((2,), optional=True), Arg((3,)), Arg((4,))],
             [((5,), 0.0)]),
        Case("op layernorm_ssf_backward", with_fwd(F.layernorm_ssf, ln_args, ln_bwd),
             [Arg((0,)), Arg((1,)), Arg((2,), optional=True), Arg((3,), optional=True), Arg((4,)), Arg((5,)),
              Arg((6,))]),
        Case("op convpass_down", lambda: (F.convpass_down, [x(), _t(R, D), _t(R)], {}),
             [Arg((0,), free=(0,), any_ndim=True), Arg((1,)), Arg((2,), optional=True)]),
        Case("op convpass_down_backward", with_fwd(F.convpass_down, lambda: [x(), _t(R, D), _t(R)], cp_down_bwd),
             [Arg((0,)), Arg((1,)), Arg((2,)), Arg((3,))]),
        Case("op convpass_up", lambda: (F.convpass_up, [_t(M, R), _t(D, R), _t(D), g_md(), 1.0, 0.0, None], {}),
             [Arg((0,), free=(0,), any_ndim=True), Arg((1,)), Arg((2,), optional=True), Arg((3,), optional=True)],
             [((5,), 0.5)]),
        Case("op convpass_up_backward", lambda: (F.convpass_up_backward, [g_md(), _t(M, R), _t(D, R), 1.0, 0.0, None], {}),
             [Arg((0,)), Arg((1,)), Arg((2,))]),
        Case("op scale_shift", lambda: (F.scale_shift, [x(), _t(D), _t(D)], {}),
             [Arg((0,), free=(0,), any_ndim=True), Arg((1,)), Arg((2,))]),
        Case("op scale_shift_backward", lambda: (F.scale_shift_backward, [g_md(), x(), _t(D)], {}),
             [Arg((0,)), Arg((1,)), Arg((2,))]),
        Case("op vqt_query_attention", lambda: (F.vqt_query_attention, [_t(B, 2, 3, 4), _t(B, 2, N, 4),
                                                                          _t(B, 2, N, 4, seed=1), 0.5], {}),
             [Arg((0,), free=(2,)), Arg((1,)), Arg((2,))]),
        Case("op vqt_query_attention_backward",
             with_fwd(F.vqt_query_attention, lambda: [_t(B, 2, 3, 4), _t(B, 2, N, 4), _t(B, 2, N, 4, seed=1), 0.5],
                      vqt_attn_bwd),
             [Arg((0,)), Arg((1,)), Arg((2,)), Arg((3,)), Arg((4,)), Arg((5,))]),
        Case("op vqt_aggregate", lambda: (F.vqt_aggregate, [_t(B, D), _t(2, B, 3, D), 1e-12], {}),
             [Arg((0,)), Arg((1,), free=(0, 2))],
             [((2,), 0.0)]),
        Case("op vqt_aggregate_backward", with_fwd(F.vqt_aggregate, lambda: [_t(B, D), _t(2, B, 3, D), 1e-12], vqt_agg_bwd),
             [Arg((0,)), Arg((1,)), Arg((2,))],
             [((3,), 0), ((3,), 4)]),
    ]


def functional_cases() -> list[Case]:
    return _functional_cases()


def raw_op_cases() -> list[Case]:
    return _raw_cases()


# ----------------------------------------------------------------------------------------------
# NaN / inf propagation: a functional on inputs with one NaN or inf entry is non-finite wherever
# its plain-torch reference is (never finite garbage) and equal to it where both are finite. (It
# may be non-finite in more places: the fused qkv forms put every target's rank columns into one
# GEMM with zero blocks, so a NaN in q's factors reaches k and v through NaN * 0.)
# ----------------------------------------------------------------------------------------------

def references() -> dict[str, Callable]:
    from fastpeft.ops import scale_shift_ref, vqt_aggregate_ref, vqt_query_attention_ref
    from fastpeft.ops import adapter as A, convpass as C, lowrank as L, ssf as S

    return {
        "adapter": A.adapter_ref, "lowrank_linear": L.lowrank_linear_ref, "lora_noah_qkv": L.lora_noah_qkv_ref,
        "lora_petl_qkv": L.lora_petl_qkv_ref, "fact_linear": L.fact_linear_ref, "fact_linear-qkv": L.fact_linear_ref,
        "kadaptation_qkv": L.kadaptation_qkv_ref, "convpass": C.convpass_ref, "ssf": S.ssf_ref,
        "ssf_gelu": S.ssf_gelu_ref, "layernorm_ssf": S.layernorm_ssf_ref, "scale_shift": scale_shift_ref,
        "vqt_query_attention": lambda q, k, v: vqt_query_attention_ref(q, k, v, q.shape[-1] ** -0.5),
        "vqt_aggregate": lambda cls, queries: vqt_aggregate_ref(cls, queries)[0],
    }


def poison_points(case: Case) -> list[tuple[tuple, int]]:
    """(argument path, flat index) for every fixed tensor argument of `case` (and x), first and
    last entries: where a NaN / inf goes."""
    fn, args, kwargs = case.valid()
    out = []
    for arg in case.args:
        t = _get(args, kwargs, arg.path)
        if isinstance(t, torch.Tensor) and t.numel():
            out += [(arg.path, 0), (arg.path, t.numel() - 1)]
    return out


def propagation_mismatch(case: Case, path: tuple, index: int, value: float) -> str | None:
    """None where the functional's output is non-finite wherever the reference's is and close
    where both are finite; else what differs."""
    fn, args, kwargs = case.valid()
    args = list(args)
    t = _get(args, kwargs, path).clone()
    t.view(-1)[index] = value
    _set(args, kwargs, path, t)
    with torch.no_grad():
        got = fn(*args, **kwargs)
        want = references()[case.name](*args, **kwargs)
    got = got if isinstance(got, (tuple, list)) else (got,)
    want = want if isinstance(want, (tuple, list)) else (want,)
    for g, w in zip(got, want):
        garbage = g.isfinite() & ~w.isfinite()
        if garbage.any():
            return (f"{case.name}: {'.'.join(map(str, path))}[{index}] = {value}: {int(garbage.sum())} finite "
                    f"outputs where the reference's are not")
        fin = w.isfinite() & g.isfinite()
        if not torch.allclose(g[fin].float(), w[fin].float(), atol=1e-4, rtol=1e-4):
            return f"{case.name}: {'.'.join(map(str, path))}[{index}] = {value}: finite entries differ"
    return None
