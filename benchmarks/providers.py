"""The providers compared: ours and the peers, behind three small call signatures.

- logprobs: ``fn(hidden[N, D], weight[V, D], targets[N]) -> logp[N]`` (float32, 0 where
  ignored). Peers that return a per-token loss are negated (an O(N) op).
- loss: ``fn(hidden[2B, T, D], weight, labels[2B, T], *, ref_hidden, ref_weight, ref_logps,
  weights) -> scalar``: the TIS-DPO loss of the official code (−log σ(β(Σ ω_w Δ_w − Σ ω_l
  Δ_l)), summed log-ratios, mean over pairs), with either an online reference head or
  precomputed reference log-probs. Peers without a fused loss are composed: their per-token
  logp for the policy (and, under no_grad, the reference) plus the same O(N) reduction.
- kl: ``fn(hidden, weight, ref_hidden, ref_weight, targets) -> (kl[N], logp[N])``,
  KL(π‖ref) over the full vocabulary.

Every provider is optional: ``skip_reason`` says why one cannot run here (package missing,
no CUDA, op or option not supported) and nothing falls back silently.
"""
from __future__ import annotations

import functools
import importlib.util
import inspect
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from benchmarks.measure import env_vars

__all__ = [
    "Provider", "PROVIDERS", "OPS", "resolve_providers", "skip_reason", "provider_env",
    "make_logprobs",
    "make_loss", "make_kl", "eager_logprobs", "eager_token_kl", "dpo_reduce",
]

OPS = ("logprobs", "loss", "kl")
IGNORE = -100
TRL_CHUNK = 32768    # the vocabulary chunk TRL's DPOTrainer passes (trl.trainer.utils)


@dataclass(frozen=True)
class Provider:
    name: str
    ops: tuple[str, ...]
    strategy: str                    # flop model, see measure.FLOP_MODELS
    description: str
    packages: tuple[str, ...] = ()   # importable module names it needs
    cuda_only: bool = False
    token_weights: bool = True       # honours per-token weights in the loss op
    ref_logps: bool = True           # takes precomputed reference log-probs in the loss op
    softcap: bool = True             # supports a logit softcap
    filtered: bool = False           # its backward skips work that depends on the data
    env: tuple[tuple[str, str], ...] = ()   # environment variables set while it runs


PROVIDERS: dict[str, Provider] = {p.name: p for p in (
    Provider("ours-triton", OPS, "recompute",
             "tisdpo fused Triton kernels (impl='triton'; interpreter on CPU)"),
    Provider("ours-torch", OPS, "recompute",
             "tisdpo token-chunked PyTorch backend (impl='torch')"),
    Provider("ours-one-sweep", ("loss",), "grads_in_forward",
             "tisdpo one-sweep preference head (TISDPOLoss(strategy='one_sweep')): every head "
             "gradient in the forward, the backward only scales; impl='auto' (on CUDA cuBLAS "
             "GEMMs and the Triton epilogue)"),
    Provider("ours-one-sweep-torch", ("loss",), "grads_in_forward",
             "ours-one-sweep on the torch backend (impl='torch': torch elementwise ops per "
             "chunk instead of the Triton epilogue; the same cuBLAS GEMMs)"),
    Provider("ours-filtered", ("logprobs",), "recompute",
             "tisdpo fused Triton kernels with gradient filtering, filter_eps=2^-12 "
             "(docs/FILTERING.md): exact forward, backward GEMMs on the kept columns only",
             filtered=True),
    Provider("ours-no-tma", ("logprobs",), "recompute",
             "ours-triton with the weight tiles loaded, and the backward's dz tiles stored, "
             "through pointers instead of Hopper's tensor memory accelerator (TISDPO_TMA=0; "
             "the same on GPUs before Hopper)",
             env=(("TISDPO_TMA", "0"),)),
    Provider("ours-gemm", ("logprobs", "kl"), "recompute",
             "ours-triton with the logits written by cuBLAS a chunk at a time (input dtype, "
             "as eager rounds them) and read back by the same kernels "
             "(TISDPO_HEAD_LOGITS=gemm): the GEMMs at cuBLAS speed, plus a write and a read of "
             "the logits per chunk in forward and in backward",
             env=(("TISDPO_HEAD_LOGITS", "gemm"),)),
    Provider("eager", OPS, "materialise",
             "eager PyTorch: materialised logits, fp32 log_softmax, gather (TRL-style)"),
    Provider("torch-compile", OPS, "materialise", "torch.compile of the eager code"),
    Provider("cce", ("logprobs", "loss"), "recompute",
             "Cut Cross-Entropy linear_cross_entropy(reduction='none'), default filtering",
             packages=("cut_cross_entropy",), cuda_only=True, filtered=True),
    Provider("cce_exact", ("logprobs", "loss"), "recompute",
             "Cut Cross-Entropy with gradient filtering off (filter_eps=None)",
             packages=("cut_cross_entropy",), cuda_only=True),
    Provider("liger-flce", ("logprobs", "loss"), "recompute",
             "Liger fused linear cross entropy, reduction='none' (recomputes in backward)",
             packages=("liger_kernel",), cuda_only=True),
    Provider("liger-dpo", ("loss",), "grads_in_forward",
             "Liger LigerFusedLinearDPOLoss (chunks whole pairs; no per-token weights; "
             "reference-free where the reference log-probs are precomputed, which it cannot "
             "take)", packages=("liger_kernel",), cuda_only=True, token_weights=False,
             softcap=False, ref_logps=False),
    Provider("trl-chunked", ("logprobs", "loss"), "recompute",
             "TRL 1.16 trl.kernels.ChunkedLogProbFunction (cuBLAS tiles, a Triton fold, "
             "recompute in backward: what DPOTrainer runs), log-probs only (DPOTrainer also "
             "asks its policy head for entropy, mean logits and top-1 hits); its backward "
             "needs trl.trainer (accelerate, datasets)",
             packages=("trl", "accelerate", "datasets")),
    Provider("torch-lce", ("logprobs", "loss"), "recompute",
             "PyTorch's chunked F.linear_cross_entropy(reduction='none', "
             "options=LinearCrossEntropyOptions()) (torch >= 2.13)", softcap=False),
)}

_OURS_IMPL = {"ours-triton": "triton", "ours-torch": "torch", "ours-no-tma": "triton",
              "ours-gemm": "triton"}
FILTER_EPS = 2.0 ** -12        # ours-filtered: Cut Cross-Entropy's default threshold for bf16
# the loss op's strategy per provider of ours: the recompute rows stay recompute whatever
# TISDPOLoss(strategy="auto") would pick, so each row measures what its flop model counts
_OURS_LOSS = {"ours-triton": ("triton", "recompute"), "ours-torch": ("torch", "recompute"),
              "ours-one-sweep": ("auto", "one_sweep"),
              "ours-one-sweep-torch": ("torch", "one_sweep")}


def resolve_providers(text: str | None) -> list[str]:
    """``"all"``/None → every provider; else a comma list, each checked against the registry."""
    if text is None or text.strip().lower() == "all":
        return list(PROVIDERS)
    names = [n.strip() for n in text.split(",") if n.strip()]
    for n in names:
        if n not in PROVIDERS:
            raise ValueError(f"--providers: unknown provider {n!r}; valid providers are "
                             f"{', '.join(PROVIDERS)}")
    return names


def provider_env(name: str):
    """Provider ``name``'s environment variables, set for as long as it runs (its forward and
    backward both read them), then restored."""
    return env_vars(**dict(PROVIDERS[name].env))


# ----------------------------------------------------------------------------- eager code

def eager_logprobs(hidden, weight, targets, softcap=None):
    """Materialised [N, V] logits, fp32 log_softmax, gather; 0 where ignored."""
    z = (hidden @ weight.T).float()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    valid = targets != IGNORE
    lp = torch.log_softmax(z, dim=-1)
    out = lp.gather(-1, torch.where(valid, targets, 0).unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, out, torch.zeros((), dtype=out.dtype, device=out.device))


def eager_token_kl(hidden, weight, ref_hidden, ref_weight, targets, softcap=None):
    """KL(π‖ref) per token from two materialised heads; (kl, logp), 0 where ignored."""
    def logsm(h, w):
        z = (h @ w.T).float()
        if softcap is not None:
            z = softcap * torch.tanh(z / softcap)
        return torch.log_softmax(z, dim=-1)

    lp = logsm(hidden, weight)
    with torch.no_grad():
        lq = logsm(ref_hidden, ref_weight)
    valid = targets != IGNORE
    kl = (lp.exp() * (lp - lq)).sum(-1)
    logp = lp.gather(-1, torch.where(valid, targets, 0).unsqueeze(-1)).squeeze(-1)
    zero = torch.zeros((), dtype=kl.dtype, device=kl.device)
    return torch.where(valid, kl, zero), torch.where(valid, logp, zero)


def dpo_reduce(logp, ref_logp, weights, mask, beta):
    """−mean_b log σ(β(Σ_t ω Δ over chosen row b − the same over rejected row b+B))."""
    delta = (logp - ref_logp) * mask
    if weights is not None:
        delta = delta * weights
    s = delta.sum(-1)
    half = s.shape[0] // 2
    return -F.logsigmoid(beta * (s[:half] - s[half:])).mean()


# ----------------------------------------------------------------------------- factories

def _compiled(fn: Callable) -> Callable:
    """``torch.compile`` specialised to this case's shapes: the compile caches are reset first
    so that a sweep over many shapes never hits Dynamo's recompile limit (which would fall
    back to eager silently) nor times a dynamic-shape kernel."""
    torch._dynamo.reset()
    return torch.compile(fn, dynamic=False)


def _cce(filter_eps, softcap):
    from cut_cross_entropy import linear_cross_entropy

    def fn(hidden, weight, targets):
        nll = linear_cross_entropy(hidden, weight, targets, ignore_index=IGNORE, softcap=softcap,
                                   reduction="none", filter_eps=filter_eps)
        return -nll.float()
    return fn


def _liger_flce(softcap):
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    def fn(hidden, weight, targets):
        nll = liger_fused_linear_cross_entropy(hidden, weight, targets, ignore_index=IGNORE,
                                               reduction="none", softcap=softcap)
        return -nll.float()
    return fn


def _trl_chunked(softcap):
    from trl.kernels import ChunkedLogProbFunction

    def fn(hidden, weight, targets):
        valid = targets != IGNORE
        out = ChunkedLogProbFunction.apply(hidden, weight, None, torch.where(valid, targets, 0),
                                           1.0, TRL_CHUNK, softcap, 1.0, ())
        return torch.where(valid, out[0].float(), 0.0)
    return fn


def _torch_lce(hidden, weight, targets):
    nll = F.linear_cross_entropy(hidden, weight, targets, reduction="none",
                                 ignore_index=IGNORE, options=torch.nn.LinearCrossEntropyOptions())
    return -nll.float()


def make_logprobs(name: str, softcap: float | None) -> Callable:
    if name in _OURS_IMPL:
        from tisdpo_kernels import linear_logprobs
        return functools.partial(linear_logprobs, softcap=softcap, impl=_OURS_IMPL[name])
    if name == "ours-filtered":
        from tisdpo_kernels import linear_logprobs
        return functools.partial(linear_logprobs, softcap=softcap, impl="triton",
                                 filter_eps=FILTER_EPS)
    if name == "eager":
        return functools.partial(eager_logprobs, softcap=softcap)
    if name == "torch-compile":
        return _compiled(functools.partial(eager_logprobs, softcap=softcap))
    if name == "cce":
        return _cce("auto", softcap)
    if name == "cce_exact":
        return _cce(None, softcap)
    if name == "liger-flce":
        return _liger_flce(softcap)
    if name == "trl-chunked":
        return _trl_chunked(softcap)
    if name == "torch-lce":
        if softcap is not None:
            raise NotImplementedError("F.linear_cross_entropy has no logit softcap")
        return _torch_lce
    raise ValueError(f"provider {name!r} has no logprobs op")


def _composed_loss(logprobs_fn: Callable, beta: float) -> Callable:
    def fn(hidden, weight, labels, *, ref_hidden=None, ref_weight=None, ref_logps=None,
           weights=None):
        rows, seq, dim = hidden.shape
        flat = labels.reshape(-1)
        lp = logprobs_fn(hidden.reshape(-1, dim), weight, flat).view(rows, seq)
        if ref_logps is None:
            with torch.no_grad():
                ref_logps = logprobs_fn(ref_hidden.reshape(-1, ref_hidden.shape[-1]), ref_weight,
                                        flat).view(rows, seq)
        return dpo_reduce(lp, ref_logps, weights, labels != IGNORE, beta)
    return fn


def _ours_loss(impl: str, strategy: str, beta: float, softcap: float | None) -> Callable:
    from tisdpo import TISDPOLoss

    params = inspect.signature(TISDPOLoss).parameters
    kwargs = {"method": "tisdpo", "beta": beta}
    for name, value in (("impl", impl), ("strategy", strategy)):
        if name not in params:
            raise NotImplementedError(f"tisdpo.TISDPOLoss takes no {name}= argument")
        kwargs[name] = value
    if softcap is not None:
        if "softcap" not in params:
            raise NotImplementedError("tisdpo.TISDPOLoss takes no softcap= argument")
        kwargs["softcap"] = softcap
    module = TISDPOLoss(**kwargs)

    def fn(hidden, weight, labels, *, ref_hidden=None, ref_weight=None, ref_logps=None,
           weights=None):
        loss, _metrics = module(weight, hidden, labels, ref_hidden=ref_hidden,
                                ref_weight=ref_weight, ref_logps=ref_logps, weights=weights)
        return loss
    return fn


def _liger_dpo(beta: float) -> Callable:
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

    online = LigerFusedLinearDPOLoss(beta=beta, use_ref_model=True)
    # Liger cannot take precomputed reference log-probs: with them it runs reference-free,
    # which costs the same as subtracting constants.
    offline = LigerFusedLinearDPOLoss(beta=beta, use_ref_model=False)

    def fn(hidden, weight, labels, *, ref_hidden=None, ref_weight=None, ref_logps=None,
           weights=None):
        if ref_logps is None:
            out = online(weight, hidden, labels, ref_input=ref_hidden, ref_weight=ref_weight)
        else:
            out = offline(weight, hidden, labels)
        return out[0] if isinstance(out, tuple) else out
    return fn


def make_loss(name: str, beta: float, softcap: float | None) -> Callable:
    if name in _OURS_LOSS:
        return _ours_loss(*_OURS_LOSS[name], beta, softcap)
    if name == "liger-dpo":
        if softcap is not None:
            raise NotImplementedError("LigerFusedLinearDPOLoss has no softcap")
        return _liger_dpo(beta)
    if name == "torch-compile":
        return _compiled(_composed_loss(functools.partial(eager_logprobs, softcap=softcap),
                                        beta))
    return _composed_loss(make_logprobs(name, softcap), beta)


def make_kl(name: str, softcap: float | None) -> Callable:
    if name in _OURS_IMPL:
        from tisdpo_kernels import linear_token_kl

        def fn(hidden, weight, ref_hidden, ref_weight, targets):
            kl, logp, _ref_logp = linear_token_kl(hidden, weight, ref_hidden, ref_weight,
                                                  targets, direction="policy_ref",
                                                  softcap=softcap, impl=_OURS_IMPL[name])
            return kl, logp
        return fn
    if name == "eager":
        return functools.partial(eager_token_kl, softcap=softcap)
    if name == "torch-compile":
        return _compiled(functools.partial(eager_token_kl, softcap=softcap))
    raise ValueError(f"provider {name!r} has no kl op")


# ----------------------------------------------------------------------------- availability

def _probe(name: str, op: str, device: torch.device, dtype: torch.dtype,
           softcap: float | None) -> str | None:
    """Run our op once at a tiny size: a missing backend or impl says why here."""
    g = torch.Generator(device="cpu").manual_seed(0)
    h = torch.randn(4, 16, generator=g).to(device=device, dtype=dtype)
    w = torch.randn(40, 16, generator=g).to(device=device, dtype=dtype)
    t = torch.randint(0, 40, (4,), generator=g).to(device)
    try:
        if op == "logprobs":
            make_logprobs(name, softcap)(h, w, t)
        elif op == "kl":
            make_kl(name, softcap)(h, w, h, w, t)
        else:
            h3 = h.view(2, 2, 16)
            make_loss(name, 0.1, softcap)(h3, w, t.view(2, 2), ref_hidden=h3, ref_weight=w,
                                          weights=torch.ones(2, 2, device=device))
    except (ImportError, NotImplementedError) as err:   # anything else is a bug: error rows
        return f"{type(err).__name__}: {err}"
    return None


@functools.lru_cache(maxsize=None)
def _cached_probe(name, op, device_str, dtype, softcap):
    return _probe(name, op, torch.device(device_str), dtype, softcap)


def skip_reason(name: str, op: str, device: torch.device, *, dtype: torch.dtype,
                softcap: float | None = None) -> str | None:
    """Why provider ``name`` cannot run ``op`` here, or None when it can."""
    p = PROVIDERS[name]
    if op not in p.ops:
        return f"{name} has no {op} op"
    for pkg in p.packages:
        if importlib.util.find_spec(pkg) is None:
            return (f"package {pkg!r} is not installed (install the peer wheels, see "
                    f"benchmarks/README.md)")
    if p.cuda_only and device.type != "cuda":
        return f"{name} needs a CUDA device"
    if softcap is not None and not p.softcap:
        return f"{name} has no logit softcap"
    if name == "torch-lce" and not hasattr(torch.nn, "LinearCrossEntropyOptions"):
        return f"torch {torch.__version__} has no chunked F.linear_cross_entropy (>= 2.13)"
    if name in _OURS_LOSS:
        from tisdpo_kernels._impl import resolve_impl
        try:        # a backend that cannot run on this device (Triton on the CPU)
            resolve_impl(_OURS_LOSS[name][0], device, op=name)
        except ValueError as err:
            return str(err)
        return _cached_probe(name, op, str(device), dtype, softcap)
    return None
