"""The method part of `python -m fastpeft demo`: PETL methods fine-tuned on real data, each run
three ways side by side (the plain-PyTorch reference, `fastpeft.patch`, `patch(recompute=True)`).

Data: scikit-learn's bundled handwritten digits (1,797 grey 8x8 images, 10 classes; shipped with
the package, nothing is downloaded), upsampled and split into a train and a held-out set. The
backbone is a timm ViT with random weights (no pretrained weights can be fetched): the frozen
features are random, so the held-out accuracy shows that the short fine-tune learns, not what a
pretrained backbone would reach.

For each method the three contenders start from the same weights and see the same batches in the
same order, so their losses and accuracies agree up to the fused ops' tolerances; what differs is
step time and the activation bytes autograd saves for backward.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from rich import box
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

import fastpeft
from fastpeft.methods.base import vit_info
from fastpeft.profile import saved_activation_bytes

CONTENDERS = ("reference", "patch", "recompute")
# The methods the default run shows: one per fused op family (bottleneck adapter, low-rank
# factors, LayerNorm + scale-shift, prompts); `--all` runs every entry of `demo_configs`.
DEFAULT_METHODS = ("AdaptFormer", "LoRA q,v", "FacT-TT", "SSF")
QUICK_METHODS = ("AdaptFormer", "SSF")


def demo_configs(depth: int) -> list[tuple[str, object]]:
    """One representative config per method (sizes from the official VTAB settings)."""
    m = fastpeft
    dims = [8, 8, 4, 4] + [0] * (depth - 4) if depth >= 4 else [8] * depth
    return [
        ("linear probe", m.LinearProbe()),
        ("BitFit", m.BitFit()),
        ("AdaptFormer", m.AdaptFormer(dim=64)),
        ("Adapter", m.Adapter(dim=8)),
        ("LoRA qkv", m.LoRA(rank=8)),
        ("LoRA q,v", m.LoRA(rank=8, targets=("q", "v"))),
        ("FacT-TT", m.FacT(kind="tt", rank=8)),
        ("FacT-TK", m.FacT(kind="tk", rank=8)),
        ("KAdaptation", m.KAdaptation()),
        ("SSF", m.SSF()),
        ("Convpass", m.Convpass(dim=8)),
        ("VPT-deep", m.VPT(num_tokens=10, deep=True)),
        ("VQT", m.VQT(num_queries=1)),
        ("NOAH", m.NOAH(adapter_dims=dims, lora_ranks=dims, prompt_lens=dims)),
    ]


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------
@dataclass
class DigitsSplit:
    """Images [n, 3, img, img] (fp32, normalised to mean 0 / std 1 over the train set) and labels."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int = 10


def load_digits(img_size: int, test_size: int = 360, limit: int | None = None, seed: int = 0) -> DigitsSplit:
    """scikit-learn's bundled digits, upsampled to `img_size` (bilinear), grey repeated to 3
    channels, split stratified by class into `len - test_size` train and `test_size` held-out
    images. `limit` keeps only the first `limit` images (before the split) for quick runs."""
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.model_selection import train_test_split

    if img_size < 8:
        raise ValueError(f"img_size must be >= 8 (the digits are 8x8), got {img_size}")
    bunch = sk_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float32)[:, None] / 16.0  # [n, 1, 8, 8] in [0, 1]
    labels = torch.as_tensor(bunch.target, dtype=torch.long)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    if not 0 < test_size < len(labels):
        raise ValueError(f"test_size must be in (0, {len(labels)}), got {test_size}")
    idx = torch.arange(len(labels)).numpy()
    train_idx, test_idx = train_test_split(idx, test_size=test_size, random_state=seed, stratify=labels.numpy())
    images = F.interpolate(images, size=img_size, mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    train_x, test_x = images[train_idx], images[test_idx]
    mean, std = train_x.mean(), train_x.std()
    return DigitsSplit((train_x - mean) / std, labels[train_idx], (test_x - mean) / std, labels[test_idx])


# ----------------------------------------------------------------------------------------------
# One method, three contenders
# ----------------------------------------------------------------------------------------------
@dataclass
class ContenderResult:
    name: str
    step_s: float  # median training step (forward + backward + AdamW), warm-up steps excluded
    saved_bytes: int  # activation bytes autograd keeps for backward, one batch
    accuracy: float  # held-out, after training
    losses: list[float]


@dataclass
class MethodResult:
    label: str
    params: int
    accuracy_before: float
    contenders: list[ContenderResult] = field(default_factory=list)

    def get(self, name: str) -> ContenderResult:
        return next(c for c in self.contenders if c.name == name)


@dataclass
class DemoSettings:
    model: str = "vit_tiny_patch16_224"
    img_size: int = 32
    patch_size: int = 8
    depth: int | None = None  # None: the model's own depth
    steps: int = 30
    warmup: int = 3  # steps left out of the step-time median
    batch: int = 64
    lr: float = 3e-3
    limit: int | None = None
    test_size: int = 360
    device: str = "cpu"


def build_model(s: DemoSettings, num_classes: int) -> torch.nn.Module:
    kw = {"img_size": s.img_size, "patch_size": s.patch_size, "num_classes": num_classes}
    if s.depth is not None:
        kw["depth"] = s.depth
    return timm.create_model(s.model, pretrained=False, **kw)


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 256) -> float:
    was_training = model.training
    model.eval()
    correct = sum(int((model(x[i:i + batch]).argmax(-1) == y[i:i + batch]).sum()) for i in range(0, len(y), batch))
    model.train(was_training)
    return correct / len(y)


def _batches(n: int, batch: int, steps: int, seed: int) -> list[torch.Tensor]:
    """`steps` index batches over shuffled epochs, the same for every contender."""
    g = torch.Generator().manual_seed(seed)
    out: list[torch.Tensor] = []
    perm = torch.randperm(n, generator=g)
    pos = 0
    while len(out) < steps:
        if pos + batch > n:
            perm, pos = torch.randperm(n, generator=g), 0
        out.append(perm[pos:pos + batch])
        pos += batch
    return out


def train(model: torch.nn.Module, data: DigitsSplit, s: DemoSettings, on_step=None) -> tuple[list[float], list[float]]:
    """AdamW on the trainable parameters; returns (losses, step seconds)."""
    device = torch.device(s.device)
    opt = torch.optim.AdamW([p for _, p in fastpeft.trainable_parameters(model)], lr=s.lr)
    torch.manual_seed(1)  # the same dropout draws for every contender (on the reference ops' paths)
    model.train()
    losses, times = [], []
    for idx in _batches(len(data.train_y), s.batch, s.steps, seed=0):
        x, y = data.train_x[idx].to(device), data.train_y[idx].to(device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
        if on_step is not None:
            on_step()
    return losses, times


def _saved(model: torch.nn.Module, data: DigitsSplit, s: DemoSettings) -> int:
    device = torch.device(s.device)
    x, y = data.train_x[: s.batch].to(device), data.train_y[: s.batch].to(device)
    model.train()
    return saved_activation_bytes(lambda: F.cross_entropy(model(x), y), exclude=[model])


def run_method(label: str, cfg, data: DigitsSplit, s: DemoSettings, on_step=None) -> MethodResult:
    torch.manual_seed(0)
    base = build_model(s, data.num_classes)
    fastpeft.inject(base, cfg)
    return run_contenders(label, base.to(s.device), data, s, on_step)


def run_contenders(label: str, base, data: DigitsSplit, s: DemoSettings, on_step=None) -> MethodResult:
    """Train copies of the injected `base` as each contender (reference, patch, recompute) from the
    same starting weights on the same batches."""
    params = sum(p.numel() for _, p in fastpeft.trainable_parameters(base))
    result = MethodResult(label, params, accuracy(base, data.test_x.to(s.device), data.test_y.to(s.device)))
    for name in CONTENDERS:
        model = copy.deepcopy(base)  # same starting weights for every contender
        if name != "reference":
            fastpeft.patch(model, recompute=name == "recompute")
        saved = _saved(model, data, s)
        losses, times = train(model, data, s, on_step)
        step = statistics.median(times[s.warmup:] if len(times) > s.warmup else times)
        acc = accuracy(model, data.test_x.to(s.device), data.test_y.to(s.device))
        result.contenders.append(ContenderResult(name, step, saved, acc, losses))
    return result


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------
def _mib(b: int) -> str:
    return f"{b / 2**20:.1f}M" if b < 100 * 2**20 else f"{b / 2**20:.0f}M"


def results_table(results: list[MethodResult], title: str) -> Table:
    """Fits 80 columns: one row per contender, the method named on its first row."""
    t = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, title_justify="left")
    for col, just in (("method", "left"), ("run", "left"), ("step", "right"), ("x ref", "right"),
                      ("saved", "right"), ("x ref", "right"), ("acc", "right"), ("loss", "right")):
        t.add_column(col, justify=just, no_wrap=True)
    for r in results:
        ref = r.get("reference")
        for i, c in enumerate(r.contenders):
            t.add_row(
                r.label if i == 0 else "", c.name, f"{c.step_s * 1e3:.0f}ms", f"{c.step_s / ref.step_s:.2f}",
                _mib(c.saved_bytes), f"{c.saved_bytes / max(ref.saved_bytes, 1):.2f}",
                f"{c.accuracy:.0%}", f"{c.losses[0]:.2f}>{c.losses[-1]:.2f}",
                end_section=i == len(r.contenders) - 1)
    return t


def _ratios(results: list[MethodResult], name: str, attr: str) -> list[float]:
    return [getattr(r.get(name), attr) / max(getattr(r.get("reference"), attr), 1e-30) for r in results]


def _span(xs: list[float]) -> str:
    lo, hi = min(xs), max(xs)
    return f"{lo:.2f}x" if f"{lo:.2f}" == f"{hi:.2f}" else f"{lo:.2f}-{hi:.2f}x"


def summary_line(results: list[MethodResult]) -> str:
    """What `patch` bought, over the methods shown."""
    acc_gap = max(abs(c.accuracy - r.get("reference").accuracy) for r in results for c in r.contenders)
    return (f"patch: step {_span(_ratios(results, 'patch', 'step_s'))} of the reference, saved bytes "
            f"{_span(_ratios(results, 'patch', 'saved_bytes'))}; recompute: bytes "
            f"{_span(_ratios(results, 'recompute', 'saved_bytes'))} at step "
            f"{_span(_ratios(results, 'recompute', 'step_s'))}; held-out accuracy within "
            f"{acc_gap * 100:.1f} points of the reference")


def markdown(results: list[MethodResult], meta: dict) -> str:
    lines = [f"# fastpeft demo, {meta['date']}, {meta['machine']}", "",
             f"{meta['setting']}", "",
             "| method | run | step | x ref | saved | x ref | held-out acc (before -> after) | loss first -> last |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        ref = r.get("reference")
        for c in r.contenders:
            lines.append(f"| {r.label} | {c.name} | {c.step_s * 1e3:.0f} ms | {c.step_s / ref.step_s:.2f} | "
                         f"{c.saved_bytes / 2**20:.1f} MiB | {c.saved_bytes / max(ref.saved_bytes, 1):.2f} | "
                         f"{r.accuracy_before:.1%} -> {c.accuracy:.1%} | {c.losses[0]:.3f} -> {c.losses[-1]:.3f} |")
    lines += ["", summary_line(results), ""]
    return "\n".join(lines)


def plot(results: list[MethodResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    styles = {"reference": "-", "patch": "--", "recompute": ":"}
    for i, r in enumerate(results):
        for c in r.contenders:
            ax_loss.plot(range(1, len(c.losses) + 1), c.losses, styles[c.name], color=f"C{i}",
                         label=f"{r.label} ({c.name})" if c.name == "reference" else None)
    ax_loss.set(xlabel="step", ylabel="train loss", title="loss (solid: reference, dashed: patch, dotted: recompute)")
    ax_loss.title.set_fontsize(9)
    ax_loss.legend(fontsize=7)
    width = 0.2
    xs = range(len(results))
    ax_acc.bar([x - 1.5 * width for x in xs], [r.accuracy_before for r in results], width, label="before", color="0.7")
    for j, name in enumerate(CONTENDERS):
        ax_acc.bar([x + (j - 0.5) * width for x in xs], [r.get(name).accuracy for r in results], width, label=name)
    ax_acc.set_xticks(list(xs), [r.label for r in results], fontsize=8, rotation=20)
    ax_acc.set(ylabel="held-out accuracy", ylim=(0, 1), title="held-out accuracy")
    ax_acc.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} threads"


def write_results(results: list[MethodResult], out: Path, meta: dict) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "demo.md", out / "demo.json", out / "demo.png"]
    paths[0].write_text(markdown(results, meta))
    paths[1].write_text(json.dumps({"meta": meta, "methods": [asdict(r) for r in results]}, indent=1))
    plot(results, paths[2])
    return paths


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------
def settings_from_args(args: argparse.Namespace, device: torch.device) -> DemoSettings:
    quick = bool(getattr(args, "quick", False))
    s = DemoSettings(model=getattr(args, "model", DemoSettings.model), device=str(device))
    if quick:  # a smoke run (tests/test_cli.py): two blocks, few images, few steps
        s.depth, s.steps, s.warmup, s.batch, s.limit, s.test_size = 2, 4, 1, 16, 200, 50
    if getattr(args, "steps", None):
        s.steps = args.steps
    return s


def pick_methods(args: argparse.Namespace, depth: int) -> list[tuple[str, object]]:
    cfgs = demo_configs(depth)
    if getattr(args, "all", False):
        return cfgs
    names = QUICK_METHODS if getattr(args, "quick", False) else DEFAULT_METHODS
    if getattr(args, "methods", None):
        names = tuple(n.strip() for n in args.methods.split(","))
        unknown = sorted(set(names) - {label for label, _ in cfgs})
        if unknown:
            raise SystemExit(f"fastpeft demo: unknown method(s) {unknown}; known: {[label for label, _ in cfgs]}")
    return [c for c in cfgs if c[0] in names]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"fastpeft demo: --device {name} requested but no CUDA device is available")
    return device


def demo_methods(args: argparse.Namespace, console: Console) -> list[MethodResult]:
    device = resolve_device(getattr(args, "device", "auto"))
    s = settings_from_args(args, device)
    probe = build_model(s, 10)
    info = vit_info(probe)
    cfgs = pick_methods(args, info.depth)
    data = load_digits(s.img_size, test_size=s.test_size, limit=s.limit)
    tokens = math.prod(info.grid_size) + info.num_prefix_tokens
    setting = (f"{s.model} (random init, depth {info.depth}, {s.img_size}x{s.img_size} images, patch {s.patch_size}, "
               f"{tokens} tokens) on scikit-learn digits: {len(data.train_y)} train / {len(data.test_y)} held-out; "
               f"{s.steps} AdamW steps of batch {s.batch}, lr {s.lr}, {device.type}")
    console.rule("[bold]PETL methods: reference vs fastpeft.patch vs patch(recompute=True)")
    console.print(setting, highlight=False)
    console.print("[dim]The backbone is random-init (no weights can be downloaded here): accuracy shows the "
                  "fine-tune learning, not what a pretrained ViT reaches.[/]")

    results: list[MethodResult] = []
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} steps"),
                  TimeElapsedColumn(), console=console, transient=True) as progress:
        task = progress.add_task("", total=len(cfgs) * len(CONTENDERS) * s.steps)
        for label, cfg in cfgs:
            progress.update(task, description=f"training {label}")
            results.append(run_method(label, cfg, data, s, on_step=lambda: progress.advance(task)))

    console.print(results_table(results, "step: median train step; saved: activation bytes kept for backward "
                                         "(one batch); acc: held-out accuracy after training"))
    console.print("trainable parameters (held-out accuracy before training): " + "; ".join(
        f"{r.label} {r.params:,} ({r.accuracy_before:.0%})" for r in results), highlight=False)
    console.print(f"[bold]{summary_line(results)}[/]", highlight=False)
    meta = {"date": date.today().isoformat(), "machine": machine(), "setting": setting,
            "torch": torch.__version__, "fastpeft": fastpeft.__version__}
    out = Path(getattr(args, "out", None) or "demo-results")
    paths = write_results(results, out, meta)
    console.print(f"results written to {out}/: " + ", ".join(p.name for p in paths), highlight=False)
    return results
