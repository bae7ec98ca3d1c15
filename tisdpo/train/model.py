"""Models: load a local causal LM (or build the tiny demo one) and run it up to the head.

The training code never asks a model for logits. :func:`hidden_states` runs the decoder
(``model.<base_model_prefix>``, i.e. ``model.model`` for Llama/Qwen/Mistral) and returns the
last hidden state, the input of ``lm_head``; :func:`head` returns the LM-head weight and bias,
the logit softcap and scale, which the fused ops take instead of logits (both live in
``tisdpo.train.headcheck`` with :func:`check_head`, which :func:`load_model` runs on every
model it loads unless ``model.check_head`` is false). Tied embeddings need nothing special:
the head weight *is* the embedding matrix and gets both gradients.
"""
from __future__ import annotations

import contextlib
import logging
import os
import weakref

import torch

from tisdpo.train.config import ModelConfig
from tisdpo.train.headcheck import (
    HeadSpec, check_head, config_value, decoder, head, hidden_states,
)
from tisdpo.train.validation import DEVICE_FORMS, DEVICE_RE

_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "config.json")

__all__ = [
    "HeadSpec", "build_tiny_model", "load_model", "load_tokenizer", "hidden_states", "head",
    "disable_dropout", "config_as_loaded", "autocast", "compute_dtype", "resolve_device",
    "save_model", "enable_activation_checkpointing", "check_model_dir", "check_head", "decoder",
]

log = logging.getLogger("tisdpo")


def resolve_device(name: str) -> torch.device:
    """``auto`` is the first CUDA device when there is one, else the CPU; otherwise one of
    ``DEVICE_FORMS`` (cpu, cuda, cuda:N, mps), which must be available here."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(name, str) or not DEVICE_RE.match(name):
        raise ValueError(f"device must be one of {DEVICE_FORMS}, got {name!r}")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r}: CUDA is not available here; use 'cpu' or 'auto'")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device={name!r}: this machine has {torch.cuda.device_count()} CUDA "
                         f"device(s) (cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) is not None
                                  and torch.backends.mps.is_available()):
        raise ValueError(f"device={name!r}: MPS is not available here; use 'cpu' or 'auto'")
    return dev


def check_model_dir(path: str, option: str = "model.path") -> None:
    """``path`` is a local Hugging Face model folder (a directory with ``config.json``);
    else a one-line ValueError naming ``option`` — before transformers guesses at it."""
    if not os.path.isdir(path):
        raise ValueError(f"{option} {path!r} is not a local directory (tisdpo never downloads; "
                         f"save the model with save_pretrained first)")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"{option} {path}: no config.json, not a Hugging Face model folder")


def _check_tokenizer_dir(path: str) -> None:
    if not os.path.isdir(path):
        raise ValueError(f"model.tokenizer {path!r} is not a local directory (tisdpo never "
                         f"downloads)")
    if not any(os.path.isfile(os.path.join(path, f)) for f in _TOKENIZER_FILES):
        raise ValueError(f"model.tokenizer {path}: none of {', '.join(_TOKENIZER_FILES)}, not "
                         f"a Hugging Face tokenizer folder")


def compute_dtype(cfg: ModelConfig) -> torch.dtype:
    return torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32


def _weight_dtype(cfg: ModelConfig) -> torch.dtype:
    return torch.bfloat16 if (cfg.dtype == "bfloat16" and cfg.bf16_mode == "weights") \
        else torch.float32


def autocast(cfg: ModelConfig, device: torch.device):
    """bf16 autocast for ``dtype=bfloat16, bf16_mode=autocast``; a no-op context otherwise."""
    if cfg.dtype == "bfloat16" and cfg.bf16_mode == "autocast":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def load_tokenizer(cfg: ModelConfig, path: str | None = None):
    """The tokenizer of ``cfg.tokenizer``, else of the model directory, else tisdpo's own.

    A tokenizer without a pad token gets EOS as pad (labels, not the pad id, mark padding).
    """
    src = cfg.tokenizer or path or cfg.path
    if src:
        if cfg.tokenizer:
            _check_tokenizer_dir(src)
        else:
            check_model_dir(src, "model.path" if src == cfg.path else "model")
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(src)
    else:
        from tisdpo.train.synthetic import load_tokenizer as shipped

        tok = shipped()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def build_tiny_model(cfg: ModelConfig, vocab_size: int, *, seed: int = 0, tokenizer=None):
    """A small random-initialised Llama (seeded; no download): the demo's model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    extra = {}
    if tokenizer is not None:
        extra = {k: getattr(tokenizer, k) for k in ("bos_token_id", "eos_token_id",
                                                     "pad_token_id")}
    conf = LlamaConfig(
        vocab_size=vocab_size, hidden_size=cfg.tiny_hidden_size,
        intermediate_size=cfg.tiny_intermediate_size, num_hidden_layers=cfg.tiny_layers,
        num_attention_heads=cfg.tiny_heads, num_key_value_heads=cfg.tiny_kv_heads,
        max_position_embeddings=cfg.tiny_max_positions,
        tie_word_embeddings=cfg.tiny_tie_embeddings, attention_dropout=0.0,
        attn_implementation=cfg.attn_implementation, **extra)
    with _fork_rng(seed):
        model = LlamaForCausalLM(conf)
    if cfg.tiny_tie_embeddings:
        model.tie_weights()
    return model


@contextlib.contextmanager
def _fork_rng(seed: int):
    state = torch.get_rng_state()
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.set_rng_state(state)


def load_model(cfg: ModelConfig, path: str | None = None, *, device: torch.device,
               tokenizer=None, seed: int = 0, trainable: bool = True):
    """The model at ``path`` (or ``cfg.path``; the tiny demo model when both are empty).

    Returns it on ``device`` in the weight dtype of ``cfg`` with dropout disabled, in train
    mode with activation checkpointing as configured when ``trainable``, else frozen in eval
    mode (reference and contrastive models).
    """
    src = path or cfg.path
    if src:
        check_model_dir(src, "model.path" if src == cfg.path else "model")
        from transformers import AutoModelForCausalLM

        model = _from_pretrained(AutoModelForCausalLM, src, cfg)
    else:
        if tokenizer is None:
            raise ValueError("building the tiny demo model needs the tokenizer (vocab size)")
        model = build_tiny_model(cfg, len(tokenizer), seed=seed, tokenizer=tokenizer)
    model.to(device=device, dtype=_weight_dtype(cfg))
    disable_dropout(model)
    if cfg.check_head:
        check_head(model, autocast=autocast(cfg, device))
    if trainable:
        _refuse_router_aux_loss(model, src or "(the tiny demo model)")
        model.train()
        if cfg.gradient_checkpointing:
            enable_activation_checkpointing(model)
    else:
        model.eval()
        model.requires_grad_(False)
    return model


#: config fields that weight a mixture-of-experts load-balancing loss in a model's forward
_AUX_LOSS_COEFS = ("router_aux_loss_coef", "aux_loss_coef")


def _refuse_router_aux_loss(model, src: str) -> None:
    """A mixture-of-experts config that asks for its load-balancing loss in training: the
    objective is computed from the hidden states and never adds it, so refuse, not drop it."""
    if not config_value(model, "output_router_logits"):
        return
    ffn = config_value(model, "ffn_config")                     # DBRX keeps it there
    ffn = ffn if isinstance(ffn, dict) else vars(ffn) if ffn is not None else {}
    coefs = {name: config_value(model, name) for name in _AUX_LOSS_COEFS}
    coefs["ffn_config.moe_loss_weight"] = ffn.get("moe_loss_weight")
    name, coef = next(((n, c) for n, c in coefs.items() if c), (None, 0))
    if coef:
        raise ValueError(f"model {src}: its config sets output_router_logits with {name}="
                         f"{coef}, but tisdpo's objectives do not add the mixture-of-experts "
                         f"load-balancing loss; set output_router_logits to false in its "
                         f"config.json to train without it")


def _from_pretrained(auto, src: str, cfg: ModelConfig):
    """``from_pretrained`` with ``cfg.attn_implementation``; the default ``sdpa`` falls back to
    ``eager`` (with a log line) for a class that does not support it, any other choice raises
    a one-line error naming the option. A checkpoint that lacks weights the model has is
    refused (:func:`_all_weights`)."""
    try:
        loaded = auto.from_pretrained(src, dtype=_weight_dtype(cfg), output_loading_info=True,
                                      attn_implementation=cfg.attn_implementation)
    except (ValueError, ImportError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "attention" not in msg.lower() or cfg.attn_implementation == "eager":
            raise
        if cfg.attn_implementation != "sdpa":
            raise ValueError(f"--model.attn_implementation {cfg.attn_implementation}: not "
                             f"usable for {src} ({msg}); choose another, e.g. eager or sdpa"
                             ) from None
        log.warning("model %s does not support attn_implementation=sdpa; using eager", src)
        loaded = auto.from_pretrained(src, dtype=_weight_dtype(cfg), output_loading_info=True,
                                      attn_implementation="eager")
    return _all_weights(src, *loaded)


def _all_weights(src: str, model, info: dict):
    """``model``, refused when its checkpoint lacked weights the model has: transformers
    starts those at random from the unseeded global generator (and its warning is silenced
    here), so each load of the folder (policy, reference, every stage) would differ."""
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3
                                          else "")
        raise ValueError(f"model {src}: its checkpoint lacks {shown}, which the model has; "
                         f"loading would start them at random (a base model without its "
                         f"LM head, or an incomplete save?)")
    return model


def enable_activation_checkpointing(model) -> None:
    """Recompute each decoder layer in backward (non-reentrant): transformers' own switch,
    ``activation_checkpointing_enable`` where it exists (>= 5.x), else
    ``gradient_checkpointing_enable``."""
    model.config.use_cache = False
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False})


def save_model(model, out_dir: str, tokenizer=None) -> None:
    os.makedirs(out_dir, exist_ok=True)
    with config_as_loaded(model):
        model.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)


#: by id of a config, the rates disable_dropout zeroed there: {name: value it had}; an entry
#: goes with its config (configs define __eq__, so they are not keys of a weak dict)
_ZEROED: dict[int, dict] = {}


def _is_rate(name: str, value) -> bool:
    """A dropout-like rate: a non-zero float whose name says drop (dropout, attn_pdrop,
    residual_dropout, activation_dropout, layerdrop, ...)."""
    return "drop" in name.lower() and isinstance(value, float) and value != 0.0


def _configs_of(model) -> list:
    """Every transformers config the model's modules hold, with the configs nested in them
    (text_config, attn_config, ...), each once."""
    from transformers import PretrainedConfig

    found, todo = {}, [getattr(m, "config", None) for m in model.modules()]
    while todo:
        conf = todo.pop()
        if isinstance(conf, PretrainedConfig) and id(conf) not in found:
            found[id(conf)] = conf
            todo += [v for v in vars(conf).values() if isinstance(v, PretrainedConfig)]
    return list(found.values())


def disable_dropout(model) -> None:
    """Dropout off everywhere (as the official TIS-DPO code): every ``nn.Dropout``, and every
    rate whose name says drop (:func:`_is_rate`) on the modules and on the configs that some
    architectures read in their forward (Falcon's hidden_dropout, Persimmon's
    attention_dropout, OPT's layerdrop, GPT-BigCode's attn_pdrop, ...). The configs read 0
    from then on; what :func:`save_model` writes keeps their own rates
    (:func:`config_as_loaded`), also for another model sharing a config (a plain
    ``save_pretrained``, or a copy of the model made by deepcopy or pickle, writes the
    zeros).

    The model stays in train mode (activation checkpointing only runs in train mode).
    """
    for conf in _configs_of(model):
        zeroed = _ZEROED.get(id(conf))
        if zeroed is None:
            zeroed = _ZEROED[id(conf)] = {}
            weakref.finalize(conf, _ZEROED.pop, id(conf), None)
        for name, value in list(vars(conf).items()):
            if _is_rate(name, value):
                zeroed[name] = value
                setattr(conf, name, 0.0)
    for mod in model.modules():
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.0
        for name, value in list(vars(mod).items()):
            if _is_rate(name, value):
                setattr(mod, name, 0.0)


@contextlib.contextmanager
def config_as_loaded(model):
    """Within: the model's configs hold the rates :func:`disable_dropout` zeroed, so that a
    saved ``config.json`` is the model's own."""
    zeroed = [(conf, name, value, getattr(conf, name, None)) for conf in _configs_of(model)
              for name, value in _ZEROED.get(id(conf), {}).items()]
    for conf, name, value, _ in zeroed:
        setattr(conf, name, value)
    try:
        yield
    finally:
        for conf, name, _, now in zeroed:             # as they were, a user's change kept
            setattr(conf, name, now)
