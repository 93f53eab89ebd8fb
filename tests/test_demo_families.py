"""The ConvNet / video demo's generated data (fastpeft/demo_families.py; its quick run is part of
`demo --quick` in tests/test_cli.py)."""
from __future__ import annotations

import torch

from fastpeft import demo_families as fam


def test_generated_images_and_clips():
    x, y = fam.stripes(12, seed=0)
    assert x.shape == (12, 3, fam.IMG, fam.IMG) and y.shape == (12,) and set(y.tolist()) <= {0, 1, 2, 3}
    c, yc = fam.moving_squares(6, seed=0)
    assert c.shape == (6, fam.FRAMES, 3, fam.IMG, fam.IMG) and set(yc.tolist()) <= {0, 1, 2, 3}
    # the square moves by 2 px per frame in the labelled direction
    i = 0
    dy, dx = [(0, 2), (0, -2), (2, 0), (-2, 0)][int(yc[i])]
    mass = [torch.nonzero(c[i, t, 0] > 1.5).float().mean(0) for t in (0, 1)]
    step = (mass[1] - mass[0]).round().tolist()
    assert abs(step[0] - dy) <= 1 and abs(step[1] - dx) <= 1
    assert torch.equal(fam.stripes(4, seed=3)[0], fam.stripes(4, seed=3)[0])  # seeded
