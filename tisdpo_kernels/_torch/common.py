"""Math shared by the torch backend's LM-head ops (``linear_logprobs``, ``linear_token_kl``).

Both ops walk the tokens in chunks of C rows. A chunk's logits [C, V] are formed, reduced to
per-token statistics and dropped, so no pass holds more than C × V logits (plus that chunk's
gradient). The backward recomputes each chunk's logits from the saved inputs, turns them
into the per-logit gradient dz [C, V] and hands it to :class:`HeadGrads`, which pushes it
into d_hidden (per chunk), d_weight and d_bias (float32 sums across chunks).

Dtype convention (the reference's): logits are formed in the input dtype, as an eager
``hidden @ weight.T + bias`` would, then upcast to the statistics dtype (float32; float64
for float64 inputs) before the softcap and every softmax statistic.
"""
from __future__ import annotations

import torch

from tisdpo_kernels._common import (  # the chunk helpers are shared with the Triton backend
    addmm_f32_, chunk_size, chunks, kept_rows, masked, no_autocast, stat_dtype,
    valid_and_safe,
)

__all__ = ["chunk_size", "chunks", "no_autocast", "chunk_logits", "softcap_grad_factor",
           "logsumexp", "log_softmax_stats_", "log_softmax_", "valid_and_safe", "masked",
           "kept_rows", "stat_dtype", "HeadGrads"]


def chunk_logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 softcap: float | None) -> torch.Tensor:
    """softcap(h @ weight.T + bias) for one chunk h [C, D], in the statistics dtype [C, V].

    The returned tensor is freshly allocated: callers may overwrite it in place.
    """
    z = h @ weight.T
    if bias is not None:
        z = z + bias
    z = z.to(stat_dtype(h.dtype))
    if softcap is not None:
        z = z.div_(softcap).tanh_().mul_(softcap)
    return z


def softcap_grad_factor(z: torch.Tensor, softcap: float | None) -> torch.Tensor | None:
    """d softcap(x) / dx = 1 − tanh², recovered from the capped logits z = softcap·tanh(·).

    Returns None without a softcap. Call it before overwriting ``z``.
    """
    if softcap is None:
        return None
    t = z / softcap
    return t.mul_(t).neg_().add_(1.0)


def logsumexp(z: torch.Tensor) -> torch.Tensor:
    """torch.logsumexp(z, 1) for finite z [C, V] (same ops, same values) with one [C, V]
    temporary instead of two."""
    m = z.amax(dim=1)
    return (z - m.unsqueeze(1)).exp_().sum(1).log_().add_(m)


def log_softmax_stats_(z: torch.Tensor):
    """Turn z [C, V] into its log-softmax in place; return it with the row max m and the
    log-sum s [C] (lse = m + s) that :func:`log_softmax_` needs to redo it exactly.

    Computed as (z − m) − s, as torch.log_softmax does: subtracting a rounded m + s instead
    loses ~eps·|lse| per log-probability. Finite where probabilities underflow.
    """
    m = z.amax(dim=1)
    z = z.sub_(m.unsqueeze(1))
    s = z.exp().sum(1).log_()
    return z.sub_(s.unsqueeze(1)), m, s


def log_softmax_(z: torch.Tensor, m: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """(z − m) − s per row, in place, with m and s from :func:`log_softmax_stats_`."""
    return z.sub_(m.unsqueeze(1)).sub_(s.unsqueeze(1))


# A chunk thinner than this may go through BLAS matrix-vector code, which sums d_hidden's
# V-long reduction sequentially; in full precision it is then summed in V-blocks instead.
_THIN_ROWS = 16
_DH_BLOCK_V = 1024


class HeadGrads:
    """Accumulates the head's input gradients from per-chunk logit gradients dz [C, V].

    Only the gradients asked for get work. d_hidden is written per chunk in the input dtype
    (dz cast to it, as eager autograd does); d_weight and d_bias are summed over chunks in
    the statistics dtype and cast to the parameter dtype once, in :meth:`finish`. On a GPU with
    16-bit inputs the d_weight GEMM takes 16-bit operands (tensor cores) and accumulates in
    fp32 (``_common.addmm_f32_``); d_hidden's GEMM already runs in the input dtype.
    """

    def __init__(self, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 needs_hidden: bool, needs_weight: bool, needs_bias: bool):
        sd = stat_dtype(hidden.dtype)
        dev = hidden.device
        self.weight, self.bias = weight, bias
        self.dh = (torch.empty(hidden.shape, dtype=hidden.dtype, device=dev)
                   if needs_hidden else None)
        self.dw = torch.zeros(weight.shape, dtype=sd, device=dev) if needs_weight else None
        self.db = (torch.zeros(bias.shape, dtype=sd, device=dev)
                   if (needs_bias and bias is not None) else None)

    def add(self, start: int, end: int, h: torch.Tensor, dz: torch.Tensor,
            cols: torch.Tensor | None = None) -> None:
        """Add chunk rows [start, end): h [C, D] its hidden states, dz [C, V] d loss / d logits
        before the bias (the softcap factor already applied). ``cols`` [K]: only these
        vocabulary columns of dz enter the GEMMs (a filtered backward); None: all."""
        w = self.weight if cols is None else self.weight.index_select(0, cols)
        if cols is not None:
            dz = dz.index_select(1, cols)
        if self.dh is not None:
            self.matmul_dh(self.dh[start:end], dz.to(w.dtype), w)
        if self.dw is not None:
            dw = self.dw if cols is None else torch.zeros(
                (cols.numel(), h.shape[1]), dtype=self.dw.dtype, device=h.device)
            if h.is_cuda and h.dtype in (torch.bfloat16, torch.float16):
                # dz rounded to the input dtype, as eager autograd rounds it: a tensor-core
                # GEMM with fp32 accumulation into the fp32 sum (not an fp32 GEMM)
                addmm_f32_(dw, dz.T.to(h.dtype), h)
            else:
                dw.addmm_(dz.T, h.to(dw.dtype))
            if cols is not None:
                self.dw.index_add_(0, cols, dw)     # distinct columns: one add per element
        if self.db is not None:
            if cols is None:
                self.db.add_(dz.sum(0))
            else:
                self.db.index_add_(0, cols, dz.sum(0))

    @staticmethod
    def matmul_dh(out: torch.Tensor, dz: torch.Tensor, weight: torch.Tensor) -> None:
        """out = dz @ weight; a thin full-precision chunk sums V-blocks of the product."""
        v = weight.shape[0]
        if dz.shape[0] >= _THIN_ROWS or v <= _DH_BLOCK_V or dz.dtype != stat_dtype(dz.dtype):
            torch.matmul(dz, weight, out=out)
            return
        torch.matmul(dz[:, :_DH_BLOCK_V], weight[:_DH_BLOCK_V], out=out)
        for s in range(_DH_BLOCK_V, v, _DH_BLOCK_V):
            out.add_(dz[:, s:s + _DH_BLOCK_V] @ weight[s:s + _DH_BLOCK_V])

    def finish(self):
        """(d_hidden, d_weight, d_bias), each None when not asked for."""
        dw = None if self.dw is None else self.dw.to(self.weight.dtype)
        db = None if self.db is None else self.db.to(self.bias.dtype)
        return self.dh, dw, db
