"""Training on several processes with PyTorch's own engine: torchrun + DDP or FSDP2.

    torchrun --nproc_per_node=8 -m tisdpo.cli train --run_dir runs/x --distributed.mode fsdp2

One :class:`Parallel` object describes how this process takes part (``setup`` builds it from
the ``distributed`` config section and torchrun's environment); the trainer routes the few
places where a process differs from a single one through it. With ``mode="none"`` every
method is the single-process behaviour, so one code path serves both.

Model. The policy and its objective are wrapped together in one module whose ``forward``
runs the decoder *and* the loss (:class:`PolicyWithLoss` for users of :class:`TISDPOLoss`;
the trainer wraps its objective the same way). That is what makes the fused head correct
under FSDP2: FSDP gathers a module's parameters in its pre-forward hook and reduce-scatters
their gradients after backward, so the LM-head weight the loss reads inside that forward is
the full, unsharded tensor, and its gradient (both of them, for tied embeddings) is reduced
like any other. Outside such a forward ``model.lm_head.weight`` is a DTensor holding
1/world of the rows; the loss refuses it (:func:`check_not_sharded`) instead of silently
using the shard. DDP needs the same wrapper (its gradient hooks are armed by ``forward``).
FSDP2 shards every decoder layer (the classes in ``model._no_split_modules``, else
``model.model.layers``) and then the wrapper (embeddings, final norm and head: tied
weights stay one parameter). Mixed precision is FSDP2's ``MixedPrecisionPolicy``:
bf16 gathered parameters and compute, fp32 sharded master weights and optimiser state,
fp32 gradient reduction. A reference model (needed only by KL losses or when no reference
log-probs were precomputed) stays a frozen full replica on every rank.

Data. A stage's ``batch_size`` (sft / contrastive / policy) is per process: one global
micro-batch is ``batch_size × world_size`` pairs, taken from the epoch's seeded
permutation exactly as a single process with that batch size would take it, and rank r
keeps its positions r, r + W, r + 2W, ...
(:meth:`Parallel.shard`). Every pair is seen once per epoch; nothing is dropped or
repeated. Pad rule: when the epoch's last global micro-batch has fewer pairs than ranks, a
rank left without a pair processes one real pair of that micro-batch with its loss
multiplied by 0 and a count of 0 (FSDP/DDP need every rank in every collective), so it adds
nothing to the loss, the gradient, the metrics or the normaliser. The loss normaliser is
the number of pairs (SFT: completion tokens) of the whole accumulated global batch: the
per-rank counts are summed with one all-reduce of a CPU tensor (gloo, also under NCCL
training) before the forward, so nothing waits on the GPU. Each rank's loss is scaled by
world_size before backward to undo DDP/FSDP's gradient averaging: the summed gradient is
that of the single-process loss on the global batch. Metrics are reduced (count-weighted
means, one device all-reduce per step, no host sync). The data position (epoch, global
micro-batch) is the same on every rank, and means the same pairs on any number of ranks
with the same global micro-batch. Evaluation splits its batches the same way.

Weight estimation (inference only) splits the weights pass's shards of pairs round-robin
over the ranks (:meth:`Parallel.owns`), each with full replicas of pi+, pi- and the
reference; rank 0 then merges the shards into one dataset in the original record order.

Checkpoints. The model and optimiser state are gathered to full, FQN-keyed state dicts
(``torch.distributed.checkpoint.state_dict`` with ``full_state_dict``), converted to the
layout of ``optimizer.state_dict()`` of a single process, and written once by rank 0 into
the same ``state.pt`` the single-process trainer writes. So a checkpoint resumes on any
number of processes, including none, as long as the global micro-batch (``batch_size ×
world_size``) is unchanged (checked). Every rank memory-maps the file and keeps its shard.
The gathered state must fit in rank 0's host memory; sharded (DCP) checkpoints are not
implemented.
"""
from __future__ import annotations

import contextlib
import os
from datetime import timedelta

import torch
from torch import nn

from tisdpo.train.checkpoint import (
    fqns_by_group, optimizer_state_to_fqns, optimizer_state_to_indices,
)
from tisdpo.train.model import config_as_loaded, head, hidden_states, save_model
from tisdpo_kernels.validate import check_not_sharded  # re-exported: the loss refuses shards

__all__ = ["Parallel", "setup", "teardown", "PolicyWithLoss", "fully_shard_model",
           "check_not_sharded", "shard_positions", "torchrun_env"]

MODES = ("none", "ddp", "fsdp2")


# ------------------------------------------------------------------------- sharded weights


class PolicyWithLoss(nn.Module):
    """A causal LM and a fused loss as one module, to wrap with FSDP2 or DDP.

    ``forward(input_ids, labels, *, attention_mask=None, position_ids=None, attention=None,
    **loss_kwargs)`` runs the decoder to the last hidden states [rows, T, D] and returns
    ``loss_fn(lm_head.weight, hidden, labels, bias=lm_head.bias, **loss_kwargs)`` (for
    :class:`tisdpo.loss.TISDPOLoss`: ``(loss, metrics)``), so the head weight is gathered
    (FSDP2) for the loss and its gradient reduced with the rest. Tied embeddings are one
    parameter and get both gradients.

        policy = PolicyWithLoss(model, TISDPOLoss("tisdpo"))
        fully_shard_model(policy, mixed_precision=torch.bfloat16)   # or DDP(policy)
        optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-6)
        loss, metrics = policy(batch["input_ids"], batch["labels"],
                               attention_mask=batch["attention_mask"],
                               ref_logps=batch["ref_logps"], weights=batch["weights"])
        loss.backward()
    """

    def __init__(self, model: nn.Module, loss_fn):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, input_ids, labels, *, attention_mask=None, position_ids=None,
                attention=None, **loss_kwargs):
        batch = {"input_ids": input_ids, "attention_mask": attention_mask,
                 "position_ids": position_ids}
        hidden = hidden_states(self.model, batch, attention=attention)
        spec = head(self.model)
        weight = spec.weight if spec.weight.dtype == hidden.dtype else spec.weight.to(hidden.dtype)
        bias = spec.bias if spec.bias is None or spec.bias.dtype == hidden.dtype \
            else spec.bias.to(hidden.dtype)
        return self.loss_fn(weight, hidden, labels, bias=bias, **loss_kwargs)


class _ObjectiveModule(nn.Module):
    """The trainer's objective(model, batch, normalizer) as one module's forward."""

    def __init__(self, model: nn.Module, objective):
        super().__init__()
        self.model, self.objective = model, objective

    def forward(self, batch: dict, normalizer):
        return self.objective(self.model, batch, normalizer=normalizer)


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        base = getattr(model, getattr(model, "base_model_prefix", "model"), None)
        layers = list(getattr(base, "layers", None) or [])
    return layers


def fully_shard_model(module: nn.Module, *, mixed_precision: torch.dtype | None = None,
                      reshard_after_forward: bool = True, mesh=None) -> nn.Module:
    """FSDP2 on each decoder layer inside ``module``, then on ``module`` itself (in place).

    ``module`` is the module whose forward runs the loss (:class:`PolicyWithLoss`); it owns
    what no layer owns: embeddings, final norm and the LM head. ``mixed_precision``
    (e.g. torch.bfloat16): gathered parameters and compute in that dtype, fp32 gradient
    reduction; the sharded master weights keep their dtype. ``mesh``: default, all ranks
    on the current accelerator (or the CPU). Parameters move to the mesh's device layer by
    layer as they are sharded.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    def policy(cast_inputs: bool):
        if mixed_precision is None:
            return MixedPrecisionPolicy()
        return MixedPrecisionPolicy(param_dtype=mixed_precision, reduce_dtype=torch.float32,
                                    cast_forward_inputs=cast_inputs)

    for layer in _decoder_layers(module):
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard_after_forward,
                    mp_policy=policy(True))
    # the root's inputs are the batch (reference log-probs, weights): never cast them
    fully_shard(module, mesh=mesh, reshard_after_forward=reshard_after_forward,
                mp_policy=policy(False))
    return module


def _env_int(name: str, default: int, minimum: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r}: expected an integer") from None
    if value < minimum:
        raise ValueError(f"environment variable {name}={raw!r}: must be >= {minimum}")
    return value


def torchrun_env() -> tuple[int, int, int] | None:
    """RANK, WORLD_SIZE, LOCAL_RANK as torchrun sets them; None when not launched by it.

    (MASTER_ADDR / MASTER_PORT are read by torch.distributed itself.)
    """
    if os.environ.get("WORLD_SIZE") is None:
        return None
    world = _env_int("WORLD_SIZE", 1, 1)
    rank = _env_int("RANK", 0, 0)
    local = _env_int("LOCAL_RANK", rank, 0)
    if rank >= world:
        raise ValueError(f"environment variable RANK={rank} must be < WORLD_SIZE={world}")
    return rank, world, local


# ------------------------------------------------------------------------------- data

def shard_positions(n: int, world_size: int, rank: int) -> tuple[list[int], bool]:
    """Positions of a global micro-batch of ``n`` items that ``rank`` takes, and whether padded.

    Rank r takes r, r + W, r + 2W, ... (shares differ by at most one). A rank left without
    an item (n < W) gets position 0 and ``padded=True``: it must count it 0 times.
    """
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    mine = list(range(rank, n, world_size))
    return (mine, False) if mine else ([0], True)


# ------------------------------------------------------------------------------- the process

class Parallel:
    """How this process takes part in training; the default is a single process.

    mode: "none" | "ddp" | "fsdp2". rank / world_size / local_rank as torchrun sets them.
    device: this rank's device. mixed_precision: FSDP2 parameter/compute dtype or None.
    """

    def __init__(self, mode: str = "none", *, rank: int = 0, world_size: int = 1,
                 local_rank: int = 0, device: torch.device | None = None,
                 mixed_precision: torch.dtype | None = None,
                 reshard_after_forward: bool = True):
        if mode not in MODES:
            raise ValueError(f"distributed.mode must be one of {list(MODES)}, got {mode!r}")
        if mode == "none" and world_size != 1:
            raise ValueError(f"world_size={world_size} with distributed.mode='none'")
        if mixed_precision is not None and mode != "fsdp2":
            raise ValueError(f"mixed_precision={mixed_precision} needs distributed.mode='fsdp2' "
                             f"(got {mode!r}); use model.dtype=bfloat16 (autocast) otherwise")
        self.mode, self.rank, self.world_size, self.local_rank = mode, rank, world_size, \
            local_rank
        self.device = device or torch.device("cpu")
        self.mixed_precision, self.reshard_after_forward = mixed_precision, reshard_after_forward
        self.module: nn.Module | None = None

    def __repr__(self) -> str:
        return (f"Parallel(mode={self.mode!r}, rank={self.rank}, world_size={self.world_size}, "
                f"device={self.device}, mixed_precision={self.mixed_precision})")

    @property
    def distributed(self) -> bool:
        return self.mode != "none"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------ model
    def wrap(self, model: nn.Module, objective):
        """``run(batch, normalizer) -> (loss, metrics)``; shards/replicates ``model`` in place.

        Call before building the optimiser (FSDP2 replaces the parameters by DTensors).
        """
        if not self.distributed:
            return lambda batch, normalizer: objective(model, batch, normalizer=normalizer)
        module = _ObjectiveModule(model, objective)
        if self.mode == "fsdp2":
            from torch.distributed.device_mesh import init_device_mesh

            mesh = init_device_mesh(self.device.type, (self.world_size,))
            fully_shard_model(module, mixed_precision=self.mixed_precision,
                              reshard_after_forward=self.reshard_after_forward, mesh=mesh)
            self.module = module
        else:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.module = DistributedDataParallel(module, device_ids=ids)
        return self.module

    def load_device(self, device: torch.device) -> torch.device:
        """Where to load a model that :meth:`wrap` will train.

        FSDP2: the CPU; ``fully_shard`` moves each layer to this rank's device as it shards
        it, so a GPU never holds more than one full layer plus its shards.
        """
        return torch.device("cpu") if self.mode == "fsdp2" else device

    # ------------------------------------------------------------------ data
    def global_batch(self, batch_size: int) -> int:
        """Pairs per global micro-batch: ``batch_size`` per process."""
        return batch_size * self.world_size

    def shard(self, idx: list[int]) -> tuple[list[int], bool]:
        """This rank's share of a global micro-batch's indices, and whether it is padding."""
        pos, padded = shard_positions(len(idx), self.world_size, self.rank)
        return [idx[p] for p in pos], padded

    def owns(self, k: int) -> bool:
        """Round-robin ownership of work item ``k`` (weight-estimation shards)."""
        return k % self.world_size == self.rank

    # ------------------------------------------------------------------ per step
    def sum_host(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks of host numbers (a CPU all-reduce: no GPU sync)."""
        if not self.distributed:
            return list(values)
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()

    def forward_backward(self, run, batch: dict, normalizer: float, *, padded: bool = False,
                         last: bool = True):
        """One micro-batch: loss and metrics (detached), its gradient accumulated.

        Padding counts 0 times; the loss is scaled by world_size for backward so that
        DDP/FSDP's averaging yields the gradient of the summed loss.
        """
        sync = contextlib.nullcontext()
        if self.mode == "ddp" and not last:
            sync = self.module.no_sync()
        with sync:
            loss, metrics = run(batch, normalizer)
            if padded:
                loss = loss * 0.0
            (loss * self.world_size if self.distributed else loss).backward()
        return loss.detach(), metrics

    def reduce_metrics(self, total: torch.Tensor, metrics: dict, counts: dict):
        """Global loss (sum of the ranks' shares) and count-weighted metric means.

        One device all-reduce, no host sync. ``metrics`` are this rank's means, each over
        ``counts[key]`` (pairs, tokens, or one side's response tokens).
        """
        if not self.distributed:
            return total, metrics
        import torch.distributed as dist

        keys = sorted(metrics)
        weights = [float(counts.get(k, 0.0)) for k in keys]
        parts = [total.float().reshape(())] + [metrics[k].detach().float().reshape(()) * w
                                               for k, w in zip(keys, weights)]
        buf = torch.cat([torch.stack(parts),
                         torch.tensor(weights, dtype=torch.float32, device=total.device)])
        dist.all_reduce(buf)
        n = buf[1 + len(keys):].clamp(min=1e-12)
        return buf[0], {k: buf[1 + i] / n[i] for i, k in enumerate(keys)}

    def clip_grad_norm(self, params, max_norm: float | None) -> torch.Tensor:
        """``clip_grad_norm_`` over all ranks' gradients (sharded ones included); with
        ``max_norm`` None only their total norm (no pass that scales them)."""
        params = list(params)
        if max_norm is None:
            norm = nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        else:
            norm = nn.utils.clip_grad_norm_(params, max_norm)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    # ------------------------------------------------------------------ checkpoints
    def state_dicts(self, model: nn.Module, optimizer) -> tuple[dict | None, dict | None]:
        """Full model and optimiser state (single-process layout) on rank 0; None elsewhere."""
        if not self.distributed:
            return model.state_dict(), optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        msd = get_model_state_dict(model, options=opts)
        osd = get_optimizer_state_dict(model, optimizer, options=opts)
        if not self.is_main:
            return None, None
        return msd, optimizer_state_to_indices(osd)

    def load_state_dicts(self, model: nn.Module, optimizer, model_sd: dict,
                         optim_sd: dict) -> None:
        """Load full (single-process layout) state into this rank's model and optimiser."""
        if not self.distributed:
            model.load_state_dict(model_sd)
            optimizer.load_state_dict(optim_sd)
            return
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions, set_model_state_dict, set_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True)
        set_model_state_dict(model, model_sd, options=opts)
        set_optimizer_state_dict(model, optimizer,
                                 optimizer_state_to_fqns(optim_sd, fqns_by_group(model,
                                                                                  optimizer)),
                                 options=opts)

    def save_model(self, model: nn.Module, out_dir: str, tokenizer=None) -> None:
        """``save_pretrained`` of the full model, written by rank 0."""
        if not self.distributed:
            save_model(model, out_dir, tokenizer)
            return
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions, get_model_state_dict,
        )

        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                  cpu_offload=True))
        # a tied parameter comes back as a copy under each name: keep the first, as
        # save_pretrained does for tensors that share storage
        first: dict[int, str] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            if first.setdefault(id(p), name) != name:
                sd.pop(name, None)
        if self.is_main:
            os.makedirs(out_dir, exist_ok=True)
            with config_as_loaded(model):
                model.save_pretrained(out_dir, state_dict=sd)
            if tokenizer is not None:
                tokenizer.save_pretrained(out_dir)
        self.barrier()

    # ------------------------------------------------------------------ coordination
    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    @contextlib.contextmanager
    def main_first(self):
        """Rank 0 runs the block first (e.g. writes a file), the others after it."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()


def teardown() -> None:
    """Destroy the default process group, if there is one: at the end of a command that every
    rank reaches (finished, or stopped at the step all ranks agreed on). Torch asks for it
    before a normal exit: on NCCL a rank that exits without it may block another's progress."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def setup(cfg, device: str = "auto", model_dtype: str = "float32") -> Parallel:
    """The :class:`Parallel` of this process from the ``distributed`` config section.

    ``device`` is the run's ``device`` option, ``model_dtype`` the model's (for
    ``mixed_precision="auto"``: bf16 when the model's dtype is bfloat16).

    Under torchrun (RANK/WORLD_SIZE/LOCAL_RANK set) the default process group is created
    (gloo on CPU; ``cpu:gloo,cuda:nccl`` on CUDA, so host-side counts go through gloo) and
    each rank takes ``cuda:LOCAL_RANK``. A distributed mode without torchrun runs as a
    one-process group. ``mode="none"`` under torchrun with several processes is an error.
    """
    import torch.distributed as dist

    env = torchrun_env()
    rank, world, local = env if env is not None else (0, 1, 0)
    if cfg.mode not in MODES:
        raise ValueError(f"distributed.mode must be one of {list(MODES)}, got {cfg.mode!r}")
    if cfg.mixed_precision not in ("auto", "bf16", "none"):
        raise ValueError(f"distributed.mixed_precision must be auto, bf16 or none, got "
                         f"{cfg.mixed_precision!r}")
    if cfg.mixed_precision == "bf16" and cfg.mode != "fsdp2":
        raise ValueError(f"distributed.mixed_precision=bf16 needs distributed.mode=fsdp2 (got "
                         f"{cfg.mode!r}; DDP trains in the model's dtype: use "
                         f"model.dtype=bfloat16)")
    if cfg.mode == "none":
        if world > 1:
            raise ValueError(f"launched by torchrun with {world} processes but "
                             f"distributed.mode='none': each would train alone; set "
                             f"--distributed.mode ddp or fsdp2")
        return Parallel("none")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device='cuda' under distributed.mode={cfg.mode!r}: CUDA is not "
                         f"available here; use 'cpu' or 'auto'")
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        if local >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK={local}: this machine has {torch.cuda.device_count()} "
                             f"CUDA device(s); start at most that many processes per node")
        dev = torch.device("cuda", local)
    elif device in ("auto", "cpu"):
        dev = torch.device("cpu")
    else:
        raise ValueError(f"device={device!r} under distributed.mode={cfg.mode!r}: use 'auto', "
                         f"'cuda' (each rank takes cuda:LOCAL_RANK) or 'cpu'")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        backend = "cpu:gloo,cuda:nccl" if dev.type == "cuda" else "gloo"
        timeout = timedelta(minutes=cfg.timeout_minutes)
        if env is None:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                                    timeout=timeout)
        else:
            dist.init_process_group(backend, timeout=timeout,
                                    device_id=dev if dev.type == "cuda" else None)
    rank, world = dist.get_rank(), dist.get_world_size()
    bf16 = cfg.mixed_precision == "bf16" or (cfg.mixed_precision == "auto"
                                             and model_dtype == "bfloat16")
    mp = torch.bfloat16 if bf16 and cfg.mode == "fsdp2" else None
    return Parallel(cfg.mode, rank=rank, world_size=world, local_rank=local, device=dev,
                    mixed_precision=mp, reshard_after_forward=cfg.reshard_after_forward)
