"""The run's length and learning-rate schedule, counted as ``transformers.Trainer`` counts them.

* Length: ``train.max_steps`` if > 0, else ``ceil(num_train_epochs x updates per epoch)``, where an
  epoch is ``ceil(rows / (per-device batch x ranks))`` micro-batches and an update takes
  ``gradient_accumulation_steps`` of them (the last one of an epoch may take fewer): the Trainer's
  ``set_initial_training_values``. Packed rows are counted after packing.
* Warm-up: ``warmup_steps`` (a count, or a fraction of the run if < 1, as in transformers 5) or
  ``warmup_ratio`` (a fraction, as transformers 4, LLaMA-Factory and axolotl write it), rounded up.
* Shape: ``transformers.get_scheduler`` by name, with ``lr_scheduler_kwargs`` (``min_lr_rate`` ...).
  A method that shapes the rate itself (ReLoRA's re-warm-up after each restart) multiplies the stock
  factor; it does not replace it.

Everything is a function of the step, so resume and a change of world size continue the same schedule.
"""

from __future__ import annotations

import math

# transformers.SchedulerType's values, less the two that need a metric each step (reduce_lr_on_plateau,
# greedy); tests/test_schedule.py checks the list against the installed transformers
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
              "inverse_sqrt", "cosine_with_min_lr", "cosine_warmup_with_min_lr", "warmup_stable_decay")


def updates_per_epoch(rows: int, micro_batch: int, accumulation: int, world: int) -> int:
    """Optimizer steps in one epoch of ``rows`` training rows (the Trainer's ``num_update_steps_per_epoch``)."""
    batches = math.ceil(rows / (micro_batch * world))  # a distributed sampler's micro-batches per rank
    return max(math.ceil(batches / accumulation), 1)


def run_length(train, rows: int, world: int) -> int:
    """``train.max_steps`` if set (> 0), else the steps ``train.num_train_epochs`` epochs take."""
    if train.max_steps > 0:
        return train.max_steps
    per_epoch = updates_per_epoch(rows, train.per_device_train_batch_size, train.gradient_accumulation_steps, world)
    return max(math.ceil(train.num_train_epochs * per_epoch), 1)


def warmup_steps(train, total: int) -> int:
    """The warm-up in steps (``TrainingArguments.get_warmup_steps``, with ``warmup_ratio`` as its fraction)."""
    if train.warmup_steps >= 1:
        return int(train.warmup_steps)
    return math.ceil(total * (train.warmup_steps or train.warmup_ratio))


def check(train) -> None:
    """ValueError naming the key if the length or the warm-up cannot be used (before any heavy work)."""
    if train.max_steps == 0 or train.max_steps < -1:
        raise ValueError(f"train.max_steps must be > 0, or -1 to train num_train_epochs epochs; got {train.max_steps}")
    if train.max_steps < 0 and not train.num_train_epochs > 0:
        raise ValueError(f"train.num_train_epochs must be > 0 when train.max_steps is -1; got {train.num_train_epochs}")
    if train.warmup_steps < 0 or (train.warmup_steps >= 1 and train.warmup_steps != int(train.warmup_steps)):
        raise ValueError(f"train.warmup_steps must be a whole count >= 1, a fraction in [0, 1), got {train.warmup_steps}")
    if not 0 <= train.warmup_ratio < 1:
        raise ValueError(f"train.warmup_ratio must be in [0, 1), got {train.warmup_ratio}")
    if train.warmup_ratio and train.warmup_steps:
        raise ValueError("set train.warmup_steps or train.warmup_ratio, not both")
    if train.lr_scheduler_type == "constant" and (train.warmup_ratio or train.warmup_steps):
        raise ValueError("train.lr_scheduler_type 'constant' has no warm-up in transformers (the warm-up would be "
                         "ignored); use constant_with_warmup")


def scheduler(optimizer, train, total: int, method_factor=None):
    """``transformers.get_scheduler(train.lr_scheduler_type)`` over ``total`` steps; with ``method_factor``
    (``step -> float``) a LambdaLR of the stock factor times the method's."""
    import torch
    from transformers import get_scheduler

    stock = get_scheduler(train.lr_scheduler_type, optimizer, num_warmup_steps=warmup_steps(train, total),
                          num_training_steps=total, scheduler_specific_kwargs=dict(train.lr_scheduler_kwargs))
    if method_factor is None:
        return stock
    (factor,) = stock.lr_lambdas
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: factor(step) * method_factor(step))
