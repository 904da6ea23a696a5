"""The documented hand-written DeepSpeed loop (examples/deepspeed_loop.py) runs, checkpoints and resumes."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("deepspeed")
from launch import _env, free_port  # noqa: E402

pytestmark = pytest.mark.dist
REPO = Path(__file__).resolve().parents[2]


def _run(tmp_path, *args):
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
           str(REPO / "examples" / "deepspeed_loop.py"), "--deepspeed_config", str(REPO / "ds_configs" / "zero3_bf16.json"), "--bf16",
           "--steps", "9", "--interval", "2", "--ckpt", str(tmp_path / "ckpt"), "--save-every", "6",
           "--print-every", "1", *args]  # fmt: skip
    env = _env()
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "examples"), env.get("PYTHONPATH", "")])
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [line for line in proc.stdout.splitlines() if line.startswith(("step", "totals"))]


def test_deepspeed_loop_example_zero3_resume(tmp_path):
    full = _run(tmp_path)
    assert any("totals" in line and "'refreshes': 2" in line for line in full), full  # steps 5 and 7 (warm-up 5)
    # the checkpoint after step 6 is there; resuming from it replays steps 6..8 identically
    resumed = _run(tmp_path, "--resume")
    assert [l for l in full if l.startswith("step") and int(l.split()[1]) >= 6] == [l for l in resumed if l.startswith("step")]
    assert [l for l in full if l.startswith("totals")] == [l for l in resumed if l.startswith("totals")]


def test_sft_callback_example_runs_and_leaves_a_loadable_merged_model(tmp_path):
    """examples/sft_callback.py as documented, one process (its ZeRO-3 path is what test_trainer_callback covers)."""
    pytest.importorskip("trl")
    import json

    cmd = [sys.executable, str(REPO / "examples" / "sft_callback.py"), "--steps", "12", "--out", str(tmp_path / "run")]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
    assert result["refreshes"] == 1 and result["reloaded_parameters"] > 0  # warm-up 5, interval 10: step 5
    assert not (tmp_path / "run" / "merged" / "adapter_model.safetensors").exists()


def test_sft_callback_example_with_elalora_leaves_an_exact_adapter(tmp_path):
    """examples/sft_callback.py --method elalora, one process: ranks move and the saved adapter reloads with PEFT."""
    pytest.importorskip("trl")
    import json

    cmd = [sys.executable, str(REPO / "examples" / "sft_callback.py"), "--steps", "16", "--method", "elalora",
           "--out", str(tmp_path / "run")]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
    assert sum(result["rank_pattern"].values()) == 4 * 14 and result["reloaded_parameters"] > 0
    config = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["rank_pattern"]
