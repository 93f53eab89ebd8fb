"""Test-wide setup: Triton's CPU interpreter, deterministic seeds, the `gpu` marker."""

import os

# Must run before anything imports triton (the interpreter is chosen at import time): Triton
# kernels then execute on CPU tensors, which is how they are tested without a GPU.
os.environ.setdefault("TRITON_INTERPRET", "1")

import random  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same global RNG state."""
    random.seed(0)
    torch.manual_seed(0)


@pytest.fixture
def generator() -> torch.Generator:
    """A private seeded CPU generator, for tests that must not depend on call order."""
    return torch.Generator().manual_seed(0)
