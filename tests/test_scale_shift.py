"""fastpeft.ops.scale_shift against its plain-torch reference (CPU).

With the extension built these exercise the C++ CPU kernel, i.e. the host/device math header
the CUDA kernel also compiles; without it, the registered reference.
"""

import pytest
import torch

from fastpeft.ops import scale_shift, scale_shift_ref
from fastpeft.ops.scale_shift import scale_shift_backward_ref

# (atol, rtol) against the reference computed in fp32 on the same (upcast) inputs. The op
# computes in fp32 and rounds each output once to the storage dtype, so low precision is off by
# at most half an ulp: 2**-11 (fp16) and 2**-8 (bf16) relative; reductions accumulate in fp32,
# so grad_scale/grad_shift obey the same bound.
TOLERANCES = {
    torch.float32: (1e-6, 1e-5),
    torch.float16: (1e-5, 1e-3),
    torch.bfloat16: (1e-5, 8e-3),
}

LEADING = [(0,), (1,), (7,), (2, 7)]
WIDTHS = [1, 3, 768, 3072]


def _inputs(leading, width, dtype, generator):
    x = torch.randn(*leading, width, generator=generator).to(dtype)
    scale = torch.randn(width, generator=generator).to(dtype)
    shift = torch.randn(width, generator=generator).to(dtype)
    grad_out = torch.randn(*leading, width, generator=generator).to(dtype)
    return x, scale, shift, grad_out


def _run(fn, x, scale, shift, grad_out):
    """Forward + backward of fn; returns (y, grad_x, grad_scale, grad_shift)."""
    x, scale, shift = (t.detach().clone().requires_grad_() for t in (x, scale, shift))
    y = fn(x, scale, shift)
    y.backward(grad_out)
    return y.detach(), x.grad, scale.grad, shift.grad


def _assert_close_to_ref(x, scale, shift, grad_out):
    dtype = x.dtype
    atol, rtol = TOLERANCES[dtype]
    got = _run(scale_shift, x, scale, shift, grad_out)
    want = _run(scale_shift_ref, x.float(), scale.float(), shift.float(), grad_out.float())
    for name, g, w in zip(("y", "grad_x", "grad_scale", "grad_shift"), got, want):
        assert g.dtype == dtype, name
        torch.testing.assert_close(g.float(), w, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")
    return got


@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("leading", LEADING, ids=str)
def test_forward_and_grads_match_reference(leading, width, dtype, generator):
    x, scale, shift, grad_out = _inputs(leading, width, dtype, generator)
    y, *_ = _assert_close_to_ref(x, scale, shift, grad_out)
    assert y.shape == x.shape and y.is_contiguous()


@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
def test_many_rows_are_reduced_in_parallel_chunks_reproducibly(dtype, generator):
    # 64 x 1024 is two of the CPU kernel's 32768-element grains: with >= 2 threads the
    # backward reduction really is split, which must stay accurate and bit-reproducible.
    x, scale, shift, grad_out = _inputs((64,), 1024, dtype, generator)
    first = _assert_close_to_ref(x, scale, shift, grad_out)
    again = _run(scale_shift, x, scale, shift, grad_out)
    for a, b in zip(first, again):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "make_x",
    [
        lambda g: torch.randn(96, 5, generator=g).t(),  # transposed: [5, 96], strides (1, 96)
        lambda g: torch.randn(4, 6, 192, generator=g)[:, ::2, ::2],  # sliced in two dims
        lambda g: torch.randn(3, 768, 4, generator=g)[..., 0],  # last dim strided
    ],
    ids=["transposed", "sliced", "strided_last_dim"],
)
def test_non_contiguous_inputs(make_x, generator):
    x = make_x(generator)
    assert not x.is_contiguous()
    width = x.shape[-1]
    scale = torch.randn(2 * width, generator=generator)[::2]  # strided params too
    shift = torch.randn(width, generator=generator)
    grad_out = torch.randn(x.shape[::-1], generator=generator).transpose(0, -1)  # strided grad
    y, *_ = _assert_close_to_ref(x, scale, shift, grad_out)
    assert y.is_contiguous()


def test_backward_op_matches_reference_backward(generator):
    x, scale, _shift, grad_out = _inputs((768,), 7, torch.float32, generator)
    args = (grad_out.t(), x.t(), torch.randn(1536, generator=generator)[::2])  # all strided
    got = torch.ops.fastpeft.scale_shift_backward(*args)
    want = scale_shift_backward_ref(*args)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-5)
    assert got[0].is_contiguous()


def test_reference_backward_is_the_reference_forward_gradient(generator):
    # scale_shift_backward_ref is what runs when the extension is absent: pin it to autograd.
    x, scale, shift, grad_out = _inputs((2, 7), 3, torch.float32, generator)
    _, *want = _run(scale_shift_ref, x, scale, shift, grad_out)
    got = scale_shift_backward_ref(grad_out, x, scale)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_needs_input_grad_is_honoured(generator):
    x, scale, shift, _ = _inputs((7,), 3, torch.float32, generator)
    scale.requires_grad_()
    scale_shift(x, scale, shift).sum().backward()
    assert scale.grad is not None and x.grad is None and shift.grad is None


def test_double_backward_matches_reference(generator):
    x, scale, shift, grad_out = _inputs((2, 7), 3, torch.float32, generator)

    def second_order(fn):
        xs = [t.clone().requires_grad_() for t in (x, scale, shift)]
        grads = torch.autograd.grad(fn(*xs), xs, grad_out, create_graph=True)
        loss = sum((g * g).sum() for g in grads)
        return torch.autograd.grad(loss, xs[:2])

    for g, w in zip(second_order(scale_shift), second_order(scale_shift_ref)):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def test_fp32_params_are_cast_to_bf16_activations(generator):
    # Autocast-style mix: fp32 parameters, bf16 activations; grads land on the fp32 params.
    x = torch.randn(7, 3, generator=generator).bfloat16()
    scale = torch.randn(3, generator=generator, requires_grad=True)
    shift = torch.randn(3, generator=generator, requires_grad=True)
    y = scale_shift(x, scale, shift)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert scale.grad.dtype == torch.float32 and shift.grad.dtype == torch.float32
    torch.testing.assert_close(shift.grad, torch.full((3,), 7.0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck_scale_shift(dtype, generator):
    x, scale, shift, _ = _inputs((2, 7), 3, dtype, generator)
    args = (x.requires_grad_(), scale.requires_grad_(), shift.requires_grad_())
    torch.library.opcheck(torch.ops.fastpeft.scale_shift.default, args)
    torch.library.opcheck(torch.ops.fastpeft.scale_shift.default, (x.detach().transpose(0, 1), scale.detach(), shift.detach()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck_scale_shift_backward(dtype, requires_grad, generator):
    x, scale, _shift, grad_out = _inputs((2, 7), 3, dtype, generator)
    args = tuple(t.requires_grad_(requires_grad) for t in (grad_out, x, scale))
    torch.library.opcheck(torch.ops.fastpeft.scale_shift_backward.default, args)


def _loss(x, scale, shift):
    return (scale_shift(x, scale, shift) ** 2).sum()


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(backend, generator):
    torch._dynamo.reset()
    compiled = torch.compile(_loss, fullgraph=True, backend=backend)
    x, scale, shift, _ = _inputs((2, 7), 768, torch.float32, generator)

    def value_and_grads(fn):
        xs = [t.clone().requires_grad_() for t in (x, scale, shift)]
        loss = fn(*xs)
        return (loss, *torch.autograd.grad(loss, xs))

    for g, w in zip(value_and_grads(compiled), value_and_grads(_loss)):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize(
    ("x", "scale", "shift", "match"),
    [
        (torch.randn(2, 4), torch.randn(3), torch.randn(4), r"width mismatch.*last dim is 4.*scale has 3"),
        (torch.randn(2, 4), torch.randn(4), torch.randn(5), r"width mismatch.*shift has 5"),
        (torch.randn(2, 4), torch.randn(1, 4), torch.randn(4), r"scale must be 1-D.*\(1, 4\)"),
        (torch.randn(2, 4), torch.randn(4, device="meta"), torch.randn(4), r"device mismatch.*meta"),
        (torch.randn(2, 4), torch.randn(4), torch.randn(4, device="meta"), r"device mismatch.*meta"),
        (torch.ones(2, 4, dtype=torch.int32), torch.randn(4), torch.randn(4), r"unsupported dtype torch.int32"),
        (torch.randn(2, 4).double(), torch.randn(4), torch.randn(4), r"unsupported dtype torch.float64"),
        (torch.randn(2, 4), torch.ones(4, dtype=torch.int64), torch.randn(4), r"scale has unsupported dtype"),
        (torch.tensor(1.0), torch.randn(1), torch.randn(1), r"at least one dimension"),
    ],
    ids=["width_scale", "width_shift", "scale_2d", "device_scale", "device_shift", "int_x",
         "float64_x", "int_scale", "scalar_x"],
)
def test_invalid_inputs_raise_value_error(x, scale, shift, match):
    with pytest.raises(ValueError, match=match):
        scale_shift(x, scale, shift)


def test_kernel_checks_guard_direct_op_calls():
    # Bypassing the functional must still never reach a kernel with bad shapes: the C++ kernels'
    # checks and the reference op's raise a ValueError naming the argument.
    with pytest.raises(ValueError, match="scale"):
        torch.ops.fastpeft.scale_shift(torch.randn(2, 4), torch.randn(3), torch.randn(4))
