"""Public entry points: inject a PETL method into a timm ViT, merge it back, and inspect it."""
from __future__ import annotations

from typing import Any, Iterator

import torch
from torch import nn

from .methods.base import Builder, Injection, Method, state_of, vit_info

__all__ = ["inject", "remove", "merge", "unmerge", "trainable_parameters", "summary", "summary_rows", "injections"]


def injections(model: nn.Module) -> list[Injection]:
    st = state_of(model)
    return list(st.injections) if st is not None else []


def _model_info(model: nn.Module):
    """The shape facts of an injected model, read (and validated) by the family its methods serve
    (a ViT unless they say otherwise, e.g. Conv-Adapter's ConvNets)."""
    st = state_of(model) if isinstance(model, nn.Module) else None
    if st is not None and st.injections:
        return type(st.injections[0].method).model_info(model)
    return vit_info(model)


def _refuse_if_patched(model: nn.Module, op: str) -> None:
    """The lifecycle rule for a patched model: only `patch` (again) and `unpatch` change it.
    inject / remove / merge / unmerge need the reference modules, so they ask for the order that
    works instead of editing modules a fused rule has re-classed."""
    if isinstance(model, nn.Module) and model.__dict__.get("_fastpeft_patch") is not None:
        raise ValueError(
            f"fastpeft.{op}: the model is patched; call fastpeft.unpatch(model) first, then "
            f"fastpeft.{op}(...), then fastpeft.patch(model, ...) again"
        )


def _refuse_if_multitask(model: nn.Module, op: str) -> None:
    """A model holding several tasks (fastpeft/multitask.py) changes only through the task-aware
    entry points: `inject(..., task=)` / `load(..., task=)`."""
    if isinstance(model, nn.Module) and model.__dict__.get("_fastpeft_multitask") is not None:
        raise ValueError(
            f"fastpeft.{op}: the model holds several tasks (fastpeft.tasks(model)); add tasks with "
            f"fastpeft.inject(model, method, task=...) or fastpeft.load(model, path, task=...); "
            f"{op} of a multi-task model is not supported"
        )


def _method_class(method: Any) -> type[Method] | None:
    """remove()'s selector: None, a Method subclass, a Method instance, or a method's name."""
    if method is None:
        return None
    if isinstance(method, type) and issubclass(method, Method):
        return method
    if isinstance(method, Method):
        return type(method)
    if isinstance(method, str):
        from . import methods as _methods

        known = {c.name.lower(): c for c in (getattr(_methods, n) for n in _methods.__all__)
                 if isinstance(c, type) and issubclass(c, Method) and c is not Method}
        cls = known.get(method.lower())
        if cls is None:
            raise ValueError(f"unknown method name {method!r}; expected one of {sorted(c.name for c in known.values())}")
        return cls
    raise TypeError(
        "method must be None, a fastpeft method class (e.g. fastpeft.LoRA), a method config or a "
        f"method name, got {type(method).__name__}"
    )


def inject(model: nn.Module, method: Method) -> nn.Module:
    """Inject `method` into the timm ViT `model` in place and return it.

    The backbone is frozen; only the parameters of the injected methods and the classifier head
    stay trainable. Parameter names are the official ones (see the method's docstring), so official
    checkpoints load with `load_state_dict` / `fastpeft.load_official`. Several compatible methods
    can be injected one after another. Every check runs before the model is touched: on a
    ValueError the model is unchanged.
    """
    if not isinstance(method, Method):
        if isinstance(method, type) and issubclass(method, Method):
            raise TypeError(f"method must be a fastpeft method config instance: use fastpeft.{method.__name__}(), "
                            f"not the class {method.__name__}")
        raise TypeError(f"method must be a fastpeft method config (e.g. fastpeft.LoRA()), got {type(method).__name__}")
    _refuse_if_multitask(model, "inject")
    return _inject(model, method)


def _inject(model: nn.Module, method: Method) -> nn.Module:
    info = method.model_info(model)
    _refuse_if_patched(model, "inject")
    st = state_of(model)
    if st is not None:
        for inj in st.injections:
            if type(inj.method) is type(method):
                raise ValueError(f"{method.name} is already injected into this model; inject each method once")
            if inj.merged:
                raise ValueError("the model holds merged methods; call fastpeft.unmerge(model) before injecting more")
            clash = inj.method.claims & method.claims
            if clash:
                raise ValueError(
                    f"{method.name} cannot be combined with {inj.method.name}: both use {sorted(clash)}"
                )
    method.check(info)

    st = state_of(model, create=True)
    b = Builder(model, key=method.name)
    try:
        where = method.apply(model, info, b)
    except BaseException:
        # undo whatever apply() attached before failing, so the model is unchanged
        failed = Injection(method=method, key=b.key, where="", params=[], added=b.added, hooks=b.hooks,
                           slots=b.slots, replaced=b.replaced, overwritten=b.overwritten)
        failed.detach(model)
        failed.restore_overwritten(model)
        if not st.injections:
            del model.__dict__["_fastpeft"]
        raise
    st.injections.append(
        Injection(method=method, key=b.key, where=where, params=b.params, added=b.added, hooks=b.hooks, slots=b.slots,
                  replaced=b.replaced, overwritten=b.overwritten)
    )
    _set_trainable(model)
    return model


def remove(model: nn.Module, method: type[Method] | Method | str | None = None) -> nn.Module:
    """Take injected methods out again (all of them, or those of `method`: a method class, a
    config instance or a method name such as "LoRA"): hooks, slots and added parameters go,
    tensors a method re-initialised in place (VPT's head) get their original values back, and
    the backbone's requires_grad flags are restored to trainable. Raises ValueError, changing
    nothing, when that method is not injected, is merged (unmerge first) or the model is patched
    (unpatch first)."""
    _refuse_if_multitask(model, "remove")
    return _remove(model, method)


def _remove(model: nn.Module, method: type[Method] | Method | str | None = None) -> nn.Module:
    cls = _method_class(method)
    _model_info(model)
    st = state_of(model)
    if st is None or not st.injections:
        raise ValueError("no fastpeft method is injected into this model")
    _refuse_if_patched(model, "remove")
    chosen = [inj for inj in st.injections if cls is None or isinstance(inj.method, cls)]
    if not chosen:
        raise ValueError(
            f"{cls.name} is not injected into this model (injected: "
            f"{', '.join(i.method.name for i in st.injections)}); nothing to remove"
        )
    merged = [inj.method.name for inj in chosen if inj.merged]
    if merged:
        raise ValueError(f"{', '.join(merged)} is merged; call fastpeft.unmerge(model) first, then remove")
    keep = [inj for inj in st.injections if not any(inj is c for c in chosen)]
    for inj in reversed(chosen):  # later injections first: their hooks sit after earlier ones'
        inj.detach(model)
        inj.restore_overwritten(model)
    st.injections = keep
    if not keep:
        del model.__dict__["_fastpeft"]
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        _set_trainable(model)
    return model


def _set_trainable(model: nn.Module) -> None:
    st = state_of(model)
    trainable: set[str] = set()
    for inj in st.injections:
        trainable.update(inj.params)
    for name, p in model.named_parameters():
        p.requires_grad_(name in trainable or _is_head(name))


def _is_head(name: str) -> bool:
    """The classifier head's parameters (and a distilled model's second head, `head_dist`)."""
    return name.startswith(("head.", "head_dist."))


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) pairs that require grad, in `named_parameters` order."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def merge(model: nn.Module) -> nn.Module:
    """Fold every injected linear method (SSF, LoRA, FacT, KAdaptation, BitFit) into the frozen
    weights. Afterwards the forward is a plain timm model's (no hooks, no extra modules, no
    extra state-dict keys); `unmerge` restores the injected form exactly (the original frozen
    tensors are kept, not recomputed by subtraction)."""
    info = _model_info(model)
    _refuse_if_multitask(model, "merge")
    injs = injections(model)
    if not injs:
        raise ValueError("nothing to merge: no fastpeft method is injected into this model")
    _refuse_if_patched(model, "merge")
    refusing = [i.method for i in injs if not i.method.mergeable]
    if refusing:
        raise ValueError(
            "cannot merge: " + "; ".join(f"{m.name}: {m.merge_refusal}" for m in refusing)
        )
    done: list[Injection] = []
    was_training = model.training
    with torch.no_grad():
        try:
            for inj in injs:  # injection order == hook order, so folding in this order is exact
                if inj.merged:
                    continue
                model.eval()  # merged math is the eval-mode (dropout-free) function
                try:
                    new = inj.method.merged_tensors(model, info)
                finally:
                    model.train(was_training)
                for name, value in new.items():
                    t = _tensor(model, name)
                    inj.stash["tensors"][name] = t.detach().clone()
                    t.copy_(value.to(dtype=t.dtype))
                inj.detach(model)
                inj.merged = True
                done.append(inj)
        except BaseException:
            # a later method could not merge: undo those merged by this call (model unchanged)
            _restore(model, done)
            raise
    return model


def _tensor(model: nn.Module, name: str) -> torch.Tensor:
    try:
        return model.get_parameter(name)
    except AttributeError:
        return model.get_buffer(name)


def unmerge(model: nn.Module) -> nn.Module:
    """Undo `merge`: restore the frozen tensors and re-attach the method modules."""
    _model_info(model)
    _refuse_if_multitask(model, "unmerge")
    injs = [i for i in injections(model) if i.merged]
    if not injs:
        raise ValueError("nothing to unmerge: no merged fastpeft method in this model")
    _refuse_if_patched(model, "unmerge")
    _restore(model, injs)
    _set_trainable(model)
    return model


def _restore(model: nn.Module, injs: list[Injection]) -> None:
    """Put merged injections back: frozen tensors in reverse merge order, then hooks/slots/modules
    in injection order -- hooks sharing a layer must run in their original order, so live
    injections that come later are taken off and re-attached after them."""
    if not injs:
        return
    ids = {id(i) for i in injs}
    everything = injections(model)
    tail = everything[min(k for k, i in enumerate(everything) if id(i) in ids):]
    live = [i for i in tail if id(i) not in ids and not i.merged]
    with torch.no_grad():
        for inj in reversed(injs):
            for name, orig in inj.stash["tensors"].items():
                _tensor(model, name).copy_(orig)
            inj.stash["tensors"].clear()
    for inj in live:
        inj.detach(model)
    ids.update(id(i) for i in live)
    for inj in tail:
        if id(inj) in ids:
            inj.reattach(model)
            inj.merged = False


def summary_rows(model: nn.Module) -> list[dict]:
    rows = []
    for inj in injections(model):
        count = inj.param_count(model)
        rows.append(
            {
                "method": inj.method.describe(),
                "where": inj.where,
                "params": count,
                "mergeable": inj.method.mergeable,
                "merged": inj.merged,
            }
        )
    head = [p for n, p in model.named_parameters() if _is_head(n) and p.requires_grad]
    rows.append(
        {"method": "classifier head", "where": "head", "params": sum(p.numel() for p in head),
         "mergeable": False, "merged": False}
    )
    return rows


def summary(model: nn.Module) -> str:
    """A plain-text table: method, where injected, parameter count, mergeable."""
    rows = summary_rows(model)
    total = sum(r["params"] for r in rows)
    header = ("method", "where injected", "params", "mergeable")
    body = [
        (r["method"], r["where"], f"{r['params']:,}", ("yes (merged)" if r["merged"] else "yes") if r["mergeable"] else "no")
        for r in rows
    ]
    body.append(("total trainable", "", f"{total:,}", ""))
    widths = [max(len(str(x[i])) for x in [header, *body]) for i in range(4)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), sep, *(line(b) for b in body[:-1]), sep, line(body[-1])])


def iter_blocks(model: nn.Module) -> Iterator[tuple[int, nn.Module]]:
    yield from enumerate(model.blocks)
