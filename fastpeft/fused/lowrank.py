"""Low-rank methods under `fastpeft.patch`: LoRA (NOAH, PETL-ViT), FacT-TT/TK and KAdaptation add
`delta(x)` to a frozen Linear's output through a reference hook. Fused, the Linear itself computes
`x W^T + b + u B^T` as one op (kernels.lowrank: both GEMMs on the vendor BLAS, the rank-r u from a
Triton kernel when its dropout mask is regenerated from a seed), saving x and the rank-r u only.
KAdaptation with its dropout on H active takes the fold (`_kadapt_folded`) on every backend.

In a mixed multi-task batch (the input is vmapped: fastpeft/block.py `vmapped`) LoRA runs its
per-row form on the Triton backend (`_ROWS`: one launch per op over the whole batch, each image
with its task's factors, fastpeft/ops/_rows.py `rows_call`); FacT, KAdaptation, the CPU backends
and torch.compile keep the reference, which vmap batches.

The Linear is re-classed (`FusedLowRankLinear`, same weight/bias objects) and the reference hook
stays registered but absorbed, so later hooks on the same layer (e.g. SSF after qkv) still run
after it, in their order. Fused only where the low-rank hook is the layer's first hook (so the
order of effects is unchanged) and the frozen weight really is frozen.
"""
from __future__ import annotations

import functools

import torch
from torch import nn

from ..methods.base import OutputHook
from ..methods.fact import _FacTHook, fact_tk_core
from ..methods.kadaptation import _KAdaptHook
from ..methods.lora import NoahLoRAHook, PetlLoRAHook
from ..block import forward_hooked, vmapped
from ..ops._rows import batched, rows_call
from .common import AbsorbedHook, kernel_call, rows_form, swap_hook


@functools.cache
def _ops():
    """fastpeft.ops.lowrank, imported on the first fused call (it imports triton), then a cached lookup."""
    from ..ops import lowrank
    return lowrank


def _layout(hook: OutputHook, key: tuple, make):
    """The op layout a LoRA hook's fused call makes (A, B) with: made by `make()` (the functional's
    own argument checks, then the layout) when `key`, the hook's settings it is made from,
    differs from the last call's; else the one made then."""
    made = hook.__dict__.get("_fused_layout")
    if made is None or made[0] != key:
        made = hook.__dict__["_fused_layout"] = (key, make())
    return made[1]


def _noah(layer, hook: NoahLoRAHook, x):
    ol = _ops()
    a = hook.attn
    lora_a, lora_b = a.LoRA_a.weight, a.LoRA_b.weight
    rank, scale, p = hook.rank, hook.scale, hook.dropout_p
    if torch.compiler.is_compiling():
        return ol.lora_noah_qkv(x, layer.weight, layer.bias, lora_a, lora_b, rank=rank, scale=scale, dropout_p=p,
                                training=a.training)

    def checks():
        return ol.noah_layout(lora_a, lora_b, rank, scale)

    layout = _layout(hook, (rank, scale, lora_a.shape[0]), checks)
    return ol.lowrank_bound(x, layer.weight, layer.bias, layout, (lora_a, lora_b), p, True, a.training, checks)


def _petl_modules(hook: PetlLoRAHook) -> tuple:
    """(the targets' down Linears, their up Linears, the dropout) of a PETL-ViT LoRA hook, in its
    target order: looked up once and kept on the hook (their parameters are read on every call)."""
    mods = hook.__dict__.get("_fused_modules")
    if mods is None:
        lora = [getattr(hook.attn, f"lora_{t}") for t in hook.targets]
        mods = hook.__dict__["_fused_modules"] = (tuple(m.adapter_down for m in lora),
                                                  tuple(m.adapter_up for m in lora), lora[0].dropout)
    return mods


def _petl(layer, hook: PetlLoRAHook, x):
    ol = _ops()
    downs, ups, drop = _petl_modules(hook)
    targets, scale = hook.targets, hook.scale
    params = (*(m.weight for m in downs), *(m.weight for m in ups))

    def by_target():  # (the functional's form of the parameters, built only where it is called)
        return dict(zip(targets, params)), dict(zip(targets, params[len(targets):]))

    if torch.compiler.is_compiling():
        return ol.lora_petl_qkv(x, layer.weight, layer.bias, *by_target(), scale=scale, dropout_p=drop.p,
                                training=drop.training)

    def checks():
        return ol.petl_layout(layer.weight, *by_target(), scale)

    key = (layer.weight.shape[0], targets, dict(scale) if isinstance(scale, dict) else scale)
    return ol.lowrank_bound(x, layer.weight, layer.bias, _layout(hook, key, checks), params, drop.p, False,
                            drop.training, checks)


def _noah_rows(layer, hook: NoahLoRAHook, x):
    """NOAH's LoRA on a mixed multi-task batch: the per-row form (`lora_noah_qkv_rows`) on the
    physical tensors, every image with its task's LoRA_a / LoRA_b."""
    ol = _ops()
    a = hook.attn
    rank, scale, p, training = hook.rank, hook.scale, hook.dropout_p, a.training

    def form(images, x, weight, bias, lora_a, lora_b):
        return ol.lora_noah_qkv_rows(images, x, weight, bias, lora_a, lora_b, rank=rank, scale=scale, dropout_p=p,
                                     training=training)

    return rows_call(form, x, layer.weight, layer.bias, a.LoRA_a.weight, a.LoRA_b.weight)


def _petl_rows(layer, hook: PetlLoRAHook, x):
    """PETL-ViT's LoRA on a mixed multi-task batch: `lora_petl_qkv_rows` on the physical tensors."""
    ol = _ops()
    targets = hook.targets
    mods = [getattr(hook.attn, f"lora_{t}") for t in targets]
    drop = mods[0].dropout
    scale, p, training = hook.scale, drop.p, drop.training
    k = len(targets)

    def form(images, x, weight, bias, *factors):
        return ol.lora_petl_qkv_rows(images, x, weight, bias, dict(zip(targets, factors[:k])),
                                     dict(zip(targets, factors[k:])), scale=scale, dropout_p=p, training=training)

    return rows_call(form, x, layer.weight, layer.bias, *(m.adapter_down.weight for m in mods),
                     *(m.adapter_up.weight for m in mods))


def _fact_modules(hook: _FacTHook) -> tuple:
    """(FacTu, FacTv, the TT core Linears (empty for TK), the dropout) of a FacT hook: the
    submodules it reads, looked up once and kept on the hook (their parameters are read on every
    call, so parameters replaced or unfrozen later are seen)."""
    mods = hook.__dict__.get("_fused_modules")
    if mods is None:
        blk, root = hook.block, hook.root
        owner = blk.mlp if hook.layer in ("fc1", "fc2") else blk.attn
        names = ("q", "k", "v") if hook.layer == "qkv" else (hook.layer,)
        cores = tuple(getattr(owner, f"{n}_FacTs") for n in names) if hook.kind == "tt" else ()
        mods = hook.__dict__["_fused_modules"] = (root.FacTu, root.FacTv, cores, owner.dp)
    return mods


def _fact(layer, hook: _FacTHook, x):
    ol = _ops()
    fact_u, fact_v, core_mods, dp = _fact_modules(hook)
    rebuild = None
    if core_mods:
        core = tuple(m.weight for m in core_mods) if len(core_mods) > 1 else core_mods[0].weight
    else:
        root = hook.root  # only the core this layer reads (qkv's three as one [3r, r])
        core = fact_tk_core(root.FacTc, root.FacTp, hook.i, hook.layer)
        rebuild = (functools.partial(fact_tk_core, i=hook.i, layer=hook.layer), (root.FacTc, root.FacTp))
    return ol.fact_linear(x, layer.weight, layer.bias, fact_u.weight, fact_v.weight, core,
                          layer=hook.layer, scale=hook.scale, dropout_p=dp.p, training=dp.training,
                          rebuild_core=rebuild)


def _kadapt_factors(hook: _KAdaptHook) -> tuple:
    """(rule1, rule2, q_factors, v_factors) as (left, right) pairs: what the ops take."""
    a, r = hook.attn, hook.root
    qf = (a.q_proj_adapter1_left, a.q_proj_adapter1_right)
    vf = qf if hook.v_uses_q else (a.v_proj_adapter1_left, a.v_proj_adapter1_right)
    return (r.phm_rule1_left, r.phm_rule1_right), (r.phm_rule2_left, r.phm_rule2_right), qf, vf


def _kadapt(layer, hook: _KAdaptHook, x):
    a = hook.attn
    return _ops().kadaptation_qkv(x, layer.weight, layer.bias, *_kadapt_factors(hook), a.b, scale=hook.scale,
                                  q_mult=hook.q_mult, dropout_p=a.kdropout.p, training=a.kdropout.training)


def _kadapt_folded(layer, hook: _KAdaptHook, x):
    """The CPU backends' KAdaptation (and every backend's while its dropout on H draws): the
    reference's dense H_q, H_v (the same kron sums and torch dropout draws in the same order, so
    the same values and masks as the eager model: `kadaptation_h`, one node that keeps neither
    the rule products nor, under recompute, more than the masks' bits) folded into the frozen qkv
    weight, one [D, 3D] GEMM instead of the qkv GEMM plus two [D, D] ones, in forward and in the
    input-gradient backward (`qv_folded_linear`: saves x and the two H, as the reference)."""
    from ..ops.lowrank import kadaptation_h, qv_folded_linear

    a, drop = hook.attn, hook.attn.kdropout
    if torch.compiler.is_compiling() or type(drop) is not nn.Dropout or forward_hooked((drop,)):
        # (traced: the reference's ops, which the compiler sees through; a dropout that is not
        # plain F.dropout or that a hook watches: the module itself)
        h_q, h_v = drop(hook.h("q")), drop(hook.h("v"))
    else:  # (the same values and draws, without the reference's [D, D] masks and rule products kept)
        h_q, h_v = kadaptation_h(*_kadapt_factors(hook), dropout_p=drop.p, training=drop.training,
                                 compact=layer._fastpeft_recompute)
    # q += (x H_q s + b) q_mult, v += x H_v s + b
    b, d = a.b, a.b.shape[0]
    if layer.bias is None:
        bias = torch.cat([b * hook.q_mult, b.new_zeros(b.shape), b])
    else:
        bias = torch.cat([torch.add(layer.bias[:d], b, alpha=hook.q_mult), layer.bias[d:2 * d], layer.bias[2 * d:] + b])
    return qv_folded_linear(x, layer.weight, bias.to(x.dtype), h_q, h_v, hook.scale * hook.q_mult, hook.scale)


def _kadapt_drops(hook: _KAdaptHook) -> bool:
    """Whether KAdaptation's dropout on H is active: then every backend takes `_kadapt_folded` (the
    official semantics drop entries of the dense D x D H, so there is no rank-R form to fuse; the
    fold runs the reference's own dropout draws and one frozen-weight GEMM on the vendor BLAS)."""
    d = hook.attn.kdropout
    return d.training and d.p > 0.0


_FUSED = {NoahLoRAHook: _noah, PetlLoRAHook: _petl, _FacTHook: _fact, _KAdaptHook: _kadapt}
#: per-row forms for a mixed multi-task batch (Triton backend, eager): LoRA only. FacT and
#: KAdaptation keep the reference there (vmap batches it), as do the CPU backends.
_ROWS = {NoahLoRAHook: _noah_rows, PetlLoRAHook: _petl_rows}
#: what the CPU backends fuse: only where the torch math beats the eager chain
_CPU_FUSED = {_KAdaptHook: _kadapt_folded}
_WHAT = {NoahLoRAHook: "LoRA (NOAH)", PetlLoRAHook: "LoRA (PETL-ViT)", _FacTHook: "FacT", _KAdaptHook: "KAdaptation"}


#: On the CPU backends the fused op is torch math, which is slower than the eager reference (most
#: of all with NOAH's input dropout, whose Philox mask the torch path regenerates over [M, D]) and
#: saves no fewer bytes except NOAH's (its [M, D] dropout mask): the reference is kept there.
#: KAdaptation is the exception (`_kadapt_folded`: one GEMM on the folded weight beats the
#: reference's three). `pytest bench -k ops` (bench/test_ops.py) measures both sides.
CPU_REASON = "CPU path: the eager reference is faster and saves (nearly) as little (fused on the Triton backend)"


class FusedLowRankLinear(nn.Linear):
    """A frozen nn.Linear computing its output and a method's low-rank delta in one op.
    `_fastpeft_hook` is the (absorbed) reference hook whose parameters it reads;
    `_fastpeft_recompute`: patched with recompute=True (what the op keeps is then held tighter)."""

    _fastpeft_hook: OutputHook
    _fastpeft_backend: str
    _fastpeft_recompute: bool

    @property
    def class_row_local(self) -> bool:
        # Triton: row-local, seeded dropout (fused/common.py); else (and KAdaptation, whose
        # dropout on H is the reference's own torch dropout on every backend) the hook's math
        return (self._fastpeft_backend not in ("torch", "cpp") and type(self._fastpeft_hook) is not _KAdaptHook) \
            or self._fastpeft_hook.class_row_local

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hook = self._fastpeft_hook
        if vmapped(x):
            # a mixed multi-task batch (every factor is the row's task's: fastpeft/block.py
            # vmapped): LoRA's per-row form on the Triton backend in eager mode (the bias may be
            # the rows' own, the weight must be the frozen shared one); else the reference
            rows = _ROWS.get(type(hook))
            if (rows is not None and rows_form(self._fastpeft_backend) and not batched(self.weight)
                    and not (self.weight.requires_grad and torch.is_grad_enabled())):
                return kernel_call(self._fastpeft_backend, x.device.type, rows, self, hook, x)
            return hook.apply(x, nn.functional.linear(x, self.weight, self.bias))
        if torch.is_grad_enabled() and (self.weight.requires_grad or (self.bias is not None and self.bias.requires_grad)):
            # the user unfroze the projection after `patch` (the fused ops give the frozen weight
            # no gradient): the reference, i.e. the Linear, then the absorbed hook's delta, first
            # among the layer's hooks as the rule required
            return hook.apply(x, nn.functional.linear(x, self.weight, self.bias))
        if self._fastpeft_backend in ("torch", "cpp") or (type(hook) is _KAdaptHook and _kadapt_drops(hook)):
            return _CPU_FUSED[type(hook)](self, hook, x)
        fn = _FUSED[type(hook)]
        return kernel_call(self._fastpeft_backend, x.device.type, fn, self, hook, x)


class LowRankRule:
    name = "lowrank"

    def apply(self, model, info, backend, recompute, report):
        records = []
        for path, layer in model.named_modules():
            hooks = list(layer._forward_hooks.values())
            lowrank = [h for h in hooks if type(h) in _FUSED]
            if not lowrank:
                continue
            hook = lowrank[0]
            what = _WHAT[type(hook)]
            if type(layer) is not nn.Linear:
                report.left_alone.append((f"{path} {what}", f"{type(layer).__name__} is not a plain nn.Linear"))
            elif layer.weight.requires_grad:
                report.left_alone.append((f"{path} {what}", "the projection weight is trainable (the fused op freezes it)"))
            elif backend in ("torch", "cpp") and type(hook) not in _CPU_FUSED:
                report.left_alone.append((f"{path} {what}", CPU_REASON))
            elif hooks[0] is not hook or len(lowrank) > 1:
                report.left_alone.append((f"{path} {what}", "another hook acts first on this layer; order kept by the reference"))
            else:
                swap_hook(layer, hook, AbsorbedHook(hook, by="FusedLowRankLinear"))
                layer.__class__ = FusedLowRankLinear
                layer._fastpeft_hook, layer._fastpeft_backend = hook, backend
                layer._fastpeft_recompute = recompute
                records.append(path)
        if records:
            kinds = sorted({_WHAT[type(model.get_submodule(p)._fastpeft_hook)] for p in records})
            how = ("frozen GEMM + low-rank delta in one op" if backend not in ("torch", "cpp")
                   else "delta folded into the frozen weight: one GEMM")
            report.patched.append((f"{len(records)} projections", f"{how} ({', '.join(kinds)})", backend))
        return records

    def undo(self, model, path):
        layer = model.get_submodule(path)
        hook = layer._fastpeft_hook
        for fn in list(layer._forward_hooks.values()):
            if isinstance(fn, AbsorbedHook) and fn.original is hook:
                swap_hook(layer, fn, hook)
        layer.__class__ = nn.Linear
        del layer._fastpeft_hook, layer._fastpeft_backend, layer._fastpeft_recompute
