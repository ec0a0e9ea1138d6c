"""
Attention on the GPU: our kernels vs torch SDPA, forward and forward+backward, TFLOP/s of useful work.

    python attention_cuda/bench.py                       # HunyuanVideo's lengths, batch 2, padded text
    python attention_cuda/bench.py --lengths 67576 119056 --budget 1
    python attention_cuda/bench.py --only ours --no-backward
    python bench.py attention                            # the same, from the repository's bench.py

Shapes as in HunyuanVideo's joint attention: 24 heads x 128, bf16, L = image tokens + 256 text tokens of
which 40 (sample 0) and 90 (sample 1) are valid, so kv_lens = [L - 216, L - 166]. Useful FLOPs count the
valid keys only: forward 4 * H * L * kv_len * D per sample, backward 2.5x that. Contenders:
  ours          attention_cuda.attention with kv_lens (the key loop stops at kv_len): on Hopper version 2.1
                (hopper.cu), elsewhere version 1.2 (portable.cu)
  ours-1.2      on Hopper only: version 1.2 there too (attention_cuda.use_hopper_kernel patched to say no)
  flash         SDPA's flash backend, UNMASKED over all L keys (it takes no mask): a speed reference only,
                its output is not the padded answer
  cudnn split   SDPA's cuDNN backend per sample on k[:kv_len], unmasked (exact, B launches): what dit.py
                runs when our kernel does not
Before timing, each of ours is checked against float64: the full forward and gradients at a small L, and
256 random query rows of the forward at every timed L. Timing: CUDA events, warm-up, median.
"""

import argparse
import math
import os
import statistics
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import attention_cuda  # noqa: E402

LENGTHS = (4352, 16640, 67576, 119056)  # 544x960 at 1, 9 (x2 frames), 33 and 65 latent frames, + 256 text
HEADS, HEAD_DIM, TEXT_PAD = 24, 128, (216, 166)


def time_ms(fn, budget_s=2.0):
    """Median ms of fn() with CUDA events: one warm-up call, then as many as fit in budget_s (3 to 50)."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    n = max(3, min(50, int(budget_s * 1000 / max(start.elapsed_time(end), 1e-3))))
    times = []
    for _ in range(n):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def rel_err(x, ref):
    return ((x.double() - ref).norm() / ref.norm()).item()


def reference_rows(q, k, v, lens, rows):
    """float64 forward for the given query rows of every sample and head: (B, len(rows), H, D)."""
    out = []
    for b, n in enumerate(lens):
        qb, kb, vb = q[b, rows].double(), k[b, :n].double(), v[b, :n].double()  # (r, H, D), (n, H, D)
        s = torch.einsum("rhd,nhd->hrn", qb, kb) / math.sqrt(q.shape[-1])
        out.append(torch.einsum("hrn,nhd->rhd", s.softmax(-1), vb))
    return torch.stack(out)


def ours(version):
    """attention_cuda.attention running `version` ("2.1 ws" or "1.2"), and that version's name."""
    hopper = version != "1.2"

    def run(q, k, v, lens):
        default = attention_cuda.use_hopper_kernel
        attention_cuda.use_hopper_kernel = lambda device: hopper and default(device)
        try:
            return attention_cuda.attention(q, k, v, lens)
        finally:
            attention_cuda.use_hopper_kernel = default
    return run


def check_small(attend, version):
    """Full forward and gradients against float64 autograd at a length off the tile, padded per sample;
    the extension must report that `version` ran. Returns (forward ok, backward ok)."""
    L, lens = 1000 + 37, [1037 - 216, 1037 - 166]
    q, k, v = (torch.randn(2, L, 4, HEAD_DIM, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    go = torch.randn_like(q)
    o = attend(q, k, v, lens)
    grads = torch.autograd.grad(o, (q, k, v), go)
    ref_in = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref = torch.stack([F.scaled_dot_product_attention(  # float64 math backend, per sample on valid keys
        ref_in[0][b:b + 1].transpose(1, 2), ref_in[1][b:b + 1, :n].transpose(1, 2),
        ref_in[2][b:b + 1, :n].transpose(1, 2)).transpose(1, 2)[0] for b, n in enumerate(lens)])
    ref_grads = torch.autograd.grad(ref, ref_in, go.double())
    errs = [rel_err(o, ref)] + [rel_err(g, r) for g, r in zip(grads, ref_grads)]
    launched = attention_cuda.last_kernels()
    print(f"check {version}: L={L}, kv_lens={lens}: rel err o {errs[0]:.1e}, dq {errs[1]:.1e}, "
          f"dk {errs[2]:.1e}, dv {errs[3]:.1e} (bound 1e-2); launched {launched} (forward, backward)")
    fwd_ok = errs[0] < 1e-2 and bool(torch.isfinite(o).all()) and launched[0] == version
    bwd_ok = (all(e < 1e-2 for e in errs[1:]) and all(bool(torch.isfinite(g).all()) for g in grads)
              and launched[1] == version)
    return fwd_ok, fwd_ok and bwd_ok


def sdpa_contenders(q, k, v, lens):
    """name -> function returning the (B, L, H, D) output, for the SDPA backends."""
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, L, D) views for SDPA

    def sdpa(backend, *args):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(*args)
    return {
        "flash (unmasked)": lambda: sdpa(SDPBackend.FLASH_ATTENTION, qt, kt, vt).transpose(1, 2),
        "cudnn split": lambda: torch.cat([  # one unmasked call per sample on its valid keys
            sdpa(SDPBackend.CUDNN_ATTENTION, qt[b:b + 1], kt[b:b + 1, :, :n], vt[b:b + 1, :, :n])
            for b, n in enumerate(lens)]).transpose(1, 2),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS), help="total tokens L per sample")
    ap.add_argument("--batch", type=int, choices=(1, 2), default=2,
                    help="1: 40 valid text tokens; 2: 40 and 90")
    ap.add_argument("--no-backward", dest="backward", action="store_false", help="forward only")
    ap.add_argument("--budget", type=float, default=2.0, help="seconds of timed runs per measurement")
    ap.add_argument("--only", nargs="+", metavar="NAME", help="time these contenders only (e.g. ours)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("attention_cuda/bench.py needs a CUDA GPU; none here, nothing to time.")
        return
    if not attention_cuda.kernel_available():
        sys.exit("attention_cuda/bench.py: the extension did not build; run python attention_cuda/build.py")
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, bf16, {HEADS} heads x {HEAD_DIM}")
    hopper = torch.cuda.get_device_capability() == (9, 0)
    kernels = {"ours": "2.1 ws" if hopper else "1.2", **({"ours-1.2": "1.2"} if hopper else {})}
    kernels = {name: version for name, version in kernels.items() if not args.only or name in args.only}
    ok = {}  # name -> (forward, backward) pass the small check with the right kernel
    for name, version in kernels.items():
        ok[name] = check_small(ours(version), version)
        for side, good in zip(("forward", "backward"), ok[name]):
            if not good:
                print(f"  {name}: the {side} fails the small check: not timing it")

    rows = []
    for L in args.lengths:
        lens = [L - pad for pad in TEXT_PAD[:args.batch]]
        q, k, v = (torch.randn(args.batch, L, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
                   for _ in range(3))
        r = torch.randperm(L, device="cuda")[:256]
        ref = reference_rows(q, k, v, lens, r)
        for name, version in kernels.items():
            if ok[name][0]:
                err = rel_err(ours(version)(q, k, v, lens)[:, r], ref)
                print(f"L={L}: {name} vs float64 on 256 random query rows: rel err {err:.1e}")
                ok[name] = (err < 1e-2, ok[name][1] and err < 1e-2)
        flops = sum(4 * HEADS * L * n * HEAD_DIM for n in lens)  # useful forward FLOPs
        go = torch.randn_like(q)

        def attend(name):  # name -> function of (q, k, v) returning the output
            if name in kernels:
                return lambda q, k, v: ours(kernels[name])(q, k, v, lens)
            return lambda q, k, v: sdpa_contenders(q, k, v, lens)[name]()
        names = [n for n in kernels if ok[n][0]] + [n for n in sdpa_contenders(q, k, v, lens)
                                                     if not args.only or n.split()[0] in args.only]
        for name in names:
            fn = attend(name)
            try:
                fwd = time_ms(lambda: fn(q, k, v), args.budget)
                fb = None
                if args.backward and (name not in kernels or ok[name][1]):
                    qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))
                    fb = time_ms(lambda: torch.autograd.grad(fn(qg, kg, vg), (qg, kg, vg), go), args.budget)
            except RuntimeError as e:  # a backend that refuses the shape
                print(f"  {name}: refused ({str(e).splitlines()[0][:100]})")
                continue
            rows.append((L, name, fwd, flops / fwd / 1e9, fb, 3.5 * flops / fb / 1e9 if fb else None))
            print(f"  {name:18s} fwd {fwd:9.2f} ms {rows[-1][3]:6.0f} TFLOP/s"
                  + (f"   fwd+bwd {fb:9.2f} ms {rows[-1][5]:6.0f} TFLOP/s" if fb else ""), flush=True)
        q = k = v = go = None  # free this length's tensors before the next
        torch.cuda.empty_cache()

    print(f"\nbatch {args.batch}, kv_lens = L - {list(TEXT_PAD[:args.batch])}; TFLOP/s of useful work "
          "(valid keys only); flash runs unmasked over all L keys")
    print(f"{'L':>7}  {'':18s} {'fwd ms':>9} {'TFLOP/s':>7}  {'fwd+bwd ms':>10} {'TFLOP/s':>7}")
    for L, name, fwd, tf, fb, tfb in rows:
        print(f"{L:>7}  {name:18s} {fwd:9.2f} {tf:7.0f}  "
              + (f"{fb:10.2f} {tfb:7.0f}" if fb else f"{'-':>10} {'-':>7}"))


if __name__ == "__main__":
    main()
