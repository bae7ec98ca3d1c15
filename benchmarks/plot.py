"""PNG plots from result rows: time and peak memory against token count, one line per provider.

One figure per (op, shape, mode, dtype, device), two panels; OOM and error points are marked
with a cross at the top of the time panel. ``python -m benchmarks.plot FILE.csv [--out DIR]``.
"""
from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

from benchmarks import results as R

__all__ = ["plot_rows", "main"]


def _series(rows):
    """{(op, shape, mode, dtype, device): {provider: {metric: {tokens: value}}}} + failures."""
    data = defaultdict(lambda: defaultdict(lambda: defaultdict(dict)))
    fails = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r["op"] == "ceiling" or r["mode"] == "check":
            continue
        key = (r["op"], r["shape"], r["mode"], r["dtype"], r["device"])
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
        op, shape, mode, dtype, device = key
        has_mem = any("peak_memory" in m for m in data[key].values())
        fig, axes = plt.subplots(1, 2 if has_mem else 1, figsize=(11 if has_mem else 6, 4.2),
                                 squeeze=False)
        panels = [("time", "median time (ms)")] + ([("peak_memory", "peak memory (MiB)")]
                                                  if has_mem else [])
        for ax, (metric, label) in zip(axes[0], panels):
            for prov in sorted(set(data[key]) | set(fails[key])):
                pts = sorted(data[key][prov][metric].items())
                if pts:
                    line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                                    label=prov)
                    color = line.get_color()
                else:
                    color = None
                bad = [n for n, _ in fails[key].get(prov, [])]
                if bad and metric == "time":
                    top = max((v for m in data[key].values() for v in m[metric].values()),
                              default=1.0)
                    ax.scatter(bad, [top] * len(bad), marker="x", s=60, color=color,
                               label=None if pts else f"{prov} (OOM/error)")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("tokens N")
            ax.set_ylabel(label)
            ax.grid(True, which="both", alpha=0.3)
        axes[0][0].legend(fontsize=8)
        fig.suptitle(f"{op} {mode} — {shape}, {dtype} — {device}", fontsize=10)
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
