"""The README's drop-in example: TISDPOLoss in place of materialised logits + a DPO loss.

Runs on a CPU in seconds, offline (a tiny Llama built from a config, random tokens):

    python docs/dropin_example.py
"""
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from tisdpo import TISDPOLoss


def tiny_llama(seed, dtype=torch.float32):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         tie_word_embeddings=True)
    return LlamaForCausalLM(config).to(dtype)


def toy_batch(pairs=2, length=16, vocab=128):
    """input_ids [2B, L] with the chosen rows first, then the rejected rows (same prompt per
    pair, right padding); labels [2B, L−1] already shifted, −100 on prompt and padding."""
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, vocab, (2 * pairs, length), generator=g)
    attention_mask = torch.ones_like(input_ids)
    labels = input_ids[:, 1:].clone()
    for b in range(pairs):
        prompt = 3 + b
        input_ids[pairs + b, :prompt] = input_ids[b, :prompt]
        for row, n in ((b, 10 - b), (pairs + b, 6 + 2 * b)):
            attention_mask[row, prompt + n:] = 0
            labels[row, :prompt - 1] = -100                    # labels[t] is token t + 1
            labels[row, prompt - 1 + n:] = -100
    return input_ids, attention_mask, labels


# --- before: logits [2B, T, V] materialised, then a TRL-style sigmoid DPO loss -------------
def dpo_before(model, ref_model, input_ids, attention_mask, labels, beta=0.1):
    def sequence_logps(logits):
        logp = logits.log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None])
        return (logp.squeeze(-1) * (labels != -100)).sum(-1)

    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
    with torch.no_grad():
        ref_logits = ref_model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
    ratio = sequence_logps(logits) - sequence_logps(ref_logits)
    chosen, rejected = ratio.chunk(2)
    return -F.logsigmoid(beta * (chosen - rejected)).mean()


# --- after: hidden states + the LM-head weight; the logits never exist ----------------------
def dpo_after(model, ref_model, input_ids, attention_mask, labels, method="dpo", **inputs):
    hidden = model.model(input_ids=input_ids, attention_mask=attention_mask)
    with torch.no_grad():
        ref_hidden = ref_model.model(input_ids=input_ids, attention_mask=attention_mask)
    loss_fn = TISDPOLoss(method=method, beta=0.1)
    return loss_fn(model.lm_head.weight,                           # tied to embed_tokens here
                   hidden.last_hidden_state[:, :-1], labels,
                   ref_hidden=ref_hidden.last_hidden_state[:, :-1],
                   ref_weight=ref_model.lm_head.weight, **inputs)


def main(dtype=torch.float32):
    """Both losses and the gradient each gives the shared embedding / LM-head weight."""
    batch = toy_batch()
    out = {}
    for name in ("before", "after"):
        model, ref_model = tiny_llama(0, dtype), tiny_llama(1, dtype)
        if name == "before":
            loss = dpo_before(model, ref_model, *batch)
        else:
            loss, out["metrics"] = dpo_after(model, ref_model, *batch)
        loss.backward()
        out[name] = (loss.detach(), model.lm_head.weight.grad)
    return out


if __name__ == "__main__":
    out = main()
    print(f"DPO loss, materialised logits: {out['before'][0].item():.6f}")
    print(f"DPO loss, TISDPOLoss:          {out['after'][0].item():.6f}")
    print({k: round(v.item(), 4) for k, v in out["metrics"].items()})

    # TIS-DPO: the same call plus per-token weights (here random, as an offline pass stores)
    model, ref_model = tiny_llama(0), tiny_llama(1)
    input_ids, attention_mask, labels = toy_batch()
    weights = 0.7 + 0.6 * torch.rand(labels.shape)
    loss, metrics = dpo_after(model, ref_model, input_ids, attention_mask, labels,
                              method="tisdpo", weights=weights)
    loss.backward()
    print(f"TIS-DPO loss with token weights: {loss.item():.6f}")
