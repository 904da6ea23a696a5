"""The run's length and learning rates against a real ``transformers.Trainer`` given the same arguments.

The reference is the Trainer's own code path (``set_initial_training_values`` for the step count,
``create_scheduler`` with ``TrainingArguments.get_warmup_steps`` for the rates), not a formula copied here.
"""

import math
from types import SimpleNamespace

import pytest
import torch

from ds_scalora.train import schedule
from ds_scalora.train.config import TrainConfig


def _trainer(tmp_path, **args):
    from transformers import Trainer, TrainingArguments

    targs = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, save_strategy="no", **args)
    return Trainer(model=torch.nn.Linear(2, 2), args=targs), targs


def test_scheduler_names_are_transformers_less_the_metric_driven_ones():
    from transformers import SchedulerType

    assert set(schedule.SCHEDULERS) == {s.value for s in SchedulerType} - {"reduce_lr_on_plateau", "greedy"}


@pytest.mark.parametrize("rows,micro,gas,world,epochs", [
    (100, 4, 2, 1, 3.0), (100, 4, 3, 1, 1.0), (37, 8, 1, 1, 2.5), (1000, 2, 4, 4, 1.0), (5, 4, 8, 2, 3.0),
    (101, 3, 5, 8, 0.5),
])  # fmt: skip
def test_epochs_give_the_trainers_step_count(tmp_path, rows, micro, gas, world, epochs):
    trainer, args = _trainer(tmp_path, per_device_train_batch_size=micro, gradient_accumulation_steps=gas,
                             num_train_epochs=epochs)  # fmt: skip
    # one rank's dataloader: a distributed sampler gives each of `world` ranks ceil(rows / world) rows
    loader = torch.utils.data.DataLoader(list(range(math.ceil(rows / world))), batch_size=micro)
    hf_steps = trainer.set_initial_training_values(args, loader)[-1]
    ours = TrainConfig(num_train_epochs=epochs, per_device_train_batch_size=micro, gradient_accumulation_steps=gas)
    assert schedule.run_length(ours, rows, world) == hf_steps
    assert schedule.run_length(TrainConfig(max_steps=7, num_train_epochs=epochs), rows, world) == 7  # max_steps wins


@pytest.mark.parametrize("kind,warmup,kwargs", [
    ("linear", {"warmup_steps": 0.1}, {}), ("cosine", {"warmup_ratio": 0.25}, {}), ("cosine", {"warmup_steps": 3}, {}),
    ("cosine_with_min_lr", {"warmup_ratio": 0.1}, {"min_lr_rate": 0.1}), ("constant_with_warmup", {"warmup_steps": 4}, {}),
    ("polynomial", {}, {"power": 2.0}), ("warmup_stable_decay", {"warmup_ratio": 0.1}, {"num_decay_steps": 5}),
])  # fmt: skip
def test_learning_rates_are_the_trainers(tmp_path, kind, warmup, kwargs):
    total, lr = 23, 1e-3
    # TrainingArguments (transformers 5) has no warmup_ratio: a fraction in warmup_steps is the same thing
    hf_warmup = warmup.get("warmup_steps", warmup.get("warmup_ratio", 0))
    trainer, _ = _trainer(tmp_path, learning_rate=lr, lr_scheduler_type=kind, lr_scheduler_kwargs=kwargs,
                          warmup_steps=hf_warmup)  # fmt: skip
    trainer.create_optimizer()
    hf = trainer.create_scheduler(total)
    ours_cfg = TrainConfig(learning_rate=lr, lr_scheduler_type=kind, lr_scheduler_kwargs=kwargs, **warmup)
    schedule.check(ours_cfg)
    opt = torch.optim.AdamW(torch.nn.Linear(2, 2).parameters(), lr=lr)
    ours = schedule.scheduler(opt, ours_cfg, total)
    hf_lrs, our_lrs = [], []
    for _ in range(total):
        hf_lrs.append(hf.get_last_lr()[0])
        our_lrs.append(ours.get_last_lr()[0])
        trainer.optimizer.step(), hf.step(), opt.step(), ours.step()
    assert our_lrs == hf_lrs
    assert schedule.warmup_steps(ours_cfg, total) == trainer.args.get_warmup_steps(total)


def test_a_method_factor_multiplies_the_stock_schedule():
    """ReLoRA's re-warm-up wraps the stock schedule: the rate is the stock rate times the method's factor."""
    total, cfg = 20, TrainConfig(learning_rate=1.0, lr_scheduler_type="cosine", warmup_steps=4)
    plain = schedule.scheduler(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0), cfg, total)
    wrapped = schedule.scheduler(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0), cfg, total,
                                 lambda step: 0.5 if step % 5 == 0 else 1.0)  # fmt: skip
    for step in range(total):
        assert wrapped.get_last_lr()[0] == pytest.approx(plain.get_last_lr()[0] * (0.5 if step % 5 == 0 else 1.0))
        plain.optimizer.step(), plain.step(), wrapped.optimizer.step(), wrapped.step()


@pytest.mark.parametrize("fields,message", [
    ({"max_steps": 0}, "train.max_steps must be > 0, or -1"),
    ({"num_train_epochs": 0}, "num_train_epochs must be > 0"),
    ({"warmup_steps": 2.5}, "warmup_steps must be a whole count"),
    ({"warmup_ratio": 1.0}, r"warmup_ratio must be in \[0, 1\)"),
    ({"warmup_ratio": 0.1, "warmup_steps": 3}, "not both"),
    ({"lr_scheduler_type": "constant", "warmup_steps": 3}, "use constant_with_warmup"),
])  # fmt: skip
def test_bad_lengths_and_warmups_name_the_key(fields, message):
    with pytest.raises(ValueError, match=message):
        schedule.check(SimpleNamespace(**{**vars(TrainConfig()), **fields}))
