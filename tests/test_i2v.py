"""Image-to-video (HunyuanVideo-I2V, docs/i2v.md): the two DiT variants against diffusers'
HunyuanVideoTransformer3DModel (and the official model code when a checkout is given), the I2V prompt path
against transformers' LlavaForConditionalGeneration, and `sample.py --image` end to end on tiny models."""

import importlib
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import dit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dit.DiTConfig(hidden_size=64, num_heads=2, depth_double=2, depth_single=2, text_dim=32, pooled_dim=24,
                     rope_axes=(8, 12, 12))
VARIANTS = {"token_replace": dit.replace(TINY, image_condition_type="token_replace"),
            "latent_concat": dit.replace(TINY, image_condition_type="latent_concat", in_channels=33,
                                         guidance_embed=False)}


def random_model(cfg, seed=0, std=0.1):
    """Random weights everywhere (the official init zeroes the modulation, which would hide the first
    frame's own modulation)."""
    torch.manual_seed(seed)
    model = dit.HunyuanVideoDiT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, std)
    return model.eval()


def inputs(cfg, B=2, T=3, H=4, W=6, L=7, lens=(7, 4), seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, cfg.in_channels, T, H, W, generator=g)
    t = torch.rand(B, generator=g) * 1000
    text = torch.randn(B, L, cfg.text_dim, generator=g)
    mask = (torch.arange(L)[None] < torch.tensor(lens)[:, None]).long()
    pooled = torch.randn(B, cfg.pooled_dim, generator=g)
    guidance = torch.full((B,), 6016.0) if cfg.guidance_embed else None
    return x, t, text, mask, pooled, guidance


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


# ----------------------------------------------------------------------------------------------------------
# The DiT

@pytest.mark.parametrize("kind", list(VARIANTS))
def test_dit_matches_diffusers(kind):
    diffusers = pytest.importorskip("diffusers")
    cfg = VARIANTS[kind]
    ref = diffusers.HunyuanVideoTransformer3DModel(
        in_channels=cfg.in_channels, out_channels=16, num_attention_heads=2, attention_head_dim=32,
        num_layers=2, num_single_layers=2, num_refiner_layers=2, text_embed_dim=32, pooled_projection_dim=24,
        rope_axes_dim=(8, 12, 12), guidance_embeds=cfg.guidance_embed, image_condition_type=kind).eval()
    ours = random_model(cfg)
    ref.load_state_dict(dit.official_to_diffusers(ours.state_dict()), strict=True)
    x, t, text, mask, pooled, g = inputs(cfg)
    with torch.no_grad():
        want = ref(x, t, text, mask, pooled, guidance=g, return_dict=False)[0]
        got = ours(x, t, text, mask, pooled, g)
        # the same weights read as text-to-video: token_replace must differ (the first frame's modulation)
        t2v = dit.HunyuanVideoDiT(dit.replace(cfg, image_condition_type=None)).eval()
        t2v.load_state_dict(ours.state_dict())
        plain = t2v(x, t, text, mask, pooled, g)
    assert got.shape == (2, 16, 3, 4, 6)
    assert rel(got, want) < 1e-4
    if kind == "token_replace":
        assert rel(plain, want) > 1e-2
    else:  # latent_concat is T2V's computation on 33 input channels
        assert torch.equal(plain, got)


def test_token_replace_modulates_only_the_first_frame_differently():
    """Every block's first-frame modulation comes from t = 0 (and no guidance): with t = 0 and the guidance
    embedder's output cancelled, the two vectors agree and token_replace equals the T2V computation."""
    cfg = VARIANTS["token_replace"]
    model = random_model(cfg)
    t2v = dit.HunyuanVideoDiT(dit.replace(cfg, image_condition_type=None)).eval()
    t2v.load_state_dict(model.state_dict())
    x, t, text, mask, pooled, g = inputs(cfg)
    with torch.no_grad():
        for m in (model, t2v):
            m.guidance_in.mlp[2].weight.zero_()
            m.guidance_in.mlp[2].bias.zero_()
        zero = torch.zeros_like(t)
        torch.testing.assert_close(model(x, zero, text, mask, pooled, g), t2v(x, zero, text, mask, pooled, g),
                                   rtol=0, atol=0)


def _official_models(monkeypatch):
    """The official hyvideo/modules/models.py from a checkout named by HYVIDEO_I2V_REPO, its flash-attention
    call (CUDA only) replaced by the same varlen segments through SDPA."""
    repo = os.environ["HYVIDEO_I2V_REPO"]
    monkeypatch.syspath_prepend(repo)
    import types
    # hyvideo/utils/helpers.py imports training tools the model never calls: empty stand-ins if absent
    for name in ("deepspeed", "torch.utils.tensorboard"):
        try:
            importlib.import_module(name)
        except ImportError:
            stub = types.ModuleType(name)
            stub.SummaryWriter = None
            monkeypatch.setitem(sys.modules, name, stub)
    models = importlib.import_module("hyvideo.modules.models")
    posemb = importlib.import_module("hyvideo.modules.posemb_layers")

    def cu_seqlens(text_mask, img_len):  # official get_cu_seqlens, on the CPU
        B, L = text_mask.shape
        cu = torch.zeros(2 * B + 1, dtype=torch.int32)
        for i in range(B):
            cu[2 * i + 1] = i * (L + img_len) + text_mask[i].sum() + img_len
            cu[2 * i + 2] = (i + 1) * (L + img_len)
        return cu

    def varlen(q, k, v, cu_seqlens_q=None, max_seqlen_q=None, batch_size=1, **kw):
        flat = [x.flatten(0, 1) for x in (q, k, v)]  # (B*L, H, D), segments at cu_seqlens
        out = torch.zeros_like(flat[0])
        for a, b in zip(cu_seqlens_q[:-1].tolist(), cu_seqlens_q[1:].tolist()):
            qq, kk, vv = (x[a:b].transpose(0, 1) for x in flat)
            out[a:b] = F.scaled_dot_product_attention(qq, kk, vv).transpose(0, 1)
        return out.view(batch_size, max_seqlen_q, -1)

    monkeypatch.setattr(models, "get_cu_seqlens", cu_seqlens)
    monkeypatch.setattr(models, "attention", varlen)
    return models, posemb


@pytest.mark.skipif(not os.environ.get("HYVIDEO_I2V_REPO"),
                    reason="set HYVIDEO_I2V_REPO to a checkout of Tencent-Hunyuan/HunyuanVideo-I2V")
@pytest.mark.parametrize("kind", list(VARIANTS))
def test_dit_matches_the_official_code(kind, monkeypatch):
    from types import SimpleNamespace
    models, posemb = _official_models(monkeypatch)
    cfg = VARIANTS[kind]
    args = SimpleNamespace(i2v_condition_type=kind, text_states_dim=32, text_states_dim_2=24,
                           gradient_checkpoint=False, gradient_checkpoint_layers=-1)
    ref = models.HYVideoDiffusionTransformer(
        args, patch_size=[1, 2, 2], in_channels=cfg.in_channels, out_channels=16, hidden_size=64, heads_num=2,
        mlp_width_ratio=4.0, mm_double_blocks_depth=2, mm_single_blocks_depth=2, rope_dim_list=[8, 12, 12],
        guidance_embed=cfg.guidance_embed).eval()
    ours = random_model(cfg)
    ref.load_state_dict(ours.state_dict(), strict=True)  # the official keys
    x, t, text, mask, pooled, g = inputs(cfg)
    cos, sin = posemb.get_nd_rotary_pos_embed([8, 12, 12], (3, 2, 3), theta=256.0, use_real=True)
    with torch.no_grad():
        want = ref(x, t, text, mask, pooled, cos, sin, guidance=g, return_dict=False)
        got = ours(x, t, text, mask, pooled, g)
    assert rel(got, want) < 1e-4


def test_load_dit_tells_the_variants(tmp_path):
    """latent_concat: from img_in's 33 input channels (official .pt), or the config (diffusers, ours);
    token_replace: the official .pt has T2V's keys, so image=True reads it as I2V; a file whose config says
    text-to-video is refused for an image."""
    from safetensors.torch import save_file
    for kind, cfg in VARIANTS.items():
        model = random_model(cfg)
        sd = model.state_dict()
        x, t, text, mask, pooled, g = inputs(cfg)
        with torch.no_grad():
            want = model(x, t, text, mask, pooled, g)
        torch.save({"module": sd}, tmp_path / f"{kind}.pt")
        dit.save_dit(model, str(tmp_path / f"{kind}.safetensors"))
        d = tmp_path / f"{kind}_diffusers"
        d.mkdir()
        save_file({k: v.contiguous() for k, v in dit.official_to_diffusers(sd).items()},
                  d / "diffusion_pytorch_model.safetensors")
        (d / "config.json").write_text(json.dumps(dict(
            in_channels=cfg.in_channels, out_channels=16, num_attention_heads=2, attention_head_dim=32,
            num_layers=2, num_single_layers=2, num_refiner_layers=2, mlp_ratio=4.0, patch_size=2,
            patch_size_t=1, text_embed_dim=32, pooled_projection_dim=24, rope_theta=256.0,
            rope_axes_dim=[8, 12, 12], guidance_embeds=cfg.guidance_embed, image_condition_type=kind)))
        for path, config in ((f"{kind}.pt", TINY), (f"{kind}.safetensors", None), (d.name, None)):
            m = dit.load_dit(str(tmp_path / path), config=config, dtype=torch.float32, image=True)
            assert m.cfg.image_condition_type == kind, path
            with torch.no_grad():
                torch.testing.assert_close(m(x, t, text, mask, pooled, g), want, rtol=0, atol=0)
    # without image=True the official token_replace .pt reads as T2V (same keys), latent_concat as itself
    assert dit.load_dit(str(tmp_path / "token_replace.pt"), TINY).cfg.image_condition_type is None
    assert dit.load_dit(str(tmp_path / "latent_concat.pt"), TINY).cfg.image_condition_type == "latent_concat"
    dit.save_dit(random_model(TINY), str(tmp_path / "t2v.safetensors"))
    with pytest.raises(ValueError, match="text-to-video DiT"):
        dit.load_dit(str(tmp_path / "t2v.safetensors"), image=True)
    with pytest.raises(ValueError, match="image_condition_type"):
        dit.DiTConfig(image_condition_type="concat")
    with pytest.raises(ValueError, match="2 \\* out_channels \\+ 1"):
        dit.DiTConfig(image_condition_type="latent_concat")


def _sp_worker(rank, world, init_file, out_file):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    model = random_model(VARIANTS["token_replace"]).double()
    model.sp_group = dist.group.WORLD
    with torch.no_grad():
        outs = [model(*args) for args in sp_inputs()]
    if rank == 0:
        torch.save(outs, out_file)
    dist.barrier()
    dist.destroy_process_group()


def sp_inputs():
    """T = 3: the first frame's 4 tokens all on rank 0 of 2; T = 1: every token is the first frame's."""
    out = []
    for T in (3, 1):
        x, t, text, mask, pooled, g = inputs(VARIANTS["token_replace"], T=T, H=4, W=4)
        out.append((x.double(), t, text.double(), mask, pooled.double(), g))
    return out


def test_sequence_parallel_token_replace_equals_single_process(tmp_path):
    """Ulysses over 2 gloo ranks, each with its share of the first frame's tokens, equals one process
    (float64; see tests/test_dit.py for why not bitwise)."""
    import torch.multiprocessing as mp
    mp.spawn(_sp_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "out.pt")), nprocs=2, join=True)
    model = random_model(VARIANTS["token_replace"]).double()
    for got, args in zip(torch.load(tmp_path / "out.pt"), sp_inputs()):
        with torch.no_grad():
            torch.testing.assert_close(got, model(*args), rtol=1e-12, atol=1e-12)
