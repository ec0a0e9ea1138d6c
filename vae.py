"""
HunyuanVideo causal 3D VAE (paper §4.1; the official "884-16c-hy" AutoencoderKLCausal3D,
hyvideo/vae/autoencoder_kl_causal_3d.py): 4x in time, 8x8 in space, 16 latent channels.

video (B, 3, 4k+1, H, W) in [-1, 1]  <->  latent (B, 16, k+1, H/8, W/8)

Every conv pads only the past in time, so the first frame is encoded on its own and one model serves
images (T=1) and videos (paper §4.1). Latents are unscaled: callers multiply by cfg.scaling_factor
before the DiT and divide before decoding.

Two ways through the same weights:
- `forward` paths: plain autograd code, used for training (and whenever grad is enabled);
- `stream` paths: used under torch.no_grad()/inference_mode unless the call is small (PLAIN_ELEMENTS,
  where the plain path runs without grad on the whole batch). Each causal conv runs a few frames at a
  time with a small cache of the previous frames, GroupNorm statistics are accumulated over those chunks,
  and residuals are added in place, so no layer holds more than its input and output at full size: a
  full-resolution decode fits in a few GB (docs/performance.md). The result equals the plain path up to
  float rounding. Its machinery (and its fused Triton kernels) is at the end of this file.

Also here: tiled encode/decode with the official windows and linear blends (paper §4.1, official
autoencoder_kl_causal_3d.py spatial_/temporal_tiled_encode/decode), a loader for the released checkpoint,
and the training losses of paper eq. 1 (L1 + 0.1 LPIPS + 0.05 GAN + 1e-6 KL).
"""

import json
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from dit import check_state_dict, read_safetensors  # the strict-load check and reader every loader shares

try:  # optional: the stream path's fused kernels on CUDA (end of file); CUDA builds of torch ship Triton
    import triton
    import triton.language as tl
except ImportError:
    triton = None

# -----------------------------------------------------------------------------
# config


@dataclass
class VAEConfig:
    """Shape of the causal 3D VAE; the defaults are the released "884-16c-hy" (paper §4.1)."""
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 16
    block_out_channels: tuple = (128, 256, 512, 512)
    layers_per_block: int = 2  # encoder resnets per block; the decoder has one more per block
    norm_groups: int = 32
    time_compression: int = 4
    spatial_compression: int = 8
    scaling_factor: float = 0.476986  # the release's config.json; applied by the callers, no shift
    mid_attention: bool = True
    # inference tiling (paper §4.1): the release's config.json sample_size / sample_tsize and the
    # official 25% overlap (autoencoder_kl_causal_3d.py tile_overlap_factor)
    tile_sample_size: int = 256
    tile_sample_frames: int = 64
    tile_overlap: float = 0.25


CONFIGS = {
    "884-16c-hy": VAEConfig(),
    # a few-second CPU model with the same topology (4 blocks: 8x space, 4x time) and small tiles
    "tiny": VAEConfig(block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_groups=8,
                      latent_channels=4, tile_sample_size=64, tile_sample_frames=16),
}

# Inference knobs of the no-grad stream path (end of this file); tests and bench.py set them.
# Elements of conv input per chunk: bounds the fp32 temporaries to ~128 MB each.
STREAM_ELEMENTS = 1 << 25
# A no-grad call whose widest activation (widest block x batch x full-resolution voxels) has at most this
# many elements takes the plain path on the whole batch: streaming saves memory at scale, but on small
# clips (caching a demo's latents) its one-sample, few-frame convolutions are slower (docs/performance.md).
PLAIN_ELEMENTS = 1 << 25
# On CUDA tensors the stream path's GroupNorm statistics and its norm-SiLU-cast-into-the-padded-buffer step
# run as two Triton kernels when Triton is installed: the same fp32 arithmetic as the torch fallback,
# but each activation is read once in fp16 instead of through fp32 temporaries, the largest
# element-wise cost of a decode (docs/performance.md). Set False to run the torch code everywhere.
FUSED_KERNELS = True

# -----------------------------------------------------------------------------
# building blocks, in the order data flows through them


def _autocast(x):
    """Whether autocast is on for x's device (meta tensors, used by the memory tests, have none)."""
    return torch.amp.is_autocast_available(x.device.type) and torch.is_autocast_enabled(x.device.type)


class CausalConv3d(nn.Module):
    """Conv3d with replicate padding: k//2 on both sides in space, k-1 frames in front only in time, so
    output frame t sees input frames <= t (paper §4.1; official unet_causal_3d_blocks.py CausalConv3d)."""

    def __init__(self, cin, cout, kernel_size=3, stride=1):
        super().__init__()
        self.conv = nn.Conv3d(cin, cout, kernel_size, stride=stride)  # key: <name>.conv.weight
        p = kernel_size // 2
        self.padding = (p, p, p, p, kernel_size - 1, 0)  # (W, W, H, H, T front, T back)

    def forward(self, x):
        c = self.conv
        if (x.shape[2] == 1 and c.kernel_size[0] > 1 and c.weight.dtype in (torch.float32, torch.float64)
                and not _autocast(x)):
            # One frame (an image): the causal pad repeats it in every past slot, so all k time taps see
            # the same frame and the 3D conv is a 2D conv with the taps summed, k times fewer multiply-adds
            # for the same numbers up to rounding (any time stride gives one output frame). fp32/fp64
            # only: in fp16/bf16 (or under autocast) the summed taps would be rounded to half, where the
            # official CausalConv3d.forward convolves the replicated frame in 3D with each tap as stored.
            x2 = F.pad(x[:, :, 0], self.padding[:4], mode="replicate")
            return F.conv2d(x2, c.weight.sum(2), c.bias, c.stride[1:]).unsqueeze(2)
        return c(F.pad(x, self.padding, mode="replicate"))


def _norm(norm, x, silu=True):
    """GroupNorm (then SiLU) as the official computes it: its pipeline decodes in fp16/bf16 under CUDA
    autocast (official pipeline_hunyuan_video.py, around vae.decode), where GroupNorm returns fp32 and SiLU
    runs in fp32, so the next conv or linear rounds its input to half once. Half weights without autocast
    would round after the norm and again after the SiLU (and a half-input GroupNorm kernel computes its
    statistics differently); the stream path gets the same single rounding from _norm_silu_into."""
    if x.dtype in (torch.float16, torch.bfloat16) and not _autocast(x):
        h = F.group_norm(x.float(), norm.num_groups, norm.weight.float(), norm.bias.float(), norm.eps)
        return (F.silu(h) if silu else h).to(x.dtype)
    h = norm(x)  # fp32/fp64, or under autocast, which applies the official's precisions itself
    return F.silu(h) if silu else h


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv twice plus a shortcut, 1x1x1-projected when channels change (official
    unet_causal_3d_blocks.py ResnetBlockCausal3D, its temb-free path)."""

    def __init__(self, cin, cout, groups):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=1e-6)
        self.conv1 = CausalConv3d(cin, cout, 3)
        self.norm2 = nn.GroupNorm(groups, cout, eps=1e-6)
        self.conv2 = CausalConv3d(cout, cout, 3)  # dropout 0 in the released model: omitted
        self.conv_shortcut = CausalConv3d(cin, cout, 1) if cin != cout else None

    def forward(self, x):
        h = self.conv1(_norm(self.norm1, x))
        h = self.conv2(_norm(self.norm2, h))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h

    def stream(self, x):  # consumes x: its memory may hold the output
        T = x.shape[2]
        s1 = _group_norm_affine(self.norm1, x)
        h = _stream_conv(self.conv1, lambda a, b: x[:, :, a:b], T, affine=s1)
        s2 = _group_norm_affine(self.norm2, h)
        read2 = lambda a, b: h[:, :, a:b]
        if self.conv_shortcut is None:  # x + conv2(...), in place
            return _stream_conv(self.conv2, read2, T, out=x, accumulate=True, affine=s2)
        out = _stream_conv(self.conv2, read2, T, out=h, affine=s2)  # overwrite h frame by frame...
        return _stream_conv(self.conv_shortcut, lambda a, b: x[:, :, a:b], T, out=out, accumulate=True)  # +x


class Downsample(nn.Module):
    """Strided causal conv, stride (t, h, w) = (2|1, 2|1, 2|1); frame 0 sees only itself (official
    DownsampleCausal3D)."""

    def __init__(self, channels, stride):
        super().__init__()
        self.conv = CausalConv3d(channels, channels, 3, stride=stride)

    def forward(self, x):
        return self.conv(x)

    def stream(self, x):
        return _stream_conv(self.conv, lambda a, b: x[:, :, a:b], x.shape[2])


class Upsample(nn.Module):
    """Nearest upsampling then a causal conv; the first frame is upsampled in space only (official
    UpsampleCausal3D), so T frames become 1 + ft*(T-1): the causal image frame stays one frame."""

    def __init__(self, channels, factor):
        super().__init__()
        self.factor = factor  # (ft, fh, fw)
        self.conv = CausalConv3d(channels, channels, 3)

    def _frames(self, x, a, b, spatial=True):
        """Upsampled frames a..b-1: frame 0 comes from input frame 0, frame u >= 1 from 1 + (u-1)//ft.
        spatial=False: upsampled in time only (the stream path upsamples in space as it pads)."""
        ft = self.factor[0]
        src = (torch.arange(a, b, device=x.device) + ft - 1) // ft
        x = x.index_select(2, src)
        return F.interpolate(x, scale_factor=(1,) + tuple(self.factor[1:]), mode="nearest") if spatial else x

    def forward(self, x):
        return self.conv(self._frames(x, 0, 1 + self.factor[0] * (x.shape[2] - 1)))

    def stream(self, x):
        T_up = 1 + self.factor[0] * (x.shape[2] - 1)
        read = lambda a, b: self._frames(x, a, b, spatial=False)
        return _stream_conv(self.conv, read, T_up, up=tuple(self.factor[1:]))


def _frame_causal_attention(q, k, v, n):
    """Single-head attention where the n tokens of frame f see all tokens of frames <= f: the official
    frame-causal mask (unet_causal_3d_blocks.py prepare_causal_attention_mask)."""
    # one SDPA call per query frame over its visible prefix: same result as the additive -inf block mask,
    # without materialising an (L, L) mask
    q, k, v = q[:, None], k[:, None], v[:, None]  # (B, 1, L, C)
    out = []
    for f in range(q.shape[2] // n):
        seen = (f + 1) * n  # tokens of frames 0..f
        out.append(F.scaled_dot_product_attention(q[:, :, f * n:seen], k[:, :, :seen], v[:, :, :seen]))
    return torch.cat(out, dim=2)[:, 0]


class Attention(nn.Module):
    """Single-head (dim = channels) frame-causal self-attention with its own GroupNorm and a residual
    (the diffusers Attention inside the official UNetMidBlockCausal3D)."""

    def __init__(self, channels, groups):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])  # key to_out.0, as in the release

    def forward(self, x):
        B, C, T, H, W = x.shape
        h = _norm(self.group_norm, x, silu=False).flatten(2).transpose(1, 2)  # (B, T*H*W, C), frame-major
        h = _frame_causal_attention(self.to_q(h), self.to_k(h), self.to_v(h), H * W)  # scale 1/sqrt(C)
        h = self.to_out[0](h)
        return x + h.transpose(1, 2).reshape(B, C, T, H, W)

    stream = forward  # latent resolution: small enough for the plain path


class MidBlock(nn.Module):
    """resnet, attention, resnet at the lowest resolution (official UNetMidBlockCausal3D)."""

    def __init__(self, channels, groups, attention):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, groups) for _ in range(2)])
        self.attentions = nn.ModuleList([Attention(channels, groups)]) if attention else None

    def forward(self, x):
        x = self.resnets[0](x)
        if self.attentions is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x)

    def layers(self):  # for the stream path
        attention = [self.attentions[0]] if self.attentions is not None else []
        return [self.resnets[0], *attention, self.resnets[1]]


class Block(nn.Module):
    """A down block (resnets, then a Downsample if any) or an up block (resnets, then an Upsample if any):
    the official DownEncoderBlockCausal3D / UpDecoderBlockCausal3D."""

    def __init__(self, cin, cout, n_resnets, groups, down=None, up=None):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(cin if i == 0 else cout, cout, groups)
                                      for i in range(n_resnets)])
        if down is not None:
            self.downsamplers = nn.ModuleList([Downsample(cout, down)])
        if up is not None:
            self.upsamplers = nn.ModuleList([Upsample(cout, up)])

    def layers(self):  # in order; the stream path runs them one by one
        return [*self.resnets, *getattr(self, "downsamplers", []), *getattr(self, "upsamplers", [])]

    def forward(self, x):
        for layer in self.layers():
            x = layer(x)
        return x


def _resample_factors(cfg):
    """Per block (t, h, w) factor, the official rule (hyvideo/vae/vae.py Encoder/Decoder): space in the
    first log2(cs) blocks, time in the log2(ct) blocks before the last; the last block never resamples.
    None = no resampler. The release: (1,2,2), (2,2,2), (2,2,2), None."""
    n = len(cfg.block_out_channels)
    ns, nt = cfg.spatial_compression.bit_length() - 1, cfg.time_compression.bit_length() - 1
    ts = [(2 if n - 1 - nt <= i < n - 1 else 1, 2 if i < ns else 1) for i in range(n)]
    got = (2 ** sum(t == 2 for t, _ in ts), 2 ** sum(s == 2 for _, s in ts))
    assert got == (cfg.time_compression, cfg.spatial_compression), \
        f"{n} blocks give {got[0]}x time, {got[1]}x space"
    return [(t, s, s) if (t, s) != (1, 1) else None for t, s in ts]


class Encoder(nn.Module):
    """conv_in, down blocks, mid block, GroupNorm-SiLU-conv_out to 2*latent channels (mean, logvar)
    (official hyvideo/vae/vae.py EncoderCausal3D)."""

    def __init__(self, cfg):
        super().__init__()
        ch = cfg.block_out_channels
        self.conv_in = CausalConv3d(cfg.in_channels, ch[0], 3)
        self.down_blocks = nn.ModuleList([
            Block(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, cfg.norm_groups, down=f)
            for i, f in enumerate(_resample_factors(cfg))])
        self.mid_block = MidBlock(ch[-1], cfg.norm_groups, cfg.mid_attention)
        self.conv_norm_out = nn.GroupNorm(cfg.norm_groups, ch[-1], eps=1e-6)
        self.conv_out = CausalConv3d(ch[-1], 2 * cfg.latent_channels, 3)
        self.gradient_checkpointing = False

    def forward(self, x):
        x = self.conv_in(x)
        for block in list(self.down_blocks) + [self.mid_block]:
            x = checkpoint(block, x, use_reentrant=False) if self.gradient_checkpointing else block(x)
        return self.conv_out(_norm(self.conv_norm_out, x))

    def stream(self, video):
        x = _stream_conv(self.conv_in, lambda a, b: video[:, :, a:b], video.shape[2])
        # one flat loop, so no caller frame keeps a finished layer's input alive
        for layer in [l for blk in self.down_blocks for l in blk.layers()] + self.mid_block.layers():
            x = layer.stream(x)
        s = _group_norm_affine(self.conv_norm_out, x)
        return _stream_conv(self.conv_out, lambda a, b: x[:, :, a:b], x.shape[2], affine=s)


class Decoder(nn.Module):
    """conv_in, mid block, up blocks (layers_per_block + 1 resnets each), GroupNorm-SiLU-conv_out to RGB
    (official hyvideo/vae/vae.py DecoderCausal3D)."""

    def __init__(self, cfg):
        super().__init__()
        ch = list(reversed(cfg.block_out_channels))
        self.conv_in = CausalConv3d(cfg.latent_channels, ch[0], 3)
        self.mid_block = MidBlock(ch[0], cfg.norm_groups, cfg.mid_attention)
        # mirror of the encoder: block i upsamples like encoder block i downsamples
        self.up_blocks = nn.ModuleList([
            Block(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, cfg.norm_groups, up=f)
            for i, f in enumerate(_resample_factors(cfg))])
        self.conv_norm_out = nn.GroupNorm(cfg.norm_groups, ch[-1], eps=1e-6)
        self.conv_out = CausalConv3d(ch[-1], cfg.out_channels, 3)
        self.gradient_checkpointing = False

    def forward(self, z):
        x = self.conv_in(z)
        for block in [self.mid_block] + list(self.up_blocks):
            x = checkpoint(block, x, use_reentrant=False) if self.gradient_checkpointing else block(x)
        return self.conv_out(_norm(self.conv_norm_out, x))

    def stream(self, z):
        x = _stream_conv(self.conv_in, lambda a, b: z[:, :, a:b], z.shape[2])
        for layer in self.mid_block.layers() + [l for blk in self.up_blocks for l in blk.layers()]:
            x = layer.stream(x)
        s = _group_norm_affine(self.conv_norm_out, x)
        return _stream_conv(self.conv_out, lambda a, b: x[:, :, a:b], x.shape[2], affine=s)


# -----------------------------------------------------------------------------
# the model


class CausalVAE(nn.Module):
    """HunyuanVideo's causal 3D VAE (paper §4.1; official autoencoder_kl_causal_3d.py
    AutoencoderKLCausal3D); state-dict keys identical to the release."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        c = cfg.latent_channels
        self.quant_conv = nn.Conv3d(2 * c, 2 * c, 1)
        self.post_quant_conv = nn.Conv3d(c, c, 1)
        # weights: PyTorch default init; the paper trains the VAE from scratch (§4.1)

    @property
    def dtype(self):
        return self.quant_conv.weight.dtype

    # --- shapes

    def latent_shape(self, T, H, W):
        """Latent (T', H', W') for a valid video (T, H, W)."""
        ct, cs = self.cfg.time_compression, self.cfg.spatial_compression
        return (T - 1) // ct + 1, H // cs, W // cs

    def _check_video(self, x):
        c = self.cfg
        if x.ndim != 5 or x.shape[1] != c.in_channels:
            raise ValueError(f"CausalVAE.encode: expected a video (B, {c.in_channels}, T, H, W), "
                             f"got {tuple(x.shape)}")
        T, H, W = x.shape[2:]
        ct, cs = c.time_compression, c.spatial_compression
        bad = []
        if T < 1 or (T - 1) % ct:
            lo = max(1, (T - 1) // ct * ct + 1)
            near = lo if T <= lo or T - lo <= lo + ct - T else lo + ct
            bad.append(f"T={T} frames must be {ct}k+1 (1 for an image), nearest valid T={near}")
        for name, n in (("H", H), ("W", W)):
            if n < cs or n % cs:
                lo = max(cs, n // cs * cs)
                near = lo if n <= lo or n - lo <= lo + cs - n else lo + cs
                bad.append(f"{name}={n} must be a multiple of {cs}, nearest valid {name}={near}")
        if bad:
            raise ValueError("CausalVAE.encode: " + "; ".join(bad))

    # --- one tile, untiled: plain path when gradients are needed or the call is small, else the stream path

    def _encode(self, x, plain):
        return self.quant_conv(self.encoder(x) if plain else self.encoder.stream(x))

    def _decode(self, z, plain):
        z = self.post_quant_conv(z)
        return self.decoder(z) if plain else self.decoder.stream(z)

    def _plain(self, batch, frames, height, width):
        """The plain path when gradients are needed, or when a no-grad call is small (see PLAIN_ELEMENTS)."""
        widest = batch * frames * height * width * max(self.cfg.block_out_channels)
        return torch.is_grad_enabled() or widest <= PLAIN_ELEMENTS

    def _tiled(self, x, fn, size_in, size_out, frames_in, frames_out):
        """Tiling at inference (paper §4.1) with the official windows (autoencoder_kl_causal_3d.py
        temporal_tiled_encode/decode around spatial_tiled_encode/decode): windows of frames_in+1 frames if
        x is longer than frames_in, inside them size_in x size_in tiles if x is larger than size_in; both
        overlap by tile_overlap, and outputs are blended over tile_overlap of the output tile (size_out,
        frames_out) and cropped to the rest."""
        ov = self.cfg.tile_overlap
        spatial = lambda v: (fn(v) if max(v.shape[-2:]) <= size_in else _tile_space(
            v, fn, size_in, int(size_in * (1 - ov)), int(size_out * ov), size_out - int(size_out * ov)))
        if x.shape[2] <= frames_in:
            return spatial(x)
        return _tile_time(x, spatial, frames_in, int(frames_in * (1 - ov)), int(frames_out * ov),
                          frames_out - int(frames_out * ov))

    # --- public API (call under torch.no_grad()/inference_mode() for the memory-light stream path)

    def encode(self, x, tiled=False):
        """x (B, 3, T, H, W) in [-1, 1], T = 4k+1, H, W multiples of 8 -> (mean, logvar), each
        (B, C, k+1, H/8, W/8); logvar clamped to [-30, 20] as the official DiagonalGaussianDistribution
        does. tiled: the official spatial + temporal tiling."""
        self._check_video(x)
        c = self.cfg
        px, lat = c.tile_sample_size, c.tile_sample_size // c.spatial_compression
        frames, lat_frames = c.tile_sample_frames, c.tile_sample_frames // c.time_compression
        plain = self._plain(*x.shape[:1], *x.shape[2:])
        enc = lambda v: self._encode(v, plain)
        run = (lambda v: self._tiled(v, enc, px, lat, frames, lat_frames)) if tiled else enc
        x = x.to(self.dtype)
        # stream path: one sample at a time (GroupNorm is per sample, so the result is the same)
        moments = run(x) if plain else torch.cat([run(xi) for xi in x.split(1)])
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z, tiled=False):
        """z (B, C, T', H', W') unscaled latent -> video (B, 3, 4(T'-1)+1, 8H', 8W'), roughly in [-1, 1]."""
        c = self.cfg
        if z.ndim != 5 or z.shape[1] != c.latent_channels:
            raise ValueError(f"CausalVAE.decode: expected a latent (B, {c.latent_channels}, T', H', W'), "
                             f"got {tuple(z.shape)}")
        px, lat = c.tile_sample_size, c.tile_sample_size // c.spatial_compression
        frames, lat_frames = c.tile_sample_frames, c.tile_sample_frames // c.time_compression
        sc, tc = c.spatial_compression, c.time_compression
        plain = self._plain(z.shape[0], (z.shape[2] - 1) * tc + 1, z.shape[3] * sc, z.shape[4] * sc)
        dec = lambda v: self._decode(v, plain)
        run = (lambda v: self._tiled(v, dec, lat, px, lat_frames, frames)) if tiled else dec
        z = z.to(self.dtype)
        return run(z) if plain else torch.cat([run(zi) for zi in z.split(1)])

    def forward(self, x, sample_posterior=True, tile_prob=0.0):
        """Training round trip -> (reconstruction, mean, logvar). tile_prob: paper §4.1 anti-tiling-artifact
        fine-tune; with this probability the step encodes and decodes tiled (only has an effect when the clip
        is larger than the tiles, so set cfg.tile_sample_size/frames below the training clip size)."""
        tiled = bool(tile_prob > 0 and torch.rand(()) < tile_prob)
        mean, logvar = self.encode(x, tiled=tiled)
        z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean) if sample_posterior else mean
        return self.decode(z, tiled=tiled), mean, logvar


# -----------------------------------------------------------------------------
# tiling: the official windows and linear blends (paper §4.1; autoencoder_kl_causal_3d.py)


def _blend(a, b, extent, dim):
    """Cross-fade the head of b with the tail of a over `extent` positions along dim: position y of b gets
    weight y/E, the matching position of a's tail 1 - y/E. Returns a new b."""
    e = min(a.shape[dim], b.shape[dim], extent)
    if e == 0:
        return b
    y = torch.arange(e, dtype=torch.float64, device=b.device) / e
    shape = [1] * b.ndim
    shape[dim] = e
    # The official blend_v/blend_h/blend_t multiply each position by a Python float: in fp16/bf16 every
    # product is computed in fp32 and rounded to half, then the two halves are added in half. The same
    # here with fp32 weights (fp64 for fp64 tiles); rounding the weights to half first would differ.
    wt = torch.promote_types(b.dtype, torch.float32)
    wa, wb = (1 - y).to(wt).view(shape), y.to(wt).view(shape)
    head = (a.narrow(dim, a.shape[dim] - e, e) * wa).to(b.dtype) + (b.narrow(dim, 0, e) * wb).to(b.dtype)
    return torch.cat([head, b.narrow(dim, e, b.shape[dim] - e)], dim=dim)


def _tile_space(x, fn, size, stride, extent, keep):
    """fn on overlapping size x size tiles of x (stride apart), each tile blended with the finished tile
    above and then the one to its left, keeping keep x keep of each (the last row/column keeps the rest)."""
    H, W = x.shape[-2:]
    rows = [[fn(x[..., i:i + size, j:j + size]) for j in range(0, W, stride)] for i in range(0, H, stride)]
    for i, row in enumerate(rows):
        for j in range(len(row)):
            if i > 0:
                row[j] = _blend(rows[i - 1][j], row[j], extent, dim=-2)
            if j > 0:
                row[j] = _blend(row[j - 1], row[j], extent, dim=-1)
    return torch.cat([torch.cat([t[..., :keep, :keep] for t in row], dim=-1) for row in rows], dim=-2)


def _tile_time(x, fn, size, stride, extent, keep):
    """fn on windows of size+1 frames starting every `stride` frames. A later window's first output
    frame (its causal 'image' frame) is dropped, the rest blended with the previous window's tail; the
    first window keeps keep+1 frames, the others keep."""
    out, prev = [], None
    for n, i in enumerate(range(0, x.shape[2], stride)):
        t = fn(x[:, :, i:i + size + 1])
        if n > 0:
            t = _blend(prev, t[:, :, 1:], extent, dim=2)
        out.append(t[:, :, :keep + (n == 0)])
        prev = t
    return torch.cat(out, dim=2)


# -----------------------------------------------------------------------------
# loading the released weights


def _config_from_json(path, base):
    """VAEConfig from an official or diffusers config.json (the two name a few fields differently)."""
    j = json.loads(Path(path).read_text())
    get = lambda *names, default: next((j[n] for n in names if n in j), default)
    sample_size = get("sample_size", default=base.tile_sample_size)
    return replace(
        base,
        in_channels=get("in_channels", default=base.in_channels),
        out_channels=get("out_channels", default=base.out_channels),
        latent_channels=get("latent_channels", default=base.latent_channels),
        block_out_channels=tuple(get("block_out_channels", default=base.block_out_channels)),
        layers_per_block=get("layers_per_block", default=base.layers_per_block),
        norm_groups=get("norm_num_groups", default=base.norm_groups),
        time_compression=get("time_compression_ratio", "temporal_compression_ratio",
                             default=base.time_compression),
        spatial_compression=get("spatial_compression_ratio", default=base.spatial_compression),
        scaling_factor=get("scaling_factor", default=base.scaling_factor),
        mid_attention=get("mid_block_add_attention", default=base.mid_attention),
        tile_sample_size=sample_size[0] if isinstance(sample_size, (list, tuple)) else sample_size,
        tile_sample_frames=get("sample_tsize", default=base.tile_sample_frames),
    )


def load_vae(path, cfg=None, device="cpu", dtype=torch.float32):
    """Load the released VAE: the official vae/ dir or its pytorch_model.pt, a .safetensors file, or a
    diffusers VAE dir (same key names). config.json next to the weights, if any, sets the config unless cfg
    is given. Strict: any missing, unexpected or mis-shaped key is an error. Returns an eval, frozen model."""
    path = Path(path)
    base = cfg or CONFIGS["884-16c-hy"]
    if path.is_dir():
        names = ["pytorch_model.pt", "diffusion_pytorch_model.safetensors", "model.safetensors",
                 "diffusion_pytorch_model.bin"]
        found = [path / n for n in names if (path / n).exists()]
        if not found:
            raise FileNotFoundError(f"load_vae: {path} holds none of {names}")
        if cfg is None and (path / "config.json").exists():
            base = _config_from_json(path / "config.json", base)
        path = found[0]
    if not path.exists():
        raise FileNotFoundError(f"load_vae: {path} does not exist")
    if path.suffix == ".safetensors":
        sd = read_safetensors(str(path))[0]
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # truncated or not a torch file
            raise ValueError(f"load_vae: cannot read {path} ({type(e).__name__}: {e}): the file is damaged "
                             "or truncated; re-download it") from None
    # the official loader (hyvideo/vae/__init__.py load_vae) accepts a "state_dict" wrapper and a "vae."
    # key prefix, as its training checkpoints have them
    if "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if any(k.startswith("vae.") for k in sd):
        sd = {k[4:]: v for k, v in sd.items() if k.startswith("vae.")}

    with torch.device("meta"):
        model = CausalVAE(base)
    check_state_dict(model, sd, f"load_vae: {path}",
                     hint=f"the model was built from {base}; pass the checkpoint's config as cfg=, "
                          "or load its directory with config.json")
    model.load_state_dict(sd, strict=True, assign=True)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


# -----------------------------------------------------------------------------
# training losses (paper §4.1 eq. 1: L1 + 0.1 LPIPS + 0.05 GAN + 1e-6 KL)


class Discriminator3D(nn.Module):
    """3D PatchGAN: a grid of real/fake logits, one per overlapping space-time patch.

    The paper does not describe its discriminator. This is the pix2pix N-layer design with 3D convs; time
    kernels are 3 with stride 1 so the same net judges images (T=1) and videos (4:1 video:image mix, paper
    §4.1). GroupNorm instead of BatchNorm: small per-GPU batches and DDP."""

    def __init__(self, in_channels=3, channels=64, n_layers=3):
        super().__init__()
        layers = [nn.Conv3d(in_channels, channels, (3, 4, 4), stride=(1, 2, 2), padding=1),
                  nn.LeakyReLU(0.2)]
        c = channels
        for n in range(1, n_layers + 1):
            c_out = channels * min(2 ** n, 8)
            stride = (1, 2, 2) if n < n_layers else 1
            layers += [nn.Conv3d(c, c_out, (3, 4, 4), stride=stride, padding=1, bias=False),
                       nn.GroupNorm(min(32, c_out), c_out), nn.LeakyReLU(0.2)]
            c = c_out
        layers.append(nn.Conv3d(c, 1, (3, 4, 4), padding=1))
        self.net = nn.Sequential(*layers)
        self.initialize_weights()

    def initialize_weights(self):
        for m in self.modules():  # pix2pix / taming init
            if isinstance(m, nn.Conv3d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.GroupNorm):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.net(x)


class LPIPS(nn.Module):
    """LPIPS (Zhang et al. 2018) on VGG16: unit-normalised features of 5 layers, squared difference, learned
    per-channel weights, spatial mean, summed. Needs pretrained weights we cannot ship: a state dict with
    torchvision VGG16 keys `features.N.*` and the LPIPS v0.1 keys `linK.model.1.weight` (e.g. the two
    released files, both passed in)."""

    # torchvision vgg16.features layout; 'M' = max pool. LPIPS taps relu1_2, relu2_2, relu3_3, relu4_3,
    # relu5_3
    CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
    TAPS = (3, 8, 15, 22, 29)  # indices in features after whose ReLU LPIPS reads
    SHIFT = (-0.030, -0.088, -0.188)  # LPIPS ScalingLayer constants (ImageNet stats in [-1, 1] units)
    SCALE = (0.458, 0.448, 0.450)

    def __init__(self, paths):
        super().__init__()
        layers, c = [], 3
        for v in self.CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1), nn.ReLU()]
                c = v
        self.features = nn.Sequential(*layers)
        for k, ch in enumerate((64, 128, 256, 512, 512)):
            setattr(self, f"lin{k}", nn.Module())
            # LPIPS keys linK.model.1.weight: model.0 is a dropout in the original, inert at eval
            getattr(self, f"lin{k}").model = nn.Sequential(nn.Identity(), nn.Conv2d(ch, 1, 1, bias=False))
        self.register_buffer("shift", torch.tensor(self.SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(self.SCALE).view(1, 3, 1, 1), persistent=False)
        sd = {}
        for p in [paths] if isinstance(paths, (str, Path)) else paths:
            sd.update(torch.load(p, map_location="cpu", weights_only=True))
        want = self.state_dict()
        sd = {k: v for k, v in sd.items() if k in want}  # drop e.g. the VGG classifier
        check_state_dict(self, sd, f"LPIPS weights {paths}",
                         hint="pass torchvision's vgg16 file (features.N.*) and LPIPS v0.1 vgg.pth (linK.*)")
        self.load_state_dict(sd)
        self.requires_grad_(False).eval()

    def forward(self, x, y):  # images (N, 3, H, W) in [-1, 1] -> (N,)
        feats = []
        for inp in (x, y):
            h, out = (inp - self.shift) / self.scale, []
            for i, layer in enumerate(self.features[:self.TAPS[-1] + 1]):
                h = layer(h)
                if i in self.TAPS:
                    out.append(h / (h.square().sum(1, keepdim=True).sqrt() + 1e-10))
            feats.append(out)
        return sum(getattr(self, f"lin{k}").model((a - b).square()).mean((1, 2, 3))
                   for k, (a, b) in enumerate(zip(*feats)))


class VAELoss(nn.Module):
    """Paper eq. 1: L1 + 0.1 LPIPS + 0.05 GAN + 1e-6 KL, with a 3D PatchGAN discriminator.

    Choices the paper leaves open (and why):
    - GAN objective: hinge (VQGAN/LDM autoencoders, whose loss this recipe follows): D minimises
      relu(1 - D(x)) + relu(1 + D(x_hat)), the VAE minimises -D(x_hat).
    - Fixed weight 0.05 (the paper's) switched on at `gan_start` steps, no LDM adaptive weight, which would
      replace the paper's 0.05 by a gradient-norm ratio; the delay lets reconstruction settle before the
      discriminator's gradients matter.
    - Reductions: L1 and LPIPS are means over pixels; the KL (the official posterior's kl(), a sum over a
      sample's latent elements) is divided by the sample's pixel elements 3 T H W. The recipes whose
      weights eq. 1 reuses (LDM's autoencoder loss; Open-Sora's HunyuanVideo-VAE config, 0.1 / 0.05 / 1e-6)
      sum both the reconstruction and the KL per sample, so 1e-6 weighs the KL against a per-pixel L1 the
      same way whatever the crop. kl_sum=True keeps the KL summed (3 T H W times stronger): the demo's.
    - Perceptual: LPIPS only from a local weights file; without one the term is off, said once."""

    def __init__(self, perceptual_weights=None, gan_start=50_000, disc_channels=64, disc_layers=3,
                 w_perceptual=0.1, w_gan=0.05, w_kl=1e-6, w_mse=0.0, w_chroma=0.0, w_latent_rgb=0.0,
                 kl_sum=False):
        super().__init__()
        self.discriminator = Discriminator3D(3, disc_channels, disc_layers)
        self.lpips = LPIPS(perceptual_weights) if perceptual_weights else None
        if self.lpips is None:
            warnings.warn("VAELoss: no LPIPS/VGG weights given (perceptual_weights=...): "
                          "the 0.1 x perceptual term of paper eq. 1 is OFF for this run.", stacklevel=2)
        self.gan_start, self.w_perceptual, self.w_gan, self.w_kl = gan_start, w_perceptual, w_gan, w_kl
        self.kl_sum = kl_sum
        # Not in the paper: an optional MSE term. L1 alone is median-seeking, so with neither LPIPS nor a GAN
        # (short CPU runs) a small bright object on a large background is ignored for a long time.
        self.w_mse = w_mse
        # Also not in the paper: an MSE on the error's chroma (its part orthogonal to grey, the per-pixel mean
        # over RGB). Gradient descent learns the data's strong directions first; in mostly-grey footage colour
        # is a weak one and is learned last, so a short run reweights it.
        self.w_chroma = w_chroma
        # Also not in the paper: latent channels 0-2 held to each cell's mean RGB. A small DiT trained for
        # minutes learns the large directions of its latent space first; this keeps colour one of them.
        self.w_latent_rgb = w_latent_rgb

    def forward(self, x, recon, mean, logvar, step):
        """The VAE's loss -> (total, dict of the terms). x, recon: (B, 3, T, H, W)."""
        err = x - recon
        logs = {"l1": err.abs().mean()}
        kl = 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).flatten(1).sum(1)
        logs["kl"] = (kl if self.kl_sum else kl / x[0].numel()).mean()
        total = logs["l1"] + self.w_kl * logs["kl"]
        if self.w_mse:
            logs["mse"] = err.square().mean()
            total = total + self.w_mse * logs["mse"]
        if self.w_chroma:
            logs["chroma"] = (err - err.mean(1, keepdim=True)).square().mean()
            total = total + self.w_chroma * logs["chroma"]
        if self.w_latent_rgb:
            # cell means on the latent grid: frame 0 alone, then groups of ct frames (ct = 4 when released)
            s = x.shape[3] // mean.shape[3]
            cells = F.avg_pool3d(x[:, :, :1], (1, s, s))
            if x.shape[2] > 1:
                ct = (x.shape[2] - 1) // (mean.shape[2] - 1)
                cells = torch.cat([cells, F.avg_pool3d(x[:, :, 1:], (ct, s, s))], 2)
            logs["latent_rgb"] = (mean[:, :3] - cells).square().mean()
            total = total + self.w_latent_rgb * logs["latent_rgb"]
        if self.lpips is not None:
            frames = lambda v: v.transpose(1, 2).flatten(0, 1)  # (B*T, 3, H, W): LPIPS is per image
            logs["perceptual"] = self.lpips(frames(x), frames(recon)).mean()
            total = total + self.w_perceptual * logs["perceptual"]
        if step >= self.gan_start:
            self.discriminator.requires_grad_(False)  # D is a fixed critic here; trained in disc_loss
            logs["gan"] = -self.discriminator(recon).mean()
            self.discriminator.requires_grad_(True)
            total = total + self.w_gan * logs["gan"]
        return total, logs

    def disc_loss(self, x, recon, step):
        """Hinge loss for the discriminator (zero before gan_start)."""
        if step < self.gan_start:
            return x.new_zeros(())
        real, fake = self.discriminator(x), self.discriminator(recon.detach())
        return F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean()


# -----------------------------------------------------------------------------
# the no-grad stream path: inference machinery, not part of the model's definition
#
# Everything below computes exactly what the forward paths above compute (up to float rounding), for
# CausalVAE.encode/decode without gradients: each layer's `stream` method runs its convs a few frames at a
# time through _stream_conv, with GroupNorm statistics accumulated over those chunks (_group_norm_affine)
# and the norm-SiLU applied while copying into each conv's padded buffer (_norm_silu_into). That bounds
# memory to about one layer's input and output, and is the decode speed path at inference: on CUDA the
# two element-wise steps run as the fused Triton kernels at the very end (FUSED_KERNELS).


def _fused(x):
    """Whether x's element-wise steps take the Triton kernels at the end of this file."""
    return FUSED_KERNELS and triton is not None and x.is_cuda


def _group_norm_affine(norm, x):
    """GroupNorm of x as a per-(sample, channel) affine map x * scale + shift (each (B, C, 1, 1, 1)), in
    fp32 (or x's dtype if wider). Statistics come as partial (count, mean, sum of squared deviations) over
    pieces of x, merged with Chan's parallel formula: on CUDA per 4096-element piece of each channel (one
    Triton pass over fp16 x), elsewhere a few frames at a time."""
    B, C, T = x.shape[:3]
    G = norm.num_groups
    dtype = torch.promote_types(x.dtype, torch.float32)
    if _fused(x) and x.is_contiguous() and dtype == torch.float32:
        n, block = x[0, 0].numel(), 4096
        pieces = triton.cdiv(n, block)
        mean_p = torch.empty(B * C, pieces, device=x.device, dtype=dtype)
        m2_p = torch.empty_like(mean_p)
        _stats_kernel[(B * C, pieces)](x, mean_p, m2_p, n, BLOCK=block, num_warps=8)
        count = torch.full((pieces,), float(block), device=x.device, dtype=dtype)
        count[-1] = n - block * (pieces - 1)
        count = count.repeat(C // G).view(1, 1, -1)  # the group's pieces: C/G channels x pieces each
        mean_p, m2_p = mean_p.view(B, G, -1), m2_p.view(B, G, -1)
        total = count.sum()
        mean = (mean_p * count).sum(2) / total
        m2 = m2_p.sum(2) + ((mean_p - mean[..., None]).square() * count).sum(2)
        var = m2 / total
    else:
        n = max(1, STREAM_ELEMENTS // x[:, :, 0].numel())
        count, mean, m2 = 0, 0.0, 0.0
        for t in range(0, T, n):
            xc = x[:, :, t:t + n].to(dtype).reshape(B, G, -1)
            var_c, mean_c = torch.var_mean(xc, dim=2, correction=0)
            k = xc.shape[2]
            delta = mean_c - mean
            mean = mean + delta * (k / (count + k))
            m2 = m2 + var_c * k + delta.square() * (count * k / (count + k))
            count += k
        var = m2 / count
    rstd = torch.rsqrt(var + norm.eps)
    per_channel = lambda v: v.repeat_interleave(C // G, dim=1)  # (B, G) -> (B, C)
    scale = per_channel(rstd) * norm.weight.to(dtype)
    shift = norm.bias.to(dtype) - per_channel(mean) * scale
    return scale.view(B, C, 1, 1, 1), shift.view(B, C, 1, 1, 1)


def _norm_silu_into(dst, x, affine):
    """dst[...] = SiLU(GroupNorm(x)) with the precomputed affine, computed in fp32 like the official
    autocast run (see _norm) and cast once to dst's dtype."""
    scale, shift = affine
    if _fused(x) and scale.dtype == torch.float32:
        B, C, T, H, W = x.shape
        rows, block = B * C * T * H, min(triton.next_power_of_2(W), 256)
        grid = (triton.cdiv(rows, 4096 // block), triton.cdiv(W, block))
        _norm_silu_kernel[grid](x, dst, scale, shift, rows, C, T, H, W, *x.stride(), *dst.stride(),
                                ROWS=4096 // block, BLOCK=block, num_warps=8)
    else:
        dst.copy_(F.silu(torch.addcmul(shift, x, scale), inplace=True))  # x * scale + shift, in fp32


def _stream_conv(conv, read, T_in, out=None, accumulate=False, affine=None, up=(1, 1)):
    """CausalConv3d over the frames read(a, b) returns, a few output frames at a time. The frames are
    transformed as they are copied into the conv's padded buffer: with `affine` (from _group_norm_affine)
    the conv sees SiLU(GroupNorm(frames)); with up = (fh, fw) it sees them nearest-upsampled in space
    (both need k > 1). Frames are read strictly in order and each once; the last k - stride padded frames
    are kept as the causal cache. `out` may be the tensor read() reads from: every frame is read before its
    slot is overwritten. With accumulate the conv output is added to `out`."""
    k, s = conv.conv.kernel_size[0], conv.conv.stride[0]
    p = conv.conv.kernel_size[1] // 2
    dtype = conv.conv.weight.dtype
    T_out = (T_in - 1) // s + 1
    cache, pos, n, j0 = None, 0, 1, 0  # the first chunk is one output frame; it sizes the others
    while j0 < T_out:
        j1 = min(j0 + n, T_out)
        b = s * (j1 - 1) + 1
        new = read(pos, b)
        pos = b
        if j0 == 0:
            n = max(1, STREAM_ELEMENTS // (new[:, :, :1].numel() * up[0] * up[1] * s))
        if k == 1:  # (only the shortcut convs, which take their input as it is)
            assert affine is None and up == (1, 1), "_stream_conv: affine/up need a k > 1 conv"
            seq = new.to(dtype)
        else:  # [cache | new] with replicate padding, built in one buffer (the copy also casts)
            B, C, t, h, w = new.shape
            H, W = h * up[0], w * up[1]
            f = k - 1 if cache is None else cache.shape[2]  # past frames in front of the new ones
            seq = new.new_empty((B, C, f + t, H + 2 * p, W + 2 * p), dtype=dtype)
            if affine is not None:
                _norm_silu_into(seq[:, :, f:, p:p + H, p:p + W], new, affine)
            elif up != (1, 1):  # nearest upsampling: each pixel broadcast over its fh x fw block in the copy
                blocks = seq[:, :, f:, p:p + H, p:p + W].unflatten(4, (w, up[1])).unflatten(3, (h, up[0]))
                blocks.copy_(new[:, :, :, :, None, :, None])
            else:
                seq[:, :, f:, p:p + H, p:p + W] = new
            if cache is None:  # CausalConv3d's replicate pad: frame 0 copied into the k-1 past frames
                seq[:, :, :f, p:p + H, p:p + W] = seq[:, :, f:f + 1, p:p + H, p:p + W]
            else:
                seq[:, :, :f] = cache
            if p:  # rows, then columns over the full height (which fills the corners)
                seq[:, :, :, :p] = seq[:, :, :, p:p + 1]
                seq[:, :, :, p + H:] = seq[:, :, :, p + H - 1:p + H]
                seq[..., :p] = seq[..., p:p + 1]
                seq[..., p + W:] = seq[..., p + W - 1:p + W]
            # the next chunk's past frames: a view, so this buffer lives until the next one has copied them
            # (one copy instead of a clone plus a copy)
            cache = seq[:, :, seq.shape[2] - (k - s):]
        y = conv.conv(seq)
        del seq
        if out is None:
            out = y.new_empty(y.shape[:2] + (T_out,) + y.shape[3:])
        if accumulate:
            out[:, :, j0:j1] += y
        else:
            out[:, :, j0:j1] = y
        j0 = j1
    return out


# -----------------------------------------------------------------------------
# fused Triton kernels for the stream path's two element-wise steps (CUDA only; see FUSED_KERNELS)


if triton is not None:
    @triton.jit
    def _stats_kernel(x_ptr, mean_ptr, m2_ptr, n, BLOCK: tl.constexpr):
        """Program (r, j): mean and sum of squared deviations (fp32) of elements j*BLOCK.. of row r of
        x (rows, n)."""
        r, j = tl.program_id(0), tl.program_id(1)
        offs = j * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(x_ptr + r.to(tl.int64) * n + offs, mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=0) / tl.minimum(n - j * BLOCK, BLOCK)
        d = tl.where(mask, x - mean, 0.0)
        i = r * tl.num_programs(1) + j
        tl.store(mean_ptr + i, mean)
        tl.store(m2_ptr + i, tl.sum(d * d, axis=0))

    @triton.jit
    def _norm_silu_kernel(x_ptr, y_ptr, scale_ptr, shift_ptr, n_rows, C, T, H, W,
                          xs0, xs1, xs2, xs3, xs4, ys0, ys1, ys2, ys3, ys4,
                          ROWS: tl.constexpr, BLOCK: tl.constexpr):
        """y = silu(x * scale[b, c] + shift[b, c]) in fp32, stored in y's dtype; x, y (B, C, T, H, W) with
        any strides. A program takes ROWS rows of (b, c, t, h) and BLOCK columns w."""
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        w = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        h, t, bc = rows % H, (rows // H) % T, rows // (H * T)
        c, b = bc % C, bc // C
        rmask = rows < n_rows
        mask = rmask[:, None] & (w < W)[None, :]
        b, c, t, h, w = b.to(tl.int64), c.to(tl.int64), t.to(tl.int64), h.to(tl.int64), w.to(tl.int64)
        xo = (b * xs0 + c * xs1 + t * xs2 + h * xs3)[:, None] + (w * xs4)[None, :]
        yo = (b * ys0 + c * ys1 + t * ys2 + h * ys3)[:, None] + (w * ys4)[None, :]
        scale = tl.load(scale_ptr + bc, mask=rmask, other=0.0)[:, None]
        shift = tl.load(shift_ptr + bc, mask=rmask, other=0.0)[:, None]
        v = tl.load(x_ptr + xo, mask=mask, other=0.0).to(tl.float32) * scale + shift
        tl.store(y_ptr + yo, (v / (1.0 + tl.exp(-v))).to(y_ptr.dtype.element_ty), mask=mask)


