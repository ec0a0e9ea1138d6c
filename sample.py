"""
Sampling: prompt in, mp4 out, as the official HunyuanVideo pipeline (official sample_video.py).

    python sample.py --prompt "a red circle moving left"    # the embedded demo (out/demo)
    python sample.py --prompt "..." --dit DIT.pt --vae VAE_DIR --llm LLM_DIR --clip CLIP_DIR  # the 13B
    torchrun --nproc_per_node 4 sample.py ...                # one video on 4 GPUs (sequence parallel)
    python sample.py ... --lora style.safetensors:0.8 --lora motion.safetensors   # LoRAs, stacked
    python sample.py --image first.jpg --prompt "..." --dit I2V.pt ...   # image-to-video (docs/i2v.md)
    python sample.py --decode out/samples/0_a_cat.latents.safetensors   # finish a decode that failed

Read top to bottom: the sampler (sigma schedule, Euler steps of the flow ODE), loading a pipeline (the
official files or a train.py folder), generate() (encode the prompt with the LLM + CLIP, draw the noise,
50 Euler steps from sigma=1 (noise) to 0 calling the DiT at t = sigma*1000, decode with the tiled VAE),
writing (an H.264 mp4 at 24 fps and a PNG strip of frames; the latents first, kept if the decode fails),
main().
"""

import argparse
import importlib.util
import json
import math
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import dit
import text_encoder
import vae as vae_lib

# ----------------------------------------------------------------------------------------------------------
# The sampler

# official hyvideo/config.py defaults: --infer-steps, --flow-shift, --embedded-cfg-scale, --cfg-scale
OFFICIAL_SAMPLING = {"steps": 50, "shift": 7.0, "guidance": 6.0, "cfg_scale": 1.0}
# official sample_video.py: 720p, 129 frames, saved at 24 fps
OFFICIAL_VIDEO = {"height": 720, "width": 1280, "frames": 129, "fps": 24}
# --sparse sta's default window in tiles: ~19% of the dense attention pairs at 720x1280x129, near the
# released HunyuanVideo strategy's average (docs/attention.md, "Sliding-tile attention")
STA_WINDOW = "3,3,7"


def flow_sigmas(steps, shift):
    """sigma_0..sigma_N, from 1 to 0: linspace(1, 0, N+1) through the SD3 time shift s*x / (1 + (s-1)*x)
    (official FlowMatchDiscreteScheduler with --flow-reverse; shift 7 for the released model), fp32."""
    s = torch.linspace(1, 0, steps + 1)
    return shift * s / (1 + (shift - 1) * s)


@torch.no_grad()
def denoise(model, noise, cond, steps=50, shift=7.0, guidance=6.0, cfg_scale=1.0, uncond=None,
            progress=True, cache=None, sparse=None, image=None):
    """Integrate the flow ODE dx/dsigma = v from sigma=1 to 0 with Euler steps.

    cond/uncond: (text, text_mask, pooled) for the prompt and the negative prompt. Real CFG (cfg_scale > 1)
    runs the batch [uncond ; cond] and combines uncond + w*(cond - uncond); the released model is
    guidance-distilled instead: `guidance` goes in through its embedder, x1000, cast to the DiT dtype
    first (so 6.0 becomes 6016 in bf16, as in the official pipeline). Latents stay fp32 between steps.
    cache: a TeaCache, MagCache or EasyCache, reset here, or None (every step runs the whole DiT).
    sparse: a dit.SlidingTile, used from step sparse.full_steps on (dense before; with per-step windows,
    each step's), or None.
    image: an I2V DiT's image latent (B, C, 1, h, w), scaled (official HunyuanVideo-I2V pipeline):
    token_replace makes it frame 0 of the latent before every step and at the end (the scheduler steps
    frames 1.. only); latent_concat gives the DiT [x ; the image latent on frame 0, zeros after ; a mask
    of ones on frame 0] on the channels.
    """
    kind = getattr(model.cfg, "image_condition_type", None)
    assert (kind is None) == (image is None), "an image latent goes with an I2V DiT, and only with one"
    if kind == "latent_concat":
        extra = torch.zeros(noise.shape[0], noise.shape[1] + 1, *noise.shape[2:], device=noise.device)
        extra[:, :-1, :1] = image
        extra[:, -1, 0] = 1
    if sparse is not None and sparse.per_step is not None and len(sparse.per_step) != steps:
        raise ValueError(f"the STA window table has windows for {len(sparse.per_step)} steps: sample with "
                         f"--steps {len(sparse.per_step)}, or pass a table of one window per layer and head")
    sigmas = flow_sigmas(steps, shift).to(noise.device)
    dtype = next(model.parameters()).dtype
    x = noise
    use_cfg = cfg_scale > 1.0
    if use_cfg:
        cond = tuple(torch.cat([u, c]) for u, c in zip(uncond, cond))
    text, mask, pooled = cond
    B = text.shape[0]
    g = None
    if model.cfg.guidance_embed:
        g = torch.full((B,), float(guidance), device=noise.device, dtype=torch.float32).to(dtype) * 1000.0
    if cache is not None:
        cache.reset(steps)
    for i in tqdm(range(steps), desc="denoise", disable=not progress):
        if kind == "token_replace":
            x = torch.cat([image, x[:, :, 1:]], 2)
        xin = torch.cat([x, extra], 1) if kind == "latent_concat" else x
        xin = torch.cat([xin, xin]) if use_cfg else xin
        t = (sigmas[i] * 1000).expand(B)
        kw = {"sparse": sparse.at(i)} if sparse is not None and sparse.at(i) is not None else {}
        if cache is None:
            v = model(xin, t, text, mask, pooled, g, **kw)
        elif isinstance(cache, EasyCache):  # it sees the DiT's input and output only: it wraps the whole call
            v = cache.run(model, xin, t, text, mask, pooled, g, **kw)
        else:  # TeaCache, MagCache: inside the DiT, around its blocks
            v = model(xin, t, text, mask, pooled, g, cache=cache, **kw)
        if use_cfg:
            v_u, v_c = v.chunk(2)
            v = v_u + cfg_scale * (v_c - v_u)  # in the DiT's dtype, as the official pipeline combines them
        x = x.float() + v.float() * (sigmas[i + 1] - sigmas[i])  # Euler step in fp32 (sigma decreases)
    if kind == "token_replace":
        x = torch.cat([image.to(x.dtype), x[:, :, 1:]], 2)
    return x


def initial_noise(shape, seed, device, dtype):
    """One generator per sample, seeded seed + i, as the official pipeline draws its noise (in the text
    encoder's dtype, fp16, on the GPU); no scaling: sigma=1 is pure noise."""
    return torch.cat([torch.randn((1, *shape[1:]), generator=torch.Generator(device).manual_seed(seed + i),
                                  device=device, dtype=dtype) for i in range(shape[0])])


class TeaCache:
    """Step caching as TeaCache publishes it for HunyuanVideo (ali-vilab/TeaCache,
    TeaCache4HunyuanVideo/teacache_sample_video.py): the DiT's blocks are skipped on a step whose input
    barely moved, and the image tokens get the residual the blocks added at the last computed step.

    "Moved": the relative L1 change of block 0's modulated image input since the previous step,
    mean|x - x_prev| / mean|x_prev|, mapped through the published 4th-degree polynomial (fitted by the
    authors from input changes to output changes) and summed over the skipped steps; once the sum reaches
    `threshold` the step is computed and the sum restarts. The first and last steps are always computed.
    Not exact (a skipped step's output is an approximation): off by default; threshold 0 computes every
    step. A CFG batch [uncond ; cond] gets one decision from the mean over the whole batch and keeps a
    residual per sample, as the reference does with its batch. Under sequence parallel each rank holds
    a slice of the image tokens: the two sums are all-reduced, so every rank gets the same distance as
    one GPU would and takes the same decision."""

    # np.poly1d coefficients, highest power first: TeaCache4HunyuanVideo/teacache_sample_video.py
    COEFFICIENTS = (7.33226126e+02, -4.01131952e+02, 6.75869174e+01, -3.14987800e+00, 9.61237896e-02)
    DEFAULT_THRESHOLD = 0.1  # chosen on the demo model: see docs/performance.md "Step caching"

    def __init__(self, threshold):
        self.threshold = threshold
        self.reset(1)

    def reset(self, steps):
        """Before a new sampling run of `steps` steps."""
        self.steps, self.step = steps, 0
        self.accumulated, self.previous, self.residual = 0.0, None, None
        self.computed = self.skipped = 0

    @classmethod
    def rescale(cls, rel_l1):
        value = 0.0
        for c in cls.COEFFICIENTS:  # Horner's rule
            value = value * rel_l1 + c
        return value

    def should_compute(self, probe, group=None):
        """Called by the DiT once per step with block 0's modulated image input (this rank's tokens)."""
        probe = probe.float()
        first_or_last = self.step == 0 or self.step == self.steps - 1
        if first_or_last or self.previous is None or self.previous.shape != probe.shape:
            compute = True
        else:
            sums = torch.stack([(probe - self.previous).abs().sum(), self.previous.abs().sum()]).double()
            if group is not None:
                dist.all_reduce(sums, group=group)
            self.accumulated += self.rescale((sums[0] / sums[1]).item())
            compute = self.accumulated >= self.threshold
        if compute:
            self.accumulated = 0.0
        self.previous = probe
        self.step += 1
        self.computed += compute
        self.skipped += not compute
        return compute


class MagCache:
    """Step caching as MagCache publishes it for HunyuanVideo (Zehong-Ma/MagCache,
    MagCache4HunyuanVideo/magcache_sample_video.py): TeaCache's skip-and-reuse of the blocks' residual,
    decided from how the residual's magnitude changes from one step to the next, which its authors measured
    once on the 13B and publish per step: mean over tokens of |r_i| / |r_(i-1)| (RATIOS_*).

    The first RETENTION of the steps always run. After them each step multiplies a running ratio by its
    published one and adds |1 - running ratio| to an error: the step is skipped while the error stays within
    `threshold` and no more than K steps in a row were skipped; otherwise it runs and all three restart.
    The decision depends on the step index alone: the samples of a CFG batch (each keeps its own residual)
    and the ranks of sequence parallel agree without looking at each other. The ratios belong to the 13B
    at 50 steps: other step counts take the nearest step's ratio, and another model needs its own
    (bench.py cache measures them). Not exact; threshold 0 runs every step."""

    # magcache_sample_video.py: np.array([1.0] + [...]) for 720p and for 544p videos, 50 steps
    RATIOS_720P = (1.0, 1.0754, 1.27807, 1.11596, 1.09504, 1.05188, 1.00844, 1.05779, 1.00657, 1.04142,
                   1.03101, 1.00679, 1.02556, 1.00908, 1.06949, 1.05438, 1.02214, 1.02321, 1.03019, 1.00779,
                   1.03381, 1.01886, 1.01161, 1.02968, 1.00544, 1.02822, 1.00689, 1.02119, 1.0105, 1.01044,
                   1.01572, 1.02972, 1.0094, 1.02368, 1.0226, 0.98965, 1.01588, 1.02146, 1.0018, 1.01687,
                   0.99436, 1.00283, 1.01139, 0.97122, 0.98251, 0.94513, 0.97656, 0.90943, 0.85703, 0.75456)
    RATIOS_544P = (1.0, 1.06971, 1.29073, 1.11245, 1.09596, 1.05233, 1.01415, 1.05672, 1.00848, 1.03632,
                   1.02974, 1.00984, 1.03028, 1.00681, 1.06614, 1.05022, 1.02592, 1.01776, 1.02985, 1.00726,
                   1.03727, 1.01502, 1.00992, 1.03371, 0.9976, 1.02742, 1.0093, 1.01869, 1.00815, 1.01461,
                   1.01152, 1.03082, 1.0061, 1.02162, 1.01999, 0.99063, 1.01186, 1.0217, 0.99947, 1.01711,
                   0.9904, 1.00258, 1.00878, 0.97039, 0.97686, 0.94315, 0.97728, 0.91154, 0.86139, 0.76592)
    # magcache_sample_video.py: magcache_thresh 0.24, magcache_K 6, retention_ratio 0.2
    DEFAULT_THRESHOLD, K, RETENTION = 0.24, 6, 0.2

    def __init__(self, threshold, height=720, ratios=None):
        """height: the video's, in pixels, picks the published table (544p below 720); or ratios: one per
        step of a 50-step (or any other) run, the first 1.0."""
        self.threshold = threshold
        self.ratios = tuple(ratios or (self.RATIOS_720P if height >= 720 else self.RATIOS_544P))
        self.reset(1)

    def reset(self, steps):
        """Before a new sampling run of `steps` steps: the table resampled to them by nearest step
        (MagCache4Wan2.1/magcache_generate.py nearest_interp)."""
        n = len(self.ratios)
        if steps == 1:
            self.step_ratios = [self.ratios[-1]]
        else:
            scale = (n - 1) / (steps - 1)
            self.step_ratios = [self.ratios[round(i * scale)] for i in range(steps)]
        self.steps, self.step = steps, 0
        self.ratio, self.error, self.run_length = 1.0, 0.0, 0
        self.residual = None
        self.computed = self.skipped = 0

    def should_compute(self, probe=None, group=None):
        """Called by the DiT once per step (block 0's input and the ranks' group are not needed)."""
        compute = True
        if self.step >= int(self.RETENTION * self.steps) and self.residual is not None:
            self.ratio *= self.step_ratios[self.step]
            self.error += abs(1 - self.ratio)
            self.run_length += 1
            compute = self.error > self.threshold or self.run_length > self.K
            if compute:
                self.ratio, self.error, self.run_length = 1.0, 0.0, 0
        self.step += 1
        self.computed += compute
        self.skipped += not compute
        return compute


class EasyCache:
    """Step caching as EasyCache publishes it for HunyuanVideo (H-EmbodVis/EasyCache,
    EasyCache4HunyuanVideo/easycache_sample_video.py): adaptive at run time, nothing calibrated. It sees the
    DiT's input x and output v only: a skipped step returns x + (v - x) of the last computed step, so it
    skips the embedders and the final layer as well as the blocks.

    The criterion is the transformation rate k = mean|v - v'| / mean|x - x'| between the last two computed
    steps (x', v' the earlier one's). On a later step the relative output change is predicted as
    k * mean|x - x_prev| / mean|v_last| (x_prev: the previous step's input, computed or not; v_last: the last
    computed output) and summed over the skipped steps; the step is skipped while the sum stays below
    `threshold`. The first WARMUP steps and the last step always run. Not exact; threshold 0 runs every
    step. A CFG batch gets one decision from the means over the whole batch and keeps (v - x) per sample.
    Under sequence parallel every rank holds the whole latent and the gathered output, the same numbers,
    so every rank takes the same decisions."""

    # easycache_sample_video.py: thresh 0.025, ret_steps 5
    DEFAULT_THRESHOLD, WARMUP = 0.025, 5

    def __init__(self, threshold):
        self.threshold = threshold
        self.reset(1)

    def reset(self, steps):
        """Before a new sampling run of `steps` steps."""
        self.steps, self.step = steps, 0
        self.accumulated, self.rate = 0.0, None
        self.previous_input = self.computed_input = self.output = self.difference = None
        self.computed = self.skipped = 0

    def run(self, model, x, *args, **kwargs):
        """One step's DiT output at input x (B, C, T, H, W), computed by model(x, *args, **kwargs) or
        predicted. An I2V latent_concat input holds [x ; image ; mask]: the output has x's channels."""
        xf = x.float()
        compute = True
        if self.WARMUP <= self.step < self.steps - 1 and self.rate is not None:
            change = (xf - self.previous_input).abs().mean() / self.output.abs().mean()
            self.accumulated += self.rate * change.item()
            compute = self.accumulated >= self.threshold
        if compute:
            self.accumulated = 0.0
        self.previous_input = xf
        self.step += 1
        self.computed += compute
        self.skipped += not compute
        if not compute:
            return (xf[:, :self.difference.shape[1]] + self.difference).to(self.dtype)
        v = model(x, *args, **kwargs)
        vf = v.float()
        if self.output is not None:
            self.rate = ((vf - self.output).abs().mean() / (xf - self.computed_input).abs().mean()).item()
        self.computed_input, self.output, self.dtype = xf, vf, v.dtype
        self.difference = vf - xf[:, :vf.shape[1]]
        return v


# ----------------------------------------------------------------------------------------------------------
# Loading: the official files or a folder written by train.py

@dataclass
class Pipeline:
    """Everything generate() needs, loaded once by load_pipeline()."""
    encoder: text_encoder.PromptEncoder
    dit: torch.nn.Module       # dit.HunyuanVideoDiT
    vae: torch.nn.Module       # vae.CausalVAE
    video: dict                # default height, width, frames, fps
    sampling: dict             # default steps, shift, guidance, cfg_scale


def load_pipeline(ckpt=None, dit_path=None, vae_path=None, llm_dir=None, clip_dir=None, device="cpu",
                  dtype=torch.bfloat16, offload=False, loras=(), image=False):
    """The prompt encoder, DiT (in `dtype`) and VAE with their default video size and sampling options:
    the official files (dit_path, which may be the fp8 one, vae_path, llm_dir, clip_dir) or a train.py
    output folder (ckpt; its config.json names its encoders and holds its own defaults).

    On a GPU the official text encoders (8B LLM + CLIP, fp16) wait in CPU memory and the LLM visits the
    GPU one layer at a time while it encodes, so the encoders never add more than a layer to the GPU
    memory the resident DiT needs. offload: the DiT's blocks stay in CPU memory too. loras: (file, scale)
    pairs, applied in order (dit.load_lora) before any block is offloaded, so the streamed blocks carry
    them. image: sampling from an image, so a DiT file that cannot tell is read as HunyuanVideo-I2V's
    token_replace one (dit.load_dit); llm_dir may then be the full LLaVA (the official text_encoder_i2v)."""
    device = torch.device(device)
    big_encoders = "layer" if offload or device.type == "cuda" else None
    vae_dtype = torch.float16 if device.type == "cuda" else torch.float32  # official --vae-precision fp16
    video, sampling = dict(OFFICIAL_VIDEO), dict(OFFICIAL_SAMPLING)
    if ckpt is None:
        encoder = text_encoder.PromptEncoder.from_pretrained(llm_dir, clip_dir, dtype=torch.float16,
                                                             device=device, offload=big_encoders)
        vae = vae_lib.load_vae(vae_path, device=device, dtype=vae_dtype)
    else:
        conf_path = os.path.join(ckpt, "config.json")
        try:
            with open(conf_path, encoding="utf-8") as f:
                conf = json.load(f)
            video.update(conf["video"])  # the last stage's size and its clips' frame rate (fps absent: 24)
            sampling.update({k: v for k, v in conf.get("sample", {}).items() if v is not None})
            t = conf["text"]
            vae_cfg = vae_lib.VAEConfig(**conf["vae"])
            text_len = t["text_len"]
            if "llm_dir" in t:
                encoder_dirs = (t["llm_dir"], t["clip_dir"])
            else:
                tok_path = os.path.join(ckpt, t["tokenizer"])
                llm_cfg = text_encoder.LlamaConfig(**t["llm"])
                clip_cfg = text_encoder.CLIPTextConfig(**t["clip"])
        except (ValueError, KeyError, TypeError, AttributeError) as e:  # JSON, UTF-8, missing or odd entries
            what = f"no {e} entry" if isinstance(e, KeyError) else f"{type(e).__name__}: {e}"
            raise ValueError(f"{conf_path} is damaged ({what}); restore it from the run that wrote the "
                             f"folder, or re-run train.py") from None
        if "llm_dir" in t:  # trained with the official encoders: config.json names their folders
            for d in encoder_dirs:
                if not os.path.isdir(d):
                    raise SystemExit(f"error: {ckpt}/config.json names the text encoder folder {d}, which is "
                                     f"not there; pass --dit/--vae/--llm/--clip instead of --ckpt")
            encoder = text_encoder.PromptEncoder.from_pretrained(
                *encoder_dirs, dtype=torch.float16, device=device, offload=big_encoders,
                text_len=text_len)
        else:  # train.py's small frozen encoders, stored in the folder with their tokenizer
            llm = text_encoder.LlamaEncoder(llm_cfg)
            clip = text_encoder.CLIPTextEncoder(clip_cfg)
            sd, _ = dit.read_safetensors(os.path.join(ckpt, "text_encoder.safetensors"))
            llm.load_state_dict({k[4:]: v for k, v in sd.items() if k.startswith("llm.")}, strict=True)
            clip.load_state_dict({k[5:]: v for k, v in sd.items() if k.startswith("clip.")}, strict=True)
            try:
                tok = text_encoder.Tokenizer(tok_path)
            except RuntimeError as e:  # SentencePiece: "could not parse ModelProto"
                raise ValueError(f"cannot read the tokenizer {tok_path}: the file is damaged ({e}); restore "
                                 f"it from the run that wrote the folder, or re-run train.py") from None
            llm, clip = (m.to(device).eval().requires_grad_(False) for m in (llm, clip))
            encoder = text_encoder.PromptEncoder(llm, clip, tok, tok, templates=None, text_len=text_len,
                                                 device=device)
        dit_path = os.path.join(ckpt, "dit.safetensors")
        vae = vae_lib.load_vae(os.path.join(ckpt, "vae.safetensors"), cfg=vae_cfg, device=device,
                               dtype=vae_dtype)
    model = dit.load_dit(dit_path, dtype=dtype, device="cpu" if offload else device, image=image)
    model.eval().requires_grad_(False)
    if model.cfg.image_condition_type:  # the official I2V sampler lowers a temporal RoPE frequency past 192
        model.riflex = "i2v"            # frames (dit.py, RIFLEx); the official T2V one never does
    for path, scale in loras:
        dit.load_lora(model, path, scale)
    if offload and device.type == "cuda":
        offload_blocks(model, device)
    return Pipeline(encoder, model, vae, video, sampling)


# A block's adaLN modulation linears: a quarter of the 13B's weights (3.4 of 12.8 billion), acting on one
# vector per sample, so streaming them costs their copy and hardly any compute waits on it
MODULATION = ("img_mod.", "txt_mod.", "modulation.")


def offload_blocks(model, device, only=None):
    """Keep the DiT's 60 blocks in (pinned) CPU memory; each block's weights come to `device` for its own
    forward and are dropped after, so the GPU holds the small embedders plus one block (~0.7 GB at 13B in
    bf16) and the activations. Slower: every step streams the whole model over PCIe once.

    Training (train.py --lora --offload) uses it too, under gradient checkpointing: the backward re-runs
    each block's forward, which fetches its weights again. Trainable parameters (the adapters) are not
    streamed: they stay on `device`, where the optimizer updates them. Neither is block 0's img_mod:
    step caching (TeaCache, MagCache) runs it alone every step, and a skipped step then streams no block.
    only: the name prefixes (within a block) of the weights to stream, the others staying on `device`;
    train.py --offload modulation streams MODULATION alone."""
    for name, child in model.named_children():
        if name not in ("double_blocks", "single_blocks"):
            child.to(device)
    resident = []  # the (block, host weights) pair whose weights are on `device` now: at most one

    def drop(block, host):
        for n, p in block.named_parameters():
            if n in host:
                p.data = host[n]

    def fetch(block, host):
        # A checkpointed backward re-runs a block's forward only until it has what the backward needs
        # (torch.utils.checkpoint's early stop), so that block's forward hook never drops its weights:
        # the next fetch does, else every block would stay on `device` by the end of the backward.
        while resident:
            drop(*resident.pop())
        resident.append((block, host))
        for n, p in block.named_parameters():
            if n in host:
                p.data = host[n].to(device, non_blocking=True)

    for i, block in enumerate(list(model.double_blocks) + list(model.single_blocks)):
        host = {}
        for n, p in block.named_parameters():
            if p.requires_grad or (i == 0 and n.startswith("img_mod.")) or \
                    (only is not None and not n.startswith(only)):
                p.data = p.data.to(device)
                continue
            try:
                host[n] = p.data.to("cpu").pin_memory() if torch.cuda.is_available() else p.data.to("cpu")
            except RuntimeError:  # no room for pinned memory: pageable copies work, more slowly
                host[n] = p.data.to("cpu")
            p.data = host[n]  # a copy already on `device` is freed now, not at the first forward
        for b in block.buffers():  # an FP8Linear's scale: tiny, and on `device` it costs no copy per use
            b.data = b.data.to(device)
        block.register_forward_pre_hook(lambda mod, args, host=host: fetch(mod, host))
        block.register_forward_hook(lambda mod, args, out, host=host: drop(mod, host))
    return model


# ----------------------------------------------------------------------------------------------------------
# Image-to-video inputs (HunyuanVideo-I2V, docs/i2v.md): the image, its size bucket and its pixels

# official hyvideo/inference.py predict(): --i2v-resolution -> bucket_hw_base_size
I2V_BUCKET_BASE = {"720p": 960, "540p": 720, "360p": 480}
MIN_IMAGE_SIDE = 32  # pixels; a thumbnail upscaled to a 720p bucket has no detail left to animate


def load_image(path):
    """An image file -> HxWx3 uint8 RGB (PIL's convert("RGB"), as the official sampler); ValueError naming
    the problem for an unreadable or tiny image."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            image = np.asarray(im.convert("RGB"))
    except (OSError, ValueError) as e:  # PIL's UnidentifiedImageError is an OSError
        raise ValueError(f"--image {path}: cannot read it as an image ({type(e).__name__}); give a png or "
                         f"jpg file") from None
    h, w = image.shape[:2]
    if min(h, w) < MIN_IMAGE_SIDE:
        raise ValueError(f"--image {path} is {w}x{h} pixels: give at least {MIN_IMAGE_SIDE} on each side")
    return image


def i2v_bucket(height, width, base):
    """The official size bucket for an image of height x width (official hyvideo/utils/data_utils.py,
    generate_crop_size_list + get_closest_ratio): among the (h, w) multiples of 32 of at most (base/32)^2
    cells and aspect ratios up to 4, the one whose h/w (rounded to 5 places) is nearest the image's, taken
    from those no taller than the image for a portrait or square image and from those taller for a
    landscape one; the first in the official list order on a tie."""
    cells, sizes, wp, hp = round((base / 32) ** 2), [], round((base / 32) ** 2), 1
    while wp > 0:
        if max(wp, hp) / min(wp, hp) <= 4:
            sizes.append((wp * 32, hp * 32))
        if (hp + 1) * wp <= cells:
            hp += 1
        else:
            wp -= 1
    aspect = height / width
    ratios = [round(h / w, 5) for h, w in sizes]
    fits = [i for i, r in enumerate(ratios) if (r <= aspect if aspect >= 1 else r > aspect)]
    return sizes[min(fits, key=lambda i: abs(ratios[i] - aspect))]


def image_pixels(image, height, width):
    """HxWx3 uint8 RGB -> (1, 3, 1, height, width) float32 in [-1, 1], the official I2V reference-image
    transform (torchvision Resize(min(height, width)), CenterCrop((height, width)), ToTensor, Normalize 0.5):
    the shorter side to min(height, width) with PIL's bilinear filter (the longer one truncated), then a
    centred crop, black padding where the image falls short."""
    from PIL import Image
    h, w = image.shape[:2]
    short = min(height, width)
    nh, nw = (int(short * h / w), short) if w <= h else (short, int(short * w / h))
    if (nh, nw) != (h, w):
        image = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BILINEAR))
    ph, pw = max(height - nh, 0), max(width - nw, 0)
    image = np.pad(image, ((ph // 2, (ph + 1) // 2), (pw // 2, (pw + 1) // 2), (0, 0)))
    top, left = int(round((image.shape[0] - height) / 2)), int(round((image.shape[1] - width) / 2))
    x = torch.from_numpy(image[top:top + height, left:left + width].copy()).permute(2, 0, 1).float() / 255
    return ((x - 0.5) / 0.5)[None, :, None]


# ----------------------------------------------------------------------------------------------------------
# Generating: prompts -> frames

@torch.no_grad()
def generate(pipe, prompts, seed=0, height=None, width=None, frames=None, steps=None, shift=None,
             guidance=None, cfg_scale=None, negative_prompt=None, tiled=True, times=None, cache=None,
             sparse=None, image=None, stability=False, on_latents=None):
    """prompts -> uint8 videos (B, T, H, W, 3). Options left None take the pipeline's defaults; prompt i
    starts from seed + i's noise. Under sequence parallel (pipe.dit.sp_group set) every rank runs the same
    steps on the same noise and rank 0 alone decodes; the other ranks get None. `times`, if a dict, gets
    each stage's seconds. cache: a TeaCache, MagCache or EasyCache (its computed/skipped counts hold this
    call's steps) or None. sparse: a dit.SlidingTile (sliding-tile attention after its dense first steps).
    negative_prompt: None takes the folder's own (config.json "sample"; a train.py model's is the empty
    caption it learned unconditional generation from), else the official one (NEGATIVE_PROMPT, or
    NEGATIVE_PROMPT_I2V with an image); "" is the empty caption.

    image (HxWx3 uint8 RGB), for an I2V DiT (official HunyuanVideo-I2V pipeline): resized and cropped to
    height x width, VAE-encoded (the posterior's mode, scaled) as the video's first latent frame; the full
    LLaVA reads it with the prompt where the encoder has one (the negative prompt gets a black image); a
    train.py folder's small encoders read the prompt alone. stability: the noise starts 0.1% of the way
    to the image latent repeated over all frames (official --i2v-stability). latent_concat drops the first
    decoded frames as the official sampler does (T - 4 frames come back). on_latents: called with the
    denoised latents (rank 0) before the VAE decodes them, to keep them should the decode fail."""
    H, W, T = (v or pipe.video[k] for k, v in (("height", height), ("width", width), ("frames", frames)))
    kind = pipe.dit.cfg.image_condition_type
    if (image is None) != (kind is None):
        raise ValueError("this DiT is image-to-video: it needs an image" if image is None
                         else "this DiT is text-to-video: an image needs a HunyuanVideo-I2V checkpoint")
    if negative_prompt is None:
        negative_prompt = pipe.sampling.get("negative_prompt")
    if negative_prompt is None:
        negative_prompt = text_encoder.NEGATIVE_PROMPT if image is None else text_encoder.NEGATIVE_PROMPT_I2V
    steps = pipe.sampling["steps"] if steps is None else steps
    shift = pipe.sampling["shift"] if shift is None else shift
    guidance = pipe.sampling["guidance"] if guidance is None else guidance
    cfg_scale = pipe.sampling["cfg_scale"] if cfg_scale is None else cfg_scale
    device = pipe.encoder.device
    rank = 0 if pipe.dit.sp_group is None else dist.get_rank(pipe.dit.sp_group)
    t0 = time.perf_counter()

    def lap(name):
        nonlocal t0
        if device.type == "cuda":
            torch.cuda.synchronize()
        if times is not None:
            times[name] = time.perf_counter() - t0
        t0 = time.perf_counter()

    if image is not None and getattr(pipe.encoder, "llava", None) is not None:
        mode = dict(interleave=text_encoder.IMAGE_EMBED_INTERLEAVE[kind])
        cond = pipe.encoder(prompts, T, images=[image] * len(prompts), **mode)
        black = [np.zeros_like(image)] * len(prompts)  # official: the negative prompt's image
        uncond = pipe.encoder([negative_prompt] * len(prompts), T, images=black, **mode) \
            if cfg_scale > 1 else None
    else:
        cond = pipe.encoder(prompts, T)
        uncond = pipe.encoder([negative_prompt] * len(prompts), T) if cfg_scale > 1 else None
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the encoders' GPU copies are gone: their memory back for the DiT
    lap("text encoders")

    c = pipe.vae.cfg  # the latent grid follows the VAE's compression in time and space
    shape = (len(prompts), pipe.dit.cfg.out_channels, (T - 1) // c.time_compression + 1,
             H // c.spatial_compression, W // c.spatial_compression)
    noise = initial_noise(shape, seed, device, cond[0].dtype)  # official: in the text encoder's dtype
    z_image = None
    if image is not None:  # the image as a one-frame video; untiled, as the official encode
        z_image = pipe.vae.encode(image_pixels(image, H, W).to(device))[0] * c.scaling_factor
        z_image = z_image.expand(len(prompts), -1, -1, -1, -1)
        lap("image encode")
        if stability:  # official prepare_latents: 0.999 noise + 0.001 image latent, on every frame
            s = torch.tensor([0.999], device=device)
            noise = (noise * s + z_image * (1 - s)).to(noise.dtype)
    latents = denoise(pipe.dit, noise, cond, steps, shift, guidance, cfg_scale, uncond, progress=rank == 0,
                      cache=cache, sparse=sparse, image=z_image)
    lap("denoise")
    if rank != 0:
        return None
    if on_latents is not None:
        on_latents(latents)
    frames = decode(pipe.vae, latents, tiled, drop=4 if kind == "latent_concat" else 0)
    lap("VAE decode")
    return frames


def decode(vae, latents, tiled=True, drop=0):
    """Denoised latents (B, C, t, h, w) -> uint8 videos (B, T - drop, H, W, 3). drop: frames cut from the
    start, 4 for a latent_concat I2V DiT (official pipeline_hunyuan_video.py: image[:, :, 4:])."""
    video = vae.decode(latents / vae.cfg.scaling_factor, tiled=tiled)  # unscale; the release has no shift
    return np.stack([to_frames(v) for v in video[:, :, drop:]])


# ----------------------------------------------------------------------------------------------------------
# Writing: an mp4 and a PNG strip per prompt

def to_frames(video):
    """VAE output (3, T, H, W) in ~[-1, 1] -> uint8 (T, H, W, 3): clamp((x+1)/2) * 255, truncated like the
    official save_videos_grid."""
    v = (video / 2 + 0.5).clamp(0, 1).float()  # in the VAE's dtype first, then fp32, as the official code
    return (v.permute(1, 2, 3, 0) * 255).cpu().numpy().astype(np.uint8)


def mp4_writer_missing():
    """Why write_mp4 cannot run here, or None: checked before any work, not after hours of sampling."""
    try:
        import imageio_ffmpeg
        imageio_ffmpeg.get_ffmpeg_exe()
    except ImportError:
        return "writing mp4 needs imageio-ffmpeg: pip install imageio-ffmpeg"
    except RuntimeError as e:  # the wheel's binary is missing
        return f"imageio-ffmpeg finds no ffmpeg ({e}): pip install --force-reinstall imageio-ffmpeg"
    return None


def write_mp4(frames, path, fps=24):
    """uint8 (T, H, W, 3) RGB -> H.264 mp4 with the official save_videos_grid's settings (imageio.mimsave:
    libx264 at its default quality, crf 23, yuv420p), which browsers play; temp file + rename. The ffmpeg
    binary comes inside the imageio-ffmpeg wheel. OpenCV's own mp4v codec would need none, but browsers do not
    play it and it is worse at a larger size (docs/performance.md, Video files). OSError, one line, when
    ffmpeg fails (a full disk, say): nothing is renamed into place then."""
    import subprocess
    import tempfile
    from fractions import Fraction
    why = mp4_writer_missing()
    if why:
        raise RuntimeError(why)
    import imageio_ffmpeg
    T, H, W, _ = frames.shape
    if H % 2 or W % 2:  # yuv420p stores colour at half resolution
        raise ValueError(f"an H.264 video needs an even size, not {W}x{H}: crop or pad the frames")
    if not 0 < fps < math.inf:
        raise ValueError(f"an mp4's frame rate must be positive, not {fps}")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp.mp4"
    # the command imageio-ffmpeg's write_frames builds for imageio.mimsave, run here so that ffmpeg's exit
    # status is read (imageio-ffmpeg does not: a failed ffmpeg left an empty or cut-off video)
    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-f", "rawvideo", "-vcodec", "rawvideo", "-s", f"{W}x{H}",
           "-pix_fmt", "rgb24", "-r", str(Fraction(fps).limit_denominator()), "-i", "-", "-an",
           "-vcodec", "libx264", "-pix_fmt", "yuv420p", "-v", "error", tmp]
    try:
        with tempfile.TemporaryFile() as log:  # a file, not a pipe: ffmpeg never blocks on its messages
            p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=log)
            try:
                for f in frames:
                    p.stdin.write(np.ascontiguousarray(f, dtype=np.uint8).tobytes())
                p.stdin.close()
            except BrokenPipeError:  # ffmpeg stopped early; its status and message say why
                pass
            if p.wait() != 0:
                log.seek(0)
                lines = log.read().decode(errors="replace").strip().splitlines()
                raise OSError(f"ffmpeg failed: {lines[-1] if lines else f'exit status {p.returncode}'}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_strip(frames, path, n=8):
    """A PNG of n evenly spaced frames side by side, for a quick look."""
    import cv2
    idx = np.linspace(0, len(frames) - 1, min(n, len(frames))).round().astype(int)
    strip = np.concatenate([frames[i] for i in idx], axis=1)
    tmp = path + ".tmp.png"
    try:
        if not cv2.imwrite(tmp, np.ascontiguousarray(strip[..., ::-1])):
            raise OSError(f"OpenCV could not write {tmp}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def latents_path(out):
    """Where the latents of the video `out` wait while the VAE decodes them."""
    return os.path.splitext(out)[0] + ".latents.safetensors"


def write_latents(path, latents, meta):
    """One video's denoised latents (C, t, h, w) and what decoding them needs (meta: str -> str), as
    safetensors; temp file + rename. OSError for any failure to write (safetensors has errors of its own)."""
    from safetensors.torch import save_file
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        save_file({"latents": latents.detach().contiguous().cpu()}, tmp, metadata=meta)
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)  # safetensors writes 0600; the mp4 beside it is as the umask says
        os.replace(tmp, path)
    except OSError:
        raise
    except Exception as e:  # SafetensorError: "No space left on device", say
        raise OSError(str(e)) from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_latents(path):
    """A latents file -> (latents (1, C, t, h, w), metadata); ValueError naming the problem for a missing,
    damaged or foreign file."""
    if os.path.isdir(path):
        files = os.path.join(path, "*.latents.safetensors")
        raise ValueError(f"--decode {path} is a folder: pass its files ({files})")
    if not os.path.isfile(path):
        raise ValueError(f"--decode {path}: no such file")
    try:
        sd, meta = dit.read_safetensors(path)
    except ValueError as e:
        raise ValueError(f"--decode: {e}") from None
    z = sd.get("latents")
    if z is None or z.dim() != 4 or not {"fps", "drop", "vae", "vae_config"} <= meta.keys():
        raise ValueError(f"--decode {path} is not a latents file of sample.py (it writes "
                         f"<video>.latents.safetensors)")
    return z[None], meta


def decode_files(paths, ckpt, vae_path, device, tiled=True, fps=None, out=None):
    """sample.py --decode: latents files kept by an earlier run -> an mp4 and its strip each, beside the
    file (or at --out: a file for one, a folder for several), with the VAE alone (no text encoder or DiT):
    --vae's (official), a --ckpt folder's, else the one the latents were sampled with (their metadata)."""
    import shlex
    vae_dtype = torch.float16 if device.type == "cuda" else torch.float32  # as load_pipeline
    try:
        todo = [(p, *read_latents(p)) for p in paths]
        if out and not is_folder(out) and len(paths) > 1:
            raise ValueError(f"--out {out} names one file for {len(paths)} latents files: give a folder "
                             f"(--out {os.path.dirname(out) or '.'}/) or drop --out")
        source = ("--vae", vae_path) if vae_path else ("--ckpt", ckpt) if ckpt else \
            tuple(json.loads(todo[0][2]["vae"]))
        if source[0] == "--vae":
            vae = vae_lib.load_vae(source[1], device=device, dtype=vae_dtype)
        else:
            conf_path = os.path.join(source[1], "config.json")
            try:
                with open(conf_path, encoding="utf-8") as f:
                    cfg = vae_lib.VAEConfig(**json.load(f)["vae"])
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{conf_path} is damaged or not a train.py folder's ({type(e).__name__}: "
                                 f"{e}); pass --vae, or the --ckpt folder the latents were sampled with")
            vae = vae_lib.load_vae(os.path.join(source[1], "vae.safetensors"), cfg=cfg, device=device,
                                   dtype=vae_dtype)
        for path, _, meta in todo:  # another VAE would decode them to noise, without an error of its own
            if json.loads(meta["vae_config"]) != json.loads(json.dumps(asdict(vae.cfg))):
                theirs = shlex.join(json.loads(meta["vae"]))
                raise ValueError(f"--decode {path} was sampled with the VAE of {theirs}, not "
                                 f"{shlex.join(source)}'s: pass that one")
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    done = []
    for path, z, meta in todo:
        stem = path.removesuffix(".latents.safetensors") if path.endswith(".latents.safetensors") \
            else os.path.splitext(path)[0]
        video = (os.path.join(out, os.path.basename(stem) + ".mp4") if is_folder(out) else out) if out \
            else stem + ".mp4"
        try:
            frames = decode(vae, z.to(device), tiled, int(meta["drop"]))[0]
        except (RuntimeError, MemoryError, KeyboardInterrupt) as e:
            why = "interrupted" if isinstance(e, KeyboardInterrupt) else (str(e).splitlines() or ["?"])[0]
            sys.exit(f"error: decoding {path} stopped ({why[:200]}); {len(done)} of {len(todo)} written"
                     + ("; short of GPU memory, CUDA_VISIBLE_DEVICES= decodes on the CPU"
                        if device.type == "cuda" and not isinstance(e, KeyboardInterrupt) else ""))
        rate = fps or float(meta["fps"])
        try:
            write_mp4(frames, video, rate)
            write_strip(frames, os.path.splitext(video)[0] + ".png")
        except OSError as e:
            sys.exit(f"error: cannot write {video} ({e.strerror or e}); pick another --out")
        done.append(video)
        T, H, W, _ = frames.shape
        print(f"wrote {video} ({T} frames, {W}x{H}, {rate:g} fps) from {path}")


def slug(prompt, n=60, max_bytes=120):
    """A file name from a prompt: its first n characters (at most max_bytes in UTF-8, so that the seed and
    the extensions stay under the 255-byte name limit), non-alphanumerics as underscores. A prompt that does
    not read back from its name (punctuation, other whitespace than single spaces, cut short, or nothing
    alphanumeric) gets 8 hex digits of its SHA-1 too, so that two prompts that look alike never write the
    same file: "a cat, running" and "a cat running!" are different videos."""
    import hashlib
    text = prompt.strip()
    keep = "".join(ch if ch.isalnum() else "_" for ch in text)[:n]
    while len(keep.encode("utf-8")) > max_bytes:
        keep = keep[:-1]
    keep = keep.strip("_")
    if keep and keep.replace("_", " ") == text:  # words and single spaces: the name says it all
        return keep
    return f"{keep or 'prompt'}_{hashlib.sha1(text.encode('utf-8')).hexdigest()[:8]}"


def is_folder(out):
    """--out names a folder (an existing one, or a path ending in a separator): the videos go in it, named
    after their prompts."""
    return os.path.isdir(out) or out.endswith(("/", os.sep))


def output_paths(out, seed, prompts):
    """The mp4 for each prompt: --out itself (a file), else <seed + i>_<slug>.mp4 in --out (a folder) or in
    out/samples."""
    if out and not is_folder(out):
        return [out]
    return [os.path.join(out or os.path.join("out", "samples"), f"{seed + i}_{slug(p)}.mp4")
            for i, p in enumerate(prompts)]


def unwritable(path):
    """Why the file `path` could not be written (a file where its folder goes, or a folder that cannot be
    written to), or None. Leaves nothing behind: it creates and removes a probe file in the nearest folder
    above `path` that exists (the writer creates the ones missing below it)."""
    import tempfile
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        return f"{folder} is a file, not a folder"
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".sample-probe-"):
            pass
    except OSError as e:
        return f"{folder} is not writable: {e.strerror or e}"
    return None


# ----------------------------------------------------------------------------------------------------------
# Command line

def nearest(n, multiple, offset=0):
    """The valid value (offset + k*multiple, k >= 0) closest to n."""
    k = max(0, math.floor((n - offset) / multiple + 0.5))  # ties round up
    return offset + k * multiple


def lora_spec(spec):
    """--lora FILE[:SCALE] -> (FILE, SCALE); scale 1.0 when absent, None when not a finite number. A Windows
    path's drive letter (C:\\x.safetensors) is no scale."""
    path, sep, tail = spec.rpartition(":")
    if not sep or os.path.isfile(spec) or (len(path) == 1 and path.isalpha() and tail[:1] in ("\\", "/")):
        return spec, 1.0
    try:
        scale = float(tail)
    except ValueError:
        return path, None
    return path, scale if math.isfinite(scale) else None


def cache_spec(spec, height=720):
    """--cache METHOD[:THRESHOLD] -> a TeaCache, MagCache or EasyCache (each with its published default
    threshold); None when malformed. height (pixels) picks MagCache's published table."""
    method, _, tail = spec.partition(":")
    kind = {"teacache": TeaCache, "magcache": MagCache, "easycache": EasyCache}.get(method)
    if kind is None:
        return None
    try:
        threshold = float(tail) if tail else kind.DEFAULT_THRESHOLD
    except ValueError:
        return None
    if not 0 <= threshold < math.inf:  # negative, infinite or nan
        return None
    return MagCache(threshold, height) if kind is MagCache else kind(threshold)


def window_spec(spec):
    """--sta-window T,H,W -> (t, h, w) positive ints; None when malformed."""
    try:
        w = tuple(int(n) for n in spec.split(","))
    except ValueError:
        return None
    return w if len(w) == 3 and min(w) >= 1 else None


def check_args(args, prompts):
    """Every rule, before any model loads: returns the problems, one line each."""
    bad = []
    if not prompts or any(not p.strip() for p in prompts):
        bad.append("the prompt is empty: pass --prompt \"a red circle moving left\" or a --prompts file "
                   "with one per line")
    if args.out and not is_folder(args.out):
        if len(prompts) > 1:
            folder = os.path.dirname(args.out) or "."
            bad.append(f"--out {args.out} names one file; with --prompts the files are named after each "
                       f"prompt: drop --out, or give a folder for them (--out {folder}/)")
        elif os.path.splitext(args.out)[1].lower() != ".mp4":
            bad.append(f"--out {args.out}: the video is an mp4; name it {os.path.splitext(args.out)[0]}.mp4 "
                       f"(or end it with / for a folder)")
    for out in output_paths(args.out, args.seed, prompts or [""])[:1]:
        why = unwritable(out)
        if why:
            bad.append(f"--out {args.out or out}: cannot write there ({why}); pick another --out")
    last = args.seed + max(len(prompts), 1) - 1  # prompt i is drawn from seed + i
    if args.seed < -2 ** 63 or last >= 2 ** 64:
        top = 2 ** 64 - 1 - (last - args.seed)
        bad.append(f"--seed {args.seed}: must be between 0 and {top}"
                   + (f" (prompt i takes seed + i, {len(prompts)} prompts)" if last != args.seed else "")
                   + ": the noise generator's range")
    if args.fps is not None and not 1 <= args.fps <= 65535:
        bad.append(f"--fps {args.fps:g}: must be 1 to 65535 (the mp4's range; default 24 or the folder's "
                   "own)")
    if args.frames is not None and (args.frames < 1 or (args.frames - 1) % 4):
        bad.append(f"--frames {args.frames}: must be 4k+1 (1 for an image); "
                   f"nearest valid: {nearest(args.frames, 4, 1)}")
    for name in ("height", "width"):
        v = getattr(args, name)
        if v is not None and (v < 16 or v % 16):
            bad.append(f"--{name} {v}: must be a positive multiple of 16; use {max(16, -(-v // 16) * 16)} "
                       "(what the official sampler renders: it rounds up, inference.py align_to)")
    if args.steps is not None and args.steps < 1:
        bad.append(f"--steps {args.steps}: must be at least 1 (official: 50)")
    if args.shift is not None and args.shift <= 0:
        bad.append(f"--shift {args.shift}: must be positive (official: 7.0)")
    if args.cache is not None and cache_spec(args.cache) is None:
        bad.append(f"--cache {args.cache}: write teacache, magcache or easycache, optionally with "
                   f":THRESHOLD >= 0 (finite), e.g. --cache teacache:{TeaCache.DEFAULT_THRESHOLD}")
    if window_spec(args.sta_window) is None:
        bad.append(f"--sta-window {args.sta_window}: write three positive tile counts t,h,w, e.g. 3,3,7")
    if args.sta_full_steps < 0:
        bad.append(f"--sta-full-steps {args.sta_full_steps}: must be >= 0 (0 = sparse from the first step)")
    if args.sta_strategy and not os.path.isfile(args.sta_strategy):
        bad.append(f"--sta-strategy {args.sta_strategy}: no such file")
    if args.sparse is None and (args.sta_strategy or args.sta_window != STA_WINDOW):
        bad.append("--sta-window/--sta-strategy need --sparse sta")
    if args.sparse is not None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        bad.append("--sparse sta runs on one GPU: drop it or run without torchrun")
    if args.sparse is not None and args.image:
        bad.append("--sparse sta reorders the image tokens, which image-to-video's first frame needs in "
                   "order: drop --sparse with --image")
    if args.cfg_scale is not None and args.cfg_scale < 1:
        bad.append(f"--cfg-scale {args.cfg_scale}: must be >= 1 (1 = off)")
    official = [args.dit, args.vae, args.llm, args.clip]
    if any(official) and not all(official):
        bad.append("the official weights need all four of --dit, --vae, --llm and --clip")
    paths = [("--dit", args.dit), ("--vae", args.vae), ("--llm", args.llm), ("--clip", args.clip)]
    if not any(official):
        paths = [("--ckpt", args.ckpt)]
        if not os.path.isfile(os.path.join(args.ckpt, "config.json")):
            bad.append(f"--ckpt {args.ckpt}: no config.json there; run `python train.py` first (it writes "
                       f"out/demo) or pass the official --dit/--vae/--llm/--clip files")
            paths = []
    for flag, p in paths:
        if p and not os.path.exists(p):
            bad.append(f"{flag} {p}: no such file or directory")
    for spec in args.lora or ():
        path, scale = lora_spec(spec)
        if scale is None:
            bad.append(f"--lora {spec}: the scale after ':' must be a finite number, "
                       f"e.g. --lora style.safetensors:0.8")
        elif not os.path.isfile(path):
            bad.append(f"--lora {path}: " + ("a folder; give its .safetensors file" if os.path.isdir(path)
                                             else "no such file"))
    if args.image is not None and not os.path.isfile(args.image):
        bad.append(f"--image {args.image}: no such file")
    if args.image is not None and args.dit and importlib.util.find_spec("ftfy") is None:
        bad.append("--image with the official encoders needs ftfy, which the release's CLIP tokenizer cleans "
                   "prompts with: pip install ftfy")
    if mp4_writer_missing():
        bad.append(mp4_writer_missing())
    if args.image is not None and args.frames == 1:
        bad.append("--frames 1 with --image: the video's first frame is the image; ask for 4k+1 > 1 frames")
    if args.image is None and (args.i2v_resolution or args.i2v_stability):
        bad.append("--i2v-resolution and --i2v-stability go with --image")
    if args.dit and args.dit.endswith("_fp8.pt") and not os.path.exists(dit.fp8_map_path(args.dit)):
        bad.append(f"--dit {args.dit}: its fp8 scale map {dit.fp8_map_path(args.dit)} is missing "
                   f"(released beside it)")
    return bad


def memory_available(device):
    """Bytes free for a run on `device`: a GPU's free memory plus what PyTorch holds unused; the CPU's
    MemAvailable (Linux), else its physical memory. Swap is not counted: a run that needs it crawls."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError, IndexError):
        try:
            return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None


def memory_shortfall(pipe, n, height, width, frames, cfg, world, device, dtype):
    """Before the work starts: the first of the memory the run cannot do without (lower bounds, no more)
    that exceeds what `device` (and the host) has free, as one sentence; None when all fit or unknown. The
    DiT's widest activation, a single-stream block's input projection, B x tokens x hidden*(3 + mlp_ratio)
    (B: the n prompts, twice with CFG; tokens split over the sequence-parallel ranks); the decoded videos in
    the VAE's dtype plus one in fp32 (to_frames); the uint8 frames on the host."""
    c, v = pipe.dit.cfg, pipe.vae.cfg
    pt, ph, pw = c.patch_size
    latent = ((frames - 1) // v.time_compression + 1, height // v.spatial_compression,
              width // v.spatial_compression)
    tokens = -(-latent[0] // pt) * -(-latent[1] // ph) * -(-latent[2] // pw)
    tokens = -(-tokens // world) + getattr(pipe.encoder, "text_len", 0)
    itemsize = torch.empty(0, dtype=dtype).element_size()
    vae_itemsize = torch.empty(0, dtype=getattr(pipe.vae, "dtype", torch.float32)).element_size()
    pixels = 3 * frames * height * width
    dit_need = n * (2 if cfg else 1) * tokens * c.hidden_size * (3 + c.mlp_ratio) * itemsize
    decode_need = n * pixels * vae_itemsize + pixels * 4
    host_need = n * pixels + pixels * 4
    device = torch.device(device)
    checks = [(dit_need, "the DiT's activations", device), (decode_need, "the decoded video", device),
              (host_need, "the frames to write", torch.device("cpu"))]
    if device.type == "cpu":  # one memory: the decoded videos, one in fp32 and the uint8 frames at once
        checks = [(dit_need, "the DiT's activations", device),
                  (decode_need + n * pixels, "the decoded video", device)]
    size = f"{n} video{'s' if n > 1 else ''} of {width}x{height}, {frames} frames"
    for need, what, where in checks:
        free = memory_available(where)
        if free is not None and need > free:
            kind = "GPU" if where.type == "cuda" else "CPU"
            return (f"{size} need{'s' if n == 1 else ''} at least {need / 2**30:.1f} GiB of {kind} memory "
                    f"for {what}, and {free / 2**30:.1f} GiB is free")
    return None


def read_prompts(path):
    """--prompts FILE -> its non-blank lines, stripped (\\r of Windows line ends and a UTF-8 BOM too); exits
    with one line for a folder, a missing, unreadable or non-UTF-8 file, or one with no prompt in it."""
    if os.path.isdir(path):
        sys.exit(f"error: --prompts {path} is a folder: give a text file with one prompt per line")
    try:
        with open(path, "rb") as f:
            data = f.read().removeprefix(b"\xef\xbb\xbf")  # the BOM Windows editors write
        prompts = [line.strip() for line in data.decode("utf-8").splitlines() if line.strip()]
    except FileNotFoundError:
        sys.exit(f"error: --prompts {path}: no such file")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        sys.exit(f"error: --prompts {path} is not UTF-8 text (line {line} has the byte "
                 f"{data[e.start:e.start + 1]!r}): save it as UTF-8")
    except OSError as e:
        sys.exit(f"error: --prompts {path}: cannot read it ({e.strerror or e})")
    if not prompts:
        sys.exit(f"error: --prompts {path} has no prompt (it is empty or blank): write one prompt a line")
    return prompts


def one_line_warnings(shown):
    """A warnings.showwarning that prints each warning once, on one line (a truncated prompt, say)."""
    def show(message, category, filename, lineno, file=None, line=None):
        text = str(message)
        if text not in shown:
            shown.add(text)
            print(f"warning: {text}", file=sys.stderr)
    return show


def main():
    ap = argparse.ArgumentParser(description="Sample videos with HunyuanVideo: prompt in, mp4 out.")
    ap.add_argument("--prompt", help="the text prompt")
    ap.add_argument("--prompts", help="a text file with one prompt per line (a batch)")
    ap.add_argument("--ckpt", help="a folder written by train.py (default: out/demo, the embedded demo)")
    ap.add_argument("--dit", help="official DiT weights (mp_rank_00_model_states.pt, or the fp8 one: "
                    "mp_rank_00_model_states_fp8.pt with its _map.pt beside it), or diffusers/ours "
                    "safetensors")
    ap.add_argument("--vae", help="official VAE folder or pytorch_model.pt")
    ap.add_argument("--llm", help="official text_encoder folder (llava-llama-3 language model + tokenizer)")
    ap.add_argument("--clip", help="official text_encoder_2 folder (CLIP ViT-L/14)")
    ap.add_argument("--height", type=int, help="pixels, a multiple of 16 (default: the checkpoint's; "
                    "official 720)")
    ap.add_argument("--width", type=int, help="pixels, a multiple of 16 (default: the checkpoint's; "
                    "official 1280)")
    ap.add_argument("--frames", type=int, help="4k+1 frames (default: the checkpoint's; official 129)")
    # sampling options: unset, they take the checkpoint folder's own (config.json "sample"), else official
    ap.add_argument("--steps", type=int, help="Euler steps (official 50)")
    ap.add_argument("--shift", type=float, help="time shift s of sigma' = s*sigma/(1+(s-1)*sigma) "
                    "(official 7.0)")
    ap.add_argument("--guidance", type=float, help="embedded (distilled) guidance scale (official 6.0)")
    ap.add_argument("--cfg-scale", type=float, help="real classifier-free guidance; 1 = off (official 1.0)")
    ap.add_argument("--negative-prompt", help="for --cfg-scale > 1 (default, also for an empty string: the "
                    "checkpoint folder's own, else the official negative prompt)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="output .mp4 (default out/samples/<seed>_<prompt>.mp4)")
    ap.add_argument("--fps", type=float, help="frames per second, e.g. 24 or 23.976 (default 24; for --ckpt "
                    "the folder's own, its clips' frame rate)")
    ap.add_argument("--offload", action="store_true", help="stream the DiT's blocks (and the encoders) from "
                    "CPU memory")
    ap.add_argument("--lora", action="append", metavar="FILE[:SCALE]", help="a LoRA (diffusers/PEFT, "
                    "original-layout or kohya/musubi safetensors) at SCALE (default 1); repeat to stack")
    ap.add_argument("--cache", metavar="METHOD[:THRESHOLD]", help="skip DiT evaluations on steps whose "
                    "result barely changes: teacache, magcache or easycache (approximate, off by default; "
                    f"default thresholds {TeaCache.DEFAULT_THRESHOLD}, {MagCache.DEFAULT_THRESHOLD}, "
                    f"{EasyCache.DEFAULT_THRESHOLD}; 0 = every step, larger = more skipped; "
                    "docs/performance.md)")
    ap.add_argument("--riflex", nargs="?", const="paper", choices=[*dit.RIFLEX_RULES, "off"],
                    help="videos longer than the model repeats at (13B: past ~200 frames): lower a temporal "
                    "RoPE frequency. paper (the flag alone): RIFLEx's intrinsic one past its period; i2v: "
                    "the official I2V sampler's rule, the default for I2V DiTs; off: the default else")
    ap.add_argument("--sparse", choices=["sta"], help="sliding-tile attention (approximate, off by "
                    "default): image tokens attend to a 3D window of 6x8x8-token tiles after "
                    "--sta-full-steps dense steps")
    ap.add_argument("--sta-window", default=STA_WINDOW, metavar="T,H,W",
                    help=f"the window in tiles for every layer and head (default {STA_WINDOW})")
    ap.add_argument("--sta-strategy", metavar="FILE", help="a JSON window table, one [t, h, w] per head "
                    "per layer (double blocks first), or FastVideo's per-step strategy file, instead of "
                    "--sta-window")
    ap.add_argument("--sta-full-steps", type=int, default=15, help="dense steps before the sparse ones "
                    "(default 15, FastVideo's HunyuanVideo strategy at 50 steps)")
    ap.add_argument("--image", help="image-to-video (HunyuanVideo-I2V checkpoints): the first frame, a png "
                    "or jpg; the video size defaults to its official bucket (official weights) or the "
                    "folder's size")
    ap.add_argument("--i2v-resolution", choices=list(I2V_BUCKET_BASE), help="with --image: the size bucket "
                    "(official weights' default 720p; a train.py folder: its own size unless given)")
    ap.add_argument("--i2v-stability", action="store_true", help="with --image: start from 0.999 noise + "
                    "0.001 image latent (official --i2v-stability; the default shift is then 7, else 17)")
    ap.add_argument("--no-tiling", dest="tiling", action="store_false", help="decode the VAE in one piece")
    ap.add_argument("--keep-latents", action="store_true", help="keep each video's denoised latents beside "
                    "it (<video>.latents.safetensors; they are always written before the VAE decode, and "
                    "kept when it fails)")
    ap.add_argument("--decode", nargs="+", metavar="LATENTS", help="decode kept latents files to mp4s, "
                    "beside them or at --out, with a VAE alone (no prompt, no DiT): --vae's, --ckpt's, else "
                    "the one they were sampled with")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"],
                    help="DiT dtype (official bf16)")
    args = ap.parse_args()
    if args.decode:  # the VAE alone: every option of the sampling itself would go unused
        defaults = {"seed": 0, "sta_window": STA_WINDOW, "sta_full_steps": 15, "dtype": "bf16"}
        unused = [f"--{k.replace('_', '-')}" for k, v in vars(args).items()
                  if k not in ("decode", "ckpt", "vae", "out", "fps", "tiling")
                  and v not in (None, False, defaults.get(k))]
        bad = [f"--decode makes videos from kept latents with the VAE alone: drop {' '.join(unused)}"]
        bad = bad if unused else []
        if args.fps is not None and not 1 <= args.fps <= 65535:
            bad.append(f"--fps {args.fps:g}: must be 1 to 65535 (default: the latents' own rate)")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            bad.append("--decode runs in one process: run it without torchrun")
        if mp4_writer_missing():
            bad.append(mp4_writer_missing())
        if bad:
            sys.exit("error: " + "\nerror: ".join(bad))
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return decode_files(args.decode, args.ckpt, args.vae, device, args.tiling, args.fps, args.out)
    if args.ckpt is None:
        args.ckpt = os.path.join("out", "demo")

    prompts = [args.prompt] if args.prompt else []
    if args.prompts:
        prompts += read_prompts(args.prompts)
    if args.prompt is None and not args.prompts:
        prompts = [""]
    bad = check_args(args, prompts)
    if bad:
        sys.exit("error: " + "\nerror: ".join(bad))
    image, size = None, (args.height, args.width)
    if args.image:
        try:
            image = load_image(args.image)
        except ValueError as e:
            sys.exit(f"error: {e}")
        if args.i2v_resolution or (args.dit and args.height is None and args.width is None):
            size = i2v_bucket(*image.shape[:2], I2V_BUCKET_BASE[args.i2v_resolution or "720p"])

    # torchrun: one GPU per rank, sequence parallel over all of them (the DiT splits the tokens)
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]

    t0 = time.perf_counter()
    try:  # a damaged or mismatched weights file: one line naming it, not a traceback
        pipe = load_pipeline(None if args.dit else args.ckpt, args.dit, args.vae, args.llm, args.clip, device,
                             dtype, args.offload, [lora_spec(s) for s in args.lora or ()], image is not None)
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    kind = pipe.dit.cfg.image_condition_type
    if kind and image is None:
        sys.exit(f"error: this DiT is image-to-video ({kind}, HunyuanVideo-I2V): pass --image FILE")
    if image is not None and args.dit and pipe.encoder.llava is None:
        sys.exit(f"error: --llm {args.llm} is a language model alone; HunyuanVideo-I2V reads the image with "
                 f"the full LLaVA: pass its text_encoder_i2v folder (llava-llama-3-8b-v1_1-transformers)")
    cfg_scale = pipe.sampling["cfg_scale"] if args.cfg_scale is None else args.cfg_scale
    if args.negative_prompt and cfg_scale <= 1:
        sys.exit(f"error: --negative-prompt is read by real CFG alone, which is off (cfg scale "
                 f"{cfg_scale:g}): add --cfg-scale > 1 (e.g. 6) or drop --negative-prompt")
    if args.guidance is not None and not pipe.dit.cfg.guidance_embed:
        sys.exit(f"error: --guidance {args.guidance:g}: this DiT has no guidance embedder (it is not "
                 f"guidance-distilled), so it would be ignored: drop it, or use --cfg-scale (real CFG)")
    shift = args.shift
    if shift is None and image is not None and args.dit:  # official I2V scripts: 7 with stability, else 17
        shift = 7.0 if args.i2v_stability else 17.0
    if world > 1:
        pipe.dit.sp_group = dist.group.WORLD
    times = {"load": time.perf_counter() - t0}
    cache = cache_spec(args.cache, size[0] or pipe.video["height"]) if args.cache else None
    if args.riflex:  # else the pipeline's default: the official I2V sampler's rule for I2V DiTs, none for T2V
        pipe.dit.riflex = None if args.riflex == "off" else args.riflex
    sparse = None
    if args.sparse == "sta":
        try:
            sparse = dit.SlidingTile.from_file(args.sta_strategy, pipe.dit.cfg, args.sta_full_steps) \
                if args.sta_strategy else \
                dit.SlidingTile.uniform(pipe.dit.cfg, window_spec(args.sta_window), args.sta_full_steps)
        except ValueError as e:
            sys.exit(f"error: {e}")
        steps = args.steps or pipe.sampling["steps"]
        if sparse.per_step is not None and len(sparse.per_step) != steps:
            n = len(sparse.per_step)
            sys.exit(f"error: --sta-strategy {args.sta_strategy} has windows for {n} steps, not {steps}: "
                     f"sample with --steps {n}")
    short = memory_shortfall(pipe, len(prompts), size[0] or pipe.video["height"],
                             size[1] or pipe.video["width"], args.frames or pipe.video["frames"],
                             cfg_scale > 1, world, device, dtype)
    if short:
        sys.exit(f"error: {short}: lower --height/--width/--frames, or sample fewer prompts at a time")
    outs = output_paths(args.out, args.seed, prompts)
    source = ["--vae", os.path.abspath(args.vae)] if args.dit else ["--ckpt", os.path.abspath(args.ckpt)]
    fps = args.fps or pipe.video["fps"]  # a train.py folder: the rate its training clips play at
    kept = []  # the denoised latents, written before the VAE decode: a decode that fails loses no sampling

    def decode_command(files):
        import shlex
        return shlex.join(["python", "sample.py", "--decode", *files, *source])

    def keep(latents):
        for i, (out, z) in enumerate(zip(outs, latents)):
            meta = {"prompt": prompts[i], "seed": str(args.seed + i), "fps": str(fps),
                    "drop": str(4 if kind == "latent_concat" else 0), "vae": json.dumps(source),
                    "vae_config": json.dumps(asdict(pipe.vae.cfg))}
            try:
                write_latents(latents_path(out), z, meta)
                kept.append(latents_path(out))
            except OSError as e:
                print(f"warning: cannot keep the latents in {latents_path(out)} ({e.strerror or e})",
                      file=sys.stderr)

    failure = None
    try:
        # an empty --negative-prompt, too, means the default one (as official inference.py); a prompt longer
        # than the text encoders read is said once, on one line
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = one_line_warnings(set())
            try:
                videos = generate(pipe, prompts, args.seed, *size, args.frames, args.steps, shift,
                                  args.guidance, args.cfg_scale, args.negative_prompt or None,
                                  tiled=args.tiling, times=times, cache=cache, sparse=sparse, image=image,
                                  stability=args.i2v_stability, on_latents=keep)
            except (RuntimeError, MemoryError, KeyboardInterrupt) as e:
                if not kept:  # before the latents: nothing finished to keep
                    raise
                why = "interrupted" if isinstance(e, KeyboardInterrupt) else (str(e).splitlines() or ["?"])[0]
                sys.exit(f"error: the VAE decode stopped ({why[:200]}); the sampled latents are kept, decode "
                         f"them with: {decode_command(kept)}")
        if rank == 0:
            t0 = time.perf_counter()
            for i, (out, frames) in enumerate(zip(outs, videos)):
                png = os.path.splitext(out)[0] + ".png"
                try:
                    write_mp4(frames, out, fps)
                    write_strip(frames, png)
                except OSError as e:
                    left = [f for f in map(latents_path, outs[i:]) if f in kept]
                    sys.exit(f"error: cannot write {out} ({e.strerror or e}); pick another --out" +
                             (f"; the latents of the videos not written are kept: {decode_command(left)} "
                              f"--out FOLDER/" if left else ""))
                T, H, W, _ = frames.shape
                print(f"wrote {out} ({T} frames, {W}x{H}, {fps:g} fps) and its strip {png}")
                if latents_path(out) in kept:
                    if args.keep_latents:
                        print(f"kept {latents_path(out)} ({decode_command([latents_path(out)])} decodes it "
                              f"again)")
                    else:
                        try:
                            os.remove(latents_path(out))
                        except FileNotFoundError:  # another run wrote the same name and removed it
                            pass
            times["write"] = time.perf_counter() - t0
            print("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in times.items()))
            if cache is not None:
                print(f"{type(cache).__name__} {cache.threshold}: {cache.computed} of "
                      f"{cache.computed + cache.skipped} steps ran the DiT's blocks")
            if pipe.dit.riflex:
                c = pipe.dit.cfg
                latent = ((args.frames or pipe.video["frames"]) - 1) // pipe.vae.cfg.time_compression + 1
                k = dit.riflex_k(pipe.dit.riflex, latent, c.rope_axes[0], c.rope_theta)
                if k is not None or args.riflex:
                    print(f"RIFLEx ({pipe.dit.riflex} rule), {latent} latent frames: " +
                          (f"the temporal RoPE's frequency {k} lowered" if k is not None
                           else "RoPE unchanged"))
            if device.type == "cuda":
                print(f"peak GPU memory: {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB")
    except SystemExit as e:  # rank 0's one line: under torchrun the other ranks hear of it first
        if world == 1:
            raise
        failure = e.code
    if world > 1:  # rank 0's outcome to every rank, so that none waits on a rank that has gone
        status = [failure]
        dist.broadcast_object_list(status, src=0)
        dist.destroy_process_group()
        if rank == 0 and status[0] is not None:
            sys.exit(status[0])


if __name__ == "__main__":
    main()
