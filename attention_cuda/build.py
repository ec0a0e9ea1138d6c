"""
Build the attention extension explicitly (attention() also builds it on first use).

    python attention_cuda/build.py           # JIT build through torch (CUDA torch + nvcc), full log
    python attention_cuda/build.py --check   # compile only, no GPU and no CUDA torch needed (CI):
                                             # portable.cu, hopper.cu with nvcc for sm_90a and sm_80,
                                             # binding.cpp against torch's headers; prints the register
                                             # report

A failure exits non-zero with the compiler's message.
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import attention_cuda  # noqa: E402  (after the path: `python attention_cuda/build.py` runs from anywhere)


def report(ptxas_log):
    """ptxas -v's per-kernel lines, one row per kernel and arch: registers, stack frame (non-zero means
    an array went to local memory) and spills. Returns the problems that make --check fail: any spill or
    stack frame in a Hopper kernel, and ptxas's wgmma warnings (C7508: setmaxnreg ignored; C7512, C7514:
    wgmmas serialised, for lack of registers or because registers in flight are touched). The forward
    runs close to its 240 registers per consumer thread: a small change can tip it over."""
    problems = [line.strip() for line in ptxas_log.splitlines() if re.search(r"\(C75(08|12|14)\)", line)]
    name = frame = None
    for line in ptxas_log.splitlines():
        m = re.search(r"Compiling entry function '.*?((?:hopper_)?(?:fwd|bwd_delta|bwd_dkdv|bwd_dq)_kernel)"
                      r"I(\w+?)Li(\d+)E(?:Li(\d+)E)?(?:Li(\d+)E)?.*' for '(\w+)'", line)
        if m:  # template arguments: dtype, head_dim, (portable) warps per block, (forward) m-tiles per warp
            dtype = m[2].lstrip("0123456789").replace("__nv_", "").lstrip("_")
            warps = f", {m[4]} warps" if m[4] else ""
            rows = f" x {16 * int(m[5])} rows" if m[5] else ""
            name = f"{m[1]}<{dtype}, {m[3]}{warps}{rows}> {m[6]}"
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and name:
            frame = f"stack {m[1]} B, spills {m[2]}/{m[3]} B"
        m = re.search(r"Used (\d+) registers", line)
        if m and name:
            # the Hopper kernels' bodies exist for sm_90a only (#if'd out elsewhere): report them there alone;
            # their count is the launch cap, split by setmaxnreg (consumers 240, producer 24)
            hopper = name.startswith("hopper_")
            if not hopper or name.endswith("sm_90a"):
                cap = " (cap; setmaxnreg 240/24)" if hopper else ""
                print(f"  {name:56s} {m[1]:>3} registers{cap}, {frame}")
                if hopper and frame != "stack 0 B, spills 0/0 B":
                    problems.append(f"{name}: {frame}")
            name = None
    return problems


def check():
    """Compile portable.cu and hopper.cu (nvcc, every arch of the real build) and binding.cpp (syntax,
    host compiler) into a temporary directory. The .cu files need only CUDA headers, so the CPU wheel of
    torch is enough."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        sys.exit("build.py --check: nvcc is not on the PATH; install the CUDA toolkit or skip the check")
    from torch.utils.cpp_extension import include_paths
    with tempfile.TemporaryDirectory() as tmp:
        for cu in ("portable.cu", "hopper.cu"):
            cmd = [nvcc, "-c", "-std=c++17", *attention_cuda.NVCC_FLAGS, "-Xptxas", "-v",
                   os.path.join(HERE, cu), "-o", os.path.join(tmp, cu + ".o")]
            print(" ".join(cmd), flush=True)
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode:
                sys.exit(f"build.py --check: nvcc failed on {cu}:\n{r.stderr}")
            problems = report(r.stderr)
            if problems:
                sys.exit("build.py --check: the Hopper kernels compile badly:\n  " + "\n  ".join(problems))
        cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
        if cxx is None:
            print("no host C++ compiler: binding.cpp not checked")
            return
        incs = [f"-I{p}" for p in include_paths()] + [f"-I{sysconfig.get_paths()['include']}"]
        cmd = [cxx, "-fsyntax-only", "-std=c++20", "-DTORCH_EXTENSION_NAME=attention_cuda_ext", *incs,
               os.path.join(HERE, "binding.cpp")]
        print(f"{cxx} -fsyntax-only -std=c++20 <torch includes> binding.cpp", flush=True)
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            sys.exit(f"build.py --check: binding.cpp failed:\n{r.stderr}")
    print("attention_cuda: compiles")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="compile only (no GPU needed)")
    args = ap.parse_args()
    if args.check:
        check()
    else:
        ext = attention_cuda.build(verbose=True)
        print(f"attention_cuda: built {ext.__file__}")


if __name__ == "__main__":
    main()
