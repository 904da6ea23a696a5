"""ScaLoRATrainer, and ScaLoRACallback in a stock Trainer, without DeepSpeed: the single-process ScaLoRA
hooked in front of the optimizer step, the merged base weights saved beside the PEFT checkpoint (which
holds only the adapter) and restored; ``save_model`` writes the merged model, never a bare adapter."""

import shutil

import torch
from transformers import TrainingArguments

from ds_scalora.zero import ScaLoRACallback
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


def test_callback_in_a_stock_trainer_resumes_and_saves_the_merged_model(tmp_path):
    """Tolerance of the logits: the merged model holds W + s·B·A formed once in fp32, the PEFT model computes
    W·x + s·B·(A·x); fp32 reordering only (~1e-7 relative here). A missing merge moves them by ~1e-2."""
    from transformers import AutoModelForCausalLM, Trainer

    def train(run_dir, resume=False):
        args = TrainingArguments(
            output_dir=str(run_dir), per_device_train_batch_size=4, max_steps=6, learning_rate=1e-2, save_steps=3,
            logging_steps=1, report_to=[], use_cpu=True, seed=0, data_seed=0, disable_tqdm=True,
        )  # fmt: skip
        model = tiny_lora_model(torch.float32)
        callback = ScaLoRACallback({"interval": 2, "warmup_steps": 1})
        trainer = Trainer(model=model, args=args, train_dataset=Rows(), callbacks=[callback])
        trainer.train(resume_from_checkpoint=True if resume else None)
        return trainer, callback, [h["loss"] for h in trainer.state.log_history if "loss" in h]

    trainer, callback, losses = train(tmp_path / "run")
    assert callback.scalora.totals["refreshes"] == 3
    out = tmp_path / "merged"
    trainer.save_model(str(out))
    assert not (out / "adapter_model.safetensors").exists()
    batch = fixed_batch(seed=99)
    model = trainer.model.eval()
    with torch.no_grad():
        expected = model(input_ids=batch["input_ids"]).logits
        got = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()(input_ids=batch["input_ids"]).logits
    assert float((got - expected).norm() / expected.norm()) < 1e-4
    weights = {layer.name: layer.weight.detach().clone() for layer in callback.scalora.layers}

    shutil.rmtree(tmp_path / "run" / "checkpoint-6")
    _, resumed, resumed_losses = train(tmp_path / "run", resume=True)
    assert resumed_losses == losses
    assert dict(resumed.scalora.totals) == dict(callback.scalora.totals)
    for layer in resumed.scalora.layers:
        assert torch.equal(layer.weight, weights[layer.name]), layer.name


def test_elalora_callback_in_a_stock_trainer_resumes_and_saves_an_exact_adapter(tmp_path):
    """ElaLoRACallback without DeepSpeed: rounds move ranks, a resume from step 3 reproduces the losses and the
    final rank pattern, and ``save_model`` writes a plain LoRA adapter of the active slots whose logits under
    stock PEFT equal the trained model's (fp32 reordering only: 1e-5 relative; PEFT's own AdaLoRA file would
    reload with scale alpha/max_rank = half the run's, far outside it)."""
    import json

    from peft import PeftModel
    from transformers import Trainer

    from ds_scalora.zero import ElaLoRACallback
    from tiny_models import tiny_elastic_model, tiny_llama

    def train(run_dir, resume=False):
        args = TrainingArguments(
            output_dir=str(run_dir), per_device_train_batch_size=4, max_steps=8, learning_rate=1e-2, save_steps=3,
            logging_steps=1, report_to=[], use_cpu=True, seed=0, data_seed=0, disable_tqdm=True,
        )  # fmt: skip
        model = tiny_elastic_model(torch.float32, init_rank=2, max_rank=4)
        callback = ElaLoRACallback(init_warmup=1, final_warmup=1, interval=1, moves=2, per_matrix=1)
        trainer = Trainer(model=model, args=args, train_dataset=Rows(), callbacks=[callback])
        trainer.train(resume_from_checkpoint=True if resume else None)
        return trainer, callback, [h["loss"] for h in trainer.state.log_history if "loss" in h]

    trainer, callback, losses = train(tmp_path / "run")
    pattern = callback.rank_pattern()
    assert sum(pattern.values()) == 2 * 14 and len(set(pattern.values())) > 1  # budget kept, ranks moved
    assert (tmp_path / "run" / "checkpoint-3" / "ds_elalora_state.pt").is_file()
    out = tmp_path / "adapter"
    trainer.save_model(str(out))
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and sum(saved["rank_pattern"].values()) == 2 * 14
    batch = fixed_batch(seed=99)
    with torch.no_grad():
        expected = trainer.model.eval()(input_ids=batch["input_ids"]).logits
        got = PeftModel.from_pretrained(tiny_llama(torch.float32), str(out)).eval()(input_ids=batch["input_ids"]).logits
    assert float((got - expected).norm() / expected.norm()) < 1e-5

    shutil.rmtree(tmp_path / "run" / "checkpoint-6")
    shutil.rmtree(tmp_path / "run" / "checkpoint-8")
    _, resumed, resumed_losses = train(tmp_path / "run", resume=True)
    assert resumed_losses == losses
    assert resumed.rank_pattern() == pattern


def test_convert_reads_trainer_checkpoints_without_a_run_config(tmp_path):
    """tools/convert.py on a Trainer's output dir (no DeepSpeed, no launch YAML): the run is described by PEFT's
    adapter_config.json and the method files beside it, the frozen weights come from the base model named
    there, ScaLoRA's merges from the callback's file. The merged export of a ScaLoRA run and the exact adapter
    of a LoRA run reproduce the trained model's logits (fp32 reordering only: 1e-5 relative); the base model
    alone is far off, so the comparison can fail."""
    import sys
    from pathlib import Path

    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, Trainer

    from ds_scalora.train.model import byte_tokenizer
    from tiny_models import TARGETS, tiny_llama

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    import convert

    base_dir = tmp_path / "base"
    tiny_llama(torch.float32).save_pretrained(base_dir)
    byte_tokenizer().save_pretrained(base_dir)  # a real base directory ships its tokenizer; the exports copy it
    ids = fixed_batch(seed=99)["input_ids"]

    def logits(model):
        with torch.no_grad():
            return model.eval()(input_ids=ids).logits

    def train(run, callbacks):
        args = TrainingArguments(output_dir=str(run), per_device_train_batch_size=4, max_steps=6, learning_rate=1e-2,
                                 save_steps=3, report_to=[], use_cpu=True, seed=0, data_seed=0, disable_tqdm=True)  # fmt: skip
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
                               LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0))  # fmt: skip
        trainer = Trainer(model=model, args=args, train_dataset=Rows(), callbacks=callbacks)
        trainer.train()
        return logits(trainer.model)

    def close(got, want):
        return float((got - want).norm() / want.norm()) < 1e-5

    bare = logits(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32))
    want = train(tmp_path / "scalora", [ScaLoRACallback({"interval": 2, "warmup_steps": 1})])
    assert convert.main(["merged", str(tmp_path / "scalora"), str(tmp_path / "merged"), "--dtype", "fp32", "--quiet"]) == 0
    got = logits(AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32))
    assert close(got, want) and not close(bare, want)
    info = __import__("json").loads((tmp_path / "merged" / "ds_scalora_export.json").read_text())
    assert info["method"] == "scalora" and info["step"] == 6

    want = train(tmp_path / "lora", [])
    assert convert.main(["adapter", str(tmp_path / "lora"), str(tmp_path / "adapter"), "--quiet"]) == 0
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    got = logits(PeftModel.from_pretrained(base, str(tmp_path / "adapter")))
    assert close(got, want) and not close(bare, want)


def test_convert_of_a_bf16_trainer_checkpoint_keeps_the_merges_full_precision(tmp_path):
    """A bf16 model in a stock Trainer: the weights the checkpoint stores are bf16, and the precision policy's
    remainder (fp32 residual, saved in ds_scalora_state.pt) carries what bf16 rounding dropped at each
    merge. ``tools/convert.py merged --dtype fp32`` adds it back: every adapted weight equals the callback's
    own full-precision effective weight (fp32 reordering only: < 1e-6 relative), while the stored bf16
    weight plus the adapter is off by up to half a bf16 unit (~1e-3 relative), so the check can fail."""
    import sys
    from pathlib import Path

    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, Trainer

    from ds_scalora.train.model import byte_tokenizer
    from tiny_models import TARGETS, tiny_llama

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    import convert

    base_dir = tmp_path / "base"
    tiny_llama(torch.bfloat16).save_pretrained(base_dir)
    byte_tokenizer().save_pretrained(base_dir)
    args = TrainingArguments(output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, max_steps=6,
                             learning_rate=1e-2, save_steps=6, report_to=[], use_cpu=True, seed=0, disable_tqdm=True)  # fmt: skip
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16),
                           LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0))  # fmt: skip
    callback = ScaLoRACallback({"interval": 1, "warmup_steps": 1})
    Trainer(model=model, args=args, train_dataset=Rows(), callbacks=[callback]).train()
    assert callback.scalora.totals["refreshes"] == 5

    assert convert.main(["merged", str(tmp_path / "run"), str(tmp_path / "merged"), "--dtype", "fp32", "--quiet"]) == 0
    exported = load_file(str(tmp_path / "merged" / "model.safetensors"))
    worst_export, worst_stored = 0.0, 0.0
    for layer in callback.scalora.layers:
        name = layer.name.removeprefix("base_model.model.") + ".weight"
        want = callback.scalora.effective_weight(layer).float()
        stored = layer.effective_weight().float()  # the bf16 stored weight + s·B·A, without the remainder
        worst_export = max(worst_export, float((exported[name] - want).abs().max() / want.abs().max()))
        worst_stored = max(worst_stored, float((stored - want).abs().max() / want.abs().max()))
    assert worst_export < 1e-6 and worst_stored > 1e-4, (worst_export, worst_stored)
