// Shared by every translation unit: the g++-compiled CPU kernels and the nvcc-compiled CUDA
// kernels both include this, so nothing here may assume one compiler or the other.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

// Math helpers are written once and compiled for both host and device, so the CPU tests
// exercise exactly the arithmetic the GPU kernels run.
#if defined(__CUDACC__)
#define FASTPEFT_HD __host__ __device__
#else
#define FASTPEFT_HD
#endif

// fp32 accumulation for every supported dtype; fp64 is deliberately absent (PEFT activations
// are never fp64 and an fp64 path would silently skip the fp32 arithmetic we test).
#define FASTPEFT_DISPATCH_FLOAT_TYPES(TYPE, NAME, ...)            \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                  \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)    \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)     \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

namespace fastpeft {

// The Python layer raises a friendlier ValueError before ever reaching these; they guard
// direct torch.ops.fastpeft.* calls so no kernel can read out of bounds.
inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

inline void check_supported_float(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_VALUE(is_supported_float(t.scalar_type()), op, ": ", name,
                    " must be float32, float16 or bfloat16, got ", t.scalar_type());
}

// A per-channel vector: 1-D, `n` elements, same dtype and device as `like`.
inline void check_channel_vector(const at::Tensor& v, int64_t n, const at::Tensor& like,
                                 const char* op, const char* name) {
  TORCH_CHECK_VALUE(v.dim() == 1 && v.size(0) == n, op, ": ", name, " must have shape [", n,
                    "] (the last dim of x), got ", v.sizes());
  TORCH_CHECK_VALUE(v.scalar_type() == like.scalar_type(), op, ": ", name, " dtype ",
                    v.scalar_type(), " must match x dtype ", like.scalar_type());
  TORCH_CHECK_VALUE(v.device() == like.device(), op, ": ", name, " is on ", v.device(),
                    " but x is on ", like.device());
}

// Treat any [..., C] tensor as a [rows, C] matrix (callers pass contiguous tensors).
inline int64_t leading_rows(const at::Tensor& x) {
  const int64_t cols = x.size(-1);
  return cols == 0 ? 0 : x.numel() / cols;
}

}  // namespace fastpeft
