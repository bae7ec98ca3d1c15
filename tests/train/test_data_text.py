"""Record files whose text Python's json reads but datasets' reader (pyarrow) refuses: each
is one line naming the file and the line, never a traceback from the reader."""
import json

import pytest

from tisdpo.train import records as R
from tisdpo.train.data import load_preference_dataset
from tisdpo.train.synthetic import make_synthetic_task


@pytest.fixture(scope="module")
def lines():
    train, _, _ = make_synthetic_task(4, 0, seed=3)
    return [json.dumps({k: r[k] for k in ("prompt", "chosen", "rejected")}) for r in train]


def _load_error(path) -> str:
    with pytest.raises(ValueError) as info:
        load_preference_dataset(path)
    msg = str(info.value)
    assert "\n" not in msg, msg
    return msg


@pytest.mark.parametrize("odd", ["\x0c", "\x0b", "\x1c", "\xa0", "\u2028"])
def test_a_blank_line_of_non_json_whitespace_is_named(tmp_path, lines, odd):
    path = tmp_path / "odd.jsonl"
    path.write_text("\n".join(lines[:2] + [odd] + lines[2:]) + "\n", encoding="utf-8")
    assert _load_error(path) == (f"{path} line 3: a blank line holding {odd!r}, which JSON "
                                 f"does not take as whitespace (only space, tab, CR, LF)")


def test_json_whitespace_lines_still_load(tmp_path, lines):
    path = tmp_path / "gaps.jsonl"
    path.write_text("\n".join(lines[:2] + [" \t\r"] + lines[2:]) + "\n", encoding="utf-8")
    assert len(load_preference_dataset(path)) == len(lines)


@pytest.mark.parametrize("layout", ["jsonl", "json", "one_object"])
def test_a_lone_surrogate_escape_is_named(tmp_path, lines, layout):
    recs = [json.loads(x) for x in lines]
    recs[1]["chosen"] = " fine \ud83d\ude00"         # a pair is text: it loads
    recs[-1]["chosen"] = " bad \ud800 here"           # json.dumps writes it as \ud800
    text = {"jsonl": "\n".join(json.dumps(r) for r in recs) + "\n",
            "json": json.dumps(recs, indent=1),
            "one_object": json.dumps(recs[-1], indent=1)}[layout]
    path = tmp_path / f"s.{'jsonl' if layout == 'jsonl' else 'json'}"
    path.write_text(text, encoding="ascii")
    at = {"jsonl": f"line {len(recs)} (record {len(recs) - 1})",
          "json": f"record {len(recs) - 1}", "one_object": "record 0"}[layout]
    assert _load_error(path) == (f"{path} {at}: a \\u escape of a lone UTF-16 surrogate "
                                 f"(\\ud800-\\udfff without its pair), which is not text")
    if layout == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in recs[:-1]) + "\n", encoding="ascii")
        assert load_preference_dataset(path)[1]["chosen"] == " fine \U0001F600"


def test_what_the_reader_refuses_is_one_line_naming_the_files():
    """Whatever else datasets' reader refuses reaches the user as its own reason."""
    from datasets.exceptions import DatasetGenerationError

    def refuse():
        try:
            raise RuntimeError("JSON parse error: Invalid value.\nin row 7")
        except RuntimeError as err:
            raise DatasetGenerationError("An error occurred while generating the dataset") \
                from err
    with pytest.raises(ValueError) as info:
        R._read(refuse, ["a.jsonl", "b.jsonl"])
    assert str(info.value) == ("a.jsonl, b.jsonl: datasets could not read it (JSON parse "
                               "error: Invalid value.)")
