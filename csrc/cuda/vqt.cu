// CUDA kernels for fastpeft::vqt_query_attention{,_backward} and fastpeft::vqt_aggregate{,_backward}.
// The per-row math is in include/fastpeft/vqt.h, shared with the CPU kernels the tests run.
//
// Attention: one block per (query tile of kWarps rows, head, batch); one warp per query row.
// Keys/values stream through shared memory in tiles of 32 (one key per lane): each lane
// computes its key's logit with vqt::logit (ascending-j dot, as on the CPU), the tile max and
// sum are warp reductions, and the output accumulator is spread over the lanes (lane owns head
// dims lane, lane + 32, ...: d <= kMaxD = 128 gives 4 registers), updated with each key's
// probability broadcast by __shfl_sync in ascending key order.
// Only c10/cuda headers (see scale_shift.cu).
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "fastpeft/vqt.h"

namespace fastpeft {
namespace {

namespace vq = fastpeft::vqt;

constexpr int kWarps = 4;           // query rows per block
constexpr int kThreads = kWarps * 32;
constexpr int kTileN = 32;          // keys per shared-memory tile: one per lane
constexpr int kMaxD = 128;          // head dims per row: kMaxD / 32 accumulators per lane
constexpr int kPerLane = kMaxD / 32;
constexpr int kPad = kMaxD + 1;     // K/V tile row stride: lane = key reads are conflict-free
constexpr unsigned kFull = 0xffffffffu;
constexpr int kAggThreads = 256;

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = vq::fmax2(x, __shfl_xor_sync(kFull, x, o));
  return x;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(kFull, x, o);
  return x;
}

// Block-wide sum over kAggThreads threads; every thread gets the total.
__device__ __forceinline__ float block_sum(float x, float* scratch) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  x = warp_sum(x);
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = x;
  __syncthreads();
  float t = 0.0f;
#pragma unroll
  for (int w = 0; w < kAggThreads / 32; ++w) t += scratch[w];
  return t;
}

// Key/value strides in elements; the head dim is unit-stride.
struct KVStrides {
  int64_t kb, kh, kn, vb, vh, vn;
};

// Loads keys [n0, n0 + kTileN) of one (b, h) into tiles [kTileN][kPad] as fp32 (zeros past N).
template <typename T>
__device__ __forceinline__ void load_tile(const T* __restrict__ src, int64_t sn, int n0, int N,
                                          int d, float (*tile)[kPad]) {
  for (int idx = threadIdx.x; idx < kTileN * d; idx += kThreads) {
    const int n = idx / d, j = idx - n * d;
    tile[n][j] = n0 + n < N ? static_cast<float>(src[(n0 + n) * sn + j]) : 0.0f;
  }
}

// q, out: [B, H, Q, d] contiguous; k, v: [B, H, N, d] with strides `st`; lse: [B, H, Q] fp32.
// Grid: (ceil(Q / kWarps), H, B).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    vqt_attention_fwd_kernel(const T* __restrict__ q, const T* __restrict__ k,
                             const T* __restrict__ v, T* __restrict__ out,
                             float* __restrict__ lse, int Q, int N, int d, KVStrides st,
                             float scale) {
  __shared__ float ks[kTileN][kPad];
  __shared__ float vs[kTileN][kPad];
  __shared__ float qs[kWarps][kMaxD];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int b = blockIdx.z, h = blockIdx.y, H = gridDim.y;
  const int row = blockIdx.x * kWarps + warp;
  const bool active = row < Q;  // warp-uniform
  const int64_t row_index = (static_cast<int64_t>(b) * H + h) * Q + row;
  for (int j = lane; j < d; j += 32) qs[warp][j] = active ? static_cast<float>(q[row_index * d + j]) : 0.0f;
  const T* kb = k + b * st.kb + h * st.kh;
  const T* vb = v + b * st.vb + h * st.vh;

  vq::RowState state = vq::row_init();
  float acc[kPerLane];
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) acc[i] = 0.0f;

  for (int n0 = 0; n0 < N; n0 += kTileN) {
    __syncthreads();  // the previous tile is consumed (and qs is written, first time)
    load_tile(kb, st.kn, n0, N, d, ks);
    load_tile(vb, st.vn, n0, N, d, vs);
    __syncthreads();
    if (active) {
      const int tn = min(kTileN, N - n0);
      const float x = lane < tn ? vq::logit(qs[warp], ks[lane], d, scale) : vq::neg_inf();
      const float alpha = vq::enter_tile(state, warp_max(x));
      const float p = vq::prob_in_tile(state, x);  // 0 for lanes past N
      state.l += warp_sum(p);
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) acc[i] *= alpha;
      for (int n = 0; n < tn; ++n) {
        const float pn = __shfl_sync(kFull, p, n);
#pragma unroll
        for (int i = 0; i < kPerLane; ++i) {
          const int j = lane + 32 * i;
          if (j < d) acc[i] = vq::mul_add(pn, vs[n][j], acc[i]);
        }
      }
    }
  }
  if (active) {
    const float inv = vq::inv_sum(state);
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      const int j = lane + 32 * i;
      if (j < d) out[row_index * d + j] = static_cast<T>(acc[i] * inv);
    }
    if (lane == 0) lse[row_index] = vq::row_lse(state);
  }
}

// grad_out, q, grad_q: [B, H, Q, d] contiguous; k, v strided; lse, delta: [B, H, Q] fp32.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    vqt_attention_bwd_kernel(const T* __restrict__ grad_out, const T* __restrict__ q,
                             const T* __restrict__ k, const T* __restrict__ v,
                             const float* __restrict__ lse, const float* __restrict__ delta,
                             T* __restrict__ grad_q, int Q, int N, int d, KVStrides st,
                             float scale) {
  __shared__ float ks[kTileN][kPad];
  __shared__ float vs[kTileN][kPad];
  __shared__ float qs[kWarps][kMaxD];
  __shared__ float gs[kWarps][kMaxD];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int b = blockIdx.z, h = blockIdx.y, H = gridDim.y;
  const int row = blockIdx.x * kWarps + warp;
  const bool active = row < Q;
  const int64_t row_index = (static_cast<int64_t>(b) * H + h) * Q + row;
  for (int j = lane; j < d; j += 32) {
    qs[warp][j] = active ? static_cast<float>(q[row_index * d + j]) : 0.0f;
    gs[warp][j] = active ? static_cast<float>(grad_out[row_index * d + j]) : 0.0f;
  }
  const float row_lse = active ? lse[row_index] : 0.0f;
  const float row_delta = active ? delta[row_index] : 0.0f;
  const T* kb = k + b * st.kb + h * st.kh;
  const T* vb = v + b * st.vb + h * st.vh;

  float dq[kPerLane];
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) dq[i] = 0.0f;

  for (int n0 = 0; n0 < N; n0 += kTileN) {
    __syncthreads();
    load_tile(kb, st.kn, n0, N, d, ks);
    load_tile(vb, st.vn, n0, N, d, vs);
    __syncthreads();
    if (active) {
      const int tn = min(kTileN, N - n0);
      float ds = 0.0f;
      if (lane < tn) {
        const float x = vq::logit(qs[warp], ks[lane], d, scale);
        const float dp = vq::logit(gs[warp], vs[lane], d, 1.0f);
        ds = vq::dlogit(vq::prob_from_lse(x, row_lse), dp, row_delta);
      }
      for (int n = 0; n < tn; ++n) {
        const float dsn = __shfl_sync(kFull, ds, n);
#pragma unroll
        for (int i = 0; i < kPerLane; ++i) {
          const int j = lane + 32 * i;
          if (j < d) dq[i] = vq::mul_add(dsn, ks[n][j], dq[i]);
        }
      }
    }
  }
  if (active) {
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      const int j = lane + 32 * i;
      if (j < d) grad_q[row_index * d + j] = static_cast<T>(dq[i] * scale);
    }
  }
}

// Segment s of sample b (grid (1 + L, B)): s = 0 is cls[b] ([D]), s = l + 1 is queries[l, b]
// ([Q * D]), written at out[b, D + l * Q * D]. norms: [B, 1 + L] fp32.
template <typename T>
__global__ void __launch_bounds__(kAggThreads)
    vqt_aggregate_fwd_kernel(const T* __restrict__ cls, const T* __restrict__ queries,
                             T* __restrict__ out, float* __restrict__ norms, int64_t B,
                             int64_t Q, int64_t D, float eps) {
  __shared__ float scratch[kAggThreads / 32];
  const int64_t s = blockIdx.x, b = blockIdx.y, segs = gridDim.x;
  const int64_t len = s == 0 ? D : Q * D;
  const T* src = s == 0 ? cls + b * D : queries + ((s - 1) * B + b) * Q * D;
  T* dst = out + b * D * (1 + (segs - 1) * Q) + (s == 0 ? 0 : D + (s - 1) * Q * D);
  float part = 0.0f;
  for (int64_t i = threadIdx.x; i < len; i += kAggThreads) {
    const float x = static_cast<float>(src[i]);
    part = vq::mul_add(x, x, part);
  }
  const float norm = vq::sqrt_pos(block_sum(part, scratch));
  const float inv = vq::inv_clamped_norm(norm, eps);
  for (int64_t i = threadIdx.x; i < len; i += kAggThreads) {
    dst[i] = static_cast<T>(static_cast<float>(src[i]) * inv);
  }
  if (threadIdx.x == 0) norms[b * segs + s] = norm;
}

template <typename T>
__global__ void __launch_bounds__(kAggThreads)
    vqt_aggregate_bwd_kernel(const T* __restrict__ grad_out, const T* __restrict__ out,
                             const float* __restrict__ norms, T* __restrict__ grad_cls,
                             T* __restrict__ grad_queries, int64_t B, int64_t Q, int64_t D,
                             float eps) {
  __shared__ float scratch[kAggThreads / 32];
  const int64_t s = blockIdx.x, b = blockIdx.y, segs = gridDim.x;
  const int64_t len = s == 0 ? D : Q * D;
  const int64_t off = b * D * (1 + (segs - 1) * Q) + (s == 0 ? 0 : D + (s - 1) * Q * D);
  T* dst = s == 0 ? grad_cls + b * D : grad_queries + ((s - 1) * B + b) * Q * D;
  float part = 0.0f;
  for (int64_t i = threadIdx.x; i < len; i += kAggThreads) {
    part = vq::mul_add(static_cast<float>(out[off + i]), static_cast<float>(grad_out[off + i]), part);
  }
  const float yg = block_sum(part, scratch);
  const float norm = norms[b * segs + s];
  for (int64_t i = threadIdx.x; i < len; i += kAggThreads) {
    dst[i] = static_cast<T>(vq::normalize_grad(static_cast<float>(grad_out[off + i]),
                                               static_cast<float>(out[off + i]), yg, norm, eps));
  }
}

at::Tensor unit_last_dim(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

void check_launchable(const at::Tensor& q, int64_t N, const char* op) {
  TORCH_CHECK_VALUE(q.size(3) <= kMaxD, op, ": the CUDA kernel supports head dims up to ", kMaxD,
                    ", got d = ", q.size(3));
  TORCH_CHECK_VALUE(q.size(0) <= 65535 && q.size(1) <= 65535, op,
                    ": the CUDA kernel supports B, H <= 65535, got ", q.sizes());
  TORCH_CHECK_VALUE(q.size(2) <= (int64_t{1} << 30) && N <= (int64_t{1} << 30), op,
                    ": Q and N must fit in int32");
}

KVStrides kv_strides(const at::Tensor& k, const at::Tensor& v) {
  return KVStrides{k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2)};
}

std::tuple<at::Tensor, at::Tensor> vqt_query_attention_cuda(const at::Tensor& q_in,
                                                            const at::Tensor& k_in,
                                                            const at::Tensor& v_in, double scale) {
  constexpr const char* op = "fastpeft::vqt_query_attention";
  vq::check_attention(q_in, k_in, v_in, op);
  check_launchable(q_in, k_in.size(2), op);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = q_in.contiguous();
  const at::Tensor k = unit_last_dim(k_in);
  const at::Tensor v = unit_last_dim(v_in);
  const int64_t B = q.size(0), H = q.size(1), Q = q.size(2), d = q.size(3), N = k.size(2);
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty({B, H, Q}, q.options().dtype(at::kFloat));
  if (q.numel() == 0) return {out, lse};
  const dim3 grid(static_cast<unsigned>((Q + kWarps - 1) / kWarps), static_cast<unsigned>(H),
                  static_cast<unsigned>(B));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  FASTPEFT_DISPATCH_FLOAT_TYPES(q.scalar_type(), "fastpeft::vqt_query_attention_cuda", [&] {
    vqt_attention_fwd_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
        q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
        out.data_ptr<scalar_t>(), lse.data_ptr<float>(), static_cast<int>(Q),
        static_cast<int>(N), static_cast<int>(d), kv_strides(k, v), static_cast<float>(scale));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, lse};
}

at::Tensor vqt_query_attention_backward_cuda(const at::Tensor& grad_out_in, const at::Tensor& q_in,
                                             const at::Tensor& k_in, const at::Tensor& v_in,
                                             const at::Tensor& lse_in, const at::Tensor& delta_in,
                                             double scale) {
  constexpr const char* op = "fastpeft::vqt_query_attention_backward";
  vq::check_attention_backward(grad_out_in, q_in, k_in, v_in, lse_in, delta_in, op);
  check_launchable(q_in, k_in.size(2), op);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = q_in.contiguous();
  const at::Tensor g = grad_out_in.contiguous();
  const at::Tensor k = unit_last_dim(k_in);
  const at::Tensor v = unit_last_dim(v_in);
  const at::Tensor lse = lse_in.contiguous();
  const at::Tensor delta = delta_in.contiguous();
  const int64_t H = q.size(1), Q = q.size(2), d = q.size(3), N = k.size(2);
  at::Tensor grad_q = at::empty(q.sizes(), q.options());
  if (q.numel() == 0) return grad_q;
  const dim3 grid(static_cast<unsigned>((Q + kWarps - 1) / kWarps), static_cast<unsigned>(H),
                  static_cast<unsigned>(q.size(0)));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  FASTPEFT_DISPATCH_FLOAT_TYPES(q.scalar_type(), "fastpeft::vqt_query_attention_backward_cuda", [&] {
    vqt_attention_bwd_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
        g.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(),
        v.data_ptr<scalar_t>(), lse.data_ptr<float>(), delta.data_ptr<float>(),
        grad_q.data_ptr<scalar_t>(), static_cast<int>(Q), static_cast<int>(N),
        static_cast<int>(d), kv_strides(k, v), static_cast<float>(scale));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad_q;
}

std::tuple<at::Tensor, at::Tensor> vqt_aggregate_cuda(const at::Tensor& cls_in,
                                                      const at::Tensor& queries_in, double eps) {
  constexpr const char* op = "fastpeft::vqt_aggregate";
  vq::check_aggregate(cls_in, queries_in, op);
  vq::check_eps(eps, op);
  const c10::cuda::CUDAGuard guard(cls_in.device());
  const at::Tensor cls = cls_in.contiguous();
  const at::Tensor queries = queries_in.contiguous();
  const int64_t B = cls.size(0), D = cls.size(1), L = queries.size(0), Q = queries.size(2);
  TORCH_CHECK_VALUE(B <= 65535 && L + 1 <= 65535, op, ": the CUDA kernel supports B, L < 65535");
  at::Tensor out = at::empty({B, D * (1 + L * Q)}, cls.options());
  at::Tensor norms = at::empty({B, 1 + L}, cls.options().dtype(at::kFloat));
  if (B == 0 || D == 0) return {out, norms.zero_()};
  const dim3 grid(static_cast<unsigned>(1 + L), static_cast<unsigned>(B));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  FASTPEFT_DISPATCH_FLOAT_TYPES(cls.scalar_type(), "fastpeft::vqt_aggregate_cuda", [&] {
    vqt_aggregate_fwd_kernel<scalar_t><<<grid, kAggThreads, 0, stream>>>(
        cls.data_ptr<scalar_t>(), queries.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
        norms.data_ptr<float>(), B, Q, D, static_cast<float>(eps));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, norms};
}

std::tuple<at::Tensor, at::Tensor> vqt_aggregate_backward_cuda(const at::Tensor& grad_in,
                                                               const at::Tensor& out_in,
                                                               const at::Tensor& norms_in,
                                                               int64_t num_queries, double eps) {
  constexpr const char* op = "fastpeft::vqt_aggregate_backward";
  const at::Tensor norms = norms_in.contiguous();
  const int64_t L = norms.dim() == 2 ? norms.size(1) - 1 : 0;
  vq::check_aggregate_backward(grad_in, out_in, norms, num_queries, L, op);
  vq::check_eps(eps, op);
  const c10::cuda::CUDAGuard guard(out_in.device());
  const at::Tensor g = grad_in.contiguous();
  const at::Tensor out = out_in.contiguous();
  const int64_t B = out.size(0), D = out.size(1) / (1 + L * num_queries);
  TORCH_CHECK_VALUE(B <= 65535 && L + 1 <= 65535, op, ": the CUDA kernel supports B, L < 65535");
  at::Tensor grad_cls = at::empty({B, D}, out.options());
  at::Tensor grad_queries = at::empty({L, B, num_queries, D}, out.options());
  if (B == 0 || D == 0) return {grad_cls, grad_queries};
  const dim3 grid(static_cast<unsigned>(1 + L), static_cast<unsigned>(B));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  FASTPEFT_DISPATCH_FLOAT_TYPES(out.scalar_type(), "fastpeft::vqt_aggregate_backward_cuda", [&] {
    vqt_aggregate_bwd_kernel<scalar_t><<<grid, kAggThreads, 0, stream>>>(
        g.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), norms.data_ptr<float>(),
        grad_cls.data_ptr<scalar_t>(), grad_queries.data_ptr<scalar_t>(), B, num_queries, D,
        static_cast<float>(eps));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_cls, grad_queries};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastpeft, CUDA, m) {
  m.impl("vqt_query_attention", &vqt_query_attention_cuda);
  m.impl("vqt_query_attention_backward", &vqt_query_attention_backward_cuda);
  m.impl("vqt_aggregate", &vqt_aggregate_cuda);
  m.impl("vqt_aggregate_backward", &vqt_aggregate_backward_cuda);
}

}  // namespace fastpeft
