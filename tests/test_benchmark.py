"""The benchmark harness: its bookkeeping on synthetic results, and ``--preset quick`` end to end."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ds_scalora.bench import report
from ds_scalora.bench.grid import PRESETS, Task

REPO = Path(__file__).resolve().parents[1]
TASK = Task("facts", "ds_configs/tiny.yaml", {}, "eval_exact_match", "synthetic")


def run(method, lr, seed, curve, loss=1.0, rank=4.0, losses=None):
    losses = losses or [loss] * len(curve)
    history = [{"step": s, "eval_exact_match": v, "eval_loss": x} for (s, v), x in zip(curve, losses)]
    return {"method": method, "lr": lr, "seed": seed, "history": history, "final": history[-1],
            "update_rank_mean": rank}  # fmt: skip


def test_learning_rate_choice_steps_to_reach_and_targets():
    runs = [
        run("lora", 1e-3, 0, [(10, 0.1), (20, 0.3), (30, 0.5)], losses=[1.0, 0.6, 0.4]),
        run("lora", 1e-3, 1, [(10, 0.1), (20, 0.3), (30, 0.5)], losses=[1.0, 0.6, 0.4]),
        run("lora", 2e-3, 0, [(10, 0.2), (20, 0.2), (30, 0.2)]), run("lora", 2e-3, 1, [(10, 0.2), (20, 0.2), (30, 0.2)]),
        run("scalora", 1e-3, 0, [(10, 0.2), (20, 0.6), (30, 0.7)], losses=[0.9, 0.5, 0.3]),
        run("scalora", 1e-3, 1, [(10, 0.2), (20, 0.4), (30, 0.7)], losses=[0.9, 0.3, 0.3]),
        run("full", 1e-4, 0, [(10, 0.5), (20, 0.8), (30, 0.9)], rank=32.0),
    ]  # fmt: skip
    rows, chosen = report.task_table(TASK, runs, None, ["lora", "scalora", "full"])
    assert {r["lr"] for r in chosen["lora"]} == {1e-3}  # mean final 0.5 beats 0.2
    # LoRA's final mean 0.5 is first reached at step 30; ScaLoRA's mean curve (0.2, 0.5, 0.7) at step 20
    line = next(r for r in rows if r.startswith("| scalora "))
    assert "| 20 | 0.67 |" in line and "0.700 (n=2)" in line
    # eval loss, lower is better: LoRA's final mean 0.4 first at step 30; ScaLoRA's mean (0.9, 0.4, 0.3) at 20
    assert "| 20 (0.67) |" in line and "| 30 (1.00) |" in rows[2], (line, rows[2])
    # LoRA's best rate is the lower end of its two-rate grid: flagged; ScaLoRA swept one rate: not flagged
    assert "| lora | 0.001 † (0.001, 0.002) |" in rows[2] and "†" not in line
    assert any(r.startswith("† best at the edge of its swept grid (lora)") for r in rows), rows
    lines = report.targets_section({"facts": (TASK, chosen)}, None, "cpu")
    # gap closed: (0.7 - 0.5) / (0.9 - 0.5) = 0.5 -> met
    assert any("gap closed by ScaLoRA: 0.500" in x and "met" in x for x in lines), lines


def test_every_preset_learning_rate_reaches_the_config_as_a_float(tmp_path):
    from ds_scalora.bench.grid import run_config, task_lrs, task_methods, task_schedule

    for preset in PRESETS.values():
        for task in preset.tasks:
            steps, every = task_schedule(preset, task)
            for method in task_methods(preset, task):  # the gpu preset's shapes validate here too
                for lr in task_lrs(preset, task, method):  # 5e-05 once arrived as the string '5e-05' (YAML 1.1)
                    cfg = run_config(task, method, lr, 0, steps, every, str(tmp_path / "o"), str(tmp_path))
                    assert cfg.train.learning_rate == lr and isinstance(cfg.train.learning_rate, float)
                    assert cfg.train.max_steps == steps


@pytest.mark.skipif(os.environ.get("DS_SCALORA_SKIP_BENCH") == "1", reason="asked to skip")
def test_quick_preset_writes_the_report(tmp_path):
    out, work = tmp_path / "docs", tmp_path / "work"
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "benchmark.py"), "quality", "--preset", "quick", "--out",
                           str(out), "--work", str(work)], cwd=REPO, capture_output=True, text=True, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = (out / "benchmarks.md").read_text()
    for method in PRESETS["quick"].methods:
        assert f"| {method} | " in text, method
    assert "## Targets" in text and "python tools/benchmark.py quality --preset quick" in text
    assert (out / "benchmark_lookup.png").read_bytes()[:4] == b"\x89PNG"
    table = [line for line in text.splitlines() if line.startswith("| lora | ")][0]
    assert table.count("1.000") >= 3  # LoRA's own cost ratios
    assert "## Cost per step" in text and "| every round (ms) |" in text  # the cost section with each round
    assert not list(work.glob("*/checkpoints")), "finished runs must not keep their checkpoints (GBs each)"

    # the cost subcommand, in the form used before subcommands (options only, --cost-only): the cost table
    # on its own (the cost runs above are cached in --work, so this is quick)
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "benchmark.py"), "--preset", "quick", "--out", str(out),
                           "--work", str(work), "--cost-only"], cwd=REPO, capture_output=True, text=True, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    cost = (out / "benchmarks_cost_quick.md").read_text()
    for method in PRESETS["quick"].methods:
        assert f"| {method} | " in cost, method
    lora = [line for line in cost.splitlines() if line.startswith("| lora | ")][0]
    assert lora.count("| 1.000 |") == 3
    assert "scalora-I step time / LoRA (cpu)" in cost


# The gpu preset's 12B configuration shrunk by --set to a tiny shape, so that its path (random init in
# bf16, ZeRO-2, gradient checkpointing, packing, ScaLoRA's bf16_pair accumulator, a method the task
# excludes) runs on a CPU. The real shapes need the GPU machine; their configs validate in the test above.
TINY_SHAPE = ("model.random_init={hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2, num_attention_heads: 4, "
              "num_key_value_heads: 2, max_position_embeddings: 256}")


@pytest.mark.skipif(os.environ.get("DS_SCALORA_SKIP_BENCH") == "1", reason="asked to skip")
def test_gpu_preset_cost_path_runs_shrunk_on_cpu(tmp_path):
    import json

    from transformers import LlamaConfig, LlamaForCausalLM
    from yaml import safe_load

    from ds_scalora.train.model import byte_tokenizer

    out, work = tmp_path / "docs", tmp_path / "work"
    argv = [sys.executable, str(REPO / "tools" / "benchmark.py"), "cost", "--preset", "gpu", "--tasks", "12b", "--methods", "lora",
            "scalora-I", "full", "--set", TINY_SHAPE, "--set", "data.max_length=128", "--out", str(out), "--work", str(work)]
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = (out / "benchmarks_cost_gpu.md").read_text()
    assert "| full | not run: " in text  # excluded on the 12B shape, with the reason
    for method in ("lora", "scalora-I"):
        row = [line for line in text.splitlines() if line.startswith(f"| {method} | ")][0]
        assert float(row.split("|")[2]) > 0, row  # a measured step time
    assert "`model.random_init={hidden_size: 64" in text  # the override is stated
    result = json.loads((work / "cost_gpu_12b_scalora-I_0.json").read_text())
    # gradient checkpointing: 6 FLOPs per frozen parameter and token; N counted here from the shape itself
    shape = safe_load(TINY_SHAPE.split("=", 1)[1])
    vocab = len(byte_tokenizer())  # the tokenizer of a random-init run
    n = sum(p.numel() for p in LlamaForCausalLM(LlamaConfig(vocab_size=vocab, **shape)).parameters())
    assert result["params"] == n and result["flops_per_token"] == 6 * n
    assert result["sets"] == [TINY_SHAPE, "data.max_length=128"]


def test_a_cached_run_is_reused_only_with_the_same_settings(tmp_path, monkeypatch):
    """The cache is keyed by method, lr and seed in the file name; a run cached under other method or task
    settings (e.g. another ScaLoRA warm-up) must be set aside and re-run, not silently reported."""
    import json

    from ds_scalora.bench import runs as bench

    trained = []

    def fake_train_once(cfg, hooks=None, log_path=None):
        trained.append(cfg)
        return {"history": [], "eval": {"eval_loss": 1.0}}

    monkeypatch.setattr(bench.grid, "train_once", fake_train_once)
    preset = PRESETS["quick"]
    task = preset.tasks[0]

    def runs():
        return bench.quality_runs(preset, task, ["scalora"], [0], True, str(tmp_path))

    runs()
    runs()
    assert len(trained) == 1  # the second call came from the cache
    (cached,) = tmp_path.glob("*_scalora_*.json")
    run = json.loads(cached.read_text())
    assert run["settings"]["method"] == {"method.name": "scalora", "method.scalora.interval": 1}
    run["settings"]["method"]["method.scalora.warmup_steps"] = 2  # as cached before the warm-up changed
    cached.write_text(json.dumps(run))
    runs()
    assert len(trained) == 2 and len(list(tmp_path.glob("*.stale.json"))) == 1
    run = json.loads(cached.read_text())
    del run["settings"]  # cached before settings were recorded: unknown, so not trusted
    cached.write_text(json.dumps(run))
    runs()
    assert len(trained) == 3


RELEASE_CHECK = """
import gc, sys, weakref
sys.path.insert(0, sys.argv[1])
from ds_scalora.bench import grid

class Keep:
    def after_setup(self, engine, model):
        self.model = weakref.ref(model)

preset = grid.PRESETS["quick"]
cfg = grid.run_config(preset.tasks[0], "scalora", 5e-3, 0, 4, 2, sys.argv[2] + "/out", sys.argv[2] + "/data")
keep = Keep()
grid.train_once(cfg, keep)
gc.collect()
print("MODEL_ALIVE", keep.model() is not None)
"""


def test_an_in_process_run_releases_its_model(tmp_path):
    """The benchmark trains dozens of runs in one process: each must free its model when it returns
    (ZeRO's hooks kept it alive through reference cycles the garbage collector cannot see, ~0.5 GB per
    SmolLM2-135M run, until ``run`` destroyed its engine)."""
    proc = subprocess.run([sys.executable, "-c", RELEASE_CHECK, str(REPO), str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert "MODEL_ALIVE False" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-3000:]
