"""Regenerate the README's results section (markdown) from the committed results files.

``python -m benchmarks.readme_table`` prints it; ``--write README.md`` replaces the text
between ``<!-- benchmarks:begin -->`` and ``<!-- benchmarks:end -->``. Only rows measured on a
CUDA device are shown as results; when there are none, the section says so explicitly (CPU
rows are toy-size smoke runs, never performance numbers). Each device's section lists its
runs (date, commit, versions, commands) and every number names the run it comes from: a table
shows each case from one run (the one that measured the most providers there, the latest of
equals), a target compares providers within one run (benchmarks/readme_targets.py).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

from benchmarks import readme_rows as rr
from benchmarks import results as R
from benchmarks.readme_targets import CHECK_BOUND, E2E_SHAPE, TARGETS, targets
from benchmarks.shapes import parse_tokens

__all__ = ["render", "main", "GPU_COMMAND", "GIVEN_REF_COMMAND", "E2E_COMMAND", "BEGIN", "END"]

BEGIN, END = "<!-- benchmarks:begin -->", "<!-- benchmarks:end -->"
GPU_COMMAND = ("python -m benchmarks --op logprobs,loss,kl --mode fwd,bwd,fwdbwd "
               "--shapes llama3-8b,llama3.2-1b,qwen2.5-7b,gemma2-2b "
               "--tokens 4k,8k,16k,32k,64k --plot")
# the loss target's case with precomputed reference log-probs (the grid runs an online head)
GIVEN_REF_COMMAND = ("python -m benchmarks --op loss --mode fwdbwd --shapes llama3-8b "
                     "--tokens 16k --reference precomputed")
E2E_COMMAND = "python -m benchmarks.e2e_long"
HEADLINE_TOKENS = (8192, 16384, 32768)
OP_TITLES = {"logprobs": "Fused head: per-token log-probs, forward + backward",
             "loss": "Preference-loss step (policy head fwd+bwd, reference head fwd, "
                     "weights, reduction)",
             "kl": "Fused token KL(π‖ref) and log-probs, forward + backward"}


def _f(s: str, fmt: str) -> str:
    try:
        return format(float(s), fmt)
    except (TypeError, ValueError):
        return "—"


def _shown_command(cmd: str) -> str:
    """A row's command as the README prints it: without its --out path (a folder of the
    machine that ran it; the results live under benchmarks/results/)."""
    return re.sub(r" --out(?:=| )\S+", "", cmd)


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
              "```bash", GPU_COMMAND, GIVEN_REF_COMMAND, E2E_COMMAND,
              "python -m benchmarks.readme_table --write README.md", "```"]
    return lines


def _op_table(rows: list[dict], op: str, tokens: tuple[int, ...]) -> list[str]:
    """One table per op; each (shape, N) shows one run: the one with the most providers at
    that case (the latest of equals), so that its × column compares one run's numbers."""
    runs: dict[tuple, dict[tuple, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if (r["op"] in (op, "ceiling") and r["mode"] in ("fwdbwd", "fwd")
                and int(r["x_value"]) in tokens and rr.pairs(r) in (None, 1)
                and rr.ref(r) in (None, "online")):
            label = r["shape"] if r["dtype"] == "bf16" else f"{r['shape']} ({r['dtype']})"
            runs[(label, int(r["x_value"]))][rr.run_key(r)].append(r)
    cells, ceil, shown = defaultdict(dict), {}, {}
    for case, by_run in runs.items():
        def rank(key, by_run=by_run):
            return (len({r["provider"] for r in by_run[key]
                         if r["op"] == op and r["mode"] == "fwdbwd"}), key[0])
        chosen = by_run[max(by_run, key=rank)]
        shown[case] = rr.runs_cited(chosen).removeprefix("run ")
        for r in chosen:
            if r["op"] == op and r["mode"] == "fwdbwd":
                cells[(*case, r["provider"])][r["metric"]] = r
            elif r["op"] == "ceiling" and r["metric"] == "tflops":
                ceil[case] = r
    if not cells:
        return []
    out = [f"**{OP_TITLES[op]}** (bf16 unless noted; × = eager time / provider time; run: "
           "the run it comes from, listed above)", "",
           "| shape | N | provider | median ms (p20–p80) | peak MiB | TFLOP/s | % of dense "
           "| × | run |",
           "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for shape, n in sorted({(s, k) for s, k, _ in cells}):
        base = cells.get((shape, n, "eager"), {}).get("time", {}).get("value")
        run = shown[(shape, n)]
        for prov in sorted(p for s, k, p in cells if (s, k) == (shape, n)):
            m = cells[(shape, n, prov)]
            if "status" in m:
                out.append(f"| {shape} | {n} | {prov} | {m['status']['status'].upper()} "
                           f"| | | | | {run} |")
                continue
            t = m.get("time", {})
            speed = (f"{float(base) / float(t['value']):.2f}" if base and t.get("value")
                     else "—")
            out.append(f"| {shape} | {n} | {prov} | {_f(t.get('value'), '.2f')} "
                       f"({_f(t.get('p20'), '.2f')}–{_f(t.get('p80'), '.2f')}) | "
                       f"{_f(m.get('peak_memory', {}).get('value'), '.0f')} | "
                       f"{_f(m.get('tflops', {}).get('value'), '.0f')} | "
                       f"{_f(m.get('pct_ceiling', {}).get('value'), '.0f')} | {speed} | "
                       f"{run} |")
        if (shape, n) in ceil:
            out.append(f"| {shape} | {n} | *dense matmul (ceiling)* | | | "
                       f"{_f(ceil[(shape, n)]['value'], '.0f')} | 100 | | {run} |")
    return out + [""]


def _e2e_table(rows: list[dict]) -> list[str]:
    """One table per model shape and batch layout, each provider from one run (the one that
    tried the longest pair)."""
    groups = defaultdict(lambda: defaultdict(dict))
    for r in rr.e2e_runs(rows):
        groups[(r["shape"], rr.layout(r))][(r["provider"], int(r["x_value"]),
                                            r["mode"])][r["metric"]] = r
    out = []
    for (shape, layout), cells in sorted(groups.items()):
        model = ("a Llama-3.2-1B-shaped model" if shape == E2E_SHAPE
                 else f"the {shape} model")
        out += [f"**End to end**: TIS-DPO training steps of {model} (random weights, bf16, "
                f"activation checkpointing, {layout} pair, precomputed reference log-probs)",
                "", "| provider | pair tokens | ms/step | tokens/s | peak MiB | run |",
                "|---|---:|---:|---:|---:|---:|"]
        fits = []
        for (prov, n, mode) in sorted(cells):
            m = cells[(prov, n, mode)]
            run = rr.runs_cited(list(m.values())).removeprefix("run ")
            if mode == "summary":
                r = m["longest_pair_fits"]
                fits.append(f"{prov}: " + ("unknown (an error, not an out-of-memory, "
                                           "stopped a length)" if r["status"] == "error"
                                           else r["value"] or "none"))
            elif "status" in m:
                out.append(f"| {prov} | {n} | {m['status']['status'].upper()} | | | {run} |")
            else:
                step, speed = m.get("step_time", {}), m.get("tokens_per_s", {})
                out.append(f"| {prov} | {n} | {_f(step.get('value'), '.0f')} | "
                           f"{_f(speed.get('value'), '.0f')} | "
                           f"{_f(m.get('peak_memory', {}).get('value'), '.0f')} | {run} |")
        out += ["", "Longest pair that fits: " + "; ".join(fits) + ".", ""]
    return out


def _runs_list(dev: list[dict]) -> list[str]:
    """The device's runs, by number: when, which commit and versions, which commands."""
    by: dict[int, list[dict]] = defaultdict(list)
    for r in dev:
        by[r["_run"]].append(r)
    out = ["Runs (the numbers in the tables and targets below):", ""]
    for num, run in sorted(by.items()):
        h = min(run, key=lambda r: r["date"])
        versions = sorted({(r["git_commit"], r["cuda"], r["torch"], r["triton"], r["peers"])
                           for r in run})
        said = "; ".join(f"commit {c}, CUDA {cu or '?'}, torch {t}, triton {tr or '—'}, "
                         f"{p or 'no peer packages'}" for c, cu, t, tr, p in versions)
        files = ", ".join(sorted({r["_file"] for r in run}))
        out.append(f"{num}. {rr.run_key(h)[0]}: {said}. Files: {files}. Commands:")
        out += ["", "   ```bash", *[f"   {c}" for c in
                                    sorted({_shown_command(r["command"]) for r in run})],
                "   ```", ""]
    return out


def _errors_table(dev: list[dict], tokens: tuple[int, ...]) -> list[str]:
    checks = [r for r in dev if r["mode"] == "check" and r["metric"].startswith("err_")
              and int(r["x_value"]) in tokens]
    worst: dict[tuple, tuple[float, set]] = {}
    for r in checks:
        ref = json.loads(r["extra"] or "{}").get("ref_max") or 0.0
        if ref:
            k = (r["op"], r["provider"], r["metric"][4:], r["dtype"])
            err, runs = worst.get(k, (0.0, set()))
            worst[k] = (max(err, R.error_value(r) / ref), runs | {r["_run"]})
    if not worst:
        return []
    out = ["Largest error against the fp32 reference (max |Δ| / max |reference|; FAILED: "
           "above what a correct result stays within, "
           + ", ".join(f"{d} {b:.0e}" for d, b in CHECK_BOUND.items()) + "):",
           "", "| op | provider | dtype | output | error | runs |", "|---|---|---|---|---:|---:|"]
    out += [f"| {op} | {p} | {d} | {o} | {e:.1e}"
            f"{' FAILED' if e > CHECK_BOUND.get(d, CHECK_BOUND['bf16']) else ''} "
            f"| {', '.join(map(str, sorted(runs)))} |"
            for (op, p, o, d), (e, runs) in sorted(worst.items())]
    return out + [""]


def render(rows: list[dict], tokens: tuple[int, ...] = HEADLINE_TOKENS) -> str:
    """The markdown section for ``rows`` (each with a ``_file`` key naming its source)."""
    gpu = rr.prepare([r for r in rows if r["device_kind"] == "cuda"])
    lines = [BEGIN, "<!-- generated by `python -m benchmarks.readme_table`; do not edit -->", ""]
    if not gpu:
        lines += _no_gpu([r for r in rows if r["device_kind"] != "cuda"])
        return "\n".join(lines + [END])
    for device in sorted({r["device"] for r in gpu}):
        runs = [r for r in gpu if r["device"] == device]
        lines += [f"### {device}", ""]
        lines += _runs_list(runs)
        lines += targets(runs)
        for op in ("logprobs", "loss", "kl"):
            lines += _op_table(runs, op, tokens)
        lines += _e2e_table(runs)
        lines += _errors_table(runs, tokens)
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
                    help="token counts shown in the op tables (default 8192,16384,32768)")
    ap.add_argument("--write", default=None, help="README file whose marked section to replace")
    args = ap.parse_args(argv)
    try:
        section = render(load(Path(args.results)), parse_tokens(args.tokens))
        if args.write:
            write_into(Path(args.write), section)
            print(f"updated {args.write}")
        else:
            print(section)
    except (ValueError, OSError) as err:      # a bad CSV, a missing README: one line
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
