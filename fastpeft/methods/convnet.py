"""What a timm ConvNet fastpeft can inject into looks like (the ConvNet family; ViTs are
`base.vit_info`): the places a conv-level adapter attaches to, read once and validated.

Supported (the backbones the official Conv-Adapter code exports, mapped onto timm's modules):

* `timm.models.resnet.ResNet` built from `Bottleneck` blocks (resnet50/101/152, their variants):
  one site per block, the block's 3x3 `conv2` (its input, its stride, its width).
* `timm.models.convnext.ConvNeXt` built from `ConvNeXtBlock`s: one site per block (`conv_dw`, the
  block input) and one per stage downsample `Sequential(LayerNorm2d, Conv2d)` (its conv).

ResNet `BasicBlock` (resnet18/34) is refused: the official BasicBlock adapter calls the adapter on
a variable before it exists (NameError), so there is no official behaviour to reproduce.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

__all__ = ["ConvSite", "ConvNetInfo", "convnet_info"]


@dataclass(frozen=True)
class ConvSite:
    """One adapter site: the frozen conv the adapter runs beside (path), the adapter's module path
    (`tuning_module` of the block, or of the downsample), its channels and conv geometry."""

    path: str  # the owner: `layer1.0` (Bottleneck), `stages.0.blocks.0` or `stages.1.downsample`
    conv: str  # the frozen conv the adapter is parallel to (full path)
    in_ch: int
    out_ch: int
    kernel: int
    stride: int
    padding: int
    kind: str  # "bottleneck" | "convnext_block" | "convnext_downsample"


@dataclass(frozen=True)
class ConvNetInfo:
    family: str  # "resnet" | "convnext"
    sites: tuple[ConvSite, ...]
    num_features: int
    head: str  # path of the classifier Linear ("fc" / "head.fc")
    num_classes: int

    @property
    def blocks(self) -> tuple[ConvSite, ...]:
        return tuple(s for s in self.sites if s.kind != "convnext_downsample")

    @property
    def downsamples(self) -> tuple[ConvSite, ...]:
        return tuple(s for s in self.sites if s.kind == "convnext_downsample")


def _geom(conv: nn.Conv2d, where: str) -> tuple[int, int, int]:
    k, s, p = conv.kernel_size, conv.stride, conv.padding
    if isinstance(p, str) or k[0] != k[1] or s[0] != s[1] or p[0] != p[1] or conv.dilation != (1, 1):
        raise ValueError(f"{where} is a {k} conv with stride {s}, padding {p}, dilation {conv.dilation}; "
                         "Conv-Adapter supports square kernels with equal strides/paddings and no dilation")
    return int(k[0]), int(s[0]), int(p[0])


def _linear_classes(head: nn.Module) -> int:
    return int(head.out_features) if isinstance(head, nn.Linear) else 0


def convnet_info(model: nn.Module) -> ConvNetInfo:
    """Validate that `model` is a timm ResNet (Bottleneck blocks) or ConvNeXt and list its adapter
    sites. Raises ValueError naming what is unsupported otherwise."""
    from timm.models.convnext import ConvNeXt, ConvNeXtBlock
    from timm.models.resnet import BasicBlock, Bottleneck, ResNet

    if isinstance(model, ResNet):
        sites = []
        basic = []
        for s in range(1, 5):
            layer = getattr(model, f"layer{s}", None)
            if not isinstance(layer, nn.Sequential):
                raise ValueError(f"ResNet.layer{s} is missing or not an nn.Sequential")
            for j, blk in enumerate(layer):
                path = f"layer{s}.{j}"
                if isinstance(blk, BasicBlock):
                    basic.append(path)
                    continue
                if not isinstance(blk, Bottleneck) or not isinstance(blk.conv2, nn.Conv2d):
                    raise ValueError(f"{path} is {type(blk).__name__}; Conv-Adapter supports timm Bottleneck blocks")
                k, st, p = _geom(blk.conv2, f"{path}.conv2")
                sites.append(ConvSite(path, f"{path}.conv2", blk.conv2.in_channels, blk.conv2.out_channels,
                                      k, st, p, "bottleneck"))
        if not sites:
            raise ValueError(
                f"{type(model).__name__} has no Bottleneck block ({len(basic)} BasicBlocks, e.g. resnet18/34): "
                "Conv-Adapter supports Bottleneck ResNets (resnet50/101/152); the official BasicBlock "
                "adapter is broken (it reads its output before computing it), so there is nothing to reproduce"
            )
        if basic:
            raise ValueError(f"{', '.join(basic)} are BasicBlocks; Conv-Adapter supports Bottleneck ResNets only")
        return ConvNetInfo("resnet", tuple(sites), int(model.num_features), "fc", _linear_classes(model.fc))
    if isinstance(model, ConvNeXt):
        sites = []
        for i, stage in enumerate(model.stages):
            ds = stage.downsample
            if isinstance(ds, nn.Sequential) and len(ds) == 2 and isinstance(ds[1], nn.Conv2d):
                k, st, p = _geom(ds[1], f"stages.{i}.downsample.1")
                sites.append(ConvSite(f"stages.{i}.downsample", f"stages.{i}.downsample.1", ds[1].in_channels,
                                      ds[1].out_channels, k, st, p, "convnext_downsample"))
            elif not isinstance(ds, nn.Identity):
                raise ValueError(f"stages.{i}.downsample is {type(ds).__name__}; expected timm's "
                                 "Sequential(LayerNorm2d, Conv2d) or Identity")
            for j, blk in enumerate(stage.blocks):
                path = f"stages.{i}.blocks.{j}"
                if not isinstance(blk, ConvNeXtBlock) or not isinstance(blk.conv_dw, nn.Conv2d):
                    raise ValueError(f"{path} is {type(blk).__name__}; Conv-Adapter supports timm ConvNeXtBlock")
                k, st, p = _geom(blk.conv_dw, f"{path}.conv_dw")
                sites.append(ConvSite(path, f"{path}.conv_dw", blk.conv_dw.in_channels, blk.conv_dw.out_channels,
                                      k, st, p, "convnext_block"))
        if not any(s.kind == "convnext_block" for s in sites):
            raise ValueError("the ConvNeXt has no ConvNeXtBlock to adapt")
        head_fc = getattr(getattr(model, "head", None), "fc", None)
        return ConvNetInfo("convnext", tuple(sites), int(model.num_features), "head.fc", _linear_classes(head_fc))
    raise ValueError(
        f"Conv-Adapter supports timm ResNet (Bottleneck: resnet50/101/152) and ConvNeXt models; got "
        f"{type(model).__module__}.{type(model).__name__}. Create one with timm.create_model('resnet50', ...)."
    )
