"""`fastpeft.patch(model, recompute=True)` for every method: bit-identical losses and gradients
(dropout and DropPath active: the checkpoint replays the RNG), at most 0.4x the reference's saved
activation bytes at 197 tokens, and a recompute that re-runs only the GEMMs it must (qkv, fc1),
never the proj / fc2 GEMMs behind them."""
from __future__ import annotations

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastpeft
from fastpeft.profile import saved_activation_bytes
from tests.methods.conftest import grads_of, images, make_vit, randomize_

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


def build(case: str, depth: int = 2, **kw):
    m = make_vit(depth=depth, drop_path_rate=0.1, **kw)
    fastpeft.inject(m, METHODS[case](depth))
    randomize_([p for _, p in fastpeft.trainable_parameters(m)])
    return m.train()


def step(m, x, seed=3):
    m.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the same dropout / DropPath draws in both runs
    loss = m(x).square().mean()
    loss.backward()
    return loss.detach(), grads_of(m)


@pytest.mark.parametrize("case", sorted(METHODS))
def test_recompute_is_bit_exact(case):
    m, x = build(case), images()
    fastpeft.patch(m, backend="torch")
    loss0, g0 = step(m, x)
    fastpeft.patch(m, backend="torch", recompute=True)
    loss1, g1 = step(m, x)
    assert torch.equal(loss1, loss0)
    assert g1.keys() == g0.keys() and g0
    for n in g0:
        assert torch.equal(g1[n], g0[n]), n


@pytest.mark.parametrize("case", sorted(METHODS))
def test_recompute_saves_at_most_0_4x(case):
    # ViT-S width, 12 blocks, 197 tokens (the target is for ViT-B/16; the bench reports it)
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


@pytest.mark.parametrize("case", ["adaptformer", "ssf", "bitfit", "lora"])
def test_backward_reruns_only_the_qkv_and_fc1_gemms(case):
    m = build(case, depth=3)
    x = images()
    fastpeft.patch(m, backend="torch", recompute=True)
    blk = m.blocks[1]  # a block whose input requires grad
    layers = {"qkv": blk.attn.qkv, "proj": blk.attn.proj, "fc1": blk.mlp.fc1, "fc2": blk.mlp.fc2}
    loss = m(x).square().mean()
    with _GemmsByWeight({n: mod.weight for n, mod in layers.items()}) as mode:
        loss.backward()
    # forward re-runs in backward: qkv and fc1 once each; input-gradient GEMMs: one per layer
    assert mode.calls == {"qkv": 2, "fc1": 2, "proj": 1, "fc2": 1}, dict(mode.calls)
