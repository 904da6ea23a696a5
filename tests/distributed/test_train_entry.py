"""``deepspeed launch/train.py --config ds_configs/tiny.yaml`` through the real launcher (CPU, gloo).

Each launch costs ~20-30 s here; the file makes about a dozen. The user's command itself (DeepSpeed's
runner, ``deepspeed --num_gpus 2`` or ``--hostfile``) runs in the 2-rank every-method tests and the two-node
test; the others start DeepSpeed's per-node launcher, which the runner execs, directly (``command``). What is shown: every method runs (ScaLoRA at 1 and
2 ranks, LoRA at 2, rsLoRA and full fine-tuning at 1; two nodes through a hostfile at ZeRO-3); a run killed with SIGKILL right after a
checkpoint resumes to exactly the uninterrupted run's final state (packed rows, a length in epochs); early
stopping keeps the best checkpoint; bad input ends with one paragraph and a non-zero status, before any
heavy work, and leaves existing checkpoints intact.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("deepspeed")
from launch import _env, free_port, node_launcher  # noqa: E402

pytestmark = pytest.mark.dist
REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "ds_configs" / "tiny.yaml")


def command(ranks, out, *sets, runner=False):
    """``launch/train.py`` on ``ranks`` ranks with the tiny config: through DeepSpeed's runner (``deepspeed
    --num_gpus N``, the user's command) if ``runner``; else one rank is a plain ``python launch/train.py``
    (a one-rank run without a launcher: ds_scalora.zero.single_process; a 6-step run took 14.2 s where the
    per-node launcher took 18.9 s, side by side in the tests' environment on 2026-12-03, with the same
    losses), and more go through the per-node
    launcher the runner execs (see launch.node_launcher: the same ranks, without the runner's own start)."""
    args = ["--config", TINY, "--set", f"train.output_dir={out}", *sets]  # several KEY=VALUE after one --set
    if not runner and ranks == 1:
        return [sys.executable, "-u", str(REPO / "launch" / "train.py"), *args]
    if not runner:
        return node_launcher(ranks, REPO / "launch" / "train.py", args)
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks), "--master_port",
            str(free_port()), str(REPO / "launch" / "train.py"), *args]  # fmt: skip


def train(ranks, out, *sets, expect_ok=True, runner=False):
    proc = subprocess.run(command(ranks, out, *sets, runner=runner), cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    if expect_ok:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        with open(Path(out) / "summary.json") as f:
            return json.load(f)
    return proc


# one run per method (ScaLoRA and LoRA at 2 ranks, the others at 1: both world sizes, every method once)
@pytest.mark.parametrize("ranks,method", [(2, "scalora"), (2, "lora"), (1, "rslora"), (1, "full"), (1, "relora")])
def test_every_method_runs(ranks, method, tmp_path):
    s = train(ranks, tmp_path / "run", f"method.name={method}", "train.max_steps=6", "train.eval_steps=6",
              "method.relora.interval=2", "method.relora.warmup_steps=2", "method.relora.rewarm_steps=2",
              runner=ranks == 2)  # the user's command at 2 ranks; the 1-rank runs need nothing of the runner
    assert s["steps"] == 6 and s["world_size"] == ranks and s["method"] == method
    assert {"eval_loss", "eval_ppl", "eval_exact_match"} <= set(s["eval"])
    assert all(h["loss"] == h["loss"] for h in s["history"])  # finite
    assert (tmp_path / "run" / "checkpoints" / "step00000006" / "COMPLETE").is_file()
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    if method == "lora":  # DeepSpeed's own converter, copied into the checkpoint, finds it without --tag
        ckpts = tmp_path / "run" / "checkpoints"
        assert (ckpts / "latest").read_text() == "step00000006"
        fp32 = subprocess.run([sys.executable, str(ckpts / "zero_to_fp32.py"), str(ckpts),
                               str(tmp_path / "fp32")], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)  # fmt: skip
        assert fp32.returncode == 0, fp32.stdout[-2000:] + fp32.stderr[-2000:]
        assert list((tmp_path / "fp32").glob("*.bin")) or list((tmp_path / "fp32").glob("*.safetensors"))
    if method == "scalora":
        assert s["scalora_totals"]["refreshes"] == 2  # steps 2 and 4 (warm-up 2, interval 2)
        assert any("scalora/scalar_fraction" in h for h in s["history"])
        assert s["scalora_accumulated_rank"] > 0
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        tags = EventAccumulator(str(tmp_path / "run" / "tensorboard")).Reload().Tags()
        assert {"scalora/accumulated_rank_mean", "scalora/merged_norm", "scalora/scalar_fraction", "loss",
                "eval_loss", "lr", "grad_norm", "tokens_per_s", "peak_memory_gib"} <= set(tags["scalars"]), tags
        assert {"scalora/alpha_beta", "scalora/accumulated_rank_per_layer"} <= set(tags["histograms"]), tags
    elif method == "relora":  # restarts at steps 2 and 4 (ReLoRA defaults overridden in tiny.yaml's run)
        assert s["scalora_totals"]["solver/restart"] == 2 * 14
        lrs = [h["lr"] for h in s["history"]]  # history[i]["lr"]: the rate of step i+1 (0-based), constant schedule
        assert lrs[1] == lrs[3] == 0.5 * lrs[2] == 0.5 * lrs[4]  # re-warmed over 2 steps after each restart
    else:
        assert s["scalora_totals"] is None
    _check_final_model(tmp_path / "run", s, method)


def _check_final_model(run: Path, s: dict, method: str) -> None:
    """The run leaves <output_dir>/model: the exact PEFT adapter (LoRA, rsLoRA) or the merged model, with a
    model card, loadable with AutoModelForCausalLM.from_pretrained. An adapter's logits (PEFT applying the
    r, lora_alpha and use_rslora written in adapter_config.json) must match the merged export of the same
    checkpoint (ds_scalora's own formula): both fp32, 1e-5 of max |logit|; rsLoRA's scale differs from
    LoRA's by sqrt(r) = 2 here, far beyond that."""
    import torch
    from huggingface_hub import ModelCard
    from transformers import AutoModelForCausalLM

    sys.path.insert(0, str(REPO / "tools"))
    import convert

    kind = "adapter" if method in ("lora", "rslora") else "merged"
    assert s["final_model"] == {"path": str(run / "model"), "kind": kind, "step": 6}
    card = ModelCard.load(run / "model" / "README.md")
    assert card.data.library_name == ("peft" if kind == "adapter" else "transformers") and method in card.data.tags
    assert "eval_loss" in card.text
    ids = torch.tensor([[5, 9, 30, 41, 7, 3]])
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(run / "model", dtype=torch.float32)(input_ids=ids).logits
    if kind == "adapter":
        assert (run / "model" / "adapter_config.json").is_file() and not (run / "model" / "config.json").exists()
        assert convert.main(["merged", str(run), str(run / "merged"), "--dtype", "fp32", "--quiet"]) == 0
        with torch.no_grad():
            want = AutoModelForCausalLM.from_pretrained(run / "merged", dtype=torch.float32)(input_ids=ids).logits
        assert (got - want).abs().max() <= 1e-5 * want.abs().max(), float((got - want).abs().max())
    assert torch.isfinite(got).all()
    if kind == "merged":  # the README's way to ask it a question runs on it
        sys.path.insert(0, str(REPO / "examples"))
        from ask_model import ask

        assert isinstance(ask(str(run / "model"), "2024-01-31?", max_new_tokens=3), str)


def _shm_buffers() -> set:
    return {p.name for p in Path("/dev/shm").glob("deepspeed*")} if Path("/dev/shm").is_dir() else set()


def test_killed_run_resumes_to_the_same_final_state(tmp_path):
    """With packing and a length in epochs: 300 rows of 20 tokens packed three to a sequence of 64 are 100
    sequences, 7 updates per epoch at 4 x 2 accumulation x 2 ranks, so 1.25 epochs are ceil(8.75) = 9 steps,
    and the resumed run crosses the epoch boundary (step 7) after the kill."""
    shm_before = _shm_buffers()
    sets = ("train.max_steps=-1", "train.num_train_epochs=1.25", "data.packing=true", "data.max_length=64",
            "train.save_steps=3", "train.eval_steps=0", "train.logging_steps=1")
    full = train(2, tmp_path / "full", *sets)
    assert full["steps"] == 9 and full["config"]["train"]["max_steps"] == 9
    out = tmp_path / "killed"
    proc = subprocess.Popen(command(2, out, *sets), cwd=REPO, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    marker = out / "checkpoints" / "step00000003" / "COMPLETE"
    deadline = time.time() + 300
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole launcher and its ranks, mid-run
    proc.wait()
    assert marker.exists(), "the run did not reach its first checkpoint"
    resumed = train(2, out, *sets)
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in full["history"]]
    assert resumed["scalora_totals"] == full["scalora_totals"]
    # DeepSpeed's CPU shm op (69 MB of /dev/shm per rank, never removed) is kept out: see disable_cpu_shm_comm
    assert _shm_buffers() <= shm_before
    # a damaged file that only rank 1 reads (its ScaLoRA shard): the error names it, through the launcher
    shard = tmp_path / "full" / "checkpoints" / "step00000009" / "ds_scalora_rank00001_of00002.pt"
    shard.write_bytes(shard.read_bytes()[:200])
    proc = train(2, tmp_path / "full", *sets, "train.max_steps=12", expect_ok=False)
    assert proc.returncode == 2 and "ds_scalora_rank00001_of00002.pt" in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr


def test_bad_input_is_one_paragraph_and_nonzero(tmp_path):
    run = [sys.executable, str(REPO / "launch" / "train.py"), "--config", TINY]
    cases = [
        (["train.max_stepz=3"], "unknown key 'train.max_stepz'; did you mean train.max_steps"),
        (["train.learning_rate=fast"], "train.learning_rate must be float"),
        (["model.model_name_or_path=/nonexistent"], "set exactly one of model.model_name_or_path"),
        (["model.random_init=null", "model.model_name_or_path=/nonexistent"], "model.model_name_or_path '/nonexistent' is not a directory"),
        (["data.train=/nonexistent.jsonl"], "does not exist"),
        (["deepspeed.gradient_accumulation_steps=8"], "deepspeed.gradient_accumulation_steps is 8 but train"),
    ]
    for overrides, message in cases:
        proc = subprocess.run([*run, "--set", *overrides], cwd=REPO, env=_env(), capture_output=True, text=True)
        assert proc.returncode == 2 and message in proc.stderr, (overrides, proc.stderr)
        assert "Traceback" not in proc.stderr
    # a dataset with no usable row is reported through the launcher as well
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"prompt": "no completion here", "completion": ""}\n')
    proc = train(1, tmp_path / "r", f"data.train={empty}", "data.eval=null", expect_ok=False)
    assert proc.returncode != 0 and "no usable row" in proc.stderr and "Traceback" not in proc.stderr


def test_truncated_checkpoint_is_detected_and_nothing_is_lost(tmp_path):
    out = tmp_path / "run"
    train(1, out, "train.max_steps=3", "train.save_steps=3", "train.eval_steps=0")
    good = out / "checkpoints" / "step00000003"
    # an interrupted later save (no COMPLETE marker) is ignored by resume=auto
    partial = out / "checkpoints" / "step00000006"
    partial.mkdir()
    (partial / "mp_rank_00_model_states.pt").write_bytes(b"\x80\x02truncated")
    s = train(1, out, "train.max_steps=6", "train.save_steps=3", "train.eval_steps=0")
    assert s["steps"] == 6 and (out / "checkpoints" / "step00000006" / "COMPLETE").is_file()
    # a complete checkpoint whose file was truncated afterwards: a clear error naming it, files kept
    target = out / "checkpoints" / "step00000006" / "mp_rank_00_model_states.pt"
    target.write_bytes(target.read_bytes()[:100])
    proc = train(1, out, "train.max_steps=9", "train.eval_steps=0", expect_ok=False)
    assert proc.returncode != 0 and "step00000006" in proc.stderr and "damaged" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert good.is_dir() and (good / "COMPLETE").is_file()


def test_two_nodes_with_a_hostfile_at_zero3(tmp_path):
    """The multi-node path as users launch it (``deepspeed --hostfile``), here two "nodes" on loopback:
    each node's launcher is started with ``--no_ssh --node_rank R`` instead of being ssh'ed to. ZeRO-3,
    so the model is loaded partitioned and exact match generates with synced ranks."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    out, port = tmp_path / "run", str(free_port())
    sets = [f"train.output_dir={out}", "train.max_steps=4", "train.eval_steps=4", "train.save_steps=4",
            "deepspeed.zero_optimization.stage=3", "deepspeed.zero_optimization.stage3_param_persistence_threshold=0"]
    procs = [
        subprocess.Popen([sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile), "--no_ssh",
                          "--node_rank", str(node), "--master_addr", "127.0.0.1", "--master_port", port,
                          str(REPO / "launch" / "train.py"), "--config", TINY, "--set", *sets],
                         cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for node in (0, 1)
    ]  # fmt: skip
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), logs[0][-3000:] + logs[1][-3000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["world_size"] == 2 and s["steps"] == 4 and s["scalora_totals"]["refreshes"] == 1
    assert s["config"]["deepspeed"]["zero_optimization"]["stage"] == 3
    assert "eval_exact_match" in s["eval"] and s["scalora_accumulated_rank"] > 0
    shards = sorted(p.name for p in (out / "checkpoints" / "step00000004").glob("ds_scalora_rank*"))
    assert shards == ["ds_scalora_rank00000_of00002.pt", "ds_scalora_rank00001_of00002.pt"]
    assert (out / "checkpoints" / "step00000004" / "COMPLETE").is_file()


def test_elalora_at_zero3_resumes_exactly_and_exports_a_peft_adapter(tmp_path):
    """ElaLoRA through the entry point, 2 ranks at ZeRO-3 (every factor partitioned): the budget holds,
    the rounds follow the schedule, a run resumed from its step-6 checkpoint (masks, round history and
    per-rank importance averages restored) ends exactly like the uninterrupted one, and the exported
    adapter loads with stock PEFT at the final per-module ranks."""
    sets = ("method.name=elalora", "train.max_steps=12", "train.save_steps=6", "train.eval_steps=12", "train.logging_steps=2",
            "method.elalora.interval=2", "method.elalora.init_warmup=2", "method.elalora.final_warmup=2",
            "deepspeed.zero_optimization.stage=3", "deepspeed.zero_optimization.stage3_param_persistence_threshold=0")
    full = train(2, tmp_path / "full", *sets)
    budget = 4 * 14  # method.r = 4, 14 adapted matrices
    assert full["elalora_budget"] == budget and full["elalora_total_rank"] == budget
    assert sum(full["elalora_rank_pattern"].values()) == budget and len(set(full["elalora_rank_pattern"].values())) > 1
    # rounds at t = 4, 6, 8 (2 < t < 12 - 2, every 2); b_t = round(4 (1 - p^3)), p = (t-2)/8: 3.94, 3.5, 2.31
    assert [(r["step"], r["moves"]) for r in full["elalora_rounds"]] == [(0, 0), (4, 4), (6, 4), (8, 2)]
    assert all(sum(r["ranks"]) == budget for r in full["elalora_rounds"])
    out = tmp_path / "full"
    assert (out / "rank_heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = EventAccumulator(str(out / "tensorboard")).Reload().Tags()
    assert {"elalora/total_rank", "elalora/moves", "elalora_rank/0.self_attn.q_proj"} <= set(tags["scalars"]), tags

    resumed = train(2, tmp_path / "resumed", *sets, f"train.resume_from_checkpoint={out / 'checkpoints' / 'step00000006'}")
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in full["history"]]
    assert resumed["elalora_rank_pattern"] == full["elalora_rank_pattern"]

    import torch
    from peft import PeftModel
    from transformers import LlamaConfig, LlamaForCausalLM

    from ds_scalora.train.config import load_config
    from ds_scalora.train.model import byte_tokenizer

    cfg = load_config(TINY)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=len(byte_tokenizer()), **cfg.model.random_init))
    peft_model = PeftModel.from_pretrained(base, str(out / "model"))  # the final model: the exact adapter
    ranks = {name.split("layers.", 1)[1]: m.lora_A["default"].weight.shape[0]
             for name, m in peft_model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
    assert ranks == full["elalora_rank_pattern"]
    lora = [m for m in peft_model.modules() if hasattr(m, "lora_A") and "default" in m.lora_A]
    assert len(lora) == 14 and all(m.scaling["default"] == 1.0 for m in lora)  # alpha_pattern = rank_pattern
    assert all(float(m.lora_B["default"].weight.abs().sum()) > 0 for m in lora)
    assert torch.isfinite(peft_model(input_ids=torch.tensor([[1, 2, 3]])).logits).all()


def test_evaluation_is_the_same_at_any_world_size(tmp_path):
    """eval.max_batches counts micro-batches in all: 1 and 2 ranks evaluate the same rows, so the held-out
    loss of the same initial model agrees (the sums run in another order: relative 1e-6)."""
    sets = ("train.max_steps=1", "train.eval_on_start=true", "train.eval_steps=0", "train.save_steps=0", "eval.max_batches=3")
    one, two = (train(n, tmp_path / f"w{n}", *sets)["eval_before_training"] for n in (1, 2))
    assert abs(one["eval_loss"] - two["eval_loss"]) <= 1e-6 * abs(one["eval_loss"]), (one, two)
    assert one["eval_exact_match"] == two["eval_exact_match"]


def test_early_stopping_and_the_best_checkpoint(tmp_path, monkeypatch):
    """``early_stopping_patience`` with a threshold no change can pass: evaluations at steps 2, 4 and 6, the
    last two without improvement, so the run stops at step 6 of 20. ``load_best_model_at_end``: the final
    model comes from the best saved evaluation, whose checkpoint outlives ``save_total_limit: 1``. Run again,
    it has nothing left to train. The run reports to TensorBoard, wandb (offline) and MLflow (a local store)
    at once (what each writes is read back in tests/test_reporters.py)."""
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    out, template = tmp_path / "run", tmp_path / "chat.jinja"
    template.write_text("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}")
    sets = ("train.max_steps=20", "train.eval_steps=2", "train.save_steps=2", "train.save_total_limit=1",
            "train.early_stopping_patience=2", "train.early_stopping_threshold=100", "train.load_best_model_at_end=true",
            "eval.exact_match=false", "method.name=lora", "train.report_to=[tensorboard,wandb,mlflow]",
            f"data.chat_template={template}")  # fmt: skip
    s = train(1, out, *sets)
    from transformers import AutoTokenizer  # the exported model formats chats as the run trained them

    assert AutoTokenizer.from_pretrained(out / "model").chat_template == template.read_text()
    assert list((out / "tensorboard").glob("events.out.tfevents.*")) and len(list((out / "wandb").glob("offline-run-*"))) == 1
    assert list((out / "mlruns").rglob("metrics/loss"))
    assert s["steps"] == 6 and s["stopped_early"] == {"step": 6, "evaluations_without_improvement": 2}
    losses = {h["step"]: h["eval_loss"] for h in s["history"] if "eval_loss" in h}
    assert sorted(losses) == [2, 4, 6]
    best_step = min(losses, key=lambda k: (losses[k], k))
    assert s["best"]["step"] == s["best"]["checkpoint_step"] == best_step and s["final_model"]["step"] == best_step
    kept = sorted(p.name for p in (out / "checkpoints").glob("step*"))
    assert kept == sorted({f"step{best_step:08d}", "step00000006"})
    again = train(1, out, *sets, expect_ok=False)
    assert again.returncode == 0 and "stopped early: nothing left to train" in again.stdout, again.stdout[-2000:]
