"""The run configuration of ``launch/train.py``: schema, loading, ``--set`` overrides, validation.

One YAML or JSON file holds the model, the data, the method, the schedule, logging, checkpointing and
the DeepSpeed configuration (inline, or a path to a DeepSpeed JSON). Every error is found before any
heavy work starts and names the offending key, what was expected and, for a misspelt key, the closest
valid one. The schema is the set of dataclasses below: their fields are the only keys accepted.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
import typing
import warnings
from dataclasses import dataclass, field
from typing import Any

import yaml

from ..export.final_model import FINAL_MODEL_CHOICES, final_kind
from ..methods.elalora_config import ElaLoRAConfig
from ..methods.scalora_config import ScaLoRAConfig
from ..precision import POLICY_NAMES
from ..scaling import SOLVERS
from .methods import METHODS
from . import best, schedule
from .data import FORMATS
from .model_source import ModelSourceError, check_model_source, resolve_model_source
from .renamed_keys import rename, renamed_override
from .reporters import REPORTERS, missing_packages


class ConfigError(ValueError):
    """A run configuration that cannot be used; the message says which key and what to do."""


@dataclass
class ModelConfig:
    # a local Hugging Face model directory, a Hub id ("org/name") already in the local Hugging Face cache
    # (nothing is downloaded), or "package:<pkg>/<file>.gguf"
    model_name_or_path: str | None = None
    random_init: dict | None = None  # or: a LlamaConfig's fields, for a random-init model (tests, CI)
    dtype: str = "bf16"  # bf16 | fp32
    gradient_checkpointing: bool = False
    attn_implementation: str | None = None  # e.g. "sdpa", "eager"


@dataclass
class DataConfig:
    train: str = ""  # JSON/JSONL/Parquet file or a saved `datasets` directory
    eval: str | None = None  # held-out file; if absent, eval_fraction of train is held out
    eval_fraction: float = 0.05
    format: str = "auto"  # auto | text | prompt_completion | chat | alpaca | sharegpt (data.py)
    max_length: int = 512
    packing: bool = False  # several rows per sequence, each attending to itself only (data.py)
    mask_history: bool = False  # chat: loss on the last assistant turn only (LLaMA-Factory's name); default every turn
    chat_template: str | None = None  # a Jinja chat template, or a file holding one (read at load), instead of the tokenizer's


def run_options(cls, exclude: tuple = (), defaults: dict | None = None, overrides: dict | None = None):
    """A method config's block in the run config: the same fields, types, defaults and help as the library's
    config class (one owner), less those the run sets itself, with the run's own defaults where they differ.
    ``overrides`` maps a field to (type, help) where the run reads it differently (a fraction of the run)."""
    hints, defaults, overrides = typing.get_type_hints(cls), defaults or {}, overrides or {}
    specs = []
    for f in dataclasses.fields(cls):
        if f.name in exclude:
            continue
        kind, help_ = overrides.get(f.name, (hints[f.name], f.metadata.get("help", "")))
        specs.append((f.name, kind, field(default=defaults.get(f.name, f.default), metadata={"help": help_})))
    options = dataclasses.make_dataclass(f"{cls.__name__.removesuffix('Config')}Options", specs)
    options.__module__ = __name__
    return options


# ScaLoRAConfig's fields; the run trains ScaLoRA-I (interval 10) unless told otherwise, seeds from train.seed,
# refreshes PEFT's default adapter, and gets ReLoRA as its own method (method.name: relora)
ScaLoRAOptions = run_options(ScaLoRAConfig, exclude=("adapter", "seed", "restart"), defaults={"interval": 10})


# ElaLoRAConfig's fields; the run sets the total steps and the initial rank (method.r), seeds from train.seed,
# and reads the warm-ups as fractions of train.max_steps (elalora_config resolves them)
_RUN_FRACTION = "a fraction of train.max_steps if < 1, else a count"
ElaLoRAOptions = run_options(
    ElaLoRAConfig, exclude=("total_steps", "init_rank", "init_value", "seed", "adapter"),
    defaults={"max_rank": 0, "init_warmup": 0.1, "final_warmup": 0.2},
    overrides={"max_rank": (int, "slots per matrix (the most one matrix can reach); 0 = 2 x method.r"),
               "init_warmup": (float, f"steps before the first reallocation: {_RUN_FRACTION}"),
               "final_warmup": (float, f"final steps with frozen ranks: {_RUN_FRACTION}")})


@dataclass
class ReLoRAOptions:
    """The merge-and-restart baseline (ReLoRA-style): merge, re-initialise, reset moments, re-warm."""

    interval: int = 10  # steps between restarts
    warmup_steps: int = 10  # steps before the first restart
    rewarm_steps: int = 3  # the learning rate ramps up again over this many steps after each restart


@dataclass
class MethodConfig:
    name: str = "scalora"  # lora | rslora | scalora | elalora | relora | full
    r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    target_modules: list | str = "all-linear"  # module names, or PEFT's "all-linear" (every linear layer but the output; for
    # method "full": a list trains only those modules' weights, "all-linear" every parameter)
    use_rslora: bool = False  # alpha/sqrt(r) scaling (implied by name: rslora)
    scalora: ScaLoRAOptions = field(default_factory=ScaLoRAOptions)
    elalora: ElaLoRAOptions = field(default_factory=ElaLoRAOptions)
    relora: ReLoRAOptions = field(default_factory=ReLoRAOptions)


@dataclass
class TrainConfig:
    """``transformers.TrainingArguments``' names and meanings, where the run has the same knob."""

    output_dir: str = "runs/default"
    max_steps: int = -1  # > 0: the run's length in optimizer steps; -1: num_train_epochs decides
    num_train_epochs: float = 3.0  # epochs of the training rows, counted as the Trainer counts them (schedule.py)
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: float = 0  # a count, or a fraction of the run if < 1 (transformers 5)
    warmup_ratio: float = 0.0  # a fraction of the run (transformers 4, LLaMA-Factory, axolotl); not with warmup_steps
    lr_scheduler_type: str = "cosine"  # any of transformers.get_scheduler's (schedule.SCHEDULERS)
    lr_scheduler_kwargs: dict = field(default_factory=dict)  # e.g. {min_lr_rate: 0.1} with cosine_with_min_lr
    per_device_train_batch_size: int = 4
    per_device_eval_batch_size: int | None = None  # default: per_device_train_batch_size
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0
    seed: int = 0
    resume_from_checkpoint: str = "auto"  # auto | never | a checkpoint directory
    allow_batch_change: bool = False  # resume with a global batch other than the checkpoint's (refused by default)
    divergence_patience: int = 3  # stop after this many steps in a row with a non-finite loss or a non-finite or zero gradient norm; 0 = never
    logging_steps: int = 10
    eval_steps: int = 50  # optimizer steps between evaluations; 0 = only at the end
    eval_on_start: bool = False  # also evaluate the model before any training step (the baseline)
    save_steps: int = 0  # optimizer steps between checkpoints; 0 = only at the end
    save_total_limit: int = 2  # complete checkpoints kept (the newest)
    report_to: str | list = "tensorboard"  # tensorboard | wandb (offline) | mlflow (local store) | none, or a list (reporters.py)
    metric_for_best_model: str | None = None  # eval_loss (default) | eval_ppl | eval_exact_match (best.py)
    greater_is_better: bool | None = None  # default: False for a loss, True otherwise
    load_best_model_at_end: bool = False  # <output_dir>/model from the best saved evaluation, which rotation keeps
    early_stopping_patience: int = 0  # stop after this many evaluations in a row without improvement; 0 = never
    early_stopping_threshold: float = 0.0  # an improvement smaller than this does not count


@dataclass
class EvalConfig:
    max_batches: int = 50  # eval batches in all, split over the ranks (the same rows at any world size)
    exact_match: bool = False  # greedy generation on prompt/completion or chat rows
    exact_match_every_eval: bool = True  # False: exact match only before training and at the end (it is slow)
    max_new_tokens: int = 16


@dataclass
class CheckpointConfig:
    final_model: str = "auto"  # <output_dir>/model at the end: auto | merged | adapter | none (export/final_model.py)


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    deepspeed: Any = None  # inline DeepSpeed config (a mapping) or a path to a DeepSpeed JSON

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


CHOICES = {
    "model.dtype": ("bf16", "fp32"),
    "data.format": FORMATS,
    "method.name": tuple(METHODS),
    "method.scalora.solver": SOLVERS,
    "method.scalora.precision": ("auto", *POLICY_NAMES),
    "train.lr_scheduler_type": schedule.SCHEDULERS,
    "checkpoint.final_model": FINAL_MODEL_CHOICES,
}


def load_config(path: str, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML/JSON run config, apply ``dotted.key=value`` overrides, validate, return it."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist")
    with open(path) as f:
        try:
            raw = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML/JSON: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping at the top level, found {type(raw).__name__}")
    try:
        raw, notes = rename(raw, path)  # the 0.1 names, read as the Hugging Face / PEFT ones
    except ValueError as e:
        raise ConfigError(str(e)) from None
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected dotted.key=value, e.g. --set train.max_steps=100")
        key, value, note = renamed_override(key.strip(), yaml.safe_load(value) if value.strip() else "")
        notes += [note] if note else []
        _set_dotted(raw, key, value)
    if os.environ.get("RANK", "0") == "0":
        for note in notes:
            warnings.warn(note, FutureWarning, stacklevel=2)
    config = _build(RunConfig, raw, "")
    base_dir = os.path.dirname(os.path.abspath(path))
    _validate(config, base_dir)
    _resolve_paths(config, base_dir)
    return config


def _set_dotted(raw: dict, key: str, value) -> None:
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"--set {key}: {part!r} is not a section")
        node = nxt
    node[parts[-1]] = value


def _build(cls, raw: dict, prefix: str):
    """Instantiate ``cls`` from ``raw``, refusing unknown keys and values of the wrong type."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, found {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        where = f"{prefix}{key}"
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else f"; valid keys here: {', '.join(names)}"
            raise ConfigError(f"unknown key {where!r}{hint}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value if value is not None else {}, where + ".")
        else:
            kwargs[key] = _check_type(where, value, hint)
    return cls(**kwargs)


_FLOAT_TEXT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def _check_type(where: str, value, hint):
    if hint is Any:
        return value
    origin = typing.get_origin(hint)
    options = typing.get_args(hint) if origin in (typing.Union, getattr(__import__("types"), "UnionType", ())) else (hint,)
    for option in options:
        if option is type(None) and value is None:
            return None
        base = typing.get_origin(option) or option
        if base is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if base is float and isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string; everyone writes it that way
        if base is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if base in (str, bool, list, dict) and isinstance(value, base):
            return value
    wanted = " or ".join("null" if o is type(None) else (typing.get_origin(o) or o).__name__ for o in options)
    raise ConfigError(f"{where} must be {wanted}, got {value!r} ({type(value).__name__})")


def _validate(config: RunConfig, base_dir: str) -> None:
    for key, allowed in CHOICES.items():
        value = _get(config, key)
        if value not in allowed:
            close = difflib.get_close_matches(str(value), allowed, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{key} must be one of {', '.join(allowed)}, got {value!r}{hint}")
    for key in ("train.per_device_train_batch_size", "train.gradient_accumulation_steps", "method.r",
                "data.max_length", "method.scalora.interval", "method.relora.interval", "train.logging_steps"):
        if _get(config, key) < 1:
            raise ConfigError(f"{key} must be >= 1, got {_get(config, key)}")
    for key in ("train.eval_steps", "train.save_steps", "train.save_total_limit"):
        if _get(config, key) < 0:
            raise ConfigError(f"{key} must be >= 0, got {_get(config, key)}")
    if config.train.per_device_eval_batch_size is not None and config.train.per_device_eval_batch_size < 1:
        raise ConfigError(f"train.per_device_eval_batch_size must be >= 1, got {config.train.per_device_eval_batch_size}")
    try:
        schedule.check(config.train)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    _check_report_to(config.train.report_to)
    try:
        best.check(config.train, config.eval)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    _check_target_modules(config.method.target_modules)
    if not 0 <= config.data.eval_fraction < 1:
        raise ConfigError(f"data.eval_fraction must be in [0, 1), got {config.data.eval_fraction}")
    sized = config if config.train.max_steps > 0 else dataclasses.replace(
        config, train=dataclasses.replace(config.train, max_steps=NOMINAL_STEPS))  # checked again once sized (loop)
    try:  # the method's own config owns these checks (strength, shrink, max_scale, ablation, ...); always
        METHODS["scalora"].config(sized)  # checked: ReLoRA takes its precision and sketch from these options
    except ValueError as e:
        raise ConfigError(f"method.scalora: {e}") from None
    for key in ("method.relora.warmup_steps", "method.relora.rewarm_steps"):
        if _get(config, key) < 0:
            raise ConfigError(f"{key} must be >= 0, got {_get(config, key)}")
    check_method(sized)
    try:
        final_kind(config.method.name, config.checkpoint.final_model)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    m = config.model
    if (m.model_name_or_path is None) == (m.random_init is None):
        raise ConfigError("set exactly one of model.model_name_or_path (a local model directory or a Hub id in the "
                          "local Hugging Face cache) and model.random_init")
    if m.model_name_or_path is not None:
        try:
            check_model_source(m.model_name_or_path, base_dir)
        except ModelSourceError as e:
            raise ConfigError(str(e)) from None
    if not config.data.train:
        raise ConfigError("data.train is required: a JSON/JSONL/Parquet file or a saved dataset directory")
    for key in ("data.train", "data.eval"):
        value = _get(config, key)
        if value and not os.path.exists(_resolve(value, base_dir)):
            raise ConfigError(f"{key} {value!r} does not exist")
    template = config.data.chat_template
    if template is not None and not _is_template(template) and not os.path.isfile(_resolve(template.strip(), base_dir)):
        raise ConfigError(f"data.chat_template {template[:60]!r} is neither a Jinja template (no '{{%' or '{{{{') nor "
                          "an existing file holding one")
    ds = config.deepspeed
    if isinstance(ds, str):
        resolved = _resolve(ds, base_dir)
        if not os.path.isfile(resolved):
            raise ConfigError(f"deepspeed {ds!r} is not a file; give a DeepSpeed JSON path or an inline mapping")
        try:
            with open(resolved) as f:
                ds = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"deepspeed config {ds!r} is not valid JSON: {e}") from None
    elif ds is not None and not isinstance(ds, dict):
        raise ConfigError(f"deepspeed must be a mapping or a path to a JSON file, got {type(ds).__name__}")
    if isinstance(ds, dict) and "optimizer" in ds:
        raise ConfigError("remove the deepspeed.optimizer block: the optimizer is built from train.* (torch AdamW)")
    if isinstance(ds, dict):
        check_batch_keys(ds, config, world=None)


NOMINAL_STEPS = 10**6  # the run length the method configs are checked with while num_train_epochs decides it


def check_method(config: RunConfig) -> None:
    """The method's own config checks (ConfigError naming the method's block)."""
    try:
        METHODS[config.method.name].config(config)
    except ValueError as e:
        raise ConfigError(f"method.{config.method.name}: {e}") from None


def reporters(report_to) -> list[str]:
    """``train.report_to`` as a list of integrations ("none" and [] mean none)."""
    names = [report_to] if isinstance(report_to, str) else list(report_to)
    return [n for n in names if n != "none"]


def _check_report_to(report_to) -> None:
    names = [report_to] if isinstance(report_to, str) else report_to
    for name in names:
        if name not in REPORTERS:
            close = difflib.get_close_matches(str(name), REPORTERS, n=1)
            raise ConfigError(f"train.report_to: {name!r} is not supported; use one of {', '.join(REPORTERS)}"
                              + (f" (did you mean {close[0]!r}?)" if close else ""))
    missing = missing_packages(reporters(report_to))
    if missing:
        raise ConfigError(f"train.report_to needs {', '.join(missing)}, which is not installed: pip install "
                          f"{' '.join(missing)} (or pip install -e \".[report]\"), or drop it from train.report_to")


def _check_target_modules(target) -> None:
    if isinstance(target, str) and target != "all-linear":
        raise ConfigError(f"method.target_modules must be a list of module names or 'all-linear', got {target!r}")
    if isinstance(target, list) and (not target or not all(isinstance(t, str) and t for t in target)):
        raise ConfigError(f"method.target_modules must be a non-empty list of module names, got {target!r}")


# DeepSpeed keys that repeat a run-config value: "auto" (or absent) takes the run config's, a number must agree.
SHARED_KEYS = {
    "train_micro_batch_size_per_gpu": "train.per_device_train_batch_size",
    "gradient_accumulation_steps": "train.gradient_accumulation_steps",
    "gradient_clipping": "train.max_grad_norm",
}


def check_batch_keys(ds: dict, config: RunConfig, world: int | None) -> None:
    """Refuse a DeepSpeed config whose batch or clipping values contradict the run config's."""
    for ds_key, key in SHARED_KEYS.items():
        value = ds.get(ds_key, "auto")
        if value != "auto" and value != _get(config, key):
            raise ConfigError(
                f"deepspeed.{ds_key} is {value!r} but {key} is {_get(config, key)!r}; make them agree, or write "
                f'"auto" in the DeepSpeed config to take {key}'
            )
    total = ds.get("train_batch_size", "auto")
    if world is not None and total != "auto":
        t = config.train
        expected = t.per_device_train_batch_size * t.gradient_accumulation_steps * world
        if total != expected:
            raise ConfigError(
                f"deepspeed.train_batch_size is {total!r} but micro batch {t.per_device_train_batch_size} x accumulation "
                f'{t.gradient_accumulation_steps} x {world} ranks = {expected}; write "auto" or the product'
            )


def _resolve_paths(config: RunConfig, base_dir: str) -> None:
    """Store every file path as it was found (working directory first, then the config's directory)."""
    if config.model.model_name_or_path is not None:
        config.model.model_name_or_path = resolve_model_source(config.model.model_name_or_path, base_dir)
    if config.data.chat_template and not _is_template(config.data.chat_template):
        # the template itself, not its path: the run's stored config carries it to the exported tokenizer
        with open(_resolve(config.data.chat_template.strip(), base_dir), encoding="utf-8") as f:
            config.data.chat_template = f.read()
    for key in ("train", "eval"):
        value = getattr(config.data, key)
        if value:
            setattr(config.data, key, _resolve(value, base_dir))
    if isinstance(config.deepspeed, str):
        config.deepspeed = _resolve(config.deepspeed, base_dir)


def elalora_config(config: RunConfig):
    """The run's :class:`~ds_scalora.methods.ElaLoRAConfig` (fractions of the run resolved to steps)."""
    o, T = config.method.elalora, config.train.max_steps

    def steps(value, key):
        if value < 0:
            raise ValueError(f"{key} must be >= 0, got {value}")
        return int(round(value * T)) if value < 1 else int(value)

    options = {f.name: getattr(o, f.name) for f in dataclasses.fields(o)}
    options.update(max_rank=o.max_rank or 2 * config.method.r, init_warmup=steps(o.init_warmup, "init_warmup"),
                   final_warmup=steps(o.final_warmup, "final_warmup"))
    return ElaLoRAConfig(total_steps=T, init_rank=config.method.r, seed=config.train.seed, **options)


def _is_template(value: str) -> bool:
    return "{%" in value or "{{" in value


def _get(config, dotted: str):
    node = config
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def _resolve(path: str, base_dir: str) -> str:
    """Relative paths are taken from the working directory, then from the config file's directory."""
    return path if os.path.exists(path) or os.path.isabs(path) else os.path.join(base_dir, path)
