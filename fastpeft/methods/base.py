"""The plumbing every PETL method shares: what a timm ViT looks like, where a method may attach,
and the `Method` contract that `fastpeft.inject` / `merge` drive.

Two attachment mechanisms, chosen so that parameter names stay exactly the official ones:

* **Layer hooks** (`add_output_hook`): a method that adds to, or rescales, the output of one frozen
  layer (LoRA / FacT / KAdaptation deltas on `attn.qkv`, SSF after a LayerNorm or Linear) registers
  a forward hook on that layer. Its parameters live where the official code puts them
  (`blocks.{i}.attn.LoRA_a`, `FacTu` at model level, ...), never inside the hooked layer.
* **Block slots** (`PetlBlock`): a method that changes the block's dataflow (parallel/serial
  adapters, Convpass bypasses, prompt tokens) appends a callable to one of the block's named slots.
  `PetlBlock.forward` is timm's `Block.forward` with those slots spelled out, so with every slot
  empty (or adding exact zeros) it is bit-identical to the frozen block.

Hook and slot callables are small picklable objects that hold a reference to the module owning
the parameters (not closures: a deep-copied model must call the copied module, and `torch.save`
must be able to pickle the model).
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable

import torch
from torch import nn

from ..block import CLASS_ROW_PASS, SLOTS, STANDARD, in_class_row_pass

__all__ = [
    "ViTInfo", "vit_info", "Method", "Injection", "PetlBlock", "SLOTS",
    "add_output_hook", "remove_hooks", "slot_append", "FastPeftState", "state_of", "Builder",
    "OutputHook", "SlotFn", "check_positive_int", "check_prob", "check_fields", "MAX_SIZE", "dropout",
    "in_class_row_pass",
]


# --------------------------------------------------------------------------------------------
# What a supported ViT looks like
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ViTInfo:
    """Shape facts of a timm VisionTransformer, read once and validated."""

    embed_dim: int
    depth: int
    num_heads: int
    head_dim: int
    attn_dim: int  # num_heads * head_dim (== embed_dim for every standard ViT)
    mlp_hidden: int
    num_prefix_tokens: int  # CLS + register tokens
    has_class_token: bool
    grid_size: tuple[int, int]
    patch_size: tuple[int, int]
    in_chans: int
    global_pool: str
    num_classes: int
    #: DeiT's distilled models: a distillation token after the class token (counted in
    #: num_prefix_tokens) and a second head, `head_dist`, on its row
    distilled: bool = False

    @property
    def num_patches(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    @property
    def num_tokens(self) -> int:
        return self.num_prefix_tokens + self.num_patches


def _supported_types():
    from timm.layers import Attention, Mlp
    from timm.models.vision_transformer import Block, VisionTransformer

    return VisionTransformer, Block, Attention, Mlp


def vit_info(model: nn.Module) -> ViTInfo:
    """Validate that `model` is a timm VisionTransformer fastpeft can inject into.

    Supported: `timm.models.vision_transformer.VisionTransformer` whose blocks are timm `Block`
    (pre-LN, `attn: timm.layers.Attention`, `mlp: timm.layers.Mlp`), any depth/width/patch/image
    size, with or without CLS / register tokens, qk-norm and layer-scale. Raises ValueError
    naming what is unsupported otherwise.
    """
    VisionTransformer, Block, Attention, Mlp = _supported_types()
    if not isinstance(model, VisionTransformer):
        raise ValueError(
            f"fastpeft supports timm VisionTransformer models; got {type(model).__module__}."
            f"{type(model).__name__}. Create one with timm.create_model('vit_base_patch16_224', ...)."
        )
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Sequential) or len(blocks) == 0:
        raise ValueError("model.blocks must be a non-empty nn.Sequential of timm Blocks")
    for i, blk in enumerate(blocks):
        if not isinstance(blk, Block):
            raise ValueError(
                f"blocks.{i} is {type(blk).__name__}; fastpeft supports timm's pre-LN "
                "`Block` (not ResPostBlock, ParallelScalingBlock or other variants)"
            )
        for name, typ in (("attn", Attention), ("mlp", Mlp)):
            sub = getattr(blk, name, None)
            if not isinstance(sub, typ):
                raise ValueError(
                    f"blocks.{i}.{name} is {type(sub).__name__}; expected timm {typ.__name__}"
                )
        for name in ("qkv", "proj"):
            if not isinstance(getattr(blk.attn, name, None), nn.Linear):
                raise ValueError(f"blocks.{i}.attn.{name} missing or not nn.Linear")
        for name in ("fc1", "fc2"):
            if not isinstance(getattr(blk.mlp, name, None), nn.Linear):
                raise ValueError(f"blocks.{i}.mlp.{name} missing or not nn.Linear")
        for name in ("norm1", "norm2"):
            if not isinstance(getattr(blk, name, None), nn.LayerNorm):
                raise ValueError(f"blocks.{i}.{name} must be nn.LayerNorm")
    b0 = blocks[0]
    pe = model.patch_embed
    grid = tuple(int(g) for g in pe.grid_size)
    patch = tuple(int(p) for p in pe.patch_size)
    num_classes = model.head.out_features if isinstance(model.head, nn.Linear) else 0
    return ViTInfo(
        embed_dim=int(model.embed_dim),
        depth=len(blocks),
        num_heads=int(b0.attn.num_heads),
        head_dim=int(b0.attn.head_dim),
        attn_dim=int(b0.attn.qkv.out_features // 3),
        mlp_hidden=int(b0.mlp.fc1.out_features),
        num_prefix_tokens=int(model.num_prefix_tokens),
        has_class_token=bool(model.cls_token is not None),
        grid_size=grid,  # type: ignore[arg-type]
        patch_size=patch,  # type: ignore[arg-type]
        in_chans=int(pe.proj.in_channels),
        global_pool=str(model.global_pool),
        num_classes=int(num_classes),
        distilled=getattr(model, "dist_token", None) is not None,
    )


# --------------------------------------------------------------------------------------------
# Layer hooks
# --------------------------------------------------------------------------------------------

class OutputHook:
    """Base for forward hooks that transform a layer's output: `out <- fn(input, out)`.

    Subclasses implement `apply(x, out)`; `key` names the injection that owns the hook so it can
    be removed again (by identity of the key, which survives deepcopy).
    """

    key: str = ""
    #: whether the hook's backward needs the layer's output (SSF's scale gradient): then
    #: `patch(recompute=True)` keeps that output rather than re-running a frozen GEMM for it.
    saves_output: bool = False
    #: whether `apply(x, out)` is exactly `out + self.delta(x)`: `patch(recompute=True)` then
    #: computes the delta before a frozen proj / fc2 GEMM, so a backward that needs only the
    #: delta's saved tensors stops its recompute before re-running that GEMM.
    additive: bool = False
    #: whether, run on the class token's row alone (the class-row pass of a token-pooled model's
    #: last block, fastpeft/class_row.py), the hook returns that row of what it returns on every
    #: row, drawing its random numbers by torch dropout calls only (F.dropout / nn.Dropout, on
    #: tensors with the token rows on dim 1): true of any row-local hook. Off unless a hook says so.
    class_row_local: bool = False
    #: whether the hook may draw random numbers (dropout): `patch(recompute=True)` replays the RNG
    #: state around what it re-runs only where something there may draw. On unless a hook says not.
    draws: bool = True
    #: a mask for the hook's input dropout drawn ahead of time (`predrawable_dropout`), consumed
    #: by the next `input_dropout` call
    predrawn_mask: torch.Tensor | None = None

    def predrawable_dropout(self) -> float:
        """The rate of an active F.dropout on the hook's input that is the hook's first random
        draw (0.0: none, or inactive). `patch(recompute=True)` may then draw its mask before a
        checkpointed region starts and hand it over in `predrawn_mask` (fastpeft/recompute.py),
        so backward's recompute reuses it instead of drawing it again."""
        return 0.0

    def input_dropout(self, x: torch.Tensor, p: float, owner: nn.Module) -> torch.Tensor:
        """`dropout(x, p, owner)`, or the same values from a predrawn mask: x * keep / (1 - p)."""
        keep = self.__dict__.pop("predrawn_mask", None)
        if keep is not None:
            return x * keep.to(x.dtype).div_(1.0 - p)
        return dropout(x, p, owner)

    def apply(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def delta(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def __call__(self, module: nn.Module, inputs: tuple, out: torch.Tensor) -> torch.Tensor:
        return self.apply(inputs[0], out)


def add_output_hook(layer: nn.Module, hook: OutputHook, key: str) -> None:
    hook.key = key
    layer.register_forward_hook(hook)


def remove_hooks(model: nn.Module, key: str) -> None:
    """Remove every fastpeft output hook registered under `key` anywhere in `model`."""
    for mod in model.modules():
        hooks = mod._forward_hooks
        for hid in [h for h, fn in hooks.items() if isinstance(fn, OutputHook) and fn.key == key]:
            del hooks[hid]


def active_hooks(layer: nn.Module) -> list[OutputHook]:
    return [fn for fn in layer._forward_hooks.values() if isinstance(fn, OutputHook)]


# --------------------------------------------------------------------------------------------
# Block slots
# --------------------------------------------------------------------------------------------

class SlotFn:
    """Base for slot callables; `key` names the owning injection."""

    key: str = ""
    #: branch slots (attn_branch, ffn_branch) only: whether the callable reads its second
    #: argument (the LayerNorm output). `patch(recompute=True)` runs a branch that does not
    #: outside the checkpointed region, so the recompute can stop after the last op it needs.
    reads_norm: bool = True
    #: as `OutputHook.class_row_local`: row-local callables, and those with a class-row path of
    #: their own taken under `in_class_row_pass()` (Convpass: the class token's centre-tap conv)
    class_row_local: bool = False
    #: block_out slots only: the callable only removes rows and keeps the class token's (row 0)
    #: unchanged, so on the class-token row alone it is the identity (fastpeft/class_row.py)
    keeps_class_row: bool = False

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


class PetlBlock:
    """Mixin swapped into a timm Block's class (`block.__class__`); the module keeps every
    parameter, buffer and name, and `remove_slots` / `patch`'s undo restore the original class.

    forward runs the block in the order fastpeft/block.py writes down once; with every slot empty
    that is timm's Block.forward, bit for bit:
        x = x + dp1(ls1(attn(norm1(x))));  x = x + dp2(ls2(mlp(norm2(x))))
    """

    _fastpeft_slots: dict[str, list[SlotFn]]
    _fastpeft_orig_class: type

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False):
        # the block's run: a method's own dataflow (VQT's `block_fn`), else what `patch` set
        # (recompute, the class-row pass: fastpeft/block.py `BlockRun`), else the reference order
        body = self._fastpeft_slots["block_fn"]
        run = body[0] if body else self.__dict__.get("_fastpeft_run", STANDARD)
        return run(self, x, attn_mask, is_causal)


_SWAPPED_CLASSES: dict[type, type] = {}


def _petl_class(cls: type) -> type:
    if cls not in _SWAPPED_CLASSES:
        new = type(f"Injected{cls.__name__}", (PetlBlock, cls), {"__module__": __name__})
        _SWAPPED_CLASSES[cls] = new
        globals()[new.__name__] = new  # so pickle finds it by name
    return _SWAPPED_CLASSES[cls]


def __getattr__(name: str):
    # Unpickling a model saved with injected blocks in a fresh process: rebuild the class.
    if name.startswith("Injected"):
        _, Block, _, _ = _supported_types()
        if name == f"Injected{Block.__name__}":
            return _petl_class(Block)
    raise AttributeError(name)


def ensure_petl_block(block: nn.Module) -> PetlBlock:
    if not isinstance(block, PetlBlock):
        orig = type(block)
        block._fastpeft_orig_class = orig  # plain attribute: not a parameter, not in state_dict
        block._fastpeft_slots = {s: [] for s in SLOTS}
        block.__class__ = _petl_class(orig)
    return block  # type: ignore[return-value]


def slot_append(block: nn.Module, slot: str, fn: SlotFn, key: str) -> None:
    if slot not in SLOTS:
        raise KeyError(f"unknown block slot {slot!r}; slots: {sorted(SLOTS)}")
    blk = ensure_petl_block(block)
    slots = blk._fastpeft_slots
    if slot == "block_fn" and any(slots.values()) or slot != "block_fn" and slots.get("block_fn"):
        raise ValueError(
            "a 'block_fn' slot replaces the whole block forward and cannot share the block with "
            "other slot entries (the methods' `claims` should have refused this combination)"
        )
    fn.key = key
    blk._fastpeft_slots[slot].append(fn)


def remove_slots(model: nn.Module, key: str) -> None:
    """Drop every slot entry owned by `key`; blocks left with no entries get their class back."""
    for mod in model.modules():
        if isinstance(mod, PetlBlock):
            for name, fns in mod._fastpeft_slots.items():
                mod._fastpeft_slots[name] = [f for f in fns if f.key != key]
            if not any(mod._fastpeft_slots.values()) and "_fastpeft_run" not in mod.__dict__:
                mod.__class__ = mod._fastpeft_orig_class
                del mod._fastpeft_slots
                del mod._fastpeft_orig_class


# --------------------------------------------------------------------------------------------
# Method contract and model-level bookkeeping
# --------------------------------------------------------------------------------------------

def _parent(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent, _, attr = path.rpartition(".")
    return (model.get_submodule(parent) if parent else model), attr


class Builder:
    """Records what a method attaches to a model, so it can be summarised, merged, undone.

    Everything is addressed by dotted path (resolved at use), so the record stays valid for a
    deep-copied model.
    """

    def __init__(self, model: nn.Module, key: str):
        self.model = model
        self.key = key
        self.params: list[str] = []  # trainable parameter names this method owns
        self.added: list[str] = []  # attribute paths it created (modules, parameters)
        self.hooks: list[tuple[str, OutputHook]] = []
        self.slots: list[tuple[str, str, SlotFn]] = []
        self.replaced: dict[str, Any] = {}  # path -> the original object (or _CLASS_ATTR)
        self.overwritten: dict[str, torch.Tensor] = {}  # existing tensor name -> its original value

    def attach(self, path: str, obj: nn.Module | nn.Parameter, trainable: bool = True):
        parent, attr = _parent(self.model, path)
        if hasattr(parent, attr):
            raise ValueError(f"cannot add {path}: the model already has an attribute there")
        if isinstance(obj, nn.Module):
            obj.train(self.model.training)  # a fresh module is in train mode; follow the model
        setattr(parent, attr, obj)
        self.added.append(path)
        if trainable:
            if isinstance(obj, nn.Parameter):
                self.params.append(path)
            else:
                self.params.extend(f"{path}.{n}" for n, _ in obj.named_parameters())
        return obj

    def replace(self, path: str, obj: Any) -> Any:
        """Replace an existing attribute (a module such as `head`, or a method such as
        `forward_head`, which then becomes an instance attribute); `remove` puts the original
        object back. Parameters of a replacement are not recorded as this method's own (the
        `head.*` parameters are trainable anyway)."""
        parent, attr = _parent(self.model, path)
        if not hasattr(parent, attr):
            raise ValueError(f"cannot replace {path}: the model has no attribute there")
        if path in self.replaced:
            raise ValueError(f"{path} is already replaced by this method")
        for table in (parent._modules, parent._parameters, parent._buffers, parent.__dict__):
            if attr in table:
                self.replaced[path] = table[attr]
                break
        else:
            self.replaced[path] = _CLASS_ATTR
        if isinstance(obj, nn.Module):
            obj.train(self.model.training)
        setattr(parent, attr, obj)
        return obj

    def overwrite(self, name: str) -> torch.Tensor:
        """Return the existing parameter or buffer `name` for the method to re-initialise in place
        (VPT's head init); a copy of its value is kept so that `remove` (and a failed `inject`)
        put the original values back."""
        try:
            t = self.model.get_parameter(name)
        except AttributeError:
            t = self.model.get_buffer(name)
        if name not in self.overwritten:
            self.overwritten[name] = t.detach().clone()
        return t

    def train_existing(self, names: Iterable[str]) -> None:
        """Mark existing (backbone) parameters as this method's trainable ones (BitFit)."""
        self.params.extend(names)

    def hook(self, layer_path: str, hook: OutputHook) -> None:
        add_output_hook(self.model.get_submodule(layer_path), hook, self.key)
        self.hooks.append((layer_path, hook))

    def slot(self, block_path: str, slot: str, fn: SlotFn) -> None:
        slot_append(self.model.get_submodule(block_path), slot, fn, self.key)
        self.slots.append((block_path, slot, fn))


class _ClassAttr:
    """Marks a replaced attribute that came from the class (e.g. a method): restoring it means
    deleting the instance attribute."""

    def __repr__(self) -> str:
        return "<class attribute>"

    def __reduce__(self):
        return "_CLASS_ATTR"


_CLASS_ATTR = _ClassAttr()


def _set_or_unset(parent: nn.Module, attr: str, obj: Any) -> None:
    if obj is _CLASS_ATTR:
        if attr in parent.__dict__:
            delattr(parent, attr)
    else:
        setattr(parent, attr, obj)


@dataclass
class Injection:
    """What one `inject` call did to a model: enough to summarise, merge and undo it."""

    method: "Method"
    key: str
    where: str
    params: list[str]
    added: list[str]
    hooks: list[tuple[str, OutputHook]]
    slots: list[tuple[str, str, SlotFn]]
    merged: bool = False
    # replace(): path -> original object (detach puts it back; the replacement waits in stash)
    replaced: dict[str, Any] = field(default_factory=dict)
    # merge(): detached modules/parameters by path, and original frozen tensors by name
    stash: dict[str, dict[str, Any]] = field(default_factory=lambda: {"modules": {}, "tensors": {}})
    # Builder.overwrite(): existing tensors the method re-initialised in place -> original values
    overwritten: dict[str, torch.Tensor] = field(default_factory=dict)

    def restore_overwritten(self, model: nn.Module) -> None:
        """Put back the original values of the tensors `apply` re-initialised (on `remove`)."""
        with torch.no_grad():
            for name, orig in self.overwritten.items():
                try:
                    t = model.get_parameter(name)
                except AttributeError:
                    t = model.get_buffer(name)
                t.copy_(orig)

    def detach(self, model: nn.Module) -> None:
        """Take the method out of the forward and out of the state dict (kept in `stash`)."""
        remove_hooks(model, self.key)
        remove_slots(model, self.key)
        for path in reversed(self.added):
            parent, attr = _parent(model, path)
            self.stash["modules"][path] = getattr(parent, attr)
            delattr(parent, attr)
        for path, orig in self.replaced.items():
            parent, attr = _parent(model, path)
            self.stash.setdefault("replacements", {})[path] = getattr(parent, attr)
            _set_or_unset(parent, attr, orig)

    def reattach(self, model: nn.Module) -> None:
        for path in self.added:
            parent, attr = _parent(model, path)
            setattr(parent, attr, self.stash["modules"].pop(path))
        for path in self.replaced:
            parent, attr = _parent(model, path)
            setattr(parent, attr, self.stash["replacements"].pop(path))
        for layer_path, hook in self.hooks:
            add_output_hook(model.get_submodule(layer_path), hook, self.key)
        for block_path, slot, fn in self.slots:
            slot_append(model.get_submodule(block_path), slot, fn, self.key)

    def param_count(self, model: nn.Module) -> int:
        named = dict(model.named_parameters())
        total = 0
        for n in self.params:
            if n in named:
                total += named[n].numel()
            else:  # detached by merge
                obj = self._stashed_param(n)
                total += obj.numel() if obj is not None else 0
        return total

    def _stashed_param(self, name: str):
        for path, obj in self.stash["modules"].items():
            if name == path and isinstance(obj, nn.Parameter):
                return obj
            if name.startswith(path + ".") and isinstance(obj, nn.Module):
                return obj.get_parameter(name[len(path) + 1:])
        return None


@dataclass
class FastPeftState:
    injections: list[Injection] = field(default_factory=list)


def state_of(model: nn.Module, create: bool = False) -> FastPeftState | None:
    st = model.__dict__.get("_fastpeft")
    if st is None and create:
        st = FastPeftState()
        model.__dict__["_fastpeft"] = st
    return st


class Method:
    """Base class of the method configs (`AdaptFormer(...)`, `LoRA(...)`, ...).

    Subclasses are dataclasses of hyper-parameters and implement:
      * `validate(info)`: raise ValueError for a bad config or unsupported model (no mutation);
      * `apply(model, info, b: Builder) -> where`: create modules, hooks and slots through `b`;
      * `merged_tensors(model, info) -> {frozen tensor name: merged value}` if mergeable (eval-mode
        math, dropout off); `merge` stores the originals and detaches the method;
      * `official_keys(info) -> {official state-dict name: fastpeft name}` where they differ.
    """

    name: ClassVar[str] = "method"
    mergeable: ClassVar[bool] = False
    #: why `merge` refuses, for non-mergeable methods
    merge_refusal: ClassVar[str] = ""
    #: exclusive resources: two injected methods may not claim the same one
    claims: ClassVar[frozenset[str]] = frozenset()

    def validate(self, info: ViTInfo) -> None:
        pass

    @classmethod
    def model_info(cls, model: nn.Module) -> Any:
        """Validate that `model` is of the family this method serves and read its shape facts (the
        `info` that `validate` / `apply` receive): a timm ViT (`vit_info`) unless a method serves
        another family (Conv-Adapter: fastpeft/methods/convnet.py)."""
        return vit_info(model)

    def check(self, info: ViTInfo) -> None:
        """Every check `inject` runs before touching the model: each field against its annotation
        (`check_fields`), then the method's own `validate(info)`."""
        check_fields(self)
        self.validate(info)

    def apply(self, model: nn.Module, info: ViTInfo, b: Builder) -> str:
        raise NotImplementedError

    def merged_tensors(self, model: nn.Module, info: ViTInfo) -> dict[str, torch.Tensor]:
        raise ValueError(f"{self.name} cannot be merged: {self.merge_refusal}")

    def official_keys(self, info: ViTInfo) -> dict[str, str]:
        return {}

    def describe(self) -> str:
        fields = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self))  # type: ignore[arg-type]
        return f"{type(self).__name__}({fields})"


#: the largest value an integer config field may take (token counts, ranks, bottleneck widths):
#: far above any published setting, so a typo such as num_tokens=10**12 is a clear ValueError
#: instead of an allocator failure
MAX_SIZE = 1 << 16


def _field_kinds(annotation: Any) -> set[str]:
    """'float | None' -> {'float', 'None'} (the method modules use postponed annotations)."""
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    return {k.strip() for k in text.split("|")}


def check_fields(method: "Method") -> None:
    """The validator layer every method config shares: ValueError naming the field unless each
    dataclass field holds what its annotation says. `bool`: a bool (not 1, not "no"); `int`: an
    integer (not a bool, not 2.0) of at most MAX_SIZE; `float`: a finite real number (not a bool,
    NaN, inf or "x"); `str`: a string; `tuple`: a tuple or list (or one string); `Sequence[int]`:
    a list or tuple of integers of at most MAX_SIZE (other shapes are left to the method, which
    names them). `X | None` also admits None. Range rules beyond these stay in `validate`."""
    for f in dataclasses.fields(method):  # type: ignore[arg-type]
        kinds = _field_kinds(f.type)
        value = getattr(method, f.name)
        what = f"{method.name} {f.name}"
        if value is None:
            if "None" in kinds:
                continue
            raise ValueError(f"{what} must not be None (expected {' | '.join(sorted(kinds))})")
        if "bool" in kinds:
            if not isinstance(value, bool):
                raise ValueError(f"{what} must be a bool (True or False), got {value!r}")
        elif "int" in kinds:
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise ValueError(f"{what} must be an integer, got {value!r}")
            if value > MAX_SIZE:
                raise ValueError(f"{what}={value} is larger than the largest supported size ({MAX_SIZE})")
        elif "float" in kinds:
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise ValueError(f"{what} must be a number, got {value!r}")
            if not math.isfinite(float(value)):
                raise ValueError(f"{what} must be a finite number, got {value!r}")
        elif "str" in kinds:
            if not isinstance(value, str):
                raise ValueError(f"{what} must be a string, got {value!r}")
        elif "tuple" in kinds:
            if not isinstance(value, (tuple, list, str)):
                raise ValueError(f"{what} must be a tuple (or list) of names, got {value!r}")
        elif "Sequence[int]" in kinds and isinstance(value, (tuple, list)):
            for i, v in enumerate(value):
                if isinstance(v, numbers.Integral) and not isinstance(v, bool) and v > MAX_SIZE:
                    raise ValueError(f"{what}[{i}]={v} is larger than the largest supported size ({MAX_SIZE})")


def check_positive_int(value: Any, what: str, upper: int | None = None, upper_what: str = "") -> None:
    """ValueError unless `value` is an int in [1, upper]."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    if upper is not None and value > upper:
        raise ValueError(f"{what}={value} is larger than {upper_what} ({upper})")


def check_prob(value: Any, what: str) -> None:
    if not isinstance(value, (int, float)) or not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{what} must be a probability in [0, 1), got {value!r}")


def dropout(x: torch.Tensor, p: float, owner: nn.Module) -> torch.Tensor:
    """Functional dropout that follows `owner`'s train/eval mode (as the official code does)."""
    return nn.functional.dropout(x, p=p, training=owner.training) if p > 0 else x

