"""The ConvNet / video part of `python -m fastpeft demo`: Conv-Adapter on a timm ResNet-50 and
ST-Adapter on a timm ViT over video clips, each trained a few steps on generated data, three ways
(reference, `fastpeft.patch`, `patch(recompute=True)`), in the method demo's table format.

Data (generated, seeded; nothing is downloaded):
* images: 4 classes of oriented stripes (0, 45, 90, 135 degrees) at a random phase and frequency,
  plus noise, 32x32;
* clips: 4 classes of motion (a bright square moving right, left, down or up) over 8 frames of
  32x32, from a random start, plus noise: only temporal mixing tells the classes apart.
Backbones are random-init, so accuracy after a few steps shows little; the point is that the three
contenders train alike while their step time and saved bytes differ.
"""
from __future__ import annotations

import math

import timm
import torch
from rich.console import Console

import fastpeft

from .demo import DemoSettings, DigitsSplit, MethodResult, results_table, run_contenders

IMG = 32
FRAMES = 8


def stripes(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    ang = y.float() * math.pi / 4
    freq = 0.3 + 0.4 * torch.rand(n, generator=g)
    phase = 2 * math.pi * torch.rand(n, generator=g)
    r = torch.arange(IMG, dtype=torch.float32)
    yy, xx = torch.meshgrid(r, r, indexing="ij")
    proj = xx[None] * ang.cos()[:, None, None] + yy[None] * ang.sin()[:, None, None]
    img = torch.sin(freq[:, None, None] * proj + phase[:, None, None])
    x = img[:, None].repeat(1, 3, 1, 1) + 0.5 * torch.randn(n, 3, IMG, IMG, generator=g)
    return x, y


def moving_squares(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    step = torch.tensor([[0, 2], [0, -2], [2, 0], [-2, 0]])[y]  # (dy, dx) per frame
    start = torch.randint(8, IMG - 16, (n, 2), generator=g)
    x = 0.5 * torch.randn(n, FRAMES, 3, IMG, IMG, generator=g)
    for i in range(n):
        for t in range(FRAMES):
            r0, c0 = (start[i] + t * step[i]).clamp(0, IMG - 8).tolist()
            x[i, t, :, r0:r0 + 8, c0:c0 + 8] += 2.0
    return x, y


def _split(make, n_train: int, n_test: int) -> DigitsSplit:
    tx, ty = make(n_train, 0)
    vx, vy = make(n_test, 1)
    return DigitsSplit(tx, ty, vx, vy, num_classes=4)


def _resnet() -> torch.nn.Module:
    m = timm.create_model("resnet50", pretrained=False, num_classes=4)
    fastpeft.inject(m, fastpeft.ConvAdapter(reduction=8))
    return m


def _video_vit() -> torch.nn.Module:
    m = timm.create_model("vit_base_patch16_clip_quickgelu_224", pretrained=False, num_classes=4, img_size=IMG,
                          patch_size=8, depth=4, embed_dim=192, num_heads=3)
    fastpeft.inject(m, fastpeft.STAdapter(width=96, positions=("attn", "mlp"), frames=FRAMES))
    return m


def run_family(label: str, build, data: DigitsSplit, s: DemoSettings, on_step=None) -> MethodResult:
    torch.manual_seed(0)
    return run_contenders(label, build().to(s.device), data, s, on_step)


def demo_families(args, console: Console, device: torch.device) -> list[MethodResult]:
    quick = bool(getattr(args, "quick", False))
    s = DemoSettings(device=str(device), steps=3 if quick else 10, warmup=1 if quick else 2, batch=8, lr=1e-3)
    n_train, n_test = (16, 8) if quick else (160, 64)
    console.rule("[bold]Beyond image ViTs: Conv-Adapter (ResNet-50) and ST-Adapter (video ViT)")
    console.print(f"generated data: {n_train} train / {n_test} held-out; {s.steps} AdamW steps of batch {s.batch}, "
                  f"lr {s.lr}, {device.type}; random-init backbones", highlight=False)
    results = [
        run_family("Conv-Adapter", _resnet, _split(stripes, n_train, n_test), s),
        run_family("ST-Adapter", _video_vit, _split(moving_squares, n_train, n_test), s),
    ]
    console.print(results_table(results, "Conv-Adapter: 32x32 stripes, 4 classes; ST-Adapter: CLIP-style ViT "
                                         "(4 blocks, width 192) on 8-frame 32x32 clips of moving squares, 4 directions"))
    console.print("trainable parameters: " + "; ".join(f"{r.label} {r.params:,}" for r in results), highlight=False)
    return results
