"""tisdpo.TISDPOLoss against the float64 reference path, in both layouts, for every preset.

Truth: the same module with impl="reference" on float64 inputs. Eager error: impl="reference"
at the test dtype. Actual: impl="torch" (and "triton" where a kernel exists and is cheap).
"""
import copy
import subprocess
import sys

import pytest
import torch

from loss_cases import (
    B, IGNORE, T, D, V, call_kwargs, check, inputs, make_case, module_magnitudes, run, three_way,
)
from markers import requires_cuda, requires_triton
from numerics import assert_oracle
from tisdpo import TISDPOLoss
from tisdpo_kernels import PRESETS, WeightParams, linear_logprobs
from tisdpo_kernels import reference as R

# ---------------------------------------------------------------------------- every preset

SEQ_PRESETS = [m for m in PRESETS if PRESETS[m].config.granularity == "seq"]


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("method", SEQ_PRESETS)
def test_preset_torch_fp32(method, layout):
    three_way(method, "torch", torch.float32, layout)


def test_cdpo_code_padded_torch_fp32():
    three_way("cdpo_code", "torch", torch.float32, "padded")


def test_cdpo_code_rejects_packed():
    case = make_case()
    with pytest.raises(ValueError, match="padded"):
        run("cdpo_code", "torch", case, torch.float32, "packed")


@pytest.mark.parametrize("method", ["dpo", "tisdpo", "tisdpo_paper", "tdpo2", "simpo", "ipo"])
def test_preset_torch_bf16(method):
    three_way(method, "torch", torch.bfloat16, "padded")


@pytest.mark.parametrize("method,layout", [("tisdpo", "packed"), ("tdpo1", "padded"),
                                           ("tisdpo_paper", "packed"), ("simpo", "padded")])
@requires_triton
def test_preset_triton(method, layout):
    three_way(method, "triton", torch.float32, layout)


@pytest.mark.parametrize("method", ["tisdpo", "tisdpo_paper", "simpo", "cdpo"])
def test_packed_equals_padded(method):
    """Packed (interleaved pairs, trailing padding) vs padded: same loss, grads, metrics."""
    three_way(method, "torch", torch.float32, "packed", truth_layout="padded")


# ---------------------------------------------------------------------------- paths agree

@pytest.mark.parametrize("method,layout", [
    ("dpo", "padded"), ("dpo", "packed"), ("tisdpo", "padded"), ("tisdpo", "packed"),
    ("ipo", "packed"), ("cdpo_code", "padded"),
])
def test_ref_logps_path_equals_ref_hidden_path(method, layout):
    case = make_case()
    with torch.no_grad():   # precomputed the way an offline pass would (fp32 torch backend)
        ref_logps = linear_logprobs(case["ref_hidden"].float(), case["ref_weight"].float(),
                                    case["labels"], impl="torch")
    truth = run(method, "reference", case, torch.float64, layout)
    ref = run(method, "reference", case, torch.float32, layout)
    ref_logps[case["labels"] == IGNORE] = float("nan")
    packed_lp = ref_logps.reshape(-1)[case["pack_index"]] if layout == "packed" else ref_logps
    actual = run(method, "torch", case, torch.float32, layout, reference="logps",
                 override={"ref_logps": packed_lp})
    check(actual, ref, truth, torch.float32, f"{method}/{layout} ref_logps",
          module_magnitudes(method, case, torch.float32))


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("method,weight_method", [
    ("tisdpo", None), ("tisdpo_paper", None), ("tisdpo_binary", None), ("cdpo", None),
    ("tisdpo_threshold_and_scale", None), ("dpo", "threshold"),
])
def test_onthefly_weights_equal_precomputed(method, weight_method, layout):
    """pos/neg log-probs → weights inside the loss == the same weights passed precomputed."""
    case = make_case()
    rule = weight_method or PRESETS[method].weight_method
    params = WeightParams(top_percent=60.0) if rule == "binary" else WeightParams()
    side = (torch.arange(2 * B) < B)[:, None].expand(2 * B, T)
    mask = case["labels"] != IGNORE
    def precomputed(dtype):  # the weights an offline pass would store, from dtype log-probs
        pos, neg = case["pos_logps"].to(dtype), case["neg_logps"].to(dtype)
        w = R.token_weights(pos, None if rule == "cdpo" else neg, side=side, method=rule,
                            params=params, mask=mask)
        return dict(case, weights=w)

    mkw = {"weight_method": weight_method, "weight_params": params}
    truth = run(method, "reference", precomputed(torch.float64), torch.float64, layout,
                weights="given", module_kw=mkw)
    ref = run(method, "reference", precomputed(torch.float32), torch.float32, layout,
              weights="given", module_kw=mkw)
    actual = run(method, "torch", case, torch.float32, layout, weights="onthefly", module_kw=mkw)
    check(actual, ref, truth, torch.float32, f"{method}/{rule}/{layout} on-the-fly weights",
          module_magnitudes(method, case, torch.float32, module_kw=mkw, weights="onthefly"))


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_precomputed_weights_used_as_given(layout):
    """weights= enters the loss unchanged: a weighted dpo equals the reference formula."""
    case = make_case()
    three_way("dpo", "torch", torch.float32, layout, case=case, weights="given")
    _, metrics, _ = run("dpo", "torch", case, torch.float32, layout, weights="given")
    m = case["labels"] != IGNORE
    w = case["weights"].float()
    for name, rows in (("weights/chosen", slice(0, B)), ("weights/rejected", slice(B, 2 * B))):
        want = torch.where(m[rows], w[rows], 0).sum() / m[rows].sum()
        truth = torch.where(m[rows], w[rows].double(), 0).sum() / m[rows].sum()
        assert_oracle(metrics[name], want, truth, dtype=torch.float32, name=name)


def test_unit_weights_tisdpo_equals_dpo():
    case = make_case()
    truth = run("dpo", "reference", case, torch.float64, "padded")
    ref = run("dpo", "reference", case, torch.float32, "padded")
    actual = run("tisdpo", "torch", case, torch.float32, "padded", weights=None)
    check(actual, ref, truth, torch.float32, "tisdpo unit weights vs dpo",
          module_magnitudes("dpo", case, torch.float32))


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("method", ["dpo", "tisdpo_paper"])
def test_softcap_and_normalizer_pass_through(method, layout):
    """softcap reaches both heads; normalizer (a global pair count) divides the pair sum."""
    three_way(method, "torch", torch.float32, layout, module_kw={"softcap": 4.0},
              loss_kw={"normalizer": 7})


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("method", ["tisdpo", "tdpo2", "simpo"])
def test_all_ignored_batch_zero_loss_and_grads(method, layout):
    case = make_case()
    case["labels"] = torch.full_like(case["labels"], IGNORE)
    loss, metrics, grads = run(method, "torch", case, torch.float32, layout)
    zero = torch.zeros((), dtype=torch.float64)
    assert_oracle(loss, zero, zero, dtype=torch.float32, name="loss")
    for k, g in grads.items():
        z = torch.zeros_like(g, dtype=torch.float64)
        assert_oracle(g, z, z, dtype=torch.float32, name=f"d{k}")
    for k, v in metrics.items():
        assert torch.isfinite(v), f"metric {k} is {v}"


# ---------------------------------------------------------------------------- API behaviour

def test_metrics_are_detached_scalars_with_trl_names():
    case = make_case()
    _, metrics, _ = run("tisdpo_token_level", "torch", case, torch.float32, "padded")
    trl = {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
           "logps/chosen", "logps/rejected"}
    assert trl | {"weights/chosen", "weights/rejected", "kl/chosen", "kl/rejected"} == \
        set(metrics)
    for k, v in metrics.items():
        assert v.dim() == 0 and not v.requires_grad, k


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_ipo_metrics_mean_what_trl_logs_under_trl_names(layout):
    """IPO's link sees per-token means, but TRL's DPOTrainer logs rewards/* and logps/* as
    token sums: under those names TISDPOLoss gives the sums (those of ipo_sum, the same
    quantities), and the means as rewards_per_token/* and logps_per_token/*."""
    case = make_case()
    _, ipo, _ = run("ipo", "torch", case, torch.float64, layout)
    _, ipo_sum, _ = run("ipo_sum", "torch", case, torch.float64, layout)
    _, truth, _ = run("ipo", "reference", case, torch.float64, layout)
    for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
              "logps/chosen", "logps/rejected"):
        assert torch.allclose(ipo[k], ipo_sum[k], rtol=1e-12, atol=0), k
        head, _, tail = k.partition("/")
        assert torch.allclose(ipo[f"{head}_per_token/{tail}"],
                              truth[f"{head}_per_token/{tail}"], rtol=1e-12, atol=0), k
    # the two conventions differ on this batch (the test could fail)
    assert not torch.allclose(ipo["logps/chosen"], ipo["logps_per_token/chosen"])


def test_reference_inputs_get_no_gradient():
    case = make_case()
    leaves, args = inputs(case, torch.float32, "padded")
    ref_hidden = args["ref_hidden"].requires_grad_(True)
    ref_weight = args["ref_weight"].requires_grad_(True)
    for method in ("dpo", "tdpo1"):
        loss, _ = TISDPOLoss(method, impl="torch")(
            leaves["weight"], leaves["hidden"], args["labels"], ref_hidden=ref_hidden,
            ref_weight=ref_weight)
        loss.backward()
    assert ref_hidden.grad is None and ref_weight.grad is None


def test_hyperparameters_map_to_the_config():
    assert TISDPOLoss("dpo", label_smoothing=0.2).config == \
        TISDPOLoss("conservative", epsilon=0.2).config
    assert TISDPOLoss("dpo").config.link == "sigmoid"
    c = TISDPOLoss("tdpo2", alpha=0.3).config
    assert (c.kl_chosen_coef, c.kl_rejected_coef, c.kl_stop_grad_chosen) == (0.3, -0.3, True)
    c = TISDPOLoss("tisdpo_token_level", alpha=0.3).config
    assert (c.kl_chosen_coef, c.kl_rejected_coef) == (-0.3, 0.3)
    assert TISDPOLoss("simpo", gamma_beta_ratio=0.5).config.margin == 0.5
    assert TISDPOLoss("simpo").config.beta == 2.0 and TISDPOLoss("tisdpo").config.beta == 0.1
    assert TISDPOLoss("robust", epsilon=0.25).config.epsilon == 0.25


@pytest.mark.parametrize("ctor,match", [
    ({"method": "tis-dpo"}, "unknown method 'tis-dpo'"),
    ({"beta": 0.0}, "beta must be > 0"),
    ({"beta": float("nan")}, "beta must be finite"),
    ({"epsilon": 0.5}, "epsilon must be < 0.5"),
    ({"label_smoothing": -0.1}, "label_smoothing must be >= 0"),
    ({"epsilon": 0.1, "label_smoothing": 0.1}, "not both"),
    ({"method": "ipo", "epsilon": 0.1}, "ipo link"),
    ({"alpha": 0.5}, "alpha=0.5"),
    ({"method": "tdpo2", "alpha": -1.0}, "alpha must be > 0"),
    ({"gamma_beta_ratio": 0.3}, "gamma_beta_ratio=0.3 applies to method 'simpo'"),
    ({"method": "simpo", "gamma_beta_ratio": -1.0}, "gamma_beta_ratio must be >= 0"),
    ({"weight_method": "softmax"}, "weight_method must be one of"),
    ({"method": "dpo", "weight_params": WeightParams()}, "weight_params given"),
    ({"weight_params": {"lower": 0}}, "weight_params must be a"),
    ({"softcap": -1.0}, "softcap must be > 0"),
    ({"impl": "cuda"}, "unknown impl='cuda'"),
])
def test_constructor_validation(ctor, match):
    with pytest.raises(ValueError, match=match):
        TISDPOLoss(**ctor)


def _call_error(method, **changes):
    case = make_case()
    leaves, args = inputs(case, torch.float32, "padded", nan_views=False)
    kw = call_kwargs(method, args)
    kw.update(changes)
    kw = {k: v for k, v in kw.items() if v is not None}
    return lambda: TISDPOLoss(method, impl="torch")(**kw)


@pytest.mark.parametrize("method,changes,match", [
    ("dpo", {"ref_hidden": None, "ref_weight": None}, "needs a reference"),
    ("tdpo1", {"ref_hidden": None, "ref_weight": None,
               "ref_logps": torch.zeros(2 * B, T)}, "needs ref_hidden"),
    ("dpo", {"ref_logps": torch.zeros(2 * B, T)}, "not both"),
    ("simpo", {"ref_logps": torch.zeros(2 * B, T)}, "reference-free"),
    ("dpo", {"ref_hidden": None}, "without ref_hidden"),
    ("dpo", {"pos_logps": torch.zeros(2 * B, T)}, "no weight rule"),
    ("tisdpo", {"neg_logps": None}, "needs both pos_logps and neg_logps"),
    ("tisdpo", {"weights": torch.ones(2 * B, T)}, "either weights or pos_logps"),
    ("dpo", {"weights": torch.ones(2 * B, T - 1)}, "weights shape"),
    ("dpo", {"hidden": torch.zeros(2 * B, T, D + 1)}, "hidden has D="),
    ("dpo", {"hidden": torch.zeros(2 * B, T, D, dtype=torch.bfloat16)},
     r"lm_head_weight.to\(hidden.dtype\)"),
    ("dpo", {"hidden": torch.zeros(5, T, D), "labels": torch.zeros(5, T, dtype=torch.long)},
     "2B rows"),
    ("dpo", {"labels": torch.zeros(2 * B, T - 1, dtype=torch.long)}, "labels shape"),
    ("dpo", {"labels": torch.full((2 * B, T), V)}, "lies outside"),
    ("dpo", {"seq_offsets": torch.tensor([0, 5])}, "needs both seq_offsets"),
    # the reference head's errors name it (or the policy tensor standing in for it)
    ("dpo", {"ref_hidden": torch.zeros(2 * B, T, D + 1)}, "^ref_hidden has D=32 but ref_weight"),
    ("dpo", {"ref_hidden": torch.zeros(2 * B, T, D + 1), "ref_weight": None},
     r"^ref_hidden has D=32 but lm_head_weight \(the default ref_weight\) has D=31"),
    ("tdpo1", {"ref_hidden": torch.zeros(2 * B, T + 1, D)}, r"^ref_hidden shape \(6, 12, 31\)"),
    ("dpo", {"ref_hidden": torch.zeros(2 * B, T, D, dtype=torch.float64)},
     "^ref_hidden dtype torch.float64 differs from ref_weight"),
    ("dpo", {"ref_weight": torch.zeros(V, D, dtype=torch.float64)},
     "^ref_hidden dtype torch.float32 differs from ref_weight dtype torch.float64"),
    ("dpo", {"ref_weight": torch.zeros(V + 1, D)}, "^ref_weight has V=124 vocabulary rows"),
    ("dpo", {"ref_bias": torch.zeros(V + 1)}, r"^ref_bias must be \[V\]=\[123\]"),
    ("dpo", {"lm_head_weight": torch.zeros(0, D)}, "^lm_head_weight has 0 vocabulary rows"),
    ("dpo", {"hidden": torch.zeros(2 * B, T, 0)}, "^hidden has 0 columns"),
    # a NaN score would become a finite weight
    ("tisdpo", {"pos_logps": torch.full((2 * B, T), float("nan"))},
     r"^pos_logps\[0, 2\] = nan is not finite"),
    ("tisdpo", {"neg_logps": torch.full((2 * B, T), float("inf"))},
     r"^neg_logps\[0, 2\] = inf is not finite"),
])
def test_call_validation(method, changes, match):
    with pytest.raises(ValueError, match=match) as err:
        _call_error(method, **changes)()
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("changes,match", [
    ({"pairs": torch.tensor([[0, 9]])}, r"pairs must hold sequence indices in \[0, S=6\)"),
    ({"pairs": torch.tensor([0, 1])}, r"pairs must be \[P, 2\]"),
    ({"pairs": torch.tensor([[0, 1], [2, 2]])}, r"pairs\[1\] = \[2, 2\] names one sequence"),
    ({"seq_offsets": torch.tensor([0, 9, 4, 30])}, "seq_offsets must be non-decreasing"),
    ({"seq_offsets": torch.tensor([0, 5, 999])}, "seq_offsets must be non-decreasing"),
    ({"seq_offsets": torch.tensor([0.0, 5.0])}, "seq_offsets must be an integer tensor"),
    ({"hidden": torch.zeros(2, 5, D)}, r"packed hidden must be \[N, D\] or \[1, N, D\]"),
])
def test_packed_validation(changes, match):
    case = make_case()
    _, args = inputs(case, torch.float32, "packed", nan_views=False)
    kw = call_kwargs("dpo", args)
    kw.update(changes)
    with pytest.raises(ValueError, match=match):
        TISDPOLoss("dpo", impl="torch")(**kw)


def test_packed_unpaired_sequence_counts_nowhere():
    """A sequence that no pair names (the 3 trailing tokens, one labelled) changes nothing."""
    case = make_case()
    truth = run("tisdpo_paper_no_eta", "reference", case, torch.float64, "packed")
    ref = run("tisdpo_paper_no_eta", "reference", case, torch.float32, "packed")
    extra = dict(case, seq_offsets=torch.cat([case["seq_offsets"],
                                              torch.tensor([len(case["pack_index"])],
                                                           dtype=torch.int32)]))
    actual = run("tisdpo_paper_no_eta", "torch", extra, torch.float32, "packed")
    check(actual, ref, truth, torch.float32, "unpaired sequence",
          module_magnitudes("tisdpo_paper_no_eta", case, torch.float32))


@pytest.mark.parametrize("impl,module_kw", [pytest.param(
    i, kw, id=f"{i}-{(kw or {}).get('strategy', 'recompute')}",
    marks=requires_triton if i == "triton" else ()) for kw in (None, {"strategy": "one_sweep"})
    for i in ("torch", "triton")])
@pytest.mark.parametrize("method,layout", [("tisdpo", "padded"), ("tisdpo_paper", "padded"),
                                           ("tisdpo_paper", "packed")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_nan_in_ignored_rows_changes_nothing(method, layout, impl, module_kw, dtype):
    """NaN hidden and ref_hidden states at ignored positions (padding, prompts) give bit for
    bit the loss, metrics and gradients of zeros there (bf16, D = 31: see ``kept_rows``)."""
    results = []
    for value in (0.0, float("nan")):
        case = make_case()
        for k in ("hidden", "ref_hidden"):
            case[k][case["labels"] == IGNORE] = value
        results.append(run(method, impl, case, dtype, layout, nan_views=False, module_kw=module_kw))
    (loss0, met0, g0), (loss1, met1, g1) = results
    assert torch.isfinite(loss1) and torch.equal(loss0, loss1)
    assert all(torch.equal(met0[k], met1[k]) for k in met0), met1
    for k in g0:
        assert torch.isfinite(g1[k]).all() and torch.equal(g0[k], g1[k]), f"d{k}"


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=requires_triton)])
def test_nan_ref_logps_at_a_kept_token_gives_nan(impl):
    """A NaN precomputed reference log-prob is never turned into a finite loss."""
    case = make_case()
    ref_logps = torch.zeros(2 * B, T)
    ref_logps[0, 4] = float("nan")
    loss, _, _ = run("dpo", impl, case, torch.float32, "padded", nan_views=False,
                     reference="logps", override={"ref_logps": ref_logps})
    assert torch.isnan(loss)


def test_packed_accepts_leading_batch_dim():
    case = make_case()
    truth = run("tisdpo", "reference", case, torch.float64, "packed")
    ref = run("tisdpo", "reference", case, torch.float32, "packed")
    leaves, args = inputs(case, torch.float32, "packed")
    kw = call_kwargs("tisdpo", args)
    for k in ("hidden", "labels", "ref_hidden", "pos_logps", "neg_logps"):
        kw[k] = kw[k].unsqueeze(0)
    loss, metrics = TISDPOLoss("tisdpo", impl="torch")(**kw)
    loss.backward()
    check((loss, metrics, {k: v.grad for k, v in leaves.items()}), ref, truth, torch.float32,
          "packed [1, N, D]", module_magnitudes("tisdpo", case, torch.float32))


@requires_cuda
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_no_host_sync_on_cuda(layout):
    """A whole step (KL, on-the-fly rank weights, metrics) runs under sync-debug 'error'."""
    _, args = inputs(make_case(), torch.float32, layout)
    kw = {k: v.detach().cuda().requires_grad_(v.requires_grad)
          for k, v in call_kwargs("tisdpo_token_level", args).items()}
    loss_fn = TISDPOLoss("tisdpo_token_level")
    loss_fn(**kw)[0].backward()                 # warm-up: compile kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss, metrics = loss_fn(**kw)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert set(metrics) >= {"rewards/margins", "kl/chosen", "weights/rejected"}


def test_import_is_light():
    code = ("import sys; from tisdpo import TISDPOLoss; "
            "bad = [m for m in ('transformers', 'datasets', 'triton') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_ref_weight_defaults_to_the_policy_head():
    """ref_hidden alone: the reference uses lm_head_weight and bias (a shared, frozen head)."""
    case = make_case()
    res = []
    for impl, dt, explicit in (("torch", torch.float32, False),
                               ("reference", torch.float32, True),
                               ("reference", torch.float64, True)):
        leaves, args = inputs(case, dt, "padded")
        kw = call_kwargs("tdpo1", args)
        kw["ref_weight"] = leaves["weight"].detach() if explicit else None
        if explicit:
            kw["ref_bias"] = leaves["bias"].detach()
        loss, metrics = TISDPOLoss("tdpo1", impl=impl)(**kw)
        loss.backward()
        res.append((loss, metrics, {k: v.grad for k, v in leaves.items()}))
    check(*res, torch.float32, "ref_weight default",
          module_magnitudes("tdpo1", case, torch.float32, ref_head="policy"))


# ---------------------------------------------------------------------------- a HF model

def tiny_llama(tied, seed):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    return transformers.LlamaForCausalLM(cfg).eval()


def hf_batch(npairs=2, length=14, vocab=128):
    """input_ids [2B, L] (chosen rows first, a shared prompt per pair, right padding),
    attention_mask, shifted labels [2B, L−1] and token weights [2B, L−1]."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (2 * npairs, length), generator=g)
    am = torch.ones_like(ids)
    labels = ids[:, 1:].clone()
    for b, (prompt, n_w, n_l) in enumerate([(3, 9, 6), (5, 4, 8)][:npairs]):
        ids[b + npairs, :prompt] = ids[b, :prompt]
        for row, n in ((b, n_w), (b + npairs, n_l)):
            am[row, prompt + n:] = 0
            labels[row, :prompt - 1] = IGNORE           # label t is token t+1
            labels[row, prompt - 1 + n:] = IGNORE
    weights = 0.7 + 0.6 * torch.rand(labels.shape, generator=g, dtype=torch.float64)
    return ids, am, labels, weights


def materialised_loss(model, ref_model, batch, method):
    """The eager path: full logits, log_softmax, the reference preference loss."""
    ids, am, labels, weights = batch
    cfg = PRESETS[method].config
    logits = model(input_ids=ids, attention_mask=am).logits[:, :-1]
    with torch.no_grad():
        ref_logits = ref_model(input_ids=ids, attention_mask=am).logits[:, :-1]
    sd = R.stat_dtype(logits.dtype)
    lp_all, lq_all = logits.to(sd).log_softmax(-1), ref_logits.to(sd).log_softmax(-1)
    mask = labels != IGNORE
    safe = labels.clamp(min=0).unsqueeze(-1)
    logp = lp_all.gather(-1, safe).squeeze(-1) * mask
    ref_logp = lq_all.gather(-1, safe).squeeze(-1) * mask
    kl = None
    if cfg.kl == "policy_ref":
        kl = (lp_all.exp() * (lp_all - lq_all)).sum(-1) * mask
    elif cfg.kl == "ref_policy":
        kl = (lq_all.exp() * (lq_all - lp_all)).sum(-1) * mask
    w = weights.to(sd) if PRESETS[method].weight_method else None
    return R.preference_loss(logp, ref_logp, w, config=cfg, mask=mask, kl=kl)[0]


def fused_loss(model, ref_model, batch, method):
    ids, am, labels, weights = batch
    hidden = model.model(input_ids=ids, attention_mask=am).last_hidden_state[:, :-1]
    with torch.no_grad():
        ref_hidden = ref_model.model(input_ids=ids, attention_mask=am).last_hidden_state[:, :-1]
    w = weights.float() if PRESETS[method].weight_method else None
    loss, _ = TISDPOLoss(method, impl="torch")(
        model.lm_head.weight, hidden, labels, ref_hidden=ref_hidden,
        ref_weight=ref_model.lm_head.weight, weights=w)
    return loss


@pytest.mark.parametrize("method,tied", [("tisdpo", True), ("tisdpo", False),
                                         ("tisdpo_paper", True), ("tdpo2", False)])
def test_one_sgd_step_on_a_tiny_llama(method, tied):
    """Fused (hidden states + lm_head weight) and materialised logits: same SGD update."""
    base, ref_base = tiny_llama(tied, 0), tiny_llama(tied, 1)
    assert (base.lm_head.weight is base.model.embed_tokens.weight) == tied
    batch = hf_batch()
    runs = {}
    for name, dtype, fn in (("truth", torch.float64, materialised_loss),
                            ("eager", torch.float32, materialised_loss),
                            ("fused", torch.float32, fused_loss)):
        model = copy.deepcopy(base).to(dtype)
        ref_model = copy.deepcopy(ref_base).to(dtype)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        loss = fn(model, ref_model, batch, method)
        loss.backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters()}
        opt.step()
        runs[name] = (loss.detach(), grads, dict(model.named_parameters()))
    (lt, gt, pt), (le, ge, pe), (lf, gf, pf) = runs["truth"], runs["eager"], runs["fused"]
    assert_oracle(lf, le, lt, dtype=torch.float32, name="loss")
    assert set(pf) == set(pt) and ("lm_head.weight" in pf) == (not tied)
    for k in pt:
        assert_oracle(gf[k], ge[k], gt[k], dtype=torch.float32, name=f"grad {k}")
        assert_oracle(pf[k], pe[k], pt[k], dtype=torch.float32, name=f"updated {k}")
