"""``python -m benchmarks``: time our fused head ops and the peers' side by side.

Examples (GPU)::

    python -m benchmarks --op logprobs,loss,kl --shapes llama3-8b,gemma2-2b --plot
    python -m benchmarks --op logprobs --mode fwdbwd --tokens 8k --providers ours-triton,cce

CPU smoke (toy sizes; results go to a CPU file, never mixed with GPU numbers)::

    python -m benchmarks --shapes toy --providers ours-torch,eager --reps 3 --warmup 1
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from benchmarks import providers as P
from benchmarks import results as R
from benchmarks.runner import DTYPES, MODES, RunConfig, run
from benchmarks.shapes import PRESETS, HeadShape, parse_tokens


def _csv_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="providers: " + "; ".join(f"{p.name}: {p.description}"
                                         for p in P.PROVIDERS.values()))
    ap.add_argument("--op", default="logprobs,loss,kl",
                    help=f"comma list of ops: {', '.join(P.OPS)} (default: all)")
    ap.add_argument("--mode", default="fwd,bwd,fwdbwd",
                    help=f"comma list of modes: {', '.join(MODES)} (default: all)")
    ap.add_argument("--shapes", default=None,
                    help=f"comma list of presets: {', '.join(PRESETS)} (default: llama3-8b on "
                         f"CUDA, toy on CPU)")
    ap.add_argument("--tokens", default=None,
                    help="comma list of token counts N, e.g. 4k,8k,16k (default: the preset's)")
    ap.add_argument("--providers", default="all",
                    help=f"comma list or 'all': {', '.join(P.PROVIDERS)}")
    ap.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    ap.add_argument("--reps", type=int, default=20, help="timed repetitions (default 20)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed calls first (default 5)")
    ap.add_argument("--pairs", type=int, default=1,
                    help="loss op: pairs B; hidden is [2B, N/2B, D] (default 1)")
    ap.add_argument("--beta", type=float, default=0.1, help="loss op: β (default 0.1)")
    ap.add_argument("--reference", default="online", choices=("online", "precomputed"),
                    help="loss op: an online reference head (default), or precomputed "
                         "reference log-probs, as an offline pass gives them (Liger's DPO "
                         "loss cannot take them and runs reference-free)")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    ap.add_argument("--out", default=None,
                    help="results CSV to append to (default benchmarks/results/<device>.csv; "
                         "'-' to write none)")
    ap.add_argument("--plot", action="store_true",
                    help="write PNG plots of time and peak memory vs tokens next to --out")
    ap.add_argument("--no-check", dest="check", action="store_false",
                    help="skip the error check against the fp32 reference")
    ap.add_argument("--no-ceiling", dest="ceiling", action="store_false",
                    help="skip the dense matmul ceiling")
    ap.add_argument("--interpret", action="store_true",
                    help="CPU only: run the providers on our Triton kernels (ours-triton, "
                         "ours-filtered, ours-no-tma, ours-gemm) under the Triton interpreter "
                         "(sets TRITON_INTERPRET=1 before any kernel is imported)")
    ap.add_argument("--seed", type=int, default=0)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    argv = sys.argv[1:] if argv is None else list(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    if args.interpret:
        if device.type == "cuda":
            print("error: --interpret is for CPU runs only", file=sys.stderr)
            return 2
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        shapes = [HeadShape.from_name(n) for n in _csv_list(
            args.shapes or ("llama3-8b" if device.type == "cuda" else "toy"))]
        cfg = RunConfig(
            ops=_csv_list(args.op), modes=_csv_list(args.mode), shapes=shapes,
            providers=P.resolve_providers(args.providers), device=device, dtype=args.dtype,
            tokens=parse_tokens(args.tokens) if args.tokens else None, reps=args.reps,
            warmup=args.warmup, pairs=args.pairs, beta=args.beta,
            reference=args.reference, check=args.check,
            ceiling=args.ceiling, seed=args.seed)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if device.type != "cuda":
        print("note: no CUDA device — CPU timings of toy sizes are a smoke test, not "
              "performance numbers", file=sys.stderr)
    env = R.environment(device, argv)
    out = None
    if args.out != "-":
        stem = R.device_slug(env["device"]) if device.type == "cuda" else "cpu"
        out = Path(args.out) if args.out else R.RESULTS_DIR / f"{stem}.csv"
    try:
        rows = run(cfg, env, on_rows=(lambda rs: R.append_csv(rs, out)) if out else None)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(R.format_table(rows))
    for name, op, why in cfg.skipped:
        print(f"skipped {name} ({op}): {why}")
    if out:
        print(f"rows appended to {out}")
        if args.plot:
            from benchmarks.plot import plot_rows
            for png in plot_rows(rows, out.parent / "plots"):
                print(f"plot: {png}")
    elif args.plot:
        print("note: --plot needs a results file (--out other than '-')", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
