"""Long-format results (Liger's idea): one CSV row per provider × op × mode × shape × metric.

Columns: what was measured (op, provider, mode, shape, x_name/x_value = token count, metric,
unit, value = median, p20, p80, status ok|oom|error), the configuration (dtype, hidden, vocab,
softcap, extra as JSON) and where/how (device_kind, device, torch, triton, cuda, peers, date,
git_commit, command). Rows are appended; files under ``benchmarks/results/`` are committed
with the exact command that produced them.
"""
from __future__ import annotations

import csv
import datetime as _dt
import importlib.metadata
import json
import math
import os
import platform
import shlex
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import torch

__all__ = ["COLUMNS", "RESULTS_DIR", "environment", "make_row", "error_value", "append_csv",
           "read_csv", "format_table", "device_slug"]

RESULTS_DIR = Path(__file__).resolve().parent / "results"
COLUMNS = [
    "op", "provider", "mode", "shape", "x_name", "x_value", "metric", "unit", "value", "p20",
    "p80", "status", "dtype", "hidden", "vocab", "softcap", "extra", "device_kind", "device",
    "torch", "triton", "cuda", "peers", "date", "git_commit", "command",
]
# every peer package a provider runs (trl: trl-chunked); the peers column names each one found
_PEERS = ("liger-kernel", "cut-cross-entropy", "trl")


def _git_commit() -> str:
    """The checkout's commit (``-dirty`` with uncommitted changes); where there is no git
    repository or no git (a copy of the tree on a GPU host), ``TISDPO_GIT_COMMIT`` if set,
    else "unknown"."""
    root = Path(__file__).resolve().parent.parent
    given = os.environ.get("TISDPO_GIT_COMMIT", "").strip()
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root,
                             capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return given or "unknown"
    return (sha + ("-dirty" if dirty else "")) if sha else (given or "unknown")


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return ""


def environment(device: torch.device, argv: list[str] | None = None,
                program: str = "python -m benchmarks") -> dict[str, str]:
    """The where/how columns shared by every row of one run."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU {platform.machine()} ({torch.get_num_threads()} threads)"
    argv = sys.argv[1:] if argv is None else argv
    peers = ";".join(f"{d}={_version(d)}" for d in _PEERS if _version(d))
    return {
        "device_kind": device.type, "device": name, "torch": torch.__version__,
        "triton": _version("triton"), "cuda": torch.version.cuda or "", "peers": peers,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": _git_commit(), "command": " ".join([program, shlex.join(argv)]).strip(),
    }


def _fmt(x) -> str:
    if x is None:
        return ""
    if isinstance(x, float):
        return "" if math.isnan(x) else f"{x:.6g}"
    return str(x)


def error_value(row: dict) -> float:
    """An ``err_*`` row's max |error|: a blank cell (a NaN written by an older version) is
    an output that was not finite, as ``inf`` is."""
    return float(row["value"]) if row["value"] != "" else math.inf


def make_row(env: dict, *, op, provider, mode, shape, tokens, metric, unit, value=None,
             p20=None, p80=None, status="ok", dtype="", hidden="", vocab="", softcap=None,
             extra=None, x_name="tokens") -> dict[str, str]:
    row = dict(env)
    session = os.environ.get("TISDPO_BENCH_SESSION")   # one run across separate commands
    extra = {**(extra or {}), **({"session": session} if session else {})}
    row.update(op=op, provider=provider, mode=mode, shape=shape, x_name=x_name,
               x_value=str(tokens), metric=metric, unit=unit, value=_fmt(value), p20=_fmt(p20),
               p80=_fmt(p80), status=status, dtype=dtype, hidden=_fmt(hidden),
               vocab=_fmt(vocab), softcap=_fmt(softcap),
               extra=json.dumps(extra or {}, sort_keys=True))
    return {c: row.get(c, "") for c in COLUMNS}


def append_csv(rows: list[dict], path: str | Path) -> Path:
    """Append rows (writing the header first if the file is new). Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow({c: row.get(c, "") for c in COLUMNS})
    return path


def read_csv(paths) -> list[dict]:
    rows = []
    for p in ([paths] if isinstance(paths, (str, Path)) else paths):
        with Path(p).open(newline="") as f:
            for row in csv.DictReader(f):
                if set(COLUMNS) - set(row):
                    missing = sorted(set(COLUMNS) - set(row))
                    raise ValueError(f"{p}: not a benchmarks results file (missing {missing})")
                rows.append(row)
    return rows


def device_slug(device_name: str) -> str:
    keep = [c.lower() if c.isalnum() else "-" for c in device_name]
    return "-".join(part for part in "".join(keep).split("-") if part) or "device"


# ----------------------------------------------------------------------------- printed table

def _num(s: str) -> float | None:
    try:
        return float(s) if s != "" else None
    except ValueError:
        return None


def _cell(x: float | None, fmt: str) -> str:
    """``x`` formatted with ``fmt`` (e.g. "10.3f"), or a dash padded to the same width."""
    width = int(fmt.split(".")[0] or 0)
    return "—".rjust(width) if x is None else format(x, fmt)


def format_table(rows: list[dict], baseline: str = "eager") -> str:
    """Plain-text tables: a device header, then per (op, shape, tokens, mode) one line per
    provider with time, peak memory, TFLOP/s, % of the dense ceiling and the speed-up and
    memory ratio against ``baseline``; then the errors against the fp32 reference."""
    if not rows:
        return "(no rows)"
    head = rows[0]
    lines = [f"device: {head['device']} ({head['device_kind']}"
             + (f", CUDA {head['cuda']}" if head["cuda"] else "") + f") | torch {head['torch']}"
             f" | triton {head['triton'] or '—'} | {head['peers'] or 'no peer packages'}"
             f" | dtype {head['dtype']} | {head['date']} | commit {head['git_commit']}"]
    groups: dict[tuple, dict[str, dict[str, dict]]] = defaultdict(lambda: defaultdict(dict))
    for r in rows:
        key = (r["op"], r["shape"], int(r["x_value"]), r["mode"])
        groups[key][r["provider"]][r["metric"]] = r
    ceilings = {(k[1], k[2]): provs.get("dense-matmul", {}).get("tflops")
                for k, provs in groups.items() if k[0] == "ceiling"}
    header = (f"{'provider':<14} {'median ms':>10} {'p20–p80 ms':>17} {'peak MiB':>10} "
              f"{'TFLOP/s':>8} {'% ceil':>7} {'× vs ' + baseline:>10} {'mem vs ' + baseline:>12}")
    for key in sorted(groups):
        op, shape, tokens, mode = key
        provs = groups[key]
        if mode == "check" or op == "ceiling":
            continue
        ceil = ceilings.get((shape, tokens))
        ceil_txt = f", dense ceiling {float(ceil['value']):.4g} TFLOP/s" if ceil else ""
        given = any(json.loads(r["extra"] or "{}").get("ref_logps") == "precomputed"
                    for m in provs.values() for r in m.values())
        ref_txt = ", precomputed reference log-probs" if given else ""
        lines += ["", f"[{op}] {shape} N={tokens} mode={mode}{ref_txt}{ceil_txt}", header]
        base = provs.get(baseline, {})
        base_t = _num(base.get("time", {}).get("value", ""))
        base_m = _num(base.get("peak_memory", {}).get("value", ""))
        for name, metrics in provs.items():
            if "status" in metrics:
                st = metrics["status"]
                msg = json.loads(st["extra"] or "{}").get("message", "")
                lines.append(f"{name:<14} {st['status'].upper():>10}  {msg[:80]}")
                continue
            t = metrics.get("time", {})
            med, p20, p80 = (_num(t.get(k, "")) for k in ("value", "p20", "p80"))
            mem = _num(metrics.get("peak_memory", {}).get("value", ""))
            tf = _num(metrics.get("tflops", {}).get("value", ""))
            pc = _num(metrics.get("pct_ceiling", {}).get("value", ""))
            spd = base_t / med if (base_t and med) else None
            mr = mem / base_m if (mem is not None and base_m) else None
            band = f"{_cell(p20, '.3f')}–{_cell(p80, '.3f')}"
            lines.append(f"{name:<14} {_cell(med, '10.3f')} {band:>17} {_cell(mem, '10.1f')} "
                         f"{_cell(tf, '8.2f')} {_cell(pc, '7.1f')} {_cell(spd, '10.2f')} "
                         f"{_cell(mr, '12.3f')}")
    checks = [(k, p, m) for k, provs in groups.items() if k[3] == "check"
              for p, m in provs.items()]
    if checks:
        lines += ["", "max |error| vs the fp32 reference (relative to max |reference|):"]
        for (op, shape, tokens, _), prov, metrics in sorted(checks):
            parts = []
            for metric, r in sorted(metrics.items()):
                if metric.startswith("err_"):
                    ref = json.loads(r["extra"] or "{}").get("ref_max")
                    err = error_value(r)
                    rel = f" ({err / ref:.1e})" if ref else ""
                    parts.append(f"{metric[4:]} {err:.2e}{rel}")
            lines.append(f"[{op}] {shape} N={tokens} {prov:<14} " + ", ".join(parts))
    return "\n".join(lines)
