"""The reference oracle against hand-computable cases and invariants."""
import math

import pytest
import torch

from tisdpo_kernels import reference as R
from tisdpo_kernels.config import PreferenceConfig, WeightParams, get_preset


def test_linear_logprobs_matches_log_softmax_and_ignores():
    h = torch.randn(5, 4, dtype=torch.float64)
    w = torch.randn(7, 4, dtype=torch.float64)
    y = torch.tensor([0, 6, -100, 3, 2])
    logp, lse = R.linear_logprobs(h, w, y, return_lse=True)
    full = torch.log_softmax(h @ w.T, -1)
    for i in (0, 1, 3, 4):
        assert logp[i].item() == pytest.approx(full[i, y[i]].item(), abs=1e-12)
    assert logp[2].item() == 0.0 and lse[2].item() == 0.0


def test_dpo_hand_computed():
    # one pair, two tokens each side; loss = −log σ(β((a1+a2) − (b1+b2)))
    lp = torch.tensor([[-1.0, -2.0], [-1.5, -0.5]], dtype=torch.float64)
    lr = torch.tensor([[-1.2, -2.1], [-1.0, -0.7]], dtype=torch.float64)
    mask = torch.ones(2, 2, dtype=torch.bool)
    loss, m = R.preference_loss(lp, lr, config=get_preset("dpo").config, mask=mask)
    h = (0.2 + 0.1) - (-0.5 + 0.2)
    assert loss.item() == pytest.approx(-math.log(1 / (1 + math.exp(-0.1 * h))), abs=1e-12)
    assert m["rewards/margins"].item() == pytest.approx(0.1 * h, abs=1e-12)


def test_all_ignored_gives_zero_loss():
    lp = torch.zeros(4, 3, dtype=torch.float64, requires_grad=True)
    loss, _ = R.preference_loss(lp, torch.zeros(4, 3, dtype=torch.float64),
                                config=PreferenceConfig(), mask=torch.zeros(4, 3, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and torch.all(lp.grad == 0)


def test_exp_clamp_ranges():
    c = torch.linspace(-5, 5, 11, dtype=torch.float64)
    w_c = R.token_weights(c, torch.zeros_like(c), side="chosen", method="exp_clamp")
    w_r = R.token_weights(c, torch.zeros_like(c), side="rejected", method="exp_clamp")
    assert w_c.min().item() == pytest.approx(math.exp(-0.5)) and w_c.max().item() == pytest.approx(math.exp(1.5))
    assert w_r.min().item() == pytest.approx(math.exp(-1.5)) and w_r.max().item() == pytest.approx(math.exp(0.5))


def test_weight_params_validation():
    with pytest.raises(ValueError, match="lower"):
        WeightParams(lower=2.0, upper=1.0)
    with pytest.raises(ValueError, match="beta"):
        PreferenceConfig(beta=0.0)
    with pytest.raises(ValueError, match="epsilon"):
        PreferenceConfig(epsilon=0.5)


def test_rank_and_binary_ignore_masked_tokens_in_packed_layout():
    # packed [N] with seq_ids AND mask: a masked-out token is outside its sequence, so it must
    # not take a rank (or move the binary threshold); it used to, giving [0, .7, .9, 1.1].
    lp, ln = torch.tensor([5.0, 1.0, 2.0, 3.0]), torch.zeros(4)
    ids, mask = torch.zeros(4, dtype=torch.long), torch.tensor([False, True, True, True])
    w = R.token_weights(lp, ln, side="chosen", method="rank_based", seq_ids=ids, mask=mask)
    assert w.tolist() == pytest.approx([0.0, 0.7, 1.0, 1.3])
    b = R.token_weights(lp, ln, side="chosen", method="binary", seq_ids=ids, mask=mask,
                        params=WeightParams(top_percent=34))
    assert b.tolist() == [0.0, 0.0, 1.0, 1.0]  # top ceil(3·0.34) = 2 of the 3 kept tokens
