"""check_packing: with data.packing, a model must keep packed sequences apart; recurrent and
hybrid layers carry state along the row, and some models cannot run packed rows at all."""
from __future__ import annotations

import pytest
import torch

from tisdpo.train import packcheck
from tisdpo.train.packcheck import check_packing

from test_model_heads import LLAMA_LIKE, SUPPORTED, build  # noqa: E402

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("model_type", ["llama", "gpt2", "gemma2"])
def test_attention_models_keep_packed_sequences_apart_bit_for_bit(model_type, dtype):
    model = build(model_type, SUPPORTED[model_type][0], dtype=dtype).train()
    assert check_packing(model) == 0.0
    assert model.training                                   # its mode is restored


@pytest.mark.parametrize("model_type", ["falcon_h1", "recurrent_gemma", "xlstm"])
def test_a_model_carrying_state_along_the_row_is_refused(model_type):
    model = build(model_type, SUPPORTED[model_type][0])
    with pytest.raises(ValueError, match=rf"^data.packing: {model_type} lets one packed sequence "
                                         r"change the next one's hidden states .*set "
                                         r"data.packing false$"):
        check_packing(model)


def test_attention_across_sequences_is_caught(monkeypatch):
    """No packed mask and positions running on along the row (transformers would build a
    packed mask from restarting positions): a causal mask over the whole row, so the second
    sequence sees the first."""
    model = build("llama", LLAMA_LIKE)
    monkeypatch.setattr(packcheck, "packed_attention_kwargs", lambda batch, model: {
        "position_ids": torch.arange(batch["input_ids"].shape[-1])[None]})
    with pytest.raises(ValueError, match=r"^data.packing: llama lets one packed sequence"):
        check_packing(model)


def test_a_model_that_cannot_run_packed_rows_is_named():
    model = build("bloom", dict(vocab_size=96, hidden_size=32, n_layer=1, n_head=4))
    with pytest.raises(ValueError, match=r"^data.packing: bloom cannot run packed rows \("):
        check_packing(model)


def test_stages_check_their_models_when_packing(tmp_path):
    from tisdpo.pipeline.context import Context, load_stage_model
    from tisdpo.train.config import build_config
    from tisdpo.train.synthetic import load_tokenizer

    tok = load_tokenizer()
    path = tmp_path / "recurrent"
    conf = {**SUPPORTED["recurrent_gemma"][0], "vocab_size": len(tok)}
    build("recurrent_gemma", conf).save_pretrained(path)
    for packing in (False, True):
        cfg = build_config(overrides={"data.packing": packing, "device": "cpu"})
        ctx = Context(cfg, torch.device("cpu"), tok)
        load_stage_model(ctx, str(path), trainable=False)    # the weights pass: padded
        if not packing:
            load_stage_model(ctx, str(path), trainable=True, packed=True)
            continue
        with pytest.raises(ValueError, match=r"^data.packing: recurrent_gemma lets one"):
            load_stage_model(ctx, str(path), trainable=True, packed=True)


def test_run_to_run_noise_is_not_taken_for_leakage(monkeypatch):
    """Kernels that are not deterministic (atomic adds on a GPU) make each run differ a
    little: what two runs of the same probe differ by is allowed, leakage beyond it is not."""
    real = packcheck._packed_hidden
    gen = torch.Generator().manual_seed(0)

    def noisy(*args):
        h = real(*args)
        return h + 1e-4 * h.abs().max() * torch.randn(h.shape, generator=gen)

    monkeypatch.setattr(packcheck, "_packed_hidden", noisy)
    assert 0 < check_packing(build("llama", LLAMA_LIKE))
    with pytest.raises(ValueError, match=r"^data.packing: falcon_h1 lets one packed sequence"):
        check_packing(build("falcon_h1", SUPPORTED["falcon_h1"][0]))
