"""sample.py: the official schedule, the Euler/CFG arithmetic, prompt -> mp4 end to end with tiny random
models, sequence parallel == single process, and clean errors for bad input."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

import dit
import sample
import text_encoder
import train
import vae as vae_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_sigma_schedule_is_the_official_one():
    s = sample.flow_sigmas(50, 7.0)
    assert s.dtype == torch.float32 and len(s) == 51
    x = torch.linspace(1, 0, 51, dtype=torch.float64)
    torch.testing.assert_close(s.double(), 7 * x / (1 + 6 * x), rtol=0, atol=1e-6)
    # the official FlowMatchDiscreteScheduler's: 1.0, 0.99709, ..., 0.30882, 0.22581, 0.125, then 0
    assert s[0] == 1.0 and s[-1] == 0.0 and s[-2] == 0.125
    assert [round(v, 5) for v in s[[1, -4, -3]].tolist()] == [0.99709, 0.30882, 0.22581]


class FakeDiT(nn.Module):
    """Returns a velocity chosen by the test; records what it was called with."""

    def __init__(self, fn, guidance_embed=False):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.cfg = dit.replace(dit.CONFIGS["tiny"], guidance_embed=guidance_embed)
        self.fn, self.calls = fn, []
        self.sp_group = None  # as the real DiT: no sequence parallel

    def forward(self, x, t, text, mask, pooled, guidance=None):
        self.calls.append(dict(t=t.clone(), guidance=None if guidance is None else guidance.clone(),
                               B=x.shape[0]))
        return self.fn(x, t, pooled)


def cond(B=1, value=1.0):
    return torch.zeros(B, 3, 32), torch.ones(B, 3, dtype=torch.long), torch.full((B, 32), value)


def test_euler_integrates_a_straight_path_exactly():
    """Along x_sigma = (1 - sigma) x0 + sigma eps the velocity eps - x0 is constant, so Euler is exact for
    any schedule: starting from eps at sigma=1 it must land on x0."""
    torch.manual_seed(0)
    x0, eps = torch.randn(2, 4, 3, 4, 4), torch.randn(2, 4, 3, 4, 4)
    model = FakeDiT(lambda x, t, p: eps - x0)
    out = sample.denoise(model, eps, cond(2), steps=7, shift=5.0, progress=False)
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-5)
    ts = torch.stack([c["t"][0] for c in model.calls])
    torch.testing.assert_close(ts, sample.flow_sigmas(7, 5.0)[:-1] * 1000)  # model sees t = sigma * 1000


def test_velocity_field_one_step():
    """One Euler step on the field v = 3x from sigma=1 to 0: x + v * (0 - 1), by hand."""
    x = torch.full((1, 4, 1, 2, 2), 2.0)
    model = FakeDiT(lambda x, t, p: 3 * x)
    out = sample.denoise(model, x, cond(), steps=1, shift=1.0, progress=False)
    torch.testing.assert_close(out, x + 3 * x * (0.0 - 1.0))


def test_cfg_combination_and_batch_order():
    """Real CFG: batch [uncond ; cond], v = v_u + w (v_c - v_u)."""
    model = FakeDiT(lambda x, t, p: p[:, :1].view(-1, 1, 1, 1, 1).expand_as(x).clone())  # v = pooled value
    x = torch.zeros(1, 4, 1, 2, 2)
    out = sample.denoise(model, x, cond(1, 5.0), steps=1, shift=1.0, cfg_scale=3.0, uncond=cond(1, 2.0),
                         progress=False)
    assert model.calls[0]["B"] == 2
    torch.testing.assert_close(out, x - (2.0 + 3.0 * (5.0 - 2.0)))


def test_embedded_guidance_is_x1000_in_the_dit_dtype():
    model = FakeDiT(lambda x, t, p: torch.zeros_like(x), guidance_embed=True).to(torch.bfloat16)
    sample.denoise(model, torch.zeros(1, 4, 1, 2, 2), cond(), steps=1, guidance=6.0, progress=False)
    g = model.calls[0]["guidance"]
    assert g.dtype == torch.bfloat16 and g.item() == 6016.0  # official: 6.0 -> bf16 -> x1000


def test_generate_sizes_the_latent_by_the_vae_and_seeds_each_prompt():
    """generate(): the latent grid is the VAE's compression of the video size (here 2x in time and 4x in
    space, not the release's 4x and 8x); prompt i starts from seed + i's noise; real CFG encodes the negative
    prompt; the latent is unscaled before the decode; frames come back as uint8 per prompt."""
    seen = {"prompts": []}
    model = FakeDiT(lambda x, t, p: torch.zeros_like(x))  # v = 0: the latent stays the noise

    class Encoder:
        device = torch.device("cpu")

        def __call__(self, prompts, T):
            seen["prompts"].append((list(prompts), T))
            return cond(len(prompts))

    class VAE:
        cfg = vae_lib.replace(vae_lib.CONFIGS["tiny"], time_compression=2, spatial_compression=4,
                              scaling_factor=0.5)

        def decode(self, z, tiled=False):
            seen.update(z=z, tiled=tiled)
            return torch.zeros(z.shape[0], 3, 9, 16, 24)

    pipe = sample.Pipeline(Encoder(), model, VAE(), video={"height": 16, "width": 24, "frames": 9, "fps": 3},
                           sampling=dict(sample.OFFICIAL_SAMPLING, steps=2))
    frames = sample.generate(pipe, ["a", "b"], seed=5, cfg_scale=2.0, negative_prompt="no", tiled=False)
    assert frames.shape == (2, 9, 16, 24, 3) and frames.dtype == np.uint8 and (frames == 127).all()
    assert seen["prompts"] == [(["a", "b"], 9), (["no", "no"], 9)]
    assert len(model.calls) == 2 and model.calls[0]["B"] == 4  # steps from the pipeline; [uncond ; cond]
    C = model.cfg.in_channels
    want = torch.cat([torch.randn(1, C, 5, 4, 6, generator=torch.Generator().manual_seed(s)) for s in (5, 6)])
    torch.testing.assert_close(seen["z"], want / 0.5, rtol=0, atol=0)  # (9-1)/2+1 frames, 16/4 x 24/4
    assert seen["tiled"] is False
    # the unconditional prompt when none is passed: the folder's own ("" is the empty caption a train.py
    # model learned), else the official negative prompt
    for folder, want in ((None, text_encoder.NEGATIVE_PROMPT), ("", ""), ("blurry", "blurry")):
        seen["prompts"].clear()
        extra = {} if folder is None else {"negative_prompt": folder}
        pipe.sampling = dict(sample.OFFICIAL_SAMPLING, steps=2, **extra)
        sample.generate(pipe, ["a"], cfg_scale=2.0, tiled=False)
        assert seen["prompts"][1] == ([want], 9)


def test_frames_are_truncated_like_the_official_writer():
    video = torch.tensor([-1.0, 0.0, 0.999, 2.0]).view(1, 4, 1, 1).expand(3, 4, 1, 1)
    f = sample.to_frames(video)
    assert f.shape == (4, 1, 1, 3) and f[:, 0, 0, 0].tolist() == [0, 127, 254, 255]


# ---------------------------------------------------------------------------------------------------------
# End to end with a tiny checkpoint folder, as train.py writes it

def make_ckpt(path, H=32, W=48, T=5):
    os.makedirs(path, exist_ok=True)
    tok = os.path.join(path, "tokenizer.model")
    words = [f"a {c} {s} moving {d}" for c in ("red", "green", "blue") for s in ("circle", "square")
             for d in ("left", "right")]
    train.train_tokenizer(words * 3, tok, vocab_size=40)
    enc = text_encoder.PromptEncoder.tiny(text_encoder.Tokenizer(tok), text_len=16)
    train.save_encoder(enc, os.path.join(path, "text_encoder.safetensors"))
    torch.manual_seed(0)
    dcfg = dit.replace(dit.CONFIGS["tiny"], in_channels=4, out_channels=4, guidance_embed=False)
    model = dit.HunyuanVideoDiT(dcfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    dit.save_dit(model, os.path.join(path, "dit.safetensors"))
    vcfg = vae_lib.CONFIGS["tiny"]
    from safetensors.torch import save_file
    save_file(vae_lib.CausalVAE(vcfg).state_dict(), os.path.join(path, "vae.safetensors"))
    from dataclasses import asdict
    train.write_json(os.path.join(path, "config.json"), {
        "dit": asdict(dcfg), "vae": asdict(vcfg),
        "text": {"llm": asdict(enc.llm.cfg), "clip": asdict(enc.clip.cfg), "text_len": 16,
                 "tokenizer": "tokenizer.model"},
        "video": {"height": H, "width": W, "frames": T},
        "sample": {"steps": 3, "shift": 3.0, "guidance": None, "cfg_scale": 1.0}})
    return path


def run_sample(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=300)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_ckpt(str(tmp_path_factory.mktemp("ckpt")))


def test_prompt_to_mp4(ckpt, tmp_path):
    import cv2
    out = str(tmp_path / "v.mp4")
    r = run_sample("--ckpt", ckpt, "--prompt", "a red circle moving left", "--out", out, "--steps", "2",
                   "--frames", "9", "--cfg-scale", "2")
    assert r.returncode == 0, r.stderr
    cap = cv2.VideoCapture(out)
    frames = []
    while True:
        ok, f = cap.read()
        if not ok:
            break
        frames.append(f)
    assert len(frames) == 9 and frames[0].shape == (32, 48, 3)
    assert cap.get(cv2.CAP_PROP_FPS) == 24
    strip = cv2.imread(out[:-4] + ".png")
    assert strip is not None and strip.shape[0] == 32
    assert "seconds:" in r.stdout


def test_prompts_file_batch(ckpt, tmp_path):
    pf = tmp_path / "p.txt"
    pf.write_text("a red circle moving left\n\na blue square moving up\n")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), "--ckpt", ckpt, "--prompts", str(pf),
                        "--steps", "1"], capture_output=True, text=True, cwd=str(tmp_path), timeout=300)
    assert r.returncode == 0, r.stderr
    made = sorted(os.listdir(tmp_path / "out" / "samples"))
    assert made == ["0_a_red_circle_moving_left.mp4", "0_a_red_circle_moving_left.png",
                    "1_a_blue_square_moving_up.mp4", "1_a_blue_square_moving_up.png"]


@pytest.mark.parametrize("args,needle", [
    (["--frames", "8"], "--frames 8: must be 4k+1"),
    # rounded up, as the official sampler does (inference.py align_to), not to the nearest (32)
    (["--height", "36"], "--height 36: must be a positive multiple of 16; use 48 (what the official"),
    (["--width", "0"], "--width 0"),
    (["--steps", "0"], "--steps 0: must be at least 1"),
    (["--prompt", "  "], "the prompt is empty"),
    (["--ckpt", "/nonexistent"], "--ckpt /nonexistent: no config.json"),
    (["--dit", "/nonexistent.pt"], "need all four"),
    (["--dit", "/x.pt", "--vae", "/x", "--llm", "/x", "--clip", "/x"], "--dit /x.pt: no such file"),
    (["--dit", "/x_fp8.pt", "--vae", "/x", "--llm", "/x", "--clip", "/x"], "/x_fp8_map.pt is missing"),
    # were a traceback after the whole run (OpenCV refused the rate), or 0 silently meant 24
    (["--fps", "0"], "--fps 0: must be 1 to 65535"),
    (["--fps", "-5"], "--fps -5: must be 1 to 65535"),
    (["--seed", str(2 ** 64)], f"--seed {2 ** 64}: must be between 0 and {2 ** 64 - 1}"),  # was a traceback
    (["--lora", "x.safetensors:nan"], "the scale after ':' must be a finite number"),  # was a black video
    (["--lora", "x.safetensors:inf"], "the scale after ':' must be a finite number"),
    (["--lora", "C:\\x.safetensors"], "--lora C:\\x.safetensors: no such file"),  # a drive, not a scale
    (["--cache", "teacache:inf"], "--cache teacache:inf: write teacache"),
    (["--out", "v.avi"], "--out v.avi: the video is an mp4; name it v.mp4"),  # was an mp4 named .avi
    (["--out", "/dev/null/x/v.mp4"], "cannot write there (/dev/null is a file, not a folder)"),
    # ignored silently before: the tiny DiT has no guidance embedder, real CFG is off at --cfg-scale 1
    (["--guidance", "3"], "--guidance 3: this DiT has no guidance embedder"),
    (["--negative-prompt", "blurry"], "--negative-prompt is read by real CFG alone, which is off"),
])
def test_bad_input_is_one_clean_line(ckpt, args, needle, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["sample.py", "--ckpt", ckpt, "--prompt", "a red circle moving left",
                                      *args])
    with pytest.raises(SystemExit) as e:
        sample.main()
    msg = str(e.value.code)
    # a line per problem
    assert needle in msg and all(line.startswith("error: ") for line in msg.splitlines()), msg


def test_bad_prompts_file_is_one_clean_line(ckpt, tmp_path, monkeypatch):
    """--prompts: not UTF-8 (was a UnicodeDecodeError traceback), a folder, empty, blank lines only."""
    (tmp_path / "latin1.txt").write_bytes("a red circle\nune b\xeate\n".encode("latin-1"))
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.txt").write_text("\n  \r\n\n")
    for name, needle in (("latin1.txt", "is not UTF-8 text (line 2 has the byte b'\\xea'): save it as UTF-8"),
                         ("", "is a folder: give a text file"), ("empty.txt", "has no prompt (it is empty"),
                         ("blank.txt", "has no prompt (it is empty or blank)")):
        monkeypatch.setattr(sys, "argv", ["sample.py", "--ckpt", ckpt, "--prompts", str(tmp_path / name)])
        with pytest.raises(SystemExit) as e:
            sample.main()
        assert str(e.value.code).startswith("error: --prompts") and needle in str(e.value.code), e.value.code


def test_prompts_file_from_windows(tmp_path):
    """A UTF-8 BOM and \\r\\n line ends (Notepad) leave no trace: the BOM was read into the first prompt."""
    (tmp_path / "p.txt").write_bytes("\ufeffa red circle\r\n\r\nune bête\r\n".encode("utf-8"))
    assert sample.read_prompts(str(tmp_path / "p.txt")) == ["a red circle", "une bête"]


def test_file_names_from_prompts_never_collide():
    """Prompts that differed only in punctuation got the same name, and a later run with the same seed
    overwrote the earlier one's video; names stay within the file-name limit with 4-byte characters."""
    assert sample.slug("a red circle moving left") == "a_red_circle_moving_left"  # plain words: unchanged
    alike = ["a red circle, moving left", "a red circle moving left!", "a red_circle moving left", "!!!",
             "🐱", "a" * 61, "a" * 62]
    names = [sample.slug(p) for p in alike]
    assert len(set(names)) == len(alike) and "a_red_circle_moving_left" not in names
    assert names[0].startswith("a_red_circle__moving_left_") and names[3].startswith("prompt_")
    assert len(f"{2 ** 64 - 1}_{sample.slug(chr(0x20000) * 80)}.mp4.tmp.mp4".encode()) <= 255


def test_out_folder_names_each_video(ckpt, tmp_path, monkeypatch):
    """--out an existing folder (was an IsADirectoryError after the run, a temp file left in place) or one
    ending in /: the videos go in it named after their prompts, with --prompts too."""
    monkeypatch.setattr(sample, "generate",
                        lambda pipe, prompts, *a, **kw: np.zeros((len(prompts), 1, 32, 48, 3), np.uint8))
    (tmp_path / "p.txt").write_text("a red circle\na blue square\n")
    (tmp_path / "made").mkdir()
    for out, extra in ((tmp_path / "made", ["--prompt", "a red circle"]),
                       (str(tmp_path / "new") + "/", ["--prompts", str(tmp_path / "p.txt")])):
        monkeypatch.setattr(sys, "argv", ["sample.py", "--ckpt", ckpt, "--out", str(out), *extra])
        sample.main()
    assert sorted(os.listdir(tmp_path / "made")) == ["0_a_red_circle.mp4", "0_a_red_circle.png"]
    assert sorted(os.listdir(tmp_path / "new")) == ["0_a_red_circle.mp4", "0_a_red_circle.png",
                                                    "1_a_blue_square.mp4", "1_a_blue_square.png"]


def test_mp4_is_the_official_writers_h264(tmp_path):
    """The mp4 is H.264 in yuv420p (browsers play it; OpenCV's mp4v they do not), byte for byte what the
    official save_videos_grid's imageio.mimsave writes from the same frames, and it decodes close to them."""
    import cv2
    imageio = pytest.importorskip("imageio")
    yy, xx = np.mgrid[0:64, 0:96]
    frames = np.stack([np.stack([(2 * xx + 5 * t) % 256, (3 * yy + t) % 256, 2 * (xx + yy) % 256], -1)
                       for t in range(17)]).astype(np.uint8)
    ours, official = str(tmp_path / "ours.mp4"), str(tmp_path / "official.mp4")
    sample.write_mp4(frames, ours, fps=24)
    imageio.mimsave(official, list(frames), fps=24)
    assert open(ours, "rb").read() == open(official, "rb").read()
    cap = cv2.VideoCapture(ours)
    assert int(cap.get(cv2.CAP_PROP_FOURCC)).to_bytes(4, "little") == b"h264"
    assert cap.get(cv2.CAP_PROP_FPS) == 24
    back = []
    while True:
        ok, f = cap.read()
        if not ok:
            break
        back.append(f[..., ::-1])
    mse = ((np.stack(back).astype(float) - frames) ** 2).mean()
    assert len(back) == 17 and 10 * np.log10(255 ** 2 / mse) > 30
    sample.write_mp4(frames, ours, fps=23.976)  # a rate that is no integer (--fps takes one too)
    assert abs(cv2.VideoCapture(ours).get(cv2.CAP_PROP_FPS) - 23.976) < 1e-3
    with pytest.raises(ValueError, match="an H.264 video needs an even size, not 95x64"):
        sample.write_mp4(frames[:, :, :95], ours)


def test_mp4_without_imageio_ffmpeg_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)
    with pytest.raises(RuntimeError, match="^writing mp4 needs imageio-ffmpeg: pip install imageio-ffmpeg$"):
        sample.write_mp4(np.zeros((1, 16, 16, 3), np.uint8), str(tmp_path / "v.mp4"))
    assert os.listdir(tmp_path) == []


def test_a_failed_write_is_one_line_and_leaves_no_temp_file(ckpt, tmp_path, monkeypatch):
    """The disk fills up after the run: one line naming the file (was a traceback), no .tmp file left."""
    frames = np.zeros((1, 16, 16, 3), np.uint8)

    def full(src, dst):
        raise OSError(28, "No space left on device")
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(OSError):
        sample.write_mp4(frames, str(tmp_path / "v.mp4"))
    with pytest.raises(OSError):
        sample.write_strip(frames, str(tmp_path / "v.png"))
    assert os.listdir(tmp_path) == []
    monkeypatch.setattr(os, "replace", real_replace)
    monkeypatch.setattr(sample, "generate", lambda *a, **kw: frames[None])
    monkeypatch.setattr(sample, "write_mp4", lambda *a: full(*a[:2]))
    out = str(tmp_path / "v.mp4")
    monkeypatch.setattr(sys, "argv", ["sample.py", "--ckpt", ckpt, "--prompt", "x", "--out", out])
    with pytest.raises(SystemExit) as e:
        sample.main()
    assert e.value.code == f"error: cannot write {out} (No space left on device); pick another --out"


def test_latents_are_kept_when_the_decode_fails_and_decode_alone_later(ckpt, tmp_path, monkeypatch, capsys):
    """The denoised latents are written before the VAE decode: a decode that runs out of memory (or Ctrl-C)
    says so in one line with the command that finishes the job (quoted for a shell: paths with spaces), and
    `--decode` makes the very mp4 the run would have written, loading the VAE alone (the one the latents name,
    when no --ckpt/--vae is given). Without a failure nothing is left behind unless asked."""
    import shlex
    out = tmp_path / "my videos"

    def run(*extra):
        monkeypatch.setattr(sys, "argv", ["sample.py", "--ckpt", ckpt, "--prompt", "a red circle moving left",
                                          "--steps", "2", *extra])
        sample.main()
    ok, failed = str(out / "ok.mp4"), str(out / "failed.mp4")
    run("--out", ok)
    assert sorted(os.listdir(out)) == ["ok.mp4", "ok.png"]
    decode = sample.decode

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB\nmore text")
    monkeypatch.setattr(sample, "decode", oom)
    with pytest.raises(SystemExit) as e:
        run("--out", failed)
    kept = str(out / "failed.latents.safetensors")
    command = shlex.join(["python", "sample.py", "--decode", kept, "--ckpt", os.path.abspath(ckpt)])
    assert e.value.code == ("error: the VAE decode stopped (CUDA out of memory. Tried to allocate 9.00 "
                            f"GiB); the sampled latents are kept, decode them with: {command}")
    assert "'" in command  # the space in the folder's name is quoted
    monkeypatch.setattr(sample, "decode", decode)
    loads = []
    monkeypatch.setattr(sample, "load_pipeline", lambda *a, **k: loads.append(a))  # must not be needed
    monkeypatch.setattr(sys, "argv", shlex.split(command)[1:])
    sample.main()
    assert not loads and open(failed, "rb").read() == open(ok, "rb").read()
    assert os.path.isfile(str(out / "failed.png")) and "wrote " + failed in capsys.readouterr().out
    # no --ckpt: the VAE the file names; --out a folder
    monkeypatch.setattr(sys, "argv", ["sample.py", "--decode", kept, "--out", str(tmp_path / "again") + "/"])
    sample.main()
    assert open(str(tmp_path / "again" / "failed.mp4"), "rb").read() == open(ok, "rb").read()
    # --keep-latents keeps them after a good run; they hold what --decode needs
    monkeypatch.undo()
    monkeypatch.setattr(sys, "argv", ["sample.py", "--ckpt", ckpt, "--prompt", "a red circle moving left",
                                      "--steps", "2", "--out", ok, "--keep-latents", "--seed", "3"])
    sample.main()
    sd, meta = dit.read_safetensors(str(out / "ok.latents.safetensors"))
    assert sd["latents"].shape == (4, 2, 4, 6) and meta["seed"] == "3" and meta["drop"] == "0"
    assert meta["prompt"] == "a red circle moving left" and float(meta["fps"]) == 24
    assert json.loads(meta["vae"]) == ["--ckpt", os.path.abspath(ckpt)]


def test_a_latents_file_that_cannot_be_written_does_not_stop_the_run(ckpt, tmp_path, monkeypatch,
                                                                     capsys):
    """safetensors' own error (a full disk, say) is a warning: the video is still decoded and written."""
    import safetensors.torch

    def full(*a, **k):
        raise safetensors.SafetensorError("Error while serializing: I/O error: No space left on device")
    monkeypatch.setattr(safetensors.torch, "save_file", full)
    out = str(tmp_path / "v.mp4")
    monkeypatch.setattr(sys, "argv", ["sample.py", "--ckpt", ckpt, "--prompt", "a red circle", "--steps", "2",
                                      "--out", out])
    sample.main()
    assert sorted(os.listdir(tmp_path)) == ["v.mp4", "v.png"]
    assert "warning: cannot keep the latents in " in capsys.readouterr().err


def test_under_torchrun_rank_0s_one_line_error_stops_the_others_cleanly(ckpt, tmp_path):
    """Sequence parallel on 2 CPU processes, the VAE decode failing on rank 0 (a stand-in patched in by a
    sitecustomize module): rank 0 says its one line and rank 1, told so, leaves without a traceback of its own
    (it used to wait on a barrier for a rank that had gone: 'Connection closed by peer')."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import vae\n"
        "def _oom(self, *a, **k):\n"
        "    raise RuntimeError('CUDA out of memory (stand-in)')\n"
        "vae.CausalVAE.decode = _oom\n")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(site), ROOT]))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_port", "29547", os.path.join(ROOT, "sample.py"), "--ckpt", ckpt,
                        "--prompt", "a red circle", "--steps", "2", "--out", str(tmp_path / "v.mp4")],
                       capture_output=True, text=True, cwd=ROOT, timeout=300, env=env)
    assert r.returncode != 0
    assert "error: the VAE decode stopped (CUDA out of memory (stand-in)); the sampled latents" in r.stderr
    assert "rank      : 0 (local_rank: 0)" in r.stderr and "<NO_OTHER_FAILURES>" in r.stderr, r.stderr[-3000:]
    assert "Connection closed" not in r.stderr and (tmp_path / "v.latents.safetensors").is_file()


def test_decode_refuses_what_it_cannot_decode_in_one_line(ckpt, tmp_path, monkeypatch):
    from dataclasses import asdict

    from safetensors.torch import save_file
    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    other_vae = asdict(vae_lib.replace(vae_lib.CONFIGS["tiny"], latent_channels=3))
    save_file({"latents": torch.zeros(3, 2, 4, 6)}, str(tmp_path / "c3.latents.safetensors"),
              metadata={"fps": "24", "drop": "0", "vae": json.dumps(["--vae", "/x/vae"]),
                        "vae_config": json.dumps(other_vae)})
    (tmp_path / "cut.latents.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    for name, needle in (("none.latents.safetensors", "no such file"),
                         ("other.safetensors", "is not a latents file of sample.py"),
                         ("c3.latents.safetensors", f"was sampled with the VAE of --vae /x/vae, not --ckpt "
                                                    f"{ckpt}'s: pass that one"),
                         ("cut.latents.safetensors", "damaged or truncated"),
                         ("", "is a folder: pass its files")):
        path = str(tmp_path / name)
        monkeypatch.setattr(sys, "argv", ["sample.py", "--decode", path, "--ckpt", ckpt])
        with pytest.raises(SystemExit) as e:
            sample.main()
        assert str(e.value.code).startswith("error: --decode") and needle in e.value.code \
            and "\n" not in e.value.code, e.value.code
    path = str(tmp_path / "c3.latents.safetensors")
    for extra, needle in ((["--prompt", "x", "--steps", "3"], "with the VAE alone: drop --prompt --steps"),
                          (["--lora", "a.safetensors", "--dtype", "fp32"], "drop --lora --dtype"),
                          (["--fps", "0"], "--fps 0: must be 1 to 65535"),
                          (["--out", str(tmp_path / "one.mp4"), "--decode", path, path],
                           "names one file for 2 latents files")):
        monkeypatch.setattr(sys, "argv", ["sample.py", "--decode", path, "--ckpt", ckpt, *extra])
        with pytest.raises(SystemExit) as e:
            sample.main()
        assert needle in str(e.value.code), e.value.code


def test_a_failed_ffmpeg_is_an_error_and_leaves_the_old_video(tmp_path, monkeypatch):
    """imageio-ffmpeg does not read ffmpeg's exit status; we do: a failing ffmpeg (here a stand-in that
    says why and exits 1) is one OSError line, and the video already at that path is untouched."""
    import imageio_ffmpeg
    fake = tmp_path / "ffmpeg"
    fake.write_text("#!/bin/sh\ncat > /dev/null\necho 'first line' >&2\necho 'No space left on device' >&2\n"
                    "exit 1\n")
    fake.chmod(0o755)
    path = tmp_path / "v.mp4"
    path.write_bytes(b"an older good video")
    monkeypatch.setattr(imageio_ffmpeg, "get_ffmpeg_exe", lambda: str(fake))
    with pytest.raises(OSError, match="^ffmpeg failed: No space left on device$"):
        sample.write_mp4(np.zeros((3, 16, 16, 3), np.uint8), str(path))
    assert path.read_bytes() == b"an older good video" and sorted(os.listdir(tmp_path)) == ["ffmpeg", "v.mp4"]
    with pytest.raises(ValueError, match="frame rate must be positive, not -5"):
        sample.write_mp4(np.zeros((3, 16, 16, 3), np.uint8), str(path), fps=-5)


def test_a_missing_mp4_writer_is_said_before_the_work(ckpt, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)
    monkeypatch.setattr(sample, "load_pipeline", lambda *a, **k: pytest.fail("loaded the models"))
    for argv in (["--ckpt", ckpt, "--prompt", "x"], ["--decode", str(tmp_path / "v.latents.safetensors")]):
        monkeypatch.setattr(sys, "argv", ["sample.py", *argv])
        with pytest.raises(SystemExit) as e:
            sample.main()
        assert e.value.code == "error: writing mp4 needs imageio-ffmpeg: pip install imageio-ffmpeg"


def test_decode_drops_the_latent_concat_frames():
    """An I2V latent_concat DiT's video loses its first 4 decoded frames, in generate and --decode alike."""
    vae = vae_lib.CausalVAE(vae_lib.CONFIGS["tiny"]).eval()
    z = torch.randn(1, 4, 3, 4, 4)
    with torch.no_grad():
        full, cut = sample.decode(vae, z), sample.decode(vae, z, drop=4)
    assert full.shape[1] == 9 and np.array_equal(cut, full[:, 4:])


def test_a_video_too_big_for_memory_is_refused_before_the_work(ckpt, monkeypatch):
    """No more swapping for hours: the DiT activations and decoded frames are sized against free memory
    (here 64 MiB) before the text encoders run."""
    monkeypatch.setattr(sample, "memory_available", lambda device: 64 << 20)
    monkeypatch.setattr(sample, "generate", lambda *a, **kw: pytest.fail("generate ran"))
    monkeypatch.setattr(sys, "argv", ["sample.py", "--ckpt", ckpt, "--prompt", "x", "--height", "512",
                                      "--width", "512", "--frames", "129"])
    with pytest.raises(SystemExit) as e:
        sample.main()
    assert str(e.value.code).startswith("error: 1 video of 512x512, 129 frames needs at least 0.") and \
        "GiB of CPU memory for the decoded video, and 0.1 GiB is free: lower --height" in str(e.value.code)
    assert sample.memory_shortfall(sample.load_pipeline(ckpt), 1, 32, 48, 5, True, 1, "cpu", torch.float32) \
        is None  # the tiny default fits


def test_truncated_prompt_is_said_once_on_one_line(ckpt, tmp_path, monkeypatch, capsys):
    """A prompt longer than the text encoders read: one 'warning:' line per encoder (the same prompt twice
    says it once), not Python's two-line UserWarning with its source line."""
    (tmp_path / "p.txt").write_text(("a red circle moving left " * 10 + "\n") * 2)
    monkeypatch.setattr(sys, "argv", ["sample.py", "--ckpt", ckpt, "--prompts", str(tmp_path / "p.txt"),
                                      "--steps", "1", "--frames", "1", "--out", str(tmp_path) + "/"])
    sample.main()
    err = capsys.readouterr().err
    said = [line for line in err.splitlines() if "truncated" in line]
    assert [line.split(":")[0] for line in said] == ["warning", "warning"] and "warnings.warn" not in err
    assert "truncated to 16: 'LLM prompt a red circle" in said[0] and "to 77: 'CLIP prompt" in said[1]


def test_damaged_folder_files_are_one_line(ckpt, tmp_path, monkeypatch):
    """A cut-short config.json (was an error naming no file) or tokenizer.model (was a traceback)."""
    import shutil
    for name, needle in (("config.json", "config.json is damaged (JSONDecodeError"),
                         ("tokenizer.model", "cannot read the tokenizer")):
        folder = tmp_path / name
        shutil.copytree(ckpt, folder)
        (folder / name).write_bytes((folder / name).read_bytes()[:100])
        monkeypatch.setattr(sys, "argv", ["sample.py", "--ckpt", str(folder), "--prompt", "x"])
        with pytest.raises(SystemExit) as e:
            sample.main()
        msg = str(e.value.code)
        assert msg.startswith("error: ") and needle in msg and str(folder) in msg and "\n" not in msg, msg


def test_bad_input_from_the_command_line_has_no_traceback(ckpt):
    r = run_sample("--ckpt", ckpt, "--prompt", "x", "--frames", "8", "--height", "40")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.splitlines() == [
        "error: --frames 8: must be 4k+1 (1 for an image); nearest valid: 9",
        "error: --height 40: must be a positive multiple of 16; use 48 (what the official sampler renders: "
        "it rounds up, inference.py align_to)"]


def test_ckpt_folder_trained_with_the_official_encoders(ckpt, tmp_path, monkeypatch):
    """A train.py run with --llm/--clip names the encoder folders in config.json: --ckpt loads them (fp16, the
    run's text_len), and says in one line when a folder has gone."""
    import json
    import shutil
    folder = str(tmp_path / "run")
    shutil.copytree(ckpt, folder)
    conf = json.load(open(os.path.join(folder, "config.json")))
    llm_dir, clip_dir = str(tmp_path / "llm"), str(tmp_path / "clip")
    os.makedirs(llm_dir)
    os.makedirs(clip_dir)
    conf["text"] = {"llm_dir": llm_dir, "clip_dir": clip_dir, "text_len": 16}
    train.write_json(os.path.join(folder, "config.json"), conf)
    seen = {}
    monkeypatch.setattr(text_encoder.PromptEncoder, "from_pretrained",
                        classmethod(lambda cls, llm, clip, **kw: seen.update(llm=llm, clip=clip, **kw)
                                    or "enc"))
    pipe = sample.load_pipeline(folder, device="cpu")
    assert pipe.encoder == "enc" and pipe.video == dict(conf["video"], fps=24)  # no fps in the folder: 24
    assert seen == dict(llm=llm_dir, clip=clip_dir, dtype=torch.float16, device=torch.device("cpu"),
                        offload=None, text_len=16)
    os.rmdir(clip_dir)
    with pytest.raises(SystemExit, match="names the text encoder folder .*clip, which is not there"):
        sample.load_pipeline(folder, device="cpu")


# ---------------------------------------------------------------------------------------------------------
# Sequence parallel: two gloo processes give the single-process latents (DiT in float64)

def _sp_worker(rank, world, init_file, ckpt, out_file):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    z = _denoise_ckpt(ckpt, dist.group.WORLD)
    if rank == 0:
        torch.save(z, out_file)
    dist.barrier()
    dist.destroy_process_group()


def _denoise_ckpt(ckpt, group):
    # float64: each rank multiplies half the tokens, and fp32 GEMMs round by shape and machine
    # (see test_dit.py)
    pipe = sample.load_pipeline(ckpt, dtype=torch.float64)
    enc, model = pipe.encoder, pipe.dit
    model.sp_group = group
    c = tuple(x.double() if x.is_floating_point() else x for x in enc(["a red circle moving left"], 5))
    u = tuple(x.double() if x.is_floating_point() else x for x in enc([""], 5))
    noise = sample.initial_noise((1, 4, 2, 4, 6), 0, "cpu", torch.float64)
    return sample.denoise(model, noise, c, steps=3, shift=3.0, cfg_scale=2.0, uncond=u, progress=False)


def test_sequence_parallel_sampling_equals_single_process(ckpt, tmp_path):
    import torch.multiprocessing as mp
    mp.spawn(_sp_worker, args=(2, str(tmp_path / "init"), ckpt, str(tmp_path / "z.pt")), nprocs=2, join=True)
    # the DiT runs in float64, but denoise() keeps the latents in fp32 between steps (the official sampler
    # does): the two runs' velocities agree to ~1e-16 and their latents to an fp32 rounding flip at most
    torch.testing.assert_close(torch.load(tmp_path / "z.pt"), _denoise_ckpt(ckpt, None), rtol=1e-6, atol=1e-6)
