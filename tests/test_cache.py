"""Step caching (sample.TeaCache): exact when off or at threshold 0, skipped steps reuse exactly the stored
residual of the blocks, the published rescaling polynomial, the accumulate-to-threshold rule, sequence
parallel ranks agreeing, and clean errors for a bad --cache."""

import sys

import numpy as np
import pytest
import torch

import dit
import sample

STEPS = 6


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


def run(model, cache, cfg_scale=1.0):
    noise, cond = inputs()
    uncond = tuple(c.flip(0) for c in cond) if cfg_scale > 1 else None
    return sample.denoise(model, noise, cond, steps=STEPS, shift=3.0, cfg_scale=cfg_scale, uncond=uncond,
                          progress=False, cache=cache)


def count_block_calls(model):
    calls = []
    for b in (*model.double_blocks, *model.single_blocks):
        b.register_forward_pre_hook(lambda mod, args: calls.append(mod))
    return calls


def euler_reference(model, cfg_scale=1.0):
    """denoise() as it was before caching existed: every step calls the DiT without a cache argument."""
    noise, (text, mask, pooled) = inputs()
    sigmas = sample.flow_sigmas(STEPS, 3.0)
    if cfg_scale > 1:
        text, mask, pooled = (torch.cat([c.flip(0), c]) for c in (text, mask, pooled))
    x = noise
    for i in range(STEPS):
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


def _sp_worker(rank, world, init_file, out_file):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    model = tiny_dit().double()
    model.sp_group = dist.group.WORLD
    cache = sample.TeaCache(0.3)
    x = run(model, cache)
    torch.save((x, cache.computed), f"{out_file}.{rank}")
    dist.barrier()
    dist.destroy_process_group()


def test_sequence_parallel_ranks_take_the_single_process_decisions(tmp_path):
    import torch.multiprocessing as mp
    mp.spawn(_sp_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "out")), nprocs=2, join=True)
    cache = sample.TeaCache(0.3)
    x = run(tiny_dit().double(), cache)
    assert 2 < cache.computed < STEPS
    for rank in range(2):
        xr, computed = torch.load(f"{tmp_path / 'out'}.{rank}")
        assert computed == cache.computed
        torch.testing.assert_close(xr, x, rtol=1e-6, atol=1e-6)  # fp32 latents between steps


def test_cache_spec_and_bad_input(tmp_path, monkeypatch):
    assert sample.cache_spec("teacache:0.2").threshold == 0.2
    assert sample.cache_spec("teacache").threshold == sample.TeaCache.DEFAULT_THRESHOLD
    for bad in ["magcache:0.1", "teacache:abc", "teacache:-1", ""]:
        assert sample.cache_spec(bad) is None
    monkeypatch.setattr(sys, "argv", ["sample.py", "--ckpt", str(tmp_path), "--prompt", "x",
                                      "--cache", "teacache:abc"])
    with pytest.raises(SystemExit) as e:
        sample.main()
    assert "error: --cache teacache:abc: write teacache:THRESHOLD with a threshold >= 0" in str(e.value.code)
