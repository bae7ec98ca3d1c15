"""Run a benchmark grid: shapes × token counts × ops × providers × modes → result rows."""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Callable

import torch

from benchmarks import measure as M
from benchmarks import ops as O
from benchmarks import providers as P
from benchmarks import results as R
from benchmarks.shapes import HeadShape

__all__ = ["RunConfig", "run", "MODES", "DTYPES"]

MODES = ("fwd", "bwd", "fwdbwd")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class RunConfig:
    ops: list[str]
    modes: list[str]
    shapes: list[HeadShape]
    providers: list[str]
    device: torch.device
    dtype: str = "bf16"
    tokens: tuple[int, ...] | None = None      # None: each shape's defaults
    reps: int = 20
    warmup: int = 5
    pairs: int = 1
    beta: float = 0.1
    reference: str = "online"                  # the loss op's: O.REFERENCES
    check: bool = True
    ceiling: bool = True
    seed: int = 0
    skipped: list[tuple[str, str, str]] = field(default_factory=list)   # (provider, op, why)

    def __post_init__(self):
        for m in self.modes:
            if m not in MODES:
                raise ValueError(f"--mode: unknown mode {m!r}; valid modes are {MODES}")
        for op in self.ops:
            if op not in P.OPS:
                raise ValueError(f"--op: unknown op {op!r}; valid ops are {P.OPS}")
        if self.reference not in O.REFERENCES:
            raise ValueError(f"--reference: {self.reference!r} is not one of {O.REFERENCES}")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype: unknown dtype {self.dtype!r}; valid are {list(DTYPES)}")
        if self.reps < 1 or self.warmup < 0:
            raise ValueError(f"need --reps >= 1 and --warmup >= 0, got {self.reps}, "
                             f"{self.warmup}")
        if self.pairs < 1:
            raise ValueError(f"--pairs must be >= 1, got {self.pairs}")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _shape_cols(case: O.Case, dtype: str) -> dict:
    return dict(shape=case.shape.name, tokens=case.tokens, dtype=dtype,
                hidden=case.shape.hidden, vocab=case.shape.vocab, softcap=case.shape.softcap)


def _measure_ceiling(cfg: RunConfig, case: O.Case, inp: O.Inputs, env: dict) -> tuple[list, float]:
    cols = _shape_cols(case, cfg.dtype)
    call = O.ceiling_call(case, inp)
    warmup = max(cfg.warmup, 1)         # cuBLAS picks its kernel on the first call
    status, out = M.guarded(lambda: M.time_fn(call, device=cfg.device, warmup=warmup,
                                                reps=cfg.reps))
    if status != "ok":
        return [R.make_row(env, op="ceiling", provider="dense-matmul", mode="fwd",
                           metric="status", unit="", status=status,
                           extra={"message": out}, **cols)], float("nan")
    fl = M.flops("ceiling", "dense", "fwd", case.tokens, case.shape.hidden, case.shape.vocab)
    tflops = fl / (out.median_ms * 1e-3) / 1e12
    extra = {"flops": fl, "reps": out.reps, "warmup": warmup}
    rows = [
        R.make_row(env, op="ceiling", provider="dense-matmul", mode="fwd", metric="time",
                   unit="ms", value=out.median_ms, p20=out.p20_ms, p80=out.p80_ms, extra=extra,
                   **cols),
        R.make_row(env, op="ceiling", provider="dense-matmul", mode="fwd", metric="tflops",
                   unit="TFLOP/s", value=tflops, p20=fl / (out.p80_ms * 1e-3) / 1e12,
                   p80=fl / (out.p20_ms * 1e-3) / 1e12, extra=extra, **cols),
    ]
    return rows, tflops


def _mode_fns(work: O.Workload, mode: str):
    """(timed callable, untimed per-repetition setup or None) for one mode. ``bwd`` runs a
    fresh forward untimed before each timed backward (no retain_graph: every backward
    frees what it would free in training)."""
    if mode == "fwd":
        return work.call, None
    if mode == "fwdbwd":
        return (lambda: work.backward(work.call())), None
    return work.backward, work.call


def _case_extra(case: O.Case) -> dict:
    """What every row of a loss case carries in ``extra``: its pairs and its reference (an
    "online" head or "precomputed" log-probs), so that runs of different cases never mix."""
    return {"pairs": case.pairs, "ref_logps": case.reference} if case.op == "loss" else {}


def _status_rows(env: dict, case: O.Case, dtype: str, providers, modes, status: str,
                 message: str) -> list[dict]:
    """Rows that measured nothing (skipped, error, OOM) for ``providers`` × ``modes`` of one
    case, carrying its message and the case's extra."""
    return [R.make_row(env, op=case.op, provider=p, mode=m, metric="status", unit="",
                       status=status, extra={"message": message, **_case_extra(case)},
                       **_shape_cols(case, dtype)) for p in providers for m in modes]


def _provider_rows(cfg: RunConfig, case: O.Case, inp: O.Inputs, name: str, env: dict,
                   ceiling: float) -> list[dict]:
    cols = _shape_cols(case, cfg.dtype)
    strategy = P.PROVIDERS[name].strategy
    rows = []

    def status_rows(modes, status, message):
        return _status_rows(env, case, cfg.dtype, [name], modes, status, message)

    st, work = M.guarded(lambda: O.build_workload(case, inp, name))
    if st == "ok":
        # First call outside the timings: compilation, autotuning, allocator warm-up.
        st, msg = M.guarded(lambda: work.backward(work.call()))
    else:
        msg = work
    if st != "ok":
        M.free_memory(cfg.device)
        _log(f"  {name}: {st}: {msg}")
        return status_rows(cfg.modes, st, msg)
    for mode in cfg.modes:
        def measure_mode():
            fn, setup = _mode_fns(work, mode)
            stats = M.time_fn(fn, device=cfg.device, warmup=cfg.warmup, reps=cfg.reps,
                              grad_to_none=work.leaves, setup=setup)
            mem = M.peak_memory_mb(fn, device=cfg.device, grad_to_none=work.leaves,
                                   setup=setup)
            return stats, mem
        st, out = M.guarded(measure_mode)
        for leaf in work.leaves:
            leaf.grad = None
        if st != "ok":
            M.free_memory(cfg.device)
            _log(f"  {name} {mode}: {st}: {out}")
            rows += status_rows([mode], st, out)
            continue
        stats, mem = out
        fl = M.flops(case.op, strategy, mode, case.tokens, case.shape.hidden, case.shape.vocab,
                     reference_head=case.reference == "online")
        # a filtering backward skips GEMM work by the data: the model's count would credit it
        # with flops it never ran, so its backward gets no TFLOP/s and no % of dense
        counted = not (P.PROVIDERS[name].filtered and mode != "fwd")
        extra = {"flops": fl if counted else None,
                 "flop_model": strategy if counted else f"{strategy}, filtered: not counted",
                 "reps": stats.reps, "warmup": cfg.warmup, "pairs": None, **_case_extra(case)}
        common = dict(op=case.op, provider=name, mode=mode, extra=extra, **cols)
        rows.append(R.make_row(env, metric="time", unit="ms", value=stats.median_ms,
                               p20=stats.p20_ms, p80=stats.p80_ms, **common))
        if mem is not None:
            rows.append(R.make_row(env, metric="peak_memory", unit="MiB", value=mem, **common))
        if fl > 0 and counted:
            tf = fl / (stats.median_ms * 1e-3) / 1e12
            rows.append(R.make_row(env, metric="tflops", unit="TFLOP/s", value=tf,
                                   p20=fl / (stats.p80_ms * 1e-3) / 1e12,
                                   p80=fl / (stats.p20_ms * 1e-3) / 1e12, **common))
            if ceiling == ceiling:   # not NaN
                rows.append(R.make_row(env, metric="pct_ceiling", unit="%",
                                       value=100.0 * tf / ceiling, **common))
        _log(f"  {name:<14} {mode:<6} {stats.median_ms:10.3f} ms"
             + (f"  {mem:10.1f} MiB" if mem is not None else ""))
    if cfg.check:
        st, errs = M.guarded(lambda: O.reference_errors(case, inp, name, work))
        if st != "ok":
            rows += status_rows(["check"], st, errs)
        else:
            for out_name, (err, ref_max) in errs.items():
                rows.append(R.make_row(env, op=case.op, provider=name, mode="check",
                                       metric=f"err_{out_name}", unit="max_abs", value=err,
                                       extra={"ref_max": ref_max, "reference": "fp32",
                                              **_case_extra(case)}, **cols))
    return rows


def run(cfg: RunConfig, env: dict, on_rows: Callable[[list[dict]], None] | None = None
        ) -> list[dict]:
    """Measure the grid; ``on_rows`` is called with each provider's rows (and the ceiling's)
    as soon as they are measured, so a run stopped part way keeps what it finished."""
    dtype = DTYPES[cfg.dtype]
    if "loss" in cfg.ops:
        for shape in cfg.shapes:
            for tokens in (cfg.tokens or shape.tokens):
                if tokens % (2 * cfg.pairs):
                    raise ValueError(f"--tokens: {tokens} is not a multiple of 2·pairs = "
                                     f"{2 * cfg.pairs} (the loss op lays tokens out as "
                                     f"[2·pairs, T])")
    all_rows: list[dict] = []

    def emit(rows):
        all_rows.extend(rows)
        if on_rows and rows:
            on_rows(rows)

    for shape in cfg.shapes:
        for tokens in (cfg.tokens or shape.tokens):
            ceiling, ceiling_done = float("nan"), not cfg.ceiling
            for op in cfg.ops:
                case = O.Case(op, shape, tokens, dtype, cfg.device, pairs=cfg.pairs,
                              beta=cfg.beta, seed=cfg.seed,
                              reference=cfg.reference if op == "loss" else "online")
                given = ", precomputed reference log-probs" if case.reference != "online" else ""
                _log(f"[{op}] {shape.name} N={tokens} {cfg.dtype}{given} on {env['device']}")
                st, inp = M.guarded(lambda: O.make_inputs(case))
                if st != "ok":
                    _log(f"  inputs: {st}: {inp}")
                    emit(_status_rows(env, case, cfg.dtype, cfg.providers, cfg.modes, st,
                                      f"inputs: {inp}"))
                    M.free_memory(cfg.device)
                    continue
                if not ceiling_done:        # once per (shape, tokens), before the providers
                    crow, ceiling = _measure_ceiling(cfg, case, inp, env)
                    emit(crow)
                    ceiling_done = True
                for name in cfg.providers:
                    # skip_reason runs our loss providers once at a tiny size (a probe): a
                    # failure there that is no "unavailable" (a Triton compile error, a CUDA
                    # error) becomes this provider's error rows, never the end of the run
                    st, why = M.guarded(lambda: P.skip_reason(name, op, cfg.device, dtype=dtype,
                                                              softcap=shape.softcap))
                    if st != "ok":
                        _log(f"  {name}: {st} in its probe: {why}")
                        emit(_status_rows(env, case, cfg.dtype, [name], cfg.modes, st,
                                          f"probe: {why}"))
                        M.free_memory(cfg.device)
                        continue
                    if why is not None:
                        if (name, op, why) not in cfg.skipped:
                            cfg.skipped.append((name, op, why))
                            _log(f"  {name}: skipped: {why}")
                        continue
                    with P.provider_env(name):
                        emit(_provider_rows(cfg, case, inp, name, env, ceiling))
                    M.free_memory(cfg.device)      # the provider's workload is gone by now
                del inp
                M.free_memory(cfg.device)
    return all_rows
