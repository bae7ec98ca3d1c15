"""Which launch config of the fused LM-head kernels is fastest on this GPU.

Times ``linear_logprobs`` forward and backward (impl="triton") at one head shape three times:
with the tuned default configs (``tisdpo_kernels/_triton/configs.py`` ``CONFIGS``), with them
and the weight and dz tiles moved through pointers instead of TMA (``TISDPO_TMA=0``; the same
as the default before Hopper), and with ``TISDPO_AUTOTUNE=1``, which times every ``AUTOTUNE``
entry on the first call and keeps the fastest. Prints, per kernel, the config the autotuner
chose, the times of the runs and the largest difference between the default's and the autotuned
run's outputs (every ``AUTOTUNE`` entry is also checked against the oracle by
``tests/kernels/test_linear_logprobs_triton.py``, compiled when run on a GPU). A chosen config
that beats the default is the candidate for the device class's ``CONFIGS`` entry.
``--logits gemm`` does the same for the kernels that read cuBLAS logits
(``TISDPO_HEAD_LOGITS=gemm``; they never use TMA, so that column is left out).

    python -m benchmarks.tune --shape llama3-8b --tokens 8k
    python -m benchmarks.tune --shape llama3-8b --tokens 8k --logits gemm
    python -m benchmarks.tune --cpu-smoke          # the same steps, interpreted, no autotuning
"""
from __future__ import annotations

import argparse
import json
import os

import torch

from benchmarks.measure import env_vars, time_fn
from benchmarks.shapes import PRESETS, parse_tokens

KERNELS = {"fused": ("linear_logprobs_fwd", "linear_logprobs_bwd"),
           "gemm": ("linear_logprobs_fwd_z", "linear_logprobs_bwd_z")}


def _inputs(n, d, v, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    h = torch.randn(n, d, generator=g, device=device).to(dtype)
    w = (torch.randn(v, d, generator=g, device=device) * (2.0 / d ** 0.5)).to(dtype)
    y = torch.randint(0, v, (n,), generator=g, device=device)
    up = torch.randn(n, generator=g, device=device)
    return h, w, y, up


def _run(h, w, y, up, *, reps, warmup):
    """(fwd Stats, bwd Stats, outputs of one fwd+bwd) with the configs now in force."""
    import tisdpo_kernels as tk

    leaves = [h.requires_grad_(), w.requires_grad_()]

    def fwd():
        return tk.linear_logprobs(h, w, y, impl="triton")

    def bwd(logp):
        logp.backward(up)

    f = time_fn(fwd, device=h.device, warmup=warmup, reps=reps, grad_to_none=leaves)
    b = time_fn(bwd, device=h.device, warmup=warmup, reps=reps, grad_to_none=leaves,
                setup=fwd)
    for t in leaves:
        t.grad = None
    logp = fwd()
    logp.backward(up)
    return f, b, (logp.detach(), h.grad.clone(), w.grad.clone())


def _chosen(h, w, logits: str) -> dict:
    """The config the autotuner kept for each kernel (after a run with TISDPO_AUTOTUNE=1)."""
    from tisdpo_kernels._triton import common, linear_logprobs as L

    fwd, bwd = KERNELS[logits]
    kernels = {fwd: (L.linear_logprobs_fwd_kernel, L._DESCRIPTORS),
               bwd: (L.linear_logprobs_bwd_kernel, L._BWD_DESCRIPTORS)}
    tma = logits == "fused" and common.tma(h, w)
    out = {}
    for name in KERNELS[logits]:
        fn, descriptors = kernels[name]         # keyed as the launchers key the autotuner
        tuner = common._autotuned(name, fn, ("V", "D"), (), descriptors if tma else ())
        best = getattr(tuner, "best_config", None)
        out[name] = None if best is None else {**best.kwargs, "num_warps": best.num_warps,
                                               "num_stages": best.num_stages}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.tune",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="llama3-8b", help=f"one of {sorted(PRESETS)}")
    ap.add_argument("--tokens", default="8k")
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    ap.add_argument("--logits", default="fused", choices=("fused", "gemm"),
                    help="TISDPO_HEAD_LOGITS: the fused kernels, or those reading cuBLAS logits")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="toy sizes under the Triton interpreter (no autotuning on a CPU)")
    args = ap.parse_args(argv)
    if args.cpu_smoke:
        os.environ["TRITON_INTERPRET"] = "1"
        device, (n, d, v), dtype = torch.device("cpu"), (64, 32, 500), torch.float32
    else:
        if not torch.cuda.is_available():
            ap.error("autotuning needs a CUDA GPU (use --cpu-smoke to check the script)")
        shape = PRESETS[args.shape]
        device, (n, d, v) = torch.device("cuda"), (parse_tokens(args.tokens)[0],
                                                   shape.hidden, shape.vocab)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
            args.dtype]
    h, w, y, up = _inputs(n, d, v, dtype, device)
    rows = {}
    kernels = KERNELS[args.logits]
    modes = (("default", "0", "auto"), ("no-tma", "0", "0"), ("autotuned", "1", "auto"))
    for mode, autotune, tma in modes:
        if mode == "no-tma" and args.logits == "gemm":
            continue
        with env_vars(TISDPO_AUTOTUNE=autotune, TISDPO_TMA=tma,
                      TISDPO_HEAD_LOGITS=args.logits):
            rows[mode] = _run(h, w, y, up, reps=args.reps, warmup=args.warmup)
            if mode == "autotuned":       # the autotuner's key depends on TISDPO_TMA
                chosen = (_chosen(h, w, args.logits) if device.type == "cuda"
                          else {k: None for k in kernels})
    diff = [(a.float() - b.float()).abs().max().item()
            for a, b in zip(rows["default"][2], rows["autotuned"][2])]
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (interpreter)"
    print(json.dumps({"device": gpu, "torch": torch.__version__, "N": n, "D": d, "V": v,
                      "dtype": str(dtype), "logits": args.logits, "chosen": chosen,
                      "max_diff": dict(zip(("logp", "d_hidden", "d_weight"), diff))}))
    print(f"| pass | default ms | TISDPO_TMA=0 ms | autotuned ms | chosen config ({gpu}, "
          f"N={n}, D={d}, V={v}) |")
    print("|---|---|---|---|---|")
    for i, (name, kernel) in enumerate(zip(("forward", "backward"), kernels)):
        no_tma = f"{rows['no-tma'][i].median_ms:.3f}" if "no-tma" in rows else "—"
        print(f"| {name} | {rows['default'][i].median_ms:.3f} | {no_tma} | "
              f"{rows['autotuned'][i].median_ms:.3f} | {chosen[kernel] or 'n/a'} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
