"""Per-token weights through TRL: the column format, its alignment to TRL's tokenisation,
the collator, the errors, and TIS-DPO trained by TISDPOTrainer on the weights stage's output."""
import copy
import json
import math
import os

import datasets
import pytest
import torch

pytest.importorskip("trl", reason="the TRL integration needs trl (pip install 'tisdpo[trl]')")

import trl_cases as C  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

from tisdpo.integrations.trl import (  # noqa: E402
    TISDPOCollator, TISDPOConfig, TISDPOTrainer, align_weights_to_trl, load_trl_weights,
)
from tisdpo.integrations.trl_weights import trl_completion_ids  # noqa: E402
from tisdpo.train.config import dump_yaml  # noqa: E402
from tisdpo.train.data import TokenizeConfig, tokenize_pairs  # noqa: E402
from tisdpo.train.records import template_kwargs  # noqa: E402


@pytest.fixture(scope="module")
def tok():
    return C.tokenizer()


def _stock_ids(tok, ds, tmp_path):
    """(chosen_ids, rejected_ids) of every record as TRL's DPOTrainer prepares them."""
    args = C.config(DPOConfig, tmp_path / "stock")
    model = C.tiny_model(tok)
    trainer = DPOTrainer(model=model, ref_model=copy.deepcopy(model), args=args,
                         train_dataset=ds, processing_class=tok)
    prepared = trainer.train_dataset
    return prepared["chosen_ids"], prepared["rejected_ids"]


def _with_index_weights(ds, tok, cfg):
    """Records plus tisdpo-aligned weights 1, 2, 3, ... per completion token."""
    tokenized, _ = tokenize_pairs(ds, tok, cfg)
    cols = {f"{s}_weight": [[float(k + 1) for k in range(len(r[f"{s}_ids"]))]
                            for r in tokenized] for s in ("chosen", "rejected")}
    for name, values in cols.items():
        ds = ds.add_column(name, values)
    return ds, tokenized


def test_trl_tokenisation_is_reproduced(tok, tmp_path):
    plain = C.dataset(4)
    chat = datasets.Dataset.from_list([
        {"prompt": [{"role": "user", "content": "Write about the sea:"}],
         "chosen": [{"role": "assistant", "content": " water small"}],
         "rejected": [{"role": "assistant", "content": " nasty"}]}])
    for ds, name in ((plain, "plain"), (chat, "chat")):
        chosen, rejected = _stock_ids(tok, ds, tmp_path / name)
        for i, rec in enumerate(ds):
            ids, _ = trl_completion_ids(tok, rec["prompt"], rec["chosen"], rec["rejected"])
            assert list(ids[0]) == chosen[i] and list(ids[1]) == rejected[i], (name, i)


# a template that renders per-record tools (before the turns) and chat_template_kwargs (one
# in the context, one inside the response's generation block)
TOOLS_TEMPLATE = (
    "{{ bos_token }}{% if tools %}<|system|>tools: {{ tools | length }}{% endif %}"
    "{% if sys is defined %}<|system|>{{ sys }}{% endif %}{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}<|assistant|>{% generation %}"
    "{% if style is defined %}{{ style }}{% endif %}{{ message['content'] }}<|eos|>"
    "{% endgeneration %}{% else %}<|{{ message['role'] }}|>{{ message['content'] }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
TOOL = {"type": "function", "function": {"name": "f", "description": "d",
                                         "parameters": {"type": "object", "properties": {}}}}


@pytest.mark.parametrize("extra", [{"tools": [TOOL]}, {"tools": json.dumps([TOOL])},
                                   {"chat_template_kwargs": {"sys": "be brief"}},
                                   {"chat_template_kwargs": {"style": " very"}}],
                         ids=["tools", "tools-json", "kwargs-context", "kwargs-completion"])
def test_tools_and_chat_template_kwargs_render_as_trl_renders_them(tok, tmp_path, extra):
    """TRL renders a chat record with its ``tools`` and ``chat_template_kwargs``: tisdpo's
    own tokenisation (what the weights stage scores) and the TRL alignment do too."""
    tok = copy.deepcopy(tok)
    tok.chat_template = TOOLS_TEMPLATE
    rec = {"prompt": [{"role": "user", "content": "Write about the sea:"}],
           "chosen": [{"role": "assistant", "content": " water small"}],
           "rejected": [{"role": "assistant", "content": " nasty night"}], **extra}
    ds = datasets.Dataset.from_list([rec, rec])
    model = C.tiny_model(tok)
    stock = DPOTrainer(model=model, ref_model=copy.deepcopy(model), train_dataset=ds,
                       args=C.config(DPOConfig, tmp_path), processing_class=tok).train_dataset[0]
    ours, _ = tokenize_pairs(ds, tok, TokenizeConfig(add_eos=False))
    assert ours[0]["prompt_ids"] == stock["prompt_ids"]
    assert stock["chosen_ids"][:len(ours[0]["chosen_ids"])] == ours[0]["chosen_ids"]
    ids, _ = trl_completion_ids(tok, rec["prompt"], rec["chosen"], rec["rejected"],
                                template=template_kwargs(rec)[0])
    assert (list(ids[0]), list(ids[1])) == (stock["chosen_ids"], stock["rejected_ids"])
    weighted, _ = _with_index_weights(ds, tok, TokenizeConfig(add_eos=False))
    out = align_weights_to_trl(weighted, tok, TokenizeConfig(add_eos=False))[0]
    n = len(ours[0]["chosen_ids"])
    assert out["chosen_weight"] == [float(k + 1) for k in range(n)] + \
        [0.0] * (len(stock["chosen_ids"]) - n)


def test_same_tokens_copy_weights_and_eos_gets_the_unscored_weight(tok):
    ds = C.dataset(3)
    cfg = TokenizeConfig(add_eos=False)                   # how tisdpo* tokenises
    ds, tokenized = _with_index_weights(ds, tok, cfg)
    out = align_weights_to_trl(ds, tok, cfg, unscored_weight=-7.0)
    for rec, src in zip(out, tokenized):
        ids, _ = trl_completion_ids(tok, rec["prompt"], rec["chosen"], rec["rejected"])
        n = len(src["chosen_ids"])
        assert list(ids[0][:n]) == list(src["chosen_ids"]) and ids[0][n] == tok.eos_token_id
        assert rec["chosen_weight"] == [float(k + 1) for k in range(n)] + [-7.0]


def test_tokens_merged_across_the_boundary_take_the_mean_of_what_they_cover(tok):
    """Prompt ending in a space: TRL's first completion token is ' water' (the prompt's
    space merged in); tisdpo's tokens of 'water' are 'w', 'at', 'er'."""
    ds = datasets.Dataset.from_list([{"prompt": "Write about the sea: ",
                                      "chosen": "water small", "rejected": "nasty night"}])
    cfg = TokenizeConfig(add_eos=True)
    ds, tokenized = _with_index_weights(ds, tok, cfg)
    src = tokenized[0]
    assert tok.convert_ids_to_tokens(src["chosen_ids"][:3]) == ["w", "at", "er"]
    out = align_weights_to_trl(ds, tok, cfg)[0]
    ids, _ = trl_completion_ids(tok, out["prompt"], out["chosen"], out["rejected"])
    assert tok.convert_ids_to_tokens(ids[0]) == ["Ġwater", "Ġsmall", "<|eos|>"]
    # ' water' ← mean(1, 2, 3); ' small' ← 4; EOS ← tisdpo's own EOS weight (5)
    assert out["chosen_weight"] == [2.0, 4.0, 5.0]


def test_chat_records_align_by_their_tokens(tok):
    from tisdpo.train.synthetic import make_synthetic_task

    train, _, _ = make_synthetic_task(3, 0, chat=True)
    ds = datasets.Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")}
                                     for r in train])
    cfg = TokenizeConfig(add_eos=False)
    ds, tokenized = _with_index_weights(ds, tok, cfg)
    out = align_weights_to_trl(ds, tok, cfg)
    for rec, src in zip(out, tokenized):
        n = len(src["rejected_ids"])
        assert rec["rejected_weight"][:n] == [float(k + 1) for k in range(n)]
        assert rec["rejected_weight"][n:] == [0.0]        # the template's EOS: unscored


def test_tokens_the_stage_did_not_score_are_nan_and_refused_where_trl_keeps_them(tok,
                                                                                 tmp_path):
    """The weights stage's data.max_length cut each response after a few tokens (its
    columns hold 0.0 padding there): the export marks those tokens NaN, and TISDPOTrainer
    refuses them where its own max_length keeps them, instead of training them with a
    weight of 0 that no one computed."""
    ds = C.dataset(4)
    full = TokenizeConfig(add_eos=False)
    ds, tokenized = _with_index_weights(ds, tok, full)
    p = max(len(r["prompt_ids"]) for r in tokenized)
    cut = full.replace(max_length=p + 2, max_prompt_length=p)
    scored, _ = tokenize_pairs(ds, tok, cut)
    ds = ds.map(lambda r, i: {c: [v if k < len(scored[i][f"{c[:-7]}_ids"]) else 0.0
                                  for k, v in enumerate(r[c])]
                              for c in ("chosen_weight", "rejected_weight")}, with_indices=True)
    mine = align_weights_to_trl(ds, tok, cut)        # a user's own weights: all used
    assert [r["chosen_weight"][:-1] for r in mine] == [r["chosen_weight"] for r in ds]
    out = align_weights_to_trl(ds, tok, cut, scored_by_stage=True)
    for rec, src, kept in zip(out, tokenized, scored):
        n, m = len(src["chosen_ids"]), len(kept["chosen_ids"])
        assert m < n and rec["chosen_weight"][:m] == [float(k + 1) for k in range(m)]
        assert all(math.isnan(v) for v in rec["chosen_weight"][m:n])
        assert rec["chosen_weight"][n:] == [0.0]                 # TRL's EOS: unscored
    args = C.config(TISDPOConfig, tmp_path, method="tisdpo")
    with pytest.raises(ValueError, match=r"^train record 0, field '(chosen|rejected)_weight': "
                                         r"value \d+ is nan, not a finite number \(no value "
                                         r"was computed for this token"):
        TISDPOTrainer(model=C.tiny_model(tok), ref_model=C.tiny_model(tok), args=args,
                      train_dataset=out, processing_class=tok)
    short = min(len(r["prompt_ids"]) for r in tokenized) + 1   # keeps none of the NaN tokens
    args = C.config(TISDPOConfig, tmp_path, method="tisdpo", max_length=short)
    TISDPOTrainer(model=C.tiny_model(tok), ref_model=C.tiny_model(tok), args=args,
                  train_dataset=out, processing_class=tok)
    ex = [{"prompt_ids": [5, 6], "chosen_ids": [8, 9, 10], "rejected_ids": [11],
           "chosen_weight": [0.5, math.nan, None], "rejected_weight": [3.0]}]
    batch = TISDPOCollator(pad_token_id=0, max_length=3, ref_columns=None)(ex)
    assert batch["weights"].tolist() == [[0, 0, 0.5], [0, 0, 3.0]]
    with pytest.raises(ValueError, match=r"^column 'chosen_weight': value 1 is nan, not a "
                                         r"finite number \(no value was computed"):
        TISDPOCollator(pad_token_id=0, max_length=4, ref_columns=None)(ex)


def test_collator_carries_columns_truncated_with_the_tokens():
    ex = [{"prompt_ids": [5, 6, 7], "chosen_ids": [8, 9, 10], "rejected_ids": [11],
           "chosen_weight": [0.5, 1.5, 2.5], "rejected_weight": [3.0],
           "ref_chosen_logps": [-1.0, -2.0, -3.0], "ref_rejected_logps": [-4.0]}]
    batch = TISDPOCollator(pad_token_id=0, max_length=5)(ex)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [5, 6, 7, 11, 0]]
    assert batch["weights"].tolist() == [[0, 0, 0, 0.5, 1.5], [0, 0, 0, 3.0, 0]]
    assert batch["ref_logps"].tolist() == [[0, 0, 0, -1.0, -2.0], [0, 0, 0, -4.0, 0]]
    bad = [{**ex[0], "chosen_weight": [1.0]}]
    with pytest.raises(ValueError, match="'chosen_weight': 1 values for 3 completion tokens"):
        TISDPOCollator(pad_token_id=0)(bad)
    sums = [{**ex[0], "ref_chosen_logps": -6.0, "ref_rejected_logps": -4.0}]
    with pytest.raises(ValueError, match="per-token lists"):
        TISDPOCollator(pad_token_id=0)(sums)


def test_a_misaligned_record_is_named_before_training(tok, tmp_path):
    ds = C.dataset(5)
    cfg = TokenizeConfig(add_eos=False)
    ds, _ = _with_index_weights(ds, tok, cfg)
    ds = align_weights_to_trl(ds, tok, cfg)
    rows = ds.to_list()
    rows[3]["chosen_weight"] = rows[3]["chosen_weight"][:-1]     # lost the EOS weight
    n = len(rows[3]["chosen_weight"])
    args = C.config(TISDPOConfig, tmp_path, method="tisdpo")
    with pytest.raises(ValueError, match=rf"train record 3, field 'chosen_weight': {n} "
                                         rf"values for {n + 1} completion tokens"):
        TISDPOTrainer(model=C.tiny_model(tok), ref_model=C.tiny_model(tok), args=args,
                      train_dataset=datasets.Dataset.from_list(rows), processing_class=tok)


def test_a_weighted_method_needs_its_weights(tok, tmp_path):
    args = C.config(TISDPOConfig, tmp_path, method="tisdpo")
    with pytest.raises(ValueError, match=r"method='tisdpo' weights tokens but train_dataset "
                                         r"has no \['chosen_weight', 'rejected_weight'\]"):
        TISDPOTrainer(model=C.tiny_model(tok), ref_model=C.tiny_model(tok), args=args,
                      train_dataset=C.dataset(2), processing_class=tok)


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory):
    """The project's contrastive (prompt variant) and weights stages on a tiny run."""
    from tisdpo.pipeline import context, stages, weights
    from tisdpo.pipeline.demo import demo_config

    torch.set_num_threads(1)
    cfg = demo_config(fast=True)
    cfg.run_dir, cfg.device = str(tmp_path_factory.mktemp("run")), "cpu"
    m = cfg.model
    m.tiny_hidden_size, m.tiny_layers, m.tiny_heads, m.tiny_kv_heads = 32, 1, 2, 1
    m.tiny_intermediate_size = 48
    cfg.data.synthetic_train, cfg.data.synthetic_eval = 12, 4
    cfg.sft.enabled = False
    cfg.contrastive.variant = "prompt"
    cfg.log.tensorboard = False
    ctx = context.make_context(cfg)
    stages.run_contrastive(ctx)
    weights.run_weights(ctx)
    dump_yaml(cfg, ctx.path("run.yaml"))
    return ctx.path("weights"), ctx.tokenizer


def test_weights_command_writes_the_trl_aligned_copy(weights_dir):
    from tisdpo import cli

    path, tok = weights_dir
    run_yaml = os.path.join(os.path.dirname(path), "run.yaml")
    assert cli.main(["weights", "--config", run_yaml, "--trl"]) == 0     # stage done: export
    for split in ("train", "eval"):
        want = load_trl_weights(path, tok, split)
        got = datasets.load_from_disk(os.path.join(path, "trl", split))
        assert got.column_names == want.column_names and len(got) == len(want) > 0
        assert got["chosen_weight"] == want["chosen_weight"]
        with open(os.path.join(path, "trl", f"{split}.jsonl")) as fh:
            assert sum(1 for _ in fh) == len(want)


def _eager_tisdpo_loss(model, ref, batch, beta=0.1):
    """TIS-DPO's loss from full logits (the oracle): −log σ(β(Σω_wΔ_w − Σω_lΔ_l)), mean."""
    def logps(m):
        with torch.no_grad():
            logits = m(input_ids=batch["input_ids"],
                       attention_mask=batch["attention_mask"]).logits[:, :-1].double()
        lp = logits.log_softmax(-1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
        return lp * batch["completion_mask"][:, 1:]
    z = (batch["weights"][:, 1:].double() * (logps(model) - logps(ref))).sum(-1)
    chosen, rejected = z.chunk(2)
    return float(-torch.nn.functional.logsigmoid(beta * (chosen - rejected)).mean())


def test_tisdpo_trains_through_trl_on_the_weights_stage_output(weights_dir, tmp_path):
    path, tok = weights_dir
    raw = datasets.load_from_disk(f"{path}/train")
    ds = load_trl_weights(path, tok)
    assert "chosen_score" not in ds.column_names and "ref_chosen_logps" not in ds.column_names
    for src, rec in zip(raw, ds):                       # one to one, then TRL's EOS at 0
        assert rec["chosen_weight"] == src["chosen_weight"] + [0.0]
    model, ref = C.tiny_model(tok, init=0.1), C.tiny_model(tok, seed=1, init=0.1)
    args = C.config(TISDPOConfig, tmp_path, method="tisdpo", gradient_accumulation_steps=1,
                    max_steps=3)
    trainer = TISDPOTrainer(model=model, ref_model=ref, args=args, train_dataset=ds,
                            processing_class=tok)
    first = next(iter(trainer.get_train_dataloader()))
    expected = _eager_tisdpo_loss(model, ref, first)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h and "train_loss" not in h]
    assert len(logs) == 3 and all(math.isfinite(h["loss"]) for h in logs)
    assert logs[0]["num_tokens"] == int(first["attention_mask"].sum())
    assert abs(logs[0]["loss"] - expected) <= 1e-5 * abs(expected)
    mask = first["completion_mask"][:2, 1:].bool()
    mean_w = float(first["weights"][:2, 1:][mask].mean())
    assert abs(logs[0]["tisdpo/weights/chosen"] - mean_w) <= 1e-6 and mean_w != 1.0
    # TRL's rewards stay the unweighted β·Σ(log π − log π_ref); the loss's own are weighted
    assert logs[0]["rewards/chosen"] != logs[0]["tisdpo/rewards/chosen"]


@pytest.mark.parametrize("peft_bf16", [False, True])
def test_kl_preset_trains_with_the_reference_hidden_states(tok, tmp_path, peft_bf16):
    """tdpo2's full-vocabulary KL needs the reference's hidden states: a reference model, or
    (PEFT, under bf16 autocast) the disabled adapter. Without head_metrics, no entropy."""
    kw = {}
    if peft_bf16:
        from peft import LoraConfig

        kw = dict(with_ref=False, peft_config=LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    args = C.config(TISDPOConfig, tmp_path, method="tdpo2", max_steps=2, bf16=peft_bf16,
                    head_metrics=False, learning_rate=1e-2)
    logs, _, _, _, _ = C.run(TISDPOTrainer, args, tok=tok, train=C.dataset(8), **kw)
    assert all(math.isfinite(h["loss"]) for h in logs)
    assert logs[-1]["tisdpo/kl/chosen"] > 0 and "entropy" not in logs[-1]
