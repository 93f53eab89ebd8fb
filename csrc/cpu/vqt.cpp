// CPU kernels for fastpeft::vqt_query_attention{,_backward} and fastpeft::vqt_aggregate{,_backward}.
// The per-row math is in include/fastpeft/vqt.h (shared with csrc/cuda/vqt.cu).
//
// Attention: one task = one (b, h) and a block of query rows; at::parallel_for over tasks.
// Per key tile (vqt::kTileKeys keys) the task converts the tile to fp32 once, K transposed to
// [d][tile] so the logits of one query row are `tile`-wide vector updates over j (the same
// ascending-j accumulation as vqt::logit, but with lanes = keys: no horizontal reductions),
// and V (and K for the backward's dq) row-major so p_n * v_n and ds_n * k_n are d-wide
// vector updates (fp32 rows are read in place, other dtypes converted once). The packed tiles
// are reused by every query row of the task, kRowBlock rows at a time (register blocking).
// Measured (1 thread, ViT-B shapes B=8 H=12 N=197 d=64): the blocking took Q=50 fwd+bwd from
// ~55 ms to ~20 ms, the blocked transpose took the Q=1 backward from 2.0 to 0.6 ms.
//
// The hot per-(row, tile) functions are compiled for AVX-512, AVX2 and baseline x86-64 and
// picked at load time (GCC target_clones): the wheel stays portable (no -march) while the
// loops vectorise 16-wide where the CPU allows.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <type_traits>
#include <vector>

#include "fastpeft/vqt.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FASTPEFT_CPU_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FASTPEFT_CPU_CLONES
#endif

namespace fastpeft {
namespace {

namespace vq = fastpeft::vqt;
constexpr int kTile = vq::kTileKeys;

// Query rows per task when (b, h) pairs alone do not give every thread work.
int64_t rows_per_task(int64_t pairs, int64_t rows) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  if (pairs >= 2 * threads || rows <= 1) return std::max<int64_t>(rows, 1);
  const int64_t blocks = std::min<int64_t>(rows, (2 * threads + pairs - 1) / pairs);
  return (rows + blocks - 1) / blocks;
}

// A [B, H, L, d] view with unit stride on d: element (b, h, n, j) at b*sb + h*sh + n*sn + j.
template <typename T>
struct View4 {
  const T* p;
  int64_t sb, sh, sn;
  const T* row(int64_t b, int64_t h, int64_t n) const { return p + b * sb + h * sh + n * sn; }
};

template <typename T>
View4<T> view4(const at::Tensor& t) {
  return View4<T>{t.data_ptr<T>(), t.stride(0), t.stride(1), t.stride(2)};
}

// Keys/values may be strided views (e.g. of a [B, N, 3, H, d] qkv output): only the head dim
// must be unit-stride; anything else is copied once.
at::Tensor unit_last_dim(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

// Tile rows [n0, n0 + tn) of one (b, h) -> dst [d][kTile] fp32, zero-padded to kTile columns.
template <typename T>
void pack_transposed(const View4<T>& src, int64_t b, int64_t h, int64_t n0, int64_t tn,
                     int64_t d, float* dst) {
  // Blocks of 8 head dims: reads stay within a few cache lines per key, writes are 8 runs of
  // contiguous columns (~2x faster than a row-by-row scatter at d = 64).
  const T* base = src.row(b, h, n0);
  for (int64_t j0 = 0; j0 < d; j0 += 8) {
    const int64_t jn = std::min<int64_t>(8, d - j0);
    for (int64_t n = 0; n < tn; ++n) {
      const T* r = base + n * src.sn + j0;
      for (int64_t j = 0; j < jn; ++j) dst[(j0 + j) * kTile + n] = static_cast<float>(r[j]);
    }
  }
  for (int64_t j = 0; j < d; ++j) {
    for (int64_t n = tn; n < kTile; ++n) dst[j * kTile + n] = 0.0f;
  }
}

// fp32 rows are used where they are (row stride sn), other dtypes are converted by pack_rows.
template <typename T>
bool rows_in_place(const View4<T>& src, int64_t b, int64_t h, int64_t n0, const float** rows,
                   int64_t* stride) {
  if constexpr (std::is_same_v<T, float>) {
    *rows = src.row(b, h, n0);
    *stride = src.sn;
    return true;
  } else {
    return false;
  }
}

template <typename T>
bool same_view(const View4<T>& a, const View4<T>& b) {
  return a.p == b.p && a.sb == b.sb && a.sh == b.sh && a.sn == b.sn;
}

// Tile rows [n0, n0 + tn) of one (b, h) -> dst [tn][d] fp32.
template <typename T>
void pack_rows(const View4<T>& src, int64_t b, int64_t h, int64_t n0, int64_t tn, int64_t d,
               float* dst) {
  for (int64_t n = 0; n < tn; ++n) {
    const T* r = src.row(b, h, n0 + n);
    for (int64_t j = 0; j < d; ++j) dst[n * d + j] = static_cast<float>(r[j]);
  }
}

// Query rows are processed kRowBlock at a time so every packed K^T / V / K element loaded from
// L1 serves kRowBlock rows (register blocking: 4 rows x 64 keys = 16 AVX-512 accumulators).
// Each row's arithmetic and its order are exactly those of a single row.
constexpr int kRowBlock = 4;

// x[r][n] = scale * (a_r . col_n) for the kTile columns of a packed [d][kTile] tile and R rows
// a_r = a + r * d (vq::logit's ascending-j accumulation, kTile lanes at once); columns >= tn
// are set to -inf (or `fill`).
template <int R>
__attribute__((always_inline)) inline void tile_logits(const float* a, const float* kt, int64_t d,
                                                       float scale, int64_t tn, float fill,
                                                       float (*x)[kTile]) {
  float s[R][kTile];
  for (int r = 0; r < R; ++r) {
    for (int n = 0; n < kTile; ++n) s[r][n] = 0.0f;
  }
  for (int64_t j = 0; j < d; ++j) {
    const float* col = kt + j * kTile;
    float aj[R];
    for (int r = 0; r < R; ++r) aj[r] = a[r * d + j];
    for (int n = 0; n < kTile; ++n) {
      const float kv = col[n];
      for (int r = 0; r < R; ++r) s[r][n] = vq::mul_add(aj[r], kv, s[r][n]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int n = 0; n < kTile; ++n) x[r][n] = n < tn ? s[r][n] * scale : fill;
  }
}

// R query rows through one key tile (forward): online-softmax update of st[r] and of the
// unnormalised output accumulators acc + r * d.
template <int R>
__attribute__((always_inline)) inline void forward_rows_tile(const float* q, const float* kt,
                                                             const float* vr, int64_t vs,
                                                             int64_t tn, int64_t d, float scale,
                                                             vq::RowState* st, float* acc) {
  float x[R][kTile];
  tile_logits<R>(q, kt, d, scale, tn, vq::neg_inf(), x);
  float p[R][kTile];
  for (int r = 0; r < R; ++r) {
    float tile_max = vq::neg_inf();
    for (int64_t n = 0; n < tn; ++n) tile_max = vq::fmax2(tile_max, x[r][n]);
    const float alpha = vq::enter_tile(st[r], tile_max);
    for (int n = 0; n < kTile; ++n) p[r][n] = vq::prob_in_tile(st[r], x[r][n]);  // masked: 0
    float l = st[r].l;
    for (int64_t n = 0; n < tn; ++n) l += p[r][n];
    st[r].l = l;
    if (alpha != 1.0f) {
      float* a = acc + r * d;
      for (int64_t j = 0; j < d; ++j) a[j] *= alpha;
    }
  }
  for (int64_t n = 0; n < tn; ++n) {
    const float* v = vr + n * vs;
    float pn[R];
    for (int r = 0; r < R; ++r) pn[r] = p[r][n];
    for (int64_t j = 0; j < d; ++j) {
      const float vj = v[j];
      for (int r = 0; r < R; ++r) acc[r * d + j] = vq::mul_add(pn[r], vj, acc[r * d + j]);
    }
  }
}

// R query rows through one key tile (backward): dq_r += sum_n p_n (dp_n - delta_r) k_n.
template <int R>
__attribute__((always_inline)) inline void backward_rows_tile(
    const float* q, const float* dout, const float* kt, const float* vt, const float* kr,
    int64_t ks, int64_t tn, int64_t d, float scale, const float* lse, const float* delta,
    float* dq) {
  float x[R][kTile];
  float dp[R][kTile];
  tile_logits<R>(q, kt, d, scale, tn, vq::neg_inf(), x);
  tile_logits<R>(dout, vt, d, 1.0f, tn, 0.0f, dp);
  float ds[R][kTile];
  for (int r = 0; r < R; ++r) {
    for (int n = 0; n < kTile; ++n) ds[r][n] = vq::dlogit(vq::prob_from_lse(x[r][n], lse[r]), dp[r][n], delta[r]);
  }
  for (int64_t n = 0; n < tn; ++n) {
    const float* k = kr + n * ks;
    float dsn[R];
    for (int r = 0; r < R; ++r) dsn[r] = ds[r][n];
    for (int64_t j = 0; j < d; ++j) {
      const float kj = k[j];
      for (int r = 0; r < R; ++r) dq[r * d + j] = vq::mul_add(dsn[r], kj, dq[r * d + j]);
    }
  }
}

// Rows [0, nr) of a task through one tile: blocks of kRowBlock, then single rows.
FASTPEFT_CPU_CLONES
void forward_tile(const float* q, const float* kt, const float* vr, int64_t vs, int64_t nr,
                  int64_t tn, int64_t d, float scale, vq::RowState* st, float* acc) {
  int64_t r = 0;
  for (; r + kRowBlock <= nr; r += kRowBlock) {
    forward_rows_tile<kRowBlock>(q + r * d, kt, vr, vs, tn, d, scale, st + r, acc + r * d);
  }
  for (; r < nr; ++r) forward_rows_tile<1>(q + r * d, kt, vr, vs, tn, d, scale, st + r, acc + r * d);
}

FASTPEFT_CPU_CLONES
void backward_tile(const float* q, const float* dout, const float* kt, const float* vt,
                   const float* kr, int64_t ks, int64_t nr, int64_t tn, int64_t d, float scale,
                   const float* lse, const float* delta, float* dq) {
  int64_t r = 0;
  for (; r + kRowBlock <= nr; r += kRowBlock) {
    backward_rows_tile<kRowBlock>(q + r * d, dout + r * d, kt, vt, kr, ks, tn, d, scale,
                                  lse + r, delta + r, dq + r * d);
  }
  for (; r < nr; ++r) {
    backward_rows_tile<1>(q + r * d, dout + r * d, kt, vt, kr, ks, tn, d, scale, lse + r,
                          delta + r, dq + r * d);
  }
}

std::tuple<at::Tensor, at::Tensor> vqt_query_attention_cpu(const at::Tensor& q_in,
                                                           const at::Tensor& k_in,
                                                           const at::Tensor& v_in, double scale) {
  vq::check_attention(q_in, k_in, v_in, "fastpeft::vqt_query_attention");
  const at::Tensor q = q_in.contiguous();
  const at::Tensor k = unit_last_dim(k_in);
  const at::Tensor v = unit_last_dim(v_in);
  const int64_t B = q.size(0), H = q.size(1), Q = q.size(2), d = q.size(3), N = k.size(2);
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty({B, H, Q}, q.options().dtype(at::kFloat));
  if (q.numel() == 0) return {out, lse};

  const int64_t rows = rows_per_task(B * H, Q);
  const int64_t blocks = (Q + rows - 1) / rows;
  const float sc = static_cast<float>(scale);
  FASTPEFT_DISPATCH_FLOAT_TYPES(q.scalar_type(), "fastpeft::vqt_query_attention_cpu", [&] {
    const scalar_t* qp = q.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    float* lp = lse.data_ptr<float>();
    const View4<scalar_t> kv = view4<scalar_t>(k), vv = view4<scalar_t>(v);
    at::parallel_for(0, B * H * blocks, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> kt(d * kTile), vr(kTile * d), qf(rows * d), acc(rows * d);
      std::vector<vq::RowState> st(rows);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t bh = task / blocks, b = bh / H, h = bh % H;
        const int64_t r0 = (task % blocks) * rows, nr = std::min(rows, Q - r0);
        const int64_t base = (bh * Q + r0) * d;  // q/out are contiguous [B, H, Q, d]
        for (int64_t i = 0; i < nr * d; ++i) qf[i] = static_cast<float>(qp[base + i]);
        std::fill(acc.begin(), acc.end(), 0.0f);
        std::fill(st.begin(), st.end(), vq::row_init());
        for (int64_t n0 = 0; n0 < N; n0 += kTile) {
          const int64_t tn = std::min<int64_t>(kTile, N - n0);
          pack_transposed(kv, b, h, n0, tn, d, kt.data());
          const float* vrow = nullptr;
          int64_t vstride = d;
          if (!rows_in_place(vv, b, h, n0, &vrow, &vstride)) {
            pack_rows(vv, b, h, n0, tn, d, vr.data());
            vrow = vr.data();
          }
          forward_tile(qf.data(), kt.data(), vrow, vstride, nr, tn, d, sc, st.data(), acc.data());
        }
        for (int64_t r = 0; r < nr; ++r) {
          const float inv = vq::inv_sum(st[r]);
          for (int64_t j = 0; j < d; ++j) {
            op[base + r * d + j] = static_cast<scalar_t>(acc[r * d + j] * inv);
          }
          lp[bh * Q + r0 + r] = vq::row_lse(st[r]);
        }
      }
    });
  });
  return {out, lse};
}

at::Tensor vqt_query_attention_backward_cpu(const at::Tensor& grad_out_in, const at::Tensor& q_in,
                                            const at::Tensor& k_in, const at::Tensor& v_in,
                                            const at::Tensor& lse_in, const at::Tensor& delta_in,
                                            double scale) {
  vq::check_attention_backward(grad_out_in, q_in, k_in, v_in, lse_in, delta_in,
                               "fastpeft::vqt_query_attention_backward");
  const at::Tensor q = q_in.contiguous();
  const at::Tensor g = grad_out_in.contiguous();
  const at::Tensor k = unit_last_dim(k_in);
  const at::Tensor v = unit_last_dim(v_in);
  const at::Tensor lse = lse_in.contiguous();
  const at::Tensor delta = delta_in.contiguous();
  const int64_t B = q.size(0), H = q.size(1), Q = q.size(2), d = q.size(3), N = k.size(2);
  at::Tensor grad_q = at::empty(q.sizes(), q.options());
  if (q.numel() == 0) return grad_q;

  const int64_t rows = rows_per_task(B * H, Q);
  const int64_t blocks = (Q + rows - 1) / rows;
  const float sc = static_cast<float>(scale);
  FASTPEFT_DISPATCH_FLOAT_TYPES(q.scalar_type(), "fastpeft::vqt_query_attention_backward_cpu", [&] {
    const scalar_t* qp = q.data_ptr<scalar_t>();
    const scalar_t* gp = g.data_ptr<scalar_t>();
    scalar_t* dqp = grad_q.data_ptr<scalar_t>();
    const float* lp = lse.data_ptr<float>();
    const float* dp = delta.data_ptr<float>();
    const View4<scalar_t> kv = view4<scalar_t>(k), vv = view4<scalar_t>(v);
    at::parallel_for(0, B * H * blocks, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> kt(d * kTile), vt(d * kTile), kr(kTile * d);
      std::vector<float> qf(rows * d), gf(rows * d), dq(rows * d);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t bh = task / blocks, b = bh / H, h = bh % H;
        const int64_t r0 = (task % blocks) * rows, nr = std::min(rows, Q - r0);
        const int64_t base = (bh * Q + r0) * d;
        for (int64_t i = 0; i < nr * d; ++i) {
          qf[i] = static_cast<float>(qp[base + i]);
          gf[i] = static_cast<float>(gp[base + i]);
        }
        std::fill(dq.begin(), dq.end(), 0.0f);
        for (int64_t n0 = 0; n0 < N; n0 += kTile) {
          const int64_t tn = std::min<int64_t>(kTile, N - n0);
          pack_transposed(kv, b, h, n0, tn, d, kt.data());
          // k == v (the fused VQT block's absorbed backward passes h twice): pack once.
          const float* vtile = kt.data();
          if (!same_view(kv, vv)) {
            pack_transposed(vv, b, h, n0, tn, d, vt.data());
            vtile = vt.data();
          }
          const float* krow = nullptr;
          int64_t kstride = d;
          if (!rows_in_place(kv, b, h, n0, &krow, &kstride)) {
            pack_rows(kv, b, h, n0, tn, d, kr.data());
            krow = kr.data();
          }
          const int64_t row = bh * Q + r0;
          backward_tile(qf.data(), gf.data(), kt.data(), vtile, krow, kstride, nr, tn, d, sc,
                        lp + row, dp + row, dq.data());
        }
        for (int64_t i = 0; i < nr * d; ++i) dqp[base + i] = static_cast<scalar_t>(dq[i] * sc);
      }
    });
  });
  return grad_q;
}

// ---- aggregate -----------------------------------------------------------------------------

// Sum of squares in fp32 with 8 interleaved partial sums (fixed order: vectorises without
// reassociation, reproducible for any thread count).
FASTPEFT_CPU_CLONES
float sum_squares(const float* x, int64_t n) {
  float part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int k = 0; k < 8; ++k) part[k] = vq::mul_add(x[i + k], x[i + k], part[k]);
  }
  for (; i < n; ++i) part[0] = vq::mul_add(x[i], x[i], part[0]);
  float s = 0.0f;
  for (int k = 0; k < 8; ++k) s += part[k];
  return s;
}

FASTPEFT_CPU_CLONES
float dot8(const float* x, const float* y, int64_t n) {
  float part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int k = 0; k < 8; ++k) part[k] = vq::mul_add(x[i + k], y[i + k], part[k]);
  }
  for (; i < n; ++i) part[0] = vq::mul_add(x[i], y[i], part[0]);
  float s = 0.0f;
  for (int k = 0; k < 8; ++k) s += part[k];
  return s;
}

// Segment s of sample b: s = 0 is cls[b] ([D]); s = l + 1 is queries[l, b] ([Q * D]), written
// at out[b, D + l * Q * D].
struct Segments {
  int64_t B, L, Q, D;
  int64_t width() const { return D * (1 + L * Q); }
  int64_t len(int64_t s) const { return s == 0 ? D : Q * D; }
  int64_t out_offset(int64_t b, int64_t s) const {
    return b * width() + (s == 0 ? 0 : D + (s - 1) * Q * D);
  }
  int64_t in_offset(int64_t b, int64_t s) const {  // into cls (s = 0) or queries
    return s == 0 ? b * D : ((s - 1) * B + b) * Q * D;
  }
};

// Elements per task (ATen's grain size).
constexpr int64_t kGrainElements = 32768;

std::tuple<at::Tensor, at::Tensor> vqt_aggregate_cpu(const at::Tensor& cls_in,
                                                     const at::Tensor& queries_in, double eps) {
  vq::check_aggregate(cls_in, queries_in, "fastpeft::vqt_aggregate");
  const at::Tensor cls = cls_in.contiguous();
  const at::Tensor queries = queries_in.contiguous();
  const Segments sg{cls.size(0), queries.size(0), queries.size(2), cls.size(1)};
  at::Tensor out = at::empty({sg.B, sg.width()}, cls.options());
  at::Tensor norms = at::empty({sg.B, 1 + sg.L}, cls.options().dtype(at::kFloat));
  const float e = static_cast<float>(eps);
  if (sg.B == 0 || sg.D == 0) return {out, norms.zero_()};
  FASTPEFT_DISPATCH_FLOAT_TYPES(cls.scalar_type(), "fastpeft::vqt_aggregate_cpu", [&] {
    const scalar_t* cp = cls.data_ptr<scalar_t>();
    const scalar_t* qp = queries.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    float* np = norms.data_ptr<float>();
    const int64_t segs = 1 + sg.L;
    const int64_t grain = std::max<int64_t>(1, kGrainElements * segs / sg.width());
    at::parallel_for(0, sg.B * segs, grain, [&](int64_t begin, int64_t end) {
      std::vector<float> buf;
      for (int64_t t = begin; t < end; ++t) {
        const int64_t b = t / segs, s = t % segs, n = sg.len(s);
        const scalar_t* src = (s == 0 ? cp : qp) + sg.in_offset(b, s);
        buf.resize(n);
        for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(src[i]);
        const float norm = vq::sqrt_pos(sum_squares(buf.data(), n));
        const float inv = vq::inv_clamped_norm(norm, e);
        scalar_t* dst = op + sg.out_offset(b, s);
        for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<scalar_t>(buf[i] * inv);
        np[t] = norm;
      }
    });
  });
  return {out, norms};
}

std::tuple<at::Tensor, at::Tensor> vqt_aggregate_backward_cpu(const at::Tensor& grad_in,
                                                              const at::Tensor& out_in,
                                                              const at::Tensor& norms_in,
                                                              int64_t num_queries, double eps) {
  const at::Tensor norms = norms_in.contiguous();
  const int64_t L = norms.dim() == 2 ? norms.size(1) - 1 : 0;
  vq::check_aggregate_backward(grad_in, out_in, norms, num_queries, L,
                               "fastpeft::vqt_aggregate_backward");
  const at::Tensor g = grad_in.contiguous();
  const at::Tensor out = out_in.contiguous();
  const int64_t B = out.size(0);
  const int64_t D = out.size(1) / (1 + L * num_queries);
  const Segments sg{B, L, num_queries, D};
  at::Tensor grad_cls = at::empty({B, D}, out.options());
  at::Tensor grad_queries = at::empty({L, B, num_queries, D}, out.options());
  if (B == 0 || D == 0) return {grad_cls, grad_queries};
  const float e = static_cast<float>(eps);
  FASTPEFT_DISPATCH_FLOAT_TYPES(out.scalar_type(), "fastpeft::vqt_aggregate_backward_cpu", [&] {
    const scalar_t* gp = g.data_ptr<scalar_t>();
    const scalar_t* yp = out.data_ptr<scalar_t>();
    const float* np = norms.data_ptr<float>();
    scalar_t* gcp = grad_cls.data_ptr<scalar_t>();
    scalar_t* gqp = grad_queries.data_ptr<scalar_t>();
    const int64_t segs = 1 + L;
    const int64_t grain = std::max<int64_t>(1, kGrainElements * segs / sg.width());
    at::parallel_for(0, B * segs, grain, [&](int64_t begin, int64_t end) {
      std::vector<float> gf, yf;
      for (int64_t t = begin; t < end; ++t) {
        const int64_t b = t / segs, s = t % segs, n = sg.len(s);
        const int64_t off = sg.out_offset(b, s);
        gf.resize(n);
        yf.resize(n);
        for (int64_t i = 0; i < n; ++i) {
          gf[i] = static_cast<float>(gp[off + i]);
          yf[i] = static_cast<float>(yp[off + i]);
        }
        const float yg = dot8(yf.data(), gf.data(), n);
        const float norm = np[t];
        scalar_t* dst = (s == 0 ? gcp : gqp) + sg.in_offset(b, s);
        for (int64_t i = 0; i < n; ++i) {
          dst[i] = static_cast<scalar_t>(vq::normalize_grad(gf[i], yf[i], yg, norm, e));
        }
      }
    });
  });
  return {grad_cls, grad_queries};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastpeft, CPU, m) {
  m.impl("vqt_query_attention", &vqt_query_attention_cpu);
  m.impl("vqt_query_attention_backward", &vqt_query_attention_backward_cpu);
  m.impl("vqt_aggregate", &vqt_aggregate_cpu);
  m.impl("vqt_aggregate_backward", &vqt_aggregate_backward_cpu);
}

}  // namespace fastpeft
