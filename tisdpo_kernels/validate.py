"""Input checks shared by every public op: clear ValueErrors that name the argument.

Shape and dtype checks are free. Value checks (targets in range, finite inputs) look at
data: on CPU they raise ValueError; on CUDA they default to an asynchronous device
assertion so a training step never syncs with the host (see ``_env.value_checks``).
"""
from __future__ import annotations

import math
import numbers
import sys

import torch

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def require(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def check_float(name: str, t: torch.Tensor) -> None:
    require(isinstance(t, torch.Tensor), f"{name} must be a torch.Tensor, got {type(t).__name__}")
    require(t.dtype in _FLOAT_DTYPES, f"{name} must be a floating tensor, got dtype {t.dtype}")


def check_index(name: str, t: torch.Tensor) -> None:
    require(isinstance(t, torch.Tensor), f"{name} must be a torch.Tensor, got {type(t).__name__}")
    require(
        t.dtype in (torch.int64, torch.int32, torch.int16),
        f"{name} must be an integer tensor (int64, int32 or int16), got dtype {t.dtype}",
    )


def check_same_device(**tensors: torch.Tensor | None) -> None:
    present = {k: v for k, v in tensors.items() if v is not None}
    devices = {v.device for v in present.values()}
    if len(devices) > 1:
        where = ", ".join(f"{k} on {v.device}" for k, v in present.items())
        raise ValueError(f"all tensors must be on one device; got {where}")


def check_scalar(name: str, value: float, *, low=None, high=None, low_open=False,
                 high_open=False) -> float:
    """Finite real ``value`` (int, float, a numpy scalar, not a bool) inside [low, high] (open
    ends when ``*_open``); returns it as a Python float."""
    require(isinstance(value, numbers.Real) and not isinstance(value, bool),
            f"{name} must be a number, got {value!r}")
    value = float(value)
    require(math.isfinite(value), f"{name} must be finite, got {value!r}")
    if low is not None:
        bad = value <= low if low_open else value < low
        require(not bad, f"{name} must be {'>' if low_open else '>='} {low}, got {value!r}")
    if high is not None:
        bad = value >= high if high_open else value > high
        require(not bad, f"{name} must be {'<' if high_open else '<='} {high}, got {value!r}")
    return value


def check_int(name: str, value, *, low: int | None = None) -> int:
    """An int (a Python or numpy integer, not a bool), ``>= low`` when given; as a Python int."""
    require(isinstance(value, numbers.Integral) and not isinstance(value, bool)
            and (low is None or value >= low),
            f"{name} must be an int{'' if low is None else f' >= {low}'}, got {value!r}")
    return int(value)


def value_check(cond_bad: torch.Tensor, msg_fn) -> None:
    """Raise when any element of ``cond_bad`` is true, without a host sync on CUDA."""
    from tisdpo_kernels import _env

    mode = _env.value_checks()
    if mode == "off" or cond_bad.numel() == 0:
        return
    if cond_bad.device.type == "cpu" or mode == "full":
        if bool(cond_bad.any()):
            raise ValueError(msg_fn(cond_bad))
        return
    torch._assert_async(~cond_bad.any(), msg_fn(None))


def check_env() -> None:
    """Every environment variable the kernels read holds a valid value (``_env.check_all``)."""
    from tisdpo_kernels import _env

    _env.check_all()


def check_targets(name: str, targets: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """Every target is in [0, vocab) or equals ``ignore_index``."""
    t = targets.int() if targets.dtype == torch.int16 else targets  # vocab may exceed int16
    bad = ((t < 0) | (t >= vocab)) & (t != ignore_index)

    def msg(b):
        if b is None:
            return f"{name}: a target lies outside [0, {vocab}) and is not ignore_index={ignore_index}"
        idx = torch.nonzero(b)[0].tolist()
        return (f"{name}[{', '.join(map(str, idx))}] = {int(targets[tuple(idx)])} lies outside "
                f"[0, {vocab}) and is not ignore_index={ignore_index}")

    value_check(bad, msg)


def check_finite(name: str, t: torch.Tensor) -> None:
    bad = ~torch.isfinite(t)

    def msg(b):
        if b is None:
            return f"{name} contains a non-finite value"
        idx = torch.nonzero(b)[0].tolist()
        return f"{name}[{', '.join(map(str, idx))}] = {t[tuple(idx)].item()} is not finite"

    value_check(bad, msg)


def check_finite_at(name: str, t: torch.Tensor, keep: torch.Tensor) -> None:
    """Every element of ``t`` where ``keep`` is true is finite (elsewhere anything goes)."""
    bad = keep & ~torch.isfinite(t)

    def msg(b):
        if b is None:
            return f"{name} has a non-finite value at a kept token"
        idx = torch.nonzero(b)[0].tolist()
        return (f"{name}[{', '.join(map(str, idx))}] = {t[tuple(idx)].item()} is not finite "
                f"(a kept token's value)")

    value_check(bad, msg)


def check_packed_pairs(seq_ids, chosen_seq, rejected_seq, num_seqs: int) -> None:
    """The packed preference layout's ids, checked on the device (no host sync on CUDA).

    seq_ids [N]: −1 (outside every response) or the id of a sequence that some pair names;
    chosen_seq / rejected_seq [P]: ids in [0, num_seqs), and no pair names one sequence as
    both its chosen and its rejected response. ``num_seqs`` bounds every id.
    """
    for name, ids in (("chosen_seq", chosen_seq), ("rejected_seq", rejected_seq)):
        value_check((ids < 0) | (ids >= num_seqs), lambda b, name=name, ids=ids:
                    f"{name} must hold sequence ids in [0, {num_seqs}), got "
                    f"{'an id outside' if b is None else int(ids[b][0])}")
    same = chosen_seq == rejected_seq
    value_check(same, lambda b: "chosen_seq and rejected_seq name the same sequence in a pair" if
                b is None else f"pair {int(torch.nonzero(b)[0])} names sequence "
                f"{int(chosen_seq[b][0])} as both chosen_seq and rejected_seq")
    value_check(seq_ids < -1, lambda b: f"seq_ids must be >= -1 (-1 = outside every response), "
                f"got {'a smaller id' if b is None else int(seq_ids[b].min())}")
    # a response token whose sequence no pair names would silently count nowhere
    in_range = (seq_ids >= 0) & (seq_ids < num_seqs)
    paired = torch.zeros(num_seqs + 1, dtype=torch.bool, device=seq_ids.device)
    for ids in (chosen_seq, rejected_seq):
        paired[torch.where((ids >= 0) & (ids < num_seqs), ids, num_seqs).long()] = True
    paired[num_seqs] = False                  # the slot of out-of-range ids: never a sequence
    unpaired = (seq_ids >= 0) & ~paired[torch.where(in_range, seq_ids, num_seqs).long()]
    value_check(unpaired, lambda b: "seq_ids holds a sequence id that no pair "
                "(chosen_seq/rejected_seq) names" if b is None else
                f"seq_ids[{int(torch.nonzero(b)[0])}] = {int(seq_ids[b][0])} names a sequence "
                f"that no pair (chosen_seq/rejected_seq) names")


def check_not_sharded(weight, name: str = "lm_head_weight") -> None:
    """ValueError if ``weight`` is a DTensor (an FSDP2/tensor-parallel shard of the head).

    Free when no DTensor exists in the process (torch.distributed.tensor never imported).
    """
    if weight is None or "torch.distributed.tensor" not in sys.modules:
        return
    from torch.distributed.tensor import DTensor, Replicate

    if not isinstance(weight, DTensor):
        return
    placements = tuple(weight.placements)
    if all(isinstance(p, Replicate) for p in placements):
        raise ValueError(
            f"{name} is a replicated DTensor (placements {placements}, shape "
            f"{tuple(weight.shape)}); the fused loss takes plain tensors: pass "
            f"{name}.to_local() when every rank holds the same weight and inputs, or run the "
            f"loss inside the FSDP-wrapped module's forward (tisdpo.train.parallel.PolicyWithLoss)")
    raise ValueError(
        f"the LM-head weight {name} is a sharded DTensor (placements {placements}, local "
        f"shard {tuple(weight.to_local().shape)} of {tuple(weight.shape)}), as FSDP2 leaves "
        f"it outside the wrapped module's forward; computing the loss on the shard would be "
        f"wrong. Run the loss inside the FSDP-wrapped module's forward, so that FSDP gathers "
        f"the weight and reduce-scatters its gradient: see tisdpo.train.parallel.PolicyWithLoss")


def check_linear_inputs(hidden, weight, targets, bias, *, prefix: str = "", suffix: str = "",
                        names: dict[str, str] | None = None) -> None:
    """hidden [..., D], weight [V, D] (V, D >= 1), targets [...] matching hidden[..., :-1],
    bias [V].

    Errors name the arguments ``{prefix}hidden{suffix}``, ``{prefix}weight{suffix}``,
    ``targets`` and ``{prefix}bias{suffix}``; ``names`` overrides any of them (keys hidden,
    weight, targets, bias), so a caller can report the names its own users passed.
    """
    n = {"hidden": f"{prefix}hidden{suffix}", "weight": f"{prefix}weight{suffix}",
         "targets": "targets", "bias": f"{prefix}bias{suffix}", **(names or {})}
    h, w, t, b = n["hidden"], n["weight"], n["targets"], n["bias"]
    check_not_sharded(weight, w)
    check_float(h, hidden)
    check_float(w, weight)
    check_index(t, targets)
    require(weight.dim() == 2, f"{w} must be [V, D], got shape {tuple(weight.shape)}")
    require(hidden.dim() >= 1, f"{h} must be [..., D], got shape {tuple(hidden.shape)}")
    require(weight.shape[0] > 0, f"{w} has 0 vocabulary rows (shape {tuple(weight.shape)}); "
            f"the LM head needs V >= 1")
    require(hidden.shape[-1] > 0, f"{h} has 0 columns (D=0, shape {tuple(hidden.shape)}); "
            f"the LM head needs D >= 1")
    require(hidden.shape[-1] == weight.shape[1],
            f"{h} has D={hidden.shape[-1]} but {w} has D={weight.shape[1]} "
            f"({w} is [V, D] = {tuple(weight.shape)})")
    require(tuple(hidden.shape[:-1]) == tuple(targets.shape),
            f"{t} shape {tuple(targets.shape)} must equal {h} shape without its last "
            f"dim {tuple(hidden.shape[:-1])}")
    require(hidden.dtype == weight.dtype,
            f"{h} dtype {hidden.dtype} differs from {w} dtype {weight.dtype}")
    if bias is not None:
        check_float(b, bias)
        require(tuple(bias.shape) == (weight.shape[0],),
                f"{b} must be [V]=[{weight.shape[0]}], got shape {tuple(bias.shape)}")
        require(bias.dtype == weight.dtype,
                f"{b} dtype {bias.dtype} differs from {w} dtype {weight.dtype}")
    check_same_device(**{h: hidden, w: weight, t: targets, b: bias})


def check_softcap(softcap) -> float | None:
    """None or a cap > 0; returns it as a Python float."""
    if softcap is None:
        return None
    cap = check_scalar("softcap", softcap, low=0.0, low_open=True)
    f32 = torch.finfo(torch.float32)       # the kernels read the cap as a float32
    require(f32.tiny <= cap <= f32.max,
            f"softcap must lie within float32's normal range [{f32.tiny:.3g}, {f32.max:.3g}], "
            f"got {softcap!r}")
    return cap


def check_filter_eps(filter_eps) -> float | None:
    """None (exact gradients) or a probability threshold in (0, 1), as a Python float."""
    if filter_eps is None:
        return None
    return check_scalar("filter_eps", filter_eps, low=0.0, high=1.0, low_open=True,
                        high_open=True)
