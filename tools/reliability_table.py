"""Issue 17's table from our own adversarial cases: tried / clear error / silent wrong / internal
crash / state lost, per category.

    PYTHONPATH=. python tools/reliability_table.py [--quick] [--seed N]

Categories (each case is a call a demanding user or an adversarial tester would make):
  bad configs         every method's config with NaN / inf / wrong-type / huge fields, bad
                      load_official / remove / inject arguments: a ValueError / TypeError, the
                      model unchanged
  models / wrappers   timm ViT variants (class / register tokens, avg pool, no class token, qk-norm,
                      layer scale, DeiT distilled), a model inside nn.Sequential / DataParallel,
                      float64 and bf16 models: inject + patch work (patched == unpatched) or refuse
                      clearly with the model unchanged
  bad op inputs       tests/bad_inputs.py: every public functional and raw torch.ops.fastpeft op
                      on each bad argument
  lifecycle           random sequences of inject / patch / unpatch / merge / unmerge / remove
                      (tests/test_properties.py's rules), merge / unmerge and patch / unpatch round
                      trips per method
  differential fuzz   random method config x ViT variant x batch / train / dropout / recompute /
                      backend: patched vs unpatched logits and gradients (fp32 tolerance)
  numerics            NaN / inf in every functional input against the reference; LayerNorm + SSF
                      at widths 1-3 against float64; every method on an all-zero image and batch 1

Outcomes: "clear" (a ValueError / TypeError naming the problem, model unchanged, or the call
worked as promised), "silent" (a result that is wrong, or accepted input that should not be),
"internal" (any other exception), "lost" (an exception that left the model changed).
"""
from __future__ import annotations

import argparse
import collections
import math
import random
import sys
import time
import traceback
import warnings

import torch
from torch import nn

warnings.simplefilter("ignore")

import fastpeft  # noqa: E402
from tests import bad_inputs, random_methods  # noqa: E402
from tests.methods.conftest import grads_of, randomize_  # noqa: E402
from tests.test_reliability import BAD_CONFIGS, assert_same, out_eval, snapshot  # noqa: E402

ATOL, RTOL = 1e-5, 1e-4
HAS_CPP = fastpeft.backends()["extension_cpu"]
VARIANTS = {
    "class-token": dict(), "registers": dict(reg_tokens=2), "avg-pool": dict(global_pool="avg"),
    "qk-norm": dict(qk_norm=True), "layer-scale": dict(init_values=0.1),
    "no-class-token": dict(class_token=False, global_pool="avg"),
}


def build_vit(variant="class-token", dropout=False, seed=0, **extra):
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    kw = dict(VARIANTS[variant], **extra)
    if dropout:
        kw.update(proj_drop_rate=0.1, drop_path_rate=0.1)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5, **kw)


def x_for(batch=2, seed=0):
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def random_method(rng: random.Random, dropout: bool):
    return random_methods.random_method(rng.choice, dropout)


def all_methods():
    return {
        "lora": lambda: fastpeft.LoRA(rank=4), "lora-petl": lambda: fastpeft.LoRA(rank=4, style="petl", targets=("q", "v")),
        "fact-tt": lambda: fastpeft.FacT(rank=4), "fact-tk": lambda: fastpeft.FacT(kind="tk", rank=4),
        "kadaptation": lambda: fastpeft.KAdaptation(init="trainable"), "ssf": fastpeft.SSF, "bitfit": fastpeft.BitFit,
        "adaptformer": lambda: fastpeft.AdaptFormer(dim=8), "adapter": lambda: fastpeft.Adapter(dim=8),
        "convpass": lambda: fastpeft.Convpass(dim=8), "vpt": lambda: fastpeft.VPT(num_tokens=3),
        "noah": lambda: fastpeft.NOAH(adapter_dims=[4, 4], lora_ranks=[2, 2], prompt_lens=[2, 2]),
        "vqt": lambda: fastpeft.VQT(num_queries=2), "linear-probe": fastpeft.LinearProbe,
    }


# ----------------------------------------------------------------------------------------------
# outcome helpers
# ----------------------------------------------------------------------------------------------

def refused_cleanly(model, before, x, ref, call) -> tuple[str, str]:
    """Run `call`; a ValueError / TypeError must leave the model as it was."""
    try:
        call()
    except (ValueError, TypeError) as e:
        try:
            assert_same(model, before)
            if ref is not None:
                assert torch.equal(out_eval(model, x), ref)
        except AssertionError as a:
            return "lost", f"{type(e).__name__} but the model changed: {a}"
        return "clear", f"{type(e).__name__}: {str(e)[:100]}"
    except Exception as e:  # noqa: BLE001
        try:
            assert_same(model, before)
        except AssertionError:
            return "lost", f"{type(e).__name__} (model changed): {str(e)[:100]}"
        return "internal", f"{type(e).__name__}: {str(e)[:100]}"
    return "ok", ""


def step(model, x, seed=7):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(x)
    out.float().square().mean().backward()
    return out.detach(), grads_of(model)


def close(a, b, atol=ATOL, rtol=RTOL) -> bool:
    try:
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol)
        return True
    except AssertionError:
        return False


def equivalence(model, x, backend, recompute, training, atol=ATOL, rtol=RTOL) -> tuple[str, str]:
    """patch changes how, never what: logits, every gradient, and unpatch restores bit for bit."""
    model.train(training)
    ref, gref = step(model, x)
    before = snapshot(model)
    try:
        fastpeft.patch(model, backend=backend, recompute=recompute)
    except (ValueError, TypeError) as e:
        try:
            assert_same(model, before)
        except AssertionError:
            return "lost", f"patch refused but changed the model: {e}"
        return "clear", f"patch refused: {str(e)[:100]}"
    out, g = step(model, x)
    if not close(out, ref, atol, rtol):
        return "silent", f"logits differ by {(out - ref).abs().max().item():.2e}"
    if g.keys() != gref.keys() or not all(close(g[n], gref[n], atol, rtol) for n in gref):
        return "silent", "gradients differ"
    fastpeft.unpatch(model)
    out2, _ = step(model, x)
    if not torch.equal(out2, ref):
        return "silent", "unpatch did not restore the reference outputs"
    return "clear", "matches"


# ----------------------------------------------------------------------------------------------
# categories: each yields (name, thunk -> (outcome, detail))
# ----------------------------------------------------------------------------------------------

def inject_then_compare(model, make_method, backend, training) -> tuple[str, str]:
    """Inject `make_method()` (a clear refusal leaves the model as it was), randomise the trainable
    parameters, then compare patched with unpatched (`equivalence`)."""
    x = x_for()
    ref, before = out_eval(model, x), snapshot(model)
    what, detail = refused_cleanly(model, before, x, ref, lambda: fastpeft.inject(model, make_method()))
    if what != "ok":
        return what, detail
    randomize_([p for _, p in fastpeft.trainable_parameters(model)])
    return equivalence(model if training else model.eval(), x, backend, False, training)


def bad_configs(quick):
    from tests.methods.conftest import images, make_vit

    for make, needle in BAD_CONFIGS:
        def case(make=make, needle=needle):
            model = make_vit(depth=2)
            x = images()
            ref, before = out_eval(model, x), snapshot(model)
            what, detail = refused_cleanly(model, before, x, ref, lambda: fastpeft.inject(model, make()))
            if what == "ok":
                return "silent", f"{needle}: accepted"
            if what == "clear" and needle.split()[-1] not in detail:
                return "internal", f"{needle}: the error does not name the field: {detail}"
            return what, detail
        yield f"config {needle}", case
    odd = [
        ("load_official(None)", lambda m: fastpeft.load_official(m, None, "ssf")),
        ("load_official(list)", lambda m: fastpeft.load_official(m, [1, 2], "ssf")),
        ("load_official(int key)", lambda m: fastpeft.load_official(m, {1: torch.zeros(1)}, "ssf")),
        ("load_official(source None)", lambda m: fastpeft.load_official(m, {}, None)),
        ("load_official(module None)", lambda m: fastpeft.load_official(None, {}, "ssf")),
        ("remove('Lora2')", lambda m: fastpeft.remove(m, "Lora2")),
        ("remove(3)", lambda m: fastpeft.remove(m, 3)),
        ("remove(nn.Linear)", lambda m: fastpeft.remove(m, nn.Linear)),
        ("remove(not injected)", lambda m: fastpeft.remove(m, fastpeft.LoRA)),
        ("inject(class)", lambda m: fastpeft.inject(m, fastpeft.LoRA)),
        ("inject(None)", lambda m: fastpeft.inject(m, None)),
        ("inject(str)", lambda m: fastpeft.inject(m, "lora")),
        ("patch(backend='cuda')", lambda m: fastpeft.patch(m, backend="cuda")),
        ("patch(backend=3)", lambda m: fastpeft.patch(m, backend=3)),
        ("patch(recompute='yes')", lambda m: fastpeft.patch(m, recompute="yes")),
        ("inject(non-ViT)", None),
    ]
    for name, call in odd:
        def case(name=name, call=call):
            model = make_vit(depth=2)
            fastpeft.inject(model, fastpeft.SSF())
            x = images()
            if call is None:
                model = nn.Sequential(nn.Linear(4, 4))
                x = torch.randn(2, 4)
                call = lambda m: fastpeft.inject(m, fastpeft.LoRA())  # noqa: E731
            ref, before = out_eval(model, x), snapshot(model)
            what, detail = refused_cleanly(model, before, x, ref, lambda: call(model))
            return ("silent", "accepted") if what == "ok" else (what, detail)
        yield name, case


def models_and_wrappers(quick):
    import timm

    methods = all_methods()
    names = sorted(methods)
    backends = ["torch"] + (["cpp"] if HAS_CPP else [])
    for variant in VARIANTS:
        for name in (names[::2] if quick else names):
            for backend in backends:
                def case(variant=variant, name=name, backend=backend):
                    return inject_then_compare(build_vit(variant), methods[name], backend, training=True)
                yield f"{variant} {name} [{backend}]", case
    for name in (names[::2] if quick else names):
        def deit(name=name):
            torch.manual_seed(0)
            model = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, num_classes=5, img_size=32,
                                      patch_size=8, depth=2, embed_dim=32, num_heads=2)
            return inject_then_compare(model, methods[name], "torch", training=False)
        yield f"deit-distilled {name}", deit
    for wrap in ("sequential", "dataparallel"):
        def wrapped(wrap=wrap):
            inner = build_vit()
            model = nn.Sequential(inner) if wrap == "sequential" else nn.DataParallel(inner)
            x = x_for()
            ref, before = out_eval(model, x), snapshot(model)
            what, detail = refused_cleanly(model, before, x, ref, lambda: fastpeft.inject(model, fastpeft.LoRA(rank=4)))
            if what != "ok":
                return what, detail
            randomize_([p for _, p in fastpeft.trainable_parameters(model)])
            return equivalence(model, x, "torch", False, True)
        yield f"wrapped in {wrap}", wrapped
    for dtype in (torch.float64, torch.bfloat16):
        for name in ("ssf", "lora", "vqt", "adapter"):
            def typed(dtype=dtype, name=name):
                model = build_vit().to(dtype)
                x = x_for().to(dtype)
                fastpeft.inject(model, methods[name]())
                randomize_([p for _, p in fastpeft.trainable_parameters(model)])
                tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else {}
                return equivalence(model, x, "torch", dtype == torch.float64, True, **tol)
            yield f"{dtype} {name}", typed


def bad_op_inputs(quick):
    for case in bad_inputs.functional_cases() + bad_inputs.raw_op_cases():
        for label, thunk in bad_inputs.mutations(case):
            yield label, (lambda thunk=thunk: bad_inputs.outcome(thunk))


def lifecycle(quick, seed):
    rng = random.Random(seed)
    n = 10 if quick else 40
    for i in range(n):
        ops = []
        for _ in range(rng.randint(1, 6)):
            kind = rng.choice(["inject", "inject", "patch", "unpatch", "merge", "unmerge", "remove"])
            if kind == "inject":
                ops.append((kind, random_method(rng, False)))
            elif kind == "patch":
                ops.append((kind, rng.choice(["torch", "cpp"] if HAS_CPP else ["torch"]), rng.random() < 0.5))
            elif kind == "remove":
                ops.append((kind, rng.choice([None, "LoRA", "SSF", "VPT", "FacT", "nope", 3])))
            else:
                ops.append((kind,))
        variant = rng.choice(sorted(VARIANTS))
        yield f"sequence {i} ({variant}: {', '.join(o[0] for o in ops)})", (lambda ops=ops, v=variant: run_sequence(v, ops))
    for name, make in all_methods().items():
        def roundtrip(make=make, name=name):
            model = build_vit().eval()
            x = x_for()
            plain = list(model.state_dict())
            fastpeft.inject(model, make())
            randomize_([p for n_, p in fastpeft.trainable_parameters(model) if not n_.startswith("head")])
            ref = out_eval(model, x)
            sd = {k: v.clone() for k, v in model.state_dict().items()}
            before = snapshot(model)
            what, detail = refused_cleanly(model, before, x, ref, lambda: fastpeft.merge(model))
            if what == "ok":
                if list(model.state_dict()) != plain or not close(out_eval(model, x), ref):
                    return "silent", "merge changed the function or left method keys"
                fastpeft.unmerge(model)
                if list(model.state_dict()) != list(sd) or not all(torch.equal(model.state_dict()[k], v)
                                                                    for k, v in sd.items()):
                    return "silent", "merge -> unmerge is not bit-exact"
            elif what != "clear":
                return what, detail
            fastpeft.patch(model, backend="cpp" if HAS_CPP else "torch", recompute=True)
            for k, v in sd.items():
                if not torch.equal(model.state_dict()[k], v):
                    return "silent", f"patch changed {k}"
            fastpeft.unpatch(model)
            fastpeft.remove(model)
            if list(model.state_dict()) != plain:
                return "lost", "remove left keys"
            return "clear", "round trips"
        yield f"round trip {name}", roundtrip


def run_sequence(variant, ops):
    model = build_vit(variant)
    plain = list(model.state_dict())
    x = x_for()
    for op in ops:
        before = snapshot(model)
        ref = out_eval(model, x)
        patched = "_fastpeft_patch" in model.__dict__
        injected = len(fastpeft.injections(model))
        calls = {"inject": lambda: fastpeft.inject(model, op[1]), "patch": lambda: fastpeft.patch(model, backend=op[1], recompute=op[2]),
                 "unpatch": lambda: fastpeft.unpatch(model), "merge": lambda: fastpeft.merge(model),
                 "unmerge": lambda: fastpeft.unmerge(model), "remove": lambda: fastpeft.remove(model, op[1])}
        what, detail = refused_cleanly(model, before, x, ref, calls[op[0]])
        if what in ("lost", "internal"):
            return what, f"{op[0]}: {detail}"
        if what == "clear":
            continue
        if op[0] == "inject":
            randomize_([p for n, p in fastpeft.trainable_parameters(model) if not n.startswith("head")], seed=1)
            if len(fastpeft.injections(model)) != injected + 1:
                return "silent", "inject did not add an injection"
        out = out_eval(model, x)
        if not out.isfinite().all():
            return "silent", f"{op[0]}: non-finite outputs"
        if op[0] in ("patch", "unpatch", "merge", "unmerge") and op[0] != "inject":
            if not close(out, ref):
                return "silent", f"{op[0]} changed the outputs"
        if op[0] in ("merge", "remove", "inject") and patched:
            return "silent", f"{op[0]} ran on a patched model"
        if op[0] == "remove" and not fastpeft.injections(model) and list(model.state_dict()) != plain:
            return "lost", "remove left keys"
        model.train()
        model.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
    return "clear", "as promised"


def differential(quick, seed):
    rng = random.Random(seed + 1)
    n = 20 if quick else 80
    backends = ["torch"] + (["cpp"] if HAS_CPP else [])
    for i in range(n):
        variant, dropout = rng.choice(sorted(VARIANTS)), rng.random() < 0.5
        batch, training, recompute, backend = rng.randint(1, 3), rng.random() < 0.5, rng.random() < 0.5, rng.choice(backends)
        method = random_method(rng, dropout)

        def case(variant=variant, dropout=dropout, batch=batch, training=training, recompute=recompute,
                 backend=backend, method=method):
            model = build_vit(variant, dropout, seed=batch)
            x = x_for(batch, seed=batch)
            ref, before = out_eval(model, x), snapshot(model)
            what, detail = refused_cleanly(model, before, x, ref, lambda: fastpeft.inject(model, method))
            if what != "ok":
                return what, detail
            randomize_([p for _, p in fastpeft.trainable_parameters(model)], seed=batch)
            return equivalence(model, x, backend, recompute, training)
        yield (f"{type(method).__name__} {variant} b{batch} {'train' if training else 'eval'} "
               f"{'drop ' if dropout else ''}{'recompute ' if recompute else ''}[{backend}]"), case


def numerics(quick):
    from tests.test_reliability import layernorm_ssf_errors

    for case in bad_inputs.functional_cases():
        for path, i in bad_inputs.poison_points(case):
            for v in (math.nan, math.inf, -math.inf):
                def poison(case=case, path=path, i=i, v=v):
                    m = bad_inputs.propagation_mismatch(case, path, i, v)
                    return ("silent", m) if m else ("clear", "propagates")
                yield f"{case.name} {path}[{i}] = {v}", poison
    from kernels._common import interpreting

    for width in (1, 2, 3):
        for backend in ["torch"] + (["triton"] if interpreting() else []):
            def ln(width=width, backend=backend):
                if any(err > bound for _, err, bound in layernorm_ssf_errors(width, backend)):
                    return "silent", "off against float64"
                return "clear", "matches float64"
            yield f"layernorm_ssf width {width} [{backend}]", ln
    for name, make in all_methods().items():
        def degenerate(name=name, make=make):
            model = build_vit()
            fastpeft.inject(model, make())
            randomize_([p for _, p in fastpeft.trainable_parameters(model)])
            x = torch.zeros(1, 3, 32, 32)
            return equivalence(model, x, "torch", True, True)
        yield f"zero image, batch 1: {name}", degenerate


CATEGORIES = ["bad configs", "models / wrappers", "bad op inputs", "lifecycle", "differential fuzz", "numerics"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer models, sequences and fuzz cases")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--verbose", action="store_true", help="print every case that is not 'clear'")
    ap.add_argument("--only", action="append", choices=CATEGORIES, help="run only this category (repeatable)")
    args = ap.parse_args(argv)
    gens = {
        "bad configs": bad_configs(args.quick), "models / wrappers": models_and_wrappers(args.quick),
        "bad op inputs": bad_op_inputs(args.quick), "lifecycle": lifecycle(args.quick, args.seed),
        "differential fuzz": differential(args.quick, args.seed), "numerics": numerics(args.quick),
    }
    table, bad = {}, []
    t0 = time.perf_counter()
    cats = args.only or CATEGORIES
    for cat in cats:
        counts = collections.Counter()
        for name, thunk in gens[cat]:
            try:
                what, detail = thunk()
            except Exception as e:  # noqa: BLE001 - the harness's own slip counts as a crash
                what, detail = "internal", f"{type(e).__name__}: {e} ({traceback.format_exc(limit=-2)[-300:]})"
            what = {"ok": "clear"}.get(what, what)
            counts[what] += 1
            if what != "clear":
                bad.append(f"[{cat}] {what}: {name}: {detail}")
        table[cat] = counts
        print(f"  {cat}: {sum(counts.values())} cases ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    cols = ["clear", "silent", "internal", "lost"]
    head = f"| {'category':<18} | {'tried':>5} | {'clear error / works':>19} | {'silent wrong':>12} | " \
           f"{'internal crash':>14} | {'state lost':>10} |"
    print(head)
    print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
    total = collections.Counter()
    for cat in cats:
        c = table[cat]
        total.update(c)
        print(f"| {cat:<18} | {sum(c.values()):>5} | {c['clear']:>19} | {c['silent']:>12} | {c['internal']:>14} | "
              f"{c['lost']:>10} |")
    print(f"| {'total':<18} | {sum(total.values()):>5} | {total['clear']:>19} | {total['silent']:>12} | "
          f"{total['internal']:>14} | {total['lost']:>10} |")
    print(f"({time.perf_counter() - t0:.0f} s, torch {torch.__version__}, C++ extension: {HAS_CPP}, "
          f"seed {args.seed}{', quick' if args.quick else ''})")
    for line in bad if args.verbose else bad[:40]:
        print(line)
    return 1 if any(total[c] for c in cols[1:]) else 0


if __name__ == "__main__":
    sys.exit(main())
