"""
HunyuanVideo's two text encoders and the official prompt path (paper §4.3, official `hyvideo/text_encoder`),
and the two open vision models curation uses (paper §3): CLIP's vision tower and the LLaVA captioner.

A prompt is read twice:
  - by a decoder-only LLM, the language model of llava-llama-3-8b (32 layers, width 4096). The prompt is
    wrapped in a system-instruction template, the hidden state after layer 30 of 32 is kept (what
    transformers calls `hidden_states[-3]`, no final norm), and the template's tokens are cropped off:
    `text` (B, 256, 4096) with its right-padded `text_mask` (B, 256);
  - by CLIP ViT-L/14's text tower, whose final-normed state at the end-of-text token is `pooled` (B, 768).
Both read the Hugging Face folders the official repo uses (config.json + *.safetensors, tokenizer files),
so sampling the released model needs no `transformers`. Tokenizer files are read with `tokenizers`
(image-to-video's CLIP prompts are cleaned with ftfy first, as the I2V release's tokenizer did).

Numerics follow the official fp16 run (transformers 4.46.3): RMSNorm normalises in fp32, RoPE tables are
built in fp32 from frequencies rounded to the weights' dtype and cast to it, everything else runs in the
weights' dtype. (On CPU, small random checkpoints gave fp32 and fp16 outputs identical to transformers'.)
Image-to-video follows HunyuanVideo-I2V's transformers 4.39.3 instead: both CLIP towers' attention runs
eagerly (`CLIPAttention.eager`), bit-equal to that release's encoder in fp16 (docs/i2v.md).

Use (sample.py):
    pe = PromptEncoder.from_pretrained("ckpts/text_encoder", "ckpts/text_encoder_2", device="cuda")
    text, text_mask, pooled = pe([NEGATIVE_PROMPT, prompt], video_length=129)  # CFG: [negative; positive]
offload="model" or "layer" keeps the 8B weights on the CPU between calls.

Use (curate.py), with the same folders' siblings, exact to transformers as well:
    clip = CLIPVisionEncoder.from_pretrained("ckpts/text_encoder_2", device="cuda")  # the full CLIP ViT-L/14
    emb = clip(clip_image_preprocess(frames_rgb, clip.image_size).cuda())          # get_image_features
    vlm = Llava.from_pretrained("ckpts/llava-llama-3-8b-v1_1-transformers", device="cuda")  # bf16
    answer = vlm.chat("Describe this frame ...", frame_rgb)   # the model's chat template, greedy decoding
(LLaVA follows transformers' from_pretrained(dtype=...) numerics instead: its rotary frequencies stay fp32.)

Read top to bottom: configs, prompt templates, the LLaMA decoder, the CLIP text tower, the CLIP vision
tower with its image preprocessing, LLaVA (which reuses the LLaMA and the vision tower), loading from
Hugging Face folders, tokenizers, then the prompt encoder that runs a prompt through the text encoders.
(Tokenizers come after the models, not before: they are format machinery, while the encoders are what
the paper describes.)
"""

import glob
import hashlib
import json
import math
import os
import re
import unicodedata
import warnings
from dataclasses import dataclass, field, fields, replace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from dit import check_state_dict  # one strict-load check and message for every loader


def rope_type(scaling):
    """The kind of a rope_scaling dict (transformers wrote "type" before "rope_type")."""
    return "default" if not scaling else scaling.get("rope_type", scaling.get("type", "default"))


@dataclass
class LlamaConfig:
    """LLaMA decoder shape; defaults: llava-llama-3-8b's language model (official ckpts/text_encoder)."""
    vocab_size: int = 128320          # llava-llama-3-8b: Llama 3's 128256 plus llava's added tokens
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8      # grouped-query attention: 4 query heads share one k/v head
    head_dim: int = None              # None: hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: dict = None         # None, {"rope_type": "linear", "factor"} or Llama 3.1's "llama3"
    attention_bias: bool = False
    mlp_bias: bool = False

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"LlamaConfig: {self.num_attention_heads} query heads cannot be shared by "
                             f"{self.num_key_value_heads} key/value heads")
        kind = rope_type(self.rope_scaling)
        if kind not in ("default", "linear", "llama3"):
            raise ValueError(f"LlamaConfig: rope_scaling type {kind!r} is not supported "
                             f"(supported: none/default, linear, llama3)")


@dataclass
class CLIPTextConfig:
    """CLIP's text tower; defaults: openai/clip-vit-large-patch14 (official ckpts/text_encoder_2)."""
    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = None          # None: pool at the largest token id (see CLIPTextEncoder.forward)


@dataclass
class CLIPVisionConfig:
    """CLIP's vision tower; defaults: openai/clip-vit-large-patch14 (vision half of ckpts/text_encoder_2)."""
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    image_size: int = 224
    patch_size: int = 14
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 768         # None: no visual_projection (LLaVA reads the tower's hidden states)


@dataclass
class LlavaConfig:
    """LLaVA: a CLIP vision tower, a two-layer projector and a LLaMA; defaults: llava-llama-3-8b-v1_1."""
    text: LlamaConfig = field(default_factory=LlamaConfig)
    vision: CLIPVisionConfig = field(default_factory=lambda: CLIPVisionConfig(image_size=336,
                                                                              projection_dim=None))
    image_token_index: int = 128257
    vision_feature_layer: object = -2          # an index into the tower's hidden states, or a list of them
    vision_feature_select_strategy: str = "default"  # "default": the CLS state is dropped; "full": kept
    projector_hidden_act: str = "gelu"
    multimodal_projector_bias: bool = True


LLM_CONFIGS = {
    "llava-llama-3-8b": LlamaConfig(),  # the official ckpts/text_encoder
    # train.py's embedded demo: frozen random weights, width = DiTConfig "tiny" text_dim (set vocab_size)
    "tiny": LlamaConfig(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2),
}

CLIP_CONFIGS = {
    "clip-vit-large-patch14": CLIPTextConfig(),  # the official ckpts/text_encoder_2 (openai)
    # width = DiTConfig "tiny" pooled_dim; set vocab_size and eos_token_id from the tokenizer
    "tiny": CLIPTextConfig(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4),
}

# ----------------------------------------------------------------------------------------------------------
# Prompt templates: the system instruction that steers the LLM's states (paper §4.3). These strings, their
# crop_start values and the negative prompt are interface constants the released DiT was trained with,
# reproduced verbatim from the official hyvideo/constants.py (PROMPT_TEMPLATE, NEGATIVE_PROMPT) at commit
# fa14b00. crop_start counts the Llama 3 tokens before the prompt, BOS included.

PROMPT_TEMPLATE_ENCODE = (
    "<|start_header_id|>system<|end_header_id|>\n\nDescribe the image by detailing the color, shape, size, "
    "texture, quantity, text, spatial relationships of the objects and background:<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>"
)
PROMPT_TEMPLATE_ENCODE_VIDEO = (
    "<|start_header_id|>system<|end_header_id|>\n\nDescribe the video by detailing the following aspects: "
    "1. The main content and theme of the video."
    "2. The color, shape, size, texture, quantity, text, and spatial relationships of the objects."
    "3. Actions, events, behaviors temporal relationships, physical movement changes of the objects."
    "4. background environment, light, style and atmosphere."
    "5. camera angles, movements, and transitions used in the video:<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>"
)
NEGATIVE_PROMPT = ("Aerial view, aerial view, overexposed, low quality, deformation, a poor composition, "
                   "bad hands, bad teeth, bad eyes, bad limbs, distortion")
PROMPT_TEMPLATE = {
    "dit-llm-encode": {"template": PROMPT_TEMPLATE_ENCODE, "crop_start": 36},              # images (T = 1)
    "dit-llm-encode-video": {"template": PROMPT_TEMPLATE_ENCODE_VIDEO, "crop_start": 95},  # videos
}
TEXT_LEN = 256   # prompt tokens the DiT reads (official --text-len)
CLIP_LEN = 77    # CLIP's context (official --text-len-2)

# HunyuanVideo-I2V (docs/i2v.md): the full LLaVA reads the image with the prompt. Reproduced verbatim from
# the official Tencent-Hunyuan/HunyuanVideo-I2V hyvideo/constants.py ("dit-llm-encode-video-i2v",
# NEGATIVE_PROMPT_I2V). The "<image>" token (position image_emb_start, BOS included) becomes the LLaVA's
# image_emb_len projected CLIP features; crop_start counts the tokens before the prompt with "<image>" as one;
# the last double_return_token_id ("\n\n", Llama 3's 271) closes the assistant header. Only the video
# template: the official I2V encoder has no image (1-frame) mode.
PROMPT_TEMPLATE_ENCODE_VIDEO_I2V = (
    "<|start_header_id|>system<|end_header_id|>\n\n<image>\nDescribe the video by detailing the following "
    "aspects according to the reference image: "
    "1. The main content and theme of the video."
    "2. The color, shape, size, texture, quantity, text, and spatial relationships of the objects."
    "3. Actions, events, behaviors temporal relationships, physical movement changes of the objects."
    "4. background environment, light, style and atmosphere."
    "5. camera angles, movements, and transitions used in the video:<|eot_id|>\n\n"
    "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n"
)
NEGATIVE_PROMPT_I2V = "deformation, a poor composition and deformed video, bad teeth, bad eyes, bad limbs"
PROMPT_TEMPLATE_I2V = {"template": PROMPT_TEMPLATE_ENCODE_VIDEO_I2V, "crop_start": 103, "image_emb_start": 5,
                       "image_emb_len": 576, "double_return_token_id": 271}
# the DiT reads every n-th image state (official inference.py, image_embed_interleave): 144 or 288 tokens
IMAGE_EMBED_INTERLEAVE = {"token_replace": 4, "latent_concat": 2}

# ----------------------------------------------------------------------------------------------------------
# LLaMA decoder (the language model of llava-llama-3-8b)


class RMSNorm(nn.Module):
    """x / rms(x) * weight; the normalisation in fp32, the scale in the weights' dtype (as transformers)."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        h = x.to(torch.promote_types(x.dtype, torch.float32))  # fp32, or fp64 for float64 tests
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_tables(cfg, length, dtype, device, round_freq=True):
    """cos, sin (length, head_dim) in `dtype` for positions 0..length-1, with the checkpoint's rope scaling.
    round_freq: round the frequencies to `dtype` first, as a model cast with .to(dtype) does (below); False:
    keep them in fp32, as transformers' from_pretrained(dtype=...) does."""
    work = torch.promote_types(dtype, torch.float32)  # fp32 as transformers (fp64 for float64 runs)
    d = cfg.head_dim
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, d, 2, device=device, dtype=work) / d)
    kind, s = rope_type(cfg.rope_scaling), cfg.rope_scaling
    if kind == "linear":  # positions divided by `factor`
        inv_freq = inv_freq / s["factor"]
    elif kind == "llama3":
        # Llama 3.1: wavelengths shorter than old_len / high_freq_factor are kept, longer than
        # old_len / low_freq_factor are divided by `factor`, and the band in between is blended linearly.
        old_len, lo, hi = s["original_max_position_embeddings"], s["low_freq_factor"], s["high_freq_factor"]
        wavelen = 2 * math.pi / inv_freq
        smooth = ((old_len / wavelen - lo) / (hi - lo)).clamp(0, 1)
        inv_freq = (1 - smooth) * inv_freq / s["factor"] + smooth * inv_freq
    # The official code casts the loaded encoder with .to(fp16), which also rounds transformers' inv_freq
    # buffer to fp16; rounding the same way keeps half-precision states equal to the official ones.
    if round_freq:
        inv_freq = inv_freq.to(dtype).to(work)
    angles = torch.arange(length, device=device, dtype=work)[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)  # LLaMA rotates (i, i + d/2) pairs, not adjacent ones
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x, cos, sin):
    """Rotate the (i, i + d/2) pairs of x (B, nh, L, d) by the tables' angles."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class LlamaAttention(nn.Module):
    """Causal grouped-query self-attention with rotary positions."""

    def __init__(self, cfg):
        super().__init__()
        self.nh, self.nkv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.nh * self.hd, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.nkv * self.hd, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.nkv * self.hd, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.nh * self.hd, cfg.hidden_size, bias=cfg.attention_bias)

    def forward(self, x, cos, sin, mask, kv=None):
        """kv: this layer's cache when decoding, a dict holding the earlier positions' keys and values;
        this call's are appended to it."""
        B, L, _ = x.shape
        q = self.q_proj(x).view(B, L, self.nh, self.hd).transpose(1, 2)   # (B, nh, L, hd)
        k = self.k_proj(x).view(B, L, self.nkv, self.hd).transpose(1, 2)  # (B, nkv, L, hd)
        v = self.v_proj(x).view(B, L, self.nkv, self.hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv is not None:
            if kv:
                k, v = torch.cat([kv["k"], k], dim=2), torch.cat([kv["v"], v], dim=2)
            kv["k"], kv["v"] = k, v
        # query head h reads key/value head h // (nh / nkv). The call transformers' SDPA Llama makes (the
        # official environments': 4.46 and 4.39): k/v heads repeated, an additive mask of 0 / the dtype's
        # min, contiguous tensors on a GPU; the same call lets SDPA pick the same GPU kernel (a boolean mask
        # with enable_gqa would take another), so the fp16 states round the same way
        if self.nh != self.nkv:
            k, v = (t.repeat_interleave(self.nh // self.nkv, dim=1) for t in (k, v))
        if mask is not None and mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(
                ~mask, torch.finfo(q.dtype).min)
        if q.device.type == "cuda" and mask is not None:
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(o.transpose(1, 2).reshape(B, L, self.nh * self.hd))


class LlamaMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = LlamaAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = LlamaMLP(cfg)

    def forward(self, x, cos, sin, mask, kv=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, kv)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaEncoder(nn.Module):
    """A bare LLaMA decoder (no LM head) used as a text encoder (forward), and by Llava as a causal language
    model (decode). Module names are the checkpoint's keys."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, input_ids, attention_mask=None, skip_layers=2, stream_to=None, embeds=None):
        """input_ids (B, L); attention_mask (B, L), 1 = token, right-padded. Returns transformers'
        hidden_states[-(skip_layers + 1)]: the output of layer N - skip_layers without the final norm
        (HunyuanVideo: skip_layers=2, the official hidden_state_skip_layer in text_encoder/__init__.py), or
        with skip_layers=0 the final normed output. (B, L, hidden).
        stream_to: a device the weights (kept on CPU) visit one layer at a time, for CPU offload.
        embeds: (B, L, hidden) instead of the tokens' embeddings (LLaVA: image features among them)."""
        n = len(self.layers)
        assert 0 <= skip_layers <= n, f"skip_layers must be in 0..{n}"
        B, L = input_ids.shape
        x = self.embed_tokens(input_ids.to(self.embed_tokens.weight.device)) if embeds is None else embeds
        x = x.to(stream_to) if stream_to is not None else x
        cos, sin = rope_tables(self.cfg, L, x.dtype, x.device)
        # a token sees itself, the tokens before it, and no padding
        mask = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()[None, None]
        if attention_mask is not None:
            if not attention_mask[:, 0].all():  # else the first query sees no key and NaNs spread
                raise ValueError("LlamaEncoder: attention_mask must be right-padded "
                                 "(each row's first token real)")
            mask = mask & attention_mask.to(x.device, torch.bool)[:, None, None, :]  # (B, 1, L, L)
        for layer in self.layers[:n - skip_layers]:
            if stream_to is not None:
                layer.to(stream_to)
            x = layer(x, cos, sin, mask)
            if stream_to is not None:
                layer.to("cpu")
        if skip_layers == 0:
            x = self.norm.to(x.device)(x)
            if stream_to is not None:
                self.norm.to("cpu")
        return x

    def decode(self, x, cache, start):
        """Embeddings x (B, L, hidden) at positions start..start+L-1, with the keys and values of positions
        0..start-1 in `cache` (one dict per layer, extended in place) -> the final normed states
        (B, L, hidden). No padding: every row is as long as the others (as Llava.generate feeds it)."""
        L = x.shape[1]
        # rotary frequencies in fp32, as transformers' from_pretrained(dtype=...) keeps them for LLaVA
        cos, sin = (t[start:] for t in rope_tables(self.cfg, start + L, x.dtype, x.device, round_freq=False))
        # query i (position start + i) sees every position up to its own; one new token sees them all
        mask = None if L == 1 else torch.ones(L, start + L, dtype=torch.bool, device=x.device).tril(start)
        for layer, kv in zip(self.layers, cache):
            x = layer(x, cos, sin, mask, kv)
        return self.norm(x)

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, device="cpu"):
        """A Hugging Face LlamaModel / LlamaForCausalLM folder: config.json + *.safetensors."""
        cfg = llama_config_from_hf(read_config(path, "llama"), path)
        # lm_head: HunyuanVideo loads a bare decoder; rotary_emb.inv_freq: recomputed, stored by old
        # checkpoints
        def rename(k):
            return None if k.startswith("lm_head.") or "rotary_emb." in k else k.removeprefix("model.")
        return load_model(cls, cfg, path, rename, dtype, device)


# ----------------------------------------------------------------------------------------------------------
# CLIP text tower (openai/clip-vit-large-patch14)


class CLIPAttention(nn.Module):
    """Multi-head self-attention with biased projections (causal through its masks in the text tower).

    masks: additive float masks (0 / the dtype's min), each None or broadcasting to (B, nh, L, L): the text
    tower's causal one, then its padding one. Two arithmetics, each the call of one official environment,
    so that its fp16 rounding is reproduced: SDPA on the masks' sum (transformers 4.46, text-to-video), or
    with `eager` set, transformers 4.39's (HunyuanVideo-I2V's): q scaled before q k^T, each mask added in
    turn, softmax in the states' dtype."""

    def __init__(self, cfg):
        super().__init__()
        self.nh = cfg.num_attention_heads
        D = cfg.hidden_size
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, D)
        self.out_proj = nn.Linear(D, D)
        self.eager = False

    def forward(self, x, masks=()):
        B, L, D = x.shape
        hd = D // self.nh
        heads = lambda t: t.view(B, L, self.nh, hd).transpose(1, 2)  # (B, nh, L, hd)
        masks = [m for m in masks if m is not None]
        if self.eager:
            q = heads(self.q_proj(x) * hd ** -0.5).reshape(B * self.nh, L, hd)
            k, v = (heads(p(x)).reshape(B * self.nh, L, hd) for p in (self.k_proj, self.v_proj))
            w = torch.bmm(q, k.transpose(1, 2))
            for m in masks:
                w = (w.view(B, self.nh, L, L) + m).view(B * self.nh, L, L)
            o = torch.bmm(F.softmax(w, dim=-1), v).view(B, self.nh, L, hd)
        else:
            mask = None if not masks else masks[0] if len(masks) == 1 else masks[0] + masks[1]
            q, k, v = (heads(p(x)) for p in (self.q_proj, self.k_proj, self.v_proj))
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=hd ** -0.5)
        return self.out_proj(o.transpose(1, 2).reshape(B, L, D))


class CLIPMLP(nn.Module):
    """fc1 -> GELU (OpenAI's quick GELU, or the exact one where the config says "gelu") -> fc2."""

    def __init__(self, cfg):
        super().__init__()
        self.act = cfg.hidden_act
        if self.act not in ("quick_gelu", "gelu"):
            raise ValueError(f"CLIP hidden_act {self.act!r} is not supported (quick_gelu, gelu)")
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x):
        x = self.fc1(x)
        # OpenAI's CLIP uses the sigmoid approximation x * sigmoid(1.702 x)
        x = x * torch.sigmoid(1.702 * x) if self.act == "quick_gelu" else F.gelu(x)
        return self.fc2(x)


class CLIPLayer(nn.Module):
    """Pre-LayerNorm transformer block."""

    def __init__(self, cfg):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = CLIPAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg)

    def forward(self, x, masks=()):
        x = x + self.self_attn(self.layer_norm1(x), masks)
        return x + self.mlp(self.layer_norm2(x))


class CLIPTextEncoder(nn.Module):
    """CLIP's text transformer; returns the pooled output (what transformers calls pooler_output)."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.layers = nn.ModuleList(CLIPLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, input_ids, attention_mask=None):
        """input_ids (B, L <= 77) with an end-of-text token per row -> pooled (B, hidden)."""
        B, L = input_ids.shape
        x = self.token_embedding(input_ids) + self.position_embedding.weight[:L]
        low = torch.finfo(x.dtype).min  # transformers' additive masks, in the states' dtype
        masks = [torch.full((L, L), low, dtype=x.dtype, device=x.device).triu(1)[None, None]]
        if attention_mask is not None:  # the official code passes it; it cannot change the pooled token
            keep = attention_mask.to(x.device, torch.bool)[:, None, None, :]
            masks.append(torch.zeros(keep.shape, dtype=x.dtype, device=x.device).masked_fill(~keep, low))
        for layer in self.layers:
            x = layer(x, masks)
        x = self.final_layer_norm(x)
        if self.cfg.eos_token_id is None:
            # Old CLIP configs (openai's included) declare eos_token_id = 2, which is wrong; transformers then
            # pools at the largest id, which is end-of-text (49407) in CLIP's vocabulary.
            eos = input_ids.argmax(dim=-1)
        else:
            eos = (input_ids == self.cfg.eos_token_id).int().argmax(dim=-1)  # first end-of-text token
        return x[torch.arange(B, device=x.device), eos]

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, device="cpu"):
        """A Hugging Face CLIPModel or CLIPTextModel folder: config.json + *.safetensors (text_model.*)."""
        d = read_config(path, "clip")
        d = d.get("text_config", d)
        # keys config.json leaves out take transformers' CLIPTextConfig defaults
        defaults = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                        num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu",
                        layer_norm_eps=1e-5, eos_token_id=49407)
        cfg = CLIPTextConfig(**{f.name: d.get(f.name, defaults[f.name]) for f in fields(CLIPTextConfig)})
        if cfg.eos_token_id == 2:  # the legacy value, see forward
            cfg.eos_token_id = None

        def rename(k):  # [text_model.]embeddings.token_embedding.weight -> token_embedding.weight, etc.
            k = k.removeprefix("text_model.")  # transformers 5 saves a CLIPTextModel without it
            if k.startswith(("vision_model.", "visual_projection.", "text_projection.", "logit_scale")) \
                    or k.endswith("position_ids"):  # the image side; position_ids: a buffer old files stored
                return None
            return k.replace("embeddings.", "").replace("encoder.", "")
        return load_model(cls, cfg, path, rename, dtype, device)


# ----------------------------------------------------------------------------------------------------------
# CLIP vision tower (openai/clip-vit-large-patch14, and the 336-pixel tower inside LLaVA) and its image
# preprocessing. curate.py embeds frames with it (paper §3.1: de-duplication and concept balancing).

# transformers' OPENAI_CLIP_MEAN / OPENAI_CLIP_STD: the per-channel statistics OpenAI's CLIP was trained with
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_image_preprocess(images, size=224):
    """list of HxWx3 uint8 RGB arrays -> pixel_values (B, 3, size, size) float32, as transformers'
    CLIPImageProcessor with PIL (transformers 4's default slow processor, CLIPImageProcessorPil in 5; the
    torchvision-backed default of 5 resizes differently): the shortest side resized to `size` with PIL's
    bicubic filter, a centred size x size crop, x / 255, CLIP's mean and std."""
    try:
        from PIL import Image
    except ImportError:
        raise ImportError("clip_image_preprocess needs Pillow (pip install pillow): CLIP's bicubic resize is "
                          "PIL's, which OpenCV does not reproduce") from None
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32)[:, None, None]
    std = torch.tensor(CLIP_STD, dtype=torch.float32)[:, None, None]
    out = []
    for im in images:
        if not (isinstance(im, np.ndarray) and im.dtype == np.uint8 and im.ndim == 3 and im.shape[2] == 3):
            raise ValueError(f"clip_image_preprocess takes HxWx3 uint8 RGB arrays, got "
                             f"{getattr(im, 'dtype', type(im))} {getattr(im, 'shape', '')}; convert frames "
                             f"first (cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))")
        h, w = im.shape[:2]
        long = int(size * max(h, w) / min(h, w))  # truncated, as transformers does
        nh, nw = (long, size) if w <= h else (size, long)
        im = np.asarray(Image.fromarray(np.ascontiguousarray(im)).resize((nw, nh), resample=Image.BICUBIC))
        top, left = (nh - size) // 2, (nw - size) // 2
        x = torch.from_numpy(im[top:top + size, left:left + size].copy()).permute(2, 0, 1)
        # transformers rescales in float64, rounds to float32, then normalises in float32
        out.append(((x.double() * (1 / 255)).float() - mean) / std)
    return torch.stack(out)


class CLIPVisionEncoder(nn.Module):
    """CLIP's vision transformer: patches + CLS + positions, pre-LayerNorm blocks; called, it returns what
    transformers' CLIPModel.get_image_features returns (the CLS state, post-normed and projected)."""

    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.cfg = cfg
        self.image_size = cfg.image_size
        D, P = cfg.hidden_size, cfg.patch_size
        self.class_embedding = nn.Parameter(torch.zeros(D))
        self.patch_embedding = nn.Conv2d(3, D, kernel_size=P, stride=P, bias=False)
        self.position_embedding = nn.Embedding((cfg.image_size // P) ** 2 + 1, D)
        self.pre_layrnorm = nn.LayerNorm(D, eps=cfg.layer_norm_eps)  # sic: the checkpoint's key
        self.layers = nn.ModuleList(CLIPLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.post_layernorm = nn.LayerNorm(D, eps=cfg.layer_norm_eps)
        if cfg.projection_dim is not None:
            self.visual_projection = nn.Linear(D, cfg.projection_dim, bias=False)

    def hidden_states(self, pixel_values, indices):
        """pixel_values (B, 3, S, S) -> [transformers' hidden_states[i] for i in indices], each (B, 1 + N, D):
        index 0 is the pre-normed embeddings, i the output of block i, negative indices count from the end."""
        B, _, H, W = pixel_values.shape
        if H != self.image_size or W != self.image_size:
            raise ValueError(f"pixel_values are {H}x{W}, this CLIP vision tower takes {self.image_size}x"
                             f"{self.image_size}: use clip_image_preprocess(images, size={self.image_size})")
        n = len(self.layers)
        assert all(-n - 1 <= i <= n for i in indices), f"hidden-state indices must be in -{n + 1}..{n}"
        want = [i % (n + 1) for i in indices]
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight))  # its device and dtype
        x = x.flatten(2).transpose(1, 2)  # (B, N, D), patches in raster order
        x = torch.cat([self.class_embedding.expand(B, 1, -1), x], dim=1) + self.position_embedding.weight
        states = [self.pre_layrnorm(x)]
        for layer in self.layers[:max(want)]:
            states.append(layer(states[-1]))  # no mask: every patch sees every patch
        return [states[i] for i in want]

    def forward(self, pixel_values):
        """pixel_values (B, 3, S, S) -> image embeddings (B, projection_dim), not normalised."""
        assert self.cfg.projection_dim is not None, "a tower without visual_projection: use hidden_states"
        x = self.hidden_states(pixel_values, [-1])[0]
        return self.visual_projection(self.post_layernorm(x[:, 0]))

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, device="cpu"):
        """A Hugging Face CLIPModel folder (config.json with a vision_config, e.g. the official
        ckpts/text_encoder_2) or a CLIPVisionModelWithProjection folder: config.json + *.safetensors."""
        d = read_config(path, "clip_vision")
        cfg = clip_vision_config_from_hf(d.get("vision_config", d))
        # a CLIPModel's projection width is its top-level projection_dim, not the vision config's
        cfg.projection_dim = d.get("projection_dim", 512) if "vision_config" in d else cfg.projection_dim

        def rename(k):
            # a full CLIPModel also holds the text tower: skipped by name, every vision key must fit
            if k.startswith(("text_model.", "text_projection.", "logit_scale")):
                return None
            return clip_vision_key(k.removeprefix("vision_model."))
        return load_model(cls, cfg, path, rename, dtype, device)


def clip_vision_config_from_hf(d):
    """A CLIPVisionConfig from a transformers vision config dict; missing keys take transformers' defaults."""
    defaults = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                    image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                    projection_dim=512)
    if d.get("num_channels", 3) != 3:
        raise ValueError(f"CLIP vision config has num_channels={d['num_channels']}; only RGB (3) is "
                         f"supported")
    return CLIPVisionConfig(**{f.name: d.get(f.name, defaults[f.name]) for f in fields(CLIPVisionConfig)})


def clip_vision_key(k):
    """A transformers CLIP vision key without its model prefix -> ours (None: a buffer, not a weight)."""
    if k.endswith("position_ids"):  # a buffer older files stored
        return None
    return k.replace("embeddings.", "").replace("encoder.", "")


# ----------------------------------------------------------------------------------------------------------
# LLaVA (llava-llama-3-8b-v1_1: the full model whose language model is the official text encoder), the
# vision-language model curate.py captions clips with (paper §3.2: structured captions from a VLM)


class LlavaProjector(nn.Module):
    """The two-layer MLP from vision features to the LLM's embeddings: linear_2(gelu(linear_1(x)))."""

    def __init__(self, cfg: LlavaConfig):
        super().__init__()
        n = 1 if isinstance(cfg.vision_feature_layer, int) else len(cfg.vision_feature_layer)
        D, bias = cfg.text.hidden_size, cfg.multimodal_projector_bias
        self.linear_1 = nn.Linear(cfg.vision.hidden_size * n, D, bias=bias)
        self.linear_2 = nn.Linear(D, D, bias=bias)

    def forward(self, x):
        return self.linear_2(F.gelu(self.linear_1(x)))


class Llava(nn.Module):
    """LLaVA as transformers' LlavaForConditionalGeneration: image features from a CLIP layer replace the
    image tokens' embeddings, then the LLaMA with its LM head decodes greedily. Module names are the
    checkpoint's."""

    def __init__(self, cfg: LlavaConfig):
        super().__init__()
        self.cfg = cfg
        self.vision_tower = CLIPVisionEncoder(cfg.vision)
        self.multi_modal_projector = LlavaProjector(cfg)
        self.language_model = LlamaEncoder(cfg.text)
        self.lm_head = nn.Linear(cfg.text.hidden_size, cfg.text.vocab_size, bias=False)
        # set by from_pretrained from the folder: generation stops, padding, tokenizer, chat template
        self.eos_token_ids, self.pad_token_id, self.tokenizer, self.chat_template = [], 0, None, None
        self.special_tokens = {}

    @property
    def image_size(self):
        return self.cfg.vision.image_size

    @property
    def num_image_tokens(self):
        """Image features per image: one per patch, plus CLS under the "full" strategy."""
        n = (self.cfg.vision.image_size // self.cfg.vision.patch_size) ** 2
        return n + (self.cfg.vision_feature_select_strategy == "full")

    def image_features(self, pixel_values):
        """pixel_values (B, 3, S, S) -> projected features (B, num_image_tokens, hidden)."""
        layers = self.cfg.vision_feature_layer
        layers = [layers] if isinstance(layers, int) else layers  # several: their states side by side
        states = self.vision_tower.hidden_states(pixel_values, layers)
        if self.cfg.vision_feature_select_strategy == "default":
            states = [h[:, 1:] for h in states]  # the CLS state is not an image token
        return self.multi_modal_projector(torch.cat(states, dim=-1))

    @torch.no_grad()
    def generate(self, input_ids, pixel_values, max_new_tokens, eos_token_id=None):
        """Greedy decoding with a KV cache, as transformers' generate(do_sample=False). input_ids (B, L), no
        padding, with the image token repeated num_image_tokens times where each image goes (as transformers'
        LlavaProcessor expands it), images in order; pixel_values (n_images, 3, S, S). eos_token_id: an id
        or a list (default: the folder's generation config). -> new ids (B, <= max_new_tokens); a row that
        has ended is filled with the pad id until every row has ended."""
        dev = self.lm_head.weight.device
        input_ids = input_ids.to(dev)
        B, L = input_ids.shape
        eos = self.eos_token_ids if eos_token_id is None else eos_token_id
        eos = torch.tensor([eos] if isinstance(eos, int) else list(eos), dtype=torch.long, device=dev)
        x = self.language_model.embed_tokens(input_ids)
        if pixel_values is not None:
            feats = self.image_features(pixel_values.to(dev))
            slots = input_ids == self.cfg.image_token_index
            if slots.sum() != feats.shape[0] * feats.shape[1]:
                raise ValueError(f"input_ids hold {int(slots.sum())} image tokens for {feats.shape[0]} "
                                 f"image(s) of {feats.shape[1]} features; repeat the image token "
                                 f"{feats.shape[1]} times per image (Llava.chat_input_ids does)")
            # features fill the image tokens' places in reading order, row by row
            x = x.masked_scatter(slots[..., None], feats.to(x.dtype))
        cache = [{} for _ in self.language_model.layers]
        h = self.language_model.decode(x, cache, 0)[:, -1]
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        out = []
        for step in range(max_new_tokens):
            tok = self.lm_head(h).argmax(dim=-1)
            tok = torch.where(done, torch.full_like(tok, self.pad_token_id), tok)
            out.append(tok)
            done |= torch.isin(tok, eos)
            if done.all() or step == max_new_tokens - 1:
                break
            x = self.language_model.embed_tokens(tok)[:, None]  # (B, 1, hidden): the token just chosen
            h = self.language_model.decode(x, cache, L + step)[:, -1]
        return torch.stack(out, dim=1) if out else input_ids.new_zeros(B, 0)

    @torch.no_grad()
    def chat(self, prompt, image, max_new_tokens=256):
        """Ask about one image (HxWx3 uint8 RGB) -> the answer as text. Stops at the generation config's
        end-of-sequence ids or at the token the chat template closes a turn with (Llama 3: <|eot_id|>)."""
        new = self.generate(self.chat_input_ids(prompt), clip_image_preprocess([image], self.image_size),
                            max_new_tokens, eos_token_id=self.eos_token_ids + self.end_of_turn_ids())
        return self.tokenizer.tok.decode(new[0].tolist(), skip_special_tokens=True)

    def chat_input_ids(self, prompt):
        """A user turn of an image and `prompt` in the model's own chat template, up to where the
        assistant's answer starts -> input_ids (1, L), the image token expanded to num_image_tokens (as
        LlavaProcessor does)."""
        text = self.render_chat([("user", prompt)])
        image = self.tokenizer.tok.id_to_token(self.cfg.image_token_index)
        ids = self.tokenizer._encode([text.replace(image, image * self.num_image_tokens)])[0]
        bos = self.tokenizer.bos
        # a template that writes bos_token itself gets no second one (transformers' apply_chat_template rule)
        return torch.tensor([ids if ids[:len(bos)] == bos else bos + ids])

    def end_of_turn_ids(self):
        """[the token the chat template writes right after an assistant's words], or [] if that is no
        special token. Llama 3's <|eot_id|> is not llava-llama-3's configured end of sequence, yet ends each
        answer."""
        mark = "\ue000"  # a private-use character no template writes
        text = self.render_chat([("user", "a"), ("assistant", mark)], add_generation_prompt=False)
        after = self.tokenizer._encode([text.split(mark, 1)[1]])[0] if mark in text else []
        specials = {i for i, t in self.tokenizer.tok.get_added_tokens_decoder().items() if t.special}
        return after[:1] if after and after[0] in specials else []

    def render_chat(self, turns, add_generation_prompt=True):
        """[(role, text)] -> the chat template's text, the image (one image token) in the first turn. As
        transformers renders it: jinja2 with trimmed blocks and loop controls. Templates that take typed
        content parts (transformers' processors) get an image part; templates written for plain strings get
        LLaVA's own convention, the image token on a line before the text."""
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment
        if self.chat_template is None:
            raise ValueError("this Llava folder's tokenizer_config.json has no chat_template; build "
                             "input_ids yourself (image token repeated num_image_tokens times) and call "
                             "generate()")

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.globals["raise_exception"] = raise_exception
        env.filters["tojson"] = lambda v, indent=None: json.dumps(v, indent=indent, ensure_ascii=False)
        template = env.from_string(self.chat_template)
        image = self.tokenizer.tok.id_to_token(self.cfg.image_token_index)
        if image is None:
            raise ValueError(f"the tokenizer has no token {self.cfg.image_token_index} (config.json's "
                             f"image_token_index); tokenizer and weights from different models?")
        typed = [{"role": role, "content": [{"type": "image"}] * (i == 0) + [{"type": "text", "text": text}]}
                 for i, (role, text) in enumerate(turns)]
        try:
            out = template.render(messages=typed, add_generation_prompt=add_generation_prompt,
                                  **self.special_tokens)
        except (TypeError, jinja2.exceptions.TemplateError):
            out = ""
        if image in out:  # the template understood the image part
            return out
        plain = [{"role": role, "content": f"{image}\n" * (i == 0) + text}
                 for i, (role, text) in enumerate(turns)]
        return template.render(messages=plain, add_generation_prompt=add_generation_prompt,
                               **self.special_tokens)

    @classmethod
    def from_pretrained(cls, path, dtype=torch.bfloat16, device="cpu"):
        """A Hugging Face LlavaForConditionalGeneration folder (config.json, *.safetensors, tokenizer.json,
        tokenizer_config.json; generation_config.json if present), e.g. llava-llama-3-8b-v1_1-transformers."""
        d = read_config(path, "llava")
        cfg = llava_config_from_hf(d, path)
        text = d.get("text_config", {})

        def rename(k):
            # transformers' in-memory layout adds "model."; the released folder (transformers 4) has
            # language_model.model.* and language_model.lm_head, vision_tower.vision_model.*; transformers 5
            # writes vision_tower.* without vision_model.
            k = k.removeprefix("model.")
            if "rotary_emb." in k:  # recomputed
                return None
            if k.startswith("language_model.lm_head."):
                return k.removeprefix("language_model.")
            if k.startswith("language_model."):
                return "language_model." + k.removeprefix("language_model.").removeprefix("model.")
            if k.startswith("vision_tower."):
                k = clip_vision_key(k.removeprefix("vision_tower.").removeprefix("vision_model."))
                return None if k is None else "vision_tower." + k
            return k
        model = load_model(cls, cfg, path, rename, dtype, device)
        gen = os.path.join(path, "generation_config.json")
        if os.path.isfile(gen):  # transformers' generate reads it first, else the model config
            with open(gen) as fh:
                gen = json.load(fh)
        else:
            gen = {k: d.get(k, text.get(k)) for k in ("eos_token_id", "pad_token_id")}
        eos = gen.get("eos_token_id")
        model.eos_token_ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        pad = gen.get("pad_token_id")
        model.pad_token_id = pad if pad is not None else (model.eos_token_ids or [0])[0]  # as transformers
        model.tokenizer = Tokenizer(path)
        # the chat template: in tokenizer_config.json (the released folder), or the file transformers 5 writes
        tok_cfg, jinja = (os.path.join(path, f) for f in ("tokenizer_config.json", "chat_template.jinja"))
        if os.path.isfile(jinja):
            with open(jinja) as fh:
                model.chat_template = fh.read()
        elif os.path.isfile(tok_cfg):
            with open(tok_cfg) as fh:
                model.chat_template = json.load(fh).get("chat_template")
        # the names a template may use for them; one the folder does not declare stays undefined (renders "")
        model.special_tokens = {name: tok for name in ("bos_token", "eos_token")
                                if (tok := _special_token(path, name)) is not None}
        return model


def llava_config_from_hf(d, path):
    """A LlavaConfig from a transformers LlavaConfig dict (path: for error messages)."""
    text, vision = dict(d.get("text_config") or {}), dict(d.get("vision_config") or {})
    if text.get("model_type", "llama") != "llama" or vision.get("model_type", "clip_vision_model") not in (
            "clip_vision_model", "clip"):
        raise ValueError(f"{path}/config.json: a LLaVA of {text.get('model_type')} + "
                         f"{vision.get('model_type')}; only a LLaMA language model with a CLIP vision "
                         f"tower is supported")
    if d.get("tie_word_embeddings") or text.get("tie_word_embeddings"):
        raise ValueError(f"{path}/config.json: tied word embeddings are not supported (llava-llama-3 has a "
                         f"separate lm_head)")
    # keys the released config leaves out take transformers' LlamaConfig defaults
    text = {**dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                   num_attention_heads=32), **text}
    strategy = d.get("vision_feature_select_strategy", "default")
    if strategy not in ("default", "full"):
        raise ValueError(f"{path}/config.json: vision_feature_select_strategy {strategy!r} is not supported "
                         f"(default, full)")
    act = d.get("projector_hidden_act", "gelu")
    if act != "gelu":
        raise ValueError(f"{path}/config.json: projector_hidden_act {act!r}; only gelu is supported")
    return LlavaConfig(text=llama_config_from_hf(text, path),
                       vision=replace(clip_vision_config_from_hf(vision), projection_dim=None),
                       image_token_index=d.get("image_token_index", d.get("image_token_id", 32000)),
                       vision_feature_layer=d.get("vision_feature_layer", -2),
                       vision_feature_select_strategy=strategy,
                       multimodal_projector_bias=d.get("multimodal_projector_bias", True))


# ----------------------------------------------------------------------------------------------------------
# Loading Hugging Face folders


def read_config(path, kind):
    """A folder's config.json as a dict, after checking that it is a `kind` model ("llama", "clip",
    "clip_vision" or "llava")."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{kind} model folder {path!r} does not exist; pass the folder holding "
                                f"config.json and *.safetensors (official text encoders: ckpts/text_encoder, "
                                f"ckpts/text_encoder_2)")
    f = os.path.join(path, "config.json")
    if not os.path.isfile(f):
        raise FileNotFoundError(f"{f} is missing; {path!r} must be a Hugging Face model folder "
                                f"(config.json + *.safetensors)")
    with open(f) as fh:
        d = json.load(fh)
    mt = d.get("model_type")
    if kind == "llama" and mt == "llava":
        raise ValueError(f"{f} describes a full llava model; extract its language model first, as the "
                         f"official hyvideo/utils/preprocess_text_encoder_tokenizer_utils.py does")
    allowed = {"llama": ("llama",), "clip": ("clip", "clip_text_model"),
               "clip_vision": ("clip", "clip_vision_model"), "llava": ("llava",)}[kind]
    if mt is not None and mt not in allowed:
        raise ValueError(f"{f} has model_type {mt!r}, expected a {kind} checkpoint; wrong folder?")
    return d


def llama_config_from_hf(d, path):
    """A LlamaConfig from a transformers config.json dict (path: for error messages)."""
    # rope: transformers < 5 writes rope_theta + rope_scaling, transformers >= 5 writes rope_parameters
    rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
    theta = d.get("rope_theta", rope.pop("rope_theta", 10000.0))  # 10000: transformers' default
    if d.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{path}/config.json: hidden_act {d['hidden_act']!r}; only LLaMA's silu is "
                         "supported")
    try:
        return LlamaConfig(
            vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"], num_attention_heads=d["num_attention_heads"],
            num_key_value_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
            head_dim=d.get("head_dim"), rms_norm_eps=d.get("rms_norm_eps", 1e-6), rope_theta=float(theta),
            rope_scaling=rope if rope_type(rope) != "default" else None,
            attention_bias=d.get("attention_bias", False), mlp_bias=d.get("mlp_bias", False))
    except KeyError as e:
        raise ValueError(f"{path}/config.json lacks {e}; is this a LLaMA checkpoint folder?") from None


def load_model(cls, cfg, path, rename, dtype, device):
    """Build cls(cfg) without allocating random weights, fill it from the folder's safetensors. rename maps a
    file's key to ours (None: not ours, skipped). Every key and shape is checked before any weight is read."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as fh:
            files = sorted(set(json.load(fh)["weight_map"].values()))
        files = [os.path.join(path, f) for f in files]
        for f in files:
            if not os.path.isfile(f):
                raise FileNotFoundError(f"{f} is listed in {index} but missing; re-download the checkpoint")
    else:
        files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {path!r}; save the model with save_pretrained "
                                f"(safe_serialization=True) or download its .safetensors files")
    with torch.device("meta"):
        model = cls(cfg)
    from safetensors import safe_open
    found = {f: [] for f in files}  # per file: (our name, its key)
    shapes = {}                     # our name -> a meta tensor of the file's shape (no data read yet)
    for f in files:
        with safe_open(f, framework="pt") as fh:
            for key in fh.keys():
                name = rename(key)
                if name is not None:
                    found[f].append((name, key))
                    shapes[name] = torch.empty(fh.get_slice(key).get_shape(), device="meta")
    check_state_dict(model, shapes, path, "incomplete download, wrong folder, or a config.json that does not "
                     "match the weights?")
    sd = {}
    for f, pairs in found.items():
        with safe_open(f, framework="pt") as fh:
            sd.update({name: fh.get_tensor(key).to(device=device, dtype=dtype) for name, key in pairs})
    model.load_state_dict(sd, assign=True)
    return model.eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------------------
# Tokenizers


def _special_token(path, name):
    """A special token's string from tokenizer_config.json / special_tokens_map.json, or None."""
    for f in ("tokenizer_config.json", "special_tokens_map.json"):
        f = os.path.join(path, f)
        if os.path.isfile(f):
            with open(f) as fh:
                tok = json.load(fh).get(name)
            if tok is not None:
                return tok["content"] if isinstance(tok, dict) else tok
    return None


class Tokenizer:
    """Strings -> right-padded (ids, mask) of a fixed length, truncating like transformers (the text's end is
    cut, the special tokens kept). Reads a folder with CLIP's vocab.json + merges.txt, a folder with a
    tokenizer.json (Llama 3), or a SentencePiece .model file (our small models)."""

    def __init__(self, path):
        if not os.path.exists(path):
            raise FileNotFoundError(f"tokenizer {path!r} does not exist; pass a folder with tokenizer.json "
                                    f"(or vocab.json + merges.txt), or a SentencePiece .model file")
        if os.path.isfile(path):  # SentencePiece
            import sentencepiece
            sp = sentencepiece.SentencePieceProcessor(model_file=path)
            self._encode = lambda texts, fix_text=False: sp.encode(texts)
            self.bos = [sp.bos_id()] if sp.bos_id() >= 0 else []
            self.eos = [sp.eos_id()] if sp.eos_id() >= 0 else []
            self.pad_id = max(sp.pad_id(), 0)
            self.vocab_size = sp.get_piece_size()
            return
        import tokenizers
        vocab, merges, tok_json = (os.path.join(path, name)
                                   for name in ("vocab.json", "merges.txt", "tokenizer.json"))
        if os.path.isfile(vocab) and os.path.isfile(merges):
            # CLIP: its tokenizer.json follows transformers' fast tokenizer, which splits CJK text differently
            # from the (slow) CLIPTokenizer the official code uses; rebuild the latter from the BPE files
            tok, clean = clip_bpe_tokenizer(path), clip_clean
        elif os.path.isfile(tok_json):
            tok = tokenizers.Tokenizer.from_file(tok_json)
            tok.no_truncation()
            tok.no_padding()
            clean = None
        else:
            raise FileNotFoundError(f"{path!r} has neither tokenizer.json nor vocab.json + merges.txt")
        self._encode = lambda texts, fix_text=False: [e.ids for e in tok.encode_batch(
            [clean(t, fix_text) for t in texts] if clean else texts, add_special_tokens=False)]
        # which special tokens wrap a text (Llama 3: BOS only; CLIP: start and end of text), read off a probe
        full, body = tok.encode("a").ids, tok.encode("a", add_special_tokens=False).ids
        i = next(i for i in range(len(full) - len(body) + 1) if full[i:i + len(body)] == body)
        self.bos, self.eos = full[:i], full[i + len(body):]
        pad = _special_token(path, "pad_token")
        # no pad token declared: any id will do, padding is masked out of every real token's state
        self.pad_id = tok.token_to_id(pad) if pad is not None and tok.token_to_id(pad) is not None else 0
        self.vocab_size = tok.get_vocab_size()
        self.tok = tok

    @property
    def eos_id(self):
        return self.eos[-1] if self.eos else None

    def __call__(self, texts, max_length, shown=None, fix_text=False):
        """list of str -> ids, mask: LongTensors (B, max_length). shown: what a truncation warning quotes.
        fix_text: CLIP's clean-up with ftfy (clip_clean), as the image-to-video release ran it."""
        budget = max_length - len(self.bos) - len(self.eos)
        ids = torch.full((len(texts), max_length), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(texts), max_length, dtype=torch.long)
        for i, (text, body) in enumerate(zip(shown or texts, self._encode(list(texts), fix_text))):
            if len(body) > budget:
                warnings.warn(f"{len(body) + len(self.bos) + len(self.eos)} tokens, truncated to "
                              f"{max_length}: {text[:80]!r}...")
            row = self.bos + body[:budget] + self.eos
            ids[i, :len(row)] = torch.tensor(row)
            mask[i, :len(row)] = 1
        return ids, mask


# The CJK ranges transformers' BasicTokenizer puts spaces around (each ideograph becomes a word of its own)
_CJK = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F), (0x2B740, 0x2B81F),
        (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))
_CLIP_SPECIALS = re.compile(r"(<\|startoftext\|>|<\|endoftext\|>)")


def clip_clean(text, fix_text=False):
    """The text clean-up of the transformers CLIPTokenizer the official code instantiates. Text-to-video's
    environment has no ftfy, so its BasicTokenizer runs, in this order: control characters dropped and
    whitespace made spaces; spaces around each CJK ideograph; NFC; split on whitespace; each word lower-cased
    by Python (str.lower: a word-final capital sigma becomes the final form). fix_text: the branch taken
    where ftfy is installed, as in the image-to-video release's environment (its requirements.txt installs
    OpenAI's CLIP, which needs ftfy): ftfy.fix_text (curly quotes straightened, full-width forms and
    ligatures made plain, mojibake repaired), runs of whitespace made one space, lower case; no CJK spacing.
    Either way the two special tokens typed literally in a prompt are matched on the raw text first, as
    transformers does, and left as they are."""
    if fix_text:
        try:
            import ftfy
        except ImportError:
            raise RuntimeError("image-to-video prompts need ftfy, which the official I2V CLIP tokenizer "
                               "cleans them with: pip install ftfy") from None
    out = []
    for piece in _CLIP_SPECIALS.split(text):
        if _CLIP_SPECIALS.fullmatch(piece):
            out.append(piece)
            continue
        if fix_text:
            out.append(re.sub(r"\s+", " ", ftfy.fix_text(piece)).strip().lower())
            continue
        chars = []
        for ch in piece:
            cp, cat = ord(ch), unicodedata.category(ch)
            if cp == 0 or cp == 0xFFFD or (cat.startswith("C") and ch not in "\t\n\r"):
                continue
            if ch in " \t\n\r" or cat == "Zs":
                chars.append(" ")
            elif any(lo <= cp <= hi for lo, hi in _CJK):
                chars.append(f" {ch} ")
            else:
                chars.append(ch)
        out.extend(w.lower() for w in unicodedata.normalize("NFC", "".join(chars)).split())
    return " ".join(out)


def clip_bpe_tokenizer(path):
    """CLIP's tokenizer from vocab.json + merges.txt as the official (slow, transformers) CLIPTokenizer:
    text cleaned by clip_clean (in Python, before this tokenizer), then OpenAI CLIP's word pattern, byte-level
    BPE with an end-of-word '</w>', and <|startoftext|> ... <|endoftext|> around the text. The two specials
    are added tokens, so a literal one in a prompt gets its id (and CLIP's pooling stops at the first
    end-of-text)."""
    from tokenizers import AddedToken, Regex, Tokenizer as HFTokenizer, models, pre_tokenizers, processors
    with open(os.path.join(path, "vocab.json"), encoding="utf-8") as fh:
        vocab = json.load(fh)
    with open(os.path.join(path, "merges.txt"), encoding="utf-8") as fh:
        merges = [tuple(m.split()) for m in fh.read().split("\n") if m and not m.startswith("#version")]
    merges = merges[:49152 - 256 - 2]  # as CLIPTokenizer (and OpenAI's): 49152 tokens less bytes and specials
    tok = HFTokenizer(models.BPE(vocab, merges, unk_token="<|endoftext|>", end_of_word_suffix="</w>",
                                 continuing_subword_prefix="", fuse_unk=False))
    # OpenAI CLIP's word pattern; the pieces it matches are kept, whitespace between them dropped
    words = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(words), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bos, eos = "<|startoftext|>", "<|endoftext|>"
    tok.add_special_tokens([AddedToken(bos, normalized=False, special=True),
                            AddedToken(eos, normalized=False, special=True)])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", special_tokens=[(bos, vocab[bos]), (eos, vocab[eos])])
    return tok


# ----------------------------------------------------------------------------------------------------------
# The prompt path: strings -> (text, text_mask, pooled), as the DiT takes them


class PromptEncoder:
    """The official prompt path (hyvideo/text_encoder + pipeline encode_prompt), for batches of prompts.

    Image mode (video_length == 1) uses the image template but, as the official code, the video template's
    token budget (text_len + 95 = 351; official inference.py sets max_length from the video template's
    crop_start in both modes) and crops the image template's 36: `text` is (B, 315, D) there, (B, 256, D) for
    video. The length matters beyond long prompts: the padded length changes the LLM's
    attention arithmetic, so even short prompts' states differ in fp16 if it is not the official one.
    """

    def __init__(self, llm, clip, llm_tokenizer, clip_tokenizer, templates=PROMPT_TEMPLATE,
                 text_len=TEXT_LEN, clip_len=CLIP_LEN, skip_layers=2, device=None, offload=None, llava=None,
                 i2v_template=PROMPT_TEMPLATE_I2V):
        """templates: PROMPT_TEMPLATE, or None for raw prompts (our small models). offload: None (encoders
        stay where they are), "model" (kept on CPU, each moved to `device` for its call) or "layer" (the
        LLM's layers streamed to `device` one at a time; slow, but only one layer of GPU memory).
        llava: the full Llava whose language_model is `llm`, for image prompts (HunyuanVideo-I2V), read
        with i2v_template."""
        assert offload in (None, "model", "layer"), "offload must be None, 'model' or 'layer'"
        assert llava is None or llava.language_model is llm, "llm must be the llava's language model"
        self.llava, self.i2v_template = llava, i2v_template
        self.llm, self.clip, self.llm_tok, self.clip_tok = llm, clip, llm_tokenizer, clip_tokenizer
        self.templates, self.text_len, self.clip_len = templates, text_len, clip_len
        self.skip_layers = skip_layers
        self.device = torch.device(device) if device is not None else llm.embed_tokens.weight.device
        self.offload = offload
        if llava is not None:  # image-to-video: the release ran transformers 4.39, whose CLIP attention (the
            for m in [*clip.modules(), *llava.vision_tower.modules()]:  # text and vision towers') is eager
                if isinstance(m, CLIPAttention):
                    m.eager = True
        # names the encoders in cache keys: configs, settings and a few weights (seeds, checkpoints differ)
        probe = (llm.cfg, clip.cfg, templates, text_len, clip_len, skip_layers,
                 llm.embed_tokens.weight[0, :8].tolist(), clip.token_embedding.weight[0, :8].tolist())
        self.fingerprint = hashlib.sha256(repr(probe).encode()).hexdigest()[:16]
        if offload:
            (llava or llm).to("cpu")
            clip.to("cpu")
        for name, t in (templates or {}).items():
            # crop_start must be the template's token count before the prompt with this tokenizer
            n = len(llm_tokenizer.bos) + len(llm_tokenizer._encode([t["template"].split("{}")[0]])[0])
            if n != t["crop_start"]:
                raise ValueError(f"template {name!r} has crop_start {t['crop_start']} but this tokenizer "
                                 f"gives {n} tokens before the prompt; not llava-llama-3's tokenizer?")
        if llava is not None:  # the I2V template's positions, checked the same way
            t = i2v_template
            head = llm_tokenizer.bos + llm_tokenizer._encode([t["template"].split("{}")[0]])[0]
            tail = llm_tokenizer._encode([t["template"].split("{}")[1]])[0]
            got = (len(head), head.index(llava.cfg.image_token_index) if llava.cfg.image_token_index in head
                   else None, llava.num_image_tokens, tail[-1])
            want = tuple(t[k] for k in ("crop_start", "image_emb_start", "image_emb_len",
                                        "double_return_token_id"))
            if got != want:
                raise ValueError(f"the I2V template's (crop_start, image_emb_start, image_emb_len, "
                                 f"double_return_token_id) are {want}, this LLaVA and tokenizer give {got}; "
                                 f"not llava-llama-3-8b-v1_1?")
            # how many of those "\n\n" come before the prompt (official: 3; one more closes the assistant)
            self.i2v_returns_before = head.count(t["double_return_token_id"])

    @classmethod
    def from_pretrained(cls, llm_dir, clip_dir, dtype=torch.float16, device="cuda", offload=None, **kw):
        """The official folders (ckpts/text_encoder, ckpts/text_encoder_2), weights and tokenizers; fp16 is
        the official --text-encoder-precision. kw: templates, text_len, ... as in __init__."""
        load_to = "cpu" if offload else device
        llava = None
        if os.path.isfile(os.path.join(llm_dir, "config.json")):
            with open(os.path.join(llm_dir, "config.json")) as fh:
                is_llava = json.load(fh).get("model_type") == "llava"
            if is_llava:  # HunyuanVideo-I2V's text_encoder_i2v: the whole llava-llama-3-8b-v1_1
                llava = Llava.from_pretrained(llm_dir, dtype, load_to)
        llm = LlamaEncoder.from_pretrained(llm_dir, dtype, load_to) if llava is None else llava.language_model
        clip = CLIPTextEncoder.from_pretrained(clip_dir, dtype, load_to)
        return cls(llm, clip, Tokenizer(llm_dir), Tokenizer(clip_dir), device=device, offload=offload,
                   llava=llava, **kw)

    @classmethod
    def tiny(cls, tokenizer, seed=0, text_len=TEXT_LEN, device="cpu"):
        """Frozen random encoders of LLM/CLIP_CONFIGS["tiny"] on one small tokenizer, for train.py's demo."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            llm = LlamaEncoder(replace(LLM_CONFIGS["tiny"], vocab_size=tokenizer.vocab_size))
            clip = CLIPTextEncoder(replace(CLIP_CONFIGS["tiny"], vocab_size=tokenizer.vocab_size,
                                           eos_token_id=tokenizer.eos_id))
        llm, clip = (m.to(device).eval().requires_grad_(False) for m in (llm, clip))
        return cls(llm, clip, tokenizer, tokenizer, templates=None, text_len=text_len, device=device)

    @torch.no_grad()
    def encode(self, prompts, video_length=129):
        """list of str -> text (B, N, D_llm), text_mask (B, N) long, pooled (B, D_clip); N = text_len for
        video (and without templates), text_len + 95 - 36 for an image (see the class docstring)."""
        prompts = [p.strip() for p in prompts]  # the official sampler strips prompts
        tpl = None if self.templates is None else self.templates[
            "dit-llm-encode-video" if video_length > 1 else "dit-llm-encode"]
        crop = 0 if tpl is None else tpl["crop_start"]
        budget = self.text_len + (0 if tpl is None else self.templates["dit-llm-encode-video"]["crop_start"])
        llm_in = prompts if tpl is None else [tpl["template"].format(p) for p in prompts]
        ids, mask = self.llm_tok(llm_in, budget, shown=[f"LLM prompt {p}" for p in prompts])
        if self.offload == "model":
            self.llm.to(self.device)
        text = self.llm(ids.to(self.device), mask.to(self.device), skip_layers=self.skip_layers,
                        stream_to=self.device if self.offload == "layer" else None)
        if self.offload == "model":
            self.llm.to("cpu")
        # drop the template's tokens; what is left is the prompt and the closing <|eot_id|>, then padding
        text, mask = text[:, crop:], mask[:, crop:].to(self.device)

        ids2, mask2 = self.clip_tok(prompts, self.clip_len, shown=[f"CLIP prompt {p}" for p in prompts])
        if self.offload:
            self.clip.to(self.device)
        pooled = self.clip(ids2.to(self.device), mask2.to(self.device))
        if self.offload:
            self.clip.to("cpu")
        return text, mask, pooled

    @torch.no_grad()
    def encode_i2v(self, prompts, images, interleave=IMAGE_EMBED_INTERLEAVE["token_replace"]):
        """HunyuanVideo-I2V's prompt path (official hyvideo/text_encoder/__init__.py, encode in i2v_mode):
        prompts, each with its image (HxWx3 uint8 RGB) -> text (B, 576 / interleave + text_len - 4, D),
        text_mask, pooled. The LLaVA reads the I2V template with the image's 576 features in place of
        "<image>"; the DiT gets every interleave-th image state, then the prompt's states (the template's
        head and the assistant header's 4 tokens cropped off; the closing "\n\n" and the padding kept),
        with the text mask after a block of ones. pooled: CLIP's text vector, as for text-to-video."""
        if self.llava is None:
            raise ValueError("image prompts need the full LLaVA (HunyuanVideo-I2V's text_encoder_i2v folder, "
                             "llava-llama-3-8b-v1_1-transformers), not its language model alone")
        tpl, llava = self.i2v_template, self.llava
        prompts = [p.strip() for p in prompts]
        crop, start, n_img = tpl["crop_start"], tpl["image_emb_start"], llava.num_image_tokens
        ids, mask = self.llm_tok([tpl["template"].format(p) for p in prompts], self.text_len + crop,
                                 shown=[f"LLM prompt {p}" for p in prompts])
        B, L = ids.shape
        # "<image>" -> n_img positions, as the official run's transformers (legacy LLaVA merge) laid it out
        ids_x = torch.cat([ids[:, :start], ids[:, start:start + 1].expand(B, n_img), ids[:, start + 1:]], 1)
        mask_x = torch.cat([mask[:, :start], torch.ones(B, n_img, dtype=mask.dtype), mask[:, start + 1:]], 1)
        if self.offload == "model":
            llava.to(self.device)
        elif self.offload == "layer":  # everything but the LLM's layers, which stream
            for m in (llava.vision_tower, llava.multi_modal_projector):
                m.to(self.device)
        pixels = clip_image_preprocess(images, llava.image_size).to(self.device)
        x = llava.language_model.embed_tokens(ids_x.to(llava.language_model.embed_tokens.weight.device))
        x = x.to(self.device)
        x[:, start:start + n_img] = llava.image_features(pixels).to(x.dtype)
        h = self.llm(ids_x, mask_x.to(self.device), skip_layers=self.skip_layers, embeds=x,
                     stream_to=self.device if self.offload == "layer" else None)
        if self.offload:
            llava.to("cpu")
        # official crop, per row: idx = the last "\n\n" (the assistant header's), or L if the prompt was cut
        # before it; hidden position p - 1 + n_img is token p's for p past the image
        dr = tpl["double_return_token_id"]
        text, text_mask = [], []
        for i in range(B):
            hits = (ids[i] == dr).nonzero().flatten().tolist()
            idx = L if len(hits) == self.i2v_returns_before else hits[-1]
            text.append(torch.cat([h[i, crop - 1 + n_img:idx - 5 + n_img], h[i, idx - 1 + n_img:]]))
            text_mask.append(torch.cat([mask[i, crop:idx - 4], mask[i, idx:]]))
        image = h[:, start:start + n_img:interleave]
        text = torch.cat([image, torch.stack(text)], 1)
        text_mask = torch.cat([torch.ones(B, image.shape[1], dtype=mask.dtype), torch.stack(text_mask)], 1)

        # the I2V release's CLIP tokenizer cleaned the text with ftfy (clip_clean)
        ids2, mask2 = self.clip_tok(prompts, self.clip_len, shown=[f"CLIP prompt {p}" for p in prompts],
                                    fix_text=True)
        if self.offload:
            self.clip.to(self.device)
        pooled = self.clip(ids2.to(self.device), mask2.to(self.device))
        if self.offload:
            self.clip.to("cpu")
        return text, text_mask.to(self.device), pooled

    def __call__(self, prompts, video_length=129, cache_dir=None, images=None,
                 interleave=IMAGE_EMBED_INTERLEAVE["token_replace"]):
        """encode(), optionally through a cache: one safetensors file per prompt in cache_dir, keyed by the
        prompt, image/video mode and the encoders' fingerprint. images (one per prompt): encode_i2v, never
        cached."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if images is not None:
            return self.encode_i2v(prompts, images, interleave)
        if cache_dir is None:
            return self.encode(prompts, video_length)
        from safetensors.torch import load_file, save_file
        mode = "image" if video_length == 1 else "video"
        keys = [hashlib.sha256(f"{self.fingerprint}|{mode}|{p.strip()}".encode()).hexdigest()
                for p in prompts]
        files = [os.path.join(cache_dir, k + ".safetensors") for k in keys]
        todo = [i for i, f in enumerate(files) if not os.path.isfile(f)]
        if todo:
            os.makedirs(cache_dir, exist_ok=True)
            text, mask, pooled = self.encode([prompts[i] for i in todo], video_length)
            for j, i in enumerate(todo):
                tmp = f"{files[i]}.{os.getpid()}.tmp"  # write then rename: readers never see half a file
                save_file({"text": text[j].contiguous().cpu(), "text_mask": mask[j].contiguous().cpu(),
                           "pooled": pooled[j].contiguous().cpu()}, tmp, metadata={"prompt": prompts[i]})
                os.replace(tmp, files[i])
        rows = [load_file(f, device=str(self.device)) for f in files]
        return tuple(torch.stack([r[k] for r in rows]) for k in ("text", "text_mask", "pooled"))
