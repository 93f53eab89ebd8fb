// Operator schemas for the `fastpeft` library, plus a thin pybind11 module that reports how
// the extension was compiled. Kernels register themselves per device in csrc/cpu/ and
// csrc/cuda/; fake (meta) and autograd formulas are registered from Python (fastpeft/ops/).
//
// The same schemas are defined from Python when this extension is unavailable
// (fastpeft/ops/scale_shift.py, fastpeft/ops/vqt.py): keep the two in sync (tests/test_ext.py compares them).
#include <pybind11/pybind11.h>
#include <torch/library.h>

#if defined(FASTPEFT_WITH_CUDA)
#include <cuda.h>  // CUDA_VERSION
#endif

#ifndef FASTPEFT_TORCH_VERSION
#define FASTPEFT_TORCH_VERSION "unknown"
#endif

TORCH_LIBRARY(fastpeft, m) {
  // Tells torch which Python module holds the fake impls, so FakeTensor tracing can import it
  // on demand (and torch checks register_fake is called from there).
  m.set_python_module("fastpeft.ops.scale_shift");
  // y = x * scale + shift over the last dim. x: [..., C] fp32/fp16/bf16; scale, shift: [C].
  m.def("scale_shift(Tensor x, Tensor scale, Tensor shift) -> Tensor");
  // (grad_x, grad_scale, grad_shift); the reductions accumulate in fp32.
  m.def("scale_shift_backward(Tensor grad_out, Tensor x, Tensor scale) -> (Tensor, Tensor, Tensor)");
}

// One fragment per op module: `set_python_module` applies to the defs of its own Library
// object, and torch requires each fake to be registered from exactly the module its op names.
// So every op family's fakes live beside its autograd formula and reference (importing any of
// them imports fastpeft.ops, which loads them all), and a .so built before an op family existed
// keeps working with newer Python (fastpeft/ops/vqt.py then defines its ops itself).
TORCH_LIBRARY_FRAGMENT(fastpeft, m) {
  m.set_python_module("fastpeft.ops.vqt");
  // VQT. q [B, H, Q, d]; k, v [B, H, N, d] (any strides, unit stride on d); out like q,
  // lse [B, H, Q] fp32 = log sum_n exp(scale q.k_n).
  m.def("vqt_query_attention(Tensor q, Tensor k, Tensor v, float scale) -> (Tensor out, Tensor lse)");
  // grad_q only (keys/values are frozen); delta [B, H, Q] fp32 = rowsum(grad_out * out).
  m.def(
      "vqt_query_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor lse, "
      "Tensor delta, float scale) -> Tensor");
  // cls [B, D], queries [L, B, Q, D] -> out [B, D (1 + L Q)] (each of the 1 + L segments
  // L2-normalised), norms [B, 1 + L] fp32.
  m.def("vqt_aggregate(Tensor cls, Tensor queries, float eps) -> (Tensor out, Tensor norms)");
  m.def(
      "vqt_aggregate_backward(Tensor grad_out, Tensor out, Tensor norms, int num_queries, "
      "float eps) -> (Tensor, Tensor)");
}

namespace py = pybind11;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastpeft compiled kernels (ops are registered as torch.ops.fastpeft.*)";
  m.def("compiled_info", [] {
    py::dict info;
#if defined(FASTPEFT_WITH_CUDA)
    info["with_cuda"] = true;
    info["cuda_version"] = CUDA_VERSION;
#else
    info["with_cuda"] = false;
    info["cuda_version"] = py::none();
#endif
    info["torch_version"] = FASTPEFT_TORCH_VERSION;
    return info;
  });
}
