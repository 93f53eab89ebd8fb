"""Shared fixtures for the reference-method tests: small random-init timm ViTs (no weights are
downloaded anywhere) and gradient helpers."""
from __future__ import annotations

import pytest
import timm
import torch


def make_vit(name: str = "vit_tiny_patch16_224", *, depth: int | None = 2, num_classes: int = 10,
             img_size: int = 64, seed: int = 0, **kw) -> torch.nn.Module:
    """A small random ViT: `depth` blocks at `img_size` (64 px / patch 16 -> 4x4 grid)."""
    torch.manual_seed(seed)
    if depth is not None:
        kw["depth"] = depth
    return timm.create_model(name, pretrained=False, num_classes=num_classes, img_size=img_size, **kw)


def images(batch: int = 2, img_size: int = 64, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, img_size, img_size, generator=g)


def grads_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def randomize_(params, std: float = 0.02, seed: int = 3) -> None:
    """Move zero-initialised method parameters off zero so branches are actually exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)


@pytest.fixture
def vit():
    return make_vit()


@pytest.fixture
def x():
    return images()
