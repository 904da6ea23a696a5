"""ScaLoRA in a job that already uses TRL's SFTTrainer: one callback, nothing else changes.

Runs on its embedded default in about a minute on a 2-core CPU, nothing downloaded: a small random-init
Llama with a byte-level tokenizer learns short sentences (``--steps`` SFT steps, LoRA added by TRL from
``peft_config``), checkpoints every 10 steps, and writes the merged model with ``trainer.save_model``.
With ``--zero-stage N`` it runs under DeepSpeed (a config with Trainer-filled "auto" values, built below;
pass your own JSON the usual way, ``SFTConfig(deepspeed=...)``) and must be started by the launcher::

    python examples/sft_callback.py [--steps 30] [--out runs/sft_callback]
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 examples/sft_callback.py --zero-stage 3

Under ZeRO-3 ``trainer.save_model`` refuses (one rank cannot see the partitioned weights): call
``callback.save_merged_model(dir)`` on every rank instead, as this script does.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from trl import SFTConfig, SFTTrainer

from ds_scalora import ScaLoRAConfig
from ds_scalora.train.model import byte_tokenizer
from ds_scalora.zero import ScaLoRACallback

WORDS = "the a red blue cat dog sees finds big small old new".split()


def sentences(n: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"text": " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (8,), generator=g))} for _ in range(n)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--out", default="runs/sft_callback")
    p.add_argument("--zero-stage", type=int, choices=[0, 1, 2, 3], default=None,
                   help="run under DeepSpeed at this ZeRO stage (start it with the deepspeed launcher)")
    p.add_argument("--local_rank", type=int, default=-1)
    a = p.parse_args()
    deepspeed = None
    if a.zero_stage is not None:
        from ds_scalora.zero import disable_cpu_shm_comm

        disable_cpu_shm_comm()  # CPU runs only: skip DeepSpeed's shared-memory op build
        gpu = torch.cuda.is_available()
        deepspeed = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                     "gradient_clipping": "auto", "zero_optimization": {"stage": a.zero_stage},
                     "bf16": {"enabled": "auto" if gpu else False}}  # fmt: skip
    tok = byte_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id))  # fmt: skip
    args = SFTConfig(output_dir=a.out, max_steps=a.steps, per_device_train_batch_size=8, learning_rate=1e-2,
                     logging_steps=5, save_steps=10, report_to=[], use_cpu=not torch.cuda.is_available(),
                     deepspeed=deepspeed, bf16=torch.cuda.is_available(), max_length=64, disable_tqdm=True, seed=0)  # fmt: skip
    callback = ScaLoRACallback(ScaLoRAConfig(interval=10, warmup_steps=5))  # ScaLoRA-I; the library's default shrink
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(sentences(256)), processing_class=tok,
                         peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
                         callbacks=[callback])  # fmt: skip
    trainer.train()
    merged = os.path.join(a.out, "merged")
    zero3 = callback.deepspeed and callback.scalora.access.kind == "zero3"
    if zero3:
        callback.save_merged_model(merged)  # every rank
    else:
        trainer.save_model(merged)  # the callback makes this the merged model, not a bare adapter
    if trainer.args.process_index == 0:
        tok.save_pretrained(merged)
        losses = [round(h["loss"], 3) for h in trainer.state.log_history if "loss" in h]
        result = {"losses": losses, "refreshes": callback.scalora.totals["refreshes"], "merged_model": merged}
        if deepspeed is None:  # (under ZeRO-3 a from_pretrained here would wait for the other ranks)
            reloaded = AutoModelForCausalLM.from_pretrained(merged)
            result["reloaded_parameters"] = sum(q.numel() for q in reloaded.parameters())
        print(json.dumps(result))
    if deepspeed is not None:
        from ds_scalora.zero import end_distributed, exit_process

        end_distributed()
        exit_process(0)


if __name__ == "__main__":
    main()
