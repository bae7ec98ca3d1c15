"""The demo's report when a standard error is nan or 0: no '± nan', strict JSON, and no
negative verdict from a difference that was not tested."""
import json
from types import SimpleNamespace

from tisdpo.pipeline.demo_report import format_table, verdict

NAN = float("nan")


def _res(rows):
    return {"train_pairs": 10, "eval_pairs": 1, "policy_steps": 3, "wall_s": 1.0,
            "weight_method": "rank_based", "note": "n",
            "auc": {f"{s}/{side}/{k}": NAN for s in ("train", "eval")
                    for side in ("chosen", "rejected") for k in ("score", "word_score", "weight")},
            "rows": rows}


ROWS = [{"method": "reference (SFT)", "accuracy": None, "reward": 0.25, "reward_se": NAN},
        {"method": "DPO", "accuracy": 1.0, "accuracy_se": NAN, "reward": -0.25,
         "reward_se": NAN}]


def test_a_nan_standard_error_is_left_out_of_the_table():
    table = format_table(_res(ROWS))
    assert "nan" not in table
    assert "| reference (SFT) | - | +0.250 | - |" in table
    assert "| DPO | 1.000 | -0.250 | - |" in table


def test_results_json_is_strict_with_nan_as_null(tmp_path):
    from tisdpo.pipeline.demo import write_results

    ctx = SimpleNamespace(path=lambda name: str(tmp_path / name))
    write_results(ctx, _res(ROWS), "table")
    text = (tmp_path / "demo_results.json").read_text()
    assert "NaN" not in text
    res = json.loads(text, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
    assert res["rows"][1]["reward_se"] is None and res["auc"]["train/chosen/score"] is None
    assert (tmp_path / "demo_results.md").read_text() == "table\n"


def _rows(t_acc, t_rew, se):
    return {"DPO": {"accuracy_per_seed": [0.5], "reward_per_seed": [0.0], **se},
            "TIS-DPO": {"accuracy_per_seed": [t_acc], "reward_per_seed": [t_rew], **se}}


def test_untested_differences_are_undecided_not_a_loss():
    """SE 0 (every pair agreed) or not available: the verdict said 'did NOT beat DPO beyond
    noise'; it says the comparison is undecided for those metrics."""
    items = {"TIS-DPO": {"accuracy": [1.0] * 4, "reward": [0.5] * 2},
             "DPO": {"accuracy": [0.0] * 4, "reward": [0.0] * 2}}
    note = verdict(_rows(1.0, 0.5, {"accuracy_se": 0.0, "reward_se": 0.0}), 1, items)
    assert "did NOT beat" not in note and "SE 0: untested" in note
    assert "Undecided on task reward and held-out accuracy" in note
    note = verdict(_rows(0.6, 0.1, {"accuracy_se": NAN, "reward_se": NAN}), 1)
    assert "did NOT beat" not in note and "Undecided on task reward and held-out accuracy" \
        in note
    # one tested within noise, one untested (every pair agreed): each said as it is
    agree = {"TIS-DPO": {"accuracy": [1.0, 0.0, 1.0, 0.0]},
             "DPO": {"accuracy": [1.0, 0.0, 1.0, 0.0]}}
    noisy = {"TIS-DPO": {"reward": [0.2, -0.1, 0.1, -0.16], **agree["TIS-DPO"]},
             "DPO": {"reward": [0.0] * 4, **agree["DPO"]}}
    note = verdict(_rows(0.5, 0.01, {}), 1, noisy)
    assert "did NOT beat DPO beyond noise on task reward" in note
    assert "Undecided on held-out accuracy" in note
    # a tested win stays a win, the untested metric is undecided beside it
    clear = {"TIS-DPO": {"reward": [0.9, 0.91, 0.89, 0.9], **agree["TIS-DPO"]},
             "DPO": {"reward": [0.0] * 4, **agree["DPO"]}}
    note = verdict(_rows(0.5, 0.9, {}), 1, clear)
    assert "TIS-DPO beat DPO on task reward" in note and "Undecided on held-out accuracy" in note
