"""Ask a run's final model a question, loaded the way anyone else would load it.

    python examples/ask_model.py runs/demo/model "Rewrite the date 1987-11-03 as DD/MM/YYYY. Answer with the date only."

``AutoModelForCausalLM.from_pretrained`` on ``<output_dir>/model`` (a merged model, or a PEFT adapter when
``peft`` is installed), the tokenizer saved beside it, its chat template, greedy decoding.
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def ask(model_dir: str, question: str, max_new_tokens: int = 16) -> str:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)  # fmt: skip
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)  # fmt: skip
    return tokenizer.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir")
    p.add_argument("question")
    p.add_argument("--max-new-tokens", type=int, default=16)
    a = p.parse_args()
    print(ask(a.model_dir, a.question, a.max_new_tokens))


if __name__ == "__main__":
    main()
