// scale_shift: y[..., c] = x[..., c] * scale[c] + shift[c]  (SSF-style per-channel affine).
//
// The per-element math lives here, used verbatim by csrc/cpu/scale_shift.cpp and
// csrc/cuda/scale_shift.cu. Everything is computed in fp32 whatever the storage dtype.
#pragma once

#include "fastpeft/common.h"

namespace fastpeft {
namespace scale_shift {

// Rounded twice (multiply, then add) on purpose: that is what the eager reference
// `x * scale + shift` does, so CPU results are bit-identical to it in fp32. nvcc would
// otherwise contract to an FMA (one rounding); the CPU build uses -ffp-contract=off for the
// same reason (gcc contracts on FMA-capable targets such as aarch64).
FASTPEFT_HD inline float mul(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

FASTPEFT_HD inline float add(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

// Forward element.
FASTPEFT_HD inline float forward(float x, float scale, float shift) {
  return add(mul(x, scale), shift);
}

// d y / d x element.
FASTPEFT_HD inline float grad_x(float grad_out, float scale) { return mul(grad_out, scale); }

// Running fp32 sums for d/d scale (sum g*x) and d/d shift (sum g) of one column.
struct ColumnSums {
  float scale = 0.f;
  float shift = 0.f;
};

FASTPEFT_HD inline void accumulate(ColumnSums& acc, float grad_out, float x) {
  acc.scale = add(acc.scale, mul(grad_out, x));
  acc.shift = add(acc.shift, grad_out);
}

FASTPEFT_HD inline void combine(ColumnSums& acc, const ColumnSums& other) {
  acc.scale = add(acc.scale, other.scale);
  acc.shift = add(acc.shift, other.shift);
}

// Host-side argument checks shared by the CPU and CUDA entry points.
inline void check_forward(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift) {
  constexpr const char* op = "fastpeft::scale_shift";
  TORCH_CHECK_VALUE(x.dim() >= 1, op, ": x must have at least one dimension, got a scalar");
  check_supported_float(x, op, "x");
  check_channel_vector(scale, x.size(-1), x, op, "scale");
  check_channel_vector(shift, x.size(-1), x, op, "shift");
}

inline void check_backward(const at::Tensor& grad_out, const at::Tensor& x,
                           const at::Tensor& scale) {
  constexpr const char* op = "fastpeft::scale_shift_backward";
  TORCH_CHECK_VALUE(x.dim() >= 1, op, ": x must have at least one dimension, got a scalar");
  check_supported_float(x, op, "x");
  TORCH_CHECK_VALUE(grad_out.sizes() == x.sizes(), op, ": grad_out shape ", grad_out.sizes(),
                    " must equal x shape ", x.sizes());
  TORCH_CHECK_VALUE(grad_out.scalar_type() == x.scalar_type() && grad_out.device() == x.device(), op,
                    ": grad_out (", grad_out.scalar_type(), ", ", grad_out.device(),
                    ") must match x (", x.scalar_type(), ", ", x.device(), ")");
  check_channel_vector(scale, x.size(-1), x, op, "scale");
}

}  // namespace scale_shift
}  // namespace fastpeft
