"""Regenerate the README's results section (markdown) from the committed results files.

``python -m benchmarks.readme_table`` prints it; ``--write README.md`` replaces the text
between ``<!-- benchmarks:begin -->`` and ``<!-- benchmarks:end -->``. Only rows measured on a
CUDA device are shown as results; when there are none, the section says so explicitly (CPU
rows are toy-size smoke runs, never performance numbers). Where a key was measured more than
once, the latest row wins.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

from benchmarks import results as R
from benchmarks.shapes import parse_tokens

__all__ = ["render", "main", "GPU_COMMAND", "E2E_COMMAND", "BEGIN", "END"]

BEGIN, END = "<!-- benchmarks:begin -->", "<!-- benchmarks:end -->"
GPU_COMMAND = ("python -m benchmarks --op logprobs,loss,kl --mode fwd,bwd,fwdbwd "
               "--shapes llama3-8b,llama3.2-1b,qwen2.5-7b,gemma2-2b "
               "--tokens 4k,8k,16k,32k,64k --plot")
E2E_COMMAND = "python -m benchmarks.e2e_long"
HEADLINE_TOKENS = (8192, 32768)
OP_TITLES = {"logprobs": "Fused head: per-token log-probs, forward + backward",
             "loss": "Preference-loss step (policy head fwd+bwd, reference head fwd, "
                     "weights, reduction)",
             "kl": "Fused token KL(π‖ref) and log-probs, forward + backward"}


def _latest(rows: list[dict]) -> list[dict]:
    keep: dict[tuple, dict] = {}
    for r in rows:
        key = (r["device"], r["op"], r["provider"], r["mode"], r["shape"], r["x_value"],
               r["dtype"], r["metric"])
        if key not in keep or r["date"] >= keep[key]["date"]:
            keep[key] = r
    return list(keep.values())


def _f(s: str, fmt: str) -> str:
    try:
        return format(float(s), fmt)
    except (TypeError, ValueError):
        return "—"


TARGETS = [
    "fused head fwd+bwd (llama3-8b head, N=8192, bf16) ≤ 40 ms on an H100, faster than every "
    "peer in the same run, at floor memory",
    "preference-loss step ≥ 2× faster than Liger's fused DPO loss, with memory flat in T",
    "a 128k-token pair trains on one 80 GB GPU (e2e_long)",
]


def _value(rows, **where) -> float | None:
    for r in rows:
        if all(r[k] == v for k, v in where.items()) and r["value"] != "":
            return float(r["value"])
    return None


def _targets(rows: list[dict]) -> list[str]:
    """Where each performance target stands in ``rows`` (one device)."""
    head = _value(rows, op="logprobs", provider="ours-triton", mode="fwdbwd",
                  shape="llama3-8b", x_value="8192", metric="time")
    peers = [float(r["value"]) for r in rows if r["op"] == "logprobs" and r["mode"] == "fwdbwd"
             and r["shape"] == "llama3-8b" and r["x_value"] == "8192" and r["metric"] == "time"
             and not r["provider"].startswith("ours")]
    loss = {(r["shape"], r["x_value"], r["provider"]): float(r["value"]) for r in rows
            if r["op"] == "loss" and r["mode"] == "fwdbwd" and r["metric"] == "time"}
    ratios = [loss[(s, n, "liger-dpo")] / t for (s, n, p), t in loss.items()
              if p == "ours-triton" and (s, n, "liger-dpo") in loss]
    fit = _value(rows, op="e2e_step", provider="ours-triton", metric="longest_pair_fits")
    out = ["Performance targets and where they stand on this device:", ""]
    out.append(f"- {TARGETS[0]}: " + ("not measured" if head is None else
               f"{head:.1f} ms ({'met' if head <= 40 else 'not met'}; fastest peer "
               f"{min(peers):.1f} ms)" if peers else f"{head:.1f} ms (no peer measured)"))
    out.append(f"- {TARGETS[1]}: " + ("not measured" if not ratios else
               f"{min(ratios):.2f}×–{max(ratios):.2f}× over the shapes and N measured"))
    out.append(f"- {TARGETS[2]}: " + ("not measured" if fit is None else
               f"longest pair that fitted: {int(fit)} tokens"))
    return out + [""]


def _no_gpu(cpu_rows: list[dict]) -> list[str]:
    lines = ["**No GPU results are available yet**: no benchmark has been run on a CUDA GPU for "
             "this repository, so this section has no performance numbers."]
    if cpu_rows:
        files = sorted({r["_file"] for r in cpu_rows})
        lines.append("")
        lines.append(f"The suite has run on CPU at toy sizes only ({', '.join(files)}): that "
                     "checks that it works end to end; CPU toy timings are not performance "
                     "numbers and are not shown.")
    lines += ["", "Performance targets, not measured yet:", ""] + [f"- {t}" for t in TARGETS]
    lines += ["", "To produce the numbers on a CUDA host (see `benchmarks/README.md`):", "",
              "```bash", GPU_COMMAND, E2E_COMMAND, "python -m benchmarks.readme_table "
              "--write README.md", "```"]
    return lines


def _op_table(rows: list[dict], op: str, tokens: tuple[int, ...]) -> list[str]:
    cells = defaultdict(dict)
    for r in rows:
        if r["op"] == op and r["mode"] == "fwdbwd" and int(r["x_value"]) in tokens:
            cells[(r["shape"], int(r["x_value"]), r["provider"])][r["metric"]] = r
    if not cells:
        return []
    ceil = {(r["shape"], int(r["x_value"])): r for r in rows
            if r["op"] == "ceiling" and r["metric"] == "tflops"}
    out = [f"**{OP_TITLES[op]}** (bf16 unless noted; × = eager time / provider time)", "",
           "| shape | N | provider | median ms (p20–p80) | peak MiB | TFLOP/s | % of dense "
           "| × |",
           "|---|---:|---|---:|---:|---:|---:|---:|"]
    for shape, n in sorted({(s, k) for s, k, _ in cells}):
        base = cells.get((shape, n, "eager"), {}).get("time", {}).get("value")
        for prov in sorted(p for s, k, p in cells if (s, k) == (shape, n)):
            m = cells[(shape, n, prov)]
            if "status" in m:
                out.append(f"| {shape} | {n} | {prov} | {m['status']['status'].upper()} "
                           f"| | | | |")
                continue
            t = m.get("time", {})
            speed = (f"{float(base) / float(t['value']):.2f}" if base and t.get("value")
                     else "—")
            out.append(f"| {shape} | {n} | {prov} | {_f(t.get('value'), '.2f')} "
                       f"({_f(t.get('p20'), '.2f')}–{_f(t.get('p80'), '.2f')}) | "
                       f"{_f(m.get('peak_memory', {}).get('value'), '.0f')} | "
                       f"{_f(m.get('tflops', {}).get('value'), '.0f')} | "
                       f"{_f(m.get('pct_ceiling', {}).get('value'), '.0f')} | {speed} |")
        if (shape, n) in ceil:
            out.append(f"| {shape} | {n} | *dense matmul (ceiling)* | | | "
                       f"{_f(ceil[(shape, n)]['value'], '.0f')} | 100 | |")
    return out + [""]


def _e2e_table(rows: list[dict]) -> list[str]:
    e2e = [r for r in rows if r["op"] == "e2e_step"]
    if not e2e:
        return []
    cells = defaultdict(dict)
    for r in e2e:
        cells[(r["provider"], int(r["x_value"]), r["mode"])][r["metric"]] = r
    out = ["**End to end**: TIS-DPO training steps of a Llama-3.2-1B-shaped model (random "
           "weights, bf16, activation checkpointing, packed pair, precomputed reference "
           "log-probs)", "",
           "| provider | pair tokens | ms/step | tokens/s | peak MiB |",
           "|---|---:|---:|---:|---:|"]
    fits = []
    for (prov, n, mode) in sorted(cells):
        m = cells[(prov, n, mode)]
        if mode == "summary":
            fits.append(f"{prov}: {m['longest_pair_fits']['value'] or 'none'}")
        elif "status" in m:
            out.append(f"| {prov} | {n} | {m['status']['status'].upper()} | | |")
        else:
            out.append(f"| {prov} | {n} | {_f(m['step_time']['value'], '.0f')} | "
                       f"{_f(m['tokens_per_s']['value'], '.0f')} | "
                       f"{_f(m.get('peak_memory', {}).get('value'), '.0f')} |")
    return out + ["", "Longest pair that fits: " + "; ".join(fits) + ".", ""]


def render(rows: list[dict], tokens: tuple[int, ...] = HEADLINE_TOKENS) -> str:
    """The markdown section for ``rows`` (each with a ``_file`` key naming its source)."""
    gpu = _latest([r for r in rows if r["device_kind"] == "cuda"])
    lines = [BEGIN, "<!-- generated by `python -m benchmarks.readme_table`; do not edit -->", ""]
    if not gpu:
        lines += _no_gpu([r for r in rows if r["device_kind"] != "cuda"])
        return "\n".join(lines + [END])
    for device in sorted({r["device"] for r in gpu}):
        dev = [r for r in gpu if r["device"] == device]
        h = max(dev, key=lambda r: r["date"])
        lines += [f"### {device}", "",
                  f"CUDA {h['cuda'] or '?'}, torch {h['torch']}, triton {h['triton'] or '—'}, "
                  f"{h['peers'] or 'no peer packages'}; latest run {h['date']}, commit "
                  f"{h['git_commit']}. Files: {', '.join(sorted({r['_file'] for r in dev}))}.",
                  ""]
        lines += _targets(dev)
        for op in ("logprobs", "loss", "kl"):
            lines += _op_table(dev, op, tokens)
        lines += _e2e_table(dev)
        cmds = sorted({r["command"] for r in dev})
        lines += ["Commands:", "", "```bash", *cmds, "```", ""]
        checks = [r for r in dev if r["mode"] == "check" and r["metric"].startswith("err_")
                  and int(r["x_value"]) in tokens]
        if checks:
            worst = defaultdict(float)
            for r in checks:
                ref = json.loads(r["extra"] or "{}").get("ref_max") or 0.0
                if ref:
                    k = (r["op"], r["provider"], r["metric"][4:])
                    worst[k] = max(worst[k], float(r["value"]) / ref)
            lines += ["Largest error against the fp32 reference (max |Δ| / max |reference|):",
                      "", "| op | provider | output | error |", "|---|---|---|---:|"]
            lines += [f"| {op} | {p} | {o} | {e:.1e} |" for (op, p, o), e in sorted(worst.items())]
            lines.append("")
    return "\n".join(lines + [END])


def load(results_dir: Path) -> list[dict]:
    rows = []
    for path in sorted(Path(results_dir).glob("*.csv")):
        for r in R.read_csv(path):
            r["_file"] = f"benchmarks/results/{path.name}"
            rows.append(r)
    return rows


def write_into(readme: Path, section: str) -> None:
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        raise ValueError(f"{readme}: no '{BEGIN}' … '{END}' markers to replace")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(head + section + tail)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.readme_table",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", default=str(R.RESULTS_DIR), help="folder of results CSVs")
    ap.add_argument("--tokens", default=",".join(map(str, HEADLINE_TOKENS)),
                    help="token counts shown in the op tables (default 8192,32768)")
    ap.add_argument("--write", default=None, help="README file whose marked section to replace")
    args = ap.parse_args(argv)
    try:
        section = render(load(Path(args.results)), parse_tokens(args.tokens))
        if args.write:
            write_into(Path(args.write), section)
            print(f"updated {args.write}")
        else:
            print(section)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
