"""attention_cuda against a float64 formula written out by hand: softmax(q k^T / sqrt d) v over the valid
keys of each sample. CPU tests cover the SDPA fallback; the GPU tests (skipped without CUDA) cover both
kernels (version 2.1 on Hopper, version 1.2 everywhere): bf16/fp16, head_dim 64 and 128, lengths off the
tile, kv_lens edge cases, poisoned outputs."""

import math
import pathlib
import subprocess
import sys

import pytest
import torch

import attention_cuda
from attention_cuda import attention, kernel_available

CUDA = torch.cuda.is_available()


def reference(q, k, v, kv_lens=None):
    """float64, one (sample, head) at a time, padded keys sliced away (never touched)."""
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    q, k, v = q.double(), k.double(), v.double()
    out = torch.empty(B, Lq, H, D, dtype=torch.float64, device=q.device)
    for b in range(B):
        n = Lk if kv_lens is None else int(kv_lens[b])
        for h in range(H):
            s = q[b, :, h] @ k[b, :n, h].T / math.sqrt(D)  # (Lq, n)
            p = torch.exp(s - s.max(-1, keepdim=True).values)
            out[b, :, h] = (p / p.sum(-1, keepdim=True)) @ v[b, :n, h]
    return out


def rel_err(x, ref):
    return ((x.double() - ref).norm() / ref.norm()).item()


def rand(*shape, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype, device=device)


def qkv(B, Lq, Lk, H, D, dtype=torch.float32, device="cpu", seed=0):
    return (rand(B, Lq, H, D, dtype=dtype, device=device, seed=seed),
            rand(B, Lk, H, D, dtype=dtype, device=device, seed=seed + 1),
            rand(B, Lk, H, D, dtype=dtype, device=device, seed=seed + 2))


def poison_padding(k, v, kv_lens):
    """NaN in every padded key and value: a path that multiplies them by zero instead of skipping them
    turns outputs into NaN."""
    k, v = k.clone(), v.clone()
    for b, n in enumerate(kv_lens):
        k[b, n:] = float("nan")
        v[b, n:] = float("nan")
    return k, v


# -----------------------------------------------------------------------------
# The fallback, on the CPU

@pytest.mark.parametrize("kv_lens", [None, [24, 24], [1, 24], [17, 5], [24, 1]])
def test_fallback_forward(kv_lens):
    q, k, v = qkv(2, 24, 24, 3, 16)
    if kv_lens is not None:
        k, v = poison_padding(k, v, kv_lens)
    o = attention(q, k, v, kv_lens)
    assert o.shape == q.shape and o.dtype == q.dtype
    assert torch.isfinite(o).all()
    assert rel_err(o, reference(q, k, v, kv_lens)) < 1e-5
    # float64 in, float64 out: the same function to rounding
    o64 = attention(q.double(), k.double(), v.double(), kv_lens)
    assert rel_err(o64, reference(q, k, v, kv_lens)) < 1e-12


def test_fallback_lq_differs_from_lk_and_tensor_lens():
    q, k, v = qkv(2, 7, 30, 2, 8)
    lens = torch.tensor([30, 11])
    assert rel_err(attention(q, k, v, lens), reference(q, k, v, [30, 11])) < 1e-5


@pytest.mark.parametrize("kv_lens", [None, [9, 2]])
def test_fallback_gradients(kv_lens):
    q, k, v = (x.double().requires_grad_() for x in qkv(2, 10, 12, 2, 8, seed=3))
    go = rand(2, 10, 2, 8, dtype=torch.float64, seed=9)
    lens = kv_lens or [12, 12]
    got = torch.autograd.grad((attention(q, k, v, kv_lens) * go).sum(), (q, k, v))
    want = torch.autograd.grad((reference(q, k, v, lens) * go).sum(), (q, k, v))
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-10
    for b, n in enumerate(lens):  # padded keys get no gradient at all
        assert (got[1][b, n:] == 0).all() and (got[2][b, n:] == 0).all()


def test_bad_inputs():
    q, k, v = qkv(2, 8, 8, 2, 16)
    cases = [
        ((q[0], k, v, None), "4-d tensor"),
        ((q, k, v[:, :5], None), "same shape"),
        ((q, k[:1], v[:1], None), "agree in batch"),
        ((q, k[..., :8], v[..., :8], None), "agree in batch"),
        ((q, k.double(), v, None), "share dtype"),
        ((q, k, v, [8]), "hold 2 ints"),
        ((q, k, v, [8, 2.0]), "hold 2 ints"),
        ((q, k, v, torch.tensor([[8, 8]])), r"shape \(2,\)"),
        ((q, k, v, torch.tensor([8.0, 8.0])), "integer tensor"),
        ((q, k, v, [8, 0]), "drop it"),
        ((q, k, v, [9, 8]), r"\[1, Lk=8\]"),
        ((q, k[:, :0], v[:, :0], None), "no keys"),
    ]
    for args, msg in cases:
        with pytest.raises(ValueError, match=msg):
            attention(*args)


@pytest.mark.skipif(CUDA, reason="checks the CPU-only answer")
def test_kernel_not_available_on_cpu():
    assert kernel_available() is False
    assert attention_cuda._ext is None  # nothing was built or loaded


# -----------------------------------------------------------------------------
# The kernel, on a GPU

gpu = pytest.mark.skipif(not CUDA, reason="needs CUDA")


@pytest.fixture(params=["2.1 ws", "1.2"], ids=["hopper", "portable"])
def version(request, monkeypatch):
    """The kernel under test, as last_kernels() names it: version 2.1 (hopper.cu, compute capability 9.0
    only) or version 1.2 (portable.cu), which a Hopper GPU runs when use_hopper_kernel says no."""
    if request.param == "2.1 ws" and torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("version 2.1 is sm_90a code: it needs an H100/H200")
    if request.param == "1.2":
        monkeypatch.setattr(attention_cuda, "use_hopper_kernel", lambda device: False)
    return request.param


def fresh_nan_memory(*tensors_like):
    """Fill the caching allocator's free blocks with NaN: allocate buffers the size of the outputs to
    come, poison them and free them, so the kernel's torch.empty outputs start as NaN and an element the
    kernel forgets to write shows up."""
    bufs = [torch.full_like(t, float("nan")) for t in tensors_like]
    del bufs


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("L, kv_lens", [
    (1000, None),                     # L off the 64- and 128-row tiles
    (4352 + 37, [4352 + 37, 4352]),   # none padded in sample 0; a whole-tile tail in sample 1
    (300, [1, 300]),                  # all but one key padded
    (517, [517 - 216, 40]),           # differing per sample, ends inside a tile
    (129, [128, 129]),                # one key past a tile; a sample that ends on a tile boundary
])
def test_kernel_forward_backward(version, dtype, D, L, kv_lens):
    """Forward and backward against float64, NaN in every padded key and value and in the memory the
    outputs are allocated from; the backward reads the log-sum-exp the forward saves, so this checks
    that too. The launcher must really have taken the version under test."""
    assert kernel_available(), "CUDA is here, so the extension must build: run python attention_cuda/build.py"
    B, H = 2, 2
    q, k, v = qkv(B, L, L, H, D, dtype=dtype, device="cuda", seed=L + D)
    if kv_lens is not None:
        k, v = poison_padding(k, v, kv_lens)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    go = rand(B, L, H, D, dtype=dtype, device="cuda", seed=7)

    fresh_nan_memory(q, q)
    o = attention(q, k, v, kv_lens)
    fresh_nan_memory(q, k, v, q.float())
    dq, dk, dv = torch.autograd.grad((o.float() * go.float()).sum(), (q, k, v))
    assert attention_cuda.last_kernels() == (version, version)
    for x in (o, dq, dk, dv):
        assert torch.isfinite(x).all()

    lens = kv_lens or [L] * B
    ref_in = [x.detach().double().nan_to_num(0).requires_grad_() for x in (q, k, v)]
    ref = reference(*ref_in, lens)
    ref_grads = torch.autograd.grad((ref * go.double()).sum(), ref_in)
    assert rel_err(o, ref) < 1e-2
    for name, g, w in zip("qkv", (dq, dk, dv), ref_grads):
        assert rel_err(g, w) < 1e-2, f"d{name}"
    for b, n in enumerate(lens):
        assert (dk[b, n:] == 0).all() and (dv[b, n:] == 0).all()


@gpu
def test_kernel_matches_fallback_and_other_shapes(version):
    """Lq != Lk, non-contiguous inputs (slices of a packed qkv tensor), a tensor kv_lens, forward and
    backward (version 2.1's tensor maps read those strides themselves)."""
    assert kernel_available()
    B, L, H, D = 2, 333, 4, 128
    qkv_packed = rand(B, L, 3, H, D, dtype=torch.bfloat16, device="cuda", seed=11).requires_grad_()
    q, k, v = qkv_packed.unbind(2)
    lens = torch.tensor([333, 100], device="cuda")
    o = attention(q[:, :77], k, v, lens)
    assert o.shape == (B, 77, H, D)
    assert rel_err(o, reference(q[:, :77], k, v, [333, 100])) < 1e-2
    o_fb = attention_cuda._sdpa(q[:, :77].float(), k.float(), v.float(), (333, 100))
    assert rel_err(o, o_fb.double()) < 1e-2
    go = rand(B, 77, H, D, device="cuda", seed=12)
    (g,) = torch.autograd.grad((o.float() * go).sum(), qkv_packed)
    ref_in = qkv_packed.detach().double().requires_grad_()
    rq, rk, rv = ref_in.unbind(2)
    (g_ref,) = torch.autograd.grad((reference(rq[:, :77], rk, rv, [333, 100]) * go.double()).sum(), ref_in)
    assert rel_err(g, g_ref) < 1e-2
    assert attention_cuda.last_kernels() == (version, version)


@gpu
def test_other_head_dims_fall_back_to_sdpa():
    """Head sizes the kernel does not cover (tiny test configs) take SDPA, with the same semantics."""
    q, k, v = qkv(1, 16, 16, 2, 96, dtype=torch.bfloat16, device="cuda")
    o = attention(q, k, v, kv_lens=[10])
    assert rel_err(o, reference(q, k, v, [10])) < 1e-2


@gpu
def test_hopper_backward_in_a_fresh_process():
    """Autograd runs the backward on its own thread, which may not have the device's context current yet;
    the tensor maps of version 2.1 need it. The very first backward of a process must still launch 2.1
    (a fresh interpreter, since this one has run backwards already)."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("version 2.1 is sm_90a code: it needs an H100/H200")
    code = ("import torch, attention_cuda\n"
            "q, k, v = (torch.randn(1, 1000, 2, 128, device='cuda', dtype=torch.bfloat16,"
            " requires_grad=True) for _ in range(3))\n"
            "o = attention_cuda.attention(q, k, v, [800])\n"
            "torch.autograd.grad(o, (q, k, v), torch.randn_like(o))\n"
            "print(attention_cuda.last_kernels())\n")
    root = str(pathlib.Path(__file__).resolve().parents[1])
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "('2.1 ws', '2.1 ws')", out.stdout
