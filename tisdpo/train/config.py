"""One run configuration, as nested dataclasses.

Every option has a default here, may be set in a YAML file (``--config run.yaml``, nested
by section) and on the command line as ``--section.option value``. Precedence, lowest
first: dataclass defaults < YAML file < command-line flags. The resolved configuration is
written to ``<run_dir>/config.yaml`` and printed when a command starts.

    seed: 0
    run_dir: runs/my-run
    model: {path: ./my-llama, dtype: bfloat16}
    policy: {method: tisdpo, lr: 5.0e-7}

Sections: ``model`` (which network), ``data`` (records, tokenisation), ``sft`` /
``contrastive`` / ``policy`` (one training stage each: optimiser, schedule, batch, loop),
``weights`` (offline token-weight estimation and the weight rule), ``pipeline`` (which
stages run), ``log`` (metrics and progress), ``demo`` (the synthetic demo's sizes),
``distributed`` (DDP / FSDP2 under torchrun).
"""
from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from tisdpo.train.config_file import ConfigFileError, load_yaml
from tisdpo.train.validation import check_config

__all__ = [
    "ModelConfig", "DataConfig", "TrainConfig", "SFTConfig", "ContrastiveConfig",
    "PolicyConfig", "WeightsConfig", "PipelineConfig", "LogConfig", "DemoConfig",
    "DistributedConfig", "RunConfig", "ConfigFileError", "apply_overrides", "build_config",
    "validate", "config_to_dict", "load_yaml", "field_specs", "dump_yaml", "as_recorded",
]


def opt(default, help: str, choices: tuple | None = None):
    """A config field with its ``--help`` text (and the allowed values, when a closed set)."""
    meta = {"help": help}
    if choices is not None:
        meta["choices"] = choices
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    path: str | None = opt(None, "local directory of any AutoModelForCausalLM (save_pretrained "
                                 "layout); empty builds the tiny demo Llama from the tiny_* sizes")
    tokenizer: str | None = opt(None, "tokenizer directory; default: the model directory, or the "
                                      "byte-level BPE tokenizer shipped with tisdpo")
    dtype: str = opt("float32", "compute dtype", ("float32", "bfloat16"))
    bf16_mode: str = opt("autocast", "with dtype=bfloat16: 'autocast' keeps fp32 weights and "
                                     "runs the forward under bf16 autocast; 'weights' stores the "
                                     "weights in bf16", ("autocast", "weights"))
    gradient_checkpointing: bool = opt(False, "activation checkpointing "
                                              "(model.gradient_checkpointing_enable)")
    attn_implementation: str = opt("sdpa", "attention backend passed to transformers "
                                           "(sdpa, eager, flash_attention_2, flex_attention)")
    check_head: bool = opt(True, "at load, check on a tiny probe batch that tisdpo's fused head "
                                 "(hidden states, LM-head weight, logit scale and soft cap) "
                                 "reproduces the model's own log-probabilities; refuse if not")
    tiny_hidden_size: int = opt(64, "tiny demo model: hidden size")
    tiny_layers: int = opt(2, "tiny demo model: decoder layers")
    tiny_heads: int = opt(4, "tiny demo model: attention heads")
    tiny_kv_heads: int = opt(2, "tiny demo model: key/value heads")
    tiny_intermediate_size: int = opt(128, "tiny demo model: MLP width")
    tiny_max_positions: int = opt(512, "tiny demo model: max position embeddings")
    tiny_tie_embeddings: bool = opt(True, "tiny demo model: tie input embeddings and LM head")


@dataclass
class DataConfig:
    train: str | None = opt(None, "training records: a .json/.jsonl/.parquet file or a "
                                  "save_to_disk directory with prompt/chosen/rejected; empty "
                                  "uses the synthetic demo task (tisdpo.train.synthetic)")
    eval: str | None = opt(None, "held-out records (same formats); empty holds out "
                                 "eval_fraction of train")
    synthetic_train: int = opt(1200, "with data.train empty: synthetic task training pairs")
    synthetic_eval: int = opt(200, "with data.train empty: synthetic task held-out pairs")
    synthetic_task: str = opt("easy", "with data.train empty: which synthetic task; easy: "
                                      "one-token good/bad words; hard: multi-token words whose "
                                      "quality depends on the prompt's audience "
                                      "(tisdpo.train.synthetic_hard)", ("easy", "hard"))
    eval_fraction: float = opt(0.05, "fraction of train held out when no eval file is given")
    max_records: int | None = opt(None, "use at most this many training records: the "
                                        "first of data.train, or, when the held-out pairs "
                                        "come from it, the first of its shuffled rest (the "
                                        "held-out pairs are drawn from the whole file)")
    max_length: int = opt(512, "max prompt+response tokens per sequence")
    max_prompt_length: int = opt(256, "max prompt tokens (the prompt is cut first)")
    truncation: str = opt("keep_start", "which end of an over-long prompt to keep",
                          ("keep_start", "keep_end"))
    add_bos: bool = opt(False, "prepend the tokenizer's BOS to plain-text prompts (chat records "
                               "get what their template renders)")
    eos: str = opt("preset", "whether the EOS token after each response counts in the loss: "
                             "'preset' follows the method (TIS-DPO presets: no, others: yes)",
                   ("preset", "count", "ignore"))
    skip_invalid: bool = opt(False, "drop invalid records (and report how many) instead of "
                                    "raising an error that names the record")
    packing: bool = opt(False, "padding-free packing: each micro-batch's pairs become one row "
                               "(attention does not cross sequences)")
    pad_to_multiple_of: int | None = opt(None, "round each batch's length up to a multiple of "
                                               "this (shape-stable compilation)")


@dataclass
class TrainConfig:
    """One training stage: optimiser, schedule, batching and the loop."""

    optimizer: str = opt("adamw", "optimiser", ("adamw", "rmsprop"))
    lr: float = opt(5e-7, "peak learning rate")
    weight_decay: float = opt(0.0, "decoupled weight decay (AdamW) / L2 (RMSprop) "
                                   "of the matrices; biases and norms are not decayed")
    adam_beta1: float = opt(0.9, "AdamW beta1")
    adam_beta2: float = opt(0.999, "AdamW beta2")
    eps: float = opt(1e-8, "optimiser epsilon")
    schedule: str = opt("constant", "after warmup: constant, linear decay to 0, or cosine to 0",
                        ("constant", "linear", "cosine"))
    warmup_steps: int = opt(150, "linear warmup steps: update k (from 0) uses "
                                 "lr·(k+1)/(warmup_steps+1), as the official code")
    batch_size: int = opt(8, "pairs (or sequences for SFT) per micro-batch")
    grad_accum: int = opt(1, "micro-batches per optimiser step; the loss is normalised over "
                             "the pairs of the whole accumulated batch")
    epochs: float = opt(1.0, "passes over the training data (ignored when max_steps > 0)")
    max_steps: int = opt(0, "optimiser steps; 0 means derive from epochs")
    max_grad_norm: float | None = opt(10.0, "clip the gradient norm to this (empty: none; "
                                            "it is logged and checked either way)")
    eval_every: int = opt(0, "evaluate every N steps (0: only at the end)")
    eval_batch_size: int = opt(16, "pairs per evaluation batch")
    eval_max_pairs: int | None = opt(None, "evaluate on at most this many held-out pairs")
    save_every: int = opt(0, "write a resumable checkpoint every N steps (0: only at the end)")
    keep_checkpoints: int = opt(2, "how many step checkpoints to keep")
    stop_after: int | None = opt(None, "stop at step N (checkpointed, resumable); rerun "
                                       "without it, or with a larger N, to continue")


@dataclass
class SFTConfig(TrainConfig):
    enabled: bool = opt(False, "pipeline: run supervised fine-tuning on chosen responses first")
    lr: float = opt(5e-5, "peak learning rate")
    weight_decay: float = opt(0.01, "decoupled weight decay (AdamW) / L2 (RMSprop) "
                                    "of the matrices; biases and norms are not decayed")
    warmup_steps: int = opt(10, "linear warmup steps")
    epochs: float = opt(3.0, "passes over the data")


@dataclass
class ContrastiveConfig(TrainConfig):
    variant: str = opt("dpo", "how pi+ and pi- are made: 'dpo' = DPO on the pairs and on the "
                              "reversed pairs (TIS-DPO(D)); 'sft' = SFT on chosen and on "
                              "rejected (TIS-DPO(S)); 'prompt' = one model with a positive and "
                              "a negative system prompt, no training (TIS-DPO(P))",
                       ("dpo", "sft", "prompt"))
    method: str = opt("dpo", "loss preset for the 'dpo' variant")
    beta: float = opt(0.1, "beta of the contrastive DPO runs")
    positive_prompt: str = opt(
        "You are a helpful and harmless assistant. Answer well and safely.\n\n",
        "'prompt' variant: text prepended to every prompt for pi+")
    negative_prompt: str = opt(
        "You are an unhelpful and harmful assistant. Answer badly.\n\n",
        "'prompt' variant: text prepended to every prompt for pi-")
    lr: float = opt(1e-5, "peak learning rate")
    weight_decay: float = opt(0.01, "decoupled weight decay (AdamW) / L2 (RMSprop) "
                                    "of the matrices; biases and norms are not decayed")


@dataclass
class PolicyConfig(TrainConfig):
    name: str = opt("policy", "the policy's folder: 'policy' = <run_dir>/policy; any other "
                              "name = <run_dir>/policies/<name> (letters, digits, . _ -), so "
                              "several policies share one run's sft, contrastive and weights "
                              "stages; a folder name, not an option of the result")
    seed: int | None = opt(None, "this policy's seed: data order and random weights (empty: "
                                 "the run's seed, which also makes the base model and data); "
                                 "name seeds <method>-s<seed> for tisdpo compare")
    method: str = opt("tisdpo", "loss preset (tisdpo_kernels.PRESETS): dpo, ipo, simpo, tdpo1, "
                                "tdpo2, cdpo, tisdpo, tisdpo_paper, ...")
    beta: float | None = opt(None, "override the preset's beta")
    token_weights: str = opt(
        "auto", "token weights used in the loss: 'auto' = the stored weight columns when the "
                "preset is token-weighted (made by another rule: its own rule applied to the "
                "stored scores), none otherwise; 'stored' = require them; 'recompute' "
                "= apply the weights.* rule to the stored scores; 'equal' = 1 on every response "
                "token; 'random' = U(weights.w_min, weights.w_max) per token (ablation)",
        ("auto", "stored", "recompute", "equal", "random"))
    impl: str = opt("auto", "kernel backend: auto (triton on CUDA, torch on CPU), triton, torch, "
                            "reference", ("auto", "triton", "torch", "reference"))
    strategy: str = opt("auto", "how the loss forms the LM head's gradients: recompute (logits "
                                "again in the backward), one_sweep (all in the forward), auto "
                                "(one_sweep on CUDA for pairs that fit one chunk of its sweep or "
                                "reach TISDPO_ONE_SWEEP_MIN_TOKENS tokens, memory allowing)",
                        ("auto", "one_sweep", "recompute"))
    filter_eps: float | None = opt(None, "opt-in gradient filtering of the policy head's "
                                         "backward (docs/FILTERING.md): a probability threshold "
                                         "in (0, 1); empty = exact gradients")
    optimizer: str = opt("rmsprop", "optimiser", ("adamw", "rmsprop"))


@dataclass
class WeightsConfig:
    method: str | None = opt(None, "weight rule: exp_clamp (paper), rank_based (official code), "
                                   "threshold_and_scale, threshold, binary, origin, cdpo; "
                                   "empty: the policy preset's rule (rank_based for tisdpo)")
    k: float = opt(1.0, "exp_clamp: scale k")
    lower: float = opt(-0.5, "exp_clamp: L, the clamp on c_t before exp")
    upper: float = opt(1.5, "exp_clamp: U")
    clip_lower: float = opt(-1.5, "threshold(_and_scale): lower clip of the score")
    clip_upper: float = opt(1.5, "threshold(_and_scale): upper clip of the score")
    w_min: float = opt(0.7, "rank_based / threshold_and_scale / random: lowest weight")
    w_max: float = opt(1.3, "rank_based / threshold_and_scale / random: highest weight")
    top_percent: float = opt(100.0, "binary: weight 1 on this top percentage of tokens")
    only_neg: bool = opt(True, "cdpo: chosen tokens keep weight 1 (the released code); false: "
                               "chosen weight s_t")
    cdpo_b: float = opt(1.0, "cdpo: b in the contrastive score softmax((1+b) z+ - b z-)")
    round_decimals: int | None = opt(None, "round c_t to this many decimals (official code: 2)")
    span: str = opt("token", "score unit before the rule: token (c_t as is); word (c_t "
                             "pooled over each word's pieces); column (pooled over the "
                             "records' chosen_span/rejected_span ids; see "
                             "tisdpo.pipeline.spans)", ("token", "word", "column"))
    span_reduce: str = opt("sum", "span pooling: sum (each piece gets the span's summed c_t) "
                                  "or mean (the span's mean c_t)", ("sum", "mean"))
    balance: str = opt("none", "rescale the rule's weights after it: none; sequence (mean 1 "
                               "over each response's tokens); side (mean 1 over all chosen "
                               "tokens and over all rejected tokens of a split)",
                       ("none", "sequence", "side"))
    batch_size: int = opt(16, "pairs per batch in the estimation pass")
    ref_logps: bool = opt(True, "also store reference log-probs so policy training needs no "
                                "reference model (unless its loss has a KL term)")
    jsonl: bool = opt(True, "also export the weighted datasets as JSONL next to the "
                            "save_to_disk directories")
    impl: str = opt("auto", "kernel backend for the log-prob pass",
                    ("auto", "triton", "torch", "reference"))


@dataclass
class PipelineConfig:
    reference: str = opt("auto", "reference model of every DPO-family stage: 'auto' = the SFT "
                                 "model when SFT ran, else the base model; 'base'; 'sft'",
                         ("auto", "base", "sft"))
    resume: bool = opt(True, "continue a stage from its latest checkpoint and skip finished "
                             "stages; false starts each stage afresh")


@dataclass
class LogConfig:
    every: int = opt(10, "log metrics to metrics.jsonl (and the progress bar) every N steps")
    tensorboard: bool = opt(True, "also write TensorBoard events when tensorboard is installed")
    progress: bool = opt(True, "show a tqdm progress bar")


@dataclass
class DemoConfig:
    fast: bool = opt(False, "tiny sizes for tests (seconds, numbers meaningless)")
    policy_seeds: int = opt(3, "train every compared policy this many times (seeds = seed, "
                               "seed+1, ...; they change the data order and the random "
                               "weights); the table reports the mean and its standard error "
                               "across seeds")
    sample_prompts: int = opt(200, "prompts of held-out pairs sampled for the task reward")
    samples_per_prompt: int = opt(2, "responses sampled per prompt (with do_sample)")
    max_new_tokens: int = opt(24, "tokens generated per sampled response")
    do_sample: bool = opt(True, "sample one response per prompt (fixed seed); false: greedy")
    temperature: float = opt(1.0, "sampling temperature (with do_sample)")
    token_scores: bool = opt(False, "with weights.span word or column: also train TIS-DPO "
                                    "with the same rule on the per-token scores (an "
                                    "ablation row)")


@dataclass
class DistributedConfig:
    """Several processes under torchrun (tisdpo.train.parallel); ``none`` = one process."""

    mode: str = opt("none", "none: one process; ddp: DistributedDataParallel (full replica "
                            "per GPU); fsdp2: torch.distributed.fsdp.fully_shard (parameters, "
                            "gradients and optimiser state sharded). Launch with torchrun; each "
                            "stage's batch_size is then per process", ("none", "ddp", "fsdp2"))
    mixed_precision: str = opt("auto", "fsdp2: bf16 = gather parameters and compute in bf16, "
                                       "fp32 sharded master weights and fp32 gradient "
                                       "reduction; none = the model's dtype; auto = bf16 when "
                                       "model.dtype=bfloat16", ("auto", "bf16", "none"))
    reshard_after_forward: bool = opt(True, "fsdp2: free gathered layer weights after "
                                            "forward (re-gathered for backward); false keeps "
                                            "them, trading memory for fewer all-gathers")
    timeout_minutes: int = opt(30, "collective timeout (also how long ranks wait for rank 0 "
                                   "to write checkpoints and merged datasets)")


@dataclass
class RunConfig:
    seed: int = opt(0, "seed for model init, data order, sampling and ablation weights")
    run_dir: str = opt("runs/tisdpo", "directory holding every stage's outputs and checkpoints")
    device: str = opt("auto", "auto (cuda when available), cpu, cuda, cuda:N, mps")
    threads: int | None = opt(None, "CPU threads for torch (torch.set_num_threads); empty: "
                                    "torch's default")
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    contrastive: ContrastiveConfig = field(default_factory=ContrastiveConfig)
    weights: WeightsConfig = field(default_factory=WeightsConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    log: LogConfig = field(default_factory=LogConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)


# ---------------------------------------------------------------- introspection and parsing

@dataclass(frozen=True)
class FieldSpec:
    """One leaf option: its dotted name, base type, whether it may be empty, help, choices."""

    name: str
    type: type
    optional: bool
    default: Any
    help: str
    choices: tuple | None


def _leaf_type(tp) -> tuple[type, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    if origin is Literal:
        return type(typing.get_args(tp)[0]), False
    return tp, False


def field_specs(cls=RunConfig, prefix: str = "") -> list[FieldSpec]:
    """Every leaf option of ``cls`` with its dotted name, in declaration order."""
    hints = typing.get_type_hints(cls)
    out: list[FieldSpec] = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += field_specs(tp, f"{prefix}{f.name}.")
            continue
        base, optional = _leaf_type(tp)
        default = f.default if f.default is not dataclasses.MISSING else None
        out.append(FieldSpec(prefix + f.name, base, optional, default,
                             f.metadata.get("help", ""), f.metadata.get("choices")))
    return out


_SPECS: dict[str, FieldSpec] | None = None


def _spec(name: str) -> FieldSpec:
    global _SPECS
    if _SPECS is None:
        _SPECS = {s.name: s for s in field_specs()}
    if name not in _SPECS:
        close = [k for k in _SPECS if k.split(".")[-1] == name.split(".")[-1]]
        hint = f"; did you mean {close}?" if close else ""
        raise ValueError(f"unknown config option {name!r}{hint}")
    return _SPECS[name]


def coerce(name: str, value: Any) -> Any:
    """``value`` (from YAML or a command-line string) converted to option ``name``'s type."""
    spec = _spec(name)
    empty = value is None or (isinstance(value, str) and value.strip().lower() in
                              ("", "none", "null"))
    if empty and spec.optional:
        return None
    if value is None or (empty and spec.type is not str):
        raise ValueError(f"config option {name} may not be empty (got {value!r})")
    tp = spec.type
    try:
        if tp is bool:
            if isinstance(value, bool):
                out = value
            elif isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on"):
                out = True
            elif isinstance(value, str) and value.strip().lower() in ("0", "false", "no", "off"):
                out = False
            else:
                raise ValueError
        elif tp is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            out = int(value)
        elif tp is float:
            if isinstance(value, bool):
                raise ValueError
            out = float(value)
            if not math.isfinite(out):
                raise ValueError
        else:
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError
            out = str(value)
    except (TypeError, ValueError):
        raise ValueError(f"config option {name} expects {tp.__name__}"
                         f"{' or empty' if spec.optional else ''}, got {value!r}") from None
    if spec.choices is not None and out not in spec.choices:
        raise ValueError(f"config option {name} must be one of {list(spec.choices)}, got {out!r}")
    return out


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if not isinstance(k, str):
            raise ValueError(f"config key {k!r} under {prefix.rstrip('.') or 'the top level'} "
                             f"must be a string")
        name = prefix + k
        if isinstance(v, dict):
            out.update(_flatten(v, name + "."))
        else:
            out[name] = v
    return out


def apply_overrides(cfg: RunConfig, overrides: dict[str, Any]) -> RunConfig:
    """Set options from a nested dict or a flat ``{"section.option": value}`` dict, in place
    (a section left empty, ``policy:`` with nothing under it, sets nothing)."""
    sections = {s.name.split(".")[0] for s in field_specs() if "." in s.name}
    for name, value in _flatten(overrides).items():
        if name in sections:
            if value is None:
                continue
            raise ValueError(f"config section {name} must be a mapping of its options "
                             f"({name}: {{option: value, ...}}), got {value!r}")
        spec = _spec(name)
        obj = cfg
        *path, leaf = spec.name.split(".")
        for part in path:
            obj = getattr(obj, part)
        setattr(obj, leaf, coerce(name, value))
    return cfg


def config_to_dict(cfg: RunConfig) -> dict:
    return dataclasses.asdict(cfg)


def as_recorded(cfg: RunConfig) -> RunConfig:
    """``cfg`` as a run's config.yaml records it: the options that steer one command alone
    (``pipeline.resume``, each stage's ``stop_after``) at their defaults, so that the next
    command given the file neither redoes finished stages nor stops again."""
    steps = {f.name: dataclasses.replace(getattr(cfg, f.name), stop_after=None)
             for f in dataclasses.fields(cfg) if isinstance(getattr(cfg, f.name), TrainConfig)}
    return dataclasses.replace(cfg, pipeline=dataclasses.replace(cfg.pipeline, resume=True),
                               **steps)


def dump_yaml(cfg: RunConfig, path: str | None = None) -> str:
    """The resolved configuration as YAML (written to ``path`` when given, whole or not at
    all: a write cut short leaves the previous file)."""
    import yaml

    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False, allow_unicode=True)
    if path is not None:
        tmp = f"{path}.tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    return text


def validate(cfg: RunConfig) -> RunConfig:
    """Every option in range, closed sets and cross-option rules included
    (``tisdpo.train.validation``); a one-line ValueError names the option, the value and
    what is allowed."""
    check_config(cfg, field_specs())
    return cfg


def build_config(yaml_path: str | None = None, overrides: dict[str, Any] | None = None,
                 base: RunConfig | None = None, *, check: bool = True) -> RunConfig:
    """Defaults (or ``base``), then the YAML file, then ``overrides`` (CLI flags); validated
    unless ``check`` is false (a probe of a few options, before the defaults that apply are
    known)."""
    cfg = base if base is not None else RunConfig()
    if yaml_path:
        data = load_yaml(yaml_path)
        try:
            apply_overrides(cfg, data)
        except ValueError as err:
            raise ConfigFileError(yaml_path, str(err)) from None
    if overrides:
        apply_overrides(cfg, overrides)
    return validate(cfg) if check else cfg
