"""Which checkpoint, which run, which base model: everything a converter needs before reading weights.

A user points the tools at whatever they have: a run's output directory, its ``checkpoints/`` directory,
one ``stepNNNNNNNN/`` tag, or a plain DeepSpeed directory with a ``latest`` file. The run configuration
(model, method, dtype) comes from the checkpoint's client state when it holds one, else from the run's
``summary.json``, else from a file given with ``--config``.
"""

from __future__ import annotations

import json
import os

import torch

from ..checkpoint.deepspeed_files import ZeroCheckpoint
from ..checkpoint.layout import CHECKPOINTS_DIR, LATEST, MARKER, TAG_PREFIX, is_complete, step_tags
PEFT_PREFIX = "base_model.model."
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


class ExportError(ValueError):
    """A checkpoint or option that cannot be converted; the message says which and what to do."""


def _is_tag(path: str) -> bool:
    # ZeRO-1/2/3 write per-rank optimizer files; ZeRO-0 only mp_rank_00_model_states.pt
    return os.path.isdir(path) and any(f.endswith("_optim_states.pt") or f == "mp_rank_00_model_states.pt"
                                       for f in os.listdir(path))  # fmt: skip


def resolve_checkpoint(path: str) -> str:
    """The tag directory to read: the newest complete one under a run or ``checkpoints/`` directory."""
    from .trainer_checkpoint import is_trainer_folder, newest_trainer_checkpoint

    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise ExportError(f"{path} is not a directory: pass a run's output dir, its checkpoints/ dir or one step tag")
    if os.path.isdir(os.path.join(path, CHECKPOINTS_DIR)):
        path = os.path.join(path, CHECKPOINTS_DIR)
    path = newest_trainer_checkpoint(path) or path  # a Trainer's output dir: its newest checkpoint-N
    if is_trainer_folder(path) and not os.path.isfile(os.path.join(path, LATEST)) and not _is_tag(path):
        return path  # a Trainer checkpoint written without DeepSpeed
    if _is_tag(path):
        parent = os.path.dirname(path)
        if os.path.basename(path).startswith(TAG_PREFIX) and not is_complete(path):
            raise ExportError(f"{path} is an incomplete checkpoint (no {MARKER} marker: its save was interrupted); "
                              f"use an older complete one from {parent}")
        return path
    done, partial = step_tags(path)
    if done:
        return os.path.join(path, done[-1])
    latest = os.path.join(path, LATEST)
    if os.path.isfile(latest):
        with open(latest) as f:
            tag = os.path.join(path, f.read().strip())
        if _is_tag(tag):
            return tag
        raise ExportError(f"{latest} names {tag}, which holds no DeepSpeed checkpoint")
    if partial:
        raise ExportError(f"{path} holds only incomplete checkpoints ({', '.join(partial)}: no {MARKER} marker)")
    raise ExportError(f"no checkpoint found in {path}: expected step*/ tags with a {MARKER} marker or a 'latest' file")


def stored_config(config: dict) -> dict:
    """A run config as a checkpoint or summary.json stored it, in today's key names (0.1's are renamed)."""
    from ..train.renamed_keys import rename

    return rename(config)[0]


def _find_config(tag_dir: str, client: dict, config_path: str | None) -> dict:
    if config_path is not None:
        from ..train.config import load_config

        return load_config(config_path).to_dict()
    if isinstance(client.get("config"), dict):
        return stored_config(client["config"])
    here = tag_dir
    for _ in range(3):  # tag -> checkpoints -> output dir
        summary = os.path.join(here, "summary.json")
        if os.path.isfile(summary):
            with open(summary) as f:
                data = json.load(f)
            if isinstance(data.get("config"), dict):
                return stored_config(data["config"])
        here = os.path.dirname(here)
    raise ExportError(f"cannot tell which model and method {tag_dir} was trained with: its client state has no "
                      "'config' and no summary.json was found above it; pass the run's config with --config FILE")


def hf_name(ckpt_name: str) -> str | None:
    """The Hugging Face parameter name of a checkpoint parameter, or None for adapter-only tensors."""
    if ".lora_" in ckpt_name or ".ranknum" in ckpt_name:
        return None
    name = ckpt_name.removeprefix(PEFT_PREFIX)
    return name.replace(".base_layer.", ".")


def portable_base_name(path: str | None) -> str | None:
    """A base model name that means the same thing on another machine, as PEFT and the Hub expect it:

    * a ``package:`` model: the Hub repository it was quantised from (``packaged_models.HUB_IDS``);
    * a snapshot in the Hugging Face cache (``.../models--org--name/snapshots/<rev>``): ``org/name``;
    * any other path: as the run config wrote it (PEFT's behaviour: the name the model was loaded with);
    * ``model.random_init``: None (the export then carries the base model itself).
    """
    if not path:
        return None
    from ..train.packaged_models import hub_id, is_packaged

    if is_packaged(path):
        return hub_id(path) or path
    parts = os.path.normpath(os.path.abspath(path)).split(os.sep)
    for i, part in enumerate(parts[:-2]):
        if part.startswith("models--") and parts[i + 1] == "snapshots":
            return part.removeprefix("models--").replace("--", "/")
    return path


class RunSource:
    """A checkpoint tag plus the run configuration and base model behind it."""

    def __init__(self, path: str, config_path: str | None = None):
        from .trainer_checkpoint import BaseFilled, TrainerFolder, trainer_client_state, trainer_config, trainer_folder_of

        self.tag_dir = resolve_checkpoint(path)
        self.trainer_folder = trainer_folder_of(self.tag_dir)  # a Hugging Face Trainer's checkpoint-N, or None
        self.ckpt = ZeroCheckpoint(self.tag_dir) if _is_tag(self.tag_dir) else TrainerFolder(self.tag_dir)
        self.client = self.ckpt.client_state()
        if self.trainer_folder is not None and "config" not in self.client:
            self.client = {**trainer_client_state(self.trainer_folder), **self.client}
        if config_path is None and self.trainer_folder is not None and "config" not in self.client:
            self.config = trainer_config(self.trainer_folder, self.tag_dir)
        else:
            self.config = _find_config(self.tag_dir, self.client, config_path)
        self.model_cfg = self.config["model"]
        self.method = self.config["method"]
        self.dtype = DTYPES[self.model_cfg.get("dtype", "bf16")]
        self._base_path = None
        self._random_base = None
        if self.trainer_folder is not None:  # frozen parameters the Trainer left out come from the base model
            self.ckpt = BaseFilled(self.ckpt, self)

    @property
    def run_dir(self) -> str:
        """The run's output directory: above ``checkpoints/<tag>``, or above a Trainer's ``checkpoint-N``."""
        return os.path.dirname(self.trainer_folder or os.path.dirname(self.tag_dir))

    @property
    def step(self) -> int:
        return int(self.client.get("step", self.ckpt.model(0).get("global_steps", 0)))

    # -- the base model -------------------------------------------------------------------------

    def base_path(self) -> str | None:
        """The local HF directory of the base model (None for ``model.random_init``)."""
        if self._base_path is None and self.model_cfg.get("model_name_or_path"):
            from ..train.model_source import local_dir
            from ..train.packaged_models import is_packaged, materialize

            path = self.model_cfg["model_name_or_path"]
            self._base_path = materialize(path) if is_packaged(path) else local_dir(path)
            if not os.path.isdir(self._base_path):
                raise ExportError(f"the run's base model {self._base_path} (model.model_name_or_path) is not a directory here, nor a "
                                  "Hub repository in the local Hugging Face cache")
        return self._base_path

    def base_name(self) -> str | None:
        """The base model's name as others can resolve it (``base_model_name_or_path`` of an adapter, a model
        card's ``base_model``): see :func:`portable_base_name`."""
        return portable_base_name(self.model_cfg.get("model_name_or_path"))

    def hf_config(self):
        from transformers import AutoConfig, LlamaConfig

        if self.base_path():
            return AutoConfig.from_pretrained(self.base_path())
        return LlamaConfig(**self._random_init_fields())

    def _random_init_fields(self) -> dict:
        """The LlamaConfig fields of a ``model.random_init`` run, as ``train/model.py::load_model`` builds them."""
        return {"vocab_size": len(self.tokenizer()), **self.model_cfg["random_init"]}

    def transposed_modules(self) -> set[str]:
        """HF names of the modules that store their weight as d_in x d_out (transformers' ``Conv1D``, as
        in GPT-2): PEFT adapts them with ``fan_in_fan_out``, so their update is ``(B A)ᵀ``. Found by
        building the architecture on the meta device (no memory, no weights)."""
        if not hasattr(self, "_transposed"):
            from transformers import AutoModelForCausalLM
            from transformers.pytorch_utils import Conv1D

            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(self.hf_config())
            self._transposed = {name for name, m in model.named_modules() if isinstance(m, Conv1D)}
        return self._transposed

    def tokenizer(self):
        if self.base_path():
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(self.base_path())
        else:
            from ..train.model import byte_tokenizer

            tok = byte_tokenizer()
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        template = (self.config.get("data") or {}).get("chat_template")
        if template:  # the run trained with data.chat_template: the model answers in that format
            tok.chat_template = template
        return tok

    def generation_config(self):
        from transformers import GenerationConfig

        if self.base_path() and os.path.isfile(os.path.join(self.base_path(), "generation_config.json")):
            return GenerationConfig.from_pretrained(self.base_path())
        return GenerationConfig.from_model_config(self.hf_config())

    def base_weight(self, name: str) -> torch.Tensor:
        """A parameter of the untrained base model (HF name), as stored (the reference of an update).

        From the model directory's safetensors, one tensor at a time; a ``random_init`` model (tiny by
        design) is rebuilt in memory exactly as the run built it (same seed, same dtype)."""
        if self.base_path():
            return self._safetensors_index()[name].get_tensor(name)
        if self._random_base is None:
            from transformers import LlamaForCausalLM

            if self.ckpt.stage == 3:  # zero.Init skips HF's weight init: the run's initial weights differ
                raise ExportError("the base weights of a model.random_init run at ZeRO-3 cannot be rebuilt "
                                  "(deepspeed.zero.Init initialises them differently); the update relative to the "
                                  "base needs a model.model_name_or_path run, or a random_init run at ZeRO-0/1/2")

            from ..train.model import HOST_INIT_MAX_PARAMS, random_init_on_host

            if not random_init_on_host(self._random_init_fields()):
                raise ExportError(f"the base weights of this model.random_init run cannot be rebuilt: above "
                                  f"{HOST_INIT_MAX_PARAMS:,} parameters a run draws them on its accelerator, whose random "
                                  "generator a CPU does not reproduce (ds_scalora/train/model.py); the update relative "
                                  "to the base needs a model.model_name_or_path run (the merged model exports without it)")
            torch.manual_seed(int(self.config["train"]["seed"]))
            model = LlamaForCausalLM(self.hf_config()).to(self.dtype)
            self._random_base = {k: v.detach() for k, v in model.state_dict().items()}
        return self._random_base[name]

    def _safetensors_index(self) -> dict:
        if not hasattr(self, "_st"):
            from safetensors import safe_open

            files = [f for f in sorted(os.listdir(self.base_path())) if f.endswith(".safetensors")]
            if not files:
                raise ExportError(f"{self.base_path()} holds no .safetensors weights (needed as the base of the update)")
            self._st = {}
            for f in files:
                handle = safe_open(os.path.join(self.base_path(), f), framework="pt")
                for key in handle.keys():  # noqa: SIM118 - a safetensors handle, not a dict
                    self._st[key] = handle
        return self._st
