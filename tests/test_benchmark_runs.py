"""What the README's results section reads from several runs, and what the end-to-end and
tuning CLIs record when something fails: every number names its run, a table and a target
read the same row, an error is never a verdict on memory, and a bad argument stops before a
model is built."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

if importlib.util.find_spec("benchmarks") is None:   # pytest run from outside the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import e2e_long, readme_rows, readme_table, readme_targets, tune  # noqa: E402
from benchmarks import providers as P  # noqa: E402
from benchmarks import results as R  # noqa: E402

CPU = torch.device("cpu")
GPU = dict(device_kind="cuda", device="Test GPU", cuda="12.8")
HEAD = dict(shape="llama3-8b", tokens=8192, dtype="bf16")


def _env(date: str, commit: str = "abc", command: str = "--test") -> dict:
    return dict(R.environment(CPU, [command]), date=date, git_commit=commit, **GPU)


def _time(env, provider, ms, **kw) -> dict:
    where = dict(dict(HEAD, op="logprobs", mode="fwdbwd"), **kw)
    return R.make_row(env, provider=provider, metric="time", unit="ms", value=ms,
                      p20=ms, p80=ms, **where)


def _render(tmp_path, rows) -> str:
    R.append_csv(rows, tmp_path / "gpu.csv")
    return readme_table.render(readme_table.load(tmp_path))


def test_a_session_measuring_a_case_twice_shows_its_first_command_everywhere(
        tmp_path, monkeypatch):
    """gpu_session.sh's memory sweep times ours and eager again at 8k: the table, its ×
    column and the head target all read the logprobs step's rows."""
    monkeypatch.setenv("TISDPO_BENCH_SESSION", "2099-01-01T00:00:00+00:00")
    step = _env("2099-01-01T00:00:01+00:00", command="--op logprobs")
    sweep = _env("2099-01-01T00:05:00+00:00", command="--tokens 4k,8k")
    rows = [R.make_row(step, op="ceiling", provider="dense-matmul", metric="time", unit="ms",
                       value=2.0, **dict(HEAD, mode="fwd")),
            _time(step, "ours-triton", 10.0), _time(step, "eager", 20.0),
            _time(step, "liger-flce", 15.0),
            _time(sweep, "ours-triton", 4.0), _time(sweep, "eager", 40.0)]
    text = _render(tmp_path, rows)
    assert "| llama3-8b | 8192 | ours-triton | 10.00 (10.00–10.00) | — | — | — | 2.00 | 1 |" \
        in text
    assert "| llama3-8b | 8192 | eager | 20.00" in text and "40.00" not in text
    assert ": 10.0 ms (run 1); output not checked in that run; 1.25× the dense GEMMs" in text
    assert "4.0 ms" not in text and "4.00" not in text


def test_of_two_session_commands_started_in_one_second_the_first_written_stands(monkeypatch):
    monkeypatch.setenv("TISDPO_BENCH_SESSION", "2099-01-01T00:00:00+00:00")
    same = "2099-01-01T00:00:01+00:00"
    rows = [_time(_env(same, command="--zzz"), "ours-triton", 10.0),
            _time(_env(same, command="--aaa"), "ours-triton", 4.0)]
    (kept,) = readme_rows.prepare(rows)
    assert kept["value"] == "10"


def test_every_number_names_the_run_and_commit_it_comes_from(tmp_path):
    """An older run with every peer and a newer one with ours alone: the target compares
    within the older run and says so; the header lists both runs with their commits."""
    old, new = _env("2026-01-01T00:00:00+00:00", "OLD111"), _env("2026-02-01T00:00:00+00:00",
                                                                 "NEW222")
    rows = [_time(old, p, ms) for p, ms in (("ours-triton", 20.0), ("eager", 30.0),
                                           ("liger-flce", 25.0))] + [_time(new, "ours-triton",
                                                                           10.0)]
    text = _render(tmp_path, rows)
    assert "1. 2026-01-01T00:00:00+00:00: commit OLD111, CUDA 12.8" in text
    assert "2. 2026-02-01T00:00:00+00:00: commit NEW222, CUDA 12.8" in text
    assert ": 20.0 ms (run 1); output not checked in that run; fastest peer liger-flce" in text
    assert "| llama3-8b | 8192 | ours-triton | 20.00 (20.00–20.00) | — | — | — | 1.50 | 1 |" \
        in text


def test_a_failed_check_never_meets_a_target():
    env = _env("2026-01-01T00:00:00+00:00")
    rows = [_time(env, "ours-triton", 10.0), _time(env, "eager", 20.0),
            R.make_row(env, op="logprobs", provider="ours-triton", metric="status", unit="",
                       status="error", extra={"message": "ValueError: shape [3] != [8192]"},
                       **dict(HEAD, mode="check"))]
    said = readme_targets.head_judgement(readme_rows.prepare(rows), "ours-triton")
    assert said.startswith("10.0 ms (run 1); its check FAILED (ValueError: shape [3] != "
                           "[8192]); fastest peer eager 20.0 ms (not met)"), said
    # a reference that ran out of memory checked nothing: unchecked, as without a check
    rows[-1] = dict(rows[-1], status="oom")
    said = readme_targets.head_judgement(readme_rows.prepare(rows), "ours-triton")
    assert "output not checked in that run (its fp32 reference ran out of memory); fastest " \
        "peer eager 20.0 ms (met)" in said


def test_a_peer_that_failed_or_whose_check_failed_is_named_so():
    env = _env("2026-01-01T00:00:00+00:00")
    rows = [_time(env, "ours-triton", 10.0), _time(env, "eager", 20.0),
            _time(env, "liger-flce", 5.0),
            R.make_row(env, op="logprobs", provider="liger-flce", metric="status", unit="",
                       status="error", extra={"message": "shape"}, **dict(HEAD, mode="check")),
            R.make_row(env, op="logprobs", provider="torch-compile", metric="status", unit="",
                       status="oom", **dict(HEAD, mode="fwdbwd"))]
    said = readme_targets.head_judgement(readme_rows.prepare(rows), "ours-triton")
    assert "fastest peer eager 20.0 ms (met); left out: liger-flce (its check FAILED " \
           "(shape)); failed in that run: torch-compile (OOM); not in that run: " \
           "trl-chunked, torch-lce, cce_exact" in said, said


def _e2e(env, n, metric="step_time", value=100.0, mode="step", status="ok", extra=None):
    return R.make_row(env, op="e2e_step", provider="ours-triton", mode=mode,
                      shape="llama3.2-1b", tokens=n, metric=metric, unit="", value=value,
                      status=status, x_name="pair_tokens", extra=extra)


def test_end_to_end_shows_the_run_that_reached_furthest(tmp_path):
    """A run that ran out of memory at 128k, a later one that fits it, then a shorter run:
    the table and the target show the later 128k run alone."""
    first, second, short = (_env(f"2026-0{m}-01T00:00:00+00:00") for m in (1, 2, 3))
    rows = [_e2e(first, 65536), _e2e(first, 131072, "status", None, status="oom"),
            _e2e(first, 131072, "longest_pair_fits", 65536, "summary"),
            _e2e(second, 131072), _e2e(second, 131072, "longest_pair_fits", 131072, "summary"),
            _e2e(short, 16384), _e2e(short, 16384, "longest_pair_fits", 16384, "summary")]
    text = _render(tmp_path, rows)
    assert "longest pair that fitted 131072 tokens (run 2) (met)" in text
    assert "OOM" not in text and "16384" not in text
    assert "Longest pair that fits: ours-triton: 131072." in text


def test_an_end_to_end_error_is_no_verdict_on_memory(tmp_path, monkeypatch):
    """A step that fails with an error (not an out-of-memory) at some length: the provider
    goes on, its summary says the longest pair is unknown, and the target says why."""
    real = e2e_long._time_steps

    def flaky(step, device, warmup, steps):
        if flaky.calls == 0:
            flaky.calls += 1
            raise RuntimeError("flex_attention: unsupported block mask")
        return real(step, device, warmup, steps)
    flaky.calls = 0
    monkeypatch.setattr(e2e_long, "_time_steps", flaky)
    out = tmp_path / "e2e.csv"
    assert e2e_long.main(["--toy", "--device", "cpu", "--lengths", "32,64", "--steps", "1",
                          "--warmup", "0", "--providers", "ours-torch", "--out", str(out)]) == 0
    rows = R.read_csv(out)
    assert [(r["x_value"], r["metric"], r["status"]) for r in rows] == [
        ("32", "status", "error"), ("64", "step_time", "ok"), ("64", "tokens_per_s", "ok"),
        ("64", "longest_pair_fits", "error")]
    assert "unsupported block mask" in json.loads(rows[-1]["extra"])["message"]
    for r in rows:
        r.update(GPU, shape="llama3.2-1b", _file="e2e.csv")
    said = readme_targets.targets(readme_rows.prepare(rows))[-2]
    assert said.endswith("ours-torch (packed layout): unknown, error at 32 tokens: "
                         "RuntimeError: flex_attention: unsupported block mask (run 1) "
                         "(not met)"), said


def test_an_end_to_end_probe_failure_is_error_rows_and_the_next_provider_runs(
        tmp_path, monkeypatch):
    real = P.skip_reason

    def probe(name, *a, **kw):
        if name == "ours-torch":
            raise RuntimeError("at 12:4: cannot compile")
        return real(name, *a, **kw)
    monkeypatch.setattr(P, "skip_reason", probe)
    out = tmp_path / "e2e.csv"
    assert e2e_long.main(["--toy", "--device", "cpu", "--lengths", "32", "--steps", "1",
                          "--warmup", "0", "--providers", "ours-torch,eager",
                          "--out", str(out)]) == 0
    rows = R.read_csv(out)
    failed = [(r["mode"], r["metric"], r["status"]) for r in rows
              if r["provider"] == "ours-torch"]
    assert failed == [("step", "status", "error"), ("summary", "longest_pair_fits", "error")]
    assert all("probe: RuntimeError: at 12:4: cannot compile" in r["extra"] for r in rows
               if r["provider"] == "ours-torch")
    assert [r for r in rows if r["provider"] == "eager" and r["metric"] == "step_time"]
    # what fits is unknown, and an earlier run's fit is not hidden by this one
    for r in rows:
        r.update(GPU, shape="llama3.2-1b", _file="e2e.csv")
    earlier = _env("2000-01-01T00:00:00+00:00")
    fit = [dict(_e2e(earlier, 32), provider="ours-torch"),
           dict(_e2e(earlier, 32, "longest_pair_fits", 32, "summary"), provider="ours-torch")]
    said = readme_targets.targets(readme_rows.prepare(rows))[-2]
    assert "ours-torch (packed layout): unknown, probe: RuntimeError: at 12:4: cannot " \
           "compile (run 1) (not met)" in said, said
    said = readme_targets.targets(readme_rows.prepare(fit + rows))[-2]
    assert "ours-torch (packed layout): longest pair that fitted 32 tokens (run 1)" in said


def test_an_odd_pair_length_is_refused_before_the_model_is_built(tmp_path, monkeypatch,
                                                                 capsys):
    monkeypatch.setattr(e2e_long, "build_model", lambda *a: pytest.fail("model built"))
    out = tmp_path / "e2e.csv"
    assert e2e_long.main(["--toy", "--device", "cpu", "--lengths", "32,65",
                          "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip() == \
        "error: --lengths: 65 must be even (chosen + rejected)"
    assert not out.exists()


@pytest.mark.parametrize("argv,message", [
    (["--shape", "llama3_8b"], "--shape: unknown preset 'llama3_8b'; one of gemma2-2b, "),
    (["--tokens", "8q"], "--tokens: '8q' is not a token count"),
])
def test_tune_refuses_a_bad_shape_or_token_count_in_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as stop:
        tune.main(argv)
    assert stop.value.code == 2
    assert message in capsys.readouterr().err.splitlines()[-1]
