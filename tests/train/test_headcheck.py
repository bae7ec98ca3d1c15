"""check_head: the load-time check that tisdpo's fused head reproduces a model's own
log-probabilities — its bound, its diagnoses, and its place in load_model (with the
``model.check_head`` switch and the attention-implementation fallback)."""
from __future__ import annotations

import logging

import pytest
import torch

from tisdpo.train import headcheck
from tisdpo.train.config import ModelConfig
from tisdpo.train.headcheck import check_head

from test_model_heads import LLAMA_LIKE, REFUSED, SUPPORTED, build  # noqa: E402

transformers = pytest.importorskip("transformers")
CPU = torch.device("cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_a_logit_scale_off_by_ten_percent_is_caught(dtype):
    # Cohere keeps the logit_scale it was built with; tisdpo reads the edited config: 1.1×
    model = build("cohere", {**SUPPORTED["cohere"][0], "logit_scale": 1.0}, dtype=dtype)
    assert check_head(model).max_error <= check_head(model).tolerance
    model.config.logit_scale = 1.1
    with pytest.raises(ValueError, match=r"^cohere: .*scaled by 1(\.0+\d*)? where tisdpo "
                                         r"applies 1\.1"):
        check_head(model)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_a_missing_softcap_is_caught_and_estimated(monkeypatch, dtype):
    model = build("gemma2", SUPPORTED["gemma2"][0], dtype=dtype)
    monkeypatch.setattr(headcheck, "SOFTCAP_ATTRS", ())
    with pytest.raises(ValueError, match=r"^gemma2: .*soft-capped at about 1\.[45]\d* .*"
                                         r"no soft cap.*final_logit_softcapping=1\.5"):
        check_head(model)


def test_an_unread_multiplier_is_named(monkeypatch):
    # what falcon_h1 gave before tisdpo read lm_head_multiplier
    model = build("falcon_h1", SUPPORTED["falcon_h1"][0])
    monkeypatch.setattr(headcheck, "SCALE_ATTRS", tuple(
        r for r in headcheck.SCALE_ATTRS if r[0] != "lm_head_multiplier"))
    with pytest.raises(ValueError, match=r"^falcon_h1: .*scaled by 0\.3 where tisdpo applies 1 "
                                         r"\(config: lm_head_multiplier=0\.3\)"):
        check_head(model)


def test_the_wrong_sign_convention_is_named(monkeypatch):
    # hyperclovax multiplies by logits_scaling where Granite divides
    model = build("hyperclovax", SUPPORTED["hyperclovax"][0])
    monkeypatch.setattr(headcheck, "SCALE_OVERRIDES", {})
    with pytest.raises(ValueError, match=r"scaled by 0\.3 where tisdpo applies 3\.333"):
        check_head(model)


def test_the_check_restores_the_mode_and_leaves_no_grad():
    model = build("llama", LLAMA_LIKE).train()
    check_head(model)
    assert model.training
    assert all(p.grad is None for p in model.parameters())


def test_the_bound_is_tight_in_fp32_and_follows_bf16_roundoff():
    u16, u32 = headcheck.UNIT_ROUNDOFF[torch.bfloat16], headcheck.UNIT_ROUNDOFF[torch.float32]
    assert headcheck._tolerance(u32, 10.0, 0.0) < 3e-4              # ~2.7e-5 × M
    assert headcheck._tolerance(u16, 10.0, 0.0) == pytest.approx(12 * u16 * 10 + 1e-6)
    # a 1.1× scale moves log p by ≥ 0.1·M at the extremes: above the bf16 bound
    assert headcheck._tolerance(u16, 10.0, 0.0) < 0.1 * 10.0


def _save(tmp_path, model_type, kwargs):
    model = build(model_type, kwargs)
    path = tmp_path / model_type
    model.save_pretrained(path)
    return str(path)


def test_load_model_runs_the_check_unless_disabled(tmp_path):
    from tisdpo.train.model import load_model

    path = _save(tmp_path, "roberta", REFUSED["roberta"][0])
    with pytest.raises(ValueError, match=r"^roberta: .*dense\+layer_norm"):
        load_model(ModelConfig(path=path), device=CPU)
    model = load_model(ModelConfig(path=path, check_head=False), device=CPU)
    assert type(model).__name__ == "RobertaForCausalLM"


def test_load_model_accepts_a_supported_variant_in_bf16(tmp_path):
    from tisdpo.train.model import load_model

    path = _save(tmp_path, "granite", SUPPORTED["granite"][0])
    for mode in ("autocast", "weights"):
        cfg = ModelConfig(path=path, dtype="bfloat16", bf16_mode=mode)
        model = load_model(cfg, device=CPU, trainable=True)
        assert model.training


def test_the_default_attention_falls_back_to_eager(tmp_path, caplog):
    from tisdpo.train.model import load_model

    path = _save(tmp_path, "gemma2", SUPPORTED["gemma2"][0])      # no sdpa support
    if getattr(transformers.Gemma2ForCausalLM, "_supports_sdpa", False):
        pytest.skip("this transformers' Gemma 2 supports sdpa")
    with caplog.at_level(logging.WARNING, logger="tisdpo"):
        model = load_model(ModelConfig(path=path), device=CPU, trainable=False)
    assert model.config._attn_implementation == "eager"
    assert "using eager" in caplog.text
    with pytest.raises(ValueError, match=r"^--model.attn_implementation flash_attention_2: "):
        load_model(ModelConfig(path=path, attn_implementation="flash_attention_2"), device=CPU)


def test_the_option_is_on_by_default_and_a_flag():
    from tisdpo.train.config import build_config

    assert ModelConfig().check_head is True and build_config().model.check_head is True
    assert build_config(overrides={"model.check_head": "false"}).model.check_head is False


def test_an_adapter_on_the_head_is_refused_and_a_trained_copy_is_not():
    """LoRA on lm_head: the fused head reads lm_head.weight, so the adapter (zero at the
    start, so the check passes) would silently never train. modules_to_save trains a copy."""
    peft = pytest.importorskip("peft")
    from tisdpo.train.headcheck import head

    def tiny():
        return transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(
            "llama", vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8))
    lora = peft.get_peft_model(tiny(), peft.LoraConfig(target_modules=["q_proj", "lm_head"], r=4))
    with pytest.raises(ValueError, match=r"^llama: lm_head is wrapped by a PEFT adapter layer "
                                         r"\(Linear\); .*modules_to_save") as err:
        head(lora)
    assert "\n" not in str(err.value)
    copy = peft.get_peft_model(tiny(), peft.LoraConfig(target_modules=["q_proj"], r=4,
                                                       modules_to_save=["lm_head"]))
    assert head(copy).weight.requires_grad


def test_load_model_refuses_a_router_loss_it_would_drop(tmp_path):
    """A mixture-of-experts config asking for its load-balancing loss in training: the
    objectives never add it, so training is refused (a frozen reference loads)."""
    from tisdpo.train.model import load_model

    moe = dict(LLAMA_LIKE, num_local_experts=4, num_experts_per_tok=2)
    path = _save(tmp_path / "on", "mixtral", dict(moe, output_router_logits=True,
                                                  router_aux_loss_coef=0.02))
    with pytest.raises(ValueError, match=r"sets output_router_logits with "
                                         r"router_aux_loss_coef=0.02") as err:
        load_model(ModelConfig(path=path), device=CPU)
    assert "\n" not in str(err.value)
    assert not load_model(ModelConfig(path=path), device=CPU, trainable=False).training
    off = _save(tmp_path / "off", "mixtral", dict(moe, output_router_logits=False))
    assert load_model(ModelConfig(path=off), device=CPU).training
    # JetMoE weights its loss by aux_loss_coef
    jet = _save(tmp_path / "jet", "jetmoe", dict(
        vocab_size=96, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, kv_channels=8, intermediate_size=64, num_local_experts=4,
        num_experts_per_tok=2, output_router_logits=True, aux_loss_coef=0.01))
    with pytest.raises(ValueError, match=r"sets output_router_logits with aux_loss_coef=0.01"):
        load_model(ModelConfig(path=jet), device=CPU)
    # DBRX by ffn_config.moe_loss_weight (its tiny config does not build here: checked alone)
    from tisdpo.train.model import _refuse_router_aux_loss

    dbrx = torch.nn.Module()
    dbrx.config = transformers.PretrainedConfig(output_router_logits=True,
                                                ffn_config={"moe_loss_weight": 0.05})
    with pytest.raises(ValueError, match=r"with ffn_config.moe_loss_weight=0.05"):
        _refuse_router_aux_loss(dbrx, "dbrx")
    dbrx.config.ffn_config = {"moe_loss_weight": 0.0}
    _refuse_router_aux_loss(dbrx, "dbrx")


def test_a_checkpoint_without_some_weights_is_refused(tmp_path):
    """A folder that lacks a weight the model has (a base model's checkpoint without its LM
    head): transformers would start it at random, unseeded, so that every load of the
    folder (policy, reference, each stage) differs. Refused, naming the folder and weight;
    a tied head is no missing weight."""
    from safetensors.torch import load_file, save_file

    from tisdpo.train.model import load_model

    path = _save(tmp_path / "untied", "llama", dict(LLAMA_LIKE, tie_word_embeddings=False))
    assert load_model(ModelConfig(path=path), device=CPU).training
    file = f"{path}/model.safetensors"
    weights = load_file(file)
    del weights["lm_head.weight"]
    save_file(weights, file, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"^model {path}: its checkpoint lacks "
                                         r"lm_head.weight, which the model has;") as err:
        load_model(ModelConfig(path=path), device=CPU, trainable=False)
    assert "\n" not in str(err.value)
    tied = _save(tmp_path / "tied", "llama", dict(LLAMA_LIKE, tie_word_embeddings=True))
    assert "lm_head.weight" not in load_file(f"{tied}/model.safetensors")
    load_model(ModelConfig(path=tied), device=CPU)
