"""Tests for text_encoder.py: tiny random models on CPU, compared with independent float64 formulas and,
where transformers is installed, with transformers itself. Tokenizers are trained here on a few sentences."""

import hashlib
import json
import math
import os
import sys
import warnings
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import text_encoder as te  # noqa: E402


SENTENCES = [
    "A cat sits on a red mat in the sun.", "The camera pans left over a city at night.",
    "Two dogs run across a green park, chasing a ball.", "A woman in a blue dress walks along the beach.",
    "Close-up of raindrops falling on a window, soft light.",
    "describe the video by detailing the color, shape",
] * 3


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tensors here are tiny: threads only add overhead on a shared CPU. Restored for the other test files."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}
SPECIALS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<pad>"]


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def tiny_llama(seed=0, dtype=torch.float32, **kw):
    cfg = te.LlamaConfig(**{**dict(vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2), **kw})
    torch.manual_seed(seed)
    m = te.LlamaEncoder(cfg)
    with torch.no_grad():  # non-trivial norm weights, so a skipped or misplaced norm shows
        for n, p in m.named_parameters():
            if "norm" in n:
                p.add_(0.2 * torch.randn_like(p))
    return m.to(dtype).eval()


def test_llama_attention_makes_transformers_sdpa_call(monkeypatch):
    """The official environments' transformers (4.46, 4.39) call SDPA with the key/value heads repeated and
    an additive fp16 mask of 0 / the dtype's min, no enable_gqa: the same call picks the same GPU kernel,
    whose fp16 rounding a boolean mask with enable_gqa (another kernel) would not share."""
    calls, sdpa = [], F.scaled_dot_product_attention

    def record(q, k, v, attn_mask=None, **kw):
        calls.append((q.shape, k.shape, attn_mask.dtype, attn_mask.min().item(), kw))
        return sdpa(q, k, v, attn_mask=attn_mask, **kw)
    monkeypatch.setattr(F, "scaled_dot_product_attention", record)
    m = tiny_llama(dtype=torch.float16)
    ids = torch.randint(0, 300, (2, 7))
    m(ids, torch.tensor([[1] * 7, [1] * 4 + [0] * 3]))
    assert calls and all(q == k and dt == torch.float16 and lo == torch.finfo(torch.float16).min and not kw
                         for q, k, dt, lo, kw in calls)


def test_clip_attention_has_each_official_environments_arithmetic():
    """T2V's environment (transformers 4.46) runs CLIP through SDPA on the sum of its additive masks; I2V's
    (4.39, image-to-video) eagerly: q * scale, q k^T, the causal then the padding mask added in turn, softmax
    in the states' dtype. Each is reproduced bit for bit in fp16 (the I2V prompt path's vs the official
    HunyuanVideo-I2V TextEncoder under 4.39.3 too, outside CI: docs/i2v.md); both agree with float64."""
    torch.manual_seed(0)
    cfg = te.CLIPTextConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                            num_attention_heads=4, max_position_embeddings=16)
    attn = te.CLIPAttention(cfg).half()
    B, L, nh, hd = 2, 9, 4, 8
    x = torch.randn(B, L, 32).half()
    low = torch.finfo(torch.float16).min
    causal = torch.full((L, L), low, dtype=torch.float16).triu(1)[None, None]
    pad = torch.zeros(B, 1, 1, L, dtype=torch.float16)
    pad[1, ..., 6:] = low
    heads = lambda t: t.view(B, L, nh, hd).transpose(1, 2)
    with torch.no_grad():
        q, k, v = (heads(p(x)) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
        sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=causal + pad, scale=hd ** -0.5)
        want46 = attn.out_proj(sdpa.transpose(1, 2).reshape(B, L, 32))
        q39 = heads(attn.q_proj(x) * hd ** -0.5).reshape(B * nh, L, hd)
        w = torch.bmm(q39, k.reshape(B * nh, L, hd).transpose(1, 2))
        w = (w.view(B, nh, L, L) + causal).view(B * nh, L, L)
        w = (w.view(B, nh, L, L) + pad).view(B * nh, L, L)
        o = torch.bmm(torch.softmax(w, -1), v.reshape(B * nh, L, hd)).view(B, nh, L, hd)
        want39 = attn.out_proj(o.transpose(1, 2).reshape(B, L, 32))
        got46 = attn(x, (causal, pad))
        attn.eager = True
        got39 = attn(x, (causal, pad))
        ref = te.CLIPAttention(cfg).double()
        ref.load_state_dict(attn.state_dict())
        ref.eager = False
        want64 = ref(x.double(), (causal.double().clamp(min=-1e30), pad.double().clamp(min=-1e30)))
    assert torch.equal(got46, want46) and torch.equal(got39, want39) and not torch.equal(got46, got39)
    assert (got39.double() - want64).abs().max() < 2e-2 and (got46.double() - want64).abs().max() < 2e-2


def tiny_clip(seed=0, **kw):
    cfg = te.CLIPTextConfig(**{**dict(vocab_size=300, hidden_size=32, intermediate_size=48,
                                      num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=20),
                               **kw})
    torch.manual_seed(seed)
    m = te.CLIPTextEncoder(cfg)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "layer_norm" in n:
                p.add_(0.2 * torch.randn_like(p))
    return m.eval()


def write_hf_llama(model, path, prefix="model.", shards=1, v5_rope=False):
    """A folder as transformers' save_pretrained writes it (written by hand, no transformers needed)."""
    c = model.cfg
    d = dict(model_type="llama", vocab_size=c.vocab_size, hidden_size=c.hidden_size,
             intermediate_size=c.intermediate_size, num_hidden_layers=c.num_hidden_layers,
             num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_key_value_heads,
             rms_norm_eps=c.rms_norm_eps, hidden_act="silu", max_position_embeddings=2048)
    if v5_rope:
        d["rope_parameters"] = dict(c.rope_scaling or {"rope_type": "default"}, rope_theta=c.rope_theta)
    else:
        d.update(rope_theta=c.rope_theta, rope_scaling=c.rope_scaling)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(d, f)
    sd = {prefix + k: v.contiguous() for k, v in model.state_dict().items()}
    sd["lm_head.weight"] = torch.randn(c.vocab_size, c.hidden_size)  # ignored by the loader
    keys = sorted(sd)
    if shards == 1:
        save_file(sd, os.path.join(path, "model.safetensors"))
        return
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = keys[i::shards]
        save_file({k: sd[k] for k in part}, os.path.join(path, name))
        weight_map.update({k: name for k in part})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


def write_hf_clip(model, path, full=True, eos_token_id=None):
    c = model.cfg
    tc = dict(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
              num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
              max_position_embeddings=c.max_position_embeddings, hidden_act=c.hidden_act,
              layer_norm_eps=c.layer_norm_eps, eos_token_id=2 if eos_token_id is None else eos_token_id)
    if full:
        d = dict(model_type="clip", text_config=tc, vision_config={})
    else:
        d = dict(model_type="clip_text_model", **tc)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(d, f)
    sd = {}
    for k, v in model.state_dict().items():
        k = k.replace("token_embedding", "embeddings.token_embedding").replace(
            "position_embedding", "embeddings.position_embedding").replace("layers.", "encoder.layers.")
        sd[("text_model." if full else "") + k] = v.contiguous()
    if full:
        sd.update({"vision_model.post_layernorm.weight": torch.ones(4), "logit_scale": torch.tensor(2.0),
                   "text_projection.weight": torch.randn(8, c.hidden_size),
                   "text_model.embeddings.position_ids": torch.arange(c.max_position_embeddings)[None]})
    save_file(sd, os.path.join(path, "model.safetensors"))


@pytest.fixture(scope="module")
def llama_tok_dir(tmp_path_factory):
    """A byte-level BPE in Llama 3's layout: tokenizer.json whose post-processor adds BOS, and a pad token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(SENTENCES + [te.PROMPT_TEMPLATE_ENCODE_VIDEO], trainers.BpeTrainer(
        vocab_size=700, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A",
        special_tokens=[("<|begin_of_text|>", tok.token_to_id("<|begin_of_text|>"))])
    d = tmp_path_factory.mktemp("llama_tok")
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<pad>", "padding_side": "right"}))
    return str(d)


@pytest.fixture(scope="module")
def clip_tok_dir(tmp_path_factory):
    """CLIP's layout: vocab.json (bytes, bytes + '</w>', merged pieces, the two specials) and merges.txt."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=700, end_of_word_suffix="</w>",
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(SENTENCES, trainer)
    merges = json.loads(tok.to_str())["model"]["merges"]
    merges = [m if isinstance(m, list) else m.split(" ") for m in merges]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = (alphabet + [a + "</w>" for a in alphabet] + ["".join(m) for m in merges]
             + ["<|startoftext|>", "<|endoftext|>"])
    d = tmp_path_factory.mktemp("clip_tok")
    (d / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(dict.fromkeys(vocab))}))
    (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    (d / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<|endoftext|>"}))
    return str(d)


def measured_templates(tok):
    """The official templates with crop_start counted for a given tokenizer."""
    return {name: {"template": t["template"],
                   "crop_start": len(tok.bos) + len(tok._encode([t["template"].split("{}")[0]])[0])}
            for name, t in te.PROMPT_TEMPLATE.items()}


# ----------------------------------------------------------------------------------------------------------
# Official constants


def test_official_constants_unchanged():
    # sha256 of the strings as in the official hyvideo/constants.py at commit fa14b00
    h = lambda s: hashlib.sha256(s.encode()).hexdigest()[:16]
    assert h(te.PROMPT_TEMPLATE_ENCODE_VIDEO) == "a52f68dde3637b12"
    assert h(te.PROMPT_TEMPLATE_ENCODE) == "e6794c248e31c8ef"
    assert h(te.NEGATIVE_PROMPT) == "3ffecf480d92c0bd"
    assert te.PROMPT_TEMPLATE["dit-llm-encode-video"]["crop_start"] == 95
    assert te.PROMPT_TEMPLATE["dit-llm-encode"]["crop_start"] == 36


# ----------------------------------------------------------------------------------------------------------
# LLaMA: float64 formula, masks


def naive_llama(model, ids, mask):
    """One position, one head at a time in float64: RMSNorm, RoPE on (i, i + d/2) pairs with Llama 3.1's
    piecewise frequency rule, softmax over the visible keys, SwiGLU; returns (hidden_states list, final)."""
    c, sd = model.cfg, {k: v.double() for k, v in model.state_dict().items()}
    d, nh, nkv = c.head_dim, c.num_attention_heads, c.num_key_value_heads
    inv = []
    for i in range(0, d, 2):
        f = 1.0 / c.rope_theta ** (i / d)
        if c.rope_scaling:
            s, w = c.rope_scaling, 2 * math.pi / f
            old, lo, hi = s["original_max_position_embeddings"], s["low_freq_factor"], s["high_freq_factor"]
            if w > old / lo:
                f = f / s["factor"]
            elif w >= old / hi:
                a = (old / w - lo) / (hi - lo)
                f = (1 - a) * f / s["factor"] + a * f
        inv.append(f)

    def rms(x, w):
        return x / torch.sqrt((x * x).mean() + c.rms_norm_eps) * w

    def rot(v, p):  # v: (d,)
        out = v.clone()
        for j, f in enumerate(inv):
            a, b = v[j], v[j + d // 2]
            out[j] = a * math.cos(p * f) - b * math.sin(p * f)
            out[j + d // 2] = b * math.cos(p * f) + a * math.sin(p * f)
        return out

    B, L = ids.shape
    x = sd["embed_tokens.weight"][ids]
    states = [x]
    for li in range(c.num_hidden_layers):
        g = lambda n: sd[f"layers.{li}.{n}"]
        new = x.clone()
        for b in range(B):
            hn = [rms(x[b, t], g("input_layernorm.weight")) for t in range(L)]
            q = [(g("self_attn.q_proj.weight") @ h).view(nh, d) for h in hn]
            k = [(g("self_attn.k_proj.weight") @ h).view(nkv, d) for h in hn]
            v = [(g("self_attn.v_proj.weight") @ h).view(nkv, d) for h in hn]
            for t in range(L):
                heads = []
                for hh in range(nh):
                    kv = hh // (nh // nkv)
                    qt = rot(q[t][hh], t)
                    vis = [j for j in range(t + 1) if mask[b, j]]
                    sc = torch.stack([qt @ rot(k[j][kv], j) / math.sqrt(d) for j in vis])
                    p = torch.softmax(sc, 0)
                    heads.append(sum(p[n] * v[j][kv] for n, j in enumerate(vis)))
                y = x[b, t] + g("self_attn.o_proj.weight") @ torch.cat(heads)
                h2 = rms(y, g("post_attention_layernorm.weight"))
                gate, up = g("mlp.gate_proj.weight") @ h2, g("mlp.up_proj.weight") @ h2
                m = g("mlp.down_proj.weight") @ (F.silu(gate) * up)
                new[b, t] = y + m
        x = new
        states.append(x)
    final = torch.stack([torch.stack([rms(x[b, t], sd["norm.weight"]) for t in range(L)]) for b in range(B)])
    return states, final


@pytest.mark.parametrize("rope_scaling", [None, LLAMA3])
def test_llama_matches_float64_formula(rope_scaling):
    m = tiny_llama(num_hidden_layers=2, rope_scaling=rope_scaling, rope_theta=500.0, dtype=torch.float64)
    ids = torch.randint(0, 300, (2, 20))
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[1, 13:] = 0
    states, final = naive_llama(m, ids, mask)
    assert rel(m(ids, mask, skip_layers=0), final) < 1e-12
    assert rel(m(ids, mask, skip_layers=1), states[1]) < 1e-12  # hidden_states[-2]: layer 1, no norm
    assert rel(m(ids, mask, skip_layers=2), states[0]) < 1e-12  # hidden_states[-3]: the embeddings here


def test_llama3_rope_scaling_changes_low_frequencies_only():
    base = te.LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, rope_theta=500.0)
    scaled = dict(LLAMA3, original_max_position_embeddings=64)  # kept below wavelength 16, divided above 64
    (cos0, _), (cos1, _) = (te.rope_tables(c, 40, torch.float32, "cpu")
                            for c in (base, replace(base, rope_scaling=scaled)))
    inv = 1.0 / 500.0 ** (torch.arange(0, 16, 2).double() / 16)
    assert torch.equal(cos0[:, :2], cos1[:, :2])  # wavelengths 6.3 and 13.1 kept
    # wavelength 1437: divided by 8
    torch.testing.assert_close(cos1[:, 7], (torch.arange(40) * inv[7] / 8).cos().float())
    assert not torch.allclose(cos0[:, 2], cos1[:, 2])  # 29.7: blended
    with pytest.raises(ValueError, match="yarn"):
        te.LlamaConfig(rope_scaling={"rope_type": "yarn", "factor": 4.0})


def test_padding_does_not_change_real_tokens():
    m = tiny_llama()
    ids = torch.randint(0, 300, (1, 9))
    alone = m(ids, torch.ones(1, 9, dtype=torch.long))
    padded = torch.cat([ids, torch.randint(0, 300, (1, 6))], dim=1)  # arbitrary ids in the padding
    mask = torch.cat([torch.ones(1, 9), torch.zeros(1, 6)], dim=1).long()
    for skip in (0, 2):
        a, b = m(ids, None, skip_layers=skip), m(padded, mask, skip_layers=skip)
        torch.testing.assert_close(b[:, :9], a, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m(padded, mask)[:, :9], alone)
    # causal: changing a later token leaves the earlier states alone
    later = ids.clone()
    later[0, 6] = (later[0, 6] + 1) % 300
    torch.testing.assert_close(m(later)[:, :6], alone[:, :6], rtol=0, atol=0)
    assert not torch.allclose(m(later)[:, 6], alone[:, 6])
    with pytest.raises(ValueError, match="right-padded"):
        m(padded, mask.flip(1))


# ----------------------------------------------------------------------------------------------------------
# CLIP: float64 formula, pooling


def naive_clip_pooled(model, ids, eos_pos):
    c, sd = model.cfg, {k: v.double() for k, v in model.state_dict().items()}
    B, L = ids.shape
    nh, hd = c.num_attention_heads, c.hidden_size // c.num_attention_heads
    def ln(x, n):
        z = (x - x.mean()) / torch.sqrt(x.var(unbiased=False) + c.layer_norm_eps)
        return z * sd[n + ".weight"] + sd[n + ".bias"]

    lin = lambda x, n: sd[n + ".weight"] @ x + sd[n + ".bias"]
    out = []
    for b in range(B):
        x = [sd["token_embedding.weight"][ids[b, t]] + sd["position_embedding.weight"][t] for t in range(L)]
        for li in range(c.num_hidden_layers):
            p = f"layers.{li}."
            h = [ln(v, p + "layer_norm1") for v in x]
            q = [lin(v, p + "self_attn.q_proj").view(nh, hd) for v in h]
            k = [lin(v, p + "self_attn.k_proj").view(nh, hd) for v in h]
            v_ = [lin(v, p + "self_attn.v_proj").view(nh, hd) for v in h]
            y = []
            for t in range(L):
                heads = []
                for hh in range(nh):
                    scores = [q[t][hh] @ k[j][hh] / math.sqrt(hd) for j in range(t + 1)]
                    w = torch.softmax(torch.stack(scores), 0)
                    heads.append(sum(w[j] * v_[j][hh] for j in range(t + 1)))
                y.append(x[t] + lin(torch.cat(heads), p + "self_attn.out_proj"))
            x = []
            for t in range(L):
                f = lin(ln(y[t], p + "layer_norm2"), p + "mlp.fc1")
                x.append(y[t] + lin(f * torch.sigmoid(1.702 * f), p + "mlp.fc2"))
        out.append(ln(x[eos_pos[b]], "final_layer_norm"))
    return torch.stack(out)


@pytest.mark.parametrize("eos_token_id", [None, 7])
def test_clip_matches_float64_formula(eos_token_id):
    m = tiny_clip(eos_token_id=eos_token_id).double()
    ids = torch.randint(10, 200, (3, 12))
    eos_pos = [11, 6, 2]
    for b, p in enumerate(eos_pos):
        # None: the legacy rule pools at the largest id (end-of-text is the largest id in CLIP's vocabulary)
        ids[b, p] = 299 if eos_token_id is None else eos_token_id
        # padding with end-of-text, as openai's tokenizer
        ids[b, p + 1:] = 299 if eos_token_id is None else eos_token_id
    mask = (torch.arange(12)[None] <= torch.tensor(eos_pos)[:, None]).long()
    want = naive_clip_pooled(m, ids, eos_pos)
    assert rel(m(ids, mask), want) < 1e-12
    assert rel(m(ids), want) < 1e-12  # the mask cannot change the pooled token (causal attention)


# ----------------------------------------------------------------------------------------------------------
# Loading


@pytest.mark.parametrize("layout", ["prefix", "no_prefix", "sharded", "v5_rope"])
def test_llama_loading_layouts(tmp_path, layout):
    m = tiny_llama(rope_scaling=LLAMA3)
    write_hf_llama(m, str(tmp_path), prefix="" if layout == "no_prefix" else "model.",
                   shards=3 if layout == "sharded" else 1, v5_rope=layout == "v5_rope")
    got = te.LlamaEncoder.from_pretrained(str(tmp_path))
    assert got.cfg == m.cfg
    ids = torch.randint(0, 300, (2, 11))
    torch.testing.assert_close(got(ids), m(ids), rtol=0, atol=0)
    assert not any(p.requires_grad for p in got.parameters())
    half = te.LlamaEncoder.from_pretrained(str(tmp_path), dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())
    assert rel(half(ids).float(), m(ids)) < 0.05


@pytest.mark.parametrize("full", [True, False])
def test_clip_loading_layouts(tmp_path, full):
    m = tiny_clip()
    write_hf_clip(m, str(tmp_path), full=full)  # eos_token_id 2 in config.json -> the legacy argmax rule
    got = te.CLIPTextEncoder.from_pretrained(str(tmp_path))
    assert got.cfg.eos_token_id is None
    ids = torch.randint(0, 299, (2, 20))
    ids[:, 9] = 299
    torch.testing.assert_close(got(ids), m(ids), rtol=0, atol=0)
    write_hf_clip(m, str(tmp_path), full=full, eos_token_id=5)
    assert te.CLIPTextEncoder.from_pretrained(str(tmp_path), dtype=torch.float16).cfg.eos_token_id == 5


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        te.LlamaEncoder.from_pretrained(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        te.LlamaEncoder.from_pretrained(str(tmp_path))
    m = tiny_llama()
    write_hf_llama(m, str(tmp_path))
    os.remove(tmp_path / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        te.LlamaEncoder.from_pretrained(str(tmp_path))
    sd = {"model." + k: v for k, v in m.state_dict().items() if k != "layers.2.mlp.up_proj.weight"}
    save_file(sd, str(tmp_path / "model.safetensors"))
    # dit.check_state_dict's message, as for every loader: what is missing, unexpected or mis-shaped
    with pytest.raises(ValueError, match=r"fit LlamaEncoder: 1 missing: layers\.2\.mlp\.up_proj\.weight"):
        te.LlamaEncoder.from_pretrained(str(tmp_path))
    sd["model.layers.2.mlp.up_proj.weight"] = torch.zeros(5, 5)
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"1 wrong shape: layers\.2\.mlp\.up_proj\.weight \(5, 5\) vs \(48"):
        te.LlamaEncoder.from_pretrained(str(tmp_path))
    sd["model.layers.2.mlp.up_proj.weight"] = m.state_dict()["layers.2.mlp.up_proj.weight"]
    sd["model.layers.2.mlp.extra.weight"] = torch.zeros(2)
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"1 unexpected: layers\.2\.mlp\.extra\.weight"):
        te.LlamaEncoder.from_pretrained(str(tmp_path))
    del sd["model.layers.2.mlp.extra.weight"]
    save_file(sd, str(tmp_path / "model.safetensors"))
    te.LlamaEncoder.from_pretrained(str(tmp_path))  # the repaired file loads
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "model_type": "llava"}))
    with pytest.raises(ValueError, match="language model"):
        te.LlamaEncoder.from_pretrained(str(tmp_path))
    dynamic = {"type": "dynamic", "factor": 2.0}
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "rope_scaling": dynamic}))
    with pytest.raises(ValueError, match="dynamic"):
        te.LlamaEncoder.from_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="model_type"):
        te.CLIPTextEncoder.from_pretrained(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        te.Tokenizer(str(tmp_path))


# ----------------------------------------------------------------------------------------------------------
# Tokenizers and the prompt path


def test_llama_tokenizer_pads_right_and_truncates(llama_tok_dir):
    tok = te.Tokenizer(llama_tok_dir)
    bos, pad = tok.tok.token_to_id("<|begin_of_text|>"), tok.tok.token_to_id("<pad>")
    assert tok.bos == [bos] and tok.eos == [] and tok.pad_id == pad
    ids, mask = tok(["a cat sits", "the camera pans left over a city"], 16)
    body = tok._encode(["a cat sits"])[0]
    assert ids[0, 0] == bos and ids[0, 1:1 + len(body)].tolist() == body
    assert mask[0].tolist() == [1] * (1 + len(body)) + [0] * (15 - len(body))
    assert (ids[0, 1 + len(body):] == pad).all()
    with pytest.warns(UserWarning, match="truncated"):
        ids, mask = tok([SENTENCES[1] * 4], 10)
    assert ids[0, 0] == bos and mask.all() and ids[0, 1:].tolist() == tok._encode([SENTENCES[1] * 4])[0][:9]


def test_clip_tokenizer_from_vocab_and_merges(clip_tok_dir):
    tok = te.Tokenizer(clip_tok_dir)
    vocab = json.loads(open(os.path.join(clip_tok_dir, "vocab.json")).read())
    sot, eot = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
    assert tok.bos == [sot] and tok.eos == [eot] and tok.pad_id == eot and tok.eos_id == eot
    ids, mask = tok(["A  Cat sits on a red mat."], 20)
    assert torch.equal(ids, tok(["a cat sits on a red mat."], 20)[0])  # lower-cased, whitespace collapsed
    n = int(mask.sum())
    assert ids[0, 0] == sot and ids[0, n - 1] == eot and (ids[0, n:] == eot).all()
    words = [next(k for k, v in vocab.items() if v == i) for i in ids[0, 1:n - 1].tolist()]
    assert "".join(words).replace("</w>", " ").split() == ["a", "cat", "sits", "on", "a", "red", "mat", "."]
    with pytest.warns(UserWarning, match="truncated"):
        ids, mask = tok([SENTENCES[0] * 20], te.CLIP_LEN)
    assert ids.shape == (1, 77) and mask.all() and ids[0, 0] == sot and ids[0, 76] == eot
    # as the official (slow) CLIPTokenizer: each CJK ideograph is a word of its own, control characters
    # dropped
    ids, mask = tok(["数字\x07"], 10)
    words = [next(k for k, v in vocab.items() if v == i) for i in ids[0, 1:int(mask.sum()) - 1].tolist()]
    assert "".join(words).count("</w>") == 2 and len(tok._encode(["数字"])[0]) == len(words)
    # the slow tokenizer's order: control characters go before NFC composes (a zero-width space between a
    # letter and its accent), and Python's str.lower gives a word-final capital sigma its final form
    assert te.clip_clean("Cafe\u200b\u0301  OK") == "caf\u00e9 ok"
    assert te.clip_clean("\u039f\u0394\u039f\u03a3 \u03a3\u0391") == "\u03bf\u03b4\u03bf\u03c2 \u03c3\u03b1"
    # a literal special token in a prompt is that token (CLIP pools at the first end-of-text)
    a, b = tok._encode(["a"])[0], tok._encode(["cat"])[0]
    assert tok._encode(["A <|endoftext|>Cat"])[0] == a + [eot] + b
    assert tok._encode(["<|startoftext|> a"])[0] == [sot] + a


def test_clip_clean_with_ftfy_as_the_image_to_video_release(clip_tok_dir, monkeypatch):
    """HunyuanVideo-I2V's environment has ftfy (its requirements install OpenAI's CLIP), so its transformers
    4.39 CLIPTokenizer cleans with `whitespace_clean(ftfy.fix_text(text)).lower()` instead of the
    BasicTokenizer: curly quotes, full-width forms and ligatures become plain, CJK is not spaced."""
    import re

    import ftfy
    texts = ["It\u2019s \u201c\uff21\uff22\uff23\u201d  \ufb01ne", "\u6570\u5b57 a\tcat\n",
             "caf\u00c3\u00a9 OK",
             "A <|endoftext|>Cat\u2019s"]
    for text in texts:  # transformers 4.39's formula, piece by piece around a literal special token
        pieces = re.split(r"(<\|endoftext\|>)", text)
        want = " ".join(p if p == "<|endoftext|>" else re.sub(r"\s+", " ", ftfy.fix_text(p)).strip().lower()
                        for p in pieces)
        assert te.clip_clean(text, fix_text=True).split() == want.split()
    assert te.clip_clean(texts[0], fix_text=True) == 'it\'s "abc" fine'
    assert te.clip_clean(texts[2], fix_text=True) == "caf\u00e9 ok"  # mojibake repaired
    assert te.clip_clean(texts[0]) != te.clip_clean(texts[0], fix_text=True)  # text-to-video's is not ftfy's
    tok = te.Tokenizer(clip_tok_dir)
    assert tok(["It\u2019s a CAT"], 16, fix_text=True)[0].tolist() == tok(["it's a cat"], 16)[0].tolist()
    vocab = {v: k for k, v in json.loads(open(os.path.join(clip_tok_dir, "vocab.json")).read()).items()}
    words = lambda ids, mask: "".join(vocab[i] for i in ids[0, 1:int(mask.sum()) - 1].tolist()).count("</w>")
    assert words(*tok(["\u6570\u5b57"], 10, fix_text=True)) == 1 and words(*tok(["\u6570\u5b57"], 10)) == 2
    monkeypatch.setitem(sys.modules, "ftfy", None)
    with pytest.raises(RuntimeError, match="^image-to-video prompts need ftfy.*: pip install ftfy$"):
        tok(["a"], 8, fix_text=True)


def make_prompt_encoder(llama_tok_dir, clip_tok_dir, text_len=24, **kw):
    ltok, ctok = te.Tokenizer(llama_tok_dir), te.Tokenizer(clip_tok_dir)
    llm = tiny_llama(vocab_size=ltok.vocab_size)
    clip = tiny_clip(vocab_size=ctok.vocab_size, max_position_embeddings=77, eos_token_id=ctok.eos_id)
    return te.PromptEncoder(llm, clip, ltok, ctok, templates=measured_templates(ltok), text_len=text_len,
                            **kw)


def test_prompt_path_crops_the_template(llama_tok_dir, clip_tok_dir):
    pe = make_prompt_encoder(llama_tok_dir, clip_tok_dir)
    prompts = ["A cat sits on a red mat.", "  Two dogs run across a green park.  "]
    video_crop = pe.templates["dit-llm-encode-video"]["crop_start"]
    for video_length, name in ((129, "dit-llm-encode-video"), (1, "dit-llm-encode")):
        text, mask, pooled = pe(prompts, video_length=video_length)
        crop = pe.templates[name]["crop_start"]
        # as the official: both modes tokenise to text_len + the video template's crop, each crops its own
        n = 24 + video_crop - crop
        assert text.shape == (2, n, 32) and mask.shape == (2, n) and pooled.shape == (2, 32)
        assert (n == 24) == (name == "dit-llm-encode-video")
        templated = [pe.templates[name]["template"].format(p.strip()) for p in prompts]
        ids, full_mask = pe.llm_tok(templated, 24 + video_crop)
        eot = pe.llm_tok.tok.token_to_id("<|eot_id|>")
        for b, p in enumerate(prompts):
            # the prompt's tokens and the closing <|eot_id|>
            want = pe.llm_tok._encode([p.strip()])[0] + [eot]
            assert ids[b, crop:crop + len(want)].tolist() == want
            assert mask[b].tolist() == [1] * len(want) + [0] * (n - len(want))
        torch.testing.assert_close(text, pe.llm(ids, full_mask, skip_layers=2)[:, crop:], rtol=0, atol=0)
        clip_ids, clip_mask = pe.clip_tok([p.strip() for p in prompts], 77)
        torch.testing.assert_close(pooled, pe.clip(clip_ids), rtol=0, atol=0)
    with pytest.raises(ValueError, match="crop_start"):
        te.PromptEncoder(pe.llm, pe.clip, pe.llm_tok, pe.clip_tok)  # 95 is not this tokenizer's count
    with pytest.warns(UserWarning, match="truncated"):
        text, mask, _ = pe([SENTENCES[1] * 5])
    assert mask.all()


def test_cache_and_offload(llama_tok_dir, clip_tok_dir, tmp_path):
    pe = make_prompt_encoder(llama_tok_dir, clip_tok_dir)
    prompts = ["A cat sits on a red mat.", "The camera pans left."]
    want = pe(prompts)
    got = pe(prompts, cache_dir=str(tmp_path))
    assert len(os.listdir(tmp_path)) == 2 and not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
    pe.encode = None  # a second call must be served from disk alone
    again = pe(prompts[::-1], cache_dir=str(tmp_path))
    for a, b, c in zip(want, got, again):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
        torch.testing.assert_close(c, a.flip(0), rtol=0, atol=0)
    other = make_prompt_encoder(llama_tok_dir, clip_tok_dir)  # same configs and seed: same fingerprint
    assert other.fingerprint == pe.fingerprint
    with torch.no_grad():
        other.llm.embed_tokens.weight[0, 0] += 1  # other weights: a separate cache entry
    assert other.fingerprint != te.PromptEncoder(other.llm, other.clip, other.llm_tok, other.clip_tok,
                                                 templates=other.templates, text_len=24).fingerprint
    for offload in ("model", "layer"):
        off = make_prompt_encoder(llama_tok_dir, clip_tok_dir, offload=offload, device="cpu")
        for a, b in zip(off(prompts), want):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_tiny_demo_encoders_with_sentencepiece(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    (tmp_path / "captions.txt").write_text("\n".join(SENTENCES))
    spm.SentencePieceTrainer.train(input=str(tmp_path / "captions.txt"), model_prefix=str(tmp_path / "sp"),
                                   vocab_size=60, minloglevel=2)
    tok = te.Tokenizer(str(tmp_path / "sp.model"))
    a = te.PromptEncoder.tiny(tok, text_len=32)
    b = te.PromptEncoder.tiny(tok, text_len=32)
    text, mask, pooled = a(["a cat sits", "two dogs run in the park"])
    assert text.shape == (2, 32, 32) and mask.shape == (2, 32) and pooled.shape == (2, 32)
    assert mask[0].sum() < mask[1].sum() and torch.isfinite(text).all()
    for x, y in zip(b(["a cat sits", "two dogs run in the park"]), (text, mask, pooled)):
        torch.testing.assert_close(x, y, rtol=0, atol=0)  # same seed, same frozen weights


# ----------------------------------------------------------------------------------------------------------
# Against transformers (test-only dependency)


def test_llama_matches_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    for i, (rope, cls, shard) in enumerate([(None, transformers.LlamaModel, "50MB"),
                                            (LLAMA3, transformers.LlamaForCausalLM, "20KB")]):
        kw = dict(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=5,
                  num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=64,
                  rope_theta=500000.0)
        if rope:
            kw["rope_scaling"] = dict(rope)  # transformers 4 and 5 both accept this spelling
        ref = cls(transformers.LlamaConfig(**kw)).eval()
        with torch.no_grad():
            for n, p in ref.named_parameters():
                if "norm" in n:
                    p.add_(0.1 * torch.randn_like(p))
        ref.save_pretrained(str(tmp_path / str(i)), max_shard_size=shard)
        ours = te.LlamaEncoder.from_pretrained(str(tmp_path / str(i)))
        assert ours.cfg.rope_scaling == (None if rope is None else {**rope})
        ids = torch.randint(0, 100, (3, 40))
        mask = torch.ones(3, 40, dtype=torch.long)
        mask[1, 25:], mask[2, 7:] = 0, 0
        with torch.no_grad():
            out = getattr(ref, "model", ref)(input_ids=ids, attention_mask=mask, output_hidden_states=True)
            assert rel(ours(ids, mask, skip_layers=2), out.hidden_states[-3]) < 1e-4
            assert rel(ours(ids, mask, skip_layers=0), out.last_hidden_state) < 1e-4
            # fp16 as the official run: transformers' model cast with .to(fp16), ours loaded in fp16
            decoder = getattr(ref.to(torch.float16), "model", ref)
            out = decoder(input_ids=ids, attention_mask=mask, output_hidden_states=True)
            half = te.LlamaEncoder.from_pretrained(str(tmp_path / str(i)), dtype=torch.float16)
            assert rel(half(ids, mask).float(), out.hidden_states[-3].float()) < 1e-3


def test_clip_matches_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    for i, (eos, full) in enumerate([(2, True), (7, False)]):
        tc = dict(vocab_size=120, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                  num_attention_heads=4, max_position_embeddings=20, eos_token_id=eos, bos_token_id=5,
                  pad_token_id=1)
        if full:
            ref = transformers.CLIPModel(transformers.CLIPConfig(
                text_config=tc, projection_dim=16, vision_config=dict(
                    hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                    image_size=32, patch_size=16))).eval()
        else:
            ref = transformers.CLIPTextModel(transformers.CLIPTextConfig(**tc)).eval()
        ref.save_pretrained(str(tmp_path / str(i)))
        ours = te.CLIPTextEncoder.from_pretrained(str(tmp_path / str(i)))
        end = 119 if eos == 2 else eos  # legacy configs: end-of-text is the largest id
        ids = torch.randint(10, 100, (3, 20))
        mask = torch.ones(3, 20, dtype=torch.long)
        for r, n in enumerate([20, 12, 5]):
            ids[r, n - 1], ids[r, n:], mask[r, n:] = end, end, 0
        with torch.no_grad():
            want = getattr(ref, "text_model", ref)(input_ids=ids, attention_mask=mask).pooler_output
            assert rel(ours(ids, mask), want) < 1e-4


def test_tokenizers_match_transformers(llama_tok_dir, clip_tok_dir):
    transformers = pytest.importorskip("transformers")
    texts = ["A cat sits on a red mat.", "  The camera PANS left,  over a city at night!  ", "x" * 3,
             SENTENCES[2] * 3]
    ref = transformers.PreTrainedTokenizerFast(tokenizer_file=os.path.join(llama_tok_dir, "tokenizer.json"),
                                               pad_token="<pad>", padding_side="right")
    ours = te.Tokenizer(llama_tok_dir)
    r = ref(texts, max_length=30, padding="max_length", truncation=True, return_tensors="pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ids, mask = ours(texts, 30)
    assert torch.equal(ids, r["input_ids"]) and torch.equal(mask, r["attention_mask"])
    ref = transformers.CLIPTokenizer(os.path.join(clip_tok_dir, "vocab.json"),
                                     os.path.join(clip_tok_dir, "merges.txt"), pad_token="<|endoftext|>")
    ours = te.Tokenizer(clip_tok_dir)
    r = ref(texts, max_length=77, padding="max_length", truncation=True, return_tensors="pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ids, mask = ours(texts, 77)
    assert torch.equal(ids, r["input_ids"]) and torch.equal(mask, r["attention_mask"])


def test_prompt_encoder_from_pretrained_folders(llama_tok_dir, clip_tok_dir, tmp_path):
    import shutil
    ltok, ctok = te.Tokenizer(llama_tok_dir), te.Tokenizer(clip_tok_dir)
    llm = tiny_llama(vocab_size=ltok.vocab_size)
    clip = tiny_clip(vocab_size=ctok.vocab_size, max_position_embeddings=77, eos_token_id=ctok.eos_id)
    # the official layout: weights and tokenizer files side by side in each folder
    write_hf_llama(llm, str(tmp_path / "text_encoder"))
    write_hf_clip(clip, str(tmp_path / "text_encoder_2"), eos_token_id=ctok.eos_id)
    for src, dst in ((llama_tok_dir, "text_encoder"), (clip_tok_dir, "text_encoder_2")):
        for f in os.listdir(src):
            shutil.copy(os.path.join(src, f), tmp_path / dst / f)
    llm_dir, clip_dir = str(tmp_path / "text_encoder"), str(tmp_path / "text_encoder_2")
    with pytest.raises(ValueError, match="crop_start"):  # the official 95 does not fit this tokenizer
        te.PromptEncoder.from_pretrained(llm_dir, clip_dir, device="cpu")
    pe = te.PromptEncoder.from_pretrained(llm_dir, clip_dir, dtype=torch.bfloat16, device="cpu",
                                          templates=measured_templates(ltok))
    text, mask, pooled = pe("A cat sits on a red mat.")
    assert text.dtype == pooled.dtype == torch.bfloat16
    assert text.shape == (1, te.TEXT_LEN, 32) and mask.shape == (1, te.TEXT_LEN) and pooled.shape == (1, 32)
    in_memory = te.PromptEncoder(llm, clip, ltok, ctok, templates=measured_templates(ltok))
    ref = in_memory("A cat sits on a red mat.")
    assert torch.equal(mask, ref[1])
    assert rel(text.float(), ref[0]) < 0.05 and rel(pooled.float(), ref[2]) < 0.05


# ----------------------------------------------------------------------------------------------------------
# CLIP vision tower and LLaVA against transformers (curate.py's image embedder and captioner)


def frames(seed=0):
    """Landscape, portrait and square RGB frames with smooth structure (bicubic overshoot shows) and noise."""
    import numpy as np
    rng = np.random.default_rng(seed)
    out = []
    for h, w in ((50, 70), (90, 41), (40, 40)):
        yy, xx = np.mgrid[:h, :w]
        base = 127 + 100 * np.sin(xx[..., None] / (3 + seed) + yy[..., None] / 5 + np.arange(3))
        out.append(np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8))
    return out


def test_clip_image_preprocess_matches_transformers():
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("PIL")
    images = frames()
    for size in (32, 224):
        ref = transformers.CLIPImageProcessorPil(size={"shortest_edge": size},
                                                 crop_size={"height": size, "width": size})
        want = ref(images, return_tensors="pt")["pixel_values"]
        got = te.clip_image_preprocess(images, size)
        assert got.dtype == torch.float32 and got.shape == (3, 3, size, size)
        assert torch.equal(got, want)  # same PIL resize, same float64 -> float32 arithmetic: bit for bit
    with pytest.raises(ValueError, match="uint8 RGB"):
        te.clip_image_preprocess([images[0].astype("float32")])


def tiny_vision_config(**kw):
    return dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                image_size=32, patch_size=8, **kw)


def test_clip_vision_matches_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    full = transformers.CLIPModel(transformers.CLIPConfig(
        text_config=dict(vocab_size=60, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, bos_token_id=0, eos_token_id=1, pad_token_id=1),
        vision_config=tiny_vision_config(projection_dim=8), projection_dim=16)).eval()
    vision_only = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(
        **tiny_vision_config(hidden_act="gelu", projection_dim=12))).eval()
    px = te.clip_image_preprocess(frames(), 32)
    for i, ref in enumerate((full, vision_only)):
        with torch.no_grad():
            for n, p in ref.named_parameters():  # non-trivial norms and class embedding
                if "norm" in n or "class_embedding" in n:
                    p.add_(0.2 * torch.randn_like(p))
        ref.save_pretrained(str(tmp_path / str(i)))
        ours = te.CLIPVisionEncoder.from_pretrained(str(tmp_path / str(i)))
        assert ours.image_size == 32
        with torch.no_grad():
            if i == 0:
                want = full.get_image_features(pixel_values=px)
                want = getattr(want, "pooler_output", want)  # transformers 5 returns a model output
                states = full.vision_model(pixel_values=px, output_hidden_states=True).hidden_states
            else:
                out = vision_only(pixel_values=px, output_hidden_states=True)
                want, states = out.image_embeds, out.hidden_states
            got = ours(px)
            assert got.shape == want.shape == (3, 16 if i == 0 else 12)
            assert rel(got, want) < 1e-5
            for j, s in zip((0, 1, -2, -1), ours.hidden_states(px, [0, 1, -2, -1])):
                assert rel(s, states[j]) < 1e-5
    with pytest.raises(ValueError, match="clip_image_preprocess"):
        ours(torch.zeros(1, 3, 64, 64))
    # the text tower's keys are skipped by name; anything else that does not fit is an error
    from safetensors.torch import load_file
    sd = load_file(str(tmp_path / "0" / "model.safetensors"))
    save_file({**sd, "vision_model.extra.weight": torch.zeros(2)}, str(tmp_path / "0" / "model.safetensors"))
    with pytest.raises(ValueError, match=r"unexpected: extra\.weight"):
        te.CLIPVisionEncoder.from_pretrained(str(tmp_path / "0"))


def test_released_configs_give_the_default_configs():
    # the fields of the released config.json files (openai/clip-vit-large-patch14's vision_config and
    # projection_dim; xtuner/llava-llama-3-8b-v1_1-transformers); keys they leave out take transformers'
    # defaults, which must give our defaults (the released models' shapes)
    clip = {"projection_dim": 768, "vision_config": dict(
        hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24, patch_size=14,
        image_size=224, projection_dim=768, hidden_act="quick_gelu", layer_norm_eps=1e-5)}
    assert te.clip_vision_config_from_hf(clip["vision_config"]) == te.CLIPVisionConfig()
    llava = {"model_type": "llava", "image_token_index": 128257, "pad_token_id": 128258,
             "projector_hidden_act": "gelu", "vision_feature_layer": -2,
             "vision_feature_select_strategy": "default",
             "text_config": dict(model_type="llama", bos_token_id=128000, eos_token_id=128001,
                                 intermediate_size=14336, num_key_value_heads=8, rms_norm_eps=1e-5,
                                 rope_theta=500000.0, vocab_size=128320, max_position_embeddings=8192),
             "vision_config": dict(model_type="clip_vision_model", hidden_size=1024, image_size=336,
                                   intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24,
                                   patch_size=14, projection_dim=768)}
    cfg = te.llava_config_from_hf(llava, "llava")
    assert cfg == te.LlavaConfig() and cfg.text == te.LLM_CONFIGS["llava-llama-3-8b"]
    with pytest.raises(ValueError, match="only a LLaMA language model"):
        te.llava_config_from_hf({**llava, "text_config": {"model_type": "mistral"}}, "llava")


CHAT_TEMPLATE = (  # a Llama 3 chat template in transformers' typed-content form, as llava-hf folders have
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ '<image>\n' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{{ '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}")
STRING_TEMPLATE = (  # the same for plain-string contents (the image token is then written by the caller)
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] }}"
    "{{ '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}")


@pytest.fixture(scope="module")
def llava_tok_dir(llama_tok_dir, tmp_path_factory):
    """The Llama 3-layout tokenizer with LLaVA's <image> token added and a chat template."""
    from tokenizers import AddedToken, Tokenizer
    tok = Tokenizer.from_file(os.path.join(llama_tok_dir, "tokenizer.json"))
    tok.add_special_tokens([AddedToken("<image>", normalized=False, special=True)])
    d = tmp_path_factory.mktemp("llava_tok")
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "pad_token": "<pad>",
        "chat_template": CHAT_TEMPLATE}))
    return str(d)


def tiny_llava(transformers, tok_dir, path, seed=0, strategy="default", layer=-2):
    """A random LlavaForConditionalGeneration (CLIP 32 px / patch 8: 16 patches; LLaMA width 32) saved to
    `path` beside the tokenizer files."""
    import shutil
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(os.path.join(tok_dir, "tokenizer.json"))
    torch.manual_seed(seed)
    cfg = transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(**tiny_vision_config()),
        text_config=transformers.LlamaConfig(
            vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rope_theta=500000.0,
            bos_token_id=tok.token_to_id("<|begin_of_text|>"), eos_token_id=tok.token_to_id("<|eot_id|>")),
        image_token_index=tok.token_to_id("<image>"), vision_feature_select_strategy=strategy,
        vision_feature_layer=layer)
    ref = transformers.LlavaForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for n, p in ref.named_parameters():  # larger weights: logits with clear winners
            p.mul_(1 if "norm" in n else 5)
    ref.save_pretrained(path)
    for f in os.listdir(tok_dir):
        shutil.copy(os.path.join(tok_dir, f), os.path.join(path, f))
    return ref


def test_llava_generate_matches_transformers(llava_tok_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file
    ref = tiny_llava(transformers, llava_tok_dir, str(tmp_path / "hf"))
    ours = te.Llava.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32)
    assert ours.num_image_tokens == 16 and ours.image_size == 32
    image_id = ref.config.image_token_index
    text = te.Tokenizer(llava_tok_dir)._encode(["describe the video by detailing the color"])[0]
    row = [ours.tokenizer.bos[0]] + text[:3] + [image_id] * 16 + text[3:]
    ids = torch.tensor([row, row])
    px = te.clip_image_preprocess(frames(0)[:1] + frames(1)[:1], 32)  # two different images

    def reference(ids, px, n, **kw):
        out = ref.generate(input_ids=ids, pixel_values=px, attention_mask=torch.ones_like(ids),
                           do_sample=False, max_new_tokens=n, **kw)
        return out[:, ids.shape[1]:]
    with torch.no_grad():
        want = reference(ids, px, 12, eos_token_id=None)
    got = ours.generate(ids, px, 12, eos_token_id=[])
    assert torch.equal(got, want) and got.shape == (2, 12)
    assert not torch.equal(got[0], got[1])  # same prompt, the image changes the answer
    # stopping: an id the first row emits at step 4 ends it (then padded); the batch runs until both end
    stop = int(want[0, 4])
    with torch.no_grad():
        want = reference(ids, px, 12, eos_token_id=stop, pad_token_id=0)
    ours.pad_token_id = 0
    assert torch.equal(ours.generate(ids, px, 12, eos_token_id=stop), want)
    # bf16 as the captioner runs on a GPU: the same tokens as transformers' from_pretrained(dtype=bf16), which
    # keeps the rotary frequencies in fp32 (rounding them to bf16 changes tokens here)
    half_ref = transformers.LlavaForConditionalGeneration.from_pretrained(str(tmp_path / "hf"),
                                                                          dtype=torch.bfloat16).eval()
    half = te.Llava.from_pretrained(str(tmp_path / "hf"), dtype=torch.bfloat16)
    chat = half.chat_input_ids("a cat sits on a red mat in the sun").expand(2, -1)
    chat_px = te.clip_image_preprocess([frames(0)[0], frames(2)[0]], 32)
    with torch.no_grad():
        want = half_ref.generate(input_ids=chat, pixel_values=chat_px, attention_mask=torch.ones_like(chat),
                                 do_sample=False, max_new_tokens=30, eos_token_id=None)[:, chat.shape[1]:]
    assert torch.equal(half.generate(chat, chat_px, 30, eos_token_id=[]), want)
    # the folder's layouts: transformers 5 (above), the released one (transformers 4) and the in-memory one
    sd = load_file(str(tmp_path / "hf" / "model.safetensors"))
    released = {k.replace("vision_tower.", "vision_tower.vision_model."): v for k, v in sd.items()}
    in_memory = {("lm_head.weight" if k == "language_model.lm_head.weight" else "model." + k.replace(
        "language_model.model.", "language_model.")): v for k, v in sd.items()}
    base = ours.generate(ids[:1], px[:1], 6, eos_token_id=[])
    for layout in (released, in_memory):
        save_file(layout, str(tmp_path / "hf" / "model.safetensors"))
        again = te.Llava.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32)
        assert torch.equal(again.generate(ids[:1], px[:1], 6, eos_token_id=[]), base)
    with pytest.raises(ValueError, match="15 image tokens for 1 image"):  # one placeholder short
        ours.generate(torch.tensor([row[:5] + row[6:]]), px[:1], 2)


@pytest.mark.parametrize("strategy,layer", [("default", -2), ("full", [-3, -1])])
def test_llava_chat_matches_transformers(llava_tok_dir, tmp_path, strategy, layer):
    transformers = pytest.importorskip("transformers")
    PIL = pytest.importorskip("PIL.Image")
    ref = tiny_llava(transformers, llava_tok_dir, str(tmp_path), strategy=strategy, layer=layer)
    ours = te.Llava.from_pretrained(str(tmp_path), dtype=torch.float32)
    assert ours.num_image_tokens == (16 if strategy == "default" else 17)
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=os.path.join(llava_tok_dir, "tokenizer.json"),
                                               bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                               pad_token="<pad>")
    processor = transformers.LlavaProcessor(
        image_processor=transformers.CLIPImageProcessorPil(size={"shortest_edge": 32},
                                                          crop_size={"height": 32, "width": 32}),
        tokenizer=tok, patch_size=8, vision_feature_select_strategy=strategy, num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE)
    image, prompt = frames(2)[0], "Describe the video by detailing the color, shape"
    inputs = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image", "image": PIL.fromarray(image)},
                                      {"type": "text", "text": prompt}]}],
        add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
    assert torch.equal(ours.chat_input_ids(prompt), inputs["input_ids"])
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    assert ours.end_of_turn_ids() == [eot]
    with torch.no_grad():
        out = ref.generate(**inputs, do_sample=False, max_new_tokens=20, eos_token_id=[eot])
    want = tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert ours.chat(prompt, image, max_new_tokens=20) == want and len(want) > 0
    # a template written for plain strings: LLaVA's "<image>\n" before the prompt, same ids; read from the
    # file transformers 5 writes, which wins over tokenizer_config.json
    (tmp_path / "chat_template.jinja").write_text(STRING_TEMPLATE)
    ours = te.Llava.from_pretrained(str(tmp_path), dtype=torch.float32)
    assert ours.chat_template == STRING_TEMPLATE
    assert torch.equal(ours.chat_input_ids(prompt), inputs["input_ids"])
    assert ours.end_of_turn_ids() == [eot]
    ours.chat_template = None
    with pytest.raises(ValueError, match="no chat_template"):
        ours.chat(prompt, image)
