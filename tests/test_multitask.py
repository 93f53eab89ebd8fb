"""Many tasks on one backbone (fastpeft/multitask.py): a mixed batch gives each row the logits of
its own task's single-task model, and each task's parameters the gradients of its single-task
model on its rows (tasks without rows: exact zeros); the per-task loop oracle agrees; names,
files and bad inputs; one compile serves every task mix."""
from __future__ import annotations

import warnings

import pytest
import torch

import fastpeft
from fastpeft import multitask, taskfile
from fastpeft.demo import demo_configs
from tests.methods.conftest import images, make_vit, randomize_

DEPTH = 2
IMG = 32
CONFIGS = dict(demo_configs(DEPTH))
CONFIGS["KAdaptation trainable"] = fastpeft.KAdaptation(init="trainable")  # its Kronecker factors get gradients
TASKS = ("t0", "t1", "t2", "t3")
#: task of each row: t3 has no rows; rows of one task are not contiguous
IDS = [0, 2, 0, 1, 2]
ATOL, RTOL = 2e-5, 1e-4  # fp32: the batched and the per-model GEMMs sum in other orders


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        # KAdaptation's official init, and vmap's per-row fallback for CPU attention
        warnings.simplefilter("ignore", UserWarning)
        yield


def multi_model(label: str, tasks=TASKS, img: int = IMG):
    m = make_vit(depth=DEPTH, img_size=img, seed=0)
    for k, t in enumerate(tasks):
        fastpeft.inject(m, CONFIGS[label], task=t)
        tree = m.fastpeft_tasks[t]
        randomize_(list(tree.parameters()), std=0.05, seed=10 + k)  # every task its own values
    return m


def task_state(m, task: str) -> dict[str, torch.Tensor]:
    prefix = f"{multitask.TASKS_ATTR}.{task}."
    return {k[len(prefix):]: v for k, v in m.state_dict().items() if k.startswith(prefix)}


def single_model(label: str, m, task: str):
    """The task's own single-task model: a fresh backbone, the method, the task's tensors."""
    s = make_vit(depth=DEPTH, img_size=IMG, seed=0)
    fastpeft.inject(s, CONFIGS[label])
    missing, unexpected = s.load_state_dict(task_state(m, task), strict=False)
    assert not unexpected and set(missing) == set(make_vit(depth=DEPTH, img_size=IMG).state_dict()) - set(task_state(m, task))
    return s


def proj_for(out: torch.Tensor) -> torch.Tensor:
    return torch.randn(out.shape, generator=torch.Generator().manual_seed(5))


def run_multi(m, x, ids, forward=None):
    m.eval()  # dropout off
    m.zero_grad(set_to_none=True)
    out = (forward or (lambda: m(x, task=ids)))()
    (out * proj_for(out)).sum().backward()
    grads = {n: p.grad for n, p in m.named_parameters() if p.requires_grad}
    return out.detach(), grads


def assert_matches_singles(label, m, x, out, grads):
    proj = proj_for(out)
    assert set(grads) == {f"{multitask.TASKS_ATTR}.{t}.{n}" for t in TASKS for n in multitask.state(m).names
                          if n in multitask.state(m).trainable}
    for k, t in enumerate(TASKS):
        rows = [i for i, j in enumerate(IDS) if j == k]
        prefix = f"{multitask.TASKS_ATTR}.{t}."
        mine = {n[len(prefix):]: g for n, g in grads.items() if n.startswith(prefix)}
        assert mine, t
        if not rows:
            # in the graph through the stack: zeros, not None (None only where the method itself
            # never reads the tensor: then task t0, which has rows, got None too)
            unused = {n[len(f"{multitask.TASKS_ATTR}.t0."):] for n, g in grads.items()
                      if n.startswith(f"{multitask.TASKS_ATTR}.t0.") and g is None}
            for n, g in mine.items():
                assert (g is None) == (n in unused) and (g is None or torch.count_nonzero(g) == 0), (t, n)
            continue
        s = single_model(label, m, t)
        s.eval()
        ref = s(x[rows])
        torch.testing.assert_close(out[rows], ref.detach(), atol=ATOL, rtol=RTOL)
        (ref * proj[rows]).sum().backward()
        want = {n: p.grad for n, p in s.named_parameters() if p.requires_grad}
        assert set(want) == set(mine), (t, set(want) ^ set(mine))
        for n in want:
            if want[n] is None:  # unused by the single model (KAdaptation's official zero init)
                assert mine[n] is None or torch.count_nonzero(mine[n]) == 0, (t, n)
                continue
            torch.testing.assert_close(mine[n], want[n], atol=ATOL, rtol=RTOL, msg=lambda e, n=n: f"{t} {n}: {e}")


@pytest.mark.parametrize("label", sorted(CONFIGS))
def test_mixed_batch_matches_each_tasks_single_model(label):
    m = multi_model(label)
    x = images(batch=len(IDS), img_size=IMG)
    ids = fastpeft.task_index(m, [TASKS[i] for i in IDS])
    out, grads = run_multi(m, x, ids)
    assert_matches_singles(label, m, x, out, grads)
    # the eager per-task loop (the oracle beside the fused path) agrees too
    out2, grads2 = run_multi(m, x, ids, forward=lambda: multitask.looped_forward(m, x, ids))
    torch.testing.assert_close(out2, out, atol=ATOL, rtol=RTOL)
    for n in grads:
        if grads2[n] is None:  # the loop never touches a task without rows
            assert grads[n] is None or torch.count_nonzero(grads[n]) == 0, n
        else:
            torch.testing.assert_close(grads2[n], grads[n], atol=ATOL, rtol=RTOL)


#: what `fastpeft.patch` fuses in these models per backend (CPU backends leave some methods as reference)
PATCHED_NOTHING = {"linear probe", "BitFit", "VPT-deep"}


#: the Triton backend with recompute on a few configs (the fused modules run the same per-row
#: forms inside the block regions as without recompute)
_PATCH_CASES = [(label, backend, recompute) for label in sorted(CONFIGS)
                for backend, recompute in (("auto", False), ("triton", False), ("auto", True))]
_PATCH_CASES += [(label, "triton", True) for label in ("AdaptFormer", "LoRA qkv", "SSF")]


@pytest.mark.parametrize("label,backend,recompute", _PATCH_CASES)
def test_mixed_batch_under_patch_matches_each_tasks_single_model(label, backend, recompute):
    """`fastpeft.patch` on a multi-task model (the Triton backend under the interpreter), default
    and recompute: same names, same parameter objects, and every row still gets its own task's
    logits and gradients."""
    m = multi_model(label)
    names = list(m.state_dict())
    params = [p for _, p in m.named_parameters()]
    report = fastpeft.patch(m, backend=backend, recompute=recompute)
    assert list(m.state_dict()) == names and all(a is b for a, b in zip((p for _, p in m.named_parameters()), params))
    if backend == "triton" and label not in PATCHED_NOTHING:
        assert report.patched, report
    x = images(batch=len(IDS), img_size=IMG)
    ids = fastpeft.task_index(m, [TASKS[i] for i in IDS])
    out, grads = run_multi(m, x, ids)
    assert_matches_singles(label, m, x, out, grads)
    fastpeft.unpatch(m)
    assert list(m.state_dict()) == names


@pytest.mark.parametrize("label", ["LoRA qkv", "SSF", "AdaptFormer", "VPT-deep"])
def test_mixed_batch_recompute_keeps_less(label):
    """patch(recompute=True) on a mixed batch: each block one checkpointed region (its input and
    the rows' gathered task tensors kept, the block re-run in backward): at most 0.4x the saved
    activation bytes of the unpatched mixed batch, plus the gathered task tensors themselves
    ([B, ...] per name; at toy sizes AdaptFormer's per-row adapter weights rival the activations)."""
    from fastpeft.profile import saved_activation_bytes

    m = multi_model(label, img=64).eval()  # 17 tokens
    x = images(batch=len(IDS), img_size=64)
    ids = torch.tensor(IDS)

    def step():
        (m(x, task=ids) * 1.0).sum().backward()

    ref = saved_activation_bytes(step, exclude=[m])
    fastpeft.patch(m, recompute=True)
    lean = saved_activation_bytes(step, exclude=[m])
    gathered = len(IDS) * sum(t.numel() * t.element_size() for t in m.fastpeft_tasks["t0"].parameters())
    assert 0 < lean <= 0.4 * ref + gathered, (lean, ref, gathered)
    assert lean < ref


@pytest.mark.parametrize("label", ["LoRA qkv", "AdaptFormer", "Convpass"])
def test_mixed_batch_recompute_redraws_the_forward_masks(label):
    """Training with dropout on: a recompute-patched mixed batch draws the same masks as the
    default patch (same generator state) and its backward's re-run regenerates them, so logits
    and every gradient agree with the non-recompute step."""
    x = images(batch=len(IDS), img_size=IMG)
    ids = torch.tensor(IDS)
    runs = []
    for recompute in (False, True):
        m = multi_model(label)
        fastpeft.patch(m, recompute=recompute)
        m.train()
        torch.manual_seed(7)
        out = m(x, task=ids)
        (out * proj_for(out)).sum().backward()
        runs.append((out.detach(), {n: p.grad for n, p in m.named_parameters() if p.requires_grad}))
    (out0, g0), (out1, g1) = runs
    assert not torch.equal(out0, multi_model(label).eval()(x, task=ids).detach())  # dropout really drew
    torch.testing.assert_close(out1, out0, atol=0, rtol=0)
    assert g1.keys() == g0.keys()
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], atol=ATOL, rtol=RTOL, msg=lambda e, n=n: f"{n}: {e}")


def test_names_single_task_unchanged_and_multi_task_prefixed():
    plain = make_vit(depth=DEPTH, img_size=IMG)
    fastpeft.inject(plain, fastpeft.LoRA(rank=4))
    single_names = [n for n, p in plain.named_parameters() if p.requires_grad]
    assert "blocks.0.attn.LoRA_a.weight" in single_names and "head.weight" in single_names
    m = make_vit(depth=DEPTH, img_size=IMG)
    fastpeft.inject(m, fastpeft.LoRA(rank=4), task="cars")
    fastpeft.inject(m, fastpeft.LoRA(rank=4), task="birds")
    trained = [n for n, p in m.named_parameters() if p.requires_grad]
    assert trained == [f"fastpeft_tasks.{t}.{n}" for t in ("cars", "birds") for n in single_names]
    backbone = set(make_vit(depth=DEPTH, img_size=IMG).state_dict())
    assert set(m.state_dict()) == backbone | {f"fastpeft_tasks.{t}.{n}" for t in ("cars", "birds") for n in single_names}
    info = fastpeft.tasks(m)
    assert list(info) == ["cars", "birds"]
    count = sum(p.numel() for _, p in fastpeft.trainable_parameters(plain))
    assert info["cars"]["params"] == count and info["cars"]["bytes"] == 4 * count
    assert info["cars"]["methods"] == [fastpeft.LoRA(rank=4).describe()]


def test_task_files_round_trip_through_a_multi_task_model(tmp_path):
    # two single-task models -> files -> one backbone with both tasks -> each task's file again
    files, singles = {}, {}
    for k, label in enumerate(("t0", "t1")):
        s = make_vit(depth=DEPTH, img_size=IMG, seed=0)
        fastpeft.inject(s, fastpeft.SSF())
        randomize_([p for _, p in fastpeft.trainable_parameters(s)], std=0.05, seed=k)
        singles[label] = s
        files[label] = fastpeft.save(s, tmp_path / f"{label}.safetensors")
    m = make_vit(depth=DEPTH, img_size=IMG, seed=0)
    for label, path in files.items():
        assert fastpeft.load(m, path, task=label) is m
    x = images(batch=4, img_size=IMG)
    ids = fastpeft.task_index(m, ["t1", "t0", "t0", "t1"])
    m.eval()
    out = m(x, task=ids)
    for label, s in singles.items():
        rows = [i for i, n in enumerate(["t1", "t0", "t0", "t1"]) if n == label]
        torch.testing.assert_close(out[rows], s.eval()(x[rows]), atol=ATOL, rtol=RTOL)
        again = fastpeft.save(m, tmp_path / f"again-{label}.safetensors", task=label)
        assert again.read_bytes() == files[label].read_bytes()  # the same file, byte for byte
    with pytest.raises(ValueError, match="name one"):
        fastpeft.save(m, tmp_path / "x.safetensors")


@pytest.mark.parametrize("label,patch", [("LoRA qkv", None), ("SSF", ("auto", False)), ("LoRA qkv", ("triton", False)),
                                         ("AdaptFormer", ("auto", True))])
def test_one_compile_serves_every_task_mix(label, patch):
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    m = multi_model(label)
    if patch is not None:
        assert fastpeft.patch(m, backend=patch[0], recompute=patch[1])
    m.eval()
    x = images(batch=len(IDS), img_size=IMG)
    cc = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(m, fullgraph=True, backend=cc)
    for mix in (IDS, [3, 3, 1, 0, 1]):
        ids = torch.tensor(mix)
        m.zero_grad(set_to_none=True)
        out = compiled(x, task=ids)
        (out * proj_for(out)).sum().backward()
        got = {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}
        m.zero_grad(set_to_none=True)
        want_out = m(x, task=ids)
        (want_out * proj_for(want_out)).sum().backward()
        torch.testing.assert_close(out, want_out, atol=ATOL, rtol=RTOL)
        for n, p in m.named_parameters():
            if p.requires_grad:
                torch.testing.assert_close(got[n], p.grad, atol=ATOL, rtol=RTOL)
    assert cc.frame_count == 1


def test_bad_task_ids_and_names_are_refused_before_any_kernel():
    m = multi_model("LoRA qkv", tasks=("a", "b"))
    x = images(batch=3, img_size=IMG)
    with pytest.raises(ValueError, match="needs the task of each row"):
        m(x)
    with pytest.raises(ValueError, match=r"in \[0, 2\)"):
        m(x, task=torch.tensor([0, 2, 1]))
    with pytest.raises(ValueError, match=r"in \[0, 2\)"):
        m(x, task=torch.tensor([0, -1, 1]))
    with pytest.raises(ValueError, match="one id per row"):
        m(x, task=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="one id per row"):
        m(x, task=torch.tensor([[0, 1, 1]]))
    with pytest.raises(TypeError, match="int64 or int32"):
        m(x, task=torch.tensor([0.0, 1.0, 1.0]))
    with pytest.raises(TypeError, match="torch.Tensor"):
        m(x, task=[0, 1, 1])
    with pytest.raises(ValueError, match="are on meta"):
        m(x, task=torch.zeros(3, dtype=torch.long, device="meta"))
    with pytest.raises(ValueError, match="unknown task"):
        fastpeft.task_index(m, ["a", "zebra", "b"])
    # names: a clash, a bad name, a name of an nn.Module attribute
    for bad, match in (("a", "already on this model"), ("x.y", "letters, digits"), ("", "letters, digits"),
                       ("training", "clashes"), (3, "letters, digits")):
        with pytest.raises(ValueError, match=match):
            fastpeft.inject(m, fastpeft.LoRA(rank=8), task=bad)
    assert list(fastpeft.tasks(m)) == ["a", "b"]


def test_other_methods_and_lifecycle_are_refused_leaving_the_model_unchanged(tmp_path):
    m = multi_model("LoRA qkv", tasks=("a",))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match="same methods with the same configs"):
        fastpeft.inject(m, fastpeft.SSF(), task="b")
    with pytest.raises(ValueError, match="same methods with the same configs"):
        fastpeft.inject(m, fastpeft.LoRA(rank=4), task="b")
    for op in (lambda: fastpeft.inject(m, fastpeft.SSF()), lambda: fastpeft.remove(m), lambda: fastpeft.merge(m),
               lambda: fastpeft.load(m, tmp_path / "none.safetensors")):
        with pytest.raises(ValueError, match="several tasks"):
            op()
    assert fastpeft.patch(m, backend="triton")  # a patched multi-task model takes no new task until unpatched
    with pytest.raises(ValueError, match="unpatch"):
        fastpeft.inject(m, CONFIGS["LoRA qkv"], task="b")
    fastpeft.unpatch(m)
    with pytest.raises(ValueError, match="several tasks"):  # the single-task writer, called directly
        taskfile.save(m, tmp_path / "y.safetensors")
    after = m.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    single = make_vit(depth=DEPTH, img_size=IMG)
    fastpeft.inject(single, fastpeft.SSF())
    with pytest.raises(ValueError, match="single-task methods"):
        fastpeft.inject(single, fastpeft.SSF(), task="a")
    # a file of another method onto a multi-task model
    s = make_vit(depth=DEPTH, img_size=IMG)
    fastpeft.inject(s, fastpeft.SSF())
    path = fastpeft.save(s, tmp_path / "ssf.safetensors")
    with pytest.raises(ValueError, match="same methods with the same configs"):
        fastpeft.load(m, path, task="b")
    assert list(fastpeft.tasks(m)) == ["a"]


def test_ddp_without_find_unused_parameters(tmp_path):
    """Every task's tensors enter every forward through the stack: DDP with
    find_unused_parameters=False runs steps whose batches leave tasks out, and the tasks without
    rows get exact zero gradients."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rdzv", rank=0, world_size=1)
    try:
        m = multi_model("LoRA qkv", tasks=("a", "b", "c"))
        ddp = DDP(m, find_unused_parameters=False)
        x = images(batch=3, img_size=IMG)
        for mix in ([0, 0, 1], [2, 2, 2]):  # each step leaves a task out
            m.zero_grad(set_to_none=True)
            ddp(x, task=torch.tensor(mix)).square().mean().backward()
            for k, t in enumerate(("a", "b", "c")):
                grads = [p.grad for p in m.fastpeft_tasks[t].parameters()]
                assert all(g is not None for g in grads)
                assert any(torch.count_nonzero(g) for g in grads) == (k in mix), (mix, t)
    finally:
        dist.destroy_process_group()


def test_dropout_draws_per_row_in_training():
    """Training mode: each row draws its own dropout mask (vmap randomness="different"): two
    equal rows of one task differ; in eval mode they are equal."""
    m = make_vit(depth=DEPTH, img_size=IMG, seed=0)
    for t in ("a", "b"):
        fastpeft.inject(m, fastpeft.LoRA(rank=8, dropout=0.5), task=t)
    x = images(batch=1, img_size=IMG).repeat(4, 1, 1, 1)
    ids = fastpeft.task_index(m, ["a", "a", "b", "b"])
    m.train()
    out = m(x, task=ids)
    assert not torch.allclose(out[0], out[1]) and not torch.allclose(out[2], out[3])
    m.eval()
    out = m(x, task=ids)
    torch.testing.assert_close(out[0], out[1])
    torch.testing.assert_close(out[2], out[3])
