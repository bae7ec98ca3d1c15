"""Which result rows the README's results section reads: the keys of a row, its run, one row
per key and run, and the run each end-to-end provider is shown from.

A *run* is one command (its start and its command line), or all the commands of one
``gpu_session.sh`` session (``extra.session``). Runs are numbered per device in the order
they started; every number the section prints names its run, and the section's header lists
each run's date, commit and versions.
"""
from __future__ import annotations

import json
from collections import defaultdict

__all__ = ["pairs", "ref", "layout", "run_key", "prepare", "latest", "find", "fwdbwd",
           "runs_cited", "e2e_runs"]


def pairs(r: dict) -> int | None:
    """The loss op's number of pairs (tokens per pair = x_value / pairs); None elsewhere."""
    return json.loads(r["extra"] or "{}").get("pairs")


def ref(r: dict) -> str | None:
    """The loss op's reference: "online" (a reference head; rows without the field) or
    "precomputed" log-probs; None elsewhere."""
    if r["op"] != "loss":
        return None
    return json.loads(r["extra"] or "{}").get("ref_logps", "online")


def layout(r: dict) -> str | None:
    """An end-to-end row's batch layout ("packed" or "rows"); None elsewhere."""
    if r["op"] != "e2e_step":
        return None
    return json.loads(r["extra"] or "{}").get("layout", "packed")


def _case(r: dict) -> tuple:
    """What one provider measured in one mode at one case, whatever the metric."""
    return (r["device"], r["op"], r["provider"], r["mode"], r["shape"], r["x_value"],
            pairs(r), ref(r), layout(r), r["dtype"])


def run_key(r: dict) -> tuple[str, str]:
    """(date, command): one invocation; the rows of a session's commands (``extra.session``,
    from TISDPO_BENCH_SESSION: gpu_session.sh runs torch.compile in a command of its own) are
    one run, keyed by the session's start."""
    session = json.loads(r["extra"] or "{}").get("session")
    return (session, "session") if session else (r["date"], r["command"])


def prepare(rows: list[dict]) -> list[dict]:
    """``rows`` with one measurement per case and run, each numbered by its run.

    A session may measure a case twice (its memory sweep times ours and eager again at the
    head's 8k tokens): the rows of the session's first command that measured it stand, so that a
    table and a target never read two different numbers for one case. Each kept row gets
    ``_run``, its run's number among the runs of its device (1 = the earliest).
    """
    order: dict[tuple, int] = {}        # each command's first row: which of two commands
    for n, r in enumerate(rows):        # that started in the same second wrote first
        order.setdefault((r["date"], r["command"]), n)
    first: dict[tuple, tuple] = {}
    for r in rows:
        k, cmd = (run_key(r), _case(r)), (r["date"], order[(r["date"], r["command"])])
        if k not in first or cmd < first[k]:
            first[k] = cmd
    kept = [r for r in rows
            if (r["date"], order[(r["date"], r["command"])]) == first[(run_key(r), _case(r))]]
    starts: dict[str, set] = defaultdict(set)
    for r in kept:
        starts[r["device"]].add(run_key(r))
    number = {(dev, key): i for dev, keys in starts.items()
              for i, key in enumerate(sorted(keys), 1)}
    return [dict(r, _run=number[(r["device"], run_key(r))]) for r in kept]


def latest(rows: list[dict]) -> list[dict]:
    """The latest row of each case and metric, whatever its run."""
    keep: dict[tuple, dict] = {}
    for r in rows:
        key = (*_case(r), r["metric"])
        if key not in keep or r["date"] >= keep[key]["date"]:
            keep[key] = r
    return list(keep.values())


def find(rows, **where) -> dict | None:
    """The first row with a value matching ``where``."""
    for r in rows:
        if all(r[k] == v for k, v in where.items()) and r["value"] != "":
            return r
    return None


def fwdbwd(rows, op, provider, **where) -> dict | None:
    return find(rows, op=op, provider=provider, mode="fwdbwd", metric="time", **where)


def runs_cited(rows: list[dict]) -> str:
    """"run 2", "runs 1, 3": the runs ``rows`` come from."""
    nums = sorted({r["_run"] for r in rows if "_run" in r})
    if not nums:
        return "run ?"
    return ("run " if len(nums) == 1 else "runs ") + ", ".join(map(str, nums))


def e2e_runs(rows: list[dict]) -> list[dict]:
    """The end-to-end rows shown: for each model shape, layout and provider, the rows of one
    run, the one that tried the longest pair (measured it or ran out of memory; an error
    tries nothing), the latest of equals: a shorter later run does not hide a longer one,
    and an old OOM never stands beside a later fit."""
    by: dict[tuple, dict[tuple, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r["op"] == "e2e_step":
            by[(r["shape"], layout(r), r["provider"])][run_key(r)].append(r)
    out = []
    for runs in by.values():
        def reach(key, runs=runs):
            tried = [int(r["x_value"]) for r in runs[key]
                     if r["mode"] == "step" and r["status"] in ("ok", "oom")]
            return (max(tried, default=0), key[0])
        out += runs[max(runs, key=reach)]
    return out
