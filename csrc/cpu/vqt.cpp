// CPU kernels for fastpeft::vqt_query_attention{,_backward} and fastpeft::vqt_aggregate{,_backward}.
// The per-row math is in include/fastpeft/vqt.h (shared with csrc/cuda/vqt.cu).
//
// Attention: one task = one (b, h) and a block of query rows; at::parallel_for over tasks.
// Per key tile (vqt::kTileKeys keys) the task converts the tile to fp32 once, K transposed to
// [d][tile] so the logits of one query row are `tile`-wide vector updates over j (the same
// ascending-j accumulation as vqt::logit, but with lanes = keys: no horizontal reductions),
// and V (and K for the backward's dq) row-major so p_n * v_n and ds_n * k_n are d-wide
// vector updates (fp32 rows are read in place, other dtypes converted once). The packed tiles
// are reused by every query row of the task, a block of rows at a time (register blocking).
// Head dims 32/64/96/128 take the "fast path" below (explicit vectors, compile-time head dim,
// accumulators in registers; below kTransposeMinRows query rows, logits straight from the key
// rows instead of a packed K^T); other head dims the generic loops.
//
// `pytest bench -k vqt` (bench/test_ops.py) times this kernel against eager autograd through
// softmax(scale q k^T) v at ViT-B shapes; bench/results keeps the numbers with date and machine.
// The fast path beats the generic loops and eager at every query count measured there; a
// software prefetch of the next tile gained nothing and was left out.
//
// The hot functions are compiled for AVX-512, AVX2 and baseline x86-64 and picked at run time
// (GCC target_clones for the generic loops, fast_kernels() for the fast path): the wheel stays
// portable (no -march) while the loops vectorise 16-wide where the CPU allows.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <type_traits>
#include <utility>
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

// ---- fast path: head dim 32, 64, 96 or 128 (a compile-time constant) ----------------------
//
// The tiles, online softmax and row blocks of the generic path above, written with explicit
// W-lane vectors (GCC vector extensions) for a compile-time head dim D so that every accumulator
// is a register: with the generic loops' runtime `d`, GCC keeps the P V / dS K accumulators (and
// at 4 rows x 64 keys part of the logits) in memory, a load and a store per key and row.
// W = 16 (AVX-512), 8 (AVX2) or 4 (baseline x86-64, other GCC targets); each ISA has its own
// instantiations, picked once per process by fast_kernels().
//   logits    lanes = keys from a packed K^T tile (the generic path's ascending-j arithmetic,
//             R rows x 4 key vectors per block; the tile is transposed in registers, W x W at
//             a time), or for Q < kTransposeMinRows straight from the key rows: lanes = head
//             dim, per key W partial sums over j = l, l + W, ... then a fixed tree across lanes
//             (no pack, whose cost few rows cannot amortise).
//   P V, dS K R rows x C head-dim vectors of accumulators, keys ascending (generic arithmetic).
//   tile sum  sum_n p_n lanewise over the tile's key vectors, then a fixed tree across lanes
//             (the generic path's one-by-one scalar adds are a dependency chain: ~15% of the
//             forward).
// So the rounding differs from the generic path and between ISAs by a few ulp; the order is
// fixed by the shapes and W alone, never by the thread count.

#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12  // __builtin_shufflevector
#define FASTPEFT_VQT_FAST 1
// The always-inline helpers return 32/64-byte vectors by value; they are only ever inlined into
// functions compiled for the matching ISA, so GCC's ABI warning about them is moot.
#pragma GCC diagnostic ignored "-Wpsabi"
#define FASTPEFT_INLINE __attribute__((always_inline)) inline
#else
#define FASTPEFT_VQT_FAST 0
#endif

// One tile of the forward: rows [0, nr) of a task against keys [n0, n0 + tn).
struct FwdTile {
  const float* q;  // [nr][d] fp32
  int64_t nr;
  const float* k;  // the tile's key rows (fp32, row stride ks), values likewise
  int64_t ks;
  const float* v;
  int64_t vs;
  int64_t tn;
  float scale;
  bool transposed;  // logits from a packed K^T tile (else straight from the key rows)
  float* kt;        // scratch [d][kTile]
  vq::RowState* st;
  float* acc;  // [nr][d]
};

struct BwdTile {
  const float* q;  // [nr][d] fp32
  const float* g;  // grad_out rows [nr][d] fp32
  int64_t nr;
  const float* k;
  int64_t ks;
  const float* v;
  int64_t vs;
  bool kv_same;  // k and v are the same rows (pack one transposed tile)
  int64_t tn;
  float scale;
  bool transposed;
  float* kt;  // scratch [d][kTile] x 2
  float* vt;
  const float* lse;
  const float* delta;
  float* dq;  // [nr][d]
};

struct FastKernels {
  void (*forward)(const FwdTile&);
  void (*backward)(const BwdTile&);
};

// Below this many query rows the fast path computes logits from the key/value rows directly
// (one horizontal reduction per row and key) instead of packing transposed K^T (and V^T) tiles,
// whose cost only pays off over enough rows (the break-even lies between Q = 10 and 12 at ViT-B
// shapes on one thread; at Q = 1 the scalar pack dominated). Chosen from Q, never
// from a task's share of the rows, so a row's arithmetic does not depend on the thread count.
constexpr int64_t kTransposeMinRows = 12;

#if FASTPEFT_VQT_FAST

template <int W>
struct Simd {
  typedef float V __attribute__((vector_size(4 * W)));
  typedef float U __attribute__((vector_size(4 * W), aligned(4), __may_alias__));
  static FASTPEFT_INLINE V load(const float* p) { return *reinterpret_cast<const U*>(p); }
  static FASTPEFT_INLINE void store(float* p, const V& x) { *reinterpret_cast<U*>(p) = x; }
  static FASTPEFT_INLINE V zero() { return V{}; }
};

// Horizontal sums of W vectors at once: out[i] = sum of the lanes of v[i], by a fixed tree.
// Level with half-width h2 adds, for each pair (x, y) = (v[i], v[i + h2]), the two halves of
// every lane group of size 2 h2 and interleaves x's and y's groups; after log2(W) levels lane i
// holds v[i]'s sum (lanes added pairwise: (l, l + W/2), then (l, l + W/4), ...).
constexpr int tree_lane(int w, int h2, int lane) {
  return (lane / h2 % 2) * w + (lane / h2 / 2) * 2 * h2 + lane % h2;
}

template <int W, int H2, int... L>
FASTPEFT_INLINE typename Simd<W>::V tree_step(const typename Simd<W>::V& x,
                                              const typename Simd<W>::V& y,
                                              std::integer_sequence<int, L...>) {
  return __builtin_shufflevector(x, y, tree_lane(W, H2, L)...) +
         __builtin_shufflevector(x, y, (tree_lane(W, H2, L) + H2)...);
}

template <int W, int H2>
FASTPEFT_INLINE typename Simd<W>::V sum_lanes(typename Simd<W>::V* v) {
  for (int i = 0; i < H2; ++i) {
    v[i] = tree_step<W, H2>(v[i], v[i + H2], std::make_integer_sequence<int, W>{});
  }
  if constexpr (H2 == 1) {
    return v[0];
  } else {
    return sum_lanes<W, H2 / 2>(v);
  }
}

// Lane 0 of the result = op over all W lanes, by a fixed tree (lane l with l + W/2, then with
// l + W/4, ...).
struct AddOp {
  template <typename V>
  FASTPEFT_INLINE V operator()(const V& a, const V& b) const { return a + b; }
};
struct MaxOp {  // vq::fmax2 lanewise
  template <typename V>
  FASTPEFT_INLINE V operator()(const V& a, const V& b) const { return a > b ? a : b; }
};

template <int W, int H, typename Op, int... J>
FASTPEFT_INLINE typename Simd<W>::V fold_step(const typename Simd<W>::V& v, Op op,
                                              std::integer_sequence<int, J...>) {
  return op(v, __builtin_shufflevector(v, v, ((J + H) % W)...));
}

template <int W, int H, typename Op>
FASTPEFT_INLINE typename Simd<W>::V fold_lanes(const typename Simd<W>::V& v, Op op) {
  const typename Simd<W>::V f = fold_step<W, H>(v, op, std::make_integer_sequence<int, W>{});
  if constexpr (H > 1) {
    return fold_lanes<W, H / 2>(f, op);
  } else {
    return f;
  }
}

// In-register transpose of a W x W block (r[i] = row i): for each bit h of the index, swap the
// off-diagonal h-blocks of row pairs (i, i + h).
template <int W, int H, int... J>
FASTPEFT_INLINE void transpose_step(typename Simd<W>::V& a, typename Simd<W>::V& b,
                                    std::integer_sequence<int, J...>) {
  const typename Simd<W>::V lo = __builtin_shufflevector(a, b, ((J & H) == 0 ? J : W + J - H)...);
  const typename Simd<W>::V hi = __builtin_shufflevector(a, b, ((J & H) == 0 ? J + H : W + J)...);
  a = lo;
  b = hi;
}

template <int W, int H>
FASTPEFT_INLINE void transpose_block(typename Simd<W>::V* r) {
  for (int i = 0; i < W; ++i) {
    if ((i & H) == 0) transpose_step<W, H>(r[i], r[i + H], std::make_integer_sequence<int, W>{});
  }
  if constexpr (H > 1) transpose_block<W, H / 2>(r);
}

template <int W, int D>
struct Fast {
  using S = Simd<W>;
  using V = typename S::V;
  static_assert(D % W == 0 && kTile % W == 0, "head dim and tile must be whole vectors");
  static constexpr int DV = D / W;     // vectors per head-dim row
  static constexpr int KV = kTile / W;  // key vectors per tile
  // Register blocking, for the logits (R rows x KC = 4 key vectors) and for P V / dS K (R rows x
  // C <= 4 head-dim vectors): up to 24 of AVX-512's 32 registers hold accumulators (R = 6; R = 4
  // was slower at Q = 10..50), 8 of AVX2's / SSE's 16 (R = 2).
  static constexpr int R = W >= 16 ? 6 : 2;
  static constexpr int KC = KV < 4 ? KV : 4;
  static constexpr int C = DV % 4 == 0 ? 4 : DV % 3 == 0 ? 3 : DV % 2 == 0 ? 2 : 1;

  // Key rows [0, tn) (fp32, row stride rs) -> kt [D][kTile]; key columns [tn, nw) are zero
  // (nw = tn rounded up to W; columns past nw are never read).
  static FASTPEFT_INLINE void pack_transposed(const float* rows, int64_t rs, int tn, float* kt) {
    int n0 = 0;
    for (; n0 + W <= tn; n0 += W) pack_block(rows + n0 * rs, rs, W, kt + n0);
    if (n0 < tn) pack_block(rows + n0 * rs, rs, tn - n0, kt + n0);
  }

  // m <= W key rows -> W columns of kt (zero past m).
  static FASTPEFT_INLINE void pack_block(const float* rows, int64_t rs, int m, float* kt) {
    for (int j0 = 0; j0 < D; j0 += W) {
      V r[W];
      if (m == W) {
        for (int i = 0; i < W; ++i) r[i] = S::load(rows + i * rs + j0);
      } else {
        for (int i = 0; i < W; ++i) r[i] = i < m ? S::load(rows + i * rs + j0) : S::zero();
      }
      transpose_block<W, W / 2>(r);
      for (int i = 0; i < W; ++i) S::store(kt + (j0 + i) * kTile, r[i]);
    }
  }

  // x[r][k0 W .. (k0 + NK) W) = scale * (a_r . column n) for NR rows a_r = a + r D: the
  // ascending-j accumulation of vq::logit, lanes = keys (identical rounding).
  template <int NR, int NK>
  static FASTPEFT_INLINE void logits_block(const float* a, const float* kt, int k0, float scale,
                                           float* x) {
    V s[NR][NK];
    for (int r = 0; r < NR; ++r) {
      for (int c = 0; c < NK; ++c) s[r][c] = S::zero();
    }
#pragma GCC unroll 4
    for (int j = 0; j < D; ++j) {
      const float* col = kt + j * kTile + k0 * W;
      V kv[NK];
      for (int c = 0; c < NK; ++c) kv[c] = S::load(col + c * W);
      for (int r = 0; r < NR; ++r) {
        const float aj = a[r * D + j];
        for (int c = 0; c < NK; ++c) s[r][c] += kv[c] * aj;
      }
    }
    for (int r = 0; r < NR; ++r) {
      for (int c = 0; c < NK; ++c) S::store(x + r * kTile + (k0 + c) * W, s[r][c] * scale);
    }
  }

  // Logits of NR rows over the tile's first nkv key vectors (packed K^T).
  template <int NR>
  static FASTPEFT_INLINE void logits_transposed(const float* a, const float* kt, int nkv,
                                                float scale, float* x) {
    int k0 = 0;
    for (; k0 + KC <= nkv; k0 += KC) logits_block<NR, KC>(a, kt, k0, scale, x);
    if constexpr (KC == 4) {
      switch (nkv - k0) {
        case 3: logits_block<NR, 3>(a, kt, k0, scale, x); break;
        case 2: logits_block<NR, 2>(a, kt, k0, scale, x); break;
        case 1: logits_block<NR, 1>(a, kt, k0, scale, x); break;
        default: break;
      }
    }
  }

  // Logits of one row straight from key rows [0, tn) (fp32, stride ks): per key the W partial
  // sums over j = l, l + W, ... (ascending), then sum_lanes' fixed tree. Lanes [tn, nw) are 0.
  static FASTPEFT_INLINE void logits_rows(const float* a, const float* kr, int64_t ks, int tn,
                                          float scale, float* x) {
    V qa[DV];
    for (int c = 0; c < DV; ++c) qa[c] = S::load(a + c * W);
    for (int n0 = 0; n0 < tn; n0 += W) {
      const int m = std::min(W, tn - n0);
      V part[W];
      for (int i = 0; i < W; ++i) {
        if (i < m) {
          const float* k = kr + (n0 + i) * ks;
          V t = S::load(k) * qa[0];
          for (int c = 1; c < DV; ++c) t += S::load(k + c * W) * qa[c];
          part[i] = t;
        } else {
          part[i] = S::zero();
        }
      }
      S::store(x + n0, sum_lanes<W, W / 2>(part) * scale);
    }
  }

  // NR rows of x ([NR][kTile]) -> logits, from the packed tile or from the rows.
  template <int NR>
  static FASTPEFT_INLINE void logits(const float* a, const float* kt, const float* kr,
                                     int64_t ks, int tn, int nkv, bool transposed, float scale,
                                     float* x) {
    if (transposed) {
      logits_transposed<NR>(a, kt, nkv, scale, x);
    } else {
      for (int r = 0; r < NR; ++r) logits_rows(a + r * D, kr, ks, tn, scale, x + r * kTile);
    }
  }

  // acc_r = acc_r * alpha_r + sum_{n < tn} w[r][n] row_n for NR rows (alpha = null: 1), rows
  // fp32 with stride rs: the ascending-n mul_add of the generic path, C vectors of the head dim
  // at a time.
  template <int NR>
  static FASTPEFT_INLINE void weights_times_rows(const float* w, const float* rows, int64_t rs,
                                                 int tn, const float* alpha, float* acc) {
    for (int c0 = 0; c0 < DV; c0 += C) {
      V a[NR][C];
      for (int r = 0; r < NR; ++r) {
        for (int c = 0; c < C; ++c) {
          a[r][c] = S::load(acc + r * D + (c0 + c) * W);
          if (alpha != nullptr) a[r][c] *= alpha[r];  // alpha = 1 is exact: as if skipped
        }
      }
      for (int n = 0; n < tn; ++n) {
        const float* row = rows + n * rs + c0 * W;
        V b[C];
        for (int c = 0; c < C; ++c) b[c] = S::load(row + c * W);
        for (int r = 0; r < NR; ++r) {
          const float wn = w[r * kTile + n];
          for (int c = 0; c < C; ++c) a[r][c] += b[c] * wn;
        }
      }
      for (int r = 0; r < NR; ++r) {
        for (int c = 0; c < C; ++c) S::store(acc + r * D + (c0 + c) * W, a[r][c]);
      }
    }
  }

  // Online-softmax step of one row over its tile logits x[0, nw) (lanes >= tn are -inf):
  // x <- p_n (exactly 0 past tn), returns alpha (vq::enter_tile) and adds the tile's sum
  // (lanewise over the key vectors, then fold_lanes' tree) to st.l.
  static FASTPEFT_INLINE float softmax_tile(float* x, int nkv, vq::RowState& st) {
    V m = S::load(x);
    for (int c = 1; c < nkv; ++c) {
      const V y = S::load(x + c * W);
      m = m > y ? m : y;
    }
    const float alpha = vq::enter_tile(st, fold_lanes<W, W / 2>(m, MaxOp{})[0]);
    const int nw = nkv * W;
    for (int n = 0; n < nw; ++n) x[n] = vq::prob_in_tile(st, x[n]);  // exactly 0 past tn
    V l = S::load(x);
    for (int c = 1; c < nkv; ++c) l += S::load(x + c * W);
    st.l += fold_lanes<W, W / 2>(l, AddOp{})[0];
    return alpha;
  }

  template <int NR>
  static FASTPEFT_INLINE void forward_rows(const FwdTile& t, int64_t r0, int tn, int nkv) {
    alignas(64) float x[NR][kTile];
    float alpha[NR];
    const float* q = t.q + r0 * D;
    logits<NR>(q, t.kt, t.k, t.ks, tn, nkv, t.transposed, t.scale, &x[0][0]);
    for (int r = 0; r < NR; ++r) {
      for (int n = tn; n < nkv * W; ++n) x[r][n] = vq::neg_inf();
      alpha[r] = softmax_tile(x[r], nkv, t.st[r0 + r]);
    }
    weights_times_rows<NR>(&x[0][0], t.v, t.vs, tn, alpha, t.acc + r0 * D);
  }

  template <int NR>
  static FASTPEFT_INLINE void backward_rows(const BwdTile& t, const float* vt, int64_t r0, int tn,
                                            int nkv) {
    alignas(64) float x[NR][kTile];
    alignas(64) float dp[NR][kTile];
    const int64_t off = r0 * D;
    logits<NR>(t.q + off, t.kt, t.k, t.ks, tn, nkv, t.transposed, t.scale, &x[0][0]);
    logits<NR>(t.g + off, vt, t.v, t.vs, tn, nkv, t.transposed, 1.0f, &dp[0][0]);
    for (int r = 0; r < NR; ++r) {
      const float lse = t.lse[r0 + r], delta = t.delta[r0 + r];
      // Lanes [tn, nw) come from zero padding; dq reads only n < tn.
      for (int n = 0; n < nkv * W; ++n) {
        x[r][n] = vq::dlogit(vq::prob_from_lse(x[r][n], lse), dp[r][n], delta);
      }
    }
    weights_times_rows<NR>(&x[0][0], t.k, t.ks, tn, nullptr, t.dq + off);
  }

  // The last nr < R rows of a task: one block of exactly nr rows.
  template <int NR>
  static FASTPEFT_INLINE void forward_rest(const FwdTile& t, int64_t r0, int nr, int tn, int nkv) {
    if (nr == NR) {
      forward_rows<NR>(t, r0, tn, nkv);
    } else if constexpr (NR > 1) {
      forward_rest<NR - 1>(t, r0, nr, tn, nkv);
    }
  }

  template <int NR>
  static FASTPEFT_INLINE void backward_rest(const BwdTile& t, const float* vt, int64_t r0, int nr,
                                            int tn, int nkv) {
    if (nr == NR) {
      backward_rows<NR>(t, vt, r0, tn, nkv);
    } else if constexpr (NR > 1) {
      backward_rest<NR - 1>(t, vt, r0, nr, tn, nkv);
    }
  }

  static FASTPEFT_INLINE void forward_tile(const FwdTile& t) {
    const int tn = static_cast<int>(t.tn), nkv = (tn + W - 1) / W;
    if (t.transposed) pack_transposed(t.k, t.ks, tn, t.kt);
    int64_t r0 = 0;
    for (; r0 + R <= t.nr; r0 += R) forward_rows<R>(t, r0, tn, nkv);
    if (r0 < t.nr) forward_rest<R - 1>(t, r0, static_cast<int>(t.nr - r0), tn, nkv);
  }

  static FASTPEFT_INLINE void backward_tile(const BwdTile& t) {
    const int tn = static_cast<int>(t.tn), nkv = (tn + W - 1) / W;
    const float* vt = t.kt;
    if (t.transposed) {
      pack_transposed(t.k, t.ks, tn, t.kt);
      if (!t.kv_same) {
        pack_transposed(t.v, t.vs, tn, t.vt);
        vt = t.vt;
      }
    }
    int64_t r0 = 0;
    for (; r0 + R <= t.nr; r0 += R) backward_rows<R>(t, vt, r0, tn, nkv);
    if (r0 < t.nr) backward_rest<R - 1>(t, vt, r0, static_cast<int>(t.nr - r0), tn, nkv);
  }
};

// One instantiation per (ISA, head dim); the target attribute makes GCC compile the inlined
// Fast<W, D> code for that ISA.
#define FASTPEFT_VQT_ENTRY(TARGET, NAME, W)                                                     \
  template <int D>                                                                            \
  TARGET void NAME##_forward(const FwdTile& t) { Fast<W, D>::forward_tile(t); }               \
  template <int D>                                                                            \
  TARGET void NAME##_backward(const BwdTile& t) { Fast<W, D>::backward_tile(t); }             \
  template <int D>                                                                            \
  FastKernels NAME##_kernels() { return FastKernels{&NAME##_forward<D>, &NAME##_backward<D>}; }

FASTPEFT_VQT_ENTRY(, base, 4)
#if defined(__x86_64__)
FASTPEFT_VQT_ENTRY(__attribute__((target("avx2"))), avx2, 8)
FASTPEFT_VQT_ENTRY(__attribute__((target("avx512f"))), avx512, 16)
#endif
#undef FASTPEFT_VQT_ENTRY

template <int D>
FastKernels kernels_for_cpu() {
#if defined(__x86_64__)
  if (__builtin_cpu_supports("avx512f")) return avx512_kernels<D>();
  if (__builtin_cpu_supports("avx2")) return avx2_kernels<D>();
#endif
  return base_kernels<D>();
}

// The fast kernels for head dim d, or nulls (use the generic path).
FastKernels fast_kernels(int64_t d) {
  switch (d) {
    case 32: { static const FastKernels k = kernels_for_cpu<32>(); return k; }
    case 64: { static const FastKernels k = kernels_for_cpu<64>(); return k; }
    case 96: { static const FastKernels k = kernels_for_cpu<96>(); return k; }
    case 128: { static const FastKernels k = kernels_for_cpu<128>(); return k; }
    default: return FastKernels{nullptr, nullptr};
  }
}

#else  // no GCC vector extensions: generic path only

FastKernels fast_kernels(int64_t) { return FastKernels{nullptr, nullptr}; }

#endif  // FASTPEFT_VQT_FAST

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
  const FastKernels fast = fast_kernels(d);
  const bool transposed = fast.forward == nullptr || Q >= kTransposeMinRows;
  FASTPEFT_DISPATCH_FLOAT_TYPES(q.scalar_type(), "fastpeft::vqt_query_attention_cpu", [&] {
    const scalar_t* qp = q.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    float* lp = lse.data_ptr<float>();
    const View4<scalar_t> kv = view4<scalar_t>(k), vv = view4<scalar_t>(v);
    at::parallel_for(0, B * H * blocks, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> kt(d * kTile), kr(kTile * d), vr(kTile * d), qf(rows * d), acc(rows * d);
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
          const float* vrow = nullptr;
          int64_t vstride = d;
          if (!rows_in_place(vv, b, h, n0, &vrow, &vstride)) {
            pack_rows(vv, b, h, n0, tn, d, vr.data());
            vrow = vr.data();
          }
          if (fast.forward != nullptr) {
            const float* krow = nullptr;
            int64_t kstride = d;
            if (!rows_in_place(kv, b, h, n0, &krow, &kstride)) {
              pack_rows(kv, b, h, n0, tn, d, kr.data());
              krow = kr.data();
            }
            fast.forward(FwdTile{qf.data(), nr, krow, kstride, vrow, vstride, tn, sc, transposed,
                                 kt.data(), st.data(), acc.data()});
          } else {
            pack_transposed(kv, b, h, n0, tn, d, kt.data());
            forward_tile(qf.data(), kt.data(), vrow, vstride, nr, tn, d, sc, st.data(),
                         acc.data());
          }
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
  const FastKernels fast = fast_kernels(d);
  const bool transposed = fast.backward == nullptr || Q >= kTransposeMinRows;
  FASTPEFT_DISPATCH_FLOAT_TYPES(q.scalar_type(), "fastpeft::vqt_query_attention_backward_cpu", [&] {
    const scalar_t* qp = q.data_ptr<scalar_t>();
    const scalar_t* gp = g.data_ptr<scalar_t>();
    scalar_t* dqp = grad_q.data_ptr<scalar_t>();
    const float* lp = lse.data_ptr<float>();
    const float* dp = delta.data_ptr<float>();
    const View4<scalar_t> kv = view4<scalar_t>(k), vv = view4<scalar_t>(v);
    // k == v (the fused VQT block's absorbed backward passes h twice): pack/convert once.
    const bool kv_same = same_view(kv, vv);
    at::parallel_for(0, B * H * blocks, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> kt(d * kTile), vt(d * kTile), kr(kTile * d), vr(kTile * d);
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
        const int64_t row = bh * Q + r0;
        for (int64_t n0 = 0; n0 < N; n0 += kTile) {
          const int64_t tn = std::min<int64_t>(kTile, N - n0);
          const float* krow = nullptr;
          int64_t kstride = d;
          if (!rows_in_place(kv, b, h, n0, &krow, &kstride)) {
            pack_rows(kv, b, h, n0, tn, d, kr.data());
            krow = kr.data();
          }
          if (fast.backward != nullptr) {
            const float* vrow = krow;
            int64_t vstride = kstride;
            if (!kv_same && !rows_in_place(vv, b, h, n0, &vrow, &vstride)) {
              pack_rows(vv, b, h, n0, tn, d, vr.data());
              vrow = vr.data();
            }
            fast.backward(BwdTile{qf.data(), gf.data(), nr, krow, kstride, vrow, vstride, kv_same,
                                  tn, sc, transposed, kt.data(), vt.data(), lp + row, dp + row,
                                  dq.data()});
          } else {
            pack_transposed(kv, b, h, n0, tn, d, kt.data());
            const float* vtile = kt.data();
            if (!kv_same) {
              pack_transposed(vv, b, h, n0, tn, d, vt.data());
              vtile = vt.data();
            }
            backward_tile(qf.data(), gf.data(), kt.data(), vtile, krow, kstride, nr, tn, d, sc,
                          lp + row, dp + row, dq.data());
          }
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
  vq::check_eps(eps, "fastpeft::vqt_aggregate");
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
  vq::check_eps(eps, "fastpeft::vqt_aggregate_backward");
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
