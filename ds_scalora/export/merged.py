"""A checkpoint (any ZeRO stage, any world size) as a plain Hugging Face model directory.

The adapter is folded in: each adapted layer is written as its effective weight (merged frozen weight
at full precision + the adapter's delta, summed in float64, rounded once to ``dtype``). Parameters are
produced and written one at a time, so memory stays near one shard plus one module.
"""

from __future__ import annotations

import json
import os

import torch
from tqdm import tqdm

from .model_card import write_model_card
from .output import ShardedSafetensorsWriter, atomic_dir, parse_size
from .source import DTYPES, ExportError, RunSource
from .weights import EffectiveWeights


def resolve_dtype(source: RunSource, dtype: str | None) -> torch.dtype:
    if dtype is None:
        return source.dtype
    if dtype not in DTYPES:
        raise ExportError(f"unknown --dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def write_model_files(source: RunSource, directory: str, dtype: torch.dtype) -> None:
    """config.json, generation_config.json and the tokenizer, beside the weights."""
    config = source.hf_config()
    config.dtype = dtype
    config.use_cache = True
    config.save_pretrained(directory)
    source.generation_config().save_pretrained(directory)
    source.tokenizer().save_pretrained(directory)


def export_merged(source: RunSource, out: str, dtype: str | None = None, max_shard_size: str = "2GB",
                  overwrite: bool = False, progress: bool = True) -> dict:
    """Write the merged model to ``out``; returns what was written."""
    torch_dtype = resolve_dtype(source, dtype)
    weights = EffectiveWeights(source)
    tied = bool(getattr(source.hf_config(), "tie_word_embeddings", False))
    names = [n for n in weights.names() if not (tied and n == "lm_head.weight")]
    with atomic_dir(out, overwrite) as tmp:
        writer = ShardedSafetensorsWriter(tmp, parse_size(max_shard_size))
        for name in tqdm(names, desc="merging", unit="tensor", disable=not progress):
            writer.add(name, weights.effective(name).to(torch_dtype))
        files = writer.close()
        write_model_files(source, tmp, torch_dtype)
        info = {"checkpoint": source.tag_dir, "step": source.step, "method": source.method["name"],
                "zero_stage": source.ckpt.stage, "world_size": source.ckpt.world, "dtype": str(torch_dtype),
                "kind": "merged", "tensors": len(names), "adapted_layers": len(weights.adapted()), "shards": len(files)}  # fmt: skip
        with open(os.path.join(tmp, "ds_scalora_export.json"), "w") as f:
            json.dump(info, f, indent=2)
        write_model_card(tmp, source, "merged")
    return info
