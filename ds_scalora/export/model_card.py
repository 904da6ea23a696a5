"""The model card (``README.md``) of an export: base model, method, data, training and final metrics.

Everything comes from the checkpoint itself (the run config and the step history in its client state),
so ``launch/train.py``'s final model and ``tools/convert.py`` write the same card. The metadata block is
``huggingface_hub``'s ``ModelCardData``, so the Hub and ``ModelCard.load`` read it.
"""

from __future__ import annotations

import os
import re

from .source import RunSource

METHOD_NAMES = {"lora": "LoRA", "rslora": "rsLoRA (alpha/sqrt(r))", "scalora": "ScaLoRA (arXiv 2510.23818)",
                "relora": "ReLoRA-style restarts", "elalora": "ElaLoRA (elastic ranks)", "full": "full fine-tuning"}  # fmt: skip
WHAT = {"merged": "a Hugging Face model with every merge and the adapter folded into its weights",
        "adapter": "the run's exact PEFT LoRA adapter (its trained factors, no approximation)",
        "peft": "a PEFT LoRA adapter from a truncated SVD of the run's total update"}  # fmt: skip
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def write_model_card(directory: str, source: RunSource, kind: str) -> str:
    """Write ``directory/README.md``; returns its path."""
    from huggingface_hub import ModelCard, ModelCardData

    cfg, method = source.config, source.method
    base = source.base_name()
    on_hub = base is not None and _HUB_ID.match(base) is not None and not os.path.exists(base)
    data = ModelCardData(base_model=base if on_hub else None, library_name="peft" if kind != "merged" else "transformers",
                         pipeline_tag="text-generation", tags=["ds-scalora", method["name"]])  # fmt: skip
    train, d = cfg.get("train", {}), cfg.get("data", {})
    lines = [f"# {os.path.basename(os.path.normpath(train.get('output_dir') or 'model'))}", "",
             f"{WHAT[kind][0].upper()}{WHAT[kind][1:]}, fine-tuned with ds-scalora from "
             + (f"`{base}`." if base else "a randomly initialised model (model.random_init)."), "",
             "## Training", "", f"- Method: {METHOD_NAMES.get(method['name'], method['name'])}; {_method_options(method)}",
             f"- Data: train `{_file(d.get('train'))}`" + (f", eval `{_file(d.get('eval'))}`" if d.get("eval") else "")
             + (f" (format {d['format']})" if d.get("format") else ""),
             f"- Steps: {source.step} of {train.get('max_steps')}; learning rate {train.get('learning_rate')} "
             f"({train.get('lr_scheduler_type', '')}); micro batch {train.get('per_device_train_batch_size')} x accumulation "
             f"{train.get('gradient_accumulation_steps')} x {source.ckpt.world} rank(s); DeepSpeed ZeRO-{source.ckpt.stage}; "
             f"dtype {cfg.get('model', {}).get('dtype')}"]  # fmt: skip
    evals = [h for h in source.client.get("history", []) if isinstance(h, dict) and "eval_loss" in h]
    if evals:
        lines += ["", "## Results (held-out set)", "", "| step | " + " | ".join(_metrics(evals[-1])) + " |",
                  "|---|" + "---|" * len(_metrics(evals[-1]))]
        for h in ([evals[0]] if evals[0] is not evals[-1] else []) + [evals[-1]]:
            lines.append(f"| {h['step']} | " + " | ".join(_fmt(h.get(k)) for k in _metrics(evals[-1])) + " |")
    lines += ["", "## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
              'model = AutoModelForCausalLM.from_pretrained("PATH/TO/THIS/FOLDER")'
              + ("  # needs peft; loads the base model named in adapter_config.json" if kind != "merged" else ""),
              'tokenizer = AutoTokenizer.from_pretrained("PATH/TO/THIS/FOLDER")', "```"]  # fmt: skip
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n")
    path = os.path.join(directory, "README.md")
    card.save(path)
    return path


def _method_options(method: dict) -> str:
    if method["name"] == "full":
        return "every parameter trained"
    parts = [f"r={method.get('r')}", f"lora_alpha={method.get('lora_alpha')}"]
    if isinstance(method.get("target_modules"), list):
        parts.append("modules " + ", ".join(method["target_modules"]))
    elif method.get("target_modules"):
        parts.append(f"modules {method['target_modules']}")
    own = method.get(method["name"])
    if isinstance(own, dict):
        parts += [f"{k}={v}" for k, v in own.items() if v is not None]
    return ", ".join(parts)


def _file(path) -> str:
    return os.path.basename(str(path)) if path else "?"


def _metrics(record: dict) -> list[str]:
    return [k for k in ("eval_loss", "eval_ppl", "eval_exact_match") if k in record]


def _fmt(x) -> str:
    return "–" if x is None else f"{x:.4g}" if isinstance(x, float) else str(x)
