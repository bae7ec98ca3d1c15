"""The LM head as tisdpo reads it, and a load-time check that it reproduces the model's logits.

The training code never asks a model for logits: :func:`hidden_states` runs the decoder body
(``model.<base_model_prefix>``) to its last hidden state and :func:`head` says what turns that
into logits — the output embedding's weight [V, D] and bias, a scale and a soft cap read from
the config — which the fused ops take instead of logits. :func:`check_head` runs one tiny probe
batch through the model's own forward and through that path and raises a one-line ValueError
naming the architecture and the likely cause when they disagree (``load_model`` runs it unless
``model.check_head`` is false). ``tisdpo.train.model`` re-exports all of it.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

from tisdpo_kernels import linear_logprobs

__all__ = ["HeadSpec", "HeadCheck", "head", "decoder", "hidden_states", "check_head",
           "config_value"]

# Config names of the logit soft cap, z -> cap·tanh(z/cap) (Gemma 2/3, RecurrentGemma, xLSTM).
SOFTCAP_ATTRS = ("final_logit_softcapping", "logits_soft_cap", "output_logit_soft_cap")
# (config name, operation, where the model applies it): "logits" multiplies/divides W·h + b,
# "hidden" the hidden states before the head. Scaling the hidden states by s is exact for both
# (W·(s·h) = s·(W·h)); a logit-side scale also scales the bias.
SCALE_ATTRS = (("logit_scale", "mul", "logits"),              # Cohere
               ("logits_scaling", "div", "logits"),           # Granite
               ("lm_head_multiplier", "mul", "logits"),       # Falcon-H1
               ("output_multiplier", "mul", "logits"),        # Muse (before the soft cap)
               ("logits_mup_width_multiplier", "div", "hidden"))  # Inkling
# Architectures whose convention for a shared config name differs from the table above
# (each read from the model's own forward in transformers), or that ignore the attribute.
SCALE_OVERRIDES = {
    ("hyperclovax", "logits_scaling"): ("mul", "logits"),
    ("hyperclovax_vision_v2", "logits_scaling"): ("mul", "logits"),
    ("minicpm3", "logits_scaling"): ("div", "hidden"),
    ("mpt", "logit_scale"): None,       # MptForCausalLM does not apply it
}
# Unit roundoff (half an ulp at 1) of each compute dtype.
UNIT_ROUNDOFF = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11,
                 torch.float32: 2.0 ** -24, torch.float64: 2.0 ** -53}


@dataclass(frozen=True)
class HeadSpec:
    """What the fused ops need instead of logits: z = softcap(W·(scale·h) + b).

    ``bias`` already carries any logit-side scale; ``terms`` says what was read from the config
    (for messages)."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    softcap: float | None
    scale: float
    terms: tuple[str, ...] = ()


@dataclass(frozen=True)
class HeadCheck:
    """What :func:`check_head` measured: the largest |Δ log p| of the probe and its bound."""

    max_error: float
    tolerance: float


def model_type(model) -> str:
    return str(getattr(getattr(model, "config", None), "model_type", None)
               or type(model).__name__)


def _configs(model) -> list:
    """The model's config and, for composite ones, the text (decoder) config it nests."""
    conf = model.config
    out = [conf]
    if hasattr(conf, "get_text_config"):
        try:
            text = conf.get_text_config(decoder=True)
        except TypeError:
            text = conf.get_text_config()
        if text is not None and text is not conf:
            out.append(text)
    return out


def config_value(model, name: str):
    """``name`` from the model's config or, for a composite model, its text config; None
    where neither sets it."""
    for conf in _configs(model):
        value = getattr(conf, name, None)
        if value is not None:
            return value
    return None


def _number(name: str, value, model) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value == 0:
        raise ValueError(f"{model_type(model)}: config {name}={value!r} is not a non-zero number; "
                         f"tisdpo cannot apply it to the logits")
    return float(value)


def head(model) -> HeadSpec:
    """The LM head's weight [V, D] and bias, and the model's logit soft cap and scale.

    Soft caps are read under every config name transformers uses (:data:`SOFTCAP_ATTRS`),
    scales with each architecture's own convention (:data:`SCALE_ATTRS`, :data:`SCALE_OVERRIDES`)
    and folded into one scale on the hidden states. A head with more rows than the model keeps
    (``unpadded_vocab_size``) is cut to those rows (a view: gradients reach the weight).
    """
    lm = model.get_output_embeddings()
    if lm is None or not hasattr(lm, "weight"):
        raise ValueError(f"{type(model).__name__} has no output embedding (lm_head) to fuse")
    kind = model_type(model)
    if getattr(lm, "base_layer", None) is not None:     # a PEFT tuner layer (LoRA, IA3, ...)
        raise ValueError(f"{kind}: lm_head is wrapped by a PEFT adapter layer "
                         f"({type(lm).__name__}); the fused head reads lm_head.weight alone, so "
                         f"the adapter would never train: leave lm_head out of the adapter's "
                         f"target_modules (modules_to_save=['lm_head'] trains it in full)")
    weight, bias = lm.weight, getattr(lm, "bias", None)
    terms: list[str] = []
    softcap = None
    for name in SOFTCAP_ATTRS:
        value = config_value(model, name)
        if value is not None:
            softcap = _number(name, value, model)
            terms.append(f"{name}={value:g}")
            break
    scale, logit_scale = 1.0, 1.0
    for name, op, where in SCALE_ATTRS:
        rule = SCALE_OVERRIDES.get((kind, name), (op, where))
        value = config_value(model, name)
        if rule is None or value is None or value in (1, 1.0):
            continue
        op, where = rule
        value = _number(name, value, model)
        factor = value if op == "mul" else 1.0 / value
        scale *= factor
        if where == "logits":
            logit_scale *= factor
        terms.append(f"{name}={value:g} ({'×' if op == 'mul' else '÷'})")
    keep = config_value(model, "unpadded_vocab_size")
    if isinstance(keep, int) and 0 < keep < weight.shape[0]:
        weight = weight[:keep]
        bias = bias[:keep] if bias is not None else None
        terms.append(f"unpadded_vocab_size={keep}")
    if bias is not None and logit_scale != 1.0:
        bias = bias * logit_scale
    return HeadSpec(weight, bias, softcap, scale, tuple(terms))


def decoder(model):
    """The transformer body whose ``last_hidden_state`` feeds ``lm_head``: the attribute
    ``base_model_prefix`` names, else ``model.model`` (a text-only class of a multimodal
    family, e.g. Llama 4's, names the composite's prefix but keeps its body there)."""
    prefix = getattr(model, "base_model_prefix", "model")
    for name in dict.fromkeys((prefix, "model")):
        base = getattr(model, name, None)
        if isinstance(base, torch.nn.Module) and base is not model:
            return base
    raise ValueError(f"{type(model).__name__}: cannot find the decoder body (model.{prefix})")


def hidden_states(model, batch: dict, *, attention=None) -> torch.Tensor:
    """Last hidden states [rows, T, D] for ``batch`` (input_ids, attention_mask, position_ids),
    times the head's scale (:func:`head`).

    ``attention`` overrides the attention mask passed to the model (e.g. a block-diagonal
    mask or flash-attn varlen kwargs for packed rows, as a dict of keyword arguments).
    """
    kwargs = {"input_ids": batch["input_ids"], "use_cache": False}
    if attention is not None:
        kwargs.update(attention)
    else:
        if batch.get("attention_mask") is not None:
            kwargs["attention_mask"] = batch["attention_mask"]
        if batch.get("position_ids") is not None:
            kwargs["position_ids"] = batch["position_ids"]
    out = decoder(model)(**kwargs)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    spec_scale = head(model).scale
    return hidden * spec_scale if spec_scale != 1.0 else hidden


def _unit_roundoff(dtypes, device: torch.device) -> float:
    u = max(UNIT_ROUNDOFF.get(d, 2.0 ** -8) for d in dtypes)
    if device.type == "cuda" and torch.float32 in dtypes and \
            torch.get_float32_matmul_precision() != "highest":
        u = max(u, 2.0 ** -11)      # TF32 matmuls keep 10 mantissa bits
    return u


def _tolerance(u: float, magnitude: float, hidden_term: float) -> float:
    """Bound on |Δ log p| between the model's eager head and tisdpo's, both correct.

    The two paths share the decoder bit for bit; they differ only in the head. Each logit
    there passes through at most six roundings to the compute dtype that the other path
    does not make identically (the model rounds W·h, its scale and the three steps of a soft
    cap; tisdpo rounds W·h), each at most u·M with M the largest |logit| (the soft cap and the
    scales are 1-Lipschitz in the rounded value, relative to M); log p = z_y − lse(z) carries
    the error of z_y and of the normaliser, hence 2 × 6 = 12·u·M. Scaling h by a factor that is
    not a power of two rounds each h_d (relative u): 2·u·max(|s·h|·|W|ᵀ) more
    (``hidden_term``). fp32's GEMMs differ only in summation order (√D·u·M, ≤ 128·u·M for
    D ≤ 16k), so the same form gives ~1e-5·M there; 1e-6 absolute covers the fp32 log-softmax.
    In bf16 (u = 2⁻⁸) the bound is 0.047·M: a logit scale off by 10% moves log p at the
    probe's argmin token by ~0.1·(z_max − z_min) ≥ 0.1·M, so it is still caught.
    """
    rounding = 12 * u * magnitude + 2 * u * hidden_term
    order = 256 * u * magnitude if u < 2.0 ** -20 else 0.0     # fp32: GEMM summation order
    return rounding + order + 1e-6


def _lm_head_context(model, lm) -> list[str]:
    """Names of the modules next to the output embedding inside its LM-head container."""
    for name, mod in model.named_modules():
        if mod is lm and "." in name:
            parent = model.get_submodule(name.rsplit(".", 1)[0])
            return [n for n, _ in parent.named_children() if n != name.rsplit(".", 1)[1]]
    return []


def _config_hints(model) -> str:
    seen = []
    for conf in _configs(model):
        for key, value in sorted(vars(conf).items()):
            low = key.lower()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and \
                    ("logit" in low or "lm_head" in low or "output_mult" in low) and \
                    not any(w in low for w in ("to_keep", "attn", "attention", "router")) and \
                    f"{key}={value:g}" not in seen:
                seen.append(f"{key}={value:g}")
    return f" (config: {', '.join(seen)})" if seen else ""


def _diagnose(model, own: torch.Tensor, z0: torch.Tensor, spec: HeadSpec, tol: float) -> str:
    """The likeliest reason the model's logits ``own`` [N, V] are not tisdpo's, given the
    unscaled z0 = h·Wᵀ + b [N, V] (fp32)."""
    target = own.log_softmax(-1)

    def gap(z):
        return (z.log_softmax(-1) - target).abs().max().item()

    zc, tc = z0 - z0.mean(-1, keepdim=True), own - own.mean(-1, keepdim=True)
    s_fit = ((zc * tc).sum() / (zc * zc).sum().clamp_min(1e-30)).item()
    applied = spec.scale
    if gap(s_fit * z0) <= tol:
        note = "" if spec.softcap is None else f", with no soft cap (tisdpo caps at " \
                                               f"{spec.softcap:g})"
        return (f"the logits are hidden·Wᵀ scaled by {s_fit:.4g}{note} where tisdpo applies "
                f"{applied:.4g}{_config_hints(model)}")
    m0 = z0.abs().max().item() or 1.0
    best = (math.inf, None, None)
    for s in {1.0, applied, s_fit}:
        def capped_gap(log_cap, s=s):
            cap = math.exp(log_cap)
            return gap(cap * torch.tanh(s * z0 / cap))
        grid = [math.log(m0) + math.log(10) * (-1.5 + k / 16) for k in range(49)]
        k = min(range(len(grid)), key=lambda i: capped_gap(grid[i]))
        lo, hi = grid[max(k - 1, 0)], grid[min(k + 1, len(grid) - 1)]
        for _ in range(40):     # golden-section refinement of the cap between grid points
            a, b = hi - 0.618 * (hi - lo), lo + 0.618 * (hi - lo)
            lo, hi = (lo, b) if capped_gap(a) < capped_gap(b) else (a, hi)
        best = min(best, (capped_gap(lo), math.exp(lo), s), key=lambda b: b[0])
    if best[0] <= 4 * tol:
        g, cap, s = best
        have = "no soft cap" if spec.softcap is None else f"a soft cap of {spec.softcap:g}"
        scaled = "" if abs(s - 1.0) < 1e-9 else f" after a scale of {s:.4g}"
        return (f"the logits are soft-capped at about {cap:.3g}{scaled} (cap·tanh(z/cap)) where "
                f"tisdpo applies {have}{_config_hints(model)}")
    around = [n for n in _lm_head_context(model, model.get_output_embeddings())
              if n.lower() not in ("bias",)]
    if around:
        return (f"the LM head runs {'+'.join(around)} before its output embedding, a transform "
                f"tisdpo does not apply (the logits are no scale or soft cap of hidden·Wᵀ)")
    return ("the logits are no scale or soft cap of the decoder's hidden·Wᵀ: the model "
            "transforms the hidden states before its head or takes them from another stream"
            f"{_config_hints(model)}")


def check_head(model, *, autocast=None, rows: int = 2, tokens: int = 8,
               seed: int = 0) -> HeadCheck:
    """Check that tisdpo's fused head reproduces ``model``'s own log-probabilities.

    Runs ``rows × tokens`` seeded token ids (below the vocabulary size; no grad, eval mode,
    the train/eval mode restored after) through ``model(input_ids).logits.log_softmax(-1)``
    and through :func:`hidden_states` → :func:`head` → ``linear_logprobs(impl="torch")``, at
    three targets per position (the model's argmax and argmin and a random token), and compares
    them within the rounding bound of the compute dtype (:func:`_tolerance`). ``autocast``: a
    context manager to run both forwards under (bf16 autocast as in training).

    Returns the measured error and bound; raises a one-line ValueError naming the architecture
    (``config.model_type``) and what differs when they disagree.
    """
    kind = model_type(model)
    fail = f"{kind}: tisdpo cannot reproduce this model's logits"
    param = next(model.parameters())
    device = param.device
    try:
        spec = head(model)
    except ValueError as exc:
        raise ValueError(f"{fail}: {exc}") from None
    vocab = spec.weight.shape[0]
    for conf in _configs(model):
        v = getattr(conf, "vocab_size", None)
        vocab = min(vocab, v) if isinstance(v, int) and v > 0 else vocab
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (rows, tokens), generator=gen).to(device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            with autocast if autocast is not None else contextlib.nullcontext():
                try:
                    out = model(input_ids=ids, use_cache=False)
                except Exception as exc:    # noqa: BLE001 — the model's own forward
                    raise ValueError(f"{kind}: the model's own forward fails on a probe batch "
                                     f"({type(exc).__name__}: {str(exc).splitlines()[0]})"
                                     ) from exc
                own_raw = getattr(out, "logits", None)
                if not isinstance(own_raw, torch.Tensor):
                    raise ValueError(f"{fail}: its forward returns no logits tensor")
                try:
                    hidden = hidden_states(model, {"input_ids": ids})
                except ValueError as exc:
                    raise ValueError(f"{fail}: {exc}") from None
                except Exception as exc:    # noqa: BLE001 — any failure of the decoder alone
                    raise ValueError(f"{fail}: running its decoder body alone fails "
                                     f"({type(exc).__name__}: {str(exc).splitlines()[0]})"
                                     ) from None
            return _compare(model, kind, fail, spec, own_raw, hidden, ids, gen, device)
    finally:
        model.train(was_training)


def _compare(model, kind, fail, spec, own_raw, hidden, ids, gen, device) -> HeadCheck:
    weight = spec.weight if spec.weight.dtype == hidden.dtype else spec.weight.to(hidden.dtype)
    bias = spec.bias if spec.bias is None or spec.bias.dtype == hidden.dtype \
        else spec.bias.to(hidden.dtype)
    if hidden.shape[:-1] != own_raw.shape[:-1]:
        raise ValueError(f"{fail}: its logits have shape {tuple(own_raw.shape)} but its decoder "
                         f"gives hidden states {tuple(hidden.shape)}")
    if weight.shape[1] != hidden.shape[-1]:
        around = _lm_head_context(model, model.get_output_embeddings())
        where = f" ({'+'.join(around)} in the LM head)" if around else ""
        raise ValueError(f"{fail}: its output embedding takes width {weight.shape[1]} but the "
                         f"decoder's hidden states have width {hidden.shape[-1]}: a transform "
                         f"sits between them{where} that tisdpo does not apply")
    if own_raw.shape[-1] != weight.shape[0]:
        raise ValueError(f"{fail}: its logits cover {own_raw.shape[-1]} tokens but the output "
                         f"embedding has {weight.shape[0]} rows{_config_hints(model)}")
    own = own_raw.float()
    d, v = hidden.shape[-1], weight.shape[0]
    flat_own = own.reshape(-1, v)
    rand = torch.randint(0, v, flat_own.shape[:1], generator=gen).to(device)
    targets = torch.stack([flat_own.argmax(-1), flat_own.argmin(-1), rand])      # [3, N]
    h = hidden.reshape(-1, d)
    fused = linear_logprobs(h.expand(3, *h.shape), weight, targets, bias=bias,
                            softcap=spec.softcap, impl="torch")
    truth = flat_own.log_softmax(-1).gather(-1, targets.T).T
    err = (fused - truth).abs().max().item()
    hf, wf = h.float(), weight.float()
    z = hf @ wf.T + (bias.float() if bias is not None else 0.0)
    magnitude = max(z.abs().max().item(), flat_own.abs().max().item())
    s = spec.scale
    hidden_term = 0.0 if s == 2.0 ** round(math.log2(abs(s))) else \
        (hf.abs() @ wf.abs().T).max().item()
    u = _unit_roundoff({hidden.dtype, weight.dtype, own_raw.dtype}, device)
    tol = _tolerance(u, magnitude, hidden_term)
    if not math.isfinite(err) or err > tol:
        raw_bias = getattr(model.get_output_embeddings(), "bias", None)
        z0 = (hf / s) @ wf.T
        if raw_bias is not None:
            z0 = z0 + raw_bias.float()[:v]
        applied = ", ".join(spec.terms) or "no scale or soft cap"
        cause = _diagnose(model, flat_own, z0, spec, tol)
        raise ValueError(f"{kind}: the model's logits differ from tisdpo's head (hidden·Wᵀ"
                         f"{'+b' if bias is not None else ''}; {applied}) by max |Δ log p| "
                         f"{err:.3g} > {tol:.2g}: {cause}. Set --model.check_head false to "
                         f"train anyway (the log-probabilities will not be the model's)")
    return HeadCheck(err, tol)
