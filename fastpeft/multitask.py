"""Many tasks on one frozen backbone, and one batch that carries a task per sample.

    fastpeft.inject(model, fastpeft.LoRA(rank=8), task="cars")
    fastpeft.load(model, "birds-lora.safetensors", task="birds")
    ids = fastpeft.task_index(model, ["cars", "birds", "cars"])   # a LongTensor, one id per row
    logits = model(x, task=ids)                                    # each row sees its own task

**Names.** A single-task model keeps its names exactly (nothing here runs for it). In a
multi-task model every task's tensors live under

    fastpeft_tasks.<task>.<the name the tensor has in a single-task model>

e.g. `fastpeft_tasks.cars.blocks.0.attn.LoRA_a.weight`, `fastpeft_tasks.cars.head.weight`
(each task trains its own classifier head; BitFit tasks their own copies of the encoder biases).
Stripping `fastpeft_tasks.<task>.` from a multi-task state_dict gives the task's single-task
tensors, so `fastpeft.save(model, path, task=name)` writes the same file a single-task model of
that task writes, and that file loads into a plain backbone as usual. The backbone's own
parameters keep their names and stay frozen.

**How a mixed batch runs** (`model(x, task=ids)`): the tasks' tensors are stacked per name
([T, ...], `torch.stack` inside the forward, so autograd reaches each task's own parameters),
gathered per row by `ids` ([B, ...]) and the model runs once under `torch.func.vmap` over the
rows with `torch.func.functional_call` substituting each row's tensors for the method's. Every
op is batched over the rows, never looped over tasks: the frozen GEMMs run once on the whole
batch (their weights are not batched), a LoRA / FacT / adapter delta becomes a batched matmul
with the rows' own factors, SSF / BitFit a per-row scale / shift / bias, VPT / VQT per-row
prompts / queries, the heads a per-row matmul. The one op without a batching rule in this torch,
the CPU kernel of fused scaled-dot-product attention, is run per row by vmap's fallback (a
UserWarning says so; it holds no task tensors); its CUDA kernels (flash, memory-efficient, cuDNN)
have batching rules and run once for the batch.
The eager oracle (`looped_forward`: split the batch by task, run each task's rows through its
single-task forward) stays beside it for the tests.

**Compile, DDP.** `ids` is a tensor, so a new task mix is new data, not a new graph:
`torch.compile(model, fullgraph=True)` compiles once for every mix of the same batch size. The
values of `ids` are checked (ValueError) in eager mode only; a compiled forward does not read them
on the host, an out-of-range id there fails in torch's indexing. Every task's tensors enter
every forward through the stack, so under DDP no parameter is unused
(`find_unused_parameters=False` is right); a task without rows in the batch gets an exact zero
gradient (not None), which optimizers with momentum or weight decay still act on: give each task
its own optimizer / param group, or skip the tasks absent from a step.

**Under `fastpeft.patch`.** A multi-task model patches like a single-task one (same names, same
parameter objects). In a mixed batch each fused module sees a vmapped input (`block.vmapped`) and
runs its per-row form where the op family has one (fastpeft/ops/_rows.py: the kernels read each
row's own task factors, one launch per op for the whole batch), else the method's reference,
which vmap batches as it is. With `recompute=True` each block is one checkpointed region
(fastpeft/recompute.py `rows_block`: torch's checkpointing cannot run inside vmap, so the block
steps out of it, keeping its input and re-running in backward).

**Limits.** All tasks of one model hold the same methods with the same configs (another mix
raises ValueError naming both); `merge`, `remove` and an `inject` without a task refuse a
multi-task model, and a patched one takes no new task until `fastpeft.unpatch`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import api, taskfile
from .methods.base import Method, vit_info

__all__ = ["inject", "load", "save", "tasks", "task_index", "looped_forward", "mixed_forward",
           "TASKS_ATTR", "MultiTaskForward"]

#: the attribute holding the tasks' tensors: state_dict names `fastpeft_tasks.<task>.<name>`
TASKS_ATTR = "fastpeft_tasks"
_STATE = "_fastpeft_multitask"
_TASK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]*$")


class _Row:
    """The marker `MultiTaskForward` receives for one row inside the vmapped forward."""

    def __repr__(self) -> str:
        return "<one row>"

    def __reduce__(self):
        return "_ROW"


_ROW = _Row()


@dataclass
class MultiTaskState:
    methods: list[Method]  # the methods every task holds (configs, injection order)
    names: list[str]  # each task's tensor names (its single-task state_dict names)
    hidden: list[str] = field(default_factory=list)  # method tensors turned into plain attributes
    trainable: list[str] = field(default_factory=list)  # the names a single-task model trains
    order: list[str] = field(default_factory=list)  # task names; a task's id is its index here


def state(model: nn.Module) -> MultiTaskState | None:
    return model.__dict__.get(_STATE) if isinstance(model, nn.Module) else None


class _Tensors(nn.Module):
    """One task's tensors, at the paths they have in a single-task model."""


def _parent_of(root: nn.Module, path: str, create: bool) -> tuple[nn.Module, str]:
    *mods, leaf = path.split(".")
    m = root
    for part in mods:
        child = m._modules.get(part)
        if child is None:
            if not create:
                raise KeyError(path)
            child = _Tensors()
            m.add_module(part, child)
        m = child
    return m, leaf


def _task_tensors(tree: nn.Module, names: list[str]) -> list[torch.Tensor]:
    out = []
    for n in names:
        parent, leaf = _parent_of(tree, n, create=False)
        t = parent._parameters.get(leaf)
        out.append(t if t is not None else parent._buffers[leaf])
    return out


# --------------------------------------------------------------------------------------------
# Building: the template (the methods injected once) and the tasks' tensors
# --------------------------------------------------------------------------------------------

def _check_task_name(model: nn.Module, name: Any) -> None:
    if not isinstance(name, str) or not _TASK_NAME.match(name):
        raise ValueError(f"task name must be a string of letters, digits, '_' or '-' (not starting with "
                         f"'_' or '-'), got {name!r}")
    st = state(model)
    if st is not None and name in st.order:
        raise ValueError(f"task {name!r} is already on this model (tasks: {st.order}); pick another name")
    container = model._modules.get(TASKS_ATTR)
    if name in dir(nn.Module) or (container is not None and hasattr(container, name)):
        raise ValueError(f"task name {name!r} clashes with an attribute of torch.nn.Module; pick another name")


def _same_methods(a: list[Method], b: list[Method]) -> bool:
    return [taskfile._method_record(m) for m in a] == [taskfile._method_record(m) for m in b]


def _fresh_template(model: nn.Module, methods: list[Method]) -> tuple[list[str], dict[str, torch.Tensor], set[str]]:
    """Inject `methods` into the (plain) model as a single-task model would, and read what a task
    of them holds: its tensor names, their values (the methods' own init) and which of them the
    methods created (the rest are the backbone's: the head, BitFit's biases)."""
    done: list[Method] = []
    try:
        for m in methods:
            api._inject(model, m)
            done.append(m)
    except BaseException:
        for m in reversed(done):
            api._remove(model, type(m))
        raise
    names = taskfile._task_names(model)
    sd = model.state_dict(keep_vars=True)
    added = [p for inj in api.injections(model) for p in inj.added]
    created = {n for n in names if any(n == p or n.startswith(p + ".") for p in added)}
    return names, {n: sd[n] for n in names}, created


def _hide(model: nn.Module, names: list[str]) -> None:
    """The template's method tensors become plain attributes: out of parameters() and state_dict,
    still where the methods read them (every forward substitutes the rows' own)."""
    for n in names:
        parent, leaf = _parent_of(model, n, create=False)
        t = parent._parameters.pop(leaf, None)
        if t is None:
            t = parent._buffers.pop(leaf)
        object.__setattr__(parent, leaf, t.detach())


def _freeze_backbone(model: nn.Module) -> None:
    """Only the tasks' tensors train (re-injecting the template re-marks flags model-wide)."""
    st = state(model)
    trainable = set(st.trainable) if st is not None else set()
    prefix = TASKS_ATTR + "."
    for n, p in model.named_parameters():
        p.requires_grad_(n.startswith(prefix) and n.split(".", 2)[2] in trainable)


def _unwrap(model: nn.Module) -> None:
    fwd = model.__dict__.get("forward")
    if isinstance(fwd, MultiTaskForward):
        if fwd.inner is None:
            del model.__dict__["forward"]
        else:
            model.__dict__["forward"] = fwd.inner


def _wrap(model: nn.Module) -> None:
    if isinstance(model.__dict__.get("forward"), MultiTaskForward):
        return
    model.__dict__["forward"] = MultiTaskForward(model, model.__dict__.get("forward"))


def add_task(model: nn.Module, name: str, methods: list[Method],
             tensors: dict[str, torch.Tensor] | None = None, path: Path | None = None) -> nn.Module:
    """Put a task holding `methods` on `model` under `name`: fresh tensors (the methods' init, as
    `fastpeft.inject` draws them) or `tensors` (single-task names, e.g. a task file's). Every
    check runs before the model changes."""
    info = vit_info(model)
    _check_task_name(model, name)
    if not methods:
        raise ValueError("a task needs at least one method")
    for m in methods:
        if not isinstance(m, Method):
            raise TypeError(f"method must be a fastpeft method config (e.g. fastpeft.LoRA()), got {type(m).__name__}")
        m.check(info)
    api._refuse_if_patched(model, "inject")
    st = state(model)
    if st is None:
        if api.injections(model):
            raise ValueError(
                "the model already holds single-task methods ("
                + ", ".join(i.method.name for i in api.injections(model))
                + "); a multi-task model starts from a plain backbone: fastpeft.remove(model) first, or "
                "save that task (fastpeft.save) and load it with task=...")
    elif not _same_methods(st.methods, methods):
        raise ValueError(
            f"the tasks on this model hold {', '.join(m.describe() for m in st.methods)}; task {name!r} "
            f"holds {', '.join(m.describe() for m in methods)}. Every task of one model holds the same "
            "methods with the same configs (one batched forward serves them all)")

    if st is not None and tensors is not None:
        # the template stays: check the file's tensors against the first task's, then add them
        names = st.names
        like = dict(zip(names, _task_tensors(model._modules[TASKS_ATTR]._modules[st.order[0]], names)))
        _check_tensors(like, tensors, path)
    else:
        if st is not None:  # a fresh init for the new task: take the template out, inject again
            _unwrap(model)
            api._remove(model, None)
        names, like, created = _fresh_template(model, methods)
        if tensors is not None:
            try:
                _check_tensors(like, tensors, path)
            except ValueError:
                api._remove(model, None)  # st is None here: the plain backbone again
                raise
    tree = _Tensors()
    for n in names:
        src = like[n]
        value = (tensors[n] if tensors is not None else src).detach().to(device=src.device, dtype=src.dtype).clone()
        parent, leaf = _parent_of(tree, n, create=True)
        if isinstance(src, nn.Parameter):
            parent.register_parameter(leaf, nn.Parameter(value))
        else:
            parent.register_buffer(leaf, value)
    if st is None or tensors is None:
        _hide(model, sorted(created))
    if st is None:
        st = MultiTaskState(methods=list(methods), names=list(names), hidden=sorted(created),
                            trainable=[n for n in names if isinstance(like[n], nn.Parameter) and like[n].requires_grad])
        model.__dict__[_STATE] = st
        model.add_module(TASKS_ATTR, nn.ModuleDict())
    model._modules[TASKS_ATTR][name] = tree
    st.order.append(name)
    _freeze_backbone(model)
    _wrap(model)
    return model


def _check_tensors(like: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], path) -> None:
    missing, extra = sorted(set(like) - set(tensors)), sorted(set(tensors) - set(like))
    if missing or extra:
        raise ValueError(f"fastpeft.load: {path} does not match its methods: missing {missing[:5]}, "
                         f"unknown {extra[:5]}")
    for n, t in tensors.items():
        if tuple(t.shape) != tuple(like[n].shape):
            raise ValueError(f"fastpeft.load: {n} has shape {tuple(t.shape)} in {path}, "
                             f"{tuple(like[n].shape)} in the model")


# --------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------

def inject(model: nn.Module, method: Method, task: str | None = None) -> nn.Module:
    """`fastpeft.inject(model, method)` (see fastpeft/api.py), or with `task="name"`: put a task
    holding `method` on the model beside the others (the module docstring says how they are
    named and run)."""
    if task is None:
        return api.inject(model, method)
    if not isinstance(method, Method):
        return api.inject(model, method)  # the same TypeError as a single-task inject
    return add_task(model, task, [method])


def load(model: nn.Module, path: str | Path, task: str | None = None) -> nn.Module:
    """`fastpeft.load(model, path)` (fastpeft/taskfile.py), or with `task="name"`: the file's task
    goes onto the model under that name, beside the tasks already there."""
    if task is None:
        return taskfile.load(model, path)
    path = Path(path)
    header = taskfile.read_header(path)
    info = vit_info(model)
    taskfile._check_backbone(header, info, model, path)
    methods = [taskfile._method_from_record(r) for r in header["methods"]]
    _check_task_name(model, task)
    from safetensors.torch import load_file

    return add_task(model, task, methods, tensors=load_file(str(path)), path=path)


def save(model: nn.Module, path: str | Path, task: str | None = None) -> Path:
    """`fastpeft.save(model, path)` (fastpeft/taskfile.py), or with `task="name"`: that task of a
    multi-task model, written as the file its single-task model would write."""
    st = state(model)
    if task is None:
        if st is not None:
            raise ValueError(f"fastpeft.save: the model holds several tasks ({st.order}); name one: "
                             "fastpeft.save(model, path, task=...)")
        return taskfile.save(model, path)
    if st is None or task not in st.order:
        raise ValueError(f"fastpeft.save: no task {task!r} on this model (tasks: {st.order if st else []})")
    tree = model._modules[TASKS_ATTR][task]
    tensors = {n: t.detach().to("cpu").contiguous().clone() for n, t in zip(st.names, _task_tensors(tree, st.names))}
    return taskfile.write(model, path, st.methods, tensors)


def tasks(model: nn.Module) -> dict[str, dict[str, Any]]:
    """{task name: {"methods": [config descriptions], "params": element count, "bytes": bytes of its
    tensors}} in task-id order (a task's id is its position)."""
    st = state(model)
    if st is None:
        return {}
    out = {}
    for name in st.order:
        ts = _task_tensors(model._modules[TASKS_ATTR][name], st.names)
        out[name] = {"methods": [m.describe() for m in st.methods], "params": sum(t.numel() for t in ts),
                     "bytes": sum(t.numel() * t.element_size() for t in ts)}
    return out


def task_index(model: nn.Module, names, device=None) -> torch.Tensor:
    """Task names (one per row) -> the int64 id tensor `model(x, task=...)` takes."""
    st = state(model)
    if st is None:
        raise ValueError("the model holds no tasks (fastpeft.inject(model, method, task=...) first)")
    if isinstance(names, str):
        raise TypeError("task_index takes one task name per row (a list), not one string")
    unknown = sorted({n for n in names if n not in st.order}, key=str)
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; tasks on this model: {st.order}")
    return torch.tensor([st.order.index(n) for n in names], dtype=torch.long, device=device)


# --------------------------------------------------------------------------------------------
# The forward
# --------------------------------------------------------------------------------------------

def _check_ids(model: nn.Module, x: torch.Tensor, ids: Any, count: int) -> None:
    if ids is None:
        raise ValueError("a multi-task model needs the task of each row: model(x, task=ids), ids = "
                         "fastpeft.task_index(model, [task name per row])")
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"task ids must be a torch.Tensor of integer task ids (fastpeft.task_index), got "
                        f"{type(ids).__name__}")
    if ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"task ids must be int64 or int32, got {ids.dtype}")
    if ids.dim() != 1 or ids.shape[0] != x.shape[0]:
        raise ValueError(f"task ids must be 1-D with one id per row: shape {tuple(ids.shape)} for a batch of "
                         f"{x.shape[0]}")
    if ids.device != x.device:
        raise ValueError(f"task ids are on {ids.device}, the batch on {x.device}")
    if torch.compiler.is_compiling() or not ids.numel():
        return
    lo, hi = torch.stack(torch.aminmax(ids)).tolist()  # one host read for both bounds
    if lo < 0 or hi >= count:
        raise ValueError(f"task ids must be in [0, {count}) (tasks: {state(model).order}); got "
                         f"{sorted(set(ids.tolist()))}")


def _gathered(model: nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """name -> [B, ...]: each row's own task's tensor (stacked over tasks, gathered by id)."""
    st = state(model)
    trees = model._modules[TASKS_ATTR]
    per_task = [_task_tensors(trees._modules[t], st.names) for t in st.order]
    return {n: torch.stack([ts[k] for ts in per_task]).index_select(0, ids) for k, n in enumerate(st.names)}


def mixed_forward(model: nn.Module, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The fused mixed-batch forward (the module docstring)."""
    st = state(model)
    _check_ids(model, x, ids, len(st.order))
    params = _gathered(model, ids)

    def row(p: dict[str, torch.Tensor], xr: torch.Tensor) -> torch.Tensor:
        out = torch.func.functional_call(model, p, (xr.unsqueeze(0),), {"task": _ROW}, strict=False)
        return out.squeeze(0)

    return torch.func.vmap(row, randomness="different")(params, x)


def looped_forward(model: nn.Module, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The oracle: split the batch by task and run each task's rows through its own single-task
    forward (its tensors substituted for the template's); rows come back in batch order."""
    st = state(model)
    _check_ids(model, x, ids, len(st.order))
    trees = model._modules[TASKS_ATTR]
    out = None
    for k, name in enumerate(st.order):
        rows = (ids == k).nonzero().flatten()
        if rows.numel() == 0:
            continue
        p = dict(zip(st.names, _task_tensors(trees._modules[name], st.names)))
        y = torch.func.functional_call(model, p, (x.index_select(0, rows),), {"task": _ROW}, strict=False)
        if out is None:
            out = y.new_zeros((x.shape[0], *y.shape[1:]))
        out = out.index_copy(0, rows, y)
    return out


class MultiTaskForward:
    """`model.forward` of a multi-task model: `model(x, task=ids)` runs the mixed batch; the
    model's own forward (`inner`, or its class's) runs each row inside it."""

    def __init__(self, model: nn.Module, inner: Any = None):
        self.model = model
        self.inner = inner

    def __call__(self, x: torch.Tensor, task: Any = None) -> torch.Tensor:
        if task is _ROW:
            inner = self.inner
            return inner(x) if inner is not None else type(self.model).forward(self.model, x)
        return mixed_forward(self.model, x, task)
