"""The prompt variant's pi+ / pi- rows (``contrastive.variant=prompt``): the prefix always
survives the prompt cut, pi+ and pi- then read the policy's kept prompt tokens and exactly
its completion, and a row longer than the model's positions is refused by option name."""
import datasets
import pytest

from test_stages import tiny_cfg
from tisdpo.pipeline import context
from tisdpo.pipeline.weights import _prompted_sides
from tisdpo.pipeline.weights_io import full_lengths
from tisdpo.train.trainer import rows_of

POS, NEG = "Answer kindly and well. ", "Answer rudely and badly. "


def _rows(tmp_path, truncation, *, add_bos=False, max_positions=None, prefix=POS):
    datasets.disable_progress_bars()
    cfg = tiny_cfg(tmp_path, **{"contrastive.variant": "prompt", "data.max_length": 24,
                               "data.max_prompt_length": 10, "data.truncation": truncation,
                               "data.add_bos": add_bos})
    ctx = context.make_context(cfg)
    raw = datasets.Dataset.from_list([
        {"prompt": "write " + "about the rivers and the hills " * 4 + f"number {i}:",
         "chosen": " kind words here", "rejected": " rude words here"} for i in range(3)]
        + [{"prompt": "short one:", "chosen": " kind", "rejected": " rude"}])
    tok_cfg = context.tokenize_cfg(cfg, cfg.policy.method)
    pol = context.tokenize_records(ctx, raw, "tisdpo", "policy", tok_cfg)
    full = full_lengths(ctx, raw, tok_cfg, pol)
    rows = rows_of(pol, range(len(pol)))
    sides = _prompted_sides(ctx, raw, (prefix, NEG), tok_cfg, full, max_positions)
    out = {name: side(rows) for name, side in zip(("pi+", "pi-"), sides)}
    whole = {n: context.tokenize_records(ctx, raw.map(lambda r, t=t: {"prompt": t + r["prompt"]}),
                                         "", n, tok_cfg.replace(max_length=10**9,
                                                                max_prompt_length=10**9 - 1))
             for n, t in (("pi+", prefix), ("pi-", NEG))}
    return ctx, rows, out, whole


@pytest.mark.parametrize("add_bos", [False, True], ids=["", "bos"])
@pytest.mark.parametrize("truncation", ["keep_end", "keep_start"])
def test_the_prefix_survives_the_prompt_cut(tmp_path, truncation, add_bos):
    ctx, rows, out, whole = _rows(tmp_path, truncation, add_bos=add_bos)
    prefix_ids = {n: ctx.tokenizer(t, add_special_tokens=False)["input_ids"]
                  for n, t in (("pi+", POS), ("pi-", NEG))}
    bos = [ctx.tokenizer.bos_token_id] if add_bos else []
    cut = 0
    for k, pol in enumerate(rows):
        kept = list(pol["prompt_ids"])
        plus, minus = out["pi+"][k], out["pi-"][k]
        assert plus["prompt_ids"] != minus["prompt_ids"]        # the contrast is there
        for name, row in (("pi+", plus), ("pi-", minus)):
            prompt = row["prompt_ids"]
            # the prefix (behind a BOS) opens every row; the completion is the policy's
            assert prompt[:len(bos) + len(prefix_ids[name]) - 1] == \
                (bos + prefix_ids[name])[:-1], (name, k)
            assert row["chosen_ids"] == pol["chosen_ids"]
            assert row["rejected_ids"] == pol["rejected_ids"]
            w = list(whole[name][k]["prompt_ids"])
            if len(kept) < 10:                     # the policy's prompt was not cut
                assert prompt == w
                continue
            assert len(prompt) < len(w)
            if truncation == "keep_end":           # the policy's kept tail ends the prompt
                tail = kept[len(bos):]
                assert prompt[-len(tail):] == tail
            else:                                  # the prefixed prompt lost its end
                assert prompt == w[:len(prompt)]
            cut += 1
    assert cut >= 6                                # three long records, both sides


def test_a_row_beyond_the_models_positions_is_refused_by_option(tmp_path):
    with pytest.raises(ValueError, match=r"contrastive.positive_prompt: record 0's pi\+ row .* more than the "
                                         r"model's 20 \(n_positions\)") as err:
        _rows(tmp_path, "keep_end", max_positions=(20, "n_positions"))
    assert "\n" not in str(err.value)
    _rows(tmp_path / "fits", "keep_end", max_positions=(60, "n_positions"))


@pytest.mark.parametrize("template", ["builtin", "default-system"])
def test_chat_prompts_keep_the_prefix_under_keep_end(tmp_path, template):
    """Chat records: the prefix is a system message, which a template may render where it
    would otherwise put a default system block of its own (as Qwen's does). Under keep_end
    pi+ and pi- keep their own instruction and end with the policy's kept tail."""
    from tisdpo.train.synthetic import CHAT_TEMPLATE

    datasets.disable_progress_bars()
    cfg = tiny_cfg(tmp_path, **{"contrastive.variant": "prompt", "data.max_length": 30,
                               "data.max_prompt_length": 12, "data.truncation": "keep_end"})
    ctx = context.make_context(cfg)
    if template == "default-system":
        ctx.tokenizer.chat_template = (
            "{{ bos_token }}{% if messages[0]['role'] != 'system' %}<|system|>You are a "
            "helpful assistant, write about the rivers and the hills.{% endif %}"
            + CHAT_TEMPLATE[len("{{ bos_token }}"):])
    raw = datasets.Dataset.from_list([{
        "prompt": [{"role": "user", "content": "write " + "about the rivers and the hills " * 3
                    + f"number {i}:"}],
        "chosen": [{"role": "assistant", "content": " kind words here"}],
        "rejected": [{"role": "assistant", "content": " rude words here"}]} for i in range(2)])
    tok_cfg = context.tokenize_cfg(cfg, cfg.policy.method)
    pol = context.tokenize_records(ctx, raw, "tisdpo", "policy", tok_cfg)
    rows = rows_of(pol, range(len(pol)))
    full = full_lengths(ctx, raw, tok_cfg, pol)
    bos = ctx.tokenizer.bos_token_id
    default = "You are a helpful assistant, write about the rivers and the hills."
    for prefixes in (("Answer kindly. ", "Answer rudely. "), (default, "Answer rudely."),
                     ("", "Answer rudely.")):
        sides = _prompted_sides(ctx, raw, prefixes, tok_cfg, full, None)
        for text, side in zip(prefixes, sides):
            for pol_row, row in zip(rows, side(rows)):
                kept = list(pol_row["prompt_ids"])
                assert len(kept) == 12 and kept[0] == bos              # the policy's was cut
                prompt = row["prompt_ids"]
                assert text.strip() in ctx.tokenizer.decode(prompt)    # the whole instruction
                assert prompt[0] == bos and prompt[-(len(kept) - 1):] == kept[1:]


@pytest.mark.parametrize("add_bos", [False, True], ids=["", "bos"])
def test_an_empty_prefix_reads_the_policys_own_prompt(tmp_path, add_bos):
    """No prefix: pi+'s prompt is the policy's, BOS included, cut or not."""
    _, rows, out, _ = _rows(tmp_path, "keep_end", add_bos=add_bos, prefix="")
    assert [r["prompt_ids"] for r in out["pi+"]] == [r["prompt_ids"] for r in rows]
    assert any(len(r["prompt_ids"]) == 10 for r in rows)                 # some were cut
