"""``"auto"`` in a DeepSpeed config, filled from the program's own settings, as the HF Trainer fills it from
``TrainingArguments``: the shipped JSONs (``ds_configs/*.json``) say ``"auto"`` wherever the value belongs
to the run (batch sizes, clipping, bf16), so one file serves ``launch/train.py``, a Trainer and a
hand-written loop. DeepSpeed itself does not know ``"auto"``: call :func:`fill_auto` before
``deepspeed.initialize``.
"""

from __future__ import annotations

import json

AUTO = "auto"


def fill_auto(ds: dict, *, micro_batch: int, gradient_accumulation: int, gradient_clipping: float, world: int,
              bf16: bool) -> dict:
    """A deep copy of ``ds`` with each ``"auto"`` (or absent) batch, clipping and bf16 value set from the
    arguments; values already given are kept as they are (``ds_scalora.train.config.check_batch_keys``
    refuses those that contradict a run config)."""
    ds = json.loads(json.dumps(ds))
    values = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": gradient_accumulation,
        "gradient_clipping": gradient_clipping,
        "train_batch_size": micro_batch * gradient_accumulation * world,
    }
    for key, value in values.items():
        if ds.get(key, AUTO) == AUTO:
            ds[key] = value
    section = ds.setdefault("bf16", {})
    if section.get("enabled", AUTO) == AUTO:
        section["enabled"] = bf16
    return ds
