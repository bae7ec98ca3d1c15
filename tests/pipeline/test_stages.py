"""Pipeline stages on a tiny model: weights alignment, resumability, weight modes, variants."""
import json
import logging
import math
import os

import datasets
import pytest
import torch

from numerics import assert_oracle
from tisdpo.pipeline import context, stages, weights
from tisdpo.pipeline.demo import demo_config
from tisdpo.train.checkpoint import stage_done
from tisdpo.train.model import load_model
from tisdpo_kernels import reference as R


def tiny_cfg(root, **overrides):
    cfg = demo_config(fast=True)
    cfg.run_dir, cfg.device = str(root), "cpu"
    m = cfg.model
    m.tiny_hidden_size, m.tiny_layers, m.tiny_heads, m.tiny_kv_heads = 32, 1, 2, 1
    m.tiny_intermediate_size = 48
    cfg.data.synthetic_train, cfg.data.synthetic_eval = 20, 6
    cfg.sft.enabled = False
    for t in (cfg.sft, cfg.contrastive, cfg.policy):
        t.batch_size, t.max_steps, t.lr, t.warmup_steps = 4, 2, 2e-3, 0
    cfg.log.tensorboard, cfg.log.every = False, 1
    for name, value in overrides.items():
        section, _, leaf = name.rpartition(".")
        setattr(getattr(cfg, section) if section else cfg, leaf, value)
    return cfg


@pytest.fixture(scope="module")
def weighted_run(tmp_path_factory):
    """contrastive (D) -> weights, once for the module."""
    datasets.disable_progress_bars()
    torch.set_num_threads(1)
    ctx = context.make_context(tiny_cfg(tmp_path_factory.mktemp("run")))
    stages.run_contrastive(ctx)
    weights.run_weights(ctx)
    return ctx


def _batch_logps(model, batch, rows):
    """Per completion token log-probs from the model's own full logits on a padded batch,
    gathered at positions computed from the prompt/completion lengths (not the labels)."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"]).logits
    logp = torch.log_softmax(logits, -1).double()        # eager: in the model's dtype
    out = []
    for side in ("chosen", "rejected"):
        for b, rec in enumerate(rows):
            r = b if side == "chosen" else b + len(rows)
            n_p, comp = len(rec["prompt_ids"]), list(rec[f"{side}_ids"])
            pos = torch.arange(n_p - 1, n_p + len(comp) - 1)
            out.append(logp[r, pos, torch.tensor(comp)])
    return out


def test_weights_are_contrastive_logprobs_aligned_with_completion_tokens(weighted_run):
    ctx = weighted_run
    wdir = ctx.path("weights")
    meta = json.load(open(os.path.join(wdir, "meta.json")))
    assert meta["weight_method"] == "rank_based" and meta["tokenize"]["add_eos"] is False
    raw = datasets.load_from_disk(os.path.join(wdir, "train"))
    from tisdpo.train.data import TokenizeConfig, tokenize_pairs

    tok, _ = tokenize_pairs(raw, ctx.tokenizer, TokenizeConfig(**meta["tokenize"]))
    rows = list(tok)[:ctx.cfg.weights.batch_size]          # the stage's first batch
    batch = context.make_collator(ctx, packed=False)(rows)
    paths = {k: meta[k] for k in ("positive", "negative", "reference")}
    got, eager, truth = {}, {}, {}
    for dtype, out in ((torch.float32, eager), (torch.float64, truth)):
        lp = {k: _batch_logps(load_model(ctx.cfg.model, p, device=ctx.device,
                                         trainable=False).to(dtype), batch, rows)
              for k, p in paths.items()}
        out["c"] = torch.cat([a - b for a, b in zip(lp["positive"], lp["negative"])])
        out["ref"] = torch.cat(lp["reference"])
    for key, fmt in (("c", "{}_score"), ("ref", "ref_{}_logps")):
        got[key] = torch.cat([torch.tensor(raw[int(r["record_index"])][fmt.format(side)])
                              for side in ("chosen", "rejected") for r in rows])
    for k in ("c", "ref"):
        assert_oracle(got[k], eager[k], truth[k], dtype=torch.float32, name=f"stored {k}",
                      metric="rms")
    # the stored weights are the rank-based rule applied per sequence to the stored scores
    for side in ("chosen", "rejected"):
        for i in range(4):
            c = torch.tensor(raw[i][f"{side}_score"], dtype=torch.float64)
            w_ref = R.token_weights(c, torch.zeros_like(c), side=side, method="rank_based")
            w = torch.tensor(raw[i][f"{side}_weight"], dtype=torch.float64)
            assert_oracle(w, w_ref, w_ref, dtype=torch.float32, name=f"{side} weights {i}")
    assert os.path.isfile(os.path.join(wdir, "train.jsonl")) and stage_done(wdir)


def test_policy_weight_modes(weighted_run, caplog):
    ctx = weighted_run
    pcfg = ctx.cfg.policy
    import dataclasses

    def data(**kw):
        return stages._policy_data(ctx, dataclasses.replace(pcfg, **kw))

    train, _, use, has_ref = data(method="tisdpo", token_weights="auto")
    assert use and has_ref and "chosen_weight" in train.column_names
    train_r, _, use_r, _ = data(method="tisdpo", token_weights="random")
    train_r2, _, _, _ = data(method="tisdpo", token_weights="random")
    w = [x for row in train_r["chosen_weight"] for x in row]
    assert use_r and min(w) >= 0.7 and max(w) <= 1.3 and len(set(w)) > len(w) // 2
    assert train_r["chosen_weight"] == train_r2["chosen_weight"]          # seeded
    _, _, use_e, _ = data(method="tisdpo", token_weights="equal")
    assert not use_e
    train_d, _, use_d, has_ref_d = data(method="dpo", token_weights="auto")
    # dpo counts EOS: the stored columns (made without EOS) are not used, nor weights
    assert not use_d and not has_ref_d and "chosen_weight" not in train_d.column_names
    # cdpo counts EOS too: its weights cannot come from them, and the error says why
    for mode in ("stored", "auto"):       # the error alone: no warning about other weights
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="tisdpo"), pytest.raises(
                ValueError, match=r"made for another tokenisation \(add_eos=False then, True "
                                  r"now, as method 'cdpo' tokenises\)"):
            data(method="cdpo", token_weights=mode)
        assert "using the stored" not in caplog.text
    ctx.cfg.weights.method = "exp_clamp"
    try:
        train_x, _, _, _ = data(method="tisdpo", token_weights="recompute")
    finally:
        ctx.cfg.weights.method = None
    for side, mu in (("chosen", 1.0), ("rejected", -1.0)):
        c = torch.tensor([x for r in train_x[f"{side}_score"] for x in r], dtype=torch.float64)
        got = torch.tensor([x for r in train_x[f"{side}_weight"] for x in r])
        truth = torch.exp(mu * c.clamp(-0.5, 1.5))
        assert_oracle(got, truth.float(), truth, dtype=torch.float32, name=f"exp_clamp {side}")


def test_policy_trains_from_stored_reference_logps_and_packed(weighted_run, tmp_path):
    ctx = weighted_run
    out = stages.run_policy(ctx, name="policy-test")
    done = json.load(open(os.path.join(ctx.path("policy-test"), "done.json")))
    assert done["reference"] == "precomputed ref_logps" and done["steps"] == 2
    assert os.path.isfile(os.path.join(out, "config.json"))
    ctx.cfg.data.packing = True
    try:
        stages.run_policy(ctx, name="policy-packed")
    finally:
        ctx.cfg.data.packing = False
    assert stage_done(ctx.path("policy-packed"))


def test_stage_stop_resume_and_skip(tmp_path):
    ctx = context.make_context(tiny_cfg(tmp_path, **{"contrastive.stop_after": 1,
                                                    "contrastive.max_steps": 3}))
    with pytest.raises(context.StageStopped, match="contrastive\\+: stopped after step 1, "
                                                   "checkpointed; rerun without stop_after"):
        stages.run_contrastive(ctx)
    assert not stage_done(ctx.path("contrastive"))
    ctx.cfg.contrastive.stop_after = None
    pos, neg = stages.run_contrastive(ctx)
    rows = [json.loads(x) for x in open(ctx.path("contrastive", "positive", "metrics.jsonl"))]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    assert stage_done(ctx.path("contrastive"))
    mtime = os.path.getmtime(os.path.join(pos, "config.json"))
    assert stages.run_contrastive(ctx) == (pos, neg)                  # finished: skipped
    assert os.path.getmtime(os.path.join(pos, "config.json")) == mtime


def test_weights_stage_resumes_from_finished_shards(tmp_path, monkeypatch):
    ctx = context.make_context(tiny_cfg(tmp_path, **{"contrastive.variant": "prompt"}))
    stages.run_contrastive(ctx)
    monkeypatch.setattr(weights, "SHARD", 8)                 # 20 pairs -> shards 8, 8, 4
    calls, killed = [], []
    real = weights._estimate_shard

    def flaky(*args, **kwargs):
        calls.append(len(args[1]))
        if len(calls) == 2 and not killed:
            killed.append(True)
            raise RuntimeError("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(weights, "_estimate_shard", flaky)
    with pytest.raises(RuntimeError, match="killed"):
        weights.run_weights(ctx)
    calls.clear()
    weights.run_weights(ctx)
    assert calls == [8, 4, 6]            # train shards 2 and 3, then the eval split
    raw = datasets.load_from_disk(ctx.path("weights", "train"))
    assert len(raw) == 20 and all(len(s) > 0 for s in raw["chosen_score"])
    assert json.load(open(ctx.path("weights", "meta.json")))["variant"] == "prompt"


def test_a_resumed_weights_pass_equals_an_uninterrupted_one(tmp_path, monkeypatch):
    """Resumed from its finished shards, the pass writes what one uninterrupted pass writes;
    shards of another split-up (a pass killed under another shard size) are refused."""
    over = {"contrastive.variant": "prompt", "weights.jsonl": True}
    whole = context.make_context(tiny_cfg(tmp_path / "whole", **over))
    stages.run_contrastive(whole)
    weights.run_weights(whole)
    real = weights._estimate_shard

    def killed_at_the_second_shard(name):
        ctx = context.make_context(tiny_cfg(tmp_path / name, **over))
        stages.run_contrastive(ctx)
        monkeypatch.setattr(weights, "SHARD", 8)             # 20 pairs -> shards 8, 8, 4
        calls = []

        def estimate(*args, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                raise RuntimeError("killed")
            return real(*args, **kwargs)

        monkeypatch.setattr(weights, "_estimate_shard", estimate)
        with pytest.raises(RuntimeError, match="killed"):
            weights.run_weights(ctx)
        monkeypatch.setattr(weights, "_estimate_shard", real)
        return ctx

    ctx = killed_at_the_second_shard("resumed")
    weights.run_weights(ctx)
    for split in ("train", "eval"):
        assert datasets.load_from_disk(ctx.path("weights", split)).to_list() == \
            datasets.load_from_disk(whole.path("weights", split)).to_list()
        with open(ctx.path("weights", f"{split}.jsonl"), "rb") as a, \
                open(whole.path("weights", f"{split}.jsonl"), "rb") as b:
            assert a.read() == b.read()
    ctx = killed_at_the_second_shard("other_size")
    monkeypatch.setattr(weights, "SHARD", 16)     # the finished 8-pair shard, then pairs 16-19
    with pytest.raises(ValueError, match=r"^weights train: the shards in .*_shards hold 12 pairs, "
                                         r"not this split's 20 in order; delete that folder"):
        weights.run_weights(ctx)


def test_sft_based_contrastive_variant(tmp_path):
    ctx = context.make_context(tiny_cfg(tmp_path, **{"contrastive.variant": "sft",
                                                    "contrastive.max_steps": 1}))
    pos, neg = stages.run_contrastive(ctx)
    side = {p: json.load(open(os.path.join(os.path.dirname(p), "done.json")))["side"]
            for p in (pos, neg)}
    assert side == {pos: "chosen", neg: "rejected"}


def test_truncated_completions_get_nan_padded_columns(tmp_path):
    """Tokens cut by max_length get NaN (not scored); every token the policy keeps gets a
    score, also under the prompt variant, whose longer prefixed prompts would leave pi+/pi-
    fewer tokens."""
    ctx = context.make_context(tiny_cfg(tmp_path, **{"contrastive.variant": "prompt",
                                                    "data.max_length": 12,
                                                    "data.max_prompt_length": 6}))
    stages.run_contrastive(ctx)
    weights.run_weights(ctx)
    raw = datasets.load_from_disk(ctx.path("weights", "train"))
    from tisdpo.train.data import TokenizeConfig, tokenize_pairs

    texts = raw.select_columns(["prompt", "chosen", "rejected"])   # all tokens: no NaN read
    full, _ = tokenize_pairs(texts, ctx.tokenizer, TokenizeConfig(add_eos=False))
    cut, _ = tokenize_pairs(raw, ctx.tokenizer, context.tokenize_cfg(ctx.cfg, "tisdpo"))
    for f, c, rec in zip(full, cut, raw):
        n, k = len(f["chosen_ids"]), len(c["chosen_ids"])
        assert len(rec["chosen_weight"]) == n and k <= 12
        assert all(math.isnan(x) for x in rec["chosen_score"][k:])
        assert all(x != 0.0 and math.isfinite(x) for x in rec["chosen_score"][:k]), \
            (k, rec["chosen_score"])
        assert math.isfinite(sum(rec["chosen_weight"][:k]))
        assert all(math.isnan(x) for x in rec["chosen_weight"][k:] + rec["ref_chosen_logps"][k:])
    assert any(len(c["chosen_ids"]) < len(f["chosen_ids"]) for f, c in zip(full, cut))


@pytest.mark.parametrize("method", ["ipo", "simpo", "tdpo2", "tisdpo_paper"])
def test_policy_trains_with_other_presets(weighted_run, method):
    import dataclasses

    ctx = weighted_run
    pcfg = dataclasses.replace(ctx.cfg.policy, method=method, max_steps=1)
    stages.run_policy(ctx, pcfg, name=f"policy-{method}")
    done = json.load(open(os.path.join(ctx.path(f"policy-{method}"), "done.json")))
    assert done["steps"] == 1 and math.isfinite(done["metrics"]["loss"])
    # KL presets need the reference model's hidden states; simpo needs no reference at all
    uses_ref_model = method in ("tdpo2", "tisdpo_paper", "ipo")     # ipo counts EOS
    assert (done["reference"] not in (None, "precomputed ref_logps")) == uses_ref_model


def test_cdpo_weights_from_contrastive_logscores(tmp_path):
    ctx = context.make_context(tiny_cfg(tmp_path, **{"contrastive.variant": "prompt",
                                                    "weights.method": "cdpo",
                                                    "policy.method": "cdpo"}))
    stages.run_contrastive(ctx)
    weights.run_weights(ctx)
    raw = datasets.load_from_disk(ctx.path("weights", "train"))
    assert json.load(open(ctx.path("weights", "meta.json")))["score_kind"] == "cdpo_log_score"
    s = torch.tensor([x for r in raw["rejected_score"] for x in r], dtype=torch.float64)
    w = torch.tensor([x for r in raw["rejected_weight"] for x in r], dtype=torch.float64)
    assert (s <= 0).all()
    truth = 1 - s.exp()
    assert_oracle(w, truth.float(), truth, dtype=torch.float32, name="cdpo rejected weights")
    assert all(x == 1.0 for r in raw["chosen_weight"] for x in r)          # only_neg
    stages.run_policy(ctx, name="policy-cdpo")
    assert stage_done(ctx.path("policy-cdpo"))
    with pytest.raises(ValueError, match="stored scores are 'cdpo_log_score'"):
        import dataclasses

        ctx.cfg.weights.method = "rank_based"
        stages._policy_data(ctx, dataclasses.replace(ctx.cfg.policy, method="cdpo",
                                                     token_weights="recompute"))


def test_builtin_tokenizer_warns_on_data_it_does_not_fit(caplog):
    import datasets

    from tisdpo.pipeline.context import warn_builtin_tokenizer
    from tisdpo.train.synthetic import load_tokenizer

    tok = load_tokenizer()
    own = datasets.Dataset.from_list([{"prompt": "p", "chosen": " joyful river calm",
                                       "rejected": " dull"}])
    alien = datasets.Dataset.from_list([{"prompt": "p", "chosen": " umbrellas extraordinarily "
                                         "bureaucratic", "rejected": " x"}])
    with caplog.at_level("WARNING", logger="tisdpo"):
        assert warn_builtin_tokenizer(tok, own, "own.jsonl") <= 1.5
        assert not caplog.records
        assert warn_builtin_tokenizer(tok, alien, "alien.jsonl") > 3
        assert warn_builtin_tokenizer(tok, alien, "alien.jsonl") is None   # once per file
    (rec,) = caplog.records
    assert "alien.jsonl" in rec.getMessage() and "model.tokenizer" in rec.getMessage()


def test_plain_prompts_without_the_bos_their_tokenizer_adds_warn_once(caplog):
    """data.add_bos off (the default) while the tokenizer puts a BOS on every text, as
    Llama's and Gemma's do: said once per file; chat records and tokenizers that add no
    BOS (the built-in one) say nothing."""
    import datasets
    from transformers import PreTrainedTokenizerFast
    from tokenizers import processors

    from tisdpo.pipeline.context import warn_no_bos
    from tisdpo.train.synthetic import ASSETS_DIR, load_tokenizer

    tok = PreTrainedTokenizerFast(tokenizer_file=str(ASSETS_DIR / "tokenizer.json"),
                                  bos_token="<|bos|>", eos_token="<|eos|>")
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A", special_tokens=[("<|bos|>", tok.bos_token_id)])
    plain = datasets.Dataset.from_list([{"prompt": "p", "chosen": " a", "rejected": " b"}])
    chat = datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": "p"}],
                                        "chosen": " a", "rejected": " b"}])
    with caplog.at_level("WARNING", logger="tisdpo"):
        assert not warn_no_bos(load_tokenizer(), plain, "plain-builtin.jsonl")
        assert not warn_no_bos(tok, chat, "chat.jsonl")
        assert not caplog.records
        assert warn_no_bos(tok, plain, "plain.jsonl")
        assert not warn_no_bos(tok, plain, "plain.jsonl")                # once per file
    (rec,) = caplog.records
    assert "plain.jsonl" in rec.getMessage() and "--data.add_bos true" in rec.getMessage()


def test_weights_pass_is_done_before_its_shards_go(tmp_path, monkeypatch):
    """A kill while the finished pass removes its shards leaves it done (done.json is
    renamed into place first), never a pass that must start over."""
    ctx = context.make_context(tiny_cfg(tmp_path, **{"contrastive.max_steps": 1}))
    stages.run_contrastive(ctx)
    real = weights.shutil.rmtree

    def killed(path, *a, **kw):
        if os.path.basename(path) == "_shards":
            raise KeyboardInterrupt("killed")
        return real(path, *a, **kw)

    monkeypatch.setattr(weights.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        weights.run_weights(ctx)
    assert stage_done(ctx.path("weights"))
    assert not any(f.endswith(".tmp") for f in os.listdir(ctx.path("weights")))
