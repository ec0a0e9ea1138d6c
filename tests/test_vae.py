import json
import math
import os
import sys
import weakref

import pytest
import torch
import torch.nn.functional as F
import torch.utils._python_dispatch
import torch.utils._pytree

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import vae  # noqa: E402

torch.set_num_threads(1)


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    m = vae.CausalVAE(vae.VAEConfig(**{**vars(vae.CONFIGS["tiny"]), **kw})).eval()
    with torch.no_grad():  # non-trivial GroupNorm affines, so the norms matter in every comparison
        for n, p in m.named_parameters():
            if "norm" in n:
                p.add_(0.3 * torch.randn_like(p))
    return m


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def video(B, T, H, W, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, 3, T, H, W, generator=g) * 2 - 1


# -----------------------------------------------------------------------------
# shapes and errors


def test_latent_shape_formula():
    m = tiny()
    for T, H, W in [(1, 16, 24), (5, 16, 16), (9, 8, 16), (13, 16, 8)]:
        with torch.no_grad():
            mean, logvar = m.encode(video(2, T, H, W))
        want = (2, 4, (T - 1) // 4 + 1, H // 8, W // 8)
        assert mean.shape == logvar.shape == want, (T, H, W)
        assert m.latent_shape(T, H, W) == want[2:]
        with torch.no_grad():
            out = m.decode(mean)
        assert out.shape == (2, 3, 4 * (want[2] - 1) + 1, H, W)  # T' -> 4(T'-1)+1 recovers T


def test_bad_shapes_raise_with_rule_and_nearest_size():
    m = tiny()
    with pytest.raises(ValueError, match=r"T=10 frames must be 4k\+1.*nearest valid T=9"):
        m.encode(video(1, 10, 16, 16))
    with pytest.raises(ValueError, match=r"T=12 .*nearest valid T=13"):
        m.encode(video(1, 12, 16, 16))
    with pytest.raises(ValueError,
                       match=r"H=30 must be a multiple of 8, nearest valid H=32.*W=20 .*valid W=16"):
        m.encode(video(1, 5, 30, 20))
    with pytest.raises(ValueError, match=r"H=4 .*nearest valid H=8"):
        m.encode(video(1, 1, 4, 16))
    with pytest.raises(ValueError, match=r"expected a video \(B, 3, T, H, W\)"):
        m.encode(torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match=r"expected a latent \(B, 4,"):
        m.decode(torch.zeros(1, 16, 2, 2, 2))


# -----------------------------------------------------------------------------
# building blocks against independent computations


def test_causal_conv_matches_naive_loop_and_is_causal():
    torch.manual_seed(0)
    conv = vae.CausalConv3d(3, 5, 3).double()
    x = torch.randn(2, 3, 7, 6, 5, dtype=torch.float64)
    y = conv(x)
    # naive: output frame t = sum over the 3 taps of a 2D conv of frame max(t-2+i, 0) (front replicate),
    # each frame replicate-padded by 1 in space
    w, b = conv.conv.weight, conv.conv.bias
    frame = lambda t: F.pad(x[:, :, max(t, 0)], (1, 1, 1, 1), mode="replicate")
    ref = torch.stack([sum(F.conv2d(frame(t - 2 + i), w[:, :, i]) for i in range(3)) + b.view(1, -1, 1, 1)
                       for t in range(7)], dim=2)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    # causality: changing input frame j changes output frames >= j only
    for j in range(7):
        x2 = x.clone()
        x2[:, :, j] += 1.0
        d = (conv(x2) - y).abs().amax(dim=(0, 1, 3, 4))
        assert (d[:j] == 0).all() and d[j] > 0, j


def test_single_frame_conv_equals_the_padded_3d_conv():
    # one frame takes a 2D path with the time taps summed; it must be the 3D conv of the replicate-padded
    # frame, for the time-strided downsampling conv too, with the same gradients
    torch.manual_seed(0)
    for stride in (1, (2, 2, 2), (1, 2, 2)):
        conv = vae.CausalConv3d(4, 5, 3, stride=stride).double()
        x = torch.randn(2, 4, 1, 6, 8, dtype=torch.float64, requires_grad=True)
        y = conv(x)
        ref = conv.conv(F.pad(x, conv.padding, mode="replicate"))  # the general path, written out
        assert y.shape == ref.shape
        torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
        g = torch.autograd.grad(y.square().sum(), (x, conv.conv.weight, conv.conv.bias))
        gr = torch.autograd.grad(ref.square().sum(), (x, conv.conv.weight, conv.conv.bias))
        for a, b in zip(g, gr):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def _autocast_norm(norm, x, silu=True):
    """GroupNorm (+ SiLU) of half x as the official runs it under CUDA autocast: GroupNorm takes and returns
    fp32, SiLU runs on that fp32, and the next conv/linear rounds its input to half once."""
    h = F.group_norm(x.float(), norm.num_groups, norm.weight.float(), norm.bias.float(), norm.eps)
    return (F.silu(h) if silu else h).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_resnet_is_the_official_block_under_autocast(dtype):
    # ResnetBlockCausal3D written out (norm1-SiLU-conv1, norm2-SiLU-conv2, 1x1x1 shortcut), each causal conv a
    # full 3D conv over the replicate-padded input in half (for T=1: the frame repeated in the 2 past slots);
    # rounding to half after the GroupNorm and again after the SiLU made ~34% of these outputs differ
    torch.manual_seed(0)
    r = vae.ResnetBlock(8, 16, 4)
    with torch.no_grad():
        for n, p in r.named_parameters():
            if "norm" in n:
                p.add_(0.3 * torch.randn_like(p))
    r = r.to(dtype)
    conv = lambda c, h: F.conv3d(F.pad(h, (1, 1, 1, 1, 2, 0), mode="replicate"), c.conv.weight, c.conv.bias)
    for T in (3, 1):
        x = (torch.randn(2, 8, T, 6, 5) * 2 + 0.5).to(dtype)
        with torch.no_grad():
            h = conv(r.conv1, _autocast_norm(r.norm1, x))
            h = conv(r.conv2, _autocast_norm(r.norm2, h))
            ref = F.conv3d(x, r.conv_shortcut.conv.weight, r.conv_shortcut.conv.bias) + h
            assert torch.equal(r(x), ref), T


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_conv_out_input_is_rounded_once(dtype):
    # encoder and decoder end in conv_norm_out-SiLU-conv_out: conv_out must see the fp32 result rounded once
    # (rounding twice made 20-32% of its inputs differ)
    m = tiny().to(dtype)
    seen = {}
    save = lambda name: lambda mod, args, out=None: seen.__setitem__(name, args[0] if out is None else out)
    parts = (("enc", m.encoder, m.encoder.mid_block), ("dec", m.decoder, m.decoder.up_blocks[-1]))
    for name, part, last in parts:
        last.register_forward_hook(save(f"{name} x"))  # conv_norm_out's input
        part.conv_out.register_forward_pre_hook(save(f"{name} conv_out in"))
    with torch.no_grad():
        mean, _ = m.encode(video(1, 5, 16, 16))
        m.decode(mean)
    for name, part in (("enc", m.encoder), ("dec", m.decoder)):
        want = _autocast_norm(part.conv_norm_out, seen[f"{name} x"])
        assert torch.equal(seen[f"{name} conv_out in"], want), name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_attention_normalises_in_fp32(dtype):
    # the official's attention (diffusers Attention) runs its group_norm under autocast too, and to_q/k/v
    # round the fp32 result once. A half-input GroupNorm also rounds once, but its kernel computes the
    # statistics differently: on CPU ~1% of the outputs differed for this input (large mean, small spread).
    torch.manual_seed(0)
    at = vae.Attention(32, 16).to(dtype)
    x = (torch.randn(1, 32, 3, 8, 8) * 2 + 100).to(dtype)
    seen = []
    at.to_q.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    with torch.no_grad():
        at(x)
    assert torch.equal(seen[0], _autocast_norm(at.group_norm, x, silu=False).flatten(2).transpose(1, 2))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_single_frame_conv_is_the_official_3d_conv(dtype):
    # the official convolves the causally padded frame (3 copies) in 3D with each time tap as stored; the
    # 2D shortcut's summed taps, rounded to half, made 40-50% of the outputs differ. Same under autocast
    # with fp32 weights, where autocast would round the summed taps.
    torch.manual_seed(0)
    for stride in (1, (2, 2, 2), (1, 2, 2)):
        conv = vae.CausalConv3d(8, 8, 3, stride=stride)
        x = torch.randn(2, 8, 1, 6, 8)
        official = lambda c, v: F.conv3d(F.pad(v.repeat(1, 1, 3, 1, 1), (1, 1, 1, 1, 0, 0), mode="replicate"),
                                         c.conv.weight, c.conv.bias, stride)
        with torch.no_grad():
            with torch.autocast("cpu", dtype=dtype):
                assert torch.equal(conv(x), official(conv, x)), (stride, "autocast")
            conv, x = conv.to(dtype), x.to(dtype)
            assert torch.equal(conv(x), official(conv, x)), stride


def test_frame_causal_attention_matches_masked_softmax():
    torch.manual_seed(0)
    B, T, n, C = 2, 3, 4, 8
    q, k, v = (torch.randn(B, T * n, C, dtype=torch.float64) for _ in range(3))
    frame = torch.arange(T * n) // n
    s = q @ k.transpose(1, 2) / math.sqrt(C)
    s = s.masked_fill(frame[None, :] > frame[:, None], float("-inf"))  # token of frame f sees frames <= f
    torch.testing.assert_close(vae._frame_causal_attention(q, k, v, n), s.softmax(-1) @ v)


def test_upsample_first_frame_spatial_only():
    up = vae.Upsample(2, (2, 2, 2))
    x = torch.randn(1, 2, 3, 2, 2)
    u = up._frames(x, 0, 5)  # 3 frames -> 1 + 2*2
    sp = lambda f: f.repeat_interleave(2, -1).repeat_interleave(2, -2)
    ref = torch.stack([sp(x[:, :, 0]), sp(x[:, :, 1]), sp(x[:, :, 1]), sp(x[:, :, 2]), sp(x[:, :, 2])], dim=2)
    assert torch.equal(u, ref)


def test_stream_path_equals_plain_path(monkeypatch):
    # one frame per chunk so every cache/in-place branch of the stream path is exercised; float64 so that
    # any difference beyond rounding would show
    monkeypatch.setattr(vae, "STREAM_ELEMENTS", 1)
    monkeypatch.setattr(vae, "PLAIN_ELEMENTS", 0)  # no-grad calls stream however small
    m = tiny().double()
    x = video(1, 9, 16, 24).double()
    with torch.enable_grad():
        mean_p, logvar_p = m.encode(x)
        dec_p = m.decode(mean_p.detach())
    with torch.no_grad():
        mean_s, logvar_s = m.encode(x)
        dec_s = m.decode(mean_p)
    assert rel(mean_s, mean_p) < 1e-12 and rel(logvar_s, logvar_p) < 1e-12
    assert rel(dec_s, dec_p) < 1e-12


def test_small_no_grad_batches_take_the_plain_path_with_the_same_result(monkeypatch):
    m = tiny().double()  # float64: the two paths may differ by rounding only
    x = video(3, 5, 16, 24).double()
    with torch.no_grad():
        for part in (m.encoder, m.decoder):
            part.stream = lambda *a: pytest.fail("a small no-grad call streamed")
        mean_b, _ = m.encode(x)  # small: plain path, whole batch at once
        dec_b = m.decode(mean_b)
        del m.encoder.stream, m.decoder.stream
        monkeypatch.setattr(vae, "PLAIN_ELEMENTS", 0)
        mean_s, _ = m.encode(x)  # stream path, one sample at a time
        dec_s = m.decode(mean_b)
    assert rel(mean_b, mean_s) < 1e-12 and rel(dec_b, dec_s) < 1e-12


@pytest.mark.parametrize("dtype, tol_enc, tol_dec",
                         [(torch.bfloat16, 3e-2, 0.3), (torch.float16, 5e-3, 5e-2)])
def test_half_precision_inference_close_to_fp32(dtype, tol_enc, tol_dec):
    # loose decode bounds: a random decoder amplifies rounding ~100x (diffusers' VAE with the same weights is
    # off from fp32 by the same 16% in bf16, 3% in fp16)
    m = tiny()
    x = video(1, 5, 16, 16)
    with torch.no_grad():
        mean, _ = m.encode(x)
        ref = m.decode(mean)
        m = m.to(dtype)
        mean_h, _ = m.encode(x)
        out = m.decode(mean)
    assert mean_h.dtype == out.dtype == dtype
    assert rel(mean_h, mean) < tol_enc and rel(out, ref) < tol_dec


# -----------------------------------------------------------------------------
# tiling


def test_tiled_equals_untiled_when_one_tile_covers():
    m = tiny()  # tiles: 64 px / 16 frames
    x = video(1, 5, 64, 48)  # exactly the tile size: not tiled
    z = torch.randn(1, 4, 4, 8, 6)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(m.encode(x, tiled=True), m.encode(x)))
        assert torch.equal(m.decode(z, tiled=True), m.decode(z))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_blend_is_the_official_python_float_expression(dtype):
    # official blend_v/blend_h/blend_t (autoencoder_kl_causal_3d.py), a loop over positions with Python
    # float weights: a half tensor times a Python float is computed in fp32 and rounded to half, per product;
    # weights rounded to half first made ~22% of the blended elements differ (none where the extent is a power
    # of 2, as 16 is: its weights are exact in half)
    g = torch.Generator().manual_seed(0)
    for dim, extent in ((2, 12), (-2, 3), (-1, 24), (-1, 16)):
        shape = [1, 3, 6, 7, 8]
        shape[dim] = extent + 4
        a = torch.randn(shape, generator=g).to(dtype)
        b = torch.randn(shape, generator=g).to(dtype)
        ref = b.clone()
        for y in range(extent):
            ref.select(dim, y)[...] = (a.select(dim, a.shape[dim] - extent + y) * (1 - y / extent)
                                       + b.select(dim, y) * (y / extent))
        assert torch.equal(vae._blend(a, b, extent, dim), ref), (dim, extent)


def _ramp(e):
    return torch.arange(e, dtype=torch.float64) / e


def test_spatial_tiled_decode_assembles_official_blend():
    # tiny tiles: 8 latent (64 px), stride 6 latent, blend 16 px, keep 48 px. H'=6: one row of tiles;
    # W'=10: tiles [0,8) and [6,10)
    m = tiny()
    z = torch.randn(1, 4, 2, 6, 10)
    with torch.no_grad():
        out = m.decode(z, tiled=True).double()
        a, b = m.decode(z[..., 0:8]).double(), m.decode(z[..., 6:10]).double()
    y = _ramp(16)
    ref = torch.cat([a[..., :48], a[..., 48:64] * (1 - y) + b[..., :16] * y, b[..., 16:]], dim=-1)
    assert out.shape == (1, 3, 5, 48, 80)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


def test_temporal_tiled_decode_assembles_official_blend():
    # tiny: windows of 4+1 latent frames every 3, blend 4 frames, keep 12 (13 for the first window)
    m = tiny()
    z = torch.randn(1, 4, 6, 2, 3)
    with torch.no_grad():
        out = m.decode(z, tiled=True).double()
        a, b = m.decode(z[:, :, 0:5]).double(), m.decode(z[:, :, 3:6]).double()
    b = b[:, :, 1:]  # a later window's first (image) frame is dropped
    y = _ramp(4).view(-1, 1, 1)
    ref = torch.cat([a[:, :, :13], a[:, :, 13:17] * (1 - y) + b[:, :, :4] * y, b[:, :, 4:]], dim=2)
    assert out.shape == (1, 3, 21, 16, 24)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


def test_temporal_tiled_encode_assembles_official_blend():
    # tiny: windows of 16+1 frames every 12, latent blend 1, keep 3 (4 for the first window);
    # T=21 -> 6 latents
    m = tiny()
    x = video(1, 21, 16, 16)
    with torch.no_grad():
        mean, _ = m.encode(x, tiled=True)
        a, _ = m.encode(x[:, :, 0:17])
        b, _ = m.encode(x[:, :, 12:21])
    b = b[:, :, 1:]
    # a blend of 1 frame gives weight 0 to b's first frame
    ref = torch.cat([a[:, :, :4], a[:, :, 4:5], b[:, :, 1:]], dim=2)
    assert mean.shape == (1, 4, 6, 2, 2)
    torch.testing.assert_close(mean.double(), ref.double(), rtol=1e-6, atol=1e-6)


# -----------------------------------------------------------------------------
# the released layout, at full size on meta


def official_keys():
    """Keys and shapes of the released vae/pytorch_model.pt (official hyvideo/vae/vae.py Encoder/Decoder
    and autoencoder_kl_causal_3d.py quant convs), written out by hand, not read from the model."""
    keys = {}

    def conv(name, o, i, k):
        keys[f"{name}.conv.weight"], keys[f"{name}.conv.bias"] = (o, i, k, k, k), (o,)

    def norm(name, c):
        keys[f"{name}.weight"], keys[f"{name}.bias"] = (c,), (c,)

    def resnet(name, i, o):
        norm(f"{name}.norm1", i), conv(f"{name}.conv1", o, i, 3)
        norm(f"{name}.norm2", o), conv(f"{name}.conv2", o, o, 3)
        if i != o:
            conv(f"{name}.conv_shortcut", o, i, 1)

    def mid(name):
        resnet(f"{name}.resnets.0", 512, 512), resnet(f"{name}.resnets.1", 512, 512)
        norm(f"{name}.attentions.0.group_norm", 512)
        for p in ("to_q", "to_k", "to_v", "to_out.0"):
            keys[f"{name}.attentions.0.{p}.weight"] = (512, 512)
            keys[f"{name}.attentions.0.{p}.bias"] = (512,)

    conv("encoder.conv_in", 128, 3, 3)
    for i, (ci, co) in enumerate([(128, 128), (128, 256), (256, 512), (512, 512)]):
        for r in range(2):
            resnet(f"encoder.down_blocks.{i}.resnets.{r}", ci if r == 0 else co, co)
        if i < 3:
            conv(f"encoder.down_blocks.{i}.downsamplers.0.conv", co, co, 3)
    mid("encoder.mid_block")
    norm("encoder.conv_norm_out", 512), conv("encoder.conv_out", 32, 512, 3)
    keys["quant_conv.weight"], keys["quant_conv.bias"] = (32, 32, 1, 1, 1), (32,)
    keys["post_quant_conv.weight"], keys["post_quant_conv.bias"] = (16, 16, 1, 1, 1), (16,)
    conv("decoder.conv_in", 512, 16, 3)
    mid("decoder.mid_block")
    for i, (ci, co) in enumerate([(512, 512), (512, 512), (512, 256), (256, 128)]):
        for r in range(3):
            resnet(f"decoder.up_blocks.{i}.resnets.{r}", ci if r == 0 else co, co)
        if i < 3:
            conv(f"decoder.up_blocks.{i}.upsamplers.0.conv", co, co, 3)
    norm("decoder.conv_norm_out", 128), conv("decoder.conv_out", 3, 128, 3)
    return keys


def test_full_size_keys_shapes_and_parameter_count():
    with torch.device("meta"):
        m = vae.CausalVAE(vae.CONFIGS["884-16c-hy"])
    got = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    want = official_keys()
    assert sorted(set(want) - set(got)) == [] and sorted(set(got) - set(want)) == []
    assert got == want
    assert len(got) == 248
    assert sum(p.numel() for p in m.parameters()) == 246_478_803


def test_resample_layout_of_released_config():
    # official hyvideo/vae/vae.py: spatial in blocks 0-2, temporal in blocks 1-2, nothing in block 3
    assert vae._resample_factors(vae.CONFIGS["884-16c-hy"]) == [(1, 2, 2), (2, 2, 2), (2, 2, 2), None]


# -----------------------------------------------------------------------------
# loading


def test_load_vae_official_pt_safetensors_and_mismatch(tmp_path):
    m = tiny()
    sd = m.state_dict()
    cfg_json = {"block_out_channels": [16, 32, 32, 32], "layers_per_block": 1, "norm_num_groups": 8,
                "latent_channels": 4, "sample_size": 64, "sample_tsize": 16, "scaling_factor": 0.476986}
    # official layout: vae/pytorch_model.pt with a state_dict wrapper and a vae. prefix, plus config.json
    (tmp_path / "vae").mkdir()
    torch.save({"state_dict": {f"vae.{k}": v for k, v in sd.items()}}, tmp_path / "vae" / "pytorch_model.pt")
    (tmp_path / "vae" / "config.json").write_text(json.dumps(cfg_json))
    z = torch.randn(1, 4, 2, 2, 2)
    with torch.no_grad():
        ref = m.decode(z)
        assert torch.equal(vae.load_vae(tmp_path / "vae").decode(z), ref)
    # safetensors file with an explicit config
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "w.safetensors"))
    with torch.no_grad():
        assert torch.equal(vae.load_vae(tmp_path / "w.safetensors", cfg=m.cfg).decode(z), ref)
    # a mismatch is one clear line naming the keys, never a partial load
    bad = dict(sd)
    bad.pop("decoder.conv_out.conv.bias")
    bad["decoder.extra.weight"] = torch.zeros(1)
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(ValueError) as e:
        vae.load_vae(tmp_path / "bad.pt", cfg=m.cfg)
    msg = str(e.value)
    assert "\n" not in msg and "decoder.conv_out.conv.bias" in msg and "decoder.extra.weight" in msg
    assert "1 missing" in msg and "1 unexpected" in msg and "built from VAEConfig(" in msg  # and the fix
    # the tiny weights do not fit the released config
    with pytest.raises(ValueError, match=r"[1-9]\d* wrong shape"):
        vae.load_vae(tmp_path / "w.safetensors")


# -----------------------------------------------------------------------------
# training


def lpips_weights(path):
    """A random state dict in the layout of torchvision vgg16 `features` + LPIPS v0.1 `lin*` files."""
    torch.manual_seed(0)
    sd, c, i = {}, 3, 0
    for v in vae.LPIPS.CFG:
        if v == "M":
            i += 1
        else:
            sd[f"features.{i}.weight"] = torch.randn(v, c, 3, 3) * (2 / (9 * c)) ** 0.5
            sd[f"features.{i}.bias"] = torch.zeros(v)
            c, i = v, i + 2
    for k, ch in enumerate((64, 128, 256, 512, 512)):
        sd[f"lin{k}.model.1.weight"] = torch.rand(1, ch, 1, 1)
    sd["classifier.0.weight"] = torch.zeros(1)  # extra keys of the torchvision file are ignored
    torch.save(sd, path)
    return path


def test_losses_finite_with_gradients(tmp_path):
    m = tiny().train()
    loss_fn = vae.VAELoss(perceptual_weights=lpips_weights(tmp_path / "lpips.pt"), gan_start=0,
                          disc_channels=8, disc_layers=2)
    x = video(2, 5, 16, 16)
    recon, mean, logvar = m(x)
    total, logs = loss_fn(x, recon, mean, logvar, step=0)
    assert set(logs) == {"l1", "kl", "perceptual", "gan"}
    assert all(torch.isfinite(v) for v in logs.values()) and torch.isfinite(total)
    total.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
    assert all(p.grad is None for p in loss_fn.discriminator.parameters())  # the VAE step leaves D alone
    d = loss_fn.disc_loss(x, recon, step=0)
    d.backward()
    assert torch.isfinite(d) and all(p.grad is not None for p in loss_fn.discriminator.parameters())
    # KL against its closed form; LPIPS of identical images is 0
    kl = 0.5 * (mean.double() ** 2 + logvar.double().exp() - 1 - logvar.double()).sum() / 2 / x[0].numel()
    assert abs(logs["kl"].item() - kl.item()) < 1e-3 * kl.item()
    img = x[:, :, 0]
    assert loss_fn.lpips(img, img).abs().max() < 1e-6 and (loss_fn.lpips(img, -img) > 0).all()


def test_kl_is_weighed_per_pixel_as_the_recipes_eq1_reuses():
    """LDM's autoencoder loss and Open-Sora's HunyuanVideo-VAE config (eq. 1's weights) sum reconstruction
    and KL per sample; with our per-pixel L1 the KL is therefore the closed-form KL summed over a sample's
    latent elements, divided by its 3 T H W pixel elements (kl_sum=True: not divided, the demo's)."""
    import warnings
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 5, 16, 24, generator=g, dtype=torch.float64) * 2 - 1
    recon = x + 0.1 * torch.randn(x.shape, generator=g, dtype=torch.float64)
    mean = torch.randn(2, 4, 2, 2, 3, generator=g, dtype=torch.float64)
    logvar = torch.randn(2, 4, 2, 2, 3, generator=g, dtype=torch.float64)
    kl = torch.distributions.kl_divergence(torch.distributions.Normal(mean, (0.5 * logvar).exp()),
                                           torch.distributions.Normal(0.0, 1.0)).flatten(1).sum(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        per_pixel, summed = vae.VAELoss(gan_start=10**9), vae.VAELoss(gan_start=10**9, kl_sum=True)
    total, logs = per_pixel(x, recon, mean, logvar, 0)
    torch.testing.assert_close(logs["kl"], (kl / (3 * 5 * 16 * 24)).mean(), rtol=1e-12, atol=0)
    torch.testing.assert_close(total, (x - recon).abs().mean() + 1e-6 * logs["kl"], rtol=1e-12, atol=0)
    torch.testing.assert_close(summed(x, recon, mean, logvar, 0)[1]["kl"], kl.mean(), rtol=1e-12, atol=0)


def test_lpips_refuses_incomplete_or_misshaped_weights(tmp_path):
    # one line naming the bad key (dit.check_state_dict), never a partial load
    sd = torch.load(lpips_weights(tmp_path / "lpips.pt"), weights_only=True)
    incomplete = {k: v for k, v in sd.items() if k != "lin2.model.1.weight"}
    torch.save(incomplete, tmp_path / "incomplete.pt")
    with pytest.raises(ValueError, match=r"1 missing: lin2\.model\.1\.weight.*; pass torchvision"):
        vae.LPIPS(tmp_path / "incomplete.pt")
    torch.save({**sd, "features.0.weight": torch.zeros(64, 3, 1, 1)}, tmp_path / "misshaped.pt")
    with pytest.raises(ValueError, match=r"1 wrong shape: features\.0\.weight \(64, 3, 1, 1\)"):
        vae.LPIPS(tmp_path / "misshaped.pt")


def test_perceptual_off_is_announced_and_gan_waits_for_start():
    m = tiny()
    with pytest.warns(UserWarning, match="perceptual term .* is OFF"):
        loss_fn = vae.VAELoss(gan_start=10, disc_channels=8, disc_layers=2)
    x = video(1, 1, 16, 16)
    recon, mean, logvar = m(x)
    _, logs = loss_fn(x, recon, mean, logvar, step=9)
    assert set(logs) == {"l1", "kl"} and loss_fn.disc_loss(x, recon, step=9) == 0
    _, logs = loss_fn(x, recon, mean, logvar, step=10)
    assert "gan" in logs


def test_random_tiling_switch_trains_through_tiles(monkeypatch):
    monkeypatch.setattr(vae, "PLAIN_ELEMENTS", 0)
    m = tiny()
    x = video(1, 5, 16, 80)  # wider than the tiny 64 px tile
    torch.manual_seed(0)
    recon_t, mean_t, _ = m(x, sample_posterior=False, tile_prob=1.0)
    recon_u, mean_u, _ = m(x, sample_posterior=False, tile_prob=0.0)
    with torch.no_grad():
        assert rel(mean_t, m.encode(x, tiled=True)[0]) < 1e-5  # grad (plain) path vs no-grad (stream) path
        assert rel(recon_t, m.decode(mean_t, tiled=True)) < 1e-5
    assert not torch.allclose(recon_t, recon_u)
    recon_t.square().mean().backward()
    assert m.encoder.conv_in.conv.weight.grad is not None


def test_gradient_checkpointing_gives_same_gradients():
    m = tiny().train()
    x = video(1, 5, 16, 16)
    grads = []
    for ckpt in (False, True):
        m.zero_grad()
        m.encoder.gradient_checkpointing = m.decoder.gradient_checkpointing = ckpt
        recon, _, _ = m(x, sample_posterior=False)
        recon.square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
    assert rel(grads[1], grads[0]) < 1e-5


# -----------------------------------------------------------------------------
# memory of the stream path, counted on the meta device (no compute): every tensor storage created is
# counted until Python frees it


class _LiveBytes(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.live, self.now, self.peak = {}, 0, 0

    def _free(self, key):
        self.now -= self.live.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and id(t.untyped_storage()) not in self.live:
                st = t.untyped_storage()
                self.live[id(st)] = st.nbytes()
                self.now += st.nbytes()
                self.peak = max(self.peak, self.now)
                weakref.finalize(st, self._free, id(st))
        return out


def test_stream_decode_of_an_official_tile_stays_small():
    # released config, fp16, one official decode tile (17x32x32 latent -> 65x256x256 video)
    with torch.device("meta"):
        m = vae.CausalVAE(vae.CONFIGS["884-16c-hy"]).half().eval()
        z = torch.empty(1, 16, 17, 32, 32, dtype=torch.half)
    peaks = []
    for stream in (True, False):
        with torch.no_grad(), _LiveBytes() as mem:
            out = m.decoder.stream(z) if stream else m.decoder(z)
        assert out.shape == (1, 3, 65, 256, 256)
        peaks.append(mem.peak / 2**30)
    # the 256-channel 65x256x256 input of the last up block alone is 2 GB; the plain path holds ~7 GB
    assert peaks[0] < 3.8 and peaks[0] < 0.55 * peaks[1], peaks


@pytest.mark.skipif(not torch.cuda.is_available() or vae.triton is None, reason="needs CUDA and Triton")
def test_fused_stream_kernels_match_float64_and_the_torch_path(monkeypatch):
    # GroupNorm statistics over pieces that do not divide 4096, a non-contiguous destination with odd strides
    torch.manual_seed(0)
    norm = torch.nn.GroupNorm(4, 8, eps=1e-6).cuda()
    with torch.no_grad():
        norm.weight.normal_(), norm.bias.normal_()
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        x = (torch.randn(2, 8, 5, 37, 53, device="cuda") * 3 + 2).to(dtype)
        affine = vae._group_norm_affine(norm, x)
        dst = torch.empty(2, 8, 7, 41, 57, device="cuda", dtype=dtype)[:, :, 2:, 2:-2, 2:-2]
        vae._norm_silu_into(dst, x, affine)
        ref = F.silu(F.group_norm(x.double(), 4, norm.weight.double(), norm.bias.double(), 1e-6))
        assert rel(dst, ref) < (1e-6 if dtype == torch.float32 else 1e-2), dtype
    # whole decode and encode, fused vs torch element-wise code, stream path, fp32 (TF32 convs off: their
    # rounding of the two paths' 1e-7 differences would be amplified by the random decoder)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    m = tiny().cuda()
    x = video(2, 9, 32, 48).cuda()
    monkeypatch.setattr(vae, "PLAIN_ELEMENTS", 0)
    out = []
    for fused in (True, False):
        monkeypatch.setattr(vae, "FUSED_KERNELS", fused)
        with torch.no_grad():
            mean, _ = m.encode(x)
            out.append((mean, m.decode(mean)))
    errs = rel(out[0][0], out[1][0]), rel(out[0][1], out[1][1])  # (encode, decode)
    assert errs[0] < 1e-4 and errs[1] < 1e-4, errs


# -----------------------------------------------------------------------------
# cross-check against diffusers' implementation of the same network (test-only dependency)


def tiny_and_diffusers():
    """The tiny VAE and diffusers' AutoencoderKLHunyuanVideo holding the same weights."""
    diffusers = pytest.importorskip("diffusers")
    m = tiny()
    c = m.cfg
    ref = diffusers.AutoencoderKLHunyuanVideo(
        block_out_channels=c.block_out_channels, layers_per_block=c.layers_per_block,
        norm_num_groups=c.norm_groups, latent_channels=c.latent_channels).eval()
    ref.load_state_dict(m.state_dict(), strict=True)
    return m, ref


def test_matches_diffusers_untiled_and_loads_its_dir(tmp_path):
    m, ref = tiny_and_diffusers()
    c = m.cfg
    ref.use_framewise_encoding = ref.use_framewise_decoding = False  # untiled: diffusers' time tiles differ
    for T in (1, 9):
        x = video(1, T, 16, 24)
        with torch.no_grad():
            dist = ref.encode(x).latent_dist
            mean, logvar = m.encode(x)
            assert rel(mean, dist.mean) < 1e-4 and rel(logvar, dist.logvar) < 1e-4
            assert rel(m.decode(dist.mean), ref.decode(dist.mean).sample) < 1e-4
    ref.save_pretrained(tmp_path)  # config.json + diffusion_pytorch_model.safetensors
    loaded = vae.load_vae(tmp_path)
    assert loaded.cfg.block_out_channels == c.block_out_channels
    assert loaded.cfg.latent_channels == c.latent_channels
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), m.state_dict().values()))


def test_tiled_paths_match_diffusers_on_grids_of_tiles_in_several_windows():
    """Tiles in two dimensions inside each of three time windows (the last a short one), decode and
    encode, against diffusers' tiled paths set to the official windows (tiny: 64 px tiles every 48, 16
    frames every 12; diffusers' own defaults tile time in 16-frame windows where the official uses 64)."""
    m, ref = tiny_and_diffusers()
    ref.enable_tiling(tile_sample_min_height=64, tile_sample_min_width=64, tile_sample_stride_height=48,
                      tile_sample_stride_width=48, tile_sample_min_num_frames=16,
                      tile_sample_stride_num_frames=12)
    z = torch.randn(1, 4, 8, 10, 14, generator=torch.Generator().manual_seed(0))  # windows at 0, 3, 6
    x = video(1, 29, 72, 120)  # windows at frames 0, 12, 24
    with torch.no_grad():
        out, want = m.decode(z, tiled=True), ref.decode(z).sample
        mean, logvar = m.encode(x, tiled=True)
        dist = ref.encode(x).latent_dist
    assert out.shape == want.shape == (1, 3, 29, 80, 112) and rel(out, want) < 1e-5
    assert mean.shape == dist.mean.shape == (1, 4, 8, 9, 15)
    assert rel(mean, dist.mean) < 1e-5 and rel(logvar, dist.logvar) < 1e-5


def test_chroma_term_is_the_error_orthogonal_to_grey():
    with pytest.warns(UserWarning):  # no LPIPS weights: said once
        loss_fn = vae.VAELoss(gan_start=10**9, disc_channels=8, disc_layers=2, w_kl=0.0, w_chroma=2.0)
    x = torch.zeros(1, 3, 1, 4, 4, dtype=torch.float64)
    mean = logvar = torch.zeros(1, 4, 1, 1, 1, dtype=torch.float64)
    total, logs = loss_fn(x, x + 0.3, mean, logvar, 0)  # a grey error: no colour part
    assert logs["chroma"].item() == pytest.approx(0.0, abs=1e-15) and total.item() == pytest.approx(0.3)
    err = torch.tensor([0.6, 0.0, 0.0], dtype=torch.float64).view(1, 3, 1, 1, 1).expand(1, 3, 1, 4, 4)
    _, logs = loss_fn(x, x - err, mean, logvar, 0)  # (0.6, 0, 0) = grey 0.2 + colour (0.4, -0.2, -0.2)
    assert logs["chroma"].item() == pytest.approx((0.4**2 + 0.2**2 + 0.2**2) / 3)


def test_latent_rgb_term_is_each_cells_mean_colour():
    """Latent channels 0-2 against the mean RGB of the pixels each latent cell covers: frame 0 alone, then
    groups of 4 frames, 8x8 pixels (checked against a direct loop)."""
    with pytest.warns(UserWarning):
        loss_fn = vae.VAELoss(gan_start=10**9, disc_channels=8, disc_layers=2, w_kl=0.0, w_latent_rgb=1.0)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 9, 16, 24, generator=g, dtype=torch.float64) * 2 - 1
    mean = torch.randn(2, 5, 3, 2, 3, generator=g, dtype=torch.float64)
    cells = torch.zeros(2, 3, 3, 2, 3, dtype=torch.float64)
    for t, frames in enumerate([[0], [1, 2, 3, 4], [5, 6, 7, 8]]):
        for i in range(2):
            for j in range(3):
                cells[:, :, t, i, j] = x[:, :, frames, 8 * i:8 * i + 8, 8 * j:8 * j + 8].mean((2, 3, 4))
    _, logs = loss_fn(x, x, mean, torch.zeros_like(mean), 0)
    assert logs["latent_rgb"].item() == pytest.approx((mean[:, :3] - cells).square().mean().item(), rel=1e-12)
    mean[:, :3] = cells
    total, logs = loss_fn(x, x, mean, torch.zeros_like(mean), 0)
    assert logs["latent_rgb"].item() == pytest.approx(0.0, abs=1e-15)
    assert total.item() == pytest.approx(0.0, abs=1e-15)
    still = x[:, :, :1]  # an image: one cell per 8x8 block of its only frame
    _, logs = loss_fn(still, still, mean[:, :, :1], torch.zeros_like(mean[:, :, :1]), 0)
    want = (mean[:, :3, :1] - cells[:, :, :1]).square().mean().item()
    assert logs["latent_rgb"].item() == pytest.approx(want, abs=1e-15)
