"""Image-to-video (HunyuanVideo-I2V, docs/i2v.md): the two DiT variants against diffusers'
HunyuanVideoTransformer3DModel (and the official model code when a checkout is given), the I2V prompt path
against transformers' LlavaForConditionalGeneration, and `sample.py --image` end to end on tiny models."""

import argparse
import importlib
import json
import math
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


def test_token_replace_with_offload_fp8_and_lora(tmp_path):
    """The paths sample.py reuses take an I2V DiT as they are: blocks streamed by offload_blocks (here
    CPU to CPU), the official fp8 layout read with image=True (weights stay fp8, dequantised per forward),
    and a LoRA in the official I2V trainer's kohya prefix, merged into W."""
    import sample
    from safetensors.torch import save_file
    cfg = VARIANTS["token_replace"]
    x, t, text, mask, pooled, g = inputs(cfg)
    model = random_model(cfg)
    with torch.no_grad():
        want = model(x, t, text, mask, pooled, g)
        sample.offload_blocks(model, torch.device("cpu"))
        torch.testing.assert_close(model(x, t, text, mask, pooled, g), want, rtol=0, atol=0)
    model = random_model(cfg)
    scales = dit.quantize_fp8(model)
    torch.save({"module": model.state_dict()}, tmp_path / "m_fp8.pt")
    torch.save(scales, tmp_path / "m_fp8_map.pt")
    loaded = dit.load_dit(str(tmp_path / "m_fp8.pt"), TINY, dtype=torch.float32, image=True)
    assert loaded.cfg.image_condition_type == "token_replace"
    assert isinstance(loaded.double_blocks[0].img_mod.linear, dit.FP8Linear)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t, text, mask, pooled, g), model(x, t, text, mask, pooled, g),
                                   rtol=0, atol=0)
    model = random_model(cfg)
    A, B = torch.randn(4, 64) * 0.1, torch.randn(64, 4) * 0.1
    name = "double_blocks.0.img_attn_proj"
    key = "Hunyuan_video_I2V_lora_" + name.replace(".", "_")
    save_file({f"{key}.lora_down.weight": A, f"{key}.lora_up.weight": B}, tmp_path / "l.safetensors")
    w = model.get_submodule(name).weight.detach().clone()
    dit.load_lora(model, str(tmp_path / "l.safetensors"), scale=0.5)
    torch.testing.assert_close(model.get_submodule(name).weight, w + 0.5 * B @ A, rtol=0, atol=1e-6)


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


# ----------------------------------------------------------------------------------------------------------
# The prompt path: the full LLaVA reads the image with the prompt

LLAMA3_WORDS = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")  # Llama 3's pre-tokenizer pattern: "\n\n" stays one piece
SPECIALS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<pad>", "<image>"]
SENTENCES = ["A cat sits on a red mat in the sun.", "The camera pans left over a city at night.",
             "Two dogs run across a green park, chasing a ball.", "The woman smiles and waves.\n\nThen rain."]


def test_official_i2v_constants_unchanged():
    """The I2V template, its positions and negative prompt as in the official hyvideo/constants.py (checked
    there character for character when written; pinned here so an edit shows)."""
    import hashlib
    import text_encoder as te
    h = lambda s: hashlib.sha256(s.encode()).hexdigest()[:16]  # noqa: E731
    assert h(te.PROMPT_TEMPLATE_ENCODE_VIDEO_I2V) == "7f45a330cc8fa70b"
    assert h(te.NEGATIVE_PROMPT_I2V) == "48fba20107d6a612"
    assert te.PROMPT_TEMPLATE_I2V == {"template": te.PROMPT_TEMPLATE_ENCODE_VIDEO_I2V, "crop_start": 103,
                                      "image_emb_start": 5, "image_emb_len": 576,
                                      "double_return_token_id": 271}
    assert te.IMAGE_EMBED_INTERLEAVE == {"token_replace": 4, "latent_concat": 2}


@pytest.fixture(scope="module")
def i2v_tok_dir(tmp_path_factory):
    """A byte-level BPE in Llama 3's layout (BOS added, its word pattern) with LLaVA's <image> token."""
    import text_encoder as te
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_WORDS), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(SENTENCES * 3 + [te.PROMPT_TEMPLATE_ENCODE_VIDEO_I2V], trainers.BpeTrainer(
        vocab_size=600, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A",
        special_tokens=[("<|begin_of_text|>", tok.token_to_id("<|begin_of_text|>"))])
    d = tmp_path_factory.mktemp("i2v_tok")
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "pad_token": "<pad>"}))
    return str(d)


def tiny_llava_folder(transformers, tok_dir, path, seed=0):
    """A random transformers LlavaForConditionalGeneration (CLIP 32 px, patch 8: 16 image features; LLaMA
    width 32, 4 layers) saved with the tokenizer files, as the official text_encoder_i2v folder."""
    import shutil
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(os.path.join(tok_dir, "tokenizer.json"))
    torch.manual_seed(seed)
    cfg = transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                                    num_attention_heads=4, image_size=32, patch_size=8),
        text_config=transformers.LlamaConfig(
            vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rope_theta=500000.0,
            rms_norm_eps=1e-5),
        image_token_index=tok.token_to_id("<image>"))
    ref = transformers.LlavaForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for n, p in ref.named_parameters():
            p.mul_(1 if "norm" in n else 3)
    ref.save_pretrained(path)
    for f in os.listdir(tok_dir):
        shutil.copy(os.path.join(tok_dir, f), os.path.join(path, f))
    return ref


def tiny_i2v_template(tok, llava):
    """The official I2V template with its positions counted for a test tokenizer (as PromptEncoder checks)."""
    import text_encoder as te
    head, tail = te.PROMPT_TEMPLATE_ENCODE_VIDEO_I2V.split("{}")
    head = tok.bos + tok._encode([head])[0]
    return dict(te.PROMPT_TEMPLATE_I2V, crop_start=len(head), image_emb_start=head.index(
        llava.cfg.image_token_index), image_emb_len=llava.num_image_tokens,
        double_return_token_id=tok._encode([tail])[0][-1])


def official_i2v_states(ref, hf_tok, tpl, prompts, pixel_values, max_length, interleave):
    """The official TextEncoder.encode in i2v_mode for data_type "video", one prompt at a time as the
    official pipeline runs it, with transformers 5's LLaVA: the processor's expansion of "<image>" to
    image_emb_len tokens lays the sequence out as the official run's legacy merge did."""
    n_img, image_id = tpl["image_emb_len"], ref.config.image_token_index
    out, out_mask = [], []
    for prompt, px in zip(prompts, pixel_values):
        enc = hf_tok(tpl["template"].format(prompt.strip()), truncation=True, max_length=max_length,
                     padding="max_length", return_tensors="pt")
        ids, mask = enc["input_ids"], enc["attention_mask"]
        pos = int((ids[0] == image_id).nonzero()[0])
        ids_x = torch.cat([ids[:, :pos], torch.full((1, n_img), image_id), ids[:, pos + 1:]], 1)
        mask_x = torch.cat([mask[:, :pos], torch.ones(1, n_img, dtype=mask.dtype), mask[:, pos + 1:]], 1)
        with torch.no_grad():
            hidden = ref(input_ids=ids_x, attention_mask=mask_x, pixel_values=px[None],
                         output_hidden_states=True).hidden_states[-(2 + 1)]
        # the official crop arithmetic, as written there
        crop_start = tpl["crop_start"]
        text_crop_start = crop_start - 1 + n_img
        image_crop_start, image_crop_end = tpl["image_emb_start"], tpl["image_emb_start"] + n_img
        _, last = torch.where(ids == tpl["double_return_token_id"])
        if last.shape[0] == 3:
            last = torch.cat((last, torch.tensor([ids.shape[-1]])))
        last = last.reshape(ids.shape[0], -1)[:, -1]
        a_start, a_end = last - 1 + n_img - 4, last - 1 + n_img
        m_start, m_end = last - 4, last
        text = torch.cat([hidden[0, text_crop_start:a_start[0].item()], hidden[0, a_end[0].item():]])
        tmask = torch.cat([mask[0, crop_start:m_start[0].item()], mask[0, m_end[0].item():]])
        image = hidden[0, image_crop_start:image_crop_end][::interleave]
        out.append(torch.cat([image, text]))
        out_mask.append(torch.cat([torch.ones(image.shape[0], dtype=tmask.dtype), tmask]))
    return torch.stack(out), torch.stack(out_mask)


@pytest.mark.parametrize("interleave", [4, 2])
def test_i2v_prompt_path_matches_transformers_and_the_official_crop(i2v_tok_dir, tmp_path, interleave):
    transformers = pytest.importorskip("transformers")
    PIL = pytest.importorskip("PIL.Image")
    import numpy as np
    import text_encoder as te
    ref = tiny_llava_folder(transformers, i2v_tok_dir, str(tmp_path))
    llava = te.Llava.from_pretrained(str(tmp_path), dtype=torch.float32)
    tok = te.Tokenizer(i2v_tok_dir)
    torch.manual_seed(1)
    clip = te.CLIPTextEncoder(te.CLIPTextConfig(vocab_size=tok.vocab_size, hidden_size=24,
                                                intermediate_size=48, num_hidden_layers=1,
                                                num_attention_heads=2, max_position_embeddings=16)).eval()
    tpl = tiny_i2v_template(tok, llava)
    assert tpl["image_emb_start"] == 5  # BOS, <|start_header_id|>, system, <|end_header_id|>, \n\n: official
    text_len = 20
    pe = te.PromptEncoder(llava.language_model, clip, tok, tok, templates=None, text_len=text_len,
                          clip_len=16, llava=llava, i2v_template=tpl)
    assert pe.i2v_returns_before == 3  # as the official code's count (Llama 3 tokenizes "\n\n" alike)
    # the release's transformers 4.39 ran both CLIP towers' attention eagerly (the test's reference here is
    # transformers 5: the same to fp32 rounding)
    towers = [*clip.modules(), *llava.vision_tower.modules()]
    assert all(m.eager for m in towers if isinstance(m, te.CLIPAttention))
    clip_calls, clip_tok = [], pe.clip_tok  # CLIP's text cleaned with ftfy, as the I2V release's tokenizer
    pe.clip_tok = lambda *a, **k: clip_calls.append(k.get("fix_text")) or clip_tok(*a, **k)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (50, 70, 3), dtype=np.uint8),
              rng.integers(0, 256, (90, 41, 3), dtype=np.uint8)]
    # a short prompt; one with "\n\n" of its own; one cut inside the prompt (the assistant header lost)
    prompts = ["A cat sits on a mat.", "The woman smiles and waves.\n\nThen rain.",
               " ".join(SENTENCES[:3])]
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_file=os.path.join(i2v_tok_dir, "tokenizer.json"),
                                                  bos_token="<|begin_of_text|>", pad_token="<pad>",
                                                  padding_side="right")
    processor = transformers.CLIPImageProcessorPil(size={"shortest_edge": 32},
                                                   crop_size={"height": 32, "width": 32})
    for batch in ([0, 1], [2]):
        ps, ims = [prompts[i] for i in batch], [images[i % 2] for i in batch]
        px = processor([PIL.fromarray(im) for im in ims], return_tensors="pt")["pixel_values"]
        want, want_mask = official_i2v_states(ref, hf_tok, tpl, ps, px, tpl["crop_start"] + text_len,
                                              interleave)
        with pytest.warns(UserWarning, match="truncated") if 2 in batch else _no_warning():
            text, mask, pooled = pe(ps, 129, images=ims, interleave=interleave)
        assert text.shape == (len(ps), 16 // interleave + text_len - 4, 32)
        assert torch.equal(mask, want_mask) and mask[:, :16 // interleave].all()
        valid = want_mask.bool()  # padding rows' states never reach the DiT (and differ in position ids)
        assert rel(text[valid], want[valid]) < 1e-5
        # CLIP's vector, as for text-to-video
        torch.testing.assert_close(pooled, pe.clip(*tok(ps, 16)), rtol=0, atol=0)
    assert mask[0, -1] == 1  # the cut prompt fills every position
    assert clip_calls == [True, True]
    # the image changes the states of every text token after it
    other, _, _ = pe(prompts[:1], 129, images=[images[1]], interleave=interleave)
    first, _, _ = pe(prompts[:1], 129, images=[images[0]], interleave=interleave)
    assert rel(other[0, -text_len:], first[0, -text_len:]) > 1e-3


class _no_warning:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_i2v_prompt_path_needs_the_llava(i2v_tok_dir, tmp_path):
    import numpy as np
    import text_encoder as te
    tok = te.Tokenizer(i2v_tok_dir)
    llm = te.LlamaEncoder(te.LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=48,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    clip = te.CLIPTextEncoder(te.CLIPTextConfig(vocab_size=tok.vocab_size, hidden_size=24,
                                                intermediate_size=48, num_hidden_layers=1,
                                                num_attention_heads=2, max_position_embeddings=16))
    pe = te.PromptEncoder(llm, clip, tok, tok, templates=None, text_len=12, clip_len=16)
    with pytest.raises(ValueError, match="full LLaVA"):
        pe(["a cat"], 129, images=[np.zeros((40, 40, 3), np.uint8)])


# ----------------------------------------------------------------------------------------------------------
# Sampling: the image's size bucket and pixels, the sampler, sample.py --image end to end

def official_bucket(height, width, base):
    """The official generate_crop_size_list + get_closest_ratio (hyvideo/utils/data_utils.py), as written
    there (numpy ratios), and inference.py's call."""
    import numpy as np
    num_patches = round((base / 32) ** 2)
    crop_size_list, wp, hp = [], num_patches, 1
    while wp > 0:
        if max(wp, hp) / min(wp, hp) <= 4.0:
            crop_size_list.append((wp * 32, hp * 32))
        if (hp + 1) * wp <= num_patches:
            hp += 1
        else:
            wp -= 1
    ratios = np.array([round(float(h) / float(w), 5) for h, w in crop_size_list])
    aspect_ratio = float(height) / float(width)
    diff_ratios = ratios - aspect_ratio
    if aspect_ratio >= 1:
        indices = [(index, x) for index, x in enumerate(diff_ratios) if x <= 0]
    else:
        indices = [(index, x) for index, x in enumerate(diff_ratios) if x > 0]
    return crop_size_list[min(indices, key=lambda pair: abs(pair[1]))[0]]


def test_i2v_bucket_is_the_official_one():
    import sample
    for base in sample.I2V_BUCKET_BASE.values():
        for h, w in ((720, 1280), (1280, 720), (1000, 1000), (1024, 1000), (480, 640), (333, 1999), (50, 41)):
            assert sample.i2v_bucket(h, w, base) == official_bucket(h, w, base), (h, w, base)
    assert sample.i2v_bucket(720, 1280, 960) == (704, 1248)  # 16:9 at 720p
    assert sample.i2v_bucket(1000, 1000, 720) == (704, 704)


def test_image_pixels_resize_crop_and_pad():
    """The official torchvision transform on a PIL image, by its rules: shorter side to min(h, w) (the other
    truncated), PIL bilinear, a centred crop whose offset rounds half to even, black padding, [-1, 1]."""
    import numpy as np
    from PIL import Image
    import sample
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    # same size: no resampling, x / 127.5 - 1 up to float32 rounding of the official (x/255 - 0.5) / 0.5
    x = sample.image_pixels(img, 40, 50)
    assert x.shape == (1, 3, 1, 40, 50) and x.dtype == torch.float32
    torch.testing.assert_close(x[0, :, 0], torch.from_numpy(img).permute(2, 0, 1) / 127.5 - 1,
                               rtol=0, atol=1e-6)
    # 40x50 -> shorter side 32: 32 x int(32 * 50 / 40) = 32 x 40, then a 32 x 35 crop: offset round(2.5) = 2
    x = sample.image_pixels(img, 32, 35)
    want = np.asarray(Image.fromarray(img).resize((40, 32), Image.BILINEAR))[:, 2:37]
    torch.testing.assert_close(x[0, :, 0], torch.from_numpy(want.copy()).permute(2, 0, 1) / 255 * 2 - 1,
                               rtol=0, atol=1e-6)
    # a portrait image into a landscape size: 16 x 20 after the resize, padded 1 | 2 columns to 16 x 23
    tall = rng.integers(0, 256, (100, 80, 3), dtype=np.uint8)
    x = sample.image_pixels(tall, 16, 23)[0, :, 0]
    assert (x[:, :, :1] == -1).all() and (x[:, :, -2:] == -1).all() and (x[:, :, 1:-2] > -1).any()


def test_load_image_errors(tmp_path):
    import numpy as np
    from PIL import Image
    import sample
    Image.fromarray(np.zeros((8, 40, 3), np.uint8)).save(tmp_path / "tiny.png")
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(ValueError, match="40x8 pixels: give at least 32"):
        sample.load_image(str(tmp_path / "tiny.png"))
    with pytest.raises(ValueError, match="cannot read it as an image"):
        sample.load_image(str(tmp_path / "text.png"))
    Image.fromarray(np.full((40, 40), 7, np.uint8)).save(tmp_path / "gray.jpg")
    img = sample.load_image(str(tmp_path / "gray.jpg"))
    assert img.shape == (40, 40, 3) and img.dtype == np.uint8  # grey -> RGB, as convert("RGB")


class Recorder(torch.nn.Module):
    """Wraps a DiT and keeps every latent it is called with."""

    def __init__(self, model):
        super().__init__()
        self.model, self.cfg, self.sp_group, self.seen = model, model.cfg, None, []

    def forward(self, x, *args, **kw):
        self.seen.append(x.clone())
        return self.model(x, *args, **kw)


def test_sampler_keeps_the_image_latent(tmp_path):
    """token_replace: the DiT sees the image latent as frame 0 at every step, the result ends with it, and
    frames 1.. step as the T2V sampler steps them; latent_concat: [x ; image on frame 0 ; mask] channels."""
    import sample
    cfg = dit.replace(VARIANTS["token_replace"], guidance_embed=False)
    model = Recorder(random_model(cfg))
    g = torch.Generator().manual_seed(3)
    noise, image = torch.randn(1, 16, 3, 4, 6, generator=g), torch.randn(1, 16, 1, 4, 6, generator=g)
    _, t, text, mask, pooled, _ = inputs(cfg, B=1, lens=(7,))
    out = sample.denoise(model, noise, (text, mask, pooled), steps=3, shift=3.0, progress=False, image=image)
    assert len(model.seen) == 3 and all(torch.equal(x[:, :, :1], image) for x in model.seen)
    assert torch.equal(out[:, :, :1], image) and torch.equal(model.seen[0][:, :, 1:], noise[:, :, 1:])
    # a step by hand: x1 = x0 + v(x0) * (sigma_1 - sigma_0) on frames 1..
    sig = sample.flow_sigmas(3, 3.0)
    with torch.no_grad():
        v = model.model(model.seen[0], sig[0:1] * 1000, text, mask, pooled)
    torch.testing.assert_close(model.seen[1][:, :, 1:], (model.seen[0] + v * (sig[1] - sig[0]))[:, :, 1:],
                               rtol=0, atol=0)
    cat = Recorder(random_model(VARIANTS["latent_concat"]))
    out = sample.denoise(cat, noise, (text, mask, pooled), steps=2, shift=3.0, progress=False, image=image)
    x = cat.seen[0]
    assert x.shape == (1, 33, 3, 4, 6) and torch.equal(x[:, :16], noise)
    assert torch.equal(x[:, 16:32, :1], image) and not x[:, 16:32, 1:].any()
    assert (x[:, 32, 0] == 1).all() and not x[:, 32, 1:].any()
    with pytest.raises(AssertionError, match="image latent"):
        sample.denoise(cat, noise, (text, mask, pooled), steps=1, progress=False)


def make_i2v_ckpt(path, kind):
    """tests/test_sample.py's tiny train.py folder with an I2V DiT (4 latent channels)."""
    from dataclasses import asdict
    sys.path.insert(0, os.path.dirname(__file__))
    from test_sample import make_ckpt
    import train
    make_ckpt(path)
    conf = json.load(open(os.path.join(path, "config.json")))
    cfg = dit.DiTConfig(**conf["dit"])
    cfg = dit.replace(cfg, image_condition_type=kind, in_channels=9 if kind == "latent_concat" else 4)
    dit.save_dit(random_model(cfg, std=0.05), os.path.join(path, "dit.safetensors"))
    conf["dit"] = asdict(cfg)
    train.write_json(os.path.join(path, "config.json"), conf)
    return path


def run_sample(*args, cwd=ROOT):
    return subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), *args], capture_output=True,
                          text=True, cwd=cwd, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))


def read_mp4(path):
    import cv2
    cap, frames = cv2.VideoCapture(path), []
    while True:
        ok, f = cap.read()
        if not ok:
            return frames
        frames.append(f)


@pytest.mark.parametrize("kind", ["token_replace", "latent_concat"])
def test_sample_image_to_mp4(kind, tmp_path, monkeypatch):
    """python sample.py --image ... end to end on a tiny I2V folder: 9 frames (latent_concat: the official
    4 fewer) at the folder's size, --i2v-stability and --i2v-resolution accepted."""
    import numpy as np
    from PIL import Image
    ckpt = make_i2v_ckpt(str(tmp_path / "ckpt"), kind)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (60, 90, 3), dtype=np.uint8)).save(tmp_path / "img.png")
    out = str(tmp_path / "v.mp4")
    args = ["--ckpt", ckpt, "--image", str(tmp_path / "img.png"), "--prompt", "a red circle", "--out", out,
            "--steps", "2", "--frames", "9", "--i2v-stability"]
    if kind == "token_replace":  # the command line itself, once
        r = run_sample(*args)
        assert r.returncode == 0, r.stderr
    else:
        import sample
        monkeypatch.setattr(sys, "argv", ["sample.py", *args])
        sample.main()
    frames = read_mp4(out)
    assert len(frames) == (9 if kind == "token_replace" else 5) and frames[0].shape == (32, 48, 3)


def test_sample_picks_the_size_bucket(tmp_path, monkeypatch):
    """--i2v-resolution: the official bucket of the image's shape; without it a folder's own size (None:
    generate() takes it) and the folder's own shift."""
    import numpy as np
    from PIL import Image
    import sample
    ckpt = make_i2v_ckpt(str(tmp_path / "ckpt"), "token_replace")
    Image.fromarray(np.zeros((60, 90, 3), np.uint8)).save(tmp_path / "img.png")
    seen = []
    monkeypatch.setattr(sample, "generate", lambda pipe, prompts, seed, h, w, *a, **kw: seen.append(
        (h, w, a[2], kw["image"].shape, kw["stability"])) or [])
    for extra in (["--i2v-resolution", "360p"], ["--i2v-stability"]):
        monkeypatch.setattr(sys, "argv", ["sample.py", "--ckpt", ckpt, "--prompt", "a", "--image",
                                          str(tmp_path / "img.png"), *extra])
        sample.main()
    assert seen == [(*official_bucket(60, 90, 480), None, (60, 90, 3), False),
                    (None, None, None, (60, 90, 3), True)]


@pytest.mark.parametrize("args,needle", [
    (["--image", "/nonexistent.png"], "--image /nonexistent.png: no such file"),
    (["--image", "{tiny}"], "pixels: give at least 32"),
    (["--image", "{text}"], "cannot read it as an image"),
    (["--image", "{img}", "--frames", "1"], "--frames 1 with --image"),
    (["--i2v-stability"], "go with --image"),
    (["--image", "{img}", "--ckpt", "{t2v}"], "is a text-to-video DiT"),
    ([], "this DiT is image-to-video (token_replace, HunyuanVideo-I2V): pass --image FILE"),
])
def test_bad_image_input_is_one_clean_line(args, needle, tmp_path_factory, monkeypatch):
    import numpy as np
    from PIL import Image
    import sample
    d = tmp_path_factory.getbasetemp() / "i2v_errors"
    if not d.exists():
        d.mkdir()
        make_i2v_ckpt(str(d / "ckpt"), "token_replace")
        sys.path.insert(0, os.path.dirname(__file__))
        from test_sample import make_ckpt
        make_ckpt(str(d / "t2v"))
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(d / "tiny.png")
        Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(d / "img.png")
        (d / "text.png").write_text("not an image")
    names = dict(tiny=d / "tiny.png", text=d / "text.png", img=d / "img.png", t2v=d / "t2v")
    args = [a.format(**names) for a in args]
    monkeypatch.setattr(sys, "argv", ["sample.py", "--ckpt", str(d / "ckpt"), "--prompt", "a red circle",
                                      "--steps", "1", *args])
    with pytest.raises(SystemExit) as e:
        sample.main()
    msg = str(e.value.code)
    assert needle in msg and all(line.startswith("error: ") for line in msg.splitlines()), msg


def test_generate_with_the_llava_reads_the_image_and_a_black_one_for_the_negative(i2v_tok_dir, tmp_path):
    """generate() on the official-style pipeline: the full LLaVA reads the image with the prompt (token
    states: 16 / 4 image + text_len - 4 prompt), the negative prompt (real CFG) gets the official
    NEGATIVE_PROMPT_I2V and a black image of the same size."""
    transformers = pytest.importorskip("transformers")
    import numpy as np
    import sample
    import text_encoder as te
    import vae as vae_lib
    tiny_llava_folder(transformers, i2v_tok_dir, str(tmp_path))
    llava = te.Llava.from_pretrained(str(tmp_path), dtype=torch.float32)
    tok = te.Tokenizer(i2v_tok_dir)
    clip = te.CLIPTextEncoder(te.CLIPTextConfig(vocab_size=tok.vocab_size, hidden_size=24,
                                                intermediate_size=48, num_hidden_layers=1,
                                                num_attention_heads=2, max_position_embeddings=16)).eval()
    pe = te.PromptEncoder(llava.language_model, clip, tok, tok, templates=None, text_len=20, clip_len=16,
                          llava=llava, i2v_template=tiny_i2v_template(tok, llava))
    calls = []
    encode = pe.encode_i2v
    pe.encode_i2v = lambda prompts, images, interleave: calls.append((prompts, images, interleave)) or \
        encode(prompts, images, interleave)
    model = Recorder(random_model(dit.replace(VARIANTS["token_replace"], in_channels=4, out_channels=4)))
    texts = []
    model.model.txt_in.register_forward_pre_hook(lambda m, a: texts.append(a[0].shape))
    pipe = sample.Pipeline(pe, model, vae_lib.CausalVAE(vae_lib.CONFIGS["tiny"]).eval(),
                           video={"height": 32, "width": 48, "frames": 5, "fps": 24},
                           sampling=dict(sample.OFFICIAL_SAMPLING, steps=1))
    image = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    frames = sample.generate(pipe, ["a cat walks"], image=image, cfg_scale=2.0, tiled=False)
    assert frames.shape == (1, 5, 32, 48, 3)
    (p, im, n), (neg, black, n2) = calls
    assert p == ["a cat walks"] and im[0] is image and n == n2 == 4
    assert neg == [te.NEGATIVE_PROMPT_I2V] and black[0].shape == image.shape and not black[0].any()
    assert texts == [(2, 16 // 4 + 20 - 4, 32)]  # [uncond ; cond], image states then prompt states


def test_official_weights_with_an_image_need_the_full_llava(tmp_path, monkeypatch):
    """--dit/--vae/--llm/--clip with --image: a T2V --llm folder (the language model alone) is one line."""
    import numpy as np
    from types import SimpleNamespace
    from PIL import Image
    import sample
    for name in ("dit.pt", "vae", "llm", "clip"):
        (tmp_path / name).mkdir() if name != "dit.pt" else (tmp_path / name).write_bytes(b"")
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "img.png")
    seen = {}
    monkeypatch.setattr(sample, "load_pipeline", lambda *a: seen.update(image=a[-1]) or SimpleNamespace(
        dit=SimpleNamespace(cfg=VARIANTS["token_replace"]), encoder=SimpleNamespace(llava=None)))
    files = [f"--{n}={tmp_path / f}" for n, f in (("dit", "dit.pt"), ("vae", "vae"), ("llm", "llm"),
                                                   ("clip", "clip"))]
    monkeypatch.setattr(sys, "argv", ["sample.py", "--prompt", "a", "--image", str(tmp_path / "img.png"),
                                      *files])
    with pytest.raises(SystemExit, match="error: --llm .* is a language model alone"):
        sample.main()
    assert seen["image"] is True  # load_dit reads an official .pt as the I2V one


# ----------------------------------------------------------------------------------------------------------
# Training: train.py --i2v

def test_i2v_flow_matching_keeps_the_first_frame_clean():
    """The I2V loss (official I2V trainer): the DiT sees the clean latent frame 0 and noised frames 1..,
    and only frames 1.. count."""
    import train
    model = Recorder(random_model(VARIANTS["token_replace"]))
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 16, 3, 4, 6, generator=g), torch.randn(2, 16, 3, 4, 6, generator=g)
    sigma = torch.tensor([0.3, 0.8])
    _, _, text, mask, pooled, guid = inputs(VARIANTS["token_replace"])
    loss = train.flow_matching_loss(model, x0, noise, sigma, (text, mask, pooled), guid)
    s = sigma.view(2, 1, 1, 1, 1)
    x = model.seen[0]
    assert torch.equal(x[:, :, :1], x0[:, :, :1])
    torch.testing.assert_close(x[:, :, 1:], ((1 - s) * x0 + s * noise)[:, :, 1:], rtol=0, atol=0)
    with torch.no_grad():
        v = model.model(x, sigma * 1000, text, mask, pooled, guid)
    want = ((v - (noise - x0))[:, :, 1:] ** 2).mean()
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=0)


def make_video_data(root, frames=72):
    """A curate.py-shaped folder of 3 clips long enough for the demo preset's video bucket (9 frames at
    stride 8), and a VAE of the preset's shape."""
    import numpy as np
    import curate
    import train
    import vae as vae_lib
    from safetensors.torch import save_file
    rng = np.random.default_rng(0)
    os.makedirs(os.path.join(root, "clips"), exist_ok=True)
    rows = []
    for i, (colour, shape, d) in enumerate([("red", "circle", "left"), ("green", "square", "right"),
                                            ("blue", "triangle", "up")]):
        path = f"clips/c{i}.mp4"
        video = curate.render_shot(rng, 112, 64, frames, shape, colour, d)
        curate.write_video(os.path.join(root, path), video)
        rows.append({"clip": f"c{i}", "path": path, "width": 112, "height": 64, "frames": frames,
                     "caption": {"short_description": f"a {colour} {shape} moving {d}", "style": "flat",
                                 "camera_movement": "static shot"}})
    with open(os.path.join(root, "manifest.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    open(os.path.join(root, "images.jsonl"), "w").close()
    torch.manual_seed(0)
    save_file(vae_lib.CausalVAE(train.vae_config(train.PRESETS["demo"])).state_dict(),
              os.path.join(root, "vae.safetensors"))
    return root


def test_train_i2v_then_sample_from_an_image(tmp_path, monkeypatch):
    """train.py --i2v from a T2V DiT (3 steps of the demo preset's video stage), then sample.py --image on
    its folder; the folder's DiT says it is token_replace, and --i2v refuses what it does not support."""
    import cv2
    data = make_video_data(str(tmp_path / "data"))
    t2v = random_model(dit.replace(TINY, hidden_size=128, rope_axes=(16, 24, 24), pooled_dim=32,
                                   guidance_embed=False))
    dit.save_dit(t2v, str(tmp_path / "t2v.safetensors"))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    base = [sys.executable, os.path.join(ROOT, "train.py"), "--preset", "demo", "--data", data, "--vae",
            os.path.join(data, "vae.safetensors"), "--out", str(tmp_path / "out"), "--steps", "3", "--i2v"]
    r = subprocess.run(base + ["--init-dit", str(tmp_path / "t2v.safetensors")], capture_output=True,
                       text=True, cwd=ROOT, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "--image FIRST_FRAME.png" in r.stdout
    assert dit.load_dit(str(tmp_path / "out" / "dit.safetensors")).cfg.image_condition_type == "token_replace"
    first = cv2.VideoCapture(os.path.join(data, "clips", "c0.mp4")).read()[1]  # BGR, as imwrite takes it
    cv2.imwrite(str(tmp_path / "first.png"), first)
    import sample
    import train
    monkeypatch.setattr(sys, "argv", ["sample.py", "--ckpt", str(tmp_path / "out"), "--image",
                                      str(tmp_path / "first.png"), "--prompt", "a red circle moving left",
                                      "--out", str(tmp_path / "v.mp4"), "--steps", "2"])
    sample.main()
    assert len(read_mp4(str(tmp_path / "v.mp4"))) == 9
    # bench.py i2v-demo on the folder: 5 first frames x 4 directions, each read back (2 steps here)
    import bench
    real = sample.generate
    monkeypatch.setattr(sample, "generate", lambda *a, **kw: real(*a, **dict(kw, steps=2)))
    bench.bench_i2v_demo(argparse.Namespace(ckpt=str(tmp_path / "out")))
    rows = json.loads((tmp_path / "out" / "bench" / "i2v_demo.json").read_text())
    assert len(rows) == 20 and len({r["prompt"] for r in rows}) == 20
    assert all(math.isfinite(r["psnr"]) and {"colour", "shape", "direction"} <= r.keys() for r in rows)
    monkeypatch.setattr(sys, "argv", base[1:] + ["--lora", "4"])
    with pytest.raises(SystemExit, match="error: --i2v fine-tunes with --preset/--data"):
        train.main()
