"""The thin training loop: one objective, one optimiser, resumable to the bit.

A stage hands the loop a model, an *objective* (``objective(model, batch, normalizer) ->
(loss, metrics)`` plus ``objective.count(batch)``, the batch's share of the normaliser, and
optionally ``objective.metric_weight(batch)``, what its metrics are means over),
tokenised records and a collator. Per optimiser step the loop takes ``grad_accum``
micro-batches, sums their counts on the host (pairs for preference losses, tokens for SFT;
the batches are still on the CPU, so this is no device sync), and backpropagates each
micro-batch's loss divided by that total: the accumulated gradient equals the gradient of
one big batch (for every preset but ``cdpo_code``, a mean over padded position slots, whose
loss depends on each micro-batch's padding). Then gradient clipping, the optimiser and the
schedule step.

Checkpoints (``<out_dir>/checkpoints/step-N/state.pt``) hold the model, optimiser and
scheduler state, the torch/CUDA/python/numpy RNG states and the data position (epoch and
micro-batch index; each epoch's order is a permutation seeded by (seed, epoch)). A run
stopped between steps and resumed from its checkpoint performs exactly the same
computations as an uninterrupted one, so it ends with the same parameters bit for bit.

Checkpoints are written atomically (``step-N.tmp`` renamed when complete); on resume the
leftovers of an interrupted write are removed and an unreadable checkpoint is moved aside to
``step-N.corrupt`` (named in a warning) in favour of the next older one; a step's checkpoint
is written once. A loss or gradient norm (computed whether or not it is clipped) that becomes
non-finite raises :class:`TrainingDiverged` before the update (one host sync per step).
SIGTERM / SIGINT during :meth:`Trainer.train` finish the current step, write a checkpoint and
return ``{"stopped": True, "signal": ...}`` (during the final evaluation or saves: once the
stage is finished); a second SIGINT interrupts at once. The last checkpoint is written before
the final evaluation and records the length of metrics.jsonl, so a resumed stage ends with the
same metrics.jsonl and done.json as an uninterrupted one.

Several processes (torchrun, DDP / FSDP2): pass ``parallel=`` a
:class:`tisdpo.train.parallel.Parallel`; ``batch_size`` is then per process, each global
micro-batch is split across ranks, counts and metrics are summed over ranks, checkpoints
are gathered and written once (same file layout) and resume on any number of processes.
Every ``self.par`` call is the single-process behaviour when ``parallel`` is None.
"""
from __future__ import annotations

import logging
import math
import os
import shutil
import signal
import threading
import time
from dataclasses import asdict, dataclass

import torch

from tisdpo.train.checkpoint import (
    DONE_FILE, CorruptCheckpoint, checkpoints, read_state, remove_checkpoints, remove_partial,
    restore_rng_state, rng_state, write_json, write_state,
)
from tisdpo.train.config import LogConfig, TrainConfig
from tisdpo.train.metrics_log import MetricSink, NoSink, progress_bar
from tisdpo.train.parallel import Parallel

__all__ = ["Trainer", "TrainState", "TrainingDiverged", "rows_of", "make_optimizer",
           "make_scheduler", "lr_factor"]

log = logging.getLogger("tisdpo")

#: the signals that stop a stage after the current step, in the order one is named when
#: ranks received different ones
_SIGNALS = ("SIGTERM", "SIGINT")


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm became non-finite (the stage stopped before the update),
    or an update left a weight non-finite (stopped before saving it); not marked done."""

@dataclass
class TrainState:
    step: int = 0          # optimiser steps taken
    epoch: int = 0         # current epoch
    micro: int = 0         # next micro-batch index within the epoch
    total_steps: int = 0


def make_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    """The stage's optimizer over the trainable ``params``. Weight decay applies to matrices
    (linear and embedding weights); biases and normalisation weights, every parameter of
    fewer than two dimensions, are not decayed, as HF's Trainer (and so TRL) leaves them out:
    RMSprop's L2 term would otherwise pull a norm's gain towards 0 by about lr per step
    wherever its gradient is small."""
    params = [p for p in params if p.requires_grad]
    if cfg.weight_decay:
        params = [{"params": [p for p in params if p.dim() >= 2]},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                 eps=cfg.eps, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=cfg.lr, eps=cfg.eps,
                                   weight_decay=cfg.weight_decay)
    raise ValueError(f"optimizer must be 'adamw' or 'rmsprop', got {cfg.optimizer!r}")


def lr_factor(step: int, *, warmup: int, total: int, schedule: str) -> float:
    """Multiplier of the peak lr for the update made at ``step`` (0-based).

    Warmup ramps as the official TIS-DPO code, min(1, (step+1)/(warmup+1)); then constant,
    linear to 0 at ``total``, or cosine to 0 at ``total``.
    """
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    span = max(total - warmup, 1)
    progress = min(max((step - warmup) / span, 0.0), 1.0)
    if schedule == "linear":
        return 1.0 - progress
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"schedule must be constant, linear or cosine, got {schedule!r}")


def make_scheduler(opt, cfg: TrainConfig, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, warmup=cfg.warmup_steps, total=total_steps,
                                 schedule=cfg.schedule))


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v)
            for k, v in batch.items()}


def rows_of(data, idx) -> list[dict]:
    """Records ``idx`` of a list or a ``datasets.Dataset`` (one batched read) as dicts."""
    idx = [int(i) for i in idx]
    if hasattr(data, "column_names"):
        cols = data[idx]
        names = list(cols)
        return [dict(zip(names, vals)) for vals in zip(*(cols[n] for n in names))]
    return [data[i] for i in idx]


def _mean_metrics(chunks: list[tuple[dict, dict]]) -> tuple[dict, dict]:
    """(per-key mean of batch-mean metrics, per-key total count): each batch's value weighted
    by its count for that key (``counts[key]``, else ``counts[""]``, its pairs); on device."""
    sums: dict[str, torch.Tensor] = {}
    totals: dict[str, float] = {}
    for metrics, counts in chunks:
        for k, v in metrics.items():
            if isinstance(v, torch.Tensor):
                count = counts.get(k, counts[""])
                v = v.detach().float().mean() * count
                sums[k] = sums[k] + v if k in sums else v
                totals[k] = totals.get(k, 0.0) + count
    return {k: sums[k] / max(totals[k], 1e-12) for k in sums}, totals


class Trainer:
    """Runs one stage's optimisation; see the module docstring.

    model: trained in place. objective: callable (model, batch, normalizer) -> (loss,
    metrics) with ``count(batch) -> float`` (and ``metric_weight``, else ``count`` weighs its
    metrics). train_data: indexable records (e.g. a tokenised
    ``datasets.Dataset``). collate_fn: list of records -> batch dict (CPU tensors).
    eval_data: optional held-out records, evaluated with the same objective (no gradient).
    out_dir: this stage's directory (checkpoints/, metrics.jsonl, final/, done.json).
    """

    def __init__(self, *, model, objective, train_data, collate_fn, cfg: TrainConfig,
                 out_dir: str, device: torch.device, seed: int = 0, eval_data=None,
                 log: LogConfig | None = None, tokenizer=None, desc: str = "train",
                 extra_done: dict | None = None, parallel=None):
        if len(train_data) == 0:
            raise ValueError(f"{desc}: train_data is empty")
        self.model, self.objective = model, objective
        self.train_data, self.eval_data, self.collate_fn = train_data, eval_data, collate_fn
        self.cfg, self.out_dir, self.device, self.seed = cfg, out_dir, device, seed
        self.log = log or LogConfig()
        self.tokenizer, self.desc = tokenizer, desc
        self.extra_done = extra_done or {}
        self.par = parallel if parallel is not None else Parallel()   # distributed hooks
        self._run = self.par.wrap(model, objective)     # before the optimiser (FSDP2 shards)
        self.micro_per_epoch = math.ceil(len(train_data) / self.par.global_batch(cfg.batch_size))
        self.steps_per_epoch = math.ceil(self.micro_per_epoch / cfg.grad_accum)
        # rounded first: 1.1 epochs of 50 steps is 55 steps, not ceil(55.00000000000001)
        total = cfg.max_steps if cfg.max_steps > 0 else math.ceil(round(
            cfg.epochs * self.steps_per_epoch, 6))
        self.state = TrainState(total_steps=max(int(total), 1))
        self.optimizer = make_optimizer(model.parameters(), cfg)
        self.scheduler = make_scheduler(self.optimizer, cfg, self.state.total_steps)
        self._order: tuple[int, list[int]] | None = None
        self._signal: str | None = None          # SIGTERM / SIGINT received (handler sets it)
        self._saved: int | None = None           # the step of the checkpoint on disk we made/read
        self._last: dict = {}                    # the last logged training metrics
        self._log_rows: int | None = None        # metrics.jsonl's length at that checkpoint
        self._sink = NoSink()

    # ------------------------------------------------------------------ data position
    def _epoch_order(self, epoch: int) -> list[int]:
        if self._order is None or self._order[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._order = (epoch, torch.randperm(len(self.train_data), generator=g).tolist())
        return self._order[1]

    def _next_window(self) -> list[list[int]]:
        """Index lists of the next step's micro-batches (never crossing an epoch's end)."""
        st, bs = self.state, self.par.global_batch(self.cfg.batch_size)
        if st.micro >= self.micro_per_epoch:
            st.epoch, st.micro = st.epoch + 1, 0
        order = self._epoch_order(st.epoch)
        window = []
        while len(window) < self.cfg.grad_accum and st.micro < self.micro_per_epoch:
            window.append(order[st.micro * bs:(st.micro + 1) * bs])
            st.micro += 1
        return window

    def _records(self, data, idx: list[int]) -> list[dict]:
        return rows_of(data, idx)

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> str:
        """Write this step's checkpoint, unless it is the one this trainer wrote or resumed
        from (the same state: never rewritten)."""
        root = os.path.join(self.out_dir, "checkpoints")
        final = os.path.join(root, f"step-{self.state.step:07d}")
        if self._saved == self.state.step:
            return final
        self._check_weights()
        model_sd, optim_sd = self.par.state_dicts(self.model, self.optimizer)
        if not self.par.is_main:                  # rank 0 writes, the others wait for it
            self.par.barrier()
            self._saved = self.state.step
            return final
        write_state(final, {
            "model": model_sd,
            "optimizer": optim_sd,
            "scheduler": self.scheduler.state_dict(),
            "rng": rng_state(),
            "state": asdict(self.state),
            "global_batch_size": self.par.global_batch(self.cfg.batch_size),
            "metrics_rows": self._sink.rows,       # what a resume keeps of metrics.jsonl
            "last_metrics": self._last,            # done.json's training metrics
        })
        self._saved = self.state.step
        for old in checkpoints(self.out_dir)[max(self.cfg.keep_checkpoints, 1):]:
            shutil.rmtree(old, ignore_errors=True)
        self.par.barrier()
        return final

    def _check_weights(self) -> None:
        """Before a checkpoint (each stage's last step included): an update that left a
        weight non-finite with a finite loss and gradient (a huge lr, say) stops the stage
        there, neither saved nor marked done. One host sync; every rank agrees."""
        local = [p.to_local() if hasattr(p, "to_local") else p for p in self.model.parameters()]
        # a flag per parameter: counted once however many ranks hold a copy or shard of it
        flags = [~torch.isfinite(p).all() if p.numel() else torch.tensor(False, device=p.device)
                 for p in local]
        bad = sum(v > 0 for v in self.par.sum_host(torch.stack(flags).double().tolist()))
        if bad:
            raise TrainingDiverged(
                f"{self.desc}: the update of step {self.state.step} left {int(bad)} weight "
                f"tensor(s) non-finite; stopped before saving it, not marked done (a lower lr "
                f"usually helps)")

    def load_checkpoint(self, path: str) -> None:
        ckpt = read_state(path, mmap=self.par.distributed)
        gb = self.par.global_batch(self.cfg.batch_size)
        if ckpt.get("global_batch_size", gb) != gb:
            raise ValueError(f"{self.desc}: checkpoint {path} was made with "
                             f"{ckpt['global_batch_size']} pairs per global micro-batch but "
                             f"this run has {gb} (batch_size {self.cfg.batch_size} x "
                             f"{self.par.world_size} processes); keep batch_size x processes "
                             f"the same to resume")
        saved, live = len(ckpt["optimizer"]["param_groups"]), len(self.optimizer.param_groups)
        if saved != live:
            raise ValueError(f"{self.desc}: checkpoint {path} holds {saved} optimizer parameter "
                             f"group(s) but this run's optimizer has {live} (with weight decay, "
                             f"biases and norm weights form a group without it, which "
                             f"checkpoints written before that lack); start the stage afresh "
                             f"with --pipeline.resume false")
        self.par.load_state_dicts(self.model, self.optimizer, ckpt["model"], ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        saved = TrainState(**ckpt["state"])
        if saved.total_steps != self.state.total_steps:
            raise ValueError(f"{self.desc}: checkpoint {path} was made for {saved.total_steps} "
                             f"steps but this run has {self.state.total_steps}; the data or "
                             f"the step settings changed (start afresh with "
                             f"--pipeline.resume false)")
        self.state = saved
        restore_rng_state(ckpt["rng"])
        self._saved, self._last = saved.step, dict(ckpt.get("last_metrics", {}))
        self._log_rows = ckpt.get("metrics_rows")

    def _resume(self) -> str | None:
        """Load the newest readable checkpoint (an unreadable one is named and skipped);
        returns its path, or None to start afresh."""
        if self.par.is_main:
            for tmp in remove_partial(self.out_dir):
                log.warning("%s: removed %s, left by an interrupted checkpoint write",
                            self.desc, tmp)
        self.par.barrier()
        for path in checkpoints(self.out_dir):
            try:
                self.load_checkpoint(path)
                return path
            except CorruptCheckpoint as bad:
                aside = path + ".corrupt"                  # kept for inspection, never used
                self.par.barrier()                         # every rank has failed to read it
                if self.par.is_main:
                    shutil.rmtree(aside, ignore_errors=True)
                    os.replace(path, aside)
                self.par.barrier()
                log.warning("%s: %s; moved it to %s and trying the next older checkpoint",
                            self.desc, bad, aside)
        return None

    # ------------------------------------------------------------------ the loop
    def _step(self) -> tuple[torch.Tensor, dict]:
        shares = [self.par.shard(idx) for idx in self._next_window()]   # (this rank's, padded)
        batches = [self.collate_fn(self._records(self.train_data, idx)) for idx, _ in shares]
        counts = [0.0 if pad else float(self.objective.count(b))
                  for b, (_, pad) in zip(batches, shares)]
        normalizer = self.par.sum_host([sum(counts)])[0]
        total = torch.zeros((), device=self.device)
        chunks = []
        for k, b in enumerate(batches):
            loss, metrics = self.par.forward_backward(
                self._run, _to_device(b, self.device), max(normalizer, 1.0),
                padded=shares[k][1], last=k == len(batches) - 1)
            total = total + loss.float()
            chunks.append((metrics, {"": 0.0} if shares[k][1] else self._metric_weights(b)))
        total, metrics = self.par.reduce_metrics(total, *_mean_metrics(chunks))
        # the total norm over every rank's (sharded) gradient, clipped to max_grad_norm if set
        metrics["grad_norm"] = self.par.clip_grad_norm(self.model.parameters(),
                                                       self.cfg.max_grad_norm)
        # one host sync per optimiser step: a non-finite loss or gradient stops the stage
        # before the update reaches the weights (reduced values: every rank agrees)
        watch = torch.stack([total.float().reshape(()), metrics["grad_norm"].float().reshape(())])
        if not bool(torch.isfinite(watch).all()):
            loss, norm = watch.tolist()
            what = "gradient norm" if math.isfinite(loss) else "loss"
            raise TrainingDiverged(
                f"{self.desc}: the {what} became non-finite at step {self.state.step + 1} "
                f"(loss {loss}, gradient norm {norm}); stopped before the update, not marked "
                f"done (a lower lr, or fp32, usually helps)")
        metrics["lr"] = self.optimizer.param_groups[0]["lr"]     # the lr of this update
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        return total, metrics

    def _metric_weights(self, batch: dict) -> dict[str, float]:
        """What a batch's metrics are means over: ``""``, the objective's ``metric_weight``
        (pairs) where it has one, else its ``count`` (an SFT objective's tokens); and the
        counts of the metrics that average over something else (``metric_counts``)."""
        weight = getattr(self.objective, "metric_weight", None) or self.objective.count
        per_key = getattr(self.objective, "metric_counts", None)
        return {"": float(weight(batch)), **(per_key(batch) if per_key else {})}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """The objective's loss and metrics on the held-out records (means over pairs)."""
        if self.eval_data is None or len(self.eval_data) == 0:
            return {}
        n = len(self.eval_data)
        if self.cfg.eval_max_pairs:
            n = min(n, self.cfg.eval_max_pairs)
        was_training = self.model.training
        self.model.eval()
        chunks, weighted, count = [], 0.0, 0.0
        step = self.par.global_batch(self.cfg.eval_batch_size)
        for start in range(0, n, step):
            idx, pad = self.par.shard(list(range(start, min(start + step, n))))
            batch = self.collate_fn(self._records(self.eval_data, idx))
            c = 0.0 if pad else float(self.objective.count(batch))
            loss, metrics = self._run(_to_device(batch, self.device), max(c, 1.0))
            weighted += float(loss) * c
            count += c
            chunks.append((metrics, {"": 0.0} if pad else self._metric_weights(batch)))
        self.model.train(was_training)
        weighted, total = self.par.sum_host([weighted, count])
        _, metrics = self.par.reduce_metrics(torch.zeros((), device=self.device),
                                             *_mean_metrics(chunks))
        out = {f"eval/{k}": float(v) for k, v in metrics.items()}
        out["eval/loss"] = weighted / max(total, 1.0)
        return out

    def train(self, *, resume: bool = True) -> dict:
        """Run (or continue) the stage; returns the final metrics (also in done.json).

        Stops early, checkpointed and resumable, when step ``cfg.stop_after`` is reached; the
        return value then has ``"stopped": True``. SIGTERM / SIGINT stop after the current step
        (checkpointed), or, when they come during the final evaluation or saves, after the
        stage is finished; the return value then also has ``"signal"``.
        """
        os.makedirs(self.out_dir, exist_ok=True)
        ckpt = self._resume() if resume else None
        if not resume:                  # one remover, and no rank writes before it is done
            if self.par.is_main:
                remove_checkpoints(self.out_dir)
            self.par.barrier()
        if self.par.is_main:
            self._sink = MetricSink(self.out_dir, self.log.tensorboard,
                                    None if ckpt is None else (self.state.step, self._log_rows),
                                    self.desc)
        sink, start = self._sink, self.state.step
        bar = progress_bar(self.log.progress and self.par.is_main, self.state.total_steps,
                           self.state.step, self.desc)
        cfg, t0 = self.cfg, time.perf_counter()
        restore = self._catch_signals()
        try:
            while self.state.step < self.state.total_steps:
                if cfg.stop_after is not None and self.state.step >= cfg.stop_after:
                    self.save_checkpoint()
                    self._say_stopped(start)
                    return {"stopped": True, "step": self.state.step}
                loss, metrics = self._step()
                step = self.state.step
                bar.update(1)
                if step % max(self.log.every, 1) == 0 or step == self.state.total_steps:
                    self._last = {"loss": float(loss), "lr": metrics.pop("lr"),
                                  "epoch": self.state.epoch + self.state.micro /
                                  self.micro_per_epoch,
                                  **{k: float(v) for k, v in metrics.items()}}
                    # wall time goes to the log only: results stay reproducible run to run
                    sink.write(step, {**self._last, "elapsed_s": time.perf_counter() - t0})
                    bar.set_postfix(loss=f"{self._last['loss']:.4f}")
                if cfg.eval_every and step % cfg.eval_every == 0 and \
                        step != self.state.total_steps:
                    sink.write(step, self.evaluate())
                saved = bool(cfg.save_every and step % cfg.save_every == 0 and
                             step != self.state.total_steps)
                if saved:
                    self.save_checkpoint()
                # SIGTERM / SIGINT on any rank: every rank saves after this step, then stops
                sig = self._agreed_signal()
                if sig is not None:
                    if not saved:
                        self.save_checkpoint()
                    return {"stopped": True, "step": self.state.step, "signal": sig}
            # checkpointed before the final evaluation: a stage resumed here redoes only that
            self.save_checkpoint()
            final_eval = self.evaluate()
            sink.write(self.state.step, final_eval)
            result = {**self._last, **final_eval}
            self._finish(result)
            restore()      # a signal from here on has its usual effect; one before stops here
            sig = self._agreed_signal()
            if sig is not None:
                log.warning("%s: finished; stopping on %s before anything else runs", self.desc,
                            sig)
                return {**result, "stopped": True, "step": self.state.step, "signal": sig}
            return result
        finally:
            restore()
            bar.close()
            sink.close()

    def _say_stopped(self, start: int) -> None:
        """How to go on from a stop at ``stop_after``."""
        step, limit = self.state.step, self.cfg.stop_after
        if start < step:
            log.info("%s: stopped at step %d of %d (stop_after %d); rerun without stop_after, "
                     "or with a larger one, to continue", self.desc, step,
                     self.state.total_steps, limit)
        else:
            log.warning("%s: already at step %d of %d, and stop_after is %d: nothing to do; "
                        "rerun without stop_after, or with a larger one, to continue",
                        self.desc, step, self.state.total_steps, limit)

    def _agreed_signal(self) -> str | None:
        """The signal any rank received (SIGTERM over SIGINT when ranks got different ones),
        the same name on every rank (one host reduction); None when no rank got one."""
        counts = self.par.sum_host([float(self._signal == name) for name in _SIGNALS])
        return next((name for name, n in zip(_SIGNALS, counts) if n > 0), None)

    def _catch_signals(self):
        """SIGTERM and SIGINT ask the loop to checkpoint and stop after the current step (a
        second SIGINT interrupts at once); returns the function restoring the old handlers."""
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}

        def handler(signum, frame):
            if self._signal is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self._signal = signal.Signals(signum).name
            log.warning("%s: %s received; saving a checkpoint after this step", self.desc,
                        self._signal)

        for s in old:
            signal.signal(s, handler)
        return lambda: [signal.signal(s, h) for s, h in old.items()]

    def _finish(self, metrics: dict) -> None:
        self.par.save_model(self.model, os.path.join(self.out_dir, "final"), self.tokenizer)
        done = {"stage": self.desc, "steps": self.state.step, "metrics": metrics,
                **self.extra_done}
        if self.par.is_main:                 # renamed when complete: never half a done.json
            write_json(os.path.join(self.out_dir, DONE_FILE), done)
        self.par.barrier()
