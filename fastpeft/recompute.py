"""Selective recomputation for `fastpeft.patch(model, recompute=True)`.

Two forms, chosen per block half at `patch` time (`plan_keeps`, measured on probe images):

* lean halves (`LeanRun`, wherever they fit the byte budget): the block runs in the reference
  order, but its attention (`_LeanAttention`) keeps none of q / k / v or its output and its MLP
  activation (`_LeanActivation`) not its input. Backward recomputes those values alone: the qkv
  output (norm1 and qkv, hooks included, without a graph: one GEMM) and the attention,
  or the fc1 output (norm2 and fc1: one GEMM); where the op that made the value keeps what
  makes it (`ops._autograd.remaker`: the fused LoRA / FacT ops keep x and u, SSF's scale-shift
  its input), the value is remade from that instead, without the norm and the layer's modules.
  No other op of the block is re-run and no checkpoint machinery runs, so the recompute costs
  little more host time than its two GEMMs. What the method hooks save is saved as in the
  default patch, which is why some halves do not fit;
* checkpointed regions (`_Regions`, below): where a half cannot run lean or its hooks save too
  much, and under torch.compile, which traces the regions.

The rest of this docstring is about the regions.

Where a frozen ViT's training memory goes (performance guide, AdaptFormer on ViT-B/16): per block,
SDPA's saved q/k/v/out (~38%), the GELU input [B, N, 4D] (~38%) and LayerNorm inputs. With a
frozen backbone, the Linear layers save nothing for their (frozen) weights, so everything else
autograd keeps is cheap to rebuild from the block input.

Each block runs its frozen paths (norm1 -> attention, norm2 -> MLP, with every method hook and
slot inside them) as checkpointed regions (under torch's selective-activation-checkpoint policy
where a region keeps something, plain checkpointing elsewhere):

* kept: each region's input (x and y: 2 x [B, N, D]), and the output of a D-wide frozen Linear
  (attn.proj, mlp.fc2) whose hook needs it for its own backward anyway (SSF's scale): keeping it
  costs nothing the eager model does not keep, and saves re-running that GEMM;
* serial adapters on the FFN output (ffn_out) run after the MLP region and save its output (the
  fc2 output) for their own backward, as in the reference, so fc2 is never re-run to reach them;
* recomputed in backward: LayerNorms, q/k/v (one [D, 3D] GEMM from the saved input), the
  attention forward, the fc1 GEMM (not its GELU, whose output nothing in backward reads), every
  method's cheap intermediates (adapters, scale-shifts, low-rank products); dropout and DropPath
  masks are regenerated from the saved RNG state.
* Convpass-style branches that read a LayerNorm output run before the frozen path inside its region
  when that path draws no random numbers (`_branches_first`), so its recompute ends at SDPA / the
  GELU input instead of re-running proj / fc2 to reach them;
* planned (`plan_keeps`): with the bytes the 0.4x budget leaves, GEMM outputs (fc2 where it is
  re-run, then qkv / fc1) and attention outputs (out + log-sum-exp, [B, N, D]: the attention
  forward is not re-run), by compute saved per byte kept; a half without method hooks or random
  draws that keeps all its backward needs ({qkv, attention}; {fc1}) runs outside checkpointing
  (`_runs_plain`), as the reference runs it.

A region's recompute stops at the last saved tensor it must rebuild (torch's early stop), so the
GEMMs after it (proj, fc2) are not re-run; branches that read the residual stream rather than a
LayerNorm output (AdaptFormer's parallel adapter) are therefore checkpointed on their own instead
of after the MLP inside its region (they keep only the residual stream, which the MLP region
keeps anyway).

That is ~2 [B, N, D] tensors per block instead of ~10 (AdaptFormer) to ~21 (SSF), for the cost
of re-running the qkv and fc1 GEMMs (7 of the 24 D^2-per-token GEMM FLOPs of a frozen block's
forward + input-gradient backward) and the attention forward, less what the plan keeps, versus
timm's `set_grad_checkpointing()`, which keeps only x but re-runs the whole block.
"""
from __future__ import annotations

import functools
import inspect
from contextlib import nullcontext
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from .block import (BRANCHES_FIRST, PATCHED, PatchedRun, forward_hooked, plain_layer_norm, split_heads, through,
                    timm_mlp, timm_sdpa_attention, vmapped)
from .ops._autograd import once_differentiable, remake, remaker
from .methods.base import OutputHook, active_hooks

# Newer torch can route what selective checkpointing keeps through saved_tensors_hooks (opt-in,
# `respect_saved_tensors_hooks`); older torch (2.11) keeps it out of the hooks' sight, so
# saved-tensor byte counts (fastpeft.profile) miss the kept GEMM outputs there, while device
# memory counters (torch.cuda.memory_allocated) still see them.
SAC_SEEN_BY_HOOKS = "respect_saved_tensors_hooks" in inspect.signature(checkpoint).parameters
SAC_HOOK_OPTS = {"respect_saved_tensors_hooks": True} if SAC_SEEN_BY_HOOKS else {}

aten = torch.ops.aten

#: the attention kernels: their outputs (exactly what their backward needs) are kept where the
#: plan keeps "attn", else the attention forward is re-run in backward.
ATTENTION_OPS = frozenset(
    op
    for op in (
        getattr(aten, name, None)
        for name in (
            "_scaled_dot_product_flash_attention_for_cpu",
            "_scaled_dot_product_flash_attention",
            "_scaled_dot_product_efficient_attention",
            "_scaled_dot_product_cudnn_attention",
        )
    )
    if op is not None
)


_GEMMS = frozenset({aten.addmm.default, aten.mm.default})


def _policy(keep_ptrs: frozenset[int], keep_attention: bool, ctx, op, *args, **kwargs):
    # (an op none of whose inputs needs a gradient has nothing to keep for backward: e.g. the first
    # block's frozen path, whose input needs none; its output would otherwise be held to no use)
    if not any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
        return CheckpointPolicy.PREFER_RECOMPUTE
    if keep_attention and (op in ATTENTION_OPS or getattr(op, "overloadpacket", None) in ATTENTION_OPS):
        return CheckpointPolicy.MUST_SAVE
    # a kept Linear: its GEMM's second operand is a view of the kept weight (same data pointer)
    if keep_ptrs and op in _GEMMS:
        try:
            ptr = args[-1].data_ptr()
        except RuntimeError:  # tensors without storage (tracing under torch.compile): recompute
            return CheckpointPolicy.PREFER_RECOMPUTE
        if ptr in keep_ptrs:
            return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _kept_weights(block) -> tuple[frozenset[int], frozenset[int]]:
    """Data pointers of the frozen Linears whose outputs the policy keeps, in the attention path
    (qkv, proj) and in the MLP (fc1, fc2): D-wide ones whose hook saves the output anyway, and
    those the byte-budget plan picked for this block."""
    attn, mlp = set(), set()
    for layer, into in ((getattr(block.attn, "proj", None), attn), (getattr(block.mlp, "fc2", None), mlp)):
        if isinstance(layer, nn.Linear) and not layer.weight.requires_grad and any(
            h.saves_output for h in active_hooks(layer)
        ):
            into.add(layer.weight.data_ptr())
    for name in block.__dict__.get("_fastpeft_keep", ()):
        if name in _PLANNED:
            (attn if name in ("qkv", "proj") else mlp).add(_PLANNED[name](block).weight.data_ptr())
    return frozenset(attn), frozenset(mlp)


#: frozen GEMM outputs `plan_keeps` may keep on top of the minimal set, by name
_PLANNED = {
    "qkv": lambda blk: blk.attn.qkv,
    "proj": lambda blk: blk.attn.proj,
    "fc1": lambda blk: blk.mlp.fc1,
    "fc2": lambda blk: blk.mlp.fc2,
}


class DeltaFirstLinear(nn.Linear):
    """A frozen proj / fc2 under `patch(recompute=True)` whose hooks are all additive
    (`OutputHook.additive`, e.g. FacT): computes the hooks' deltas from the input first, then the
    frozen GEMM, then adds them in the hooks' order (the same sums as the hooks, so the same
    values). A region's recompute then reaches the deltas' saved tensors without re-running the
    GEMM, which nothing in backward needs. `_fastpeft_hooks`: the absorbed hooks, in order."""

    _fastpeft_hooks: tuple

    @property
    def class_row_local(self) -> bool:  # (fastpeft/class_row.py) the GEMM is; the hooks say for themselves
        return all(h.class_row_local for h in self._fastpeft_hooks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        deltas = [h.delta(x) for h in self._fastpeft_hooks]
        out = nn.functional.linear(x, self.weight, self.bias)
        for d in deltas:
            out = out + d
        return out


def delta_first_hooks(layer: nn.Module) -> list | None:
    """The hooks `DeltaFirstLinear` would absorb from `layer`, or None where it does not apply: a
    plain frozen nn.Linear with at least one forward hook, all of them additive fastpeft hooks."""
    if type(layer) is not nn.Linear or layer.weight.requires_grad or layer._forward_pre_hooks:
        return None
    hooks = list(layer._forward_hooks.values())
    if not hooks or not all(getattr(h, "additive", False) and not h.saves_output for h in hooks):
        return None
    return hooks


def _reruns(block, name: str) -> bool:
    """Whether the minimal plan's recompute re-runs this GEMM: always qkv and fc1 (their outputs
    feed saved tensors); proj / fc2 only when something after them in the region saves a tensor
    (a hook on the layer, an MLP-output slot, a branch inside the region), unless already kept."""
    if name in ("qkv", "fc1"):
        return True
    slots = block._fastpeft_slots
    layer = _PLANNED[name](block)
    # (a DeltaFirstLinear's absorbed hooks run before its GEMM: they need no re-run of it)
    hooks = [] if isinstance(layer, DeltaFirstLinear) else active_hooks(layer)
    if any(h.saves_output for h in hooks):
        return False  # kept by the minimal plan (_kept_weights)
    if name == "proj":
        return bool(hooks) or (_norm_read(block, "attn") and not _branches_first(block, "attn"))
    return bool(hooks or slots["mlp_out"]) or (_norm_read(block, "mlp") and not _branches_first(block, "mlp"))


def _norm_read(block, half: str) -> bool:
    """Whether a branch of the half ("attn" / "mlp") reads its LayerNorm's output (`reads_norm`)."""
    return any(fn.reads_norm for fn in block._fastpeft_slots["attn_branch" if half == "attn" else "ffn_branch"])


def _draws_rng(mod: nn.Module) -> bool:
    """Whether running `mod` may draw random numbers, conservatively: a Dropout or DropPath with
    a non-zero rate anywhere inside, or any forward hook (a method's, which may have dropout)
    but those that say they draw nothing (`OutputHook.draws`: SSF's)."""
    for m in mod.modules():
        if m._forward_pre_hooks or any(getattr(h, "draws", True) for h in m._forward_hooks.values()):
            return True
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
            return True
        if getattr(m, "drop_prob", 0) > 0:  # timm DropPath
            return True
    return False


def _hooked_or_draws(mod: nn.Module) -> bool:
    """Whether any module inside `mod` has a forward hook or pre-hook (whether or not it draws),
    or `mod` may draw random numbers (`_draws_rng`)."""
    return any(m._forward_hooks or m._forward_pre_hooks for m in mod.modules()) or _draws_rng(mod)


def _core_draws(block, half: str) -> bool:
    """Whether the frozen-path region of a half (`_attn_core`: norm1 -> attn; `_mlp_core`: norm2 ->
    mlp -> mlp_out slots) may draw random numbers, conservatively: `_draws_rng` of its modules (any
    hook counts: the fused modules keep the absorbed reference hook), a module whose instance
    `forward` was replaced, or any mlp_out slot (a method's function, which may have dropout)."""
    mods = (block.norm1, block.attn) if half == "attn" else (block.norm2, block.mlp)
    if half == "mlp" and block._fastpeft_slots["mlp_out"]:
        return True
    return any(_draws_rng(m) or any("forward" in sub.__dict__ for sub in m.modules()) for m in mods)


def _branches_first(block, half: str) -> bool:
    """Whether a half's branches that read the LayerNorm output (Convpass) may run before its frozen
    path (attention or MLP) in the checkpointed region: the recompute then stops at the frozen
    path's last saved tensor (SDPA's, or the GELU input) and never re-runs proj / fc2 to reach
    the branches'. The sum keeps the reference's order; the values are the same because the frozen
    path draws no random numbers (else the branches' dropout would draw different ones) and has
    no method hooks or slots after it inside the region."""
    if half == "attn":
        return not any(_hooked_or_draws(m) for m in (block.attn, block.ls1, block.drop_path1))
    slots = block._fastpeft_slots
    return not (slots["mlp_out"] or slots["ffn_out"]) and not any(
        _hooked_or_draws(m) for m in (block.mlp, block.ls2, block.drop_path2)
    )

#: `patch(recompute=True)` keeps at most this fraction of the reference's saved activation bytes:
#: the 0.4x target less a margin (the plan is measured on batch-1, -2 and -4 probes and
#: extrapolated per image; tests/patch/test_recompute.py checks where it lands)
BYTE_BUDGET = 0.39


@dataclass
class Probe:
    """Random images (batch 1, 2 and 4), and the saved activation bytes of the reference's forward
    on each: half the batch-2-to-4 difference is the per-image part (batch 1 is no guide to it:
    some tensors are views at batch 1 and copies above), the batch-1 total bounds small batches."""

    images: tuple[torch.Tensor, torch.Tensor]
    reference: tuple[int, int]


def _saved_per_batch(model: nn.Module, images) -> tuple[int, int]:
    from .profile import saved_activation_bytes

    with torch.random.fork_rng(devices=_rng_devices(model)), torch.enable_grad():
        return tuple(saved_activation_bytes(lambda: model(im), exclude=[model]) for im in images)


def probe_reference(model: nn.Module) -> Probe | None:
    """Measure the reference (still unpatched) model for `plan_keeps`: the saved activation bytes
    (fastpeft.profile) of its forward on one and on two random images. None if the model has no
    image-sized patch embedding to probe with."""
    pe = getattr(model, "patch_embed", None)
    size, proj = getattr(pe, "img_size", None), getattr(pe, "proj", None)
    if size is None or not isinstance(proj, nn.Conv2d):
        return None
    p = next(model.parameters())
    example = getattr(model.__dict__.get("forward"), "example_input", None)
    if example is not None:  # a method's own forward that takes other inputs (ST-Adapter: clips of frames)
        images = tuple(example(b) for b in (1, 2, 4))
    else:
        images = tuple(torch.randn(b, proj.in_channels, *size, device=p.device, dtype=p.dtype) for b in (1, 2, 4))
    return Probe(images, _saved_per_batch(model, images))


def plan_keeps(model: nn.Module, probe: Probe, budget: float = BYTE_BUDGET) -> dict[int, frozenset[str]]:
    """Spend the byte budget the minimal plan leaves on not recomputing GEMMs and attention.

    The minimal plan keeps ~2 [B, N, D] tensors per block; the reference keeps ~10 (AdaptFormer)
    to ~21 (SSF) and 0.4x of that is the target, so most methods have room left. A block may
    also keep its fc1 output (4D wide: no fc1 GEMM in backward) and/or its qkv output (3D: no qkv
    GEMM), its proj / fc2 outputs where the minimal recompute re-runs those (`_reruns`: e.g.
    FacT's hooks on them), and its attention outputs ([B, N, D] + the log-sum-exp: no attention
    forward in backward), leaving its recompute nothing but LayerNorms and activations. The
    options are taken greedily by compute saved per byte kept (the attention's FLOPs weighted by
    `ATTENTION_COST`; a plain half kept whole, {qkv, attn} or {fc1}, earns `PLAIN_HALF_BONUS`:
    it then runs outside checkpointing). Bytes are measured, not modelled:
    the patched model's saved bytes on the probe images (minimal plan) against the reference's
    (`probe_reference`, taken before patching), at batch 1 and per image (half the batch-2-to-4
    difference; saved tensors
    that do not grow with the batch, e.g. weight-sized deltas, must not buy room that large
    batches lack); an option costs exactly its GEMM output per image. Options are taken while
    both totals stay within `budget` x the reference's. Returns
    {block index: kept names} for the blocks that keep anything.

    Lean halves (`plan_lean`) are planned first. They keep what the method hooks inside them
    save (e.g. FacT's fc2 delta its GELU input, LoRA's its dropped input): where that is over the
    budget, the MLP halves, then the attention halves too, run as checkpointed regions instead.
    Where it fits but leaves so little room that the regions, which recompute those tensors
    too, would leave less to recompute (GEMM and attention FLOPs, after each plan's keeps) by more
    than `LEAN_MARGIN` of it and more than the regions' extra host work (`REGION_HOST_FLOPS` per
    half, on one image: a larger batch only favours the regions more), the regions run instead.
    """
    if not plan_lean(model):
        return _greedy_keeps(model, probe, budget)[0]
    for drop in ("mlp", "attn"):
        if _within(_saved_per_batch(model, probe.images), probe.reference, budget):
            break
        for blk in model.blocks:
            lean = blk.__dict__.get("_fastpeft_lean")
            if lean is not None:
                lean.pop(drop, None)
                if not lean:
                    del blk._fastpeft_lean
    marks = {i: blk.__dict__.pop("_fastpeft_lean") for i, blk in enumerate(model.blocks)
             if "_fastpeft_lean" in blk.__dict__}
    if not marks:
        return _greedy_keeps(model, probe, budget)[0]
    regions, saved_r, extra_r, total = _greedy_keeps(model, probe, budget)
    for i, lean in marks.items():
        model.blocks[i]._fastpeft_lean = lean
    plan, saved_l, _, total_l = _greedy_keeps(model, probe, budget)
    host = REGION_HOST_FLOPS.get(next(model.parameters()).device.type, 0.0) * sum(map(len, marks.values()))
    # (FLOPs per image: what the regions' keeps save beyond the lean plan's, less the proj / fc2
    # GEMMs the regions' minimal recompute re-runs where lean halves do not)
    if saved_r - extra_r - saved_l > max(LEAN_MARGIN * max(total, total_l), host):
        for i in marks:
            del model.blocks[i]._fastpeft_lean
        return regions
    return plan


#: `plan_keeps` runs checkpointed regions instead of lean halves where the regions' keeps save
#: more than this fraction of the recompute's FLOPs beyond the lean halves' keeps
LEAN_MARGIN = 0.1
#: a checkpointed region's host work beyond a lean half's, counted in the FLOPs the device does in
#: that time: the host time per half is what the host bench (bench/host.py) shows between the
#: regions and lean halves (bench/results/NOTES.md, session 26), times a CPU core's GEMM rate or
#: a GPU's at ViT-B widths (no GPU run has measured the CUDA figure yet)
REGION_HOST_FLOPS = {"cpu": 2e7, "cuda": 2e10}


def _greedy_keeps(model: nn.Module, probe: Probe, budget: float) -> tuple[dict[int, frozenset[str]], float, float, float]:
    """`plan_keeps`' greedy choice for the blocks' current runs (lean halves where marked), with
    FLOPs per image: what its keeps save from the recompute, the proj / fc2 GEMMs its minimal
    recompute re-runs (regions only: `_reruns`; keeping them only saves that work back), and all
    the options' (GEMM and attention work the recompute would otherwise run; combined options not
    counted twice)."""
    shapes: dict[tuple[int, str], torch.Size] = {}
    layers: dict[tuple[int, str], nn.Module] = {}
    for i, blk in enumerate(model.blocks):
        lean = blk.__dict__.get("_fastpeft_lean", {})
        if lean:  # (a lean half may be kept whole: its attention / GELU input, measured per block)
            layers[i, "block"] = blk
        if blk.__dict__.get("_fastpeft_run") is RECOMPUTE:
            for n, get in _PLANNED.items():
                if ("attn" if n in ("qkv", "proj") else "mlp") in lean:
                    continue
                mod = _get(blk, get)
                # (only layers whose GEMM runs on their own weight, which `_policy` can recognise:
                # not the fused ones, whose GEMM is a custom op or runs on a folded weight)
                if type(mod) in (nn.Linear, DeltaFirstLinear) and not mod.weight.requires_grad and _reruns(blk, n):
                    layers[i, n] = mod
            if getattr(blk.attn, "fused_attn", False) and "attn" not in lean:  # (timm's explicit-softmax path: no kernel to keep)
                layers[i, "attn"] = blk.attn

    handles = [mod.register_forward_pre_hook(_ShapeRecorder(shapes, key)) for key, mod in layers.items()]
    try:
        kept = _saved_per_batch(model, probe.images)
    finally:
        for h in handles:
            h.remove()
    options = {key: _option(layers[key], shapes[key]) for key in layers if key in shapes and key[1] != "block"}
    for (i, n), shape in shapes.items():
        if n == "block":
            options.update(_lean_options(model.blocks[i], i, shape))
    # (FLOPs per image saved by each option, before the bonus below; the lean "attn" is part of
    # "qkv+attn", the rest are disjoint)
    flops = {key: b * v for key, (b, v) in options.items()}
    total = sum(f for (i, n), f in flops.items() if not (n == "attn" and (i, "qkv+attn") in flops))
    for i, blk in enumerate(model.blocks):
        # a plain half whose backward needs nothing more runs outside checkpointing (`_runs_plain`):
        # no recompute at all, not even its LayerNorm, and no checkpoint machinery
        if (i, "qkv") in options and (i, "attn") in options and _plain_half(blk, "attn"):
            (b1, v1), (b2, v2) = options[i, "qkv"], options[i, "attn"]
            options[i, "qkv+attn"] = b1 + b2, (b1 * v1 + b2 * v2) / (b1 + b2) * (1 + PLAIN_HALF_BONUS)
            flops[i, "qkv+attn"] = b1 * v1 + b2 * v2
        if (i, "fc1") in options and _plain_half(blk, "mlp"):
            b1, v1 = options[i, "fc1"]
            options[i, "fc1"] = b1, v1 * (1 + PLAIN_HALF_BONUS)
    room = _room(kept, probe.reference, budget)
    # greedy by compute saved per byte kept (fc2 first, then whole plain halves, attention, qkv /
    # fc1), later blocks first; an option overlapping what its block already keeps is skipped
    plan: dict[int, set[str]] = {}
    saved = 0.0
    for i, n in sorted(options, key=lambda key: (-options[key][1], -key[0])):
        names = set(n.split("+"))
        if options[i, n][0] <= room and not names & plan.get(i, set()):
            plan.setdefault(i, set()).update(names)
            room -= options[i, n][0]
            saved += flops[i, n]
    extra = sum(f for (i, n), f in flops.items() if n in ("proj", "fc2"))
    return {i: frozenset(keep) for i, keep in plan.items()}, saved, extra, total


def _room(kept: tuple, ref: tuple, budget: float) -> float:
    """Bytes per image the plan may still keep: within `budget` x the reference's saved bytes at
    batch 1 and per image (half the batch-2-to-4 difference), whichever is tighter."""
    return min(budget * ref[0] - kept[0], (budget * (ref[2] - ref[1]) - (kept[2] - kept[1])) / 2)


def _within(kept: tuple, ref: tuple, budget: float) -> bool:
    return _room(kept, ref, budget) >= 0


def plan_lean(model: nn.Module) -> bool:
    """Mark the halves that recompute lean (`LeanRun`) on every recomputed block, with whether
    the ops their backward re-runs may draw random numbers (then the RNG state is replayed):
    `_fastpeft_lean` = {half: draws}. Returns whether any block has a lean half."""
    any_lean = False
    for blk in model.blocks:
        if blk.__dict__.get("_fastpeft_run") is not RECOMPUTE:
            continue
        lean = {}
        if _lean_attention(blk):
            lean["attn"] = _draws_rng(blk.norm1) or _draws_rng(blk.attn.qkv) or blk.attn.attn_drop.p > 0
        if _lean_mlp(blk):
            lean["mlp"] = _draws_rng(blk.norm2) or _draws_rng(blk.mlp.fc1) or _draws_rng(blk.mlp.act)
        if lean:
            blk._fastpeft_lean = lean
            any_lean = True
    return any_lean


def _lean_options(blk: nn.Module, i: int, shape: torch.Size) -> dict:
    """`plan_keeps`' options for a block's lean halves, given the block input's shape on the
    batch-4 probe: keep the attention half whole ({qkv, attn}: q / k / v, the output and its
    log-sum-exp) or the MLP half ({fc1}: the GELU input), i.e. run it as the reference does.
    (bytes per image, compute saved per byte), as `_option` counts them."""
    lean, out = blk.__dict__["_fastpeft_lean"], {}
    seqs, n, d = max(1, shape[0] // 4), shape[1], shape[2]
    size = next(blk.parameters()).element_size()
    if "attn" in lean:
        attn = blk.attn
        width = attn.num_heads * attn.head_dim
        gemm = seqs * n * 3 * width * size
        att = seqs * n * (width * size + attn.num_heads * 4)
        flops = 2 * d * seqs * n * 3 * width + ATTENTION_COST * 4 * n * n * width * seqs
        out[i, "qkv+attn"] = gemm + att, flops / (gemm + att)
        if blk.attn.attn_drop.p == 0 and next(blk.parameters()).device.type == "cpu":
            # (the output and its log-sum-exp alone: no attention forward in backward, where the
            # lean attention calls CPU's flash pair itself)
            out[i, "attn"] = att, ATTENTION_COST * 4 * n * n * width * seqs / att
    if "mlp" in lean:
        hidden = blk.mlp.fc2.in_features
        b = seqs * n * hidden * size
        out[i, "fc1"] = b, 2 * d * seqs * n * hidden / b
    return out


class _ShapeRecorder:
    """`plan_keeps`' forward pre-hook: records a layer's input shape (the last probe: batch 4).
    Draws nothing, so `_predraw_hook` may ignore it (the probe must see the real recompute)."""

    def __init__(self, shapes: dict, key):
        self.shapes, self.key = shapes, key

    def __call__(self, mod, args):
        self.shapes[self.key] = args[0].shape


#: the attention forward's FLOPs count this many times a GEMM's in `plan_keeps`: the CPU flash
#: kernel runs at about half the GEMMs' FLOP rate (`torch.profiler` on a ViT-B/16 recompute step
#: shows it: compare the SDPA and addmm rows)
ATTENTION_COST = 2.0
#: a half the plan keeps whole (`_runs_plain`) saves this fraction more than its FLOPs: the
#: LayerNorm and the checkpoint machinery are not run again either (a small fraction of the
#: half's GEMM time)
PLAIN_HALF_BONUS = 0.1


def _option(mod: nn.Module, shape: torch.Size) -> tuple[int, float]:
    """(bytes kept per image, compute saved per byte kept) of keeping `mod`'s output, given its
    input shape on the batch-4 probe. A Linear: its [N, out] output, 2 * in_features FLOPs per
    element; attention: out [N, H * d] + the fp32 log-sum-exp [H, N], 4 * N FLOPs per element
    of out (QK^T and PV), counted `ATTENTION_COST` times."""
    if isinstance(mod, nn.Linear):
        per_image = shape.numel() // shape[-1] // 4
        return per_image * mod.out_features * mod.weight.element_size(), 2 * mod.in_features / mod.weight.element_size()
    n, heads = shape[1], mod.num_heads
    seqs = max(1, shape[0] // 4)  # token sequences per probe input: 1 per image, T per clip of T frames
    per_image = seqs * n * (heads * mod.head_dim * mod.qkv.weight.element_size() + heads * 4)
    return per_image, ATTENTION_COST * 4 * n * n * heads * mod.head_dim * seqs / per_image


def _get(blk: nn.Module, get):
    try:
        return get(blk)
    except AttributeError:
        return None


def _rng_devices(model: nn.Module) -> list:
    return sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})


def _predraw_hook(block):
    """The qkv hook whose input dropout `_predraw` may draw before the attention region, or None:
    one that says so (`OutputHook.predrawable_dropout`), the first hook on a plain frozen qkv
    without pre-hooks, after a LayerNorm that draws nothing (block_in slots run before the region),
    so that its draw is the region's first."""
    qkv = block._modules["attn"]._modules.get("qkv")
    if type(qkv) is not nn.Linear or not qkv._forward_hooks:  # (the common cases, checked first)
        return None
    if any(not isinstance(h, _ShapeRecorder) for h in qkv._forward_pre_hooks.values()):
        return None
    hook = next(iter(qkv._forward_hooks.values()))
    if not isinstance(hook, OutputHook) or not hook.predrawable_dropout():
        return None
    return None if _draws_rng(block.norm1) else hook


def _predraw(block, x: torch.Tensor) -> tuple:
    """Draw the LoRA input-dropout mask of the attention region before the region starts, exactly
    as F.dropout draws it (CPU: bernoulli_ on an empty tensor shaped like its input, which is
    norm1(x), shaped like x), and return it as a bool tensor (1 byte per entry) for the region to
    take as an input: the region keeps it like its other inputs, and backward's recompute reuses it
    instead of drawing a new [B, N, D] mask (CPU bernoulli_ is slow next to the GEMMs). The
    region's later draws are unchanged: they follow this one, as in the reference. Only where
    F.dropout draws with bernoulli_ (CPU: fused kernels elsewhere) and not under torch.compile."""
    hook = _predraw_hook(block)
    if hook is None or x.device.type != "cpu" or torch.compiler.is_compiling():
        return ()
    # F.dropout fills a tensor laid out like its input, norm1(x), in memory order: a LayerNorm's
    # output is contiguous whatever x's strides (x is the patch embedding's transposed view in the
    # first block of a model without a class token), an Identity's is x itself. Other norms: no
    # predraw unless x is contiguous (then their output's layout is the same).
    if x.is_contiguous() or isinstance(block.norm1, nn.LayerNorm):
        like = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    elif isinstance(block.norm1, nn.Identity):
        like = torch.empty_like(x)
    else:
        return ()
    return (like.bernoulli_(1.0 - hook.predrawable_dropout()).bool(),)


def _with_predrawn(block, predrawn: tuple, fn, *args):
    """`fn(*args)` with `_predraw`'s mask (if any) handed to the qkv hook for this call."""
    if not predrawn:
        return fn(*args)
    hook = _predraw_hook(block)
    hook.predrawn_mask = predrawn[0]
    try:
        return fn(*args)
    finally:
        hook.__dict__.pop("predrawn_mask", None)


def _attn_core(block, x: torch.Tensor, kw: dict, *predrawn: torch.Tensor):
    """The frozen attention path: x -> attn(norm1(x)). The block_in slots (prompts) run before it
    and LayerScale and DropPath after it, outside the region: DropPath's saved mask would otherwise
    make the recompute re-run the proj GEMM to reach it. `predrawn`: `_predraw`'s mask, handed to
    the qkv hook for this call (forward and recompute alike)."""
    return _with_predrawn(block, predrawn, PATCHED.attention, block, x, None, kw)


class _Calls:
    """Handed to a checkpointed region's function: whether it has run before, i.e. whether this
    call is backward's recompute (non-reentrant checkpointing calls it again with the same
    arguments), and whether that recompute may run other ops than the forward did (plain
    checkpointing; the selective policy replays the forward's ops one for one)."""

    __slots__ = ("ran", "free")

    def __init__(self, free: bool):
        self.ran, self.free = False, free


class _SaveOnly(torch.autograd.Function):
    """Backward's stand-in for the MLP activation (`_mlp_core`): saves its input exactly as
    nn.GELU's autograd node did in forward (the recomputed tensor the original node unpacks) and
    returns an uninitialised tensor in place of the activation, which nothing reads."""

    @staticmethod
    def forward(ctx, h: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(h)
        return torch.empty_like(h)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # pragma: no cover - the recompute's graph is discarded
        raise RuntimeError("fastpeft: the recompute stand-in of an activation has no backward")


def _gelu_ends_region(block) -> bool:
    """Whether nothing the MLP region saves depends on its GELU output: a timm Mlp with nn.GELU, no
    norm on the hidden features, a plain frozen fc2 without hooks (it saves only its weight), and
    no mlp_out slots; and a drop2 that draws nothing (else the recompute would have to run on to
    its mask, through the fc2 GEMM). Backward's recompute then needs the activation's input but
    never its output."""
    mlp = getattr(block, "mlp", None)
    if not timm_mlp(mlp) or type(mlp.act) is not nn.GELU or type(mlp.norm) is not nn.Identity:
        return False
    fc2 = mlp.fc2
    if type(fc2) is not nn.Linear or fc2.weight.requires_grad or fc2._forward_hooks or fc2._forward_pre_hooks:
        return False
    return not block._fastpeft_slots["mlp_out"] and not _hooked_or_draws(mlp.drop2)


def _plain_half(block, half: str) -> bool:
    """Whether a half of the block, run without checkpointing, saves exactly what its region keeps
    when the plan keeps all its backward needs from it ({qkv, attn}: the input, q/k/v and the
    attention outputs; {fc1}: the input and the GELU input): timm's Attention / Mlp on plain frozen
    Linears, with no method hooks or slots inside the half, nothing that draws random numbers
    (a dropout mask would be saved, not redrawn) and no LayerNorm on q / k or on the hidden
    features. Such a half then runs as the reference's does: no recompute at all."""
    if half == "attn":
        attn = block.attn
        if _norm_read(block, "attn") or not timm_sdpa_attention(attn):
            return False
        if not all(type(getattr(attn, n, None)) is nn.Identity for n in ("q_norm", "k_norm", "norm")):
            return False
        layers, rest = (attn.qkv, attn.proj), (block.norm1, attn)
    else:
        mlp = block.mlp
        if _norm_read(block, "mlp") or not _gelu_ends_region(block):
            return False
        layers, rest = (mlp.fc1, mlp.fc2), (block.norm2, mlp)
    return all(type(m) is nn.Linear and not m.weight.requires_grad for m in layers) and not any(
        _hooked_or_draws(m) for m in rest
    )


def _runs_plain(block, half: str) -> bool:
    """Whether the plan keeps everything this half's backward needs and the half is plain
    (`_plain_half`): it then runs outside checkpointing, with the same saved bytes."""
    keep = block.__dict__.get("_fastpeft_keep", frozenset())
    need = {"qkv", "attn"} if half == "attn" else {"fc1"}
    return need <= keep and _plain_half(block, half)


def _mlp_core(block, y: torch.Tensor, calls: _Calls | None) -> torch.Tensor:
    """The frozen MLP path: y -> mlp_out(mlp(norm2(y))). LayerScale, DropPath and the serial
    adapters (ffn_out) run after the region, outside it: those adapters read the fc2 output and
    save it for their own backward (their down-projection's weight gradient), exactly as the
    reference does, so the region's recompute stops at the GELU input and never re-runs fc2 to
    reach them, and the region needs no selective-checkpoint policy (a dispatch mode: host time on
    every op) to keep the fc2 output.

    In backward's recompute (`calls.ran`; `calls` is None under torch.compile, which traces the
    region once) under plain checkpointing, where the GELU input is the
    region's last saved tensor (`_gelu_ends_region`), the GELU itself is not re-run: `_SaveOnly` saves its input in its place
    (the same tensor at the same position, so the reference's GELU backward reads the same
    values) and the recompute stops there."""
    mlp = block.mlp
    if calls is not None and calls.ran and calls.free and _gelu_ends_region(block):
        # timm's Mlp.forward with the GELU swapped for its stand-in: the same tensors are saved in the
        # same order (drop1's mask drawn as in forward; fc2 saves only its frozen weight, before its
        # GEMM runs, and that is where torch's early stop ends the recompute)
        a = through(mlp, "drop1", _SaveOnly.apply(mlp.fc1(block.norm2(y))))
        return through(mlp, "drop2", mlp.fc2(through(mlp, "norm", a)))
    if calls is not None:
        calls.ran = True
    return PATCHED.mlp(block, y, None)


def _branch(fn, x: torch.Tensor) -> torch.Tensor:
    return fn(x, None)  # reads_norm is False: the branch does not read its second argument


def _lean_attention(block) -> bool:
    """Whether the attention half may run lean (`_LeanAttention`): timm's Attention on its SDPA path
    with no q / k norms, whose qkv output feeds nothing but the attention. The qkv layer and norm1
    may carry any method hooks (backward re-runs them as modules); a norm1 that draws random
    numbers must not run before the state is taken, i.e. no branch may read its output."""
    attn = block.attn
    if not timm_sdpa_attention(attn) or not all(
        type(getattr(attn, n, None)) is nn.Identity for n in ("q_norm", "k_norm")
    ):
        return False
    return not (_norm_read(block, "attn") and _draws_rng(block.norm1))


def _lean_mlp(block) -> bool:
    """Whether the MLP half may run lean (`_LeanActivation`): timm's Mlp, whose fc1 output feeds
    nothing but its activation (fc1, norm2, the activation and the layers after it may carry
    method hooks or be fused modules)."""
    if not timm_mlp(block.mlp):
        return False
    return not (_norm_read(block, "mlp") and _draws_rng(block.norm2))


class _Replay:
    """What a lean half needs to recompute a tensor's value in backward exactly as forward made it:
    the RNG state before the first op it re-runs (only where those ops may draw) and the autocast
    state. `run()` re-enters both around the recompute; the caller's RNG stream is left as it was."""

    __slots__ = ("cpu", "cuda", "device", "autocast", "h", "a", "node", "norm_node")

    def __init__(self, x: torch.Tensor, draws: bool):
        dev = x.device
        self.device = dev
        # (a lean MLP's recomputed fc1 output and activation output, held from the first use in
        # backward to the last: `_ActivationOutput`, `_LeanActivation`; and the node that can
        # remake that fc1 output, `ops._autograd.remaker`, where the activation draws nothing)
        self.h = self.a = self.node = self.norm_node = None
        self.cpu = torch.get_rng_state() if draws else None
        self.cuda = torch.cuda.get_rng_state(dev) if draws and dev.type == "cuda" else None
        self.autocast = (torch.get_autocast_dtype(dev.type) if torch.is_autocast_enabled(dev.type) else None)

    def run(self, fn, *args, rng: bool = True):
        """fn(*args) under the forward's autocast state and, with `rng` (fn re-runs ops that may
        draw), its RNG state."""
        if (self.cpu is None or not rng) and self.autocast is None and not torch.is_autocast_enabled(self.device.type):
            return fn(*args)  # (nothing to replay: the common case, without the contexts' cost)
        autocast = torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None)
        if self.cpu is None or not rng:
            with autocast:
                return fn(*args)
        devices = [self.device] if self.cuda is not None else []
        with torch.random.fork_rng(devices=devices), autocast:
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda, self.device)
            return fn(*args)


def _remade(replay: _Replay, node) -> torch.Tensor | None:
    """The output of `node` (`ops._autograd.remaker`, or None) made again from what it keeps, under
    the forward's autocast state; None where it cannot be (then the layers are re-run)."""
    return None if node is None else replay.run(remake, node, rng=False)


def _remake_fc1_output(replay: _Replay) -> None:
    """`replay.h`, the lean MLP's fc1 output, remade by the op that made it (`replay.node`) where it
    is not at hand yet and that op can (else it stays None: the layers re-run)."""
    if replay.h is None and replay.node is not None:
        replay.h = _remade(replay, replay.node)


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def _backward_local():
    """Around a lean half's small graph inside backward (differentiated at once, then freed): its
    saved tensors are the backward's scratch, not activations kept for it, so a caller's
    saved-tensor hooks (memory profilers, offloading) do not take them, as torch's checkpointing
    keeps its recompute from them."""
    return torch.autograd.graph.saved_tensors_hooks(_same, _same)


#: `torch._fused_sdp_choice`'s answer for the flash kernel (on CPU: no dropout)
_FLASH = int(SDPBackend.FLASH_ATTENTION.value)


def _cpu_flash(q, k, v, drop: float, kw: dict, replay: _Replay) -> bool:
    """Whether F.scaled_dot_product_attention runs CPU's flash kernel pair on these inputs (outside
    autocast, which would cast them first): the pair a lean attention may call directly."""
    return q.device.type == "cpu" and replay.autocast is None and torch._fused_sdp_choice(
        q, k, v, kw.get("attn_mask"), drop, kw.get("is_causal", False)) == _FLASH


def _plain_norm_linear(norm: nn.Module, linear: nn.Module) -> bool:
    """Whether `linear(norm(x))` is exactly F.linear(F.layer_norm(x, ...)) with no hook to see it:
    a plain LayerNorm (torch's, or timm's off its fast-norm path) and nn.Linear, neither with
    forward hooks, and no global module hooks. A lean half's backward then recomputes that value
    through the functionals, without the two module calls around them. Checked per call (a few
    dict lookups): a hook may be registered after `patch`."""
    return type(linear) is nn.Linear and plain_layer_norm(norm) and not forward_hooked((norm, linear))


def _norm_linear(norm: nn.Module, linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """linear(norm(x)), through the functionals where `_plain_norm_linear` allows."""
    if _plain_norm_linear(norm, linear):
        return F.linear(F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps),
                        linear.weight, linear.bias)
    return linear(norm(x))


def _fc1_output(block, y: torch.Tensor, replay: _Replay) -> torch.Tensor:
    """A lean MLP's fc1 output again (no graph): norm2 and fc1 re-run (`_norm_linear`), or fc1 on
    norm2's output remade by the op that made it (`replay.norm_node`: where nothing draws)."""
    h2 = remake(replay.norm_node) if replay.norm_node is not None else None
    fc1 = block._modules["mlp"]._modules["fc1"]
    if h2 is None:
        return _norm_linear(block._modules["norm2"], fc1, y)
    return fc1(h2)


class _LeanAttention(torch.autograd.Function):
    """timm's SDPA attention over a qkv output, saving none of q, k, v (3 [B, N, D]) nor its output:
    only norm1's input x, which norm1 saves anyway. Backward recomputes the qkv output's value
    (norm1 and the qkv layer with their hooks, as modules, or through the functionals where
    neither has hooks: `_norm_linear`; without a graph), then the attention
    forward (with its dropout draw, replayed) and its backward. That re-runs the qkv GEMM and the
    attention forward, as the checkpointed regions do, but none of the block's other ops, and no
    checkpoint machinery."""

    @staticmethod
    def forward(ctx, qkv, x, block, replay, kw, keep_out, node, *predrawn):
        attn = block._modules["attn"]
        ctx.block, ctx.replay, ctx.kw = block, replay, kw
        ctx.drop = attn._modules["attn_drop"].p if attn.training else 0.0
        # (the qkv op that can give its output again from what it keeps, where the attention
        # draws nothing: then the only draws backward replays are the layers' it does not re-run)
        ctx.node = node if ctx.drop == 0.0 else None
        q, k, v = split_heads(attn, qkv)
        mask, causal = kw.get("attn_mask"), kw.get("is_causal", False)
        # (decided here for backward too: its recompute runs on the same q / k / v)
        ctx.flash = _cpu_flash(q, k, v, ctx.drop, kw, replay)
        ctx.kept = keep_out and ctx.flash
        if not ctx.flash:
            ctx.save_for_backward(x, *predrawn)
            return F.scaled_dot_product_attention(q, k, v, dropout_p=ctx.drop, **kw)
        # (the kernel F.scaled_dot_product_attention would pick, called directly)
        out, lse = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, ctx.drop, causal, attn_mask=mask)
        # (where the plan keeps the output and its log-sum-exp, backward needs q / k / v only, the
        # flash backward's inputs, and does not re-run the attention forward)
        ctx.save_for_backward(x, *((out, lse) if ctx.kept else ()), *predrawn)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        # (grad mode is off here, as in any backward not asked for a graph: the recompute records none)
        x, *predrawn = ctx.saved_tensors
        kept = predrawn[:2] if ctx.kept else ()
        predrawn = predrawn[2:] if ctx.kept else predrawn
        block = ctx.block
        attn = block._modules["attn"]

        def rerun(qkv):
            if qkv is None:  # (the layers re-run: norm1, qkv and their hooks)
                norm1, layer = block._modules["norm1"], attn._modules["qkv"]
                qkv = _with_predrawn(block, predrawn, layer, norm1(x)) if predrawn else _norm_linear(norm1, layer, x)
            q, k, v = split_heads(attn, qkv)
            mask, causal = ctx.kw.get("attn_mask"), ctx.kw.get("is_causal", False)
            if kept or ctx.flash:
                # the kernel pair F.scaled_dot_product_attention's autograd runs here, called
                # directly: no graph and no autograd.grad for the recompute
                out, lse = kept or aten._scaled_dot_product_flash_attention_for_cpu(
                    q, k, v, ctx.drop, causal, attn_mask=mask)
                dq, dk, dv = aten._scaled_dot_product_flash_attention_for_cpu_backward(
                    grad, q, k, v, out, lse, ctx.drop, causal, attn_mask=mask)
                # ([B, H, N, d] each -> the qkv layout [B, N, 3, H, d]: one copy)
                return torch.stack((dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)), 2).view(qkv.shape)
            qkv.requires_grad_()
            with torch.enable_grad(), _backward_local():
                q, k, v = split_heads(attn, qkv)
                out = F.scaled_dot_product_attention(q, k, v, dropout_p=ctx.drop, **ctx.kw)
            return torch.autograd.grad(out, qkv, grad)[0]

        qkv = _remade(ctx.replay, ctx.node)
        return (ctx.replay.run(rerun, qkv, rng=qkv is None), None, None, None, None, None, None,
                *(None for _ in predrawn))


class _LeanActivation(torch.autograd.Function):
    """The MLP's activation on the fc1 output, saving not its input h ([B, N, 4D]) but the MLP
    half's input y, which norm2 saves anyway. Backward recomputes h (norm2 and fc1 with their
    hooks, `_norm_linear`, without a graph: one GEMM) and applies nn.GELU's own backward formula to it;
    an activation module with a `lean_backward(h, grad)` (SSF's fused scale-shift + GELU) gives
    its gradients itself; any other is re-run on h with a graph and differentiated, for h and for
    `params` (the block's trainable parameters it may read). Where a hook after it saved its
    output (`_ActivationOutput`), backward recomputed h already: that h is used."""

    @staticmethod
    def forward(ctx, h, y, block, replay, *params):
        ctx.block, ctx.replay, ctx.params = block, replay, params
        ctx.save_for_backward(y)
        return block._modules["mlp"]._modules["act"](h)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        block = ctx.block
        act = block._modules["mlp"]._modules["act"]
        gelu = type(act) is nn.GELU
        lean_backward = None if gelu or vmapped(grad) else getattr(act, "lean_backward", None)

        replay = ctx.replay
        _remake_fc1_output(replay)

        def rerun():
            h = replay.h if replay.h is not None else _fc1_output(block, y, replay)  # (no graph)
            replay.h = replay.a = None  # (the last use: `_ActivationOutput` ran before, if at all)
            if gelu:
                return torch.ops.aten.gelu_backward(grad, h, approximate=act.approximate), ()
            if lean_backward is not None:  # (the module's own backward, no graph: e.g. SSFGELU)
                dh, pairs = lean_backward(h, grad)
                out = [None] * len(ctx.params)
                for param, g in pairs:
                    for i, p in enumerate(ctx.params):
                        if p is param and ctx.needs_input_grad[4 + i]:
                            out[i] = g
                return dh, out
            wanted = [i for i, need in enumerate(ctx.needs_input_grad[4:]) if need]
            params = [ctx.params[i] for i in wanted]
            with torch.enable_grad(), _backward_local():
                h.requires_grad_()
                dh, *dp = torch.autograd.grad(act(h), (h, *params), grad, allow_unused=True)
            out = [None] * len(ctx.params)
            for i, g in zip(wanted, dp):
                out[i] = g
            return dh, out

        # (nothing re-run draws where the fc1 output is at hand: GELU and `lean_backward` draw nothing)
        dh, dparams = replay.run(rerun, rng=replay.h is None)
        return dh, None, None, None, *dparams


class LeanRun(PatchedRun):
    """The run of a block whose halves recompute lean (`patch(recompute=True)` where
    `_lean_attention` / `_lean_mlp` allow, `_fastpeft_lean`): the reference order and modules,
    with the attention and the MLP activation as `_LeanAttention` / `_LeanActivation`, so that the
    block keeps the reference's saved tensors less q / k / v, the attention output and the GELU
    input. A half the plan keeps whole (`_fastpeft_keep`: {qkv, attn} / {fc1}) runs as the
    reference; a kept {attn} alone (CPU flash) keeps the attention output and its log-sum-exp, so
    backward recomputes q / k / v but not the attention forward. The other half, where it cannot
    run lean, runs as a checkpointed region."""

    def forward(self, block, x, kw):
        lean = block.__dict__["_fastpeft_lean"]
        if "attn" in lean and "mlp" in lean:
            return self.mlp_half(block, self.attn_half(block, x, kw))
        regions = _Regions(block)
        y = self.attn_half(block, x, kw) if "attn" in lean else regions.attn_half(block, x, kw)
        return self.mlp_half(block, y) if "mlp" in lean else regions.mlp_half(block, y)

    def norm(self, block, i, x):
        # (where no branch reads it, the norm runs inside the lean piece, after the RNG state is taken)
        if _norm_read(block, "attn" if i == 1 else "mlp"):
            return (block.norm1 if i == 1 else block.norm2)(x)
        return None

    def attention(self, block, x, h, kw):
        keep = block.__dict__.get("_fastpeft_keep", ())
        if "qkv" in keep:  # (kept whole: {qkv, attn})
            return PATCHED.attention(block, x, h, kw)
        attn = block._modules["attn"]
        # (LoRA's input-dropout mask drawn ahead, as the regions do: `_predraw`; the RNG state the
        # recompute replays is taken after it, so backward reuses the mask instead of drawing it)
        predrawn = _predraw(block, x)
        replay = _Replay(x, block.__dict__["_fastpeft_lean"]["attn"])
        qkv = _with_predrawn(block, predrawn, attn._modules["qkv"], block._modules["norm1"](x) if h is None else h)
        if qkv.requires_grad:
            o = _LeanAttention.apply(qkv, x, block, replay, kw, "attn" in keep, remaker(qkv), *predrawn)
        else:  # (nothing before the attention needs a gradient: nothing to save)
            q, k, v = split_heads(attn, qkv)
            o = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.attn_drop.p if attn.training else 0.0, **kw)
        B, N, _ = qkv.shape
        o = through(attn, "norm", o.transpose(1, 2).reshape(B, N, -1))
        return through(attn, "proj_drop", attn._modules["proj"](o))

    def mlp(self, block, y, h2):
        if "fc1" in block.__dict__.get("_fastpeft_keep", ()):
            return PATCHED.mlp(block, y, h2)
        mlp = block._modules["mlp"]
        mods = mlp._modules
        replay = _Replay(y, block.__dict__["_fastpeft_lean"]["mlp"])
        if h2 is None:
            h2 = block._modules["norm2"](y)
        h = mods["fc1"](h2)
        if h.requires_grad:
            act = mods["act"]
            gelu = type(act) is nn.GELU
            if gelu or hasattr(act, "lean_backward"):  # (an activation that draws nothing)
                replay.node = remaker(h)
            if replay.node is None and replay.cpu is None:  # (nothing in the half draws)
                replay.norm_node = remaker(h2)
            params = () if gelu else [p for p in block._fastpeft_params if p.requires_grad]
            a = _LeanActivation.apply(h, y, block, replay, *params)
        else:
            a = mods["act"](h)
        fc2 = mods["fc2"]
        with _ActivationOutput(a, block, y, replay) if h.requires_grad and _saves_input(fc2) else nullcontext():
            m = through(mlp, "drop2", fc2(through(mlp, "norm", through(mlp, "drop1", a))))
        for fn in block._fastpeft_slots["mlp_out"]:
            m = fn(m)
        return m


def _saves_input(linear: nn.Module) -> bool:
    """Whether `linear` may save its input for backward: not a plain frozen nn.Linear without hooks
    (e.g. FacT's delta on fc2, whose gradient for its factors reads the input)."""
    return (type(linear) is not nn.Linear or linear.weight.requires_grad or bool(linear._forward_hooks)
            or bool(linear._forward_pre_hooks))


class _ActivationOutput(torch.autograd.graph.saved_tensors_hooks):
    """Saved-tensor hooks around the layers after a lean MLP's activation (fc2 and its method
    hooks): where one of them saves the activation's output `a` itself ([B, N, 4D]: FacT's fc2
    delta does), this object is kept in its place, and backward gets `a` back by recomputing it
    from the half's input y (norm2, fc1, the activation: under the forward's RNG and autocast
    state, `_Replay`), once for all its uses; `_LeanActivation`'s backward, which runs after them,
    then reuses the recomputed fc1 output instead of running the GEMM again. Any other saved
    tensor goes to the hooks in force outside (a memory profiler's, an offloader's), or is kept."""

    def __init__(self, a: torch.Tensor, block, y: torch.Tensor, replay: _Replay):
        # (`a` is identified by its memory, not held: holding it would keep it alive; a saved
        # view of it, e.g. the reference FacT's [B, N, 4, D], is rebuilt as the same view)
        self.key = (a.untyped_storage().data_ptr(), a.dtype)
        self.offset = a.storage_offset()
        self.block, self.y, self.replay = block, y, replay
        outer = torch._C._autograd._top_saved_tensors_default_hooks(False)
        self.outer_pack, self.outer_unpack = outer if outer is not None else (None, None)
        super().__init__(self._pack, self._unpack)

    def _pack(self, t: torch.Tensor):
        if (t.untyped_storage().data_ptr(), t.dtype) == self.key:
            return _AView(self, t.shape, t.stride(), t.storage_offset() - self.offset)
        return self.outer_pack(t) if self.outer_pack is not None else t

    def _unpack(self, packed):
        if type(packed) is not _AView or packed.source is not self:
            return self.outer_unpack(packed) if self.outer_unpack is not None else packed
        a = self.value()
        return a.as_strided(packed.shape, packed.stride, a.storage_offset() + packed.offset)

    def value(self) -> torch.Tensor:
        replay = self.replay
        if replay.a is None:
            block = self.block
            _remake_fc1_output(replay)

            def rerun():
                with torch.no_grad():
                    if replay.h is None:
                        replay.h = _fc1_output(block, self.y, replay)
                    return block.mlp.act(replay.h)

            replay.a = replay.run(rerun, rng=replay.h is None)
        return replay.a


class _AView(NamedTuple):
    """What `_ActivationOutput` keeps for a saved view of the activation output."""

    source: _ActivationOutput
    shape: torch.Size
    stride: tuple
    offset: int


#: the run of every block with a lean half (stateless: the halves live in `_fastpeft_lean`)
LEAN = LeanRun()


class RecomputeRun(PatchedRun):
    """The run of a block under `patch(recompute=True)` (see the module docstring): the reference
    order (fastpeft/block.py) with its frozen paths as checkpointed regions, wherever the block
    or its input needs a gradient; elsewhere (no_grad, eval of a frozen input) the reference run."""

    def __call__(self, block, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        kw = {"attn_mask": attn_mask, "is_causal": is_causal} if attn_mask is not None or is_causal else {}
        if vmapped(x):
            return rows_block(block, x, kw)
        # (the parameters the block reads, its method hooks' included, recorded by `patch` once
        # every rule has run: walking its modules on every call is host time)
        params = block.__dict__.get("_fastpeft_reads") or tuple(block.parameters())
        if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params)):
            if block.__dict__.get("_fastpeft_lean") and not torch.compiler.is_compiling():
                return LEAN.forward(block, x, kw)
            return _Regions(block).forward(block, x, kw)
        return PATCHED.forward(block, x, kw)


def _path_get(root: nn.Module, name: str):
    *mods, leaf = name.split(".")
    m = root
    for part in mods:
        m = getattr(m, part)
    return getattr(m, leaf)


def rows_block(block, x: torch.Tensor, kw: dict) -> torch.Tensor:
    """A block in a mixed multi-task batch (the model runs under torch.func.vmap over its rows,
    each row's task tensors substituted: fastpeft/multitask.py), or under a user's vmap.
    torch's checkpointing does not run inside vmap (its saved-tensor hooks), so the block leaves it
    (`ops._rows.rows_call`) and runs as ONE checkpointed region at the physical level: inside it,
    the block is vmapped again over the rows, with the task tensors it reads (recorded by `patch`
    in `_fastpeft_rows`) handed in as the region's inputs and put back in place for each row, so
    backward's recompute is self-contained. It keeps the block input (and the task tensors, held
    anyway) and re-runs the whole block in backward: timm's checkpointing granularity, not the
    finer regions above (their predrawn masks, stand-in activation and selective policy work on
    unbatched tensors)."""
    from torch.nn.utils.stateless import _reparametrize_module

    from .ops._rows import batched, rows_call

    if not torch.is_grad_enabled() or torch.compiler.is_compiling():
        # (torch.compile inlines the bridge's autograd.Function instead of taking its vmap rule:
        # a compiled mixed batch runs its blocks without checkpointing)
        return PATCHED.forward(block, x, kw)
    ref = block.__dict__.get("_fastpeft_rows")
    root, names = (ref[0](), ref[1]) if ref is not None else (None, ())
    values = [_path_get(root, n) for n in names]
    dims = (0, *(0 if batched(v) else None for v in values))

    def row(xr: torch.Tensor, *tensors: torch.Tensor) -> torch.Tensor:
        if not names:
            return PATCHED.forward(block, xr, kw)
        with _reparametrize_module(root, dict(zip(names, tensors)), strict=False):
            return PATCHED.forward(block, xr, kw)

    def region(xb: torch.Tensor, *tensors: torch.Tensor) -> torch.Tensor:
        return torch.func.vmap(row, in_dims=dims, randomness="different")(xb, *tensors)

    def form(_batch: int, xb: torch.Tensor, *tensors: torch.Tensor) -> torch.Tensor:
        return checkpoint(region, xb, *tensors, use_reentrant=False, determinism_check="none")

    return rows_call(form, x, *values)


#: the run `patch(recompute=True)` gives every block (stateless: the plan lives in `_fastpeft_keep`)
RECOMPUTE = RecomputeRun()


class _Regions(PatchedRun):
    """One call of a block under selective checkpointing: the same ops in the same order as the
    reference run (so the same values and the same RNG draws), but only the frozen paths (norm ->
    attention, norm -> MLP) are checkpointed: branches that read the residual stream rather than
    the LayerNorm output (AdaptFormer's parallel adapter) are checkpointed on their own (they keep
    nothing but the residual stream, which the frozen path's region keeps anyway), and a half with
    a branch that reads the LayerNorm output is one region. Each region's recompute stops at the
    last saved tensor it must rebuild, so the MLP's ends at the GELU input instead of re-running
    the fc2 GEMM only to reach the adapter's saved tensors."""

    def __init__(self, block):
        # (traced tensors have no data pointers to match: no GEMM output is kept under compile)
        keep_attn, keep_mlp = (frozenset(), frozenset()) if torch.compiler.is_compiling() else _kept_weights(block)
        keep_attention = "attn" in block.__dict__.get("_fastpeft_keep", ())
        # Regions that keep something run under the selective-checkpoint policy (a dispatch mode
        # that sees every op: host time); the others under plain checkpointing, which recomputes
        # the same way. respect_saved_tensors_hooks: what the policy keeps goes through
        # saved-tensor hooks like any other saved tensor, so memory profilers (and offloading
        # hooks) see it.
        # determinism_check="none": torch's metadata comparison of every recomputed tensor with the
        # original (a debugging aid: the regions replay the forward's ops, tests/patch/test_recompute.py
        # checks the gradients) costs host time on every saved tensor
        self.plain = dict(use_reentrant=False, determinism_check="none")
        policy = functools.partial(_policy, keep_attn | keep_mlp, keep_attention)
        sac = dict(self.plain, context_fn=functools.partial(create_selective_checkpoint_contexts, policy),
                   **SAC_HOOK_OPTS)
        self.attn_opts = sac if keep_attention or keep_attn else self.plain
        self.mlp_opts = sac if keep_mlp else self.plain
        # the frozen-path regions (`_attn_core`, `_mlp_core`) that cannot draw random numbers skip
        # checkpoint's RNG-state stash and restore (a copy of the CPU generator's state, and each
        # device's, per region and again in its recompute)
        self.attn_core_opts = self.attn_opts if _core_draws(block, "attn") else {**self.attn_opts,
                                                                               "preserve_rng_state": False}
        self.mlp_core_opts = self.mlp_opts if _core_draws(block, "mlp") else {**self.mlp_opts,
                                                                            "preserve_rng_state": False}

    def attn_half(self, block, x, kw):
        if _norm_read(block, "attn"):
            run = BRANCHES_FIRST[_branches_first(block, "attn"), False]
            return checkpoint(run.attn_half, block, x, kw, **self.attn_opts)
        # (prompts first, outside the region: the region and any residual-reading branch then
        # share the prompted stream as their saved input, and their draws precede the region's,
        # as in the reference)
        return super().attn_half(block, x, kw)

    def mlp_half(self, block, y):
        if _norm_read(block, "mlp"):
            # (mlp_in slots, serial adapters on the stream, run before the region: it keeps their output)
            run = BRANCHES_FIRST[False, _branches_first(block, "mlp")]
            return checkpoint(run.mlp_half, block, self.mlp_in(block, y), **self.mlp_opts)
        return super().mlp_half(block, y)

    def norm(self, block, i, x):
        return None  # inside the regions

    def attention(self, block, x, h, kw):
        if not kw and _runs_plain(block, "attn"):
            return _attn_core(block, x, kw)
        return checkpoint(_attn_core, block, x, kw, *_predraw(block, x), **self.attn_core_opts)

    def mlp(self, block, y, h2):
        if _runs_plain(block, "mlp"):
            return _mlp_core(block, y, None)
        calls = None if torch.compiler.is_compiling() else _Calls(self.mlp_opts is self.plain)
        return checkpoint(_mlp_core, block, y, calls, **self.mlp_core_opts)

    def branch(self, fn, x, h):
        return checkpoint(_branch, fn, x, **self.plain)
