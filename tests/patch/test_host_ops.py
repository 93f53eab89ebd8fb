"""What a patched train step launches, counted: the host-overhead bench's model and shape
(bench/host.py: ViT-Ti, 5 tokens, batch 1, Triton launches stubbed and counted at Triton's own
level, aten ops that do work counted by a TorchDispatchMode). Counts only; its times are the
bench's (`pytest bench --bench-host`), never asserted here."""
from __future__ import annotations

import pytest
import torch

from bench import host as bench_host
from bench.measure import HostOpCounter
from tests.methods.conftest import make_vit


@pytest.mark.parametrize("label", bench_host.method_labels())
def test_default_patch_launches_no_more_than_eager_per_step(label):
    rows = {r["contender"]: r for r in bench_host.measure_method(label, rounds=1, warmup=1,
                                                                   contenders=("eager", "patch"))}
    assert all(r["status"] == "ok" for r in rows.values()), rows
    eager, patch = rows["eager"], rows["patch"]
    assert patch["launches"] <= eager["launches"], (label, patch["launches"], eager["launches"],
                                                    patch["triton_by_kernel"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_heads_gives_timms_views_and_its_backward_is_one_stack(dtype):
    from fastpeft.block import split_heads

    attn = make_vit(depth=1, img_size=32).blocks[0].attn
    B, N, H, d = 3, 7, attn.num_heads, attn.head_dim
    qkv = torch.randn(B, N, 3 * H * d, dtype=dtype, requires_grad=True)
    timm_split = qkv.reshape(B, N, 3, H, d).permute(2, 0, 3, 1, 4).unbind(0)  # timm Attention.forward's
    with torch.no_grad():
        no_graph = split_heads(attn, qkv)
    got = split_heads(attn, qkv)
    for views in (got, no_graph):
        for g, w in zip(views, timm_split, strict=True):
            assert (g.shape, g.stride(), g.data_ptr()) == (w.shape, w.stride(), w.data_ptr())
    grads = [torch.randn(B, H, N, d, dtype=dtype) for _ in range(3)]
    with HostOpCounter() as timm_ops:  # (the bench's count: aten ops that do work)
        (want,) = torch.autograd.grad(timm_split, qkv, grads)
    with HostOpCounter() as ops:
        (g,) = torch.autograd.grad(got, qkv, grads)
    assert torch.equal(g, want)  # copies only: bit for bit
    # straight into the qkv layout; timm's split stacks, then copies the stack into that layout
    assert dict(ops.by_op) == {"aten::stack": 1}, ops.by_op
    assert timm_ops.by_op["aten::clone"] == 1, timm_ops.by_op
