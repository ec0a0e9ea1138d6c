"""Sliding-tile attention (attention_cuda's sparse path, dit.SlidingTile, sample.py --sparse sta) against a
float64 reference whose mask is built token by token from tile coordinates in raster order (FastVideo's
reference rule, csrc/sliding_tile_attention/test/flex_sta_ref.py), sharing no code with the tile layout;
the DiT's tile reordering; the dense first steps; the window table file; and, on a GPU, the Hopper
kernel's sparse forward against the fallback."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

import attention_cuda
import dit
import sample
from attention_cuda import STA_TILE, attention, sta_layout

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA = torch.cuda.is_available()


def reference_mask(grid, windows, n_txt, text_len):
    """(H, L, L) bool over [raster image tokens ; text], L = T*H*W + n_txt, from each token's tile
    coordinates. A window of w tiles is centred on the query's tile, the centre clamped to w // 2 from the
    tile grid's edges, and covers the key tiles within w // 2 of it."""
    n_img = math.prod(grid)
    pos = torch.stack(torch.meshgrid(*[torch.arange(g) for g in grid], indexing="ij"), -1).reshape(-1, 3)
    coords = pos // torch.tensor(STA_TILE)                                   # (n_img, 3) tile coordinates
    tiles = torch.tensor([math.ceil(g / s) for g, s in zip(grid, STA_TILE)])
    L = n_img + n_txt
    mask = torch.zeros(len(windows), L, L, dtype=torch.bool)
    for head, win in enumerate(windows):
        half = torch.tensor(win) // 2
        centre = torch.minimum(torch.maximum(coords, half), tiles - 1 - half)  # (n_img, 3)
        near = (centre[:, None, :] - coords[None, :, :]).abs() <= half         # (n_img, n_img, 3)
        mask[head, :n_img, :n_img] = near.all(-1)
        mask[head, :n_img, n_img:n_img + text_len] = True       # image queries: every valid text key
        mask[head, n_img:, :n_img + text_len] = True            # text queries: every valid key
    return mask


def reference(q, k, v, mask):
    """float64 softmax attention, (L, H, D) raster-ordered inputs, (H, L, L) mask."""
    s = torch.einsum("qhd,khd->hqk", q.double(), k.double()) / math.sqrt(q.shape[-1])
    p = torch.softmax(s.masked_fill(~mask, float("-inf")), -1)
    return torch.einsum("hqk,khd->qhd", p, v.double())


def to_tiles(x_img, x_txt, grid):
    """Raster image rows + text rows -> the tile-ordered sequence, padding slots zero."""
    slot, n_slots = sta_layout(grid)
    out = torch.zeros((x_img.shape[0], n_slots, *x_img.shape[2:]), dtype=x_img.dtype)
    out[:, slot] = x_img
    return torch.cat([out, x_txt], 1)


# -----------------------------------------------------------------------------
# The layout and the fallback, on the CPU

@pytest.mark.parametrize("grid", [(7, 9, 10), (6, 8, 8), (13, 5, 17), (1, 1, 1)])
def test_layout_is_tile_order_and_round_trips(grid):
    slot, n_slots = sta_layout(grid)
    tiles = [math.ceil(g / s) for g, s in zip(grid, STA_TILE)]
    assert n_slots == math.prod(tiles) * 384
    assert len(set(slot.tolist())) == math.prod(grid)                # one slot per token
    t, h, w = (x.flatten() for x in torch.meshgrid(*[torch.arange(g) for g in grid], indexing="ij"))
    tile = ((t // 6) * tiles[1] + h // 8) * tiles[2] + w // 8
    assert torch.equal(slot // 384, tile)                            # every token inside its own tile
    for c in tile.unique():                                          # a tile's tokens first, in raster order
        inside = slot[tile == c] % 384
        assert torch.equal(inside, torch.arange(len(inside)))
    x = torch.randn(2, math.prod(grid), 3)
    assert torch.equal(to_tiles(x, x[:, :0], grid)[:, slot], x)      # raster -> tiles -> raster


@pytest.mark.parametrize("grid, windows, text_len", [
    ((7, 9, 10), ((1, 1, 1), (3, 1, 5), (2, 2, 2)), (5, 2)),        # edge tiles cut by the grid; even window
    ((13, 17, 9), ((3, 3, 1), (1, 9, 9), (5, 1, 3)), (4, 4)),       # 3 x 3 x 2 tiles; window wider than grid
])
def test_fallback_equals_dense_masked_attention(grid, windows, text_len):
    g = torch.Generator().manual_seed(0)
    n_img, n_txt, H, D = math.prod(grid), 5, len(windows), 8
    q, k, v = (torch.randn(2, n_img + n_txt, H, D, generator=g, dtype=torch.float64) for _ in range(3))
    _, n_slots = sta_layout(grid)
    qt, kt, vt = (to_tiles(x[:, :n_img], x[:, n_img:], grid) for x in (q, k, v))
    # padding slots and padded text hold NaN: neither may reach a valid row
    kt[:, n_slots - 1], vt[:, n_slots - 1] = float("nan"), float("nan")
    for b, n in enumerate(text_len):
        kt[b, n_slots + n:], vt[b, n_slots + n:] = float("nan"), float("nan")
    out = attention(qt, kt, vt, [n_slots + n for n in text_len], sparse=(grid, windows))
    slot, _ = sta_layout(grid)
    for b, n in enumerate(text_len):
        ref = reference(q[b], k[b], v[b], reference_mask(grid, windows, n_txt, n))
        got = torch.cat([out[b, slot], out[b, n_slots:]])
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


def test_fallback_is_sparse_and_has_gradients():
    """A small window changes the result (the mask is not all-true), and gradients flow through it."""
    grid = (12, 16, 16)
    _, n_slots = sta_layout(grid)
    q, k, v = (torch.randn(1, n_slots + 3, 2, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    sparse = attention(q, k, v, sparse=(grid, ((1, 1, 1), (1, 1, 1))))
    assert not torch.allclose(sparse, attention(q, k, v))
    sparse.sum().backward()
    assert q.grad.isfinite().all() and k.grad.abs().sum() > 0


def test_bad_sparse_arguments():
    q = torch.randn(1, 384 + 2, 2, 8)
    with pytest.raises(ValueError, match="one \\(t, h, w\\) per head"):
        attention(q, q, q, sparse=((6, 8, 8), ((1, 1, 1),)))
    with pytest.raises(ValueError, match="positive ints"):
        attention(q, q, q, sparse=((6, 8, 8), ((1, 0, 1), (1, 1, 1))))
    with pytest.raises(ValueError, match="image slots"):
        attention(q, q, q, kv_lens=[100], sparse=((6, 8, 8), ((1, 1, 1),) * 2))
    with pytest.raises(ValueError, match="tile-ordered"):
        attention(q[:, :100], q, q, sparse=((6, 8, 8), ((1, 1, 1),) * 2))


# -----------------------------------------------------------------------------
# The DiT and the sampler

CFG = dit.DiTConfig(hidden_size=32, num_heads=2, depth_double=1, depth_single=1, text_dim=16, pooled_dim=8,
                    rope_axes=(4, 6, 6), guidance_embed=False)


def tiny_model():
    torch.manual_seed(0)
    model = dit.HunyuanVideoDiT(CFG).double()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model


def tiny_inputs(T=7, H=18, W=18):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, CFG.in_channels, T, H, W, generator=g, dtype=torch.float64)
    t = torch.tensor([500.0, 700.0], dtype=torch.float64)
    text = torch.randn(2, 5, CFG.text_dim, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    pooled = torch.randn(2, CFG.pooled_dim, generator=g, dtype=torch.float64)
    return x, t, text, mask, pooled


def test_dit_windows_covering_the_grid_equal_dense():
    """Windows that cover the whole tile grid make STA dense: the tile reordering of the image tokens, the
    RoPE rows and the text lengths around the blocks must then change nothing (float64, rounding only)."""
    model, args = tiny_model(), tiny_inputs()  # grid 7 x 9 x 9 after the 1 x 2 x 2 patch: 2 x 2 x 2 tiles
    with torch.no_grad():
        dense = model(*args)
        full = model(*args, sparse=dit.SlidingTile.uniform(CFG, (3, 3, 3)))
        narrow = model(*args, sparse=dit.SlidingTile.uniform(CFG, (1, 1, 1)))
    torch.testing.assert_close(full, dense, rtol=1e-10, atol=1e-10)
    assert (narrow - dense).abs().max() > 1e-4  # the windows are used


def test_dit_sparse_matches_a_raster_order_masked_model(monkeypatch):
    """The DiT with narrow windows, different per layer, equals the same DiT run densely in raster order
    with each block's attention masked by reference_mask for that layer's windows: the reordering is
    exact, only the mask differs."""
    model, args = tiny_model(), tiny_inputs()
    grid = (7, 9, 9)
    table = (((1, 1, 1), (3, 1, 3)), ((1, 3, 1), (1, 1, 1)))  # layer 0: the double block, 1: the single
    with torch.no_grad():
        sparse = model(*args, sparse=dit.SlidingTile(table, full_steps=0))
    n_img = math.prod(grid)
    masks = [[reference_mask(grid, windows, 5, n) for n in (5, 2)] for windows in table]
    calls = []

    def masked(q, k, v, seg_lens=None, sp=None, sparse=None):
        if q.shape[1] != n_img + 5:  # the token refiner
            return dense_attention(q, k, v, seg_lens, sp)
        layer = masks[len(calls)]
        calls.append(1)
        out = torch.stack([reference(q[b], k[b], v[b], layer[b]) for b in range(2)])
        return out.to(q.dtype).flatten(2)

    dense_attention = dit.attention
    monkeypatch.setattr(dit, "attention", masked)
    with torch.no_grad():
        ref = model(*args)
    assert len(calls) == 2
    torch.testing.assert_close(sparse, ref, rtol=1e-9, atol=1e-9)


def test_sta_off_is_bit_identical_and_full_steps_are_honoured(monkeypatch):
    """denoise with sparse=None and with full_steps >= steps run the same dense model, bit for bit; and the
    model sees sparse exactly from step full_steps on."""
    model, (x, _, text, mask, pooled) = tiny_model().float(), tiny_inputs(T=2, H=4, W=4)
    x, text, pooled = x.float(), text.float(), pooled.float()
    sta = dit.SlidingTile.uniform(CFG, (1, 1, 1), full_steps=4)
    a = sample.denoise(model, x, (text, mask, pooled), steps=4, progress=False)
    b = sample.denoise(model, x, (text, mask, pooled), steps=4, progress=False, sparse=sta)
    assert torch.equal(a, b)
    seen = []
    forward = model.forward

    def spy(*args, sparse=None, **kw):
        seen.append(sparse)
        return forward(*args, sparse=sparse, **kw)

    monkeypatch.setattr(model, "forward", spy)
    sta.full_steps = 2
    sample.denoise(model, x, (text, mask, pooled), steps=5, progress=False, sparse=sta)
    assert seen == [None, None, sta, sta, sta]


def test_sparse_with_step_caching():
    """--sparse sta with --cache teacache: threshold 0 computes every step, so the result is bit for bit
    the sparse run's; a cached run skips steps and still finishes (the residual is kept in raster order)."""
    model, (x, _, text, mask, pooled) = tiny_model().float(), tiny_inputs(T=3, H=18, W=18)
    x, text, pooled = x.float(), text.float(), pooled.float()
    sta = dit.SlidingTile.uniform(CFG, (1, 1, 1), full_steps=1)
    cond = (text, mask, pooled)
    alone = sample.denoise(model, x, cond, steps=4, progress=False, sparse=sta)
    zero = sample.TeaCache(0.0)
    assert torch.equal(sample.denoise(model, x, cond, steps=4, progress=False, sparse=sta, cache=zero), alone)
    cache = sample.TeaCache(10.0)
    out = sample.denoise(model, x, cond, steps=4, progress=False, sparse=sta, cache=cache)
    assert cache.skipped > 0 and out.isfinite().all()


def test_window_table_file(tmp_path):
    good = [[[1, 2, 3], [3, 3, 3]], [[5, 1, 1], [1, 1, 1]]]
    path = tmp_path / "w.json"
    path.write_text(json.dumps(good))
    sta = dit.SlidingTile.from_file(str(path), CFG, full_steps=7)
    assert sta.windows == (((1, 2, 3), (3, 3, 3)), ((5, 1, 1), (1, 1, 1))) and sta.full_steps == 7
    bad = {"not json": "{[", "2 layers": json.dumps(good[:1]), "2 windows": json.dumps([good[0][:1]] * 2),
           "positive ints": json.dumps([[[1, 0, 1], [1, 1, 1]]] * 2),
           "[t, h, w]": json.dumps([[[1, 1], [1, 1, 1]]] * 2)}
    for needle, text in bad.items():
        path.write_text(text)
        with pytest.raises(ValueError) as e:
            dit.SlidingTile.from_file(str(path), CFG)
        msg = str(e.value)
        assert "\n" not in msg and str(path) in msg, msg
        assert needle in msg or needle == "not json" and "JSON" in msg or needle == "[t, h, w]", msg


def fastvideo_table(steps, windows):
    """A strategy file in FastVideo's format: {"STEP_LAYER_HEAD": [t, h, w]}, windows(step, layer, head)."""
    layers = CFG.depth_double + CFG.depth_single
    return {f"{t}_{i}_{h}": list(windows(t, i, h))
            for t in range(steps) for i in range(layers) for h in range(CFG.num_heads)}


def test_fastvideo_strategy_file_gives_each_step_its_windows(tmp_path, monkeypatch):
    """FastVideo's per-step strategy files: each sparse step's DiT call gets that step's windows (layers
    double blocks first); a file whose steps all hold the same table samples bit for bit as that table given
    once; a sampler of another step count, a missing key, a foreign key are each one line."""
    def varied(t, i, h):
        return 1 + (t + i) % 2, 1 + h, 1 + t % 3

    path = tmp_path / "fv.json"
    path.write_text(json.dumps(fastvideo_table(4, varied)))
    sta = dit.SlidingTile.from_file(str(path), CFG, full_steps=1)
    model, (x, _, text, mask, pooled) = tiny_model().float(), tiny_inputs(T=3, H=18, W=18)
    cond = (text.float(), mask, pooled.float())
    seen, forward = [], model.forward

    def spy(*args, sparse=None, **kw):
        seen.append(None if sparse is None else sparse.windows)
        return forward(*args, sparse=sparse, **kw)

    monkeypatch.setattr(model, "forward", spy)
    sample.denoise(model, x.float(), cond, steps=4, progress=False, sparse=sta)
    want = [tuple(tuple(varied(t, i, h) for h in range(2)) for i in range(2)) for t in (1, 2, 3)]
    assert seen == [None] + want
    monkeypatch.undo()

    path.write_text(json.dumps(fastvideo_table(3, lambda t, i, h: varied(0, i, h))))
    per_step = sample.denoise(model, x.float(), cond, steps=3, progress=False,
                              sparse=dit.SlidingTile.from_file(str(path), CFG, full_steps=1))
    once = dit.SlidingTile(tuple(tuple(varied(0, i, h) for h in range(2)) for i in range(2)), full_steps=1)
    assert torch.equal(per_step, sample.denoise(model, x.float(), cond, steps=3, progress=False, sparse=once))
    with pytest.raises(ValueError, match="windows for 4 steps: sample with --steps 4"):
        sample.denoise(model, x.float(), cond, steps=3, progress=False, sparse=sta)

    good = fastvideo_table(2, varied)
    bad = {"1_1_1 is missing": {k: v for k, v in good.items() if k != "1_1_1"},
           "0_0_1 is missing or not [t, h, w]": dict(good, **{"0_0_1": [1, 0, 1]}),
           "STEP_LAYER_HEAD": dict(good, **{"0_0": [1, 1, 1]}),
           "another model": dict(good, **{"0_0_2": [1, 1, 1]})}
    for needle, table in bad.items():
        path.write_text(json.dumps(table))
        with pytest.raises(ValueError) as e:
            dit.SlidingTile.from_file(str(path), CFG)
        assert needle in str(e.value) and str(path) in str(e.value) and "\n" not in str(e.value), e.value


def test_cli_rejects_bad_sparse_options(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), "--ckpt", str(tmp_path),
                        "--sparse", "sta", "--sta-window", "3,3", "--sta-full-steps", "-1",
                        "--sta-strategy", str(tmp_path / "none.json")],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    msg = r.stderr.strip()
    assert r.returncode != 0 and all(line.startswith("error: ") for line in msg.splitlines()), msg
    assert "--sta-window 3,3" in msg and "--sta-full-steps -1" in msg and "none.json: no such file" in msg


def test_sample_cli_end_to_end(tmp_path):
    """sample.py --sparse sta on a tiny checkpoint folder: the video is written; a window table of the
    wrong shape is one line naming the file."""
    from test_sample import make_ckpt
    ckpt = make_ckpt(str(tmp_path / "ckpt"))
    out = str(tmp_path / "v.mp4")
    run = [sys.executable, os.path.join(ROOT, "sample.py"), "--ckpt", ckpt, "--prompt", "a red circle",
           "--out", out, "--steps", "2", "--sparse", "sta", "--sta-full-steps", "1"]
    r = subprocess.run(run + ["--sta-window", "1,1,1"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0 and os.path.isfile(out), r.stderr
    table = tmp_path / "w.json"
    table.write_text("[[[1, 1, 1]]]")
    r = subprocess.run(run + ["--sta-strategy", str(table)], capture_output=True, text=True, cwd=ROOT,
                       timeout=300)
    msg = r.stderr.strip()
    assert r.returncode != 0 and msg.startswith(f"error: STA window table {table}") and "\n" not in msg, msg
    c = json.load(open(os.path.join(ckpt, "config.json")))["dit"]  # a FastVideo-style file for 3 steps
    table.write_text(json.dumps({f"{t}_{i}_{h}": [1, 1, 1] for t in range(3)
                                 for i in range(c["depth_double"] + c["depth_single"])
                                 for h in range(c["num_heads"])}))
    r = subprocess.run(run + ["--sta-strategy", str(table)], capture_output=True, text=True, cwd=ROOT,
                       timeout=300)
    assert r.returncode != 0 and r.stderr.strip() == f"error: --sta-strategy {table} has windows for 3 " \
        f"steps, not 2: sample with --steps 3", r.stderr


# -----------------------------------------------------------------------------
# The Hopper kernel's sparse forward, on a GPU

hopper = pytest.mark.skipif(not CUDA or torch.cuda.get_device_capability() != (9, 0),
                            reason="the sliding-tile kernel is version 2.1: needs an H100/H200")


@hopper
@pytest.mark.parametrize("dtype, D, grid, windows, text_len", [
    (torch.bfloat16, 128, (7, 9, 10), ((1, 1, 1), (3, 1, 5), (2, 2, 2), (9, 9, 9)), (256, 40)),
    (torch.float16, 64, (7, 9, 10), ((1, 1, 1), (3, 1, 5), (2, 2, 2), (9, 9, 9)), (256, 40)),
    (torch.float16, 128, (18, 24, 40), ((3, 3, 3), (1, 3, 5), (3, 1, 1), (5, 3, 5)), (17, 256)),
    (torch.bfloat16, 64, (18, 24, 40), ((3, 3, 3), (1, 3, 5), (3, 1, 1), (5, 3, 5)), (0, 1)),
    (torch.bfloat16, 128, (33, 45, 80), ((3, 3, 7), (1, 6, 10), (5, 1, 10), (3, 3, 7)), (256, 90)),  # 720p
])
def test_kernel_sparse_forward_matches_fallback(dtype, D, grid, windows, text_len):
    """Edge tiles cut by the grid (their padding slots masked in the middle of the key loop, key tiles and
    query blocks of padding only skipped), windows wider than the grid, text lengths 0 to 256 (ending
    inside a key tile, none at all), and in the last case the 720p latent grid with the published windows'
    shapes."""
    assert attention_cuda.kernel_available()
    _, n_slots = sta_layout(grid)
    L, H = n_slots + 256, len(windows)
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, L, H, D, generator=g, device="cuda", dtype=dtype) for _ in range(3))
    lens = [n_slots + n for n in text_len]
    for b, n in enumerate(lens):  # padded text: NaN (never read); padding slots: finite, as the DiT's
        k[b, n:], v[b, n:] = float("nan"), float("nan")
    torch.empty_like(q).fill_(float("nan"))  # freed at once: the output is allocated from NaN memory
    out = attention(q, k, v, lens, sparse=(grid, windows))
    assert attention_cuda.last_kernels()[0] == "2.1 ws"
    ref = attention_cuda._sta_sdpa(q.double(), k.double(), v.double(), lens, grid, windows)
    slot, _ = sta_layout(grid, q.device)
    rows = torch.cat([slot, torch.arange(n_slots, L, device=q.device)])  # padding-slot rows: any finite value
    err = ((out[:, rows].double() - ref[:, rows]).norm() / ref[:, rows].norm()).item()
    assert out.isfinite().all() and err < 1e-2, err


@hopper
def test_kernel_sparse_backward_is_refused():
    grid = (6, 8, 8)
    q = torch.randn(1, 384 + 128, 2, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    out = attention(q, q, q, sparse=(grid, ((1, 1, 1),) * 2))
    with pytest.raises(RuntimeError, match="forward-only"):
        out.sum().backward()


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_other_gpus_take_the_masked_path(monkeypatch):
    """Off Hopper (use_hopper_kernel says no) sparse runs the masked SDPA path, not the portable kernel,
    which has no windows."""
    monkeypatch.setattr(attention_cuda, "use_hopper_kernel", lambda device: False)
    grid, windows = (7, 9, 10), ((1, 1, 1), (3, 1, 5))
    _, n_slots = sta_layout(grid)
    q, k, v = (torch.randn(1, n_slots + 8, 2, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    called = []
    monkeypatch.setattr(attention_cuda, "_sta_sdpa", lambda *a: called.append(1) or a[0])
    attention(q, k, v, [n_slots + 3], sparse=(grid, windows))
    assert called == [1]
