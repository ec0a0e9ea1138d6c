"""RIFLEx for long videos (dit.rope_tables(riflex=RULE), sample.py --riflex): the lowered temporal frequency
against the paper's formula computed directly in float64, the official I2V sampler's rule against its own
arithmetic on pixel frames, tables bit-identical when off or when the video fits in one period, and the
sampler taking a frame count past that period end to end."""

import json
import math
import os
import sys

import numpy as np
import pytest
import torch

import dit
import sample
from test_sample import make_ckpt

AXES, THETA = (16, 56, 56), 256.0  # the released model's RoPE


def direct_tables(grid, axes, theta, riflex_frames=None, k=4):
    """cos/sin (L, head_dim) from the formulas in float64: angle = position * theta^(-2j/m) per axis and
    pair j, each repeated twice; with riflex_frames, the temporal pair j = k - 1 (k counted from 1) turns
    at 0.9 * 2 pi / riflex_frames instead (RIFLEx Eq. 8, the official 0.9 margin)."""
    cols = []
    for axis, (n, m) in enumerate(zip(grid, axes)):
        for j in range(m // 2):
            w = theta ** (-2 * j / m)
            if axis == 0 and riflex_frames and j == k - 1:
                w = 0.9 * 2 * math.pi / riflex_frames
            pos = np.indices(grid)[axis].reshape(-1).astype(np.float64)
            cols += [pos * w] * 2
    ang = torch.from_numpy(np.stack(cols, 1))
    return ang.cos(), ang.sin()


def test_the_intrinsic_period_is_50_latent_frames():
    # thu-ml/RIFLEx hunyuanvideo.py: k = 4, N_k = 50 for theta 256 and a 16-dim temporal axis
    assert dit.RIFLEX_K == 4
    assert dit.riflex_period(16, 256.0) == round(2 * math.pi / 256.0 ** (-6 / 16)) == 50


@pytest.mark.parametrize("frames", [51, 66, 129])
def test_lowered_frequency_matches_the_formula(frames):
    grid = (frames, 2, 3)
    cos, sin = dit.rope_tables(grid, AXES, THETA, torch.float64, riflex="paper")
    want_cos, want_sin = direct_tables(grid, AXES, THETA, riflex_frames=frames)
    torch.testing.assert_close(cos, want_cos, rtol=0, atol=1e-12)
    torch.testing.assert_close(sin, want_sin, rtol=0, atol=1e-12)
    off_cos, off_sin = dit.rope_tables(grid, AXES, THETA, torch.float64)
    changed = (cos != off_cos).any(0).nonzero().flatten().tolist()
    assert changed == [6, 7]  # only the temporal pair k = 4; every other column bit-identical
    # the lowered frequency's period covers the video with the 10% margin: no position repeats
    w = math.atan2(sin[grid[1] * grid[2], 6].item(), cos[grid[1] * grid[2], 6].item())
    assert 2 * math.pi / w == pytest.approx(frames / 0.9, rel=1e-9)
    # fp32, as sampling builds it: the same within fp32 rounding
    cos32, _ = dit.rope_tables(grid, AXES, THETA, riflex="paper")
    torch.testing.assert_close(cos32.double(), want_cos, rtol=0, atol=2e-5)


def test_off_or_within_one_period_the_tables_are_bit_identical():
    for frames in (1, 33, 50):
        grid = (frames, 3, 2)
        for dtype in (torch.float32, torch.float64):
            off = dit.rope_tables(grid, AXES, THETA, dtype)
            for a, b in zip(dit.rope_tables(grid, AXES, THETA, dtype, riflex="paper"), off):
                assert torch.equal(a, b)
        want_cos, _ = direct_tables(grid, AXES, THETA)
        torch.testing.assert_close(dit.rope_tables(grid, AXES, THETA, torch.float64)[0], want_cos,
                                   rtol=0, atol=1e-12)
    # a temporal axis of fewer than 4 frequencies has no such component: unchanged
    for a, b in zip(dit.rope_tables((600, 2, 2), (6, 26, 26), THETA, riflex="paper"),
                    dit.rope_tables((600, 2, 2), (6, 26, 26), THETA)):
        assert torch.equal(a, b)


def official_i2v_k(frames):
    """HunyuanVideo-I2V inference.py get_rotary_pos_embed, in pixel frames: past 192 frames, k = 2 + (frames
    + 3) // (4 * 25) clipped to 4..8; else the plain tables."""
    return max(4, min(8, 2 + (frames + 3) // (4 * 25))) if frames > 192 else None


@pytest.mark.parametrize("frames", [129, 189, 193, 201, 253, 297, 301, 397, 401, 601, 997])
def test_the_official_i2v_rule(frames):
    latent = (frames - 1) // 4 + 1
    grid, k = (latent, 1, 2), official_i2v_k(frames)
    assert dit.riflex_k("i2v", latent, 16, THETA) == k
    cos, sin = dit.rope_tables(grid, AXES, THETA, torch.float64, riflex="i2v")
    want_cos, want_sin = direct_tables(grid, AXES, THETA, riflex_frames=latent if k else None, k=k)
    torch.testing.assert_close(cos, want_cos, rtol=0, atol=1e-12)
    torch.testing.assert_close(sin, want_sin, rtol=0, atol=1e-12)
    off = dit.rope_tables(grid, AXES, THETA)
    on = dit.rope_tables(grid, AXES, THETA, riflex="i2v")
    changed = (on[0] != off[0]).any(0).nonzero().flatten().tolist()
    assert changed == ([2 * k - 2, 2 * k - 1] if k else [])  # only that temporal pair, in fp32 too


def test_the_pipeline_takes_the_official_rule_per_model(tmp_path, monkeypatch):
    """Image-to-video DiTs sample with the official I2V sampler's rule, text-to-video ones with none (the
    official T2V sampler has no RIFLEx); --riflex chooses another."""
    from test_i2v import make_i2v_ckpt
    i2v, t2v = make_i2v_ckpt(str(tmp_path / "i2v"), "token_replace"), make_ckpt(str(tmp_path / "t2v"))
    assert sample.load_pipeline(i2v, image=True).dit.riflex == "i2v"
    assert sample.load_pipeline(t2v).dit.riflex is None
    from PIL import Image
    Image.new("RGB", (48, 32)).save(tmp_path / "img.png")
    seen = []
    monkeypatch.setattr(sample, "generate", lambda pipe, *a, **kw: seen.append(pipe.dit.riflex) or [])
    for ckpt, flag in ((t2v, "--riflex"), (t2v, "--riflex=i2v"), (i2v, "--riflex=off")):
        monkeypatch.setattr(sys, "argv", ["sample.py", "--ckpt", ckpt, "--prompt", "a red circle", flag] +
                            (["--image", str(tmp_path / "img.png")] if ckpt == i2v else []))
        sample.main()
    assert seen == ["paper", "i2v", None]


def small_dit():
    cfg = dit.replace(dit.CONFIGS["tiny"], rope_axes=(16, 8, 8), guidance_embed=False)  # head dim 32
    torch.manual_seed(0)
    model = dit.HunyuanVideoDiT(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model


def test_the_dit_uses_riflex_tables_only_when_asked():
    model = small_dit()
    g = torch.Generator().manual_seed(0)
    x, text = torch.randn(1, 16, 52, 2, 2, generator=g), torch.randn(1, 4, 32, generator=g)
    args = (x, torch.tensor([500.0]), text, None, torch.randn(1, 32, generator=g))
    with torch.no_grad():
        off = model(*args)
        model.riflex = "paper"
        on = model(*args)
        assert torch.equal(model.rope((52, 1, 1), "cpu", torch.float32)[0],
                           dit.rope_tables((52, 1, 1), (16, 8, 8), THETA, riflex="paper")[0])
        model.riflex = None
        assert torch.equal(model(*args), off)  # off again: the original tables, not a cached RIFLEx one
        assert not torch.equal(on, off)
        short = model(x[:, :, :50], *args[1:])  # 50 latent frames: within one period
        model.riflex = "paper"
        assert torch.equal(model(x[:, :, :50], *args[1:]), short)


def test_sample_riflex_past_the_period_end_to_end(tmp_path, monkeypatch, capsys):
    """A checkpoint whose temporal RoPE is the released one's (16 dims, theta 256), sampled at 205 frames
    (52 latent frames, past the 50 of one period): --riflex reaches the DiT's tables and changes the video."""
    ckpt = make_ckpt(str(tmp_path / "ckpt"), H=16, W=16, T=5)
    model = dit.HunyuanVideoDiT(dit.replace(dit.CONFIGS["tiny"], rope_axes=(16, 8, 8), guidance_embed=False,
                                            in_channels=4, out_channels=4))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    dit.save_dit(model, os.path.join(ckpt, "dit.safetensors"))
    with open(os.path.join(ckpt, "config.json")) as f:
        conf = json.load(f)
    conf["dit"]["rope_axes"] = [16, 8, 8]
    with open(os.path.join(ckpt, "config.json"), "w") as f:
        json.dump(conf, f)
    calls, rope_tables = [], dit.rope_tables
    monkeypatch.setattr(dit, "rope_tables", lambda *a: calls.append(a) or rope_tables(*a))
    latents, frames = [], []

    def decode(self, z, tiled=True):  # the VAE is not under test: record the latent, skip the slow decode
        latents.append(z)
        return torch.zeros(z.shape[0], 3, 205, 16, 16)

    monkeypatch.setattr(sample.vae_lib.CausalVAE, "decode", decode)
    monkeypatch.setattr(sample, "write_mp4", lambda f, path, fps: frames.append(f))
    monkeypatch.setattr(sample, "write_strip", lambda f, path: None)
    for flag in ([], ["--riflex"]):
        monkeypatch.setattr(sys, "argv", ["sample.py", "--ckpt", ckpt, "--prompt", "a red circle moving left",
                                          "--frames", "205", "--out", str(tmp_path / "v.mp4"), *flag])
        sample.main()
    assert [(a[0], a[4]) for a in calls] == [((52, 1, 1), None), ((52, 1, 1), "paper")]
    assert latents[0].shape == (1, 4, 52, 2, 2) and frames[0].shape == (205, 16, 16, 3)
    assert not torch.equal(latents[0], latents[1])
    assert "RIFLEx (paper rule), 52 latent frames: the temporal RoPE's frequency 4 lowered" in \
        capsys.readouterr().out
