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
from dataclasses import dataclass, field

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))

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
    metric: str  # the eval metric reported (higher is better)
    what: str  # one line for the report
    make_data: str | None = None  # name of a generator in this module, writing the task's files
    steps: int | None = None  # overrides the preset's steps and eval interval for this task
    eval_every: int | None = None
    lrs: dict | None = None  # per-method learning-rate grids overriding the preset's for this task


def task_schedule(preset: "Preset", task: Task) -> tuple[int, int]:
    """(steps, eval interval) of ``task`` under ``preset``."""
    return task.steps or preset.steps, task.eval_every or preset.eval_every


def task_lrs(preset: "Preset", task: Task, method: str) -> list:
    return (task.lrs or {}).get(method, preset.lrs[method])


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
    # CI: the whole harness end to end on the tiny random-init model, in about a minute
    "quick": Preset("quick", [
        Task("lookup", "ds_configs/tiny.yaml", {"method.r": 4, "eval.max_batches": 2}, "eval_exact_match",
             "tiny random-init Llama, 3-digit codes of 6-letter words (ds_configs/data/lookup_*)"),
    ], steps=12, eval_every=6, seeds=[0], lrs={m: [5e-3] for m in METHODS} | {"full": [1e-3]}, cost_steps=6,
        cost_repeats=1),  # fmt: skip
    # the development machine (2 CPU cores): SmolLM2-135M on the demo task and on memorising facts
    "cpu": Preset("cpu", [
        # evaluated every 5 steps: at every 10 (until 2026-11-23) all methods reached exact match 1.0 at the
        # second eval, so "steps to LoRA's final" could only read 1.0 or 0.5
        Task("dates", "ds_configs/demo.yaml", {"method.r": 8, "eval.at_start": True}, "eval_exact_match",
             "SmolLM2-135M-Instruct, ISO date -> DD/MM/YYYY (the demo task), exact match on 24 held-out dates",
             eval_every=5),
        # sized so that full fine-tuning stores the facts within the budget and rank-4 LoRA does not yet
        # (docs/benchmarks.md: 1.00 vs 0.31 ± 0.31 exact match at 100 steps, two seeds)
        Task("facts", "ds_configs/demo.yaml", {"method.r": 4, "data.max_length": 32, "eval.max_new_tokens": 8,
                                               "eval.max_batches": 4, "data.format": "prompt_completion",
                                               "train.micro_batch_size": 16, "eval.at_start": True},
             "eval_exact_match", "SmolLM2-135M-Instruct, memorise 128 random 6-letter -> 6-digit codes (exact match "
             "on the first 64), rank 4 on every linear layer, 100 steps of 16 (12.5 epochs)", make_data="facts128",
             steps=100, eval_every=20,
             # shifted one step (x 1/2; full x 2) on 2026-11-24: with two seeds every method but ElaLoRA was best
             # at the edge of the earlier grid (this file's git history), and the top rate learned nothing
             lrs={"lora": [1e-3, 2e-3, 4e-3], "rslora": [5e-4, 1e-3, 2e-3], "scalora": [1e-3, 2e-3, 4e-3],
                  "scalora-I": [1e-3, 2e-3, 4e-3], "elalora": [5e-3, 1e-2, 2e-2], "relora": [1e-3, 2e-3, 4e-3],
                  "full": [1e-4, 2e-4, 4e-4]}),
    ], steps=40, eval_every=10, seeds=[0, 1],
        lrs={"lora": LR_ADAPTER, "rslora": [5e-4, 1e-3, 2e-3], "scalora": LR_ADAPTER, "scalora-I": LR_ADAPTER,
             "elalora": [2e-3, 5e-3, 1e-2], "relora": LR_ADAPTER, "full": [2e-5, 5e-5, 1e-4]}),  # fmt: skip
}


def method_overrides(method: str, steps: int) -> dict:
    out = {}
    for key, value in METHODS[method].items():
        if isinstance(value, str) and value.startswith("{T/"):
            value = max(1, steps // int(value[3:-1]))
        out[key] = value
    return out


def run_config(task: Task, method: str, lr: float, seed: int, steps: int, eval_every: int, out_dir: str,
               data_dir: str, extra: dict | None = None):  # fmt: skip
    """The RunConfig of one benchmark run (validated like any user config)."""
    from ..train.config import load_config

    sets = {**task.overrides, **method_overrides(method, steps), "train.learning_rate": lr, "train.seed": seed,
            "train.max_steps": steps, "eval.every": eval_every, "train.output_dir": out_dir, "train.resume": "never",
            "checkpoint.every": 0, "checkpoint.keep_last": 1, "logging.every": 1, "logging.tensorboard": False,
            **(extra or {})}  # fmt: skip
    if task.make_data:
        sets.update(make_facts(data_dir, int(task.make_data.removeprefix("facts"))))
    overrides = [f"{k}={_yaml_value(v)}" for k, v in sets.items()]
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

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    defaults = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
    if "MASTER_PORT" not in os.environ:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])


def train_once(cfg, hooks=None, log_path: str | None = None) -> dict:
    """``launch/train.py``'s run in this process, its console output kept in ``log_path``."""
    from ..train.loop import run

    ensure_process_group()
    sink = open(log_path, "w") if log_path else io.StringIO()
    try:
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            return run(cfg, hooks=hooks)
    finally:
        sink.close()
