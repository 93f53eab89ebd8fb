"""The bench smoke run: every contender's code path on a tiny model, untimed, in well under a
minute. `make bench-smoke` and tests/test_bench_smoke.py both run it.

    python -m bench.smoke [--save DIR] [extra pytest args]

Then the host-overhead mode (`--bench-host`, bench/test_host.py) the same way: 2 blocks, one round,
three methods (slots, LayerNorm+SSF, VQT), into its own `*-host_overhead.json`.
"""
from __future__ import annotations

import sys

import pytest

#: 2-block vit_tiny at 64 px, batch 2; no torch.compile rows (a first compile alone takes ~40 s
#: here); two methods (AdaptFormer: slots + timm-ckpt + patch paths, LoRA: hooks + HF peft) and two
#: ops (one fused op per family that exists: scale_shift, VQT attention) at one small size.
SMOKE_ARGS = [
    "bench", "-q", "-p", "no:cacheprovider", "--benchmark-disable",
    "--bench-model", "vit_tiny_patch16_224", "--bench-depth", "2", "--bench-img-size", "64", "--bench-batch", "2",
    "--bench-compile", "none", "--bench-op-compile", "none", "--bench-op-sizes", "2x17x64",
    "-k", "AdaptFormer or LoRA or scale_shift or vqt_attention",
]

HOST_SMOKE_ARGS = [
    "bench", "-q", "-p", "no:cacheprovider", "--benchmark-disable", "--bench-host", "--bench-depth", "2",
    "-k", "AdaptFormer or SSF or VQT",
]


def main(argv: list[str]) -> int:
    args, host = list(SMOKE_ARGS), list(HOST_SMOKE_ARGS)
    if argv[:1] == ["--save"]:
        args += ["--bench-save", argv[1]]
        host += ["--bench-save", argv[1]]
        argv = argv[2:]
    rc = int(pytest.main(args + argv))
    return rc or int(pytest.main(host + argv))


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
