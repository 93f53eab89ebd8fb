"""Command line: `python -m fastpeft {demo,info}` (also installed as `fastpeft`).

demo  checks fastpeft's ops forward+backward against the pure-torch references on a random-init
      timm ViT's patch embeddings, then fine-tunes PETL methods on scikit-learn's bundled digits,
      each as the reference, `fastpeft.patch` and `patch(recompute=True)` side by side.
info  prints the build record and the available backends.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

# Largest max|op - ref| / max|ref| accepted, per dtype: one rounding to the dtype (half an ulp:
# 2**-11 fp16, 2**-8 bf16) with 2x headroom; fp32 differs only in summation order.
REL_TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastpeft", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="fine-tune PETL methods on bundled digits: reference vs patch vs recompute")
    demo.add_argument("--model", default="vit_tiny_patch16_224",
                      help="timm ViT name, built with pretrained=False (default: %(default)s)")
    demo.add_argument("--all", action="store_true", help="every method (default: one per fused op family)")
    demo.add_argument("--methods", help="comma-separated method labels to run instead of the default set")
    demo.add_argument("--steps", type=int, help="training steps per contender (default: 30)")
    demo.add_argument("--out", default="demo-results", help="folder for the table, JSON and plot (default: %(default)s)")
    demo.add_argument("--quick", action="store_true", help="a smoke run: two blocks, few images and steps")
    demo.add_argument("--device", default="auto",
                      help="auto (CUDA if present, else CPU), cpu, cuda or cuda:N (default: %(default)s)")
    sub.add_parser("info", help="print the build record and available backends")
    return parser


def _two_columns(title: str, header: tuple[str, str], rows) -> Table:
    table = Table(title=title)
    for name in header:
        table.add_column(name)
    for key, value in rows:
        table.add_row(key, value)
    return table


def backends_table() -> Table:
    from fastpeft import _ext

    return _two_columns("fastpeft backends", ("backend", "available"),
                        ((name, "[green]yes[/]" if ok else "[red]no[/]") for name, ok in _ext.backends().items()))


def build_info_table() -> Table:
    from fastpeft import _ext

    return _two_columns("fastpeft build", ("field", "value"), ((k, str(v)) for k, v in _ext.build_info().items()))


def _op_path(device: torch.device) -> str:
    from fastpeft import _ext

    status = _ext.load()
    has_kernel = status.has_cuda if device.type == "cuda" else status.has_cpu
    return f"extension ({device.type} kernel)" if has_kernel else "pure-torch reference"


def _scale_shift_errors(tokens: torch.Tensor, dtype: torch.dtype) -> tuple[list[float], float]:
    """Relative max errors of (y, grad_x, grad_scale, grad_shift) vs the fp32 reference, and ms."""
    from fastpeft.ops import scale_shift, scale_shift_ref

    width = tokens.shape[-1]
    g = torch.Generator(device=tokens.device).manual_seed(0)
    # SSF-like parameters: scale near 1, small shift.
    scale = 1 + 0.1 * torch.randn(width, generator=g, device=tokens.device)
    shift = 0.1 * torch.randn(width, generator=g, device=tokens.device)
    grad_out = torch.randn(tokens.shape, generator=g, device=tokens.device)
    inputs = [t.to(dtype) for t in (tokens, scale, shift)]
    grad_out = grad_out.to(dtype)

    def run(fn, xs, go):
        xs = [t.detach().clone().requires_grad_() for t in xs]
        y = fn(*xs)
        y.backward(go)
        return [y.detach()] + [t.grad for t in xs]

    if tokens.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    got = run(scale_shift, inputs, grad_out)
    if tokens.device.type == "cuda":
        torch.cuda.synchronize()
    ms = (time.perf_counter() - start) * 1e3
    want = run(scale_shift_ref, [t.float() for t in inputs], grad_out.float())
    errors = [((a.float() - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()
              for a, b in zip(got, want)]
    return errors, ms


def demo(args: argparse.Namespace, console: Console) -> int:
    import timm
    from timm.data import resolve_model_data_config

    from fastpeft.demo import demo_methods, resolve_device

    import fastpeft.ops  # noqa: F401  (loads the extension once; warns if it falls back)

    console.print(backends_table())
    device = resolve_device(args.device)
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False).to(device).eval()
    if not hasattr(model, "patch_embed"):
        console.print(f"[red]--model {args.model} has no patch_embed: the demo needs a timm ViT[/]")
        return 2
    batch = 1 if args.quick else 4
    images = torch.randn(batch, *resolve_model_data_config(model)["input_size"], device=device)
    with torch.no_grad():
        tokens = model.patch_embed(images)  # [batch, patches, embed_dim]

    dtypes = [torch.float32, torch.bfloat16] if args.quick else list(REL_TOLERANCE)
    table = Table(title=f"scale_shift on {args.model} patch embeddings {tuple(tokens.shape)}, "
                        f"{device}: {_op_path(device)}")
    for column in ("dtype", "y", "grad_x", "grad_scale", "grad_shift", "ms (fwd+bwd)", ""):
        table.add_column(column)
    worst = 0.0
    failed = False
    with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as progress:
        task = progress.add_task("scale_shift forward+backward vs reference", total=len(dtypes))
        for dtype in dtypes:
            errors, ms = _scale_shift_errors(tokens, dtype)
            ok = max(errors) <= REL_TOLERANCE[dtype]
            failed |= not ok
            worst = max(worst, max(errors))
            table.add_row(str(dtype).removeprefix("torch."), *(f"{e:.2e}" for e in errors),
                          f"{ms:.2f}", "[green]ok[/]" if ok else "[red]MISMATCH[/]")
            progress.advance(task)
    console.print(table)
    console.print(f"scale_shift max relative error vs reference: {worst:.2e}")

    demo_methods(args, console)
    if not getattr(args, "methods", None):  # the ConvNet / video families (fastpeft/demo_families.py)
        from fastpeft.demo_families import demo_families

        demo_families(args, console, device)
        from fastpeft.demo_tasks import demo_tasks  # many tasks on one backbone (fastpeft/demo_tasks.py)

        demo_tasks(args, console, device)
    return 1 if failed else 0


def info(args: argparse.Namespace, console: Console) -> int:
    console.print(build_info_table())
    console.print(backends_table())
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console = Console()
    return {"demo": demo, "info": info}[args.command](args, console)


if __name__ == "__main__":
    sys.exit(main())
