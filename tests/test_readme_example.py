"""The README's drop-in example (docs/dropin_example.py) runs, and its two losses agree."""
import pathlib
import runpy

import pytest
import torch

from numerics import assert_oracle

pytest.importorskip("transformers")
SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "docs" / "dropin_example.py"


def test_dropin_example_runs_as_a_script(capsys):
    runpy.run_path(str(SCRIPT), run_name="__main__")
    out = capsys.readouterr().out
    assert "TISDPOLoss" in out and "TIS-DPO loss with token weights" in out


def test_dropin_example_before_equals_after():
    """after (fp32, fused) vs before (materialised logits) in float64 and in fp32."""
    example = runpy.run_path(str(SCRIPT))
    truth, eager = example["main"](torch.float64), example["main"](torch.float32)
    assert_oracle(eager["after"][0], eager["before"][0], truth["before"][0],
                  dtype=torch.float32, name="loss")
    assert_oracle(eager["after"][1], eager["before"][1], truth["before"][1],
                  dtype=torch.float32, name="grad of the tied lm_head/embedding weight")
