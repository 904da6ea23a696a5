"""Hugging Face Trainer checkpoints (``<output_dir>/checkpoint-N``) as conversion sources, with no run config.

A Trainer's checkpoint says less than a ``launch/train.py`` one, and where it says it depends on the host:

* the run configuration comes from PEFT's ``adapter_config.json`` in the folder (base model, ``r``,
  ``lora_alpha``, ``use_rslora``) and from which method files lie beside it: ScaLoRA's shards
  (``ds_scalora_rank*``, ``ds_scalora_state.pt``) or ElaLoRA's ``ds_elalora_state.pt`` (whose config also
  holds ``init_rank``, the scale's denominator);
* without DeepSpeed the folder holds only PEFT's adapter file (:class:`TrainerFolder`), plus ScaLoRA's merged
  weights in ``ds_scalora_state.pt``; with DeepSpeed, a PEFT model's DeepSpeed checkpoint leaves the frozen
  parameters out, and ``ScaLoRACallback``'s shards carry each rank's slice of the merged ones.
  :class:`BaseFilled` reads every parameter a checkpoint does not hold from the base model's safetensors.
"""

from __future__ import annotations

import glob
import json
import os
import re

import torch
from peft.utils import CONFIG_NAME as ADAPTER_CONFIG  # PEFT's and transformers' own file names
from peft.utils import SAFETENSORS_WEIGHTS_NAME as ADAPTER_WEIGHTS
from transformers.trainer import TRAINER_STATE_NAME as TRAINER_STATE_JSON
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..checkpoint.deepspeed_files import load
from ..checkpoint.layout import ELALORA_TRAINER_STATE, TRAINER_STATE
from ..checkpoint.shards import ScaLoRAShard
from .source import PEFT_PREFIX, ExportError

_CHECKPOINT = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")  # checkpoint-<global step>
_DTYPES = {"bfloat16": "bf16", "float32": "fp32", "float16": "fp16"}


def newest_trainer_checkpoint(path: str) -> str | None:
    """The ``checkpoint-N`` folder with the largest N under a Trainer's output dir, or None."""
    found = [(int(m.group(1)), name) for name in os.listdir(path) if (m := _CHECKPOINT.match(name))
             and os.path.isdir(os.path.join(path, name))]  # fmt: skip
    return os.path.join(path, max(found)[1]) if found else None


def is_trainer_folder(path: str) -> bool:
    """A Trainer checkpoint folder of a PEFT model (DeepSpeed or not)."""
    return os.path.isfile(os.path.join(path, ADAPTER_CONFIG)) and os.path.isfile(os.path.join(path, TRAINER_STATE_JSON))


def trainer_folder_of(tag_dir: str) -> str | None:
    """The Trainer checkpoint folder a tag belongs to: the tag itself (no DeepSpeed) or its parent."""
    for folder in (tag_dir, os.path.dirname(tag_dir)):
        if is_trainer_folder(folder):
            return folder
    return None


def trainer_config(folder: str, tag_dir: str) -> dict:
    """The run configuration :class:`RunSource` needs, from the folder's files."""
    with open(os.path.join(folder, ADAPTER_CONFIG)) as f:
        adapter = json.load(f)
    base = adapter.get("base_model_name_or_path")
    if not base:
        raise ExportError(f"{folder}/{ADAPTER_CONFIG} names no base model (base_model_name_or_path): pass the "
                          "run's config with --config FILE, or set it in adapter_config.json")
    if os.path.isfile(os.path.join(folder, ELALORA_TRAINER_STATE)):
        state = torch.load(os.path.join(folder, ELALORA_TRAINER_STATE), map_location="cpu", weights_only=True)
        method = {"name": "elalora", "r": int(state["config"]["init_rank"]), "lora_alpha": adapter["lora_alpha"]}
    else:
        scalora = os.path.isfile(os.path.join(folder, TRAINER_STATE)) or glob.glob(os.path.join(tag_dir, "ds_scalora_rank*"))
        method = {"name": "scalora" if scalora else "lora", "r": int(adapter["r"]), "lora_alpha": adapter["lora_alpha"],
                  "use_rslora": bool(adapter.get("use_rslora"))}  # fmt: skip
    return {"model": {"model_name_or_path": base, "dtype": _base_dtype(base)}, "method": method, "train": {"seed": 0},
            "data": {}, "source": "trainer checkpoint"}  # fmt: skip


def _base_dtype(base: str) -> str:
    from ..train.model_source import local_dir

    path = local_dir(base)
    try:
        with open(os.path.join(path, "config.json")) as f:
            config = json.load(f)
    except (OSError, TypeError):
        return "fp32"
    return _DTYPES.get(str(config.get("dtype") or config.get("torch_dtype")), "fp32")


def trainer_client_state(folder: str) -> dict:
    """What a run's client state would say: the step, the log history, and ElaLoRA's masks."""
    with open(os.path.join(folder, TRAINER_STATE_JSON)) as f:
        state = json.load(f)
    client = {"step": int(state.get("global_step", 0)),
              "history": [h for h in state.get("log_history", []) if "eval_loss" in h and "step" in h]}
    ela = os.path.join(folder, ELALORA_TRAINER_STATE)
    if os.path.isfile(ela):
        client["ds_elalora"] = torch.load(ela, map_location="cpu", weights_only=True)
    return client


class TrainerFolder:
    """A Trainer checkpoint written without DeepSpeed: PEFT's adapter file is the trainable state, ScaLoRA's
    merged weights (if any) the stored frozen weights; the rest comes from the base model (:class:`BaseFilled`)."""

    stage, world = 0, 1

    def __init__(self, folder: str):
        from safetensors import safe_open

        path = os.path.join(folder, ADAPTER_WEIGHTS)
        if not os.path.isfile(path):
            raise ExportError(f"{folder} holds no {ADAPTER_WEIGHTS}: not a PEFT Trainer checkpoint")
        self.dir = folder
        self._adapter = safe_open(path, framework="pt")
        self.where = {name: None for name in self._adapter.keys()}  # noqa: SIM118 - a safetensors handle
        self.shared, self.frozen_shapes, self._merged, self._scalora = {}, {}, {}, []
        merged = os.path.join(folder, TRAINER_STATE)
        if os.path.isfile(merged):
            saved = load(merged)
            for module, weight in saved["merged_weights"].items():
                self._merged[f"{module}.base_layer.weight"] = weight
                self.frozen_shapes[f"{module}.base_layer.weight"] = weight.shape
            # the one process's ScaLoRA state as a shard of world 1: its merge state (the precision policy's
            # remainder, below one unit in the stored weight's last place) completes the stored weights
            state, layers = saved["scalora"], list(saved["merged_weights"])
            self._scalora = [ScaLoRAShard(config=state["config"], totals=state["totals"], world=1, layers=layers, rank=0,
                                          merge_state=[state["merge_state"].get(m) for m in layers],
                                          weights=[saved["merged_weights"][m] for m in layers])]  # fmt: skip

    def trainable_names(self) -> list[str]:
        return list(self.where)

    def master(self, name: str) -> torch.Tensor:
        return self._adapter.get_tensor(name).float()

    def frozen(self, name: str) -> torch.Tensor:
        return self._merged[name]

    def scalora_shards(self) -> list:
        return self._scalora

    def client_state(self) -> dict:
        return trainer_client_state(self.dir)

    def model(self, rank: int = 0) -> dict:
        return {"global_steps": self.client_state()["step"]}


class BaseFilled:
    """A checkpoint whose frozen parameters it does not hold are read from the base model: adapted modules'
    under PEFT's ``base_layer`` names, the others under ``base_model.model.`` + their Hugging Face name."""

    def __init__(self, inner, source):
        self.inner, self.source = inner, source
        self.dir, self.world, self.stage, self.shared, self.where = inner.dir, inner.world, inner.stage, inner.shared, inner.where
        adapted = {name.split(".lora_", 1)[0] for name in inner.trainable_names() if ".lora_" in name}
        self.frozen_shapes = dict(inner.frozen_shapes)
        self._from_base = {}
        st = source._safetensors_index() if source.base_path() else {}
        for hf, handle in st.items():
            module, _, leaf = hf.rpartition(".")
            name = f"{PEFT_PREFIX}{module}.base_layer.{leaf}" if PEFT_PREFIX + module in adapted else PEFT_PREFIX + hf
            if name not in self.frozen_shapes and name not in self.where:
                self.frozen_shapes[name] = torch.Size(handle.get_slice(hf).get_shape())
                self._from_base[name] = hf

    def trainable_names(self) -> list[str]:
        return self.inner.trainable_names()

    def master(self, name: str) -> torch.Tensor:
        return self.inner.master(name)

    def frozen(self, name: str) -> torch.Tensor:
        if name in self._from_base:
            return self.source.base_weight(self._from_base[name])
        return self.inner.frozen(name)

    def scalora_shards(self) -> list:
        return self.inner.scalora_shards()

    def client_state(self) -> dict:
        return self.inner.client_state()

    def model(self, rank: int = 0) -> dict:
        return self.inner.model(rank)
