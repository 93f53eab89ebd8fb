"""Shared fixtures for the reference-method tests: small random-init timm ViTs (no weights are
downloaded anywhere) and gradient helpers."""
from __future__ import annotations

import pytest
import timm
import torch

import fastpeft


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


def assert_grads_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], atol: float, rtol: float) -> None:
    """The same parameters got gradients, each within (atol, rtol) of the wanted one."""
    assert got.keys() == want.keys()
    for n in want:
        torch.testing.assert_close(got[n], want[n], atol=atol, rtol=rtol, msg=lambda m, n=n: f"{n}: {m}")


def vitb_meta(**kw) -> torch.nn.Module:
    """ViT-B/16 on the meta device (no memory, no weights): for parameter counts and names."""
    with torch.device("meta"):
        return timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=10, **kw)


def method_params(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The trainable parameters a method added or unfroze (the classifier head left out)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("head.")}


def assert_patch_saves_less(model: torch.nn.Module, x: torch.Tensor) -> None:
    """Saved activation bytes of a train forward: default `patch` below the reference's, and
    `patch(recompute=True)` at most 0.4x of it (the memory promise)."""
    from fastpeft.profile import saved_activation_bytes

    ref = saved_activation_bytes(lambda: model(x).sum(), exclude=[model])
    fastpeft.patch(model, backend="torch")
    fused = saved_activation_bytes(lambda: model(x).sum(), exclude=[model])
    fastpeft.patch(model, backend="torch", recompute=True)
    kept = saved_activation_bytes(lambda: model(x).sum(), exclude=[model])
    assert fused < ref, (fused / ref, fused, ref)
    assert kept <= 0.4 * ref, (kept / ref, kept, ref)


def assert_grads_reach_only_trainable(model: torch.nn.Module) -> None:
    """After a backward: every trainable parameter has a nonzero grad, every frozen one none."""
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().max() > 0, n
        else:
            assert p.grad is None, n


def assert_out_and_grads_match(out, ref, params, proj) -> None:
    """out == ref (the reference math) and, for the loss (· * proj).sum(), each param's grad is
    nonzero and matches the reference's."""
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    g1 = torch.autograd.grad((out * proj).sum(), params)
    g2 = torch.autograd.grad((ref * proj).sum(), params)
    for a, b in zip(g1, g2):
        assert a.abs().max() > 0
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def assert_inject_refused_unchanged(model: torch.nn.Module, cfg, match: str) -> None:
    """inject(model, cfg) raises ValueError matching `match` and leaves the model's keys and
    requires_grad flags as they were."""
    keys = list(model.state_dict())
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=match):
        fastpeft.inject(model, cfg)
    assert list(model.state_dict()) == keys
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


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


def assert_train_forward_deterministic(model: torch.nn.Module, x: torch.Tensor) -> None:
    """With every dropout at 0, a train-mode forward must not depend on the RNG state."""
    model.train()
    torch.manual_seed(0)
    first = model(x)
    torch.manual_seed(1)
    assert torch.equal(first, model(x))


def assert_dropout_follows_train_eval(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Training forwards draw new dropout masks (two calls differ); eval forwards are deterministic
    and differ from the training ones. Returns the first training output."""
    model.train()
    a, b = model(x), model(x)
    assert not torch.allclose(a, b)
    model.eval()
    c, d = model(x), model(x)
    assert torch.equal(c, d) and not torch.allclose(c, a)
    return a


def load_official_state_dict(model: torch.nn.Module, sd: dict) -> None:
    """Load an official-layout state dict of the method's tensors (strict=False: the frozen
    backbone's keys are not in it); every key must land."""
    res = model.load_state_dict(sd, strict=False)
    assert res.unexpected_keys == [] and not set(sd) & set(res.missing_keys)


def assert_merge_refused(model: torch.nn.Module, match: str) -> None:
    """merge raises a ValueError that says why (`match`) and leaves every tensor as it was."""
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        fastpeft.merge(model)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())


def assert_matches_formulation(model: torch.nn.Module, out: torch.Tensor, ref: torch.Tensor) -> None:
    """The model's output equals the independent formulation's, and so does the gradient of every
    trainable parameter for a fixed random output cotangent."""
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    names, params = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad])
    g_out = torch.autograd.grad((out * w).sum(), params)
    g_ref = torch.autograd.grad((ref * w).sum(), params)
    for n, a, b in zip(names, g_out, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m: f"grad of {n}: {m}")
