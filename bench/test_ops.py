"""Per-op rows: the op sequences the fused kernels replace, at a few [B, N, D] sizes.

Contenders: `eager` (the plain-torch op sequence the reference model runs, written out below),
`compile` (torch.compile of that same function) and `fastpeft` (the fused op from
`fastpeft.ops`, skipped with a reason while it does not exist yet). Modes: `fwd+bwd` (forward,
then backward of a fixed random output gradient into the activation input and the trainable
parameters; frozen weights get no gradient) and `fwd` (no_grad forward).

Dropout is off in every op row (p = 0) so all contenders compute the same function.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable

import pytest

import torch
import torch.nn.functional as F

import fastpeft
from bench import measure
from bench.rows import skip, timed

RANK = 8          # LoRA / FacT rank
ADAPTER_DIM = 64  # AdaptFormer bottleneck (the project's baseline setting)
ADAPTER_SCALE = 0.1
VQT_QUERIES = 10  # query tokens per layer (VQT's scripts use 1..20)
VQT_LAYERS = 12


def _t(gen, *shape, device, dtype, std=1.0, grad=False, mean=0.0):
    t = (torch.randn(*shape, generator=gen) * std + mean).to(device=device, dtype=dtype)
    return t.requires_grad_(grad)


# --- the op sequences (eager references) -------------------------------------------------------

def adapter_ref(p):
    """AdaptFormer branch: s * up(ReLU(down(x)))."""
    return F.linear(F.relu(F.linear(p["x"], p["w_down"], p["b_down"])), p["w_up"], p["b_up"]) * ADAPTER_SCALE


def lora_ref(p):
    """Frozen qkv Linear + LoRA delta B A x (NOAH style: on q, k and v, scale 1)."""
    return F.linear(p["x"], p["w"], p["b"]) + F.linear(F.linear(p["x"], p["lora_a"]), p["lora_b"])


def fact_ref(p):
    """Frozen qkv Linear + FacT-TT deltas s V Sigma_j U x for j in q, k, v (shared U, V)."""
    u = F.linear(p["x"], p["fact_u"])
    delta = torch.cat([F.linear(F.linear(u, p[f"core_{j}"]), p["fact_v"]) for j in "qkv"], dim=-1)
    return F.linear(p["x"], p["w"], p["b"]) + delta * 1.0


def ln_ssf_ref(p):
    """LayerNorm (frozen affine) followed by SSF's per-channel scale and shift."""
    d = p["x"].shape[-1]
    return F.layer_norm(p["x"], (d,), p["ln_w"], p["ln_b"], 1e-6) * p["gamma"] + p["beta"]


def fc1_ssf_gelu_ref(p):
    """fc1 (frozen) -> SSF scale/shift -> GELU, as in SSF's MLP."""
    return F.gelu(F.linear(p["x"], p["w1"], p["b1"]) * p["gamma"] + p["beta"])


def scale_shift_ref(p):
    """SSF after a Linear: x * gamma + beta."""
    return p["x"] * p["gamma"] + p["beta"]


def vqt_attention_ref(p):
    """VQT query rows attending over the frozen tokens' keys/values (timm's SDPA path)."""
    return F.scaled_dot_product_attention(p["q"], p["k"], p["v"])


def vqt_aggregate_ref(p):
    """VQT head input: F.normalize of the CLS feature and of each layer's flattened queries."""
    qs = p["queries"]
    return torch.cat([F.normalize(p["cls"], dim=-1)] + [F.normalize(qs[i].flatten(1), dim=-1) for i in range(qs.shape[0])], dim=-1)


# --- inputs --------------------------------------------------------------------------------

def _linear_inputs(gen, B, N, D, dev, dt):
    return {"x": _t(gen, B, N, D, device=dev, dtype=dt, grad=True)}


def make_adapter(gen, B, N, D, dev, dt):
    p = _linear_inputs(gen, B, N, D, dev, dt)
    p.update(w_down=_t(gen, ADAPTER_DIM, D, device=dev, dtype=dt, std=D ** -0.5, grad=True),
             b_down=_t(gen, ADAPTER_DIM, device=dev, dtype=dt, std=0.02, grad=True),
             w_up=_t(gen, D, ADAPTER_DIM, device=dev, dtype=dt, std=0.02, grad=True),
             b_up=_t(gen, D, device=dev, dtype=dt, std=0.02, grad=True))
    return p


def _qkv(gen, D, dev, dt):
    return {"w": _t(gen, 3 * D, D, device=dev, dtype=dt, std=D ** -0.5),
            "b": _t(gen, 3 * D, device=dev, dtype=dt, std=0.02)}


def make_lora(gen, B, N, D, dev, dt):
    p = _linear_inputs(gen, B, N, D, dev, dt)
    p.update(_qkv(gen, D, dev, dt))
    p.update(lora_a=_t(gen, RANK, D, device=dev, dtype=dt, std=D ** -0.5, grad=True),
             lora_b=_t(gen, 3 * D, RANK, device=dev, dtype=dt, std=0.02, grad=True))
    return p


def make_fact(gen, B, N, D, dev, dt):
    p = _linear_inputs(gen, B, N, D, dev, dt)
    p.update(_qkv(gen, D, dev, dt))
    p.update(fact_u=_t(gen, RANK, D, device=dev, dtype=dt, std=D ** -0.5, grad=True),
             fact_v=_t(gen, D, RANK, device=dev, dtype=dt, std=0.02, grad=True))
    for j in "qkv":
        p[f"core_{j}"] = _t(gen, RANK, RANK, device=dev, dtype=dt, std=RANK ** -0.5, grad=True)
    return p


def make_ln_ssf(gen, B, N, D, dev, dt):
    p = _linear_inputs(gen, B, N, D, dev, dt)
    p.update(ln_w=_t(gen, D, device=dev, dtype=dt, std=0.02, mean=1.0), ln_b=_t(gen, D, device=dev, dtype=dt, std=0.02),
             gamma=_t(gen, D, device=dev, dtype=dt, std=0.02, mean=1.0, grad=True),
             beta=_t(gen, D, device=dev, dtype=dt, std=0.02, grad=True))
    return p


def make_fc1_ssf_gelu(gen, B, N, D, dev, dt):
    p = _linear_inputs(gen, B, N, D, dev, dt)
    p.update(w1=_t(gen, 4 * D, D, device=dev, dtype=dt, std=D ** -0.5), b1=_t(gen, 4 * D, device=dev, dtype=dt, std=0.02),
             gamma=_t(gen, 4 * D, device=dev, dtype=dt, std=0.02, mean=1.0, grad=True),
             beta=_t(gen, 4 * D, device=dev, dtype=dt, std=0.02, grad=True))
    return p


def make_scale_shift(gen, B, N, D, dev, dt):
    p = _linear_inputs(gen, B, N, D, dev, dt)
    p.update(gamma=_t(gen, D, device=dev, dtype=dt, std=0.02, mean=1.0, grad=True),
             beta=_t(gen, D, device=dev, dtype=dt, std=0.02, grad=True))
    return p


def make_vqt_attention(gen, B, N, D, dev, dt, queries=VQT_QUERIES):
    H = max(1, D // 64)
    d = D // H
    return {"q": _t(gen, B, H, queries, d, device=dev, dtype=dt, grad=True),
            "k": _t(gen, B, H, N, d, device=dev, dtype=dt), "v": _t(gen, B, H, N, d, device=dev, dtype=dt)}


def make_vqt_aggregate(gen, B, N, D, dev, dt):
    return {"cls": _t(gen, B, D, device=dev, dtype=dt, grad=True),
            "queries": _t(gen, VQT_LAYERS, B, VQT_QUERIES, D, device=dev, dtype=dt, grad=True)}


# --- fused calls: how each fastpeft.ops functional is called with the same inputs ---------------

def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@dataclass(frozen=True)
class OpSpec:
    name: str
    make: Callable
    ref: Callable
    fused_names: tuple[str, ...]  # dotted paths under fastpeft, first found wins
    fused: Callable  # (fn, inputs) -> output
    units: Callable[[int, int, int], int]  # tokens per call
    unit: str = "tokens/s"


def _tokens(B, N, D):
    return B * N


def _fc1_then(fn, p):
    """The fused form of fc1 -> SSF -> GELU: the frozen GEMM, then one op for scale-shift + GELU
    (saving fc1's output only)."""
    return fn(F.linear(p["x"], p["w1"], p["b1"]), p["gamma"], p["beta"])


# fused_names: dotted paths under `fastpeft` (the Triton-kernel functionals dispatch to Triton on
# CUDA and to their torch math, with the same saving policy, on CPU)
OPS = [
    OpSpec("adapter", make_adapter, adapter_ref, ("ops.adapter.adapter",),
           lambda fn, p: fn(p["x"], p["w_down"], p["b_down"], p["w_up"], p["b_up"], scale=ADAPTER_SCALE, act="relu"),
           _tokens),
    OpSpec("lora", make_lora, lora_ref, ("ops.lowrank.lora_noah_qkv",),
           lambda fn, p: fn(p["x"], p["w"], p["b"], p["lora_a"], p["lora_b"], scale=1.0), _tokens),
    OpSpec("fact", make_fact, fact_ref, ("ops.lowrank.fact_linear",),
           lambda fn, p: fn(p["x"], p["w"], p["b"], p["fact_u"], p["fact_v"],
                            (p["core_q"], p["core_k"], p["core_v"]), layer="qkv", scale=1.0), _tokens),
    OpSpec("layernorm+ssf", make_ln_ssf, ln_ssf_ref, ("ops.ssf.layernorm_ssf",),
           lambda fn, p: fn(p["x"], p["ln_w"], p["ln_b"], p["gamma"], p["beta"], 1e-6), _tokens),
    OpSpec("fc1+ssf+gelu", make_fc1_ssf_gelu, fc1_ssf_gelu_ref, ("ops.ssf.ssf_gelu",), _fc1_then, _tokens),
    OpSpec("scale_shift", make_scale_shift, scale_shift_ref, ("ops.scale_shift",),
           lambda fn, p: fn(p["x"], p["gamma"], p["beta"]), _tokens),
    # the query-attention op at 1, 10 (VQT_QUERIES) and 50 query tokens per head
    *(OpSpec(f"vqt_attention{'' if q == VQT_QUERIES else f'_q{q}'}",
             functools.partial(make_vqt_attention, queries=q), vqt_attention_ref, ("ops.vqt_query_attention",),
             lambda fn, p: _first(fn(p["q"], p["k"], p["v"])), lambda B, N, D, q=q: B * q, "query tokens/s")
      for q in (1, VQT_QUERIES, 50)),
    OpSpec("vqt_aggregate", make_vqt_aggregate, vqt_aggregate_ref, ("ops.vqt_aggregate",),
           lambda fn, p: _first(fn(p["cls"], p["queries"])), lambda B, N, D: B, "images/s"),
]
CONTENDERS = ("eager", "compile", "fastpeft")
MODES = ("fwd+bwd", "fwd")


def pytest_generate_tests(metafunc):
    # sizes come from an option, so the parameters are built at collection time
    if metafunc.function.__name__ != "test_op":
        return
    sizes = metafunc.config.getoption("--bench-op-sizes").split(",")
    params = []
    for spec in OPS:
        for i, size in enumerate(s.strip() for s in sizes):
            for mode in MODES:
                for contender in CONTENDERS:
                    params.append(pytest.param(spec.name, size, i, contender, mode,
                                               id=f"{spec.name}-{size}-{contender}-{mode}"))
    metafunc.parametrize(("op", "size", "size_index", "contender", "mode"), params)


def _fused_fn(spec: OpSpec):
    import importlib

    for path in spec.fused_names:
        mod, _, attr = f"fastpeft.{path}".rpartition(".")
        try:
            fn = getattr(importlib.import_module(mod), attr, None)
        except Exception as e:  # noqa: BLE001  (e.g. no triton, a broken extension: the skip reason)
            return None, f"{mod} failed to import: {type(e).__name__}: {e}"
        if fn is not None:
            return fn, f"fastpeft.{path}"
    return None, f"fastpeft.{spec.fused_names[0]} not available"


@pytest.mark.bench_op
def test_op(benchmark, bench_cfg, collector, compiler_problem, op, size, size_index, contender, mode):
    cfg = bench_cfg
    spec = next(s for s in OPS if s.name == op)
    B, N, D = (int(v) for v in size.lower().split("x"))
    benchmark.group = f"op {op} {size} {mode}"
    row: dict[str, Any] = {"suite": "op", "name": op, "size": size, "contender": contender, "mode": mode,
                           "dtype": cfg.dtype_name, "config": (spec.ref.__doc__ or "").strip()}
    if contender == "compile":
        if compiler_problem:
            skip(collector, row, compiler_problem)
        if cfg.op_compile == "none" or (cfg.op_compile == "first" and size_index > 0):
            skip(collector, row, "torch.compile op rows run at the first size only by default "
                                 "(--bench-op-compile=all for every size; each compile costs ~10-30 s here)")
    gen = torch.Generator().manual_seed(7)
    p = spec.make(gen, B, N, D, cfg.device, cfg.dtype)
    grad_inputs = [t for t in p.values() if t.requires_grad]
    exclude = [t for k, t in p.items() if k not in ("x", "q", "k", "v", "cls", "queries")]

    if contender == "eager":
        f = lambda: spec.ref(p)  # noqa: E731
    elif contender == "compile":
        measure.configure_inductor()
        torch._dynamo.reset()
        cf = torch.compile(spec.ref)
        f = lambda: cf(p)  # noqa: E731
    else:
        fn, where = _fused_fn(spec)
        if fn is None:
            skip(collector, row, where)
        row["note"] = where
        f = lambda: spec.fused(fn, p)  # noqa: E731

    sync = (lambda: torch.cuda.synchronize(cfg.device)) if cfg.device.type == "cuda" else (lambda: None)
    with torch.no_grad():
        grad_out = torch.randn(spec.ref(p).shape, generator=gen).to(device=cfg.device, dtype=cfg.dtype)

    if mode == "fwd+bwd":
        def step():
            for t in grad_inputs:
                t.grad = None
            f().backward(grad_out)
            sync()
    else:
        def step():
            with torch.no_grad():
                f()
            sync()

    try:
        row["first_call_s"], graph_bytes = measure.first_call(step, contender == "compile")
    except (TypeError, ValueError, RuntimeError, NotImplementedError) as e:
        skip(collector, row, f"{contender} failed on {op} {size} ({mode}): {type(e).__name__}: {str(e)[:300]}")

    if mode == "fwd+bwd":
        row["saved_bytes"] = measure.saved_bytes(step, exclude)
        row["saved_method"] = "fastpeft.profile.saved_activation_bytes (storages, weights excluded)"
    row["cuda_memory"] = measure.cuda_peak(step, cfg.device)
    if contender == "compile":
        row["hbm_bytes"] = graph_bytes["bytes"]
        row["hbm_method"] = "Inductor count_bytes of the compiled graphs' kernels"
        row["launches"], row["launches_method"] = measure.profiled_launches(step, cfg.device)
    else:
        tm = measure.traffic(step)
        row.update(hbm_bytes=tm.bytes, hbm_method="dispatch mode: inputs+outputs of every aten/custom op")
        if cfg.device.type == "cuda":
            row["launches"], row["launches_method"] = measure.profiled_launches(step, cfg.device)
        else:
            row["launches"], row["launches_method"] = tm.ops, "aten ops dispatched (proxy for kernel launches)"

    timed(benchmark, collector, row, step, rounds=cfg.op_rounds, warmup=2, units=spec.units(B, N, D),
          unit_name=spec.unit)
