"""`fastpeft.patch(model, recompute=True)` for every method: bit-identical losses and gradients
(dropout and DropPath active: lean halves and checkpointed regions replay the RNG), at most 0.4x
the reference's saved activation bytes at 197 tokens, and a recompute that re-runs only the GEMMs
it must (qkv, fc1; in regions proj / fc2 only where a method saves something behind them) and none
the byte-budget plan keeps. Lean halves: no q / k / v or GELU input saved, random draws and
autocast replayed, fused activations differentiated for their parameters. The regions' own
mechanics (selective policy, stand-in activation, plain halves) are tested with lean halves off
(`regions_only`): they serve the halves that cannot run lean and torch.compile."""
from __future__ import annotations

import collections
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import fastpeft
from fastpeft.profile import saved_activation_bytes
from tests.methods.conftest import grads_of, images, make_vit, randomize_
from tests.patch.conftest import assert_recompute_bit_exact, train_step

# default configs (their own dropouts, where they have one, stay on)
METHODS = {
    "adaptformer": lambda d: fastpeft.AdaptFormer(dim=8),
    "adaptformer-sequential": lambda d: fastpeft.AdaptFormer(dim=8, mode="sequential"),
    "adapter-noah": lambda d: fastpeft.Adapter(dim=8),
    "adapter-vpt": lambda d: fastpeft.Adapter(dim=8, style="vpt", init="lora"),
    "lora": lambda d: fastpeft.LoRA(rank=4),
    "fact-tt": lambda d: fastpeft.FacT(kind="tt", rank=4),
    "fact-tk": lambda d: fastpeft.FacT(kind="tk", rank=4),
    "kadaptation": lambda d: fastpeft.KAdaptation(init="trainable"),
    "ssf": lambda d: fastpeft.SSF(),
    "convpass": lambda d: fastpeft.Convpass(dim=8),
    "vpt-deep": lambda d: fastpeft.VPT(num_tokens=5),
    "noah": lambda d: fastpeft.NOAH(adapter_dims=[8] * d, lora_ranks=[4] * d, prompt_lens=[3] * d),
    "bitfit": lambda d: fastpeft.BitFit(),
}


def build(case: str, depth: int = 2, drop_path_rate: float = 0.1, **kw):
    m = make_vit(depth=depth, drop_path_rate=drop_path_rate, **kw)
    fastpeft.inject(m, METHODS[case](depth))
    randomize_([p for _, p in fastpeft.trainable_parameters(m)])
    return m.train()


step = partial(train_step, seed=3)  # the same dropout / DropPath draws in both runs


@pytest.fixture
def regions_only(monkeypatch):
    """`patch(recompute=True)` with no lean halves: every half a checkpointed region (what runs
    under torch.compile, and where a half cannot run lean), to test the regions themselves."""
    from fastpeft import recompute

    monkeypatch.setattr(recompute, "plan_lean", lambda model: False)


@pytest.mark.parametrize("drop_path_rate", [0.1, 0.0], ids=["droppath", "no-droppath"])
@pytest.mark.parametrize("case", sorted(METHODS))
def test_recompute_is_bit_exact(case, drop_path_rate):
    assert_recompute_bit_exact(build(case, drop_path_rate=drop_path_rate), images(), "torch")


@pytest.mark.parametrize("case", ["lora", "noah"])
def test_recompute_is_bit_exact_without_a_class_token(case):
    # no class token: the first block's input is the patch embedding's transposed view, not a
    # contiguous tensor; the input-dropout mask drawn ahead of the attention region must still be
    # the one F.dropout draws on norm1's (contiguous) output
    assert_recompute_bit_exact(build(case, class_token=False, global_pool="avg"), images(), "torch")


@pytest.mark.parametrize("case", sorted(METHODS))
def test_recompute_saves_at_most_0_4x(case):
    # ViT-S width, 12 blocks, 197 tokens (the issue's target is for ViT-B/16; the bench reports it)
    m = build(case, depth=12, name="vit_small_patch16_224", img_size=224)
    x = images(batch=2, img_size=224)
    ref = saved_activation_bytes(lambda: m(x).sum(), exclude=[m])
    fastpeft.patch(m, backend="torch", recompute=True)
    kept = saved_activation_bytes(lambda: m(x).sum(), exclude=[m])
    assert kept <= 0.4 * ref, (kept / ref, kept, ref)


class _GemmsByWeight(TorchDispatchMode):
    """Counts addmm/mm calls per weight (matched by data pointer of the second operand)."""

    def __init__(self, weights: dict[str, torch.Tensor]):
        super().__init__()
        self.names = {w.data_ptr(): n for n, w in weights.items()}
        self.calls: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.addmm.default, torch.ops.aten.mm.default):
            name = self.names.get(args[-1].data_ptr())
            if name is not None:
                self.calls[name] += 1
        return func(*args, **(kwargs or {}))


# the frozen GEMMs the regions' minimal plan re-runs in backward: qkv and fc1 always; proj / fc2 only when
# something after them in their region saves a tensor (Convpass's branches reading the LayerNorm output inside the region: unless the frozen path draws
# no random numbers, when the branches run first and the recompute stops at the frozen path's last
# saved tensor). FacT's hooks on proj / fc2 add a delta of the layer input, which
# recompute computes before the GEMM: neither is re-run. Serial adapters on the FFN output run after
# the MLP region and save the fc2 output themselves (as in the reference): fc2 is not re-run.
RERUN = {
    "adaptformer": {"qkv", "fc1"}, "ssf": {"qkv", "fc1"}, "bitfit": {"qkv", "fc1"}, "lora": {"qkv", "fc1"},
    "adapter-noah": {"qkv", "fc1"}, "fact-tt": {"qkv", "fc1"}, "fact-tk": {"qkv", "fc1"},
    "convpass": {"qkv", "proj", "fc1", "fc2"}, "convpass@no-droppath": {"qkv", "fc1"},
}


# lean halves (fastpeft/recompute.py LeanRun) re-run qkv (for the attention) and fc1 (for the GELU
# input) only, whatever the method hooks behind them (SSF's fused scale-shift + GELU activation
# included; FacT's fc2 delta, whose saved input the lean MLP recomputes with the same fc1 GEMM),
# and not even those where the op that made the value keeps what remakes it (`ops._autograd.remake`:
# SSF's scale-shift after qkv keeps the qkv GEMM's output). Every case here runs both halves lean
# once the plan is made to prefer them (LEAN_MARGIN)
RERUN_LEAN = {case: {"fc1"} if case == "ssf" else {"qkv", "fc1"} for case in RERUN}
LEAN_HALVES: dict = {}


@pytest.mark.parametrize("lean", [True, False], ids=["lean", "regions"])
@pytest.mark.parametrize("case", sorted(RERUN))
def test_backward_reruns_only_the_gemms_the_plan_does_not_keep(case, lean, monkeypatch):
    from fastpeft import recompute

    if not lean:
        monkeypatch.setattr(recompute, "plan_lean", lambda model: False)
    else:  # (lean halves wherever they fit, not the regions `plan_keeps` may prefer: see the next test)
        monkeypatch.setattr(recompute, "LEAN_MARGIN", float("inf"))
    method, _, variant = case.partition("@")
    m = build(method, depth=4, name="vit_small_patch16_224", img_size=224,
              drop_path_rate=0.0 if variant == "no-droppath" else 0.1)
    x = images(img_size=224)
    report = fastpeft.patch(m, backend="torch", recompute=True)
    plan = {i: blk.__dict__.get("_fastpeft_keep", frozenset()) for i, blk in enumerate(m.blocks)}
    if case == "ssf":  # 21 [B, N, D] per block in the reference: room to keep GEMM outputs
        assert any(plan.values()) and "also keeps" in str(report), str(report)
    layers = {(i, n): getattr(getattr(blk, part), n) for i, blk in enumerate(m.blocks)
              for part, n in (("attn", "qkv"), ("attn", "proj"), ("mlp", "fc1"), ("mlp", "fc2"))}
    loss = m(x).square().mean()
    with _GemmsByWeight({f"{i}.{n}": mod.weight for (i, n), mod in layers.items()}) as mode:
        loss.backward()
    # blocks whose input requires grad, but the last where it computes the class token's row only
    # (fastpeft/class_row.py: nothing there is checkpointed)
    for i in range(1, len(m.blocks) - ("forward" in m.__dict__)):
        # input-gradient GEMMs: one per layer; forward re-runs: those of RERUN the plan does not keep
        rerun = (RERUN_LEAN if lean else RERUN)[case]
        if lean:  # (a lean half is kept whole or not at all: {qkv, attn}, {fc1})
            assert not plan[i] or plan[i] & {"qkv", "attn", "fc1"} == plan[i], plan[i]
            halves = LEAN_HALVES.get(method, {"attn", "mlp"})
            assert halves is None or set(m.blocks[i]._fastpeft_lean) == halves, i
        want = {n: 1 + (n in rerun and n not in plan[i]) for n in ("qkv", "proj", "fc1", "fc2")}
        got = {n: mode.calls[f"{i}.{n}"] for n in want}
        assert got == want, (i, plan[i], got)


@pytest.mark.parametrize("case,drop_path,host,lean", [
    ("adaptformer", 0.1, None, True),  # lean halves keep no more than the regions: lean
    # Convpass's branches read the LayerNorm outputs, which lean halves then keep: the regions,
    # which recompute those too, have room to keep attention outputs in every block, a fifth of
    # the recompute's FLOPs at 197 tokens on CPU
    ("convpass", 0.0, None, False),
    ("convpass", 0.0, 1e12, True),  # unless the regions' host work counts for more
    # with DropPath the regions also re-run proj and fc2 (`_reruns`): lean
    ("convpass", 0.1, None, True),
])
def test_plan_runs_regions_only_where_they_leave_less_to_recompute(case, drop_path, host, lean, monkeypatch):
    from fastpeft import recompute

    if host is not None:
        monkeypatch.setattr(recompute, "REGION_HOST_FLOPS", {"cpu": host})
    m = build(case, depth=4, name="vit_small_patch16_224", img_size=224, drop_path_rate=drop_path)
    fastpeft.patch(m, backend="torch", recompute=True)
    marked = [i for i, blk in enumerate(m.blocks) if blk.__dict__.get("_fastpeft_lean")]
    assert bool(marked) == lean, marked
    if lean:  # (every block whose input needs a gradient)
        assert marked == list(range(len(m.blocks))) or marked == list(range(1, len(m.blocks))), marked


def test_a_block_reading_only_model_level_parameters_is_recomputed_too():
    # FacT-TK's hooks read FacTu / FacTv / FacTc / FacTp, all on the model itself: the first
    # block, whose input (the frozen patch embedding's output) needs no gradient and whose own
    # parameters are all frozen, still needs a backward for them, and is recomputed like the rest
    m = build("fact-tk", depth=4, name="vit_small_patch16_224", img_size=224)
    assert not any(p.requires_grad for p in m.blocks[0].parameters())
    x = images(batch=2, img_size=224)
    with torch.no_grad():
        tokens = m.norm_pre(m._pos_embed(m.patch_embed(x)))
    fastpeft.patch(m, backend="torch")
    default = saved_activation_bytes(lambda: m.blocks[0](tokens).sum(), exclude=[m])
    fastpeft.patch(m, backend="torch", recompute=True)
    kept = saved_activation_bytes(lambda: m.blocks[0](tokens).sum(), exclude=[m])
    assert 0 < kept <= 0.5 * default, (kept, default)


class _Count(TorchDispatchMode):
    def __init__(self, ops):
        super().__init__()
        self.ops, self.n = ops, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += func in self.ops or getattr(func, "overloadpacket", None) in self.ops
        return func(*args, **(kwargs or {}))


def test_attention_is_rerun_in_backward_unless_the_plan_keeps_it():
    from fastpeft.recompute import ATTENTION_OPS

    # (avg pool: the last block is checkpointed too, not computing the class token's row only)
    m = build("adaptformer", depth=4, name="vit_small_patch16_224", img_size=224, global_pool="avg")
    x = images(img_size=224)
    fastpeft.patch(m, backend="torch", recompute=True)
    runs = {}
    for kept in (frozenset(), frozenset({"attn"})):
        for blk in m.blocks:
            blk.__dict__.pop("_fastpeft_keep", None)
        m.blocks[2]._fastpeft_keep = kept
        loss, grads = step(m, x)
        out = m(x).sum()
        with _Count(ATTENTION_OPS) as mode:
            out.backward()
        runs[kept] = mode.n, saved_activation_bytes(lambda: m(x).sum(), exclude=[m]), loss, grads
    (n0, b0, l0, g0), (n1, b1, l1, g1) = runs.values()
    # blocks 1-3 need their attention in backward (block 0's input and attention need no grad)
    assert (n0, n1) == (3, 2)
    tokens, width = 197 * x.shape[0], m.embed_dim
    assert b1 - b0 >= tokens * width * 4  # the kept attention output
    assert torch.equal(l0, l1) and all(torch.equal(g0[n], g1[n]) for n in g0)


@pytest.mark.parametrize("case", ["fact-tt", "fact-tk"])
def test_additive_hooks_run_before_the_frozen_gemm_and_unpatch_restores_them(case):
    from fastpeft.methods.base import active_hooks
    from fastpeft.recompute import DeltaFirstLinear

    m, x = build(case, global_pool="avg"), images()  # (bit for bit vs unpatched: no class-token-only block)
    layers = [m.blocks[i].attn.proj for i in range(2)] + [m.blocks[i].mlp.fc2 for i in range(2)]
    hooks = [list(layer._forward_hooks.values()) for layer in layers]
    fastpeft.patch(m, backend="torch")
    loss0, g0 = step(m, x)
    report = fastpeft.patch(m, backend="torch", recompute=True)
    assert all(type(layer) is DeltaFirstLinear for layer in layers) and "additive deltas" in str(report)
    assert [list(layer._fastpeft_hooks) for layer in layers] == hooks
    loss1, g1 = step(m, x)
    assert torch.equal(loss0, loss1) and all(torch.equal(g0[n], g1[n]) for n in g0)
    fastpeft.unpatch(m)
    assert all(type(layer) is torch.nn.Linear for layer in layers)
    assert [active_hooks(layer) for layer in layers] == hooks
    loss2, g2 = step(m, x)
    assert torch.equal(loss0, loss2) and all(torch.equal(g0[n], g2[n]) for n in g0)


def test_delta_first_applies_only_to_additive_hooks_on_frozen_linears():
    from fastpeft.recompute import delta_first_hooks

    m = build("ssf")  # SSF's hooks scale the output: not additive
    assert delta_first_hooks(m.blocks[0].attn.proj) is None
    m = build("fact-tt")
    proj = m.blocks[0].attn.proj
    assert delta_first_hooks(proj) == list(proj._forward_hooks.values())
    proj.weight.requires_grad_(True)
    assert delta_first_hooks(proj) is None


def test_plan_keeps_only_gemms_the_policy_can_recognise(regions_only):
    # CPU KAdaptation folds its delta into the qkv weight: that GEMM runs on a fresh folded weight,
    # which the keep policy (matching a GEMM by its weight's storage) cannot see; keeping "qkv"
    # there would be budgeted and never happen
    m = build("kadaptation", depth=4, name="vit_small_patch16_224", img_size=224)
    report = fastpeft.patch(m, backend="torch", recompute=True)
    assert "folded into the frozen weight" in str(report)
    plan = [blk.__dict__.get("_fastpeft_keep", frozenset()) for blk in m.blocks]
    assert any(plan) and not any("qkv" in keep for keep in plan), plan


@pytest.mark.parametrize("case", ["lora", "noah"])
def test_lora_input_dropout_mask_is_drawn_once_not_again_in_backward(case):
    # NOAH-style LoRA drops its [B, N, D] input: recompute draws that mask before the attention
    # region (same draws as F.dropout, test_recompute_is_bit_exact) and backward reuses it; NOAH's
    # prompts (block_in) run before the region, so its LoRA mask is the region's first draw too
    bernoulli = {torch.ops.aten.bernoulli_.float, torch.ops.aten.bernoulli_.Tensor, torch.ops.aten.bernoulli.p,
                 torch.ops.aten.bernoulli.default}
    m, x = build(case, depth=3, drop_path_rate=0.0), images()
    counts = {}
    for recompute in (False, True):
        fastpeft.patch(m, backend="torch", recompute=recompute)
        with _Count(bernoulli) as fwd:
            loss = m(x).square().mean()
        with _Count(bernoulli) as bwd:
            loss.backward()
        counts[recompute] = fwd.n, bwd.n
    if case == "lora":
        assert counts[False] == (3, 0)  # one input-dropout mask per block
    assert counts[True] == counts[False], counts


@pytest.mark.parametrize("case", ["lora", "adaptformer", "fact-tt"])
def test_plan_lands_within_its_byte_budget(case):
    # what the plan measures on its probes must be what the model then saves (e.g. the probe's own
    # shape-recording hooks must not switch off LoRA's pre-drawn dropout mask while it measures)
    from fastpeft.recompute import BYTE_BUDGET

    m = build(case, depth=12, name="vit_small_patch16_224", img_size=224, drop_path_rate=0.0)
    x = images(batch=4, img_size=224)
    ref = saved_activation_bytes(lambda: m(x).sum(), exclude=[m])
    fastpeft.patch(m, backend="torch", recompute=True)
    kept = saved_activation_bytes(lambda: m(x).sum(), exclude=[m])
    assert kept <= (BYTE_BUDGET + 0.002) * ref, (kept / ref, BYTE_BUDGET)


@pytest.mark.parametrize("run", ["lean", "early-stop", "no-early-stop"])
@pytest.mark.parametrize("mlp_drop", ["none", "drop1", "drop2"])
def test_gelu_is_not_rerun_in_backward_where_nothing_reads_its_output(mlp_drop, run, monkeypatch):
    # backward needs the GELU input (recomputed through fc1), never its output. A lean MLP half
    # recomputes only the input and applies GELU's backward formula to it, whatever the dropouts.
    # Regions: under plain checkpointing the recompute saves the input in GELU's place and stops
    # at fc2, before its GEMM. Mlp dropout: drop1's mask is redrawn as in forward; an active drop2
    # needs the recompute to run on through fc2 to reach its mask, so there the GELU is re-run.
    from torch.utils.checkpoint import set_checkpoint_early_stop

    from fastpeft import recompute

    if run != "lean":
        monkeypatch.setattr(recompute, "plan_lean", lambda model: False)
    early_stop = run != "no-early-stop"

    # (avg pool: the last block is checkpointed too, not computing the class token's row only)
    m, x = build("adaptformer", depth=3, drop_path_rate=0.1, proj_drop_rate=0.2, global_pool="avg"), images()
    for blk in m.blocks:
        blk.mlp.drop1.p = 0.2 if mlp_drop == "drop1" else 0.0
        blk.mlp.drop2.p = 0.2 if mlp_drop == "drop2" else 0.0
    fastpeft.patch(m, backend="torch")
    loss0, g0 = step(m, x)
    fastpeft.patch(m, backend="torch", recompute=True)
    for blk in m.blocks:  # (no kept GEMM outputs: every MLP region under plain checkpointing)
        blk.__dict__.pop("_fastpeft_keep", None)
    with set_checkpoint_early_stop(early_stop):
        m.zero_grad(set_to_none=True)
        torch.manual_seed(3)
        loss1 = m(x).square().mean()
        with _Count({torch.ops.aten.gelu}) as mode:
            loss1.backward()
    g1 = grads_of(m)
    assert torch.equal(loss0, loss1.detach()) and g0.keys() == g1.keys()
    assert all(torch.equal(g0[n], g1[n]) for n in g0)
    # (blocks 1 and 2: block 0's MLP input needs no gradient, its region saves nothing)
    assert mode.n == (2 if mlp_drop == "drop2" and run != "lean" else 0)


@pytest.mark.parametrize("case", ["bitfit", "adaptformer", "vpt-deep"])
def test_halves_kept_whole_run_without_recompute_and_save_what_the_policy_would(case, monkeypatch, regions_only):
    # a plain half (no hooks inside, nothing random) whose backward needs only what the plan keeps
    # ({qkv, attn}; {fc1}) runs outside checkpointing: bit-exact, no GEMM or attention re-run in
    # backward, and the same saved bytes as keeping them under the selective-checkpoint policy but
    # for the two LayerNorms' statistics (mean and rstd: 2 x [B, N] fp32 each)
    from fastpeft import recompute
    from fastpeft.recompute import ATTENTION_OPS

    # (average pooling: every block runs its halves, none computes the class token's row only)
    m, x = build(case, depth=3, drop_path_rate=0.1, global_pool="avg"), images()
    fastpeft.patch(m, backend="torch")
    loss0, g0 = step(m, x)
    fastpeft.patch(m, backend="torch", recompute=True)
    for blk in m.blocks:
        blk._fastpeft_keep = frozenset({"qkv", "attn", "fc1"})
        assert recompute._runs_plain(blk, "attn") and recompute._runs_plain(blk, "mlp")
    loss1, g1 = step(m, x)
    assert torch.equal(loss0, loss1) and all(torch.equal(g0[n], g1[n]) for n in g0)
    weights = {f"{i}.{n}": getattr(getattr(blk, part), n).weight for i, blk in enumerate(m.blocks)
               for part, n in (("attn", "qkv"), ("attn", "proj"), ("mlp", "fc1"), ("mlp", "fc2"))}
    loss = m(x).square().mean()
    with _GemmsByWeight(weights) as gemms, _Count(ATTENTION_OPS) as attn:
        loss.backward()
    assert attn.n == 0 and all(n <= 1 for n in gemms.calls.values()), (attn.n, gemms.calls)
    tokens = []
    handle = m.blocks[-1].norm1.register_forward_pre_hook(lambda mod, args: tokens.append(args[0].shape[1]))
    with torch.no_grad():
        m(x)
    handle.remove()  # (a hook inside a half makes it non-plain)
    plain = saved_activation_bytes(lambda: m(x).sum(), exclude=[m])
    monkeypatch.setattr(recompute, "_runs_plain", lambda blk, half: False)
    policy = saved_activation_bytes(lambda: m(x).sum(), exclude=[m])
    stats = 2 * 2 * x.shape[0] * tokens[0] * 4  # (two LayerNorms' mean and rstd)
    if case == "bitfit":  # (every block's input needs a gradient: trainable patch-embedding bias)
        assert plain - policy == len(m.blocks) * stats, (plain, policy)
    else:  # (where the first block needs none, run plainly it saves nothing at all)
        assert plain - policy <= len(m.blocks) * stats, (plain, policy)


def test_policy_keeps_nothing_where_no_gradient_flows(regions_only):
    # AdaptFormer's first block: the frozen path's input needs no gradient, so a kept GEMM output
    # there would be held to no use (the selective-checkpoint cache keeps what the policy says)
    m, x = build("adaptformer", depth=2), images()
    fastpeft.patch(m, backend="torch", recompute=True)
    sizes = {}
    for keep in (frozenset(), frozenset({"qkv", "fc1"})):
        for blk in m.blocks:
            blk.__dict__.pop("_fastpeft_keep", None)
        m.blocks[0]._fastpeft_keep = keep
        sizes[keep] = saved_activation_bytes(lambda: m(x).sum(), exclude=[m])
    assert len(set(sizes.values())) == 1, sizes


def _lean_build(case: str, **kw):
    m = build(case, depth=3, global_pool="avg", **kw)  # (avg pool: every block runs both halves)
    return m, images()


def _assert_lean(m, halves=("attn", "mlp")):
    for i, blk in enumerate(m.blocks):
        assert set(halves) <= set(blk.__dict__.get("_fastpeft_lean", ())), (i, blk.__dict__.get("_fastpeft_lean"))


@pytest.mark.parametrize("case", ["adaptformer", "lora", "bitfit"])
def test_lean_halves_save_neither_qkv_nor_the_gelu_input(case):
    # a lean block saves the reference's tensors less q / k / v (the qkv output's storage), the
    # attention output and the GELU input: no saved storage has the size of either [B, N, 3D] or
    # [B, N, 4D], where the default patch saves both in every block
    m, x = _lean_build(case)
    B, N, D = x.shape[0], (x.shape[-1] // 16) ** 2 + 1, m.embed_dim
    sizes = {"qkv": B * N * 3 * D * 4, "gelu": B * N * 4 * D * 4}

    def saved_sizes():
        seen = collections.Counter()

        def pack(t):
            if not isinstance(t, torch.nn.Parameter):
                seen[t.untyped_storage().nbytes()] += 1
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            m(x).sum()
        return {k: seen[v] for k, v in sizes.items()}

    fastpeft.patch(m, backend="torch")
    default = saved_sizes()
    assert default["qkv"] >= len(m.blocks) - 1 and default["gelu"] >= len(m.blocks) - 1, default
    report = fastpeft.patch(m, backend="torch", recompute=True)
    for blk in m.blocks:  # (the minimal plan: nothing kept whole)
        blk.__dict__.pop("_fastpeft_keep", None)
    _assert_lean(m)
    assert "lean recompute of the attention" in str(report) and "lean recompute of the GELU" in str(report)
    assert saved_sizes() == {"qkv": 0, "gelu": 0}


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_lean_mlp_recomputes_the_activation_output_a_hook_after_it_saves(backend, monkeypatch):
    # FacT's delta on fc2 saves its input, the GELU output [B, N, 4D] (the reference hook on the
    # torch backend, the fused FacT op on Triton): a lean MLP keeps neither it nor the GELU input.
    # Backward recomputes the GELU output for the delta's backward, and the activation's backward
    # reuses that fc1 output: one fc1 GEMM re-run per block, and the default patch's step bit for bit
    from fastpeft import recompute

    monkeypatch.setattr(recompute, "_within", lambda *a: True)  # (lean halves at this small size)
    monkeypatch.setattr(recompute, "LEAN_MARGIN", float("inf"))
    m, x = _lean_build("fact-tt")
    B, N, D = x.shape[0], (x.shape[-1] // 16) ** 2 + 1, m.embed_dim
    fastpeft.patch(m, backend=backend, recompute=True)
    for blk in m.blocks:  # (the minimal plan: nothing kept whole)
        blk.__dict__.pop("_fastpeft_keep", None)
    _assert_lean(m)
    sizes = collections.Counter()

    def pack(t):
        sizes[t.untyped_storage().nbytes()] += not isinstance(t, nn.Parameter)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = m(x).square().mean()
    assert sizes[B * N * 4 * D * 4] == 0, sizes
    fc1 = {str(i): blk.mlp.fc1.weight for i, blk in enumerate(m.blocks)}
    with _GemmsByWeight(fc1) as mode:
        loss.backward()
    # (each block: the input gradient's GEMM and the one re-run)
    assert all(mode.calls[str(i)] == 2 for i in range(len(m.blocks))), mode.calls
    fastpeft.unpatch(m)
    assert_recompute_bit_exact(m, x, backend)


@pytest.mark.parametrize("case", ["lora", "adaptformer"])
def test_lean_replays_every_random_draw_of_what_it_recomputes(case):
    # attention dropout (drawn inside the attention the backward re-runs), LoRA's input dropout
    # (drawn by the qkv hook the backward re-runs: pre-drawn on CPU), proj dropout and DropPath:
    # the recompute's values and every later draw are those of forward, bit for bit
    m, x = _lean_build(case, attn_drop_rate=0.2, proj_drop_rate=0.1)
    fastpeft.patch(m, backend="torch", recompute=True)
    _assert_lean(m, ("attn",))  # (the dropout masks the reference saves leave less room for lean MLPs here)
    assert all(blk._fastpeft_lean["attn"] for blk in m.blocks)  # (draws: its RNG state replayed)
    fastpeft.unpatch(m)
    assert_recompute_bit_exact(m, x, "torch")


@pytest.mark.parametrize("case", ["lora", "adaptformer"])
def test_lean_recomputes_under_the_forwards_autocast(case):
    # bf16 autocast on CPU: backward (outside the autocast context) recomputes the qkv and fc1
    # outputs in bf16 as forward made them, so the gradients are the default patch's bit for bit
    m, x = _lean_build(case)

    def autocast_step():
        m.zero_grad(set_to_none=True)
        torch.manual_seed(3)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = m(x).float().square().mean()
        loss.backward()
        return loss.detach(), grads_of(m)

    fastpeft.patch(m, backend="torch")
    loss0, g0 = autocast_step()
    fastpeft.patch(m, backend="torch", recompute=True)
    _assert_lean(m)
    loss1, g1 = autocast_step()
    assert torch.equal(loss0, loss1) and g0.keys() == g1.keys() and g0
    assert all(torch.equal(g0[n], g1[n]) for n in g0)


class _ScaledGELU(nn.Module):
    """An activation module with a parameter of its own and no `lean_backward`."""

    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(torch.tensor(1.25))

    def forward(self, h):
        return F.gelu(h) * self.gain


def test_lean_mlp_differentiates_any_other_activation_module():
    # an activation module the lean MLP knows nothing of is re-run on the recomputed fc1 output
    # with a graph and differentiated, for that output and the block parameters it reads
    m, x = _lean_build("bitfit", act_layer=_ScaledGELU)
    for blk in m.blocks:
        blk.mlp.act.gain.requires_grad_(True)
    fastpeft.patch(m, backend="torch", recompute=True)
    _assert_lean(m)
    fastpeft.unpatch(m)
    assert_recompute_bit_exact(m, x, "torch")
    assert all(blk.mlp.act.gain.grad is not None for blk in m.blocks[1:])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_lean_mlp_differentiates_a_fused_activation_for_its_parameters(backend):
    # SSF's fc1 scale-shift is fused into the Mlp's activation (fastpeft/fused/ssf.py SSFGELU):
    # the lean MLP half runs that module's own backward (`lean_backward`) on the recomputed fc1
    # output, for the gradients of the fc1 output and of the scale and shift it reads, bit for
    # bit those of the default patch
    m, x = _lean_build("ssf")
    fastpeft.patch(m, backend=backend, recompute=True)
    _assert_lean(m)
    assert type(m.blocks[1].mlp.act).__name__ == "SSFGELU"
    fastpeft.unpatch(m)
    assert_recompute_bit_exact(m, x, backend)


@pytest.mark.parametrize("case", ["lora", "noah", "fact-tt", "fact-tk", "kadaptation", "ssf"])
def test_lean_halves_remake_what_the_fused_ops_keep_the_makings_of(case, monkeypatch):
    # Triton backend: the fused qkv ops keep for their own backward what makes their output (x and
    # the rank-r u; x and the two H; the GEMM output SSF scales), and so does FacT's on fc1: the
    # lean halves remake those outputs from them (`ops._autograd.remake`) instead of re-running
    # norm1 / norm2 and the layers; SSF's fused LayerNorm + scale-shift remakes norm2's output,
    # on which fc1 re-runs. No norm runs in backward there (block 0's KAdaptation op keeps no H,
    # its input needing no gradient: it re-runs), and the step is the default patch's bit for bit
    from fastpeft import recompute

    monkeypatch.setattr(recompute, "_within", lambda *a: True)  # (lean halves at this small size)
    monkeypatch.setattr(recompute, "LEAN_MARGIN", float("inf"))
    m, x = _lean_build(case)
    fastpeft.patch(m, backend="triton", recompute=True)
    for blk in m.blocks:  # (the minimal plan: nothing kept whole)
        blk.__dict__.pop("_fastpeft_keep", None)
    _assert_lean(m)
    calls = collections.Counter()
    hooks = [norm.register_forward_pre_hook(lambda mod, args, key=(i, n): calls.update([key]))
             for i, blk in enumerate(m.blocks) for n, norm in (("norm1", blk.norm1), ("norm2", blk.norm2))]
    loss = m(x).square().mean()
    calls.clear()
    loss.backward()
    for h in hooks:
        h.remove()
    first = 1 if case == "kadaptation" else 0
    assert not any(calls[i, "norm1"] for i in range(first, len(m.blocks))), calls
    if case.startswith("fact") or case == "ssf":
        assert not any(calls[i, "norm2"] for i in range(len(m.blocks))), calls
    else:  # (the fc1 output is a plain Linear's: norm2 and fc1 re-run)
        assert all(calls[i, "norm2"] == 1 for i in range(len(m.blocks))), calls
    fastpeft.unpatch(m)
    assert_recompute_bit_exact(m, x, "triton")
