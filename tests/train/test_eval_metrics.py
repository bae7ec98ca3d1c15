"""Evaluation metrics that compare across methods: the unweighted DPO implicit-reward
accuracy, likelihood displacement, and the collapse warning."""
import logging
import math

import pytest
import torch

from trainer_cases import CPU, MCFG
from trainer_cases import model as _model
from trainer_cases import records as _records
from trainer_cases import trainer as _trainer
from tisdpo.loss import TISDPOLoss
from tisdpo.train.collate import PackedPairCollator, PaddedPairCollator
from tisdpo.train.objectives import (
    PreferenceObjective, comparable_metrics, displacement_warning,
)

NAN = float("nan")
# two pairs; rows: chosen 0, chosen 1, rejected 0, rejected 1; -100: prompt / padding
LABELS = torch.tensor([[-100, 5, 6], [-100, 7, -100], [-100, 8, 9], [10, 11, 12]])
LOGP = torch.tensor([[NAN, -1.0, -2.0], [NAN, -1.0, NAN], [NAN, -2.0, -2.0], [-1.0, -1.0, -1.0]])
REF = torch.tensor([[NAN, -1.5, -1.5], [NAN, -3.0, NAN], [NAN, -1.0, -1.0], [-1.0, -1.0, -4.0]])


def test_unweighted_accuracy_and_displacement_by_hand():
    m = comparable_metrics(LOGP, REF, LABELS, beta=0.1)
    # log-ratio sums: chosen (0, 2), rejected (-2, 3); rewards 0.1x: pair 0 wins, pair 1 loses
    assert float(m["rewards/accuracies_unweighted"]) == 0.5
    # per-token means: chosen (0, 2) -> 1; rejected (-1, 1) -> 0
    assert float(m["logps/chosen_delta"]) == 1.0
    assert float(m["logps/rejected_delta"]) == 0.0


def test_ties_are_not_wins_and_beta_does_not_change_accuracy():
    ref = LOGP.clone()                   # every log-ratio 0: both rewards 0, a tie
    m = comparable_metrics(LOGP, ref, LABELS, beta=0.1)
    assert float(m["rewards/accuracies_unweighted"]) == 0.0
    for beta in (0.01, 2.0):
        assert float(comparable_metrics(LOGP, REF, LABELS, beta=beta)[
            "rewards/accuracies_unweighted"]) == 0.5


def test_packed_layout_gives_the_same_metrics():
    order = (0, 2, 1, 3)                  # c0, r0, c1, r1 laid out one after another
    labels = torch.cat([LABELS[r] for r in order] + [torch.tensor([1, 2])])   # 2 stray tokens
    logp = torch.cat([LOGP[r] for r in order] + [torch.tensor([-9.0, -9.0])])
    ref = torch.cat([REF[r] for r in order] + [torch.tensor([0.0, 0.0])])
    offsets = torch.tensor([0, 3, 6, 9, 12])
    pairs = torch.tensor([[0, 1], [2, 3]])
    m = comparable_metrics(logp, ref, labels, beta=0.1, seq_offsets=offsets, pairs=pairs)
    ref_m = comparable_metrics(LOGP, REF, LABELS, beta=0.1)
    assert {k: float(v) for k, v in m.items()} == {k: float(v) for k, v in ref_m.items()}


def _objective(method, *, weights):
    return PreferenceObjective(TISDPOLoss(method=method, impl="torch"), model_cfg=MCFG,
                               device=CPU, use_weights=weights)


def _hand(model, batch, beta):
    """The same metrics from the model's full logits and the batch's ref_logps."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch.get("position_ids")).logits
    lab = batch["labels"]
    logp = torch.log_softmax(logits.double(), -1).gather(-1, lab.clamp(min=0)[..., None])[..., 0]
    mask = lab != -100
    delta = torch.where(mask, logp - batch["ref_logps"].double(), 0.0)
    b = lab.shape[0] // 2
    sums, n = delta.sum(1), mask.sum(1)
    acc = (beta * sums[:b] > beta * sums[b:]).double().mean()
    return float(acc), float((sums[:b] / n[:b]).mean()), float((sums[b:] / n[b:]).mean())


def test_weighted_and_unweighted_methods_report_the_same_unweighted_accuracy():
    model = _model(seed=3).eval()
    batch = PaddedPairCollator(0)(_records(12, seed=5))
    with torch.no_grad():
        _, tis = _objective("tisdpo", weights=True)(model, batch, normalizer=12.0)
        _, dpo = _objective("dpo", weights=False)(model, batch, normalizer=12.0)
        _, simpo = _objective("simpo", weights=False)(model, batch, normalizer=12.0)
    keys = ("rewards/accuracies_unweighted", "logps/chosen_delta", "logps/rejected_delta")
    for k in keys:
        assert float(tis[k]) == float(dpo[k]) == float(simpo[k]), k
    acc, dc, dr = _hand(model, batch, 0.1)
    assert float(dpo["rewards/accuracies_unweighted"]) == acc
    assert math.isclose(float(dpo["logps/chosen_delta"]), dc, rel_tol=1e-5, abs_tol=1e-5)
    assert math.isclose(float(dpo["logps/rejected_delta"]), dr, rel_tol=1e-5, abs_tol=1e-5)
    # the weighted method's own accuracy is another quantity (its weights differ per side)
    assert "rewards/accuracies" in tis
    # the packed layout agrees
    packed = PackedPairCollator(0)(_records(12, seed=5))
    with torch.no_grad():
        _, tis_p = _objective("tisdpo", weights=True)(model, packed, normalizer=12.0)
    assert float(tis_p["rewards/accuracies_unweighted"]) == acc
    assert math.isclose(float(tis_p["logps/chosen_delta"]), dc, rel_tol=1e-4, abs_tol=1e-4)


def test_only_evaluation_pays_for_them_and_no_reference_means_none():
    model = _model(seed=3)
    batch = PaddedPairCollator(0)(_records(4, seed=1))
    _, train_metrics = _objective("dpo", weights=False)(model, batch, normalizer=4.0)
    assert "rewards/accuracies_unweighted" not in train_metrics
    no_ref = PaddedPairCollator(0)(_records(4, seed=1, ref=False))
    with torch.no_grad():
        _, m = _objective("simpo", weights=False)(model, no_ref, normalizer=4.0)
    assert "rewards/accuracies_unweighted" not in m and "logps/chosen_delta" not in m
    # a reference model stands in for stored log-probs
    obj = PreferenceObjective(TISDPOLoss(method="simpo", impl="torch"), model_cfg=MCFG,
                              device=CPU, ref_model=_model(seed=3))
    with torch.no_grad():
        _, m = obj(model, no_ref, normalizer=4.0)
    assert float(m["logps/chosen_delta"]) == 0.0 == float(m["logps/rejected_delta"])
    assert float(m["rewards/accuracies_unweighted"]) == 0.0         # all ties


def test_trainer_evaluate_reports_them(tmp_path):
    data = _records(10, seed=2)
    t = _trainer(_model(seed=1), _objective("tisdpo", weights=True), data, tmp_path,
                 max_steps=1)
    t.eval_data = data
    out = t.evaluate()
    for k in ("eval/rewards/accuracies", "eval/rewards/accuracies_unweighted",
              "eval/logps/chosen_delta", "eval/logps/rejected_delta"):
        assert k in out and math.isfinite(out[k])


@pytest.mark.parametrize("chosen,rejected,warned", [(-0.8, -2.0, True), (-0.8, 0.1, False),
                                                    (-0.2, -3.0, False)])
def test_collapse_warning(caplog, chosen, rejected, warned):
    metrics = {"eval/logps/chosen_delta": chosen, "eval/logps/rejected_delta": rejected}
    with caplog.at_level(logging.WARNING, logger="tisdpo"):
        msg = displacement_warning(metrics, "policies/x")
    assert (msg is not None) == warned
    hits = [r for r in caplog.records if "likelihood displacement" in r.getMessage()]
    assert len(hits) == int(warned)
    if warned:
        assert "policies/x" in msg and f"{chosen:+.3f}" in msg and hits[0].levelname == "WARNING"
    assert displacement_warning({}, "x") is None


def test_an_appended_eos_is_left_out_of_the_comparable_metrics():
    """A preset that counts EOS and one that does not see the same text tokens: with the
    EOS id given, the metrics of a batch whose responses end in EOS equal those of the same
    batch with the EOS labels ignored, so methods of both kinds are compared alike."""
    model = _model(seed=3).eval()
    batch = PaddedPairCollator(0)(_records(12, seed=5))
    eos = 7
    last = (batch["labels"] != -100).cumsum(1).argmax(1)          # each row's last response token
    with_eos = dict(batch, labels=batch["labels"].clone())
    with_eos["labels"][torch.arange(len(last)), last] = eos
    without = dict(batch, labels=with_eos["labels"].masked_fill(with_eos["labels"] == eos, -100))
    keys = ("rewards/accuracies_unweighted", "logps/chosen_delta", "logps/rejected_delta")
    obj = PreferenceObjective(TISDPOLoss(method="dpo", impl="torch"), model_cfg=MCFG, device=CPU,
                              eos_token_id=eos)
    with torch.no_grad():
        _, got = obj(model, with_eos, normalizer=12.0)
        _, want = _objective("dpo", weights=False)(model, without, normalizer=12.0)
        _, counted = _objective("dpo", weights=False)(model, with_eos, normalizer=12.0)
    assert all(torch.equal(got[k], want[k]) for k in keys)
    assert any(not torch.equal(counted[k], want[k]) for k in keys)     # the case bites
