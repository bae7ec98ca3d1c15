"""End-to-end long-sequence study: TIS-DPO training steps at growing pair lengths.

A Llama-3.2-1B-shaped model (built from ``LlamaConfig``, random weights, bf16, activation
checkpointing, fused AdamW) trains on one packed pair per step: chosen and rejected
responses of T = L/2 tokens each in one row of L tokens, positions restarting at the
second sequence so attention is block-diagonal (flex attention on CUDA), reference
log-probs precomputed (random, as an offline pass would give), per-token weights given.
The head and loss come from a provider:

- ``ours-triton`` / ``ours-torch``: ``tisdpo.TISDPOLoss(method="tisdpo")`` with the recompute
  strategy; ``ours-one-sweep``: the same loss with ``strategy="one_sweep"``;
- ``eager``: materialised logits, fp32 log_softmax, gather, the same weighted reduction;
- ``liger-dpo``: ``LigerFusedLinearDPOLoss`` (no per-token weights; it cannot take
  precomputed reference log-probs, so it runs reference-free, which costs the same).

For each provider and L (4k … 128k by default) it records the median step time, tokens/s,
the peak allocated memory (model, optimizer state and activations included) and, at the
end, the longest pair that fitted. GPU only; ``--toy`` runs a toy model (also on CPU) as a
smoke test. ``python -m benchmarks.e2e_long --help``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks import measure as M
from benchmarks import providers as P
from benchmarks import results as R
from benchmarks.shapes import parse_tokens

__all__ = ["llama32_1b_config", "toy_config", "main"]

DEFAULT_LENGTHS = "4k,8k,16k,32k,64k,96k,128k"
IGNORE = -100


def llama32_1b_config(attn: str):
    from transformers import LlamaConfig
    return LlamaConfig(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, rms_norm_eps=1e-5,
        max_position_embeddings=131072, tie_word_embeddings=True,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192},
        attn_implementation=attn)


def toy_config(attn: str):
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=4096, tie_word_embeddings=True,
                       attn_implementation=attn)


def build_model(config, device: torch.device, dtype: torch.dtype, seed: int):
    from transformers import LlamaForCausalLM
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    model.config.use_cache = False
    if hasattr(model, "activation_checkpointing_enable"):      # transformers >= 5.2x
        model.activation_checkpointing_enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def make_batch(length: int, vocab: int, device: torch.device, seed: int, layout: str):
    """One pair of T = length/2 tokens per side: ids, positions, labels, ref logps, weights."""
    seq = length // 2
    g = torch.Generator(device="cpu").manual_seed(seed)
    ids = torch.randint(0, vocab, (2, seq), generator=g)
    labels = torch.cat([ids[:, 1:], torch.full((2, 1), IGNORE)], dim=1)   # shifted per sequence
    ref_logps = -torch.rand(2, seq, generator=g) * 8.0
    weights = 0.7 + 0.6 * torch.rand(2, seq, generator=g)
    if layout == "packed":
        ids, pos = ids.reshape(1, length), torch.arange(seq).repeat(2).reshape(1, length)
    else:
        pos = torch.arange(seq).expand(2, seq)
    move = lambda t: t.to(device)   # noqa: E731
    return dict(input_ids=move(ids), position_ids=move(pos), labels=move(labels),
                ref_logps=move(ref_logps), weights=move(weights), seq=seq)


def make_step(model, opt, loss_fn, batch, uses_weights: bool):
    dim = model.config.hidden_size

    def step():
        hidden = model.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                             use_cache=False).last_hidden_state
        hidden = hidden.reshape(2, batch["seq"], dim)       # chosen row, rejected row
        loss = loss_fn(hidden, model.lm_head.weight, batch["labels"],
                       ref_logps=batch["ref_logps"],
                       weights=batch["weights"] if uses_weights else None)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()
    return step


def _time_steps(step, device, warmup: int, steps: int) -> list[float]:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def run(args, device: torch.device, env: dict,
        on_rows: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """Every provider at every length; ``on_rows`` gets each (provider, length)'s rows, and
    each provider's summary, as soon as they are measured, so a run stopped part way (by a
    time limit, say) keeps what it finished."""
    attn = args.attn if args.attn != "auto" else (
        "flex_attention" if (device.type == "cuda" and args.layout == "packed") else "sdpa")
    config = (toy_config if args.toy else llama32_1b_config)(attn)
    shape_name = "toy-llama" if args.toy else "llama3.2-1b"
    dtype = torch.bfloat16
    model = build_model(config, device, dtype, args.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=device.type == "cuda")
    lengths = _lengths(args)
    rows = []

    def emit(new: list[dict]) -> None:
        rows.extend(new)
        if on_rows is not None:
            on_rows(new)

    cols = dict(shape=shape_name, dtype="bf16", hidden=config.hidden_size,
                vocab=config.vocab_size, x_name="pair_tokens")
    for name in args.providers:
        # the probe of our losses is their first compile: its failure is this provider's
        # error rows, and the next provider still runs
        st, why = M.guarded(lambda: P.skip_reason(name, "loss", device, dtype=dtype))
        if st != "ok":          # its status rows, and a summary that says nothing fits
            print(f"  {name}: {st} in its probe: {why}", file=sys.stderr)
            extra = {"layout": args.layout, "attn": attn, "message": f"probe: {why}"}
            emit([R.make_row(env, op="e2e_step", provider=name, mode="step", tokens=length,
                             metric="status", unit="", status=st, extra=extra, **cols)
                  for length in lengths] +
                 [R.make_row(env, op="e2e_step", provider=name, mode="summary",
                             tokens=max(lengths), metric="longest_pair_fits",
                             unit="pair_tokens", status="error",
                             extra={**extra, "tested": list(lengths)}, **cols)])
            M.free_memory(device)
            continue
        if why is not None:
            print(f"skipped {name}: {why}", file=sys.stderr)
            continue
        loss_mod = P.make_loss(name, args.beta, None)

        def loss_fn(h, w, labels, **kw):
            return loss_mod(h, w, labels, **kw)
        longest, failed = 0, None
        for length in lengths:
            extra = {"layout": args.layout, "attn": attn, "activation_checkpointing": True,
                     "reference": "precomputed", "steps": args.steps, "warmup": args.warmup,
                     "token_weights": P.PROVIDERS[name].token_weights}
            common = dict(op="e2e_step", provider=name, mode="step", tokens=length, **cols)
            batch = make_batch(length, config.vocab_size, device, args.seed, args.layout)
            step = make_step(model, opt, loss_fn, batch, P.PROVIDERS[name].token_weights)
            if device.type == "cuda":
                M.free_memory(device)
                torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
            st, out = M.guarded(lambda: _time_steps(step, device, args.warmup, args.steps))
            opt.zero_grad(set_to_none=True)
            if st != "ok":
                print(f"  {name} L={length}: {st}: {out}", file=sys.stderr)
                emit([R.make_row(env, metric="status", unit="", status=st,
                                 extra={**extra, "message": out}, **common)])
                batch = step = None
                M.free_memory(device)
                if st != "oom":         # an error says nothing of what fits
                    failed = failed or f"{st} at {length} tokens: {out}"
                elif args.stop_at_oom:
                    break
                continue
            stats = M.Stats.of(out)
            longest = max(longest, length)
            new = [
                R.make_row(env, metric="step_time", unit="ms", value=stats.median_ms,
                           p20=stats.p20_ms, p80=stats.p80_ms, extra=extra, **common),
                R.make_row(env, metric="tokens_per_s", unit="tok/s",
                           value=length / (stats.median_ms * 1e-3), extra=extra, **common),
            ]
            if device.type == "cuda":
                peak = torch.cuda.max_memory_allocated(device) / 2**20
                new += [R.make_row(env, metric="peak_memory", unit="MiB", value=peak,
                                   extra={**extra, "before_step_mib": base / 2**20}, **common)]
            emit(new)
            print(f"  {name:<12} L={length:>7}  {stats.median_ms:10.1f} ms/step"
                  + (f"  peak {new[-1]['value']} MiB" if device.type == "cuda" else ""),
                  file=sys.stderr)
            batch = step = None
            M.free_memory(device)
        # an error (not an OOM) at some length leaves the longest pair that fits unknown
        emit([R.make_row(env, op="e2e_step", provider=name, mode="summary",
                         tokens=max(lengths), metric="longest_pair_fits",
                         unit="pair_tokens", value=longest or None,
                         status="error" if failed else "ok",
                         extra={"tested": list(lengths), "layout": args.layout, "attn": attn,
                                **({"message": failed} if failed else {})}, **cols)])
    return rows


def _lengths(args) -> tuple[int, ...]:
    """The pair lengths to run (``--lengths``, else the defaults), each even."""
    lengths = parse_tokens(args.lengths or ("64,128" if args.toy else DEFAULT_LENGTHS))
    for length in lengths:
        if length % 2:
            raise ValueError(f"--lengths: {length} must be even (chosen + rejected)")
    return lengths


def _print_summary(rows: list[dict]) -> None:
    head = rows[0] if rows else None
    if head:
        print(f"device: {head['device']} | torch {head['torch']} | {head['shape']} | bf16 | "
              f"{head['date']} | commit {head['git_commit']}")
    print(f"{'provider':<12} {'pair tokens':>11} {'ms/step':>10} {'tokens/s':>10} "
          f"{'peak MiB':>10}  status")
    by = {}
    for r in rows:
        by.setdefault((r["provider"], int(r["x_value"]), r["mode"]), {})[r["metric"]] = r
    for (prov, length, mode), m in by.items():
        if mode == "summary":
            r = m["longest_pair_fits"]
            fit = (f"unknown ({json.loads(r['extra']).get('message')})"
                   if r["status"] == "error" else r["value"] or "none")
            print(f"{prov:<12} longest pair that fits: {fit}")
            continue
        if "status" in m:
            print(f"{prov:<12} {length:>11} {'':>10} {'':>10} {'':>10}  "
                  f"{m['status']['status'].upper()}")
            continue
        print(f"{prov:<12} {length:>11} {float(m['step_time']['value']):>10.1f} "
              f"{float(m['tokens_per_s']['value']):>10.0f} "
              f"{m.get('peak_memory', {}).get('value', '—'):>10}  ok")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.e2e_long",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--providers", default=None,
                    help="comma list (default: ours-triton,ours-one-sweep,eager,liger-dpo on "
                         "CUDA; ours-torch,eager with --toy on CPU)")
    ap.add_argument("--lengths", default=None,
                    help=f"pair lengths L (chosen+rejected tokens), default {DEFAULT_LENGTHS}")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per length (default 3)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    ap.add_argument("--layout", choices=("packed", "rows"), default="packed",
                    help="packed: one row, positions restart (block-diagonal attention); "
                         "rows: chosen and rejected as two rows of L/2 (causal SDPA)")
    ap.add_argument("--attn", default="auto",
                    help="attention implementation: auto (flex_attention for packed on CUDA, "
                         "else sdpa), sdpa, flex_attention, eager")
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--keep-going", dest="stop_at_oom", action="store_false",
                    help="try longer pairs after an OOM (default: stop that provider)")
    ap.add_argument("--toy", action="store_true", help="toy model and lengths (CPU smoke)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--out", default=None,
                    help="results CSV (default benchmarks/results/e2e-<device>.csv; '-': none)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    argv = sys.argv[1:] if argv is None else list(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda" and not args.toy:
        print("e2e_long measures long-sequence training on a CUDA GPU and none is available; "
              "pass --toy for a toy-sized smoke run on the CPU", file=sys.stderr)
        return 2
    if args.steps < 1 or args.warmup < 0:
        print("error: need --steps >= 1 and --warmup >= 0", file=sys.stderr)
        return 2
    default = ("ours-triton,ours-one-sweep,eager,liger-dpo" if device.type == "cuda"
               else "ours-torch,eager")
    try:
        args.providers = P.resolve_providers(args.providers or default)
        _lengths(args)
        for name in args.providers:
            if "loss" not in P.PROVIDERS[name].ops:
                raise ValueError(f"--providers: {name} has no loss op")
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    env = R.environment(device, argv, program="python -m benchmarks.e2e_long")
    out = None
    if args.out != "-":
        stem = "e2e-" + (R.device_slug(env["device"]) if device.type == "cuda" else "cpu")
        out = Path(args.out) if args.out else R.RESULTS_DIR / f"{stem}.csv"
    rows = run(args, device, env, on_rows=(lambda rs: R.append_csv(rs, out)) if out else None)
    _print_summary(rows)
    if out and rows:
        print(f"rows appended to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
