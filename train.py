"""
Flow-matching training of HunyuanVideo (paper §4.5), from one CPU to many GPUs, and the embedded demo.

    python train.py                                   # the embedded demo: data -> VAE -> DiT -> samples
    python train.py --quick                           # the same, in well under a minute (CI)
    python train.py --preset 1.3b-gpu --data CURATED  # a DiT on curate.py's manifests, one GPU
    torchrun --nproc_per_node 8 train.py --preset 13b-finetune --data CURATED \
        --init-dit mp_rank_00_model_states.pt         # fine-tune the release on 8 GPUs
    python train.py ... --resume                      # continue a killed run from its last checkpoint
    python train.py --lora 16 --from out/demo --data CURATED          # a LoRA on a train.py folder's DiT
    python train.py --lora 128 --init-dit mp_rank_00_model_states.pt --vae VAE --llm LLM --clip CLIP \
        --preset 13b-finetune --data CURATED [--offload]              # a LoRA on the release, one GPU
    python train.py --lora-demo                       # teach the demo model "moving diagonally" (LoRA)

One file, one loop per stage, read top to bottom: configs and presets, flow matching, data (captions,
buckets, the small text encoder), distributed setup, checkpoints, the VAE stage, the DiT stage (latent
caches, then the loop), the pipeline that runs them (and the demo), LoRA runs, main(). `python train.py` and
`torchrun ... train.py` run the same code: torchrun's RANK/WORLD_SIZE turn on FSDP2 sharding.
"""

import argparse
import contextlib
import functools
import hashlib
import json
import math
import os
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import dit
import sample
import text_encoder
import vae as vae_lib

# ----------------------------------------------------------------------------------------------------------
# Configs


@dataclass
class Stage:
    """One step of the progressive curriculum (paper §4.5.2-4.5.3). Each bucket is (height, width, frames,
    batch size per rank); frames == 1 is an image bucket. Every clip/image goes to its nearest bucket."""
    name: str
    steps: int
    buckets: tuple                  # ((H, W, T, batch), ...)
    image_buckets: tuple = ()       # ((H, W, batch), ...): still frames mixed in at every stage
    image_ratio: float = 0.0        # fraction of steps that take an image batch (paper: varies by stage)
    lr: float = 1e-4


@dataclass
class TrainConfig:
    dit: str = "tiny"                   # dit.CONFIGS preset...
    dit_overrides: dict = field(default_factory=dict)  # ...with these fields changed
    stages: tuple = ()
    # optimisation (the paper states none of these: AdamW with the DiT defaults)
    betas: tuple = (0.9, 0.999)
    weight_decay: float = 0.0
    warmup: int = 100                   # linear warmup steps at the start of every stage
    min_lr_ratio: float = 0.1           # cosine decay to this fraction of the stage's lr
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    grad_checkpointing: bool = False
    compile: bool = False               # torch.compile each DiT block (dit.compile_blocks): GPU speed
    # flow matching (paper §4.5.1): sigma ~ logit-normal; mean/std not stated, SD3's (0, 1) by default
    sigma_mean: float = 0.0
    sigma_std: float = 1.0
    # captions (paper §3.2): empty caption for CFG; structured-field dropout and permutation
    caption_dropout: float = 0.1
    field_dropout: float = 0.5
    short_only: float = 0.4             # probability of the bare short description (what users type)
    # draw each epoch's items with replacement in proportion to curate.py's k-means concept weights
    # (paper §3.1: ~10K concept centroids "used to resample and balance"; the rule is not stated)
    balance_concepts: bool = False
    # embedded guidance: None = the DiT has none; a number = that scale (x1000) fed while training, as
    # fine-tunes of the distilled release do; "distill" would need a teacher (paper §5.5), not done here
    train_guidance: float = None
    # data
    frame_stride: int = 1               # every n-th source frame (a lower frame rate: more motion per clip)
    clip_windows: int = 1               # train on up to this many non-overlapping windows of each clip
    # VAE stage (paper §4.1): from scratch on clips, L1 + 0.1 LPIPS + 0.05 GAN + 1e-6 KL
    vae: str = "tiny"                   # vae.CONFIGS preset...
    vae_overrides: dict = field(default_factory=dict)  # ...with these fields changed
    vae_steps: int = 0
    vae_size: tuple = (64, 64, 9)       # training crops (H, W, T)
    vae_batch: int = 4
    vae_image_ratio: float = 0.2        # fraction of steps on stills (paper §4.1 mixes video:image 4:1)
    vae_image_batch: int = 4
    vae_image_size: tuple = None        # (H, W) crops of the stills; None = vae_size's
    vae_lr: float = 1e-3
    vae_tile_prob: float = 0.0          # paper §4.1: some steps tiled, against tiling artifacts
    vae_frame_stride: int = None        # the VAE's clips take every n-th source frame; None = frame_stride's
    # Demo-only options: each lets a VAE and DiT of ~1M parameters learn in CPU minutes where the paper's
    # recipe needs far more steps; the defaults are the paper's (off). Only the demo preset sets them.
    vae_mse: float = 0.0                # extra MSE term (VAELoss w_mse): LPIPS/GAN need longer runs
    vae_chroma: float = 0.0             # extra MSE on the error's colour (w_chroma): small shapes' colours
    vae_latent_rgb: float = 0.0         # latent channels 0-2 held to each cell's mean RGB: colours far apart
    vae_kl_sum: bool = False            # KL summed per sample (3THW x stronger): short runs' latents small
    vae_crop_tries: int = 1             # the most varied of n random crops: not all flat background
    # sample.py's defaults for the output folder (config.json "sample"); unset keys take the official ones
    sampling: dict = field(default_factory=dict)
    # bookkeeping
    ckpt_every: int = 500
    log_every: int = 1
    seed: int = 0


PRESETS = {
    # The embedded demo (`python train.py`): 64x64 px, 9-frame clips of coloured shapes, minutes on a 2-core
    # CPU. docs/demo.md has the measurements behind these values.
    "demo": TrainConfig(
        # 8x8 tokens of 8x8 px per latent frame (a 4x VAE, 2x2 patches): a shape 32 px across spans 4x4
        # tokens, where an 8x VAE gave it under 2x2; a narrower DiT than the 1.3B's, same layout
        dit="tiny", dit_overrides=dict(in_channels=16, out_channels=16, hidden_size=128, num_heads=2,
                                       rope_axes=(16, 24, 24), depth_double=2, depth_single=2,
                                       guidance_embed=False),
        # stills first, then mostly video: a shape's direction is the last thing the DiT learns, and its
        # corners come later still (at 2,500 video steps squares come out rounded: docs/demo.md)
        stages=(Stage("image", 300, buckets=(), image_buckets=((64, 64, 16),), image_ratio=1.0, lr=1e-3),
                Stage("video", 3500, buckets=((64, 64, 9, 8),), image_buckets=((64, 64, 16),),
                      image_ratio=0.2, lr=1e-3)),
        warmup=50, ema_decay=0.995, ckpt_every=500,
        # a 9-frame clip spans 65 source frames, in which a shape moves 1/8 to 1/4 of the frame: the larger
        # each clip's motion, the sooner the DiT ties it to the direction word
        frame_stride=8, clip_windows=4,
        short_only=0.6,  # the sample prompts are bare short descriptions
        # the sampler's shifted schedule spends most steps at high noise, where layout and motion are decided
        sigma_mean=0.8,
        # the unconditional prompt is the empty caption the DiT was trained with (10% of captions), not the
        # official negative prompt, whose words the demo's vocabulary never saw; a mild CFG scale, as higher
        # ones draw ghost copies of the shape that merge with it (docs/demo.md)
        sampling=dict(steps=30, shift=3.0, guidance=None, cfg_scale=3.0, negative_prompt=""),
        # the release's 16 latent channels at 4x spatial compression (three blocks): 16x16 cells of 4x4 px
        vae_overrides=dict(latent_channels=16, block_out_channels=(16, 32, 32), norm_groups=4,
                           spatial_compression=4),
        # video steps on small crops (motion is local), stills at the full frame; 1,600 steps, as at 800 the
        # reconstructions already round a square's corners (docs/demo.md)
        vae_steps=1600, vae_size=(32, 32, 9), vae_image_size=(64, 64), vae_batch=4, vae_image_ratio=0.5,
        vae_image_batch=8, vae_lr=2e-3,
        # demo-only (see TrainConfig): without the chroma and latent-RGB terms, red and blue reconstruct
        # green (docs/demo.md); crops of a quarter frame are often all backdrop without the crop tries; the
        # KL summed per sample, as the demo was tuned and measured with
        vae_crop_tries=4, vae_mse=10.0, vae_chroma=30.0, vae_latent_rgb=10.0, vae_kl_sum=True),
    # a 1.3B DiT from scratch on one GPU: 256px images, then 256px video, then longer video. No guidance
    # embedder: the release's was distilled from a CFG teacher (train_guidance, above), which a run from
    # scratch has not got; left on, it would see one constant while training and 6000 at sampling. The
    # model learns ordinary CFG from the empty captions instead: sample it with --cfg-scale > 1.
    "1.3b-gpu": TrainConfig(
        dit="1.3b", dit_overrides=dict(guidance_embed=False), stages=(
            Stage("t2i-256", 20000, buckets=(), image_ratio=1.0, image_buckets=(
                (256, 256, 64), (192, 320, 64), (320, 192, 64)), lr=1e-4),
            Stage("t2v-256-short", 20000, buckets=((256, 256, 33, 8), (192, 320, 33, 8), (320, 192, 33, 8)),
                  image_buckets=((256, 256, 64),), image_ratio=0.2, lr=1e-4),
            Stage("t2v-256-long", 20000, buckets=((256, 256, 65, 4), (192, 320, 65, 4), (320, 192, 65, 4)),
                  image_buckets=((256, 256, 64),), image_ratio=0.1, lr=5e-5)),
        grad_checkpointing=True, ema_decay=0.9999, vae="884-16c-hy",
        sampling=dict(cfg_scale=6.0)),  # the scale the release's embedder stands for (official default 6.0)
    # fine-tuning the released 13B on curated 540p video (load it with --init-dit)
    "13b-finetune": TrainConfig(
        dit="13b", stages=(Stage("ft-540p", 5000,
                                 buckets=((544, 960, 65, 1), (960, 544, 65, 1), (720, 720, 65, 1)),
                                 image_buckets=((544, 960, 4),), image_ratio=0.1, lr=1e-5),),
        # sigma as the official trainer draws it (HunyuanVideo-I2V run_train_image2video_lora.sh: logit-
        # normal, then flow shift 7; s t / (1 + (s-1) t) of t = sigmoid(z) is sigmoid(z + ln s)): mostly
        # high noise, where the sampler's shift 7 spends its steps
        sigma_mean=math.log(7.0),
        # guidance 1: the distilled model's plain conditional velocity, which is the flow-matching target (the
        # official I2V trainer feeds 6, pulling the guided output toward the unguided target; musubi-tuner 1)
        grad_checkpointing=True, ema_decay=0.9999, vae="884-16c-hy", train_guidance=1.0, warmup=200),
}

# the demo's data and prompts
DEMO_PROMPTS = [f"a {c} {s} moving {d}" for c, s, d in [
    ("red", "circle", "left"), ("green", "square", "right"), ("blue", "triangle", "up"),
    ("yellow", "circle", "down"), ("white", "square", "left"), ("red", "triangle", "right"),
    ("green", "circle", "up"), ("blue", "square", "down"), ("yellow", "triangle", "left"),
    ("white", "circle", "right"), ("red", "square", "up"), ("green", "triangle", "down"),
    ("blue", "circle", "left"), ("yellow", "square", "right"), ("white", "triangle", "up"),
    ("red", "circle", "down"), ("green", "square", "left"), ("blue", "triangle", "right"),
    ("yellow", "circle", "up"), ("white", "square", "down")]]
DEMO_SOURCE = (256, 256)  # the generated videos' (width, height): square, so no crop cuts a shape off
DEMO_SHAPE_SIZE = 0.25  # shape radius / frame side: 16 px in the 64x64 frame, a square 4x4 DiT tokens
# the farthest a shape moves in one shot / frame side, centred on the frame: at most 0.15 of the side from
# the middle, so with radius 0.25 a shape never touches the border (where the reader cannot measure it)
DEMO_SHAPE_TRAVEL = 0.3
# a whole short description (<= 8 word tokens) fits and leads every caption, so a longer caption loses
# detail only; half the text tokens of 32 make a DiT step cheaper
DEMO_TEXT_LEN = 16


# train.py --lora: the steps and learning rate unless --steps/--lr say otherwise
LORA_STEPS, LORA_LR = 1000, 1e-4


def dit_config(cfg: TrainConfig):
    return replace(dit.CONFIGS[cfg.dit], **cfg.dit_overrides)


def vae_config(cfg: TrainConfig):
    return replace(vae_lib.CONFIGS[cfg.vae], **cfg.vae_overrides)

# ----------------------------------------------------------------------------------------------------------
# Flow matching (paper §4.5.1) in the official sampler's convention: sigma=1 is noise, sigma=0 is data;
# and the learning-rate schedule

def sample_sigma(n, mean, std, generator=None):
    """sigma ~ logit-normal: sigmoid of N(mean, std^2), which concentrates training on mid noise levels."""
    return torch.sigmoid(mean + std * torch.randn(n, generator=generator))


def flow_matching_loss(model, x0, noise, sigma, cond, guidance=None):
    """x_sigma = (1 - sigma) x0 + sigma * noise; the model predicts v = noise - x0 (= dx/dsigma, the
    velocity the Euler sampler integrates from sigma=1 to 0) at timestep sigma*1000; MSE."""
    s = sigma.view(-1, *[1] * (x0.ndim - 1))
    x = (1 - s) * x0 + s * noise
    text, mask, pooled = cond
    if getattr(getattr(model, "cfg", None), "image_condition_type", None) == "token_replace":
        # image-to-video (--i2v, docs/i2v.md; official I2V trainer, transport.py): latent frame 0 stays
        # clean, as the sampler gives it the image's latent, and only frames 1.. are learned
        x = torch.cat([x0[:, :, :1], x[:, :, 1:]], 2)
        v = model(x, sigma * 1000, text, mask, pooled, guidance)
        return F.mse_loss(v[:, :, 1:].float(), (noise - x0)[:, :, 1:].float())
    v = model(x, sigma * 1000, text, mask, pooled, guidance)
    return F.mse_loss(v.float(), (noise - x0).float())


def lr_at(step, stage, cfg):
    """Linear warmup, then cosine decay to min_lr_ratio of the stage's learning rate."""
    if step < cfg.warmup:
        return stage.lr * (step + 1) / cfg.warmup
    p = (step - cfg.warmup) / max(1, stage.steps - cfg.warmup)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, p)))
    return stage.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)

# ----------------------------------------------------------------------------------------------------------
# Data: clips and stills from curate.py's manifests, captions, buckets

def read_jsonl(path):
    """The rows of our own jsonl logs (metrics.jsonl); a line cut off by a killed run is left out (it was a
    JSONDecodeError traceback on --resume)."""
    rows = []
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except ValueError:
                pass
    return [r for r in rows if isinstance(r, dict)]


def read_manifest(path, fix):
    """The records of a curate.py jsonl file. A torn last line (curate.py killed mid-append) is dropped with a
    warning; any other line that is not a JSON record with a "path" is a one-line exit naming it and `fix`."""
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    recs, n = [], len(lines)
    while n and not lines[n - 1].strip():
        n -= 1
    for i, line in enumerate(lines[:n]):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except ValueError:  # JSONDecodeError, or bytes that are not UTF-8
            if i == n - 1:
                print(f"warning: {path}: its last line is cut off (curate.py stopped mid-write?); "
                      f"left out: {fix}", file=sys.stderr)
                continue
            raise SystemExit(f"error: {path} line {i + 1} is not valid JSON: delete or repair that line, "
                             f"or {fix}")
        if not isinstance(r, dict) or not isinstance(r.get("path"), str) or not r["path"]:
            raise SystemExit(f"error: {path} line {i + 1} is not a clip/still record (a JSON object with a "
                             f"\"path\"): delete or repair that line, or {fix}")
        recs.append(r)
    return recs


def caption_of(r):
    """A record's structured caption, or None if it has none to train on: a plain string counts as the short
    description; a dict needs a short or dense description (curate.py leaves them out when captioning
    failed: caption_error)."""
    cap = r.get("caption")
    if isinstance(cap, str):
        cap = {"short_description": cap}
    if not isinstance(cap, dict):
        return None
    cap = {k: v for k, v in cap.items() if isinstance(v, str) and v.strip()
           or isinstance(v, list) and v and all(isinstance(x, str) for x in v)}
    return cap if cap.get("short_description") or cap.get("dense_description") else None


def load_items(data_dir, tier=None):
    """Training items from a curate.py output folder: its clips (manifest.jsonl; with a tier, curate.py's set
    for that stage: manifest_<tier>.jsonl, or finetune.jsonl for tier "finetune") and its stills
    (images.jsonl; with a tier, the largest of curate.py's image sets images_<side>p.jsonl not above the
    tier's side, as the paper's stages raise image and video resolution together), each with an absolute
    path and its structured caption. Records without a caption are left out, said in one line."""
    name = "finetune.jsonl" if tier == "finetune" else f"manifest_{tier}.jsonl" if tier else "manifest.jsonl"
    path = os.path.join(data_dir, name)
    fix = f"re-run `python curate.py --input RAW --output {data_dir}`"
    if not os.path.isfile(path):
        if tier and os.path.isfile(os.path.join(data_dir, "manifest.jsonl")):
            have = sorted(f[9:-6] for f in os.listdir(data_dir) if re.fullmatch(r"manifest_.+\.jsonl", f))
            have += ["finetune"] if os.path.isfile(os.path.join(data_dir, "finetune.jsonl")) else []
            raise SystemExit(f"error: --tier {tier}: --data {data_dir} has no {name}; "
                             + (f"its tiers are {', '.join(have)}" if have else
                                f"it has no tier sets (curate.py writes them when it finishes: {fix})")
                             + ", or drop --tier")
        raise SystemExit(f"error: --data {data_dir}: no {name}; run "
                         f"`python curate.py --input RAW --output {data_dir}` first")
    if os.path.isdir(path):
        raise SystemExit(f"error: --data {data_dir}: {name} is a folder, not curate.py's manifest")
    img_name = "images.jsonl"
    if tier:
        side = int(tier[:-1]) if tier[:-1].isdigit() else 10**9  # finetune: the largest set
        sets = {int(f[7:-7]): f for f in os.listdir(data_dir) if re.fullmatch(r"images_\d+p\.jsonl", f)}
        fits = [k for k in sets if k <= side]
        if fits:
            img_name = sets[max(fits)]
    img_path = os.path.join(data_dir, img_name)
    out = []
    for p, kind in ((path, "video"), (img_path, "image")):
        recs = read_manifest(p, fix) if os.path.isfile(p) else []
        items = [dict(r, path=os.path.join(data_dir, r["path"]), kind=kind, caption=caption_of(r))
                 for r in recs]
        kept = [it for it in items if it["caption"]]
        if len(kept) < len(items):
            print(f"note: {len(items) - len(kept)} of {len(items)} records in {p} have no caption (no short "
                  f"or dense description): left out", file=sys.stderr)
        out.append(kept)
    clips, images = out
    if not clips and not images:
        raise SystemExit(f"error: --data {data_dir}: no captioned clips or images in {name}")
    return clips, images


def probe_media(path, kind):
    """(width, height, frames) of a clip or still from its file, or None if it cannot be opened."""
    import cv2
    if kind == "image":
        im = cv2.imread(path)
        return None if im is None else (im.shape[1], im.shape[0], 1)
    cap = cv2.VideoCapture(path)
    try:
        w, h = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
        n = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    finally:
        cap.release()
    return (w, h, n) if w > 0 and h > 0 and n > 0 else None


def usable_items(clips, images):
    """The items train.py can read: a missing file is left out, and so is one whose size (and a clip's
    frame count) the record lacks and its file cannot give; each said in one line with the first example.
    Two records with one id (curate.py's "clip"/"image") but different files would share one latent cache
    file: a one-line exit. Both empty: a one-line exit."""
    out = []
    for items, what in ((clips, "clip"), (images, "still")):
        kept, missing, unreadable, ids = [], [], [], {}
        for it in items:
            if not os.path.isfile(it["path"]):
                missing.append(it["path"])
                continue
            need = ("width", "height") + (("frames",) if it["kind"] == "video" else ())
            ok = all(isinstance(it.get(k), (int, float)) and not isinstance(it.get(k), bool) and it[k] > 0
                     for k in need)
            if not ok:
                got = probe_media(it["path"], it["kind"])
                if got is None:
                    unreadable.append(it["path"])
                    continue
                it = dict(it, width=got[0], height=got[1], frames=got[2]) if it["kind"] == "video" else \
                    dict(it, width=got[0], height=got[1])
            key = item_id(it)
            if ids.setdefault(key, it["path"]) != it["path"]:
                field = "clip" if it["kind"] == "video" else "image"
                raise SystemExit(f"error: two {what}s are named {key!r} ({ids[key]} and {it['path']}): give "
                                 f"each record its own \"{field}\" id")
            kept.append(it)
        for paths, why in ((missing, "missing"), (unreadable, "not readable")):
            if paths:
                print(f"warning: {len(paths)} of {len(items)} {what}s' files are {why} (first: {paths[0]}): "
                      f"left out; paths in the manifest are relative to --data", file=sys.stderr)
        out.append(kept)
    if not out[0] and not out[1]:
        raise SystemExit("error: --data: none of the manifest's clips or stills can be read (see above)")
    return out


CAPTION_ORDER = ("dense_description", "background", "style", "shot_type", "lighting", "atmosphere")


def build_caption(cap, gen, cfg: TrainConfig):
    """Paper §3.2: captions of varied length and pattern from the structured fields, by dropout and
    permutation. The short description always leads; with probability cfg.short_only it is all there is
    (the form users type). Camera movement, source and quality tags are fields like the others."""
    short = cap.get("short_description") or cap.get("dense_description") or ""
    if torch.rand((), generator=gen) < cfg.short_only:
        return short
    extra = [cap[k] for k in CAPTION_ORDER if cap.get(k) and cap[k] != short]
    if cap.get("camera_movement"):
        extra.append(cap["camera_movement"])
    extra += [", ".join(cap[k]) for k in ("quality_tags", "source_tags") if cap.get(k)]
    keep = [e for e in extra if torch.rand((), generator=gen) >= cfg.field_dropout]
    order = torch.randperm(len(keep), generator=gen).tolist()
    return ". ".join([short] + [keep[i] for i in order])


def read_clip(path, size, start=0, frames=None, stride=1):
    """Frames start, start+stride, ... (`frames` of them; all if None) of an mp4, resized to cover (H, W)
    and centre-cropped, as a uint8 RGB tensor (3, T, H, W). Stills (jpg/png) come back with T = 1."""
    import cv2
    H, W = size
    if path.lower().endswith((".jpg", ".jpeg", ".png")):
        with open(path, "rb") as f:
            data = f.read()
        # OpenCV decodes a cut-off JPEG without an error, its missing rows grey (zeros in [-1, 1]): the end
        # marker must follow the last scan (inside a scan 0xFF bytes are stuffed, so it cannot occur there)
        if path.lower().endswith((".jpg", ".jpeg")) and data.find(b"\xff\xd9", data.rfind(b"\xff\xda")) < 0:
            raise ValueError(f"{path}: the JPEG is cut off (no end marker)")
        raw = [cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)]
    else:
        cap = cv2.VideoCapture(path)
        cap.set(cv2.CAP_PROP_POS_FRAMES, start)
        raw, i = [], 0
        while frames is None or len(raw) < frames:
            ok, f = cap.read()
            if not ok:
                break
            if i % stride == 0:
                raw.append(f)
            i += 1
        cap.release()
    if not raw or raw[0] is None or (frames is not None and len(raw) < frames):
        raise ValueError(f"{path}: could not read {frames or 'any'} frames from frame {start}")
    h, w = raw[0].shape[:2]
    scale = max(H / h, W / w)
    nh, nw = max(H, round(h * scale)), max(W, round(w * scale))
    y, x = (nh - H) // 2, (nw - W) // 2
    out = np.stack([cv2.resize(f, (nw, nh), interpolation=cv2.INTER_AREA)[y:y + H, x:x + W, ::-1]
                    for f in raw])
    return torch.from_numpy(out.copy()).permute(3, 0, 1, 2)


SKIPPED = set()  # the files this process found unreadable: each said once, then left out


def read_or_skip(it, size, start=0, frames=None, stride=1):
    """read_clip, or None for a file that cannot be decoded (damaged, cut off, shorter than its record
    says): one warning line per file, and training goes on without it instead of stopping hours in."""
    import cv2
    try:
        return read_clip(it["path"], size, start, frames, stride)
    except (ValueError, OSError, cv2.error) as e:
        if it["path"] not in SKIPPED:
            SKIPPED.add(it["path"])
            why = str(e).replace(it["path"] + ": ", "")
            where = f" from frame {start} on" if start else ""
            print(f"warning: skipping {it['path']}{where}: {why}; training goes on without it (re-run "
                  f"curate.py or remove its line from the manifest)", file=sys.stderr)
        return None


def to_unit(x):
    """uint8 video -> float in [-1, 1], the VAE's input range."""
    return x.float() / 127.5 - 1


def assign_buckets(items, buckets, stride=1):
    """Each item to its nearest bucket (paper §4.5.3): among buckets no longer than the clip (T frames at
    `stride` span (T-1)*stride+1), the aspect ratio closest in log space, then the longest duration.
    Returns {bucket index: [item index, ...]}."""
    out = {}
    for i, it in enumerate(items):
        n = it.get("frames", 1)
        fits = [b for b in range(len(buckets)) if (buckets[b][2] - 1) * stride + 1 <= n] \
            if it["kind"] == "video" else list(range(len(buckets)))
        if not fits:
            continue
        ar = math.log(it["width"] / it["height"])
        best = min(fits, key=lambda b: (abs(math.log(buckets[b][1] / buckets[b][0]) - ar), -buckets[b][2]))
        out.setdefault(best, []).append(i)
    return out


def check_stages(cfg, clips, images, first=0, rank=0):
    """At startup, not hours in when a stage begins: a stage that no clip or still fits is a one-line exit;
    one whose video buckets no clip is long enough for (T frames at the frame stride) would train on stills
    alone, and clips too short for a stage are left out of it: each said in one line."""
    for stage in cfg.stages[first:]:
        fit = sum(map(len, assign_buckets(clips, stage.buckets, cfg.frame_stride).values())) \
            if stage.buckets else 0
        stills = bool(stage.image_buckets and images)
        if stage.buckets:
            t = min(b[2] for b in stage.buckets)
            need = (t - 1) * cfg.frame_stride + 1
            longest = max((c["frames"] for c in clips), default=0)
            why = (f"its shortest video bucket needs {need} source frames ({t} at frame stride "
                   f"{cfg.frame_stride}), the longest clip has {longest}")
        if not fit and not stills:
            raise SystemExit(f"error: stage {stage.name}: no clip or still fits its buckets"
                             + (f" ({why})" if stage.buckets and clips else "")
                             + ": curate clips long enough (or stills) for this preset, or pick another one")
        if rank == 0 and stage.buckets and fit < len(clips):
            print(f"warning: stage {stage.name}: no clip fits its video buckets ({why}): it trains on stills "
                  f"only; curate longer clips" if not fit else
                  f"note: stage {stage.name}: {len(clips) - fit} of {len(clips)} clips are too short for it "
                  f"({why}): left out of this stage", file=sys.stderr)


def check_balance(clips):
    """--balance draws clips by curate.py's k-means concept weights ("weight", mean 1): without them it would
    silently draw uniformly, and a negative or non-number weight would stop the run at its first epoch."""
    w = [c.get("weight") for c in clips]
    if not clips or all(v is None for v in w):
        raise SystemExit("error: --balance: the clips have no k-means concept weights (\"weight\", which "
                         "curate.py writes when it finishes): re-run curate.py on --data, or drop --balance")
    for c, v in zip(clips, w):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0
                              or math.isinf(v)):
            raise SystemExit(f"error: --balance: {c['path']} has weight {v!r}, not a number >= 0: fix its "
                             f"record or re-run curate.py")
    if not any(v is None or v > 0 for v in w):
        raise SystemExit("error: --balance: every clip's concept weight is 0: nothing to draw")
    if None in w:
        print(f"warning: --balance: {w.count(None)} of {len(w)} clips have no concept weight: drawn with "
              f"weight 1 (the mean)", file=sys.stderr)


def bucket_batches(groups, batch_sizes, seed, epoch, world=1, weights=None):
    """One epoch of global batches: each bucket's items shuffled and cut into batches of its per-rank batch
    size x world, batches shuffled across buckets; every item appears exactly once, or, with weights
    ({item: weight}, concept balancing), as many draws per bucket as it has items, with replacement and in
    proportion to the weights. Rank r trains on slice r of each global batch (rank_slice), so N ranks see
    exactly the batches one process with N times the batch would. With several ranks a bucket's last,
    partial batch is topped up from the bucket's start so that every rank gets the same number of items."""
    g = torch.Generator().manual_seed(seed * 100003 + epoch)
    batches = []
    for b in sorted(groups):
        if weights is None:
            order = torch.randperm(len(groups[b]), generator=g)
        else:
            w = torch.tensor([float(weights[i]) for i in groups[b]], dtype=torch.float64)
            if not w.sum() > 0:  # a bucket of weight-0 items only: never drawn
                continue
            order = torch.multinomial(w, len(w), replacement=True, generator=g)
        idx = [groups[b][i] for i in order.tolist()]
        n = batch_sizes[b] * world
        for i in range(0, len(idx), n):
            batch = idx[i:i + n]
            if world > 1 and len(batch) % world:
                batch += (idx * world)[:world - len(batch) % world]
            batches.append((b, batch))
    return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]


def rank_slice(batch, rank, world):
    per = len(batch) // world
    return batch[rank * per:(rank + 1) * per]


def sample_rng(seed, step, index):
    """The generator for one sample of one step, keyed by (seed, step, position in the global batch): the
    same sample gets the same caption dropout, sigma and noise whichever rank trains it and whether or not
    the run was resumed, so no generator state has to be carried across a restart."""
    h = hashlib.sha256(f"{seed}/{step}/{index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(h[:8], "little") & ((1 << 63) - 1))

# ----------------------------------------------------------------------------------------------------------
# Text: our small frozen encoder, when no official one is given

def train_tokenizer(captions, path, vocab_size):
    """A small SentencePiece model on the training captions (our small text encoder's vocabulary). BPE, as
    both released tokenizers are (LLaMA-3's and CLIP's): on the demo's captions (~80 distinct words) it keeps
    every word whole, where a unigram model stopped at ~100 pieces and spelled most words letter by letter."""
    import io
    import sentencepiece as spm
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(captions), model_writer=buf, vocab_size=vocab_size,
                                   model_type="bpe", bos_id=1, eos_id=2, pad_id=0, unk_id=3,
                                   hard_vocab_limit=False, minloglevel=2)
    with open(path + ".tmp", "wb") as f:
        f.write(buf.getvalue())
    os.replace(path + ".tmp", path)


def small_encoder(out, clips, images, cfg, device, rank, world):
    """Paper §4.3 keeps the text encoders frozen; ours are small and random
    (text_encoder.PromptEncoder.tiny), which still keeps every token distinguishable, on a SentencePiece
    vocabulary of the captions. Saved to out/ (tokenizer.model, text_encoder.safetensors) for sample.py."""
    tok_path = os.path.join(out, "tokenizer.model")
    if rank == 0 and not os.path.isfile(tok_path):
        texts = [v if isinstance(v, str) else ", ".join(v)
                 for it in clips + images for v in it["caption"].values()]
        train_tokenizer(texts + DEMO_PROMPTS, tok_path, vocab_size=512)  # about one token per caption word
    barrier(world)
    encoder = text_encoder.PromptEncoder.tiny(text_encoder.Tokenizer(tok_path), seed=cfg.seed,
                                              text_len=DEMO_TEXT_LEN, device=device)
    if rank == 0:
        save_encoder(encoder, os.path.join(out, "text_encoder.safetensors"))
    return encoder


def save_encoder(encoder, path):
    from safetensors.torch import save_file
    sd = {f"llm.{k}": v.contiguous() for k, v in encoder.llm.state_dict().items()}
    sd.update({f"clip.{k}": v.contiguous() for k, v in encoder.clip.state_dict().items()})
    save_file(sd, path + ".tmp")
    os.replace(path + ".tmp", path)

# ----------------------------------------------------------------------------------------------------------
# Distributed: torchrun's environment turns it on; the DiT is sharded with FSDP2

def setup_distributed():
    """(rank, world, device). Under torchrun: NCCL on GPUs, gloo on CPUs; one GPU per local rank."""
    import torch.distributed as dist
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def shard_model(model, device):
    """FSDP2: every block its own unit (its weights are gathered only while it runs), then the rest.
    On GPUs the gathered weights are bf16 and gradients are reduced in fp32; parameters (and so the
    optimizer and the EMA) stay fp32 shards."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    # cast_forward_inputs=False: FSDP's default casts every float input of the model and of each block to
    # bf16, the timestep t = sigma*1000 (998.7 -> 1000: its 256-d sinusoid moves by up to 30%) and the RoPE
    # tables among them. The official bf16 run (autocast) and our one-GPU path keep both in fp32; the DiT
    # casts x, the text states and the pooled vector to its weights' dtype itself (dit.py forward, txt_in).
    mp = MixedPrecisionPolicy()
    if device.type == "cuda":
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                  cast_forward_inputs=False)
    for block in list(model.double_blocks) + list(model.single_blocks):
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


def all_mean(x, world):
    """The mean of a scalar tensor over ranks (the global batch's loss)."""
    if world > 1:
        import torch.distributed as dist
        x = x.detach().clone()
        dist.all_reduce(x)
        x /= world
    return x


def barrier(world):
    if world > 1:
        import torch.distributed as dist
        dist.barrier()

# ----------------------------------------------------------------------------------------------------------
# Checkpoints: one safetensors file per stage of the pipeline, written by rank 0 as temp file + rename

def full_tensor(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def previous_state(path):
    """Where the checkpoint before `path` is kept: x.safetensors -> x.prev.safetensors."""
    return path[:-len(".safetensors")] + ".prev.safetensors"


def save_train_state(path, parts, ema, meta, rank, trainable_only=False):
    """parts {name: (model, optimizer)}: weights and optimizer states as full fp32 tensors (gathered from
    FSDP shards), the EMA, and meta (step, stage, data position, config) in the safetensors header, plus
    the torch RNG state (the CPU's, and every rank's CUDA generator: the VAE's posterior samples draw from
    it). trainable_only: the frozen weights stay out (LoRA: adapters and their optimizer state only).
    Collective under FSDP: every rank calls it; rank 0 writes, temp file + rename, and the checkpoint it
    replaces is kept as previous_state(path): --resume falls back to it if the latest is damaged."""
    import torch.distributed as dist
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    tensors, groups = {}, {}
    for name, (model, opt) in parts.items():
        msd, osd = get_state_dict(model, opt, options=StateDictOptions(
            full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only))
        tensors.update({f"{name}.model.{k}": v.contiguous() for k, v in msd.items()})
        for p, st in osd.get("state", {}).items():
            for k, v in st.items():
                v = torch.as_tensor(v).reshape(1) if k == "step" else v
                tensors[f"{name}.optim.{p}.{k}"] = v.contiguous()
        groups[name] = [{k: v for k, v in g.items() if k != "params"} | {"params": list(g["params"])}
                        for g in osd.get("param_groups", [])]
    ema_full = {}
    for k, v in ema.items():  # gathered one at a time (a collective under FSDP); rank 0 alone keeps them
        full = full_tensor(v).detach()
        if rank == 0:
            ema_full[k] = full.cpu()
    cuda_rng = []
    if torch.cuda.is_initialized():
        cuda_rng = [torch.cuda.get_rng_state()]
        if dist.is_initialized():  # to rank 0, which writes them all
            cuda_rng = [None] * dist.get_world_size()
            dist.all_gather_object(cuda_rng, torch.cuda.get_rng_state())
    if rank != 0:
        return
    tensors.update({f"ema.{k}": v.contiguous() for k, v in ema_full.items()})
    tensors["rng.torch"] = torch.get_rng_state()
    tensors.update({f"rng.cuda.{r}": state for r, state in enumerate(cuda_rng)})  # uint8, one per rank
    tmp = path + ".tmp"
    save_file(tensors, tmp, metadata={"meta": json.dumps(dict(meta, param_groups=groups))})
    if os.path.exists(path):
        os.replace(path, previous_state(path))
    os.replace(tmp, path)


def resume_state(path, rank):
    """The checkpoint --resume continues from: `path`, or the one before it if `path` is damaged (cut off
    by a full disk or a killed copy); None if there is none yet. Both damaged: a one-line exit."""
    from safetensors import safe_open
    tried = []
    for p in (path, previous_state(path)):
        if not os.path.isfile(p):
            continue
        try:  # safetensors checks that the header covers the whole file: a truncated file fails here
            with safe_open(p, "pt") as f:
                json.loads(f.metadata()["meta"])
            if tried and rank == 0:
                print(f"warning: {tried[0]} is damaged; resuming from the checkpoint before it, {p} (the "
                      f"damaged one is kept as {tried[0]}.damaged)")
                # moved aside, or the next save would rotate it into the place of the good one
                os.replace(tried[0], tried[0] + ".damaged")
            return p
        except Exception:
            tried.append(p)
    if tried:
        raise SystemExit(f"error: cannot resume: {' and '.join(tried)} damaged or truncated; start afresh "
                         f"without --resume (or into a new --out)")
    return None


def check_resume(path, arch, rank):
    """--resume from `path` (or None: no checkpoint yet, said in one line): its model must be this run's
    (arch: {"dit"|"vae": the model config, "lora": {rank, alpha, targets} or None}, as save_train_state's
    meta holds it), else a one-line exit before any tensor is read; a mismatch used to be a size-mismatch
    traceback, or (other LoRA targets or alpha) no error at all."""
    from safetensors import safe_open
    if path is None:
        if rank == 0:
            print("note: --resume: no checkpoint for this stage in --out yet: it starts at step 0",
                  file=sys.stderr)
        return
    with safe_open(path, "pt") as f:
        got = json.loads(f.metadata()["meta"]).get("arch") or {}
    want = json.loads(json.dumps(arch))
    diff = []
    for part, have in got.items():
        now = want.get(part, have)
        if isinstance(have, dict) and isinstance(now, dict):
            diff += [(f"{part}.{k}", have.get(k), now.get(k)) for k in sorted(set(have) | set(now))
                     if have.get(k) != now.get(k)]
        elif have != now:
            diff.append((part, have, now))
    if diff:
        said = "; ".join(f"{k} {a!r} there, {b!r} now" for k, a, b in diff[:3])
        raise SystemExit(f"error: --resume: {path} is from another model ({said}): resume with the options "
                         f"it was started with, or start afresh in a new --out")


def load_train_state(path, parts, ema, device, trainable_only=False):
    """The inverse of save_train_state; returns meta. Under torchrun rank 0 alone reads the weights, the
    optimizer states and the EMA, one part at a time, and sends every rank its shards (as the --init-dit
    path does): a 13B checkpoint is ~205 GB, which every rank reading it whole would hold in CPU memory.
    Each rank reads the header and its own RNG state (shared storage under torchrun)."""
    import torch.distributed as dist
    from safetensors import safe_open
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)
    from torch.distributed.tensor import distribute_tensor
    many = dist.is_initialized()
    rank = dist.get_rank() if many else 0
    opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=many, strict=not trainable_only)
    with safe_open(path, "pt") as f:
        meta = json.loads(f.metadata()["meta"])
        groups = meta.pop("param_groups")
        keys = list(f.keys())

        def read(prefix):  # {key without prefix: tensor} on rank 0, {} elsewhere
            if rank != 0:
                return {}
            return {k[len(prefix):]: f.get_tensor(k) for k in keys if k.startswith(prefix)}

        for name, (model, opt) in parts.items():
            set_model_state_dict(model, read(f"{name}.model."), options=opts)
            state = {}
            for k, v in read(f"{name}.optim.").items():
                p, key = k.rsplit(".", 1)
                state.setdefault(p, {})[key] = v.reshape(()) if key == "step" else v
            osd = {"state": state, "param_groups": groups[name]} if rank == 0 else {}
            set_optimizer_state_dict(model, opt, osd, options=opts)
        for k, e in ema.items():
            full = f.get_tensor(f"ema.{k}").to(device) if rank == 0 else \
                torch.empty(e.shape, dtype=e.dtype, device=device)
            if hasattr(e, "device_mesh"):  # FSDP: rank 0's tensor, scattered; this rank keeps its shard
                full = distribute_tensor(full, e.device_mesh, e.placements, src_data_rank=0)
            elif many:
                dist.broadcast(full, 0)
            e.copy_(full)
        torch.set_rng_state(f.get_tensor("rng.torch"))
        if device.type == "cuda" and f"rng.cuda.{rank}" in keys:  # absent: written on CPUs or by fewer ranks
            torch.cuda.set_rng_state(f.get_tensor(f"rng.cuda.{rank}"), device)
    return meta


def check_writable(out_dir, need_bytes):
    """Fail before training, not at the first checkpoint: the folder must be writable and have room."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise SystemExit(f"error: cannot write to {out_dir}: it is a file, not a folder; pass a folder as "
                         f"--out")
    try:
        os.makedirs(out_dir, exist_ok=True)
        probe = os.path.join(out_dir, f".write_test_{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise SystemExit(f"error: cannot write to {out_dir} ({e.strerror}); pass a writable --out")
    free = shutil.disk_usage(out_dir).free
    if free < need_bytes:
        raise SystemExit(f"error: {out_dir} has {free / 2**30:.1f} GiB free, checkpoints need about "
                         f"{need_bytes / 2**30:.1f} GiB; free space or pass another --out")


def write_json(path, obj):
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)

# ----------------------------------------------------------------------------------------------------------
# Stage "vae": the causal 3D VAE from scratch (paper §4.1)

def train_vae(cfg, clips, images, out_dir, device, rank=0, world=1, resume=False, log=print, lpips=None):
    """Trains vae_config(cfg) on random crops of size cfg.vae_size from the clips (read at the DiT's
    video size and frame stride) plus stills (cfg.vae_image_ratio of the steps; the paper mixes 4:1): L1 +
    1e-6 KL, + LPIPS where `lpips` names its local weight files (--lpips), + GAN after its start step,
    through posterior samples z ~ q(z|x). The clips are read once into memory: this stage is for small
    data (the demo, ablations); at scale, fine-tune the released VAE instead."""
    h, w, T = cfg.vae_size
    video = [b for s in cfg.stages for b in s.buckets]
    H, W = (video[-1][0], video[-1][1]) if video else (h, w)
    stride = cfg.vae_frame_stride or cfg.frame_stride
    need = sum(c["frames"] for c in clips) * H * W * 3 // stride + len(images) * H * W * 3
    if need > 8 * 2**30:
        raise SystemExit(f"error: the VAE stage holds its clips in memory at {H}x{W}: {need / 2**30:.0f} "
                         f"GiB; train on a smaller tier or fine-tune the released VAE instead")
    data = [read_or_skip(c, (H, W), stride=stride) for c in tqdm(clips, desc="read clips", disable=rank != 0)]
    data = [d for d in data if d is not None and d.shape[1] >= T]
    stills = [d for d in (read_or_skip(i, (H, W)) for i in images) if d is not None]
    if not data:
        raise SystemExit(f"error: no clip has {T} frames for the VAE stage")

    def crop(d, g, t):  # a (t, h, w) window: the most varied of cfg.vae_crop_tries random ones
        ch, cw = (cfg.vae_image_size or (h, w)) if t == 1 else (h, w)
        best = None
        for _ in range(cfg.vae_crop_tries):
            s, y, x = (int(torch.randint(n - m + 1, (), generator=g))
                       for n, m in zip(d.shape[1:], (t, ch, cw)))
            c = d[:, s:s + t, y:y + ch, x:x + cw]
            score = c.float().std().item() if cfg.vae_crop_tries > 1 else 0.0
            if best is None or score > best[0]:
                best = (score, c)
        return best[1]

    torch.manual_seed(cfg.seed)
    model = vae_lib.CausalVAE(vae_config(cfg)).to(device)
    if device.type == "cpu":  # oneDNN's 3D convolutions run faster on channels-last tensors
        model.to(memory_format=torch.channels_last_3d)
    gan_start = cfg.vae_steps // 2 if cfg.vae_steps > 2000 else 10**9  # short runs: no GAN term at all
    if gan_start >= cfg.vae_steps and rank == 0:
        log(f"VAE: {cfg.vae_steps} steps, too few for the GAN term of paper eq. 1 (it starts halfway through "
            f"runs of more than 2000): L1 + KL{' + LPIPS' if lpips else ''} only")
    lossf = vae_lib.VAELoss(perceptual_weights=lpips, gan_start=gan_start, w_mse=cfg.vae_mse,
                            w_chroma=cfg.vae_chroma, w_latent_rgb=cfg.vae_latent_rgb,
                            kl_sum=cfg.vae_kl_sum).to(device)
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        model, lossf.discriminator = DDP(model), DDP(lossf.discriminator)
    # GAN-style betas (0.5, 0.9) once a discriminator is in the loop; Adam's defaults otherwise
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.vae_lr,
                            betas=(0.5, 0.9) if gan_start < cfg.vae_steps else (0.9, 0.999))
    opt_d = torch.optim.AdamW(lossf.discriminator.parameters(), lr=cfg.vae_lr, betas=(0.5, 0.9))
    schedule = Stage("vae", cfg.vae_steps, (), lr=cfg.vae_lr)  # the VAE's lr follows lr_at like a DiT stage
    path = os.path.join(out_dir, "vae_state.safetensors")
    parts = {"vae": (model, opt), "disc": (lossf.discriminator, opt_d)}
    arch = {"vae": asdict(vae_config(cfg))}
    start = resume_state(path, rank) if resume else None
    if resume:
        check_resume(start, arch, rank)
    step = load_train_state(start, parts, {}, device)["step"] if start else 0
    core = model.module if world > 1 else model
    bar = tqdm(total=cfg.vae_steps, initial=step, desc="VAE", disable=rank != 0)
    safe = None  # Ctrl-C: as in train_dit
    try:
        while step < cfg.vae_steps:
            safe = ({"step": step, "arch": arch}, rng_states())
            g = sample_rng(cfg.seed, step, rank)
            image = bool(stills) and torch.rand((), generator=g) < cfg.vae_image_ratio
            pool = stills if image else data
            x = torch.stack([crop(pool[int(torch.randint(len(pool), (), generator=g))], g, 1 if image else T)
                             for _ in range(cfg.vae_image_batch if image else cfg.vae_batch)])
            x = to_unit(x).to(device)
            if device.type == "cpu":
                x = x.contiguous(memory_format=torch.channels_last_3d)
            # warmup + cosine decay, as in the DiT stages: the decay is what sharpens a short run's details
            for group in opt.param_groups:
                group["lr"] = lr_at(step, schedule, cfg)
            recon, mean, logvar = model(x, sample_posterior=True, tile_prob=cfg.vae_tile_prob)
            loss, terms = lossf(x, recon, mean, logvar, step)
            if not torch.isfinite(loss):
                raise SystemExit(f"error: VAE loss is {loss.item()} at step {step}; "
                                 f"the last good checkpoint is {path}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            safe = None  # the update has begun
            opt.step()
            d_loss = lossf.disc_loss(x, recon, step)
            if d_loss.requires_grad:
                opt_d.zero_grad(set_to_none=True)
                d_loss.backward()
                opt_d.step()
            step += 1
            bar.update(1)
            bar.set_postfix({k: f"{v.item():.4f}" for k, v in terms.items()})
            if step % cfg.ckpt_every == 0 or step == cfg.vae_steps:
                save_train_state(path, parts, {}, {"step": step, "arch": arch}, rank)
            if rank == 0 and (step % cfg.log_every == 0 or step == cfg.vae_steps):
                log({"stage": "vae", "step": step - 1,
                     **{f"vae_{k}": round(v.item(), 6) for k, v in terms.items()}})
            safe = ({"step": step, "arch": arch}, rng_states())
    except KeyboardInterrupt:
        interrupted(path, parts, {}, safe, rank, world)
    bar.close()
    core.eval().requires_grad_(False)
    return core


def vae_size_for_scale(cfg):
    """(H, W, T) of the clips the DiT will see: its last video bucket, else the VAE crop size."""
    video = [b for s in cfg.stages for b in s.buckets]
    return video[-1][:3] if video else cfg.vae_size

# ----------------------------------------------------------------------------------------------------------
# Stage "dit": caches, then flow matching through the progressive stages

def item_id(it):
    base = it.get("clip") or it.get("image") or hashlib.sha1(it["path"].encode()).hexdigest()[:16]
    base = re.sub(r"[/\\\x00]", "_", str(base))  # a hand-written id is a file name, not a path
    return base + (f"@{it['start']}" if it.get("start") else "")


def clip_windows(items, groups, buckets, stride, n):
    """Each clip in `groups` as up to n non-overlapping windows of its bucket's length (items with a "start"
    frame): a long clip holds several distinct training videos, and the cache encodes each once.
    Returns (items, groups) over the windows."""
    out, new = [], {}
    for b, idx in groups.items():
        span = (buckets[b][2] - 1) * stride + 1
        for i in idx:
            for k in range(max(1, min(n, items[i].get("frames", 1) // span))):
                new.setdefault(b, []).append(len(out))
                out.append(dict(items[i], start=k * span))
    return out, new


@torch.no_grad()
def cache_latents(items, size, vae, cache_dir, device, rank=0, world=1, stride=1):
    """Encode every item once at a bucket size (H, W, T) -> cache_dir/HxWxT-vae<fingerprint>/<id>.safetensors
    holding the posterior's mean and logvar (unscaled): training samples from it each step. Rank r encodes
    items r, r+world, ...; files are written whole (temp + rename), so an interrupted run just continues."""
    from safetensors.torch import save_file
    H, W, T = size
    # The folder names the VAE (its config and a few values of every tensor), as the text cache names its
    # encoders (text_encoder.PromptEncoder.fingerprint): another --vae into the same --out encodes afresh
    # instead of training on the old VAE's latents. The scaling factor stays out: the files are unscaled.
    probe = (asdict(replace(vae.cfg, scaling_factor=None)),
             [v.flatten()[:4].tolist() for v in vae.state_dict().values()])
    vae_id = hashlib.sha256(repr(probe).encode()).hexdigest()[:12]
    name = f"{H}x{W}x{T}" + (f"s{stride}" if stride > 1 and T > 1 else "") + f"-vae{vae_id}"
    folder = os.path.join(cache_dir, name)
    os.makedirs(folder, exist_ok=True)
    todo = [it for it in items[rank::world]
            if not os.path.isfile(os.path.join(folder, item_id(it) + ".safetensors"))]
    # small items a few per encode (one small frame at a time is mostly per-call overhead); large ones singly
    n = max(1, min(16, 2**22 // (H * W * T)))
    bar = tqdm(total=len(todo), desc=f"cache latents {H}x{W}x{T}", disable=rank != 0 or not todo)
    for i in range(0, len(todo), n):
        read = [(it, read_or_skip(it, (H, W), it.get("start", 0), T if it["kind"] == "video" else None,
                                  stride)) for it in todo[i:i + n]]
        chunk = [it for it, x in read if x is not None]  # an unreadable file gets no cache file
        bar.update(len(read) - len(chunk))
        if not chunk:
            continue
        x = torch.stack([to_unit(x) for _, x in read if x is not None])
        mean, logvar = vae.encode(x.to(device), tiled=max(H, W) > vae.cfg.tile_sample_size)
        for it, m, lv in zip(chunk, mean, logvar):
            f = os.path.join(folder, item_id(it) + ".safetensors")
            save_file({"mean": m.float().cpu().contiguous(), "logvar": lv.float().cpu().contiguous()},
                      f + ".tmp")
            os.replace(f + ".tmp", f)
        bar.update(len(chunk))
    bar.close()
    if world > 1:
        import torch.distributed as dist
        dist.barrier()
    return folder


def load_latent(folder, it, g, scale):
    """A posterior sample z = (mean + std * eps) * scaling_factor: what the DiT sees."""
    from safetensors.torch import load_file
    t = load_file(os.path.join(folder, item_id(it) + ".safetensors"))
    eps = torch.randn(t["mean"].shape, generator=g)
    return (t["mean"] + torch.exp(0.5 * t["logvar"]) * eps) * scale


def train_dit(cfg, clips, images, encoder, vae, out_dir, device, rank=0, world=1, resume=False,
              init_dit=None, log=print, lora=None, base=None, offload=None):
    """Flow matching through cfg.stages. Returns the model (training weights) and the EMA dict.

    lora = (rank, alpha, targets): the DiT (from init_dit, or `base`, an already loaded model) is frozen
    and only adapters on the targeted layers train (dit.add_lora); no EMA, and the checkpoints hold the
    adapters and their optimizer state only. offload (LoRA on one GPU, under gradient checkpointing):
    "activations" keeps each block's checkpointed input in CPU memory until the backward needs it;
    "modulation" also keeps the blocks' modulation linears there (sample.MODULATION), each fetched for its
    block's forward and recomputation; "all" keeps the whole frozen blocks there, streamed the same way."""
    mcfg = dit_config(cfg)
    assert mcfg.guidance_embed == (cfg.train_guidance is not None), \
        "train_guidance must be set iff guidance_embed"
    torch.manual_seed(cfg.seed)

    def read_dit(dtype, dev, keep_fp8):
        try:
            return dit.load_dit(init_dit, config=mcfg, dtype=dtype, device=dev, keep_fp8=keep_fp8)
        except (ValueError, OSError) as e:
            raise SystemExit(f"error: --init-dit: {e}")

    if init_dit and world > 1 and base is None:
        # fine-tuning the 13B on N GPUs: shard an empty model, then rank 0 reads the file and broadcasts,
        # so no GPU ever holds the whole fp32 model
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
        with torch.device("meta"):
            model = dit.HunyuanVideoDiT(mcfg)
        if lora:
            dit.add_lora(model, *lora)
        shard_model(model, device)
        model.to_empty(device=device)
        full = {}
        if rank == 0:
            full = read_dit(torch.float32, "cpu", False)
            if lora:
                dit.add_lora(full, *lora)  # the same seeded initial adapters as every rank's
            full = full.state_dict()
        set_model_state_dict(model, full,
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        del full
    else:
        if base is not None:
            model = base
        elif init_dit and lora:
            # a frozen base needs no fp32 master copy: bf16 on a GPU, and official fp8 weights stay fp8
            model = read_dit(torch.bfloat16 if device.type == "cuda" else torch.float32,
                             "cpu" if offload == "all" else device, True)
        elif init_dit:  # fine-tuning, e.g. from the official mp_rank_00_model_states.pt
            model = read_dit(torch.float32, device, False)
        else:
            model = dit.HunyuanVideoDiT(mcfg).to(device)
        if lora:
            dit.add_lora(model, *lora)
        if offload in ("all", "modulation"):
            sample.offload_blocks(model, device, only=sample.MODULATION if offload == "modulation" else None)
        if world > 1:
            shard_model(model, device)
    model.gradient_checkpointing = cfg.grad_checkpointing
    if cfg.compile:  # after sharding: FSDP2 wants each block compiled as the unit it shards
        model.compile_blocks()
    model.train()
    # fused AdamW: one kernel over all parameters instead of several ops per tensor (faster, on a CPU too);
    # sharded (DTensor) parameters keep the default implementation
    params = dict(model.named_parameters())
    opt = torch.optim.AdamW([p for p in params.values() if p.requires_grad], lr=cfg.stages[0].lr,
                            betas=cfg.betas, weight_decay=cfg.weight_decay, fused=world == 1)
    ema = {} if lora else {n: p.detach().clone().float() for n, p in params.items()}
    path = os.path.join(out_dir, "lora_state.safetensors" if lora else "dit_state.safetensors")
    meta = {"stage": 0, "stage_step": 0, "step": 0, "data": {}}
    arch = {"dit": asdict(mcfg), "lora": dict(zip(("rank", "alpha", "targets"), lora)) if lora else None}
    start = resume_state(path, rank) if resume else None
    if resume:
        check_resume(start, arch, rank)
    if start:
        meta = load_train_state(start, {"dit": (model, opt)}, ema, device, trainable_only=bool(lora))
        if rank == 0:
            name = cfg.stages[meta["stage"]].name if meta["stage"] < len(cfg.stages) else "done"
            print(f"resumed from {start} at step {meta['step']} (stage {name})")
            if meta["stage"] >= len(cfg.stages):
                print(f"note: --resume: this run had already finished (all {meta['step']} steps): nothing "
                      f"left to train, its outputs are written again; a longer run needs a new --out",
                      file=sys.stderr)
    check_stages(cfg, clips, images, meta["stage"], rank)
    autocast = torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" and world == 1 else None
    # Checkpointing keeps only each block's input for the backward, but at 13B that is 60 x the hidden
    # states (~7 GiB at 49x512x768): offloaded, they wait in pinned CPU memory instead (docs/lora.md).
    keep_on_cpu = contextlib.nullcontext
    if offload and device.type == "cuda":
        keep_on_cpu = functools.partial(torch.autograd.graph.save_on_cpu, pin_memory=True)
    scale = vae.cfg.scaling_factor
    cache_dir = os.path.join(out_dir, "cache")

    # Ctrl-C: between updates (safe holds the state as of the last step boundary) the run is checkpointed
    # there and stops with one line; --resume goes on as if it never stopped
    safe = None
    try:
        for si in range(meta["stage"], len(cfg.stages)):
            stage = cfg.stages[si]
            streams = {}
            for kind, items, buckets in (
                    ("video", clips, [b for b in stage.buckets]),
                    ("image", images, [(h, w, 1, b) for h, w, b in stage.image_buckets])):
                groups = assign_buckets(items, buckets, cfg.frame_stride) if buckets and items else {}
                if kind == "video" and cfg.clip_windows > 1:
                    items, groups = clip_windows(items, groups, buckets, cfg.frame_stride, cfg.clip_windows)
                if groups:
                    folders = {b: cache_latents([items[i] for i in idx], buckets[b][:3], vae, cache_dir,
                                                device, rank, world, cfg.frame_stride)
                               for b, idx in groups.items()}
                    # the items whose file could not be decoded have no latent (cache_latents said which):
                    # left out, the same on every rank (shared storage) and in a resumed run
                    cached = {b: [i for i in idx if os.path.isfile(os.path.join(folders[b], item_id(items[i])
                                                                                 + ".safetensors"))]
                              for b, idx in groups.items()}
                    groups = {b: idx for b, idx in cached.items() if idx}
                if groups:
                    streams[kind] = dict(items=items, buckets=buckets, groups=groups, folders=folders)
            if not streams:
                raise SystemExit(f"error: stage {stage.name}: no clip or image fits its buckets")
            bar = tqdm(total=stage.steps, initial=meta["stage_step"], desc=f"DiT {stage.name}",
                       disable=rank != 0)
            while meta["stage_step"] < stage.steps:
                safe = (json.loads(json.dumps(meta)), rng_states())
                step = meta["step"]
                # every rank draws the same kind of batch (same seed, step): ranks stay in step
                want_image = torch.rand((), generator=sample_rng(cfg.seed, step, -1)) < stage.image_ratio
                kind = "image" if ("image" in streams and (want_image or "video" not in streams)) else "video"
                st = streams[kind]
                pos = meta["data"].setdefault(f"{si}/{kind}", [0, 0])  # (epoch, batch) of this stream
                if st.get("epoch") is not None and pos[1] >= len(st["batches"]):
                    pos[0], pos[1] = pos[0] + 1, 0
                if st.get("epoch") != pos[0]:  # an epoch's batch list is built once, not every step
                    st["epoch"] = pos[0]
                    weights = None
                    if cfg.balance_concepts:
                        weights = {i: 1.0 if it.get("weight") is None else it["weight"]
                                   for i, it in enumerate(st["items"])}
                    st["batches"] = bucket_batches(st["groups"],
                                                   {b: st["buckets"][b][3] for b in st["groups"]},
                                                   cfg.seed + 7 * si + (kind == "image"), pos[0], world,
                                                   weights)
                    if pos[1] >= len(st["batches"]):  # resumed exactly at the end of an epoch
                        pos[0], pos[1], st["epoch"] = pos[0] + 1, 0, None
                        continue
                b, batch = st["batches"][pos[1]]
                pos[1] += 1
                mine = rank_slice(batch, rank, world)
                first = rank * len(mine)
                x0, noise, sigma, caps = [], [], [], []
                for j, i in enumerate(mine):
                    g = sample_rng(cfg.seed, step, first + j)
                    it = st["items"][i]
                    # empty prompt: CFG learns uncond
                    drop = torch.rand((), generator=g) < cfg.caption_dropout
                    caps.append("" if drop else build_caption(it["caption"], g, cfg))
                    z = load_latent(st["folders"][b], it, g, scale)
                    x0.append(z)
                    noise.append(torch.randn(z.shape, generator=g))
                    sigma.append(sample_sigma(1, cfg.sigma_mean, cfg.sigma_std, g))
                x0, noise = torch.stack(x0).to(device), torch.stack(noise).to(device)
                sigma = torch.cat(sigma).to(device)
                cond = encoder(caps, video_length=st["buckets"][b][2],
                               cache_dir=os.path.join(cache_dir, "text"))
                cond = tuple(c.to(device) for c in cond)
                guidance = None
                if mcfg.guidance_embed:
                    guidance = torch.full((len(mine),), float(cfg.train_guidance) * 1000, device=device)

                for group in opt.param_groups:
                    group["lr"] = lr_at(meta["stage_step"], stage, cfg)
                with autocast or torch.autocast("cpu", enabled=False), keep_on_cpu():
                    loss = flow_matching_loss(model, x0, noise, sigma, cond, guidance)
                loss.backward()
                # the norm over all ranks' gradients
                gnorm = full_tensor(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
                gloss = all_mean(loss, world)
                # A non-finite gradient can come with a finite loss (an overflow in backward); its update
                # would turn the weights into NaN, and the next checkpoint with them. Both values agree on
                # every rank.
                for what, value in (("loss", gloss), ("gradient norm", gnorm)):
                    if not torch.isfinite(value):
                        raise SystemExit(f"error: the {what} is {value.item()} at step {step} "
                                         f"(stage {stage.name}); stopped before the update. The last good "
                                         f"checkpoint is {path}: lower the lr and --resume")
                safe = None  # the update has begun: no consistent state until it and its bookkeeping end
                opt.step()
                opt.zero_grad(set_to_none=True)
                # short warmup: early EMA tracks the model
                decay = min(cfg.ema_decay, (1 + step) / (10 + step))
                with torch.no_grad():
                    for n, e in ema.items():
                        e.lerp_(params[n].detach().float(), 1 - decay)
                meta["step"] += 1
                meta["stage_step"] += 1
                bar.update(1)
                bar.set_postfix(loss=f"{gloss.item():.4f}", kind=kind)
                if rank == 0 and (step % cfg.log_every == 0 or meta["stage_step"] == stage.steps):
                    log({"stage": stage.name, "step": step, "loss": round(gloss.item(), 6),
                         "lr": opt.param_groups[0]["lr"], "grad_norm": round(gnorm.item(), 4), "kind": kind,
                         "time": round(time.time(), 2)})
                safe = (json.loads(json.dumps(meta)), rng_states())
                if meta["step"] % cfg.ckpt_every == 0 or meta["stage_step"] == stage.steps:
                    saved = dict(meta, config=asdict(cfg), arch=arch)
                    if meta["stage_step"] == stage.steps:  # a finished stage resumes at the next one
                        saved.update(stage=si + 1, stage_step=0)
                    save_train_state(path, {"dit": (model, opt)}, ema, saved, rank, trainable_only=bool(lora))
            bar.close()
            meta.update(stage=si + 1, stage_step=0)
    except KeyboardInterrupt:
        if safe is not None:
            done, rng = safe
            if done["stage"] < len(cfg.stages) and done["stage_step"] >= cfg.stages[done["stage"]].steps:
                done.update(stage=done["stage"] + 1, stage_step=0)  # a finished stage resumes at the next
            safe = (dict(done, config=asdict(cfg), arch=arch), rng)
        interrupted(path, {"dit": (model, opt)}, ema, safe, rank, world, bool(lora))
    return model, ema


def rng_states():
    """The CPU generator's state and the CUDA one's where CUDA is in use (the VAE's posterior samples)."""
    return torch.get_rng_state(), torch.cuda.get_rng_state() if torch.cuda.is_initialized() else None


def interrupted(path, parts, ema, safe, rank, world, trainable_only=False):
    """Ctrl-C in a training loop: one line, no traceback. On one process, if it came between updates (safe:
    (meta, rng_states()) as of that step boundary), a checkpoint of that step first, so no finished step
    is lost; otherwise (mid-update, or under torchrun, where saving is collective) the last checkpoint."""
    if safe is not None and world == 1:
        meta, (cpu, cuda) = safe
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda)
        save_train_state(path, parts, ema, meta, rank, trainable_only)
        print(f"\ninterrupted: step {meta['step']} saved in {path}; the same command with --resume goes on "
              f"from there", file=sys.stderr)
    elif rank == 0:
        print(f"\ninterrupted: the command with --resume goes on from the last checkpoint, {path}"
              if os.path.exists(path) else "\ninterrupted before the first checkpoint: nothing to resume",
              file=sys.stderr)
    raise SystemExit(130)


def export_dit(model, ema, path, rank):
    """The EMA weights as an official-layout safetensors file with the config (what sample.py loads).
    Collective under FSDP: every rank gathers each tensor in turn, rank 0 alone keeps and writes them."""
    full = {}
    for k, v in ema.items():
        t = full_tensor(v).detach()
        if rank == 0:
            full[k] = t.float().cpu()
    if rank == 0:
        with torch.device("meta"):
            m = dit.HunyuanVideoDiT(model.cfg)
        m.load_state_dict(full, strict=True, assign=True)
        dit.save_dit(m, path)

# ----------------------------------------------------------------------------------------------------------
# The pipeline: VAE stage, DiT stage, export; and the embedded demo on generated data

def run_pipeline(cfg, args, clips, images, out, rank, world, device, encoder):
    """VAE stage (or a given VAE), caches, DiT stages, export and config.json: what `--stage` selects.
    Returns the stage times and the VAE."""
    metrics, log = open_metrics(out, rank, args.resume, {"vae": "vae_state.safetensors",
                                                         "dit": "dit_state.safetensors"})
    times = {}
    t0 = time.perf_counter()
    if args.vae:
        vae = read_vae(args.vae, cfg, device)
    elif cfg.vae_steps > 0:
        vae = train_vae(cfg, clips, images, out, device, rank, world, args.resume, log, lpips=args.lpips)
        # A VAE of our own gets its own scaling factor, 1/std of its latents (the released 0.476986 was found
        # the same way for the released VAE), so the DiT's data has unit variance like its noise.
        with torch.no_grad():
            H, W, T = vae_size_for_scale(cfg)
            zs = []
            for c in clips[:32]:
                if c["frames"] >= (T - 1) * cfg.frame_stride + 1:
                    x = read_or_skip(c, (H, W), 0, T, cfg.frame_stride)
                    if x is not None:
                        zs.append(vae.encode(to_unit(x)[None].to(device))[0])
        if zs:
            std = torch.cat([z.flatten() for z in zs]).std().item()
            vae.cfg = replace(vae.cfg, scaling_factor=round(1.0 / std, 6))
        if rank == 0:
            write_json(os.path.join(out, "vae_config.json"), asdict(vae.cfg))
    else:
        raise SystemExit("error: this preset trains no VAE: pass the released one with --vae")
    vae_path = os.path.join(out, "vae.safetensors")  # the folder keeps its VAE: sample.py decodes with it
    if rank == 0 and not (args.vae and os.path.abspath(args.vae) == os.path.abspath(vae_path)):
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, vae_path + ".tmp")
        os.replace(vae_path + ".tmp", vae_path)
    times["vae"] = time.perf_counter() - t0
    if args.stage == "vae":
        return times, vae
    t0 = time.perf_counter()
    model, ema = train_dit(cfg, clips, images, encoder, vae, out, device, rank, world, args.resume,
                           args.init_dit, log)
    export_dit(model, ema, os.path.join(out, "dit.safetensors"), rank)
    times["dit"] = time.perf_counter() - t0
    if rank == 0:
        plot_losses(metrics, os.path.join(out, "loss.png"))
        # what sample.py --ckpt reads: the configs, the text encoder (ours is in the folder; the official
        # ones are named by their folders), the video size and frame rate of the last stage, sampling defaults
        if args.llm:
            text = {"llm_dir": os.path.abspath(args.llm), "clip_dir": os.path.abspath(args.clip)}
        else:
            text = {"llm": asdict(encoder.llm.cfg), "clip": asdict(encoder.clip.cfg),
                    "tokenizer": "tokenizer.model"}
        last = cfg.stages[-1]
        H, W, T = last.buckets[0][:3] if last.buckets else (*last.image_buckets[0][:2], 1)
        fps = (clips[0].get("fps", 24.0) if clips else 24.0) / cfg.frame_stride  # the manifest's source rate
        write_json(os.path.join(out, "config.json"), {
            "dit": asdict(dit_config(cfg)), "vae": asdict(vae.cfg),
            "text": dict(text, text_len=encoder.text_len),
            "video": {"height": H, "width": W, "frames": T, "fps": fps},
            "sample": cfg.sampling, "train": asdict(cfg)})
    return times, vae


def train_lora(cfg, args, clips, images, out, rank, world, device, encoder, vae, base=None):
    """--lora RANK: adapters on a frozen DiT (--init-dit, or `base`: a --from folder's), one stage with the
    buckets of cfg's last stage; writes out/lora.safetensors in the original layout (dit.lora_state_dict),
    rank, alpha and targets in its metadata. Returns the LoRA's path."""
    stage = replace(cfg.stages[-1], name="lora", steps=args.steps or LORA_STEPS, lr=args.lr or LORA_LR)
    cfg = replace(cfg, stages=(stage,), grad_checkpointing=cfg.grad_checkpointing or args.offload)
    metrics, log = open_metrics(out, rank, args.resume, {"dit": "lora_state.safetensors"})
    alpha = args.lora if args.lora_alpha is None else args.lora_alpha
    spec = (args.lora, alpha, args.lora_targets)
    model, _ = train_dit(cfg, clips, images, encoder, vae, out, device, rank, world, args.resume,
                         args.init_dit, log, lora=spec, base=base, offload=args.offload)
    sd = dit.lora_state_dict(model)  # collective under FSDP
    path = os.path.join(out, "lora.safetensors")
    if rank == 0:
        from safetensors.torch import save_file
        save_file(sd, path + ".tmp", metadata={"rank": str(args.lora), "alpha": str(alpha),
                                               "targets": args.lora_targets, "format": "diffusion_model"})
        os.replace(path + ".tmp", path)
        plot_losses(metrics, os.path.join(out, "loss.png"))
    return path


def open_metrics(out, rank, resume, states):
    """out/metrics.jsonl and a log(row) appending to it (rank 0). A fresh run empties it; --resume drops
    the rows a killed run logged past the checkpoint it continues from. states: {"vae"|"dit": file}."""
    metrics = os.path.join(out, "metrics.jsonl")
    if rank == 0 and os.path.exists(metrics):
        if not resume:
            os.remove(metrics)
        else:
            from safetensors import safe_open
            done = {}
            for kind, f in states.items():
                p = resume_state(os.path.join(out, f), rank)
                if p:
                    with safe_open(p, "pt") as h:
                        done[kind] = json.loads(h.metadata()["meta"])["step"]
            keep = [r for r in read_jsonl(metrics)
                    if r["step"] < done.get("vae" if r["stage"] == "vae" else "dit", 0)]
            with open(metrics + ".tmp", "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in keep)
            os.replace(metrics + ".tmp", metrics)

    def log(row):
        with open(metrics, "a") as f:
            f.write(json.dumps(row) + "\n")

    return metrics, log


def read_vae(path, cfg, device):
    """--vae: the released VAE or one this script trained (its config, scaling factor included, is in
    vae_config.json beside it). A damaged or mismatched file: a one-line exit."""
    side = os.path.join(os.path.dirname(path), "vae_config.json")
    vcfg = None if os.path.isdir(path) else \
        vae_lib.VAEConfig(**json.load(open(side))) if os.path.isfile(side) else vae_config(cfg)
    try:
        return vae_lib.load_vae(path, cfg=vcfg, device=device)
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: --vae: {e}")


def plot_losses(metrics_path, png_path, key="loss"):
    """The loss curve as a PNG (OpenCV drawing, no plotting library): raw losses in grey, a running mean
    in blue, log-scaled y axis, stage boundaries as vertical lines."""
    import cv2
    rows = read_jsonl(metrics_path) if os.path.isfile(metrics_path) else []
    rows = [r for r in rows if key in r and math.isfinite(r[key]) and r[key] > 0]
    if len(rows) < 2:
        return
    W, H, m = 900, 420, 50
    img = np.full((H, W, 3), 255, np.uint8)
    steps = np.array([r["step"] for r in rows], float)
    y = np.log10(np.array([r[key] for r in rows]))
    k = max(1, len(y) // 50)
    smooth = np.convolve(np.pad(y, (k - 1, 0), mode="edge"), np.ones(k) / k, mode="valid")
    lo, hi = y.min(), y.max() + 1e-9

    def pts(v):
        px = m + (steps - steps[0]) / max(1.0, steps[-1] - steps[0]) * (W - 2 * m)
        py = H - m - (v - lo) / (hi - lo) * (H - 2 * m)
        return np.stack([px, py], 1).astype(np.int32)

    for i in range(1, len(rows)):
        if rows[i].get("stage") != rows[i - 1].get("stage"):
            x = int(pts(y)[i][0])
            cv2.line(img, (x, m), (x, H - m), (200, 200, 255), 1)
            cv2.putText(img, str(rows[i]["stage"]), (x + 4, m + 14), cv2.FONT_HERSHEY_SIMPLEX, 0.45,
                        (0, 0, 160), 1)
    cv2.polylines(img, [pts(y)], False, (190, 190, 190), 1)
    cv2.polylines(img, [pts(smooth)], False, (200, 80, 0), 2)
    cv2.rectangle(img, (m, m), (W - m, H - m), (0, 0, 0), 1)
    for v in (lo, (lo + hi) / 2, hi):
        cv2.putText(img, f"{10 ** v:.3g}", (4, int(H - m - (v - lo) / (hi - lo) * (H - 2 * m)) + 4),
                    cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1)
    cv2.putText(img, f"{key} vs step ({int(steps[0])}-{int(steps[-1])})", (m, 30), cv2.FONT_HERSHEY_SIMPLEX,
                0.6, (0, 0, 0), 1)
    tmp = png_path + ".tmp.png"
    cv2.imwrite(tmp, img)
    os.replace(tmp, png_path)


def demo(args, rank, world, device):
    """`python train.py`: synthetic videos -> curate.py -> tokenizer + frozen small text encoder -> VAE ->
    DiT (images, then video) -> samples. Everything sample.py needs ends up in out/demo."""
    import curate
    t_start = time.perf_counter()
    cfg = replace(PRESETS["demo"], seed=args.seed or 0)
    # worker processes for rendering and curation
    n_videos, n_samples, workers = 48, len(DEMO_PROMPTS), min(2, os.cpu_count() or 1)
    if args.quick:  # CI: every stage runs, for a few steps; for two videos, starting workers costs more
        cfg = replace(cfg, vae_steps=4, ckpt_every=10,
                      stages=tuple(replace(s, steps=3) for s in cfg.stages))
        n_videos, n_samples, workers = 2, 1, 1
    out = args.out or "out/demo"
    check_writable(out, 200 * 2**20)
    times = {}

    # 1. data: raw multi-shot videos, then the curation pipeline (resumable: finished videos are skipped)
    t0 = time.perf_counter()
    raw, curated = os.path.join(out, "raw"), os.path.join(out, "curated")
    if rank == 0:
        if len([f for f in os.listdir(raw) if f.endswith(".mp4")] if os.path.isdir(raw) else []) < n_videos:
            curate.make_synthetic(raw, n_videos, seed=cfg.seed, sizes=(DEMO_SOURCE,), size_p=(1.0,),
                                  shape_size=DEMO_SHAPE_SIZE, shape_travel=DEMO_SHAPE_TRAVEL, workers=workers)
        counts = curate.run(raw, curated, workers=workers)
        print(f"curated: {counts}")
    barrier(world)
    clips, images = load_items(curated)
    times["data"] = time.perf_counter() - t0

    # 2. a SentencePiece vocabulary on the captions and a frozen random text encoder
    t0 = time.perf_counter()
    encoder = small_encoder(out, clips, images, cfg, device, rank, world)
    times["text"] = time.perf_counter() - t0

    # 3-4. VAE, then the DiT
    stage_times, vae = run_pipeline(cfg, args, clips, images, out, rank, world, device, encoder)
    times.update(stage_times)
    if rank != 0:
        return
    if args.stage == "vae":  # no DiT yet, so no samples: the VAE alone, e.g. to inspect or reuse with --vae
        print(f"\nVAE stage done in {time.perf_counter() - t_start:.0f} s: {out}/vae.safetensors "
              f"(+ vae_config.json); `python train.py --out {out} --resume` goes on to the DiT")
        return
    # 5. samples for the prompt grid, through sample.py's own loader and sampler
    t0 = time.perf_counter()
    files = sample_grid(out, DEMO_PROMPTS[:n_samples], device)
    times["samples"] = time.perf_counter() - t0
    rows = read_jsonl(os.path.join(out, "metrics.jsonl"))
    last = {k: next((r[k] for r in reversed(rows) if k in r), float("nan")) for k in ("loss", "vae_l1")}
    print(f"\ndemo done in {time.perf_counter() - t_start:.0f} s: "
          + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()))
    print(f"final DiT loss {last['loss']:.4f}, VAE L1 {last['vae_l1']:.4f}")
    print(f"model: {out}/ (config.json, dit.safetensors, vae.safetensors, text_encoder.safetensors, "
          f"tokenizer.model)")
    print(f"samples: {os.path.dirname(files[0])}/ ({len(files)} mp4 + png strips), all in one picture: "
          f"{out}/samples.png; loss curve: {out}/loss.png")
    print(f"next: python sample.py --ckpt {out} --prompt \"a blue square moving up\"")


def sample_grid(ckpt, prompts, device):
    """Sample each prompt from the exported folder through sample.py's loader and generate(); prompt i
    from seed i, as `python sample.py --ckpt` with a --prompts file. Returns the mp4 paths."""
    pipe = sample.load_pipeline(ckpt, device=device, dtype=torch.float32)
    # the folder's sampling options (config.json "sample"), the 64x64 frame decoded in one piece
    videos = sample.generate(pipe, prompts, seed=0, tiled=False)
    files = []
    for i, (p, frames) in enumerate(zip(prompts, videos)):
        f = os.path.join(ckpt, "samples", f"{i:02d}_{sample.slug(p)}.mp4")
        sample.write_mp4(frames, f, fps=pipe.video["fps"])  # the clips' rate: motion at its true speed
        sample.write_strip(frames, f[:-4] + ".png")
        files.append(f)
    contact_sheet(prompts, videos, os.path.join(ckpt, "samples.png"))
    return files


def contact_sheet(prompts, videos, path, scale=2):
    """One row per prompt: its text, then every other frame, each pixel shown as scale x scale; rows and
    frames apart by a white line, so no shape seems to run into the next."""
    import cv2
    rows = []
    for p, frames in zip(prompts, videos):
        frames = np.pad(frames, ((0, 0), (0, 2), (0, 2), (0, 0)), constant_values=255)
        strip = np.concatenate(list(frames[::2]), axis=1).repeat(scale, 0).repeat(scale, 1)
        label = np.full((strip.shape[0], 260, 3), 255, np.uint8)
        cv2.putText(label, p, (6, strip.shape[0] // 2 + 5), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1)
        rows.append(np.concatenate([label, strip], axis=1))
    img = np.concatenate(rows, axis=0)
    cv2.imwrite(path + ".tmp.png", np.ascontiguousarray(img[..., ::-1]))
    os.replace(path + ".tmp.png", path)

# The LoRA demo: a motion the demo model never saw (its shapes move along one axis: curate.DIRECTIONS)
LORA_DEMO_WORD = "moving diagonally"  # up and to the right
LORA_DEMO_PROMPTS = ["a red circle moving diagonally", "a green square moving diagonally",
                     "a blue triangle moving diagonally", "a yellow circle moving left"]


def lora_demo(args):
    """`python train.py --lora-demo`: teach the demo model (--from, default out/demo) "moving diagonally".
    Clips of shapes moving up and to the right (and a few of the known directions, so those keep their
    meaning) -> a rank-8 LoRA -> the same prompts and seeds sampled without and with it ->
    OUT/lora_demo.png, and each sample's motion measured: its shape's centroid, first frame to last."""
    import cv2
    import curate
    t_start = time.perf_counter()
    rank, world, device = setup_distributed()
    src, out = args.from_dir or "out/demo", args.out or "out/lora_demo"
    if not os.path.isfile(os.path.join(src, "config.json")):
        sys.exit(f"error: --from {src}: no config.json; run `python train.py` first (it writes out/demo)")
    check_writable(out, 2**27)
    with open(os.path.join(src, "config.json")) as f:  # clips at the demo model's own frame size
        video = json.load(f)["video"]
    H, W = video["height"], video["width"]
    data = os.path.join(out, "data")
    if rank == 0 and not os.path.isfile(os.path.join(data, "manifest.jsonl")):
        os.makedirs(os.path.join(data, "clips"), exist_ok=True)
        rng = np.random.default_rng(0)
        colours = list(curate.COLOURS)
        combos = [(c, s, None) for c in colours for s in curate.SHAPES] + \
            [(c, s, d) for c, s, d in zip(colours, curate.SHAPES * 2, list(curate.DIRECTIONS) * 2)]
        clips, images = [], []
        for i, (c, shape, d) in enumerate(combos[:4] if args.quick else combos):
            if d:
                frames = curate.render_shot(rng, W, H, 72, shape, c, d, size=DEMO_SHAPE_SIZE,
                                            travel=DEMO_SHAPE_TRAVEL)
            else:  # curate's backdrop and shapes, moving right and up at the demo's fastest speed per
                # axis (its travel over the shot, centred), so the shape stays inside the frame
                back = curate.texture(rng, H, W, rng.uniform(20, 34), rng.uniform(44, 58))
                frames = np.stack([back.copy() for _ in range(72)])
                v = DEMO_SHAPE_TRAVEL * min(H, W) / 72
                x0, y0 = W / 2 - 36 * v + rng.uniform(-2, 2), H / 2 + 36 * v + rng.uniform(-2, 2)
                for t, f in enumerate(frames):
                    curate.draw_shape(f, shape, curate.COLOURS[c], x0 + v * t, y0 - v * t,
                                      DEMO_SHAPE_SIZE * min(H, W))
            curate.write_video(os.path.join(data, f"clips/c{i}.mp4"), frames)
            cv2.imwrite(os.path.join(data, f"clips/i{i}.png"), frames[0][..., ::-1])
            cap = {"short_description": f"a {c} {shape} " + (f"moving {d}" if d else LORA_DEMO_WORD)}
            clips.append({"clip": f"c{i}", "path": f"clips/c{i}.mp4", "width": W, "height": H,
                          "frames": 72, "caption": cap})
            images.append({"image": f"i{i}", "path": f"clips/i{i}.png", "width": W, "height": H,
                           "caption": cap})
        for f, rows in (("images.jsonl", images), ("manifest.jsonl", clips)):  # manifest last: the marker
            with open(os.path.join(data, f), "w") as fh:
                fh.writelines(json.dumps(r) + "\n" for r in rows)
    barrier(world)
    args = argparse.Namespace(**dict(vars(args), from_dir=src, out=out, data=data, tier=None,
                                     lora=args.lora or 8, steps=args.steps or (3 if args.quick else 150),
                                     batch=args.batch or 4, lr=args.lr or 4e-3))
    path = lora_main(args)
    if rank != 0:
        return
    prompts = LORA_DEMO_PROMPTS[:1] if args.quick else LORA_DEMO_PROMPTS
    pipe = sample.load_pipeline(src, device=device, dtype=torch.float32)
    rows, report = [], []
    for label in ("without", "with"):
        if label == "with":
            dit.load_lora(pipe.dit, path)
        videos = sample.generate(pipe, prompts, seed=0, negative_prompt="", tiled=False,
                                 steps=3 if args.quick else None)
        travel = [centroid_travel(v) for v in videos]
        rows.append((label, videos, travel))
        for p, d in zip(prompts, travel):
            report.append({"lora": label, "prompt": p, "right_px": round(d[0], 1), "up_px": round(d[1], 1)})
            print(f"{label:>7} LoRA: {p!r}: the shape moves {d[0]:+.1f} px right, {d[1]:+.1f} px up")
    write_json(os.path.join(out, "lora_demo.json"), report)
    lora_demo_picture(rows, prompts, os.path.join(out, "lora_demo.png"))
    print(f"LoRA demo done in {time.perf_counter() - t_start:.0f} s: {out}/lora_demo.png, {path}")


def centroid_travel(video):
    """(right, up) pixels from the centroid of a sample's shape in its first frame to that in its last.
    The shape: the pixels far from the frame's median colour (the backdrop, a dim texture, fills most of it).
    """
    def centroid(frame):
        f = frame.astype(np.float64)
        far = np.abs(f - np.median(f.reshape(-1, 3), 0)).sum(-1) > 120
        ys, xs = np.nonzero(far)
        return np.array([xs.mean(), ys.mean()]) if len(xs) else np.zeros(2)
    dx, dy = centroid(video[-1]) - centroid(video[0])
    return float(dx), float(-dy)


def lora_demo_picture(rows, prompts, path, scale=2):
    """One row per (prompt, without/with the LoRA): the prompt and the measured travel, then 5 frames side by
    side, each pixel shown as scale x scale (as contact_sheet)."""
    import cv2
    lines = []
    for i, p in enumerate(prompts):
        for label, videos, travel in rows:
            frames = videos[i]
            idx = np.linspace(0, len(frames) - 1, 5).round().astype(int)
            strip = np.concatenate([frames[j] for j in idx], axis=1).repeat(scale, 0).repeat(scale, 1)
            text = np.full((strip.shape[0], 300, 3), 255, np.uint8)
            mid = strip.shape[0] // 2
            cv2.putText(text, p, (6, mid - 4), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1)
            cv2.putText(text, f"{label} LoRA: {travel[i][0]:+.0f} px right, {travel[i][1]:+.0f} up",
                        (6, mid + 14), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1)
            lines.append(np.concatenate([text, strip], axis=1))
    img = np.concatenate(lines, axis=0)
    cv2.imwrite(path + ".tmp.png", np.ascontiguousarray(img[..., ::-1]))
    os.replace(path + ".tmp.png", path)

# ----------------------------------------------------------------------------------------------------------

def lora_main(args):
    """`train.py --lora RANK ...`: check the options, load the frozen parts, train_lora."""
    bad = []
    if args.lora < 1:
        bad.append(f"--lora {args.lora}: the rank must be at least 1 (e.g. 16)")
    if bool(args.from_dir) == bool(args.init_dit):
        bad.append("--lora needs the DiT to adapt: --from DIR (a train.py folder) or --init-dit FILE")
    if args.from_dir and (args.preset or args.vae or args.llm or args.stage):
        bad.append("--from takes the folder's config, VAE and text encoder: "
                   "drop --preset/--vae/--llm/--stage")
    if args.from_dir and not os.path.isfile(os.path.join(args.from_dir, "config.json")):
        bad.append(f"--from {args.from_dir}: no config.json there (a folder written by train.py)")
    if args.init_dit and not args.vae:
        bad.append("--lora --init-dit needs the VAE its latents come from: pass --vae")
    if not args.data:
        bad.append("--lora needs --data, a curate.py output folder with the clips to learn")
    if bad:
        sys.exit("error: " + "\nerror: ".join(bad))
    try:
        re.compile(args.lora_targets)
    except re.error as e:
        sys.exit(f"error: --lora-targets {args.lora_targets!r} is not a regular expression ({e})")
    rank, world, device = setup_distributed()
    if args.offload and world > 1:
        sys.exit("error: --offload is for one GPU; under torchrun FSDP shards the DiT instead")
    out = args.out or os.path.join("out", "lora")
    check_writable(out, 2**28)
    clips, images = usable_items(*load_items(args.data, args.tier))
    base = None
    if args.from_dir:
        try:
            with open(os.path.join(args.from_dir, "config.json")) as f:
                t = json.load(f)["train"]
            # a folder written before an option was removed still loads: its settings no longer exist
            t = {k: v for k, v in t.items() if k in {fl.name for fl in fields(TrainConfig)}}
            cfg = TrainConfig(**dict(t, stages=tuple(Stage(**st) for st in t["stages"])))
            if not cfg.stages:
                raise ValueError("no stages")
        except (ValueError, KeyError, TypeError) as e:  # JSONDecodeError is a ValueError
            sys.exit(f"error: --from {args.from_dir}: its config.json is not a train.py run's (no training "
                     f"config: {e!r}); pass a folder train.py wrote, or --init-dit FILE --vae ...")
        # the frozen base in bf16 on one GPU; fp32 under FSDP, whose shards keep one dtype (it gathers bf16)
        dtype = torch.bfloat16 if device.type == "cuda" and world == 1 else torch.float32
        try:
            pipe = sample.load_pipeline(args.from_dir, device="cpu" if args.offload == "all" else device,
                                        dtype=dtype)
        except (ValueError, OSError) as e:
            sys.exit(f"error: --from {args.from_dir}: {e}")
        encoder, vae, base = pipe.encoder, pipe.vae.float().to(device), pipe.dit
    else:
        cfg = PRESETS[args.preset or "demo"]
        if args.llm or args.clip:
            if not (args.llm and args.clip):
                sys.exit("error: the official text encoders need both --llm and --clip")
            encoder = text_encoder.PromptEncoder.from_pretrained(args.llm, args.clip, device=device)
        else:
            encoder = small_encoder(out, clips, images, cfg, device, rank, world)
        vae = read_vae(args.vae, cfg, device)
    if args.ckpt_every:
        cfg = replace(cfg, ckpt_every=args.ckpt_every)
    if args.seed is not None:  # else the preset's, or the --from folder's run's
        cfg = replace(cfg, seed=args.seed)
    if args.balance:  # (it used to be ignored with --lora)
        check_balance(clips)
        cfg = replace(cfg, balance_concepts=True)
    if args.batch:
        cfg = replace(cfg, stages=tuple(
            replace(s, buckets=tuple((h, w, t, args.batch) for h, w, t, _ in s.buckets),
                    image_buckets=tuple((h, w, args.batch) for h, w, _ in s.image_buckets))
            for s in cfg.stages))
    try:
        path = train_lora(cfg, args, clips, images, out, rank, world, device, encoder, vae, base)
    except ValueError as e:  # add_lora: --lora-targets matching no layer
        sys.exit(f"error: {e}")
    if rank == 0:
        src = f"--ckpt {args.from_dir}" if args.from_dir else "--dit ... --vae ... --llm ... --clip ..."
        print(f"done: {path}\nnext: python sample.py {src} --lora {path} --prompt \"...\"")
    return path


def main():
    """train.py's command line (cli below); Ctrl-C anywhere is one line, not a traceback (in the DiT loop
    train_dit checkpoints the step it stopped at first)."""
    try:
        cli()
    except KeyboardInterrupt:
        print("\ninterrupted: finished work is kept (checkpoints, cached latents, curated files); the same "
              "command with --resume goes on from there", file=sys.stderr)
        raise SystemExit(130)


def cli():
    # Assembled captions are often longer than CLIP's 77 tokens; CLIP reads the first 77, as it does in the
    # official pipeline. That is expected here, not worth a warning per caption.
    import warnings
    warnings.filterwarnings("ignore", message=r"\d+ tokens, truncated to")
    ap = argparse.ArgumentParser(description="HunyuanVideo training; no arguments: the embedded demo.")
    ap.add_argument("--preset", choices=list(PRESETS), help="a training config (default: the demo)")
    ap.add_argument("--data", help="a curate.py output folder (its manifest.jsonl and images.jsonl)")
    ap.add_argument("--tier", help="train on one of curate.py's stage sets (256p, 360p, 540p, 720p or "
                    "finetune; stills: the largest image set not above it), as the paper's stages do")
    ap.add_argument("--balance", action="store_true", help="draw clips in proportion to curate.py's k-means "
                    "concept weights (with replacement) instead of each once per epoch")
    ap.add_argument("--stage", choices=["vae", "dit"], help="run only up to this stage (default: all)")
    ap.add_argument("--out", help="output folder (default out/demo for the demo, out/<preset> otherwise)")
    ap.add_argument("--vae", help="a trained or the released VAE (skips the VAE stage)")
    ap.add_argument("--llm", help="official text_encoder folder (with --clip); default: the small frozen one")
    ap.add_argument("--clip", help="official text_encoder_2 folder")
    ap.add_argument("--init-dit", help="start the DiT from these weights (e.g. the official .pt)")
    ap.add_argument("--lpips", nargs="+", metavar="PATH", help="the VAE stage's LPIPS weights (paper "
                    "§4.1: 0.1 LPIPS): local torchvision VGG16 and LPIPS v0.1 'lin' state dicts (.pth); "
                    "without them no LPIPS term")
    ap.add_argument("--resume", action="store_true", help="continue from the checkpoints in --out")
    ap.add_argument("--quick", action="store_true",
                    help="the demo with a few steps per stage (CI smoke test)")
    ap.add_argument("--seed", type=int, help="the run's seed: data, initial weights, batches (default 0; "
                    "--lora --from: the folder's)")
    ap.add_argument("--steps", type=int, help="override every stage's step count")
    ap.add_argument("--batch", type=int, help="override every bucket's per-rank batch size")
    ap.add_argument("--ckpt-every", type=int, help="checkpoint every N steps (default: the preset's)")
    ap.add_argument("--compile", action="store_true", help="torch.compile each DiT block (faster GPU steps "
                    "after a minute of compiling)")
    ap.add_argument("--i2v", action="store_true", help="image-to-video fine-tuning (HunyuanVideo-I2V's "
                    "token_replace, docs/i2v.md): video buckets only, frames 1.. learned from a clean first "
                    "latent frame; start from a T2V DiT with --init-dit")
    lo = ap.add_argument_group("LoRA: adapters on a frozen DiT (--init-dit, or a train.py folder: --from)")
    lo.add_argument("--lora", type=int, metavar="RANK", help="train a LoRA of this rank; writes "
                    "OUT/lora.safetensors (sample.py --lora reads it)")
    lo.add_argument("--lora-alpha", type=float, help="scale alpha/rank of the adapters (default: the rank)")
    lo.add_argument("--lora-targets", default=dit.LORA_TARGETS, metavar="REGEX", help="the linear layers "
                    "that get adapters: a regex matching whole official module names (default, "
                    "musubi-tuner's: every linear layer of the 60 blocks but the modulation)")
    lo.add_argument("--from", dest="from_dir", metavar="DIR", help="a train.py output folder: its DiT, VAE, "
                    "text encoder and config (e.g. out/demo)")
    lo.add_argument("--lr", type=float, help=f"LoRA learning rate (default {LORA_LR})")
    lo.add_argument("--lora-demo", action="store_true", help="teach the demo model (--from, default "
                    "out/demo) 'moving diagonally' and picture it before/after (OUT/lora_demo.png)")
    lo.add_argument("--offload", nargs="?", const="all", choices=("all", "modulation", "activations"),
                    help="LoRA on one GPU, gradient checkpointing on: 'activations', the blocks' saved "
                    "inputs wait in CPU memory; 'modulation', the blocks' modulation weights too (a "
                    "quarter of the DiT, streamed to the GPU per block); 'all' (the default), the whole "
                    "frozen blocks")
    args = ap.parse_args()
    # 0 used to mean "the preset's" (--steps 0: all 20,000 steps), a negative --steps trained nothing and
    # exported the untrained DiT, a negative --batch hung (no batch in any epoch)
    for flag, v, ok, want in (("--steps", args.steps, lambda v: v >= 1, "at least 1"),
                              ("--batch", args.batch, lambda v: v >= 1, "at least 1"),
                              ("--ckpt-every", args.ckpt_every, lambda v: v >= 1, "at least 1"),
                              ("--lr", args.lr, lambda v: 0 < v < math.inf, "a number > 0"),
                              ("--lora-alpha", args.lora_alpha, lambda v: 0 < v < math.inf, "a number > 0"),
                              ("--seed", args.seed, lambda v: 0 <= v < 2**32, "in 0 .. 2**32 - 1")):
        if v is not None and not ok(v):
            sys.exit(f"error: {flag} {v}: must be {want}")
    # checked before the hours of work that come before they are read (the VAE stage, the latent caches)
    if sample.mp4_writer_missing():  # the sample videos at the end
        sys.exit(f"error: {sample.mp4_writer_missing()}")
    for flag, p in (("--init-dit", args.init_dit), ("--vae", args.vae), ("--llm", args.llm),
                    ("--clip", args.clip)):
        if p and not os.path.exists(p):
            sys.exit(f"error: {flag} {p}: no such file or folder")
    if args.i2v and (args.lora is not None or args.lora_demo or not args.data or args.llm):
        sys.exit("error: --i2v fine-tunes with --preset/--data and the small text encoders (which read the "
                 "prompt alone; the official I2V text path needs the full LLaVA), not with --lora or --llm")
    if args.lora_demo:
        lora_demo(args)
        return
    if args.lora is not None:
        lora_main(args)
        return
    if args.stage == "dit" and not args.vae and args.preset:
        sys.exit("error: --stage dit needs a trained VAE: pass --vae")
    for p in args.lpips or ():
        if not os.path.isfile(p):
            sys.exit(f"error: --lpips {p}: no such file (the VGG16 and LPIPS v0.1 weights, downloaded "
                     f"beforehand)")
    rank, world, device = setup_distributed()
    if args.preset is None and args.data is None:
        demo(args, rank, world, device)
        return
    cfg = replace(PRESETS[args.preset or "demo"], seed=args.seed or 0)
    if args.steps:
        cfg = replace(cfg, stages=tuple(replace(s, steps=args.steps) for s in cfg.stages),
                      vae_steps=min(cfg.vae_steps, args.steps))
    if args.ckpt_every:
        cfg = replace(cfg, ckpt_every=args.ckpt_every)
    if args.compile:
        cfg = replace(cfg, compile=True)
    if args.balance:
        cfg = replace(cfg, balance_concepts=True)
    if args.i2v:  # a still has no frames after the first to learn: video buckets only
        cfg = replace(cfg, dit_overrides={**cfg.dit_overrides, "image_condition_type": "token_replace"},
                      stages=tuple(replace(s, image_buckets=(), image_ratio=0.0)
                                   for s in cfg.stages if s.buckets))
    if args.batch:
        cfg = replace(cfg, stages=tuple(
            replace(s, buckets=tuple((h, w, t, args.batch) for h, w, t, _ in s.buckets),
                    image_buckets=tuple((h, w, args.batch) for h, w, _ in s.image_buckets))
            for s in cfg.stages))
    if not args.data:
        sys.exit("error: --preset needs --data, a curate.py output folder")
    out = args.out or os.path.join("out", args.preset or "demo")
    check_writable(out, 2**30)
    clips, images = usable_items(*load_items(args.data, args.tier))
    if args.balance:
        check_balance(clips)
    if args.llm or args.clip:
        if not (args.llm and args.clip):
            sys.exit("error: the official text encoders need both --llm and --clip")
        encoder = text_encoder.PromptEncoder.from_pretrained(args.llm, args.clip, device=device)
    else:  # our small frozen encoder, vocabulary from these captions
        encoder = small_encoder(out, clips, images, cfg, device, rank, world)
    # checked here, not as a shape error at the first DiT step after every latent was cached
    mcfg, widths = dit_config(cfg), (encoder.llm.cfg.hidden_size, encoder.clip.cfg.hidden_size)
    if widths != (mcfg.text_dim, mcfg.pooled_dim):
        fix = "train this preset without --llm/--clip" if args.llm else \
            "pass the official ones with --llm and --clip"
        which = "official" if args.llm else "small"
        sys.exit(f"error: the {cfg.dit} DiT reads text states {mcfg.text_dim} wide (pooled "
                 f"{mcfg.pooled_dim}), the {which} text encoders give {widths[0]} ({widths[1]}): {fix}")
    times, _ = run_pipeline(cfg, args, clips, images, out, rank, world, device, encoder)
    if rank == 0:
        print("done: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()) + f"; weights in {out}")
        if args.stage != "vae":  # the folder names its text encoders: ours (inside it) or the official ones
            print(f"next: python sample.py --ckpt {out} --prompt \"...\""
                  + (" --image FIRST_FRAME.png" if args.i2v else ""))


if __name__ == "__main__":
    main()
