"""fastpeft.patch on a Conv-Adapter ConvNet (ResNet-50 / ConvNeXt): the fused epilogues
(fastpeft/ops/conv_adapter.py) and recompute (block checkpointing with a byte-budget plan of kept
conv outputs) give the reference model's logits, gradients and BatchNorm statistics; recompute
keeps at most 0.4x of the reference's saved bytes; unpatch restores the reference;
torch.compile(fullgraph=True) runs the patched model."""
from __future__ import annotations

import pytest
import timm
import torch

import fastpeft
from fastpeft.patch import patch_report
from tests.methods.conftest import assert_patch_saves_less
from tests.patch.conftest import assert_compiled_step_matches, close_scaled, train_step


def build(name="resnet", reduction=8, **kw):
    """resnet: timm's ResNet with one Bottleneck per stage (resnet50's blocks and widths);
    convnext: a small timm ConvNeXt (depths 1, 1, 2, 1); "resnet50": the real one."""
    from timm.models.convnext import ConvNeXt
    from timm.models.resnet import Bottleneck, ResNet

    torch.manual_seed(0)
    if name == "resnet":
        m = ResNet(Bottleneck, [1, 1, 1, 1], num_classes=5)
    elif name == "convnext":
        m = ConvNeXt(depths=(1, 1, 2, 1), dims=(32, 64, 96, 128), num_classes=5)
    else:
        m = timm.create_model(name, pretrained=False, num_classes=5)
    fastpeft.inject(m, fastpeft.ConvAdapter(reduction=reduction, **kw))
    if name == "convnext":
        with torch.no_grad():
            for blk in m.modules():
                if isinstance(getattr(blk, "gamma", None), torch.nn.Parameter):
                    blk.gamma.fill_(0.5)
    return m


def _bn_state(m):
    return {k: v.clone() for k, v in m.state_dict().items() if "running_" in k or "num_batches" in k}


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("recompute", [False, True], ids=["default", "recompute"])
@pytest.mark.parametrize("name", ["resnet", "convnext"])
def test_patched_equals_reference(name, recompute, backend):
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    ref = build(name)
    ref.train()
    loss0, g0 = train_step(ref, x)
    bn0 = _bn_state(ref)
    m = build(name)
    m.train()
    report = fastpeft.patch(m, backend=backend, recompute=recompute)
    assert any("Conv-Adapters" in w for w, _, _ in report.patched), str(report)
    loss1, g1 = train_step(m, x)
    close_scaled(loss1, loss0, 1e-5)
    assert g1.keys() == g0.keys()
    for n in g0:
        close_scaled(g1[n], g0[n], 1e-4)
    bn1 = _bn_state(m)  # train-mode BN statistics updated exactly once, also under recompute
    for k in bn0:
        close_scaled(bn1[k].float(), bn0[k].float(), 1e-5)
    fastpeft.unpatch(m)
    assert not any(type(v).__name__.startswith(("Fused", "Checkpointed")) for mod in m.modules()
                   for v in mod.__dict__.values())


def test_patch_keeps_parameters_and_names():
    m = build()
    before = dict(m.named_parameters())
    keys = list(m.state_dict())
    fastpeft.patch(m, backend="torch", recompute=True)
    assert list(m.state_dict()) == keys
    assert all(p is before[n] for n, p in m.named_parameters())
    with pytest.raises(ValueError, match="unpatch"):
        fastpeft.remove(m)


def test_saved_bytes():
    m = build("resnet50")
    m.train()
    x = torch.randn(2, 3, 96, 96)
    assert_patch_saves_less(m, x)
    # (the last patch is the recompute one: its byte-budget plan keeps the 3x3 conv outputs, the
    # most recompute spared per byte, in every block, and stays within the bound above)
    report = patch_report(m)
    assert report.recompute and any("conv2 in 16 blocks" in what for _, what, _ in report.patched), str(report)


def test_torch_compile_fullgraph():
    x = torch.randn(2, 3, 32, 32)
    m = build("convnext")
    loss0, g0 = train_step(m, x)
    fastpeft.patch(m, backend="torch")
    assert_compiled_step_matches(m, x, loss0, g0)
