"""ScaLoRATrainer without DeepSpeed: the reference controller hooked into a stock Trainer, with the
merged base weights saved beside the PEFT checkpoint (which holds only the adapter) and restored."""

import shutil

import torch
from transformers import TrainingArguments

from ds_scalora.zero.hf_trainer import ScaLoRATrainer
from tiny_models import fixed_batch, tiny_lora_model


class Rows(torch.utils.data.Dataset):
    def __len__(self):
        return 32

    def __getitem__(self, i):
        return {k: v[0] for k, v in fixed_batch(seed=i, batch=1).items()}


def _train(run_dir, resume=False):
    args = TrainingArguments(
        output_dir=str(run_dir), per_device_train_batch_size=4, max_steps=6, learning_rate=1e-2, save_steps=3,
        logging_steps=1, report_to=[], use_cpu=True, seed=0, data_seed=0, disable_tqdm=True,
    )  # fmt: skip
    model = tiny_lora_model(torch.float32)
    trainer = ScaLoRATrainer(model=model, args=args, train_dataset=Rows(), scalora={"interval": 2, "warmup_steps": 1})
    trainer.train(resume_from_checkpoint=True if resume else None)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    weights = {layer.name: layer.weight.detach().clone() for layer in trainer.scalora.layers}
    return losses, weights, dict(trainer.scalora.totals)


def test_plain_trainer_resumes_with_the_merged_weights(tmp_path):
    losses, weights, totals = _train(tmp_path)
    assert totals["refreshes"] == 3
    base = dict(tiny_lora_model(torch.float32).named_modules())
    assert all(not torch.equal(base[n].base_layer.weight, w) for n, w in weights.items())  # all merged
    shutil.rmtree(tmp_path / "checkpoint-6")
    resumed_losses, resumed_weights, resumed_totals = _train(tmp_path, resume=True)
    assert resumed_losses == losses
    assert resumed_totals == totals
    for name, w in weights.items():
        assert torch.equal(resumed_weights[name], w), name
