"""The best evaluation and early stopping, as ``transformers.Trainer`` and its ``EarlyStoppingCallback`` judge
them, read from the run's history (so a resumed run judges exactly as the uninterrupted one would).

* ``train.metric_for_best_model`` ("loss" means "eval_loss", as in the Trainer); ``greater_is_better``
  defaults to False for a name ending in "loss", True otherwise.
* The best evaluation is the first one strictly better than every earlier one (``Trainer._determine_best_metric``).
  With ``load_best_model_at_end`` the final model comes from the best evaluation whose checkpoint was saved
  (the Trainer's ``best_model_checkpoint``), and the rotation never removes that checkpoint.
* Early stopping: an evaluation that is not better than the best before it by more than
  ``early_stopping_threshold`` counts one; ``early_stopping_patience`` counts in a row stop the run.
"""

from __future__ import annotations

import math

METRICS = ("eval_loss", "eval_ppl", "eval_exact_match")


def metric_key(name: str) -> str:
    return name if name.startswith("eval_") else f"eval_{name}"


def metric(train) -> str:
    """The history key judged: ``train.metric_for_best_model``, "eval_loss" when unset (the Trainer's default)."""
    return metric_key(train.metric_for_best_model or "loss")


def greater_is_better(train) -> bool:
    if train.greater_is_better is not None:
        return train.greater_is_better
    return not metric(train).endswith("loss")


def _better(value: float, best: float | None, greater: bool) -> bool:
    return best is None or (value > best if greater else value < best)


def best_record(history: list, train, saved_only: bool = False) -> dict | None:
    """The history record of the best evaluation (of a saved checkpoint, with ``saved_only``), or None."""
    key, greater, best = metric(train), greater_is_better(train), None
    for record in history:
        value = record.get(key)
        if value is None or not math.isfinite(value) or (saved_only and not record.get("saved")):
            continue
        if best is None or _better(value, best[key], greater):
            best = record
    return best


def evaluations_without_improvement(history: list, train) -> int:
    """The early-stopping count after the last evaluation in ``history`` (``EarlyStoppingCallback``)."""
    key, greater = metric(train), greater_is_better(train)
    best, count = None, 0
    for record in history:
        value = record.get(key)
        if value is None:
            continue
        if best is None or (_better(value, best, greater) and abs(value - best) > train.early_stopping_threshold):
            count = 0
        else:
            count += 1
        if _better(value, best, greater):
            best = value
    return count


def check(train, eval_cfg) -> None:
    """ValueError naming the key if the best-model or early-stopping settings cannot work."""
    wanted = train.load_best_model_at_end or train.early_stopping_patience > 0
    if train.early_stopping_patience < 0:
        raise ValueError(f"train.early_stopping_patience must be >= 0, got {train.early_stopping_patience}")
    if not wanted:
        return
    key = metric(train)
    if key not in METRICS:
        raise ValueError(f"train.metric_for_best_model {train.metric_for_best_model!r} is not a metric of the run's "
                         f"evaluation; use one of {', '.join(METRICS)}")
    if key == "eval_exact_match" and not (eval_cfg.exact_match and eval_cfg.exact_match_every_eval):
        raise ValueError("train.metric_for_best_model eval_exact_match needs eval.exact_match and "
                         "eval.exact_match_every_eval true")
    if train.eval_steps <= 0:
        raise ValueError("train.load_best_model_at_end and train.early_stopping_patience need train.eval_steps > 0")
    if train.load_best_model_at_end and (train.save_steps <= 0 or train.save_steps % train.eval_steps):
        raise ValueError(f"train.load_best_model_at_end needs train.save_steps a multiple of train.eval_steps "
                         f"(as the Trainer), got save_steps {train.save_steps} and eval_steps {train.eval_steps}")
