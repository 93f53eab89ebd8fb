"""GPU tests: compiled Triton kernels and the CUDA extension on a real device.

Run on a CUDA machine with the interpreter off: `make test-gpu` (TRITON_INTERPRET=0 pytest -m gpu).
Without a GPU every test here is skipped (tests/conftest.py), so CI collects them at no cost.
"""
from __future__ import annotations

import pytest
import torch

from tests.kernels.conftest import INTERPRETING

# Applied to every module here: a CUDA device and compiled (not interpreted) Triton kernels.
on_gpu = [pytest.mark.gpu,
          pytest.mark.skipif(INTERPRETING, reason="needs compiled Triton kernels: run with TRITON_INTERPRET=0")]


def to_cuda(obj):
    """Tensors (also inside dicts / tuples / lists) moved to the current CUDA device."""
    if isinstance(obj, torch.Tensor):
        return obj.cuda()
    if isinstance(obj, dict):
        return {k: to_cuda(v) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_cuda(v) for v in obj)
    return obj


@pytest.fixture(autouse=True)
def _true_fp32():
    """fp32 references in true fp32: cuDNN convolutions default to TF32 on Ampere+ (the Convpass
    conv, the patch embedding), which would put ~1e-3 relative noise into the very numbers the
    kernels are compared with. (Matmuls already default to IEEE fp32; pinned here as well.)"""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
