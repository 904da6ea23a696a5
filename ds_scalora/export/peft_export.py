"""The total update of a run as a stock PEFT LoRA adapter, by truncated SVD per adapted module.

A ScaLoRA run's update (effective weight minus the base model's) is high-rank: it is the merges plus
the current factors. Per module, ``ΔW = U S Vᵀ`` is cut at a fixed ``rank`` or at the smallest rank
that keeps ``energy`` of ``‖ΔW‖²``, and written as ``lora_B = U√S``, ``lora_A = √S Vᵀ`` with LoRA
scaling 1 (``alpha_pattern`` = ``rank_pattern``). The relative error of each module is exactly the SVD
tail, ``√(Σ_tail s²) / √(Σ s²)`` (Eckart-Young), and is reported per module and overall.
"""

from __future__ import annotations

import json
import math
import os

import torch
from peft.utils import SAFETENSORS_WEIGHTS_NAME as ADAPTER_WEIGHTS  # PEFT's own file name
from tqdm import tqdm

from .merged import write_model_files
from .model_card import write_model_card
from .output import ShardedSafetensorsWriter, atomic_dir, parse_size
from .source import DTYPES, ExportError, RunSource
from .weights import EffectiveWeights

REPORT = "peft_export_report.json"


def choose_rank(s: torch.Tensor, rank: int | None, energy: float) -> int:
    """The kept rank: ``rank`` (capped by the matrix), or the fewest values holding ``energy`` of Σ s²."""
    if rank is not None:
        return max(1, min(rank, s.numel()))
    total = float((s**2).sum())
    if total == 0.0:
        return 1
    kept = torch.cumsum(s**2, 0) / total
    return max(1, min(int((kept < energy).sum()) + 1, s.numel()))


def factorize(update: torch.Tensor, rank: int | None, energy: float):
    """(lora_A, lora_B, relative error, tail², total²) of the best rank-k approximation, float64."""
    U, s, Vh = torch.linalg.svd(update.detach(), full_matrices=False)
    k = choose_rank(s, rank, energy)
    root = s[:k].sqrt()
    tail2, total2 = float((s[k:] ** 2).sum()), float((s**2).sum())
    err = math.sqrt(tail2 / total2) if total2 > 0 else 0.0
    return root[:, None] * Vh[:k], U[:, :k] * root[None, :], err, tail2, total2


def export_peft(source: RunSource, out: str, rank: int | None = None, energy: float = 0.99, dtype: str = "fp32",
                overwrite: bool = False, progress: bool = True) -> dict:
    """Write the adapter to ``out`` (plus ``out/base_model`` for a random-init run); returns the report."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    if source.method["name"] == "full":
        raise ExportError("a full fine-tuning run has no adapted modules to express as a LoRA adapter; "
                          "use 'merged' instead")
    if rank is not None and rank < 1:
        raise ExportError(f"--rank must be at least 1, got {rank}")
    if not 0 < energy <= 1:
        raise ExportError(f"--energy must be in (0, 1], got {energy}")
    weights = EffectiveWeights(source)
    out = os.path.abspath(out)
    tensors, rank_pattern, modules = {}, {}, {}
    tail, total = 0.0, 0.0
    for name in tqdm(weights.adapted(), desc="svd", unit="module", disable=not progress):
        module = name.removesuffix(".weight")
        A, B, err, t2, s2 = factorize(weights.update_out_in(name), rank, energy)
        tensors[f"base_model.model.{module}.lora_A.weight"] = A.to(DTYPES[dtype]).contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = B.to(DTYPES[dtype]).contiguous()
        rank_pattern[module] = A.shape[0]
        modules[module] = {"rank": A.shape[0], "relative_error": err, "update_norm": math.sqrt(s2),
                           "full_rank": min(A.shape[1], B.shape[0])}  # fmt: skip
        tail, total = tail + t2, total + s2
    report = {"checkpoint": source.tag_dir, "step": source.step, "rank": rank, "energy": None if rank else energy,
              "overall_relative_error": math.sqrt(tail / total) if total > 0 else 0.0, "modules": modules}  # fmt: skip
    with atomic_dir(out, overwrite) as tmp:
        base = adapter_base(source, weights, tmp, out)
        r = max(rank_pattern.values())
        config = LoraConfig(r=r, lora_alpha=r, target_modules=sorted(rank_pattern), rank_pattern=rank_pattern,
                            alpha_pattern=dict(rank_pattern), task_type="CAUSAL_LM",
                            fan_in_fan_out=bool(weights.transposed), base_model_name_or_path=base)  # fmt: skip
        config.save_pretrained(tmp)
        save_file(tensors, os.path.join(tmp, ADAPTER_WEIGHTS), metadata={"format": "pt"})
        with open(os.path.join(tmp, REPORT), "w") as f:
            json.dump(report, f, indent=2)
        write_model_card(tmp, source, "peft")
    return report


def adapter_base(source: RunSource, weights: EffectiveWeights, tmp: str, out: str) -> str | None:
    """The ``base_model_name_or_path`` of an adapter written to ``out`` (being built in ``tmp``): the run's
    portable base name, or, for a random-init run, ``out/base_model``, which is written beside it; None
    where that base cannot be rebuilt (random init at ZeRO-3, see ``RunSource.base_weight``)."""
    if source.base_path() is not None:
        return source.base_name()
    if source.ckpt.stage == 3:
        return None
    _write_base(source, weights, os.path.join(tmp, "base_model"))
    return os.path.join(out, "base_model")


def _write_base(source: RunSource, weights: EffectiveWeights, directory: str) -> None:
    os.makedirs(directory)
    writer = ShardedSafetensorsWriter(directory, parse_size("2GB"))
    tied = bool(getattr(source.hf_config(), "tie_word_embeddings", False))
    for name in weights.names():
        if not (tied and name == "lm_head.weight"):
            writer.add(name, source.base_weight(name))
    writer.close()
    write_model_files(source, directory, source.dtype)


def format_report(report: dict, limit: int = 40) -> str:
    rows = list(report["modules"].items())
    lines = [f"{'module':<52} {'rank':>5} {'of':>5} {'rel.error':>10}"]
    for module, m in rows[:limit]:
        lines.append(f"{module:<52} {m['rank']:>5} {m['full_rank']:>5} {m['relative_error']:>10.3e}")
    if len(rows) > limit:
        lines.append(f"... {len(rows) - limit} more in {REPORT}")
    lines.append(f"overall relative error {report['overall_relative_error']:.3e} over {len(rows)} modules")
    return "\n".join(lines)
