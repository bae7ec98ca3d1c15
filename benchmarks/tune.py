"""Which launch config of the Triton kernels is fastest on this GPU.

Times one op (impl="triton") at one head shape, forward and backward, three times: with the
tuned default configs (``tisdpo_kernels/_triton/configs.py`` ``CONFIGS``), with them and the
weight and dz tiles moved through pointers instead of TMA (``TISDPO_TMA=0``; the same as the
default before Hopper), and with ``TISDPO_AUTOTUNE=1``, which times every ``AUTOTUNE`` entry on
the first call and keeps the fastest. Prints, per kernel, the config the autotuner chose, the
times of the runs and the largest difference between the default's and the autotuned run's
outputs (every ``AUTOTUNE`` entry is also checked against the oracle by the kernel tests,
compiled when run on a GPU). A chosen config that beats the default is the candidate for the
device class's ``CONFIGS`` entry.

``--op``: ``logprobs`` (``linear_logprobs``, the default), ``kl`` (``linear_token_kl``, a
reference head of the same shape) or ``loss`` (``linear_preference_loss``, the one-sweep head
on one pair of N/2 + N/2 tokens with the tisdpo preset, a reference head and token weights:
it tunes the epilogue, which runs in the forward; the backward only scales). ``--logits gemm``
does the same for the head kernels that read cuBLAS logits (``TISDPO_HEAD_LOGITS=gemm``; they
never use TMA, so that column is left out, as it is for the epilogue).

    python -m benchmarks.tune --shape llama3-8b --tokens 8k
    python -m benchmarks.tune --shape llama3-8b --tokens 8k --logits gemm
    python -m benchmarks.tune --shape llama3-8b --tokens 16k --op loss
    python -m benchmarks.tune --cpu-smoke          # the same steps, interpreted, no autotuning
"""
from __future__ import annotations

import argparse
import json
import os

import torch

from benchmarks.measure import env_vars, time_fn
from benchmarks.shapes import PRESETS, parse_tokens

OPS = ("logprobs", "kl", "loss")
OUTPUTS = {"logprobs": "logp", "kl": "kl", "loss": "loss"}


def kernels(op: str, logits: str) -> list[tuple]:
    """(autotuner name, kernel, autotune key, TMA descriptors) of the forward's and the
    backward's kernel (the one-sweep head: its epilogue, forward only), keyed as the launchers
    key the autotuner."""
    if op == "loss":
        from tisdpo_kernels._triton import linear_preference_loss as P
        return [("linear_preference_loss_fwd", P.linear_preference_loss_fwd_kernel,
                 P._AUTOTUNE_KEY, ())]
    if op == "kl":
        from tisdpo_kernels._triton import linear_token_kl as M
        stem = "linear_token_kl"
    else:
        from tisdpo_kernels._triton import linear_logprobs as M
        stem = "linear_logprobs"
    z, key = "_z" if logits == "gemm" else "", M._AUTOTUNE_KEY
    return [(f"{stem}_fwd{z}", getattr(M, f"{stem}_fwd_kernel"), key, M._DESCRIPTORS),
            (f"{stem}_bwd{z}", getattr(M, f"{stem}_bwd_kernel"), key, M._BWD_DESCRIPTORS)]


def _inputs(n, d, v, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    h = torch.randn(n, d, generator=g, device=device).to(dtype)
    w = (torch.randn(v, d, generator=g, device=device) * (2.0 / d ** 0.5)).to(dtype)
    rh = (h.float() + 0.1 * torch.randn(n, d, generator=g, device=device)).to(dtype)
    rw = (w.float() * 0.9).to(dtype)
    y = torch.randint(0, v, (n,), generator=g, device=device)
    up = torch.randn(n, generator=g, device=device)
    wt = 0.7 + 0.6 * torch.rand(n, generator=g, device=device)
    return h, w, rh, rw, y, up, wt


def _forward(op: str, h, w, rh, rw, y, wt):
    """The op's forward (impl="triton"); returns what the backward starts from."""
    import tisdpo_kernels as tk

    if op == "logprobs":
        return tk.linear_logprobs(h, w, y, impl="triton")
    if op == "kl":
        return tk.linear_token_kl(h, w, rh, rw, y, impl="triton")[0]
    n, d = h.shape                                    # one pair: [2, N/2, D], chosen row first
    return tk.linear_preference_loss(h.view(2, n // 2, d), w, y.view(2, n // 2),
                                     config=tk.get_preset("tisdpo").config,
                                     ref_hidden=rh.view(2, n // 2, d), ref_weight=rw,
                                     weights=wt.view(2, n // 2), impl="triton")[0]


def _run(op, inputs, *, reps, warmup):
    """(fwd Stats, bwd Stats, outputs of one fwd+bwd) with the configs now in force."""
    h, w, rh, rw, y, up, wt = inputs
    leaves = [h.requires_grad_(), w.requires_grad_()]

    def fwd():
        return _forward(op, h, w, rh, rw, y, wt)

    def bwd(out):
        out.backward(up.view(out.shape) if out.dim() else None)

    f = time_fn(fwd, device=h.device, warmup=warmup, reps=reps, grad_to_none=leaves)
    b = time_fn(bwd, device=h.device, warmup=warmup, reps=reps, grad_to_none=leaves,
                setup=fwd)
    for t in leaves:
        t.grad = None
    out = fwd()
    bwd(out)
    return f, b, (out.detach(), h.grad.clone(), w.grad.clone())


def _chosen(op, h, w, logits: str) -> dict:
    """The config the autotuner kept for each kernel (after a run with TISDPO_AUTOTUNE=1)."""
    from tisdpo_kernels._triton import common

    tma = logits == "fused" and op != "loss" and common.tma(h, w)
    out = {}
    for name, fn, key, descriptors in kernels(op, logits):
        tuner = common._autotuned(name, fn, key, (), descriptors if tma else ())
        best = getattr(tuner, "best_config", None)
        out[name] = None if best is None else {**best.kwargs, "num_warps": best.num_warps,
                                               "num_stages": best.num_stages}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.tune",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--op", default="logprobs", choices=OPS)
    ap.add_argument("--shape", default="llama3-8b", help=f"one of {sorted(PRESETS)}")
    ap.add_argument("--tokens", default="8k")
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    ap.add_argument("--logits", default="fused", choices=("fused", "gemm"),
                    help="TISDPO_HEAD_LOGITS: the fused kernels, or those reading cuBLAS logits "
                         "(logprobs and kl)")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="toy sizes under the Triton interpreter (no autotuning on a CPU)")
    args = ap.parse_args(argv)
    if args.op == "loss" and args.logits == "gemm":
        ap.error("--logits applies to the logprobs and kl heads; the one-sweep head always "
                 "reads cuBLAS logits")
    if args.shape not in PRESETS:        # tuning draws uniform inputs: no peaked variants
        ap.error(f"--shape: unknown preset {args.shape!r}; one of {', '.join(sorted(PRESETS))}")
    try:
        tokens = parse_tokens(args.tokens)[0]
    except ValueError as err:
        ap.error(str(err))
    if args.cpu_smoke:
        os.environ["TRITON_INTERPRET"] = "1"
        device, (n, d, v), dtype = torch.device("cpu"), (64, 32, 500), torch.float32
    else:
        if not torch.cuda.is_available():
            ap.error("autotuning needs a CUDA GPU (use --cpu-smoke to check the script)")
        shape = PRESETS[args.shape]
        device, (n, d, v) = torch.device("cuda"), (tokens, shape.hidden, shape.vocab)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
            args.dtype]
    if n % 2 and args.op == "loss":
        ap.error(f"--op loss lays the tokens out as one pair: {n} is odd")
    inputs = _inputs(n, d, v, dtype, device)
    rows = {}
    names = [k[0] for k in kernels(args.op, args.logits)]
    modes = (("default", "0", "auto"), ("no-tma", "0", "0"), ("autotuned", "1", "auto"))
    tma_column = args.logits == "fused" and args.op != "loss"
    for mode, autotune, tma in modes:
        if mode == "no-tma" and not tma_column:
            continue
        with env_vars(TISDPO_AUTOTUNE=autotune, TISDPO_TMA=tma,
                      TISDPO_HEAD_LOGITS=args.logits):
            rows[mode] = _run(args.op, inputs, reps=args.reps, warmup=args.warmup)
            if mode == "autotuned":       # the autotuner's key depends on TISDPO_TMA
                chosen = (_chosen(args.op, inputs[0], inputs[1], args.logits)
                          if device.type == "cuda" else {k: None for k in names})
    diff = [(a.float() - b.float()).abs().max().item()
            for a, b in zip(rows["default"][2], rows["autotuned"][2])]
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (interpreter)"
    print(json.dumps({"device": gpu, "torch": torch.__version__, "op": args.op, "N": n, "D": d,
                      "V": v, "dtype": str(dtype), "logits": args.logits, "chosen": chosen,
                      "max_diff": dict(zip((OUTPUTS[args.op], "d_hidden", "d_weight"), diff))}))
    print(f"| pass | default ms | TISDPO_TMA=0 ms | autotuned ms | chosen config ({gpu}, "
          f"N={n}, D={d}, V={v}) |")
    print("|---|---|---|---|---|")
    for i, name in enumerate(("forward", "backward")):
        no_tma = f"{rows['no-tma'][i].median_ms:.3f}" if "no-tma" in rows else "—"
        kernel = names[i] if i < len(names) else None
        print(f"| {name} | {rows['default'][i].median_ms:.3f} | {no_tma} | "
              f"{rows['autotuned'][i].median_ms:.3f} | "
              f"{(chosen[kernel] or 'n/a') if kernel else 'no kernel (scales the gradients)'} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
