"""`tisdpo inspect --data FILE`: bad records are named by file and line (also past --start),
score lists that do not match the tokens are one line, and a prompt's newlines stay on its
own rows of the PNG."""
import json

import pytest

from tisdpo import cli
from tisdpo.pipeline import heatmap
from tisdpo.train.config import RunConfig

REC = {"prompt": "Write about rivers:", "chosen": " kind river", "rejected": " rude",
       "chosen_weight": [1.2, 0.8], "rejected_weight": [0.5]}


def _inspect(tmp_path, records, *extra):
    path = tmp_path / "w.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return cli.main(["inspect", "--run_dir", str(tmp_path / "run"), "--data", str(path),
                     "--out", str(tmp_path / "out"), *extra]), str(path)


@pytest.mark.parametrize("bad,message", [
    ({"chosen_weight": [1.2, 0.8, 1.0]}, "field 'chosen_weight': 3 values for 2"),
    ({"chosen_score": [0.1]}, "field 'chosen_score': 1 values for 2 completion tokens"),
    ({"chosen_score": [0.1, None]}, "field 'chosen_score': value 1 is None, not a finite"),
    ({"chosen_score": 0.5}, "field 'chosen_score': expected a list of floats, got float"),
    ({"chosen_score": ["a", "b"]}, "field 'chosen_score'"),
])
def test_a_bad_record_is_named_by_file_and_line(tmp_path, capsys, bad, message):
    code, path = _inspect(tmp_path, [REC, {**REC, **bad}], "--start", "1")
    err = capsys.readouterr().err.strip()
    assert code == 1 and "\n" not in err
    assert f"--data {path} line 2 (record 1), {message}" in err


def test_scores_of_the_right_length_render(tmp_path, capsys):
    rec = {**REC, "chosen_score": [0.1, -0.2], "rejected_score": [0.3]}
    code, _ = _inspect(tmp_path, [rec])
    assert code == 0
    assert "c=-0.200" in (tmp_path / "out" / "inspect.html").read_text()


def test_a_multi_line_prompt_keeps_to_its_own_rows(tmp_path, monkeypatch):
    """HH-style prompts ("\\n\\nHuman: ..."): the PNG draws each text row once, so the
    prompt's newlines are shown as \\n and a long prompt wraps onto rows of its own."""
    drawn = []
    real = heatmap.render_png

    items = heatmap.load_pairs(RunConfig(), data=str(_write(tmp_path, {
        **REC, "prompt": "\n\nHuman: " + "Write about rivers. " * 8 + "\n\nAssistant:"})))
    from matplotlib.axes import Axes
    monkeypatch.setattr(Axes, "text", lambda self, x, y, s, *a, **k: drawn.append(s))
    real(items, str(tmp_path / "p.png"))
    assert not any("\n" in s for s in drawn)
    prompt_rows = [s for s in drawn if "Human" in s or "rivers." in s]
    assert len(prompt_rows) >= 2 and all(len(s) <= 110 for s in prompt_rows)


def _write(tmp_path, rec):
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps(rec) + "\n")
    return path
