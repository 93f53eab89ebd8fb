"""fastpeft.patch / unpatch: report, idempotence, identity of parameters, backend errors, and the
recompute mode's exactness (selective checkpointing must not change a single gradient bit)."""
from __future__ import annotations

import copy
from functools import partial

import pytest
import torch

import fastpeft
from fastpeft.patch import resolve_backend
from tests.methods.conftest import images, make_vit, randomize_
from tests.patch.conftest import assert_recompute_bit_exact, train_step


def adaptformer_vit(drop_path: float = 0.1):
    m = make_vit(drop_path_rate=drop_path)
    fastpeft.inject(m, fastpeft.AdaptFormer(dim=8))
    randomize_([p for n, p in m.named_parameters() if "adaptmlp" in n])
    return m.train()


step = partial(train_step, seed=5)  # same dropout / DropPath draws in both runs


def bitfit_vit(drop_path: float = 0.1):
    # no fused rule, and average pooling (no class-token-only last block): only recompute changes
    # the model
    m = make_vit(drop_path_rate=drop_path, global_pool="avg")
    fastpeft.inject(m, fastpeft.BitFit())
    return m.train()


def test_recompute_is_bit_exact_and_keeps_parameters():
    m, x = bitfit_vit(), images()
    params_before = {n: p for n, p in m.named_parameters()}
    keys_before = list(m.state_dict())
    loss0, g0 = step(m, x)
    report = fastpeft.patch(m, backend="torch", recompute=True)
    assert report and "recompute" in str(report)
    assert all(p is params_before[n] for n, p in m.named_parameters())
    assert list(m.state_dict()) == keys_before
    loss1, g1 = step(m, x)
    assert torch.equal(loss0, loss1)
    assert g0.keys() == g1.keys()
    for n in g0:
        assert torch.equal(g0[n], g1[n]), n


def test_recompute_over_fused_ops_is_bit_exact():
    # the fused adapter draws its dropout seed from torch's generator; the checkpoint replays
    # the RNG state, so recomputation regenerates the very same masks
    m = make_vit(depth=1, img_size=32, drop_path_rate=0.1)
    fastpeft.inject(m, fastpeft.AdaptFormer(dim=8))
    randomize_([p for n, p in m.named_parameters() if "adaptmlp" in n])
    m.train()
    x = images(batch=1, img_size=32)
    report = fastpeft.patch(m, backend="triton")  # the fused adapter (Triton interpreter)
    assert "fused bottleneck adapter" in str(report)
    assert_recompute_bit_exact(m, x, "triton", seed=5)


def test_patch_is_idempotent_and_unpatch_restores():
    m = adaptformer_vit()
    r1 = fastpeft.patch(m, backend="torch", recompute=True)
    cls = type(m.blocks[0])
    r2 = fastpeft.patch(m, backend="torch", recompute=True)
    assert r2 is r1 and type(m.blocks[0]) is cls
    fastpeft.unpatch(m)
    assert "_fastpeft_run" not in m.blocks[0].__dict__
    fastpeft.unpatch(m)  # no-op


def test_unpatch_restores_plain_timm_blocks():
    m = make_vit()
    fastpeft.inject(m, fastpeft.LinearProbe()) if hasattr(fastpeft, "LinearProbe") else None
    cls = type(m.blocks[0])
    fastpeft.patch(m, backend="torch", recompute=True)
    assert type(m.blocks[0]) is not cls
    fastpeft.unpatch(m)
    assert type(m.blocks[0]) is cls


def test_nothing_to_patch_reports_and_leaves_model_unchanged():
    m = make_vit()
    cls = type(m.blocks[0])
    report = fastpeft.patch(m, backend="torch")
    assert not report and "nothing to patch" in str(report)
    assert type(m.blocks[0]) is cls and "_fastpeft_patch" not in m.__dict__


def test_patched_model_deepcopies():
    m, x = adaptformer_vit(), images()
    fastpeft.patch(m, backend="torch", recompute=True)
    m2 = copy.deepcopy(m)
    _, g1 = step(m, x)
    _, g2 = step(m2, x)
    for n in g1:
        assert torch.equal(g1[n], g2[n])


@pytest.mark.parametrize("bad", ["cuda", "fast", ""])
def test_bad_backend_name(bad):
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend(bad, torch.device("cpu"))


def test_triton_on_cpu_requires_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        resolve_backend("triton", torch.device("cpu"))


def test_auto_on_cpu_never_picks_triton():
    assert resolve_backend("auto", torch.device("cpu")) in ("cpp", "torch")


def test_bad_inputs():
    with pytest.raises(ValueError, match="VisionTransformer"):
        fastpeft.patch(torch.nn.Linear(3, 3))
    m = adaptformer_vit()
    with pytest.raises(ValueError, match="recompute must be a bool"):
        fastpeft.patch(m, recompute="yes")
