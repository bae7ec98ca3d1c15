"""What is benchmarked: synthetic inputs, one callable per (op, provider), the fp32 check.

Ops (``N`` tokens, head ``D``×``V``):

- ``logprobs``: per-token log p(target) from hidden [N, D] and weight [V, D]; backward from
  a random per-token upstream gradient (as a weighted loss sends).
- ``loss``: the full preference-loss step: policy head fwd+bwd, reference head fwd (online,
  ``ref_hidden``/``ref_weight``; with ``reference="precomputed"`` the reference log-probs
  are given instead, as an offline pass makes them: the fp32 reference head's), per-token
  weights, reduction to the TIS-DPO loss; hidden laid out [2B, T, D] with B = ``pairs``
  (chosen rows first), T = N / 2B.
- ``kl``: the fused token KL(π‖ref) and logp, backward from random upstream gradients.
- ``ceiling``: the dense [N, D]×[D, V] matmul in the run's dtype (row blocks of 8192 into one
  output buffer, so it fits at any N): the rate a head op is measured against.

Inputs are synthetic and seeded: hidden ~ N(0, 1), weight scaled for logits of standard
deviation 2, uniform random targets (none ignored, so every op does the counted work), the
reference head a perturbed copy of the policy head, weights ~ U(0.7, 1.3).

``peaked`` shapes (``<preset>-peaked``) shape the logits like a trained model's: on top of the
same noise, a Zipf-like prior over the vocabulary, −1.5·ln(1 + v) for token id v (ids of BPE
vocabularies roughly follow frequency), carried by a constant hidden feature; the targets are
drawn from that prior. The softmax mass then sits on few, clustered columns, which is what
gradient filtering (Cut Cross-Entropy's, or any) exploits; uniform logits give it nothing.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from benchmarks import providers as P
from benchmarks.shapes import HeadShape

__all__ = ["Case", "Inputs", "Workload", "make_inputs", "build_workload", "ceiling_call",
           "reference_errors"]

LOGIT_STD = 2.0
REFERENCES = ("online", "precomputed")
ZIPF = 1.5             # peaked logits: prior −ZIPF·ln(1 + v)
CEILING_ROWS = 8192


@dataclass(frozen=True)
class Case:
    op: str
    shape: HeadShape
    tokens: int
    dtype: torch.dtype
    device: torch.device
    pairs: int = 1
    beta: float = 0.1
    seed: int = 0
    reference: str = "online"      # loss op: "online" head or "precomputed" log-probs

    def __post_init__(self):
        if self.op not in P.OPS:
            raise ValueError(f"op must be one of {P.OPS}, got {self.op!r}")
        if self.reference not in REFERENCES:
            raise ValueError(f"reference must be one of {REFERENCES}, got {self.reference!r}")
        if self.op == "loss" and self.tokens % (2 * self.pairs):
            raise ValueError(f"loss op: tokens={self.tokens} must be a multiple of 2·pairs="
                             f"{2 * self.pairs}")

    @property
    def rows(self) -> int:
        return 2 * self.pairs

    @property
    def seq(self) -> int:
        return self.tokens // self.rows


@dataclass
class Inputs:
    hidden: torch.Tensor          # [N, D], requires grad
    weight: torch.Tensor          # [V, D], requires grad
    targets: torch.Tensor         # [N] int64
    grads: tuple[torch.Tensor, ...]   # upstream gradients of the per-token outputs
    ref_hidden: torch.Tensor | None = None
    ref_weight: torch.Tensor | None = None
    ref_logps: torch.Tensor | None = None   # [N] float32: the loss op's precomputed reference
    weights: torch.Tensor | None = None
    truth: dict = field(default_factory=dict)   # cached fp32 references


def make_inputs(case: Case) -> Inputs:
    n, d, v = case.tokens, case.shape.hidden, case.shape.vocab
    dev, dt = case.device, case.dtype
    g = torch.Generator(device=dev).manual_seed(case.seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=dev) * scale).to(dt)

    if case.shape.logits == "peaked" and d > 1:
        hidden, weight, targets = _peaked(n, d, v, dev, dt, g)
    else:
        hidden = randn(n, d).requires_grad_()
        weight = randn(v, d, scale=LOGIT_STD / d ** 0.5).requires_grad_()
        targets = torch.randint(0, v, (n,), generator=g, device=dev)
    inp = Inputs(hidden, weight, targets, grads=())
    if case.op in ("loss", "kl"):
        inp.ref_hidden = (hidden.detach().float() + randn(n, d, scale=0.1).float()).to(dt)
        inp.ref_weight = (weight.detach().float()
                          + randn(v, d, scale=0.1 * LOGIT_STD / d ** 0.5).float()).to(dt)
    if case.op == "loss":
        inp.weights = 0.7 + 0.6 * torch.rand(case.rows, case.seq, generator=g, device=dev)
        if case.reference == "precomputed":    # the reference head's, then the head is gone
            inp.ref_logps = _fp32(lambda: _truth_head(inp, case.shape.softcap, None,
                                                      ref=True)["logp"])
            inp.ref_hidden = inp.ref_weight = None
    elif case.op == "logprobs":
        inp.grads = (torch.randn(n, generator=g, device=dev),)
    else:
        inp.grads = tuple(torch.randn(n, generator=g, device=dev) for _ in range(2))
    return inp


def _peaked(n, d, v, dev, dt, g):
    """(hidden, weight, targets) of a peaked case: noise of std LOGIT_STD in D−1 features, the
    Zipf prior on a constant feature 0, targets drawn from the prior."""
    hidden = torch.randn(n, d, generator=g, device=dev)
    hidden[:, 0] = 1.0
    weight = torch.randn(v, d, generator=g, device=dev) * (LOGIT_STD / (d - 1) ** 0.5)
    prior = -ZIPF * torch.log1p(torch.arange(v, device=dev, dtype=torch.float32))
    weight[:, 0] = prior
    targets = torch.multinomial(torch.softmax(prior, 0), n, replacement=True, generator=g)
    return (hidden.to(dt).requires_grad_(), weight.to(dt).requires_grad_(), targets)


@dataclass
class Workload:
    """``call()`` runs the forward and returns its raw outputs; ``backward(outs)`` runs the
    backward from them with the op's upstream gradients."""

    call: Callable[[], tuple]
    backward: Callable[[tuple], None]
    leaves: tuple[torch.Tensor, ...]
    names: tuple[str, ...]


def build_workload(case: Case, inp: Inputs, provider: str) -> Workload:
    softcap = case.shape.softcap
    h, w, t = inp.hidden, inp.weight, inp.targets
    if case.op == "logprobs":
        fn = P.make_logprobs(provider, softcap)
        (g,) = inp.grads
        return Workload(lambda: (fn(h, w, t),),
                        lambda outs: outs[0].backward(g),
                        (h, w), ("logp",))
    if case.op == "kl":
        fn = P.make_kl(provider, softcap)
        return Workload(lambda: fn(h, w, inp.ref_hidden, inp.ref_weight, t),
                        lambda outs: torch.autograd.backward(list(outs), list(inp.grads)),
                        (h, w), ("kl", "logp"))
    fn = P.make_loss(provider, case.beta, softcap)
    shape3 = (case.rows, case.seq, case.shape.hidden)
    weights = inp.weights if P.PROVIDERS[provider].token_weights else None

    if inp.ref_logps is not None:
        ref = dict(ref_logps=inp.ref_logps.view(case.rows, case.seq))
    else:
        ref = dict(ref_hidden=inp.ref_hidden.view(shape3), ref_weight=inp.ref_weight)

    def call():
        return (fn(h.view(shape3), w, t.view(case.rows, case.seq), weights=weights, **ref),)
    return Workload(call, lambda outs: outs[0].backward(),
                    (h, w), ("loss",))


def ceiling_call(case: Case, inp: Inputs) -> Callable[[], torch.Tensor]:
    """The dense [N, D]×[D, V] matmul in row blocks written into one reused buffer."""
    h, w = inp.hidden.detach(), inp.weight.detach()
    rows = min(case.tokens, CEILING_ROWS)
    out = torch.empty(rows, case.shape.vocab, dtype=case.dtype, device=case.device)

    def call():
        for s in range(0, case.tokens, rows):
            e = min(s + rows, case.tokens)
            torch.matmul(h[s:e], w.T, out=out[: e - s])
        return out
    return call


# ----------------------------------------------------------------------------- fp32 check

def _row_blocks(n: int, vocab: int):
    step = max(1, min(n, (1 << 26) // vocab))    # ≤ 64M fp32 logits per block
    for s in range(0, n, step):
        yield slice(s, min(s + step, n))


def _truth_head(inp: Inputs, softcap, upstream: torch.Tensor | None, *, ref=False) -> dict:
    """fp32 per-token logp (and dH, dW for ``upstream``) by the reference, in row blocks."""
    from tisdpo_kernels import linear_logprobs

    hid = inp.ref_hidden if ref else inp.hidden
    wt = inp.ref_weight if ref else inp.weight
    want_grad = upstream is not None
    w32 = wt.detach().float().requires_grad_(want_grad)
    n = hid.shape[0]
    logp = torch.empty(n, device=hid.device)
    dh = torch.empty(n, hid.shape[1], device=hid.device) if want_grad else None
    for sl in _row_blocks(n, wt.shape[0]):
        hc = hid[sl].detach().float().requires_grad_(want_grad)
        with torch.set_grad_enabled(want_grad):
            lp = linear_logprobs(hc, w32, inp.targets[sl], softcap=softcap, impl="reference")
        if want_grad:
            lp.backward(upstream[sl])
            dh[sl] = hc.grad
        logp[sl] = lp.detach()
    out = {"logp": logp}
    if want_grad:
        out.update(dhidden=dh, dweight=w32.grad)
    return out


def _truth_kl(inp: Inputs, softcap) -> dict:
    from tisdpo_kernels import linear_token_kl

    w32 = inp.weight.detach().float().requires_grad_()
    rw32 = inp.ref_weight.detach().float()
    n = inp.hidden.shape[0]
    kl, logp = torch.empty(n, device=w32.device), torch.empty(n, device=w32.device)
    dh = torch.empty(n, inp.hidden.shape[1], device=w32.device)
    g1, g2 = inp.grads
    for sl in _row_blocks(n, w32.shape[0]):
        hc = inp.hidden[sl].detach().float().requires_grad_()
        k, lp, _ = linear_token_kl(hc, w32, inp.ref_hidden[sl].float(), rw32, inp.targets[sl],
                                   direction="policy_ref", softcap=softcap, impl="reference")
        torch.autograd.backward([k, lp], [g1[sl], g2[sl]])
        kl[sl], logp[sl], dh[sl] = k.detach(), lp.detach(), hc.grad
    return {"kl": kl, "logp": logp, "dhidden": dh, "dweight": w32.grad}


def _truth_loss(case: Case, inp: Inputs, weighted: bool, ref_free: bool) -> dict:
    """``ref_free``: the reference-free loss (what a provider that cannot take precomputed
    reference log-probs computes in their place)."""
    from tisdpo_kernels import PRESETS, preference_loss

    softcap = case.shape.softcap
    lp = _truth_head(inp, softcap, None)["logp"].view(case.rows, case.seq)
    if ref_free:
        rlp = torch.zeros_like(lp)
    elif inp.ref_logps is not None:
        rlp = inp.ref_logps.view(case.rows, case.seq)
    else:
        rlp = _truth_head(inp, softcap, None, ref=True)["logp"].view(case.rows, case.seq)
    lp.requires_grad_()
    mask = inp.targets.view(case.rows, case.seq) != P.IGNORE
    config = PRESETS["tisdpo"].config.replace(beta=case.beta)
    loss, _ = preference_loss(lp, rlp, inp.weights if weighted else None, config=config,
                              mask=mask, impl="reference")
    (g,) = torch.autograd.grad(loss, lp)
    head = _truth_head(inp, softcap, g.reshape(-1))
    return {"loss": loss.detach().reshape(1), "dhidden": head["dhidden"],
            "dweight": head["dweight"]}


def _fp32(fn):
    """fn() with true fp32 matmuls (no TF32)."""
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        return fn()
    finally:
        torch.set_float32_matmul_precision(precision)


def _truth(case: Case, inp: Inputs, provider: str) -> dict:
    """The fp32 reference (true fp32 matmuls, no TF32), cached on the host so that it takes
    no device memory from the providers measured after it."""
    weighted = P.PROVIDERS[provider].token_weights
    ref_free = inp.ref_logps is not None and not P.PROVIDERS[provider].ref_logps
    key = (case.op, weighted, ref_free)
    if key not in inp.truth:
        if case.op == "logprobs":
            truth = _fp32(lambda: _truth_head(inp, case.shape.softcap, inp.grads[0]))
        elif case.op == "kl":
            truth = _fp32(lambda: _truth_kl(inp, case.shape.softcap))
        else:
            truth = _fp32(lambda: _truth_loss(case, inp, weighted, ref_free))
        inp.truth[key] = {k: v.cpu() for k, v in truth.items()}
    return inp.truth[key]


def reference_errors(case: Case, inp: Inputs, provider: str,
                     work: Workload) -> dict[str, tuple[float, float]]:
    """{output: (max |provider − fp32 reference|, max |fp32 reference|)} for outputs and grads.

    Runs one fresh forward and backward of the provider.
    """
    for leaf in work.leaves:
        leaf.grad = None
    outs = work.call()
    work.backward(outs)
    got = {name: o.detach().reshape(-1) for name, o in zip(work.names, outs)}
    got["dhidden"] = inp.hidden.grad.reshape(inp.hidden.shape[0], -1)
    got["dweight"] = inp.weight.grad
    truth = _truth(case, inp, provider)
    errs = {}
    for name, ref in truth.items():
        # compared where the provider's output is: on a GPU one copy of the host's reference
        # goes up (d_weight: V·D fp32, 2 GB at llama3-8b) instead of the output coming down
        # and four passes over 2 GB running on the host's cores, about a second per provider
        out = got[name]
        ref = ref.to(out.device).reshape(out.shape)
        # a NaN in the output is an infinite error, not a NaN that a max may drop or a CSV
        # cell may show as blank
        err = (out.float() - ref).abs().nan_to_num(nan=math.inf).max().item()
        errs[name] = (err, ref.abs().max().item())
        del ref
    for leaf in work.leaves:
        leaf.grad = None
    return errs
