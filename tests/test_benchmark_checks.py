"""What the benchmark's correctness checks and flop counts let a results table claim: a
provider whose output is not finite shows an infinite error and never meets a target; a
filtering backward gets no TFLOP/s; end-to-end runs of other layouts or models never mix."""
import dataclasses
import importlib.util
import json
import math
import sys
from pathlib import Path

import torch

if importlib.util.find_spec("benchmarks") is None:   # pytest run from outside the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from markers import requires_cuda  # noqa: E402

from benchmarks import providers, readme_rows, readme_table, readme_targets  # noqa: E402
from benchmarks import results as R  # noqa: E402
from benchmarks.runner import RunConfig, run  # noqa: E402
from benchmarks.shapes import PRESETS, HeadShape  # noqa: E402

CPU = torch.device("cpu")
TINY = HeadShape("tiny", hidden=32, vocab=200, tokens=(32,), toy=True)
GPU = dict(device_kind="cuda", device="Test GPU", cuda="12.8")


def _env(on=CPU, **columns):
    return dict(R.environment(on, ["--test"]), **columns)


def _by(rows, **where):
    return [r for r in rows if all(r[k] == v for k, v in where.items())]


def _judged(rows: list[dict], provider: str) -> str | None:
    """The head target's judgement of ``provider`` as the README section makes it."""
    return readme_targets.head_judgement(readme_rows.prepare(rows), provider)


def _config(**kw):
    base = dict(ops=["logprobs"], modes=["fwdbwd"], shapes=[TINY], tokens=(32,),
                providers=["ours-torch", "eager"], device=CPU, reps=2, warmup=1)
    base.update(kw)
    return RunConfig(**base)


def test_a_nan_output_is_an_infinite_error_that_every_table_shows(monkeypatch, tmp_path):
    real = providers.make_logprobs

    def fake(name, softcap):
        fn = real(name, softcap)
        if name != "eager":
            return fn
        # one NaN log-prob, the rest right: max |Δ| must not drop it
        return lambda h, w, t: fn(h, w, t) * torch.where(torch.arange(t.numel()) == 3,
                                                          math.nan, 1.0)
    monkeypatch.setattr(providers, "make_logprobs", fake)
    rows = run(_config(), _env())
    (bad,) = _by(rows, provider="eager", metric="err_logp")
    (good,) = _by(rows, provider="ours-torch", metric="err_logp")
    assert bad["value"] == "inf" and math.isfinite(float(good["value"]))
    (line,) = [x for x in R.format_table(rows).splitlines() if "N=32 eager" in x]
    assert line.endswith("logp inf (inf)")
    gpu = [dict(r, **GPU) for r in rows]
    R.append_csv(gpu, tmp_path / "gpu.csv")
    text = readme_table.render(readme_table.load(tmp_path), tokens=(32,))
    assert "| logprobs | eager | bf16 | logp | inf FAILED |" in text


def _head_rows(errors: dict[str, float | None]) -> list[dict]:
    """One run at the head target's case: ceiling 2 ms; ours 9 ms; peers 12 and 15 ms; each
    provider's check rows (err / ref_max = the given relative error; None: not checked)."""
    env, rows = _env(**GPU), []
    case = dict(mode="fwdbwd", shape="llama3-8b", tokens=8192, dtype="bf16")
    rows.append(R.make_row(env, op="ceiling", provider="dense-matmul", metric="time",
                           unit="ms", value=2.0, **dict(case, mode="fwd")))
    for prov, ms in (("ours-triton", 9.0), ("liger-flce", 12.0), ("cce_exact", 15.0)):
        rows.append(R.make_row(env, op="logprobs", provider=prov, metric="time", unit="ms",
                               value=ms, **case))
        if errors.get(prov) is not None:
            for out in ("logp", "dhidden", "dweight"):
                err = errors[prov] if out == "dweight" else 0.0
                rows.append(R.make_row(env, op="logprobs", provider=prov, metric=f"err_{out}",
                                       unit="max_abs", value=2.0 * err, extra={"ref_max": 2.0},
                                       **dict(case, mode="check")))
    return rows


def test_a_target_counts_only_finite_outputs():
    ok = _judged(_head_rows({"ours-triton": 1e-3, "liger-flce": 2e-3}), "ours-triton")
    absent = "not in that run: eager, torch-compile, trl-chunked, torch-lce"
    assert ok == ("9.0 ms (run 1); max error 1.0e-03 of the fp32 reference's largest value; "
                  "1.12× the dense GEMMs (4 × 2.0 ms) (met); fastest peer liger-flce 12.0 ms "
                  f"(met); {absent}")
    ours_nan = _judged(_head_rows({"ours-triton": math.inf}), "ours-triton")
    assert ours_nan == ("9.0 ms (run 1); output NOT FINITE against the fp32 reference; 1.12× "
                        "the dense GEMMs (4 × 2.0 ms) (not met); fastest peer liger-flce 12.0 "
                        f"ms (not met); {absent}")
    # a peer whose output is not finite is no competition: the next one is
    peer_nan = _judged(
        _head_rows({"ours-triton": 0.0, "liger-flce": math.inf, "cce_exact": 0.0}),
        "ours-triton")
    assert peer_nan.endswith("fastest peer cce_exact 15.0 ms (met); left out: liger-flce "
                             f"(output NOT FINITE against the fp32 reference); {absent}")


def test_a_finite_but_wrong_result_fails_its_check():
    """An error far above what a correct bf16 result shows (a sign, a missing term: 0.1 to
    2) fails the check: such a result meets no target and is no competition."""
    wrong = _judged(_head_rows({"ours-triton": 1.0, "liger-flce": 2e-3}), "ours-triton")
    assert wrong.startswith("9.0 ms (run 1); its check FAILED: max error 1.0e+00 of the fp32 "
                            "reference's largest value, above the 5e-02 a correct result "
                            "stays within; 1.12× the dense GEMMs (4 × 2.0 ms) (not met); "
                            "fastest peer liger-flce 12.0 ms (not met)")
    peer = _judged(_head_rows({"ours-triton": 1e-2, "liger-flce": 0.5, "cce_exact": 1e-3}),
                   "ours-triton")
    assert "max error 1.0e-02" in peer and "fastest peer cce_exact 15.0 ms (met); left out: " \
        "liger-flce (its check FAILED: max error 5.0e-01" in peer


def test_a_filtering_backward_gets_no_tflops(monkeypatch):
    """Its flops depend on the data, so the model's count would overstate them; its
    forward is exact and keeps its TFLOP/s."""
    filtering = dataclasses.replace(providers.PROVIDERS["eager"], filtered=True)
    monkeypatch.setitem(providers.PROVIDERS, "eager", filtering)
    rows = run(_config(modes=["fwd", "bwd", "fwdbwd"], check=False), _env())
    for mode in ("fwd", "bwd", "fwdbwd"):
        assert _by(rows, provider="ours-torch", mode=mode, metric="tflops")
        assert _by(rows, provider="eager", mode=mode, metric="time")
        filtered = _by(rows, provider="eager", mode=mode, metric="tflops")
        assert bool(filtered) == (mode == "fwd")
        extra = json.loads(_by(rows, provider="eager", mode=mode, metric="time")[0]["extra"])
        assert (extra["flops"] is None) == (mode != "fwd")
    assert providers.PROVIDERS["cce"].filtered and providers.PROVIDERS["ours-filtered"].filtered
    assert not providers.PROVIDERS["cce_exact"].filtered


def _e2e_rows(shape: str, layout: str | None, fits: int, env: dict) -> list[dict]:
    extra = {} if layout is None else {"layout": layout}
    return [R.make_row(env, op="e2e_step", provider="ours-triton", mode="step", shape=shape,
                       tokens=fits, metric="step_time", unit="ms", value=100.0, extra=extra,
                       x_name="pair_tokens"),
            R.make_row(env, op="e2e_step", provider="ours-triton", mode="step", shape=shape,
                       tokens=fits, metric="tokens_per_s", unit="tok/s", value=fits * 10.0,
                       extra=extra, x_name="pair_tokens"),
            R.make_row(env, op="e2e_step", provider="ours-triton", mode="step", shape=shape,
                       tokens=fits, metric="peak_memory", unit="MiB", value=fits / 2.0,
                       extra=extra, x_name="pair_tokens"),
            R.make_row(env, op="e2e_step", provider="ours-triton", mode="summary",
                       shape=shape, tokens=fits, metric="longest_pair_fits",
                       unit="pair_tokens", value=fits, extra=extra, x_name="pair_tokens")]


def test_end_to_end_layouts_and_models_never_mix(tmp_path):
    """A rows-layout run and a toy run beside the packed Llama-3.2-1B one: each its own
    table; the target reads the Llama-3.2-1B runs, each layout named."""
    env = _env(**GPU)                 # one invocation (one date): run 1 for every row
    rows = (_e2e_rows("llama3.2-1b", None, 131072, env)
            + _e2e_rows("llama3.2-1b", "rows", 65536, env)
            + _e2e_rows("toy-llama", "packed", 262144, env))
    R.append_csv(rows, tmp_path / "e2e.csv")
    text = readme_table.render(readme_table.load(tmp_path))
    assert ("ours-triton (packed layout): longest pair that fitted 131072 tokens, peak 64.0 "
            "GiB (run 1) (met); ours-triton (rows layout): longest pair that fitted 65536 "
            "tokens, peak 32.0 GiB (run 1) (not met)") in text
    assert "262144 tokens" not in text.split("Performance targets")[1].split("\n\n")[1]
    for model, layout, n in (("a Llama-3.2-1B-shaped model", "packed", 131072),
                             ("a Llama-3.2-1B-shaped model", "rows", 65536),
                             ("the toy-llama model", "packed", 262144)):
        table = text.split(f"of {model} (random weights, bf16, activation checkpointing, "
                           f"{layout} pair")[1].split("Longest pair that fits")[1]
        assert table.startswith(f": ours-triton: {n}.")


@requires_cuda
def test_cuda_run_all_providers():
    """Every provider that ran has its outputs checked, and they are finite."""
    cfg = RunConfig(ops=["logprobs", "loss", "kl"], modes=["fwdbwd"],
                    shapes=[PRESETS["llama3.2-1b"]], tokens=(2048,),
                    providers=list(providers.PROVIDERS), device=torch.device("cuda"), reps=3,
                    warmup=1)
    rows = run(cfg, _env(torch.device("cuda")))
    assert _by(rows, op="ceiling", metric="tflops")
    assert _by(rows, provider="ours-triton", op="logprobs", metric="peak_memory")
    for r in _by(rows, metric="time"):
        if r["op"] == "ceiling":
            continue
        errs = [e for e in _by(rows, op=r["op"], provider=r["provider"], mode="check")
                if e["metric"].startswith("err_")]
        assert errs and all(math.isfinite(R.error_value(e)) for e in errs), (r["op"],
                                                                            r["provider"])


def test_a_sessions_separate_commands_are_one_run(monkeypatch):
    """gpu_session.sh measures torch.compile in a command of its own (its cold compile
    apart): with TISDPO_BENCH_SESSION its rows join the session's run, so the head target
    compares it; without, it stays a run of its own, as any other command."""
    def judged(session):
        if session:
            monkeypatch.setenv("TISDPO_BENCH_SESSION", session)
        else:
            monkeypatch.delenv("TISDPO_BENCH_SESSION", raising=False)
        rows = _head_rows({"ours-triton": 1e-3})
        env = dict(R.environment(CPU, ["--providers", "torch-compile", "--out", "/x/r.csv"]),
                   date="2099-01-01T00:00:01+00:00", **GPU)
        rows.append(R.make_row(env, op="logprobs", provider="torch-compile", metric="time",
                               unit="ms", value=10.0, mode="fwdbwd", shape="llama3-8b",
                               tokens=8192, dtype="bf16"))
        return _judged(rows, "ours-triton"), rows
    alone, _ = judged(None)
    assert "torch-compile" in alone.split("not in that run:")[1]
    joined, rows = judged("2099-01-01T00:00:00+00:00")
    assert "fastest peer torch-compile 10.0 ms (met)" in joined
    assert "torch-compile" not in joined.split("not in that run:")[1]
    assert readme_table._shown_command(rows[-1]["command"]) == \
        "python -m benchmarks --providers torch-compile"
