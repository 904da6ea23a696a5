"""ScaLoRATrainer: an HF Trainer job with --deepspeed trains, checkpoints the merged weights, resumes exactly."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("deepspeed")

from launch import LaunchError, run_deepspeed  # noqa: E402
from payloads import Payload  # noqa: E402

pytestmark = pytest.mark.dist
WORKER = Path(__file__).resolve().parent / "trainer_worker.py"


def test_trainer_with_deepspeed_checkpoints_merges_and_resumes(tmp_path):
    run = tmp_path / "run"
    full = run_deepspeed(2, ["--run-dir", run, "--steps", 6], tmp_path / "a", worker=WORKER)
    assert full["totals"]["refreshes"] == 3 and len(full["losses"]) == 6
    # the checkpoint holds the merged frozen weights (the stock Trainer would exclude them)
    tag_dir = run / "checkpoint-3" / "global_step3"
    assert sorted(p.name for p in tag_dir.glob("ds_scalora_rank*")) == [
        "ds_scalora_rank00000_of00002.pt", "ds_scalora_rank00001_of00002.pt"]  # fmt: skip
    module = torch.load(tag_dir / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    name = "base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"
    from tiny_models import tiny_lora_model

    initial = dict(tiny_lora_model(torch.float32).named_parameters())[name]
    assert name in module and not torch.equal(module[name], initial.detach())  # a merge happened by step 3
    # interrupt after step 3: drop the later checkpoint and resume
    shutil.rmtree(run / "checkpoint-6")
    resumed = run_deepspeed(2, ["--run-dir", run, "--steps", 6, "--resume"], tmp_path / "b", worker=WORKER)
    assert resumed["losses"] == full["losses"]
    assert resumed["totals"] == full["totals"]
    for n, t in full["frozen"].items():
        assert torch.equal(resumed["frozen"][n], t), n
    # a planted object in the checkpoint: refused before DeepSpeed (weights_only=False) would run it
    marker = tmp_path / "pwned"
    states = tag_dir / "mp_rank_00_model_states.pt"
    torch.save({**torch.load(states, weights_only=False), "evil": Payload(str(marker))}, states)
    shutil.rmtree(run / "checkpoint-6", ignore_errors=True)
    with pytest.raises(LaunchError, match="holds a pickled object that is not plain data"):
        run_deepspeed(2, ["--run-dir", run, "--steps", 6, "--resume"], tmp_path / "c", worker=WORKER)
    assert not marker.exists()
