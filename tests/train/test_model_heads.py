"""Each supported LM-head variant: tiny models built from configs (no download) whose fused
log-probabilities (hidden states → ``head`` → ``linear_logprobs``) equal the model's own
``logits.log_softmax(-1)``, and :func:`check_head` accepts them; the variants tisdpo cannot
reproduce are refused by it with the cause. See also tests/train/test_headcheck.py."""
from __future__ import annotations

import re

import pytest
import torch

from tisdpo.train.headcheck import check_head, head, hidden_states
from tisdpo_kernels import linear_logprobs

transformers = pytest.importorskip("transformers")

VOCAB = 96
LLAMA_LIKE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                  max_position_embeddings=64)
# model_type -> (config kwargs, what the variant is). Scales and caps are chosen so that the
# logits (|z| up to ~5 after the weights are scaled up below) feel them well above rounding.
SUPPORTED = {
    "llama": (LLAMA_LIKE, "plain hidden·Wᵀ"),
    "qwen2": (LLAMA_LIKE, "plain hidden·Wᵀ"),
    "gpt2": (dict(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=4, n_positions=64,
                  bos_token_id=0, eos_token_id=0), "tied head"),
    "phi": (LLAMA_LIKE, "head bias"),
    "gemma2": ({**LLAMA_LIKE, "final_logit_softcapping": 1.5}, "final_logit_softcapping"),
    "granite": ({**LLAMA_LIKE, "logits_scaling": 3.0}, "logits_scaling, divides"),
    "cohere": ({**LLAMA_LIKE, "logit_scale": 0.3, "eos_token_id": 0, "bos_token_id": 0},
               "logit_scale, multiplies"),
    "hyperclovax": ({**LLAMA_LIKE, "logits_scaling": 0.3}, "logits_scaling, multiplies"),
    "minicpm3": ({**{k: v for k, v in LLAMA_LIKE.items() if k != "head_dim"},
                  "num_key_value_heads": 4, "q_lora_rank": 16, "kv_lora_rank": 16,
                  "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 8,
                  "dim_model_base": 16}, "logits_scaling, divides the hidden states"),
    "falcon_h1": ({**LLAMA_LIKE, "mamba_d_ssm": 32, "mamba_n_heads": 4, "mamba_d_head": 8,
                   "mamba_d_state": 8, "mamba_n_groups": 1, "mamba_chunk_size": 8,
                   "lm_head_multiplier": 0.3}, "lm_head_multiplier"),
    "recurrent_gemma": ({**LLAMA_LIKE, "num_hidden_layers": 2, "lru_width": 32,
                         "attention_window_size": 8, "block_types": ["recurrent", "attention"],
                         "logits_soft_cap": 1.5}, "logits_soft_cap"),
    "xlstm": (dict(vocab_size=VOCAB, hidden_size=32, num_heads=4, num_blocks=1,
                   qk_dim_factor=1.0, chunk_size=8, output_logit_soft_cap=1.5),
              "output_logit_soft_cap"),
    "llama4_text": (LLAMA_LIKE, "body at .model under another base_model_prefix"),
}
# model_type -> (config kwargs, the cause check_head must name)
REFUSED = {
    "roberta": ({**LLAMA_LIKE, "is_decoder": True}, "dense+layer_norm"),
    "prophetnet": (dict(vocab_size=VOCAB, hidden_size=32, num_encoder_layers=1,
                        num_decoder_layers=1, num_encoder_attention_heads=4,
                        num_decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                        ngram=2), "no scale or soft cap"),
    "electra": ({**LLAMA_LIKE, "is_decoder": True, "embedding_size": 16}, "width 16"),
}


def build(model_type: str, kwargs: dict, *, dtype=torch.float32, seed: int = 0):
    """A tiny random model of ``model_type``, its 2-D weights scaled up so logits reach ~5."""
    try:
        conf = transformers.AutoConfig.for_model(model_type, **kwargs)
    except (ValueError, KeyError) as exc:
        pytest.skip(f"{model_type} is not in transformers {transformers.__version__}: {exc}")
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(conf)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4)
    return model.to(dtype).eval()


def fused_and_own(model, ids):
    with torch.no_grad():
        own = model(input_ids=ids, use_cache=False).logits.float().log_softmax(-1)
        h = hidden_states(model, {"input_ids": ids})
        spec = head(model)
        targets = torch.randint(0, own.shape[-1], ids.shape)
        fused = linear_logprobs(h, spec.weight, targets, bias=spec.bias, softcap=spec.softcap,
                                impl="torch")
    return fused, own.gather(-1, targets[..., None])[..., 0], spec


def _skip_broken(model_type, dtype):
    if model_type == "xlstm" and dtype == torch.bfloat16:
        pytest.skip("transformers' own xLSTM forward mixes fp32 and bf16 matmuls (fails in bf16)")


@pytest.mark.parametrize("model_type", sorted(SUPPORTED))
def test_fused_logprobs_equal_the_models_own_fp32(model_type):
    kwargs, _ = SUPPORTED[model_type]
    model = build(model_type, kwargs)
    fused, own, _ = fused_and_own(model, torch.randint(0, VOCAB, (2, 8)))
    # fp32, one shared decoder: only the head's summation order differs (|logit| ≤ ~8 here)
    torch.testing.assert_close(fused, own, rtol=0, atol=2e-5)
    result = check_head(model)
    assert result.max_error <= result.tolerance < 5e-4


@pytest.mark.parametrize("model_type", sorted(SUPPORTED))
def test_check_head_accepts_the_variant_in_bf16(model_type):
    _skip_broken(model_type, torch.bfloat16)
    kwargs, _ = SUPPORTED[model_type]
    result = check_head(build(model_type, kwargs, dtype=torch.bfloat16))
    assert result.max_error <= result.tolerance


def test_the_head_spec_reads_each_convention():
    cases = {"granite": 1 / 3.0, "cohere": 0.3, "hyperclovax": 0.3, "minicpm3": 16 / 32}
    for model_type, scale in cases.items():
        spec = head(build(model_type, SUPPORTED[model_type][0]))
        assert spec.scale == pytest.approx(scale) and spec.softcap is None, model_type
    for model_type in ("gemma2", "recurrent_gemma", "xlstm"):
        spec = head(build(model_type, SUPPORTED[model_type][0]))
        assert spec.softcap == 1.5 and spec.scale == 1.0, model_type


@pytest.mark.parametrize("model_type", ["granite", "minicpm3", "gemma2"])
def test_gradients_reach_the_real_parameters(model_type):
    # the scale is folded into the hidden states: d/dθ of the fused log-probs equals d/dθ of
    # the model's own log_softmax, for the head weight and the decoder alike
    model = build(model_type, SUPPORTED[model_type][0])
    ids = torch.randint(0, VOCAB, (2, 8))
    targets = torch.randint(0, VOCAB, (2, 8))
    params = [model.get_output_embeddings().weight, model.get_input_embeddings().weight]
    own = model(input_ids=ids, use_cache=False).logits.float().log_softmax(-1)
    g_own = torch.autograd.grad(own.gather(-1, targets[..., None]).sum(), params)
    spec = head(model)
    fused = linear_logprobs(hidden_states(model, {"input_ids": ids}), spec.weight, targets,
                            bias=spec.bias, softcap=spec.softcap, impl="torch")
    g_fused = torch.autograd.grad(fused.sum(), params)
    for a, b in zip(g_fused, g_own):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("model_type", sorted(REFUSED))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_check_head_refuses_heads_it_cannot_reproduce(model_type, dtype):
    kwargs, cause = REFUSED[model_type]
    with pytest.raises(ValueError, match=f"^{model_type}: .*{re.escape(cause)}") as info:
        check_head(build(model_type, kwargs, dtype=dtype))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("model_type", ["gemma2", "cohere", "granite", "phi"])
def test_cdpo_scores_combine_each_models_own_logits(model_type):
    """The weights stage's cDPO scores log_softmax((1+b)·z⁺ − b·z⁻)[y] from two models'
    own logits: a soft cap bends each model's logits before they are combined (the scores
    once dropped it), a scale or a bias before too."""
    import types

    from tisdpo.pipeline.weights import _cdpo_logscores
    from tisdpo.train.config import ModelConfig

    kwargs = dict(SUPPORTED[model_type][0])
    if model_type == "gemma2":
        kwargs["final_logit_softcapping"] = 4.0      # felt by logits of ~5, not flattened
    pos, neg = build(model_type, kwargs, seed=0), build(model_type, kwargs, seed=1)
    b = 1.0
    ctx = types.SimpleNamespace(device=torch.device("cpu"), cfg=types.SimpleNamespace(
        model=ModelConfig(), weights=types.SimpleNamespace(cdpo_b=b)))
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(5))
    labels = torch.full_like(ids, -100)
    labels[:, 4:-1] = ids[:, 5:]
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    got = torch.cat(_cdpo_logscores(ctx, {"positive": pos, "negative": neg}, batch, batch,
                                    "torch"))
    with torch.no_grad():
        z = (1 + b) * pos(input_ids=ids).logits.double() - b * neg(input_ids=ids).logits.double()
    kept = labels != -100
    want = z.log_softmax(-1)[kept].gather(-1, labels[kept][:, None])[:, 0]
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-4)
