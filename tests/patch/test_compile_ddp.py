"""A patched model under torch.compile(fullgraph=True) and under DistributedDataParallel (2 CPU
processes, gloo) gives the same results as the eager single-process patched model.

fullgraph=True makes any graph break an error, so `test_compile_fullgraph_every_method` is the
zero-graph-break check for every method of `fastpeft.demo.demo_configs` (dropout off, so eager and
compiled draw nothing random), default and recompute, on the CPU default backend ("auto": the C++
extension where it has the op); `test_compile_fullgraph` also runs the "torch" backend."""
from __future__ import annotations

import copy
import dataclasses
import os
import socket
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastpeft
from fastpeft.demo import demo_configs
from tests.methods.conftest import assert_grads_close, grads_of, images, make_vit, randomize_

DEMO_DEPTH = 2
DEMO_LABELS = [label for label, _ in demo_configs(DEMO_DEPTH)]

METHODS = {
    "ssf": lambda: fastpeft.SSF(),
    "adaptformer": lambda: fastpeft.AdaptFormer(dim=8, dropout=0.0),
    "adapter": lambda: fastpeft.Adapter(dim=8, dropout=0.0),
    # recompute=True: FacT's proj / fc2 compute their additive deltas before the GEMM,
    # Convpass's branches run before the frozen path in their region
    "fact-tt": lambda: fastpeft.FacT(kind="tt", rank=4, dropout=0.0),
    "convpass": lambda: fastpeft.Convpass(dim=8, dropout=0.0),
}


def patched_model(method: str, recompute: bool, seed: int = 0):
    m = make_vit(depth=2, img_size=32, seed=seed)
    fastpeft.inject(m, METHODS[method]())
    randomize_([p for _, p in fastpeft.trainable_parameters(m)])
    fastpeft.patch(m, backend="torch", recompute=recompute)
    return m.train()


@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_compile_fullgraph(method, recompute):
    m, x = patched_model(method, recompute), images(batch=2, img_size=32)
    out = m(x)
    out.square().mean().backward()
    want = grads_of(m)
    m.zero_grad(set_to_none=True)
    torch._dynamo.reset()  # a fresh cache per case: no recompile limit across the parametrization
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    got_out = compiled(x)
    got_out.square().mean().backward()
    torch.testing.assert_close(got_out, out, atol=1e-5, rtol=1e-4)
    got = grads_of(m)
    for n in want:
        torch.testing.assert_close(got[n], want[n], atol=1e-5, rtol=1e-4, msg=n)


def test_compile_fullgraph_inductor():
    # the real compiler (C++ codegen on CPU) over fused custom ops + hooks + slots
    m, x = patched_model("ssf", recompute=False), images(batch=2, img_size=32)
    out = m(x)
    compiled = torch.compile(m, fullgraph=True)
    torch.testing.assert_close(compiled(x), out, atol=1e-4, rtol=1e-4)


def _demo_method_without_dropout(label: str):
    method = next(m for name, m in demo_configs(DEMO_DEPTH) if name == label)
    off = {f.name: 0.0 for f in dataclasses.fields(method) if f.name in ("dropout", "lora_dropout")}
    return dataclasses.replace(method, **off)


@pytest.mark.parametrize("recompute", [False, True], ids=["default", "recompute"])
@pytest.mark.parametrize("label", DEMO_LABELS)
def test_compile_fullgraph_every_method(label, recompute):
    m = make_vit(depth=DEMO_DEPTH, img_size=32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # KAdaptation's official-init notice
        fastpeft.inject(m, _demo_method_without_dropout(label))
    randomize_([p for _, p in fastpeft.trainable_parameters(m)])
    fastpeft.patch(m, recompute=recompute)
    m.train()
    # (the compiled copy's first call is its first call after patch: whatever a patched model
    # caches on its first call is traced, and must not fail a guard on the second)
    mc = copy.deepcopy(m)
    x = images(batch=2, img_size=32)
    out = m(x)
    out.square().mean().backward()
    want = grads_of(m)
    assert want, "no gradients: nothing to compare"
    torch._dynamo.reset()  # a fresh cache per case: no recompile limit across the parametrization
    compiled = torch.compile(mc, fullgraph=True, backend="aot_eager")
    got_out = compiled(x)
    got_out.square().mean().backward()
    torch.testing.assert_close(got_out, out, atol=1e-5, rtol=1e-4)
    got = grads_of(mc)
    assert_grads_close(got, want, atol=1e-5, rtol=1e-4)
    # a second step reuses the graph
    mc.zero_grad(set_to_none=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled(x).square().mean().backward()
    assert_grads_close(grads_of(mc), want, atol=1e-5, rtol=1e-4)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, method: str, recompute: bool, x, out_dir: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        m = patched_model(method, recompute)
        ddp = torch.nn.parallel.DistributedDataParallel(m)
        shard = x.chunk(world)[rank]
        ddp(shard).square().mean().backward()  # DDP averages gradients over ranks
        if rank == 0:
            torch.save(grads_of(m), os.path.join(out_dir, "grads.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("method,recompute", [("ssf", True), ("adaptformer", False)])
def test_ddp_two_cpu_processes_match_one(tmp_path, method, recompute):
    x = images(batch=4, img_size=32)
    m = patched_model(method, recompute)
    # one process: mean over the two shards' losses == what DDP's gradient averaging computes
    sum(m(s).square().mean() for s in x.chunk(2)).div(2).backward()
    want = grads_of(m)
    mp.spawn(_ddp_worker, args=(2, _free_port(), method, recompute, x, str(tmp_path)), nprocs=2, join=True)
    got = torch.load(tmp_path / "grads.pt")
    assert_grads_close(got, want, atol=1e-5, rtol=1e-4)
