"""TRL integration: ``TISDPOTrainer(DPOTrainer)`` and ``TISDPOConfig(DPOConfig)``.

Changing the import is the whole switch for a TRL user::

    from tisdpo.integrations.trl import DPOConfig, DPOTrainer   # was: from trl import ...

(``DPOConfig`` / ``DPOTrainer`` here are ``TISDPOConfig`` / ``TISDPOTrainer``.) The trainer
keeps TRL's data preparation, logging, evaluation, gradient accumulation, gradient
checkpointing, PEFT (the reference is the model with its adapter disabled) and
``precompute_ref_log_probs``; each step runs the policy (and the reference) to the last
hidden state inside the model's own forward and applies :class:`tisdpo.TISDPOLoss` there
(:mod:`tisdpo.integrations.trl_head`), so no tokens × vocab logits are formed.

Metrics: TRL's names with TRL's meaning — ``rewards/*`` are β·Σ_t(log π − log π_ref) over
the response's tokens and ``logps/*`` the token sums, for every reference-based preset
(IPO and the token-weighted ones included, as TRL's DPOTrainer logs them), and for SimPO the
per-token means TRL's CPOTrainer logs (β·mean log π); ``entropy``, ``logits/*``,
``mean_token_accuracy``, ``num_tokens`` as DPOTrainer computes them. Beside them, the loss's
own view under ``tisdpo/``: ``tisdpo/rewards/*`` (β·Σ ω·(log π − log π_ref): weighted for
weighted presets), ``tisdpo/logps/*``, ``tisdpo/weights/*`` (mean token weight),
``tisdpo/kl/*`` for KL presets, and for IPO ``tisdpo/rewards_per_token/*`` and
``tisdpo/logps_per_token/*`` (the per-token means its loss compares).

Tested with TRL 1.16.0 (:data:`TESTED_TRL_VERSION`). Besides public methods it overrides
three private ones of ``DPOTrainer`` — ``_prepare_dataset`` (checks the per-token columns),
``_set_signature_columns_if_needed`` (keeps them), ``_precompute_ref_logps`` (stores
per-token reference log-probs) — and reads its private attributes ``_metrics``,
``_total_train_tokens``, ``_tp_size``, ``_precompute_model_hash`` and ``_is_vision_dataset``.
"""
from __future__ import annotations

import contextlib
import math
import os
import warnings
from dataclasses import dataclass, field

import torch

try:
    import trl
except ImportError:                            # pragma: no cover - without the extra
    raise ImportError("tisdpo.integrations.trl needs TRL: pip install 'tisdpo[trl]'") from None
from accelerate.utils import broadcast_object_list, is_peft_model
from datasets import Dataset, IterableDataset, concatenate_datasets
from datasets.fingerprint import Hasher
from torch.utils.data import DataLoader
from trl import DPOConfig as _TRLDPOConfig
from trl import DPOTrainer as _TRLDPOTrainer
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.dpo_trainer import DataCollatorForPreference
from trl.trainer.utils import use_adapter

from tisdpo.integrations.trl_data import REF_COLUMNS, TISDPOCollator, check_token_columns
from tisdpo.integrations.trl_head import PolicyStep, ReferenceStep, attach_head, lm_of
from tisdpo.integrations.trl_metrics import record_metrics
from tisdpo.integrations.trl_options import (
    WEIGHT_COLUMNS, build_loss, check_reference, needs_weights, resolve_method, weight_columns,
)
from tisdpo.integrations.trl_weights import align_weights_to_trl, load_trl_weights
from tisdpo.train.headcheck import check_head, head
from tisdpo.train.records import NEGATIVE_WEIGHTS, negative_values
from tisdpo_kernels.strategy import FLOAT16_REASON

__all__ = ["TISDPOConfig", "TISDPOTrainer", "DPOConfig", "DPOTrainer", "TISDPOCollator",
           "align_weights_to_trl", "load_trl_weights", "TESTED_TRL_VERSION"]

TESTED_TRL_VERSION = "1.16.0"
_ROW = "__tisdpo_row"
_NON_MODEL_KEYS = {"completion_mask", "weights", "ref_logps", *REF_COLUMNS}
_ALIGNMENT_HINT = ("one float per completion token as TRL tokenises the record; "
                   "tisdpo.integrations.trl.load_trl_weights converts the weights stage's output")


@dataclass
class TISDPOConfig(_TRLDPOConfig):
    """``DPOConfig`` plus the tisdpo loss's options (docs/trl.md).

    method: a tisdpo preset (``tisdpo_kernels.PRESETS``); None: from ``loss_type``
        (sigmoid → dpo, ipo → ipo, hinge → hinge, robust → robust).
    token_weights: "auto" (weighted presets: ``chosen_weight``/``rejected_weight``,
        required; other presets: unit weights, as TRL's DPOTrainer), "none" (unit weights)
        or "<chosen>,<rejected>" (those columns, for any preset).
    alpha: α of the KL terms of tdpo2 / tisdpo_token_level; gamma_beta_ratio: SimPO's γ/β
        (TRL CPOConfig's ``simpo_gamma / beta``); impl: the kernels' backend; strategy:
        ``TISDPOLoss``'s (recompute, one_sweep or auto); filter_eps: opt-in gradient
        filtering of the policy head's backward (docs/FILTERING.md; None = exact).
    head_metrics: also log TRL's entropy, logits/* and mean_token_accuracy (one more LM-head
        pass over the completion tokens, without gradient).
    """

    method: str | None = field(default=None, metadata={
        "help": "tisdpo preset (e.g. 'tisdpo', 'dpo', 'ipo', 'simpo', 'tdpo2'); default: "
                "from loss_type"})
    token_weights: str = field(default="auto", metadata={
        "help": "'auto', 'none' or '<chosen column>,<rejected column>' of per-token weights"})
    alpha: float | None = field(default=None, metadata={
        "help": "alpha of the KL terms of tdpo2 and tisdpo_token_level"})
    gamma_beta_ratio: float | None = field(default=None, metadata={
        "help": "SimPO's gamma/beta (TRL CPOConfig's simpo_gamma / beta)"})
    impl: str = field(default="auto", metadata={
        "help": "kernel backend: 'auto', 'triton', 'torch' or 'reference'"})
    strategy: str = field(default="auto", metadata={
        "help": "how the loss forms the LM head's gradients: 'recompute', 'one_sweep' (all in "
                "the forward, not cdpo_code) or 'auto' (TISDPOLoss's rule)"})
    filter_eps: float | None = field(default=None, metadata={
        "help": "opt-in gradient filtering of the LM head's backward: drop vocabulary columns "
                "below this probability in a whole chunk of rows (docs/FILTERING.md); "
                "None = exact"})
    head_metrics: bool = field(default=True, metadata={
        "help": "log TRL's entropy, logits/* and mean_token_accuracy (one more LM-head pass)"})

    def __post_init__(self):
        super().__post_init__()
        method = resolve_method(self)          # a refused option fails here, in one line
        loss = build_loss(self)
        check_reference(self, loss, method)
        _check_trainer_options(self, loss, method)
        weight_columns(self, method)


def _check_trainer_options(args, loss, method: str) -> None:
    """Refuses DPOConfig options that TRL honours but that would change this trainer's
    loss or fail on a path TRL never takes."""
    cfg = loss.config
    if cfg.reference_free and getattr(args, "sync_ref_model", False):
        raise ValueError(f"TISDPOConfig sync_ref_model=True: method {method!r} is "
                         f"reference-free, so there is no reference model to sync; set it to "
                         f"False")
    multiple = getattr(args, "pad_to_multiple_of", None)
    if cfg.granularity == "pos" and isinstance(multiple, int):
        raise ValueError(f"TISDPOConfig pad_to_multiple_of={multiple}: method {method!r} "
                         f"averages over every position slot of a batch, padding included, so "
                         f"extra padding would shrink its loss and gradient; leave it None")
    if getattr(args, "strategy", "auto") == "one_sweep" and getattr(args, "fp16", False):
        raise ValueError(f"TISDPOConfig strategy='one_sweep' with fp16=True: {FLOAT16_REASON}")


class TISDPOTrainer(_TRLDPOTrainer):
    """``trl.DPOTrainer`` with the fused ``TISDPOLoss`` (module docstring). Same arguments;
    ``args`` may be a ``TISDPOConfig`` or a plain ``trl.DPOConfig`` (tisdpo's defaults)."""

    _tag_names = ["trl", "dpo", "tisdpo"]
    _name = "TIS-DPO"

    def __init__(self, model, ref_model=None, args=None, data_collator=None, train_dataset=None,
                 eval_dataset=None, processing_class=None, compute_metrics=None, callbacks=None,
                 optimizers=(None, None), quantization_config=None, peft_config=None):
        if args is None:
            name = model if isinstance(model, str) else \
                getattr(model.config, "_name_or_path", "") or "model"
            args = TISDPOConfig(f"{name.split('/')[-1]}-TISDPO")
        if trl.__version__ != TESTED_TRL_VERSION:
            warnings.warn(f"TISDPOTrainer is tested with TRL {TESTED_TRL_VERSION}, found "
                          f"{trl.__version__}; it overrides private DPOTrainer methods",
                          stacklevel=2)
        self._tisdpo_method = resolve_method(args)
        self._tisdpo_loss = build_loss(args)
        self._tisdpo_columns = weight_columns(args, self._tisdpo_method)
        cfg = self._tisdpo_loss.config
        check_reference(args, self._tisdpo_loss, self._tisdpo_method)
        _check_trainer_options(args, self._tisdpo_loss, self._tisdpo_method)
        names = getattr(train_dataset, "column_names", None) or []
        cols = self._tisdpo_columns
        if needs_weights(self._tisdpo_method) and cols is not None and names \
                and not set(cols) <= set(names):
            raise ValueError(f"TISDPOConfig method={self._tisdpo_method!r} weights tokens but "
                             f"train_dataset has no {list(cols)} columns ({_ALIGNMENT_HINT}); or "
                             f"set token_weights='none' for unit weights")
        if cols is None and getattr(args, "token_weights", "auto") == "auto" \
                and set(WEIGHT_COLUMNS) <= set(names):
            warnings.warn(f"TISDPOTrainer: method {self._tisdpo_method!r} does not weight "
                          f"tokens: train_dataset's {list(WEIGHT_COLUMNS)} columns are ignored "
                          f"(as DPOTrainer ignores them); token_weights='chosen_weight,"
                          f"rejected_weight' trains with them", stacklevel=2)
        # whether the training loss is weighted (None: unknown, an IterableDataset)
        self._tisdpo_train_weighted = (cols is not None and any(c in names for c in cols)) \
            if names else None
        # a reference-free preset needs no reference model: TRL loads none when it thinks
        # the reference log-probs are precomputed (our _precompute_ref_logps then does nothing)
        restore = None
        if cfg.reference_free and ref_model is None and not args.precompute_ref_log_probs:
            restore, args.precompute_ref_log_probs = False, True
        try:
            super().__init__(model, ref_model=ref_model, args=args, data_collator=data_collator,
                             train_dataset=train_dataset, eval_dataset=eval_dataset,
                             processing_class=processing_class,
                             compute_metrics=compute_metrics, callbacks=callbacks,
                             optimizers=optimizers, quantization_config=quantization_config,
                             peft_config=peft_config)
        finally:
            if restore is not None:
                args.precompute_ref_log_probs = restore
        if restore is not None:
            self.precompute_ref_logps = False
        if self._is_vision_dataset:
            raise ValueError("TISDPOTrainer: vision-language datasets are not supported")
        plugin = getattr(self.accelerator.state, "deepspeed_plugin", None)
        if self.is_deepspeed_enabled and getattr(plugin, "zero_stage", 0) == 3:
            raise ValueError("TISDPOTrainer: DeepSpeed ZeRO-3 is not supported (the fused head "
                             "reads lm_head.weight outside lm_head's forward); use ZeRO-1/2 "
                             "or FSDP")
        if self.aux_loss_enabled:
            raise ValueError(f"TISDPOConfig router_aux_loss_coef={self.router_aux_loss_coef}: "
                             f"the MoE load-balancing loss is not supported; set it to 0.0")
        lm = lm_of(self.model)
        check_head(lm)
        cap = head(lm).softcap
        self._tisdpo_loss = build_loss(args, softcap=cap)
        if self.ref_model is not None and self._tisdpo_loss.config.uses_kl:
            ref_cap = head(lm_of(self.ref_model)).softcap    # the KL op caps both heads alike
            if ref_cap != cap:
                raise ValueError(f"TISDPOTrainer: the KL preset caps both heads' logits alike, "
                                 f"but the policy's softcap is {cap} and the "
                                 f"ref_model's {ref_cap}; give a reference of the same family")
        for m in (self.model, self.ref_model):
            if m is not None:
                attach_head(m)
        if type(self.data_collator) is DataCollatorForPreference:
            c = self.data_collator
            self.data_collator = TISDPOCollator(
                pad_token_id=c.pad_token_id, max_length=c.max_length,
                truncation_mode=c.truncation_mode, pad_to_multiple_of=c.pad_to_multiple_of,
                return_tensors=c.return_tensors, weight_columns=self._tisdpo_columns,
                ref_columns=REF_COLUMNS if self.precompute_ref_logps else None)

    # ------------------------------------------------------------------ data (TRL private)

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        cols = self._tisdpo_columns
        names = getattr(dataset, "column_names", None) or []
        if cols is not None and names:
            self._check_weighted_like_train(any(c in names for c in cols), dataset_name,
                                            getattr(args, "token_weights", "auto"))
        check = isinstance(dataset, Dataset) and cols is not None and any(c in names
                                                                            for c in cols)
        if check:
            missing = [c for c in cols if c not in names]
            if missing:
                raise ValueError(f"{dataset_name} record 0, field {missing[0]!r}: missing (the "
                                 f"dataset has {[c for c in cols if c in names]})")
            dataset = dataset.add_column(_ROW, list(range(len(dataset))))
        out = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        if check:
            check_token_columns(out, cols, name=dataset_name, rows=out[_ROW],
                                max_length=args.max_length,
                                truncation_mode=args.truncation_mode)
            neg, total = negative_values(out, cols)
            if neg:
                warnings.warn(NEGATIVE_WEIGHTS % (neg, total, f"the {dataset_name} dataset"),
                              stacklevel=2)
            out = out.remove_columns(_ROW)
        return out

    def _check_weighted_like_train(self, weighted: bool, dataset_name: str, spec) -> None:
        """Every split is weighted as the training loss is: a weighted preset's eval split
        without the columns would fail at its first batch, after training; any other
        mismatch would log a different loss under the same name."""
        cols, method = list(self._tisdpo_columns), self._tisdpo_method
        if needs_weights(method) and not weighted:
            raise ValueError(f"TISDPOConfig method={method!r} weights tokens but the "
                             f"{dataset_name!r} dataset has no {cols} columns "
                             f"({_ALIGNMENT_HINT}); or set token_weights='none'")
        train = self._tisdpo_train_weighted
        if train is not None and weighted != train:
            how = ("has the", "does not", "weighted", "not") if weighted else \
                ("has no", "does", "unweighted", "weighted")
            raise ValueError(f"TISDPOConfig token_weights={spec!r}: the {dataset_name!r} "
                             f"dataset {how[0]} {cols} columns but train_dataset {how[1]}, so "
                             f"its loss would be {how[2]} and the training loss {how[3]}; give "
                             f"both the columns or set token_weights='none'")

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        extra = [c for c in (self._tisdpo_columns or ()) if c not in self._signature_columns]
        self._signature_columns = list(self._signature_columns) + extra

    # ------------------------------------------------------------------ reference

    @contextlib.contextmanager
    def _as_reference(self):
        """No grad, no checkpointing, the PEFT adapter off when the policy is the reference,
        accelerate's autocast (as TRL runs its reference)."""
        adapter = contextlib.nullcontext()
        if self.ref_model is None and is_peft_model(self.model):
            unwrapped = self.accelerator.unwrap_model(self.model)
            adapter = use_adapter(unwrapped, adapter_name="ref" if "ref" in
                                  unwrapped.peft_config else None)
        with torch.no_grad(), disable_gradient_checkpointing(
                self.model, self.args.gradient_checkpointing_kwargs), adapter, \
                self.accelerator.autocast():
            yield

    @staticmethod
    def _labels(inputs):
        """Shifted labels [2B, L-1]: the next token where it is a completion token."""
        return inputs["input_ids"][:, 1:].masked_fill(inputs["completion_mask"][:, 1:] == 0,
                                                      -100)

    @staticmethod
    def _model_kwargs(inputs):
        return {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}

    def compute_ref_log_probs(self, model, inputs):
        """Per-token reference log-probs of a padded batch: (chosen [B, L-1], rejected
        [B, L-1]), 0 off the completions (TRL's DPOTrainer returns per-sequence sums)."""
        attach_head(model)
        step = ReferenceStep(self._labels(inputs), impl=self._tisdpo_loss.impl)
        with self._as_reference():
            out = model(**self._model_kwargs(inputs), tisdpo=step)
        return out["logps"].chunk(2, dim=0)

    def _precompute_ref_logps(self, dataset, name, batch_size):
        """Per-token reference log-probs as ``ref_chosen_logps``/``ref_rejected_logps`` list
        columns (one value per completion token; NaN for tokens cut by ``max_length``),
        cached like TRL's per-sequence columns under a fingerprint of their own."""
        if self._tisdpo_loss.config.reference_free:
            return dataset
        if isinstance(dataset, IterableDataset):
            raise ValueError("precompute_ref_log_probs=True is not supported with an "
                             "IterableDataset; use a map-style Dataset")
        clash = [c for c in REF_COLUMNS if c in dataset.column_names]
        if clash:
            raise ValueError(f"{name} dataset already has {clash}; remove them to precompute "
                             f"per-token reference log-probs")
        fp = [Hasher.hash((dataset._fingerprint, self._precompute_model_hash,
                           "tisdpo per-token reference log-probs", self.args.max_length,
                           self.args.truncation_mode))]
        broadcast_object_list(fp, from_process=0)
        cache_file = dataset._get_cache_file_path(fp[0])
        if not os.path.exists(cache_file):
            self._write_ref_cache(dataset, name, batch_size, fp[0], cache_file)
        self.accelerator.wait_for_everyone()
        return concatenate_datasets([dataset, Dataset.from_file(cache_file)], axis=1)

    def _write_ref_cache(self, dataset, name, batch_size, fingerprint, cache_file):
        import datasets

        loader = self.accelerator.prepare(DataLoader(
            dataset, batch_size=batch_size, collate_fn=self.data_collator, shuffle=False,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory))
        model = self.ref_model if self.ref_model is not None else self.model
        rows = []
        for batch in loader:
            ref = torch.cat(self.compute_ref_log_probs(model, batch))
            ref = torch.cat([ref.new_full((ref.shape[0], 1), math.nan), ref], 1).cpu()
            keep = batch["completion_mask"].bool().cpu()   # the completion tokens kept
            b = ref.shape[0] // 2
            items = [(ref[i][keep[i]].tolist(), ref[i + b][keep[i + b]].tolist())
                     for i in range(b)]
            rows += self.accelerator.gather_for_metrics(items, use_gather_object=True)
        if not self.accelerator.is_main_process:
            return
        start = self.args.truncation_mode == "keep_start"

        def full(vals, n):        # NaN for the completion tokens max_length cut
            pad = [math.nan] * (n - len(vals))
            return vals + pad if start else pad + vals

        def add(batch, indices):
            out = {c: [] for c in REF_COLUMNS}
            for j, i in enumerate(indices):
                for s, (col, side) in enumerate(zip(REF_COLUMNS, ("chosen", "rejected"))):
                    out[col].append(full(rows[i][s], len(batch[f"{side}_ids"][j])))
            return out

        seq = getattr(datasets, "List", None) or datasets.Sequence
        dataset.map(add, with_indices=True, batched=True, remove_columns=dataset.column_names,
                    new_fingerprint=fingerprint, cache_file_name=cache_file,
                    features=datasets.Features({c: seq(datasets.Value("float32"))
                                                for c in REF_COLUMNS}),
                    desc=f"Caching per-token reference log probs for {name} dataset")

    def _reference(self, inputs, model_kwargs, labels):
        """(keyword arguments of the reference for the loss, per-token ref log-probs)."""
        cfg = self._tisdpo_loss.config
        if cfg.reference_free:
            return {}, None
        if self.precompute_ref_logps:
            if "ref_logps" not in inputs:
                raise ValueError("precompute_ref_log_probs=True but the batch has no per-token "
                                 "'ref_logps' (a custom data_collator must carry them; see "
                                 "TISDPOCollator)")
            ref = torch.where(labels != -100, inputs["ref_logps"][:, 1:], 0.0)
            return {"ref_logps": ref}, ref
        model = self.ref_model if self.ref_model is not None else self.model
        step = ReferenceStep(labels, impl=self._tisdpo_loss.impl, keep_hidden=cfg.uses_kl)
        with self._as_reference():
            out = model(**model_kwargs, tisdpo=step)
        if cfg.uses_kl:
            return {"ref_hidden": out["hidden"], "ref_weight": out["weight"],
                    "ref_bias": out["bias"]}, out["logps"]
        return {"ref_logps": out["logps"]}, out["logps"]

    # ------------------------------------------------------------------ the step

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        labels = self._labels(inputs)
        kwargs = self._model_kwargs(inputs)
        reference, ref_logps = self._reference(inputs, kwargs, labels)
        weights = inputs.get("weights")
        if weights is not None:
            weights = weights[:, 1:]
        elif needs_weights(self._tisdpo_method) and self._tisdpo_columns is not None:
            raise ValueError(f"method {self._tisdpo_method!r} weights tokens but the batch has "
                             f"no 'weights' (a custom data_collator must carry them; see "
                             f"TISDPOCollator), or set token_weights='none'")
        step = PolicyStep(self._tisdpo_loss, labels, reference=reference, weights=weights,
                          normalizer=float(self._tisdpo_loss.normalizer_count(labels)),
                          head_metrics=getattr(self.args, "head_metrics", True))
        with self.accelerator.autocast():
            out = model(**kwargs, tisdpo=step)
        record_metrics(self, mode, out, labels, ref_logps, inputs["attention_mask"])
        if return_outputs:     # as TRL: logits for compute_metrics from one more forward
            with torch.no_grad():
                outputs = model(**kwargs)
            return out["loss"], outputs
        return out["loss"]


#: The one-import switch: ``from tisdpo.integrations.trl import DPOConfig, DPOTrainer``.
DPOConfig = TISDPOConfig
DPOTrainer = TISDPOTrainer
