"""What the benchmark runs: methods, tasks, presets, and one training run in this process.

A *run* is the training entry point itself (``ds_scalora.train.loop.run``) on a run config built from
a shipped YAML plus overrides, at one data-parallel rank, so every method is measured through the same
code users run. A preset fixes the model, the tasks, the steps, the learning-rate grid of every method
and the seeds; the report says which preset produced it.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import shutil
from dataclasses import dataclass, field

from . import REPO
from ..checkpoint.layout import checkpoint_root


# Every method as run-config overrides; {T} is the run's steps. Restart/refresh intervals follow the
# papers' defaults scaled to short runs: ScaLoRA-I refreshes every 10 steps, ReLoRA restarts 4 times.
# ScaLoRA's warm-up is the library default (10 steps, as in the demo). Until 2026-11-23 the benchmark
# set 2, a value of its own: on the facts task the first refresh then came while lora_B was still near
# its zero init and set training back (those runs are described in the README's git history).
METHODS = {
    "lora": {"method.name": "lora"},
    "rslora": {"method.name": "rslora"},
    "scalora": {"method.name": "scalora", "method.scalora.interval": 1},
    "scalora-I": {"method.name": "scalora", "method.scalora.interval": 10},
    "elalora": {"method.name": "elalora", "method.elalora.interval": 5, "method.elalora.moves": 12},
    "relora": {"method.name": "relora", "method.relora.interval": "{T/5}", "method.relora.warmup_steps": "{T/5}",
               "method.relora.rewarm_steps": 3},
    "full": {"method.name": "full"},
}


@dataclass
class Task:
    name: str
    config: str  # a shipped run config, relative to the repository
    overrides: dict  # applied on top of it
    metric: str | None  # the eval metric reported (higher is better); None for a cost configuration
    what: str  # one line for the report
    make_data: str | None = None  # name of a generator in this module, writing the task's files
    steps: int | None = None  # overrides the preset's steps and eval interval for this task
    eval_every: int | None = None
    lrs: dict | None = None  # per-method learning-rate grids overriding the preset's for this task
    seeds: list | None = None  # overrides the preset's seeds for this task
    excluded: dict | None = None  # method -> why it is not run on this task (e.g. does not fit the GPU)
    reference: str | None = None  # plain-LoRA figures measured elsewhere, quoted as a lead (not a ratio)


def task_schedule(preset: "Preset", task: Task) -> tuple[int, int]:
    """(steps, eval interval) of ``task`` under ``preset``."""
    return task.steps or preset.steps, task.eval_every or preset.eval_every


def task_seeds(preset: "Preset", task: Task) -> list:
    return task.seeds or preset.seeds


def task_lrs(preset: "Preset", task: Task, method: str) -> list:
    return (task.lrs or {}).get(method, preset.lrs[method])


def task_methods(preset: "Preset", task: Task, methods: list | None = None) -> list:
    """The methods run on ``task``: ``methods`` (default: the preset's) less the task's exclusions."""
    return [m for m in (methods or preset.methods) if m not in (task.excluded or {})]


@dataclass
class Preset:
    name: str
    tasks: list
    steps: int
    eval_every: int
    seeds: list
    lrs: dict  # method -> learning rates swept
    methods: list = field(default_factory=lambda: list(METHODS))
    # 2 warm-up steps, then cost_steps - 3 measured (the last, with the final eval, is dropped): 24 gives
    # 21 measured steps holding two ScaLoRA-I refreshes (steps 12 and 22: tools/benchmark.py's cost runs
    # start refreshing at step 2), its amortised share
    cost_steps: int = 24
    cost_repeats: int = 2  # interleaved rounds over the methods; the fastest round of each counts
    quality: bool = True  # False: the tasks are cost configurations only (no learning-rate sweep, no seeds)
    # the methods whose cost is measured (None: all); each costs a fresh process (~16 s on 2 cores)
    cost_methods: list | None = None


def facts_rows(n: int, seed: int = 0) -> list[dict]:
    """``n`` random facts "Code of <6 letters>?" -> 6 digits: nothing to generalise, only to store,
    so the capacity (rank) of the update decides how many are learned."""
    rng = random.Random(seed)
    seen, rows = set(), []
    while len(rows) < n:
        key = "".join(rng.choice("bcdfghjklmnpqrstvwxz") + rng.choice("aeiou") for _ in range(3))
        if key in seen:
            continue
        seen.add(key)
        rows.append({"prompt": f"Code of {key}?\n", "completion": f"{rng.randint(0, 999999):06d}"})
    return rows


def make_facts(out_dir: str, n: int) -> dict:
    """Train on all ``n`` facts, evaluate on (a fixed subset of) the same facts: memorisation."""
    os.makedirs(out_dir, exist_ok=True)
    rows = facts_rows(n)
    paths = {"data.train": os.path.join(out_dir, f"facts{n}_train.jsonl"),
             "data.eval": os.path.join(out_dir, f"facts{n}_eval.jsonl")}  # fmt: skip
    for key, subset in (("data.train", rows), ("data.eval", rows[: min(n, 128)])):
        with open(paths[key], "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in subset)
    return paths


LR_ADAPTER = [1e-3, 2e-3, 4e-3]
PRESETS = {
    # CI: the whole harness end to end on the tiny random-init model, in about a minute (cost: two methods)
    "quick": Preset("quick", [
        Task("lookup", "ds_configs/tiny.yaml", {"method.r": 4, "eval.max_batches": 2}, "eval_exact_match",
             "tiny random-init Llama, 3-digit codes of 6-letter words (ds_configs/data/lookup_*)"),
    ], steps=12, eval_every=6, seeds=[0], lrs={m: [5e-3] for m in METHODS} | {"full": [1e-3]}, cost_steps=6,
        cost_repeats=1, cost_methods=["lora", "scalora-I"]),  # fmt: skip
    # the development machine (2 CPU cores): SmolLM2-135M on the demo task and on memorising facts
    "cpu": Preset("cpu", [
        # evaluated every 5 steps: at every 10 (until 2026-11-23) all methods reached exact match 1.0 at the
        # second eval, so "steps to LoRA's final" could only read 1.0 or 0.5
        Task("dates", "ds_configs/demo.yaml", {"method.r": 8, "train.eval_on_start": True}, "eval_exact_match",
             "SmolLM2-135M-Instruct, ISO date -> DD/MM/YYYY (the demo task), exact match on 24 held-out dates",
             eval_every=5),
        # sized so that full fine-tuning stores the facts within the budget and rank-4 LoRA does not yet
        # (docs/benchmarks.md: 1.00 vs 0.37 ± 0.24 exact match at 100 steps, three seeds)
        Task("facts", "ds_configs/demo.yaml", {"method.r": 4, "data.max_length": 32, "eval.max_new_tokens": 8,
                                               "eval.max_batches": 4, "data.format": "prompt_completion",
                                               "train.per_device_train_batch_size": 16, "train.eval_on_start": True},
             "eval_exact_match", "SmolLM2-135M-Instruct, memorise 128 random 6-letter -> 6-digit codes (exact match "
             "on the first 64), rank 4 on every linear layer, 100 steps of 16 (12.5 epochs)", make_data="facts128",
             steps=100, eval_every=20,
             # three seeds (from 2026-11-24): with two, the seed moved LoRA and ScaLoRA by ~0.45 exact match
             seeds=[0, 1, 2],
             # shifted one step (x 1/2; full x 2) on 2026-11-24: with two seeds every method but ElaLoRA was best
             # at the edge of the earlier grid (this file's git history), and the top rate learned nothing
             # rsLoRA's widened to 4e-3 after the third seed put its optimum at 2e-3, the grid's top
             lrs={"lora": [1e-3, 2e-3, 4e-3], "rslora": [5e-4, 1e-3, 2e-3, 4e-3], "scalora": [1e-3, 2e-3, 4e-3],
                  "scalora-I": [1e-3, 2e-3, 4e-3], "elalora": [5e-3, 1e-2, 2e-2], "relora": [1e-3, 2e-3, 4e-3],
                  "full": [1e-4, 2e-4, 4e-4]}),
    ], steps=40, eval_every=10, seeds=[0, 1],
        lrs={"lora": LR_ADAPTER, "rslora": [5e-4, 1e-3, 2e-3], "scalora": LR_ADAPTER, "scalora-I": LR_ADAPTER,
             "elalora": [2e-3, 5e-3, 1e-2], "relora": LR_ADAPTER, "full": [2e-5, 5e-5, 1e-4]}),  # fmt: skip
}


# The GPU shapes of the reference figures in ../shared/gpu.md (random init: no weights ship offline; the
# cost of a step depends on the shapes, not on the values). Mistral-NeMo's heads are 128 wide, not 5120/32.
TINYLLAMA_1B = {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
                "num_key_value_heads": 4, "vocab_size": 32000, "max_position_embeddings": 2048}
MISTRAL_NEMO_12B = {"hidden_size": 5120, "intermediate_size": 14336, "num_hidden_layers": 40, "num_attention_heads": 32,
                    "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 131072, "max_position_embeddings": 2048}
GPU_RUN = {"model.model_name_or_path": None, "model.dtype": "bf16", "data.max_length": 2048, "data.packing": True,
           "train.gradient_accumulation_steps": 1}
PRESETS["gpu"] = Preset("gpu", [
    # the shipped one-GPU config, at the reference's shape and batch
    Task("1b", "ds_configs/gpu1_zero2.yaml", {**GPU_RUN, "model.random_init": TINYLLAMA_1B, "method.r": 16,
                                              "method.lora_alpha": 32, "train.per_device_train_batch_size": 4},
         None, "1.1B (TinyLlama shape, random init), bf16, ZeRO-2, r = 16 on all seven projections, micro-batch 4 "
         "x 2048 packed tokens (ds_configs/gpu1_zero2.yaml)",
         reference="plain LoRA r16, ZeRO-2, micro-batch 4 on an H100 80GB: 35,700 tokens/s, 19.0 GiB peak"),
    # the shipped config for a 12B model on one 80 GB GPU (ScaLoRA's accumulator in bf16_pair)
    Task("12b", "ds_configs/12b_gpu1_zero2.yaml", {**GPU_RUN, "model.random_init": MISTRAL_NEMO_12B, "method.r": 8,
                                                   "method.lora_alpha": 16, "train.per_device_train_batch_size": 2},
         None, "12.2B (Mistral-NeMo-12B shape, random init), bf16, ZeRO-2, gradient checkpointing, r = 8 on all "
         "seven projections, micro-batch 2 x 2048 packed tokens (ds_configs/12b_gpu1_zero2.yaml)",
         excluded={"full": "12.2B parameters with fp32 Adam states (~200 GB) do not fit one 80 GB GPU"},
         reference="plain LoRA r8, ZeRO-2, gradient checkpointing, micro-batch 2 on an H100 80GB: 4,900 tokens/s, "
                   "32.0 GiB peak"),
], steps=40, eval_every=0, seeds=[0], lrs=PRESETS["cpu"].lrs, quality=False,
    # a GPU is lent for about 15 minutes a session: one round of the three methods the GPU targets name
    # (issue 21: ScaLoRA-I <= 1.02x, ScaLoRA <= 1.10x LoRA), about a minute per 12B process
    cost_repeats=1, cost_methods=["lora", "scalora-I", "scalora"])  # fmt: skip


def method_overrides(method: str, steps: int) -> dict:
    out = {}
    for key, value in METHODS[method].items():
        if isinstance(value, str) and value.startswith("{T/"):
            value = max(1, steps // int(value[3:-1]))
        out[key] = value
    return out


def run_config(task: Task, method: str, lr: float, seed: int, steps: int, eval_every: int, out_dir: str,
               data_dir: str, extra: dict | None = None, user_sets: list | tuple = ()):  # fmt: skip
    """The RunConfig of one benchmark run (validated like any user config); ``user_sets`` are the
    command line's ``--set key=value`` overrides, applied last."""
    from ..train.config import load_config

    sets = {**task.overrides, **method_overrides(method, steps), "train.learning_rate": lr, "train.seed": seed,
            "train.max_steps": steps, "train.eval_steps": eval_every, "train.output_dir": out_dir, "train.resume_from_checkpoint": "never",
            "train.save_steps": 0, "train.save_total_limit": 1, "checkpoint.final_model": "none", "train.logging_steps": 1, "train.report_to": "none",
            **(extra or {})}  # fmt: skip
    if task.make_data:
        sets.update(make_facts(data_dir, int(task.make_data.removeprefix("facts"))))
    overrides = [f"{k}={_yaml_value(v)}" for k, v in sets.items()] + list(user_sets)
    return load_config(os.path.join(REPO, task.config), overrides)


def _yaml_value(v) -> str:
    """A ``--set`` value that YAML reads back as the same type: YAML 1.1 reads ``5e-05`` as a string,
    so a float in exponent form gets its decimal point (``5.0e-05``)."""
    if isinstance(v, str):
        return v
    if isinstance(v, float):
        text = repr(v)
        return text.replace("e", ".0e", 1) if "e" in text and "." not in text else text
    return json.dumps(v)


def ensure_process_group() -> None:
    """One-rank gloo group for in-process runs (``deepspeed.init_distributed`` reads these)."""
    import torch

    from ..zero.single_process import one_rank_if_not_launched

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    one_rank_if_not_launched()


def train_once(cfg, hooks=None, log_path: str | None = None) -> dict:
    """``launch/train.py``'s run in this process, its console output kept in ``log_path``."""
    from ..train.loop import run

    ensure_process_group()
    # a benchmark run starts afresh (train.resume_from_checkpoint=never refuses a directory holding checkpoints): what an
    # interrupted earlier attempt left is discarded
    shutil.rmtree(checkpoint_root(cfg.train.output_dir), ignore_errors=True)
    sink = open(log_path, "w") if log_path else io.StringIO()
    try:
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            return run(cfg, hooks=hooks)
    finally:
        sink.close()
