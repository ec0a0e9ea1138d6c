"""dit.load_lora / add_lora / lora_state_dict: each LoRA layout against an independent reference (diffusers'
own transformer with the adapters merged layer by layer for the diffusers layout; a float64 merge
W + s * B A on the official weights for the others)."""

import copy
import math

import pytest
import torch
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
