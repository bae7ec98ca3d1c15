"""The backend-neutral sweep of ``linear_preference_loss``, the one-sweep preference head
(docs/ONE_SWEEP.md). Both backends run it (they never import each other); each supplies a
:class:`SweepBackend`: its per-chunk step and its gradient GEMMs.

For a loss that is a sum of per-pair terms, loss = Σ_b ℓ(z_b) / norm with

    z_b = Σ_{t∈b} c_t·(lp_t − ρ·lr_t) + Σ_{t∈b} κ_t·KL_t − γ₀
    c_t = ±m_t·ω_t / N_s          κ_t = c_side·m_t·ν_t   (docs/ALGORITHMS.md §8)

the gradient reaching token t's logits is s_b·e_t, with one scalar per pair
s_b = [pair b has a token]·ℓ'(z_b) / norm and a per-token vector known in the forward:

    e_t = c_t·(onehot(y_t) − p_t) + κ'_t·G_t          (× 1 − tanh² under a softcap)

(G_t = ∂KL_t/∂z_t; κ'_t = κ_t, or 0 on the chosen side when its KL is stop-gradient). e is
linear in (c, κ'), so s_b·e_t is e_t with coefficients s_b·c_t and s_b·κ'_t.

The sweep walks chunks of at most ``chunk`` rows (``_schedule``). Pairs with at most that many
rows go whole, several to a chunk: the chunk's statistics give each of its pairs' z_b, hence
s_b, before its e is formed, so e comes out already scaled and its GEMMs add straight into
d_hidden, d_weight and d_bias — no per-pair buffer. A longer pair goes chunk by chunk: each
chunk's unscaled e·W goes into the pair's d_hidden rows and M_b = Σ_t e_tᵀ·h_t (and Σ_t e_t)
into a [V, D] float32 buffer; at the pair's last chunk s_b scales its rows and s_b·M_b is
folded into d_weight (the first such pair's buffer becomes the sum). Its coefficients go to
the backend with each chunk, so e may be formed in the pass that forms the statistics. s_b is
a device tensor: no host sync. The backward multiplies the stored gradients by the upstream
scalar, in place unless the graph is retained: no logits are recomputed and no head GEMM
runs. Memory: d_hidden, d_weight, at most one [V, D] buffer besides it (only with two or more
long pairs) and the backend's chunk buffers; nothing grows with the tokens of a pair.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from tisdpo_kernels._common import (
    chunks, first_order, kept_rows, link_loss, masked, no_autocast, stat_dtype, valid_and_safe,
)
from tisdpo_kernels.config import PairHeadOptions

__all__ = ["SweepBackend", "linear_preference_loss_fwd", "LinearPreferenceLossFunction",
           "run_sweep"]

_F64 = torch.float64
_HALF = (torch.bfloat16, torch.float16)


class SweepBackend(NamedTuple):
    """What a backend gives the sweep.

    chunk(h, weight, bias, ref_h, ref_weight, ref_bias, safe, opts, sd, want_e, coef=None) ->
    (logp [C], ref_logp [C] | None, kl [C] | None, g) for one chunk of rows: h [C, D]
    (ignored rows already zero), safe [C] the targets (0 where ignored), ``sd`` the statistics
    dtype. e [C, V] is the gradient for the coefficients c_t and κ'_t [C] in ``sd`` (0 on
    ignored rows), in the dtype the GEMMs take; it may overwrite the chunk's logits. ``g`` is
    None unless ``want_e``; e itself when ``coef`` = (c, kg) is given (coefficients known
    before the chunk's statistics: formed in the same pass); else ``grad(c, kg)`` -> e,
    called at most once.

    gemms(hidden, weight) -> an object with ``acc_dtype`` (d_weight's and d_bias's sums),
    ``e_w(e, out)``: out [C, D] (hidden's dtype) = e·W, and ``et_h(acc, e, h, dtype=None)``:
    acc + eᵀ·h in place, or a new sum when acc is None; with ``dtype``, eᵀ·h as the whole
    d_weight in that dtype (the GEMM's own output, rounded once on a GPU).
    """

    chunk: Callable
    gemms: Callable


class _Step(NamedTuple):
    """One chunk: rows ``order[lo:hi]`` of the sweep order, the host ranges ``ranges`` (the
    same rows, adjacent ones merged), its pair segments ``seg_pair[segs]`` with their offsets
    in the chunk ``bounds[offs]`` (0, …, its row count);
    ``pair`` is the long pair it is a chunk of (−1: whole pairs), ``last`` its last chunk."""

    lo: int
    hi: int
    ranges: tuple
    segs: slice
    offs: slice
    pair: int
    last: bool


def _schedule(pair_rows, chunk: int):
    """(steps, order [M], side [M], bounds, seg_pair) on the host: the long pairs (more than
    ``chunk`` rows) first, each range in balanced chunks; then the other pairs whole, in
    order, packed into chunks of at most ``chunk`` rows. ``order`` lists the rows in sweep
    order, ``side`` is 2·b + (0 chosen, 1 rejected) for each; rows in no pair are in neither.
    Within a step each pair's rows are consecutive, a segment: ``seg_pair`` lists the
    segments' pairs, ``bounds`` each step's segment offsets (0, …, its row count)."""
    steps, spans, bounds, seg_pair = [], [], [], []     # spans: (first row, rows, tag)
    total = 0

    def add(parts, pair, last):
        nonlocal total
        lo, seg_lo, off_lo, ranges = total, len(seg_pair), len(bounds), []
        bounds.append(0)
        for i, ((a, b), tag) in enumerate(parts):
            spans.append((a, b - a, tag))
            total += b - a
            if ranges and ranges[-1][1] == a:        # adjacent rows: one range, taken as a view
                ranges[-1] = (ranges[-1][0], b)
            else:
                ranges.append((a, b))
            if i + 1 == len(parts) or parts[i + 1][1] // 2 != tag // 2:
                bounds.append(total - lo)
                seg_pair.append(tag // 2)
        steps.append(_Step(lo, total, tuple(ranges), slice(seg_lo, len(seg_pair)),
                           slice(off_lo, len(bounds)), pair, last))

    short, group, size = [], [], 0
    for b, pair in enumerate(pair_rows):
        parts = [(r, 2 * b + k) for k, ranges in enumerate(pair) for r in ranges if r[1] > r[0]]
        rows = sum(r[1] - r[0] for r, _ in parts)
        if rows > chunk:
            pieces = [((a + lo, a + hi), tag) for (a, e), tag in parts
                      for lo, hi in chunks(e - a, chunk)]
            for i, piece in enumerate(pieces):
                add([piece], b, i == len(pieces) - 1)
        elif rows:
            short.append((parts, rows))
    for parts, rows in short:
        if size + rows > chunk:
            add(group, -1, True)
            group, size = [], 0
        group.extend(parts)
        size += rows
    if group:
        add(group, -1, True)
    # rows from the spans with tensor ops: no Python object per row
    first, length, tag = torch.tensor(spans, dtype=torch.long).view(-1, 3).unbind(1)
    shift = first - (length.cumsum(0) - length)      # row = its position + its span's shift
    order = torch.arange(total) + torch.repeat_interleave(shift, length, output_size=total)
    side = torch.repeat_interleave(tag, length, output_size=total)
    return steps, order, side, *(torch.tensor(x, dtype=torch.long) for x in (bounds, seg_pair))


def _scale_rows_(t: torch.Tensor, s: torch.Tensor, chunk: int) -> None:
    """t *= s (a 0-d device tensor) in place, in float32 for 16-bit t, chunk rows at a time."""
    if t.dtype in _HALF:
        for a, b in chunks(t.shape[0], chunk):
            r = t[a:b]
            r.copy_(r.float().mul_(s.float()))
    else:
        t.mul_(s.to(t.dtype))


class _Grads:
    """d_hidden [N, D], and the d_weight / d_bias sums, from the chunks' e."""

    def __init__(self, gemms, hidden, weight, bias, needs, chunk, single: bool):
        self.g = gemms(hidden, weight)
        self.weight, self.bias, self.chunk = weight, bias, chunk
        self.single = single              # one chunk of whole pairs: no float32 sum needed
        self.dh = (torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device)
                   if needs[0] else None)
        self.want_w, self.want_b = needs[1], needs[2] and bias is not None
        self.dw = self.db = None          # the sums
        self.mw = self.mb = None          # the current long pair's M_b and Σ e

    def _sums(self, w, b, e, h):
        if self.want_w:
            w = self.g.et_h(w, e, h, self.weight.dtype if self.single else None)
        if self.want_b:
            part = e.sum(0, dtype=self.g.acc_dtype)
            b = part if b is None else b.add_(part)
        return w, b

    def add(self, step: _Step, rows, h, e):
        """A chunk of whole pairs, e already scaled by each row's s_b."""
        if self.dh is not None:
            if rows is None:
                a, b = step.ranges[0]
                self.g.e_w(e, self.dh[a:b])
            else:
                out = torch.empty((e.shape[0], self.dh.shape[1]), dtype=self.dh.dtype,
                                  device=e.device)
                self.dh.index_copy_(0, rows, self.g.e_w(e, out))
        self.dw, self.db = self._sums(self.dw, self.db, e, h)

    def add_unscaled(self, step: _Step, h, e):
        """A chunk (one range) of a long pair, e not yet scaled."""
        if self.dh is not None:
            a, b = step.ranges[0]
            self.g.e_w(e, self.dh[a:b])
        self.mw, self.mb = self._sums(self.mw, self.mb, e, h)

    def close(self, ranges, s):
        """Scale the long pair's d_hidden rows by s and fold s·M_b into d_weight (s·Σe into
        d_bias)."""
        if self.dh is not None:
            for a, b in ranges:
                _scale_rows_(self.dh[a:b], s, self.chunk)
        for total, m in (("dw", "mw"), ("db", "mb")):
            part = getattr(self, m)
            if part is None:
                continue
            acc = getattr(self, total)
            setattr(self, total, part.mul_(s.to(part.dtype)) if acc is None
                    else acc.addcmul_(part, s.to(part.dtype)))
            setattr(self, m, None)

    def finish(self, uncovered):
        """(d_hidden, d_weight, d_bias), None where not wanted; rows in no pair get 0."""
        dh = self.dh
        if dh is not None:
            for a, b in uncovered:
                dh[a:b] = 0
        dw = db = None
        if self.want_w:
            dw = (self.dw.to(self.weight.dtype) if self.dw is not None
                  else torch.zeros_like(self.weight))
        if self.want_b:
            db = (self.db.to(self.bias.dtype) if self.db is not None
                  else torch.zeros_like(self.bias))
        return dh, dw, db


def _uncovered(pair_rows, n):
    """Row ranges of [0, n) in no pair (host ints)."""
    covered = sorted(r for pair in pair_rows for side in pair for r in side if r[1] > r[0])
    out, pos = [], 0
    for a, b in covered:
        if a > pos:
            out.append((pos, a))
        pos = max(pos, b)
    return out + ([(pos, n)] if pos < n else [])


def _link_grad(z, cfg):
    """ℓ'(z) elementwise, through the same ``link_loss`` the recompute path differentiates.

    Its small graph keeps its tensors to itself: a caller's saved-tensor hooks (those of
    ``torch.utils.checkpoint``, which would rerun the whole checkpointed region to answer
    them, or ``save_on_cpu``) do not see it."""
    zz = z.detach().requires_grad_(True)
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(_itself, _itself):
        loss = link_loss(zz, cfg).sum()
    (g,) = torch.autograd.grad(loss, zz)
    return g


def _itself(t):
    return t


class _Rows:
    """Per-row coefficients of the sweep, in sweep order (float64): c_t, κ_t and κ'_t, the
    pair of each row, and s(z) = [pair counts]·ℓ'(z)/norm for all pairs at once."""

    def __init__(self, cfg, valid, weights, order, side, num_pairs, normalizer, dev):
        self.cfg = cfg
        v = valid.index_select(0, order)
        w64 = v.to(_F64) if weights is None else torch.where(
            v, weights.index_select(0, order).to(_F64), 0.0)
        nu64 = w64 if (cfg.kl_token_weighted and weights is not None) else v.to(_F64)
        counts = torch.zeros(2 * num_pairs, dtype=torch.long, device=dev).index_add_(
            0, side, v.long())
        self.pair_valid = counts.view(num_pairs, 2).sum(1) > 0
        self.norm = (normalizer if normalizer is not None
                     else self.pair_valid.sum().clamp(min=1).to(_F64))
        rejected = (side % 2).bool()
        inv_n = (1.0 / counts.clamp(min=1).to(_F64))[side] if cfg.reduction == "mean" else 1.0
        self.valid, self.pair = v, side // 2
        self.c = torch.where(rejected, -w64, w64) * inv_n                      # ∂z/∂lp_t
        self.kz = torch.where(rejected, nu64 * cfg.kl_rejected_coef, nu64 * cfg.kl_chosen_coef)
        self.kg = (self.kz if not cfg.kl_stop_grad_chosen
                   else torch.where(rejected, self.kz, 0.0))                  # κ'_t

    def s(self, z):
        """s_b for every pair, from the current z [P] (meaningful for finished pairs)."""
        return torch.where(self.pair_valid, _link_grad(z, self.cfg), 0.0) / self.norm


def _take(t, st: _Step, rows):
    """The step's rows of t: a view for one range, else a gather (``rows`` on the device)."""
    if rows is None:
        a, b = st.ranges[0]
        return t[a:b]
    return t.index_select(0, rows)


def _put(t, x, st: _Step, rows):
    """t[the step's rows] = x."""
    if rows is None:
        a, b = st.ranges[0]
        t[a:b] = x
    else:
        t.index_copy_(0, rows, x)


def linear_preference_loss_fwd(backend: SweepBackend, hidden, weight, targets, bias, ref_hidden,
                               ref_weight, ref_bias, ref_logp, weights, normalizer,
                               opts: PairHeadOptions, chunk):
    """(loss, logp, ref_logp, kl, (d_hidden, d_weight, d_bias)) in one sweep over the pairs.

    Per-token outputs [N] are 0 where ignored or in no pair; ref_logp is None without a
    reference, kl None without KL terms; gradients are None where not wanted."""
    cfg = opts.config
    n, dev = hidden.shape[0], hidden.device
    sd = stat_dtype(hidden.dtype)
    valid, safe = valid_and_safe(targets, opts.ignore_index)
    steps, *meta = _schedule(opts.pair_rows, chunk)
    if dev.type != "cpu":                        # one small host-to-device copy
        sizes = [t.numel() for t in meta]        # (asynchronous from pinned memory on CUDA)
        cuda = dev.type == "cuda"
        host = torch.cat(meta)
        meta = (host.pin_memory() if cuda else host).to(dev, non_blocking=cuda).split(sizes)
    order, side, bounds, seg_pair = meta
    num_pairs = len(opts.pair_rows)
    rows_ = _Rows(cfg, valid, weights, order, side, num_pairs, normalizer, dev)
    logp = torch.zeros(n, dtype=sd, device=dev)
    kl = torch.zeros(n, dtype=sd, device=dev) if cfg.uses_kl else None
    ref_out = None if ref_hidden is None and ref_logp is None else \
        torch.zeros(n, dtype=sd, device=dev)
    if ref_hidden is None and ref_logp is not None:     # given: kept on the pairs' rows only
        ref_out.index_copy_(0, order, torch.where(valid, ref_logp.to(sd), 0.0)[order])
    use_ref = ref_out is not None and not cfg.reference_free
    want_e = any(opts.needs)
    grads = _Grads(backend.gemms, hidden, weight, bias, opts.needs, chunk,
                   single=len(steps) == 1 and steps[0].pair < 0)
    z = torch.full((num_pairs,), -cfg.margin, dtype=_F64, device=dev)
    with no_autocast(dev):
        for st in steps:
            sl = slice(st.lo, st.hi)
            rows = None if len(st.ranges) == 1 else order[sl]
            v = rows_.valid[sl]
            h = kept_rows(_take(hidden, st, rows), v)
            ref_h = None if ref_hidden is None else kept_rows(_take(ref_hidden, st, rows), v)
            # a long pair's coefficients are known now (s_b scales its sums later)
            coef = None if st.pair < 0 or not want_e else (rows_.c[sl].to(sd),
                                                           rows_.kg[sl].to(sd))
            lp_c, lr_c, kl_c, g = backend.chunk(h, weight, bias, ref_h, ref_weight, ref_bias,
                                                _take(safe, st, rows), opts, sd, want_e, coef)
            lp_c = masked(lp_c, v)
            _put(logp, lp_c, st, rows)
            delta = lp_c.to(_F64)
            if lr_c is not None:
                lr_c = masked(lr_c, v)
                _put(ref_out, lr_c, st, rows)
            elif use_ref:
                lr_c = _take(ref_out, st, rows)
            if use_ref:
                delta = delta - lr_c.to(_F64)
            r = rows_.c[sl] * delta
            if kl_c is not None:
                kl_c = masked(kl_c, v)
                _put(kl, kl_c, st, rows)
                r = r + rows_.kz[sl] * kl_c.to(_F64)
            # per pair segment, each summed in a fixed order (CUB's segmented reduction on
            # CUDA): the same bits on every run; each pair once, so index_add_ adds no two.
            # unsafe: skip the offsets' validation, a host sync (they are right by construction)
            seg = torch.segment_reduce(r, "sum", offsets=bounds[st.offs], unsafe=True)
            z.index_add_(0, seg_pair[st.segs], seg)
            if g is None:
                continue
            if st.pair < 0:                      # whole pairs: e scaled by each row's s_b
                s_row = rows_.s(z).index_select(0, rows_.pair[sl])
                e = g((rows_.c[sl] * s_row).to(sd), (rows_.kg[sl] * s_row).to(sd))
                grads.add(st, rows, h, e)
            else:
                e = g
                grads.add_unscaled(st, h, e)
                if st.last:
                    b = st.pair
                    grads.close([x for side in opts.pair_rows[b] for x in side], rows_.s(z)[b])
            del e, g
    total = torch.where(rows_.pair_valid, link_loss(z, cfg), 0.0).sum()
    dgrads = grads.finish(_uncovered(opts.pair_rows, n)) if want_e else (None,) * 3
    return (total / rows_.norm).to(sd), logp, ref_out, kl, dgrads


def _graph_is_kept() -> bool:
    """Whether the running backward keeps the graph (``retain_graph=True``); True when this
    torch cannot tell, so that stored gradients are then never scaled in place."""
    kept = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return True if kept is None else bool(kept())


class LinearPreferenceLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, backend: SweepBackend, hidden, weight, bias, targets, ref_hidden, ref_weight,
                ref_bias, ref_logp, weights, normalizer, opts: PairHeadOptions, chunk: int):
        loss, logp, ref_out, kl, grads = linear_preference_loss_fwd(
            backend, hidden, weight, targets, bias, ref_hidden, ref_weight, ref_bias, ref_logp,
            weights, normalizer, opts, chunk)
        ctx.save_for_backward(*grads)
        ctx.chunk = chunk
        ctx.mark_non_differentiable(*(t for t in (logp, ref_out, kl) if t is not None))
        return loss, logp, ref_out, kl

    @staticmethod
    @first_order("linear_preference_loss")
    def backward(ctx, g_loss, *_):
        # The stored gradients are scaled in place and handed to autograd, which frees the
        # saved references before passing them on: no second d_weight-sized tensor at the
        # start of the model's backward. A graph kept for another backward gets copies.
        keep = _graph_is_kept()

        def scaled(t):
            if t is None:
                return None
            out = t.clone() if keep else t
            _scale_rows_(out, g_loss.to(stat_dtype(t.dtype)), ctx.chunk)
            return out

        dh, dw, db = ctx.saved_tensors
        return (None, scaled(dh), scaled(dw), scaled(db)) + (None,) * 9


def run_sweep(backend: SweepBackend, hidden, weight, targets, bias, ref_hidden, ref_weight,
              ref_bias, ref_logp, weights, normalizer, opts: PairHeadOptions, chunk: int):
    """(loss, logp, ref_logp, kl) of the sweep with ``backend``'s chunks; the loss is
    differentiable in hidden, weight and bias (the backward only scales the stored gradients).
    """
    return LinearPreferenceLossFunction.apply(
        backend, hidden, weight, bias, targets, ref_hidden, ref_weight, ref_bias, ref_logp,
        weights, normalizer, opts, chunk)
