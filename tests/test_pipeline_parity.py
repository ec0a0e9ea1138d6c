"""The whole text-to-video path of sample.py (generate: PromptEncoder -> initial_noise -> denoise -> VAE
decode -> frames) against diffusers' own HunyuanVideoPipeline, on tiny random models that share their
weights: a transformers LlamaModel and CLIPTextModel saved as folders beside their tokenizers (our encoders
load those folders, diffusers gets the transformers models), a dit.HunyuanVideoDiT converted to
diffusers.HunyuanVideoTransformer3DModel, and a vae.CausalVAE loaded into diffusers.AutoencoderKLHunyuanVideo
(ours read the DiT and the VAE back from diffusers' save_pretrained folders).

Checked, in float32 on CPU, a batch of two prompts, 9 frames of 32x32 px (3 latent frames of 4x4), 3 Euler
steps, shift 7, embedded guidance 6.0:
  - every DiT call's inputs: the latent the step starts from, the timestep, the guidance, the LLM states
    after the template crop with their mask, CLIP's pooled vector;
  - the initial noise (one generator per sample, seed + i, as the official inference.py), the final latent,
    the decoded video (floats before uint8) and the uint8 frames;
  - with embedded guidance alone (the released model's mode), and with real CFG on top (our cfg_scale vs
    diffusers' true_cfg_scale, which runs the negative prompt as a second forward where we batch
    [uncond ; cond] as the official pipeline does: the same arithmetic, the same numbers to ~1e-7);
  - image mode (1 frame) with the official image template, which diffusers uses only when told.
Where diffusers 0.42.1 deviates from the official code (Tencent/HunyuanVideo at fa14b00: prompt stripping,
the default negative prompt, the image template, the timesteps' last bits) the test holds us to the official
behaviour and says so where it does.
"""

import os
import shutil
import sys

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import dit  # noqa: E402
import sample  # noqa: E402
import text_encoder as te  # noqa: E402
import vae as vae_lib  # noqa: E402
from test_dit import TINY, random_model  # noqa: E402
# fixtures (tiny BPE tokenizer folders in Llama 3's and CLIP's layouts; one torch thread) and helpers
from test_text_encoder import clip_tok_dir, llama_tok_dir, measured_templates, one_thread  # noqa: E402,F401
from test_vae import tiny as tiny_vae  # noqa: E402

H = W = 32
FRAMES = 9          # 4k+1: 3 latent frames
STEPS = 3
SEED = 42
# the second prompt is longer: the two rows of the batch have different text masks
PROMPTS = ["A cat sits on a red mat in the sun.", "Two dogs run across a green park, chasing a ball."]


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def perturb_norms(model, scale=0.2):
    """Non-trivial norm weights, so a skipped or misplaced norm shows (init leaves them at 1)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(scale * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def pipes(llama_tok_dir, clip_tok_dir, tmp_path_factory):  # noqa: F811
    """(ours: sample.Pipeline, diffusers: HunyuanVideoPipeline), the same weights on both sides."""
    root = tmp_path_factory.mktemp("hunyuan")
    ltok, ctok = te.Tokenizer(llama_tok_dir), te.Tokenizer(clip_tok_dir)
    torch.manual_seed(0)
    llm = perturb_norms(transformers.LlamaModel(transformers.LlamaConfig(
        vocab_size=ltok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rope_theta=500000.0,
        bos_token_id=ltok.bos[0], pad_token_id=ltok.pad_id, initializer_range=0.2)).eval())
    clip = perturb_norms(transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=ctok.vocab_size, hidden_size=TINY.pooled_dim, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, bos_token_id=ctok.bos[0],
        eos_token_id=ctok.eos_id, pad_token_id=ctok.pad_id, initializer_factor=5.0)).eval())
    # the official layout: each text encoder's weights and tokenizer files in one folder
    for model, tok, name in ((llm, llama_tok_dir, "text_encoder"), (clip, clip_tok_dir, "text_encoder_2")):
        model.save_pretrained(str(root / name))
        for f in os.listdir(tok):
            shutil.copy(os.path.join(tok, f), root / name / f)

    cfg = dit.replace(TINY, in_channels=4, out_channels=4)  # the tiny VAE's 4 latent channels
    assert cfg.text_dim == llm.config.hidden_size and cfg.guidance_embed
    ref_dit = diffusers.HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=cfg.num_heads,
        attention_head_dim=cfg.hidden_size // cfg.num_heads, num_layers=cfg.depth_double,
        num_single_layers=cfg.depth_single, num_refiner_layers=cfg.refiner_depth, text_embed_dim=cfg.text_dim,
        pooled_projection_dim=cfg.pooled_dim, rope_axes_dim=cfg.rope_axes, rope_theta=cfg.rope_theta,
        guidance_embeds=True).eval()
    ref_dit.load_state_dict(dit.official_to_diffusers(random_model(cfg, std=0.05).state_dict()), strict=True)
    ref_dit.save_pretrained(str(root / "transformer"))

    ours_vae = tiny_vae()
    c = ours_vae.cfg
    ref_vae = diffusers.AutoencoderKLHunyuanVideo(
        block_out_channels=c.block_out_channels, layers_per_block=c.layers_per_block,
        norm_num_groups=c.norm_groups, latent_channels=c.latent_channels,
        scaling_factor=c.scaling_factor).eval()
    ref_vae.load_state_dict(ours_vae.state_dict(), strict=True)
    ref_vae.save_pretrained(str(root / "vae"))

    # ours: everything read back from the folders, as sample.load_pipeline reads the official ones (which
    # it does in fp16 for the encoders; fp32 here, to compare tightly)
    encoder = te.PromptEncoder.from_pretrained(str(root / "text_encoder"), str(root / "text_encoder_2"),
                                               dtype=torch.float32, device="cpu",
                                               templates=measured_templates(ltok))
    ours = sample.Pipeline(encoder, dit.load_dit(str(root / "transformer"), dtype=torch.float32).eval(),
                           vae_lib.load_vae(root / "vae"), dict(sample.OFFICIAL_VIDEO),
                           dict(sample.OFFICIAL_SAMPLING))
    assert ours.dit.cfg == cfg and ours.vae.cfg.scaling_factor == c.scaling_factor

    # the tokenizers as transformers reads the same folders
    ref = diffusers.HunyuanVideoPipeline(
        text_encoder=llm, tokenizer=transformers.AutoTokenizer.from_pretrained(str(root / "text_encoder")),
        transformer=ref_dit, vae=ref_vae,
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=7.0),  # the official --flow-shift
        text_encoder_2=clip,
        tokenizer_2=transformers.CLIPTokenizer.from_pretrained(str(root / "text_encoder_2")))
    ref.set_progress_bar_config(disable=True)
    return ours, ref


# diffusers' default template carries the official crop_start 95, a count of llava-llama-3's tokens; left
# out, its _get_llama_prompt_embeds counts the template's tokens with the tokenizer at hand (less the
# prompt slot "{}" and <|eot_id|>), which is what our PromptEncoder checks its crop_start against
VIDEO_TEMPLATE = {"template": te.PROMPT_TEMPLATE_ENCODE_VIDEO}


def run_ours(ours, monkeypatch, prompts, frames=FRAMES, **kw):
    """sample.generate, recording the noise, every DiT call's inputs, denoise's output and the decoded video
    before it becomes uint8."""
    seen = {"videos": [], "calls": []}
    denoise, to_frames = sample.denoise, sample.to_frames

    def record_denoise(model, noise, *args, **kwargs):
        seen["noise"] = noise.clone()
        seen["final"] = denoise(model, noise, *args, **kwargs)
        return seen["final"]

    def record_frames(video):
        seen["videos"].append(video.clone())
        return to_frames(video)

    def record_call(model, args):
        seen["calls"].append(dict(zip(("x", "t", "text", "mask", "pooled", "guidance"), args)))

    monkeypatch.setattr(sample, "denoise", record_denoise)
    monkeypatch.setattr(sample, "to_frames", record_frames)
    hook = ours.dit.register_forward_pre_hook(record_call)
    try:
        seen["frames"] = sample.generate(ours, prompts, seed=SEED, height=H, width=W, frames=frames,
                                         steps=STEPS, shift=7.0, guidance=6.0, **kw)
    finally:
        hook.remove()
    seen["video"] = torch.stack(seen["videos"])
    return seen


def run_diffusers(ref, monkeypatch, prompts, frames=FRAMES, template=VIDEO_TEMPLATE, text_len=te.TEXT_LEN,
                  **kw):
    """HunyuanVideoPipeline.__call__, recording its initial latents, every transformer call's inputs, the
    latents after every step and the VAE's output before post-processing. Generators seeded SEED + i, one
    per sample, as ours and the official inference.py draw the noise."""
    seen = {"steps": [], "calls": []}
    prepare, decode = ref.prepare_latents, ref.vae.decode

    def record_prepare(*args, **kwargs):
        seen["noise"] = prepare(*args, **kwargs).clone()
        return seen["noise"]

    def record_decode(z, *args, **kwargs):
        out = decode(z, *args, **kwargs)
        seen["video"] = out[0].clone()
        return out

    def record_call(model, args, kwargs):
        names = dict(x="hidden_states", t="timestep", text="encoder_hidden_states",
                     mask="encoder_attention_mask", pooled="pooled_projections", guidance="guidance")
        seen["calls"].append({k: kwargs[v] for k, v in names.items()})

    def on_step(pipe, i, t, tensors):
        seen["steps"].append(tensors["latents"].clone())
        return {}

    monkeypatch.setattr(ref, "prepare_latents", record_prepare)
    monkeypatch.setattr(ref.vae, "decode", record_decode)
    hook = ref.transformer.register_forward_pre_hook(record_call, with_kwargs=True)
    gens = [torch.Generator().manual_seed(SEED + i) for i in range(len(prompts))]
    try:
        out = ref(prompt=prompts, height=H, width=W, num_frames=frames, num_inference_steps=STEPS,
                  guidance_scale=6.0, generator=gens, output_type="pt", prompt_template=template,
                  max_sequence_length=text_len, callback_on_step_end=on_step, **kw)
    finally:
        hook.remove()
    seen["frames"] = out.frames  # (B, T, 3, H, W) in [0, 1]
    return seen


def compare(got, want, cfg=False):
    """Every DiT call's inputs, then the noise, the final latent, the decoded video and the uint8 frames;
    returns the measured differences. cfg: ours is one call on [uncond ; cond] per step (as the official
    pipeline batches them), diffusers' two, cond then uncond."""
    calls = got["calls"]
    if cfg:
        calls = [{k: v.chunk(2)[j] for k, v in c.items()} for c in calls for j in (1, 0)]
    assert len(calls) == len(want["calls"]) == STEPS * (2 if cfg else 1) and len(want["steps"]) == STEPS
    if cfg:  # not vacuous: the negative prompt is another condition
        assert not torch.equal(calls[0]["text"], calls[1]["text"])
    r = dict(x=0.0, t=0.0, text=0.0, pooled=0.0)
    for a, b in zip(calls, want["calls"]):
        # the latent the step starts from, its timestep, the LLM states after the template crop (padding
        # positions included: the same values there mean the same crop), their mask, CLIP's pooled vector
        r["x"] = max(r["x"], rel(a["x"], b["x"]))
        r["t"] = max(r["t"], (a["t"] - b["t"]).abs().max().item())
        r["text"] = max(r["text"], rel(a["text"], b["text"]))
        r["pooled"] = max(r["pooled"], rel(a["pooled"], b["pooled"]))
        assert torch.equal(a["mask"].float(), b["mask"])  # diffusers hands the DiT a float mask
        # embedded guidance 6.0 x 1000, in the DiT's dtype (fp32 here), on both sides
        assert torch.equal(a["guidance"], b["guidance"]) and (a["guidance"] == 6000.0).all()
    assert torch.equal(got["noise"], want["noise"])  # the same draws from the same seeds
    assert torch.equal(calls[0]["x"], want["calls"][0]["x"])
    r["latent"] = rel(got["final"], want["steps"][-1])
    r["video"] = rel(got["video"], want["video"])
    # diffusers' "pt" output is (x / 2 + 0.5).clamp(0, 1), as the official pipeline's; ours truncates that
    # x 255 to uint8 as the official save_videos_grid
    ours01 = (got["video"] / 2 + 0.5).clamp(0, 1).permute(0, 2, 1, 3, 4)
    r["video01_max_abs"] = (ours01 - want["frames"]).abs().max().item()
    want_u8 = (want["frames"].permute(0, 1, 3, 4, 2) * 255).numpy().astype(np.uint8)
    diff = np.abs(got["frames"].astype(int) - want_u8.astype(int))
    r["uint8_off"] = int((diff > 0).sum())
    print(r)
    assert r["x"] < 1e-5 and r["t"] < 1e-3 and r["text"] < 1e-5 and r["pooled"] < 1e-5
    assert r["latent"] < 1e-5 and r["video"] < 1e-5 and r["video01_max_abs"] < 1e-5
    # a float a hair away from an integer boundary may truncate to the next value on one side
    assert diff.max() <= 1 and r["uint8_off"] <= diff.size // 1000
    return r


def test_embedded_guidance_matches_diffusers(pipes, monkeypatch):
    ours, ref = pipes
    # the official inference.py strips the prompt (prompt.strip(), inference.py:595); diffusers 0.42.1
    # formats it into the template as given (diffusers' pipeline_hunyuan_video.py:215): spaces around
    # ours, none there
    got = run_ours(ours, monkeypatch, [f"  {p} " for p in PROMPTS])
    want = run_diffusers(ref, monkeypatch, PROMPTS)
    text, mask = got["calls"][0]["text"], got["calls"][0]["mask"]
    assert text.shape == (2, te.TEXT_LEN, 32) and 0 < mask[0].sum() < mask[1].sum() < te.TEXT_LEN
    compare(got, want)
    # the DiT's timesteps are the official scheduler's, bit for bit (torch fp32: linspace, then
    # (s * t) / (1 + (s - 1) * t), x 1000; scheduling_flow_match_discrete.py:144-151). diffusers shifts a
    # float64 numpy linspace cast to fp32 (scheduling_flow_match_euler_discrete.py:349-376): 933.33337 where
    # the official has 933.33325, hence the 1e-3 bound on t in compare()
    s = torch.linspace(1, 0, STEPS + 1)
    official = ((7.0 * s) / (1 + (7.0 - 1) * s))[:-1] * 1000
    assert torch.equal(torch.stack([c["t"][0] for c in got["calls"]]), official)


def test_real_cfg_matches_diffusers_true_cfg(pipes, monkeypatch):
    ours, ref = pipes
    # ours without a negative prompt takes the official default (inference.py:598-599, NEGATIVE_PROMPT);
    # diffusers 0.42.1 runs true CFG only given a negative prompt (diffusers' pipeline_hunyuan_video.py:584;
    # else true_cfg_scale is silently ignored): it gets the official one. Longer than CLIP's 77 tokens with
    # this tokenizer: both sides truncate it the same way.
    with pytest.warns(UserWarning, match="truncated to 77"):
        got = run_ours(ours, monkeypatch, PROMPTS, cfg_scale=3.0)
    want = run_diffusers(ref, monkeypatch, PROMPTS, true_cfg_scale=3.0,
                         negative_prompt=[te.NEGATIVE_PROMPT] * len(PROMPTS))
    compare(got, want, cfg=True)


def test_image_mode_matches_diffusers_given_the_official_image_template(pipes, monkeypatch):
    ours, ref = pipes
    # One frame: the official pipeline encodes with the image template (data_type "image", official
    # pipeline_hunyuan_video.py:313, inference.py:662) inside the video template's token budget
    # (inference.py:217-225: text_len + 95) and crops the image template's own prefix (36). diffusers 0.42.1
    # uses its video template whatever the frame count; told the image template and text_len + (video crop
    # - image crop) tokens, it computes the same.
    crop = {k: v["crop_start"] for k, v in ours.encoder.templates.items()}
    n = te.TEXT_LEN + crop["dit-llm-encode-video"] - crop["dit-llm-encode"]  # official: 256 + 95 - 36
    got = run_ours(ours, monkeypatch, PROMPTS, frames=1)
    image_template = {"template": te.PROMPT_TEMPLATE_ENCODE}
    want = run_diffusers(ref, monkeypatch, PROMPTS, frames=1, template=image_template, text_len=n)
    assert got["calls"][0]["text"].shape[1] == n and got["frames"].shape == (2, 1, H, W, 3)
    compare(got, want)
