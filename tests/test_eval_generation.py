"""Exact-match evaluation generates its answers in left-padded batches (``loop.greedy_answers``): the
answers must be the ones one-prompt-at-a-time greedy generation gives (no padding, stops at EOS).

Reference: the same function on one prompt at a time (no padding token anywhere). A random tiny Llama
with the byte tokenizer; prompts of different lengths so that padding matters; the EOS token is set to
a token the model does generate, so that some answers end early while the batch keeps going."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ds_scalora.train.loop import greedy_answers
from ds_scalora.train.model import byte_tokenizer


def test_batched_answers_equal_one_at_a_time():
    tok = byte_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=64)).eval()  # fmt: skip
    prompts = [tok.encode(text) for text in ("Code of bakido?", "Hi", "Code of zunefa? please", "x y z")]
    # make EOS a token that the model emits mid-answer for the first prompt
    model.generation_config.eos_token_id = None
    first = model.generate(torch.tensor([prompts[0]]), max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    model.generation_config.eos_token_id = int(first[0, len(prompts[0]) + 2])
    single = [greedy_answers(model, tok, [p], 6)[0] for p in prompts]
    batched = greedy_answers(model, tok, prompts, 6)
    assert batched == single
    eos, model.generation_config.eos_token_id = model.generation_config.eos_token_id, None
    uncut = greedy_answers(model, tok, prompts[:1], 6)[0]
    model.generation_config.eos_token_id = eos
    assert len({len(p) for p in prompts}) > 1  # padding happens
    assert len(single[0]) < len(uncut) and uncut.startswith(single[0])  # the first answer ended at EOS
