"""Range and cross-option checks of a run configuration (``tisdpo.train.config.validate``).

Every check raises a one-line ``ValueError`` that names the option as it is typed after
``--`` on the command line (``policy.beta``; top-level options bare: ``seed``), the value,
and what is allowed: ``policy.beta must be > 0 or empty, got -0.1``. They run when the
configuration is built, before any stage, so ``tisdpo <command> --print-config`` already
refuses a bad value. ``data.max_length`` is held to the position embeddings of the model:
the tiny demo model's ``model.tiny_max_positions``, or those in ``model.path``'s
``config.json`` when it is readable (a folder that is not a model is refused where it is
loaded, ``tisdpo.train.model.check_model_dir``). A float option that reaches float32
arithmetic (learning rate, weight decay, epsilon, clipping norm, beta, the weight rule's
parameters, the sampling temperature) is held within ``F32_SAFE`` (1e30) of 0, where the
optimiser's and loss's float32 scalars do not overflow.

This module imports nothing of ``tisdpo.train.config`` (which imports it): it reads the
configuration's attributes, and ``config.validate`` passes in the option specs.
"""
from __future__ import annotations

import json
import math
import os
import re

__all__ = ["check_config", "model_max_positions", "DEVICE_FORMS", "DEVICE_RE",
           "TRAIN_SECTIONS"]

#: The forms ``device`` accepts (``tisdpo.train.model.resolve_device``).
DEVICE_FORMS = "auto, cpu, cuda, cuda:N (N = 0, 1, ...), mps"
DEVICE_RE = re.compile(r"^(auto|cpu|cuda|cuda:\d+|mps)$")
#: The sections sharing ``TrainConfig`` (one training stage each).
TRAIN_SECTIONS = ("sft", "contrastive", "policy")
#: The largest magnitude of a float option that reaches float32 arithmetic (optimiser
#: scalars, loss and weight-rule factors; float32 ends at 3.4e38): headroom for what scales
#: it there, such as AdamW's bias correction 1 / (1 - adam_beta1^step).
F32_SAFE = 1e30
#: Keys under which Hugging Face configs store the longest sequence the model takes.
_POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length",
                  "seq_length")


def _fail(name: str, rule: str, value) -> None:
    raise ValueError(f"{name} must be {rule}, got {value!r}")


def _number(name: str, value, *, low=None, high=None, low_open=False, high_open=False,
            integer=False, optional=False, rule=None) -> None:
    """``value`` a finite number (an int with ``integer``) in the given range, or None when
    ``optional``; otherwise a ValueError naming ``name``, the value and the range."""
    if value is None and optional:
        return
    if rule is None:
        parts = []
        if low is not None:
            parts.append(f"{'>' if low_open else '>='} {low}")
        if high is not None:
            parts.append(f"{'<' if high_open else '<='} {high}")
        if low is not None and high is not None:
            rule = f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        else:
            rule = " and ".join(parts) if parts else "a finite number"
        if integer and not parts:
            rule = "an integer"
        if optional:
            rule += " or empty"
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value):
        kind = "an integer" if integer else "a finite number"
        _fail(name, rule if rule.startswith(kind) else f"{kind} {rule}", value)
    if low is not None and (value <= low if low_open else value < low):
        _fail(name, rule, value)
    if high is not None and (value >= high if high_open else value > high):
        _fail(name, rule, value)


def _f32(name: str, value) -> None:
    """``value`` (a number or None) within F32_SAFE of 0: an option that reaches float32
    arithmetic, past which it overflows. Checked after the option's own range, whose
    message comes first."""
    if value is not None and abs(value) > F32_SAFE:
        _fail(name, f"at most {F32_SAFE:g} in magnitude (it reaches float32 arithmetic, "
                    f"which ends at 3.4e+38)", value)


def _count(name: str, value, low: int = 1, *, optional: bool = False, meaning: str = ""):
    rule = f">= {low}" + (" or empty" if optional else "") + meaning
    _number(name, value, low=low, integer=True, optional=optional, rule=rule)


def model_max_positions(path: str | None) -> tuple[int, str] | None:
    """(longest sequence, the config key giving it) of the model folder ``path``, read from
    its ``config.json`` (or its ``text_config``); None when unknown or unreadable."""
    if not path:
        return None
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as fh:
            conf = json.load(fh)
    except (OSError, ValueError):
        return None
    return max_positions_of(conf)


def max_positions_of(conf: dict) -> tuple[int, str] | None:
    """(longest sequence, the key giving it) of a model config as a dict (or its
    ``text_config``); None when it names none."""
    for section in (conf, conf.get("text_config") if isinstance(conf, dict) else None):
        if not isinstance(section, dict):
            continue
        for key in _POSITION_KEYS:
            value = section.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value, key
    return None


def _check_choices(cfg, specs) -> None:
    for spec in specs:
        if not spec.choices:
            continue
        obj = cfg
        for part in spec.name.split("."):
            obj = getattr(obj, part)
        if obj not in spec.choices:
            _fail(spec.name, f"one of {list(spec.choices)}", obj)


def _check_run(cfg) -> None:
    _number("seed", cfg.seed, low=0, high=2**32 - 1, integer=True)
    if not isinstance(cfg.run_dir, str) or not cfg.run_dir.strip():
        _fail("run_dir", "a directory path", cfg.run_dir)
    if not isinstance(cfg.device, str) or not DEVICE_RE.match(cfg.device):
        _fail("device", f"one of {DEVICE_FORMS}", cfg.device)
    _count("threads", cfg.threads, optional=True)
    dist = cfg.distributed
    _count("distributed.timeout_minutes", dist.timeout_minutes)
    if dist.mixed_precision == "bf16" and dist.mode != "fsdp2":
        _fail("distributed.mixed_precision", f"auto or none under distributed.mode="
                                             f"{dist.mode} (bf16 is FSDP2's; DDP trains in "
                                             f"the model's dtype: use model.dtype=bfloat16)",
              dist.mixed_precision)
    if dist.mode != "none" and cfg.device not in ("auto", "cuda", "cpu"):
        _fail("device", f"auto, cuda or cpu under distributed.mode={dist.mode} (each rank "
                        f"takes its LOCAL_RANK's GPU)", cfg.device)


def _check_model(cfg) -> None:
    m = cfg.model
    for attr in ("path", "tokenizer"):
        value = getattr(m, attr)
        if value is not None and (not isinstance(value, str) or not value.strip()):
            _fail(f"model.{attr}", "a local directory or empty", value)
    if not isinstance(m.attn_implementation, str) or not m.attn_implementation.strip():
        _fail("model.attn_implementation", "an attention backend name (sdpa, eager, "
                                           "flash_attention_2, flex_attention)",
              m.attn_implementation)
    _count("model.tiny_hidden_size", m.tiny_hidden_size)
    _count("model.tiny_layers", m.tiny_layers)
    _count("model.tiny_heads", m.tiny_heads)
    _count("model.tiny_kv_heads", m.tiny_kv_heads)
    _count("model.tiny_intermediate_size", m.tiny_intermediate_size)
    _count("model.tiny_max_positions", m.tiny_max_positions, 2)
    hidden, heads = m.tiny_hidden_size, m.tiny_heads
    if hidden % heads:
        _fail("model.tiny_heads", f"a divisor of model.tiny_hidden_size={hidden} (each head "
                                  f"gets hidden_size / heads dimensions)", heads)
    if (hidden // heads) % 2:
        _fail("model.tiny_heads", f"a divisor of model.tiny_hidden_size={hidden} leaving an "
                                  f"even head size (rotary embeddings rotate pairs of "
                                  f"dimensions)", heads)
    if heads % m.tiny_kv_heads:
        _fail("model.tiny_kv_heads", f"a divisor of model.tiny_heads={heads} (grouped-query "
                                     f"attention)", m.tiny_kv_heads)


def _check_data(cfg) -> None:
    d = cfg.data
    for attr in ("train", "eval"):
        value = getattr(d, attr)
        if value is not None and (not isinstance(value, str) or not value.strip()):
            _fail(f"data.{attr}", "a file or directory path, or empty", value)
    _count("data.synthetic_train", d.synthetic_train)
    _count("data.synthetic_eval", d.synthetic_eval)
    _number("data.eval_fraction", d.eval_fraction, low=0, high=1, low_open=True,
            high_open=True)
    _count("data.max_records", d.max_records, optional=True)
    _count("data.max_length", d.max_length, 2)
    _number("data.max_prompt_length", d.max_prompt_length, low=1, high=d.max_length,
            high_open=True, integer=True, rule=f"in [1, data.max_length={d.max_length})")
    _count("data.pad_to_multiple_of", d.pad_to_multiple_of, optional=True)
    if cfg.model.path:
        known = model_max_positions(cfg.model.path)
        if known is not None and d.max_length > known[0]:
            _fail("data.max_length", f"<= {known[0]}, the {known[1]} of model.path "
                                     f"{cfg.model.path}", d.max_length)
    elif d.max_length > cfg.model.tiny_max_positions:
        _fail("data.max_length", f"<= model.tiny_max_positions={cfg.model.tiny_max_positions} "
                                 f"(the tiny demo model's position embeddings; raise that "
                                 f"too)", d.max_length)


def _check_train(name: str, t) -> None:
    _number(f"{name}.lr", t.lr, low=0, low_open=True)
    _number(f"{name}.weight_decay", t.weight_decay, low=0)
    _number(f"{name}.adam_beta1", t.adam_beta1, low=0, high=1, high_open=True)
    _number(f"{name}.adam_beta2", t.adam_beta2, low=0, high=1, high_open=True)
    _number(f"{name}.eps", t.eps, low=0, low_open=True)
    _count(f"{name}.warmup_steps", t.warmup_steps, 0)
    _count(f"{name}.batch_size", t.batch_size)
    _count(f"{name}.grad_accum", t.grad_accum)
    _count(f"{name}.max_steps", t.max_steps, 0, meaning=" (0: derive from epochs)")
    _number(f"{name}.epochs", t.epochs, low=0)
    if t.max_steps == 0 and t.epochs <= 0:
        _fail(f"{name}.epochs", f"> 0 when {name}.max_steps is 0", t.epochs)
    _number(f"{name}.max_grad_norm", t.max_grad_norm, low=0, low_open=True, optional=True)
    for attr in ("lr", "weight_decay", "eps", "max_grad_norm"):
        _f32(f"{name}.{attr}", getattr(t, attr))
    _count(f"{name}.eval_every", t.eval_every, 0, meaning=" (0: only at the end)")
    _count(f"{name}.eval_batch_size", t.eval_batch_size)
    _count(f"{name}.eval_max_pairs", t.eval_max_pairs, optional=True,
           meaning=" (empty: every held-out pair)")
    _count(f"{name}.save_every", t.save_every, 0, meaning=" (0: only at the end)")
    _count(f"{name}.keep_checkpoints", t.keep_checkpoints)
    _count(f"{name}.stop_after", t.stop_after, 0, optional=True)


#: ``policy.name``: one safe folder name (``tisdpo.pipeline.stages.policy_dir``).
POLICY_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def _check_policy_name(cfg) -> None:
    name = cfg.policy.name
    if not isinstance(name, str) or not POLICY_NAME_RE.match(name):
        _fail("policy.name", "a folder name of 1-100 letters, digits, '.', '_' or '-' that "
                             "starts with a letter or digit", name)
    _number("policy.seed", cfg.policy.seed, low=0, high=2**32 - 1, integer=True,
            optional=True)


def _check_methods(cfg) -> None:
    from tisdpo_kernels.config import PRESETS, resolve_preset

    known = sorted(PRESETS)
    for name, beta, optional in (("contrastive", cfg.contrastive.beta, False),
                                 ("policy", cfg.policy.beta, True)):
        method = getattr(cfg, name).method
        if method not in PRESETS:
            _fail(f"{name}.method", f"a loss preset, one of {known}", method)
        _number(f"{name}.beta", beta, low=0, low_open=True, optional=optional)
        _f32(f"{name}.beta", beta)
        try:
            resolve_preset(method, beta=beta)
        except ValueError as err:
            raise ValueError(f"{name}.method={method} with {name}.beta={beta}: {err}") from None
    for name in ("contrastive", "policy"):
        if getattr(cfg, name).method != "cdpo_code":
            continue
        # its mean over padded position slots makes the padding part of the loss
        if cfg.data.pad_to_multiple_of:
            raise ValueError(f"data.pad_to_multiple_of={cfg.data.pad_to_multiple_of} with "
                             f"{name}.method=cdpo_code: that loss averages over padded "
                             f"position slots, so extra padding changes it; leave "
                             f"data.pad_to_multiple_of unset")
        if cfg.data.packing:
            raise ValueError(f"data.packing=true with {name}.method=cdpo_code: that loss "
                             f"pairs positions of padded rows; set data.packing false")
    _number("policy.filter_eps", cfg.policy.filter_eps, low=0, high=1, low_open=True,
            high_open=True, optional=True)
    if cfg.policy.filter_eps is not None:
        from tisdpo import TISDPOLoss
        try:
            TISDPOLoss(cfg.policy.method, impl=cfg.policy.impl, strategy=cfg.policy.strategy,
                       filter_eps=cfg.policy.filter_eps)
        except ValueError as err:
            raise ValueError(f"policy.filter_eps={cfg.policy.filter_eps} with policy.method="
                             f"{cfg.policy.method}, policy.strategy={cfg.policy.strategy}, "
                             f"policy.impl={cfg.policy.impl}: {err}") from None
    if cfg.policy.strategy == "one_sweep":
        from tisdpo_kernels.strategy import one_sweep_unsupported

        why = one_sweep_unsupported(resolve_preset(cfg.policy.method)[0])
        if why is not None:
            raise ValueError(f"policy.strategy=one_sweep with policy.method="
                             f"{cfg.policy.method}: {why}; use policy.strategy recompute or "
                             f"auto")


def _check_weights(cfg) -> None:
    from tisdpo_kernels.config import WEIGHT_METHODS

    w = cfg.weights
    if w.method is not None and w.method not in WEIGHT_METHODS:
        _fail("weights.method", f"a weight rule, one of {list(WEIGHT_METHODS)}, or empty "
                                f"(the policy preset's rule)", w.method)
    _number("weights.k", w.k, low=0, low_open=True)
    _f32("weights.k", w.k)
    for attr in ("lower", "upper", "clip_lower", "clip_upper", "w_min", "w_max", "cdpo_b"):
        _number(f"weights.{attr}", getattr(w, attr))
        _f32(f"weights.{attr}", getattr(w, attr))
    if w.lower > w.upper:
        _fail("weights.lower", f"<= weights.upper={w.upper}", w.lower)
    if w.clip_lower >= w.clip_upper:
        _fail("weights.clip_lower", f"< weights.clip_upper={w.clip_upper}", w.clip_lower)
    if w.w_min > w.w_max:
        _fail("weights.w_min", f"<= weights.w_max={w.w_max}", w.w_min)
    _number("weights.top_percent", w.top_percent, low=0, high=100, low_open=True)
    _number("weights.round_decimals", w.round_decimals, low=0, high=8, integer=True,
            optional=True)
    _count("weights.batch_size", w.batch_size)
    if w.span != "token" and w.method == "cdpo":
        _fail("weights.span", "token with weights.method=cdpo (its scores are cDPO log-scores, "
                              "not c_t, and are not pooled)", w.span)
    if w.balance != "none" and w.method in ("threshold", "origin"):
        _fail("weights.balance", f"none with weights.method={w.method} (its weights can be "
                                 f"0 or negative: no mean to rescale to 1)", w.balance)


def _check_rest(cfg) -> None:
    _count("log.every", cfg.log.every)
    demo = cfg.demo
    _count("demo.policy_seeds", demo.policy_seeds)
    _count("demo.sample_prompts", demo.sample_prompts)
    _count("demo.samples_per_prompt", demo.samples_per_prompt)
    _count("demo.max_new_tokens", demo.max_new_tokens)
    _number("demo.temperature", demo.temperature, low=0, low_open=True)
    _f32("demo.temperature", demo.temperature)


def check_config(cfg, specs=()) -> None:
    """Every option of ``cfg`` (a ``RunConfig``) in range, cross-option rules included;
    ``specs``: the option specs whose ``choices`` are enforced (``config.field_specs()``)."""
    _check_choices(cfg, specs)
    _check_run(cfg)
    _check_model(cfg)
    _check_data(cfg)
    for name in TRAIN_SECTIONS:
        _check_train(name, getattr(cfg, name))
    _check_policy_name(cfg)
    _check_methods(cfg)
    _check_weights(cfg)
    _check_rest(cfg)
