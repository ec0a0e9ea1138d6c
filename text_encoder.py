"""
HunyuanVideo's two text encoders and the official prompt path (paper §4.3, official `hyvideo/text_encoder`).

A prompt is read twice:
  - by a decoder-only LLM, the language model of llava-llama-3-8b (32 layers, width 4096). The prompt is
    wrapped in a system-instruction template, the hidden state after layer 30 of 32 is kept (what
    transformers calls `hidden_states[-3]`, no final norm), and the template's tokens are cropped off:
    `text` (B, 256, 4096) with its right-padded `text_mask` (B, 256);
  - by CLIP ViT-L/14's text tower, whose final-normed state at the end-of-text token is `pooled` (B, 768).
Both read the Hugging Face folders the official repo uses (config.json + *.safetensors, tokenizer files),
so sampling the released model needs no `transformers`. Tokenizer files are read with `tokenizers`.

Numerics follow the official fp16 run (transformers 4.46.3): RMSNorm normalises in fp32, RoPE tables are
built in fp32 from frequencies rounded to the weights' dtype and cast to it, everything else runs in the
weights' dtype. (On CPU, small random checkpoints gave fp32 and fp16 outputs identical to transformers'.)

Use (sample.py):
    pe = PromptEncoder.from_pretrained("ckpts/text_encoder", "ckpts/text_encoder_2", device="cuda")
    text, text_mask, pooled = pe([NEGATIVE_PROMPT, prompt], video_length=129)  # CFG: [negative; positive]
offload="model" or "layer" keeps the 8B weights on the CPU between calls.

Read top to bottom: configs, prompt templates, the LLaMA decoder, the CLIP text tower, loading the two
from Hugging Face folders, tokenizers, then the prompt encoder that runs a prompt through all of them.
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
from dataclasses import dataclass, fields, replace

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


def rope_tables(cfg, length, dtype, device):
    """cos, sin (length, head_dim) in `dtype` for positions 0..length-1, with the checkpoint's rope scaling.
    """
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

    def forward(self, x, cos, sin, mask):
        B, L, _ = x.shape
        q = self.q_proj(x).view(B, L, self.nh, self.hd).transpose(1, 2)   # (B, nh, L, hd)
        k = self.k_proj(x).view(B, L, self.nkv, self.hd).transpose(1, 2)  # (B, nkv, L, hd)
        v = self.v_proj(x).view(B, L, self.nkv, self.hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # query head h reads key/value head h // (nh / nkv)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.nh != self.nkv)
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

    def forward(self, x, cos, sin, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaEncoder(nn.Module):
    """A bare LLaMA decoder (no LM head) used as a text encoder. Module names are the checkpoint's keys."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, input_ids, attention_mask=None, skip_layers=2, stream_to=None):
        """input_ids (B, L); attention_mask (B, L), 1 = token, right-padded. Returns transformers'
        hidden_states[-(skip_layers + 1)]: the output of layer N - skip_layers without the final norm
        (HunyuanVideo: skip_layers=2, the official hidden_state_skip_layer in text_encoder/__init__.py), or
        with skip_layers=0 the final normed output. (B, L, hidden).
        stream_to: a device the weights (kept on CPU) visit one layer at a time, for CPU offload."""
        n = len(self.layers)
        assert 0 <= skip_layers <= n, f"skip_layers must be in 0..{n}"
        B, L = input_ids.shape
        x = self.embed_tokens(input_ids.to(self.embed_tokens.weight.device))
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
    """Causal multi-head self-attention with biased projections."""

    def __init__(self, cfg):
        super().__init__()
        self.nh = cfg.num_attention_heads
        D = cfg.hidden_size
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, D)
        self.out_proj = nn.Linear(D, D)

    def forward(self, x, mask):
        B, L, D = x.shape
        q, k, v = (p(x).view(B, L, self.nh, D // self.nh).transpose(1, 2)  # (B, nh, L, hd)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out_proj(o.transpose(1, 2).reshape(B, L, D))


class CLIPMLP(nn.Module):
    """fc1 -> quick GELU -> fc2."""

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

    def forward(self, x, mask):
        x = x + self.self_attn(self.layer_norm1(x), mask)
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
        mask = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()[None, None]
        if attention_mask is not None:  # the official code passes it; it cannot change the pooled token
            mask = mask & attention_mask.to(x.device, torch.bool)[:, None, None, :]
        for layer in self.layers:
            x = layer(x, mask)
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
# Loading Hugging Face folders


def read_config(path, kind):
    """A folder's config.json as a dict, after checking that it is a `kind` ("llama" or "clip") model."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{kind} text encoder folder {path!r} does not exist; pass the folder "
                                f"holding config.json and *.safetensors (official: ckpts/text_encoder, "
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
    if mt is not None and mt not in {"llama": ("llama",), "clip": ("clip", "clip_text_model")}[kind]:
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
            self._encode = sp.encode
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
        self._encode = lambda texts: [e.ids for e in tok.encode_batch(
            [clean(t) for t in texts] if clean else texts, add_special_tokens=False)]
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

    def __call__(self, texts, max_length, shown=None):
        """list of str -> ids, mask: LongTensors (B, max_length). shown: what a truncation warning quotes."""
        budget = max_length - len(self.bos) - len(self.eos)
        ids = torch.full((len(texts), max_length), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(texts), max_length, dtype=torch.long)
        for i, (text, body) in enumerate(zip(shown or texts, self._encode(list(texts)))):
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


def clip_clean(text):
    """The text clean-up of the transformers CLIPTokenizer the official code instantiates (no ftfy
    installed, so its BasicTokenizer runs), in its order: control characters dropped and whitespace made
    spaces; spaces around each CJK ideograph; NFC; split on whitespace; each word lower-cased by Python
    (str.lower: a word-final capital sigma becomes the final form). The two special tokens typed literally in
    a prompt are matched on the raw text first, as transformers does, and left as they are."""
    out = []
    for piece in _CLIP_SPECIALS.split(text):
        if _CLIP_SPECIALS.fullmatch(piece):
            out.append(piece)
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
                 text_len=TEXT_LEN, clip_len=CLIP_LEN, skip_layers=2, device=None, offload=None):
        """templates: PROMPT_TEMPLATE, or None for raw prompts (our small models). offload: None (encoders
        stay where they are), "model" (kept on CPU, each moved to `device` for its call) or "layer" (the
        LLM's layers streamed to `device` one at a time; slow, but only one layer of GPU memory)."""
        assert offload in (None, "model", "layer"), "offload must be None, 'model' or 'layer'"
        self.llm, self.clip, self.llm_tok, self.clip_tok = llm, clip, llm_tokenizer, clip_tokenizer
        self.templates, self.text_len, self.clip_len = templates, text_len, clip_len
        self.skip_layers = skip_layers
        self.device = torch.device(device) if device is not None else llm.embed_tokens.weight.device
        self.offload = offload
        # names the encoders in cache keys: configs, settings and a few weights (seeds, checkpoints differ)
        probe = (llm.cfg, clip.cfg, templates, text_len, clip_len, skip_layers,
                 llm.embed_tokens.weight[0, :8].tolist(), clip.token_embedding.weight[0, :8].tolist())
        self.fingerprint = hashlib.sha256(repr(probe).encode()).hexdigest()[:16]
        if offload:
            llm.to("cpu")
            clip.to("cpu")
        for name, t in (templates or {}).items():
            # crop_start must be the template's token count before the prompt with this tokenizer
            n = len(llm_tokenizer.bos) + len(llm_tokenizer._encode([t["template"].split("{}")[0]])[0])
            if n != t["crop_start"]:
                raise ValueError(f"template {name!r} has crop_start {t['crop_start']} but this tokenizer "
                                 f"gives {n} tokens before the prompt; not llava-llama-3's tokenizer?")

    @classmethod
    def from_pretrained(cls, llm_dir, clip_dir, dtype=torch.float16, device="cuda", offload=None, **kw):
        """The official folders (ckpts/text_encoder, ckpts/text_encoder_2), weights and tokenizers; fp16 is
        the official --text-encoder-precision. kw: templates, text_len, ... as in __init__."""
        load_to = "cpu" if offload else device
        llm = LlamaEncoder.from_pretrained(llm_dir, dtype, load_to)
        clip = CLIPTextEncoder.from_pretrained(clip_dir, dtype, load_to)
        return cls(llm, clip, Tokenizer(llm_dir), Tokenizer(clip_dir), device=device, offload=offload, **kw)

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

    def __call__(self, prompts, video_length=129, cache_dir=None):
        """encode(), optionally through a cache: one safetensors file per prompt in cache_dir, keyed by the
        prompt, image/video mode and the encoders' fingerprint."""
        if isinstance(prompts, str):
            prompts = [prompts]
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
