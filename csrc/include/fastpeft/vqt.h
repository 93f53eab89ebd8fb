// VQT (Visual Query Tuning) fused ops: the per-row math shared by csrc/cpu/vqt.cpp and
// csrc/cuda/vqt.cu, so the CPU tests exercise the arithmetic the GPU kernels run.
//
// vqt_query_attention: Q query rows per (batch, head) attend over N frozen keys/values.
//   x_n   = scale * (q . k_n)                         logits of one query row
//   out   = sum_n softmax(x)_n v_n,   lse = log sum_n exp(x_n)
// computed online over key tiles (flash-attention style): a running max m and running sum l
// are rescaled by exp(m_old - m_new) whenever a tile raises the max, so no N-long row of
// probabilities is ever stored.
//
// vqt_query_attention_backward (queries only: keys/values are frozen and get no gradient):
//   p_n   = exp(x_n - lse)                            recomputed from the saved lse
//   dp_n  = dO . v_n,   delta = dO . out               (delta is an input, see vqt.py)
//   dq    = scale * sum_n p_n (dp_n - delta) k_n
//
// vqt_aggregate: y_s = x_s / max(||x_s||_2, eps) per segment (F.normalize semantics), where
// the segments of one sample are its final-norm CLS feature and each layer's flattened query
// outputs; backward dx_s = (g_s - y_s (y_s . g_s)) / ||x_s|| (or g_s / eps below eps).
//
// Rounding: every reduction is fp32 and runs in a fixed order per row, set by the shapes (never
// by the thread count): dot products over the head dim in ascending j, tile sums in ascending n
// on the CPU (warp reductions on the GPU). The CPU kernels for head dims 32/64/96/128 use fixed
// trees instead for each tile's sum and, below 12 query rows, for the dot products; that order
// also depends on the CPU's vector width (csrc/cpu/vqt.cpp, "fast path"). The CPU build rounds
// each multiply and add separately (-ffp-contract=off); `mul_add` on the device is an explicit
// FMA (one rounding). The two therefore agree to a few ulp, not bit for bit.
#pragma once

#include "fastpeft/common.h"

#if !defined(__CUDA_ARCH__)
#include <cmath>
#include <cstring>
#endif

namespace fastpeft {
namespace vqt {

// Keys per tile. CPU: the packed K^T tile [d][kTileKeys] is the unit of one vectorised score
// loop (64 lanes = 4 AVX-512 / 8 AVX2 registers per query row). CUDA: one key per lane of a
// warp, so the CUDA kernel uses its own tile of 32 keys (warp size); the math per tile is the
// same functions below.
constexpr int kTileKeys = 64;

// exp(x) underflows to 0 in fp32 below this (exp(-87.3) ~ 1.2e-38, the smallest normal).
constexpr float kExpMin = -87.0f;

FASTPEFT_HD inline float mul_add(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(a, b, c);
#else
  return a * b + c;  // two roundings: the CPU build has -ffp-contract=off
#endif
}

FASTPEFT_HD inline float bits_to_float(int bits) {
#if defined(__CUDA_ARCH__)
  return __int_as_float(bits);
#else
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
#endif
}

FASTPEFT_HD inline float neg_inf() { return -__builtin_huge_valf(); }

FASTPEFT_HD inline float fmax2(float a, float b) { return a > b ? a : b; }

// exp(x) for the softmax arguments x <= 0 (max- or lse-subtracted logits), branch-free so a
// CPU loop over it vectorises (libm's expf would be a scalar call per element). Cephes expf:
// x = n ln2 + r with |r| <= ln2/2 (round-to-nearest by the 1.5 * 2^23 trick, no libm call),
// exp(r) by a degree-7 polynomial, 2^n assembled in the exponent bits. Max error ~2 ulp on
// [-87, 0]; returns exactly 0 below kExpMin and for x = -inf, and NaN for NaN.
FASTPEFT_HD inline float exp_nonpos(float x) {
  const float xc = x < kExpMin ? kExpMin : x;  // keeps 2^n a normal number; NaN passes through
  const float t = xc * 1.44269504088896341f;   // log2(e)
  const float n = (t + 12582912.0f) - 12582912.0f;  // rint(t) for |t| < 2^22
  float r = xc - n * 0.693359375f;             // ln2 split in two for an exact first step
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float e = (p * r) * r + r + 1.0f;
  const float scale = bits_to_float((static_cast<int>(n) + 127) << 23);
  return x < kExpMin ? 0.0f : e * scale;
}

FASTPEFT_HD inline float log_pos(float x) {
#if defined(__CUDA_ARCH__)
  return logf(x);
#else
  return std::log(x);
#endif
}

FASTPEFT_HD inline float sqrt_pos(float x) {
#if defined(__CUDA_ARCH__)
  return sqrtf(x);
#else
  return std::sqrt(x);
#endif
}

// ---- forward: online softmax over key tiles ----------------------------------------------

// Running state of one query row: m = max logit so far, l = sum exp(x_n - m) so far.
struct RowState {
  float m;
  float l;
};

FASTPEFT_HD inline RowState row_init() { return RowState{neg_inf(), 0.0f}; }

// Logit of one key: x = scale * (q . k), the dot accumulated in ascending j.
template <typename K>
FASTPEFT_HD inline float logit(const float* q, const K* k, int d, float scale) {
  float s = 0.0f;
  for (int j = 0; j < d; ++j) s = mul_add(q[j], static_cast<float>(k[j]), s);
  return s * scale;
}

// A tile raises the running max to m_new = max(m, tile_max): returns the factor
// alpha = exp(m - m_new) by which l and the output accumulator are rescaled (0 for the first
// tile, where m = -inf), and updates st.m. The caller then adds p_n = exp(x_n - st.m).
FASTPEFT_HD inline float enter_tile(RowState& st, float tile_max) {
  const float m_new = fmax2(st.m, tile_max);
  const float alpha = exp_nonpos(st.m - m_new);  // -inf - finite = -inf -> 0
  st.m = m_new;
  st.l = st.l * alpha;
  return alpha;
}

FASTPEFT_HD inline float prob_in_tile(const RowState& st, float x) { return exp_nonpos(x - st.m); }

// out = acc / l ; lse = m + log(l). N >= 1 keeps l >= 1 (the max term contributes exp(0)).
FASTPEFT_HD inline float inv_sum(const RowState& st) { return 1.0f / st.l; }
FASTPEFT_HD inline float row_lse(const RowState& st) { return st.m + log_pos(st.l); }

// ---- backward ----------------------------------------------------------------------------

// p_n recomputed from the saved log-sum-exp.
FASTPEFT_HD inline float prob_from_lse(float x, float lse) { return exp_nonpos(x - lse); }

// d(logit_n) up to the final `scale`: p_n (dp_n - delta).
FASTPEFT_HD inline float dlogit(float p, float dp, float delta) { return p * (dp - delta); }

// ---- aggregate ---------------------------------------------------------------------------

// 1 / max(norm, eps): the factor F.normalize divides by. A NaN norm (a NaN in the segment) stays
// NaN, as torch's clamp_min keeps it: `norm >= eps ? norm : eps` would divide by eps instead and
// turn the segment's finite entries into ~1e12.
FASTPEFT_HD inline float inv_clamped_norm(float norm, float eps) {
  return 1.0f / (norm < eps ? eps : norm);
}

// dx for one element of a segment: y = x / max(||x||, eps), yg = y . g over the segment.
// clamp_min passes the gradient where norm >= eps (torch's rule at equality too); a NaN norm takes
// that branch as well, so the gradient is NaN rather than the finite g / eps.
FASTPEFT_HD inline float normalize_grad(float g, float y, float yg, float norm, float eps) {
  return norm < eps ? g / eps : (g - y * yg) / norm;
}

// ---- host-side argument checks shared by the CPU and CUDA entry points --------------------

inline void check_same(const at::Tensor& a, const at::Tensor& ref, const char* op, const char* name,
                       const char* ref_name) {
  TORCH_CHECK_VALUE(a.scalar_type() == ref.scalar_type(), op, ": ", name, " dtype ", a.scalar_type(),
                    " must match ", ref_name, " dtype ", ref.scalar_type());
  TORCH_CHECK_VALUE(a.device() == ref.device(), op, ": ", name, " is on ", a.device(), " but ",
                    ref_name, " is on ", ref.device());
}

// q [B,H,Q,d]; k, v [B,H,N,d]; N >= 1.
inline void check_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const char* op) {
  TORCH_CHECK_VALUE(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, op,
                    ": q, k, v must be 4-D [B, H, Q, d] / [B, H, N, d], got ", q.sizes(), ", ",
                    k.sizes(), ", ", v.sizes());
  check_supported_float(q, op, "q");
  check_same(k, q, op, "k", "q");
  check_same(v, q, op, "v", "q");
  TORCH_CHECK_VALUE(k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(3) == q.size(3), op,
                    ": k ", k.sizes(), " must be [B, H, N, d] for q ", q.sizes());
  TORCH_CHECK_VALUE(v.sizes() == k.sizes(), op, ": v ", v.sizes(), " must have k's shape ", k.sizes());
  TORCH_CHECK_VALUE(k.size(2) >= 1, op, ": need at least one key (N >= 1), got k ", k.sizes());
}

inline void check_row_stat(const at::Tensor& t, const at::Tensor& q, const char* op,
                           const char* name) {
  TORCH_CHECK_VALUE(t.scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ",
                    t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == q.device(), op, ": ", name, " is on ", t.device(), " but q is on ",
                    q.device());
  TORCH_CHECK_VALUE(t.dim() == 3 && t.size(0) == q.size(0) && t.size(1) == q.size(1) &&
                        t.size(2) == q.size(2),
                    op, ": ", name, " must be [B, H, Q] = [", q.size(0), ", ", q.size(1), ", ",
                    q.size(2), "], got ", t.sizes());
}

inline void check_attention_backward(const at::Tensor& grad_out, const at::Tensor& q,
                                     const at::Tensor& k, const at::Tensor& v,
                                     const at::Tensor& lse, const at::Tensor& delta,
                                     const char* op) {
  check_attention(q, k, v, op);
  check_same(grad_out, q, op, "grad_out", "q");
  TORCH_CHECK_VALUE(grad_out.sizes() == q.sizes(), op, ": grad_out ", grad_out.sizes(),
                    " must have q's shape ", q.sizes());
  check_row_stat(lse, q, op, "lse");
  check_row_stat(delta, q, op, "delta");
}

// F.normalize's eps: positive (a NaN fails too).
inline void check_eps(double eps, const char* op) {
  TORCH_CHECK_VALUE(eps > 0, op, ": eps must be positive, got ", eps);
}

// cls [B, D]; queries [L, B, Q, D].
inline void check_aggregate(const at::Tensor& cls, const at::Tensor& queries, const char* op) {
  TORCH_CHECK_VALUE(cls.dim() == 2 && queries.dim() == 4, op,
                    ": cls must be [B, D] and queries [L, B, Q, D], got ", cls.sizes(), " and ",
                    queries.sizes());
  check_supported_float(cls, op, "cls");
  check_same(queries, cls, op, "queries", "cls");
  TORCH_CHECK_VALUE(queries.size(1) == cls.size(0) && queries.size(3) == cls.size(1), op,
                    ": queries ", queries.sizes(), " must be [L, B, Q, D] for cls ", cls.sizes());
}

// grad_out, out [B, D (1 + L Q)]; norms [B, 1 + L] fp32 (L = layers, Q = num_queries).
inline void check_aggregate_backward(const at::Tensor& grad_out, const at::Tensor& out,
                                     const at::Tensor& norms, int64_t num_queries,
                                     int64_t layers, const char* op) {
  TORCH_CHECK_VALUE(out.dim() == 2 && norms.dim() == 2 && norms.size(0) == out.size(0) &&
                        norms.size(1) >= 1,
                    op, ": out must be [B, F] and norms [B, 1 + L], got ", out.sizes(), " and ",
                    norms.sizes());
  check_supported_float(out, op, "out");
  check_same(grad_out, out, op, "grad_out", "out");
  TORCH_CHECK_VALUE(grad_out.sizes() == out.sizes(), op, ": grad_out ", grad_out.sizes(),
                    " must have out's shape ", out.sizes());
  TORCH_CHECK_VALUE(norms.scalar_type() == at::kFloat && norms.device() == out.device(), op,
                    ": norms must be float32 on out's device");
  TORCH_CHECK_VALUE(num_queries >= 1 && out.size(1) % (1 + layers * num_queries) == 0, op,
                    ": out width ", out.size(1), " is not D (1 + L Q) for L = ", layers,
                    ", Q = ", num_queries);
}

}  // namespace vqt
}  // namespace fastpeft
