"""An HF Trainer job with ``deepspeed=<config>`` and ScaLoRATrainer, for tests/distributed/test_hf_trainer.py.

    deepspeed --num_gpus 2 tests/distributed/trainer_worker.py --run-dir DIR --steps 6 --out F.pt [--resume] [--stage 2]

Saves a checkpoint every 3 steps. Rank 0 writes {"losses": per-step training losses (the resumed
run's earlier ones come from the checkpoint's trainer state), "frozen": the full frozen weights,
"totals": ScaLoRA's counters, "meta"}.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tiny_models import fixed_batch, tiny_lora_model  # noqa: E402


class Rows(torch.utils.data.Dataset):
    def __len__(self):
        return 64

    def __getitem__(self, i):
        return {k: v[0] for k, v in fixed_batch(seed=i, batch=1).items()}


def main():
    from ds_scalora.deepspeed_import import import_deepspeed

    deepspeed = import_deepspeed()  # the product's own first import (without mlflow)
    from transformers import TrainingArguments

    from ds_scalora.zero.hf_trainer import ScaLoRATrainer

    p = argparse.ArgumentParser()
    p.add_argument("--run-dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--stage", type=int, default=2)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--local_rank", type=int, default=-1)
    a = p.parse_args()
    ds_config = {
        "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
        "zero_optimization": {"stage": a.stage, "reduce_bucket_size": 1000, "allgather_bucket_size": 1000,
                              "stage3_param_persistence_threshold": 0},
        "bf16": {"enabled": False},
    }  # fmt: skip
    from ds_scalora.zero import disable_cpu_shm_comm

    disable_cpu_shm_comm()  # before TrainingArguments, which initialises DeepSpeed's process group
    args = TrainingArguments(
        output_dir=a.run_dir, per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=a.steps,
        learning_rate=1e-2, max_grad_norm=1.0, save_steps=3, logging_steps=1, report_to=[], deepspeed=ds_config,
        use_cpu=True, lr_scheduler_type="linear", warmup_steps=0, seed=0, data_seed=0, disable_tqdm=True,
    )  # fmt: skip
    model = tiny_lora_model(torch.float32)
    trainer = ScaLoRATrainer(model=model, args=args, train_dataset=Rows(), scalora={"interval": 2, "warmup_steps": 1})
    trainer.train(resume_from_checkpoint=True if a.resume else None)
    frozen = {}
    for name, q in model.named_parameters():
        if not q.requires_grad:
            with deepspeed.zero.GatheredParameters([q]):
                frozen[name] = q.detach().clone()
    if trainer.args.process_index == 0:
        torch.save({"losses": [h["loss"] for h in trainer.state.log_history if "loss" in h], "frozen": frozen,
                    "totals": dict(trainer.scalora.totals), "meta": {}}, a.out)


if __name__ == "__main__":
    main()
    from ds_scalora.zero import end_distributed, exit_process

    end_distributed()  # barrier + destroy_process_group
    exit_process(0)  # on gloo: os._exit, see ds_scalora/zero/teardown.py
