"""TRL's SFTTrainer with ``ScaLoRACallback`` (and DeepSpeed), for tests/distributed/test_trainer_callback.py.

    deepspeed --num_gpus 2 tests/distributed/sft_worker.py --run-dir DIR --out F.pt [--stage 2|3] [--resume]
                                                            [--merged DIR] [--method scalora|elalora]

A tiny random-init Llama with the byte tokenizer; TRL wraps it with PEFT LoRA (``peft_config``) and
tokenizes a text dataset itself (``--method elalora``: the model is ``elastic_lora_model``'s, with
``ElaLoRACallback``; ``--merged`` then receives its exact LoRA adapter, and the base is saved in
``DIR/base``). Saves a checkpoint every 3 steps. With ``--merged``: after training,
``trainer.save_model(DIR)`` (ZeRO-2: the callback's guard writes the merged model; ZeRO-3: it refuses,
and every rank then calls ``ScaLoRACallback.save_merged_model(DIR)``). Rank 0 writes {"losses",
"frozen" (the full frozen weights), "totals", "logits" (the engine's, on a fixed batch, eval mode),
"ids" (that batch), "refusal" (the ZeRO-3 error message or None)}.
"""

from __future__ import annotations

import argparse
import os

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def rows(n: int = 64) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    words = ["alpha", "beta", "gamma", "delta", "kappa", "sigma", "omega", "zeta"]
    return [{"text": " ".join(words[int(i)] for i in torch.randint(0, len(words), (6,), generator=g))} for _ in range(n)]


def main():
    from ds_scalora.deepspeed_import import import_deepspeed

    deepspeed = import_deepspeed()  # the product's own first import (without mlflow)
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import SFTConfig, SFTTrainer

    from ds_scalora.train.model import byte_tokenizer
    from ds_scalora.zero import ScaLoRACallback, disable_cpu_shm_comm

    p = argparse.ArgumentParser()
    p.add_argument("--run-dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--stage", type=int, default=2)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--merged", default=None)
    p.add_argument("--method", choices=["scalora", "elalora"], default="scalora")
    p.add_argument("--local_rank", type=int, default=-1)
    a = p.parse_args()
    ds_config = {
        "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
        "zero_optimization": {"stage": a.stage, "reduce_bucket_size": 1000, "allgather_bucket_size": 1000,
                              "stage3_param_persistence_threshold": 0},
        "bf16": {"enabled": False},
    }  # fmt: skip
    disable_cpu_shm_comm()  # before the config, which initialises DeepSpeed's process group
    args = SFTConfig(
        output_dir=a.run_dir, per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=a.steps,
        learning_rate=1e-2, max_grad_norm=1.0, save_steps=3, logging_steps=1, report_to=[], deepspeed=ds_config,
        use_cpu=True, lr_scheduler_type="linear", warmup_steps=0, seed=0, data_seed=0, disable_tqdm=True,
        max_length=48, packing=False, dataset_text_field="text", bf16=False,
    )  # fmt: skip
    tok = byte_tokenizer()
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                        tie_word_embeddings=False, pad_token_id=tok.pad_token_id,
                                        eos_token_id=tok.eos_token_id))  # fmt: skip
    if a.method == "elalora":  # the elastic model is the PEFT model; the callback reads its ranks
        from ds_scalora.methods import elastic_lora_model
        from ds_scalora.zero import ElaLoRACallback

        if int(os.environ.get("RANK", "0")) == 0:
            base.save_pretrained(os.path.join(a.run_dir, "base"))  # for the test's stock PEFT reload
            tok.save_pretrained(os.path.join(a.run_dir, "base"))
        base.name_or_path = os.path.join(a.run_dir, "base")  # adapter_config.json names it (tools/convert.py)
        model = elastic_lora_model(base, TARGETS, init_rank=2, max_rank=4, alpha=8, total_steps=a.steps)
        callback = ElaLoRACallback(init_warmup=1, final_warmup=1, interval=1, moves=2, per_matrix=1)
        trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows()), processing_class=tok,
                             callbacks=[callback])  # fmt: skip
    else:  # the base saved as a directory and named as from_pretrained names it, so that the Trainer's
        base_dir = os.path.join(a.run_dir, "base")  # adapter_config.json says where it is (tools/convert.py)
        if int(os.environ.get("RANK", "0")) == 0:
            base.save_pretrained(base_dir)
            tok.save_pretrained(base_dir)
        base.name_or_path = base_dir  # what PEFT writes as base_model_name_or_path
        callback = ScaLoRACallback({"interval": 2, "warmup_steps": 1})
        trainer = SFTTrainer(model=base, args=args, train_dataset=Dataset.from_list(rows()), processing_class=tok,
                             peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0),
                             callbacks=[callback])  # fmt: skip
    trainer.train(resume_from_checkpoint=True if a.resume else None)
    model = trainer.model
    ids = torch.tensor([tok("gamma delta omega alpha kappa")["input_ids"]])
    engine = trainer.model_wrapped
    engine.eval()
    with torch.no_grad():
        logits = engine(input_ids=ids).logits.float()
    refusal = None
    if a.merged:
        try:
            trainer.save_model(a.merged)
        except ValueError as e:  # ZeRO-3: raised on the saving rank only
            refusal = str(e)
        if a.stage == 3:
            (callback.save_adapter if a.method == "elalora" else callback.save_merged_model)(a.merged)
    frozen = {}
    for name, q in model.named_parameters():
        if not q.requires_grad:
            with deepspeed.zero.GatheredParameters([q]):
                frozen[name] = q.detach().clone()
    if trainer.args.process_index == 0:
        torch.save({"losses": [h["loss"] for h in trainer.state.log_history if "loss" in h], "frozen": frozen,
                    "totals": dict((callback.ela if a.method == "elalora" else callback.scalora).totals),
                    "rank_pattern": callback.rank_pattern() if a.method == "elalora" else None,
                    "logits": logits, "ids": ids, "refusal": refusal, "meta": {}}, a.out)  # fmt: skip


if __name__ == "__main__":
    main()
    from ds_scalora.zero import end_distributed, exit_process

    end_distributed()  # barrier + destroy_process_group
    exit_process(0)  # on gloo: os._exit, see ds_scalora/zero/teardown.py
