"""
Fused attention for Hopper: softmax(Q K^T / sqrt(d)) V over (B, L, heads, head_dim) tensors, with a
per-sample number of valid keys, forward and backward.

    from attention_cuda import attention, kernel_available
    o = attention(q, k, v)                              # (B, Lq, H, D), non-causal
    o = attention(q, k, v, kv_lens=[n_img + 40, n_img + 90])

kv_lens[b] = n: in sample b, keys and values at positions >= n are skipped (the kernel never reads them;
the fallback zeroes them before the product), so padding cannot leak into any output, and their
gradients are zero. Every query row, padded or not, attends to the n valid keys and gets a finite
output. n must lie in [1, Lk]: with no valid key the softmax is undefined, so 0 is an error. Lq may
differ from Lk (cross-attention shapes work too).

On CUDA tensors in bf16/fp16 with head_dim 64 or 128 a CUDA kernel runs, built on first use by
torch.utils.cpp_extension.load (ninja; cached in attention_cuda/build/): on Hopper (compute capability
9.0) version 2.1 (hopper.cu: wgmma, TMA, warp-specialised), on any other GPU from sm_80 on version 1.2
(portable.cu: mma.sync); last_kernels() says which ran. Everywhere else (CPU tensors, fp32/fp64, no GPU,
a build that failed, or ATTENTION_CUDA=0 in the environment) the same call goes through torch's
scaled_dot_product_attention with a boolean key mask: the same function, autograd included.

Sliding-tile attention (STA, Zhang et al. 2025, arXiv 2502.04507), for sampling:

    slot, n_slots = sta_layout((T, H, W))   # raster token i of a T x H x W latent grid -> position slot[i]
    o = attention(q, k, v, kv_lens, sparse=((T, H, W), windows))   # windows: one (t, h, w) per head

The first n_slots rows of q, k, v are the image tokens in tile order (sta_layout; slots of edge tiles past
the grid are padding, never keys, and their output rows are any finite values), the rest text. An image
query attends to the image keys of the tiles in its head's window and to every valid text key; a text
query to every valid key. On Hopper the kernel visits only those key tiles (forward only); elsewhere the
same mask runs through SDPA, tile by tile.
"""

import functools
import math
import operator
import os
import sys
import warnings

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = [os.path.join(HERE, f) for f in ("binding.cpp", "portable.cu", "hopper.cu")]
# sm_90a for the H100/H200 (wgmma and setmaxnreg exist only there), sm_80 machine code plus compute_80 PTX
# so any other GPU from Ampere on runs the portable kernel. --threads 0: nvcc compiles the three targets
# of one file in parallel.
NVCC_FLAGS = ["-O3", "-lineinfo", "--threads", "0",
              "-gencode=arch=compute_90a,code=sm_90a",
              "-gencode=arch=compute_80,code=sm_80",
              "-gencode=arch=compute_80,code=compute_80"]
KERNEL_HEAD_DIMS = (64, 128)
# The STA tile (t, h, w) in latent tokens, the paper's 6 x 8 x 8 for HunyuanVideo: 384 tokens, three of
# the Hopper forward's 128-key tiles, so a query block of 128 rows lies inside one tile. hopper.cu has it too.
STA_TILE = (6, 8, 8)
STA_TILE_TOKENS = math.prod(STA_TILE)

_ext = None        # the loaded extension module
_available = None  # cached answer of kernel_available()


# -----------------------------------------------------------------------------
# Building and loading the extension

def build(verbose=False):
    """JIT-build (or load the cached build of) the extension and return the module. Needs nvcc and a CUDA
    build of torch; raises on failure."""
    from torch.utils.cpp_extension import load
    build_dir = os.path.join(HERE, "build")
    try:
        os.makedirs(build_dir, exist_ok=True)
    except OSError:  # a read-only checkout: torch's default cache (~/.cache/torch_extensions)
        build_dir = None
    if not verbose and not (build_dir and os.path.exists(os.path.join(build_dir, "attention_cuda_ext.so"))):
        print("attention_cuda: compiling the CUDA extension (first use: a minute or two; then cached)",
              file=sys.stderr, flush=True)
    return load(name="attention_cuda_ext", sources=SOURCES, extra_cflags=["-O3"],
                extra_cuda_cflags=NVCC_FLAGS, build_directory=build_dir, verbose=verbose)


def last_kernels():
    """(forward, backward): the kernel versions the extension's last calls launched ("1.2", or "2.1 ws":
    version 2.1, warp-specialised; "" before the first), or None where it is not loaded. Version 2.1 falls
    back to 1.2 silently where the driver refuses a tensor map (odd strides): this says what ran."""
    return tuple(_ext.last_kernels()) if _ext is not None else None


def kernel_available():
    """True when the CUDA kernel can run here: a GPU from sm_80 on, a CUDA build of torch, and the
    extension built. Decided once and cached; on a CPU-only machine it returns False at once, compiling
    nothing."""
    global _ext, _available
    if _available is None:
        _available = False
        if (os.environ.get("ATTENTION_CUDA", "1") != "0" and torch.version.cuda is not None
                and torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)):
            try:
                _ext = build()
                _available = True
            except Exception as e:  # no nvcc, a compile error: say so once, then use SDPA
                warnings.warn(f"attention_cuda: the CUDA kernel did not build ({type(e).__name__}: "
                              f"{str(e).strip().splitlines()[-1] if str(e).strip() else ''}); "
                              "using torch SDPA. Run `python attention_cuda/build.py` to see the log.")
    return _available


# -----------------------------------------------------------------------------
# Input checks (errors a caller can cause, one line each)

def _check(q, k, v, kv_lens, sparse=None):
    """Validate shapes; return kv_lens as a tuple of python ints, or None when no key is padded."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.ndim != 4:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"attention: {name} must be a 4-d tensor (B, L, heads, head_dim), got {shape}; "
                             "reshape it (e.g. x.unflatten(-1, (heads, head_dim)))")
    if k.shape != v.shape:
        raise ValueError(f"attention: k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    if q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"attention: q {tuple(q.shape)} and k {tuple(k.shape)} must agree in batch, heads "
                         "and head_dim (only the sequence length may differ)")
    if not (q.dtype == k.dtype == v.dtype) or not (q.device == k.device == v.device):
        raise ValueError(f"attention: q, k, v must share dtype and device, got {q.dtype}/{k.dtype}/{v.dtype} "
                         f"on {q.device}/{k.device}/{v.device}; cast them with .to()")
    B, Lk = k.shape[0], k.shape[1]
    if Lk == 0:
        raise ValueError("attention: k and v have no keys (Lk = 0), so the softmax is undefined; "
                         "skip the call")
    if sparse is not None:
        _check_sparse(q, k, kv_lens, sparse)
    if kv_lens is None:
        return None
    if isinstance(kv_lens, torch.Tensor):
        if kv_lens.shape != (B,) or kv_lens.is_floating_point() or kv_lens.is_complex():
            raise ValueError(f"attention: kv_lens must be an integer tensor of shape ({B},), got "
                             f"{kv_lens.dtype} {tuple(kv_lens.shape)}; pass one key count per sample")
        kv_lens = kv_lens.tolist()
    try:
        lens = tuple(operator.index(n) for n in kv_lens)  # python or numpy ints, not floats
    except TypeError:
        lens = None
    if lens is None or len(lens) != B:
        raise ValueError(f"attention: kv_lens must hold {B} ints (one per sample), got {kv_lens!r}")
    bad = [n for n in lens if not 1 <= n <= Lk]
    if bad:
        raise ValueError(f"attention: kv_lens must lie in [1, Lk={Lk}], got {bad[0]}; a sample with no valid "
                         "key has no softmax: drop it from the batch instead")
    if sparse is not None and min(lens) < sta_layout(tuple(sparse[0]))[1]:
        raise ValueError(f"attention: with sparse, kv_lens must cover the {sta_layout(tuple(sparse[0]))[1]} "
                         f"image slots, got {min(lens)}; only text keys may be padded")
    return None if all(n == Lk for n in lens) else lens


def _check_sparse(q, k, kv_lens, sparse):
    """sparse = ((T, H, W), one (t, h, w) per head), over a self-attention led by the grid's slots."""
    try:
        grid, windows = sparse
        grid, windows = tuple(map(int, grid)), tuple(tuple(map(int, w)) for w in windows)
        ok = len(grid) == 3 and min(grid) >= 1 and all(len(w) == 3 and min(w) >= 1 for w in windows)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"attention: sparse must be ((T, H, W), windows) with one (t, h, w) window of "
                         f"positive ints per head, got {sparse!r}")
    if len(windows) != q.shape[2]:
        raise ValueError(f"attention: sparse has {len(windows)} windows for {q.shape[2]} heads; "
                         "give one (t, h, w) per head")
    if q.shape[1] != k.shape[1] or q.shape[1] < sta_layout(grid)[1]:
        raise ValueError(f"attention: sparse needs self-attention over the {sta_layout(grid)[1]} "
                         f"tile-ordered image slots of grid {grid} then text, got Lq {q.shape[1]}, "
                         f"Lk {k.shape[1]}")


# -----------------------------------------------------------------------------
# The fallback: torch SDPA with a boolean key mask

def _sdpa(q, k, v, lens):
    """(B, Lq, H, D) in and out. Padded keys and values are zeroed before the product (not only masked),
    so a NaN in the padding cannot reach an output through 0 * NaN, as in the kernel, which never reads
    them; their gradients come out zero."""
    mask = None
    if lens is not None:
        lens_t = torch.tensor(lens, device=k.device)
        keep = torch.arange(k.shape[1], device=k.device) < lens_t[:, None]  # (B, Lk)
        k = k.masked_fill(~keep[:, :, None, None], 0)
        v = v.masked_fill(~keep[:, :, None, None], 0)
        mask = keep[:, None, None, :]  # (B, 1, 1, Lk), broadcast over heads and queries
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       attn_mask=mask)
    return o.transpose(1, 2)  # (B, Lq, H, D)


# -----------------------------------------------------------------------------
# Sliding-tile attention: the token layout, the windows, and the fallback

@functools.lru_cache(maxsize=8)
def sta_layout(grid, device=None):
    """(slot, n_slots): slot[i] is where raster token i (t slowest, w fastest) of a T x H x W latent grid
    goes in tile order; n_slots = 384 x the tiles that cover the grid. Tiles come in raster order of the
    tile grid, and inside a tile its tokens in raster order; an edge tile cut by the grid keeps its tokens
    first, and its remaining slots are padding, never keys."""
    T, H, W = grid
    tt, th, tw = STA_TILE
    t, h, w = (x.flatten() for x in torch.meshgrid(torch.arange(T), torch.arange(H), torch.arange(W),
                                                    indexing="ij"))
    nt, nh, nw = -(-T // tt), -(-H // th), -(-W // tw)
    tile = ((t // tt) * nh + h // th) * nw + w // tw
    eh = (H - h // th * th).clamp(max=th)  # the tile's extent in h and w (smaller at the grid's edge)
    ew = (W - w // tw * tw).clamp(max=tw)
    slot = tile * STA_TILE_TOKENS + ((t % tt) * eh + h % th) * ew + w % tw
    return slot.to(device), nt * nh * nw * STA_TILE_TOKENS


def sta_window(tile, tiles, window):
    """The key tiles' index ranges [lo, hi] per axis for query tile coordinates `tile` in a tile grid of
    `tiles`: a window of w tiles covers 2 (w // 2) + 1, centred on the query's tile and shifted, not cut,
    at the grid's edge (FastVideo's reference mask, csrc/sliding_tile_attention/test/flex_sta_ref.py)."""
    out = []
    for c, n, w in zip(tile, tiles, window):
        centre = min(max(c, w // 2), n - 1 - w // 2)
        out.append((max(centre - w // 2, 0), min(centre + w // 2, n - 1)))
    return out


def _sta_sdpa(q, k, v, lens, grid, windows):
    """The fallback for sparse: (B, L, H, D) in and out. Per query tile and distinct window, SDPA over the
    keys of the window's tiles and the text, padding slots and padded text masked (and zeroed, as _sdpa
    does); text queries over every valid key."""
    B, L, H, D = q.shape
    slot, n_slots = sta_layout(grid, q.device)
    keep = torch.zeros(B, L, dtype=torch.bool, device=q.device)
    keep[:, slot] = True
    keep[:, n_slots:] = True
    if lens is not None:
        keep &= torch.arange(L, device=q.device) < torch.tensor(lens, device=q.device)[:, None]
    k = k.masked_fill(~keep[:, :, None, None], 0)
    v = v.masked_fill(~keep[:, :, None, None], 0)

    def sdpa(qq, kk, vv, mask):  # (B, l, h, D) -> (B, l, h, D)
        o = F.scaled_dot_product_attention(qq.transpose(1, 2), kk.transpose(1, 2), vv.transpose(1, 2),
                                           attn_mask=mask[:, None, None, :])
        return o.transpose(1, 2)

    out = torch.empty_like(q)
    out[:, n_slots:] = sdpa(q[:, n_slots:], k, v, keep)
    tiles = [-(-g // s) for g, s in zip(grid, STA_TILE)]
    text = torch.arange(n_slots, L, device=q.device)
    S = STA_TILE_TOKENS
    for w in sorted(set(windows)):
        heads = [i for i, wi in enumerate(windows) if wi == w]
        for c in range(n_slots // S):
            (t0, t1), (h0, h1), (w0, w1) = sta_window(
                (c // (tiles[1] * tiles[2]), c // tiles[2] % tiles[1], c % tiles[2]), tiles, w)
            idx = torch.cat([torch.arange(((t * tiles[1] + h) * tiles[2] + w0) * S,
                                          ((t * tiles[1] + h) * tiles[2] + w1 + 1) * S, device=q.device)
                             for t in range(t0, t1 + 1) for h in range(h0, h1 + 1)] + [text])
            rows = slice(c * S, (c + 1) * S)
            kk, vv = k[:, idx][:, :, heads], v[:, idx][:, :, heads]
            out[:, rows, heads] = sdpa(q[:, rows][:, :, heads], kk, vv, keep[:, idx])
    return out


# -----------------------------------------------------------------------------
# The kernel path

def _aligned(x):
    """The kernel reads rows with 16-byte loads: the last dim must be contiguous and every row start
    16-byte aligned. Anything else is copied once (clone: .contiguous() would keep a misaligned view)."""
    ok = (x.stride(-1) == 1 and x.data_ptr() % 16 == 0
          and all(s % 8 == 0 or n == 1  # a size-1 dim's stride is never used
                  for s, n in zip(x.stride()[:3], x.shape[:3])))
    return x if ok else x.clone(memory_format=torch.contiguous_format)


def use_hopper_kernel(device):
    """Version 2.1 on compute capability 9.0 (its sm_90a code runs nowhere else), version 1.2 elsewhere.
    Tests replace this function to run version 1.2 on a Hopper GPU too."""
    return torch.cuda.get_device_capability(device) == (9, 0)


@functools.lru_cache(maxsize=64)
def _lens_tensor(lens, B, Lk, device):
    """kv_lens as an int32 device tensor; cached so a model that passes the same lengths to every block
    copies them to the GPU once."""
    return torch.tensor(lens if lens is not None else [Lk] * B, dtype=torch.int32, device=device)


@functools.lru_cache(maxsize=256)
def _windows_tensor(windows, device):
    """The per-head windows as an (H, 3) int32 device tensor, cached per layer's windows like _lens_tensor."""
    return torch.tensor(windows, dtype=torch.int32, device=device)


class FusedAttention(torch.autograd.Function):
    """Forward saves the per-row log-sum-exp (log2 units, scaled scores); backward recomputes P from it."""

    @staticmethod
    def forward(ctx, q, k, v, lens_t, hopper, windows_t=None, grid=()):
        with torch.cuda.device(q.device):
            stream = torch.cuda.current_stream().cuda_stream
            if windows_t is None:
                o, lse = _ext.forward(q, k, v, lens_t, stream, hopper)
            else:
                o, lse = _ext.forward_sparse(q, k, v, lens_t, stream, windows_t, list(grid))
        ctx.save_for_backward(q, k, v, o, lse, lens_t)
        ctx.hopper, ctx.sparse = hopper, windows_t is not None
        return o

    @staticmethod
    @once_differentiable  # the backward kernels are not themselves differentiable
    def backward(ctx, do):
        if ctx.sparse:
            raise RuntimeError("attention_cuda: the sliding-tile kernel is forward-only (sampling); for "
                               "gradients call attention() with sparse=None, or on CPU tensors")
        q, k, v, o, lse, lens_t = ctx.saved_tensors
        with torch.cuda.device(q.device):
            stream = torch.cuda.current_stream().cuda_stream
            dq, dk, dv = _ext.backward(q, k, v, o, lse, _aligned(do), lens_t, stream, ctx.hopper)
        return dq, dk, dv, None, None, None, None


# -----------------------------------------------------------------------------

def attention(q, k, v, kv_lens=None, sparse=None):
    """softmax(q k^T / sqrt(head_dim)) v, non-causal. q (B, Lq, H, D), k and v (B, Lk, H, D), kv_lens None
    or (B,) ints in [1, Lk] (list, tuple or tensor; a python list costs no device sync). sparse None, or
    ((T, H, W), windows): sliding-tile attention (the module docstring). Returns (B, Lq, H, D) in q's
    dtype."""
    lens = _check(q, k, v, kv_lens, sparse)
    # the kernel covers bf16/fp16 with the head sizes HunyuanVideo uses; anything else (tiny test configs,
    # fp32) takes SDPA with the same semantics
    use_kernel = (q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and q.numel() > 0
                  and q.shape[-1] in KERNEL_HEAD_DIMS)
    if sparse is not None:
        grid, windows = tuple(map(int, sparse[0])), tuple(tuple(map(int, w)) for w in sparse[1])
        # only version 2.1 skips key tiles; any other GPU (or dtype) gets the masked SDPA path
        if use_kernel and kernel_available() and use_hopper_kernel(q.device):
            lens_t = _lens_tensor(lens, k.shape[0], k.shape[1], q.device)
            windows_t = _windows_tensor(windows, q.device)
            return FusedAttention.apply(_aligned(q), _aligned(k), _aligned(v), lens_t, True, windows_t, grid)
        return _sta_sdpa(q, k, v, lens, grid, windows)
    if use_kernel and kernel_available():
        B, Lk = k.shape[:2]
        lens_t = _lens_tensor(lens, B, Lk, q.device)
        hopper = use_hopper_kernel(q.device)
        return FusedAttention.apply(_aligned(q), _aligned(k), _aligned(v), lens_t, hopper)
    return _sdpa(q, k, v, lens)

