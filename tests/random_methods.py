"""One random method config, valid for the width-32, depth-2 test ViTs, drawn through `choice`
(`choice(options) -> one of them`): hypothesis draws in tests/test_properties.py, a seeded
random.Random in tools/reliability_table.py. Integers are drawn as `choice(range(lo, hi + 1))`,
booleans as `choice((False, True))`."""
from __future__ import annotations

from typing import Callable, Sequence

import fastpeft

NAMES = ("lora", "lora-petl", "fact", "kadaptation", "ssf", "bitfit", "adaptformer", "adapter", "convpass", "vpt",
         "noah", "vqt", "linear-probe")


def random_method(choice: Callable[[Sequence], object], dropout: bool):
    flag = lambda: choice((False, True))  # noqa: E731
    p = choice((0.1, 0.5)) if dropout else 0.0
    r = choice(range(1, 9))
    name = choice(NAMES)
    if name == "lora":
        return fastpeft.LoRA(rank=r, dropout=p, scale=choice((1.0, 0.5, 4)))
    if name == "lora-petl":
        return fastpeft.LoRA(rank=r, targets=choice((("q",), ("q", "v"), ("k", "v"), ("q", "k", "v"))), dropout=p,
                             style="petl", scale=choice((1.0, 10.0)))
    if name == "fact":
        return fastpeft.FacT(kind=choice(("tt", "tk")), rank=r, dropout=p)
    if name == "kadaptation":
        return fastpeft.KAdaptation(phm_dim=choice((2, 4, 8)), rank=1, lora_dim=choice(range(1, 5)), dropout=p,
                                    init="trainable", v_uses_q_factors=flag())
    if name == "ssf":
        return fastpeft.SSF()
    if name == "bitfit":
        return fastpeft.BitFit()
    if name == "linear-probe":
        return fastpeft.LinearProbe()
    if name == "adaptformer":
        return fastpeft.AdaptFormer(dim=r, dropout=p, mode=choice(("parallel", "sequential")), learnable_scale=flag(),
                                    layernorm_option=choice(("none", "in", "out")))
    if name == "adapter":
        return fastpeft.Adapter(dim=r, dropout=p, style=choice(("noah", "vpt")))
    if name == "convpass":
        return fastpeft.Convpass(dim=r, dropout=p, mlp=flag())
    if name == "vpt":
        return fastpeft.VPT(num_tokens=choice(range(1, 5)), deep=flag(), dropout=p)
    if name == "noah":
        lists = [[choice(range(5)) for _ in range(2)] for _ in range(3)]
        if not any(any(v) for v in lists):
            lists[0] = [2, 2]
        return fastpeft.NOAH(adapter_dims=lists[0], lora_ranks=lists[1], prompt_lens=lists[2], dropout=p, lora_dropout=p)
    return fastpeft.VQT(num_queries=choice(range(1, 4)), dropout=p)
