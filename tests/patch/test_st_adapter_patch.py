"""fastpeft.patch on an ST-Adapter video model: the fused serial adapters (fastpeft/ops/st_adapter.py)
and recompute give the reference model's logits and gradients; recompute keeps at most 0.4x of the
reference's saved bytes; torch.compile(fullgraph=True) runs the patched model; a clip with the wrong
frame count is refused before any kernel runs."""
from __future__ import annotations

import pytest
import timm
import torch

import fastpeft
from tests.methods.conftest import assert_patch_saves_less
from tests.patch.conftest import assert_compiled_step_matches, close_scaled, train_step


def build(positions=("attn", "mlp"), frames=3, depth=2, img=48, embed_dim=64, heads=2, seed=0):
    torch.manual_seed(seed)
    m = timm.create_model("vit_base_patch16_clip_quickgelu_224", pretrained=False, num_classes=5, depth=depth,
                          img_size=img, embed_dim=embed_dim, num_heads=heads)
    fastpeft.inject(m, fastpeft.STAdapter(width=16, positions=positions, frames=frames))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if ".adapter_pre_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return m


def clips(B=2, T=3, img=48, seed=2):
    return torch.randn(B, T, 3, img, img, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("recompute", [False, True], ids=["default", "recompute"])
@pytest.mark.parametrize("positions", [("mlp",), ("attn", "mlp")], ids=["mlp", "attn+mlp"])
def test_patched_equals_reference(backend, recompute, positions):
    m, x = build(positions), clips()
    loss0, g0 = train_step(m, x)
    report = fastpeft.patch(m, backend=backend, recompute=recompute)
    assert any("STAdapter" in w for w, _, _ in report.patched), str(report)
    loss1, g1 = train_step(m, x)
    close_scaled(loss1, loss0, 1e-5)
    assert g1.keys() == g0.keys() and len(g0) == 2 + 6 * len(positions) * 2
    for n in g0:
        close_scaled(g1[n], g0[n], 1e-4)
    fastpeft.unpatch(m)
    loss2, g2 = train_step(m, x)
    assert torch.equal(loss2, loss0)


def test_patch_keeps_parameters_and_names():
    m = build()
    before = {n: p for n, p in m.named_parameters()}
    keys = list(m.state_dict())
    fastpeft.patch(m, backend="torch")
    assert list(m.state_dict()) == keys
    assert all(p is before[n] for n, p in m.named_parameters())


def test_recompute_saves_at_most_0_4x():
    # ViT-S width, 6 blocks, 101 tokens per frame, 2 clips of 2 frames (ViT-B/16 x 8 frames: the bench)
    torch.manual_seed(0)
    m = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=5, depth=6, img_size=160)
    fastpeft.inject(m, fastpeft.STAdapter(width=192, frames=2))
    x = clips(B=2, T=2, img=160)
    assert_patch_saves_less(m, x)


def test_torch_compile_fullgraph():
    m, x = build(), clips()
    loss0, g0 = train_step(m, x)
    fastpeft.patch(m, backend="torch")
    assert_compiled_step_matches(m, x, loss0, g0)


def test_wrong_frame_count_is_refused_before_any_kernel():
    m = build()
    fastpeft.patch(m, backend="triton")
    with pytest.raises(ValueError, match="clips of 3 frames, got 4"):
        m(clips(T=4))
    blk = m.blocks[0]
    with pytest.raises(ValueError, match="3 frames per clip; 4 frames"):
        blk._fastpeft_slots["block_in"][0](torch.randn(4, 10, 64))
