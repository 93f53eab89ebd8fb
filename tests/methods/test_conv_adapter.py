"""Conv-Adapter (fastpeft.ConvAdapter) on timm ResNet-50 and ConvNeXt.

The reference recomputes each network with plain tensor ops: convolutions as unfolded patches
times weight matrices (the adapter's grouped conv as one matrix per group), BatchNorm and
LayerNorm written out, and the adapter added where the official code adds it (ResNet: after
bn2 / ReLU, reading conv2's input; ConvNeXt: to conv_dw's output, reading the block input, and
to each stage downsample conv's output)."""
from __future__ import annotations

import copy
import pickle

import pytest
import timm
import torch
import torch.nn.functional as F

import fastpeft
from fastpeft import ConvAdapter
from fastpeft.methods.conv_adapter import conv_adapter_official_keys



def _conv(x, w, b=None, stride=1, padding=0, groups=1):
    """Conv2d as unfold + one matrix product per group."""
    B, C, H, W = x.shape
    O, Cg, kh, kw = w.shape
    Ho = (H + 2 * padding - kh) // stride + 1
    Wo = (W + 2 * padding - kw) // stride + 1
    cols = F.unfold(x, (kh, kw), padding=padding, stride=stride)  # [B, C*kh*kw, L]
    cols = cols.view(B, groups, Cg * kh * kw, Ho * Wo)
    wg = w.view(groups, O // groups, Cg * kh * kw)
    out = torch.einsum("gok,bgkl->bgol", wg, cols).reshape(B, O, Ho, Wo)
    return out if b is None else out + b.view(1, -1, 1, 1)


def _bn(x, bn):
    """Eval-mode BatchNorm2d."""
    inv = (bn.running_var + bn.eps).rsqrt()
    return (x - bn.running_mean.view(1, -1, 1, 1)) * (inv * bn.weight).view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)


def _adapter(mod, x, act):
    c1, c2 = mod.conv1, mod.conv2
    h = _conv(x, c1.weight, c1.bias, c1.stride[0], c1.padding[0], groups=c1.groups)
    h = act(h)
    return mod.se * _conv(h, c2.weight, c2.bias)


def resnet_ref(model, x):
    x = torch.relu(_bn(_conv(x, model.conv1.weight, stride=2, padding=3), model.bn1))
    x = F.max_pool2d(x, 3, 2, 1)
    for s in range(1, 5):
        for blk in getattr(model, f"layer{s}"):
            stride = blk.conv2.stride[0]
            h = torch.relu(_bn(_conv(x, blk.conv1.weight), blk.bn1))
            y = torch.relu(_bn(_conv(h, blk.conv2.weight, stride=stride, padding=1), blk.bn2))
            y = y + _adapter(blk.tuning_module, h, torch.relu)
            y = _bn(_conv(y, blk.conv3.weight), blk.bn3)
            sc = x
            if blk.downsample is not None:
                sc = _bn(_conv(x, blk.downsample[0].weight, stride=stride), blk.downsample[1])
            x = torch.relu(y + sc)
    x = _bn(x, model.norm)
    return F.linear(x.mean((2, 3)), model.fc.weight, model.fc.bias)


def _ln_cf(x, ln):
    """LayerNorm over channels of [B, C, H, W]."""
    mu = x.mean(1, keepdim=True)
    var = ((x - mu) ** 2).mean(1, keepdim=True)
    return (x - mu) / (var + ln.eps).sqrt() * ln.weight.view(1, -1, 1, 1) + ln.bias.view(1, -1, 1, 1)


def convnext_ref(model, x):
    x = _ln_cf(_conv(x, model.stem[0].weight, model.stem[0].bias, stride=4), model.stem[1])
    for stage in model.stages:
        if not isinstance(stage.downsample, torch.nn.Identity):
            ln, cv = stage.downsample
            h = _ln_cf(x, ln)
            x = _conv(h, cv.weight, cv.bias, stride=2) + _adapter(stage.tuning_module_downsample, h, F.gelu)
        for blk in stage.blocks:
            dw = blk.conv_dw
            u = _conv(x, dw.weight, dw.bias, padding=3, groups=dw.groups) + _adapter(blk.tuning_module, x, F.gelu)
            u = _ln_cf(u, blk.norm).permute(0, 2, 3, 1)  # (LayerNorm2d with conv_mlp, else channels-last)
            fc1, fc2 = blk.mlp.fc1, blk.mlp.fc2  # (1x1 convs with conv_mlp)
            u = F.linear(F.gelu(F.linear(u, fc1.weight.flatten(1), fc1.bias)), fc2.weight.flatten(1), fc2.bias)
            x = x + (u * blk.gamma).permute(0, 3, 1, 2)
    f = x.mean((2, 3))
    f = F.layer_norm(f, f.shape[-1:], model.head.norm.weight, model.head.norm.bias, model.head.norm.eps)
    return F.linear(f, model.head.fc.weight, model.head.fc.bias)


def _randomize_bn(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)


def _resnet(**kw):
    torch.manual_seed(0)
    m = timm.create_model("resnet50", pretrained=False, num_classes=10)
    fastpeft.inject(m, ConvAdapter(**kw))
    _randomize_bn(m)
    return m


def _check_out_and_grads(model, ref_fn, x):
    """Logits and every trainable gradient against the reference: in float64 to 1e-9 (the same
    function), and in float32 to rtol 1e-4 with atol 1e-5 of each tensor's largest magnitude (a
    ~50-conv-deep network reorders fp32 sums)."""
    model.eval()
    names, params = zip(*fastpeft.trainable_parameters(model))
    for dtype, rtol, atol in ((torch.float64, 1e-9, 1e-9), (torch.float32, 1e-4, 1e-5)):
        model.to(dtype)
        xd = x.to(dtype)
        out = model(xd)
        ref = ref_fn(model, xd)
        torch.testing.assert_close(out, ref, rtol=rtol, atol=atol * ref.abs().max().item())
        w = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=dtype)
        got = dict(zip(names, torch.autograd.grad((out * w).sum(), params)))
        want = dict(zip(names, torch.autograd.grad((ref * w).sum(), params)))
        for n in names:
            scale = want[n].abs().max().item()
            assert scale > 0, n
            torch.testing.assert_close(got[n], want[n], rtol=rtol, atol=atol * scale, msg=lambda m, n=n: f"{n}: {m}")
    return names


# ------------------------------------------------------------------------------------------------
# counts, names, init, trainable set
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("g, per_stage, total", [
    (8, (1224, 3472, 11040, 38464), 199_192),
    (1, (4864, 17920, 68608, 268288), 1_302_784),
    (16, (964, 2440, 6928, 22048), 120_364),
])
def test_resnet50_counts(g, per_stage, total):
    with torch.device("meta"):
        m = timm.create_model("resnet50", pretrained=False, num_classes=10)
    fastpeft.inject(m, ConvAdapter(reduction=g))
    ad = {n: p for n, p in m.named_parameters() if ".tuning_module." in n}
    assert sum(p.numel() for p in ad.values()) == total
    for s, want in enumerate(per_stage, 1):
        assert sum(p.numel() for n, p in ad.items() if n.startswith(f"layer{s}.0.")) == want
    w = 64 // g
    assert tuple(m.get_parameter("layer1.0.tuning_module.conv1.weight").shape) == (w, g, 3, 3)
    assert tuple(m.get_parameter("layer1.0.tuning_module.conv2.weight").shape) == (64, w, 1, 1)
    assert tuple(m.get_parameter("layer1.0.tuning_module.se").shape) == (1, 64, 1, 1)
    assert m.layer2[0].tuning_module.conv1.stride == (2, 2)  # the block's stride
    trainable = {n for n, _ in fastpeft.trainable_parameters(m)}
    assert trainable == set(ad) | {"norm.weight", "norm.bias", "fc.weight", "fc.bias"}
    assert "norm.running_mean" in m.state_dict()


@pytest.mark.parametrize("name, g, blocks, ds", [("convnext_tiny", 4, 1_148_184, 102_312),
                                                  ("convnext_tiny", 8, 743_004, 53_844)])
def test_convnext_counts(name, g, blocks, ds):
    with torch.device("meta"):
        m = timm.create_model(name, pretrained=False, num_classes=10)
    fastpeft.inject(m, ConvAdapter(reduction=g))
    named = dict(m.named_parameters())
    assert sum(p.numel() for n, p in named.items() if ".tuning_module." in n) == blocks
    assert sum(p.numel() for n, p in named.items() if ".tuning_module_downsample." in n) == ds
    trainable = {n for n, _ in fastpeft.trainable_parameters(m)}
    norms = {n for n in named if ".blocks." in n and ".norm." in n}
    assert sum(named[n].numel() for n in norms) == 13_248
    assert trainable == {n for n in named if "tuning_module" in n} | norms | {
        "head.norm.weight", "head.norm.bias", "head.fc.weight", "head.fc.bias"}
    assert not any(n.startswith(("stem.", "stages.1.downsample.")) for n in trainable)


def test_init_official():
    m = _resnet()
    ad = m.layer4[0].tuning_module
    assert torch.equal(ad.se, torch.ones_like(ad.se))
    assert not ad.conv1.bias.any() and not ad.conv2.bias.any()
    # kaiming_normal fan_out: std sqrt(2 / (9 * w)) for conv1, sqrt(2 / C) for conv2
    assert abs(ad.conv2.weight.std().item() / (2 / 512) ** 0.5 - 1) < 0.05
    torch.manual_seed(0)
    c = timm.create_model("convnext_atto", pretrained=False, num_classes=10)
    fastpeft.inject(c, ConvAdapter(reduction=4))
    w = c.stages[3].blocks[0].tuning_module.conv2.weight
    assert abs(w.std().item() / 0.02 - 1) < 0.05
    # not zero: the adapted network is not the pretrained one at step 0 (as officially)
    assert c.stages[0].blocks[0].tuning_module(torch.randn(1, 40, 4, 4)).abs().max() > 0


# ------------------------------------------------------------------------------------------------
# forward and every trainable gradient against the independent formulation
# ------------------------------------------------------------------------------------------------
def test_resnet50_matches_reference():
    m = _resnet()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    names = _check_out_and_grads(m, resnet_ref, x)
    assert len(names) == 16 * 5 + 4


def test_resnet50_odd_reduction_and_size():
    m = _resnet(reduction=2)
    x = torch.randn(1, 3, 23, 37, generator=torch.Generator().manual_seed(2))
    _check_out_and_grads(m, resnet_ref, x)


@pytest.mark.parametrize("g", [4, 8])
def test_convnext_matches_reference(g):
    torch.manual_seed(0)
    m = timm.create_model("convnext_atto", pretrained=False, num_classes=7)
    fastpeft.inject(m, ConvAdapter(reduction=g))
    with torch.no_grad():
        for blk in m.modules():
            if hasattr(blk, "gamma") and isinstance(blk.gamma, torch.nn.Parameter):
                blk.gamma.fill_(0.5)  # timm's 1e-6 layer scale would hide the blocks
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    names = _check_out_and_grads(m, convnext_ref, x)
    assert any("tuning_module_downsample" in n for n in names)


# ------------------------------------------------------------------------------------------------
# BatchNorm statistics
# ------------------------------------------------------------------------------------------------
def test_bn_stats_official_default_and_frozen():
    x = torch.randn(2, 3, 64, 64)
    m = _resnet()
    m.train()
    before = m.layer1[0].bn1.running_mean.clone()
    m(x)
    assert not torch.equal(before, m.layer1[0].bn1.running_mean)  # official: frozen BNs drift

    f = _resnet(freeze_bn_stats=True)
    f.train()
    bn = f.layer1[0].bn1
    before = bn.running_mean.clone()
    out = f(x)
    assert torch.equal(before, bn.running_mean) and not bn.training
    assert f.norm.training  # the added, trainable norm follows the model's mode
    # in eval mode both compute the same function of the same tensors
    f.eval()
    with torch.no_grad():
        out_eval_bns = f(x)
    f.train()
    f.norm.eval()
    with torch.no_grad():
        torch.testing.assert_close(f(x), out_eval_bns)
    assert out.shape == (2, 10)
    fastpeft.remove(f)
    f.train()
    assert bn.training and "train" not in bn.__dict__


# ------------------------------------------------------------------------------------------------
# life cycle, official names
# ------------------------------------------------------------------------------------------------
def test_remove_restores_and_copies():
    torch.manual_seed(0)
    m = timm.create_model("resnet50", pretrained=False, num_classes=10).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        plain = m(x)
    keys = set(m.state_dict())
    fastpeft.inject(m, ConvAdapter())
    m.eval()
    with torch.no_grad():
        adapted = m(x)
        assert not torch.allclose(adapted, plain)  # non-zero init
        torch.testing.assert_close(copy.deepcopy(m)(x), adapted, rtol=0, atol=0)
        torch.testing.assert_close(pickle.loads(pickle.dumps(m))(x), adapted, rtol=0, atol=0)
    fastpeft.remove(m)
    assert set(m.state_dict()) == keys and "forward" not in m.layer1[0].__dict__
    with torch.no_grad():
        torch.testing.assert_close(m(x), plain, rtol=0, atol=0)


def test_load_official_resnet_and_convnext():
    m = _resnet()
    sd = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in m.state_dict().items()}
    official = {("head.linear." + k[3:] if k.startswith("fc.") else k): v for k, v in sd.items()}
    fastpeft.load_official(m, official, "conv_adapter")
    for k, v in sd.items():
        assert torch.equal(m.state_dict()[k], v), k

    renamed, unmapped = conv_adapter_official_keys({
        "downsample_layers.0.1.weight": 0, "downsample_layers.2.1.weight": 0, "stages.2.5.dwconv.weight": 0,
        "stages.2.5.pwconv1.bias": 0, "stages.2.5.gamma": 0, "stages.2.5.tuning_module.se": 0,
        "tuning_module_downsample.0.conv1.weight": 0, "norm.weight": 0, "head.linear.weight": 0, "what": 0})
    assert renamed == {
        "downsample_layers.0.1.weight": "stem.1.weight", "downsample_layers.2.1.weight": "stages.2.downsample.1.weight",
        "stages.2.5.dwconv.weight": "stages.2.blocks.5.conv_dw.weight",
        "stages.2.5.pwconv1.bias": "stages.2.blocks.5.mlp.fc1.bias", "stages.2.5.gamma": "stages.2.blocks.5.gamma",
        "stages.2.5.tuning_module.se": "stages.2.blocks.5.tuning_module.se",
        "tuning_module_downsample.0.conv1.weight": "stages.1.tuning_module_downsample.conv1.weight",
        "norm.weight": "head.norm.weight", "head.linear.weight": "head.fc.weight"}
    assert unmapped == ["what"]


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------
def test_unsupported_models_and_configs():
    with torch.device("meta"):
        r18 = timm.create_model("resnet18", pretrained=False)
        vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1)
        eff = timm.create_model("efficientnet_b0", pretrained=False)
        r50 = timm.create_model("resnet50", pretrained=False)
    with pytest.raises(ValueError, match="no Bottleneck"):
        fastpeft.inject(r18, ConvAdapter())
    with pytest.raises(ValueError, match="ResNet .* and ConvNeXt"):
        fastpeft.inject(vit, ConvAdapter())
    with pytest.raises(ValueError, match="ResNet .* and ConvNeXt"):
        fastpeft.inject(eff, ConvAdapter())
    with pytest.raises(ValueError, match="VisionTransformer"):
        fastpeft.inject(r50, fastpeft.LoRA())
    for bad, msg in [(6, "split 64 channels evenly"), (100, "0 groups"), (0, "positive"), (-2, "positive"),
                     (2.0, "integer"), (True, "integer")]:
        with pytest.raises(ValueError, match=msg):
            fastpeft.inject(r50, ConvAdapter(reduction=bad))
    with pytest.raises(ValueError, match="freeze_bn_stats must be a bool"):
        fastpeft.inject(r50, ConvAdapter(freeze_bn_stats=1))
    assert fastpeft.injections(r50) == []
    fastpeft.inject(r50, ConvAdapter())
    with pytest.raises(ValueError, match="already injected"):
        fastpeft.inject(r50, ConvAdapter())
    with pytest.raises(ValueError, match="cannot merge"):
        fastpeft.merge(r50)
