"""
The HunyuanVideo diffusion transformer (paper §4.2, official `hyvideo/modules/models.py`).

A latent video (B, 16, T', H', W') is cut into 1x2x2 patches, runs through 20 dual-stream blocks (image and
text tokens keep their own weights but attend jointly) and 40 single-stream blocks (one fused sequence),
and comes out as a flow-matching velocity of the same shape. Every module name below is the official
state-dict key, so the released `mp_rank_00_model_states.pt` loads with strict=True.

Numerics follow the official bf16 + autocast run: LayerNorm, the (1 + scale) modulation on its output,
RMSNorm's normalisation and RoPE are computed in fp32; matmuls, attention and the residual stream are in
the weights' dtype. With fp32 weights everything is fp32.

Read top to bottom: config and presets; norms, modulation and 3D RoPE; embedders; attention; the token
refiner; the dual- and single-stream blocks (paper §4.2, "dual-stream to single-stream", after FLUX); the
model; then the machinery around it: sequence-parallel attention, the diffusers key conversion, loading and
saving, and the official fp8 checkpoint.
"""

import functools
import inspect
import json
import math
import os
import re
from dataclasses import asdict, dataclass, replace  # noqa: F401  (replace: dit.replace(cfg, ...))

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint


@dataclass
class DiTConfig:
    """The DiT's shape; defaults are the released 13B (paper Table 2, official HUNYUAN_VIDEO_CONFIG)."""
    in_channels: int = 16             # VAE latent channels
    out_channels: int = 16
    patch_size: tuple = (1, 2, 2)     # (t, h, w)
    hidden_size: int = 3072
    num_heads: int = 24               # head dim 128
    mlp_ratio: float = 4.0
    depth_double: int = 20            # dual-stream blocks
    depth_single: int = 40            # single-stream blocks
    refiner_depth: int = 2            # token-refiner blocks (hard-coded 2 in the official code)
    text_dim: int = 4096              # LLM hidden states
    pooled_dim: int = 768             # CLIP pooled output
    rope_axes: tuple = (16, 56, 56)   # (t, h, w) split of the head dim
    rope_theta: float = 256.0         # official CLI default --rope-theta 256, not 10000
    guidance_embed: bool = True       # the released weights are guidance-distilled
    qkv_bias: bool = True
    # image-to-video (HunyuanVideo-I2V, docs/i2v.md): None (text-to-video); "token_replace" (the image's
    # latent is frame 0 of x, whose tokens are modulated as at t = 0); "latent_concat" (the first I2V
    # release: x = [noisy latent ; image latent ; mask] on the channels, in_channels = 2 * 16 + 1)
    image_condition_type: str = None

    def __post_init__(self):
        self.patch_size, self.rope_axes = tuple(self.patch_size), tuple(self.rope_axes)
        head_dim, rem = divmod(self.hidden_size, self.num_heads)
        if rem or sum(self.rope_axes) != head_dim or any(a % 2 for a in self.rope_axes):
            raise ValueError(f"DiTConfig: hidden_size/num_heads = {self.hidden_size}/{self.num_heads} must "
                             f"give a head dim equal to sum(rope_axes)={sum(self.rope_axes)}, each axis even")
        if self.image_condition_type not in (None, "token_replace", "latent_concat"):
            raise ValueError(f"DiTConfig: image_condition_type {self.image_condition_type!r}: use None, "
                             f"'token_replace' or 'latent_concat'")
        if self.image_condition_type == "latent_concat" and self.in_channels != 2 * self.out_channels + 1:
            raise ValueError(f"DiTConfig: latent_concat takes in_channels = 2 * out_channels + 1 (noisy "
                             f"latent, image latent, mask), got {self.in_channels}")


CONFIGS = {
    "13b": DiTConfig(),  # the released HYVideo-T/2-cfgdistill, 12,821,012,544 parameters
    # 1,344,137,280 parameters: same head dim and RoPE split, so recipes transfer; single-GPU training runs
    "1.3b": DiTConfig(hidden_size=1536, num_heads=12, depth_double=8, depth_single=16),
    # CPU tests and the embedded demo: seconds per step
    "tiny": DiTConfig(hidden_size=64, num_heads=2, depth_double=2, depth_single=2, text_dim=32,
                      pooled_dim=32, rope_axes=(8, 12, 12)),
}

# ----------------------------------------------------------------------------------------------------------
# Small pieces: norms, modulation, RoPE

def fp32(x):
    """Upcast to at least fp32 (float64 stays float64, for reference checks)."""
    return x if x.dtype == torch.float64 else x.float()


def layer_norm(x, eps=1e-6):
    """Affine-free LayerNorm in fp32 (official: bf16 model under autocast, where layer_norm runs in fp32)."""
    return F.layer_norm(fp32(x), x.shape[-1:], eps=eps)


def modulate(x, shift, scale, first=None):
    """adaLN: x * (1 + scale) + shift, broadcast over the sequence (official "1 + scale" convention).
    first = (n, shift0, scale0): the first n tokens take those instead (I2V token_replace: the image's
    frame)."""
    if first is not None:
        n, shift0, scale0 = first
        return torch.cat([modulate(x[:, :n], shift0, scale0), modulate(x[:, n:], shift, scale)], 1)
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def gated(x, gate, first=None):
    """gate * x per sample; first = (n, gate0): the first n tokens' gate (I2V token_replace)."""
    if first is not None:
        n, gate0 = first
        return torch.cat([gate0.unsqueeze(1) * x[:, :n], gate.unsqueeze(1) * x[:, n:]], 1)
    return gate.unsqueeze(1) * x


class RMSNorm(nn.Module):
    """q/k norm over the head dim: normalise in fp32, cast back, then scale (official norm_layers.py)."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = fp32(x)
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


# RIFLEx (arXiv 2502.15894; thu-ml/RIFLEx hunyuanvideo.py, riflex_utils.py): the released model repeats its
# video after one period of the temporal RoPE's 4th frequency theta^(-6/16), 50 latent frames (~200 frames).
# Lowering one temporal frequency so that a period covers the whole video fixes it; two rules pick which:
#   "paper": that intrinsic frequency, k = 4, once the video is longer than its period (sample.py --riflex);
#   "i2v":   the official image-to-video sampler's, on there by default (HunyuanVideo-I2V inference.py,
#            get_rotary_pos_embed): past 192 frames (49 latent frames), k = 2 + frames // 25 clipped to 4..8.
RIFLEX_K = 4  # the intrinsic frequency, counted from 1 as in the paper
RIFLEX_RULES = ("paper", "i2v")


def riflex_period(m, theta):
    """Latent frames in one period of the intrinsic frequency for a temporal sub-dim m (13B: 50)."""
    return round(2 * math.pi * theta ** (2 * (RIFLEX_K - 1) / m))


def riflex_k(rule, frames, m, theta):
    """The temporal frequency (counted from 1) a RIFLEx rule lowers for `frames` latent frames, or None."""
    k = None
    if rule == "paper" and frames > riflex_period(m, theta):
        k = RIFLEX_K
    elif rule == "i2v" and frames >= 49:  # 4 * 49 - 3 = 193 frames; official: 2 + (frames + 3) // 100
        k = min(8, max(4, 2 + frames // 25))
    return k if k is not None and k <= m // 2 else None


def rope_tables(grid, axes, theta, dtype=torch.float32, riflex=None):
    """3D RoPE (paper §4.2) cos/sin tables (L_img, head_dim), rows in token order (t slowest, w fastest);
    computed in fp32 like the official code (float64 only for reference checks).

    Positions are token indices per axis; each axis' sub-dim m gets m/2 frequencies theta^(-2k/m), and
    cos/sin are repeated x2 so they line up with adjacent (2i, 2i+1) pairs (official posemb_layers.py).
    riflex (None, "paper" or "i2v", see above): the chosen temporal frequency becomes 0.9 * 2 pi / frames,
    so one period covers the whole video (RIFLEx Eq. 8, with the official 0.9 margin).
    """
    cos, sin = [], []
    mesh = torch.meshgrid(*[torch.arange(n, dtype=dtype) for n in grid], indexing="ij")
    for axis, (pos, m) in enumerate(zip(mesh, axes)):
        freqs = 1.0 / theta ** (torch.arange(0, m, 2, dtype=dtype) / m)
        k = riflex_k(riflex, grid[0], m, theta) if axis == 0 else None
        if k is not None:
            freqs[k - 1] = 0.9 * 2 * math.pi / grid[0]
        ang = pos.reshape(-1, 1) * freqs  # (L, m/2)
        cos.append(ang.cos().repeat_interleave(2, dim=1))
        sin.append(ang.sin().repeat_interleave(2, dim=1))
    return torch.cat(cos, 1), torch.cat(sin, 1)


def apply_rope(x, cos, sin):
    """Rotate adjacent pairs (GPT-J style) of x (B, L, H, D) in fp32: (x0, x1) -> (x0 c - x1 s, x1 c + x0 s).
    """
    x32 = fp32(x)
    rot = torch.stack([-x32[..., 1::2], x32[..., 0::2]], dim=-1).flatten(-2)
    return (x32 * cos[:, None] + rot * sin[:, None]).to(x.dtype)


# ----------------------------------------------------------------------------------------------------------
# Embedders

def timestep_embedding(t, dim=256, max_period=10000, dtype=torch.float32):
    """Sinusoid of a float timestep, [cos | sin] (cos first, as the official embed_layers.py), in fp32. The
    frequencies are computed on the CPU and then moved, as there: the CPU's fp32 exp is not correctly rounded
    for 2 of the 128, so another device's may differ, and one bit can change a bf16 guidance embedding."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=dtype) / half).to(t.device)
    args = t.to(dtype)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    """t (0..1000, or guidance x 1000) -> sinusoid(256) -> Linear -> SiLU -> Linear."""

    def __init__(self, hidden):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(256, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t):
        w = self.mlp[0].weight
        return self.mlp(timestep_embedding(t, dtype=fp32(w).dtype).to(w.dtype))


class MLPEmbedder(nn.Module):
    """vector_in: CLIP pooled text -> Linear -> SiLU -> Linear (paper §4.2: added to the t-embedding)."""

    def __init__(self, in_dim, hidden):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden)
        self.out_layer = nn.Linear(hidden, hidden)

    def forward(self, x):
        return self.out_layer(F.silu(self.in_layer(x)))


class TextProjection(nn.Module):
    """The refiner's c_embedder: pooled LLM states -> Linear -> SiLU -> Linear."""

    def __init__(self, in_dim, hidden):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, hidden)
        self.linear_2 = nn.Linear(hidden, hidden)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


class PatchEmbed(nn.Module):
    """img_in: Conv3d with kernel = stride = patch, then (B, C, t, h, w) -> (B, t*h*w, C), w fastest."""

    def __init__(self, patch, in_ch, hidden):
        super().__init__()
        self.proj = nn.Conv3d(in_ch, hidden, kernel_size=patch, stride=patch)

    def forward(self, x):
        # contiguous: every block then sees (B, L, D) tensors of one layout. Compiled blocks (compile_blocks)
        # got wrong gradients in the next block when the first one's input was this transposed view
        # (PyTorch 2.13 inductor, CPU; tests/test_dit.py checks compiled against eager gradients).
        return self.proj(x).flatten(2).transpose(1, 2).contiguous()


class MLP(nn.Module):
    """fc1 -> activation -> fc2 (keys fc1/fc2 as in the official checkpoint)."""

    def __init__(self, dim, hidden, act):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), act, nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Modulation(nn.Module):
    """ModulateDiT: SiLU(vec) -> Linear(D, factor*D), applied inside each block (not once globally)."""

    def __init__(self, hidden, factor):
        super().__init__()
        self.linear = nn.Linear(hidden, factor * hidden)

    def forward(self, vec):
        return self.linear(F.silu(vec))


# ----------------------------------------------------------------------------------------------------------
# Attention: one function for the refiner and all 60 blocks

try:  # our fused kernel (attention_cuda/); without it every call goes through PyTorch's SDPA
    from attention_cuda import KERNEL_HEAD_DIMS, attention as fused_attention, kernel_available, sta_layout
except ImportError:
    fused_attention, kernel_available, KERNEL_HEAD_DIMS, sta_layout = None, (lambda: False), (), None

# Which attention runs on CUDA tensors. By default our kernel on Hopper (compute capability 9.0) where no
# gradient flows (sampling): its forward is the fastest we measured there. Elsewhere cuDNN through SDPA:
# where gradients flow (training) its backward beats our kernel's, and off Hopper it is the faster of the
# two (numbers in docs/performance.md). ATTENTION_CUDA=1: our kernel everywhere it is built; 0: never.
KERNEL_CHOICE = os.environ.get("ATTENTION_CUDA")

# Below this many mask entries (B * L * L) a batch with padding takes one masked call: cheaper than a call
# per sample for the short sequences of tests and small models; video lengths always split instead.
_DENSE_MASK_MAX = 1 << 22


@torch.compiler.disable  # a graph break for compile_blocks: the dispatch below branches on python ints
def attention(q, k, v, seg_lens=None, sp=None, sparse=None):  # (the text lengths), which would recompile
    """Joint attention over (B, L, H, D) tensors; returns (B, L, H*D).

    seg_lens[i] (a python int) reproduces the official flash-attn varlen call (official
    hyvideo/modules/attenion.py, get_cu_seqlens): in sample i, tokens [0, seg_lens[i]) (image + valid
    text) form one sequence and the padding tail [seg_lens[i], L) another; the two never see each other.
    So padding cannot touch image or valid-text outputs, and no dense L x L mask is needed: each segment
    is attended unmasked.

    sp = (process group, local image length): sequence parallel, see ulysses_attention.
    sparse = ((T, H, W), windows): sliding-tile attention over tile-ordered image tokens (SlidingTile).
    """
    if sparse is not None:  # attention_cuda's kernel on Hopper, its masked SDPA path anywhere else
        return fused_attention(q.to(v.dtype), k.to(v.dtype), v, kv_lens=seg_lens, sparse=sparse).flatten(2)
    if sp is not None:
        return ulysses_attention(q, k, v, seg_lens, *sp)
    B, L = q.shape[:2]
    if _use_kernel(q, k, v):
        # Our kernel skips keys at or past kv_lens[i] in one batched launch. Image and valid-text rows get
        # exactly the official result; padded rows attend to the valid keys instead of to each other, which
        # changes nothing downstream: no valid row ever reads them and the output keeps only image rows.
        # Under autocast q and k leave the fp32 RMSNorm/RoPE in fp32 while v is bf16: one dtype for the
        # kernel.
        q, k = q.to(v.dtype), k.to(v.dtype)
        return fused_attention(q, k, v, kv_lens=None if seg_lens is None else list(seg_lens)).flatten(2)
    if seg_lens is None or all(n == L for n in seg_lens):
        return _sdpa(q, k, v)
    if B * L * L <= _DENSE_MASK_MAX:
        return _sdpa(q, k, v, mask=_segment_mask(tuple(seg_lens), L, q.device))
    # Per sample, per segment. unbind/split (not slicing) so the backward is one stack/cat, not a
    # zero-filled copy of the whole input per piece.
    qs, ks, vs = q.unbind(0), k.unbind(0), v.unbind(0)
    out = []
    for i, n in enumerate(seg_lens):
        pieces = [x.split([n, L - n]) for x in (qs[i], ks[i], vs[i])]
        parts = []
        for (qq, kk, vv) in zip(*pieces):
            if qq.shape[0]:
                qq, kk, vv = qq[None], kk[None], vv[None]
                parts.append(_sdpa(qq, kk, vv))
        out.append(torch.cat(parts, 1))
    return torch.cat(out, 0)


def _use_kernel(q, k, v):
    """The dispatch rule described at KERNEL_CHOICE."""
    # The kernel takes bf16/fp16 (q and k are cast to v's dtype) at head_dim 64 or 128; anything else would
    # reach attention_cuda's masked-SDPA fallback, slower than the per-segment split.
    if (KERNEL_CHOICE == "0" or fused_attention is None or not q.is_cuda
            or v.dtype not in (torch.bfloat16, torch.float16) or q.shape[-1] not in KERNEL_HEAD_DIMS):
        return False
    if KERNEL_CHOICE != "1":
        grads = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
        if grads or torch.cuda.get_device_capability(q.device) != (9, 0):
            return False
    return kernel_available()  # last: its first call builds the extension, which training need not wait for


@functools.lru_cache(maxsize=8)
def _segment_mask(seg_lens, L, device):
    """(B, 1, L, L) bool: query and key in the same segment. Built once per forward, not once per block."""
    inside = torch.arange(L, device=device) < torch.tensor(seg_lens, device=device)[:, None]  # (B, L)
    return (inside[:, :, None] == inside[:, None, :])[:, None]


# Of SDPA's exact backends cuDNN's is the fastest, forward and backward, but PyTorch does not try it first:
# ask for it where PyTorch can set the order (2.6+).
_CUDA_ORDER = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
               SDPBackend.MATH]
_CAN_ORDER = "set_priority" in inspect.signature(sdpa_kernel).parameters


def _sdpa(q, k, v, mask=None):
    """(B, L, H, D) in, (B, L, H*D) out; softmax scale 1/sqrt(D); mask (B, 1, L, L) bool or None."""
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if q.is_cuda and _CAN_ORDER and mask is None:
        with sdpa_kernel(_CUDA_ORDER, set_priority=True):
            o = F.scaled_dot_product_attention(q, k, v)
    else:
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return o.transpose(1, 2).flatten(2)


class SlidingTile:
    """Sliding-tile attention for sampling (STA, Zhang et al. 2025, arXiv 2502.04507; training-free): in
    every block an image query attends only to the image keys in a 3D window of 6 x 8 x 8-token tiles
    around its own (and to all text); text queries attend to everything. Not exact: it drops the far keys,
    so sample.py runs the first `full_steps` steps densely (FastVideo's HunyuanVideo strategy: steps 0-14
    of 50), when the layout of the video forms. windows[layer][head] = (t, h, w) in tiles, layers counted
    double blocks first; a window of w tiles covers 2 (w // 2) + 1 of them, shifted inward at the edges."""

    def __init__(self, windows, full_steps=15, per_step=None):
        self.windows, self.full_steps = windows, full_steps
        self.per_step = per_step  # or one windows table per sampling step (FastVideo's strategy files)

    def at(self, step):
        """The SlidingTile for sampling step `step` (0-based), or None where that step is dense."""
        if step < self.full_steps:
            return None
        return self if self.per_step is None else SlidingTile(self.per_step[step], self.full_steps)

    @classmethod
    def uniform(cls, cfg, window, full_steps=15):
        """The same (t, h, w) window for every layer and head."""
        layers = cfg.depth_double + cfg.depth_single
        return cls(tuple((tuple(window),) * cfg.num_heads for _ in range(layers)), full_steps)

    @classmethod
    def from_file(cls, path, cfg, full_steps=15):
        """A JSON window table, one of:
        - a list of one list per layer (double blocks, then single blocks) of one [t, h, w] per head, the
          same for every sparse step;
        - FastVideo's strategy files (its HunyuanVideo one, mask_strategy_hunyuan.json, was searched per
          step, layer and head): {"STEP_LAYER_HEAD": [t, h, w]} for every step of the sampler, layers
          counted the same way; the step's own windows are used from full_steps on.
        ValueError, one line, for anything else."""
        layers, heads = cfg.depth_double + cfg.depth_single, cfg.num_heads
        try:
            with open(path) as f:
                table = json.load(f)
        except (OSError, ValueError) as e:
            raise ValueError(f"STA window table {path}: cannot read it as JSON ({type(e).__name__}); "
                             f"write [[[t, h, w] per head] per layer]") from None

        def window(w):
            return isinstance(w, list) and len(w) == 3 and all(type(n) is int and n >= 1 for n in w)

        if isinstance(table, dict):
            keys = [k.split("_") for k in table]
            if not table or not all(len(k) == 3 and all(p.isdigit() for p in k) for k in keys):
                raise ValueError(f"STA window table {path}: a dict's keys must be STEP_LAYER_HEAD "
                                 f"(FastVideo's strategy files), e.g. \"15_0_3\"")
            steps = 1 + max(int(k[0]) for k in keys)
            for key in (f"{t}_{i}_{h}" for t in range(steps) for i in range(layers) for h in range(heads)):
                if not window(table.get(key)):
                    raise ValueError(f"STA window table {path}: {key} is missing or not [t, h, w] of "
                                     f"positive ints; need every step < {steps}, layer < {layers}, "
                                     f"head < {heads}")
            if len(table) != steps * layers * heads:
                raise ValueError(f"STA window table {path}: keys beyond {layers} layers x {heads} heads: is "
                                 f"it for another model?")
            per_step = tuple(tuple(tuple(tuple(table[f"{t}_{i}_{h}"]) for h in range(heads))
                                   for i in range(layers)) for t in range(steps))
            return cls(None, full_steps, per_step)
        if not isinstance(table, list) or len(table) != layers:
            raise ValueError(f"STA window table {path}: need a list of {layers} layers ({cfg.depth_double} "
                             f"double + {cfg.depth_single} single blocks), got "
                             f"{len(table) if isinstance(table, list) else type(table).__name__}")
        for i, row in enumerate(table):
            if not isinstance(row, list) or len(row) != heads or not all(window(w) for w in row):
                raise ValueError(f"STA window table {path}: layer {i} must list {heads} windows "
                                 "[t, h, w] of positive ints, one per head")
        return cls(tuple(tuple(tuple(w) for w in row) for row in table), full_steps)


# ----------------------------------------------------------------------------------------------------------
# Token refiner (txt_in, official token_refiner.py): LLM states -> hidden size, refined by bidirectional
# attention over the prompt (paper §4.3: the LLM's attention is causal, text guidance wants bidirectional)

class IndividualTokenRefinerBlock(nn.Module):
    """Pre-norm transformer block with gate-only adaLN (no shift/scale), affine LayerNorms, SiLU MLP."""

    def __init__(self, hidden, heads, mlp_ratio):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(hidden, eps=1e-6)
        self.self_attn_qkv = nn.Linear(hidden, 3 * hidden)
        self.self_attn_proj = nn.Linear(hidden, hidden)
        self.norm2 = nn.LayerNorm(hidden, eps=1e-6)
        self.mlp = MLP(hidden, int(hidden * mlp_ratio), nn.SiLU())
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x, c, seg_lens, mask):
        gate_msa, gate_mlp = self.adaLN_modulation(c).unsqueeze(1).chunk(2, dim=-1)
        dt = x.dtype
        h = F.layer_norm(fp32(x), x.shape[-1:], fp32(self.norm1.weight), fp32(self.norm1.bias), 1e-6)
        q, k, v = self.self_attn_qkv(h.to(dt)).unflatten(-1, (3, self.heads, -1)).unbind(2)
        a = attention(q, k, v, seg_lens)
        if mask is not None:
            # Official mask: valid query i sees valid keys; key 0 is forced visible, so a padding query sees
            # key 0 alone and its output is exactly v[:, 0]. (Padding outputs never reach the image.)
            a = torch.where(mask.bool()[..., None], a, v[:, :1].flatten(2))
        x = x + gate_msa * self.self_attn_proj(a)
        h = F.layer_norm(fp32(x), x.shape[-1:], fp32(self.norm2.weight), fp32(self.norm2.bias), 1e-6)
        return x + gate_mlp * self.mlp(h.to(dt))


class IndividualTokenRefiner(nn.Module):
    """Holds the refiner blocks, so their keys read txt_in.individual_token_refiner.blocks.N (official)."""

    def __init__(self, hidden, heads, depth, mlp_ratio):
        super().__init__()
        self.blocks = nn.ModuleList([IndividualTokenRefinerBlock(hidden, heads, mlp_ratio)
                                     for _ in range(depth)])


class SingleTokenRefiner(nn.Module):
    """txt_in: c = t-embedding + MLP(masked mean of the raw LLM states); x = Linear(states); the blocks."""

    def __init__(self, in_dim, hidden, heads, depth, mlp_ratio):
        super().__init__()
        self.input_embedder = nn.Linear(in_dim, hidden)
        self.t_embedder = TimestepEmbedder(hidden)
        self.c_embedder = TextProjection(in_dim, hidden)
        self.individual_token_refiner = IndividualTokenRefiner(hidden, heads, depth, mlp_ratio)

    def forward(self, text, t, mask, seg_lens):
        dt = self.input_embedder.weight.dtype
        if mask is None:
            pooled = fp32(text).mean(dim=1)
        else:  # the mean is taken over the raw (un-projected) states of the valid tokens, in fp32
            m = mask.to(fp32(text).dtype).unsqueeze(-1)
            pooled = (fp32(text) * m).sum(dim=1) / m.sum(dim=1)
        c = self.t_embedder(t) + self.c_embedder(pooled.to(dt))
        x = self.input_embedder(text.to(dt))
        for block in self.individual_token_refiner.blocks:
            x = block(x, c, seg_lens, mask)
        return x


# ----------------------------------------------------------------------------------------------------------
# Transformer blocks

class MMDoubleStreamBlock(nn.Module):
    """Dual-stream block (paper §4.2): separate img_/txt_ weights, one joint attention over [img ; txt]."""

    def __init__(self, cfg):
        super().__init__()
        D, head_dim = cfg.hidden_size, cfg.hidden_size // cfg.num_heads
        mlp = int(D * cfg.mlp_ratio)
        self.heads = cfg.num_heads
        for s in ("img", "txt"):
            setattr(self, f"{s}_mod", Modulation(D, 6))
            setattr(self, f"{s}_attn_qkv", nn.Linear(D, 3 * D, bias=cfg.qkv_bias))
            setattr(self, f"{s}_attn_q_norm", RMSNorm(head_dim))
            setattr(self, f"{s}_attn_k_norm", RMSNorm(head_dim))
            setattr(self, f"{s}_attn_proj", nn.Linear(D, D, bias=cfg.qkv_bias))
            setattr(self, f"{s}_mlp", MLP(D, mlp, nn.GELU(approximate="tanh")))

    def forward(self, img, txt, vec, rope, seg_lens, sp=None, sparse=None, first=None):
        """first = (n, vec0), I2V token_replace only: the first n image tokens (the image's frame) are
        modulated by vec0 instead of vec (official modulate/apply_gate with condition_type)."""
        img_mod = self.img_mod(vec).chunk(6, dim=-1)  # shift1, scale1, gate1, shift2, scale2, gate2
        txt_mod = self.txt_mod(vec).chunk(6, dim=-1)
        img_mod0 = None if first is None else self.img_mod(first[1]).chunk(6, dim=-1)

        def qkv(s, x, mod, mod0):
            f = None if mod0 is None else (first[0], mod0[0], mod0[1])
            h = modulate(layer_norm(x), mod[0], mod[1], f).to(x.dtype)
            q, k, v = getattr(self, f"{s}_attn_qkv")(h).unflatten(-1, (3, self.heads, -1)).unbind(2)
            return getattr(self, f"{s}_attn_q_norm")(q), getattr(self, f"{s}_attn_k_norm")(k), v

        iq, ik, iv = qkv("img", img, img_mod, img_mod0)
        iq, ik = apply_rope(iq, *rope), apply_rope(ik, *rope)  # RoPE on image tokens only, after QK-norm
        tq, tk, tv = qkv("txt", txt, txt_mod, None)
        a = attention(torch.cat([iq, tq], 1), torch.cat([ik, tk], 1), torch.cat([iv, tv], 1), seg_lens, sp,
                      sparse)
        img_a, txt_a = a[:, :img.shape[1]], a[:, img.shape[1]:]

        def residual(s, x, attn_out, mod, mod0):
            if mod0 is None:
                x = x + mod[2].unsqueeze(1) * getattr(self, f"{s}_attn_proj")(attn_out)
                h = modulate(layer_norm(x), mod[3], mod[4]).to(x.dtype)
                return x + mod[5].unsqueeze(1) * getattr(self, f"{s}_mlp")(h)
            n = first[0]
            x = x + gated(getattr(self, f"{s}_attn_proj")(attn_out), mod[2], (n, mod0[2]))
            h = modulate(layer_norm(x), mod[3], mod[4], (n, mod0[3], mod0[4])).to(x.dtype)
            return x + gated(getattr(self, f"{s}_mlp")(h), mod[5], (n, mod0[5]))

        return residual("img", img, img_a, img_mod, img_mod0), residual("txt", txt, txt_a, txt_mod, None)


class MMSingleStreamBlock(nn.Module):
    """Single-stream block: linear1 -> [q | k | v | mlp], linear2([attn | GELU(mlp)]), one gated residual."""

    def __init__(self, cfg):
        super().__init__()
        D, head_dim = cfg.hidden_size, cfg.hidden_size // cfg.num_heads
        self.heads, self.mlp_hidden = cfg.num_heads, int(D * cfg.mlp_ratio)
        self.linear1 = nn.Linear(D, 3 * D + self.mlp_hidden)
        self.linear2 = nn.Linear(D + self.mlp_hidden, D)
        self.q_norm, self.k_norm = RMSNorm(head_dim), RMSNorm(head_dim)
        self.modulation = Modulation(D, 3)
        self.mlp_act = nn.GELU(approximate="tanh")

    def forward(self, x, vec, rope, seg_lens, n_img, sp=None, sparse=None, first=None):
        """first = (n, vec0): as in MMDoubleStreamBlock (I2V token_replace)."""
        shift, scale, gate = self.modulation(vec).chunk(3, dim=-1)
        mod0 = None if first is None else self.modulation(first[1]).chunk(3, dim=-1)
        f = None if first is None else (first[0], mod0[0], mod0[1])
        h = modulate(layer_norm(x), shift, scale, f).to(x.dtype)
        qkv, mlp = self.linear1(h).split([x.shape[-1] * 3, self.mlp_hidden], dim=-1)
        q, k, v = qkv.unflatten(-1, (3, self.heads, -1)).unbind(2)
        q, k = self.q_norm(q), self.k_norm(k)
        # RoPE on the image part [0, n_img) only; the text tail keeps no positional encoding
        q = torch.cat([apply_rope(q[:, :n_img], *rope), q[:, n_img:]], 1)
        k = torch.cat([apply_rope(k[:, :n_img], *rope), k[:, n_img:]], 1)
        a = attention(q, k, v, seg_lens, sp, sparse)
        if first is not None:
            return x + gated(self.linear2(torch.cat([a, self.mlp_act(mlp)], -1)), gate, (first[0], mod0[2]))
        return x + gate.unsqueeze(1) * self.linear2(torch.cat([a, self.mlp_act(mlp)], -1))


class FinalLayer(nn.Module):
    """adaLN (shift, scale) -> Linear to patch pixels."""

    def __init__(self, cfg):
        super().__init__()
        D = cfg.hidden_size
        self.linear = nn.Linear(D, math.prod(cfg.patch_size) * cfg.out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, 2 * D))

    def forward(self, x, vec):
        shift, scale = self.adaLN_modulation(vec).chunk(2, dim=-1)
        return self.linear(modulate(layer_norm(x), shift, scale).to(x.dtype))


# ----------------------------------------------------------------------------------------------------------
# The model

class HunyuanVideoDiT(nn.Module):
    """Latent video + text conditions -> flow-matching velocity (official HYVideoDiffusionTransformer)."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.hidden_size
        self.img_in = PatchEmbed(cfg.patch_size, cfg.in_channels, D)
        self.txt_in = SingleTokenRefiner(cfg.text_dim, D, cfg.num_heads, cfg.refiner_depth, cfg.mlp_ratio)
        self.time_in = TimestepEmbedder(D)
        self.vector_in = MLPEmbedder(cfg.pooled_dim, D)
        self.guidance_in = TimestepEmbedder(D) if cfg.guidance_embed else None
        self.double_blocks = nn.ModuleList([MMDoubleStreamBlock(cfg) for _ in range(cfg.depth_double)])
        self.single_blocks = nn.ModuleList([MMSingleStreamBlock(cfg) for _ in range(cfg.depth_single)])
        self.final_layer = FinalLayer(cfg)
        self.gradient_checkpointing = False
        self.sp_group = None  # a torch.distributed group: sequence-parallel sampling (sample.py sets it)
        self._rope_cache = {}
        self.riflex = None  # long videos: a RIFLEx rule for the temporal RoPE (sample.py sets it)
        self.initialize_weights()

    def initialize_weights(self):
        """Official init: PyTorch-default Linear/Conv, N(0, 0.02) timestep MLPs, zeros for every modulation
        and the final layer, so each block starts as the identity (adaLN-Zero, as in DiT)."""
        for emb in (self.time_in, self.guidance_in, self.txt_in.t_embedder):
            if emb is not None:
                nn.init.normal_(emb.mlp[0].weight, std=0.02)
                nn.init.normal_(emb.mlp[2].weight, std=0.02)
        zero = [self.final_layer.linear, self.final_layer.adaLN_modulation[1]]
        zero += [b.adaLN_modulation[1] for b in self.txt_in.individual_token_refiner.blocks]
        zero += [m for b in self.double_blocks for m in (b.img_mod.linear, b.txt_mod.linear)]
        zero += [b.modulation.linear for b in self.single_blocks]
        for m in zero:
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def compile_blocks(self):
        """torch.compile every block in place (train.py --compile, bench.py train --compile). Inductor fuses
        the element-wise work around the matmuls (fp32 LayerNorm, modulation, RMSNorm, RoPE, gates, GELU)
        that eager PyTorch runs as dozens of memory-bound kernels per block; attention() stays eager (a graph
        break), so varying text lengths do not recompile. Blocks of one kind share one compiled graph."""
        for block in (*self.double_blocks, *self.single_blocks):
            block.compile()
        return self

    def rope(self, grid, device, dtype):
        key = (grid, str(device), dtype, self.riflex)
        if key not in self._rope_cache:
            work = fp32(torch.empty(0, dtype=dtype)).dtype
            cos, sin = rope_tables(grid, self.cfg.rope_axes, self.cfg.rope_theta, work, self.riflex)
            self._rope_cache = {key: (cos.to(device), sin.to(device))}  # keep one resolution at a time
        return self._rope_cache[key]

    def forward(self, x, t, text, text_mask, pooled, guidance=None, cache=None, sparse=None):
        """x (B, C, T, H, W); t (B,) in 0..1000; text (B, L, text_dim); text_mask (B, L) 1 = real token,
        right-padded (or None: all real); pooled (B, pooled_dim); guidance (B,) already x1000.
        cache (sampling only, sample.TeaCache or MagCache): shown block 0's modulated image input, it says
        whether to run the blocks; when it says no, the image tokens get its stored residual instead.
        sparse (sampling only): a SlidingTile, whose windows every block's attention uses this call.
        Returns the velocity (B, out_channels, T, H, W) in the weights' dtype."""
        cfg = self.cfg
        B, C, T, H, W = x.shape
        pt, ph, pw = cfg.patch_size
        if C != cfg.in_channels or T % pt or H % ph or W % pw:
            raise ValueError(f"latent {tuple(x.shape)}: need {cfg.in_channels} channels and T, H, W "
                             f"divisible by the patch {cfg.patch_size}; pad or crop the latent to fit")
        if cfg.guidance_embed and guidance is None:
            raise ValueError("this DiT is guidance-distilled: pass guidance = scale * 1000 "
                             "(official default 6.0)")
        if not cfg.guidance_embed and guidance is not None:
            raise ValueError("this DiT has no guidance embedder: pass guidance=None (use real CFG instead)")
        grid = (T // pt, H // ph, W // pw)
        n_img, n_txt = math.prod(grid), text.shape[1]

        seg_lens = None
        if text_mask is not None:
            text_len = text_mask.sum(1)
            # The official varlen split assumes valid tokens are a prefix (the tokenizer pads on the right).
            if (text_len == 0).any() or not torch.equal(
                    text_mask.bool(), torch.arange(n_txt, device=text_mask.device) < text_len[:, None]):
                raise ValueError("text_mask must be right-padded (ones then zeros) with at least one real "
                                 "token per sample; encode prompts with padding on the right")
            seg_lens = (text_len + n_img).tolist()
        txt_seg = None if seg_lens is None else [n - n_img for n in seg_lens]

        dt = self.img_in.proj.weight.dtype
        vec = self.time_in(t) + self.vector_in(pooled.to(dt))  # plain sum of the conditioning vectors
        first = None
        if cfg.image_condition_type == "token_replace":
            # I2V: the image's frame is clean, so its tokens are modulated as at t = 0 (no guidance term),
            # in every double and single block; the final layer uses vec alone (official models.py)
            first = (grid[1] * grid[2], self.time_in(torch.zeros_like(t)) + self.vector_in(pooled.to(dt)))
        if self.guidance_in is not None:
            vec = vec + self.guidance_in(guidance)
        img = self.img_in(x.to(dt))
        txt = self.txt_in(text, t, text_mask, txt_seg)
        rope = self.rope(grid, x.device, dt)

        sp, n_local = None, n_img
        if self.sp_group is not None:  # each rank keeps a contiguous 1/N of the image tokens (and RoPE rows)
            import torch.distributed as dist
            N, r = dist.get_world_size(self.sp_group), dist.get_rank(self.sp_group)
            if n_img % N or cfg.num_heads % N:
                raise ValueError(f"sequence parallel over {N} ranks needs {N} to divide the {n_img} "
                                 f"image tokens and the {cfg.num_heads} heads; choose another GPU count "
                                 "or video size")
            n_local = n_img // N
            img = img[:, r * n_local:(r + 1) * n_local]
            rope = tuple(tab[r * n_local:(r + 1) * n_local] for tab in rope)
            sp = (self.sp_group, n_local)
            if first is not None:  # the first frame's tokens that fall in this rank's slice (maybe none)
                first = (min(max(first[0] - r * n_local, 0), n_local), first[1])
        if sparse is not None and sp is not None:
            raise ValueError("sliding-tile attention runs on one GPU: drop sparse or sequence parallel")
        if sparse is not None and first is not None:  # the first frame's tokens must stay a prefix
            raise ValueError("sliding-tile attention reorders the image tokens, and token_replace's first "
                             "frame needs them in order: drop sparse for image-to-video")

        def blocks(img):
            """The blocks' image tokens (B, n_local, D). Sliding-tile attention: the blocks see the image
            tokens and RoPE rows in tile order (padding slots zero), and give them back in raster order."""
            if sparse is None:
                return self.run_blocks(img, txt, vec, rope, seg_lens, n_local, sp, None, first)[:, :n_local]
            slot, n_slots = sta_layout(grid, x.device)
            tiles = img.new_zeros(B, n_slots, img.shape[-1]).index_copy_(1, slot, img)
            tab = tuple(r.new_zeros(n_slots, r.shape[1]).index_copy_(0, slot, r) for r in rope)
            seg = None if seg_lens is None else [n - n_img + n_slots for n in seg_lens]
            return self.run_blocks(tiles, txt, vec, tab, seg, n_slots, None, (grid, sparse.windows))[:, slot]

        if cache is None:
            x = blocks(img)
        else:  # step caching (TeaCache, MagCache): skip all blocks, or run them and keep their residual
            mod = self.double_blocks[0].img_mod(vec).chunk(6, dim=-1)
            probe = modulate(layer_norm(img), mod[0], mod[1])  # block 0's first modulated image input
            if cache.should_compute(probe, self.sp_group):
                x = blocks(img)
                cache.residual = x - img
            else:
                x = img + cache.residual
        out = self.final_layer(x, vec)  # (B, L_img, C*pt*ph*pw)
        if sp is not None:  # every rank gets the whole video back
            parts = [torch.empty_like(out) for _ in range(N)]
            dist.all_gather(parts, out.contiguous(), group=self.sp_group)
            out = torch.cat(parts, 1)

        # unpatchify: channels laid out (c, pt, ph, pw), c slowest; tokens (t, h, w)
        out = out.reshape(B, *grid, cfg.out_channels, pt, ph, pw)
        out = out.permute(0, 4, 1, 5, 2, 6, 3, 7)  # (B, c, t, pt, h, ph, w, pw)
        return out.reshape(B, cfg.out_channels, T, H, W)

    def run_blocks(self, img, txt, vec, rope, seg_lens, n_local, sp, sta=None, first=None):
        """The double then the single blocks -> the joint sequence [img ; txt] (B, n_local + L, D).
        sta: (grid, windows[layer]) for sliding-tile attention, layers counted double blocks first.
        first: (n, vec0) for I2V token_replace (see MMDoubleStreamBlock), else None."""
        ckpt = self.gradient_checkpointing and torch.is_grad_enabled()
        layer = (lambda i: None) if sta is None else (lambda i: (sta[0], sta[1][i]))
        for i, block in enumerate(self.double_blocks):
            args = (img, txt, vec, rope, seg_lens, sp, layer(i), first)
            img, txt = checkpoint(block, *args, use_reentrant=False) if ckpt else block(*args)
        x = torch.cat([img, txt], 1)  # image first, then text, as in the official sequence
        for i, block in enumerate(self.single_blocks, len(self.double_blocks)):
            args = (x, vec, rope, seg_lens, n_local, sp, layer(i), first)
            x = checkpoint(block, *args, use_reentrant=False) if ckpt else block(*args)
        return x


def num_params(model):
    """Parameter count (the 13B config: 12,821,012,544)."""
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------------------------------
# Sequence parallel sampling (DeepSpeed-Ulysses)

def ulysses_attention(q, k, v, seg_lens, group, n_img):
    """Sequence parallel attention (DeepSpeed-Ulysses), for sampling one video on N GPUs.

    Each rank holds a contiguous 1/N of the image tokens (its first n_img rows) and the whole text. An
    all-to-all trades "my tokens, all heads" for "all tokens, my H/N heads"; attention then runs on the
    full sequence for those heads (seg_lens are in full-sequence positions); a second all-to-all trades
    back. Text is replicated, so each rank takes its heads' slice of it and the text outputs of all heads
    are all-gathered. Plain torch.distributed collectives: no autograd, inference only.
    """
    import torch.distributed as dist
    N, r = dist.get_world_size(group), dist.get_rank(group)
    B, _, H, Dh = q.shape
    h = H // N  # heads per rank

    def to_heads(x):  # (B, n_img, H, Dh) local tokens -> (B, N * n_img, h, Dh) all tokens
        send = x.reshape(B, n_img, N, h, Dh).permute(2, 0, 1, 3, 4).contiguous()  # chunk j -> rank j
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=group)  # recv[j] = rank j's tokens, my heads
        return recv.permute(1, 0, 2, 3, 4).reshape(B, N * n_img, h, Dh)

    full = [torch.cat([to_heads(x[:, :n_img]), x[:, n_img:, r * h:(r + 1) * h]], 1) for x in (q, k, v)]
    o = attention(*full, seg_lens).unflatten(-1, (h, Dh))  # (B, N*n_img + L_txt, h, Dh)
    send = o[:, :N * n_img].reshape(B, N, n_img, h, Dh).permute(1, 0, 2, 3, 4).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)  # recv[j] = my tokens, rank j's heads
    img = recv.permute(1, 2, 0, 3, 4).reshape(B, n_img, H * Dh)
    txt = [torch.empty_like(o[:, N * n_img:]) for _ in range(N)]
    dist.all_gather(txt, o[:, N * n_img:].contiguous(), group=group)
    return torch.cat([img, torch.cat(txt, 2).flatten(2)], 1)


# ----------------------------------------------------------------------------------------------------------
# Official <-> diffusers key conversion (diffusers HunyuanVideoTransformer3DModel)

# (official module, diffusers module(s)); the _REFINER/_DOUBLE/_SINGLE names follow each block's prefix.
# Several diffusers modules: the official tensor is split along dim 0 (q/k/v, and the single block's
# q/k/v/mlp).
_DIFFUSERS_NAMES = [
    ("img_in.proj", ["x_embedder.proj"]),
    ("time_in.mlp.0", ["time_text_embed.timestep_embedder.linear_1"]),
    ("time_in.mlp.2", ["time_text_embed.timestep_embedder.linear_2"]),
    ("vector_in.in_layer", ["time_text_embed.text_embedder.linear_1"]),
    ("vector_in.out_layer", ["time_text_embed.text_embedder.linear_2"]),
    ("guidance_in.mlp.0", ["time_text_embed.guidance_embedder.linear_1"]),
    ("guidance_in.mlp.2", ["time_text_embed.guidance_embedder.linear_2"]),
    ("txt_in.input_embedder", ["context_embedder.proj_in"]),
    ("txt_in.t_embedder.mlp.0", ["context_embedder.time_text_embed.timestep_embedder.linear_1"]),
    ("txt_in.t_embedder.mlp.2", ["context_embedder.time_text_embed.timestep_embedder.linear_2"]),
    ("txt_in.c_embedder.linear_1", ["context_embedder.time_text_embed.text_embedder.linear_1"]),
    ("txt_in.c_embedder.linear_2", ["context_embedder.time_text_embed.text_embedder.linear_2"]),
    ("final_layer.linear", ["proj_out"]),
    # the one reordering: official (shift, scale) halves, diffusers (scale, shift)
    ("final_layer.adaLN_modulation.1", ["norm_out.linear"]),
]
_REFINER = [("norm1", ["norm1"]), ("norm2", ["norm2"]), ("self_attn_proj", ["attn.to_out.0"]),
            ("self_attn_qkv", ["attn.to_q", "attn.to_k", "attn.to_v"]),
            ("mlp.fc1", ["ff.net.0.proj"]), ("mlp.fc2", ["ff.net.2"]),
            ("adaLN_modulation.1", ["norm_out.linear"])]
_DOUBLE = [("img_mod.linear", ["norm1.linear"]), ("txt_mod.linear", ["norm1_context.linear"]),
           ("img_attn_qkv", ["attn.to_q", "attn.to_k", "attn.to_v"]),
           ("txt_attn_qkv", ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"]),
           ("img_attn_q_norm", ["attn.norm_q"]), ("img_attn_k_norm", ["attn.norm_k"]),
           ("txt_attn_q_norm", ["attn.norm_added_q"]), ("txt_attn_k_norm", ["attn.norm_added_k"]),
           ("img_attn_proj", ["attn.to_out.0"]), ("txt_attn_proj", ["attn.to_add_out"]),
           ("img_mlp.fc1", ["ff.net.0.proj"]), ("img_mlp.fc2", ["ff.net.2"]),
           ("txt_mlp.fc1", ["ff_context.net.0.proj"]), ("txt_mlp.fc2", ["ff_context.net.2"])]
_SINGLE = [("linear1", ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"]), ("linear2", ["proj_out"]),
           ("q_norm", ["attn.norm_q"]), ("k_norm", ["attn.norm_k"]), ("modulation.linear", ["norm.linear"])]


def _name_pairs(sd_keys, diffusers_side):
    """Expand the tables over the block indices present in a state dict's keys."""
    def indices(prefix):
        return sorted({int(k[len(prefix):].split(".")[0]) for k in sd_keys if k.startswith(prefix)})
    official = ("txt_in.individual_token_refiner.blocks.", "double_blocks.", "single_blocks.")
    diffusers = ("context_embedder.token_refiner.refiner_blocks.", "transformer_blocks.",
                 "single_transformer_blocks.")
    pairs = list(_DIFFUSERS_NAMES)
    for table, off, dif in zip((_REFINER, _DOUBLE, _SINGLE), official, diffusers):
        for i in indices(dif if diffusers_side else off):
            pairs += [(f"{off}{i}.{o}", [f"{dif}{i}.{d}" for d in ds]) for o, ds in table]
    return pairs


def _swap_halves(w):
    a, b = w.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def official_to_diffusers(sd):
    """Official state dict -> diffusers HunyuanVideoTransformer3DModel layout (no copies but the splits)."""
    sd, out = dict(sd), {}
    hidden = next((v.shape[0] for k, v in sd.items()
                   if k.endswith(("img_in.proj.weight", "linear2.weight"))), 0)
    for off, dif in _name_pairs(sd.keys(), diffusers_side=False):
        for p in ("weight", "bias"):
            if f"{off}.{p}" not in sd:
                continue
            w = sd.pop(f"{off}.{p}")
            if off == "final_layer.adaLN_modulation.1":
                w = _swap_halves(w)
            if len(dif) == 3:
                parts = w.chunk(3, dim=0)
            elif len(dif) == 4:  # single-block linear1: q, k, v are hidden_size rows each, then the MLP
                parts = w.split([hidden, hidden, hidden, w.shape[0] - 3 * hidden], dim=0)
            else:
                parts = [w]
            out.update({f"{d}.{p}": t for d, t in zip(dif, parts)})
    out.update(sd)  # anything unrecognised is passed through, so the strict load names it
    return out


def diffusers_to_official(sd):
    """diffusers layout -> official state dict (the inverse of official_to_diffusers)."""
    sd, out = dict(sd), {}
    for off, dif in _name_pairs(sd.keys(), diffusers_side=True):
        for p in ("weight", "bias"):
            if not all(f"{d}.{p}" in sd for d in dif):
                continue
            w = torch.cat([sd.pop(f"{d}.{p}") for d in dif], dim=0)
            out[f"{off}.{p}"] = _swap_halves(w) if off == "final_layer.adaLN_modulation.1" else w
    out.update(sd)
    return out


# ----------------------------------------------------------------------------------------------------------
# Loading and saving

def read_safetensors(path):
    """(tensors, metadata) of a safetensors file; a truncated or corrupt file is one ValueError naming it
    (safetensors checks that the header covers the whole file, so a cut-off download is caught here)."""
    from safetensors import safe_open
    try:
        with safe_open(path, "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except Exception as e:  # SafetensorError (no public class to name) or an OSError
        raise ValueError(f"cannot read {path}: the file is damaged or truncated ({e}); re-download or "
                         "re-create it") from None


def _read_state_dict(path, load_key):
    """Read tensors from an official .pt, a safetensors file, or a directory of (sharded) safetensors."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"DiT checkpoint not found: {path}")
    meta = {}
    if os.path.isdir(path):
        names = sorted(os.listdir(path))
        index = [n for n in names if n.endswith(".safetensors.index.json")]
        if index:
            with open(os.path.join(path, index[0])) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
        else:
            shards = [n for n in names if n.endswith(".safetensors")]
        if not shards:
            pts = [n for n in names if n.endswith(".pt")]
            if len(pts) == 1:
                return _read_state_dict(os.path.join(path, pts[0]), load_key)
            raise FileNotFoundError(f"no *.safetensors (or single official .pt) in {path}")
        sd = {}
        for s in shards:
            if not os.path.exists(os.path.join(path, s)):
                raise FileNotFoundError(f"shard {s} listed in the index is missing from {path}")
            sd.update(read_safetensors(os.path.join(path, s))[0])
        if os.path.exists(os.path.join(path, "config.json")):
            with open(os.path.join(path, "config.json")) as f:
                meta["diffusers_config"] = json.load(f)
        return sd, meta
    if path.endswith(".safetensors"):
        return read_safetensors(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # truncated or not a torch file
        raise ValueError(f"cannot read {path} as a torch checkpoint ({type(e).__name__}: {e}); "
                         "re-download it") from None
    if isinstance(obj, dict) and load_key in obj:  # DeepSpeed layout: weights under "module" (or "ema")
        obj = obj[load_key]
    elif isinstance(obj, dict) and load_key == "module" and "ema" not in obj and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
        raise ValueError(f"{path}: no state dict under key '{load_key}' (keys: {list(obj)[:5]}); "
                         "try load_key='ema'")
    return obj, meta


def config_from_diffusers(c):
    """A DiTConfig from a diffusers transformer config.json."""
    return DiTConfig(in_channels=c["in_channels"], out_channels=c["out_channels"],
                     patch_size=(c["patch_size_t"], c["patch_size"], c["patch_size"]),
                     hidden_size=c["num_attention_heads"] * c["attention_head_dim"],
                     num_heads=c["num_attention_heads"], mlp_ratio=c["mlp_ratio"],
                     depth_double=c["num_layers"], depth_single=c["num_single_layers"],
                     refiner_depth=c["num_refiner_layers"], text_dim=c["text_embed_dim"],
                     pooled_dim=c["pooled_projection_dim"],
                     rope_axes=tuple(c["rope_axes_dim"]), rope_theta=c["rope_theta"],
                     guidance_embed=c["guidance_embeds"], image_condition_type=c.get("image_condition_type"))


def check_state_dict(model, sd, source, hint=""):
    """Refuse a checkpoint that does not fit `model` key for key and shape for shape: one ValueError naming
    what is missing, unexpected or mis-shaped, so a wrong file is never loaded partially. Shared by every
    loader in this repository (DiT, VAE, text encoders)."""
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(want) - set(sd))
    unexpected = sorted(set(sd) - set(want))
    wrong = sorted(k for k in set(want) & set(sd) if tuple(sd[k].shape) != want[k])
    if not (missing or unexpected or wrong):
        return

    def few(ks):
        return ", ".join(ks[:3]) + (f" (+{len(ks) - 3} more)" if len(ks) > 3 else "")
    problems = [f"{len(missing)} missing: {few(missing)}" if missing else "",
                f"{len(unexpected)} unexpected: {few(unexpected)}" if unexpected else "",
                f"{len(wrong)} wrong shape: " + few([f"{k} {tuple(sd[k].shape)} vs {want[k]}" for k in wrong])
                if wrong else ""]
    raise ValueError(f"{source} does not fit {type(model).__name__}: " + "; ".join(p for p in problems if p)
                     + (f"; {hint}" if hint else ""))


def load_dit(path, config=None, dtype=torch.bfloat16, device="cpu", load_key="module", fp8_map=None,
             keep_fp8=True, image=False):
    """Load a DiT from the official mp_rank_00_model_states.pt, official-layout safetensors (ours, from
    save_dit, carry their config), or diffusers-layout safetensors (file or sharded directory), detected
    from the keys. config: a CONFIGS name or DiTConfig; default = the file's own config, else "13b".
    Any missing, unexpected or mis-shaped tensor is an error: never a silent partial load.

    The official fp8 checkpoint (mp_rank_00_model_states_fp8.pt, float8_e4m3fn weights for every linear
    layer of the 60 blocks) needs its scale map (fp8_map, default: *_fp8_map.pt beside it). keep_fp8: those
    layers become FP8Linear (the official --use-fp8: ~12 GB less at 13B); False: their dequantised weights,
    the same numbers, are stored densely in `dtype` (for training).

    Image-to-video (HunyuanVideo-I2V): diffusers' config.json and our files name their
    image_condition_type; an official file with 33 input channels is the latent_concat one. The official
    token_replace .pt has exactly T2V's keys and shapes, so the file cannot tell: image=True (the caller
    has an image) reads such a file as token_replace, and refuses a file that says it is text-to-video."""
    sd, meta = _read_state_dict(path, load_key)
    told = False  # whether the file itself says which variant it is
    if any(k.startswith(("transformer_blocks.", "x_embedder.", "context_embedder.")) for k in sd):
        sd = diffusers_to_official(sd)
        if config is None and "diffusers_config" in meta:
            config, told = config_from_diffusers(meta["diffusers_config"]), True
    if config is None:
        told = "config" in meta
        config = DiTConfig(**json.loads(meta["config"])) if told else "13b"
    cfg = CONFIGS[config] if isinstance(config, str) else config
    w = sd.get("img_in.proj.weight")
    if w is not None and w.ndim == 5 and w.shape[1] == 2 * cfg.out_channels + 1 and not told:
        # the first I2V release: [noisy latent ; image latent ; mask] channels; not guidance-distilled
        cfg = replace(cfg, in_channels=w.shape[1], image_condition_type="latent_concat",
                      guidance_embed="guidance_in.mlp.0.weight" in sd)
        told = True
    if image and cfg.image_condition_type is None:
        if told:
            raise ValueError(f"{path} is a text-to-video DiT (its config has no image_condition_type); "
                             "sampling from an image needs a HunyuanVideo-I2V checkpoint")
        cfg = replace(cfg, image_condition_type="token_replace")

    with torch.device("meta"):
        model = HunyuanVideoDiT(cfg)
    check_state_dict(model, sd, path, "is it a HunyuanVideo DiT checkpoint, complete, and the right config?")
    fp8 = [k[:-len(".weight")] for k, v in sd.items() if v.dtype == torch.float8_e4m3fn]
    modules = dict(model.named_modules())
    bad = [k for k, v in sd.items() if v.dtype.is_floating_point and v.element_size() == 1
           and not (k.endswith(".weight") and isinstance(modules.get(k[:-len(".weight")]), nn.Linear)
                    and v.dtype == torch.float8_e4m3fn)]
    if bad:
        raise ValueError(f"{path}: 8-bit tensor {bad[0]} ({sd[bad[0]].dtype}) is not a linear weight in "
                         "float8_e4m3fn, the only low-bit form the official checkpoints use")
    scales = _read_fp8_map(path, fp8_map, fp8) if fp8 else {}
    model.load_state_dict({k: v.to(device=device, dtype=v.dtype if k[:-len(".weight")] in scales else dtype)
                           for k, v in sd.items()}, strict=True, assign=True)
    for name, s in scales.items():
        lin = modules[name]
        parent, _, child = name.rpartition(".")
        if keep_fp8:
            setattr(modules[parent], child, FP8Linear(lin.weight.data, lin.bias, s.to(device), dtype))
        else:
            lin.weight = nn.Parameter(lin.weight.data.to(dtype) * s.to(device, dtype))
    return model


def save_dit(model, path):
    """Official-layout safetensors with our config in the metadata (atomic: temp file + rename)."""
    from safetensors.torch import save_file
    if any(isinstance(m, (FP8Linear, LoRALinear)) for m in model.modules()):
        raise ValueError("save_dit: this model holds fp8 weights (their scales are not state-dict keys) or "
                         "unmerged LoRA adapters; load it with load_dit(..., keep_fp8=False) to save dense "
                         "weights, with any LoRA merged")
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp = path + ".tmp"
    save_file(sd, tmp, metadata={"config": json.dumps(asdict(model.cfg))})
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------------
# The official fp8 checkpoint

class FP8Linear(nn.Module):
    """A linear layer of the official fp8 checkpoint (`--use-fp8`, hyvideo/modules/fp8_optimization.py):
    the weight stays in float8_e4m3fn (1 byte) with one scale from the *_fp8_map.pt file, and every forward
    dequantises it in the compute dtype, weight.to(dtype) * scale.to(dtype) (the product rounded to dtype,
    as the official), before an ordinary linear. Weight-only: it saves memory, not time (no fp8 matmul)."""

    def __init__(self, weight, bias, scale, dtype):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        # not a state-dict key: the official checkpoint keeps the scales in a separate file
        self.register_buffer("fp8_scale", scale, persistent=False)
        self.dtype = dtype

    def forward(self, x):
        w = self.weight.to(self.dtype) * self.fp8_scale.to(self.weight.device, self.dtype)
        return F.linear(x, w, self.bias)


def quantize_fp8(model):
    """Make the model's block linears FP8Linear, in place: float8_e4m3fn weights with one scale per layer,
    max|w| / 448 (e4m3's largest value; the official's own rule for weights that are not fp8 yet,
    fp8_optimization.py), so each weight keeps 4 significant bits. Returns {module name: scale}, the
    content of an official *_fp8_map.pt: torch.save({"module": model.state_dict()}, "x_fp8.pt") and
    torch.save(scales, "x_fp8_map.pt") write a checkpoint load_dit (and the official --use-fp8) reads."""
    scales = {}
    for name, m in list(model.named_modules()):
        if isinstance(m, nn.Linear) and name.startswith(("double_blocks.", "single_blocks.")):
            w = m.weight.detach().float()
            scale = (w.abs().max() / 448).clamp_min(1e-12)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, FP8Linear(
                (w / scale).to(torch.float8_e4m3fn), m.bias, scale, m.weight.dtype))
            scales[name] = scale.cpu()
    return scales


def fp8_map_path(path):
    """Where the official loader looks for an fp8 checkpoint's scales: x_fp8.pt -> x_fp8_map.pt."""
    return (path[:-3] if path.endswith(".pt") else path) + "_map.pt"


def _read_fp8_map(path, fp8_map, names):
    """{module name: scale} for the fp8 weights `names`, from fp8_map (default: beside the checkpoint)."""
    fp8_map = fp8_map or fp8_map_path(path)
    if not os.path.exists(fp8_map):
        raise FileNotFoundError(f"{path} holds fp8 weights but their scale map {fp8_map} is missing: "
                                "download the *_fp8_map.pt released with it (without it the weights are "
                                "noise)")
    scales = torch.load(fp8_map, map_location="cpu", weights_only=True)
    missing = [n for n in names if not (isinstance(scales, dict) and torch.is_tensor(scales.get(n)))]
    if missing:
        raise ValueError(f"{fp8_map} has no scale for {len(missing)} fp8 layer(s) of {path}, "
                         f"e.g. {missing[0]}: is it the map released with this checkpoint?")
    return {n: scales[n] for n in names}  # rounded to the compute dtype in one step at use, as the official


# ----------------------------------------------------------------------------------------------------------
# LoRA: low-rank adapters, W x + s * B A x (Hu et al. 2021, arXiv 2106.09685), read in the three layouts
# in which LoRAs of this model are exchanged, and trained by train.py --lora

# musubi-tuner's default targets (networks/lora.py): every linear layer of the 60 blocks but the modulation
LORA_TARGETS = (r"(double_blocks\.\d+\.(img|txt)_(attn_qkv|attn_proj|mlp\.fc1|mlp\.fc2)"
                r"|single_blocks\.\d+\.linear[12])")
# original layout (diffusion_model. as ComfyUI and musubi-tuner's converter write it; transformer. as
# diffusers' own saves); diffusers names go under transformer. too. kohya-style: lora_unet_ + the module
# name with "." as "_" (musubi-tuner), or the official I2V trainer's prefix.
_PREFIXES = ("diffusion_model.", "transformer.")
_KOHYA_PREFIXES = ("lora_unet_", "Hunyuan_video_I2V_lora_")


class LoRALinear(nn.Module):
    """A frozen linear layer (nn.Linear or FP8Linear) plus adapters kept apart from its weight:
    y = base(x) + sum_i s_i (x A_i^T) B_i^T, the adapter path in fp32 (or the adapters' dtype)."""

    def __init__(self, base):
        super().__init__()
        self.base = base
        self.lora_A, self.lora_B = nn.ParameterList(), nn.ParameterList()
        self.scales = []

    def add(self, A, B, scale, trainable=False):
        self.lora_A.append(nn.Parameter(A, requires_grad=trainable))
        self.lora_B.append(nn.Parameter(B, requires_grad=trainable))
        self.scales.append(scale)

    def forward(self, x):
        y = self.base(x)
        # under autocast the matmuls run in its dtype anyway: casting x up would only make the backward
        # keep a second copy of it (train.py's memory at 13B, docs/lora.md)
        autocast = torch.is_autocast_enabled(x.device.type)
        for A, B, s in zip(self.lora_A, self.lora_B, self.scales):
            y = y + (s * F.linear(F.linear(x if autocast else x.to(A.dtype), A), B)).to(y.dtype)
        return y


def _linears(model):
    """{official module name: (out_features, in_features)} of every linear layer LoRA can reach."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, FP8Linear)) and not name.endswith(".base"):
            out[name] = tuple(m.weight.shape)
        elif isinstance(m, LoRALinear):
            out[name] = tuple(m.base.weight.shape)
    return out


def peft_config(metadata):
    """The PEFT LoraConfig that diffusers saves in a LoRA file's metadata ("lora_adapter_metadata", JSON;
    keys prefixed "transformer." when a pipeline saved it), or None."""
    try:
        cfg = json.loads(metadata.get("lora_adapter_metadata") or "null")
    except ValueError:
        return None
    if not isinstance(cfg, dict):
        return None
    inner = {k[len("transformer."):]: v for k, v in cfg.items() if k.startswith("transformer.")}
    return inner or cfg


def _peft_scale(cfg, module, rank):
    """A layer's scale as PEFT builds it from its LoraConfig (peft tuners/lora: alpha_pattern's first key
    whose regex ends the module's name, else lora_alpha, PEFT's default 8; over the rank, or its square
    root with use_rslora). diffusers names its modules without the "transformer." prefix, as ours are here."""
    alpha = cfg.get("lora_alpha", 8)
    for pattern, value in (cfg.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            alpha = value
            break
    return alpha / (math.sqrt(rank) if cfg.get("use_rslora") else rank)


def read_lora(model, sd, source, peft=None):
    """A LoRA state dict in any of the three layouts -> {official module name: (A, B)}, each adapter's
    scale folded into B: alpha / rank where the file has .alpha keys (kohya/musubi); else the PEFT config
    diffusers saved beside the tensors (`peft`, see peft_config); else 1, as PEFT and diffusers read a file
    with neither.

    diffusers/PEFT keys name diffusers' separate q, k, v (and the single blocks' mlp) layers, each with its
    own A. On the official fused layer they become one adapter of rank r_q + r_k + r_v (+ r_mlp): the A's
    stacked, the B's on the block diagonal (rows q | k | v | mlp), which is the same sum of products
    exactly. A key that fits no layer, or a mis-shaped tensor, is a ValueError naming them."""
    linears = _linears(model)
    kohya = {n.replace(".", "_"): n for n in linears}
    # diffusers module -> (official module, first row, rows, swap the (shift, scale) halves)
    pieces = {}
    for off, difs in _name_pairs([n + ".weight" for n in linears], diffusers_side=False):
        if off not in linears:
            continue
        rows, hidden = linears[off][0], model.cfg.hidden_size
        sizes = [rows // len(difs)] * len(difs) if len(difs) < 4 else [hidden] * 3 + [rows - 3 * hidden]
        for d, start, n in zip(difs, [sum(sizes[:i]) for i in range(len(sizes))], sizes):
            pieces[d] = (off, start, n, off == "final_layer.adaLN_modulation.1")
    found, unknown = {}, []
    for key, t in sd.items():
        for suffix, part in ((".lora_A.weight", "A"), (".lora_down.weight", "A"), (".lora_B.weight", "B"),
                             (".lora_up.weight", "B"), (".alpha", "alpha")):
            if key.endswith(suffix):
                module = key[:-len(suffix)]
                break
        else:
            unknown.append(key)
            continue
        for pre in _KOHYA_PREFIXES:
            if module.startswith(pre):
                module = kohya.get(module[len(pre):], module)
        for pre in _PREFIXES:
            if module.startswith(pre):
                module = module[len(pre):]
        if module not in linears and module not in pieces:
            unknown.append(key)
            continue
        found.setdefault(module, {})[part] = t
    if unknown:
        raise ValueError(f"{source}: {len(unknown)} key(s) fit no linear layer of this DiT, e.g. "
                         f"{', '.join(unknown[:3])}: is it a HunyuanVideo LoRA (for this model size)?")
    adapters, wrong = {}, []
    for module, parts in found.items():
        off, start, n, swap = pieces.get(module, (module, 0, None, False))
        out_f, in_f = linears[off]
        n = out_f if n is None else n
        A, B = parts.get("A"), parts.get("B")
        if A is None or B is None or A.ndim != 2 or B.ndim != 2 or A.shape[1] != in_f or B.shape[0] != n \
                or A.shape[0] != B.shape[1]:
            got = [tuple(x.shape) if x is not None else "missing" for x in (A, B)]
            wrong.append(f"{module} A {got[0]}, B {got[1]} (layer {off}: in {in_f}, out {n})")
            continue
        work = torch.promote_types(A.dtype, torch.float32)
        rank = A.shape[0]
        scale = float(parts["alpha"]) / rank if "alpha" in parts else \
            _peft_scale(peft, module, rank) if peft is not None else 1.0
        B = B.to(work) * scale
        adapters.setdefault(off, []).append((start, n, A.to(work), _swap_halves(B) if swap else B))
    if wrong:
        raise ValueError(f"{source}: {len(wrong)} adapter(s) do not fit their layer: {'; '.join(wrong[:3])}")
    out = {}
    for off, parts in adapters.items():
        out_f, rank = linears[off][0], sum(A.shape[0] for _, _, A, _ in parts)
        A = torch.cat([A for _, _, A, _ in parts])
        B = torch.zeros(out_f, rank, dtype=A.dtype)
        col = 0
        for start, n, a, b in parts:
            B[start:start + n, col:col + a.shape[0]] = b
            col += a.shape[0]
        out[off] = (A, B)
    return out


def load_lora(model, path, scale=1.0):
    """Apply the LoRA file at `path` to `model` in place, at `scale`; several calls stack.

    Dense weights get the adapter merged, W <- W + scale * B A, computed in float64 and rounded to the
    weights' dtype once: no cost per step, and offloading, FSDP and sequence parallel then move ordinary
    weights. (In fp32 the CPU's and the GPU's matmuls round B A differently, so --offload, which merges on
    the CPU, would change some bf16 weights by a step.) fp8 weights (FP8Linear) keep it unmerged in a
    LoRALinear: a merge would have to requantise W + BA to 4 significant bits, losing most of the adapter."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"LoRA file not found: {path}")
    sd, metadata = read_safetensors(path)
    for name, (A, B) in read_lora(model, sd, path, peft_config(metadata)).items():
        module = model.get_submodule(name)
        target = module.base if isinstance(module, LoRALinear) else module
        if isinstance(target, nn.Linear):
            w = target.weight
            delta = B.to(w.device, torch.float64) @ A.to(w.device, torch.float64)
            w.data = (w.data.to(torch.float64) + scale * delta).to(w.dtype)
            continue
        if not isinstance(module, LoRALinear):
            parent, _, child = name.rpartition(".")
            module = LoRALinear(module)
            setattr(model.get_submodule(parent), child, module)
        device = module.base.weight.device
        module.add(A.to(device), B.to(device), scale)
    return model


def add_lora(model, rank, alpha, targets=LORA_TARGETS, seed=0):
    """Trainable adapters (fp32) on every linear layer whose name matches `targets` (a regex), base frozen:
    A ~ Kaiming-uniform, B = 0, so training starts from the base model (as PEFT initialises them).
    Returns the adapted module names."""
    g = torch.Generator().manual_seed(seed)
    model.requires_grad_(False)
    names = [n for n in _linears(model) if re.fullmatch(targets, n)]
    if not names:
        raise ValueError(f"--lora-targets {targets!r} matches no linear layer of this DiT: it must match a "
                         f"whole name, like double_blocks.0.img_attn_qkv (e.g. '.*img_attn_qkv')")
    for name in names:
        base = model.get_submodule(name)
        out_f, in_f = base.weight.shape
        bound = 1 / math.sqrt(in_f)  # kaiming_uniform_(a=sqrt(5)), PyTorch's nn.Linear default
        A = (torch.rand(rank, in_f, generator=g) * 2 - 1) * bound
        parent, _, child = name.rpartition(".")
        module = LoRALinear(base)
        module.add(A.to(base.weight.device), torch.zeros(out_f, rank, device=base.weight.device),
                   alpha / rank, trainable=True)
        setattr(model.get_submodule(parent), child, module)
    return names


def lora_state_dict(model):
    """The trained adapters in the original layout: diffusion_model.<official module>.lora_A/lora_B.weight,
    alpha folded in (A and B each times sqrt(alpha / rank), as musubi-tuner's converter writes them), which
    diffusers and ComfyUI read as they are and read_lora reads back with scale 1. Collective under FSDP."""
    sd = {}
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear) and m.lora_A[0].requires_grad:
            root = math.sqrt(m.scales[0])
            for key, p in (("lora_A", m.lora_A[0]), ("lora_B", m.lora_B[0])):
                p = p.full_tensor() if hasattr(p, "full_tensor") else p  # FSDP shards: gathered (collective)
                sd[f"diffusion_model.{name}.{key}.weight"] = (p.detach().float() * root).cpu().contiguous()
    return sd


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(description="Build a DiT config on the meta device and print its size")
    ap.add_argument("--config", default="13b", choices=list(CONFIGS))
    a = ap.parse_args()
    with torch.device("meta"):
        m = HunyuanVideoDiT(CONFIGS[a.config])
    print(f"{a.config}: {num_params(m):,} parameters, {len(m.state_dict())} tensors")
