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
import math
import re
import sys
from collections import defaultdict
from pathlib import Path

from benchmarks import results as R
from benchmarks.shapes import PRESETS, parse_tokens
from tisdpo_kernels._env import DZ_MB_DEFAULT

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


def _pairs(r: dict) -> int | None:
    """The loss op's number of pairs (tokens per pair = x_value / pairs); None elsewhere."""
    return json.loads(r["extra"] or "{}").get("pairs")


def _ref(r: dict) -> str | None:
    """The loss op's reference: "online" (a reference head; rows without the field) or
    "precomputed" log-probs; None elsewhere."""
    if r["op"] != "loss":
        return None
    return json.loads(r["extra"] or "{}").get("ref_logps", "online")


def _layout(r: dict) -> str | None:
    """An end-to-end row's batch layout ("packed" or "rows"); None elsewhere."""
    if r["op"] != "e2e_step":
        return None
    return json.loads(r["extra"] or "{}").get("layout", "packed")


def _latest(rows: list[dict]) -> list[dict]:
    keep: dict[tuple, dict] = {}
    for r in rows:
        key = (r["device"], r["op"], r["provider"], r["mode"], r["shape"], r["x_value"],
               _pairs(r), _ref(r), _layout(r), r["dtype"], r["metric"])
        if key not in keep or r["date"] >= keep[key]["date"]:
            keep[key] = r
    return list(keep.values())


def _f(s: str, fmt: str) -> str:
    try:
        return format(float(s), fmt)
    except (TypeError, ValueError):
        return "—"


TARGETS = [
    "exact fused head fwd+bwd (llama3-8b head, N=8192, bf16) within 1.25× the same run's "
    "dense GEMMs for its 8NDV flops, and faster than every peer in the same run (eager, "
    "torch-compile, trl-chunked, torch-lce, cce_exact, liger-flce)",
    "with gradient filtering on peaked logits (llama3-8b-peaked, N=8192) ≤ 35 ms",
    "exact fused head fwd+bwd extra memory (llama3-8b head, N=8192, bf16) ≤ d_hidden + "
    f"d_weight + the default {DZ_MB_DEFAULT} MiB TISDPO_DZ_MB + 64 bytes per token",
    "one-sweep preference-loss step (one 8k+8k pair, llama3-8b head) ≤ 0.8× the recompute "
    "path and ≥ 2× faster than Liger's fused DPO loss, with precomputed reference log-probs "
    "(6NDV against 8NDV; Liger's runs reference-free, as it cannot take them) and with an "
    "online reference head (8NDV against 10NDV)",
    "one-sweep loss peak memory flat (within 5%) from 1k to 128k tokens per pair at a fixed "
    "128k tokens (llama3-8b head; `--tokens 128k --pairs 128` … `--pairs 1`)",
    "a Llama-3.2-1B-shaped model trains TIS-DPO on 128k-token pairs on one 80 GB+ GPU "
    "(e2e_long)",
]
FLAT_TOKENS = 131072
#: the peers the fused head's target names
HEAD_PEERS = ("eager", "torch-compile", "trl-chunked", "torch-lce", "cce_exact", "liger-flce")
HEAD = dict(shape="llama3-8b", x_value="8192", dtype="bf16")
LOSS = dict(shape="llama3-8b", x_value="16384", dtype="bf16")


def _find(rows, **where) -> dict | None:
    for r in rows:
        if all(r[k] == v for k, v in where.items()) and r["value"] != "":
            return r
    return None


def _fwdbwd(rows, op, provider, **where) -> dict | None:
    return _find(rows, op=op, provider=provider, mode="fwdbwd", metric="time", **where)


def _run_key(r: dict) -> tuple[str, str]:
    """(date, command): one invocation; the rows of a session's commands (``extra.session``,
    from TISDPO_BENCH_SESSION: gpu_session.sh runs torch.compile in a command of its own) are
    one run, keyed by the session's start."""
    session = json.loads(r["extra"] or "{}").get("session")
    return (session, "session") if session else (r["date"], r["command"])


def _shown_command(cmd: str) -> str:
    """A row's command as the README prints it: without its --out path (a folder of the
    machine that ran it; the results live under benchmarks/results/)."""
    return re.sub(r" --out(?:=| )\S+", "", cmd)


def _best_run(rows: list[dict], ours: str, op: str, where: dict) -> tuple[dict, list[dict]]:
    """(our time row, every row of its run) for the run that measured ``ours`` at ``where``
    beside the most other providers (the latest of equals): ratios come from one run."""
    runs: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        runs[_run_key(r)].append(r)
    best = None
    for key, run in runs.items():
        mine = _fwdbwd(run, op, ours, **where)
        if mine is None:
            continue
        others = {r["provider"] for r in run if r["op"] in (op, "ceiling") and
                  r["metric"] == "time" and r["value"] != "" and r["provider"] != ours and
                  all(r[k] == v for k, v in where.items())}
        rank = (len(others), key[0])
        if best is None or rank > best[0]:
            best = (rank, mine, run)
    return (None, []) if best is None else best[1:]


def _error(run: list[dict], provider: str, op: str, where: dict) -> float | None:
    """``provider``'s worst error against the fp32 reference in ``run`` at ``where``: max |Δ|
    over max |reference|, the worst of its outputs (inf where one was not finite); None when
    that run did not check it."""
    worst = None
    for r in run:
        if (r["op"], r["provider"], r["mode"]) == (op, provider, "check") and \
                r["metric"].startswith("err_") and all(r[k] == v for k, v in where.items()):
            err = R.error_value(r)
            ref = json.loads(r["extra"] or "{}").get("ref_max") or 0.0
            rel = err / ref if ref else (0.0 if err == 0 else math.inf)
            worst = rel if worst is None else max(worst, rel)
    return worst


def _checked(run: list[dict], provider: str, op: str, where: dict) -> tuple[bool, str]:
    """(may it count as met, what its check says): a provider whose output was not finite
    never meets a target; one its run did not check is shown as unchecked."""
    err = _error(run, provider, op, where)
    if err is None:
        return True, "output not checked in that run"
    if not math.isfinite(err):
        return False, "output NOT FINITE against the fp32 reference"
    return True, f"max error {err:.1e} of the fp32 reference's largest value"


def _head_target(rows: list[dict]) -> str:
    """The default kernels' judgement, then (when measured) that of the GEMM-logits mode."""
    parts = [_head_judgement(rows, "ours-triton")]
    gemm = _head_judgement(rows, "ours-gemm")
    if gemm is not None:
        parts.append(f"with TISDPO_HEAD_LOGITS=gemm (ours-gemm): {gemm}")
    return " | ".join(p for p in parts if p is not None) or "not measured"


def _head_judgement(rows: list[dict], provider: str) -> str | None:
    ours, run = _best_run(rows, provider, "logprobs", HEAD)
    if ours is None:
        return None
    head = float(ours["value"])
    ok, check = _checked(run, provider, "logprobs", HEAD)
    out = [f"{head:.1f} ms", check]
    gemm = _find(run, op="ceiling", metric="time", **HEAD)       # one 2NDV GEMM
    if gemm is not None:
        ratio = head / (4 * float(gemm["value"]))
        out.append(f"{ratio:.2f}× the dense GEMMs (4 × {float(gemm['value']):.1f} ms) "
                   f"({_met(ok and ratio <= 1.25)})")
    peers = {r["provider"]: float(r["value"]) for r in run
             if r["op"] == "logprobs" and r["mode"] == "fwdbwd" and r["metric"] == "time"
             and r["value"] != "" and not r["provider"].startswith("ours")
             and all(r[k] == v for k, v in HEAD.items())}
    wrong = sorted(p for p in peers if not _checked(run, p, "logprobs", HEAD)[0])
    peers = {p: t for p, t in peers.items() if p not in wrong}
    if peers:
        best = min(peers, key=peers.get)
        out.append(f"fastest peer {best} {peers[best]:.1f} ms "
                   f"({_met(ok and head < peers[best])})")
    else:
        out.append("no peer measured in that run")
    if wrong:
        out.append(f"left out, output not finite: {', '.join(wrong)}")
    missing = [p for p in HEAD_PEERS if p not in peers and p not in wrong]
    if missing:
        out.append(f"not in that run: {', '.join(missing)}")
    return "; ".join(out)


def _met(ok: bool) -> str:
    return "met" if ok else "not met"


def _filter_target(rows: list[dict]) -> str:
    where = dict(HEAD, shape="llama3-8b-peaked")
    r, run = _best_run(rows, "ours-filtered", "logprobs", where)
    if r is None:
        return "not measured"
    t = float(r["value"])
    ok, check = _checked(run, "ours-filtered", "logprobs", where)
    return f"{t:.1f} ms; {check} ({_met(ok and t <= 35)})"


def _head_memory_target(rows: list[dict]) -> str:
    r = _find(rows, op="logprobs", provider="ours-triton", mode="fwdbwd", metric="peak_memory",
              **HEAD)
    if r is None:
        return "not measured"
    n, shape = int(HEAD["x_value"]), PRESETS[HEAD["shape"]]
    allowed = ((n + shape.vocab) * shape.hidden * 2 + (DZ_MB_DEFAULT << 20) + 64 * n) / 2**20
    peak = float(r["value"])
    return f"{peak:.0f} MiB of {allowed:.0f} allowed ({'met' if peak <= allowed else 'not met'})"


def _loss_target(rows: list[dict]) -> str:
    parts = []
    for ref, label in (("precomputed", "precomputed reference log-probs"),
                       ("online", "online reference head")):
        judged = _loss_judgement([r for r in rows if _pairs(r) == 1 and _ref(r) == ref])
        parts.append(f"{label}: {judged}")
    return " | ".join(parts)


def _loss_judgement(rows: list[dict]) -> str:
    ours, run = _best_run(rows, "ours-one-sweep", "loss", LOSS)
    if ours is None:
        return "not measured"
    sweep = float(ours["value"])
    ok, check = _checked(run, "ours-one-sweep", "loss", LOSS)
    out = [f"{sweep:.1f} ms", check]
    for name, bound, word in (("ours-triton", 0.8, "the recompute path"),
                              ("liger-dpo", 0.5, "Liger's")):
        other = _fwdbwd(run, "loss", name, **LOSS)
        if other is None:
            out.append(f"{word}: not measured in that run")
        elif not _checked(run, name, "loss", LOSS)[0]:
            out.append(f"{word}: its output was not finite in that run")
        else:
            t = float(other["value"])
            out.append(f"{sweep / t:.2f}× {word} {t:.1f} ms "
                       f"({_met(ok and sweep <= bound * t)})")
    return "; ".join(out)


def _memory_target(rows: list[dict]) -> str:
    peak = {}
    for r in rows:
        if (r["op"], r["provider"], r["mode"], r["metric"], r["shape"], r["x_value"],
                r["dtype"]) == ("loss", "ours-one-sweep", "fwdbwd", "peak_memory", "llama3-8b",
                                str(FLAT_TOKENS), "bf16") and r["value"] != "" and _pairs(r) \
                and _ref(r) == "online":
            peak[FLAT_TOKENS // _pairs(r)] = float(r["value"])
    if len(peak) < 2:
        return "not measured"
    lo, hi = min(peak.values()), max(peak.values())
    spans = min(peak) <= 1024 and max(peak) >= FLAT_TOKENS
    verdict = ("met" if hi <= 1.05 * lo and spans else "not met" if hi > 1.05 * lo
               else "within 5% so far, range not covered")
    return (f"{lo:.0f}–{hi:.0f} MiB over pairs of {min(peak)}–{max(peak)} tokens "
            f"({hi / lo:.2f}×, {verdict})")


E2E_SHAPE = "llama3.2-1b"


def _e2e_target(rows: list[dict]) -> str:
    """The Llama-3.2-1B-shaped runs only, each layout on its own."""
    fits = {(_layout(r), r["provider"]): r["value"] for r in rows
            if r["op"] == "e2e_step" and r["metric"] == "longest_pair_fits"
            and r["shape"] == E2E_SHAPE}
    if not fits:
        return "not measured"
    peaks = {(_layout(r), r["provider"], r["x_value"]): float(r["value"]) for r in rows
             if r["op"] == "e2e_step" and r["metric"] == "peak_memory"
             and r["shape"] == E2E_SHAPE and r["value"] != ""}
    out = []
    for (layout, p), v in sorted(fits.items()):
        n = int(float(v)) if v else None
        peak = peaks.get((layout, p, str(n)))
        at = "" if peak is None else f", peak {peak / 1024:.1f} GiB"
        out.append(f"{p} ({layout} layout): longest pair that fitted {n or 'none'} tokens{at} "
                   f"({'met' if n and n >= 131072 else 'not met'})")
    return "; ".join(out)


def _targets(rows: list[dict]) -> list[str]:
    """Where each performance target stands in ``rows`` (one device, every run): ratios
    within the best-furnished run, single numbers from the latest rows."""
    latest = _latest(rows)
    out = ["Performance targets and where they stand on this device:", ""]
    for target, judge, src in zip(TARGETS, (_head_target, _filter_target, _head_memory_target,
                                            _loss_target, _memory_target, _e2e_target),
                                  (rows, rows, latest, rows, latest, latest), strict=True):
        out.append(f"- {target}: {judge(src)}")
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
              "```bash", GPU_COMMAND, GIVEN_REF_COMMAND, E2E_COMMAND,
              "python -m benchmarks.readme_table --write README.md", "```"]
    return lines


def _op_table(rows: list[dict], op: str, tokens: tuple[int, ...]) -> list[str]:
    """One table per op; each (shape, N) shows one run: the one with the most providers at
    that case (the latest of equals), so that its × column compares one run's numbers."""
    runs: dict[tuple, dict[tuple, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if (r["op"] in (op, "ceiling") and r["mode"] in ("fwdbwd", "fwd")
                and int(r["x_value"]) in tokens and _pairs(r) in (None, 1)
                and _ref(r) in (None, "online")):
            label = r["shape"] if r["dtype"] == "bf16" else f"{r['shape']} ({r['dtype']})"
            runs[(label, int(r["x_value"]))][_run_key(r)].append(r)
    cells, ceil = defaultdict(dict), {}
    for case, by_run in runs.items():
        def rank(key, by_run=by_run):
            return (len({r["provider"] for r in by_run[key]
                         if r["op"] == op and r["mode"] == "fwdbwd"}), key[0])
        for r in by_run[max(by_run, key=rank)]:
            if r["op"] == op and r["mode"] == "fwdbwd":
                cells[(*case, r["provider"])][r["metric"]] = r
            elif r["op"] == "ceiling" and r["metric"] == "tflops":
                ceil[case] = r
    if not cells:
        return []
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
    """One table per model shape and batch layout."""
    groups = defaultdict(lambda: defaultdict(dict))
    for r in rows:
        if r["op"] == "e2e_step":
            groups[(r["shape"], _layout(r))][(r["provider"], int(r["x_value"]),
                                              r["mode"])][r["metric"]] = r
    out = []
    for (shape, layout), cells in sorted(groups.items()):
        model = ("a Llama-3.2-1B-shaped model" if shape == E2E_SHAPE
                 else f"the {shape} model")
        out += [f"**End to end**: TIS-DPO training steps of {model} (random weights, bf16, "
                f"activation checkpointing, {layout} pair, precomputed reference log-probs)",
                "", "| provider | pair tokens | ms/step | tokens/s | peak MiB |",
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
        out += ["", "Longest pair that fits: " + "; ".join(fits) + ".", ""]
    return out


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
        runs = [r for r in rows if r["device_kind"] == "cuda" and r["device"] == device]
        lines += _targets(runs)
        for op in ("logprobs", "loss", "kl"):
            lines += _op_table(runs, op, tokens)
        lines += _e2e_table(dev)
        cmds = sorted({_shown_command(r["command"]) for r in dev})
        lines += ["Commands:", "", "```bash", *cmds, "```", ""]
        checks = [r for r in dev if r["mode"] == "check" and r["metric"].startswith("err_")
                  and int(r["x_value"]) in tokens]
        if checks:
            worst = defaultdict(float)
            for r in checks:
                ref = json.loads(r["extra"] or "{}").get("ref_max") or 0.0
                if ref:
                    k = (r["op"], r["provider"], r["metric"][4:])
                    worst[k] = max(worst[k], R.error_value(r) / ref)
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
