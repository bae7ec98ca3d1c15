"""Span-level scores (weights.span / span_reduce) and weight balance (weights.balance): the
helpers on hand-made examples, apply_rule (recompute), the weights stage, validation."""
import dataclasses

import datasets
import numpy as np
import pytest
import torch

from test_stages import tiny_cfg
from tisdpo.pipeline import context, stages, weights
from tisdpo.pipeline.demo import demo_config
from tisdpo.pipeline.spans import (
    SPAN_COLUMNS, RuleParams, balance_weights, pool_spans, span_rows, word_span_ids,
)
from tisdpo.pipeline.weights_io import merge_columns
from tisdpo.train.config import RunConfig, validate
from tisdpo.train.data import TokenizeConfig, tokenize_pairs
from tisdpo.train.synthetic import load_tokenizer
from tisdpo_kernels import WeightParams, token_weights


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------------------- word boundaries

def test_word_spans_with_the_shipped_tokenizer(tok):
    ids = _ids(tok, " playful day concise")                 # ' p' 'l' 'ay' 'ful' ' day' ...
    assert word_span_ids(ids, tok) == [0, 0, 0, 0, 1, 2, 2, 2, 2]
    # the first completion token starts a word even without a leading space
    assert word_span_ids(_ids(tok, "playful day"), tok) == [0, 0, 0, 0, 1]
    # EOS (any special token) is a span of its own, also between words
    eos = tok.eos_token_id
    assert word_span_ids(_ids(tok, " cute") + [eos], tok) == [0, 0, 0, 0, 1]
    assert word_span_ids([eos] + _ids(tok, " cute"), tok) == [0, 1, 1, 1, 1]
    # a lone space piece joins the word after it; punctuation splits from letters
    assert [tok.decode([i]) for i in _ids(tok, " exact")][0] == " "
    assert word_span_ids(_ids(tok, " exact"), tok) == [0] * 5
    pieces = [tok.decode([i]) for i in _ids(tok, " x, y.  z")]
    assert pieces == [" ", "x", ",", " ", "y", ".", " ", " ", "z"]
    assert word_span_ids(_ids(tok, " x, y.  z"), tok) == [0, 0, 1, 2, 2, 3, 4, 4, 4]
    assert word_span_ids([], tok) == []


class _SentencePieceLike:
    """decode drops the leading space of '▁word' pieces, as SentencePiece decoders do."""

    vocab = {0: "<pad>", 1: "\u2581play", 2: "ful", 3: "\u2581day", 4: "!", 5: "</s>"}
    all_special_ids = [0, 5]

    def decode(self, ids):
        return "".join(self.vocab[i] for i in ids).replace("\u2581", " ").lstrip()

    def convert_ids_to_tokens(self, i):
        return self.vocab[i]


def test_word_spans_read_sentencepiece_space_marks():
    assert word_span_ids([1, 2, 3, 4, 5], _SentencePieceLike()) == [0, 0, 1, 2, 3]


# ---------------------------------------------------------------------------- pooling

def test_pool_spans_sum_and_mean_exact():
    c = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0])
    span = torch.tensor([0, 0, 1, -1, -1, 0, 0])
    seq = torch.tensor([0, 0, 0, 0, 0, 1, 1])     # span 0 of sequence 1 is another span
    assert pool_spans(c, span, seq, "sum").tolist() == [3, 3, 3, 4, 5, 13, 13]
    assert pool_spans(c, span, seq, "mean").tolist() == [1.5, 1.5, 3, 4, 5, 6.5, 6.5]
    # tokens sharing an id need not be adjacent
    assert pool_spans(torch.tensor([1.0, 2.0, 4.0]), [0, 1, 0], [0, 0, 0]).tolist() == [5, 2, 5]
    # one-token spans leave every score exactly as it was; the dtype is kept
    x = torch.randn(50, generator=torch.Generator().manual_seed(0))
    for span in (torch.arange(50), torch.full((50,), -1)):
        out = pool_spans(x, span, torch.zeros(50, dtype=torch.long), "sum")
        assert out.dtype == torch.float32 and torch.equal(out, x)
    with pytest.raises(ValueError, match="span_reduce must be sum or mean"):
        pool_spans(x, torch.arange(50), torch.zeros(50), "max")
    with pytest.raises(ValueError, match="50 scores, 3 span ids"):
        pool_spans(x, [0, 1, 2], torch.zeros(50))


# ---------------------------------------------------------------------------- apply_rule

def _raw(seed=0, n=6):
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        rec = {}
        for side in ("chosen", "rejected"):
            k = int(rng.integers(3, 9))
            rec[f"{side}_score"] = rng.normal(size=k).astype(np.float32).tolist()
            rec[f"{side}_span"] = np.sort(rng.integers(0, 3, size=k)).tolist()
        rows.append(rec)
    return datasets.Dataset.from_list(rows)


def _today(raw, rule, params):
    """apply_rule as it was before spans: the rule on the stored scores, per side."""
    out = {}
    for side in ("chosen", "rejected"):
        scores = raw[f"{side}_score"]
        c = torch.tensor([x for r in scores for x in r], dtype=torch.float32)
        seq = torch.cat([torch.full((len(r),), i) for i, r in enumerate(scores)])
        w = token_weights(c, torch.zeros_like(c), side=side, method=rule, params=params,
                          seq_ids=seq)
        out[f"{side}_weight"] = [x.tolist() for x in w.split([len(r) for r in scores])]
    return out


@pytest.mark.parametrize("rule", ["rank_based", "exp_clamp", "threshold_and_scale"])
def test_span_token_is_bitwise_todays_rule(rule):
    raw = _raw()
    want = _today(raw, rule, WeightParams())
    for params in (WeightParams(), RuleParams(), RuleParams(span_reduce="mean")):
        got = weights.apply_rule(raw, rule, params, "auto")
        for col, vals in want.items():
            assert got[col] == vals


@pytest.mark.parametrize("reduce", ["sum", "mean"])
def test_recompute_pools_over_the_span_columns(reduce):
    raw = _raw(1)
    got = weights.apply_rule(raw, "exp_clamp", RuleParams(span="column", span_reduce=reduce),
                             "auto")
    for side, mu in (("chosen", 1.0), ("rejected", -1.0)):
        for i in range(len(raw)):
            c = torch.tensor(raw[i][f"{side}_score"], dtype=torch.float64)
            span = raw[i][f"{side}_span"]
            pooled = []
            for s in span:
                members = c[[k for k, t in enumerate(span) if t == s]]
                pooled.append(float(members.sum() if reduce == "sum" else members.mean()))
            want = torch.exp(mu * torch.tensor(pooled, dtype=torch.float64).clamp(-0.5, 1.5))
            w = torch.tensor(got[i][f"{side}_weight"], dtype=torch.float64)
            assert torch.allclose(w, want, rtol=1e-6, atol=0)
            for s in set(span):                               # a span's tokens share a weight
                assert len({got[i][f"{side}_weight"][k] for k, t in enumerate(span)
                            if t == s}) == 1
    # explicit keyword arguments override the params' options
    same = weights.apply_rule(raw, "exp_clamp", RuleParams(), "auto", span="column",
                              span_reduce=reduce)
    assert same["chosen_weight"] == got["chosen_weight"]


def test_recompute_span_errors():
    raw = _raw().remove_columns(list(SPAN_COLUMNS))
    with pytest.raises(ValueError, match="no \\['chosen_span', 'rejected_span'\\] column"):
        weights.apply_rule(raw, "rank_based", RuleParams(span="word"), "auto")
    bad = _raw().map(lambda r: {"chosen_span": r["chosen_span"][:-1]})
    with pytest.raises(ValueError, match="field 'chosen_span'"):
        weights.apply_rule(bad, "rank_based", RuleParams(span="column"), "auto")
    with pytest.raises(ValueError, match="cdpo rule"):
        weights.apply_rule(_raw(), "cdpo", RuleParams(span="word"), "auto",
                           score_kind="cdpo_log_score")


def test_span_rows_of_a_column_are_checked_and_cut(tok):
    recs = [{"prompt": "Write about cats:", "chosen": " kind day", "rejected": " rude",
             "chosen_span": [0, 1], "rejected_span": [5]}]
    raw = datasets.Dataset.from_list(recs)
    tok_pol, _ = tokenize_pairs(raw, tok, TokenizeConfig(add_eos=False))
    assert span_rows(raw, tok_pol, "column", tok) == [([0, 1], [5])]
    assert span_rows(raw, tok_pol, "token", tok) is None
    assert span_rows(raw, tok_pol, "word", tok) == [([0, 1], [0])]
    with pytest.raises(ValueError, match="record 0, field 'chosen_span': 2 values for 3"):
        span_rows(raw, tok_pol, "column", tok, full={0: (3, 1)})
    with pytest.raises(ValueError, match="no \\['chosen_span', 'rejected_span'\\] column"):
        span_rows(raw.remove_columns(list(SPAN_COLUMNS)), tok_pol, "column", tok)


def test_float_span_ids_are_read_as_ints_when_whole(tok):
    """One 1.0 in a JSON file makes datasets read a span column as floats: whole numbers are
    span ids in both the weights stage and recompute (the same weights as ints give); 1.5 is
    refused by both, naming the value, where recompute cast it to 1."""
    recs = [{"prompt": "Write about cats:", "chosen": " kind day", "rejected": " rude",
             "chosen_span": [0, 1.0], "rejected_span": [5]}]
    raw = datasets.Dataset.from_list(recs)
    tok_pol, _ = tokenize_pairs(raw, tok, TokenizeConfig(add_eos=False))
    assert span_rows(raw, tok_pol, "column", tok) == [([0, 1], [5])]
    bad = datasets.Dataset.from_list([{**recs[0], "chosen_span": [0, 1.5]}])
    with pytest.raises(ValueError, match="field 'chosen_span': value 1 is 1.5, not an int"):
        span_rows(bad, tok_pol, "column", tok)
    ints = _raw()
    floats = ints.cast_column("chosen_span", datasets.Sequence(datasets.Value("float64")))
    want = weights.apply_rule(ints, "rank_based", RuleParams(span="column"), "auto")
    got = weights.apply_rule(floats, "rank_based", RuleParams(span="column"), "auto")
    assert got["chosen_weight"] == want["chosen_weight"]
    half = floats.map(lambda r: {"chosen_span": [x + 0.5 for x in r["chosen_span"]]})
    with pytest.raises(ValueError, match="row 0, field 'chosen_span': value 0 is 0.5"):
        weights.apply_rule(half, "rank_based", RuleParams(span="column"), "auto")


# ---------------------------------------------------------------------------- balance

def _weighted(seed=2, n=5):
    rng = np.random.default_rng(seed)
    return datasets.Dataset.from_list([
        {f"{s}_weight": rng.uniform(0.2, 3.0, int(rng.integers(1, 9))).tolist()
         for s in ("chosen", "rejected")} for _ in range(n)])


def test_balance_means_are_one():
    ds = _weighted()
    seq = balance_weights(ds, "sequence")
    side = balance_weights(ds, "side")
    for w in ("chosen_weight", "rejected_weight"):
        for before, after in zip(ds[w], seq[w]):
            assert abs(np.mean(after) - 1) < 1e-6
            assert np.allclose(np.asarray(after) * np.mean(before), before, rtol=1e-6)
        flat = np.concatenate([np.asarray(r) for r in side[w]])
        assert abs(flat.mean() - 1) < 1e-6
        ratio = np.concatenate([np.asarray(a) / np.asarray(b)
                                for a, b in zip(side[w], ds[w])])
        assert np.allclose(ratio, ratio[0], rtol=1e-6)        # one factor per side
    assert balance_weights(ds, "none") is ds
    neg = datasets.Dataset.from_list([{"chosen_weight": [-1.0, 0.5],
                                       "rejected_weight": [1.0]}])
    with pytest.raises(ValueError, match="balance=sequence: row 0, chosen_weight has mean"):
        balance_weights(neg, "sequence")
    with pytest.raises(ValueError, match="balance=side: the chosen_weight column has mean"):
        balance_weights(neg, "side")


def test_recompute_balances_after_the_rule():
    raw = _raw(3)
    plain = weights.apply_rule(raw, "exp_clamp", RuleParams(), "auto")
    got = weights.apply_rule(raw, "exp_clamp", RuleParams(balance="sequence"), "auto")
    for w in ("chosen_weight", "rejected_weight"):
        for a, b in zip(plain[w], got[w]):
            assert np.allclose(np.asarray(a) / np.mean(a), b, rtol=1e-6)
            assert abs(np.mean(b) - 1) < 1e-6


# ---------------------------------------------------------------------------- validation

@pytest.mark.parametrize("attr, value, message", [
    ("span", "sentence", r"^weights\.span must be one of \['token', 'word', 'column'\]"),
    ("span_reduce", "max", r"^weights\.span_reduce must be one of \['sum', 'mean'\]"),
    ("balance", "batch", r"^weights\.balance must be one of \['none', 'sequence', 'side'\]"),
])
def test_validation_of_the_options(attr, value, message):
    cfg = RunConfig()
    setattr(cfg.weights, attr, value)
    with pytest.raises(ValueError, match=message):
        validate(cfg)


def test_validation_across_options():
    cfg = RunConfig()
    cfg.weights.span, cfg.weights.method = "word", "cdpo"
    with pytest.raises(ValueError, match=r"^weights\.span must be token with weights"):
        validate(cfg)
    cfg = RunConfig()
    cfg.weights.balance, cfg.weights.method = "side", "threshold"
    with pytest.raises(ValueError, match=r"^weights\.balance must be none with weights"):
        validate(cfg)
    cfg = RunConfig()
    cfg.weights.span, cfg.weights.span_reduce, cfg.weights.balance = "column", "mean", "side"
    validate(cfg)
    rule, params = weights.weight_rule(cfg)
    assert (params.span, params.span_reduce, params.balance) == ("column", "mean", "side")


# ---------------------------------------------------------------------------- weights stage

def _tiny_cfg(root):
    # each weights pass below starts afresh
    return tiny_cfg(root, **{"data.synthetic_train": 16, "data.synthetic_task": "hard",
                             "data.max_length": 96, "pipeline.resume": False})


@pytest.fixture(scope="module")
def stage_runs(tmp_path_factory):
    """The weights stage on the hard task under several span/balance options."""
    datasets.disable_progress_bars()
    torch.set_num_threads(1)
    ctx = context.make_context(_tiny_cfg(tmp_path_factory.mktemp("spans")))
    stages.run_contrastive(ctx)
    out = {}
    for key in [("token", "sum", "none"), ("word", "sum", "none"), ("word", "mean", "side"),
                ("token", "sum", "sequence")]:
        ctx.cfg.weights = dataclasses.replace(ctx.cfg.weights, span=key[0],
                                              span_reduce=key[1], balance=key[2])
        weights.run_weights(ctx)
        out[key] = {split: datasets.load_from_disk(ctx.path("weights", split)).to_list()
                    for split in ("train", "eval")}
    return ctx, out


def test_stage_word_spans(stage_runs, tok):
    ctx, out = stage_runs
    token, word = out[("token", "sum", "none")], out[("word", "sum", "none")]
    assert "chosen_span" not in token["train"][0]              # span=token: no new column
    for split in ("train", "eval"):
        raw = datasets.Dataset.from_list(word[split])
        tok_pol, _ = tokenize_pairs(raw, tok, context.tokenize_cfg(ctx.cfg, "tisdpo"))
        for r in tok_pol:
            i = int(r["record_index"])
            for side in ("chosen", "rejected"):
                # the stored scores are the raw c_t whatever the span option
                assert word[split][i][f"{side}_score"] == token[split][i][f"{side}_score"]
                assert word[split][i][f"{side}_span"] == word_span_ids(r[f"{side}_ids"], tok)
        # recompute with the same options gives the stage's weights, bitwise
        rule, params = weights.weight_rule(ctx.cfg)
        params = dataclasses.replace(params, span="word", span_reduce="sum", balance="none")
        again = weights.apply_rule(raw, rule, params, "auto")
        assert again["chosen_weight"] == raw["chosen_weight"]
        assert again["rejected_weight"] == raw["rejected_weight"]


def test_stage_balance(stage_runs):
    ctx, out = stage_runs
    rule, params = weights.weight_rule(ctx.cfg)
    for key in [("word", "mean", "side"), ("token", "sum", "sequence")]:
        for split, recs in out[key].items():
            for side in ("chosen", "rejected"):
                rows = [np.asarray(r[f"{side}_weight"]) for r in recs]
                if key[2] == "side":
                    assert abs(np.concatenate(rows).mean() - 1) < 1e-6
                else:
                    assert all(abs(r.mean() - 1) < 1e-6 for r in rows)
            raw = datasets.Dataset.from_list(recs)
            p = dataclasses.replace(params, span=key[0], span_reduce=key[1], balance=key[2])
            again = weights.apply_rule(raw, rule, p, "auto")
            assert again["chosen_weight"] == raw["chosen_weight"]


def test_word_pooling_finds_the_hard_tasks_words_better(tmp_path, tok):
    """On the hard task (multi-token words, quality set by the prompt), c_t summed over each
    word separates good from bad tokens better than c_t itself (demo recipe, 160 pairs; the
    full demo's 1200 pairs give about 0.82 vs 0.998)."""
    from tisdpo.pipeline.demo import auc
    from tisdpo.train.synthetic import synthetic_info

    cfg = demo_config(fast=False)
    cfg.run_dir, cfg.device, cfg.sft.enabled = str(tmp_path), "cpu", False
    cfg.log.progress = cfg.log.tensorboard = False
    cfg.data.synthetic_task, cfg.weights.span = "hard", "word"
    cfg.data.synthetic_train, cfg.data.synthetic_eval = 160, 16
    ctx = context.make_context(cfg)
    stages.run_contrastive(ctx)
    weights.run_weights(ctx)
    info = synthetic_info("hard")
    raw = datasets.load_from_disk(ctx.path("weights", "train"))
    tok_pol, _ = tokenize_pairs(raw, tok, context.tokenize_cfg(cfg, "tisdpo"))
    for side in ("chosen", "rejected"):
        got = {"token": {1: [], -1: []}, "word": {1: [], -1: []}}
        for r in tok_pol:
            rec = raw[int(r["record_index"])]
            c = torch.tensor(rec[f"{side}_score"])
            span = torch.tensor(rec[f"{side}_span"])
            pooled = pool_spans(c, span, torch.zeros_like(span), "sum")
            labels = info.token_labels(r[f"{side}_ids"], tok, r["prompt_ids"])
            for lab, x, y in zip(labels, c.tolist(), pooled.tolist()):
                if lab:
                    got["token"][lab].append(x)
                    got["word"][lab].append(y)
        a_tok, a_word = (auc(got[k][1], got[k][-1]) for k in ("token", "word"))
        assert a_word > a_tok + 0.02 and a_word > 0.7, (side, a_tok, a_word)


def test_cut_tokens_get_span_id_minus_one():
    raw = datasets.Dataset.from_list([{"prompt": "p", "chosen": "c", "rejected": "r"}])
    est = datasets.Dataset.from_list([{"record_index": 0, "chosen_score": [0.5, 0.25],
                                       "chosen_span": [0, 0], "rejected_span": [0]}])
    out = merge_columns(raw, est, {0: (4, 1)})[0]
    assert out["chosen_span"] == [0, 0, -1, -1] and out["chosen_score"][:2] == [0.5, 0.25]
    assert np.isnan(out["chosen_score"][2:]).all()            # not scored: NaN, not 0


@pytest.mark.parametrize("balance", ["none", "sequence"])
def test_recompute_of_truncated_records_equals_the_stage(tmp_path, balance):
    """data.max_length cuts responses: the weights stage ranks and balances the kept tokens
    (its columns are NaN past them); recompute does the same on the kept tokens, bitwise,
    and the cut ones get weight NaN; without the kept tokens it refuses the NaN scores."""
    datasets.disable_progress_bars()
    torch.set_num_threads(1)
    cfg = tiny_cfg(tmp_path, **{"data.synthetic_train": 8, "data.synthetic_eval": 4,
                                "data.max_length": 22, "data.max_prompt_length": 12})
    cfg.weights = dataclasses.replace(cfg.weights, method="rank_based", balance=balance)
    ctx = context.make_context(cfg)
    stages.run_contrastive(ctx)
    weights.run_weights(ctx)
    raw = datasets.load_from_disk(ctx.path("weights", "train"))
    kept = stages._kept(ctx, raw, "tisdpo")
    assert any(n < len(r) for i, r in enumerate(raw["chosen_score"]) for n in kept[i][:1])
    rule, params = weights.weight_rule(ctx.cfg, "tisdpo")
    again = weights.apply_rule(raw, rule, params, "auto", kept=kept)
    for k, col in enumerate(("chosen_weight", "rejected_weight")):
        for i, (a, b) in enumerate(zip(again[col], raw[col])):
            n = kept[i][k]
            assert a[:n] == b[:n] and np.isnan(a[n:]).all() and np.isnan(b[n:]).all()
    with pytest.raises(ValueError, match=r"^record \d+, field '(chosen|rejected)_score': value "
                                         r"\d+ is nan, not a finite number \(no value was "
                                         r"computed for this token"):
        weights.apply_rule(raw, rule, params, "auto")          # the NaN would be ranked
