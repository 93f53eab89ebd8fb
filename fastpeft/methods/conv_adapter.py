"""Conv-Adapter: a grouped-conv bottleneck beside the spatial conv of each ConvNet block.

Official code: Hhhhhhao/Conv-Adapter `models/tuning_modules/conv_adapter.py` (`ConvAdapter`, "Design
2 v4"), `models/backbones/resnet.py`, `models/backbones/convnext.py`, `models/__init__.py`
(`build_model`: trainable set). Paper: Chen et al., "Conv-Adapter: Exploring Parameter Efficient
Transfer Learning for ConvNets", arXiv 2208.07463.

One adapter, C_in -> C_out channels, reduction g, kernel k, stride s (`ConvAdapterModule`):

    A(x) = se * conv2(act(conv1(x)))
    conv1 = Conv2d(C_in -> C_in/g, k, s, groups=C_in/g, bias)   each output channel reads its own block
                                                                of g consecutive input channels
    conv2 = Conv2d(C_in/g -> C_out, 1x1, bias)                  point-wise up-projection
    se    = Parameter [1, C_out, 1, 1], init 1                  per-channel scale (of conv2's bias too)

No normalisation, no dropout, no activation after conv2. Placement (all parallel, timm names):

* ResNet `Bottleneck` (layer{s}.{j}): A reads the input of `conv2` (= act1's output) with the
  block's stride and k=3, pad 1, act ReLU; it is added to act2's output (after bn2 / act2, before
  `aa` and conv3). The block's forward is replaced by `_AdaptedBottleneck` (timm's
  Bottleneck.forward with that one sum added); `remove` restores the class's forward.
* ConvNeXt `ConvNeXtBlock` (stages.{i}.blocks.{j}): A reads the block input (conv_dw's input),
  k=7, pad 3, act GELU, and is added to conv_dw's output before `norm` (a forward hook on
  conv_dw). Stage downsamples (stages.{i}.downsample = Sequential(LayerNorm2d, Conv2d k2 s2),
  i >= 1): A (dims[i-1] -> dims[i], k=2, s=2, GELU) reads the LayerNorm2d output (the conv's
  input) and is added to the conv's output (a forward hook on downsample.1).

Parameter names: `layer{s}.{j}.tuning_module.{conv1,conv2}.{weight,bias}`, `.se` (official, same in
timm); `stages.{i}.blocks.{j}.tuning_module.*` (official `stages.{i}.{j}.tuning_module.*`);
`stages.{i}.tuning_module_downsample.*` (official `tuning_module_downsample.{i-1}.*`: timm's
downsample is an nn.Sequential, which would run an added child in sequence, so the module sits on
the stage). `fastpeft.load_official(model, sd, "conv_adapter")` maps the official names.

Init (not zero: the adapted network differs from the pretrained one at step 0, as officially):
ResNet: kaiming_normal_(mode="fan_out", nonlinearity="relu") weights, zero biases (the official
ResNet re-initialises every Conv2d, adapters included, before loading the backbone); ConvNeXt:
trunc_normal_(std=0.02) weights, zero biases (its `_init_weights`). se = 1.

Trainable set (official `build_model`, "conv_adapt": names starting with `head` or containing
`tuning_module` or `norm`), in timm names:
* ResNet: adapters, the added BatchNorm2d `norm` (num_features) applied to layer4's output before
  global pooling (`pre_pool_norm=True`, official; fresh: weight 1, bias 0, stats 0/1), and `fc`.
  The backbone BNs (bn1/bn2/bn3/downsample.1) are frozen.
* ConvNeXt: adapters, every block LayerNorm `stages.*.blocks.*.norm` and `head.norm`
  (`train_norms=True`, official), and `head.fc`. The stem and downsample LayerNorms stay frozen.

BatchNorm statistics: the official training runs `model.train()`, so the frozen backbone BNs
normalise with batch statistics and update their running mean/var on the downstream data
(its checkpoints store them). That is the default here too (fastpeft changes nothing about train
mode). `freeze_bn_stats=True` keeps every backbone BatchNorm in eval mode (running statistics,
not updated) whatever `model.train()` says; the added `norm` still follows the model's mode.

Counts (reduction 8, the code's default): resnet50 199,192 adapter parameters (+ 4,096 `norm`);
per adapter k^2 C_in + C_in/g + (C_in/g) C_out + 2 C_out.

Not reproduced: the official head is Dropout(0.2) -> Linear (`head.linear`); timm's `fc` has the
model's `drop_rate` (0 by default) before it: create the model with drop_rate=0.2 to match.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Mapping

import torch
from torch import nn

from .base import Builder, Method, OutputHook
from .convnet import ConvNetInfo, ConvSite, convnet_info

__all__ = ["ConvAdapter", "ConvAdapterModule", "conv_adapter_official_keys"]


class ConvAdapterModule(nn.Module):
    """The official `ConvAdapter` (Design 2 v4): se * conv2(act(conv1(x)))."""

    def __init__(self, in_ch: int, out_ch: int, width: int, kernel: int, stride: int = 1, padding: int = 0,
                 act: str = "relu", init: str = "kaiming"):
        super().__init__()
        if act not in ("relu", "gelu"):
            raise ValueError(f"ConvAdapterModule act must be 'relu' or 'gelu', got {act!r}")
        self.conv1 = nn.Conv2d(in_ch, width, kernel, stride, padding, groups=width, bias=True)
        self.conv2 = nn.Conv2d(width, out_ch, 1, bias=True)
        self.se = nn.Parameter(torch.ones(1, out_ch, 1, 1))
        self.act = act
        self.reset_parameters(init)

    def reset_parameters(self, init: str = "kaiming") -> None:
        with torch.no_grad():
            for conv in (self.conv1, self.conv2):
                if init == "kaiming":
                    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
                elif init == "trunc_normal":
                    nn.init.trunc_normal_(conv.weight, std=0.02)
                else:
                    raise ValueError(f"ConvAdapterModule init must be 'kaiming' or 'trunc_normal', got {init!r}")
                nn.init.zeros_(conv.bias)
            self.se.fill_(1.0)

    def activation(self, t: torch.Tensor) -> torch.Tensor:
        return torch.relu(t) if self.act == "relu" else nn.functional.gelu(t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.se * self.conv2(self.activation(self.conv1(x)))

    def extra_repr(self) -> str:
        return f"act={self.act}"


class _AdaptedBottleneck:
    """Instance `forward` of an adapted timm Bottleneck: timm's Bottleneck.forward with the adapter
    sum after act2 (input: act1's output, the input of conv2)."""

    def __init__(self, block: nn.Module):
        self.block = block

    def adapted(self, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """act2's output `y` plus the adapter on conv2's input `h` (the fused twin overrides it)."""
        return y + self.block.tuning_module(h)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        b = self.block
        shortcut = x
        h = b.act1(b.bn1(b.conv1(x)))
        y = self.adapted(h, b.act2(b.drop_block(b.bn2(b.conv2(h)))))
        y = b.bn3(b.conv3(b.aa(y)))
        if b.se is not None:
            y = b.se(y)
        if b.drop_path is not None:
            y = b.drop_path(y)
        if b.downsample is not None:
            shortcut = b.downsample(shortcut)
        return b.act3(y + shortcut)


class _ParallelAdapter(OutputHook):
    """Forward hook on a frozen conv (ConvNeXt conv_dw, downsample conv): out + A(conv input)."""

    additive = True

    def __init__(self, adapter: ConvAdapterModule):
        self.adapter = adapter

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter(x)

    def apply(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return out + self.adapter(x)


class _PrePoolNorm(OutputHook):
    """Forward hook on ResNet's layer4: the official model's extra BatchNorm2d before pooling."""

    def __init__(self, norm: nn.Module):
        self.norm = norm

    def apply(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return self.norm(out)


class _KeepEval:
    """Instance `train` of a frozen backbone BatchNorm (`freeze_bn_stats=True`): stays in eval
    mode (running statistics, not updated) whatever mode the model is put in."""

    def __init__(self, bn: nn.Module):
        self.bn = bn

    def __call__(self, mode: bool = True) -> nn.Module:
        self.bn.training = False
        return self.bn


@dataclass
class ConvAdapter(Method):
    """Conv-Adapter (conv-parallel) on timm ResNet (Bottleneck) / ConvNeXt; see the module docstring.

    reduction: the channel reduction g (official `adapt_size`, default 8): adapter width C_in // g,
    which must split C_in into equal groups at every site. downsample: ConvNeXt's three stage
    downsample adapters (official: on). pre_pool_norm / train_norms / freeze_bn_stats: above.
    """

    reduction: int = 8
    downsample: bool = True
    pre_pool_norm: bool = True
    train_norms: bool = True
    freeze_bn_stats: bool = False

    name: ClassVar[str] = "ConvAdapter"
    merge_refusal: ClassVar[str] = (
        "its branch has a nonlinearity between two convs and (ResNet) is added after the frozen ReLU; "
        "it stays a parallel branch at inference"
    )
    claims: ClassVar[frozenset[str]] = frozenset({"conv_adapter"})

    @classmethod
    def model_info(cls, model: nn.Module) -> ConvNetInfo:
        return convnet_info(model)

    def _sites(self, info: ConvNetInfo) -> list[ConvSite]:
        return [s for s in info.sites if self.downsample or s.kind != "convnext_downsample"]

    def validate(self, info: ConvNetInfo) -> None:
        if not isinstance(info, ConvNetInfo):
            raise ValueError(f"ConvAdapter needs a timm ResNet or ConvNeXt, got {type(info).__name__}")
        g = self.reduction
        if g < 1:
            raise ValueError(f"ConvAdapter reduction must be a positive integer, got {g!r}")
        for s in self._sites(info):
            w = s.in_ch // g
            if w < 1 or s.in_ch % w:
                widths = sorted({x.in_ch for x in self._sites(info)})
                raise ValueError(
                    f"ConvAdapter reduction={g} does not fit {s.conv} ({s.in_ch} input channels): the adapter's "
                    f"grouped conv needs {s.in_ch} // {g} = {w} groups that split {s.in_ch} channels evenly; "
                    f"choose a reduction that divides every adapted width {widths}"
                )

    def apply(self, model: nn.Module, info: ConvNetInfo, b: Builder) -> str:
        g = self.reduction
        init = "kaiming" if info.family == "resnet" else "trunc_normal"
        act = "relu" if info.family == "resnet" else "gelu"
        ref = next(model.parameters())
        backbone_bns = [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        n_blocks = n_ds = 0
        for s in self._sites(info):
            mod = ConvAdapterModule(s.in_ch, s.out_ch, s.in_ch // g, s.kernel, s.stride, s.padding, act, init)
            mod = mod.to(device=ref.device, dtype=ref.dtype)
            if s.kind == "bottleneck":
                b.attach(f"{s.path}.tuning_module", mod)
                b.replace(f"{s.path}.forward", _AdaptedBottleneck(model.get_submodule(s.path)))
                n_blocks += 1
            elif s.kind == "convnext_block":
                b.attach(f"{s.path}.tuning_module", mod)
                b.hook(s.conv, _ParallelAdapter(mod))
                n_blocks += 1
            else:  # convnext_downsample: the module sits on the stage (see the module docstring)
                stage = s.path.rpartition(".")[0]
                b.attach(f"{stage}.tuning_module_downsample", mod)
                b.hook(s.conv, _ParallelAdapter(mod))
                n_ds += 1
        where = [f"{n_blocks} blocks (tuning_module beside {'conv2' if info.family == 'resnet' else 'conv_dw'})"]
        if n_ds:
            where.append(f"{n_ds} stage downsamples")
        if info.family == "resnet":
            if self.pre_pool_norm:
                norm = nn.BatchNorm2d(info.num_features).to(device=ref.device, dtype=ref.dtype)
                b.attach("norm", norm)
                b.hook("layer4", _PrePoolNorm(norm))
                where.append("norm (BatchNorm2d before pooling)")
            b.train_existing(n for n, _ in model.get_submodule("fc").named_parameters(prefix="fc"))
        elif self.train_norms:
            b.train_existing(n for n, _ in model.named_parameters()
                             if n.startswith("stages.") and ".blocks." in n and ".norm." in n)
            where.append("block LayerNorms")
        if self.freeze_bn_stats:
            for n in backbone_bns:
                bn = model.get_submodule(n)
                b.replace(f"{n}.train", _KeepEval(bn))
                bn.training = False
            where.append(f"{len(backbone_bns)} BatchNorms frozen in eval mode")
        return f"{', '.join(where)}; reduction {g}"


# ----------------------------------------------------------------------------------------------
# Official checkpoint names (models/backbones/{resnet,convnext}.py, models/heads/linear.py)
# ----------------------------------------------------------------------------------------------
_CONVNEXT_BLOCK = {"dwconv": "conv_dw", "pwconv1": "mlp.fc1", "pwconv2": "mlp.fc2"}


def conv_adapter_official_keys(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, str], list[str]]:
    """Official Conv-Adapter key -> timm/fastpeft key for every key of `state_dict`; the second
    result lists keys with no mapping. The family is read from the keys: FB ConvNeXt checkpoints
    have `downsample_layers.*` / `stages.{i}.{j}.*`, ResNet ones `layer{s}.{j}.*`."""
    import re

    keys = [k for k in state_dict if isinstance(k, str)]
    convnext = any(k.startswith(("downsample_layers.", "tuning_module_downsample.")) or re.match(r"stages\.\d+\.\d+\.", k)
                   for k in keys)
    out: dict[str, str] = {}
    unmapped: list[str] = []
    for k in keys:
        new = None
        if k.startswith("head.linear."):
            new = ("head.fc." if convnext else "fc.") + k[len("head.linear."):]
        elif not convnext:
            new = k  # torchvision/timm ResNet names, `norm.*`, `layer{s}.{j}.tuning_module.*`
        elif k.startswith("norm."):
            new = "head." + k
        elif m := re.fullmatch(r"downsample_layers\.0\.([01])\.(.+)", k):
            new = f"stem.{m[1]}.{m[2]}"
        elif m := re.fullmatch(r"downsample_layers\.(\d+)\.([01])\.(.+)", k):
            new = f"stages.{m[1]}.downsample.{m[2]}.{m[3]}"
        elif m := re.fullmatch(r"tuning_module_downsample\.(\d+)\.(.+)", k):
            new = f"stages.{int(m[1]) + 1}.tuning_module_downsample.{m[2]}"
        elif m := re.fullmatch(r"stages\.(\d+)\.(\d+)\.([a-z_0-9]+)(\..+)?", k):
            sub = _CONVNEXT_BLOCK.get(m[3], m[3])
            new = f"stages.{m[1]}.blocks.{m[2]}.{sub}{m[4] or ''}"
        if new is None:
            unmapped.append(k)
        else:
            out[k] = new
    return out, unmapped


def adapter_count(in_ch: int, out_ch: int, reduction: int, kernel: int) -> int:
    """Parameters of one adapter (k^2 C_in + C_in/g + (C_in/g) C_out + 2 C_out)."""
    w = in_ch // reduction
    return kernel * kernel * in_ch + w + w * out_ch + 2 * out_ch

