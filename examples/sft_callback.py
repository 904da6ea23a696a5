"""ScaLoRA (or ElaLoRA) in a job that already uses TRL's SFTTrainer: one callback, nothing else changes.

Runs on its embedded default in about a minute on a 2-core CPU, nothing downloaded: a small random-init
Llama with a byte-level tokenizer learns short sentences (``--steps`` SFT steps, LoRA added by TRL from
``peft_config``), checkpoints every 10 steps, and writes the merged model with ``trainer.save_model``.
With ``--zero-stage N`` it runs under DeepSpeed (a config with Trainer-filled "auto" values, built below;
pass your own JSON the usual way, ``SFTConfig(deepspeed=...)``) and must be started by the launcher::

    python examples/sft_callback.py [--steps 30] [--out runs/sft_callback] [--method scalora|elalora]
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 examples/sft_callback.py --zero-stage 3

Under ZeRO-3 ``trainer.save_model`` refuses (one rank cannot see the partitioned weights): call
``callback.save_merged_model(dir)`` on every rank instead, as this script does. ``--method elalora``: the
model is ``elastic_lora_model``'s (no ``peft_config``), the callback is ``ElaLoRACallback``, and
``save_model`` writes the exact LoRA adapter of the final rank pattern (ZeRO-3: ``callback.save_adapter``).
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
from ds_scalora.methods import elastic_lora_model
from ds_scalora.train.model import byte_tokenizer
from ds_scalora.zero import ElaLoRACallback, ScaLoRACallback

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

WORDS = "the a red blue cat dog sees finds big small old new".split()


def sentences(n: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"text": " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (8,), generator=g))} for _ in range(n)]


def base_model(tok):
    """The small random-init Llama both methods start from (seeded: the same weights every time)."""
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id))  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--out", default="runs/sft_callback")
    p.add_argument("--zero-stage", type=int, choices=[0, 1, 2, 3], default=None,
                   help="run under DeepSpeed at this ZeRO stage (start it with the deepspeed launcher)")
    p.add_argument("--method", choices=["scalora", "elalora"], default="scalora")
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
    model = base_model(tok)
    args = SFTConfig(output_dir=a.out, max_steps=a.steps, per_device_train_batch_size=8, learning_rate=1e-2,
                     logging_steps=5, save_steps=10, report_to=[], use_cpu=not torch.cuda.is_available(),
                     deepspeed=deepspeed, bf16=torch.cuda.is_available(), max_length=64, disable_tqdm=True, seed=0)  # fmt: skip
    data = Dataset.from_list(sentences(256))
    if a.method == "elalora":
        model = elastic_lora_model(model, TARGETS, init_rank=4, max_rank=8, alpha=8)  # the method's "peft_config"
        callback = ElaLoRACallback(init_warmup=5, final_warmup=5, interval=5)  # total_steps: the Trainer's max_steps
        trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok, callbacks=[callback])
    else:
        callback = ScaLoRACallback(ScaLoRAConfig(interval=10, warmup_steps=5))  # ScaLoRA-I; the library's default shrink
        trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok,
                             peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
                             callbacks=[callback])  # fmt: skip
    trainer.train()
    saved = os.path.join(a.out, "adapter" if a.method == "elalora" else "merged")
    zero3 = trainer.is_deepspeed_enabled and a.zero_stage == 3
    if zero3:  # every rank: the partitions are gathered
        callback.save_adapter(saved) if a.method == "elalora" else callback.save_merged_model(saved)
    else:
        trainer.save_model(saved)  # the callback makes this the merged model / the exact adapter
    if trainer.args.process_index == 0:
        tok.save_pretrained(saved)
        losses = [round(h["loss"], 3) for h in trainer.state.log_history if "loss" in h]
        result = {"losses": losses, "saved": saved}
        if a.method == "elalora":
            result["rank_pattern"] = callback.rank_pattern()
        else:
            result["refreshes"] = callback.scalora.totals["refreshes"]
        if deepspeed is None:  # (under ZeRO-3 a from_pretrained here would wait for the other ranks)
            if a.method == "elalora":
                from peft import PeftModel

                reloaded = PeftModel.from_pretrained(base_model(tok), saved)
            else:
                reloaded = AutoModelForCausalLM.from_pretrained(saved)
            result["reloaded_parameters"] = sum(q.numel() for q in reloaded.parameters())
        print(json.dumps(result))
    if deepspeed is not None:
        from ds_scalora.zero import end_distributed, exit_process

        end_distributed()
        exit_process(0)


if __name__ == "__main__":
    main()
