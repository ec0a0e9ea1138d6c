"""Step caching (sample.TeaCache, MagCache, EasyCache): exact when off or at threshold 0, skipped steps reuse
exactly what each claims (the blocks' stored residual; EasyCache: the last computed output minus its input),
the published constants (polynomial, magnitude ratios), each decision rule replayed in float64, offloaded
blocks streamed on computed steps only, sequence parallel ranks agreeing, clean errors for a bad --cache,
and the SSIM of bench.py's cache report against a direct float64 formula."""

import sys

import numpy as np
import pytest
import torch

import dit
import sample

STEPS = 6
EASY_STEPS = 10  # EasyCache runs its first 5 steps and the last: 10 leave it 4 to decide


def tiny_dit(seed=0):
    """The tiny config with every weight random: the official init zeroes each modulation, which would
    make every block the identity and the residual zero."""
    torch.manual_seed(seed)
    model = dit.HunyuanVideoDiT(dit.replace(dit.CONFIGS["tiny"], guidance_embed=False)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    return model


def inputs(B=2):
    g = torch.Generator().manual_seed(1)
    text = torch.randn(B, 5, 32, generator=g)
    mask = torch.tensor([[1] * 5] + [[1] * 3 + [0] * 2] * (B - 1))
    noise = torch.randn(B, 16, 2, 4, 4, generator=g)
    return noise, (text, mask, torch.randn(B, 32, generator=g))


def run(model, cache, cfg_scale=1.0, steps=STEPS):
    noise, cond = inputs()
    uncond = tuple(c.flip(0) for c in cond) if cfg_scale > 1 else None
    return sample.denoise(model, noise, cond, steps=steps, shift=3.0, cfg_scale=cfg_scale, uncond=uncond,
                          progress=False, cache=cache)


def count_block_calls(model):
    calls = []
    for b in (*model.double_blocks, *model.single_blocks):
        b.register_forward_pre_hook(lambda mod, args: calls.append(mod))
    return calls


def euler_reference(model, cfg_scale=1.0, steps=STEPS):
    """denoise() as it was before caching existed: every step calls the DiT without a cache argument."""
    noise, (text, mask, pooled) = inputs()
    sigmas = sample.flow_sigmas(steps, 3.0)
    if cfg_scale > 1:
        text, mask, pooled = (torch.cat([c.flip(0), c]) for c in (text, mask, pooled))
    x = noise
    for i in range(steps):
        xin = torch.cat([x, x]) if cfg_scale > 1 else x
        v = model(xin, (sigmas[i] * 1000).expand(len(xin)), text, mask, pooled)
        if cfg_scale > 1:
            u, c = v.chunk(2)
            v = u + cfg_scale * (c - u)
        x = x.float() + v.float() * (sigmas[i + 1] - sigmas[i])
    return x


@pytest.mark.parametrize("cfg_scale", [1.0, 4.0])
def test_off_and_threshold_zero_are_bit_identical(cfg_scale):
    model = tiny_dit()
    ref = euler_reference(model, cfg_scale)
    assert torch.equal(run(model, None, cfg_scale), ref)
    calls = count_block_calls(model)
    cache = sample.TeaCache(0.0)  # the rescaled distance is > 0.05 everywhere: every step computes
    assert torch.equal(run(model, cache, cfg_scale), ref)
    assert (cache.computed, cache.skipped) == (STEPS, 0)
    assert len(calls) == STEPS * 4  # 2 double + 2 single blocks per step


@pytest.mark.parametrize("cfg_scale", [1.0, 4.0])
def test_skipped_steps_reuse_the_cached_residual_exactly(cfg_scale):
    model = tiny_dit()
    calls = count_block_calls(model)
    patched, final_in, blocks_io = [], [], []
    model.img_in.register_forward_hook(lambda mod, args, out: patched.append(out))
    model.final_layer.register_forward_pre_hook(lambda mod, args: final_in.append(args[0]))
    run_blocks = model.run_blocks

    def recording(img, *args):
        out = run_blocks(img, *args)
        blocks_io.append((img, out))
        return out

    model.run_blocks = recording
    cache = sample.TeaCache(1e9)  # never reached: only the first and last steps compute
    run(model, cache, cfg_scale)
    assert (cache.computed, cache.skipped) == (2, STEPS - 2)
    assert len(calls) == 2 * 4 and len(blocks_io) == 2 and len(final_in) == STEPS
    img0, out0 = blocks_io[0]
    n = img0.shape[1]
    residual = out0[:, :n] - img0  # one per sample: 2 or, under CFG, 4 rows
    assert residual.shape[0] == (4 if cfg_scale > 1 else 2)
    for i in range(1, STEPS - 1):
        assert torch.equal(final_in[i], patched[i] + residual)
    assert torch.equal(final_in[-1], blocks_io[1][1][:, :n])  # the last step ran the blocks again


def test_offloaded_blocks_are_streamed_on_computed_steps_only():
    """sample.offload_blocks keeps block 0's img_mod resident (the cache runs it alone every step); the
    blocks' weights come over only for the steps that run them, and the result is the resident one's."""
    resident = run(tiny_dit(), sample.TeaCache(0.8))
    model = sample.offload_blocks(tiny_dit(), torch.device("cpu"))
    calls = count_block_calls(model)
    cache = sample.TeaCache(0.8)
    assert torch.equal(run(model, cache), resident)
    assert cache.skipped > 0 and len(calls) == cache.computed * 4


def test_polynomial_is_the_published_one():
    # TeaCache4HunyuanVideo/teacache_sample_video.py: np.poly1d of these, highest power first
    assert sample.TeaCache.COEFFICIENTS == (7.33226126e+02, -4.01131952e+02, 6.75869174e+01,
                                            -3.14987800e+00, 9.61237896e-02)
    c = sample.TeaCache.COEFFICIENTS
    for x in [0.0, 0.01, 0.05, 0.1, 0.3, 1.0]:
        direct = sum(ci * x ** (4 - k) for k, ci in enumerate(c))
        assert sample.TeaCache.rescale(x) == pytest.approx(direct, rel=1e-12, abs=1e-15)
        assert sample.TeaCache.rescale(x) == pytest.approx(np.poly1d(c)(x), rel=1e-12, abs=1e-15)


def test_decisions_follow_the_accumulated_rescaled_distance():
    """Replay the rule in float64 from the probes the DiT showed the cache: the relative L1 change of block
    0's modulated input, rescaled, summed until it reaches the threshold."""
    model = tiny_dit()
    seen = []
    should_compute = sample.TeaCache.should_compute

    def recording(self, probe, group=None):
        result = should_compute(self, probe, group)
        seen.append((probe.double(), result))
        return result

    sample.TeaCache.should_compute = recording
    try:
        for threshold in [0.3, 0.8]:
            seen.clear()
            run(model, sample.TeaCache(threshold))
            expected, acc = [True], 0.0
            for i in range(1, STEPS):
                prev, cur = seen[i - 1][0], seen[i][0]
                acc += np.poly1d(sample.TeaCache.COEFFICIENTS)(
                    ((cur - prev).abs().mean() / prev.abs().mean()).item())
                compute = i == STEPS - 1 or acc >= threshold
                acc = 0.0 if compute else acc
                expected.append(compute)
            assert [r for _, r in seen] == expected
        assert not all(expected)  # the thresholds are chosen so that something is skipped
    finally:
        sample.TeaCache.should_compute = should_compute


def sp_cases():
    """One cache of each method with its step count, at thresholds where the tiny model skips some steps."""
    return [(sample.TeaCache(0.3), STEPS), (sample.MagCache(0.24), STEPS),
            (sample.EasyCache(1.0), EASY_STEPS)]


def _sp_worker(rank, world, init_file, out_file):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    model = tiny_dit().double()
    model.sp_group = dist.group.WORLD
    results = []
    for cache, steps in sp_cases():
        x = run(model, cache, steps=steps)
        results.append((x, cache.computed))
    torch.save(results, f"{out_file}.{rank}")
    dist.barrier()
    dist.destroy_process_group()


def test_sequence_parallel_ranks_take_the_single_process_decisions(tmp_path):
    import torch.multiprocessing as mp
    mp.spawn(_sp_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "out")), nprocs=2, join=True)
    for i, (cache, steps) in enumerate(sp_cases()):
        x = run(tiny_dit().double(), cache, steps=steps)
        assert 2 < cache.computed < steps or isinstance(cache, sample.MagCache) and cache.skipped > 0
        for rank in range(2):
            xr, computed = torch.load(f"{tmp_path / 'out'}.{rank}")[i]
            assert computed == cache.computed
            torch.testing.assert_close(xr, x, rtol=1e-6, atol=1e-6)  # fp32 latents between steps


def test_cache_spec_and_bad_input(tmp_path, monkeypatch):
    assert sample.cache_spec("teacache:0.2").threshold == 0.2
    assert sample.cache_spec("teacache").threshold == sample.TeaCache.DEFAULT_THRESHOLD
    for bad in ["fastcache:0.1", "teacache:abc", "teacache:-1", "magcache:nan", "easycache:-0.1", "",
                "magcache:x"]:
        assert sample.cache_spec(bad) is None
    # the published defaults: magcache_sample_video.py 0.24; easycache_sample_video.py 0.025
    assert type(sample.cache_spec("easycache")) is sample.EasyCache
    assert sample.cache_spec("easycache").threshold == 0.025
    assert sample.cache_spec("easycache:0.05").threshold == 0.05
    mag = sample.cache_spec("magcache")
    assert type(mag) is sample.MagCache and mag.threshold == 0.24 and (mag.K, mag.RETENTION) == (6, 0.2)
    assert mag.ratios == sample.MagCache.RATIOS_720P
    assert sample.cache_spec("magcache:0.1", height=544).ratios == sample.MagCache.RATIOS_544P
    monkeypatch.setattr(sys, "argv", ["sample.py", "--ckpt", str(tmp_path), "--prompt", "x",
                                      "--cache", "teacache:abc"])
    with pytest.raises(SystemExit) as e:
        sample.main()
    assert ("error: --cache teacache:abc: write teacache, magcache or easycache, optionally with "
            ":THRESHOLD >= 0" in str(e.value.code))


# ----------------------------------------------------------------------------------------------------------
# MagCache and EasyCache

def test_magcache_and_easycache_at_threshold_zero_are_bit_identical(cfg_scale=4.0):
    model = tiny_dit()
    ref = euler_reference(model, cfg_scale, EASY_STEPS)
    calls = count_block_calls(model)
    for cache in (sample.MagCache(0.0), sample.EasyCache(0.0)):
        calls.clear()
        assert torch.equal(run(model, cache, cfg_scale, EASY_STEPS), ref)
        assert (cache.computed, cache.skipped) == (EASY_STEPS, 0)
        assert len(calls) == EASY_STEPS * 4


@pytest.mark.parametrize("cfg_scale", [1.0, 4.0])
def test_magcache_skipped_steps_reuse_the_cached_residual_exactly(cfg_scale):
    """Threshold out of reach: only retention (the first 20% of steps) and the K-in-a-row limit make a step
    run; a skipped step's image tokens are the patch embedding plus the last computed step's residual."""
    model = tiny_dit()
    patched, final_in, blocks_io = [], [], []
    model.img_in.register_forward_hook(lambda mod, args, out: patched.append(out))
    model.final_layer.register_forward_pre_hook(lambda mod, args: final_in.append(args[0]))
    run_blocks = model.run_blocks

    def recording(img, *args):
        out = run_blocks(img, *args)
        blocks_io.append((len(final_in), img, out))  # the step it ran at
        return out

    model.run_blocks = recording
    cache = sample.MagCache(1e9)
    run(model, cache, cfg_scale, EASY_STEPS)
    # 10 steps: 0 and 1 retained, 2..7 skipped (K = 6), 8 runs (7 in a row would exceed K), 9 skipped
    assert [i for i, _, _ in blocks_io] == [0, 1, 8] and cache.skipped == 7
    residual = None
    for i in range(EASY_STEPS):
        if blocks_io and blocks_io[0][0] == i:
            _, img, out = blocks_io.pop(0)
            n = img.shape[1]
            assert torch.equal(final_in[i], out[:, :n])
            residual = out[:, :n] - img
        else:
            assert torch.equal(final_in[i], patched[i] + residual)


def nearest_interp(src, n):
    """MagCache4Wan2.1/magcache_generate.py's resampling of a per-step table, in numpy."""
    src = np.asarray(src)
    if n == 1:
        return np.array([src[-1]])
    return src[np.round(np.arange(n) * ((len(src) - 1) / (n - 1))).astype(int)]


def test_magcache_ratios_and_decisions_are_the_published_ones():
    r720, r544 = sample.MagCache.RATIOS_720P, sample.MagCache.RATIOS_544P
    # magcache_sample_video.py: [1.0] + 49 measured ratios, for 720p and 544p (spot checks, and the sums)
    assert len(r720) == len(r544) == 50 and r720[0] == r544[0] == 1.0
    assert r720[1:4] == (1.0754, 1.27807, 1.11596) and r720[-3:] == (0.90943, 0.85703, 0.75456)
    assert r544[1:4] == (1.06971, 1.29073, 1.11245) and r544[-3:] == (0.91154, 0.86139, 0.76592)
    assert sum(r720) == pytest.approx(50.73865, abs=1e-9) and sum(r544) == pytest.approx(50.72147, abs=1e-9)
    for steps, threshold, table in [(50, 0.24, r720), (50, 0.12, r544), (30, 0.24, r720), (7, 0.1, r720)]:
        cache = sample.MagCache(threshold, ratios=table)
        cache.reset(steps)
        cache.residual = torch.zeros(1)  # as after step 0 ran
        got = [cache.should_compute() for _ in range(steps)]
        # the reference loop of magcache_forward, in float64
        ratios, want, acc_ratio, acc_err, acc_steps = nearest_interp(table, steps), [], 1.0, 0.0, 0
        for i in range(steps):
            skip = False
            if i >= int(0.2 * steps):
                acc_ratio *= ratios[i]
                acc_err += abs(1 - acc_ratio)
                acc_steps += 1
                if acc_err <= threshold and acc_steps <= 6:
                    skip = True
                else:
                    acc_ratio, acc_err, acc_steps = 1.0, 0.0, 0
            want.append(not skip)
        assert got == want and 0 < sum(got) < steps
        assert cache.step_ratios == list(ratios)


def easycache_calls(model, cache, cfg_scale=1.0):
    """Run EASY_STEPS steps; return per step (input, output) as cache.run saw and returned them, and the
    inputs the DiT itself was called with."""
    dit_inputs, seen = [], []
    model.register_forward_pre_hook(lambda mod, args: dit_inputs.append(args[0]))
    cache_run = cache.run

    def recording(model, x, *args):
        v = cache_run(model, x, *args)
        seen.append((x, v))
        return v

    cache.run = recording
    run(model, cache, cfg_scale, EASY_STEPS)
    return seen, dit_inputs


@pytest.mark.parametrize("cfg_scale", [1.0, 4.0])
def test_easycache_skipped_steps_return_the_input_plus_the_last_computed_difference(cfg_scale):
    model = tiny_dit()
    calls = count_block_calls(model)
    cache = sample.EasyCache(1e9)  # out of reach: the 5 warm-up steps and the last one run
    seen, dit_inputs = easycache_calls(model, cache, cfg_scale)
    assert (cache.computed, cache.skipped) == (6, 4) and len(calls) == 6 * 4 and len(dit_inputs) == 6
    x4, v4 = seen[4]
    assert all(torch.equal(dit_inputs[i], seen[i][0]) for i in range(5)) and dit_inputs[5] is seen[9][0]
    for i in range(5, 9):
        x, v = seen[i]
        assert v.shape[0] == (4 if cfg_scale > 1 else 2)
        assert torch.equal(v, (x.float() + (v4.float() - x4.float())).to(v4.dtype))


@pytest.mark.parametrize("cfg_scale", [1.0, 4.0])
def test_easycache_decisions_follow_the_transformation_rate(cfg_scale):
    """Replay easycache_forward's rule in float64 from what the cache saw: k from the last two computed steps,
    k * mean|x - x_prev| / mean|v_last| summed over skipped steps until it reaches the threshold."""
    for threshold in [0.7, 1.0]:
        model = tiny_dit()
        cache = sample.EasyCache(threshold)
        seen, dit_inputs = easycache_calls(model, cache, cfg_scale)
        want, acc, k, last, before = [], 0.0, None, None, None  # last/before: (x, v) of computed steps
        for i, (x, v) in enumerate(seen):
            x, v = x.double(), v.double()
            compute = True
            if 5 <= i < EASY_STEPS - 1 and k is not None:
                acc += k * ((x - seen[i - 1][0].double()).abs().mean() / last[1].abs().mean()).item()
                compute = acc >= threshold
            acc = 0.0 if compute else acc
            if compute:
                before, last = last, (x, v)
                if before is not None:
                    k = ((v - before[1]).abs().mean() / (x - before[0]).abs().mean()).item()
            want.append(compute)
        got = [any(d is x for d in dit_inputs) for x, _ in seen]  # the steps that called the DiT
        assert got == want and cache.computed == sum(want) and cache.skipped == EASY_STEPS - sum(want)
        if threshold == 1.0:
            assert not all(want)  # chosen so that something is skipped


def test_offloaded_blocks_are_streamed_on_computed_steps_only_for_magcache_and_easycache():
    for make, steps in [(lambda: sample.MagCache(0.24), STEPS), (lambda: sample.EasyCache(1.0), EASY_STEPS)]:
        resident = run(tiny_dit(), make(), steps=steps)
        model = sample.offload_blocks(tiny_dit(), torch.device("cpu"))
        calls = count_block_calls(model)
        cache = make()
        assert torch.equal(run(model, cache, steps=steps), resident)
        assert cache.skipped > 0 and len(calls) == cache.computed * 4


# ----------------------------------------------------------------------------------------------------------
# SSIM for bench.py's cache report

def ssim_direct(a, b):
    """Wang et al. 2004 SSIM on one grey image pair, straight from the formula in float64: per window position
    (the 11x11 Gaussian window, sigma 1.5, fully inside the image) the weighted means, variances and
    covariance, then the mean of the SSIM map; K1 0.01, K2 0.03, L 255."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    g = np.exp(-((np.arange(11) - 5.0) ** 2) / (2 * 1.5 ** 2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    vals = []
    for i in range(a.shape[0] - 10):
        for j in range(a.shape[1] - 10):
            pa, pb = a[i:i + 11, j:j + 11], b[i:i + 11, j:j + 11]
            ma, mb = (w * pa).sum(), (w * pb).sum()
            va, vb = (w * (pa - ma) ** 2).sum(), (w * (pb - mb) ** 2).sum()
            cov = (w * (pa - ma) * (pb - mb)).sum()
            vals.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2)))
    return float(np.mean(vals))


def test_ssim_matches_the_direct_formula_on_luma():
    import bench
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (3, 18, 23, 3)).astype(np.uint8)  # (T, H, W, RGB) videos
    b = np.clip(a.astype(int) + rng.integers(-100, 101, a.shape), 0, 255).astype(np.uint8)
    b[1] = a[1]  # one identical frame
    got = bench.ssim(a, b)
    luma = lambda v: v.astype(np.float64) @ np.array([0.299, 0.587, 0.114])  # ITU-R BT.601
    want = [ssim_direct(luma(a[t]), luma(b[t])) for t in range(3)]
    assert got == pytest.approx(float(np.mean(want)), rel=1e-10, abs=1e-12)
    assert bench.ssim(a, a) == pytest.approx(1.0, abs=1e-12) and want[1] == pytest.approx(1.0)
    assert 0 < got < 0.9


def test_bench_cache_report_and_magcache_calibration(tmp_path, capsys):
    """bench.py cache end to end on a tiny folder, and its MagCache calibration against the residuals read
    off the DiT directly: (final layer input - patch embedding) per step, mean over tokens of the ratio of
    consecutive norms, in float64."""
    import argparse
    import bench
    from test_sample import make_ckpt
    ckpt = make_ckpt(str(tmp_path / "ckpt"), H=16, W=16, T=5)
    pipe = sample.load_pipeline(ckpt, dtype=torch.float32)
    patched, final_in = [], []
    pipe.dit.img_in.register_forward_hook(lambda mod, args, out: patched.append(out))
    pipe.dit.final_layer.register_forward_pre_hook(lambda mod, args: final_in.append(args[0]))
    ratios = bench.magcache_ratios(pipe, "a red circle moving left", 3)
    norms = [(f.double() - p.double()).norm(dim=-1) for f, p in zip(final_in, patched)]
    want = [1.0] + [(b / a).mean().item() for a, b in zip(norms, norms[1:])]
    assert len(ratios) == 3 and ratios == pytest.approx(want, rel=1e-5)
    bench.bench_cache(argparse.Namespace(ckpt=ckpt, caches=["magcache:0.5", "easycache"], prompts=2, seeds=1))
    out = capsys.readouterr().out
    assert "| off | 6/6 | 0% | reference |" in out and "| easycache | 6/6 | 0% | inf dB |" in out
    assert "| magcache:0.5 |" in out and "| magcache:0.5, measured ratios |" in out
