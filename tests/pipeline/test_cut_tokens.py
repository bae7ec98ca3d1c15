"""Tokens the weights stage's data.max_length cut: NaN in every float column (null in its
JSONL), never read by what truncates the same way (the policy stage, recompute, random and
equal weights, inspect), and a one-line error naming the record and field for a run whose
larger max_length would keep them (0.0 there was taken for a weight and a reference
log-prob)."""
import dataclasses
import json
import math
import os
import re

import datasets
import pytest
import torch

from test_stages import tiny_cfg
from tisdpo.pipeline import context, heatmap, stages, weights
from tisdpo.train.data import TokenizeConfig, tokenize_pairs

FLOATS = ("score", "weight")
REFS = {"chosen": "ref_chosen_logps", "rejected": "ref_rejected_logps"}
UNSCORED = r"not a finite number \(no value was computed for this token: a weights stage"


@pytest.fixture(scope="module")
def cut_run(tmp_path_factory):
    """contrastive -> weights with a data.max_length that cuts most responses."""
    datasets.disable_progress_bars()
    torch.set_num_threads(1)
    cfg = tiny_cfg(tmp_path_factory.mktemp("cut"), **{"data.max_length": 14,
                                                      "data.max_prompt_length": 6})
    cfg.log.progress = False
    ctx = context.make_context(cfg)
    stages.run_contrastive(ctx)
    weights.run_weights(ctx)
    return ctx


def _columns(side):
    return [f"{side}_{k}" for k in FLOATS] + [REFS[side]]


def _kept(ctx, raw, tok_cfg=None):
    """By record index, (chosen, rejected) tokens kept and whole."""
    bare = raw.remove_columns([c for s in REFS for c in _columns(s)])
    cut, _ = tokenize_pairs(bare, ctx.tokenizer, tok_cfg or context.tokenize_cfg(ctx.cfg,
                                                                                 "tisdpo"))
    whole, _ = tokenize_pairs(bare, ctx.tokenizer, TokenizeConfig(add_eos=False))
    return {int(c["record_index"]): ((len(c["chosen_ids"]), len(c["rejected_ids"])),
                                     (len(w["chosen_ids"]), len(w["rejected_ids"])))
            for c, w in zip(cut, whole)}


def test_cut_tokens_are_nan_in_every_column_and_the_same_runs_policy_trains(cut_run):
    ctx = cut_run
    for split in ("train", "eval"):
        raw = datasets.load_from_disk(ctx.path("weights", split))
        lines = [json.loads(x) for x in open(ctx.path("weights", f"{split}.jsonl"))]
        kept = _kept(ctx, raw)
        assert any(a < b for k, w in kept.values() for a, b in zip(k, w)), "nothing cut"
        for i, rec in enumerate(raw):
            (kc, kr), (wc, wr) = kept[i]
            for side, k, n in (("chosen", kc, wc), ("rejected", kr, wr)):
                for col in _columns(side):
                    v = rec[col]
                    assert len(v) == n, (i, col)
                    assert all(math.isfinite(x) for x in v[:k]), (i, col, v)
                    assert all(math.isnan(x) for x in v[k:]), (i, col, v)
                    assert lines[i][col][k:] == [None] * (n - k)
                    assert all(isinstance(x, float) for x in lines[i][col][:k])
    # the same run's policy (each weights mode) tokenises as the stage did: no NaN read
    for mode in ("stored", "recompute", "random", "equal"):
        pcfg = dataclasses.replace(ctx.cfg.policy, token_weights=mode)
        train, _, use, has_ref = stages._policy_data(ctx, pcfg)
        assert has_ref and use == (mode != "equal")
        tok = context.tokenize_records(ctx, train, "tisdpo", mode)
        cols = [c for c in ("chosen_weight", "rejected_weight", *REFS.values())
                if c in tok.column_names]
        for c in cols:
            assert all(math.isfinite(x) for row in tok[c] for x in row), (mode, c)
    out = stages.run_policy(ctx)
    done = json.load(open(ctx.path("policy", "done.json")))
    assert out.endswith("final") and done["reference"] == "precomputed ref_logps"


def _refused(records, tok, tok_cfg):
    with pytest.raises(ValueError) as err:
        tokenize_pairs(records, tok, tok_cfg)
    return str(err.value)


@pytest.mark.parametrize("source", ["jsonl", "folder"])
def test_a_tokenisation_keeping_more_tokens_refuses_the_padding(cut_run, source):
    """The stage's records read back (JSONL: null, folder: NaN): a larger max_length keeps
    unscored tokens and is refused naming the record and field; the stage's own
    tokenisation reads the same kept values from either."""
    ctx = cut_run
    tok_cfg = context.tokenize_cfg(ctx.cfg, "tisdpo")
    if source == "jsonl":
        raw = datasets.load_dataset("json", data_files=ctx.path("weights", "train.jsonl"),
                                    split="train")
    else:
        raw = datasets.load_from_disk(ctx.path("weights", "train"))
    longer = tok_cfg.replace(max_length=48, max_prompt_length=16)
    msg = _refused(raw, ctx.tokenizer, longer)
    shown = "None" if source == "jsonl" else "nan"
    assert "\n" not in msg
    now, then = _kept(ctx, raw, longer), _kept(ctx, raw)
    first = min(i for i in now if now[i][0] != then[i][0])     # keeps what the stage cut
    assert re.match(rf"record {first}, field '(chosen|rejected)_weight': value \d+ is "
                    rf"{shown}, {UNSCORED}", msg), msg
    # without weights (token_weights=equal), the reference log-probs are refused the same way
    msg = _refused(raw.remove_columns(["chosen_weight", "rejected_weight"]), ctx.tokenizer,
                   longer)
    assert re.match(rf"record {first}, field 'ref_(chosen|rejected)_logps': value \d+ is "
                    rf"{shown}, {UNSCORED}", msg), msg
    # the stage's tokenisation: the kept values, as the stage's folder gives them
    same, _ = tokenize_pairs(raw, ctx.tokenizer, tok_cfg)
    ref, _ = tokenize_pairs(datasets.load_from_disk(ctx.path("weights", "train")),
                            ctx.tokenizer, tok_cfg)
    for col in ("chosen_weight", "rejected_weight", *REFS.values()):
        assert [len(r) for r in same[col]] == [len(r) for r in ref[col]]
        flat = [x for r in same[col] for x in r]
        assert flat == pytest.approx([x for r in ref[col] for x in r], rel=1e-6), col
    # recompute with the tokens a larger max_length keeps: the unscored scores are refused
    rule, params = weights.weight_rule(ctx.cfg, "tisdpo")
    keeps = {i: k for i, (k, _) in now.items()}
    with pytest.raises(ValueError, match=rf"^record {first}, field '(chosen|rejected)_score': "
                                         rf"value \d+ is {shown}, {UNSCORED}"):
        weights.apply_rule(raw, rule, params, "auto", kept=keeps)
    # ... unless tokenisation skips that record (skip_invalid: absent from kept): not read
    skipped = {i: k for i, k in keeps.items() if now[i] == then[i]}
    for balance in ("none", "side"):
        out = weights.apply_rule(raw, rule, params, "auto", kept=skipped, balance=balance)
        assert all(math.isnan(x) for x in out[first]["chosen_weight"])


@pytest.mark.parametrize("source", ["jsonl", "folder"])
def test_another_run_given_the_stage_output_as_data(cut_run, tmp_path, source):
    """run B's data.train is run A's weights output: with run A's max_length it trains on the
    stored weights; with a larger one it is refused, one line naming the record and field."""
    ctx = cut_run
    suffix = ".jsonl" if source == "jsonl" else ""
    data = {"data.train": ctx.path("weights", "train" + suffix),
            "data.eval": ctx.path("weights", "eval" + suffix)}
    longer = tiny_cfg(tmp_path / "longer", **data, **{"data.max_length": 48,
                                                      "data.max_prompt_length": 16})
    with pytest.raises(ValueError) as err:
        stages.run_policy(context.make_context(longer))
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"data.train {data['data.train']}"), msg
    assert " field '" in msg and "(no value was computed for this token" in msg, msg
    same = tiny_cfg(tmp_path / "same", **data, **{"data.max_length": 14,
                                                  "data.max_prompt_length": 6})
    stages.run_policy(context.make_context(same))
    done = json.load(open(tmp_path / "same" / "policy" / "done.json"))
    assert done["reference"] == "precomputed ref_logps"


def test_inspect_draws_a_cut_record(cut_run, tmp_path):
    ctx = cut_run
    items = heatmap.load_pairs(ctx.cfg, split="eval", pairs=6)
    raw = datasets.load_from_disk(ctx.path("weights", "eval"))
    kept = _kept(ctx, raw)
    assert any(it["chosen_cut"] or it["rejected_cut"] for it in items)
    for it in items:
        (kc, kr), (wc, wr) = kept[it["index"]]
        assert (len(it["chosen"]), it["chosen_cut"]) == (kc, wc - kc)
        assert (len(it["rejected"]), it["rejected_cut"]) == (kr, wr - kr)
        assert all(math.isfinite(t["score"]) for s in ("chosen", "rejected") for t in it[s])
    html, png = heatmap.inspect_run(ctx.cfg, split="eval", out_dir=str(tmp_path))
    text = open(html, encoding="utf-8").read()
    assert "cut by data.max_length]" in text and "=nan" not in text


def test_inspect_draws_a_cut_record_of_the_stage_jsonl(cut_run):
    ctx = cut_run
    items = heatmap.load_pairs(ctx.cfg, data=ctx.path("weights", "eval.jsonl"), pairs=6)
    assert any(it["chosen_cut"] or it["rejected_cut"] for it in items)
    assert all(math.isfinite(t["score"]) for it in items for s in ("chosen", "rejected")
               for t in it[s])


def test_the_trl_export_of_a_cut_stage_keeps_its_scored_weights_and_marks_the_rest(cut_run):
    """load_trl_weights (behind `tisdpo weights --trl`) reads the NaN-padded columns: the
    scored weights copied, the cut tokens NaN (a trainer keeping them refuses the record)."""
    from tisdpo.integrations.trl_weights import load_trl_weights

    pytest.importorskip("trl")
    ctx = cut_run
    raw = datasets.load_from_disk(ctx.path("weights", "train"))
    kept = _kept(ctx, raw)
    out = load_trl_weights(ctx.path("weights"), ctx.tokenizer, "train")
    for i, rec in enumerate(out):
        (kc, _), (wc, _) = kept[i]
        got, src = rec["chosen_weight"], raw[i]["chosen_weight"]
        assert got[:kc] == pytest.approx(src[:kc], rel=1e-6)      # float32 copies
        assert all(math.isnan(x) for x in got[kc:wc]), (i, got)


def test_stages_that_read_no_weights_take_the_stage_output_as_data(cut_run, tmp_path):
    """SFT and the contrastive DPO runs read no weights (SFT no reference log-probs either):
    another run's NaN-padded columns in their data are no reason to refuse it."""
    ctx = cut_run
    cfg = tiny_cfg(tmp_path, **{"data.train": ctx.path("weights", "train.jsonl"),
                                "data.eval": ctx.path("weights", "eval.jsonl"),
                                "data.max_length": 48, "data.max_prompt_length": 16})
    cfg.log.progress = False
    run = context.make_context(cfg)
    assert os.path.isdir(stages.run_sft(run))
    train, evaluation = context.load_records(run)
    train, evaluation = (r.remove_columns(list(REFS.values())) for r in (train, evaluation))
    out = stages.run_dpo(run, cfg.contrastive, str(tmp_path / "dpo"), method="dpo", beta=0.1,
                         train_raw=train, eval_raw=evaluation, impl="torch", desc="dpo")
    assert os.path.isdir(out)

