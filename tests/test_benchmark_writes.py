"""The benchmark CLIs write each result as soon as it is measured: a run stopped part way (a
time limit's SIGTERM, an interrupt) leaves in the results file every provider it finished."""
import importlib.util
import sys
from pathlib import Path

import pytest

if importlib.util.find_spec("benchmarks") is None:   # pytest run from outside the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import __main__ as cli  # noqa: E402
from benchmarks import e2e_long, runner  # noqa: E402
from benchmarks import results as R  # noqa: E402


class _Stopped(BaseException):
    """What a signal does to the run: it ends in the middle of a measurement."""


def _stop_at(owner, name: str, provider_arg: int, provider: str, monkeypatch):
    """Make ``owner.name`` end the run when called for ``provider`` (its positional argument
    number ``provider_arg``); other calls go through."""
    real = getattr(owner, name)

    def wrapped(*args, **kw):
        if args[provider_arg] == provider:
            raise _Stopped
        return real(*args, **kw)
    monkeypatch.setattr(owner, name, wrapped)


def test_benchmark_rows_reach_the_file_provider_by_provider(tmp_path, monkeypatch):
    """The ceiling's rows and each finished provider's are in the CSV when the run stops in
    the next provider, and the rows of one write are one provider's (or the ceiling's)."""
    writes = []
    real_append = R.append_csv
    monkeypatch.setattr(R, "append_csv", lambda rows, path: writes.append(
        {r["provider"] for r in rows}) or real_append(rows, path))
    _stop_at(runner, "_provider_rows", 3, "ours-torch", monkeypatch)
    out = tmp_path / "cpu.csv"
    with pytest.raises(_Stopped):
        cli.main(["--op", "logprobs", "--mode", "fwdbwd", "--shapes", "toy", "--tokens", "64",
                  "--providers", "eager,ours-torch", "--reps", "1", "--warmup", "0",
                  "--device", "cpu", "--out", str(out)])
    rows = R.read_csv(out)
    assert writes == [{"dense-matmul"}, {"eager"}], writes
    assert {r["provider"] for r in rows} == {"dense-matmul", "eager"}
    assert any(r["provider"] == "eager" and r["metric"] == "time" for r in rows)


def test_e2e_rows_reach_the_file_length_by_length(tmp_path, monkeypatch):
    """The first provider's step rows (each length as it finishes) and its summary are in the
    CSV when the run stops in the second provider."""
    writes = []
    real_append = R.append_csv
    monkeypatch.setattr(R, "append_csv", lambda rows, path: writes.append(
        [(r["provider"], r["x_value"], r["mode"]) for r in rows]) or real_append(rows, path))
    real_make = e2e_long.P.make_loss

    def make_loss(name, *a):
        if name == "eager":
            raise _Stopped
        return real_make(name, *a)
    monkeypatch.setattr(e2e_long.P, "make_loss", make_loss)
    out = tmp_path / "e2e.csv"
    with pytest.raises(_Stopped):
        e2e_long.main(["--toy", "--device", "cpu", "--lengths", "32,64", "--steps", "1",
                       "--warmup", "0", "--providers", "ours-torch,eager", "--out", str(out)])
    assert [{k for k in w} for w in writes] == [
        {("ours-torch", "32", "step")}, {("ours-torch", "64", "step")},
        {("ours-torch", "64", "summary")}], writes
    rows = R.read_csv(out)
    assert {r["metric"] for r in rows} == {"step_time", "tokens_per_s", "longest_pair_fits"}
    assert all(r["provider"] == "ours-torch" for r in rows)
