"""Render a bench results JSON (written by `pytest bench --bench-save DIR`) as a markdown table
and a PNG chart, and optionally put them into a file's bench:begin/end block (`make bench`: bench/results/LATEST.md).

    python -m bench.report bench/results/<device>-<date>.json
    python -m bench.report --latest bench/results --readme bench/results/LATEST.md

Writes <json stem>.md and <json stem>.png beside the JSON (or into --out-dir). With --readme,
the text between `<!-- bench:begin -->` and `<!-- bench:end -->` in that file is replaced by the
table (and a link to the chart); nothing else in the file is touched.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import OrderedDict
from pathlib import Path

BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
CONTENDER_ORDER = ("eager", "compile", "peft", "timm-ckpt", "patch", "patch-recompute", "patch+compile",
                   "compile-reduce-overhead", "patch+compile-reduce-overhead", "fastpeft")


def _t(s: float | None) -> str:
    if s is None:
        return "-"
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.1f} ms"
    return f"{s * 1e6:.0f} us"


def _time_cell(r: dict | None) -> str:
    if r is None:
        return ""
    if r["status"] != "ok":
        return "skip"
    iqr = r.get("time_iqr_s")
    return _t(r.get("time_median_s")) + (f" ({_t(iqr)})" if iqr is not None else "")


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _mib(b: int | None) -> str:
    return "-" if b is None else f"{b / 2**20:,.1f}"


def _gb(b: int | None) -> str:
    return "-" if b is None else f"{b / 1e9:,.2f}"


def _num(v: float | None, fmt: str = "{:,.1f}") -> str:
    return "-" if v is None else fmt.format(v)


def _get(r: dict | None, key: str):
    return None if r is None or r["status"] != "ok" else r.get(key)


def _grouped(rows, suite):
    """(name, size, contender) -> {mode: row}, in first-seen order."""
    out: "OrderedDict[tuple, dict]" = OrderedDict()
    for r in rows:
        if r["suite"] == suite:
            out.setdefault((r["name"], r.get("size"), r["contender"]), {})[r["mode"]] = r
    return out


def header(doc: dict) -> str:
    m, c = doc["machine"], doc["config"]
    if c.get("host"):
        return (f"**{m['device']}** — host-overhead mode (`pytest bench --bench-host`): {c['model']}"
                + (f" depth {c['depth']}" if c.get("depth") else "") + f" img {c['img_size']} (5 tokens), "
                f"batch {c['batch']}, {c['dtype']}, 1 thread, Triton launches stubbed, {m['date']}; "
                f"torch {m['torch']}, triton {m.get('triton')}, timm {m.get('timm')}, git `{m['git_sha']}`; "
                + ("one round per contender (benchmark disabled: smoke run)." if c.get("benchmark_disabled")
                   else f"{c['rounds']} alternating rounds per contender."))
    shape = f"{c['model']}" + (f" depth {c['depth']}" if c.get("depth") else "") + \
            (f" img {c['img_size']}" if c.get("img_size") else "")
    return (f"**{m['device']}** — {shape}, batch {c['batch']}, {c['dtype']}, {m['date']}; "
            f"torch {m['torch']}, triton {m.get('triton')}, timm {m.get('timm')}, peft {m.get('peft')}, "
            f"git `{m['git_sha']}`; {c['rounds']} timed rounds per end-to-end row, {c['op_rounds']} per op row"
            + (f"; float32 matmul precision {c['matmul_precision']}" if c.get("matmul_precision", "highest") != "highest"
               else "")
            + (f"; {c['autocast']} autocast" if c.get("autocast", "none") != "none" else "")
            + (" (benchmark disabled: single untimed calls)" if c.get("benchmark_disabled") else "") + ".")


def markdown(doc: dict, chart: str | None = None) -> str:
    rows = doc["rows"]
    lines = [header(doc), ""]
    if chart:
        lines += [f"![bench chart]({chart})", ""]
    e2e = _grouped(rows, "e2e")
    if e2e:
        body = []
        for (name, _, contender), modes in e2e.items():
            tr, inf = modes.get("train"), modes.get("infer")
            if all(r["status"] != "ok" for r in modes.values()):
                continue
            params = _get(tr, "trainable_params") or _get(inf, "trainable_params")
            body.append(
                f"| {name} | {contender} | {_num(params, '{:,}')} | {_time_cell(tr)} | {_x(_get(tr, 'time_vs_eager'))} | "
                f"{_num(_get(tr, 'throughput'))} | {_mib(_get(tr, 'saved_bytes'))} | {_x(_get(tr, 'saved_vs_eager'))} | "
                f"{_gb(_get(tr, 'hbm_bytes'))} | {_t(_get(tr, 'h100_lower_bound_s'))} | "
                f"{_num(_get(tr, 'launches_per_block'), '{:.0f}')} | {_time_cell(inf)} | "
                f"{_x(_get(inf, 'time_vs_eager'))} | {_num(_get(inf, 'throughput'))} |")
        lines += _table(
            "Train step = forward + backward + AdamW step; inference = no_grad forward. Times: median (IQR); "
            "\"x eager\" = ratio to the eager reference of the same method in this run (lower is better). "
            "Saved = activation bytes autograd keeps for backward (distinct storages, parameters and buffers "
            "excluded). HBM = modeled bytes moved by one train step (eager/patch: inputs + outputs of every "
            "dispatched op; compile: Inductor's count for its kernels); H100 bound = HBM / 3.35 TB/s. "
            "Launches/block: dispatched aten ops per block (eager proxy) or profiler-counted kernels (compile).",
            ["method", "contender"], ["trainable", "train", "x eager", "img/s", "saved MiB", "x eager", "HBM GB",
                                      "H100 bound", "launches/block", "inference", "x eager", "img/s"], body)
    host = _grouped(rows, "host")
    if host:
        body = []
        for (name, _, contender), modes in host.items():
            r = modes.get("train")
            if r is None or r["status"] != "ok":
                continue
            eager = modes_eager = host.get((name, None, "eager"), {}).get("train")
            lpb = _get(r, "launches_per_block")
            elpb = _get(modes_eager, "launches_per_block")
            tvse = r.get("time_vs_eager")
            if tvse is None and eager is not None and _get(eager, "time_median_s"):
                tvse = r["time_median_s"] / eager["time_median_s"]
            body.append(
                f"| {name} | {contender} | {_time_cell(r)} | {_x(tvse)} | {_x(r.get('paired_vs_eager'))} | "
                f"{_num(_get(r, 'triton_per_block'), '{:.1f}')} | {_num(_get(r, 'aten_per_block'), '{:.1f}')} | "
                f"{_num(lpb, '{:.1f}')} | {_x(lpb / elpb if lpb is not None and elpb else None)} | "
                f"{_num(r.get('patched'), '{:d}') if r.get('patched') is not None else ''} |")
        lines += _table(
            "Host time of a train step (forward + cross-entropy + backward, no optimizer) with every Triton "
            "launch replaced by a counter (patched models: `fastpeft.patch(model, backend=\"triton\")`), "
            "compute negligible: median (IQR) over rounds in which the contenders alternate. \"x eager\" = "
            "ratio of medians; \"paired\" = median over rounds of the same-round ratio. Per block: Triton "
            "launches, aten ops that do work (a TorchDispatchMode; custom ops looked through), their sum, "
            "divided by the depth. Targets: patch <= 1.10x, recompute <= 1.3x, "
            "patch launches/block <= eager's.",
            ["method", "contender"], ["host/step", "x eager", "paired", "Triton/block", "aten/block", "launches/block",
                                      "x eager", "patched"], body)
    multi = [r for r in rows if r["suite"] == "multitask" and r["status"] == "ok"]
    if multi:
        body = [f"| {r.get('tasks')} | {r['contender']} | {_time_cell(r)} | {_x(r.get('time_vs_single'))} | "
                f"{_num(r.get('throughput'))} | {_mib(r.get('saved_bytes'))} | {_x(r.get('saved_vs_single'))} | "
                f"{_mib(r.get('resident_bytes'))} | {_mib(r.get('separate_models_bytes'))} | "
                f"{_num((r.get('disk_bytes_per_task') or 0) / 1024, '{:,.0f}')} |" for r in multi]
        lines += _table(
            "Mixed-task batches (bench/test_multitask.py): T LoRA tasks on one backbone, row i -> task i mod T. "
            "single = one single-task model on the whole batch; fused = `model(x, task=ids)` (stacked, "
            "gathered per row, vmapped); loop = each task's rows through its own single-task forward. "
            "Train step = forward + backward + AdamW step; median (IQR). Resident = parameter and buffer bytes "
            "(backbone once + the tasks'); separate = T single-task models; disk = one task's file.",
            ["tasks", "contender"], ["train", "x single", "img/s", "saved MiB", "x single", "resident MiB",
                                     "separate MiB", "disk KiB/task"], body)
    infer = [r for r in rows if r["suite"] == "multitask-infer" and r["status"] == "ok"]
    if infer:
        body = [f"| {r.get('tasks')} | {r['contender']} | {_time_cell(r)} | {_x(r.get('time_vs_single'))} | "
                f"{_num(r.get('throughput'))} | {_mib(r.get('resident_bytes'))} |" for r in infer]
        lines += _table(
            "Mixed-task inference (the same batches, eval forward under torch.no_grad()); peft = HF peft's "
            "mixed-adapter LoRA (`model(x, adapter_names=[task per row])`, one adapter and head per task).",
            ["tasks", "contender"], ["forward", "x single", "img/s", "resident MiB"], body)
    ops = _grouped(rows, "op")
    if ops:
        body = []
        for (name, size, contender), modes in ops.items():
            tr, inf = modes.get("fwd+bwd"), modes.get("fwd")
            if all(r["status"] != "ok" for r in modes.values()):
                continue
            saved = _get(tr, "saved_bytes")
            hbm = _get(tr, "hbm_bytes")
            body.append(
                f"| {name} | {size} | {contender} | {_time_cell(tr)} | {_x(_get(tr, 'time_vs_eager'))} | "
                f"{_time_cell(inf)} | {_x(_get(inf, 'time_vs_eager'))} | "
                f"{'-' if saved is None else f'{saved / 1024:,.0f}'} | {_x(_get(tr, 'saved_vs_eager'))} | "
                f"{'-' if hbm is None else f'{hbm / 1e6:,.1f}'} | {_x(_get(tr, 'hbm_vs_eager'))} | "
                f"{_num(_get(tr, 'launches'), '{:.0f}')} |")
        lines += _table(
            "Per-op rows (fixed random output gradient; dropout off). HBM and launches are for fwd+bwd.",
            ["op", "B x N x D", "contender"], ["fwd+bwd", "x eager", "fwd", "x eager", "saved KiB", "x eager", "HBM MB",
                                               "x eager", "launches"], body)
    skipped: "OrderedDict[str, list[str]]" = OrderedDict()
    for r in rows:
        if r["status"] != "ok":
            label = f"{r['name']}" + (f"@{r['size']}" if r.get("size") else "") + f" {r['contender']} {r['mode']}"
            skipped.setdefault(r.get("reason", ""), []).append(label)
    if skipped:
        lines += ["<details><summary>Skipped rows and why</summary>", ""]
        for reason, labels in skipped.items():
            shown = ", ".join(labels[:12]) + (f", ... ({len(labels)} rows)" if len(labels) > 12 else "")
            lines.append(f"- {reason}: {shown}")
        lines += ["", "</details>", ""]
    return "\n".join(lines)


def _table(intro: str, left: list[str], right: list[str], body: list[str]) -> list[str]:
    """A markdown table after its intro paragraph: `left` columns left-aligned, `right` numeric."""
    return [intro, "", "| " + " | ".join(left + right) + " |",
            "|" + "---|" * len(left) + "---:|" * len(right), *body, ""]


def chart(doc: dict, path: Path) -> bool:
    """Grouped bars per method, one bar per contender: train time, inference time, saved MiB."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("bench.report: matplotlib not installed; no chart (make bench installs it)", file=sys.stderr)
        return False
    rows = [r for r in doc["rows"] if r["suite"] == "e2e" and r["status"] == "ok"]
    if not rows:
        return False
    methods = list(OrderedDict.fromkeys(r["name"] for r in rows))
    contenders = [c for c in CONTENDER_ORDER if any(r["contender"] == c for r in rows)]
    panels = [("train", "time_median_s", "train step (s)"), ("infer", "time_median_s", "inference (s)"),
              ("train", "saved_bytes", "saved for backward (MiB)")]
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(10, 1.1 * len(methods) + 2), 11), sharex=True)
    width = 0.8 / max(1, len(contenders))
    for ax, (mode, key, label) in zip(axes, panels):
        for j, c in enumerate(contenders):
            xs, ys = [], []
            for i, m in enumerate(methods):
                r = next((r for r in rows if r["name"] == m and r["contender"] == c and r["mode"] == mode), None)
                if r is not None and r.get(key) is not None:
                    xs.append(i + (j - (len(contenders) - 1) / 2) * width)
                    ys.append(r[key] / 2**20 if key == "saved_bytes" else r[key])
            ax.bar(xs, ys, width, label=c)
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(ncol=len(contenders), fontsize=8, loc="lower left", bbox_to_anchor=(0, 1.0), frameon=False)
    axes[-1].set_xticks(range(len(methods)))
    axes[-1].set_xticklabels(methods, rotation=30, ha="right")
    c, m = doc["config"], doc["machine"]
    fig.suptitle(f"fastpeft bench: {m['device']} | {c['model']} batch {c['batch']} {c['dtype']} | {m['date']}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def update_readme(readme: Path, text: str) -> bool:
    body = readme.read_text() if readme.exists() else ""
    if BEGIN not in body or END not in body:
        print(f"bench.report: {readme} has no {BEGIN} ... {END} markers; "
              "left unchanged", file=sys.stderr)
        return False
    pre, rest = body.split(BEGIN, 1)
    _, post = rest.split(END, 1)
    readme.write_text(f"{pre}{BEGIN}\n{text.rstrip()}\n{END}{post}")
    return True


def latest(directory: Path) -> Path:
    files = [p for p in directory.glob("*.json") if not p.name.endswith(".benchmark.json")]
    if not files:
        raise SystemExit(f"bench.report: no results JSON in {directory} (run `make bench` first)")
    return max(files, key=lambda p: p.stat().st_mtime)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("json", nargs="?", help="results JSON from `pytest bench --bench-save DIR`")
    ap.add_argument("--latest", metavar="DIR", help="use the newest results JSON in DIR")
    ap.add_argument("--out-dir", help="where to write the .md and .png (default: beside the JSON)")
    ap.add_argument("--readme", help="replace the bench:begin/end block of this file with the table")
    args = ap.parse_args(argv)
    if not args.json and not args.latest:
        ap.error("give a results JSON or --latest DIR")
    src = Path(args.json) if args.json else latest(Path(args.latest))
    doc = json.loads(src.read_text())
    out = Path(args.out_dir) if args.out_dir else src.parent
    out.mkdir(parents=True, exist_ok=True)
    png = out / f"{src.stem}.png"
    has_chart = chart(doc, png)
    md = out / f"{src.stem}.md"
    md.write_text(markdown(doc, png.name if has_chart else None))
    print(f"bench.report: wrote {md}" + (f" and {png}" if has_chart else ""))
    if args.readme:
        readme = Path(args.readme)
        rel = os.path.relpath(png, readme.parent) if has_chart else None
        if update_readme(readme, markdown(doc, rel)):
            print(f"bench.report: updated the Benchmarks section of {readme}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
