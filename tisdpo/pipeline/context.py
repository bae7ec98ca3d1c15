"""What every stage of a run shares: the run's context (config, device, tokenizer, processes),
where the models of earlier stages are, the preference records, their tokenisation and the
collators, and the per-token column names the weights stage writes.
"""
from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass

import datasets
import torch

from tisdpo.pipeline.fingerprint import (
    OPTIONS_FILE, StageOptionsChanged, check_ignored_options, check_options,
    contrastive_options, stage_options,
)
from tisdpo.train.checkpoint import read_done, stage_done
from tisdpo.train.collate import PackedPairCollator, PaddedPairCollator
from tisdpo.train.config import RunConfig
from tisdpo.train.data import (
    TokenizeConfig, eos_counted_for_preset, load_preference_dataset, tokenize_pairs,
)
from tisdpo.train.model import autocast, load_model, load_tokenizer, resolve_device, save_model
from tisdpo.train.packcheck import check_packing
from tisdpo.train.parallel import Parallel, setup
from tisdpo.train.synthetic import make_synthetic_task

__all__ = ["Context", "StageStopped", "make_context", "base_model_path", "init_path",
           "reference_path", "load_stage_model", "load_records", "tokenize_cfg",
           "tokenize_records", "make_collator", "contrastive_models", "SCORE_COLUMNS",
           "WEIGHT_COLUMNS", "REF_COLUMNS"]

log = logging.getLogger("tisdpo")
SCORE_COLUMNS = ("chosen_score", "rejected_score")
WEIGHT_COLUMNS = ("chosen_weight", "rejected_weight")
REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")


class StageStopped(Exception):
    """A training stage stopped early (``stop_after``, or SIGTERM / SIGINT: ``signal`` names
    it), checkpointed and resumable."""

    def __init__(self, stage: str, step: int, signal: str | None = None):
        how = ("run the same command again to resume" if signal else
               "rerun without stop_after, or with a larger one, to continue")
        why = f" on {signal}" if signal else ""
        super().__init__(f"{stage}: stopped{why} after step {step}, checkpointed; {how}")
        self.stage, self.step, self.signal = stage, step, signal


@dataclass
class Context:
    cfg: RunConfig
    device: torch.device
    tokenizer: object
    par: object = None      # tisdpo.train.parallel.Parallel (None: one process)

    def __post_init__(self):
        if self.par is None:
            self.par = Parallel()

    def path(self, *parts: str) -> str:
        return os.path.join(self.cfg.run_dir, *parts)


def make_context(cfg: RunConfig) -> Context:
    """Device, tokenizer and run directory of a command (sets torch's CPU threads if asked)."""
    os.makedirs(cfg.run_dir, exist_ok=True)
    if cfg.threads is not None:
        if cfg.threads < 1:
            raise ValueError(f"threads must be >= 1, got {cfg.threads}")
        torch.set_num_threads(cfg.threads)
    par = setup(cfg.distributed, cfg.device, cfg.model.dtype)   # torchrun: one rank of many
    if not par.is_main:
        log.setLevel(logging.WARNING)
    device = par.device if par.distributed else resolve_device(cfg.device)
    return Context(cfg, device, load_tokenizer(cfg.model), par)


# ---------------------------------------------------------------------------- models

def base_model_path(ctx: Context) -> str:
    """``model.path``, or ``run_dir/base`` holding the seeded tiny demo model (made once)."""
    if ctx.cfg.model.path:
        return ctx.cfg.model.path
    out = ctx.path("base")
    # the model's sizes and the seed make the base: another choice is refused, never mixed
    every = stage_options(ctx.cfg, ())
    options = {"options": {k: v for k, v in every["options"].items()
                           if k == "seed" or k.startswith("model.")}, "upstream": {},
               "inputs": {k: v for k, v in every["inputs"].items() if k.startswith("model.")}}
    with ctx.par.main_first():
        made = os.path.isfile(os.path.join(out, "config.json"))
        check_options(out, options, desc="base model", resume=made, reusable=made,
                      is_main=ctx.par.is_main and made)
        if made and ctx.par.is_main and not os.path.isfile(os.path.join(out, OPTIONS_FILE)):
            # made before options were recorded: accepted, and from now on checked
            check_options(out, options, desc="base model", resume=False, reusable=False)
        if not made:
            model = load_model(ctx.cfg.model, None, device=torch.device("cpu"),
                               tokenizer=ctx.tokenizer, seed=ctx.cfg.seed, trainable=False)
            save_model(model, out + ".tmp", ctx.tokenizer)
            # recorded before the folder is in place: a base is never there without them
            check_options(out + ".tmp", options, desc="base model", resume=False,
                          reusable=False, is_main=ctx.par.is_main)
            shutil.rmtree(out, ignore_errors=True)
            os.replace(out + ".tmp", out)
    return out


def init_path(ctx: Context) -> str:
    """Where every preference stage starts: the SFT model when SFT ran, else the base."""
    sft = ctx.path("sft")
    return os.path.join(sft, "final") if stage_done(sft) else base_model_path(ctx)


def reference_path(ctx: Context) -> str:
    choice = ctx.cfg.pipeline.reference
    sft = ctx.path("sft")
    if choice == "sft":
        if not stage_done(sft):
            raise ValueError("pipeline.reference=sft but the sft stage has not run "
                             f"({sft}/done.json missing); run `tisdpo sft` first")
        return os.path.join(sft, "final")
    if choice == "base":
        return base_model_path(ctx)
    return init_path(ctx)


def load_stage_model(ctx: Context, path: str, *, trainable: bool, packed: bool = False):
    """The model at ``path`` (:func:`load_model`); ``packed``: it runs the stage's batches,
    packed under ``data.packing``, and is then checked to keep packed sequences apart
    (:func:`check_packing`)."""
    # a model FSDP2 will train loads on the CPU; fully_shard moves it layer by layer
    device = ctx.par.load_device(ctx.device) if trainable else ctx.device
    model = load_model(ctx.cfg.model, path, device=device, tokenizer=ctx.tokenizer,
                       seed=ctx.cfg.seed, trainable=trainable)
    if packed and ctx.cfg.data.packing:
        check_packing(model, autocast=autocast(ctx.cfg.model, device))
    return model


# ---------------------------------------------------------------------------- data

def load_records(ctx: Context):
    """(train, eval) raw preference records; the synthetic task (``data.synthetic_task``:
    easy or hard) when data.train is empty.

    The files are read and checked whole, before ``data.eval_fraction`` of train is held
    out (a shuffled split), so a bad record is named by its file, line and field
    (``data.train pairs.jsonl line 5 (record 4), field 'chosen': missing``); with
    ``data.skip_invalid`` invalid records load and tokenisation drops them. Records from
    files carry their position in the column ``SOURCE_COLUMN``, so that what only
    tokenisation finds (per-token list lengths, the EOS rule, chat templates) is named the
    same way after the split; ``tokenize_pairs`` drops it.
    """
    cfg = ctx.cfg
    check_ignored_options(cfg)

    def load(option: str):
        path = getattr(cfg.data, option)
        try:
            return load_preference_dataset(path, check_records=not cfg.data.skip_invalid,
                                           source_prefix=f"data.{option} ",
                                           held_out=option == "eval")
        except FileNotFoundError:
            raise FileNotFoundError(f"data.{option} {path}: no such file or directory") \
                from None
        except ValueError as err:
            msg = str(err)
            if msg.startswith("path_or_dir: "):
                msg = f"{path}: {msg.removeprefix('path_or_dir: ')}"
            raise ValueError(f"data.{option} {msg}") from None

    if not cfg.data.train:
        train, test, _ = make_synthetic_task(cfg.data.synthetic_train, cfg.data.synthetic_eval,
                                             seed=cfg.seed, task=cfg.data.synthetic_task)
        train, test = datasets.Dataset.from_list(train), datasets.Dataset.from_list(test)
    else:
        train = load("train")
        if cfg.data.eval:
            test = load("eval")
        else:
            if len(train) < 2:
                raise ValueError(f"data.train {cfg.data.train}: {len(train)} record; holding "
                                 f"out data.eval_fraction needs 2 or more (or give data.eval)")
            n_eval = min(len(train) - 1, max(1, round(len(train) * cfg.data.eval_fraction)))
            split = train.train_test_split(test_size=n_eval, seed=cfg.seed, shuffle=True)
            train, test = split["train"], split["test"]
    if cfg.data.max_records is not None:
        train = train.select(range(min(cfg.data.max_records, len(train))))
    if cfg.data.train and not (cfg.model.tokenizer or cfg.model.path):
        warn_builtin_tokenizer(ctx.tokenizer, train, cfg.data.train)
    if cfg.data.train and not cfg.data.add_bos:
        warn_no_bos(ctx.tokenizer, train, cfg.data.train)
    return train, test


#: data files already checked by :func:`warn_builtin_tokenizer` in this process
_TOKENIZER_CHECKED: set = set()
#: data files already checked by :func:`warn_no_bos` in this process
_BOS_CHECKED: set = set()


def warn_no_bos(tokenizer, records, where: str) -> bool:
    """Warn (once per data file) when plain-text prompts go without the BOS that the
    tokenizer itself adds to a text (data.add_bos off, as the official TIS-DPO code; TRL's
    tokenisation keeps it): models trained with one (Llama, Gemma) expect it. True when
    it warned."""
    if tokenizer is None or where in _BOS_CHECKED or "prompt" not in records.column_names:
        return False
    _BOS_CHECKED.add(where)
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None or not records.num_rows or not isinstance(records[0]["prompt"], str):
        return False
    if list(tokenizer("a")["input_ids"][:1]) != [bos]:
        return False
    log.warning("data.train %s: plain-text prompts get no BOS (data.add_bos is off), though "
                "this tokenizer adds one to a text; a model trained with a BOS expects it: "
                "--data.add_bos true", where)
    return True


def warn_builtin_tokenizer(tokenizer, records, where: str, *, sample: int = 200,
                           limit: float = 1.5) -> float | None:
    """Warn (once per data file) when the built-in tokenizer — fit to the synthetic tasks'
    words — cuts the data's words into more than ``limit`` pieces on average; returns that
    average over the first ``sample`` chosen responses (None when none is plain text)."""
    if tokenizer is None or "chosen" not in records.column_names or where in _TOKENIZER_CHECKED:
        return None
    _TOKENIZER_CHECKED.add(where)
    words = pieces = 0
    for text in records.select(range(min(sample, len(records))))["chosen"]:
        if not isinstance(text, str):
            continue
        for word in text.split():
            words += 1
            pieces += len(tokenizer.encode(" " + word, add_special_tokens=False))
    if not words:
        return None
    ratio = pieces / words
    if ratio > limit:
        log.warning("data.train %s: the built-in tokenizer (fit to the synthetic tasks' words) "
                    "cuts this data into %.1f pieces per word; give model.tokenizer or "
                    "model.path for a tokenizer that fits it", where, ratio)
    return ratio


def tokenize_cfg(cfg: RunConfig, method: str):
    """The TokenizeConfig of a stage whose loss is ``method`` ("sft" counts EOS)."""
    d = cfg.data
    add_eos = {"count": True, "ignore": False}.get(
        d.eos, True if method == "sft" else eos_counted_for_preset(method))
    return TokenizeConfig(max_length=d.max_length, max_prompt_length=d.max_prompt_length,
                          truncation=d.truncation, add_eos=add_eos, add_bos=d.add_bos,
                          skip_invalid=d.skip_invalid)


def tokenize_records(ctx: Context, raw, method: str, what: str, tok_cfg=None):
    tok, report = tokenize_pairs(raw, ctx.tokenizer, tok_cfg or tokenize_cfg(ctx.cfg, method))
    log.info("%s: %s", what, report.summary())
    if report.n_identical_after_truncation:
        n = report.n_identical_after_truncation
        log.warning("%s: truncation left %d pair%s with chosen identical to rejected (first: "
                    "%s); kept, though a DPO-style loss learns nothing from such a pair (a "
                    "larger data.max_length keeps them apart)", what, n, "" if n == 1 else "s",
                    report.first_identical)
    if len(tok) == 0:
        raise ValueError(f"{what}: no valid pairs left ({report.summary()})")
    return tok


def make_collator(ctx: Context, *, packed: bool | None = None):
    pad = ctx.tokenizer.pad_token_id
    mult = ctx.cfg.data.pad_to_multiple_of
    if ctx.cfg.data.packing if packed is None else packed:
        return PackedPairCollator(pad, pad_to_multiple_of=mult)
    return PaddedPairCollator(pad, pad_to_multiple_of=mult)


def contrastive_models(ctx: Context) -> dict:
    """The contrastive stage's record, with where pi+ and pi− are in *this* run folder
    (``contrastive/{positive,negative}/final``, or for the prompt variant the model every
    stage starts from): never the paths the record holds, which name the folder the stage
    ran in (another, when the run was copied, moved or named by a relative path from
    elsewhere). Refused, as ``tisdpo contrastive`` (and ``tisdpo pipeline``) would refuse
    it, when made with another ``contrastive.variant`` or pi+ / pi− with other options than
    this run's."""
    root = ctx.path("contrastive")
    if not stage_done(root):
        raise ValueError(f"the contrastive stage has not finished ({root}/done.json missing); "
                         f"run `tisdpo contrastive` first")
    info = read_done(root)
    variant = ctx.cfg.contrastive.variant
    if info.get("variant", variant) != variant:
        raise StageOptionsChanged(
            f"contrastive: {root} was made with other options: contrastive.variant="
            f"{info['variant']!r} then, {variant!r} now; rerun with the same options to reuse "
            f"it, use another --run_dir, or delete {root} to redo this stage")
    if variant in ("dpo", "sft"):
        options = contrastive_options(ctx, variant)
        for side, desc in (("positive", "contrastive+"), ("negative", "contrastive-")):
            if not stage_done(os.path.join(root, side)):    # a redo stopped before its end
                raise ValueError(f"{desc}: {os.path.join(root, side)} has not finished (no "
                                 f"done.json); run `tisdpo contrastive` first")
            check_options(os.path.join(root, side), options, resume=True, reusable=True,
                          desc=desc if variant == "dpo" else f"contrastive/{side}",
                          is_main=False)
        return {**info, **{side: os.path.join(root, side, "final")
                           for side in ("positive", "negative")}}
    return {**info, "positive": init_path(ctx), "negative": init_path(ctx)}
