"""train.py: the flow-matching target and sigma sampler, buckets and captions, FSDP on gloo against one
process, kill + resume == uninterrupted, NaN stop, and the quick demo end to end."""

import dataclasses
import itertools
import json
import math
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
import torch.nn as nn

import curate
import train
import vae as vae_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_sigma_sampler_is_logit_normal():
    g = torch.Generator().manual_seed(0)
    s = train.sample_sigma(40000, 0.5, 0.8, g)
    logit = torch.log(s / (1 - s))
    assert (s > 0).all() and (s < 1).all()
    assert abs(logit.mean().item() - 0.5) < 0.02 and abs(logit.std().item() - 0.8) < 0.02


def test_the_13b_finetune_draws_sigma_as_the_official_trainer():
    """HunyuanVideo-I2V's trainer (transport.py, run_train_image2video_lora.sh): t = sigmoid(z), z ~ N(0, 1),
    then its flow shift 7, s t / (1 + (s - 1) t); the same draws z give the same sigmas here."""
    cfg = train.PRESETS["13b-finetune"]
    got = train.sample_sigma(1000, cfg.sigma_mean, cfg.sigma_std, torch.Generator().manual_seed(0))
    t = torch.sigmoid(torch.randn(1000, generator=torch.Generator().manual_seed(0)).double())
    torch.testing.assert_close(got.double(), 7 * t / (1 + 6 * t), rtol=0, atol=1e-6)


def test_flow_matching_target_and_input():
    seen = {}

    class Fake(nn.Module):
        def forward(self, x, t, text, mask, pooled, guidance=None):
            seen.update(x=x, t=t)
            return torch.ones_like(x)

    torch.manual_seed(0)
    x0, noise = torch.randn(3, 4, 2, 2, 2), torch.randn(3, 4, 2, 2, 2)
    sigma = torch.tensor([0.1, 0.5, 0.9])
    loss = train.flow_matching_loss(Fake(), x0, noise, sigma, (None, None, None))
    s = sigma.view(3, 1, 1, 1, 1)
    torch.testing.assert_close(seen["x"], (1 - s) * x0 + s * noise)  # sigma=1 is noise, as the sampler
    torch.testing.assert_close(seen["t"], sigma * 1000)
    torch.testing.assert_close(loss, ((1 - (noise - x0)) ** 2).mean())  # target v = noise - x0


def test_lr_schedule():
    st = train.Stage("s", 100, buckets=(), lr=1.0)
    cfg = train.TrainConfig(warmup=10, min_lr_ratio=0.1)
    assert train.lr_at(0, st, cfg) == pytest.approx(0.1) and train.lr_at(9, st, cfg) == pytest.approx(1.0)
    assert train.lr_at(10, st, cfg) == pytest.approx(1.0) and train.lr_at(100, st, cfg) == pytest.approx(0.1)
    assert train.lr_at(55, st, cfg) == pytest.approx(0.55)


def test_presets_embed_guidance_only_when_they_train_it():
    """A guidance embedder must see while training the scale it gets at sampling: the 13B fine-tune feeds
    train_guidance (x1000) to the distilled release's embedder; a model from scratch has none and learns
    ordinary CFG from the empty captions (the 1.3B preset once kept dit.py's default embedder and fed it a
    constant 1000 while training, while sample.py feeds 6.0 x 1000)."""
    for name, cfg in train.PRESETS.items():
        assert train.dit_config(cfg).guidance_embed == (cfg.train_guidance is not None), name
    assert not train.dit_config(train.PRESETS["1.3b-gpu"]).guidance_embed
    assert train.PRESETS["13b-finetune"].train_guidance == 1.0  # x1000: the plain conditional velocity


def test_buckets_every_item_once_with_per_bucket_batches():
    rng = np.random.default_rng(0)
    items = [dict(kind="video", width=int(w), height=int(h), frames=int(f))
             for w, h, f in zip(rng.choice([640, 360, 480], 60), rng.choice([360, 640, 480], 60),
                                rng.choice([40, 70], 60))]
    buckets = [(256, 448, 33, 4), (448, 256, 33, 3), (256, 256, 65, 2), (256, 448, 65, 5)]
    groups = train.assign_buckets(items, buckets)
    for b, idx in groups.items():
        for i in idx:  # nearest aspect ratio, then the longest duration that fits
            it = items[i]
            ar = math.log(it["width"] / it["height"])
            fits = [j for j in range(4) if buckets[j][2] <= it["frames"]]
            best = min(abs(math.log(buckets[j][1] / buckets[j][0]) - ar) for j in fits)
            assert abs(math.log(buckets[b][1] / buckets[b][0]) - ar) == best and it["frames"] >= buckets[b][2]
    sizes = {b: buckets[b][3] for b in groups}
    for epoch in range(2):
        batches = train.bucket_batches(groups, sizes, seed=1, epoch=epoch)
        seen = sorted(i for _, batch in batches for i in batch)
        assert seen == sorted(i for idx in groups.values() for i in idx)  # every item exactly once
        for b, batch in batches:
            assert all(i in groups[b] for i in batch) and len(batch) <= sizes[b]
        # one short batch per bucket at most
        assert sum(len(batch) < sizes[b] for b, batch in batches) <= len(groups)
    assert train.bucket_batches(groups, sizes, 1, 0) != train.bucket_batches(groups, sizes, 1, 1)  # shuffled
    two = train.bucket_batches(groups, sizes, seed=1, epoch=0, world=2)
    for b, batch in two:
        assert len(batch) % 2 == 0 and len(batch) <= 2 * sizes[b]
        r0, r1 = train.rank_slice(batch, 0, 2), train.rank_slice(batch, 1, 2)
        assert len(r0) == len(r1) and r0 + r1 == batch


def test_latent_cache_is_keyed_on_the_vae(data, tmp_path):
    """Another VAE into the same cache folder encodes afresh; the same VAE again reuses the files. (The
    cache used to be keyed on the bucket size alone: a new --vae trained on the old VAE's latents.)"""
    clips, images = train.load_items(data)
    cpu, size = torch.device("cpu"), (64, 112, 1)
    vaes = []
    for seed in (0, 1, 0):
        torch.manual_seed(seed)
        vaes.append(vae_lib.CausalVAE(train.vae_config(train.PRESETS["demo"])).eval())
    a, b, again = (train.cache_latents(images[:1], size, v, str(tmp_path), cpu) for v in vaes)
    assert a != b and again == a
    for folder, v in ((a, vaes[0]), (b, vaes[1])):
        x = train.to_unit(train.read_clip(images[0]["path"], size[:2]))[None]
        mean, logvar = (m[0] for m in v.encode(x, tiled=True))  # 112 px > the tiny VAE's 64 px tiles
        # a posterior sample, scaled: the same generator gives the same eps
        eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(3))
        got = train.load_latent(folder, images[0], torch.Generator().manual_seed(3), scale=0.5)
        torch.testing.assert_close(got, (mean + torch.exp(0.5 * logvar) * eps) * 0.5)


def test_concept_balanced_batches_draw_in_proportion_to_the_weights():
    """--balance: each bucket keeps its epoch length, items drawn with replacement in proportion to
    curate.py's k-means weights (a weight-0 item never); same (seed, epoch), same batches."""
    groups = {0: list(range(0, 40)), 1: list(range(40, 60))}
    weights = {i: (0.0 if i == 5 else 3.0 if i < 20 or i >= 50 else 1.0) for i in range(60)}
    sizes = {0: 4, 1: 3}
    counts = np.zeros(60)
    for epoch in range(400):
        batches = train.bucket_batches(groups, sizes, seed=3, epoch=epoch, weights=weights)
        drawn = [i for _, batch in batches for i in batch]
        assert len(drawn) == 60 and all(i in groups[b] for b, batch in batches for i in batch)
        np.add.at(counts, drawn, 1)
    assert counts[5] == 0
    for group in groups.values():  # within a bucket, draws per item track weight / sum of weights
        w = np.array([weights[i] for i in group])
        expect = 400 * len(group) * w / w.sum()
        live = w > 0
        assert np.abs(counts[group][live] / expect[live] - 1).max() < 0.25
    again = [train.bucket_batches(groups, sizes, 3, 7, weights=weights) for _ in range(2)]
    assert again[0] == again[1]


def test_clip_windows_are_disjoint_and_fit_their_clip():
    items = [dict(kind="video", clip=f"c{i}", width=112, height=64, frames=f)
             for i, f in enumerate([33, 65, 66, 200, 40])]
    buckets = [(64, 112, 9, 4)]  # 9 frames at stride 4 span 33 source frames
    groups = train.assign_buckets(items, buckets, stride=4)
    wins, wgroups = train.clip_windows(items, groups, buckets, stride=4, n=4)
    per_clip = {}
    for i in wgroups[0]:
        per_clip.setdefault(wins[i]["clip"], []).append(wins[i]["start"])
    assert per_clip == {"c0": [0], "c1": [0], "c2": [0, 33], "c3": [0, 33, 66, 99], "c4": [0]}
    assert all(w["start"] + 33 <= w["frames"] for w in wins)
    assert len({train.item_id(w) for w in wins}) == len(wins)  # each window its own cache file
    assert train.item_id(wins[0]) == "c0"  # a clip's first window keeps the clip's cache name


def test_checkpoint_keeps_the_cuda_generator(tmp_path, monkeypatch):
    """On GPUs the checkpoint holds the CUDA generator's state too (the VAE stage's posterior samples draw
    from it) and a resume restores it; it used to hold the CPU generator's alone. The CUDA calls are faked
    here, so the round trip runs on a CPU."""
    state = torch.randint(0, 256, (16,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    restored = []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": state.clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device="cuda": restored.append(s))
    model = nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    path = str(tmp_path / "state.safetensors")
    train.save_train_state(path, {"m": (model, opt)}, {}, {"step": 7}, rank=0)
    assert train.load_train_state(path, {"m": (model, opt)}, {}, torch.device("cuda"))["step"] == 7
    assert len(restored) == 1 and torch.equal(restored[0], state)


def test_demo_tokenizer_keeps_caption_words_whole(tmp_path):
    """BPE on the captions: one token per word (a unigram model on so few distinct words spelled most of
    them letter by letter, so 'a yellow triangle moving left' took 15 tokens)."""
    import sentencepiece as spm
    colours, shapes = ["red", "green", "blue", "yellow", "white"], ["circle", "square", "triangle"]
    directions = ["left", "right", "up", "down"]
    caps = [f"a {c} {s} moving {d}. A {c} {s} moving {d} across a dark backdrop."
            for c in colours for s in shapes for d in directions]
    train.train_tokenizer(caps, str(tmp_path / "tok.model"), vocab_size=512)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tok.model"))
    assert sp.encode("a yellow triangle moving left", out_type=str) == \
        ["▁a", "▁yellow", "▁triangle", "▁moving", "▁left"]
    assert sp.decode(sp.encode("a white square moving up")) == "a white square moving up"


def test_caption_dropout_and_permutation():
    cap = {"short_description": "a red circle moving left", "dense_description": "dense", "background": "bg",
           "style": "style", "lighting": "light", "camera_movement": "static shot",
           "quality_tags": ["256p", "sharp"]}
    cfg = train.TrainConfig(short_only=0.0, field_dropout=0.0)
    outs = {train.build_caption(cap, torch.Generator().manual_seed(i), cfg) for i in range(40)}
    for o in outs:
        parts = o.split(". ")
        assert parts[0] == "a red circle moving left"
        assert sorted(parts[1:]) == sorted(["dense", "bg", "style", "light", "static shot", "256p, sharp"])
    assert len(outs) > 5  # permuted
    only = train.TrainConfig(short_only=1.0)
    assert train.build_caption(cap, torch.Generator().manual_seed(0), only) == "a red circle moving left"
    half = train.TrainConfig(short_only=0.0, field_dropout=0.5)
    lens = [len(train.build_caption(cap, torch.Generator().manual_seed(i), half).split(". "))
            for i in range(200)]
    assert 2.5 < np.mean(lens) - 1 < 3.5  # about half of the 6 other fields kept


def test_fsdp_bf16_keeps_timestep_and_rope_in_fp32(tmp_path, monkeypatch):
    """shard_model's GPU policy (bf16 weights), run on one gloo rank: the timestep t = sigma*1000 and the
    guidance reach their sinusoids as the exact fp32 values and the RoPE tables stay fp32, as under the
    one-GPU autocast path and the official bf16 run; the blocks still compute in bf16. (FSDP's default
    cast_forward_inputs turned t = 998.7 into 1000.)"""
    import torch.distributed as dist
    import dit
    seen = {"t": [], "rope": [], "block": []}
    sinusoid, rope = dit.timestep_embedding, dit.apply_rope
    monkeypatch.setattr(dit, "timestep_embedding",
                        lambda t, *a, **k: seen["t"].append(t) or sinusoid(t, *a, **k))
    monkeypatch.setattr(dit, "apply_rope",
                        lambda x, cos, sin: seen["rope"].append(cos.dtype) or rope(x, cos, sin))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = dit.HunyuanVideoDiT(dit.CONFIGS["tiny"])
        train.shard_model(model, torch.device("cuda"))  # the CUDA policy; the mesh is this CPU process
        model.double_blocks[0].register_forward_pre_hook(lambda m, args: seen["block"].extend(args[:3]))
        t, g = torch.tensor([723.4, 998.7]), torch.tensor([1000.0, 6000.0])
        text, mask, pooled = torch.randn(2, 5, 32), torch.ones(2, 5, dtype=torch.long), torch.randn(2, 32)
        v = model(torch.randn(2, 16, 1, 4, 4), t, text, mask, pooled, g)
        v.float().square().mean().backward()
    finally:
        dist.destroy_process_group()
    assert len(seen["t"]) == 3  # time_in, guidance_in, txt_in's t_embedder
    for got, want in zip(seen["t"], (t, g, t)):
        assert got.dtype == torch.float32 and torch.equal(got, want)
    assert seen["rope"] and all(d == torch.float32 for d in seen["rope"])
    assert [x.dtype for x in seen["block"]] == [torch.bfloat16] * 3  # img, txt, vec
    assert v.dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------------------
# Runs of train.py on a small curated folder

def make_data(root):
    """A curate.py-shaped folder: 6 clips of moving shapes with captions, 4 stills."""
    rng = np.random.default_rng(0)
    os.makedirs(os.path.join(root, "clips"), exist_ok=True)
    clips, images = [], []
    for i, (colour, shape, d) in enumerate([("red", "circle", "left"), ("green", "square", "right"),
                                            ("blue", "triangle", "up"), ("yellow", "circle", "down"),
                                            ("white", "square", "left"), ("red", "triangle", "right")]):
        # 72 frames: the demo's video buckets take 9 frames at stride 8 (65 source frames); fewer, and its
        # "video" steps would all be still ones (train.check_stages says so)
        frames = curate.render_shot(rng, 112, 64, 72, shape, colour, d)
        path = f"clips/c{i}.mp4"
        curate.write_video(os.path.join(root, path), frames)
        cap = {"short_description": f"a {colour} {shape} moving {d}", "style": "flat",
               "camera_movement": "static shot"}
        clips.append({"clip": f"c{i}", "path": path, "width": 112, "height": 64, "frames": 72,
                      "caption": cap})
        if i < 4:
            cv2.imwrite(os.path.join(root, f"clips/i{i}.jpg"), frames[0][..., ::-1])
            images.append({"image": f"i{i}", "path": f"clips/i{i}.jpg", "width": 112, "height": 64,
                           "caption": cap})
    for name, rows in (("manifest.jsonl", clips), ("images.jsonl", images)):
        with open(os.path.join(root, name), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    from safetensors.torch import save_file
    torch.manual_seed(0)
    save_file(vae_lib.CausalVAE(train.vae_config(train.PRESETS["demo"])).state_dict(),
              os.path.join(root, "vae.safetensors"))
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(str(tmp_path_factory.mktemp("data")))


def run_train(data, out, *extra, torchrun=False, fault=None):
    """train.py, demo preset, 3 steps per stage on `data`, in a subprocess (under torchrun: 2 gloo ranks).
    fault=(kind, step): run through this file's __main__ instead, which patches the fault in first."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533"] \
        if torchrun else [sys.executable]
    cmd += [os.path.abspath(__file__), fault[0], str(fault[1])] if fault else [os.path.join(ROOT, "train.py")]
    cmd += ["--preset", "demo", "--data", data, "--vae", os.path.join(data, "vae.safetensors"), "--out", out,
            "--steps", "3", *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)


def inject_fault(kind, at):
    """Patch train.flow_matching_loss: its call number `at` (a fresh run calls it once per step on each rank,
    so step `at`) returns a NaN loss (kind "nan") or a finite loss whose gradients are infinite (kind
    "inf-grad", as an overflow in backward would make them)."""
    real, calls = train.flow_matching_loss, itertools.count()

    def loss_with_fault(*args, **kw):
        loss = real(*args, **kw)
        if next(calls) == at:
            if kind == "nan":
                loss = loss * float("nan")
            else:
                loss.register_hook(lambda grad: grad * float("inf"))
        return loss

    train.flow_matching_loss = loss_with_fault


def losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [(r["step"], r["loss"]) for r in map(json.loads, f) if "loss" in r]


def test_fsdp_two_ranks_stopped_and_resumed_match_one_process(data, tmp_path):
    """Two FSDP ranks (gloo) reproduce one process with their global batch, also across a stop and a
    --resume, where rank 0 alone reads the checkpoint and sends each rank its shards."""
    one = run_train(data, str(tmp_path / "one"), "--batch", "4", "--ckpt-every", "100")
    assert one.returncode == 0, one.stderr[-3000:]
    with open(tmp_path / "one" / "metrics.jsonl") as f:  # the video stage does train on clips
        assert "video" in [r.get("kind") for r in map(json.loads, f)]
    cut = run_train(data, str(tmp_path / "two"), "--batch", "2", "--ckpt-every", "2", torchrun=True,
                    fault=("nan", 5))
    assert cut.returncode != 0 and "the loss is nan at step 5" in cut.stderr, cut.stderr[-3000:]
    two = run_train(data, str(tmp_path / "two"), "--batch", "2", "--ckpt-every", "2", "--resume",
                    torchrun=True)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = losses(str(tmp_path / "one")), losses(str(tmp_path / "two"))
    assert len(a) == len(b) == 6  # 3 image steps, 3 video steps
    for (sa, la), (sb, lb) in zip(a, b):
        assert sa == sb and la == pytest.approx(lb, rel=1e-4), (a, b)


def test_resume_after_a_stop_equals_the_uninterrupted_run(data, tmp_path):
    from safetensors.torch import load_file
    full = run_train(data, str(tmp_path / "full"), "--ckpt-every", "2")
    assert full.returncode == 0, full.stderr[-3000:]
    # a NaN at step 5 stops the run before its update; the checkpoint of step 4 stays intact
    stop = run_train(data, str(tmp_path / "cut"), "--ckpt-every", "2", fault=("nan", 5))
    assert stop.returncode != 0 and "Traceback" not in stop.stderr
    assert "the loss is nan at step 5" in stop.stderr
    state = str(tmp_path / "cut" / "dit_state.safetensors")
    from safetensors import safe_open
    with safe_open(state, "pt") as f:
        assert json.loads(f.metadata()["meta"])["step"] == 4
    res = run_train(data, str(tmp_path / "cut"), "--ckpt-every", "2", "--resume")
    assert res.returncode == 0, res.stderr[-3000:]
    assert losses(str(tmp_path / "full")) == losses(str(tmp_path / "cut"))
    a, b = (load_file(str(tmp_path / run / "dit.safetensors")) for run in ("full", "cut"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bitwise on a CPU


def test_a_preset_run_is_a_folder_sample_py_takes(data, tmp_path):
    """A --preset run writes config.json and keeps its VAE beside the weights, as the demo does: sample.py
    --ckpt samples the folder with the preset's sampling defaults (preset runs used to write no
    config.json)."""
    out = tmp_path / "run"
    r = run_train(data, str(out), "--steps", "1")
    assert r.returncode == 0, r.stderr[-3000:]
    conf = json.loads((out / "config.json").read_text())
    assert f"next: python sample.py --ckpt {out}" in r.stdout
    cfg = train.PRESETS["demo"]
    assert conf["dit"] == json.loads(json.dumps(dataclasses.asdict(train.dit_config(cfg))))
    assert conf["sample"] == cfg.sampling and conf["text"]["text_len"] == train.DEMO_TEXT_LEN
    assert conf["video"] == {"height": 64, "width": 64, "frames": 9, "fps": 24 / cfg.frame_stride}
    s = subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), "--ckpt", str(out), "--prompt",
                        "a red circle moving left", "--steps", "1", "--out", str(tmp_path / "s.mp4")],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert s.returncode == 0, s.stderr[-3000:]
    assert (tmp_path / "s.mp4").is_file()


def test_text_encoder_too_narrow_for_the_dit_is_an_error_at_startup(data, tmp_path):
    """The 1.3B DiT reads 4096-wide LLM states; without --llm/--clip the small encoder gives 32: a one-line
    error before anything is cached (it used to surface as a shape error at the first DiT step)."""
    r = run_train(data, str(tmp_path / "run"), "--preset", "1.3b-gpu")
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "4096" in r.stderr and "--llm and --clip" in r.stderr
    assert not (tmp_path / "run" / "cache").exists()


def test_a_non_finite_gradient_stops_before_the_update(data, tmp_path):
    """An inf gradient with a finite loss at step 1: the run stops there, before the update. (Unchecked, the
    update made 4 weights NaN, the step-2 checkpoint saved them, and the NaN loss of step 2 then named that
    checkpoint the last good one.)"""
    from safetensors.torch import load_file
    r = run_train(data, str(tmp_path / "run"), "--ckpt-every", "2", fault=("inf-grad", 1))
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "the gradient norm is" in r.stderr and "at step 1 " in r.stderr, r.stderr[-3000:]
    state = tmp_path / "run" / "dit_state.safetensors"
    assert not state.exists() or all(torch.isfinite(v.float()).all() for v in load_file(str(state)).values())


def test_unwritable_output_is_a_clear_error(data, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = run_train(data, str(blocker / "sub"))
    assert r.returncode != 0 and "error: cannot write to" in r.stderr and "Traceback" not in r.stderr


def test_quick_demo_end_to_end(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--quick", "--out",
                        str(tmp_path / "demo")], capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "demo"
    for f in ("config.json", "dit.safetensors", "vae.safetensors", "text_encoder.safetensors",
              "tokenizer.model", "loss.png", "metrics.jsonl"):
        assert (out / f).is_file(), f
    assert any(p.suffix == ".mp4" for p in (out / "samples").iterdir())
    # and sample.py takes the folder as it is
    s = subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), "--ckpt", str(out), "--prompt",
                        "a red circle moving left", "--steps", "2", "--out", str(tmp_path / "s.mp4")],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert s.returncode == 0, s.stderr[-3000:]
    assert (tmp_path / "s.mp4").is_file()
    # both play at the training clips' rate (24 fps source, every frame_stride-th frame), not a fixed 24 fps
    fps = 24 / train.PRESETS["demo"].frame_stride
    assert json.loads((out / "config.json").read_text())["video"]["fps"] == fps
    for p in (next((out / "samples").glob("*.mp4")), tmp_path / "s.mp4"):
        assert cv2.VideoCapture(str(p)).get(cv2.CAP_PROP_FPS) == pytest.approx(fps, abs=0.01), p


def test_quick_demo_stops_after_the_vae_stage_and_resumes_to_the_end(tmp_path):
    out = tmp_path / "demo"
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--quick", "--out", str(out)]
    r = subprocess.run(cmd + ["--stage", "vae"], capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "VAE stage done" in r.stdout and (out / "vae.safetensors").is_file()
    assert not (out / "dit.safetensors").exists() and not (out / "samples").exists()
    r = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "dit.safetensors").is_file()
    assert any(p.suffix == ".mp4" for p in (out / "samples").iterdir())


def test_vae_stage_takes_lpips_weights(data, tmp_path, monkeypatch):
    """--lpips reaches the VAE stage's loss (paper §4.1: L1 + 0.1 LPIPS + ...); a missing file is a one-line
    error before anything runs."""
    from dataclasses import replace
    seen, real = [], vae_lib.VAELoss

    def spy(*args, **kw):
        seen.append(kw.get("perceptual_weights"))
        return real(*args, **dict(kw, perceptual_weights=None))  # no real VGG weights here

    monkeypatch.setattr(vae_lib, "VAELoss", spy)
    cfg = replace(train.PRESETS["demo"], vae_steps=1, ckpt_every=1, warmup=1,
                  vae_frame_stride=4)
    clips, images = train.load_items(data)
    train.train_vae(cfg, clips, images, str(tmp_path), torch.device("cpu"), log=lambda r: None,
                    lpips=["vgg16.pth", "lpips_vgg.pth"])
    assert seen == [["vgg16.pth", "lpips_vgg.pth"]]
    missing = str(tmp_path / "none.pth")
    r = run_train(data, str(tmp_path / "out"), "--lpips", missing)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith(f"error: --lpips {missing}: no such file")


def test_tier_reads_curate_sets(tmp_path):
    """--tier NAME: curate.py's clip set for that stage and the largest image set not above its side;
    'finetune' reads finetune.jsonl and the largest image set; no tier: everything."""
    sets = {"manifest.jsonl": "a", "manifest_360p.jsonl": "b", "finetune.jsonl": "c", "images.jsonl": "i",
            "images_256p.jsonl": "i256", "images_512p.jsonl": "i512"}
    for name, files in sets.items():
        row = {"path": files, "caption": {"short_description": "x"}}
        (tmp_path / name).write_text(json.dumps(row) + "\n")
    got = {t: [[os.path.basename(r["path"]) for r in rs] for rs in train.load_items(str(tmp_path), t)]
           for t in (None, "360p", "finetune")}
    assert got == {None: [["a"], ["i"]], "360p": [["b"], ["i256"]], "finetune": [["c"], ["i512"]]}
    with pytest.raises(SystemExit, match="no manifest_720p.jsonl"):
        train.load_items(str(tmp_path), "720p")


def test_contact_sheet_rows_hold_every_other_frame(tmp_path):
    """samples.png: one row per prompt, a 260 px text column, then frames 0, 2, 4, ... at 2x, each with a
    2 px white border right and below."""
    rng = np.random.default_rng(0)
    videos = rng.integers(0, 200, (2, 9, 16, 24, 3), dtype=np.uint8)
    path = str(tmp_path / "sheet.png")
    train.contact_sheet(["a red circle moving left", "a blue square moving up"], videos, path)
    img = cv2.imread(path)[..., ::-1]
    assert img.shape == (2 * 36, 260 + 5 * 52, 3)
    for r in range(2):
        for k, t in enumerate(range(0, 9, 2)):
            tile = img[36 * r:36 * r + 32, 260 + 52 * k:260 + 52 * k + 48]
            np.testing.assert_array_equal(tile, videos[r, t].repeat(2, 0).repeat(2, 1))
            assert (img[36 * r + 32:36 * r + 36, 260 + 52 * k:260 + 52 * (k + 1)] == 255).all()
    assert (img[:, :260] < 128).any()  # the prompt's text



# ---------------------------------------------------------------------------------------------------------
# Odd inputs: one line naming the problem and the fix, never a traceback or a silent wrong result

def write_rows(path, rows):
    with open(path, "w") as f:
        f.writelines((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


def test_manifest_lines_torn_invalid_or_uncaptioned(tmp_path, capsys):
    """A torn last line (curate.py killed mid-append) is left out with a warning; any other line that is not
    a JSON record is an error naming its line (it was a JSONDecodeError/AttributeError traceback); records
    without a caption are left out and counted; a plain-string caption is the short description."""
    cap = {"short_description": "a red circle"}
    rows = [{"path": "a.mp4", "caption": cap}, {"path": "b.mp4", "caption": "a blue square"},
            {"path": "c.mp4", "caption": {"short_description": " ", "style": "flat"}}, {"path": "d.mp4"}]
    write_rows(tmp_path / "manifest.jsonl", rows + ['{"path": "e.mp4", "capt'])
    clips, images = train.load_items(str(tmp_path))
    assert [os.path.basename(c["path"]) for c in clips] == ["a.mp4", "b.mp4"] and images == []
    assert clips[1]["caption"] == {"short_description": "a blue square"}
    err = capsys.readouterr().err
    assert "last line is cut off" in err and "2 of 4 records" in err and "no caption" in err
    for bad, why in (('{"path": "x.mp4", "capt', "line 1 is not valid JSON"), ("[1, 2]", "line 1 is not a"),
                     ('{"caption": "no path"}', "line 1 is not a")):
        write_rows(tmp_path / "manifest.jsonl", [bad] + rows[:1])
        with pytest.raises(SystemExit, match=why):
            train.load_items(str(tmp_path))
    write_rows(tmp_path / "manifest.jsonl", rows[2:])
    with pytest.raises(SystemExit, match="no captioned clips or images"):
        train.load_items(str(tmp_path))


def test_a_tier_that_does_not_exist_names_the_ones_that_do(tmp_path):
    row = {"path": "a.mp4", "caption": "x"}
    write_rows(tmp_path / "manifest.jsonl", [row])
    with pytest.raises(SystemExit, match="no tier sets"):
        train.load_items(str(tmp_path), "360p")
    for name in ("manifest_256p.jsonl", "finetune.jsonl"):
        write_rows(tmp_path / name, [row])
    with pytest.raises(SystemExit, match=r"--tier 720: .* its tiers are 256p, finetune, or drop --tier"):
        train.load_items(str(tmp_path), "720")


def test_missing_files_are_left_out_and_lacking_sizes_read_from_the_file(data, tmp_path, capsys):
    """usable_items: a record whose file is missing is left out, said in one line (it crashed in the latent
    cache hours in); one without width/height/frames gets them from its file (it was a KeyError, or with no
    "frames" silently fit no video bucket); two records with one id would share a cache file: an error."""
    clips, images = train.load_items(data)
    bare = {k: v for k, v in clips[0].items() if k not in ("width", "height", "frames")}
    gone = dict(clips[1], path=str(tmp_path / "gone.mp4"))
    got, stills = train.usable_items([bare, gone, clips[2]], images[:1])
    assert [c["clip"] for c in got] == ["c0", "c2"] and len(stills) == 1
    assert (got[0]["width"], got[0]["height"], got[0]["frames"]) == (112, 64, 72)
    assert "1 of 3 clips' files are missing (first: " + str(tmp_path / "gone.mp4") in capsys.readouterr().err
    with pytest.raises(SystemExit, match="two clips are named 'c0'"):
        train.usable_items([clips[0], dict(clips[1], clip="c0")], [])
    with pytest.raises(SystemExit, match="none of the manifest's clips or stills can be read"):
        train.usable_items([gone], [])


def test_an_undecodable_clip_or_still_is_skipped_once(data, tmp_path, capsys, monkeypatch):
    """A damaged mp4 or a cut-off jpg in the latent cache: left out with one warning per file, and no cache
    file, so train_dit leaves it out of its buckets (it was a ValueError traceback when the stage's cache
    was built, hours into a run; a cut-off jpg decoded silently with its missing rows grey, i.e. zeros)."""
    clips, images = train.load_items(data)
    raw = open(images[0]["path"], "rb").read()
    (tmp_path / "cut.jpg").write_bytes(raw[:len(raw) * 9 // 10])
    (tmp_path / "bad.mp4").write_bytes(b"\0" * 2000)
    cut = dict(images[0], image="cut", path=str(tmp_path / "cut.jpg"))
    bad = dict(images[0], image="bad", path=str(tmp_path / "bad.mp4"))
    with pytest.raises(ValueError, match="cut off"):
        train.read_clip(cut["path"], (64, 112))
    torch.manual_seed(0)
    vae = vae_lib.CausalVAE(train.vae_config(train.PRESETS["demo"])).eval()
    monkeypatch.setattr(train, "SKIPPED", set())
    for _ in range(2):  # a second bucket (or stage) with the same files: not said again
        folder = train.cache_latents([cut, images[1], bad], (64, 64, 1), vae, str(tmp_path),
                                     torch.device("cpu"))
    assert sorted(os.listdir(folder)) == ["i1.safetensors"]
    warned = [line for line in capsys.readouterr().err.splitlines() if "warning: skipping" in line]
    assert len(warned) == 2 and "cut.jpg" in warned[0] + warned[1] and "bad.mp4" in warned[0] + warned[1]


def test_stages_nothing_fits_is_an_error_at_startup_and_stills_only_said(data, capsys):
    """check_stages (train_dit, before any cache): a stage that nothing fits was an error only when it
    began (after the stages before it); a video stage whose buckets no clip is long enough for trained on
    stills alone without a word (as this file's clips did when they were 40 frames, under the demo's 65 at
    stride 8)."""
    clips, images = train.load_items(data)
    cfg = train.PRESETS["demo"]
    train.check_stages(cfg, clips, images)
    assert "stage video" not in capsys.readouterr().err  # the fixture's 72-frame clips fit
    train.check_stages(cfg, [dict(c, frames=40) for c in clips], images)
    assert "stage video: no clip fits its video buckets (its shortest video bucket needs 65 source frames " \
        "(9 at frame stride 8), the longest clip has 40): it trains on stills only" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="error: stage image: no clip or still fits its buckets"):
        train.check_stages(cfg, clips, [])
    short = dataclasses.replace(cfg, frame_stride=1)
    train.check_stages(short, [dict(clips[0], frames=5)] + clips[1:], images)
    assert "note: stage video: 1 of 6 clips are too short for it" in capsys.readouterr().err


def test_balance_needs_concept_weights(data, capsys):
    """--balance on clips without curate.py's k-means weights drew uniformly without a word."""
    clips, _ = train.load_items(data)
    with pytest.raises(SystemExit, match="--balance: the clips have no k-means concept weights"):
        train.check_balance(clips)
    with pytest.raises(SystemExit, match="has weight 'x', not a number"):
        train.check_balance([dict(clips[0], weight="x")] + clips[1:])
    with pytest.raises(SystemExit, match="every clip's concept weight is 0"):
        train.check_balance([dict(c, weight=0) for c in clips])
    train.check_balance([dict(clips[0], weight=2.0)] + clips[1:])
    assert "5 of 6 clips have no concept weight" in capsys.readouterr().err
    # a bucket of weight-0 items is never drawn (torch.multinomial raised on it)
    batches = train.bucket_batches({0: [0, 1], 1: [2]}, {0: 2, 1: 2}, 0, 0, weights={0: 1, 1: 1, 2: 0})
    assert [b for b, _ in batches] == [0]


def test_resume_from_another_model_is_one_line(tmp_path, capsys):
    """--resume with a checkpoint of another model size, LoRA rank/targets or --i2v: it was a size-mismatch
    traceback (or, for other LoRA targets or alpha, silently a partial load); no checkpoint: said."""
    model = nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    path = str(tmp_path / "dit_state.safetensors")
    arch = {"dit": {"hidden_size": 128, "depth_double": 2}, "lora": {"rank": 4, "alpha": 4, "targets": "x"}}
    train.save_train_state(path, {"dit": (model, opt)}, {}, {"step": 3, "arch": arch}, rank=0)
    train.check_resume(path, arch, 0)
    other = {"dit": {"hidden_size": 3072, "depth_double": 2}, "lora": {"rank": 8, "alpha": 4, "targets": "x"}}
    with pytest.raises(SystemExit, match=r"--resume: .*dit_state.safetensors is from another model "
                       r"\(dit.hidden_size 128 there, 3072 now; lora.rank 4 there, 8 now\)"):
        train.check_resume(path, other, 0)
    train.check_resume(None, arch, 0)
    assert "no checkpoint for this stage in --out yet" in capsys.readouterr().err


def test_a_torn_metrics_line_does_not_stop_resume_and_out_may_not_be_a_file(tmp_path):
    """A run killed while appending to metrics.jsonl left a cut-off line: --resume (open_metrics) and the loss
    plot raised JSONDecodeError; the line is dropped instead. --out naming a file: said so."""
    write_rows(tmp_path / "metrics.jsonl", [{"stage": "image", "step": 0, "loss": 1.0},
                                            {"stage": "image", "step": 1, "loss": 0.5}, '{"stage": "ima'])
    train.plot_losses(str(tmp_path / "metrics.jsonl"), str(tmp_path / "loss.png"))
    assert (tmp_path / "loss.png").is_file()
    train.open_metrics(str(tmp_path), 0, True, {"dit": "dit_state.safetensors"})  # no checkpoint: all dropped
    assert train.read_jsonl(str(tmp_path / "metrics.jsonl")) == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit, match="it is a file, not a folder"):
        train.check_writable(str(tmp_path / "file"), 0)


def run_in_process(monkeypatch, data, out, *extra):
    """train.py's main() in this process (as run_train, without the subprocess): demo preset, 3 steps."""
    monkeypatch.setattr(sys, "argv", ["train.py", "--preset", "demo", "--data", data, "--vae",
                                      os.path.join(data, "vae.safetensors"), "--out", out, "--steps", "3",
                                      *extra])
    train.main()


def test_ctrl_c_in_the_step_loop_checkpoints_that_step_and_resume_matches(data, tmp_path, monkeypatch,
                                                                          capsys):
    """KeyboardInterrupt in step 4's forward (ckpt-every 100: no checkpoint yet): one line, no traceback,
    a checkpoint as of step 4's start (it was a traceback, and steps 0-3 were lost), and --resume ends where
    the uninterrupted run does, bit for bit."""
    from safetensors.torch import load_file
    run_in_process(monkeypatch, data, str(tmp_path / "full"), "--ckpt-every", "100")
    real, calls = train.flow_matching_loss, itertools.count()

    def ctrl_c_at_4(*args, **kw):
        if next(calls) == 4:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(train, "flow_matching_loss", ctrl_c_at_4)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_in_process(monkeypatch, data, str(tmp_path / "cut"), "--ckpt-every", "100")
    err = capsys.readouterr().err
    assert e.value.code == 130 and "Traceback" not in err
    assert f"interrupted: step 4 saved in {tmp_path / 'cut' / 'dit_state.safetensors'}" in err
    monkeypatch.setattr(train, "flow_matching_loss", real)
    run_in_process(monkeypatch, data, str(tmp_path / "cut"), "--ckpt-every", "100", "--resume")
    assert losses(str(tmp_path / "full")) == losses(str(tmp_path / "cut"))
    a, b = (load_file(str(tmp_path / run / "dit.safetensors")) for run in ("full", "cut"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # Ctrl-C outside the DiT loop (here: loading the data): one line too
    monkeypatch.setattr(train, "load_items", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(SystemExit) as e:
        run_in_process(monkeypatch, data, str(tmp_path / "x"))
    assert e.value.code == 130 and "interrupted: finished work is kept" in capsys.readouterr().err


def test_ctrl_c_in_the_vae_stage_checkpoints_that_step_and_resume_matches(data, tmp_path, monkeypatch,
                                                                         capsys):
    """The VAE loop likewise (its posterior samples draw from the global generator, restored as of the step
    boundary): interrupted in step 2, resumed, the same weights as 4 uninterrupted steps."""
    cfg = dataclasses.replace(train.PRESETS["demo"], vae_steps=4, ckpt_every=100, warmup=1,
                              vae_frame_stride=4, vae_batch=1, vae_image_batch=1)
    clips, images = train.load_items(data)
    cpu = torch.device("cpu")

    def run(out, resume=False):
        os.makedirs(tmp_path / out, exist_ok=True)
        return train.train_vae(cfg, clips[:2], images[:2], str(tmp_path / out), cpu, resume=resume,
                               log=lambda r: None).state_dict()

    full = run("full")
    real, calls = train.lr_at, itertools.count()

    def ctrl_c_at_2(*args):
        if next(calls) == 2:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(train, "lr_at", ctrl_c_at_2)
    with pytest.raises(SystemExit) as e:
        run("cut")
    assert e.value.code == 130 and "interrupted: step 2 saved in" in capsys.readouterr().err
    monkeypatch.setattr(train, "lr_at", real)
    again = run("cut", resume=True)
    assert all(torch.equal(full[k], again[k]) for k in full)


@pytest.mark.parametrize("extra, message", [
    (["--init-dit", "NOPE.pt"], "error: --init-dit NOPE.pt: no such file or folder"),
    (["--batch", "-1"], "error: --batch -1: must be at least 1"),
    (["--steps", "0"], "error: --steps 0: must be at least 1"),
    (["--lora", "4", "--lora-alpha", "0", "--from", "FROM"], "error: --lora-alpha 0.0: must be a number > 0"),
    (["--lora", "4", "--from", "FROM", "--out", "OUT/l"], "error: --from FROM: its config.json is not a "
                                                          "train.py run's"),
])
def test_bad_options_are_one_line_before_any_work(data, tmp_path, monkeypatch, extra, message):
    """A missing --init-dit (and --vae/--llm/--clip) is refused at startup: without --vae it came after the
    whole VAE stage. --batch -1 hung (no batch in any epoch), --steps 0 ran the preset's 20,000 steps and
    a negative one exported an untrained DiT, --lora-alpha 0 trained nothing. --from a folder whose
    config.json is not train.py's (a diffusers folder has one) was a KeyError traceback."""
    (tmp_path / "FROM").mkdir()
    (tmp_path / "FROM" / "config.json").write_text('{"_class_name": "HunyuanVideoTransformer3DModel"}')
    extra = [str(tmp_path / x) if x in ("NOPE.pt", "FROM", "OUT/l") else x for x in extra]
    message = message.replace("NOPE.pt", str(tmp_path / "NOPE.pt")).replace("FROM", str(tmp_path / "FROM"))
    argv = ["train.py", "--data", data, *extra] if "--lora" in extra else \
        ["train.py", "--preset", "demo", "--data", data, "--out", str(tmp_path / "o"), *extra]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as e:
        train.main()
    assert str(e.value.code).startswith(message), e.value.code


if __name__ == "__main__":
    # `python tests/test_train.py KIND STEP ARGS...` (run_train's fault=): train.py ARGS, with
    # inject_fault(KIND, STEP) first
    inject_fault(sys.argv[1], int(sys.argv[2]))
    sys.argv = [os.path.join(ROOT, "train.py")] + sys.argv[3:]
    train.main()

