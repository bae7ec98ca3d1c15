"""Ahead-of-time compilation of the Triton kernels for GPUs this machine does not have.

Triton's frontend, LLVM and its bundled ptxas need no driver, so a CPU machine can compile a
kernel for sm_90 / sm_80 and read what the GPU would get: shared memory, registers, spills
and the PTX (wgmma, cp.async, atomics). The interpreter accepts code the compiler rejects,
so every kernel is compiled this way too. Compilation must run without TRITON_INTERPRET:
:func:`offline` runs a test module's function in a fresh interpreter.

Everything here uses the Triton that Python imports. To check another release (say, the one
a GPU machine has), install it into a side directory and put that first on PYTHONPATH; the
interpreted tests run the same way (Triton 3.6 needs numpy < 2.4 there):

    python3 -m venv /tmp/t36 && /tmp/t36/bin/pip install triton==3.6.0 "numpy<2.4"
    PYTHONPATH=/tmp/t36/lib/python3.11/site-packages .venv/bin/python tests/aot.py
"""
from __future__ import annotations

import os
import pickle
import re
import subprocess
import sys
import tempfile

SMEM_LIMIT = {90: 232448, 80: 166912}   # max dynamic shared memory per block, H100 / A100
ATOMIC = re.compile(r"^\s*(@!?%p\d+\s+)?(atom|red)\.", re.M)   # an atomic PTX instruction


def ptxas_usage(ptx: str, arch: int) -> tuple[int, int]:
    """(registers per thread, spill bytes) that ptxas reports for ``ptx`` on ``arch``."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as tmp:
        src = f"{tmp}/k.ptx"
        with open(src, "w") as fh:
            fh.write(ptx)
        sm = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        out = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name={sm}", src,
                              "-o", f"{tmp}/k.cubin"], capture_output=True, text=True)
    text = out.stdout + out.stderr
    regs = int(re.search(r"Used (\d+) registers", text).group(1))
    spills = sum(int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", text))
    return regs, spills


def compile_kernel(fn, arch: int, constexprs: dict, ptr_type, *, num_warps: int,
                   num_stages: int, unaligned=("cap",)):
    """Compile @triton.jit ``fn`` for sm_``arch``: (shared bytes, ptx, registers, spills).

    constexprs: every constexpr argument's value (those with a default may be left out);
    ptr_type(name) -> "*bf16", "*fp32", "*i64"...
    for each pointer argument, or "tensordesc<bf16[128, 64]>" for one passed as a tensor
    descriptor (TMA). Other arguments are i32 (``cap`` fp32) and, as Triton
    specialises them at a real launch, divisible by 16 unless named in ``unaligned``.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    # constexprs left out take their defaults, as at a real launch
    constexprs = {**{p.name: p.default for p in fn.params if p.is_constexpr and p.has_default},
                  **constexprs}
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
            continue
        if name.endswith("_ptr"):
            sig[name] = ptr_type(name)
        else:
            sig[name] = "fp32" if name == "cap" else "i32"
        if not sig[name].startswith("tensordesc"):
            attrs[(i,)] = [] if name in unaligned else [["tt.divisibility", 16]]
    k = triton.compile(ASTSource(fn, signature=sig, constexprs=constexprs, attrs=attrs),
                       target=GPUTarget("cuda", arch, 32),
                       options=dict(num_warps=num_warps, num_stages=num_stages))
    ptx = k.asm["ptx"]
    return (k.metadata.shared, ptx, *ptxas_usage(ptx, arch))


# the head kernels' tensors in the input dtype; every other float pointer is fp32
HEAD_INPUTS = frozenset({"h_ptr", "w_ptr", "b_ptr", "hr_ptr", "wr_ptr", "br_ptr", "dz_ptr",
                         "z_ptr", "r_ptr"})


def head_ptr_type(cx: dict, dt: str):
    """``ptr_type`` for a head kernel compiled in dtype ``dt`` with constexprs ``cx``: with
    ``cx["TMA"]`` the weights are [BLOCK_V, BLOCK_D] and the dz slab [BLOCK_N, BLOCK_V] tensor
    descriptors, as the launchers pass them; index pointers are integers."""
    def ptr_type(n):
        if cx.get("TMA") and n in ("w_ptr", "wr_ptr"):
            return f"tensordesc<{dt}[{cx['BLOCK_V']}, {cx['BLOCK_D']}]>"
        if cx.get("TMA") and n == "dz_ptr":
            return f"tensordesc<{dt}[{cx['BLOCK_N']}, {cx['BLOCK_V']}]>"
        return {"t_ptr": "*i64", "rows_ptr": "*i64", "count_ptr": "*i32"}.get(
            n, f"*{dt}" if n in HEAD_INPUTS else "*fp32")
    return ptr_type


def offline(test_file: str, func: str, timeout: int = 300):
    """``func()`` of the test module ``test_file`` (pass ``__file__``), run in a fresh
    interpreter without TRITON_INTERPRET; returns its (picklable) result."""
    here = os.path.dirname(os.path.abspath(test_file))
    module = os.path.splitext(os.path.basename(test_file))[0]
    code = (f"import sys, pickle; sys.path[:0] = [{here!r}, {os.path.dirname(here)!r}]; "
            f"import {module} as m; sys.stdout.buffer.write(pickle.dumps(m.{func}()))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    return pickle.loads(proc.stdout)


def _head_tiles() -> None:
    """Registers, spills and shared memory of the LM-head kernels per tile on sm_90 in bf16:
    with and without a bias + softcap, FLATTEN (forward) and TMA for the weight (and the
    backward's dz slab), and with Z_GIVEN (the KL head's too): the numbers
    tisdpo_kernels/_triton/configs.py and docs quote."""
    from tisdpo_kernels._triton import linear_logprobs as L

    tiles = [(128, 128, 64, 8, 4), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3),
             (256, 128, 64, 16, 3), (128, 256, 32, 8, 4)]
    print("| kernel | bias + softcap | FLATTEN | TMA | tile | BLOCK_D | warps | stages "
          "| registers | spill B | shared KiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for kind in ("fwd", "bwd"):
        for cap in (False, True):
            for flat in ((False, True) if kind == "fwd" else (False,)):
                for tma in (False, True):
                    for bn, bv, bd, w, st in tiles:
                        cx = dict(HAS_BIAS=cap, HAS_SOFTCAP=cap, UPCAST=False, TMA=tma,
                                  DOT_PRECISION="ieee", BLOCK_N=bn, BLOCK_V=bv, BLOCK_D=bd,
                                  stride_hd=1, stride_wd=1)
                        if kind == "fwd":
                            fn = L.linear_logprobs_fwd_kernel
                            cx.update(FINAL=False, FLATTEN=flat)
                        else:
                            fn = L.linear_logprobs_bwd_kernel
                            cx.update(HAS_FILTER=False, GROUP_N=8)
                        shared, _, regs, spills = compile_kernel(
                            fn, 90, cx, head_ptr_type(cx, "bf16"), num_warps=w, num_stages=st)
                        print(f"| {kind} | {cap} | {flat if kind == 'fwd' else '-'} | {tma} "
                              f"| {bn}×{bv} | {bd} | {w} | {st} | {regs} | {spills} "
                              f"| {shared / 1024:.0f} |")
    # Z_GIVEN (TISDPO_HEAD_LOGITS=gemm): the tiles read from a GEMM's logits, no dot
    for kind in ("fwd-z", "bwd-z"):
        for cap in (False, True):
            for bn, bv, w in ((64, 256, 8), (32, 256, 8), (16, 512, 8), (16, 256, 4)):
                cx = dict(HAS_BIAS=cap, HAS_SOFTCAP=cap, UPCAST=False, TMA=False, Z_GIVEN=True,
                          DOT_PRECISION="ieee", BLOCK_N=bn, BLOCK_V=bv, BLOCK_D=16)
                if kind == "fwd-z":
                    fn = L.linear_logprobs_fwd_kernel
                    cx.update(FINAL=False)
                else:
                    fn = L.linear_logprobs_bwd_kernel
                    cx.update(HAS_FILTER=False, GROUP_N=1)
                shared, _, regs, spills = compile_kernel(
                    fn, 90, cx, head_ptr_type(cx, "bf16"), num_warps=w, num_stages=2)
                print(f"| {kind} | {cap} | - | False | {bn}×{bv} | - | {w} | 2 | {regs} "
                      f"| {spills} | {shared / 1024:.0f} |")
    # the KL head's kernels with Z_GIVEN: two logit tiles read per tile (policy_ref)
    from tisdpo_kernels._triton import linear_token_kl as K
    for kind in ("kl-fwd-z", "kl-bwd-z"):
        for cap in (False, True):
            for bn, bv, w in ((16, 128, 8), (16, 256, 8), (32, 256, 16)):
                cx = dict(HAS_BIAS=cap, HAS_REF_BIAS=cap, HAS_SOFTCAP=cap, POLICY_REF=True,
                          UPCAST=False, TMA=False, Z_GIVEN=True, DOT_PRECISION="ieee",
                          BLOCK_N=bn, BLOCK_V=bv, BLOCK_D=16)
                if kind == "kl-fwd-z":
                    fn = K.linear_token_kl_fwd_kernel
                    cx.update(FINAL=False)
                else:
                    fn = K.linear_token_kl_bwd_kernel
                    cx.update(GROUP_N=1)
                shared, _, regs, spills = compile_kernel(
                    fn, 90, cx, head_ptr_type(cx, "bf16"), num_warps=w, num_stages=2)
                print(f"| {kind} | {cap} | - | False | {bn}×{bv} | - | {w} | 2 | {regs} "
                      f"| {spills} | {shared / 1024:.0f} |")


def _epilogue_shapes() -> None:
    """The one-sweep epilogue per shape of its CONFIGS and AUTOTUNE entries, on sm_90 and sm_80
    in bf16: the most registers and spill bytes over every launch kind the sweep makes (no KL,
    either KL with a reference head; with and without a softcap; statistics and e at once,
    statistics saved, e from saved statistics, statistics only)."""
    from tisdpo_kernels._triton import linear_preference_loss as P
    from tisdpo_kernels._triton.configs import AUTOTUNE, CONFIGS

    fp32 = {"c_ptr", "kg_ptr", "logp_ptr", "ref_logp_ptr", "kl_ptr", "st_ptr"}

    def ptr_type(n):
        return "*i64" if n == "t_ptr" else "*fp32" if n in fp32 else "*bf16"

    cfgs = {(c.meta["ROWS"], c.meta["BLOCK_V"], c.num_warps, c.num_stages): None
            for c in [CONFIGS["linear_preference_loss_fwd"][k] for k in ("sm90", "sm80")]
            + AUTOTUNE["linear_preference_loss_fwd"]}
    launches = [dict(HAS_SOFTCAP=cap, HAS_REF=kl > 0, KL=kl, WRITE_E=e, STATS=st)
                for kl in (0, 1, 2) for cap in (False, True)
                for e, st in ((True, 0), (False, 1), (True, 2), (False, 0))]
    print("\n| epilogue rows × BLOCK_V | warps | stages | arch | max registers | max spill B "
          "| worst launch |")
    print("|---|---|---|---|---|---|---|")
    for rows, bv, w, st in cfgs:
        for arch in (90, 80):
            worst = (0, 0, None)
            for flags in launches:
                _, _, regs, spills = compile_kernel(
                    P.linear_preference_loss_fwd_kernel, arch,
                    {**flags, "ROWS": rows, "BLOCK_V": bv}, ptr_type, num_warps=w,
                    num_stages=st, unaligned=("cap", "C"))
                worst = max(worst, (spills, regs, flags), key=lambda x: x[:2])
            spills, regs, flags = worst
            kind = ", ".join(f"{k}={int(v)}" for k, v in flags.items())
            print(f"| {rows} × {bv} | {w} | {st} | sm_{arch} | {regs} | {spills} | {kind} |")


if __name__ == "__main__":      # python tests/aot.py (bf16; no GPU needed)
    _head_tiles()
    _epilogue_shapes()
