"""`fastpeft.patch`: swap the reference op sequences inside an injected ViT for fused ones.

Patching changes *how* a forward/backward is computed, never *what*: the same `nn.Parameter`
objects stay in place under the same names (modules are re-classed or their hooks swapped, never
rebuilt), outputs and gradients stay within the fused ops' stated tolerances, and `unpatch`
restores the reference modules exactly.

Each fusion is a `Rule`: it finds the places it applies to, installs the fused form there and
records how to undo it. Rules are tried in order and every place they touch or decline is listed
in the returned `PatchReport`.

Backends:
  auto    CUDA tensors -> "triton"; CPU tensors -> "cpp" where the C++ extension has the op,
          else the memory-lean "torch" path (the fused ops' own saving/recompute scheme in
          plain torch).
  triton  Triton kernels; on CPU tensors only under the interpreter (TRITON_INTERPRET=1).
  cpp     the compiled extension's ops (CPU or CUDA); ValueError if it is not loaded.
  torch   the memory-lean torch path, everywhere.
"""
from __future__ import annotations

import weakref

import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .block import replaced_dataflow
from .fused.vqt import VQTRule
from .methods.base import PetlBlock, ViTInfo, ensure_petl_block, state_of
from .rule import PatchReport, Rule

__all__ = ["patch", "unpatch", "PatchReport", "resolve_backend", "Rule", "RULES"]

BACKENDS = ("auto", "triton", "cpp", "torch")
#: the parameter dtypes the fused ops take
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass
class _PatchState:
    backend: str
    recompute: bool
    report: PatchReport
    undo: list[tuple["Rule", Any]]


class _Snapshot:
    """What `patch` / `unpatch` may change on a model, taken before they start, so that a failure
    at any step (a rule's apply or finish, a probe, an undo) puts the model back exactly as it was:
    every module's class and attribute dict, and the contents (not the identity: hook handles
    hold references to them) of the containers in those dicts -- hook tables, `_modules`, block
    slot lists -- one level down, plus the attributes of the hook and slot objects found there.
    Patching never changes tensor values (only classes, hooks and slots), so tensors are not
    copied."""

    def __init__(self, model: nn.Module):
        self.modules: list[tuple[nn.Module, type, dict]] = []
        self.containers: list[tuple[Any, Any]] = []
        self.objects: list[tuple[Any, dict]] = []
        seen: set[int] = set()
        for mod in model.modules():
            self.modules.append((mod, type(mod), dict(mod.__dict__)))
            for value in mod.__dict__.values():
                self._container(value, seen, depth=2)

    def _container(self, value: Any, seen: set[int], depth: int) -> None:
        if id(value) in seen:
            return
        if isinstance(value, dict):
            seen.add(id(value))
            self.containers.append((value, dict(value)))
            children = list(value.values())
        elif isinstance(value, list):
            seen.add(id(value))
            self.containers.append((value, list(value)))
            children = list(value)
        elif isinstance(value, set):
            seen.add(id(value))
            self.containers.append((value, set(value)))
            return
        else:
            return
        for child in children:
            if isinstance(child, (dict, list, set)) and depth > 0:
                self._container(child, seen, depth - 1)
            elif not isinstance(child, (nn.Module, torch.Tensor)) and hasattr(child, "__dict__") \
                    and id(child) not in seen and type(child).__module__.startswith("fastpeft."):
                seen.add(id(child))
                self.objects.append((child, dict(child.__dict__)))

    def restore(self) -> None:
        for obj, saved in self.objects:
            obj.__dict__.clear()
            obj.__dict__.update(saved)
        for container, saved in self.containers:
            container.clear()
            if isinstance(container, list):
                container.extend(saved)
            else:
                container.update(saved)
        for mod, cls, saved in self.modules:
            if type(mod) is not cls:
                object.__setattr__(mod, "__class__", cls)
            mod.__dict__.clear()
            mod.__dict__.update(saved)


def _model_device(model: nn.Module) -> torch.device:
    devices = {p.device for p in model.parameters()}
    if len(devices) != 1:
        raise ValueError(f"fastpeft.patch needs the whole model on one device, found {sorted(map(str, devices))}")
    return devices.pop()


def resolve_backend(backend: str, device: torch.device) -> str:
    """Turn a requested backend into the one that will run on `device`, or raise ValueError."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type == "cuda" and _triton_available():
            return "triton"
        return "cpp" if _ext_loaded() else "torch"
    if backend == "triton":
        if not _triton_available():
            raise ValueError("backend='triton' requested but triton cannot be imported")
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(
                "backend='triton' on CPU tensors runs only in the Triton interpreter: set "
                "TRITON_INTERPRET=1 before importing triton, or use backend='auto'/'torch' on CPU"
            )
        return "triton"
    if backend == "cpp" and not _ext_loaded():
        from . import _ext

        raise ValueError(f"backend='cpp' requested but the C++ extension is not loaded: {_ext.load().reason}")
    return backend


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def _ext_loaded() -> bool:
    from . import _ext

    return bool(_ext.load().available)


class RecomputeRule(Rule):
    """`recompute=True` (fastpeft/recompute.py): every block's halves run lean (their attention and
    MLP activation keep nothing backward cannot recompute from the block's stream) or, where that
    does not fit the byte budget, as checkpointed regions; the plan keeps what the budget leaves."""

    name = "recompute"

    def apply(self, model, info, backend, recompute, report):
        if not recompute:
            return []
        from .recompute import RECOMPUTE

        multitask = model.__dict__.get("_fastpeft_multitask")

        records = []
        for i, blk in enumerate(model.blocks):
            if replaced_dataflow(blk):
                report.left_alone.append((f"blocks.{i} recompute", "a method replaced the block's forward (VQT); "
                                                                   "it is not recomputed"))
                continue
            was_petl = isinstance(blk, PetlBlock)
            ensure_petl_block(blk)
            blk._fastpeft_run = RECOMPUTE
            if multitask is not None:
                # the task tensors this block reads in a mixed batch: its own and the model-level
                # ones (shared factors, prompts), by their single-task names (fastpeft/recompute.py)
                own = f"blocks.{i}."
                blk.__dict__["_fastpeft_rows"] = (weakref.ref(model), tuple(
                    n for n in multitask.names if n.startswith(own) or not n.startswith("blocks.")))
            records.append((f"blocks.{i}", was_petl))
        if records:
            report.patched.append(
                (f"blocks.0..{info.depth - 1}", "selective recompute (keep block inputs, recompute the rest)", "torch")
            )
        return records

    def finish(self, model: nn.Module, probe, report: PatchReport) -> None:
        """After every rule: choose the lean halves and spend the byte budget on keeping GEMM /
        attention outputs (recompute.plan_keeps)."""
        from .recompute import BYTE_BUDGET, plan_keeps

        for blk in model.blocks:
            if "_fastpeft_run" in blk.__dict__:
                blk._fastpeft_params = tuple(blk.parameters())
                blk._fastpeft_reads = _params_read(blk)
        plan = plan_keeps(model, probe) if probe is not None else {}
        for i, keep in plan.items():
            model.blocks[i]._fastpeft_keep = keep
        lean = {half: [i for i, blk in enumerate(model.blocks) if half in blk.__dict__.get("_fastpeft_lean", ())]
                for half in ("attn", "mlp")}
        for half, what in (("attn", "attention: keeps none of q / k / v or its output; backward recomputes the "
                                    "qkv output and the attention"),
                           ("mlp", "GELU: keeps not its input; backward recomputes the fc1 output")):
            if lean[half]:
                report.patched.append((f"blocks {_ranges(lean[half])}", f"lean recompute of the {what}", "torch"))
        by_keep: dict[str, list[int]] = {}
        for i, keep in sorted(plan.items()):
            by_keep.setdefault("+".join(sorted(keep)), []).append(i)
        for keep, blocks in by_keep.items():
            where = f"blocks {_ranges(blocks)}"
            report.patched.append((where, f"recompute also keeps the {keep} output (measured plan: within "
                                          f"{BYTE_BUDGET}x the reference's saved bytes)", "torch"))

    def undo(self, model, record):
        _remove_run(model, record, "_fastpeft_keep", "_fastpeft_lean", "_fastpeft_params", "_fastpeft_reads",
                    "_fastpeft_rows")


def _remove_run(model: nn.Module, record: tuple[str, bool], *state: str) -> None:
    """Undo a rule that gave the block at `record` = (path, was it a PetlBlock) its run: the run
    and the `state` the rule kept on the block go, and the block its class back where nothing else
    needs the PetlBlock form (`_unclass_if_unused`)."""
    path, was_petl = record
    blk = model.get_submodule(path)
    del blk._fastpeft_run
    for name in state:
        blk.__dict__.pop(name, None)
    _unclass_if_unused(blk, was_petl)


def _params_read(blk: nn.Module) -> tuple[nn.Parameter, ...]:
    """The parameters a block's forward may read: its own, and those of the modules its method
    hooks and slot callables hold (FacT's hooks read FacTu / FacTv / FacTc / FacTp on the model
    itself, KAdaptation's the shared rules there): what `RecomputeRun` asks whether any needs a
    gradient. (A module held by a hook counts whole, e.g. the model: a superset costs no more
    than a recomputed block that needed none.)"""
    from .methods.base import OutputHook, SlotFn

    found: dict[int, nn.Parameter] = {id(p): p for p in blk.parameters()}
    seen: set[int] = set()

    def take(obj, depth: int) -> None:
        if id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(obj, nn.Parameter):
            found.setdefault(id(obj), obj)
        elif isinstance(obj, nn.Module):
            for p in obj.parameters():
                found.setdefault(id(p), p)
        elif isinstance(obj, (OutputHook, SlotFn)) and depth < 3:
            for value in vars(obj).values():
                take(value, depth + 1)

    for mod in blk.modules():
        for table in (mod._forward_hooks, mod._forward_pre_hooks):
            for hook in table.values():
                take(hook, 0)
        for name, value in vars(mod).items():  # (fused classes hold their absorbed hook: `_fastpeft_hook`)
            if name.startswith("_fastpeft"):
                take(value, 0)
    for fns in blk.__dict__.get("_fastpeft_slots", {}).values():
        for fn in fns:
            take(fn, 0)
    return tuple(found.values())


def _unclass_if_unused(blk: nn.Module, was_petl: bool) -> None:
    """Undo `ensure_petl_block` on a block a rule re-classed, once nothing needs the PetlBlock form
    any more: no method slots and no recompute."""
    if not was_petl and "_fastpeft_run" not in blk.__dict__ and not any(blk._fastpeft_slots.values()):
        blk.__class__ = blk._fastpeft_orig_class
        del blk._fastpeft_slots
        del blk._fastpeft_orig_class


class DeltaFirstRule(Rule):
    """`recompute=True`: a frozen attn.proj / mlp.fc2 whose hooks only add a delta of the layer's
    input (FacT) computes the deltas before its GEMM (`recompute.DeltaFirstLinear`), so backward
    rebuilds the deltas' saved tensors without re-running (or keeping) the GEMM's output."""

    name = "delta-first"

    def apply(self, model, info, backend, recompute, report):
        if not recompute:
            return []
        from .fused.common import AbsorbedHook, swap_hook
        from .recompute import DeltaFirstLinear, delta_first_hooks

        records = []
        for i, blk in enumerate(model.blocks):
            if "_fastpeft_run" not in blk.__dict__:
                continue
            for part, name in (("attn", "proj"), ("mlp", "fc2")):
                path = f"blocks.{i}.{part}.{name}"
                layer = getattr(getattr(blk, part, None), name, None)
                hooks = delta_first_hooks(layer) if isinstance(layer, nn.Module) else None
                if hooks is None:
                    continue
                for h in hooks:
                    swap_hook(layer, h, AbsorbedHook(h, by="DeltaFirstLinear"))
                layer.__class__ = DeltaFirstLinear
                layer._fastpeft_hooks = tuple(hooks)
                records.append(path)
        if records:
            report.patched.append((f"{len(records)} proj / fc2 layers", "recompute: additive deltas before the frozen GEMM "
                                   "(backward re-runs the delta, not the GEMM)", "torch"))
        return records

    def undo(self, model, path):
        from .fused.common import swap_hook

        layer = model.get_submodule(path)
        originals = {id(h): h for h in layer._fastpeft_hooks}
        for fn in list(layer._forward_hooks.values()):
            if id(getattr(fn, "original", None)) in originals:
                swap_hook(layer, fn, fn.original)
        layer.__class__ = nn.Linear
        del layer._fastpeft_hooks


def _ranges(idx: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2, 5, 7-8'."""
    runs: list[list[int]] = []
    for i in idx:
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ", ".join(f"{a}-{b}" if b > a else f"{a}" for a, b in runs)


class _CompactHeadInput:
    """Forward pre-hook on a trainable head: a token-pooled feature `x[:, 0]` is a view of the
    whole [B, N, D] final-norm output, and the head's Linear saves its input for the weight
    gradient, which keeps that whole storage alive. A [B, D] copy is what it needs."""

    def __call__(self, module, args):
        (x,) = args
        return (x.contiguous(),) if not x.is_contiguous() else None


class HeadRule(Rule):
    name = "head"

    def apply(self, model, info, backend, recompute, report):
        head = getattr(model, "head", None)
        if not state_of(model) or not isinstance(head, nn.Linear) or not head.weight.requires_grad:
            return []  # only fastpeft-injected models (a plain model has nothing to patch)
        head.register_forward_pre_hook(_CompactHeadInput())
        report.patched.append(("head", "saves the pooled [B, D] input, not a view of the [B, N, D] tokens", "torch"))
        return ["head"]

    def undo(self, model, record):
        hooks = model.get_submodule(record)._forward_pre_hooks
        for hid in [h for h, fn in hooks.items() if isinstance(fn, _CompactHeadInput)]:
            del hooks[hid]


class ClassRowRule(Rule):
    """The class-row pass: inside `model(x)`, a token-pooled model's last block computes the class
    token's row only (fastpeft/class_row.py), the only row the head reads."""

    name = "class-row"

    def apply(self, model, info, backend, recompute, report):
        from .class_row import ClassRowForward, class_row_why_not

        if not state_of(model):
            return []  # only fastpeft-injected models (a plain model has nothing to patch)
        last = model.blocks[-1]
        was_petl = isinstance(last, PetlBlock)
        ensure_petl_block(last)
        why = class_row_why_not(model)
        if why:
            _unclass_if_unused(last, was_petl)
            report.left_alone.append(("model.forward (class-row pass)", why))
            return []
        model.__dict__["forward"] = ClassRowForward(model)
        report.patched.append(("forward", "class-row pass: the last block computes the class token row only "
                                          "(the only row the head reads; forward_features unchanged)", "torch"))
        return [was_petl]

    def undo(self, model, was_petl):
        model.__dict__.pop("forward", None)
        _unclass_if_unused(model.blocks[-1], was_petl)


class BlockRunRule(Rule):
    """Every block of an injected ViT that runs timm's block dataflow, and was given no other run
    (recompute's), runs as a patched block (fastpeft/block.py `PATCHED`): the reference's order and
    modules, less the calls of its no-op modules (nn.Identity, nn.Dropout and DropPath at rate 0),
    with timm's Attention and Mlp forwards run inline. The same ops on the same tensors: only the
    host's module-call work goes."""

    name = "block-run"

    def apply(self, model, info, backend, recompute, report):
        from .block import PATCHED

        if not state_of(model):
            return []
        records, idx = [], []
        for i, blk in enumerate(model.blocks):
            if replaced_dataflow(blk) or "_fastpeft_run" in blk.__dict__:
                continue
            was_petl = isinstance(blk, PetlBlock)
            ensure_petl_block(blk)
            blk._fastpeft_run = PATCHED
            records.append((f"blocks.{i}", was_petl))
            idx.append(i)
        if records:
            report.patched.append((f"blocks {_ranges(idx)}",
                                   "block run without the calls of its no-op modules (Identity, rate-0 "
                                   "Dropout / DropPath); Attention and Mlp forwards inline", "torch"))
        return records

    def undo(self, model, record):
        _remove_run(model, record)


#: rules tried after the fused-kernel rules of fastpeft/fused (which import Triton lazily); VQT's
#: needs no Triton (its ops are the C++/CUDA extension's, or their references)
_RECOMPUTE = RecomputeRule()
RULES: list[Rule] = [_RECOMPUTE, DeltaFirstRule(), HeadRule(), ClassRowRule(), VQTRule(), BlockRunRule()]


def _all_rules(report: PatchReport) -> list[Rule]:
    try:
        from .fused import rules
    except ImportError as e:  # no triton: the fused modules' kernels cannot be imported
        report.left_alone.append(("fused kernels", f"unavailable ({e}); only recompute applies"))
        return list(RULES)
    return [*rules(), *RULES]


def patch(model: nn.Module, backend: str = "auto", recompute: bool = False) -> PatchReport:
    """Swap the injected reference modules of `model` (and the frozen neighbours the kernels
    absorb) for fused ones, in place. Idempotent: patching again with the same arguments changes
    nothing and returns the same report; other arguments re-patch from the reference form.

    All or nothing: if any rule fails (e.g. an op that does not support the model's dtype), the
    model is put back exactly as it was before the call (patched with the old arguments, if it
    was) and the exception propagates.

    Lifecycle: a patched model runs forward / backward and can be patched again or unpatched;
    `fastpeft.inject`, `remove`, `merge` and `unmerge` refuse it with a ValueError asking for
    `unpatch` first (they work on the reference modules), and `patch(model)` again afterwards.
    """
    info = _family_info(model)
    if not isinstance(recompute, bool):
        raise ValueError(f"recompute must be a bool, got {recompute!r}")
    resolved = resolve_backend(backend, _model_device(model))
    bad = sorted({str(p.dtype) for p in model.parameters() if p.is_floating_point() and p.dtype not in _DTYPES})
    if bad:
        raise ValueError(f"fastpeft.patch: the fused ops run in float32, float16 or bfloat16; this model has "
                         f"{', '.join(bad)} parameters (convert it, e.g. model.float(), or leave it unpatched)")
    st: _PatchState | None = model.__dict__.get("_fastpeft_patch")
    if st is not None and (st.backend, st.recompute) == (resolved, recompute):
        return st.report
    snapshot = _Snapshot(model)
    try:
        if st is not None:
            unpatch(model)
        return _patch(model, info, resolved, recompute)
    except BaseException:
        snapshot.restore()
        raise


def _family_info(model: nn.Module):
    """`vit_info(model)`, or the shape facts of the family the injected methods serve (ConvNets:
    fastpeft/methods/convnet.py), which also picks the rules."""
    from .api import _model_info

    return _model_info(model)


def _patch(model: nn.Module, info: ViTInfo, resolved: str, recompute: bool) -> PatchReport:
    report = PatchReport(backend=resolved, recompute=recompute)
    vit = isinstance(info, ViTInfo)
    probe = None
    multitask = model.__dict__.get("_fastpeft_multitask")
    # the reference's saved bytes per block, measured before anything is swapped (a multi-task
    # model's mixed batches recompute whole blocks, fastpeft/recompute.py `rows_block`: no plan)
    if recompute and vit and multitask is None:
        from .recompute import probe_reference

        probe = probe_reference(model)
    undo: list[tuple[Rule, Any]] = []
    if vit:
        rules = _all_rules(report)
    else:
        from .fused.conv_adapter import convnet_rules

        rules = convnet_rules()
    for rule in rules:
        for rec in rule.apply(model, info, resolved, recompute, report):
            undo.append((rule, rec))
    if recompute and vit:
        _RECOMPUTE.finish(model, probe, report)
    if undo:
        model.__dict__["_fastpeft_patch"] = _PatchState(resolved, recompute, report, undo)
    return report


def unpatch(model: nn.Module) -> nn.Module:
    """Restore the reference modules (a no-op on an unpatched model). All or nothing, like `patch`."""
    st: _PatchState | None = model.__dict__.get("_fastpeft_patch")
    if st is None:
        return model
    snapshot = _Snapshot(model)
    try:
        del model.__dict__["_fastpeft_patch"]
        for rule, rec in reversed(st.undo):
            rule.undo(model, rec)
    except BaseException:
        snapshot.restore()
        raise
    return model


def patch_report(model: nn.Module) -> PatchReport | None:
    st = model.__dict__.get("_fastpeft_patch")
    return st.report if st is not None else None
