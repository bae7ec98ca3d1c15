"""What opt-in gradient filtering (``filter_eps``) costs in accuracy and saves in GEMM work.

On peaked logits (``benchmarks.ops`` peaked inputs: a Zipf prior like a trained model's), per
(V, rows per chunk, ε): the share of vocabulary columns the filtered backward keeps (its
d_hidden / d_weight GEMMs shrink by that factor), the largest probability mass a row loses,
and the errors of d_hidden and d_weight against float64 truth — relative Frobenius error
‖Δ‖/‖g‖ and the largest element error over the largest element |g|. The unfiltered fp32
row (ε = none) gives the rounding floor for comparison. Runs on the CPU (the errors do not
depend on the device; the time saved does, and is not measured here).

    python -m benchmarks.filtering --vocab 32000,128256 --tokens 2048 --hidden 128
"""
from __future__ import annotations

import argparse
import math

import torch

from benchmarks.ops import _peaked

EPS = (None, 2.0 ** -14, 2.0 ** -12, 2.0 ** -10, 2.0 ** -8)


def _grads(h, w, y, g, *, eps, chunk):
    from tisdpo_kernels._torch.linear_logprobs import linear_logprobs
    from tisdpo_kernels.config import HeadOptions

    hh, ww = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    logp, _ = linear_logprobs(hh, ww, y, None, HeadOptions(filter_eps=eps), chunk_tokens=chunk)
    logp.backward(g)
    return hh.grad, ww.grad


def _kept(h, w, y, eps, chunk):
    """(share of columns kept, averaged over chunks; largest probability mass a row loses)."""
    from tisdpo_kernels._common import chunks, kept_columns

    shares, lost = [], 0.0
    with torch.no_grad():
        for s, e in chunks(h.shape[0], chunk):          # the torch backend's chunk bounds
            p = torch.softmax(h[s:e].double() @ w.double().T, -1)
            cols = kept_columns(p.amax(0), y[s:e], torch.ones_like(y[s:e], dtype=torch.bool),
                                eps)                    # the backends' rule, in float64 here
            if cols is None:                            # the chunk runs unfiltered
                shares.append(1.0)
                continue
            keep = torch.zeros(p.shape[1], dtype=torch.bool).index_fill_(0, cols, True)
            shares.append(keep.double().mean().item())
            lost = max(lost, (p * ~keep).sum(1).max().item())
    return sum(shares) / len(shares), lost


def _errors(got, truth):
    d = (got.double() - truth).abs()
    return (d.norm() / truth.norm()).item(), (d.max() / truth.abs().max()).item()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.filtering",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--vocab", default="32000,128256")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--chunks", default="512,2048", help="rows per filtering chunk")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    print(f"# peaked logits, fp32 inputs, N={args.tokens}, D={args.hidden}, torch "
          f"{torch.__version__}, CPU")
    print("| V | rows per chunk | ε | columns kept | max mass lost per row | "
          "d_hidden rel. error (Frobenius / max) | d_weight rel. error (Frobenius / max) |")
    print("|---|---|---|---|---|---|---|")
    for v in (int(x) for x in args.vocab.split(",")):
        g = torch.Generator().manual_seed(args.seed)
        h, w, y = _peaked(args.tokens, args.hidden, v, "cpu", torch.float32, g)
        up = torch.randn(args.tokens, generator=g)
        truth = _grads(h.double(), w.double(), y, up.double(), eps=None, chunk=512)
        for chunk in (int(x) for x in args.chunks.split(",")):
            for eps in EPS:
                dh, dw = _grads(h, w, y, up, eps=eps, chunk=chunk)
                (fh, mh), (fw, mw) = _errors(dh, truth[0]), _errors(dw, truth[1])
                share, lost = (1.0, 0.0) if eps is None else _kept(h, w, y, eps, chunk)
                name = "none" if eps is None else f"2^{round(math.log2(eps))}"
                print(f"| {v} | {chunk} | {name} | {100 * share:.1f}% | {lost:.1e} | "
                      f"{fh:.1e} / {mh:.1e} | {fw:.1e} / {mw:.1e} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
