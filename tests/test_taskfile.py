"""Task files (fastpeft.save / fastpeft.load): a round trip onto a fresh backbone gives the same
model bit for bit, for every method; a file for another backbone or clashing methods is refused
before the model changes; the file is the task's tensors plus a small header."""
from __future__ import annotations

import os

import pytest
import torch

import fastpeft
from fastpeft.demo import demo_configs
from fastpeft.taskfile import FORMAT, read_header
from tests.methods.conftest import grads_of, images, make_vit, randomize_

DEPTH = 2
CONFIGS = dict(demo_configs(DEPTH))


def trained(label: str, seed: int = 0):
    """A backbone (random init `seed`) with the method injected and every trainable tensor moved
    off its init, as after some training."""
    m = make_vit(depth=DEPTH, img_size=32, seed=seed)
    fastpeft.inject(m, CONFIGS[label])
    randomize_([p for _, p in fastpeft.trainable_parameters(m)], std=0.05, seed=7)
    return m


def forward_backward(m, x):
    m.train()
    torch.manual_seed(11)  # dropout draws the same masks in both models
    out = m(x)
    m.zero_grad(set_to_none=True)
    out.square().mean().backward()
    return out.detach(), grads_of(m)


def assert_same_model(a, b, x):
    out_a, g_a = forward_backward(a, x)
    out_b, g_b = forward_backward(b, x)
    assert torch.equal(out_a, out_b)
    assert g_a.keys() == g_b.keys() and g_a
    for k in g_a:
        assert torch.equal(g_a[k], g_b[k]), k
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("label", sorted(CONFIGS))
def test_round_trip_onto_a_fresh_backbone_is_bit_exact(label, tmp_path):
    src = trained(label)
    path = fastpeft.save(src, tmp_path / "task.safetensors")
    dst = make_vit(depth=DEPTH, img_size=32, seed=0)  # the same frozen backbone, no method
    assert fastpeft.load(dst, path) is dst
    assert [type(i.method) for i in fastpeft.injections(dst)] == [type(CONFIGS[label])]
    assert fastpeft.injections(dst)[0].method == CONFIGS[label]
    assert_same_model(src, dst, images(batch=3, img_size=32))


@pytest.mark.parametrize("label", ["LoRA qkv", "SSF", "VPT-deep", "BitFit"])
def test_file_size_is_the_tensors_plus_a_small_header(label, tmp_path):
    src = trained(label)
    path = fastpeft.save(src, tmp_path / "task.safetensors")
    header = read_header(path)
    state = src.state_dict()
    payload = sum(state[k].numel() * state[k].element_size() for k in header["tensors"])
    trainable = sum(p.numel() * p.element_size() for _, p in src.named_parameters() if p.requires_grad)
    assert payload >= trainable  # every trainable tensor is in (plus the methods' buffers, if any)
    assert payload < sum(t.numel() * t.element_size() for t in state.values()) / 2  # not the backbone
    assert 0 < os.path.getsize(path) - payload < 4096 + 64 * len(header["tensors"])
    assert header["format"] == FORMAT and header["backbone"]["depth"] == DEPTH
    assert header["timm_model"] == "vit_tiny_patch16_224"


def test_save_works_on_a_patched_model_and_load_into_it(tmp_path):
    src = trained("LoRA qkv")
    want = fastpeft.save(src, tmp_path / "ref.safetensors")
    fastpeft.patch(src, backend="torch")
    got = fastpeft.save(src, tmp_path / "patched.safetensors")
    assert want.read_bytes() == got.read_bytes()
    # a patched model holding the same method takes the tensors (names never change under patch)
    other = trained("LoRA qkv", seed=0)
    with torch.no_grad():
        for _, p in fastpeft.trainable_parameters(other):
            p.zero_()
    fastpeft.patch(other, backend="torch")
    fastpeft.load(other, want)
    fastpeft.unpatch(src)
    fastpeft.unpatch(other)
    assert_same_model(src, other, images(batch=2, img_size=32))


def test_loadable_after_merge_and_unmerge(tmp_path):
    src = trained("FacT-TT")
    path = fastpeft.save(src, tmp_path / "task.safetensors")
    dst = fastpeft.load(make_vit(depth=DEPTH, img_size=32, seed=0), path)
    fastpeft.merge(dst)
    with pytest.raises(ValueError, match="unmerge"):
        fastpeft.save(dst, tmp_path / "merged.safetensors")
    fastpeft.unmerge(dst)
    again = fastpeft.save(dst, tmp_path / "again.safetensors")
    assert again.read_bytes() == path.read_bytes()


def _snapshot(m):
    return {k: v.clone() for k, v in m.state_dict().items()}, [type(i.method) for i in fastpeft.injections(m)]


def _assert_unchanged(m, snap):
    state, injs = snap
    now = m.state_dict()
    assert now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)
    assert [type(i.method) for i in fastpeft.injections(m)] == injs


@pytest.mark.parametrize("change, named", [
    (dict(embed_dim=96, num_heads=3), "embed_dim=192 (file) vs 96 (model)"),
    (dict(depth=3), "depth=2 (file) vs 3 (model)"),
    (dict(patch_size=8), "patch_size"),
    (dict(num_classes=5), "num_classes=10 (file) vs 5 (model)"),
    (dict(img_size=48), "grid_size"),
])
def test_another_backbone_is_refused_naming_the_mismatch(change, named, tmp_path):
    path = fastpeft.save(trained("LoRA qkv"), tmp_path / "task.safetensors")
    kw = dict(depth=DEPTH, img_size=32, seed=0)
    if "num_classes" in change or "depth" in change or "img_size" in change:
        kw.update(change)
        change = {}
    m = make_vit(**kw, **change)
    snap = _snapshot(m)
    with pytest.raises(ValueError, match=named.replace("(", r"\(").replace(")", r"\)")):
        fastpeft.load(m, path)
    _assert_unchanged(m, snap)


def test_a_model_with_other_methods_is_refused_unchanged(tmp_path):
    path = fastpeft.save(trained("LoRA qkv"), tmp_path / "task.safetensors")
    m = make_vit(depth=DEPTH, img_size=32, seed=0)
    fastpeft.inject(m, fastpeft.SSF())
    snap = _snapshot(m)
    with pytest.raises(ValueError, match="already holds SSF"):
        fastpeft.load(m, path)
    _assert_unchanged(m, snap)
    # the same method with another config is a clash too
    m2 = make_vit(depth=DEPTH, img_size=32, seed=0)
    fastpeft.inject(m2, fastpeft.LoRA(rank=4))
    with pytest.raises(ValueError, match="already holds LoRA"):
        fastpeft.load(m2, path)


def test_a_bad_tensor_rolls_the_injection_back(tmp_path):
    from safetensors.torch import load_file, save_file

    src = trained("AdaptFormer")
    path = fastpeft.save(src, tmp_path / "task.safetensors")
    tensors = load_file(str(path))
    name = next(k for k in tensors if "adaptmlp" in k and k.endswith("weight"))
    tensors[name] = tensors[name][:-1]  # one row short
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    m = make_vit(depth=DEPTH, img_size=32, seed=0)
    snap = _snapshot(m)
    with pytest.raises(ValueError, match=f"{name} has shape"):
        fastpeft.load(m, bad)
    _assert_unchanged(m, snap)
    # a tensor the methods need, missing
    del tensors[name]
    save_file(tensors, str(bad), metadata=meta)
    with pytest.raises(ValueError, match="missing"):
        fastpeft.load(m, bad)
    _assert_unchanged(m, snap)


def test_not_a_task_file(tmp_path):
    from safetensors.torch import save_file

    m = make_vit(depth=DEPTH, img_size=32)
    with pytest.raises(FileNotFoundError):
        fastpeft.load(m, tmp_path / "nope.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a safetensors task file"):
        fastpeft.load(m, junk)
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(ValueError, match="no fastpeft header"):
        fastpeft.load(m, plain)
    with pytest.raises(ValueError, match="no injected method"):
        fastpeft.save(m, tmp_path / "empty.safetensors")
