"""ChatML templates, with and without a ``{% generation %}`` block (each turn ends
``<|im_end|>\\n``) and a BOS under ``keep_end`` truncation: where the completion ends, how
many EOS tokens it holds, and that a cut prompt keeps the BOS a short one has."""
import datasets
import pytest
from transformers import PreTrainedTokenizerFast

from tisdpo.train.data import TokenizeConfig, tokenize_pairs
from tisdpo.train.synthetic import ASSETS_DIR, load_tokenizer

CHATML = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
          "{{ message['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

# as TRL's training templates: the generation block holds the end-of-turn and its newline
CHATML_GEN = ("{% for message in messages %}{% if message['role'] == 'assistant' %}"
              "<|im_start|>assistant\n{% generation %}{{ message['content'] }}<|im_end|>\n"
              "{% endgeneration %}{% else %}<|im_start|>{{ message['role'] }}\n"
              "{{ message['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
              "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _chatml(template):
    datasets.disable_progress_bars()
    return PreTrainedTokenizerFast(tokenizer_file=str(ASSETS_DIR / "tokenizer.json"),
                                   eos_token="<|im_end|>", pad_token="<|pad|>",
                                   additional_special_tokens=["<|im_start|>"],
                                   chat_template=template)


@pytest.fixture(scope="module")
def chatml():
    return _chatml(CHATML)


def _chat(reply="kind cat"):
    return {"prompt": [{"role": "user", "content": "Write about cats:"}],
            "chosen": [{"role": "assistant", "content": reply}],
            "rejected": [{"role": "assistant", "content": "rude cat"}]}


@pytest.mark.parametrize("template", [CHATML, CHATML_GEN], ids=["no-block", "generation-block"])
@pytest.mark.parametrize("add_eos", [True, False])
def test_chatml_completion_ends_at_its_end_of_turn(add_eos, template):
    """The template's newline after <|im_end|> is not response, inside a generation block
    too; the EOS rule then applies: one EOS (counted) or none, never <|im_end|> twice."""
    chatml = _chatml(template)
    out, _ = tokenize_pairs(datasets.Dataset.from_list([_chat()]), chatml,
                            TokenizeConfig(add_eos=add_eos))
    ids = out[0]["chosen_ids"]
    assert chatml.decode(ids) == "kind cat" + ("<|im_end|>" if add_eos else "")
    assert ids.count(chatml.eos_token_id) == int(add_eos)


def test_an_assistant_message_holding_the_eos_text_is_refused(chatml):
    rec = _chat("kind<|im_end|> cat")
    with pytest.raises(ValueError, match="record 0, field 'chosen': an assistant message "
                                         "contains the EOS token '<\\|im_end\\|>'") as err:
        tokenize_pairs(datasets.Dataset.from_list([rec]), chatml, TokenizeConfig())
    assert "\n" not in str(err.value)


def test_keep_end_keeps_the_bos():
    """add_bos (plain text) or a template that renders BOS: the cut prompt still starts with
    it, then the prompt's last max_prompt_length − 1 tokens."""
    tok = load_tokenizer()
    long = "Write about" + " rivers" * 14
    cfg = TokenizeConfig(max_length=12, max_prompt_length=6, truncation="keep_end")
    for rec, c in (({"prompt": long, "chosen": " kind", "rejected": " rude"},
                    cfg.replace(add_bos=True)),
                   ({"prompt": [{"role": "user", "content": long}], "chosen": " kind",
                     "rejected": " rude"}, cfg)):
        out, report = tokenize_pairs(datasets.Dataset.from_list([rec]), tok, c)
        whole, _ = tokenize_pairs(datasets.Dataset.from_list([rec]), tok,
                                  c.replace(max_length=1000, max_prompt_length=999))
        prompt, full = out[0]["prompt_ids"], whole[0]["prompt_ids"]
        assert report.n_prompt_truncated == 1 and full[0] == tok.bos_token_id
        assert prompt == full[:1] + full[-5:]


def test_add_bos_without_a_bos_token_is_refused_for_plain_text(chatml):
    """Silently no BOS would be what add_bos=False gives; chat records get their
    template's, so they need none."""
    assert chatml.bos_token_id is None
    plain = {"prompt": "Write about cats:", "chosen": " kind cat", "rejected": " rude cat"}
    with pytest.raises(ValueError, match=r"^add_bos=True but the tokenizer has no bos_token"):
        tokenize_pairs(datasets.Dataset.from_list([plain]), chatml, TokenizeConfig(add_bos=True))
    out, _ = tokenize_pairs(datasets.Dataset.from_list([_chat()]), chatml,
                            TokenizeConfig(add_bos=True))
    assert out[0]["prompt_ids"][0] == chatml.convert_tokens_to_ids("<|im_start|>")


@pytest.mark.parametrize("field, value, problem", [
    ("tools", "[{not json", "not valid JSON"),
    ("tools", 5, "expected a list of tool schemas, got int"),
    ("chat_template_kwargs", "x", "expected a dict, got str")])
def test_malformed_template_options_name_the_record(chatml, field, value, problem):
    """A chat record's tools / chat_template_kwargs (rendered as TRL renders them) that
    cannot be: one line naming the record and the field."""
    rows = [{**_chat(), field: value}]
    with pytest.raises(ValueError, match=rf"^record 0, field '{field}': {problem}") as err:
        tokenize_pairs(datasets.Dataset.from_list(rows), chatml, TokenizeConfig())
    assert "\n" not in str(err.value)
