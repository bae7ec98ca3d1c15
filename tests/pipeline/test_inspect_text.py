"""`tisdpo inspect` draws each token's own text: a SentencePiece piece keeps its space, a
multi-byte character split over byte-level tokens is shown whole, '$' stays literal in the
PNG; a run folder is read with its own config.yaml, errors name the weights folder's true
record, and the score is labelled by weights/meta.json's score_kind."""
import json
import re
from dataclasses import replace

import datasets
import pytest
from matplotlib.axes import Axes
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from tisdpo import cli
from tisdpo.pipeline import heatmap
from tisdpo.train.config import RunConfig
from tisdpo.train.synthetic import load_tokenizer

PROMPT = "Write about rivers:"
TOKENIZE = {"max_length": 64, "max_prompt_length": 32, "truncation": "keep_start",
            "add_eos": False, "add_bos": False, "skip_invalid": False}


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory):
    """A SentencePiece-style (Metaspace) tokenizer, as Llama-2 / Mistral / Gemma have."""
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tk.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    corpus = ["Write about rivers: kind river flows gently", "rude words here",
              "the river is kind and wide"] * 20
    tk.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False))
    path = tmp_path_factory.mktemp("sp_tok")
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>", pad_token="</s>").save_pretrained(path)
    return str(path)


def _weighted(tok, chosen, rejected=" rude", prompt=PROMPT, **extra):
    rec = {"prompt": prompt, "chosen": chosen, "rejected": rejected, **extra}
    for side in ("chosen", "rejected"):
        n = len(tok(rec[side], add_special_tokens=False)["input_ids"])
        rec[f"{side}_weight"] = [1.0 + 0.1 * k for k in range(n)]
    return rec


def _weights_dir(run, records, **meta):
    """A run folder's weights/eval and meta.json, as the weights stage writes them."""
    datasets.Dataset.from_list(records).save_to_disk(str(run / "weights" / "eval"))
    (run / "weights" / "meta.json").write_text(json.dumps({"tokenize": TOKENIZE, **meta}))


def _rows(out):
    """The token texts of the HTML, per chosen/rejected row."""
    html = (out / "inspect.html").read_text(encoding="utf-8")
    return [re.findall(r"<span class='tok'[^>]*>([^<]*)</span>", row)
            for row in re.findall(r"<span class='side'>\w+</span>(.*)</div>", html)]


def test_sentencepiece_tokens_keep_their_spaces(tmp_path, sp_dir):
    tok = load_tokenizer_dir(sp_dir)
    rec = _weighted(tok, "kind river flows gently", "rude words here")
    cfg = RunConfig()
    cfg = replace(cfg, model=replace(cfg.model, tokenizer=sp_dir))
    items = heatmap.load_pairs(cfg, data=str(_jsonl(tmp_path, [rec])))
    chosen = items[0]["chosen"]
    assert "".join(t["text"] for t in chosen) == " kind river flows gently"
    assert [t["weight"] for t in chosen] == pytest.approx(rec["chosen_weight"])
    assert "".join(t["text"] for t in items[0]["rejected"]) == " rude words here"


@pytest.mark.filterwarnings("ignore:Glyph")          # the PNG font lacks CJK and emoji
def test_multi_byte_characters_are_shown_whole(tmp_path):
    text = " café naïve 日本 😀"
    rec = _weighted(load_tokenizer(), text)
    code = cli.main(["inspect", "--run_dir", str(tmp_path / "run"), "--data",
                     str(_jsonl(tmp_path, [rec])), "--out", str(tmp_path / "out")])
    assert code == 0
    chosen = _rows(tmp_path / "out")[0]
    assert len(chosen) == len(rec["chosen_weight"])       # one box per token, own weight
    assert "".join(chosen) == text and "\ufffd" not in "".join(chosen)


@pytest.mark.parametrize("prompt", ["It costs $5 and $10 total:", "Price: $x^$ and $\\frac$"])
def test_dollar_signs_are_literal_in_the_png(tmp_path, monkeypatch, prompt):
    texts = []
    real = Axes.text
    monkeypatch.setattr(Axes, "text", lambda self, *a, **k: texts.append(real(self, *a, **k))
                        or texts[-1])
    rec = _weighted(load_tokenizer(), " kind", prompt=prompt)
    code = cli.main(["inspect", "--run_dir", str(tmp_path / "run"), "--data",
                     str(_jsonl(tmp_path, [rec])), "--out", str(tmp_path / "out")])
    assert code == 0 and (tmp_path / "out" / "inspect.png").stat().st_size > 0
    assert texts and not any(t.get_parse_math() for t in texts)
    assert any(prompt in t.get_text() for t in texts)


def test_inspect_reads_the_runs_config(tmp_path, sp_dir, capsys):
    """--run_dir alone: the run's config.yaml names its tokenizer (the weights were made with
    it); explicit flags still win."""
    run = tmp_path / "run"
    rec = _weighted(load_tokenizer_dir(sp_dir), "kind river flows gently", "rude words here")
    _weights_dir(run, [rec], score_kind="c_t")
    (run / "config.yaml").write_text(f"run_dir: {tmp_path / 'elsewhere'}\n"
                                     f"model: {{tokenizer: {sp_dir}}}\n")
    assert cli.main(["inspect", "--run_dir", str(run)]) == 0, capsys.readouterr().err
    assert "".join(_rows(run / "inspect")[0]) == " kind river flows gently"   # --run_dir won
    # another --config given: its built-in tokenizer, which the weights do not fit
    (tmp_path / "plain.yaml").write_text("log: {progress: false}\n")
    assert cli.main(["inspect", "--run_dir", str(run), "--config",
                     str(tmp_path / "plain.yaml")]) == 1
    assert "record 0, field 'chosen_weight'" in capsys.readouterr().err


def test_weights_folder_errors_name_the_folder_and_record(tmp_path, capsys):
    tok = load_tokenizer()
    records = [_weighted(tok, f" kind river {k}") for k in range(7)]
    records[5]["chosen_weight"] = records[5]["chosen_weight"] + [1.0]
    run = tmp_path / "run"
    _weights_dir(run, records, score_kind="c_t")
    assert cli.main(["inspect", "--run_dir", str(run), "--start", "5", "--pairs", "1"]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert f"{run / 'weights' / 'eval'} record 5, field 'chosen_weight'" in err


def test_a_cdpo_score_is_labelled_as_cdpo(tmp_path):
    tok = load_tokenizer()
    rec = _weighted(tok, " kind river")
    rec["chosen_score"] = [-0.5] * len(rec["chosen_weight"])
    rec["rejected_score"] = [-0.25] * len(rec["rejected_weight"])
    run = tmp_path / "run"
    _weights_dir(run, [rec], score_kind="cdpo_log_score")
    assert cli.main(["inspect", "--run_dir", str(run)]) == 0
    html = (run / "inspect" / "inspect.html").read_text(encoding="utf-8")
    assert "cDPO's log-score" in html and "s=-0.500" in html
    assert "c=" not in html and "log &pi;<sup>+</sup>" not in html


def load_tokenizer_dir(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _jsonl(tmp_path, records):
    path = tmp_path / "w.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_byte_fallback_pieces_join_to_the_text():
    """SentencePiece with byte fallback (Llama-2, Mistral, Gemma): a character outside the
    vocabulary is several <0xHH> tokens, and the decoder turns a whole run of them into
    U+FFFD while one is incomplete. Each character is shown once, by the token completing
    it, also where the decoded window restarts inside a long run."""
    tk = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"),
                                          normalizers.Replace(" ", "\u2581")])
    tk.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                    decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tk.train_from_iterator(["hello world this is a test", "naive cafe ok"] * 20,
                           trainers.BpeTrainer(vocab_size=300, show_progress=False,
                                               special_tokens=["<unk>", "<s>", "</s>"] +
                                               [f"<0x{i:02X}>" for i in range(256)]))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>")

    def dec(ids):
        return tok.decode(ids, clean_up_tokenization_spaces=False)
    ctx = tok.encode("Q: 日本", add_special_tokens=False)
    for text in ("ab€𝄞cd", "€€€€€€", "xxx" + "€𝄞" * 4 + " ok", "naïve café 😀"):
        ids = tok.encode(text, add_special_tokens=False) + [tok.eos_token_id]
        got = heatmap._token_texts(tok, ids, ctx)
        assert "".join(got) == dec(ctx + ids)[len(dec(ctx)):], (text, got)
        assert not any("\ufffd" in g for g in got), (text, got)
    # truncation cut the last character: 日 shown once, the cut one's two bytes as U+FFFD
    # (the decoder turns the whole run, 日 too, into U+FFFD)
    ids = tok.encode("ok 日本", add_special_tokens=False)[:-1]
    assert "".join(heatmap._token_texts(tok, ids, ctx)) == " ok 日\ufffd\ufffd"
