"""Helpers shared by the Triton op families in `fastpeft.kernels`: backend choice, validation
messages, dtype names for ahead-of-time compilation.

Backend choice (`use_triton(*tensors)`), decided per call inside each custom op:
  * CUDA tensors                                  -> the Triton kernels (unless backend "torch")
  * CPU tensors, TRITON_INTERPRET=1 and backend "triton" requested
                                                  -> the Triton kernels through the interpreter
  * anything else                                 -> the plain-torch math of the op, which saves
                                                     exactly what the fused kernel saves
The backend is "auto" unless `FASTPEFT_KERNEL_BACKEND` (auto | triton | torch) or
`set_backend()` / `backend()` says otherwise.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
import os
import warnings

import torch

try:  # CPU-only torch wheels ship without triton: the ops then run their torch math.
    import triton
    import triton.language as tl
    HAVE_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is absent
    HAVE_TRITON = False

    class _NoTriton:
        """Stands in for `triton` so kernel modules import; kernels are never launched."""

        @staticmethod
        def jit(fn=None, **_kw):
            return fn if fn is not None else (lambda f: f)

    triton = _NoTriton()
    tl = None

BACKENDS = ("auto", "triton", "torch")
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Cfg:
    """One launch configuration of a Triton kernel (tile sizes, warps, pipeline stages); every op
    family keeps a table of them per (rank or width bucket, dtype class), checked by kernels/aot.py."""

    BLOCK_M: int
    BLOCK_N: int
    BLOCK_K: int = 0
    num_warps: int = 4
    num_stages: int = 2


def cast_param(t, dtype):
    """A parameter cast to the activation dtype, differentiably (fp32 parameters under autocast);
    None, non-tensors and non-float tensors pass through."""
    if isinstance(t, torch.Tensor) and t.dtype != dtype and t.is_floating_point():
        return t.to(dtype)
    return t

# Triton pointer type names for ASTSource signatures (kernels/aot.py).
TRITON_PTR = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}
AOT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

_backend = os.environ.get("FASTPEFT_KERNEL_BACKEND", "auto").strip().lower() or "auto"
if _backend not in BACKENDS:
    warnings.warn(f"FASTPEFT_KERNEL_BACKEND={_backend!r} is not one of {BACKENDS}; using 'auto'",
                  RuntimeWarning, stacklevel=1)
    _backend = "auto"
_warned: set[str] = set()


def get_backend() -> str:
    return _backend


def set_backend(name: str) -> None:
    """Select "auto" (Triton on CUDA, torch elsewhere), "triton" (also on CPU through
    TRITON_INTERPRET=1) or "torch" (always the torch math)."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    _backend = name


@contextlib.contextmanager
def backend(name: str):
    """Context manager form of `set_backend`."""
    old = _backend
    set_backend(name)
    try:
        yield
    finally:
        set_backend(old)


#: TRITON_INTERPRET as it was when this module (and triton, and every kernel's `triton.jit`) was
#: imported: what decides whether the kernels are interpreted
_INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (must be set before triton is
    imported; `triton.jit` decides at decoration time, so this reads it once, at import)."""
    return _INTERPRETING


def _warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


def use_triton(*tensors: torch.Tensor | None) -> bool:
    """Whether this call runs the Triton kernels (see the module docstring)."""
    if _backend == "torch":
        return False
    if not HAVE_TRITON:
        _warn_once("no-triton", "fastpeft.kernels: triton is not installed; using the torch "
                   "reference math for the fused ops")
        return False
    for t in tensors:
        if t is not None and t.is_cuda:
            return True
    if _backend == "triton":
        if interpreting():
            return True
        _warn_once("no-interpreter", "fastpeft.kernels: backend 'triton' was requested for CPU "
                   "tensors but TRITON_INTERPRET=1 is not set; using the torch reference math")
    return False


def describe(t: torch.Tensor | None) -> str:
    if t is None:
        return "None"
    return f"shape {tuple(t.shape)}, {t.dtype}, {t.device}"


def check_tensor(op: str, name: str, t, *, dim: int | None = None, shape=None,
                 like: torch.Tensor | None = None, dtype=None) -> None:
    """Raise ValueError/TypeError for a malformed op argument, naming shapes, dtypes, devices."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{op}: {name} has unsupported dtype {t.dtype}; expected one of "
                         f"{', '.join(map(str, SUPPORTED_DTYPES))} ({name} {describe(t)})")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{op}: {name} must be {dim}-D, got {name} {describe(t)}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} must have shape {tuple(shape)}, got {name} {describe(t)}")
    if like is not None:
        if t.device != like.device:
            raise ValueError(f"{op}: device mismatch: {name} is on {t.device} but x is on "
                             f"{like.device} ({name} {describe(t)}, x {describe(like)})")
        if dtype is None and t.dtype != like.dtype:
            raise ValueError(f"{op}: dtype mismatch: {name} is {t.dtype} but x is {like.dtype} "
                             f"({name} {describe(t)}, x {describe(like)})")
    if dtype is not None and t.dtype != dtype:
        raise ValueError(f"{op}: {name} must be {dtype}, got {name} {describe(t)}")


def check_features(op: str, x, width: str = "D") -> int:
    """check_tensor for an op's input x [..., width] with width > 0; returns the width."""
    check_tensor(op, "x", x)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"{op}: x must be [..., {width}] with {width} > 0, got x {describe(x)}")
    return x.shape[-1]


class CheckedSignatures:
    """Argument checks once per call signature: `seen(key)` is True when the checks already passed
    for arguments with this key (every property the checks read: shapes, dtypes, devices, flags),
    so an eager functional runs its checks on the first call of a signature only and a cheap key
    comparison after that; anything that differs (a changed dtype or device, another shape) is a
    new key and is checked again before any launch. `key` is None (always check) when an argument
    is neither a tensor nor None. Bounded: forgets everything past `maxsize` keys."""

    def __init__(self, maxsize: int = 512):
        self._seen: set = set()
        self._maxsize = maxsize

    @staticmethod
    def key(*tensors, extra=()) -> tuple | None:
        parts = []
        for t in tensors:
            if t is None:
                parts.append(None)
            elif isinstance(t, torch.Tensor):
                parts.append((t.shape, t.dtype, t.device))
            else:
                return None
        return (*parts, *extra)

    def seen(self, key) -> bool:
        return key is not None and key in self._seen

    def add(self, key) -> None:
        if key is None:
            return
        if len(self._seen) >= self._maxsize:
            self._seen.clear()
        self._seen.add(key)

    def check(self, compiling: bool, validate, *tensors, extra=()) -> None:
        """Run `validate()` unless arguments with this signature already passed it; always when
        `compiling` (the trace is checked once anyway, and keys of fake tensors mean nothing)."""
        key = None if compiling else self.key(*tensors, extra=extra)
        if not self.seen(key):
            validate()
            self.add(key)


def check_p(op: str, p) -> float:
    """`dropout_p` as a float in [0, 1), checked whether or not the call trains (as F.dropout)."""
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
        raise ValueError(f"{op}: dropout p must be in [0, 1), got {p!r}")
    return float(p)


def check_dropout(op: str, p: float, seed, like: torch.Tensor, like_name: str = "x") -> None:
    """ValueError unless p is in [0, 1) and, when p > 0, `seed` is a one-element int64 tensor on
    `like`'s device (the Philox seed the masks are regenerated from)."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"{op}: dropout p must be in [0, 1), got {p}")
    if p > 0.0:
        if not isinstance(seed, torch.Tensor) or seed.dtype != torch.int64 or seed.numel() != 1:
            raise ValueError(f"{op}: dropout p = {p} needs an int64 seed tensor with one element, "
                             f"got {describe(seed) if isinstance(seed, torch.Tensor) else seed!r}")
        if seed.device != like.device:
            raise ValueError(f"{op}: device mismatch: seed is on {seed.device} but {like_name} is on {like.device}")


def rows_of(x: torch.Tensor) -> torch.Tensor:
    """x [..., D] as a contiguous [M, D] view (a copy only when x is not contiguous)."""
    return x.reshape(-1, x.shape[-1]) if x.is_contiguous() else x.contiguous().view(-1, x.shape[-1])


def flat(x: torch.Tensor) -> torch.Tensor:
    """x [..., D] as the kernels read it: contiguous rows of D (x itself when contiguous: a kernel
    indexes [M, D] rows by pointer, so no reshape is needed)."""
    return x if x.is_contiguous() else x.contiguous()


def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


# Launcher helpers shared by the kernel families.
_CONSTANTS: dict[tuple, torch.Tensor] = {}


def _constant(kind: str, device, dtype, n: int = 1) -> torch.Tensor:
    """A cached zero tensor of n elements per (kind, device, dtype, n): allocated once and only
    ever read (by kernels that ignore it or read it as zeros), so no per-call allocation."""
    key = (kind, device, dtype, n)
    t = _CONSTANTS.get(key)
    if t is None:
        t = _CONSTANTS[key] = torch.zeros(n, dtype=dtype, device=device)
    return t


def zeros_const(n: int, device, dtype) -> torch.Tensor:
    """A cached, read-only [n] zero vector (an absent bias the kernel reads)."""
    return _constant("zeros", device, dtype, n)


def dummy(device, dtype=torch.float32) -> torch.Tensor:
    """A one-element stand-in for a pointer argument the kernel does not read (cached)."""
    return _constant("dummy", device, dtype)


def seed_or_zero(seed, p: float, device) -> torch.Tensor:
    """The int64 [1] dropout seed the kernels read (a cached zero seed when p == 0: never used)."""
    return seed.reshape(1) if p > 0.0 else _constant("seed", device, torch.int64)


_SPLIT_WS: dict = {}


def split_workspace(device: torch.device, partials: int, counters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scratch of a row-split column reduction that is finished in the same launch (`last_split`):
    (fp32 [>= partials] partial sums, int32 [>= counters] arrival counters, all zero). Cached per
    device and CUDA stream, so no per-call allocation: launches on one stream run in order and
    every launch leaves its counters at zero again (the last program of a column block resets
    its counter). Grown (reallocated) when a launch needs more."""
    key = (device, torch._C._cuda_getCurrentRawStream(device.index) if device.type == "cuda" else 0)
    ws = _SPLIT_WS.get(key)
    if ws is None or ws[0].numel() < partials or ws[1].numel() < counters:
        have_p, have_c = (0, 0) if ws is None else (ws[0].numel(), ws[1].numel())
        ws = _SPLIT_WS[key] = (torch.empty(max(partials, have_p), dtype=torch.float32, device=device),
                               torch.zeros(max(counters, have_c), dtype=torch.int32, device=device))
    return ws


def with_tf32_variants(specs: list, ieee_only=lambda constexprs: False) -> list:
    """AOT specs (kernels/aot.py) plus, for every fp32 spec with a PREC constexpr ("ieee"), the same
    spec with PREC="tf32": the two `input_precision`s `dot_precision` can pick (except where
    `ieee_only(constexprs)`: launchers that always pass "ieee")."""
    out = list(specs)
    for name, fn, sig, constexprs, cfg, dt in specs:
        if dt == str(torch.float32) and constexprs.get("PREC") == "ieee" and not ieee_only(constexprs):
            out.append((name, fn, sig, {**constexprs, "PREC": "tf32"}, cfg, dt))
    return out


def dot_precision(dtype: torch.dtype, device) -> str:
    """`input_precision` of the fp32 `tl.dot`s, following torch's own fp32 matmul setting as
    cuBLAS does: "tf32" when `torch.backends.cuda.matmul.allow_tf32` is on (or
    `torch.set_float32_matmul_precision` is "high"/"medium") and the tensors are on a GPU,
    "ieee" otherwise (and for fp16/bf16 inputs, where it has no effect)."""
    if dtype != torch.float32 or (device if isinstance(device, torch.device) else torch.device(device)).type != "cuda":
        return "ieee"
    if torch.backends.cuda.matmul.allow_tf32 or torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


def inv_keep(p: float) -> float:
    """1 / (1 - p), the scale of the kept elements (1.0 without dropout)."""
    return 1.0 / (1.0 - p) if p > 0.0 else 1.0


def row_splits(m: int, block_m: int, n_col_blocks: int, device: torch.device) -> int:
    """Row splits S of a column-reduction (weight-grad) kernel: about 4 programs per SM in total
    on a GPU, 2 per column block under the interpreter (still exercising the strided row loop)."""
    if _gpu_grid(device):
        target = 4 * _sm_count(device)
    else:
        target = 2 * n_col_blocks
    return max(1, min(cdiv(m, block_m), cdiv(target, n_col_blocks)))


#: CUDA's limit on grid axes 1 and 2: the most images a per-row kernel with its image axis there
#: takes in one launch (a mixed multi-task batch, fastpeft/ops/_rows.py)
MAX_GRID_YZ = 65535

#: programs a launch should have at least on a GPU: one wave of an H100's 132 SMs (one program
#: per SM; the tiles here are sized for about one resident program per SM)
MIN_PROGRAMS_GPU = 132


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":  # meta tensors: the shapes a GPU launch would get (kernels/aot.py)
        return MIN_PROGRAMS_GPU
    n = _SMS.get(device.index)
    if n is None:
        n = _SMS[device.index] = torch.cuda.get_device_properties(device).multi_processor_count
    return n


def _gpu_grid(device: torch.device) -> bool:
    """Whether grids are sized for a GPU: CUDA tensors, and meta ones (kernels/aot.py's report of
    the programs per launch at the bench shapes); CPU tensors take the interpreter's small grids."""
    return device.type != "cpu"


_SMS: dict = {}


def column_splits(width: int, block_n: int, row_blocks: int, device: torch.device) -> tuple[int, int]:
    """(columns per split, splits) of a row-tiled kernel whose output width can be divided among
    programs along grid axis 1: on a GPU enough splits for the grid to reach one wave
    (`row_blocks * splits >= SMs`, at most one BLOCK_N chunk per split); under the interpreter 2
    when the width has two chunks (exercising the split path); 1 otherwise."""
    chunks = cdiv(width, block_n)
    if _gpu_grid(device):
        want = cdiv(max(_sm_count(device), MIN_PROGRAMS_GPU), row_blocks)
    else:
        want = 2
    per = cdiv(chunks, max(1, min(want, chunks)))
    return per * block_n, cdiv(chunks, per)


# ----------------------------------------------------------------------------------------------
# Triton pieces shared by the rank-r kernel families (adapter, lowrank, convpass). `triton.jit`
# helpers are inlined into each calling kernel, so the compiled kernels are the same.
# ----------------------------------------------------------------------------------------------
@triton.jit
def keep_scale(seed_ptr, rows64, cols, width, p, inv_keep):
    """Dropout multiplier keep/(1-p) of elements (row, col) of a [*, width] tensor: Philox
    tl.rand(seed, row * width + col), bit-exact with `adapter.dropout_keep_mask` in torch."""
    seed = tl.load(seed_ptr)
    u = tl.rand(seed, rows64[:, None] * width + cols[None, :])
    return tl.where(u >= p, inv_keep, 0.0)


@triton.jit
def row_rank_tile(M, R, BLOCK_M: tl.constexpr, R_PAD: tl.constexpr):
    """This program's BLOCK_M rows and the padded rank columns of a one-axis row grid:
    (pid, rows64, rmask, rk, kmask)."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    rows64 = rows.to(tl.int64)
    rk = tl.arange(0, R_PAD)
    kmask = rk < R
    return pid, rows64, rmask, rk, kmask


@triton.jit
def rank_down(X, P, stride_pr, stride_pk, rows64, rmask, rk, kmask, D, SEED, p, inv_keep,
              IN_DROP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, R_PAD: tl.constexpr,
              PREC: tl.constexpr):
    """fp32 [BLOCK_M, R_PAD] = drop(X[rows, :D]) @ P^T with D streamed in BLOCK_K chunks; X is
    [M, D] contiguous, P[r, k] sits at r * stride_pr + k * stride_pk. Padded rank columns stay
    exactly 0. IN_DROP drops X's elements (offsets row * D + col)."""
    return rank_down_range(X, P, stride_pr, stride_pk, rows64, rmask, rk, kmask, D, 0, D, SEED, p, inv_keep,
                           IN_DROP, BLOCK_M, BLOCK_K, R_PAD, PREC)


@triton.jit
def rank_down_range(X, P, stride_pr, stride_pk, rows64, rmask, rk, kmask, D, K0, K_END, SEED, p, inv_keep,
                    IN_DROP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, R_PAD: tl.constexpr,
                    PREC: tl.constexpr):
    """`rank_down` over the columns K0:K_END only (one split of a split-K grid)."""
    acc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for k0 in range(K0, K_END, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        cmask = cols < K_END
        x = tl.load(X + rows64[:, None] * D + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
        if IN_DROP:
            x = (x.to(tl.float32) * keep_scale(SEED, rows64, cols, D, p, inv_keep)).to(X.dtype.element_ty)
        pt = tl.load(P + rk[None, :] * stride_pr + cols[:, None] * stride_pk,
                     mask=kmask[None, :] & cmask[:, None], other=0.0)
        acc = tl.dot(x, pt, acc, input_precision=PREC)
    return acc


@triton.jit
def rank_down_t(G, WT, rows64, rmask, rk, kmask, D, R, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                R_PAD: tl.constexpr, PREC: tl.constexpr):
    """fp32 [BLOCK_M, R_PAD] = G[rows, :D] @ WT with WT [D, R] contiguous (the up weight: dh = g W_u
    in the backward), D streamed in BLOCK_N chunks. `rank_down` with P = WT^T computes the same,
    but its address and mask order changed the backward kernels' register allocation
    (kernels/aot.py), so this keeps the loop those kernels were tuned with."""
    return rank_down_t_range(G, WT, rows64, rmask, rk, kmask, D, 0, D, R, BLOCK_M, BLOCK_N, R_PAD, PREC)


@triton.jit
def rank_down_t_range(G, WT, rows64, rmask, rk, kmask, D, N0, N_END, R, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, R_PAD: tl.constexpr, PREC: tl.constexpr):
    """`rank_down_t` over the columns N0:N_END of G only (one split of a split-K grid)."""
    acc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for n0 in range(N0, N_END, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        cmask = cols < N_END
        g = tl.load(G + rows64[:, None] * D + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
        wt = tl.load(WT + cols[:, None] * R + rk[None, :], mask=cmask[:, None] & kmask[None, :], other=0.0)
        acc = tl.dot(g, wt, acc, input_precision=PREC)
    return acc


@triton.jit
def rank_up_store(OUT, da, WD, rows64, rmask, rk, kmask, D, N0, N_END, BLOCK_N: tl.constexpr, PREC: tl.constexpr):
    """OUT[rows, N0:N_END] = da [BLOCK_M, R_PAD] @ WD[:, N0:N_END] (WD [R, D] contiguous, OUT rows
    of D), one BLOCK_N chunk at a time (N0, N_END = 0, D: the whole width)."""
    for n0 in range(N0, N_END, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        cmask = cols < N_END
        wd = tl.load(WD + rk[:, None] * D + cols[None, :], mask=kmask[:, None] & cmask[None, :], other=0.0)
        dx = tl.dot(da, wd, input_precision=PREC)
        tl.store(OUT + rows64[:, None] * D + cols[None, :], dx.to(OUT.dtype.element_ty),
                 mask=rmask[:, None] & cmask[None, :])


@triton.jit
def last_split(LOCK, idx, S):
    """Called by each of the S row-split programs of column block `idx` once its partials are
    stored: True in the program that arrives last, which then sums all S partials in a fixed order
    (deterministic, whichever program is last; its loads of the others' partials bypass L1:
    `cache_modifier=".cg"`) and must reset LOCK[idx] to 0 (`tl.atomic_xchg`). The barrier makes
    every thread's stores precede the counter's acq_rel increment."""
    tl.debug_barrier()
    return tl.atomic_add(LOCK + idx, 1) == S - 1


@triton.jit
def finish_row_splits(acc, PS, LOCK, pid, pid_k, S, M, rows64, rmask, rk, R_PAD: tl.constexpr):
    """A [BLOCK_M, R_PAD] row tile whose D reduction was split over S programs (grid axis 1):
    each stores its partial `acc` in PS [S, M, R_PAD]; the last to arrive (`last_split`) sums
    them in split order and resets the lock. Returns (the full sum where `last`, last); with S = 1
    the tile is already whole."""
    last = S == 1
    if S > 1:
        poffs = rows64[:, None] * R_PAD + rk[None, :]
        tl.store(PS + pid_k.to(tl.int64) * M * R_PAD + poffs, acc, mask=rmask[:, None])
        last = last_split(LOCK, pid, S)
        if last:
            acc = tl.zeros(acc.shape, dtype=tl.float32)
            for i in range(0, S):
                acc += tl.load(PS + i * M * R_PAD + poffs, mask=rmask[:, None], other=0.0, cache_modifier=".cg")
            tl.atomic_xchg(LOCK + pid, 0)
    return acc, last


@triton.jit
def split_sums(PS, S, D, cols, cmask, BLOCK: tl.constexpr):
    """(Σ_i PS[i, cols], Σ_i PS[S + i, cols]) over the S splits, in split order (fp32): the two
    column sums of a [2, S, D] partial buffer, read at L2 (written by other programs)."""
    s1 = tl.zeros((BLOCK,), dtype=tl.float32)
    s0 = tl.zeros((BLOCK,), dtype=tl.float32)
    for i in range(0, S):
        s1 += tl.load(PS + i * D + cols, mask=cmask, other=0.0, cache_modifier=".cg")
        s0 += tl.load(PS + (S + i) * D + cols, mask=cmask, other=0.0, cache_modifier=".cg")
    return s1, s0
