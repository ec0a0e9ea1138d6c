"""dit.load_lora / add_lora / lora_state_dict: each LoRA layout against an independent reference (diffusers'
own transformer with the adapters merged layer by layer for the diffusers layout; a float64 merge
W + s * B A on the official weights for the others)."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import dit
from test_dit import TINY, inputs, random_model


def model64(seed=0):
    return random_model(TINY, seed=seed).double()


def forward(model, seed=1):
    x, t, text, mask, pooled, g = (v.double() if v.is_floating_point() else v for v in inputs())
    with torch.no_grad():
        return model(x, t, text, mask, pooled, g)


def rand_ab(out_f, in_f, r, g):
    """float64 adapters, so that the float64 checks see no rounding of the file's values"""
    return (torch.randn(r, in_f, generator=g, dtype=torch.float64) * 0.1,
            torch.randn(out_f, r, generator=g, dtype=torch.float64) * 0.1)


def merged(model, deltas):
    """A float64 copy of `model` with W += delta for each {official module: delta}."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name, d in deltas.items():
            ref.get_submodule(name).weight += d.double()
    return ref


# official modules (out, in) of the tiny model, and what the tests put adapters on
D, MLP = TINY.hidden_size, int(TINY.hidden_size * TINY.mlp_ratio)
SHAPES = {"double_blocks.0.img_attn_qkv": (3 * D, D), "double_blocks.1.txt_mlp.fc2": (D, MLP),
          "single_blocks.0.linear1": (3 * D + MLP, D), "single_blocks.1.linear2": (D, D + MLP),
          "txt_in.individual_token_refiner.blocks.0.self_attn_qkv": (3 * D, D)}


@pytest.mark.parametrize("layout", ["diffusion_model.", "transformer.", "kohya"])
def test_original_and_kohya_layouts_equal_a_float64_merge(tmp_path, layout):
    g = torch.Generator().manual_seed(0)
    sd, deltas = {}, {}
    for i, (name, (o, n)) in enumerate(SHAPES.items()):
        r, alpha = 2 + i, 1.0 + i
        A, B = rand_ab(o, n, r, g)
        if layout == "kohya":  # musubi-tuner: lora_down/lora_up and an alpha: scale alpha / rank
            key = "lora_unet_" + name.replace(".", "_")
            sd.update({f"{key}.lora_down.weight": A, f"{key}.lora_up.weight": B,
                       f"{key}.alpha": torch.tensor(alpha)})
            deltas[name] = alpha / r * B.double() @ A.double()
        else:  # alpha folded in already: scale 1
            sd.update({f"{layout}{name}.lora_A.weight": A, f"{layout}{name}.lora_B.weight": B})
            deltas[name] = B.double() @ A.double()
    save_file(sd, tmp_path / "l.safetensors")
    base = model64()
    want = forward(merged(base, {k: 0.7 * d for k, d in deltas.items()}))
    got = forward(dit.load_lora(copy.deepcopy(base), str(tmp_path / "l.safetensors"), scale=0.7))
    assert (got - want).abs().max().item() < 1e-10
    assert (got - forward(base)).abs().max().item() > 1e-3  # the LoRA does change the output


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_merge_is_the_float64_sum_rounded_once(tmp_path, dtype):
    """Merged weights are W + s B A taken in float64 and rounded once to the weights' dtype, so the result
    does not depend on where the merge runs (fp32 matmuls round differently on a CPU and a GPU, and
    sample.py --offload merges on the CPU)."""
    g = torch.Generator().manual_seed(0)
    name, (o, n) = "single_blocks.0.linear1", SHAPES["single_blocks.0.linear1"]
    A, B = rand_ab(o, n, 4, g)
    save_file({f"diffusion_model.{name}.lora_A.weight": A.float(), f"diffusion_model.{name}.lora_B.weight":
               B.float()}, tmp_path / "l.safetensors")
    model = random_model(TINY).to(dtype)
    w = model.get_submodule(name).weight.detach().clone()
    dit.load_lora(model, str(tmp_path / "l.safetensors"), scale=0.3)
    want = (w.double() + 0.3 * (B.float().double() @ A.float().double())).to(dtype)
    assert torch.equal(model.get_submodule(name).weight, want)


def test_diffusers_layout_equals_diffusers_transformer_with_the_adapters_merged(tmp_path):
    """PEFT is not a dependency here: diffusers' own HunyuanVideoTransformer3DModel, given our weights in its
    layout and each diffusers-named adapter merged into its own (unfused) layer, is the reference. Covers
    q/k/v with separate A matrices (some missing), the single blocks' proj_mlp/proj_out, the token
    refiner and the final layer's swapped modulation halves."""
    diffusers = pytest.importorskip("diffusers")
    ours = random_model(TINY)
    ref = diffusers.HunyuanVideoTransformer3DModel(
        in_channels=16, out_channels=16, num_attention_heads=2, attention_head_dim=32, num_layers=2,
        num_single_layers=2, num_refiner_layers=2, text_embed_dim=32, pooled_projection_dim=24,
        rope_axes_dim=(8, 12, 12))
    ref.load_state_dict(dit.official_to_diffusers(ours.state_dict()), strict=True)
    names = ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k",
             "transformer_blocks.1.attn.add_v_proj", "transformer_blocks.1.ff.net.0.proj",
             "single_transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.attn.to_v",
             "single_transformer_blocks.0.proj_mlp", "single_transformer_blocks.1.proj_out",
             "context_embedder.token_refiner.refiner_blocks.1.attn.to_k", "norm_out.linear"]
    g = torch.Generator().manual_seed(3)
    sd = {}
    with torch.no_grad():
        for i, name in enumerate(names):
            w = ref.get_submodule(name).weight
            r = 2 + i % 3
            A, B = (v.float() for v in rand_ab(*w.shape, r, g))
            sd[f"transformer.{name}.lora_A.weight"], sd[f"transformer.{name}.lora_B.weight"] = A, B
            scale = 1.0
            if i % 2:  # an alpha in the file: alpha / rank
                sd[f"transformer.{name}.alpha"] = torch.tensor(float(i))
                scale = i / r
            w += 0.5 * scale * B @ A
    save_file(sd, tmp_path / "d.safetensors")
    dit.load_lora(ours, str(tmp_path / "d.safetensors"), scale=0.5)
    x, t, text, mask, pooled, gd = inputs(lens=(7, 4))
    with torch.no_grad():
        want = ref(x, t, text, mask, pooled, guidance=gd, return_dict=False)[0]
        got = ours(x, t, text, mask, pooled, gd)
    assert ((got - want).norm() / want.norm()).item() < 1e-4


@pytest.mark.parametrize("rslora", [False, True])
def test_diffusers_files_scale_by_the_peft_config_saved_beside_them(tmp_path, rslora):
    """diffusers saves the adapter's PEFT LoraConfig in the file's metadata (HunyuanVideoPipeline.
    save_lora_weights(..., transformer_lora_adapter_metadata=...)) and PEFT scales each layer by it: alpha
    (alpha_pattern's key matching the module's name, else lora_alpha) over the rank (its square root with
    use_rslora). Written here by diffusers itself; the merge in float64 by that rule, alphas spelled out."""
    diffusers = pytest.importorskip("diffusers")
    linears = {n: m for n, m in model64().named_modules() if isinstance(m, torch.nn.Linear)}
    ranks = {"transformer_blocks.0.attn.to_q": 4, "transformer_blocks.0.attn.to_k": 2,
             "transformer_blocks.1.ff.net.2": 4, "single_transformer_blocks.0.proj_mlp": 4,
             "single_transformer_blocks.1.attn.to_v": 4}
    alphas = {"transformer_blocks.0.attn.to_q": 7, "transformer_blocks.0.attn.to_k": 16,  # patterns below
              "transformer_blocks.1.ff.net.2": 16, "single_transformer_blocks.0.proj_mlp": 3,
              "single_transformer_blocks.1.attn.to_v": 16}
    # where each lands: official layer, first row, rows (TINY: hidden 64, single-block MLP 256)
    rows = {"transformer_blocks.0.attn.to_q": ("double_blocks.0.img_attn_qkv", 0, 64),
            "transformer_blocks.0.attn.to_k": ("double_blocks.0.img_attn_qkv", 64, 64),
            "transformer_blocks.1.ff.net.2": ("double_blocks.1.img_mlp.fc2", 0, 64),
            "single_transformer_blocks.0.proj_mlp": ("single_blocks.0.linear1", 192, 256),
            "single_transformer_blocks.1.attn.to_v": ("single_blocks.1.linear1", 128, 64)}
    g = torch.Generator().manual_seed(4)
    layers, deltas = {}, {}
    for name, r in ranks.items():
        off, start, n = rows[name]
        A, B = rand_ab(n, linears[off].in_features, r, g)
        layers[f"{name}.lora_A.weight"], layers[f"{name}.lora_B.weight"] = A, B  # float64: no rounding
        scale = alphas[name] / (math.sqrt(r) if rslora else r)
        delta = deltas.setdefault(off, torch.zeros(linears[off].weight.shape, dtype=torch.float64))
        delta[start:start + n] += scale * B @ A
    meta = {"r": 4, "lora_alpha": 16, "rank_pattern": {"to_k": 2}, "use_rslora": rslora,
            "alpha_pattern": {"attn.to_q": 7, "proj_mlp": 3}, "target_modules": ["to_q", "to_k", "to_v"]}
    diffusers.HunyuanVideoPipeline.save_lora_weights(str(tmp_path), transformer_lora_layers=layers,
                                                     transformer_lora_adapter_metadata=meta)
    base = model64()
    got = dit.load_lora(copy.deepcopy(base), str(tmp_path / "pytorch_lora_weights.safetensors"))
    for (name, a), b in zip(got.state_dict().items(), merged(base, deltas).state_dict().values()):
        assert (a - b).abs().max().item() < 1e-12, name
    assert (forward(got) - forward(base)).abs().max().item() > 1e-3  # the LoRA does change the output


def test_targets_match_whole_names():
    """--lora-targets is matched against whole module names: a bare layer name adapts nothing and says how
    to write it; '.*img_attn_qkv' takes every block's."""
    with pytest.raises(ValueError, match=r"must match a whole name.*'\.\*img_attn_qkv'"):
        dit.add_lora(random_model(TINY), 4, 4.0, targets="img_attn_qkv")
    names = dit.add_lora(random_model(TINY), 4, 4.0, targets=".*img_attn_qkv")
    assert names == [f"double_blocks.{i}.img_attn_qkv" for i in range(TINY.depth_double)]


def test_scale_zero_is_the_base_and_two_loras_stack(tmp_path):
    g = torch.Generator().manual_seed(1)
    deltas = []
    for f in ("a", "b"):
        sd, d = {}, {}
        for name, (o, n) in SHAPES.items():
            A, B = rand_ab(o, n, 3, g)
            sd[f"diffusion_model.{name}.lora_A.weight"], sd[f"diffusion_model.{name}.lora_B.weight"] = A, B
            d[name] = B.double() @ A.double()
        save_file(sd, tmp_path / f"{f}.safetensors")
        deltas.append(d)
    base = model64()
    zero = dit.load_lora(copy.deepcopy(base), str(tmp_path / "a.safetensors"), scale=0.0)
    assert all(torch.equal(zero.state_dict()[k], v) for k, v in base.state_dict().items())
    both = copy.deepcopy(base)
    dit.load_lora(both, str(tmp_path / "a.safetensors"), scale=1.0)
    dit.load_lora(both, str(tmp_path / "b.safetensors"), scale=-0.5)
    want = forward(merged(base, {k: deltas[0][k] - 0.5 * deltas[1][k] for k in SHAPES}))
    assert (forward(both) - want).abs().max().item() < 1e-10


def test_fp8_weights_take_the_lora_unmerged(tmp_path):
    """On FP8Linear the adapter stays beside the fp8 weight: the output equals the dequantised weights with
    the adapter merged in float64, to fp32 rounding."""
    model = random_model(TINY)
    dit.quantize_fp8(model)
    g = torch.Generator().manual_seed(2)
    sd, deltas = {}, {}
    for name in ("double_blocks.0.img_attn_qkv", "single_blocks.1.linear2"):
        o, n = SHAPES[name]
        A, B = (v.float() for v in rand_ab(o, n, 4, g))
        key = "lora_unet_" + name.replace(".", "_")
        sd.update({f"{key}.lora_down.weight": A, f"{key}.lora_up.weight": B,
                   f"{key}.alpha": torch.tensor(2.0)})
        deltas[name] = 0.5 * B.double() @ A.double()
    save_file(sd, tmp_path / "k.safetensors")
    ref = dit.HunyuanVideoDiT(TINY).double()
    dense = {}
    for name, m in model.named_modules():
        if isinstance(m, dit.FP8Linear):
            dense[name + ".weight"] = m.weight.double() * m.fp8_scale.double() + deltas.get(name, 0)
    ref.load_state_dict({**{k: v.double() for k, v in model.state_dict().items()}, **dense})
    dit.load_lora(model, str(tmp_path / "k.safetensors"))
    assert isinstance(model.double_blocks[0].img_attn_qkv, dit.LoRALinear)
    assert isinstance(model.double_blocks[0].img_attn_qkv.base, dit.FP8Linear)
    # small timesteps: the fp32 timestep sinusoid's own error (test_dit) would hide everything else
    x, t, text, mask, pooled, gd = inputs()
    t, gd = t * 1e-3, gd * 1e-3
    with torch.no_grad():
        got = model(x, t, text, mask, pooled, gd)
        want = ref(*(v.double() if v.is_floating_point() else v for v in (x, t, text, mask, pooled, gd)))
    assert ((got.double() - want).norm() / want.norm()).item() < 2e-6


def test_unknown_keys_and_wrong_shapes_are_refused_with_their_names(tmp_path):
    A, B = torch.zeros(2, D), torch.zeros(3 * D, 2)
    cases = {"unknown": ({"diffusion_model.double_blocks.0.img_attn_qkvv.lora_A.weight": A,
                          "diffusion_model.double_blocks.0.img_attn_qkvv.lora_B.weight": B}, "img_attn_qkvv"),
             "deep": ({"diffusion_model.double_blocks.7.img_attn_qkv.lora_A.weight": A,
                       "diffusion_model.double_blocks.7.img_attn_qkv.lora_B.weight": B}, "double_blocks.7"),
             "shape": ({"lora_unet_double_blocks_0_img_attn_proj.lora_down.weight": A,
                        "lora_unet_double_blocks_0_img_attn_proj.lora_up.weight": B}, "img_attn_proj"),
             "half": ({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": A}, "to_q"),
             "modulation": ({"diffusion_model.double_blocks.0.img_mod.lin.lora_A.weight": A}, "img_mod.lin")}
    base = model64()
    before = forward(base)
    for name, (sd, needle) in cases.items():
        save_file(sd, tmp_path / f"{name}.safetensors")
        with pytest.raises(ValueError, match=needle.replace(".", r"\.")):
            dit.load_lora(base, str(tmp_path / f"{name}.safetensors"))
    assert torch.equal(forward(base), before)  # nothing applied partially


def test_trained_adapters_save_in_the_original_layout_and_load_back(tmp_path):
    model = model64()
    base = copy.deepcopy(model)
    names = dit.add_lora(model, rank=4, alpha=2.0)
    assert len(names) == 8 * TINY.depth_double + 2 * TINY.depth_single  # musubi-tuner's targets
    assert not any("mod" in n for n in names)
    assert [n for n, p in model.named_parameters() if p.requires_grad] and \
        all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    assert (forward(model) - forward(base)).abs().max() < 1e-12  # B = 0: training starts at the base
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, dit.LoRALinear):
                m.lora_B[0].normal_(0, 0.1)
                m.lora_A[0].data = m.lora_A[0].double()
                m.lora_B[0].data = m.lora_B[0].double()
    sd = dit.lora_state_dict(model)
    assert all(k.startswith(("diffusion_model.double_blocks.", "diffusion_model.single_blocks."))
               and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in sd)
    save_file({k: v.double() for k, v in sd.items()}, tmp_path / "lora.safetensors")
    back = dit.load_lora(base, str(tmp_path / "lora.safetensors"))
    assert (forward(back) - forward(model)).abs().max().item() < 1e-5  # sd is fp32
    assert math.isclose(model.double_blocks[0].img_attn_qkv.scales[0], 0.5)


def test_a_damaged_lora_file_is_one_error_naming_it(tmp_path):
    save_file({"diffusion_model.single_blocks.0.linear2.lora_A.weight": torch.zeros(2, D + MLP)},
              tmp_path / "l.safetensors")
    raw = (tmp_path / "l.safetensors").read_bytes()
    (tmp_path / "l.safetensors").write_bytes(raw[:len(raw) // 2])
    with pytest.raises(ValueError, match="l.safetensors.*damaged or truncated"):
        dit.load_lora(model64(), str(tmp_path / "l.safetensors"))


# ---------------------------------------------------------------------------------------------------------
# train.py --lora and sample.py --lora on a small train.py folder

import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

from test_train import ROOT, losses, make_data, run_train  # noqa: E402


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """(curated data, a train.py folder trained 3 steps per stage on it)."""
    root = tmp_path_factory.mktemp("lora")
    data = make_data(str(root / "data"))
    r = run_train(data, str(root / "base"))
    assert r.returncode == 0, r.stderr[-3000:]
    return data, str(root / "base")


def run_lora(folder, out, *extra, fault=None):
    """train.py --lora 4 --from the folder, 6 steps; fault=(kind, step) as test_train.run_train."""
    data, base = folder
    script = [os.path.join(ROOT, "tests", "test_train.py"), fault[0], str(fault[1])] if fault else \
        [os.path.join(ROOT, "train.py")]
    cmd = [sys.executable, *script, "--lora", "4", "--from", base, "--data", data, "--out", out,
           "--steps", "6", "--ckpt-every", "2", "--lr", "1e-2", *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)


def read(path):
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def test_lora_training_resumes_exactly_also_from_the_previous_checkpoint(folder, tmp_path):
    """Stopped at step 5, its latest checkpoint (step 4) then truncated: --resume continues from the one
    before (step 2) and ends where the uninterrupted run does, bit for bit on a CPU."""
    full = run_lora(folder, str(tmp_path / "full"))
    assert full.returncode == 0, full.stderr[-3000:]
    cut = run_lora(folder, str(tmp_path / "cut"), fault=("nan", 5))
    assert cut.returncode != 0 and "the loss is nan at step 5" in cut.stderr
    state = tmp_path / "cut" / "lora_state.safetensors"
    assert read(str(tmp_path / "cut" / "lora_state.prev.safetensors"))[1]["meta"].find('"step": 2') >= 0
    raw = state.read_bytes()
    state.write_bytes(raw[:len(raw) // 3])
    res = run_lora(folder, str(tmp_path / "cut"), "--resume")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "is damaged; resuming from the checkpoint before it" in res.stdout + res.stderr
    assert (tmp_path / "cut" / "lora_state.safetensors.damaged").is_file()
    assert read(str(tmp_path / "cut" / "lora_state.prev.safetensors"))[1]["meta"].find('"step": 4') >= 0
    assert losses(str(tmp_path / "full")) == losses(str(tmp_path / "cut"))
    a, meta = read(str(tmp_path / "full" / "lora.safetensors"))
    b, _ = read(str(tmp_path / "cut" / "lora.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the original layout, musubi-tuner's targets, rank/alpha/targets in the metadata
    assert all(k.startswith(("diffusion_model.double_blocks.", "diffusion_model.single_blocks."))
               for k in a)
    assert not any("_mod." in k or "modulation" in k for k in a)
    assert meta["rank"] == "4" and float(meta["alpha"]) == 4.0 and meta["targets"] == dit.LORA_TARGETS
    assert any(v.abs().max() > 0 for k, v in a.items() if "lora_B" in k)  # it did learn
    # checkpoints hold adapters and optimizer state, not the frozen DiT
    state_keys = read(str(tmp_path / "full" / "lora_state.safetensors"))[0]
    assert not [k for k in state_keys if k.startswith("dit.model.") and "lora_" not in k]


def test_lora_seed_is_the_folders_unless_given(folder, tmp_path, monkeypatch):
    """--lora --from trains with the folder's run's seed; --seed, given, replaces it (it was ignored)."""
    import train
    seen = []

    def stop(cfg, *a, **k):
        seen.append(cfg.seed)
        raise SystemExit(0)

    monkeypatch.setattr(train, "train_lora", stop)
    with open(os.path.join(folder[1], "config.json")) as f:
        own = json.load(f)["train"]["seed"]
    for extra in ([], ["--seed", str(own + 5)]):
        monkeypatch.setattr(sys, "argv", ["train.py", "--lora", "4", "--from", folder[1], "--data", folder[0],
                                          "--out", str(tmp_path / "l"), *extra])
        with pytest.raises(SystemExit):
            train.main()
    assert seen == [own, own + 5]


def test_sample_loads_a_trained_lora_and_damaged_files_are_one_line(folder, tmp_path):
    import sample
    r = run_lora(folder, str(tmp_path / "l"), "--steps", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    lora = str(tmp_path / "l" / "lora.safetensors")
    base = sample.load_pipeline(folder[1], dtype=torch.float64).dit
    got = sample.load_pipeline(folder[1], dtype=torch.float64, loras=[(lora, 0.5), (lora, 0.25)]).dit
    sd, _ = read(lora)
    for name in ("double_blocks.0.img_attn_qkv", "single_blocks.1.linear1"):
        A, B = (sd[f"diffusion_model.{name}.lora_{x}.weight"].double() for x in "AB")
        want = base.get_submodule(name).weight + 0.75 * B @ A
        assert torch.allclose(got.get_submodule(name).weight, want, atol=1e-12)

    def cli(*args):
        return subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), "--prompt", "a red circle",
                               "--steps", "1", "--out", str(tmp_path / "s.mp4"), *args],
                              capture_output=True, text=True, timeout=300, cwd=ROOT)
    ok = cli("--ckpt", folder[1], "--lora", lora + ":0.5")
    assert ok.returncode == 0, ok.stderr[-3000:]
    bad = cli("--ckpt", folder[1], "--lora", lora + ":x")
    assert bad.returncode != 0 and "must be a finite number" in bad.stderr
    # a truncated file anywhere sample.py reads one: one line naming it, no traceback
    import shutil
    for name in ("dit.safetensors", "vae.safetensors", "text_encoder.safetensors", "lora"):
        broken = tmp_path / f"broken_{name}"
        shutil.copytree(folder[1], broken, ignore=shutil.ignore_patterns("cache", "samples"))
        target = tmp_path / "cut_lora.safetensors" if name == "lora" else broken / name
        raw = open(lora if name == "lora" else folder[1] + "/" + name, "rb").read()
        target.write_bytes(raw[:len(raw) // 2])
        extra = ["--lora", str(target)] if name == "lora" else []
        r = cli("--ckpt", str(broken), *extra)
        lines = r.stderr.strip().splitlines()
        assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert str(target) in lines[-1] and "damaged or truncated" in lines[-1], lines[-1]


def test_train_damaged_init_dit_and_vae_are_one_line(folder, tmp_path):
    data, base = folder
    for flag, src in (("--init-dit", "dit.safetensors"), ("--vae", "vae.safetensors")):
        raw = open(os.path.join(base, src), "rb").read()
        cut = tmp_path / src
        cut.write_bytes(raw[:len(raw) // 2])
        init = str(cut) if flag == "--init-dit" else os.path.join(base, "dit.safetensors")
        vae = str(cut) if flag == "--vae" else os.path.join(base, "vae.safetensors")
        r = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--lora", "4", "--init-dit", init,
                            "--vae", vae, "--data", data, "--out", str(tmp_path / "o"), "--steps", "1"],
                           capture_output=True, text=True, timeout=600, cwd=ROOT)
        assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
        last = r.stderr.strip().splitlines()[-1]
        assert last.startswith(f"error: {flag}") and str(cut) in last and "damaged" in last, last


@pytest.mark.parametrize("only", [None, "modulation"])
def test_offloaded_blocks_with_checkpointing_give_the_same_adapter_gradients(only):
    """train.py --lora --offload [modulation]: the frozen block weights (or their modulation linears) stream
    through sample.offload_blocks' hooks (on a CPU they only swap tensors), the adapters stay put; gradient
    checkpointing re-fetches in the backward."""
    import sample
    grads = []
    for offload in (False, True):
        model = random_model(TINY)
        dit.add_lora(model, rank=2, alpha=2.0)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, dit.LoRALinear):
                    m.lora_B[0].normal_(0, 0.1)
        if offload:
            sample.offload_blocks(model, torch.device("cpu"), only=sample.MODULATION if only else None)
        model.gradient_checkpointing = offload
        x, t, text, mask, pooled, g = inputs()
        model(x, t, text, mask, pooled, g).square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], rtol=1e-5, atol=1e-7), n


def test_offloaded_training_keeps_at_most_one_block_on_the_device(monkeypatch):
    """The backward's recomputation stops early (torch.utils.checkpoint), so a block's forward hook may never
    drop its weights; offload_blocks must still hold one block at a time. On a CPU a fetch is no copy, so
    the test makes the streaming copies visible: .to(..., non_blocking=True) returns a clone."""
    import sample
    model = random_model(TINY)
    dit.add_lora(model, rank=2, alpha=2.0)
    sample.offload_blocks(model, torch.device("cpu"))
    blocks = list(model.double_blocks) + list(model.single_blocks)
    host = [{n: p.data_ptr() for n, p in b.named_parameters() if not p.requires_grad} for b in blocks]
    plain_to = torch.Tensor.to
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k:
                        self.clone() if k.get("non_blocking") else plain_to(self, *a, **k))

    def on_device():  # blocks with any streamed weight not its host copy
        return [i for i, b in enumerate(blocks)
                if any(p.data_ptr() != host[i][n] for n, p in b.named_parameters() if n in host[i])]

    model.gradient_checkpointing = True
    out = model(*inputs())
    assert on_device() == []  # the forward hooks dropped every block
    out.square().mean().backward()
    assert len(on_device()) <= 1, on_device()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_offload_modulation_streams_the_modulation_linears_alone(monkeypatch):
    """train.py --offload modulation: every block's modulation weights (but block 0's img_mod, which step
    caching runs alone) live in CPU memory and are fetched for their block's forward and again for its
    recomputation in the backward; every other weight and the adapters stay where they were. Fetches made
    visible as in the test above."""
    import sample
    model = random_model(TINY)
    dit.add_lora(model, rank=2, alpha=2.0)
    blocks = list(model.double_blocks) + list(model.single_blocks)
    before = [(i, n) for i, b in enumerate(blocks) for n, _ in b.named_parameters()]
    sample.offload_blocks(model, torch.device("cpu"), only=sample.MODULATION)
    streamed = {(i, n) for i, b in enumerate(blocks) for n, p in b.named_parameters()
                if n.startswith(sample.MODULATION) and not (i == 0 and n.startswith("img_mod."))}
    assert streamed and all(n.endswith(("linear.weight", "linear.bias")) for _, n in streamed)
    host = {(i, n): blocks[i].get_parameter(n).data_ptr() for i, n in before}
    fetched = []
    plain_to = torch.Tensor.to

    def to(self, *a, **k):
        if k.get("non_blocking"):
            fetched.append(next(key for key, ptr in host.items() if ptr == self.data_ptr()))
            return self.clone()
        return plain_to(self, *a, **k)
    monkeypatch.setattr(torch.Tensor, "to", to)
    model.gradient_checkpointing = True
    out = model(*inputs())
    assert sorted(fetched) == sorted(streamed)  # each once in the forward, nothing else
    out.square().mean().backward()
    assert sorted(fetched) == sorted(list(streamed) * 2)  # again for the backward's recomputation
    away = {i for i, n in before if blocks[i].get_parameter(n).data_ptr() != host[i, n]}
    assert len(away) <= 1 and all(blocks[i].get_parameter(n).data_ptr() == host[i, n]
                                  for i, n in before if (i, n) not in streamed)  # the rest never moved
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_lora_training_with_modulation_offload_equals_without(folder, tmp_path):
    """train.py --lora --offload modulation trains exactly what --offload activations does (both
    checkpointed; on a CPU neither moves anything, so the streaming hooks must change nothing)."""
    runs = {}
    for mode in ("activations", "modulation"):
        r = run_lora(folder, str(tmp_path / mode), "--offload", mode)
        assert r.returncode == 0, r.stderr[-3000:]
        runs[mode] = read(str(tmp_path / mode / "lora.safetensors"))[0]
    a, b = runs["activations"], runs["modulation"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert losses(str(tmp_path / "activations")) == losses(str(tmp_path / "modulation"))


def test_adapters_under_autocast_keep_no_extra_copy_of_the_input():
    """Under bf16 autocast (train.py on a GPU) the adapter path gives what it gives with x cast to the
    adapters' fp32 first, without the backward keeping a copy of x beside x."""
    torch.manual_seed(0)
    layer = dit.LoRALinear(torch.nn.Linear(16, 12).to(torch.bfloat16).requires_grad_(False))
    layer.add(torch.randn(4, 16), torch.randn(12, 4), 0.5, trainable=True)
    x = torch.randn(5, 16, dtype=torch.bfloat16, requires_grad=True)
    saved = []
    with torch.autocast("cpu", torch.bfloat16):
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            y = layer(x)
        A, B = layer.lora_A[0], layer.lora_B[0]
        ref = layer.base(x) + (0.5 * F.linear(F.linear(x.float(), A), B)).to(torch.bfloat16)
    assert torch.equal(y, ref)
    copies = [t for t in saved if t.shape == x.shape]
    assert copies and all(t.data_ptr() == x.data_ptr() for t in copies)  # x itself, saved once


def test_lora_under_fsdp_two_ranks_matches_one_process(folder, tmp_path):
    """torchrun, 2 gloo ranks with FSDP2 (frozen base and adapters sharded together) against one process
    with their global batch."""
    data, base = folder
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    common = ["--lora", "4", "--from", base, "--data", data, "--steps", "3", "--lr", "1e-2"]
    one = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *common, "--batch", "4",
                          "--out", str(tmp_path / "one")], capture_output=True, text=True, timeout=600,
                         env=env, cwd=ROOT)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", "29541", os.path.join(ROOT, "train.py"), *common, "--batch", "2",
                          "--out", str(tmp_path / "two")], capture_output=True, text=True, timeout=600,
                         env=env, cwd=ROOT)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = losses(str(tmp_path / "one")), losses(str(tmp_path / "two"))
    assert len(a) == len(b) == 3
    for (sa, la), (sb, lb) in zip(a, b):
        assert sa == sb and la == pytest.approx(lb, rel=1e-4), (a, b)
    x, _ = read(str(tmp_path / "one" / "lora.safetensors"))
    y, _ = read(str(tmp_path / "two" / "lora.safetensors"))
    assert x.keys() == y.keys() and all(torch.allclose(x[k], y[k], rtol=1e-3, atol=1e-6) for k in x)


def test_quick_lora_demo_writes_its_picture_and_measurements(folder, tmp_path):
    """train.py --lora-demo --quick: diagonal-motion clips -> a few LoRA steps -> the same prompt sampled
    without and with the LoRA -> a PNG and each sample's measured motion."""
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--lora-demo", "--quick", "--from",
                        folder[1], "--out", str(tmp_path / "d")], capture_output=True, text=True, timeout=600,
                       cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    import cv2
    img = cv2.imread(str(tmp_path / "d" / "lora_demo.png"))
    rows = json.loads((tmp_path / "d" / "lora_demo.json").read_text())
    assert [row["lora"] for row in rows] == ["without", "with"]
    assert all({"right_px", "up_px"} <= row.keys() and row["prompt"].endswith("diagonally") for row in rows)
    video = json.loads(open(os.path.join(folder[1], "config.json")).read())["video"]  # the model's frame
    assert img is not None and img.shape == (2 * 2 * video["height"], 300 + 5 * 2 * video["width"], 3)
    # a diagonal training clip: the shape moves up and right by the demo's travel on each axis, centred, and
    # stays inside the frame (the reader's foreground never reaches the border)
    import numpy as np

    import bench
    import train
    frames = bench.read_mp4(str(tmp_path / "d" / "data" / "clips" / "c0.mp4"))
    dx, dy = bench.read_demo_video(frames)["move"]
    side = min(video["height"], video["width"])
    assert dx == pytest.approx(train.DEMO_SHAPE_TRAVEL * side * 71 / 72, abs=1.5)
    assert dy == pytest.approx(-dx, abs=1.5)
    f = frames.astype(np.float64)
    far = np.abs(f - np.median(f.reshape(len(f), -1, 3), 1)[:, None, None]).sum(-1) > 120
    assert far.any(axis=(1, 2)).all() and not (far[:, 0].any() or far[:, -1].any() or far[:, :, 0].any()
                                                or far[:, :, -1].any())
