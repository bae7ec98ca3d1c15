"""PNG plots from result rows: time and peak memory against token count, one line per provider.

One figure per (op, shape, mode, dtype, device), two panels (one without memory figures);
the loss op's figures are apart per number of pairs and per reference (an online head, or
precomputed log-probs);
OOM and error points are marked with a labelled cross above the measured points.
``python -m benchmarks.plot FILE.csv [--out DIR]``.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

from benchmarks import results as R

__all__ = ["plot_rows", "main"]


def _op_label(r: dict) -> str:
    """The op, and for the loss op its pairs (when not 1) and a precomputed reference."""
    if r["op"] != "loss":
        return r["op"]
    extra = json.loads(r["extra"] or "{}")
    pairs = extra.get("pairs") or 1
    return ("loss" + (f"-{pairs}pairs" if pairs != 1 else "")
            + ("-precomputed-ref" if extra.get("ref_logps") == "precomputed" else ""))


def _series(rows):
    """{(op, shape, mode, dtype, device, kind): {provider: {metric: {N: value}}}}, failures."""
    data = defaultdict(lambda: defaultdict(lambda: defaultdict(dict)))
    fails = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r["op"] == "ceiling" or r["mode"] == "check":
            continue
        key = (_op_label(r), r["shape"], r["mode"], r["dtype"], r["device"],
               r["device_kind"])
        n = int(r["x_value"])
        if r["metric"] == "status":
            fails[key][r["provider"]].append((n, r["status"]))
        elif r["metric"] in ("time", "peak_memory") and r["value"] != "":
            data[key][r["provider"]][r["metric"]][n] = float(r["value"])
    return data, fails


def plot_rows(rows: list[dict], out_dir: str | Path) -> list[Path]:
    """Write one PNG per (op, shape, mode, dtype, device) group; returns the paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data, fails = _series(rows)
    written = []
    for key in sorted(set(data) | set(fails)):
        op, shape, mode, dtype, device, kind = key
        has_mem = any("peak_memory" in m for m in data[key].values())
        fig, axes = plt.subplots(1, 2 if has_mem else 1, figsize=(11 if has_mem else 6, 4.2),
                                 squeeze=False)
        panels = [("time", "median time (ms)")] + ([("peak_memory", "peak memory (MiB)")]
                                                  if has_mem else [])
        failing = sorted(p for p, f in fails[key].items() if f)
        for ax, (metric, label) in zip(axes[0], panels):
            peak = max((v for m in data[key].values() for v in m[metric].values()), default=1.0)
            for prov in sorted(set(data[key]) | set(fails[key])):
                pts = sorted(data[key][prov][metric].items())
                if pts:
                    line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                                    label=prov)
                    color = line.get_color()
                else:
                    color = None
                bad = fails[key].get(prov, [])
                if bad:   # above every measured point, one level per provider, labelled
                    top = peak * 1.6 ** (1 + failing.index(prov))
                    ax.scatter([n for n, _ in bad], [top] * len(bad), marker="x", s=70,
                               color=color, label=None if pts else prov)
                    for n, status in bad:
                        ax.annotate(status.upper(), (n, top), textcoords="offset points",
                                    xytext=(0, 6), ha="center", fontsize=7, color=color)
            ax.set_xscale("log", base=2)
            ns = sorted({n for m in data[key].values() for n in m[metric]}
                        | {n for f in fails[key].values() for n, _ in f})
            ax.set_xticks(ns, [str(n) for n in ns])
            ax.minorticks_off()
            ax.set_yscale("log")
            if failing:
                ax.set_ylim(top=peak * 1.6 ** (len(failing) + 1.2))
            ax.set_xlabel("tokens N")
            ax.set_ylabel(label)
            ax.grid(True, which="both", alpha=0.3)
        axes[0][0].legend(fontsize=8)
        note = "" if kind == "cuda" else "\nCPU toy run: a smoke test, not performance numbers"
        fig.suptitle(f"{op} {mode} — {shape}, {dtype} — {device}{note}", fontsize=10)
        fig.tight_layout()
        path = out_dir / f"{op}-{shape}-{mode}-{dtype}-{R.device_slug(device)}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.plot", description=__doc__)
    ap.add_argument("files", nargs="+", help="results CSV files")
    ap.add_argument("--out", default=None, help="output folder (default: <file dir>/plots)")
    args = ap.parse_args(argv)
    rows = R.read_csv(args.files)
    out = Path(args.out) if args.out else Path(args.files[0]).parent / "plots"
    for p in plot_rows(rows, out):
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
