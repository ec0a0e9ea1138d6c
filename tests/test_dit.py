"""dit.py against an independent float64 reference written from the official model's equations (official
hyvideo/modules/models.py, paper §4.2), against diffusers' HunyuanVideoTransformer3DModel, plus the
invariants a reader relies on: padding invariance, RoPE algebra, checkpointing, loading, key layout."""

import math
import os
import re

import pytest
import torch
import torch.nn.functional as F

import dit

TINY = dit.DiTConfig(hidden_size=64, num_heads=2, depth_double=2, depth_single=2, text_dim=32, pooled_dim=24,
                     rope_axes=(8, 12, 12))


def random_model(cfg=TINY, seed=0, std=0.1):
    """The official init zeroes every modulation (blocks start as identity), which would make most checks
    vacuous: draw every weight at random instead."""
    torch.manual_seed(seed)
    model = dit.HunyuanVideoDiT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, std)
    return model


def inputs(cfg=TINY, B=2, T=3, H=4, W=6, L=7, lens=(7, 3), seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, cfg.in_channels, T, H, W, generator=g)
    t = torch.rand(B, generator=g) * 1000
    text = torch.randn(B, L, cfg.text_dim, generator=g)
    mask = (torch.arange(L)[None] < torch.tensor(lens)[:, None]).long()
    pooled = torch.randn(B, cfg.pooled_dim, generator=g)
    guidance = torch.full((B,), 6016.0)
    return x, t, text, mask, pooled, guidance


# ---------------------------------------------------------------------------------------------------------
# Independent float64 reference: the official model's equations written out with dense masks, no code
# shared with dit.py

def ref_forward(sd, cfg, x, t, text, mask, pooled, guidance):
    sd = {k: v.double() for k, v in sd.items()}
    x, text, pooled = x.double(), text.double(), pooled.double()
    D, nh = cfg.hidden_size, cfg.num_heads
    hd = D // nh
    lin = lambda h, name: h @ sd[name + ".weight"].T + sd.get(name + ".bias", 0)
    silu, ln = F.silu, lambda h: F.layer_norm(h, h.shape[-1:], eps=1e-6)
    gelu = lambda h: 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h ** 3)))

    def sinus(v):  # 256-d, cos first, max period 10000
        f = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float64) / 128)
        a = v.double()[:, None] * f
        return torch.cat([a.cos(), a.sin()], 1)

    def temb(v, name):
        return lin(silu(lin(sinus(v), name + ".mlp.0")), name + ".mlp.2")

    def rms(h, name):
        return h / torch.sqrt((h * h).mean(-1, keepdim=True) + 1e-6) * sd[name + ".weight"]

    def attend(q, k, v, allowed):  # q,k,v (L, nh, hd); allowed (L, L) bool
        s = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(hd)
        s = s.masked_fill(~allowed, float("-inf"))
        return torch.einsum("hqk,khd->qhd", s.softmax(-1), v).reshape(q.shape[0], -1)

    B, C, T, H, W = x.shape
    pt, ph, pw = cfg.patch_size
    tt, th, tw = T // pt, H // ph, W // pw
    n_img = tt * th * tw
    # RoPE angle table from the formula: per axis, frequency theta^(-2k/m) for pairs (2k, 2k+1)
    pos = [(i, j, l) for i in range(tt) for j in range(th) for l in range(tw)]
    ang = torch.zeros(n_img, hd // 2, dtype=torch.float64)
    col = 0
    for ax, m in enumerate(cfg.rope_axes):
        for k in range(m // 2):
            for r, p in enumerate(pos):
                ang[r, col] = p[ax] * cfg.rope_theta ** (-2 * k / m)
            col += 1

    def rope(h):  # (n_img, nh, hd): rotate each adjacent pair by its angle
        z = torch.view_as_complex(h.reshape(n_img, nh, hd // 2, 2).contiguous())
        return torch.view_as_real(z * torch.polar(torch.ones_like(ang), ang)[:, None]).reshape(n_img, nh, hd)

    outs = []
    for b in range(B):
        n = int(mask[b].sum())
        L = text.shape[1]
        vec = temb(t[b:b + 1], "time_in")
        vec = vec + lin(silu(lin(pooled[b:b + 1], "vector_in.in_layer")), "vector_in.out_layer")
        if cfg.guidance_embed:
            vec = vec + temb(guidance[b:b + 1], "guidance_in")
        # patch embedding as an explicit matmul over (c, pt, ph, pw) patches, tokens t-major then h then w
        w = sd["img_in.proj.weight"].reshape(D, -1)
        patches = x[b].reshape(C, tt, pt, th, ph, tw, pw).permute(1, 3, 5, 0, 2, 4, 6).reshape(n_img, -1)
        img = patches @ w.T + sd["img_in.proj.bias"]
        # token refiner
        pre = "txt_in."
        pooled_text = text[b, :n].mean(0, keepdim=True)
        c = temb(t[b:b + 1], pre + "t_embedder")
        c = c + lin(silu(lin(pooled_text, pre + "c_embedder.linear_1")), pre + "c_embedder.linear_2")
        txt = lin(text[b], pre + "input_embedder")
        valid = torch.arange(L) < n
        allowed = valid[:, None] & valid[None, :]
        allowed[:, 0] = True  # key 0 forced visible
        for r in range(cfg.refiner_depth):
            p = f"{pre}individual_token_refiner.blocks.{r}."
            g1, g2 = lin(silu(c), p + "adaLN_modulation.1").chunk(2, -1)
            h = F.layer_norm(txt, (D,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], 1e-6)
            q, k, v = lin(h, p + "self_attn_qkv").reshape(L, 3, nh, hd).unbind(1)
            txt = txt + g1 * lin(attend(q, k, v, allowed), p + "self_attn_proj")
            h = F.layer_norm(txt, (D,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], 1e-6)
            txt = txt + g2 * lin(silu(lin(h, p + "mlp.fc1")), p + "mlp.fc2")
        # varlen segments: [image + valid text] and [padding text], blind to each other
        seg = torch.arange(n_img + L) < n_img + n
        allowed = seg[:, None] == seg[None, :]
        for i in range(cfg.depth_double):
            p = f"double_blocks.{i}."
            qs, ks, vs, mods = [], [], [], {}
            for s, h0 in (("img", img), ("txt", txt)):
                mods[s] = lin(silu(vec), p + s + "_mod.linear").chunk(6, -1)
                h = ln(h0) * (1 + mods[s][1]) + mods[s][0]
                q, k, v = lin(h, p + s + "_attn_qkv").reshape(-1, 3, nh, hd).unbind(1)
                q, k = rms(q, p + s + "_attn_q_norm"), rms(k, p + s + "_attn_k_norm")
                if s == "img":
                    q, k = rope(q), rope(k)
                qs.append(q), ks.append(k), vs.append(v)
            a = attend(torch.cat(qs), torch.cat(ks), torch.cat(vs), allowed)
            new = []
            for s, h0, a_s in (("img", img, a[:n_img]), ("txt", txt, a[n_img:])):
                sh1, sc1, g1, sh2, sc2, g2 = mods[s]
                h0 = h0 + g1 * lin(a_s, p + s + "_attn_proj")
                h = ln(h0) * (1 + sc2) + sh2
                new.append(h0 + g2 * lin(gelu(lin(h, p + s + "_mlp.fc1")), p + s + "_mlp.fc2"))
            img, txt = new
        xs = torch.cat([img, txt])
        for i in range(cfg.depth_single):
            p = f"single_blocks.{i}."
            sh, sc, g = lin(silu(vec), p + "modulation.linear").chunk(3, -1)
            h = lin(ln(xs) * (1 + sc) + sh, p + "linear1")
            q, k, v = h[:, :3 * D].reshape(-1, 3, nh, hd).unbind(1)
            q, k = rms(q, p + "q_norm"), rms(k, p + "k_norm")
            q = torch.cat([rope(q[:n_img]), q[n_img:]])
            k = torch.cat([rope(k[:n_img]), k[n_img:]])
            a = attend(q, k, v, allowed)
            xs = xs + g * lin(torch.cat([a, gelu(h[:, 3 * D:])], -1), p + "linear2")
        sh, sc = lin(silu(vec), "final_layer.adaLN_modulation.1").chunk(2, -1)
        o = lin(ln(xs[:n_img]) * (1 + sc) + sh, "final_layer.linear")  # (n_img, c*pt*ph*pw)
        o = o.reshape(tt, th, tw, cfg.out_channels, pt, ph, pw).permute(3, 0, 4, 1, 5, 2, 6)
        outs.append(o.reshape(cfg.out_channels, T, H, W))
    return torch.stack(outs)


@pytest.fixture(params=["dense-mask", "split"])
def attention_path(request, monkeypatch):
    """Both ways dit.attention handles padding: one masked call (short sequences) or a call per segment."""
    if request.param == "split":
        monkeypatch.setattr(dit, "_DENSE_MASK_MAX", 0)
    return request.param


@pytest.mark.parametrize("shape,lens", [((3, 4, 6), (7, 3)), ((1, 4, 4), (2, 7)), ((2, 2, 4), (7, 7))])
def test_matches_float64_reference(shape, lens, attention_path):
    model = random_model().double()
    x, t, text, mask, pooled, g = inputs(T=shape[0], H=shape[1], W=shape[2], lens=lens)
    with torch.no_grad():
        got = model(x.double(), t, text.double(), mask, pooled.double(), g)
    ref = ref_forward(model.state_dict(), TINY, x, t, text, mask, pooled, g)
    assert got.shape == x.shape
    assert ((got - ref).norm() / ref.norm()).item() < 1e-10


def test_reference_without_guidance_and_bigger_patch():
    cfg = dit.replace(TINY, guidance_embed=False, qkv_bias=False, patch_size=(2, 2, 2), in_channels=4,
                      out_channels=8)
    model = random_model(cfg).double()
    x, t, text, mask, pooled, _ = inputs(cfg, T=4, lens=(5, 2))
    with torch.no_grad():
        got = model(x.double(), t, text.double(), mask, pooled.double())
    ref = ref_forward(model.state_dict(), cfg, x, t, text, mask, pooled, None)
    assert got.shape == (2, 8, 4, 4, 6)
    assert ((got - ref).norm() / ref.norm()).item() < 1e-10


def test_fp32_close_to_float64():
    model = random_model()
    x, t, text, mask, pooled, g = inputs()
    # Timesteps near 1000 (and guidance 6016) put the fp32 sinusoid's argument error at ~1e-4 rad, as in the
    # official fp32 embedder; small timesteps isolate the rest of the fp32 arithmetic.
    for scale, tol in ((1.0, 2e-4), (1e-3, 2e-6)):
        with torch.no_grad():
            got = model(x, t * scale, text, mask, pooled, g * scale)
        ref = ref_forward(model.state_dict(), TINY, x, t * scale, text, mask, pooled, g * scale)
        assert ((got.double() - ref).norm() / ref.norm()).item() < tol


# ---------------------------------------------------------------------------------------------------------
# Invariants

def test_padding_invariance(attention_path):
    """More padded text tokens, whatever they contain, leave every output unchanged."""
    model = random_model()
    x, t, text, mask, pooled, g = inputs(L=5, lens=(5, 2))
    extra = 9
    text2 = torch.cat([text, 100 * torch.randn(2, extra, TINY.text_dim)], 1)
    text2[1, 2:] = 50 * torch.randn_like(text2[1, 2:])  # garbage where sample 1 is padded
    mask2 = F.pad(mask, (0, extra))
    with torch.no_grad():
        a = model(x, t, text, mask, pooled, g)
        b = model(x, t, text2, mask2, pooled, g)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_batch_elements_independent():
    model = random_model()
    x, t, text, mask, pooled, g = inputs(lens=(7, 3))
    with torch.no_grad():
        both = model(x, t, text, mask, pooled, g)
        one = model(x[1:], t[1:], text[1:], mask[1:], pooled[1:], g[1:])
    torch.testing.assert_close(both[1:], one, rtol=1e-5, atol=1e-5)


def test_attention_segments_match_dense_mask(attention_path):
    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 10, 2, 8, dtype=torch.float64) for _ in range(3))
    seg = [10, 6, 1]
    got = dit.attention(q, k, v, seg)
    for b, n in enumerate(seg):
        inside = torch.arange(10) < n
        allowed = inside[:, None] == inside[None, :]
        s = torch.einsum("qhd,khd->hqk", q[b], k[b]) / math.sqrt(8)
        p = s.masked_fill(~allowed, -math.inf).softmax(-1)
        ref = torch.einsum("hqk,khd->qhd", p, v[b]).reshape(10, -1)
        torch.testing.assert_close(got[b], ref)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kernel", [False, True], ids=["sdpa-cudnn", "attention_cuda"])
def test_attention_on_gpu_in_training_matches_float64(kernel, monkeypatch):
    """The GPU paths of dit.attention as training runs them: bf16 autocast, q and k in fp32 (they leave the
    fp32 RMSNorm/RoPE) and v in bf16. Default: cuDNN through SDPA per segment (gradients flow: cuDNN's
    backward is the faster); ATTENTION_CUDA=1: our kernel.
    Output rows and gradients within 1e-2 of float64. Padded query rows get a zero upstream gradient, as in
    the model (no output ever reads them), so both semantics for them give the same gradients."""
    import attention_cuda
    if kernel:
        assert attention_cuda.kernel_available(), "CUDA is here, so the extension must build"
    monkeypatch.setattr(dit, "KERNEL_CHOICE", "1" if kernel else None)
    monkeypatch.setattr(dit, "_DENSE_MASK_MAX", 0)  # the per-segment cuDNN calls that long sequences take
    B, L, H, D, seg = 2, 1100, 4, 128, [1100 - 30, 1100 - 71]
    g = torch.Generator("cuda").manual_seed(3)
    q, k = (torch.randn(B, L, H, D, device="cuda", generator=g).requires_grad_() for _ in range(2))
    v = torch.randn(B, L, H, D, device="cuda", generator=g).bfloat16().requires_grad_()
    go = torch.randn(B, L, H * D, device="cuda", generator=g)
    for b, n in enumerate(seg):
        go[b, n:] = 0
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = dit.attention(q, k, v, seg)
    grads = torch.autograd.grad((out.float() * go).sum(), (q, k, v))

    ref_in = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref = torch.zeros(B, L, H * D, dtype=torch.float64, device="cuda")
    for b, n in enumerate(seg):  # the valid segment, written out (padded rows: zero, their go is zero)
        s = torch.einsum("qhd,khd->hqk", ref_in[0][b, :n], ref_in[1][b, :n]) / math.sqrt(D)
        ref[b, :n] = torch.einsum("hqk,khd->qhd", s.softmax(-1), ref_in[2][b, :n]).reshape(n, -1)
    ref_grads = torch.autograd.grad((ref * go.double()).sum(), ref_in)
    rel = lambda x, r: ((x.double() - r).norm() / r.norm()).item()
    valid = torch.stack([torch.arange(L, device="cuda") < n for n in seg])
    assert rel(out[valid], ref[valid]) < 1e-2
    for name, x, r in zip("qkv", grads, ref_grads):
        assert torch.isfinite(x).all() and rel(x, r) < 1e-2, f"d{name}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_attention_on_gpu_in_sampling_takes_the_kernel_on_hopper(monkeypatch):
    """Without gradients (sampling) the default dispatch takes our kernel on compute capability 9.0 (its
    forward is the fastest measured there) and cuDNN elsewhere; valid rows within 1e-2 of float64 either
    way."""
    import attention_cuda
    monkeypatch.setattr(dit, "KERNEL_CHOICE", None)
    B, L, H, D, seg = 2, 700, 4, 128, [700 - 30, 700 - 71]
    g = torch.Generator("cuda").manual_seed(4)
    q, k, v = (torch.randn(B, L, H, D, device="cuda", generator=g).bfloat16() for _ in range(3))
    hopper = torch.cuda.get_device_capability() == (9, 0)
    assert dit._use_kernel(q, k, v) == (hopper and attention_cuda.kernel_available())
    assert not dit._use_kernel(q.requires_grad_(), k, v)  # gradients flow: cuDNN
    with torch.no_grad():
        assert dit._use_kernel(q, k, v) == (hopper and attention_cuda.kernel_available())
        out = dit.attention(q, k, v, seg)
    if hopper:
        assert attention_cuda.last_kernels()[0] == "2.1 ws"
    for b, n in enumerate(seg):
        qq, kk, vv = (x[b, :n].double() for x in (q, k, v))
        s = torch.einsum("qhd,khd->hqk", qq, kk) / math.sqrt(D)
        ref = torch.einsum("hqk,khd->qhd", s.softmax(-1), vv).reshape(n, -1)
        assert ((out[b, :n].double() - ref).norm() / ref.norm()).item() < 1e-2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_model_on_gpu_with_the_kernel_matches_float64_as_well_as_cudnn(monkeypatch):
    """The whole DiT (refiner, double and single blocks) at head_dim 128 on the GPU under bf16 autocast,
    sampling-style (no gradients), padded text: through the default dispatch (our kernel on Hopper, whose
    padded text rows attend to the valid keys instead of each other) it is as close to the float64 reference
    as the cuDNN per-segment path is; the padded rows never reach the output."""
    import attention_cuda
    cfg = dit.replace(TINY, hidden_size=256, num_heads=2, rope_axes=(16, 56, 56))
    model = random_model(cfg, std=0.03)
    x, t, text, mask, pooled, g = inputs(cfg, lens=(7, 3))
    ref = ref_forward(model.state_dict(), cfg, x, t, text, mask, pooled, g)
    model = model.cuda()
    errs = {}
    for choice in (None, "0"):
        monkeypatch.setattr(dit, "KERNEL_CHOICE", choice)
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            got = model(*(a.cuda() for a in (x, t, text, mask, pooled, g)))
        errs[choice] = ((got.double().cpu() - ref).norm() / ref.norm()).item()
        if choice is None and torch.cuda.get_device_capability() == (9, 0):
            assert attention_cuda.last_kernels()[0] == "2.1 ws"
    assert errs[None] < 3e-2 and errs[None] <= 1.5 * errs["0"] + 1e-3, errs


@pytest.mark.parametrize("choice, cap, dtype, head_dim, grad, want", [
    (None, (9, 0), torch.bfloat16, 128, False, True),    # sampling on Hopper: our kernel
    (None, (9, 0), torch.float16, 64, False, True),
    (None, (9, 0), torch.bfloat16, 128, True, False),    # gradients flow: cuDNN (its backward is faster)
    (None, (8, 0), torch.bfloat16, 128, False, False),   # not Hopper: cuDNN
    (None, (9, 0), torch.float32, 128, False, False),    # a dtype the kernel does not run
    (None, (9, 0), torch.bfloat16, 96, False, False),    # a head size the kernel does not run
    ("1", (8, 0), torch.bfloat16, 128, True, True),      # ATTENTION_CUDA=1: everywhere it runs
    ("1", (9, 0), torch.float32, 128, False, False),
    ("0", (9, 0), torch.bfloat16, 128, False, False),    # ATTENTION_CUDA=0: never
])
def test_attention_dispatch_policy(monkeypatch, choice, cap, dtype, head_dim, grad, want):
    """dit._use_kernel's rule, on stand-ins for CUDA tensors (the GPU tests above run the real thing)."""
    from types import SimpleNamespace
    monkeypatch.setattr(dit, "KERNEL_CHOICE", choice)
    monkeypatch.setattr(dit, "fused_attention", lambda *a, **k: None)
    monkeypatch.setattr(dit, "kernel_available", lambda: True)
    monkeypatch.setattr(dit, "KERNEL_HEAD_DIMS", (64, 128))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cap)
    x = SimpleNamespace(is_cuda=True, dtype=dtype, shape=(1, 8, 2, head_dim), requires_grad=grad,
                        device="cuda")
    assert dit._use_kernel(x, x, x) == want
    q = torch.randn(1, 8, 2, 128, dtype=torch.bfloat16)  # CPU tensors: never
    assert not dit._use_kernel(q, q, q)


def test_compiled_blocks_match_eager_and_do_not_recompile_for_new_text_lengths():
    """compile_blocks (train.py --compile) computes the same function and gradients; a batch with other text
    lengths reuses the compiled graphs (attention, which branches on them, is a graph break)."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    model = random_model()
    x, t, text, mask, pooled, g = inputs(lens=(7, 3))
    ref = model(x, t, text, mask, pooled, g)
    ref_grads = torch.autograd.grad(ref.square().sum(), list(model.parameters()))
    model.compile_blocks()
    out = model(x, t, text, mask, pooled, g)
    grads = torch.autograd.grad(out.square().sum(), list(model.parameters()))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs > 0  # it really compiled
    model(x, t, text, (torch.arange(7) < torch.tensor([[5], [6]])).long(), pooled, g).sum().backward()
    assert counters["stats"]["unique_graphs"] == graphs


def test_timestep_frequencies_are_computed_on_the_cpu_as_the_official(monkeypatch):
    """Official embed_layers.py takes exp of the 128 frequencies on the CPU, then moves them to t's device:
    another device's exp may round them differently. On a meta-device t (standing in for a GPU) every exp of
    the embedding must still run on the CPU, and the values equal exp in float64 rounded to fp32 within an
    ulp."""
    import math
    seen, exp = [], torch.exp
    monkeypatch.setattr(torch, "exp", lambda x, *a, **k: seen.append(x.device.type) or exp(x, *a, **k))
    emb = dit.timestep_embedding(torch.zeros(3, device="meta"))
    assert emb.device.type == "meta" and emb.shape == (3, 256) and seen == ["cpu"]
    monkeypatch.setattr(torch, "exp", exp)
    t = torch.tensor([1000.0])
    freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float64) / 128)
    ref = torch.cat([torch.cos(t.double()[:, None] * freqs), torch.sin(t.double()[:, None] * freqs)], -1)
    assert (dit.timestep_embedding(t).double() - ref).abs().max() < 1e-4  # fp32 args of up to 1000


def test_rope_is_a_relative_rotation():
    axes, theta = (8, 12, 12), 256.0
    cos, sin = dit.rope_tables((5, 6, 7), axes, theta)
    torch.manual_seed(0)
    q, k = torch.randn(2, 1, 1, 32, dtype=torch.float64).unbind(0)
    grid = torch.arange(5 * 6 * 7).reshape(5, 6, 7)

    def rot(x, idx):
        rotated = dit.apply_rope(x.expand(1, 1, 1, 32).float(), cos[idx:idx + 1], sin[idx:idx + 1])
        return rotated.double().flatten()

    # a rotation: norms are preserved
    for idx in (0, 17, 209):
        assert abs(rot(q, idx).norm() - q.float().double().norm()) < 1e-5
    # relative: q.k depends only on the position difference, along every axis
    for (a, b), shift in [(((0, 1, 2), (1, 3, 0)), (2, 1, 3)), (((4, 0, 6), (0, 5, 1)), (0, 0, 0))]:
        base = rot(q, grid[a]) @ rot(k, grid[b])
        a2 = tuple(x - s if x - s >= 0 else x for x, s in zip(a, shift))
        d = [x2 - x for x, x2 in zip(a, a2)]
        b2 = tuple(y + dd for y, dd in zip(b, d))
        if all(0 <= y < n for y, n in zip(b2, (5, 6, 7))):
            assert abs(rot(q, grid[a2]) @ rot(k, grid[b2]) - base) < 1e-4
    # and the angle of pair j at position p is p * theta^(-2k/m) (direct formula, height axis, k=2)
    p = (0, 3, 0)
    j = axes[0] // 2 + 2
    angle = math.atan2(sin[grid[p], 2 * j].item(), cos[grid[p], 2 * j].item())
    assert abs(angle - 3 * theta ** (-4 / 12)) < 1e-5


def test_image_and_video_shapes_and_validation():
    model = random_model()
    for T, H, W in [(1, 4, 4), (5, 2, 8)]:
        x, t, text, mask, pooled, g = inputs(T=T, H=H, W=W)
        with torch.no_grad():
            assert model(x, t, text, mask, pooled, g).shape == x.shape
    x, t, text, mask, pooled, g = inputs()
    with pytest.raises(ValueError, match="divisible by the patch"):
        model(x[..., :3], t, text, mask, pooled, g)
    with pytest.raises(ValueError, match="right-padded"):
        model(x, t, text, mask.flip(1), pooled, g)
    with pytest.raises(ValueError, match="guidance"):
        model(x, t, text, mask, pooled, None)


def test_gradient_checkpointing_same_gradients(attention_path):
    model = random_model().double()
    x, t, text, mask, pooled, g = inputs()
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = ckpt
        model(x.double(), t, text.double(), mask, pooled.double(), g).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-10, atol=1e-12, msg=n)


def test_bf16_close_to_fp32():
    model = random_model(std=0.05)
    x, t, text, mask, pooled, g = inputs()
    with torch.no_grad():
        ref = model(x, t, text, mask, pooled, g)
        got = model.to(torch.bfloat16)(x, t, text, mask, pooled, g.bfloat16())
    assert got.dtype == torch.bfloat16
    assert ((got.float() - ref).norm() / ref.norm()).item() < 3e-2


# ---------------------------------------------------------------------------------------------------------
# The 13B layout (paper Table 2; the official checkpoint's keys), written by hand, not generated from the
# model

FIXTURE = {
    "img_in.proj.weight": (3072, 16, 1, 2, 2), "img_in.proj.bias": (3072,),
    "time_in.mlp.0.weight": (3072, 256), "time_in.mlp.0.bias": (3072,),
    "time_in.mlp.2.weight": (3072, 3072), "time_in.mlp.2.bias": (3072,),
    "vector_in.in_layer.weight": (3072, 768), "vector_in.in_layer.bias": (3072,),
    "vector_in.out_layer.weight": (3072, 3072), "vector_in.out_layer.bias": (3072,),
    "guidance_in.mlp.0.weight": (3072, 256), "guidance_in.mlp.0.bias": (3072,),
    "guidance_in.mlp.2.weight": (3072, 3072), "guidance_in.mlp.2.bias": (3072,),
    "final_layer.linear.weight": (64, 3072), "final_layer.linear.bias": (64,),
    "final_layer.adaLN_modulation.1.weight": (6144, 3072), "final_layer.adaLN_modulation.1.bias": (6144,),
    "txt_in.input_embedder.weight": (3072, 4096), "txt_in.input_embedder.bias": (3072,),
    "txt_in.t_embedder.mlp.0.weight": (3072, 256), "txt_in.t_embedder.mlp.0.bias": (3072,),
    "txt_in.t_embedder.mlp.2.weight": (3072, 3072), "txt_in.t_embedder.mlp.2.bias": (3072,),
    "txt_in.c_embedder.linear_1.weight": (3072, 4096), "txt_in.c_embedder.linear_1.bias": (3072,),
    "txt_in.c_embedder.linear_2.weight": (3072, 3072), "txt_in.c_embedder.linear_2.bias": (3072,),
}
REFINER = {"norm1.weight": (3072,), "norm1.bias": (3072,), "self_attn_qkv.weight": (9216, 3072),
           "self_attn_qkv.bias": (9216,), "self_attn_proj.weight": (3072, 3072),
           "self_attn_proj.bias": (3072,), "norm2.weight": (3072,), "norm2.bias": (3072,),
           "mlp.fc1.weight": (12288, 3072), "mlp.fc1.bias": (12288,), "mlp.fc2.weight": (3072, 12288),
           "mlp.fc2.bias": (3072,), "adaLN_modulation.1.weight": (6144, 3072),
           "adaLN_modulation.1.bias": (6144,)}
DOUBLE = {"_mod.linear.weight": (18432, 3072), "_mod.linear.bias": (18432,), "_attn_qkv.weight": (9216, 3072),
          "_attn_qkv.bias": (9216,), "_attn_q_norm.weight": (128,), "_attn_k_norm.weight": (128,),
          "_attn_proj.weight": (3072, 3072), "_attn_proj.bias": (3072,), "_mlp.fc1.weight": (12288, 3072),
          "_mlp.fc1.bias": (12288,), "_mlp.fc2.weight": (3072, 12288), "_mlp.fc2.bias": (3072,)}
SINGLE = {"linear1.weight": (21504, 3072), "linear1.bias": (21504,), "linear2.weight": (3072, 15360),
          "linear2.bias": (3072,), "q_norm.weight": (128,), "k_norm.weight": (128,),
          "modulation.linear.weight": (9216, 3072), "modulation.linear.bias": (9216,)}
for r in range(2):
    FIXTURE.update({f"txt_in.individual_token_refiner.blocks.{r}.{k}": s for k, s in REFINER.items()})
for n in range(20):
    FIXTURE.update({f"double_blocks.{n}.{s}{k}": v for s in ("img", "txt") for k, v in DOUBLE.items()})
for m in range(40):
    FIXTURE.update({f"single_blocks.{m}.{k}": v for k, v in SINGLE.items()})


def test_13b_on_meta_has_the_official_layout():
    with torch.device("meta"):
        model = dit.HunyuanVideoDiT(dit.CONFIGS["13b"])
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert len(FIXTURE) == 856
    assert got == FIXTURE
    assert dit.num_params(model) == sum(math.prod(s) for s in FIXTURE.values()) == 12_821_012_544
    meta_sd = {k: torch.empty(s, device="meta") for k, s in FIXTURE.items()}
    model.load_state_dict(meta_sd, strict=True, assign=True)


def test_diffusers_conversion_round_trip_and_names():
    sd = random_model().state_dict()
    conv = dit.official_to_diffusers(sd)
    back = dit.diffusers_to_official(conv)
    assert set(back) == set(sd)
    for k in sd:
        assert torch.equal(back[k], sd[k]), k
    # a few of diffusers' names and transforms, by hand
    D = TINY.hidden_size
    assert torch.equal(conv["transformer_blocks.1.attn.add_k_proj.weight"],
                       sd["double_blocks.1.txt_attn_qkv.weight"][D:2 * D])
    assert torch.equal(conv["single_transformer_blocks.0.proj_mlp.bias"],
                       sd["single_blocks.0.linear1.bias"][3 * D:])
    assert torch.equal(conv["norm_out.linear.weight"][:D],  # scale first
                       sd["final_layer.adaLN_modulation.1.weight"][D:])
    assert torch.equal(conv["context_embedder.token_refiner.refiner_blocks.0.ff.net.2.weight"],
                       sd["txt_in.individual_token_refiner.blocks.0.mlp.fc2.weight"])
    assert "transformer_blocks.0.attn.norm_added_q.weight" in conv and "x_embedder.proj.weight" in conv
    assert not any(re.match(r"(double|single)_blocks|txt_in|final_layer", k) for k in conv)


def test_matches_diffusers_transformer():
    diffusers = pytest.importorskip("diffusers")
    cfg = TINY
    ref = diffusers.HunyuanVideoTransformer3DModel(
        in_channels=16, out_channels=16, num_attention_heads=2, attention_head_dim=32, num_layers=2,
        num_single_layers=2, num_refiner_layers=2, text_embed_dim=32, pooled_projection_dim=24,
        rope_axes_dim=(8, 12, 12))
    ours = random_model(cfg)
    ref.load_state_dict(dit.official_to_diffusers(ours.state_dict()), strict=True)
    x, t, text, mask, pooled, g = inputs(lens=(7, 4))
    with torch.no_grad():
        want = ref(x, t, text, mask, pooled, guidance=g, return_dict=False)[0]
        got = ours(x, t, text, mask, pooled, g)
    assert ((got - want).norm() / want.norm()).item() < 1e-4


# ---------------------------------------------------------------------------------------------------------
# Loading

def test_load_dit_formats(tmp_path):
    model = random_model()
    sd = model.state_dict()
    x, t, text, mask, pooled, g = inputs()
    with torch.no_grad():
        want = model(x, t, text, mask, pooled, g)

    # the official DeepSpeed layout
    torch.save({"module": sd, "ema": {}}, tmp_path / "mp_rank_00_model_states.pt")
    dit.save_dit(model, str(tmp_path / "ours.safetensors"))
    from safetensors.torch import save_file
    conv = {k: v.contiguous() for k, v in dit.official_to_diffusers(sd).items()}
    keys = sorted(conv)
    (tmp_path / "diffusers").mkdir()
    shards = {"a.safetensors": keys[: len(keys) // 2], "b.safetensors": keys[len(keys) // 2:]}
    for name, ks in shards.items():
        save_file({k: conv[k] for k in ks}, tmp_path / "diffusers" / name)
    import json
    (tmp_path / "diffusers" / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {k: n for n, ks in shards.items() for k in ks}}))

    for path in ("mp_rank_00_model_states.pt", "ours.safetensors", "diffusers"):
        config = None if path == "ours.safetensors" else TINY  # ours carry their config
        m = dit.load_dit(str(tmp_path / path), config=config, dtype=torch.float32)
        with torch.no_grad():
            torch.testing.assert_close(m(x, t, text, mask, pooled, g), want, rtol=0, atol=0, msg=path)


def test_load_dit_refuses_bad_checkpoints(tmp_path):
    sd = random_model().state_dict()
    del sd["single_blocks.1.linear2.bias"]
    sd["extra.weight"] = torch.zeros(1)
    torch.save({"module": sd}, tmp_path / "bad.pt")
    with pytest.raises(ValueError,
                       match=r"1 missing: single_blocks\.1\.linear2\.bias.*1 unexpected: extra\.weight"):
        dit.load_dit(str(tmp_path / "bad.pt"), config=TINY)
    with pytest.raises(ValueError, match="wrong shape"):
        dit.load_dit(_save(tmp_path, "ratio2.pt"), config=TINY)
    (tmp_path / "trunc.pt").write_bytes(open(_save(tmp_path, "x.pt"), "rb").read()[:200])
    with pytest.raises(ValueError, match="cannot read"):
        dit.load_dit(str(tmp_path / "trunc.pt"), config=TINY)
    with pytest.raises(FileNotFoundError):
        dit.load_dit(str(tmp_path / "nope.pt"), config=TINY)


def _fp8_checkpoint(tmp_path, model):
    """The official fp8 release's layout: every linear weight of the 60 blocks as float8_e4m3fn in the .pt,
    one scale per layer in *_map.pt keyed by module name (scalar or (1,) tensors: both broadcast the same).
    Our own quantiser (scale = max|w| / 448, jittered so no two layers share one): the loader must not
    care."""
    g = torch.Generator().manual_seed(3)
    sd, scales = dict(model.state_dict()), {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and name.startswith(("double_blocks", "single_blocks")):
            w = sd[name + ".weight"].float()
            s = (w.abs().max() / 448 * (1 + torch.rand((), generator=g))).to(torch.bfloat16)
            scales[name] = s.reshape(1) if len(scales) % 2 else s
            sd[name + ".weight"] = (w / s.float()).to(torch.float8_e4m3fn)
    torch.save({"module": sd}, tmp_path / "mp_rank_00_model_states_fp8.pt")
    torch.save(scales, tmp_path / "mp_rank_00_model_states_fp8_map.pt")
    return sd, scales


def test_load_official_fp8(tmp_path):
    """The official --use-fp8 checkpoint: weights stay 1 byte each and every forward uses
    fp8.to(dtype) * scale.to(dtype) (fp8_optimization.py); the reference is a dense checkpoint holding
    exactly those products, so the output must match it bit for bit (a side-by-side run of the official
    model with convert_fp8_linear on the same files: 0.0 difference in fp32, and its fp8 forward equals its
    own dense forward on these products in bf16)."""
    sd, scales = _fp8_checkpoint(tmp_path, random_model())
    path = str(tmp_path / "mp_rank_00_model_states_fp8.pt")
    x, t, text, mask, pooled, g = inputs()
    for dtype in (torch.float32, torch.bfloat16):
        dense = {k: v.to(dtype) * scales[k[:-7]].to(dtype) if v.dtype == torch.float8_e4m3fn else v
                 for k, v in sd.items()}
        torch.save({"module": dense}, tmp_path / "dense.pt")
        ref = dit.load_dit(str(tmp_path / "dense.pt"), config=TINY, dtype=dtype)
        fp8 = dit.load_dit(path, config=TINY, dtype=dtype)
        unpacked = dit.load_dit(path, config=TINY, dtype=dtype, keep_fp8=False)
        layers = [m for m in fp8.modules() if isinstance(m, dit.FP8Linear)]
        # double: (mod, qkv, proj, fc1, fc2) x 2 streams; single: 3
        assert len(layers) == len(scales) == 2 * 10 + 2 * 3
        assert all(m.weight.dtype == torch.float8_e4m3fn for m in layers)
        assert set(fp8.state_dict()) == set(sd)                 # still the official key names
        args = (x.to(dtype), t, text.to(dtype), mask, pooled.to(dtype), g)
        with torch.no_grad():
            want = ref(*args)
            assert torch.equal(fp8(*args), want), dtype
            assert torch.equal(unpacked(*args), want), dtype
    with pytest.raises(ValueError, match="keep_fp8=False"):
        dit.save_dit(fp8, str(tmp_path / "x.safetensors"))
    dit.save_dit(unpacked, str(tmp_path / "x.safetensors"))   # dense: saves and reloads like any model


def test_load_official_fp8_refuses_missing_scales(tmp_path):
    sd, scales = _fp8_checkpoint(tmp_path, random_model())
    path = str(tmp_path / "mp_rank_00_model_states_fp8.pt")
    os.rename(tmp_path / "mp_rank_00_model_states_fp8_map.pt", tmp_path / "elsewhere.pt")
    with pytest.raises(FileNotFoundError, match="mp_rank_00_model_states_fp8_map.pt is missing"):
        dit.load_dit(path, config=TINY)
    dit.load_dit(path, config=TINY, fp8_map=str(tmp_path / "elsewhere.pt"))   # an explicit map path
    del scales["single_blocks.1.linear2"]
    torch.save(scales, tmp_path / "short_map.pt")
    with pytest.raises(ValueError, match=r"no scale for 1 fp8 layer.*single_blocks\.1\.linear2"):
        dit.load_dit(path, config=TINY, fp8_map=str(tmp_path / "short_map.pt"))
    name = "double_blocks.0.img_attn_q_norm.weight"
    sd[name] = sd[name].to(torch.float8_e4m3fn)
    torch.save({"module": sd}, tmp_path / "odd.pt")
    with pytest.raises(ValueError, match="img_attn_q_norm.weight .* is not a linear weight"):
        dit.load_dit(str(tmp_path / "odd.pt"), config=TINY, fp8_map=str(tmp_path / "elsewhere.pt"))


def test_quantize_fp8_writes_what_load_dit_reads(tmp_path):
    """dit.quantize_fp8 (the official map-file format; its own rule max|w| / 448): every weight within e4m3's
    half step (2^-4 relative) of the original, the saved pair loads back to the same outputs."""
    model = random_model()
    before = {n: m.weight.detach().clone() for n, m in model.named_modules()
              if isinstance(m, torch.nn.Linear)}
    scales = dit.quantize_fp8(model)
    assert len(scales) == 26 and all(isinstance(model.get_submodule(n), dit.FP8Linear) for n in scales)
    for n, s in scales.items():
        m = model.get_submodule(n)
        w, w0 = m.weight.double() * s.double(), before[n].double()
        normal = w0.abs() >= 2 ** -6 * s.double()  # e4m3's normal range (below: absolute steps)
        assert ((w - w0).abs() <= 2 ** -4 * w0.abs() + 1e-12)[normal].all(), n
        assert ((w - w0).abs() <= 2 ** -10 * s.double() + 1e-12)[~normal].all(), n
        assert w0.abs().max() <= 448 * s <= w0.abs().max() * (1 + 1e-6)
    torch.save({"module": model.state_dict()}, tmp_path / "q_fp8.pt")
    torch.save(scales, tmp_path / "q_fp8_map.pt")
    back = dit.load_dit(str(tmp_path / "q_fp8.pt"), config=TINY, dtype=torch.float32)
    x, t, text, mask, pooled, g = inputs()
    with torch.no_grad():
        assert torch.equal(back(x, t, text, mask, pooled, g), model(x, t, text, mask, pooled, g))


def _save(tmp_path, name):
    """A checkpoint whose shapes disagree with TINY (mlp ratio 2 instead of 4)."""
    sd = random_model(dit.replace(TINY, mlp_ratio=2.0)).state_dict()
    torch.save(sd, tmp_path / name)
    return str(tmp_path / name)


# ---------------------------------------------------------------------------------------------------------
# Sequence parallel (Ulysses): 2 gloo processes on the CPU give exactly the single-process output

def _sp_worker(rank, world, init_file, out_file):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    model = random_model().double()
    model.sp_group = dist.group.WORLD
    with torch.no_grad():
        out = model(*sp_inputs())
    if rank == 0:
        torch.save(out, out_file)
    dist.barrier()
    dist.destroy_process_group()


def sp_inputs():
    x, t, text, mask, pooled, guidance = inputs(T=2, H=4, W=4, lens=(7, 3))
    return x.double(), t, text.double(), mask, pooled.double(), guidance


def test_sequence_parallel_equals_single_process(tmp_path):
    """Ulysses over 2 ranks equals one process. In float64, to 1e-12: each rank multiplies half the tokens,
    and CPU GEMMs block (and so round) by shape and machine, so fp32 agrees only to ~1e-7 and not bitwise
    on every CPU; a wrong token or head order would be off by O(1)."""
    import torch.multiprocessing as mp
    mp.spawn(_sp_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "out.pt")), nprocs=2, join=True)
    with torch.no_grad():
        want = random_model().double()(*sp_inputs())
    got = torch.load(tmp_path / "out.pt")
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
