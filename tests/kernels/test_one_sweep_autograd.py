"""The one-sweep head under autograd's less common uses: float16 (refused: its gradients are
formed before a loss scale reaches them), torch.utils.checkpoint around the loss, and double
backward (refused rather than silently first order)."""
import pytest
import torch

from loss_cases import call_kwargs, inputs, make_case, run
from tisdpo import TISDPOLoss

ONE = {"strategy": "one_sweep"}


@pytest.fixture(autouse=True)
def _small_chunks(monkeypatch):
    monkeypatch.setenv("TISDPO_CHUNK_TOKENS", "4")


def test_fp16_refuses_one_sweep_and_auto_recomputes():
    """float16 gradients made in the forward would be rounded before a GradScaler's loss
    scale reaches them: an explicit one_sweep says so in one line; without a gradient (or
    with strategy auto) the loss is the recompute path's."""
    case = make_case()
    with pytest.raises(ValueError, match="one_sweep' with float16.*GradScaler") as err:
        run("dpo", "torch", case, torch.float16, "padded", module_kw=ONE)
    assert "\n" not in str(err.value)
    auto = run("dpo", "torch", case, torch.float16, "padded")
    recompute = run("dpo", "torch", case, torch.float16, "padded",
                    module_kw={"strategy": "recompute"})
    assert torch.equal(auto[0], recompute[0])
    leaves, args = inputs(case, torch.float16, "padded")
    with torch.no_grad():
        loss, _ = TISDPOLoss("dpo", impl="torch", **ONE)(**call_kwargs("dpo", args))
    assert torch.equal(loss, recompute[0].detach())


def test_checkpointed_loss_sweeps_once_each_way(monkeypatch):
    """Inside torch.utils.checkpoint (non-reentrant) the sweep runs once in the forward and
    once more when the backward recomputes the region, whatever the chunk count: the per-pair
    scalars' own small graph must not answer to checkpoint's saved-tensor hooks (which would
    rerun the whole region mid-forward, once per chunk step). Gradients are unchanged."""
    from torch.utils.checkpoint import checkpoint

    import tisdpo_kernels._one_sweep as OS
    calls = []
    real = OS.linear_preference_loss_fwd
    monkeypatch.setattr(OS, "linear_preference_loss_fwd",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    case = make_case()
    grads = []
    for wrapped in (False, True):
        leaves, args = inputs(case, torch.float32, "padded")
        fn = TISDPOLoss("tisdpo_paper", impl="torch", **ONE)
        kw = call_kwargs("tisdpo_paper", args)
        calls.clear()
        loss, _ = checkpoint(lambda **k: fn(**k), use_reentrant=False, **kw) if wrapped \
            else fn(**kw)
        assert len(calls) == 1
        loss.backward()
        assert len(calls) == 1 + wrapped
        grads.append([leaves[k].grad for k in ("hidden", "weight", "bias")])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


@pytest.mark.parametrize("strategy", ["one_sweep", "recompute"])
def test_double_backward_is_refused_not_silently_first_order(strategy):
    """A gradient penalty (create_graph=True) through the fused backward would treat its
    gradients as constants and lose the second-order term: it raises instead."""
    leaves, args = inputs(make_case(), torch.float32, "padded")
    loss, _ = TISDPOLoss("tisdpo_paper", impl="torch", strategy=strategy)(
        **call_kwargs("tisdpo_paper", args))
    with pytest.raises(RuntimeError, match="first order.*create_graph"):
        torch.autograd.grad(loss, leaves["weight"], create_graph=True)
