"""What a finished ``launch/train.py`` run leaves in ``<output_dir>/model``: a model others load.

``checkpoint.final_model``: ``auto`` writes the exact PEFT adapter for the methods whose whole update is
their adapter (LoRA, rsLoRA, ElaLoRA) and the merged Hugging Face model for the others (ScaLoRA and
ReLoRA, whose merges live in the frozen weights, and full fine-tuning); ``merged`` or ``adapter`` force
one; ``none`` writes nothing. Rank 0 writes it from the run's final checkpoint, the way
``tools/convert.py`` does (any ZeRO stage, any world size), with a model card, atomically.
"""

from __future__ import annotations

import os

FINAL_MODEL_DIR = "model"
EXACT_ADAPTER_METHODS = ("lora", "rslora", "elalora")  # their whole update is the adapter (adapter_export)
FINAL_MODEL_CHOICES = ("auto", "merged", "adapter", "none")


def final_kind(method: str, option: str) -> str | None:
    """``merged``, ``adapter`` or None (nothing to write); ValueError naming the fix for an impossible choice."""
    if option not in FINAL_MODEL_CHOICES:
        raise ValueError(f"checkpoint.final_model must be one of {list(FINAL_MODEL_CHOICES)}, got {option!r}")
    if option == "none":
        return None
    if option == "adapter" and method not in EXACT_ADAPTER_METHODS:
        raise ValueError(f"checkpoint.final_model=adapter: a {method} run has no exact adapter (its update is merged "
                         f"into the frozen weights; adapters exist for {', '.join(EXACT_ADAPTER_METHODS)}); use "
                         "'merged' or 'auto'")
    if option == "auto":
        return "adapter" if method in EXACT_ADAPTER_METHODS else "merged"
    return option


def write_final_model(tag_dir: str, output_dir: str, option: str) -> dict | None:
    """Write the run's final model from its checkpoint ``tag_dir``; returns the summary entry, or None."""
    from .adapter_export import export_adapter
    from .merged import export_merged
    from .source import RunSource

    source = RunSource(tag_dir)
    kind = final_kind(source.method["name"], option)
    if kind is None:
        return None
    out = os.path.join(output_dir, FINAL_MODEL_DIR)
    if kind == "merged":
        export_merged(source, out, overwrite=True, progress=False)
    else:
        export_adapter(source, out, overwrite=True, progress=False)
    return {"path": out, "kind": kind, "step": source.step}
