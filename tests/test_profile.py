"""fastpeft.profile.saved_activation_bytes: exact byte counts on tiny graphs."""
from __future__ import annotations

import torch
from torch import nn

from fastpeft.profile import saved_activation_bytes


def test_counts_each_storage_once():
    a = torch.randn(1000, requires_grad=True)

    def fn():
        y = a.exp()  # saves its result y (4,000 bytes)
        return (y * y).sum()  # saves y twice: same storage, counted once

    assert saved_activation_bytes(fn) == 4000


def test_view_counts_its_whole_storage():
    a = torch.randn(10, 100, requires_grad=True)

    def fn():
        y = a.exp()  # saves y: 4,000 bytes
        return y[:2].sin().sum()  # saves a view of y (same storage)

    assert saved_activation_bytes(fn) == 4000


def test_parameters_are_excluded():
    lin = nn.Linear(10, 20)
    x = torch.randn(5, 10)

    def fn():
        lin(x).sum().backward()  # addmm saves x (200 bytes) and weight.t() (a parameter view)

    assert saved_activation_bytes(fn) == 5 * 10 * 4


def test_exclude_buffers_of_given_modules():
    bn = nn.BatchNorm1d(8).eval()  # eval-mode batch norm saves its running statistics (buffers)
    x = torch.randn(4, 8, requires_grad=True)

    def fn():
        bn(x).sum().backward()

    with_buffers = saved_activation_bytes(fn)
    without = saved_activation_bytes(fn, exclude=[bn])
    assert without == 4 * 8 * 4  # only the input
    assert with_buffers == without + 2 * 8 * 4  # + running_mean, running_var


def test_exclude_tensors_and_no_grad():
    a = torch.randn(100, requires_grad=True)
    assert saved_activation_bytes(lambda: (a * a).sum(), exclude=[a]) == 0
    with torch.no_grad():
        assert saved_activation_bytes(lambda: (a * a).sum()) == 0


def test_the_measured_graph_is_freed_after_fn():
    # sigmoid saves its own output: held by the pack hook inside the graph, that output would be a
    # reference cycle through autograd's C++ graph, invisible to the garbage collector, and every
    # measured model's activations would stay alive for good (tests/patch ran out of memory)
    import gc
    import weakref

    x = torch.randn(64, requires_grad=True)
    outs = []

    def fn():
        y = torch.sigmoid(x)
        outs.append(weakref.ref(y))
        return y.sum()

    assert saved_activation_bytes(fn) == 64 * 4
    gc.collect()
    assert outs[0]() is None
