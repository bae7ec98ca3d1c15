"""Dropout off everywhere in a model tisdpo trains: not only ``nn.Dropout`` modules but
every rate an architecture reads under its own name, from its modules or from its config at
forward time; a saved model keeps its config's own rates."""
from __future__ import annotations

import json

import pytest
import torch

from tisdpo.train.model import disable_dropout, save_model

transformers = pytest.importorskip("transformers")

SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
# model_type -> (config kwargs, the rates it reads under its own names)
ARCHS = {
    "gpt_bigcode": (dict(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32),
                    dict(attn_pdrop=0.5, resid_pdrop=0.5, embd_pdrop=0.5)),
    "starcoder2": (SMALL, dict(residual_dropout=0.5, embedding_dropout=0.5,
                               attention_dropout=0.5)),
    "falcon": (dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4),
               dict(hidden_dropout=0.5, attention_dropout=0.5)),
    "persimmon": (SMALL, dict(attention_dropout=0.5, hidden_dropout=0.5)),
    "opt": (dict(vocab_size=64, hidden_size=32, ffn_dim=48, num_hidden_layers=4,
                 num_attention_heads=4, word_embed_proj_dim=32, max_position_embeddings=32),
            dict(layerdrop=0.5, dropout=0.5, attention_dropout=0.5)),
    "xglm": (dict(vocab_size=64, d_model=32, ffn_dim=48, num_layers=2, attention_heads=4,
                  max_position_embeddings=32),
             dict(activation_dropout=0.5, dropout=0.5, layerdrop=0.5)),
}


def _build(model_type):
    kwargs, rates = ARCHS[model_type]
    try:
        conf = transformers.AutoConfig.for_model(model_type, **kwargs, **rates)
    except (ValueError, KeyError) as exc:
        pytest.skip(f"{model_type} is not in transformers {transformers.__version__}: {exc}")
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(conf), rates


@pytest.mark.parametrize("model_type", list(ARCHS))
def test_training_mode_forward_is_the_eval_forward(model_type, tmp_path):
    model, rates = _build(model_type)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model.eval()
        want = model(input_ids=ids).logits
        model.train()
        torch.manual_seed(2)
        assert not torch.equal(model(input_ids=ids).logits, want)     # dropout is on
        disable_dropout(model)
        for seed in (3, 4):
            torch.manual_seed(seed)
            assert torch.equal(model(input_ids=ids).logits, want)
    save_model(model, str(tmp_path))
    saved = json.loads((tmp_path / "config.json").read_text())
    assert {k: saved[k] for k in rates} == rates                 # the model's own config
    assert all(getattr(model.config, k) == 0.0 for k in rates)   # still off in training


def test_models_sharing_a_config_each_save_its_own_rates(tmp_path):
    conf = transformers.AutoConfig.for_model("llama", vocab_size=64, hidden_size=32,
                                             intermediate_size=48, num_hidden_layers=1,
                                             num_attention_heads=4, attention_dropout=0.3)
    first, second = (transformers.AutoModelForCausalLM.from_config(conf) for _ in range(2))
    for model in (first, second):
        disable_dropout(model)
    assert conf.attention_dropout == 0.0
    for k, model in enumerate((second, first, second)):
        save_model(model, str(tmp_path / str(k)))
        assert json.loads((tmp_path / str(k) / "config.json").read_text())[
            "attention_dropout"] == 0.3
    assert conf.attention_dropout == 0.0
    conf.attention_dropout = 0.1                     # a user's own change survives a save
    save_model(first, str(tmp_path / "again"))
    assert conf.attention_dropout == 0.1
