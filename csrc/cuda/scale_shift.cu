// CUDA kernels for fastpeft::scale_shift{,_backward}. The math is in
// include/fastpeft/scale_shift.h (shared with the CPU kernels, which the tests exercise).
// Only c10/cuda headers: ATen/cuda/CUDAContext.h would pull in cuBLAS/cuSPARSE headers,
// which a bare nvcc toolkit (as on the build machines) does not ship.
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "fastpeft/scale_shift.h"

namespace fastpeft {
namespace {

namespace ss = fastpeft::scale_shift;

constexpr int kForwardThreads = 256;
// Backward tile: 32 consecutive columns (one warp reads 32 contiguous elements of a row, so
// loads coalesce) x 8 row lanes that are reduced through shared memory.
constexpr int kCols = 32;
constexpr int kRowLanes = 8;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int multiprocessor_count() {
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount,
                                        c10::cuda::current_device()));
  return count;
}

// x, y: [n] contiguous, viewed as [n / cols, cols]; scale, shift: [cols].
template <typename T>
__global__ void __launch_bounds__(kForwardThreads)
    scale_shift_fwd_kernel(const T* __restrict__ x, const T* __restrict__ scale,
                           const T* __restrict__ shift, T* __restrict__ y, int64_t n,
                           int64_t cols) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    const int64_t c = i % cols;
    y[i] = static_cast<T>(ss::forward(static_cast<float>(x[i]), static_cast<float>(scale[c]),
                                      static_cast<float>(shift[c])));
  }
}

// grad_out, x, grad_x: [rows, cols] contiguous; scale: [cols];
// scale_sum, shift_sum: [cols] fp32, zero-initialised, accumulated with atomicAdd (so the
// summation order, and the last bits, vary from run to run).
// Grid: x over column tiles of kCols, y over row blocks (grid-stride over rows).
template <typename T>
__global__ void __launch_bounds__(kCols * kRowLanes)
    scale_shift_bwd_kernel(const T* __restrict__ grad_out, const T* __restrict__ x,
                           const T* __restrict__ scale, T* __restrict__ grad_x,
                           float* __restrict__ scale_sum, float* __restrict__ shift_sum,
                           int64_t rows, int64_t cols) {
  __shared__ float tile_scale[kRowLanes][kCols];
  __shared__ float tile_shift[kRowLanes][kCols];
  const int lane_c = threadIdx.x;
  const int lane_r = threadIdx.y;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kCols + lane_c;

  ss::ColumnSums acc;
  if (c < cols) {
    const float s = static_cast<float>(scale[c]);
    const int64_t row_stride = static_cast<int64_t>(gridDim.y) * kRowLanes;
    for (int64_t r = static_cast<int64_t>(blockIdx.y) * kRowLanes + lane_r; r < rows;
         r += row_stride) {
      const int64_t i = r * cols + c;
      const float g = static_cast<float>(grad_out[i]);
      grad_x[i] = static_cast<T>(ss::grad_x(g, s));
      ss::accumulate(acc, g, static_cast<float>(x[i]));
    }
  }
  tile_scale[lane_r][lane_c] = acc.scale;
  tile_shift[lane_r][lane_c] = acc.shift;
  __syncthreads();
  if (lane_r == 0 && c < cols) {
    ss::ColumnSums total;
    for (int k = 0; k < kRowLanes; ++k) {
      ss::combine(total, ss::ColumnSums{tile_scale[k][lane_c], tile_shift[k][lane_c]});
    }
    atomicAdd(scale_sum + c, total.scale);
    atomicAdd(shift_sum + c, total.shift);
  }
}

at::Tensor scale_shift_cuda(const at::Tensor& x_in, const at::Tensor& scale_in,
                            const at::Tensor& shift_in) {
  ss::check_forward(x_in, scale_in, shift_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor scale = scale_in.contiguous();
  const at::Tensor shift = shift_in.contiguous();
  at::Tensor y = at::empty(x.sizes(), x.options());
  const int64_t n = x.numel();
  if (n == 0) return y;

  const int sms = multiprocessor_count();
  // Enough resident blocks to fill every SM a few times; the grid-stride loop covers the rest.
  const int blocks =
      static_cast<int>(std::min<int64_t>(ceil_div(n, kForwardThreads), int64_t{sms} * 32));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  FASTPEFT_DISPATCH_FLOAT_TYPES(x.scalar_type(), "fastpeft::scale_shift_cuda", [&] {
    scale_shift_fwd_kernel<scalar_t><<<blocks, kForwardThreads, 0, stream>>>(
        x.data_ptr<scalar_t>(), scale.data_ptr<scalar_t>(), shift.data_ptr<scalar_t>(),
        y.data_ptr<scalar_t>(), n, x.size(-1));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> scale_shift_backward_cuda(
    const at::Tensor& grad_out_in, const at::Tensor& x_in, const at::Tensor& scale_in) {
  ss::check_backward(grad_out_in, x_in, scale_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor g = grad_out_in.contiguous();
  const at::Tensor x = x_in.contiguous();
  const at::Tensor scale = scale_in.contiguous();
  const int64_t cols = x.size(-1);
  const int64_t rows = leading_rows(x);
  at::Tensor grad_x = at::empty(x.sizes(), x.options());
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor scale_sum = at::zeros({cols}, f32);
  at::Tensor shift_sum = at::zeros({cols}, f32);

  if (x.numel() > 0) {
    const int sms = multiprocessor_count();
    const int64_t col_tiles = ceil_div(cols, kCols);
    // About 8 blocks of 256 threads per SM in total; more row blocks only add atomics.
    const int64_t row_blocks = std::clamp<int64_t>(
        ceil_div(int64_t{sms} * 8, col_tiles), 1, std::min<int64_t>(ceil_div(rows, kRowLanes), 65535));
    const dim3 grid(static_cast<unsigned>(col_tiles), static_cast<unsigned>(row_blocks));
    const dim3 block(kCols, kRowLanes);
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    FASTPEFT_DISPATCH_FLOAT_TYPES(x.scalar_type(), "fastpeft::scale_shift_backward_cuda", [&] {
      scale_shift_bwd_kernel<scalar_t><<<grid, block, 0, stream>>>(
          g.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), scale.data_ptr<scalar_t>(),
          grad_x.data_ptr<scalar_t>(), scale_sum.data_ptr<float>(), shift_sum.data_ptr<float>(),
          rows, cols);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return {grad_x, scale_sum.to(x.scalar_type()), shift_sum.to(x.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastpeft, CUDA, m) {
  m.impl("scale_shift", &scale_shift_cuda);
  m.impl("scale_shift_backward", &scale_shift_backward_cuda);
}

}  // namespace fastpeft
