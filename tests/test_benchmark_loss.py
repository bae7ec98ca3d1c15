"""The benchmark's loss op with precomputed reference log-probs (``--reference precomputed``):
the reference head's fp32 log-probs, as an offline pass gives them, instead of the head."""
import importlib.util
import json
import sys
from pathlib import Path

import torch

if importlib.util.find_spec("benchmarks") is None:   # pytest run from outside the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import ops as O  # noqa: E402
from benchmarks import results as R  # noqa: E402
from benchmarks.runner import RunConfig, run  # noqa: E402
from benchmarks.shapes import HeadShape  # noqa: E402

CPU = torch.device("cpu")
TINY = HeadShape("tiny", hidden=32, vocab=200, tokens=(32,), toy=True)


def _case(reference):
    return O.Case("loss", TINY, 32, torch.bfloat16, CPU, pairs=2, reference=reference)


def test_precomputed_inputs_are_the_reference_heads_fp32_logps():
    """The same seeded inputs, the reference head replaced by its fp32 log-probs."""
    online, given = O.make_inputs(_case("online")), O.make_inputs(_case("precomputed"))
    assert given.ref_hidden is None and given.ref_weight is None
    assert torch.equal(online.hidden, given.hidden) and torch.equal(online.targets,
                                                                    given.targets)
    want = O._fp32(lambda: O._truth_head(online, None, None, ref=True)["logp"])
    assert given.ref_logps.dtype == torch.float32 and torch.equal(given.ref_logps, want)
    # the check's reference: the same loss as with the head, reference-free for a provider
    # that cannot take the log-probs (Liger's DPO loss), never the one for the other
    head, logps = (O._truth(_case(r), inp, "eager")["loss"]
                   for r, inp in (("online", online), ("precomputed", given)))
    free = O._truth(_case("precomputed"), given, "liger-dpo")["loss"]
    assert torch.allclose(head, logps, rtol=1e-5) and not torch.allclose(free, logps, rtol=1e-2)


def test_precomputed_reference_rows():
    """Rows say the reference was precomputed (error rows too) and count no reference-head
    flops, and every provider matches the fp32 loss and gradients of the same precomputed
    log-probs."""
    cfg = RunConfig(ops=["loss"], modes=["fwd", "fwdbwd"], shapes=[TINY],
                    providers=["ours-torch", "ours-one-sweep-torch", "eager"], device=CPU,
                    reps=1, warmup=0, pairs=2, ceiling=False, reference="precomputed")
    rows = run(cfg, R.environment(CPU, ["--test"]))
    assert all(r["status"] == "ok" for r in rows), [r for r in rows if r["status"] != "ok"]
    ndv = 32 * 32 * 200
    flops = {("ours-torch", "fwd"): 2, ("ours-torch", "fwdbwd"): 8,
             ("ours-one-sweep-torch", "fwd"): 6, ("ours-one-sweep-torch", "fwdbwd"): 6,
             ("eager", "fwd"): 2, ("eager", "fwdbwd"): 6}
    for (prov, mode), multiple in flops.items():
        (row,) = [r for r in rows if (r["provider"], r["mode"], r["metric"]) ==
                  (prov, mode, "time")]
        extra = json.loads(row["extra"])
        assert extra["ref_logps"] == "precomputed" and extra["flops"] == multiple * ndv
    for r in rows:                      # every row of the case says which case it is
        extra = json.loads(r["extra"])
        assert (extra["pairs"], extra["ref_logps"]) == (2, "precomputed"), r
        if r["metric"].startswith("err_"):
            rel = float(r["value"]) / json.loads(r["extra"])["ref_max"]
            assert rel < 2e-2, (r["provider"], r["metric"], rel)


def test_plots_keep_the_references_apart(tmp_path):
    """One figure per reference (and per number of pairs): the points of an online head and
    of precomputed log-probs at the same N are never drawn as one line."""
    from benchmarks.plot import plot_rows
    env = R.environment(CPU, ["--test"])
    rows = [R.make_row(env, op="loss", provider="eager", mode="fwdbwd", shape="tiny",
                       tokens=32, metric="time", unit="ms", value=ms, dtype="bf16",
                       extra={"pairs": pairs, **({"ref_logps": ref} if ref else {})})
            for ms, pairs, ref in ((1.0, 1, None), (2.0, 1, "precomputed"), (3.0, 2, None))]
    names = sorted(p.name.split("-tiny-")[0] for p in plot_rows(rows, tmp_path))
    assert names == ["loss", "loss-2pairs", "loss-precomputed-ref"], names


def test_readme_tables_show_the_online_reference_only():
    """The README's loss table is the online-head case (its title says so): a precomputed
    run's rows, an out-of-memory status row included, stay out of it."""
    from benchmarks import readme_table
    env = dict(R.environment(CPU, ["--test"]), device_kind="cuda", device="Test GPU")
    cols = dict(op="loss", mode="fwdbwd", shape="llama3-8b", tokens=16384, dtype="bf16")
    rows = [R.make_row(env, provider="eager", metric="time", unit="ms", value=9.0,
                       extra={"pairs": 1, "ref_logps": "online"}, **cols),
            R.make_row(env, provider="liger-dpo", metric="status", unit="", status="oom",
                       extra={"pairs": 1, "ref_logps": "precomputed"}, **cols)]
    for r in rows:
        r["_file"] = "benchmarks/results/test.csv"
    text = readme_table.render(rows, tokens=(16384,))
    assert "| llama3-8b | 16384 | eager | 9.00" in text and "liger-dpo | OOM" not in text
