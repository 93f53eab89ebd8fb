// CPU kernels for fastpeft::scale_shift{,_backward}. The math is in
// include/fastpeft/scale_shift.h (shared with the CUDA kernels).
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "fastpeft/scale_shift.h"

namespace fastpeft {
namespace {

namespace ss = fastpeft::scale_shift;

// Elements per parallel task: ATen's own at::internal::GRAIN_SIZE (TensorIterator.h), below
// which OpenMP fork/join costs more than the work it splits.
constexpr int64_t kGrainElements = 32768;

// A per-channel vector converted once to fp32, so the inner loops convert only x/grad_out.
template <typename T>
std::vector<float> to_float_vector(const at::Tensor& v) {
  const T* p = v.data_ptr<T>();
  return std::vector<float>(p, p + v.numel());
}

at::Tensor scale_shift_cpu(const at::Tensor& x_in, const at::Tensor& scale_in,
                           const at::Tensor& shift_in) {
  ss::check_forward(x_in, scale_in, shift_in);
  const at::Tensor x = x_in.contiguous();
  at::Tensor y = at::empty(x.sizes(), x.options());
  const int64_t cols = x.size(-1);
  const int64_t rows = leading_rows(x);
  if (x.numel() == 0) return y;

  FASTPEFT_DISPATCH_FLOAT_TYPES(x.scalar_type(), "fastpeft::scale_shift_cpu", [&] {
    const std::vector<float> scale = to_float_vector<scalar_t>(scale_in.contiguous());
    const std::vector<float> shift = to_float_vector<scalar_t>(shift_in.contiguous());
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, kGrainElements / cols);
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* xr = xp + r * cols;
        scalar_t* yr = yp + r * cols;
        for (int64_t c = 0; c < cols; ++c) {
          yr[c] = static_cast<scalar_t>(
              ss::forward(static_cast<float>(xr[c]), scale[c], shift[c]));
        }
      }
    });
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> scale_shift_backward_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& x_in, const at::Tensor& scale_in) {
  ss::check_backward(grad_out_in, x_in, scale_in);
  const at::Tensor g = grad_out_in.contiguous();
  const at::Tensor x = x_in.contiguous();
  const int64_t cols = x.size(-1);
  const int64_t rows = leading_rows(x);
  at::Tensor grad_x = at::empty(x.sizes(), x.options());
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor grad_scale = at::zeros({cols}, f32);
  at::Tensor grad_shift = at::zeros({cols}, f32);

  if (x.numel() > 0) {
    FASTPEFT_DISPATCH_FLOAT_TYPES(x.scalar_type(), "fastpeft::scale_shift_backward_cpu", [&] {
      const std::vector<float> scale = to_float_vector<scalar_t>(scale_in.contiguous());
      const scalar_t* gp = g.data_ptr<scalar_t>();
      const scalar_t* xp = x.data_ptr<scalar_t>();
      scalar_t* gxp = grad_x.data_ptr<scalar_t>();

      // Rows are split into a fixed number of chunks that depends only on the thread count
      // and the problem size (not on which thread runs which chunk), and the per-chunk fp32
      // column sums are added in chunk order: the result is bit-reproducible for a given
      // at::get_num_threads().
      const int64_t min_rows = std::max<int64_t>(1, kGrainElements / cols);
      const int64_t chunks = std::max<int64_t>(
          1, std::min<int64_t>(at::get_num_threads(), rows / min_rows));
      std::vector<ss::ColumnSums> partial(static_cast<size_t>(chunks * cols));

      at::parallel_for(0, chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
        for (int64_t k = chunk_begin; k < chunk_end; ++k) {
          ss::ColumnSums* acc = partial.data() + k * cols;
          const int64_t r0 = rows * k / chunks;
          const int64_t r1 = rows * (k + 1) / chunks;
          for (int64_t r = r0; r < r1; ++r) {
            const int64_t off = r * cols;
            for (int64_t c = 0; c < cols; ++c) {
              const float gv = static_cast<float>(gp[off + c]);
              gxp[off + c] = static_cast<scalar_t>(ss::grad_x(gv, scale[c]));
              ss::accumulate(acc[c], gv, static_cast<float>(xp[off + c]));
            }
          }
        }
      });

      float* gsp = grad_scale.data_ptr<float>();
      float* gbp = grad_shift.data_ptr<float>();
      for (int64_t c = 0; c < cols; ++c) {
        ss::ColumnSums total;
        for (int64_t k = 0; k < chunks; ++k) ss::combine(total, partial[k * cols + c]);
        gsp[c] = total.scale;
        gbp[c] = total.shift;
      }
    });
  }
  // Reductions were accumulated in fp32; results are returned in x's dtype.
  return {grad_x, grad_scale.to(x.scalar_type()), grad_shift.to(x.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastpeft, CPU, m) {
  m.impl("scale_shift", &scale_shift_cpu);
  m.impl("scale_shift_backward", &scale_shift_backward_cpu);
}

}  // namespace fastpeft
