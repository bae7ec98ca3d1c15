"""Smoke tests of the benchmark suite (benchmarks/): toy sizes on CPU, CUDA-only ones skip.

Run in CI with ``--benchmark-disable`` (pyproject addopts): each pytest-benchmark body runs
once. These check that rows are produced, that failures become rows, and that the CSV,
table, plot and README writers work; they make no claim about speed.
"""
import importlib.util
import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch

if importlib.util.find_spec("benchmarks") is None:   # pytest run from outside the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from markers import requires_cuda, requires_triton  # noqa: E402

from benchmarks import __main__ as cli  # noqa: E402
from benchmarks import e2e_long, measure, ops, providers, readme_table  # noqa: E402
from benchmarks import results as R  # noqa: E402
from benchmarks.runner import RunConfig, run  # noqa: E402
from benchmarks.shapes import PRESETS, HeadShape, parse_tokens  # noqa: E402

CPU = torch.device("cpu")
TINY = HeadShape("tiny", hidden=32, vocab=200, tokens=(32,), toy=True)
TINY_CAP = HeadShape("tiny-softcap", hidden=24, vocab=131, softcap=30.0, tokens=(16,), toy=True)


def _env(device=CPU):
    return R.environment(device, ["--test"])


def _by(rows, **where):
    return [r for r in rows if all(r[k] == v for k, v in where.items())]


def _value(rows, **where):
    (row,) = _by(rows, **where)
    return float(row["value"])


# ----------------------------------------------------------------------------- units

def test_presets_and_tokens():
    assert HeadShape.from_name("llama3-8b").vocab == 128256
    assert HeadShape.from_name("Gemma2-2B").softcap == 30.0
    assert {"llama3-8b", "llama3.2-1b", "qwen2.5-7b", "gemma2-2b", "toy"} <= set(PRESETS)
    with pytest.raises(ValueError, match="unknown shape preset 'gpt5'.*llama3-8b"):
        HeadShape.from_name("gpt5")
    assert parse_tokens("4k, 8192,64K") == (4096, 8192, 65536)
    with pytest.raises(ValueError, match="'abc'"):
        parse_tokens("4k,abc")


def test_flop_models_and_quantiles():
    ndv = 8192 * 4096 * 128256
    assert measure.flops("logprobs", "recompute", "fwd", 8192, 4096, 128256) == 2 * ndv
    assert measure.flops("logprobs", "recompute", "fwdbwd", 8192, 4096, 128256) == 8 * ndv
    assert measure.flops("loss", "recompute", "fwdbwd", 8192, 4096, 128256) == 10 * ndv
    assert measure.flops("loss", "grads_in_forward", "bwd", 8192, 4096, 128256) == 0
    with pytest.raises(ValueError, match="no flop model"):
        measure.flops("logprobs", "magic", "fwd", 1, 1, 1)
    s = measure.Stats.of([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (s.median_ms, s.p20_ms, s.p80_ms, s.reps) == (3.0, 1.8, 4.2, 5)


def test_provider_registry_and_skips():
    assert providers.resolve_providers("all") == list(providers.PROVIDERS)
    with pytest.raises(ValueError, match="unknown provider 'nope'"):
        providers.resolve_providers("eager,nope")
    why = providers.skip_reason("liger-dpo", "logprobs", CPU, dtype=torch.bfloat16)
    assert "no logprobs op" in why
    for name in ("cce", "cce_exact", "liger-flce", "liger-dpo"):
        assert providers.skip_reason(name, "loss", CPU, dtype=torch.bfloat16) is not None
    assert providers.skip_reason("eager", "kl", CPU, dtype=torch.bfloat16) is None


def test_new_peers_skip_with_a_reason_or_run():
    """trl-chunked needs trl (+ accelerate, datasets for its backward); torch-lce needs
    torch >= 2.13 and has no softcap: each either runs here or says why not."""
    why = providers.skip_reason("trl-chunked", "logprobs", CPU, dtype=torch.bfloat16)
    assert why is None or "is not installed" in why
    assert providers.skip_reason("torch-lce", "kl", CPU, dtype=torch.bfloat16) is not None
    assert "no logit softcap" in providers.skip_reason("torch-lce", "logprobs", CPU,
                                                        dtype=torch.bfloat16, softcap=30.0)
    if hasattr(torch.nn, "LinearCrossEntropyOptions"):
        assert providers.skip_reason("torch-lce", "loss", CPU, dtype=torch.bfloat16) is None
    for make in (lambda: providers.make_logprobs("torch-lce", 30.0),     # never dropped
                 lambda: providers.make_loss("torch-lce", 0.1, 30.0)):
        with pytest.raises(NotImplementedError, match="no logit softcap"):
            make()


def test_peaked_shape_concentrates_the_softmax():
    """``<preset>-peaked``: same head, logits with a Zipf prior, targets drawn from it — the
    softmax mass sits on few columns, unlike uniform logits."""
    from benchmarks import ops
    peaked = HeadShape.from_name("toy-peaked")
    toy = HeadShape.from_name("toy")
    assert (peaked.hidden, peaked.vocab, peaked.logits) == (toy.hidden, toy.vocab, "peaked")
    with pytest.raises(ValueError, match="each also as <preset>-peaked"):
        HeadShape.from_name("nope-peaked")
    top = {}
    for shape in (HeadShape.from_name("toy"), peaked):
        case = ops.Case("logprobs", shape, 256, torch.float32, CPU)
        inp = ops.make_inputs(case)
        p = torch.softmax(inp.hidden.detach() @ inp.weight.detach().T, -1)
        top[shape.logits] = p.topk(10, -1).values.sum(-1).mean().item()
        p_tgt = p.gather(-1, inp.targets[:, None]).mean().item()
        top[shape.logits + "_target"] = p_tgt
    assert top["peaked"] > 0.7 > 0.5 > top["uniform"]      # measured: 0.81 vs 0.35 at V=1000
    assert top["peaked_target"] > 10 * top["uniform_target"]


# ----------------------------------------------------------------------------- runs on CPU

def _config(**kw):
    base = dict(ops=["logprobs"], modes=["fwd", "bwd", "fwdbwd"], shapes=[TINY],
                providers=["ours-torch", "eager"], device=CPU, reps=2, warmup=0)
    base.update(kw)
    return RunConfig(**base)


def test_logprobs_rows_and_writers(benchmark, tmp_path):
    cfg = _config()
    rows = benchmark.pedantic(run, args=(cfg, _env()), rounds=1, iterations=1)
    assert all(r["status"] == "ok" for r in rows), [r for r in rows if r["status"] != "ok"]
    assert _value(rows, op="ceiling", metric="tflops") > 0
    for prov in ("ours-torch", "eager"):
        for mode in cfg.modes:
            ms = _value(rows, provider=prov, mode=mode, metric="time")
            tf = _value(rows, provider=prov, mode=mode, metric="tflops")
            assert ms > 0 and tf > 0 and math.isfinite(_value(
                rows, provider=prov, mode=mode, metric="pct_ceiling"))
            extra = json.loads(_by(rows, provider=prov, mode=mode, metric="time")[0]["extra"])
            model = providers.PROVIDERS[prov].strategy
            assert extra["flops"] == measure.flops("logprobs", model, mode, 32, 32, 200)
        for out in ("logp", "dhidden", "dweight"):
            (row,) = _by(rows, provider=prov, mode="check", metric=f"err_{out}")
            assert math.isfinite(float(row["value"])) and json.loads(row["extra"])["ref_max"] > 0
    assert not _by(rows, metric="peak_memory")           # no memory figure on CPU
    path = R.append_csv(rows, tmp_path / "r.csv")
    R.append_csv(rows[:3], path)                          # appends, one header
    back = R.read_csv(path)
    assert len(back) == len(rows) + 3 and back[0] == rows[0]
    table = R.format_table(back)
    assert table.startswith("device: CPU") and "× vs eager" in table
    assert "[logprobs] tiny N=32 mode=fwdbwd" in table and "ours-torch" in table
    assert "max |error| vs the fp32 reference" in table


def test_loss_and_kl_rows(benchmark):
    cfg = _config(ops=["loss", "kl"], modes=["fwdbwd"], shapes=[TINY_CAP], pairs=2,
                  ceiling=False)
    rows = benchmark.pedantic(run, args=(cfg, _env()), rounds=1, iterations=1)
    assert all(r["status"] == "ok" for r in rows), [r for r in rows if r["status"] != "ok"]
    for op, outs in (("loss", ("loss", "dhidden", "dweight")),
                     ("kl", ("kl", "logp", "dhidden", "dweight"))):
        for prov in ("ours-torch", "eager"):
            assert _value(rows, op=op, provider=prov, mode="fwdbwd", metric="time") > 0
            for out in outs:
                assert _by(rows, op=op, provider=prov, metric=f"err_{out}")
    extra = json.loads(_by(rows, op="loss", provider="eager", metric="time")[0]["extra"])
    assert extra["pairs"] == 2 and extra["flop_model"] == "materialise"
    assert not _by(rows, op="ceiling")


def test_triton_provider_under_interpreter(benchmark):
    why = providers.skip_reason("ours-triton", "logprobs", CPU, dtype=torch.bfloat16)
    if why is not None:
        pytest.skip(f"ours-triton unavailable on CPU here: {why}")
    cfg = _config(modes=["fwdbwd"], providers=["ours-triton"], reps=1, ceiling=False)
    rows = benchmark.pedantic(run, args=(cfg, _env()), rounds=1, iterations=1)
    assert _value(rows, provider="ours-triton", mode="fwdbwd", metric="time") > 0
    assert _by(rows, provider="ours-triton", metric="err_dweight")


def test_provider_env_holds_through_forward_and_backward(monkeypatch):
    """ours-no-tma runs with TISDPO_TMA=0 in every launch, its backward's included, and the
    caller's setting is back afterwards."""
    why = providers.skip_reason("ours-no-tma", "logprobs", CPU, dtype=torch.bfloat16)
    if why is not None:
        pytest.skip(f"ours-no-tma unavailable on CPU here: {why}")
    from tisdpo_kernels._triton import common, linear_logprobs

    seen = []

    def spy(t, *weights):
        seen.append(os.environ.get("TISDPO_TMA"))
        return common.tma(t, *weights)

    monkeypatch.setattr(linear_logprobs, "tma", spy)
    monkeypatch.setenv("TISDPO_TMA", "1")
    cfg = _config(modes=["fwdbwd"], providers=["ours-no-tma"], reps=1, ceiling=False,
                  check=False)
    assert _value(run(cfg, _env()), provider="ours-no-tma", mode="fwdbwd", metric="time") > 0
    assert len(seen) >= 2 and set(seen) == {"0"}, seen     # forwards and backwards
    assert os.environ["TISDPO_TMA"] == "1"


@pytest.mark.parametrize("op,module", [("logprobs", "linear_logprobs"),
                                       ("kl", "linear_token_kl")])
def test_ours_gemm_reads_gemm_logits_forward_and_backward(op, module, monkeypatch):
    """ours-gemm: every forward and backward of the run goes through the GEMM-logits path
    (TISDPO_HEAD_LOGITS=gemm), and its error rows against the fp32 reference are written."""
    import importlib
    why = providers.skip_reason("ours-gemm", op, CPU, dtype=torch.bfloat16)
    if why is not None:
        pytest.skip(f"ours-gemm unavailable on CPU here: {why}")
    from tisdpo_kernels._triton import slabs
    mod = importlib.import_module(f"tisdpo_kernels._triton.{module}")

    seen = []      # the forward's logits come through slabs.logit_chunks, the backward's not
    for owner, tag in ((slabs, "fwd"), (mod, "bwd")):
        monkeypatch.setattr(owner, "gemm_logits", lambda *a, real=owner.gemm_logits, tag=tag: (
            seen.append((tag, os.environ.get("TISDPO_HEAD_LOGITS"))) or real(*a)))
    rows = run(_config(ops=[op], modes=["fwdbwd"], providers=["ours-gemm"], reps=1,
                       ceiling=False), _env())
    assert _value(rows, provider="ours-gemm", mode="fwdbwd", metric="time") > 0
    assert _by(rows, provider="ours-gemm", metric="err_dweight")
    assert {t for t, _ in seen} == {"fwd", "bwd"} and {e for _, e in seen} == {"gemm"}, seen
    assert "TISDPO_HEAD_LOGITS" not in os.environ


def test_oom_and_errors_become_rows(monkeypatch):
    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 16.00 GiB")

    real = providers.make_logprobs

    def fake(name, softcap):
        if name == "eager":
            return oom
        if name == "ours-torch":
            return lambda *a: (_ for _ in ()).throw(RuntimeError("kernel exploded"))
        return real(name, softcap)
    monkeypatch.setattr(providers, "make_logprobs", fake)
    rows = run(_config(modes=["fwd", "fwdbwd"], ceiling=False), _env())
    assert [r["status"] for r in _by(rows, provider="eager")] == ["oom", "oom"]
    assert [r["status"] for r in _by(rows, provider="ours-torch")] == ["error", "error"]
    msg = json.loads(_by(rows, provider="ours-torch")[0]["extra"])["message"]
    assert "kernel exploded" in msg
    assert "OOM" in R.format_table(rows)


def test_inputs_are_seeded_and_loss_layout_checked():
    case = ops.Case("loss", TINY, 32, torch.bfloat16, CPU, pairs=2)
    a, b = ops.make_inputs(case), ops.make_inputs(case)
    assert torch.equal(a.hidden, b.hidden) and torch.equal(a.targets, b.targets)
    assert a.weights.shape == (4, 8) and a.ref_weight.shape == a.weight.shape
    with pytest.raises(ValueError, match="multiple of 2·pairs"):
        ops.Case("loss", TINY, 30, torch.bfloat16, CPU, pairs=2)
    with pytest.raises(ValueError, match="tokens: 30"):
        run(_config(ops=["loss"], tokens=(30,), pairs=2), _env())


# ----------------------------------------------------------------------------- CLI, files

def test_cli_writes_csv_and_plots(tmp_path, capsys):
    out = tmp_path / "res" / "cpu.csv"
    rc = cli.main(["--op", "logprobs", "--mode", "fwd,fwdbwd", "--shapes", "toy",
                   "--tokens", "64", "--providers", "eager", "--reps", "1", "--warmup", "0",
                   "--out", str(out), "--plot", "--no-check"])
    assert rc == 0
    rows = R.read_csv(out)
    assert rows and all(r["command"].startswith("python -m benchmarks --op logprobs")
                        for r in rows)
    assert {r["device_kind"] for r in rows} == {"cpu"}
    pngs = list((out.parent / "plots").glob("*.png"))
    assert len(pngs) == 2 and all(p.stat().st_size > 1000 for p in pngs)
    printed = capsys.readouterr().out
    assert "device: CPU" in printed and f"rows appended to {out}" in printed


@pytest.mark.parametrize("argv, message", [
    (["--providers", "nope"], "unknown provider"),
    (["--tokens", "abc"], "'abc'"),
    (["--mode", "sideways"], "unknown mode"),
    (["--shapes", "gpt5"], "unknown shape preset"),
])
def test_cli_rejects_bad_arguments(argv, message, capsys):
    assert cli.main(argv + ["--out", "-"]) == 2
    assert message in capsys.readouterr().err


def _fake_gpu_rows():
    """Rows shaped like a GPU run's, for testing the writer only (never committed)."""
    env = dict(_env(), device_kind="cuda", device="Test GPU", cuda="12.8")
    rows = []
    for prov, ms in (("eager", 20.0), ("ours-triton", 10.0), ("cce", 15.0), ("ours-gemm", 9.0)):
        for metric, unit, v in (("time", "ms", ms), ("peak_memory", "MiB", 100.0),
                                ("tflops", "TFLOP/s", 1.0), ("pct_ceiling", "%", 50.0)):
            rows.append(R.make_row(env, op="logprobs", provider=prov, mode="fwdbwd",
                                   shape="llama3-8b", tokens=8192, metric=metric, unit=unit,
                                   value=v, p20=v, p80=v, dtype="bf16"))
    rows.append(R.make_row(env, op="loss", provider="liger-dpo", mode="fwdbwd",
                           shape="llama3-8b", tokens=8192, metric="status", unit="",
                           status="oom", dtype="bf16"))
    rows.append(R.make_row(env, op="e2e_step", provider="ours-triton", mode="summary",
                           shape="llama3.2-1b", tokens=131072, metric="longest_pair_fits",
                           unit="pair_tokens", value=131072, x_name="pair_tokens"))
    pre = "precomputed"        # the loss op's reference log-probs given ("online": a head)
    for op, prov, shape, n, ms, pairs, ref in (
            ("ceiling", "dense-matmul", "llama3-8b", 8192, 2.0, None, None),
            ("logprobs", "ours-filtered", "llama3-8b-peaked", 8192, 30.0, None, None),
            ("loss", "ours-one-sweep", "llama3-8b", 16384, 1.0, 2, None),   # not a target's
            ("loss", "ours-one-sweep", "llama3-8b", 16384, 40.0, 1, None),
            ("loss", "ours-triton", "llama3-8b", 16384, 60.0, 1, "online"),
            ("loss", "liger-dpo", "llama3-8b", 16384, 70.0, 1, None),
            ("loss", "ours-one-sweep", "llama3-8b", 16384, 30.0, 1, pre),
            ("loss", "ours-triton", "llama3-8b", 16384, 45.0, 1, pre),
            ("loss", "liger-dpo", "llama3-8b", 16384, 50.0, 1, pre)):
        rows.append(R.make_row(env, op=op, provider=prov, mode="fwd" if op == "ceiling"
                               else "fwdbwd", shape=shape, tokens=n, metric="time", unit="ms",
                               value=ms, p20=ms, p80=ms, dtype="bf16",
                               extra={"pairs": pairs, **({"ref_logps": ref} if ref else {})}))
    for pairs, mib, ref in ((128, 3000.0, None), (8, 3100.0, None), (1, 3050.0, "online"),
                            (2, 9000.0, pre)):          # memory flat in T (online head)
        rows.append(R.make_row(env, op="loss", provider="ours-one-sweep", mode="fwdbwd",
                               shape="llama3-8b", tokens=131072, metric="peak_memory",
                               unit="MiB", value=mib, dtype="bf16",
                               extra={"pairs": pairs, **({"ref_logps": ref} if ref else {})}))
    # two other runs at the headline case: an older one and a later one with fewer providers
    # (a memory sweep); ratios and tables keep to the run with the most providers
    for date, prov_ms in (("2000-01-01T00:00:00+00:00", (("cce", 5.0),)),
                          ("2099-01-01T00:00:00+00:00", (("ours-triton", 12.0),
                                                         ("eager", 25.0)))):
        for prov, ms in prov_ms:
            rows.append(R.make_row(dict(env, date=date), op="logprobs", provider=prov,
                                   mode="fwdbwd", shape="llama3-8b", tokens=8192,
                                   metric="time", unit="ms", value=ms, dtype="bf16"))
    return rows


def test_readme_table(tmp_path):
    cpu_rows = run(_config(modes=["fwd"], providers=["eager"], reps=1, check=False), _env())
    R.append_csv(cpu_rows, tmp_path / "cpu-toy.csv")
    text = readme_table.render(readme_table.load(tmp_path))
    assert "No GPU results are available yet" in text and readme_table.GPU_COMMAND in text
    assert "Performance targets, not measured yet" in text
    assert "benchmarks/results/cpu-toy.csv" in text
    assert "| eager |" not in text                      # CPU timings never become results
    R.append_csv(_fake_gpu_rows(), tmp_path / "gpu.csv")
    text = readme_table.render(readme_table.load(tmp_path))
    assert "### Test GPU" in text and "No GPU results" not in text
    assert "| llama3-8b | 8192 | ours-triton | 10.00 (10.00–10.00) | 100 | 1 | 50 | 2.00 | 2 |" \
        in text
    assert "| llama3-8b | 8192 | liger-dpo | OOM |" in text
    assert "Longest pair that fits: ours-triton: 131072" in text
    unchecked = "output not checked in that run"
    absent = "not in that run: torch-compile, trl-chunked, torch-lce, cce_exact, liger-flce"
    # cce filters its gradients: it is in the table but no peer of the exact head's target
    assert (f"liger-flce): 10.0 ms (run 2); {unchecked}; 1.25× the dense GEMMs (4 × 2.0 ms) "
            f"(met); fastest peer eager 20.0 ms (met); {absent} | with TISDPO_HEAD_LOGITS=gemm "
            f"(ours-gemm): 9.0 ms (run 2); {unchecked}; 1.12× the dense GEMMs (4 × 2.0 ms) "
            f"(met); fastest peer eager 20.0 ms (met); {absent}") in text
    assert "| llama3-8b | 8192 | cce | 15.00 (15.00–15.00) |" in text
    assert f"(llama3-8b-peaked, N=8192) ≤ 35 ms: 30.0 ms (run 2); {unchecked} (met)" in text
    assert "+ 64 bytes per token: 100 MiB of 2090 allowed (run 2) (met)" in text
    assert (f"(8NDV against 10NDV): precomputed reference log-probs: 30.0 ms (run 2); "
            f"{unchecked}; 0.67× the recompute path 45.0 ms (met); 0.60× Liger's 50.0 ms (not "
            f"met) | online reference head: 40.0 ms (run 2); {unchecked}; 0.67× the recompute "
            f"path 60.0 ms (met); 0.57× Liger's 70.0 ms (not met)") in text
    assert "| 16384 | ours-one-sweep | 30.00" not in text       # the table: an online head
    assert "3000–3100 MiB over pairs of 1024–131072 tokens (1.03×, met; run 2)" in text
    assert ("ours-triton (packed layout): longest pair that fitted 131072 tokens (run 2) (met)"
            in text)
    assert "| llama3-8b | 16384 | ours-one-sweep | 40.00 (40.00–40.00) |" in text
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{readme_table.BEGIN}\nold\n{readme_table.END}\ntail\n")
    assert readme_table.main(["--results", str(tmp_path), "--write", str(readme)]) == 0
    new = readme.read_text()
    assert "old" not in new and "### Test GPU" in new and new.endswith("tail\n")
    readme.write_text("# no markers\n")
    assert readme_table.main(["--results", str(tmp_path), "--write", str(readme)]) == 2


# ----------------------------------------------------------------------------- end to end

def test_e2e_long_toy(benchmark, tmp_path):
    out = tmp_path / "e2e.csv"
    rc = benchmark.pedantic(e2e_long.main, args=([
        "--toy", "--device", "cpu", "--lengths", "32", "--steps", "1", "--warmup", "0",
        "--providers", "ours-torch,eager", "--out", str(out)],), rounds=1, iterations=1)
    assert rc == 0
    rows = R.read_csv(out)
    for prov in ("ours-torch", "eager"):
        assert _value(rows, provider=prov, metric="step_time") > 0
        assert _value(rows, provider=prov, metric="longest_pair_fits") == 32


@pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="needs trl (the trl extra)")
def test_trl_step_toy_runs_both_trainers(capsys, tmp_path):
    from benchmarks import trl_step

    assert trl_step.main(["--vocab", "600", "--hidden", "32", "--tokens", "16", "--pairs", "1",
                          "--steps", "1", "--warmup", "0", "--cpu", "--out-dir",
                          str(tmp_path)]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()
            if line.startswith("{")]
    assert [r["trainer"] for r in rows] == ["trl", "tisdpo"]
    assert rows[0]["first_loss"] == pytest.approx(rows[1]["first_loss"], rel=1e-5)
    assert abs(rows[0]["first_loss"] - math.log(2)) > 1e-4     # policy ≠ reference
    assert all(r["step_s"] > 0 and r["peak_mib"] > 0 for r in rows)


def test_filtering_table(capsys):
    """benchmarks.filtering at toy size: the exact row is at the rounding floor; filtering
    keeps fewer columns as ε grows and its d_hidden error grows with the lost mass."""
    from benchmarks import filtering

    assert filtering.main(["--vocab", "2000", "--tokens", "64", "--hidden", "16",
                           "--chunks", "32"]) == 0
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines()
            if line.startswith("| 2000 ")]
    assert [r[2].strip() for r in rows] == ["none", "2^-14", "2^-12", "2^-10", "2^-8"]
    kept = [float(r[3].strip().rstrip("%")) for r in rows]
    err = [float(r[5].split("/")[0]) for r in rows]
    assert kept[0] == 100.0 and err[0] < 1e-5
    assert kept[1:] == sorted(kept[1:], reverse=True) and kept[-1] < 50.0
    assert err[-1] > err[0]


@requires_triton
@pytest.mark.parametrize("op,logits", [("logprobs", "fused"), ("logprobs", "gemm"),
                                       ("kl", "gemm"), ("loss", "fused")])
def test_tune_cpu_smoke(op, logits, capsys, monkeypatch):
    """benchmarks.tune's steps at toy size (the interpreter cannot autotune: both runs use
    the default configs and agree exactly); the caller's TISDPO_* settings are back after."""
    from benchmarks import tune
    from tisdpo_kernels._triton import slabs

    calls, real = [], slabs.gemm_logits       # the forward's chunk logits
    monkeypatch.setattr(slabs, "gemm_logits", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setenv("TISDPO_AUTOTUNE", "0")
    monkeypatch.delenv("TISDPO_TMA", raising=False)
    monkeypatch.delenv("TISDPO_HEAD_LOGITS", raising=False)
    assert tune.main(["--cpu-smoke", "--reps", "1", "--warmup", "0", "--logits", logits,
                      "--op", op]) == 0
    assert os.environ["TISDPO_AUTOTUNE"] == "0" and "TISDPO_TMA" not in os.environ
    assert "TISDPO_HEAD_LOGITS" not in os.environ
    out = capsys.readouterr().out.splitlines()
    info = json.loads(out[0])
    assert info["op"] == op and info["logits"] == logits and bool(calls) == (logits == "gemm")
    out_name = {"logprobs": "logp", "kl": "kl", "loss": "loss"}[op]
    assert info["max_diff"] == {out_name: 0.0, "d_hidden": 0.0, "d_weight": 0.0}
    assert list(info["chosen"]) == [k[0] for k in tune.kernels(op, logits)]
    table = [line.split("|") for line in out[3:]]
    assert [r[1].strip() for r in table] == ["forward", "backward"]
    assert all((r[3].strip() == "—") == (logits == "gemm" or op == "loss") for r in table)
    with pytest.raises(SystemExit):                  # the one-sweep head has no fused mode
        tune.main(["--cpu-smoke", "--op", "loss", "--logits", "gemm"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_e2e_long_needs_gpu_without_toy(capsys):
    assert e2e_long.main(["--out", "-"]) == 2
    assert "pass --toy" in capsys.readouterr().err


# ----------------------------------------------------------------------------- CUDA only

@requires_cuda
def test_cuda_logprobs_llama3_8b(benchmark):
    cuda = torch.device("cuda")
    case = ops.Case("logprobs", PRESETS["llama3-8b"], 4096, torch.bfloat16, cuda)
    inp = ops.make_inputs(case)
    work = ops.build_workload(case, inp, "ours-triton")
    benchmark.pedantic(lambda: (work.backward(work.call()), torch.cuda.synchronize()),
                       rounds=5, iterations=1, warmup_rounds=1)
