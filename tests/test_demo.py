"""The demo's data and its quick path (the CLI end to end is in tests/test_cli.py)."""
import argparse
import json

import pytest
import torch
from rich.console import Console

from fastpeft import demo


def test_digits_split_shapes_labels_and_sizes():
    data = demo.load_digits(img_size=24)
    assert data.train_x.shape == (1797 - 360, 3, 24, 24) and data.test_x.shape == (360, 3, 24, 24)
    assert data.train_x.dtype == torch.float32 and data.train_y.dtype == torch.long
    assert len(data.train_y) == len(data.train_x) and len(data.test_y) == len(data.test_x)
    # every class in both sets, stratified: held-out counts within one image of 36 per class
    counts = torch.bincount(data.test_y, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37
    assert set(data.train_y.tolist()) == set(range(10))
    # normalised over the train set; the three channels are the same grey image
    assert abs(data.train_x.mean().item()) < 1e-4 and abs(data.train_x.std().item() - 1) < 1e-3
    assert torch.equal(data.train_x[:, 0], data.train_x[:, 2])


def test_digits_limit_and_bad_sizes():
    data = demo.load_digits(img_size=8, test_size=20, limit=100)
    assert len(data.train_y) == 80 and len(data.test_y) == 20
    with pytest.raises(ValueError, match="img_size"):
        demo.load_digits(img_size=4)
    with pytest.raises(ValueError, match="test_size"):
        demo.load_digits(img_size=8, test_size=100, limit=100)


def test_batches_are_the_same_for_every_contender_and_cover_the_epoch():
    a = demo._batches(100, 32, steps=7, seed=0)
    b = demo._batches(100, 32, steps=7, seed=0)
    assert len(a) == 7 and all(torch.equal(x, y) for x, y in zip(a, b))
    assert sorted(torch.cat(a[:3]).tolist()) == sorted(set(torch.cat(a[:3]).tolist()))  # no repeat within an epoch


def test_quick_path_table_has_three_contenders_and_accuracy(tmp_path):
    args = argparse.Namespace(quick=True, device="cpu", model="vit_tiny_patch16_224", out=str(tmp_path),
                              all=False, methods=None, steps=None)
    console = Console(width=80, record=True)
    results = demo.demo_methods(args, console)
    assert [r.label for r in results] == list(demo.QUICK_METHODS)
    for r in results:
        assert [c.name for c in r.contenders] == list(demo.CONTENDERS)
        for c in r.contenders:
            assert 0.0 <= c.accuracy <= 1.0 and c.step_s > 0 and c.saved_bytes > 0 and len(c.losses) == 4
        ref = r.get("reference")
        # patch changes how, not what: same batches, same start, same losses within fp32 tolerance
        for c in r.contenders[1:]:
            torch.testing.assert_close(torch.tensor(c.losses), torch.tensor(ref.losses), rtol=1e-4, atol=1e-5)
        assert r.get("recompute").saved_bytes < ref.saved_bytes
    text = console.export_text()
    assert all(len(line) <= 80 for line in text.splitlines())
    for name in demo.CONTENDERS:
        assert name in text
    saved = json.loads((tmp_path / "demo.json").read_text())
    assert [m["label"] for m in saved["methods"]] == list(demo.QUICK_METHODS)
    assert all(len(m["contenders"]) == 3 and "accuracy" in m["contenders"][0] for m in saved["methods"])
    assert (tmp_path / "demo.png").stat().st_size > 0 and "| recompute |" in (tmp_path / "demo.md").read_text()


def test_unknown_method_is_refused():
    args = argparse.Namespace(quick=False, all=False, methods="AdaptFormer,Nope")
    with pytest.raises(SystemExit, match="Nope"):
        demo.pick_methods(args, depth=12)
