"""Run-config keys renamed to the Hugging Face / PEFT names (0.2), and how an old key is read.

The run config speaks ``TrainingArguments`` (``train.*``), PEFT's ``LoraConfig`` (``method.*``) and
``from_pretrained`` (``model.model_name_or_path``). The keys of 0.1 keep working for one release: a
config, a ``--set`` or a checkpoint's stored config that uses one is read as the new key, with a
deprecation message naming it. This table is the one place the old names are written.
"""

from __future__ import annotations

import copy

REMOVED_IN = "0.3"

# old dotted key -> new dotted key
RENAMED = {
    "model.path": "model.model_name_or_path",
    "method.alpha": "method.lora_alpha",
    "method.dropout": "method.lora_dropout",
    "method.rslora": "method.use_rslora",
    "train.micro_batch_size": "train.per_device_train_batch_size",
    "train.scheduler": "train.lr_scheduler_type",
    "train.gradient_clipping": "train.max_grad_norm",
    "train.resume": "train.resume_from_checkpoint",
    "logging.every": "train.logging_steps",
    "logging.tensorboard": "train.report_to",
    "eval.every": "train.eval_steps",
    "eval.at_start": "train.eval_on_start",
    "checkpoint.every": "train.save_steps",
    "checkpoint.keep_last": "train.save_total_limit",
}

# an old key whose value is written differently under the new name
_VALUES = {"logging.tensorboard": lambda on: "tensorboard" if on else "none"}


def rename(raw: dict, where: str = "config") -> tuple[dict, list[str]]:
    """``raw`` (a run config as read from YAML/JSON, or stored in a checkpoint) with every old key moved to
    its new name, and one deprecation message per old key found. A key given under both names is an error
    (``ValueError`` naming both): which one was meant cannot be guessed."""
    out, notes = copy.deepcopy(raw), []
    for old, new in RENAMED.items():
        old_section, old_key = old.split(".")
        section = out.get(old_section)
        if not isinstance(section, dict) or old_key not in section:
            continue
        value = section.pop(old_key)
        if not section and old_section not in ("model", "method", "train"):
            out.pop(old_section)  # logging: nothing is left in it
        new_section, new_key = new.split(".")
        target = out.setdefault(new_section, {})
        if not isinstance(target, dict):
            raise ValueError(f"{where}: {new_section} must be a mapping, found {target!r}")
        if new_key in target:
            raise ValueError(f"{where}: both {old} (the old name) and {new} are set; keep {new} only")
        target[new_key] = _VALUES[old](value) if old in _VALUES else value
        notes.append(f"{where}: {old} is deprecated and will be removed in {REMOVED_IN}; write {new} instead")
    return out, notes


def renamed_override(dotted: str, value) -> tuple[str, object, str | None]:
    """A ``--set dotted=value`` under its new name: (key, value, deprecation message or None)."""
    new = RENAMED.get(dotted)
    if new is None:
        return dotted, value, None
    value = _VALUES[dotted](value) if dotted in _VALUES else value
    return new, value, f"--set {dotted}: deprecated and will be removed in {REMOVED_IN}; write --set {new}=... instead"
