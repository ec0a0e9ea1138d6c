"""
Speed and memory of each component, with the peer implementation measured in the same run.

    python bench.py dit --config 13b --size 544x960x129    # bf16 DiT forward, ours vs diffusers
    python bench.py dit                                     # on a CPU: the tiny config, a smoke run
    python bench.py train [--compile]                       # 1.3B training step: s/step, MFU, memory
    python bench.py sample --steps 50                       # 13B sampling + VAE decode, 544x960x129
    python bench.py vae                                     # tiled VAE decode 544x960x129: seconds, peak GB
    python bench.py curate                                  # shot detection vs PySceneDetect, pipeline fps
    python bench.py attention [--lengths 16640 ...]         # attention_cuda kernel vs SDPA flash/cuDNN

GPU timings use CUDA events after warm-up and report the median. Figures go into the README's
Performance table with the GPU and the date.
"""

import argparse
import statistics
import time

import torch

import dit


def timed(fn, warmup, iters):
    """Median seconds of fn() after warm-up: CUDA events on a GPU, perf_counter on a CPU."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def dit_flops(cfg, n_img, n_txt):
    """Matmul FLOPs of one forward: every token passes ~12 D^2 weights per block (double: qkv 3, proj 1,
    MLP 8 per stream; single: linear1 7, linear2 5), plus 4 L^2 D per block for QK^T and PV."""
    D, L = cfg.hidden_size, n_img + n_txt
    blocks = cfg.depth_double + cfg.depth_single
    mlp = cfg.mlp_ratio
    linear = 2 * L * D * D * (4 + 2 * mlp) * blocks
    attn = 4 * L * L * D * blocks
    return linear + attn


def bench_dit(args):
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    name = args.config or ("13b" if cuda else "tiny")
    cfg = dit.CONFIGS[name]
    H, W, T = (int(v) for v in (args.size or ("544x960x129" if cuda else "64x64x9")).split("x"))
    if H % 16 or W % 16 or (T - 1) % 4:
        raise SystemExit(f"--size {H}x{W}x{T}: height/width must be multiples of 16 and frames 4k+1 (e.g. 544x960x129)")
    lat = (1, cfg.in_channels, (T - 1) // 4 + 1, H // 8, W // 8)
    n_img = lat[2] // cfg.patch_size[0] * (lat[3] // cfg.patch_size[1]) * (lat[4] // cfg.patch_size[2])
    n_txt = 256 if cuda else 16
    dtype = torch.bfloat16 if cuda else torch.float32
    print(f"DiT {name} ({cfg.hidden_size}x{cfg.depth_double}+{cfg.depth_single}), video {H}x{W}x{T} -> latent "
          f"{lat[2:]}, {n_img:,} image + {n_txt} text tokens, {dtype}, {device}"
          + (f" ({torch.cuda.get_device_name()})" if cuda else ""))

    # random weights (std 0.02 everywhere, so no block is the zero-initialised identity)
    with torch.device("meta"):
        model = dit.HunyuanVideoDiT(cfg)
    model = model.to(dtype).to_empty(device=device).eval()  # cast on meta: 13B never exists in fp32 on the GPU
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    g = torch.Generator(device).manual_seed(0)
    x = torch.randn(lat, device=device, generator=g).to(dtype)
    t = torch.tensor([900.0], device=device)
    text = torch.randn(1, n_txt, cfg.text_dim, device=device, generator=g).to(dtype)
    mask = (torch.arange(n_txt, device=device) < n_txt * 3 // 4)[None].long()  # realistic padding
    pooled = torch.randn(1, cfg.pooled_dim, device=device, generator=g).to(dtype)
    guid = torch.tensor([6016.0], device=device, dtype=dtype)
    warmup, iters = (1, 3) if cuda and name != "13b" else (1, 2)  # a 13B forward is ~10 s

    rows = []
    with torch.no_grad():
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        sec = timed(lambda: model(x, t, text, mask, pooled, guid), warmup, iters)
        mem = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
        ours = model(x, t, text, mask, pooled, guid).float()
        rows.append(("ours (dit.py)", sec, mem))
        print(f"ours: {sec:.3f} s per forward, peak {mem:.1f} GiB", flush=True)
        sd = dit.official_to_diffusers(model.state_dict()) if args.peer else None
        del model
        if cuda:
            torch.cuda.empty_cache()

        if args.peer:
            try:
                from diffusers import HunyuanVideoTransformer3DModel
            except ImportError:
                print("peer: diffusers is not installed, skipped (pip install diffusers)")
            else:
                with torch.device("meta"):
                    ref = HunyuanVideoTransformer3DModel(
                        in_channels=cfg.in_channels, out_channels=cfg.out_channels, num_attention_heads=cfg.num_heads,
                        attention_head_dim=cfg.hidden_size // cfg.num_heads, num_layers=cfg.depth_double,
                        num_single_layers=cfg.depth_single, num_refiner_layers=cfg.refiner_depth,
                        mlp_ratio=cfg.mlp_ratio, patch_size=cfg.patch_size[1], patch_size_t=cfg.patch_size[0],
                        guidance_embeds=cfg.guidance_embed, text_embed_dim=cfg.text_dim,
                        pooled_projection_dim=cfg.pooled_dim, rope_theta=cfg.rope_theta, rope_axes_dim=cfg.rope_axes)
                ref.load_state_dict({k: v.to(device) for k, v in sd.items()}, strict=True, assign=True)
                ref = ref.to(device=device, dtype=dtype).eval()
                del sd
                run = lambda: ref(x, t, text, mask, pooled, guidance=guid, return_dict=False)[0]
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                psec = timed(run, warmup, iters)
                pmem = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
                theirs = run().float()
                rows.append(("diffusers HunyuanVideoTransformer3DModel", psec, pmem))
                print(f"same weights, ours vs diffusers: relative difference "
                      f"{((ours - theirs).norm() / theirs.norm()).item():.2e}")

    flops = dit_flops(cfg, n_img, n_txt)
    print(f"\n{'implementation':<42} {'seconds':>9} {'tokens/s':>10} {'TFLOP/s':>8} {'peak GiB':>9}")
    for label, sec, mem in rows:
        print(f"{label:<42} {sec:>9.3f} {(n_img + n_txt) / sec:>10,.0f} {flops / sec / 1e12:>8.1f} {mem:>9.1f}")
    print(f"({flops / 1e15:.2f} PFLOP per forward, matmuls only; median of {iters} after {warmup} warm-up)")


def bench_train(args):
    """One optimizer step (forward, backward, AdamW) of the DiT in bf16 autocast: seconds, model-FLOPs
    utilisation against the measured bf16 matmul peak, and peak memory, with and without checkpointing."""
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    if cuda:
        cfg = dit.replace(dit.CONFIGS["13b"], hidden_size=1536, num_heads=12, depth_double=8, depth_single=16)
        H, W, T, B, n_txt, n_valid = 256, 256, 33, 8, 256, 64
    else:
        cfg, (H, W, T, B, n_txt, n_valid) = dit.CONFIGS["tiny"], (64, 64, 9, 2, 16, 8)
    lat = (B, cfg.in_channels, (T - 1) // 4 + 1, H // 8, W // 8)
    n_img = lat[2] * (lat[3] // 2) * (lat[4] // 2)
    flops = 3 * B * dit_flops(cfg, n_img, n_txt)  # forward + backward (2x), recomputation not counted
    # The convention of issue 7's diffusers figure (0.477 s = 46.5% of 779 TFLOP/s; it reproduces to 0.1%):
    # 6 x all parameters x tokens (image + valid text) + 3 x 4 L^2 D per block for attention over those tokens.
    # It counts the modulation weights per token, which run once per sample: larger than our matmul count.
    tokens, n_params = n_img + n_valid, args_params(cfg)
    blocks = cfg.depth_double + cfg.depth_single
    flops_6nd = B * (6 * n_params * tokens + 3 * 4 * tokens**2 * cfg.hidden_size * blocks)
    print(f"DiT train step: {cfg.hidden_size}x{cfg.depth_double}+{cfg.depth_single} "
          f"({n_params / 1e9:.2f}B), {H}x{W}x{T} ({n_img} image + {n_txt} text "
          f"tokens, {n_valid} valid), batch {B}, bf16 autocast, AdamW, {device}")
    g = torch.Generator(device).manual_seed(0)
    x = torch.randn(lat, device=device, generator=g)
    t = torch.rand(B, device=device, generator=g) * 1000
    text = torch.randn(B, n_txt, cfg.text_dim, device=device, generator=g)
    mask = (torch.arange(n_txt, device=device) < n_valid)[None].expand(B, -1).long()
    pooled = torch.randn(B, cfg.pooled_dim, device=device, generator=g)
    guid = torch.full((B,), 1000.0, device=device)
    measured = None
    if cuda:  # the bf16 matmul peak of this GPU, measured now (issue 7's 779 TFLOP/s was an H100's)
        a, b = (torch.randn(8192, 8192, device=device, dtype=torch.bfloat16) for _ in range(2))
        measured = 2 * 8192**3 / timed(lambda: a @ b, 10, 50) / 1e12
        del a, b
    rows = []
    for compiled in ((False, True) if args.compile else (False,)):
        for ckpt in (False, True):
            torch.manual_seed(0)
            with torch.device(device):  # initialised on the GPU: 1.3B on the CPU takes longer than the timing
                model = dit.HunyuanVideoDiT(cfg)
            with torch.no_grad():  # not the zero-init modulations: every block takes part in the gradient check
                for p in model.parameters():
                    p.normal_(0, 0.02)
            model.gradient_checkpointing = ckpt
            if compiled:
                model.compile_blocks()
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda)

            def step(check=False):
                with torch.autocast(device, dtype=torch.bfloat16, enabled=cuda):
                    loss = (model(x, t, text, mask, pooled, guid).float() - x).square().mean()
                loss.backward()
                if check:  # same init and batch in every variant: loss and gradient norm must agree
                    gnorm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
                    print(f"  first step: loss {loss.item():.6f}, gradient norm {gnorm.item():.6f}")
                opt.step()
                opt.zero_grad(set_to_none=True)

            if cuda:
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            step(check=True)  # first step apart: it holds the compilation
            first = time.perf_counter() - t0
            sec = timed(step, 2, 5 if cuda else 2)
            mem = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
            rows.append((f"ours{', compiled' if compiled else ''}, checkpointing {'on' if ckpt else 'off'}",
                         sec, mem, ckpt))
            print(f"{rows[-1][0]}: {sec:.3f} s/step (first step {first:.1f} s), peak {mem:.1f} GiB", flush=True)
            del model, opt
            if cuda:
                torch.cuda.empty_cache()
    diffusers = {False: 0.477, True: 0.633}  # issue 7: the diffusers transformer on this step, H100, 2026-11-24
    print(f"\n{'implementation':<44} {'s/step':>7} {'MFU 6ND':>8} {'MFU mm':>7} {'MFU mm@meas':>12} "
          f"{'vs diffusers':>13} {'peak GiB':>9}")
    for label, sec, mem, ckpt in rows:
        meas = f"{flops / sec / measured / 1e12:>12.1%}" if measured else f"{'-':>12}"
        print(f"{label:<44} {sec:>7.3f} {flops_6nd / sec / args.peak_tflops / 1e12:>8.1%} "
              f"{flops / sec / args.peak_tflops / 1e12:>7.1%} {meas} "
              + (f"{diffusers[ckpt] / sec:>12.2f}x" if cuda else f"{'-':>13}") + f" {mem:>9.1f}")
    print(f"(MFU 6ND: {flops_6nd / 1e12:.1f} TFLOP per step by the convention of the diffusers figure (46.5% at "
          f"0.477 s); MFU mm: {flops / 1e12:.1f} TFLOP, the matmuls forward + backward actually run, recomputation "
          f"not counted; both against {args.peak_tflops:.0f} TFLOP/s (an H100's measured bf16 peak); mm@meas "
          "against this GPU's " + (f"{measured:.0f} TFLOP/s measured now" if measured else "(not measured on a CPU)")
          + "; 'vs diffusers' = its step time on an H100 (2026-11-24: 0.477 s without checkpointing, 0.633 s "
          "with) over ours)")


def args_params(cfg):
    with torch.device("meta"):
        return dit.num_params(dit.HunyuanVideoDiT(cfg))


def bench_sample(args):
    """End-to-end sampling without the text encoders: random-weight DiT (13B on a GPU) for `--steps` Euler
    steps at 544x960x129, then the tiled fp16 VAE decode. Seconds per stage and peak memory."""
    import sample
    import vae as vae_lib
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    name, (H, W, T) = ("13b", (544, 960, 129)) if cuda else ("tiny", (64, 64, 9))
    vcfg = vae_lib.CONFIGS["884-16c-hy" if cuda else "tiny"]
    cfg = dit.replace(dit.CONFIGS[name], in_channels=vcfg.latent_channels, out_channels=vcfg.latent_channels)
    dtype = torch.bfloat16 if cuda else torch.float32
    with torch.device("meta"):
        model = dit.HunyuanVideoDiT(cfg)
    model = model.to(dtype).to_empty(device=device).eval().requires_grad_(False)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    if args.fp8:
        dit.quantize_fp8(model)  # as loading mp_rank_00_model_states_fp8.pt: 1 byte per block weight
    if args.offload and cuda:  # drawn on the GPU (fast), then parked in pinned CPU memory block by block
        for block in list(model.double_blocks) + list(model.single_blocks):
            block.to("cpu")
        torch.cuda.empty_cache()
        sample.offload_blocks(model, torch.device(device))
    vae = vae_lib.CausalVAE(vcfg).to(device, torch.float16 if cuda else torch.float32).eval()
    lat = (1, vcfg.latent_channels, (T - 1) // 4 + 1, H // 8, W // 8)
    g = torch.Generator(device).manual_seed(0)
    n_txt = 256 if cuda else 16
    cond = (torch.randn(1, n_txt, cfg.text_dim, device=device, generator=g).to(dtype),
            (torch.arange(n_txt, device=device) < n_txt // 4)[None].long(),
            torch.randn(1, cfg.pooled_dim, device=device, generator=g).to(dtype))
    noise = sample.initial_noise(lat, 0, device, torch.float16 if cuda else torch.float32)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    z = sample.denoise(model, noise, cond, args.steps, 7.0, 6.0)
    if cuda:
        torch.cuda.synchronize()
    t_dit = time.perf_counter() - t0
    del model
    if cuda:
        torch.cuda.empty_cache()
    t0 = time.perf_counter()
    with torch.no_grad():
        video = vae.decode(z / vcfg.scaling_factor, tiled=True)
    if cuda:
        torch.cuda.synchronize()
    t_vae = time.perf_counter() - t0
    mem = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    where = (", DiT blocks offloaded" if args.offload else "") + (", fp8 block weights" if args.fp8 else "")
    print(f"\nsampling {name} {H}x{W}x{T}{where}, {args.steps} steps: DiT {t_dit:.1f} s ({t_dit / args.steps:.2f} s/step), "
          f"VAE decode {t_vae:.1f} s, total {t_dit + t_vae:.1f} s, peak {mem:.1f} GiB, video {tuple(video.shape)}")
    print("(diffusers on the same GPU, 2026-11-24: 11.2 s per DiT step, 15.4 s VAE decode; official 544p peak 45 GB)")


def bench_curate(args):
    """Shot detection F1 (+-2 frames) and speed, ours vs PySceneDetect's ContentDetector (if installed), on
    synthetic multi-shot videos with known cuts; then the whole curation pipeline's frames per second."""
    import glob, json, os, shutil, tempfile, time
    import curate
    n_videos = int(getattr(args, "videos", 0) or 12)
    tmp = tempfile.mkdtemp(prefix="bench_curate_")
    raw, out = os.path.join(tmp, "raw"), os.path.join(tmp, "out")
    try:
        # same files for both detectors: 640x360 demo videos, 3-5 shots each, some shorter than 20 frames
        curate.make_synthetic(raw, n_videos, seed=1234, sizes=((640, 360),), size_p=(1.0,))
        videos = sorted(glob.glob(os.path.join(raw, "*.mp4")))
        truth = {v: [s["start"] for s in json.load(open(v[:-4] + ".json"))["shots"]][1:] for v in videos}
        n_frames = sum(json.load(open(v[:-4] + ".json"))["shots"][-1]["end"] for v in videos)

        def f1(found):
            tp = fp = fn = 0
            for v in videos:
                t, f = list(truth[v]), list(found[v])
                for c in f:                       # greedy one-to-one matching within +-2 frames
                    m = [x for x in t if abs(x - c) <= 2]
                    if m:
                        t.remove(min(m, key=lambda x: abs(x - c)))
                        tp += 1
                    else:
                        fp += 1
                fn += len(t)
            p, r = tp / max(1, tp + fp), tp / max(1, tp + fn)
            return 2 * p * r / max(1e-9, p + r), p, r

        def best_of(n, fn):  # (fastest of n runs, result): a shared 2-core machine's timings vary by ~20%
            times = []
            for _ in range(n):
                t0 = time.perf_counter()
                res = fn()
                times.append(time.perf_counter() - t0)
            return min(times), res

        rows = []
        sec, ours = best_of(3, lambda: {v: [s for s, _ in curate.detect_shots(v)][1:] for v in videos})
        rows.append(("curate.detect_shots", sec, *f1(ours)))
        try:
            from scenedetect import ContentDetector, detect
            def frame_no(tc):   # FrameTimecode: .frame_num in 0.7+, get_frames() before
                return tc.frame_num if hasattr(tc, "frame_num") else tc.get_frames()
            for name, kw in (("PySceneDetect ContentDetector (defaults: threshold 27)", {}),
                             ("PySceneDetect ContentDetector (tuned: threshold 5, min_scene_len 4)",
                              {"threshold": 5.0, "min_scene_len": 4})):
                sec, theirs = best_of(3, lambda: {v: [frame_no(s) for s, _ in detect(v, ContentDetector(**kw))][1:]
                                                  for v in videos})
                rows.append((name, sec, *f1(theirs)))
        except ImportError:
            print("PySceneDetect not installed (pip install scenedetect): comparison skipped")
        n_cuts = sum(len(t) for t in truth.values())
        print(f"shot detection on {len(videos)} synthetic videos, {n_frames} frames, {n_cuts} hard cuts (640x360); "
              f"seconds: the fastest of 3 runs")
        print(f"{'detector':68s} {'F1':>6s} {'prec':>6s} {'recall':>6s} {'seconds':>8s} {'frames/s':>9s}")
        for name, sec, f, p, r in rows:
            print(f"{name:68s} {f:6.3f} {p:6.3f} {r:6.3f} {sec:8.2f} {n_frames / sec:9.0f}")
        for name, sec, *_ in rows[1:]:
            print(f"speed-up of ours vs {name}: {sec / rows[0][1]:.2f}x")
        # the whole pipeline (shots, clarity, flow, camera, overlays, quality, writing clips), one process
        t0 = time.perf_counter()
        counts = curate.run(raw, out, workers=1)
        sec = time.perf_counter() - t0
        print(f"pipeline (1 worker): {n_frames} input frames in {sec:.1f}s = {n_frames / sec:.0f} frames/s; {counts}")
        camera_accuracy(curate, tmp, per_class=int(getattr(args, "camera_clips", 0) or 6))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def smooth_photo(rng, h, w):
    """A photo-like picture: smooth multi-scale colour noise with 20-80 small blobs (little fine texture, so
    zoomed-in flow is noisy). camera_accuracy() films it; one camera test zooms into it as well."""
    import cv2
    import numpy as np
    img = np.zeros((h, w, 3), np.float32)
    for s in (4, 8, 16, 32, 64):
        img += cv2.resize(rng.normal(0, 1, (max(2, h // s), max(2, w // s), 3)).astype(np.float32), (w, h),
                          interpolation=cv2.INTER_CUBIC) * (s / 16)
    img = ((img - img.min()) / np.ptp(img) * 200 + 20).astype(np.uint8)
    for _ in range(int(rng.integers(20, 80))):
        c = tuple(int(v) for v in rng.integers(0, 255, 3))
        cv2.circle(img, (int(rng.integers(0, w)), int(rng.integers(0, h))), int(rng.integers(3, max(4, w // 40))), c, -1)
    return cv2.GaussianBlur(img, (3, 3), 0)


def camera_accuracy(curate, tmp, per_class=6, seed=2026):
    """camera_movement()'s labels on clips from a generator the demo does not use and the tests' camera clips
    do not either (one zoom test shares only its picture, smooth_photo): photo-like
    smooth multi-scale colour noise with small blobs, 5 frame sizes, random speed and length, mp4
    compression, a moving subject in 40% of them; rigid moves (pan, tilt, zoom, roll, handheld, static) by
    warping a window over the picture, and two-layer parallax (orbit, pedestal) with a near band over the
    lower 35-50% of the frame. Honest caveat: the parallax rule's zoom/roll guard was tuned on such clips."""
    import collections, os
    import cv2
    import numpy as np
    rng = np.random.default_rng(seed)

    def clip(cam, w, h, n):
        sp = rng.uniform(0.004, 0.025) * w                 # translation, px/frame
        zr, ar = rng.uniform(0.004, 0.015), rng.uniform(0.3, 1.2)  # zoom per frame, roll degrees per frame
        frames, walk = [], np.zeros(2)
        if cam.startswith("around") or cam in ("pan up", "pan down"):
            far, near, band = smooth_photo(rng, 3 * h, 3 * w), smooth_photo(rng, 3 * h, 3 * w), int(h * rng.uniform(0.35, 0.5))
            ratio = rng.uniform(1.8, 3.0)                  # near layer / far layer speed (pedestal)
            for t in range(n):   # far, near offsets: orbit = opposite ways, pedestal = same way, near faster
                fx, nx, fy, ny = {"around left": (-sp * t, sp * t, 0, 0), "around right": (sp * t, -sp * t, 0, 0),
                                  "pan up": (0, 0, sp * t / ratio, sp * t),
                                  "pan down": (0, 0, -sp * t / ratio, -sp * t)}[cam]
                f = cv2.warpAffine(far, np.float32([[1, 0, fx - w], [0, 1, fy - h]]), (w, h))
                f[h - band:] = cv2.warpAffine(near, np.float32([[1, 0, nx - w], [0, 1, ny - h]]), (w, h))[h - band:]
                frames.append(f)
        else:
            img = smooth_photo(rng, 3 * h, 3 * w)
            for t in range(n):   # the camera's move; the content moves the other way
                dx = {"pan right": sp * t, "pan left": -sp * t}.get(cam, 0.0)
                dy = {"tilt down": sp * t, "tilt up": -sp * t}.get(cam, 0.0)
                z = {"zoom in": (1 + zr) ** t, "zoom out": (1 + zr) ** -t}.get(cam, 1.0)
                ang = {"tilt right": ar * t, "tilt left": -ar * t}.get(cam, 0.0)
                if cam == "handheld shot":                 # mean-reverting jitter, no drift
                    walk = 0.6 * walk + rng.normal(0, rng.uniform(0.006, 0.015) * w, 2)
                    dx, dy = walk
                m = cv2.getRotationMatrix2D((1.5 * w + dx, 1.5 * h + dy), ang, z)
                m[:, 2] += (w / 2 - 1.5 * w - dx, h / 2 - 1.5 * h - dy)
                frames.append(cv2.warpAffine(img, m, (w, h), flags=cv2.INTER_LINEAR))
        if rng.random() < 0.4:                             # a subject crossing the frame
            x, y, vx, vy = rng.uniform(0.2, 0.8) * w, rng.uniform(0.2, 0.8) * h, rng.uniform(-2, 2), rng.uniform(-2, 2)
            for t, f in enumerate(frames):
                cv2.circle(f, (int(x + vx * t), int(y + vy * t)), h // 10, (240, 60, 60), -1)
        path = os.path.join(tmp, "camera.mp4")
        vw = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), 24, (w, h))
        for f in frames:
            vw.write(f)
        vw.release()
        cap, out = cv2.VideoCapture(path), []
        while True:
            ok, f = cap.read()
            if not ok:
                return np.stack(out)
            out.append(cv2.cvtColor(f, cv2.COLOR_BGR2RGB))

    classes = ["pan left", "pan right", "tilt up", "tilt down", "zoom in", "zoom out", "tilt left", "tilt right",
               "static shot", "handheld shot", "around left", "around right", "pan up", "pan down"]
    right, wrong = collections.Counter(), collections.Counter()
    for cam in classes:
        for _ in range(per_class):
            w, h = [(320, 180), (480, 270), (640, 360), (256, 256), (256, 144)][int(rng.integers(0, 5))]
            label, _ = curate.camera_movement(clip(cam, w, h, int(rng.integers(33, 66))))
            if label == cam:
                right[cam] += 1
            else:
                wrong[(cam, label)] += 1
    rigid = classes[:10]
    n_rigid = sum(right[c] for c in rigid)
    print(f"\ncamera labels on {per_class} unseen clips per class (photo-like texture, mp4, 40% with a moving subject):")
    print("  " + ", ".join(f"{c} {right[c]}/{per_class}" for c in classes))
    print(f"  rigid moves (first 10): {n_rigid}/{10 * per_class}; all 14: {sum(right.values())}/{14 * per_class}"
          + (f"; mistakes: {dict(wrong)}" if wrong else ""))

def bench_vae(args):
    """`python bench.py vae`: tiled fp16 decode of a 33x68x120 latent (544x960x129 video) and tiled encode of a
    129x256x256 clip with the released config (random weights, or args.vae_path if given) on CUDA; a tiny
    config on CPU. The diffusers VAE with the same weights is timed in the same run when importable."""
    import time

    import torch

    import vae

    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    vae.FUSED_KERNELS = not getattr(args, "unfused", False)
    if cuda:
        cfg, dtype, lat, clip = vae.CONFIGS["884-16c-hy"], torch.float16, (33, 68, 120), (129, 256, 256)
    else:  # tiny model, tiles of 64 px / 16 frames, so the same tiled code paths run
        cfg, dtype, lat, clip = vae.CONFIGS["tiny"], torch.float32, (6, 10, 10), (17, 64, 64)
    path = getattr(args, "vae_path", None)
    if path and cuda:
        model = vae.load_vae(path, device=dev, dtype=dtype)
    else:
        torch.manual_seed(0)
        model = vae.CausalVAE(cfg).to(dev, dtype).eval().requires_grad_(False)
    g = torch.Generator(dev).manual_seed(0)
    z = torch.randn((1, cfg.latent_channels) + lat, generator=g, device=dev, dtype=dtype)
    x = torch.rand((1, 3) + clip, generator=g, device=dev, dtype=dtype) * 2 - 1

    def timed(fn):
        """(seconds, peak GB allocated during fn, output); CUDA events after a synchronize, CPU wall clock."""
        if not cuda:
            t0 = time.perf_counter()
            out = fn()
            return time.perf_counter() - t0, float("nan"), out
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3, torch.cuda.max_memory_allocated() / 2**30, out

    h, w = lat[1] * cfg.spatial_compression, lat[2] * cfg.spatial_compression
    t = cfg.time_compression * (lat[0] - 1) + 1
    fused = "Triton norm-SiLU kernels" if cuda and vae.FUSED_KERNELS and vae.triton else "torch element-wise code"
    print(f"vae: {'cuda ' + torch.cuda.get_device_name() if cuda else 'cpu (tiny config)'}, {dtype}, {fused}, "
          f"weights {sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30:.2f} GB")
    with torch.inference_mode():
        # warm-up: one temporal window through every tiled code path (cuDNN/kernel selection, allocator)
        model.decode(z[:, :, :cfg.tile_sample_frames // cfg.time_compression + 1], tiled=True)
        model.encode(x[:, :, :cfg.tile_sample_frames + 1], tiled=True)
        sec, peak, video = timed(lambda: model.decode(z, tiled=True))
        print(f"  decode {lat[0]}x{lat[1]}x{lat[2]} -> {t}x{h}x{w}, tiled: {sec:.2f} s, peak {peak:.2f} GB allocated "
              f"(output {tuple(video.shape)})")
        del video
        sec, peak, _ = timed(lambda: model.encode(x, tiled=True))
        print(f"  encode {clip[0]}x{clip[1]}x{clip[2]}, tiled: {sec:.2f} s, peak {peak:.2f} GB allocated")

    try:
        import diffusers
        from diffusers import AutoencoderKLHunyuanVideo
    except ImportError:
        print("  diffusers not importable: no peer timing")
        return
    c = model.cfg
    peer = AutoencoderKLHunyuanVideo(
        in_channels=c.in_channels, out_channels=c.out_channels, latent_channels=c.latent_channels,
        block_out_channels=c.block_out_channels, layers_per_block=c.layers_per_block,
        norm_num_groups=c.norm_groups, mid_block_add_attention=c.mid_attention)
    peer.load_state_dict(model.state_dict())  # same key names
    del model
    peer = peer.to(dev, dtype).eval()
    peer.enable_tiling()  # diffusers defaults: 256 px tiles, 16-frame temporal tiles (not the official 64)
    print(f"  (tiles differ: ours {c.tile_sample_size} px / {c.tile_sample_frames}-frame windows as the official "
          f"code, diffusers 256 px / 16 frames)")
    with torch.inference_mode():
        peer.decode(z[:, :, :cfg.tile_sample_frames // cfg.time_compression + 1])
        sec, peak, _ = timed(lambda: peer.decode(z).sample)
        print(f"  diffusers {diffusers.__version__} decode, tiled: {sec:.2f} s, peak {peak:.2f} GB allocated")
        sec, peak, _ = timed(lambda: peer.encode(x).latent_dist.mean)
        print(f"  diffusers encode, tiled: {sec:.2f} s, peak {peak:.2f} GB allocated")


def bench_attention(args):
    from attention_cuda import bench as attention_bench  # its own options: python bench.py attention -h
    attention_bench.main(args.rest)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    p = sub.add_parser("dit", help="DiT forward time")
    p.add_argument("--config", choices=list(dit.CONFIGS), help="default: 13b on a GPU, tiny on a CPU")
    p.add_argument("--size", help="HxWxT video size, default 544x960x129 on a GPU, 64x64x9 on a CPU")
    p.add_argument("--no-peer", dest="peer", action="store_false", help="skip the diffusers comparison")
    p.set_defaults(fn=bench_dit)
    p = sub.add_parser("train", help="DiT training step: seconds, MFU, memory")
    p.add_argument("--peak-tflops", type=float, default=779.0, help="bf16 matmul peak for MFU (H100: 779 measured)")
    p.add_argument("--compile", action="store_true", help="also time the blocks compiled (dit.compile_blocks)")
    p.set_defaults(fn=bench_train)
    p = sub.add_parser("sample", help="end-to-end sampling (DiT steps + VAE decode)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--offload", action="store_true", help="keep the DiT blocks in CPU memory (sample.py --offload)")
    p.add_argument("--fp8", action="store_true", help="block linears in fp8 (the official fp8 checkpoint's form)")
    p.set_defaults(fn=bench_sample)
    p = sub.add_parser("vae", help="tiled fp16 decode of 33x68x120 (544x960x129) and encode of 129x256x256")
    p.add_argument("--vae-path", help="real weights (default: random)")
    p.add_argument("--unfused", action="store_true", help="torch element-wise code instead of the Triton kernels")
    p.set_defaults(fn=bench_vae)
    p = sub.add_parser("curate", help="shot detection F1/speed vs PySceneDetect, pipeline frames/s (CPU)")
    p.add_argument("--videos", type=int, default=12, help="synthetic 640x360 videos to measure on")
    p.add_argument("--camera-clips", type=int, default=6, help="unseen clips per camera class for label accuracy")
    p.set_defaults(fn=bench_curate)
    # everything after `attention` goes to attention_cuda/bench.py ('+' prefix: its -h and --flags pass through)
    p = sub.add_parser("attention", prefix_chars="+", add_help=False,
                       help="fused attention vs SDPA flash/cuDNN, fwd and fwd+bwd TFLOP/s (attention_cuda/bench.py)")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(fn=bench_attention)
    args = ap.parse_args()
    args.fn(args)


if __name__ == "__main__":
    main()
