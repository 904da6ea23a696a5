"""ScaLoRACallback in TRL's SFTTrainer under DeepSpeed (ZeRO-2 and ZeRO-3, 2 ranks): trains, checkpoints
(the Trainer's own DeepSpeed checkpoints leave the frozen weights out; the callback's shards carry them),
resumes to the same losses, merged weights and counters as an uninterrupted run, and leaves a merged
Hugging Face model whose logits match the engine's.

Logits tolerance: the merged model computes (W + s·B·A)·x with the sum formed once in fp32, the engine
W·x + s·B·(A·x); on this 2-layer hidden-32 model the two orders differ by fp32 rounding only (measured
~1e-6 relative), so 1e-4 relative is a bound with room and a missing merge (changes of order 1e-2) or a
wrong layer name (order 1) fails it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("deepspeed")
pytest.importorskip("trl")

from launch import EXTENDED, run_deepspeed  # noqa: E402

pytestmark = pytest.mark.dist
WORKER = Path(__file__).resolve().parent / "sft_worker.py"


def _merged_logits(directory: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


# ZeRO-2 extended: test_hf_trainer.py runs the Trainer with DeepSpeed at ZeRO-2 through the same callback
@pytest.mark.parametrize("stage", [pytest.param(2, marks=EXTENDED), 3])
def test_sft_trainer_with_callback_resumes_exactly_and_saves_the_merged_model(tmp_path, stage):
    run, merged = tmp_path / "run", tmp_path / "merged"
    args = ["--run-dir", run, "--steps", 6, "--stage", stage]
    full = run_deepspeed(2, [*args, "--merged", merged], tmp_path / "a", worker=WORKER)
    assert full["totals"]["refreshes"] == 3 and len(full["losses"]) == 6
    tag_dir = next((run / "checkpoint-3").glob("global_step*"))
    shards = sorted(p.name for p in tag_dir.glob("ds_scalora_rank*"))
    assert shards == ["ds_scalora_rank00000_of00002.pt", "ds_scalora_rank00001_of00002.pt"]
    # the host's checkpoint lacks the frozen weights: only the shards can make the resume exact
    module = torch.load(next(tag_dir.glob("*model_states.pt")), weights_only=False)["module"]
    assert not any(name.endswith("base_layer.weight") for name in module)

    # the merged model: the guard wrote it at ZeRO-2; at ZeRO-3 it refused and save_merged_model wrote it
    if stage == 3:
        assert "save_merged_model" in full["refusal"]
    else:
        assert full["refusal"] is None
    assert not (merged / "adapter_model.safetensors").exists()
    logits = _merged_logits(merged, full["ids"])
    err = float((logits - full["logits"]).norm() / full["logits"].norm())
    assert err < 1e-4, err
    print("merged-model logits relative error", err)

    # tools/convert.py reads the Trainer's own checkpoint (no run config: adapter_config.json names the base;
    # the frozen weights the Trainer left out come from it, the merges from the callback's shards)
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
    import convert

    assert convert.main(["merged", str(run), str(tmp_path / "converted"), "--dtype", "fp32", "--quiet"]) == 0
    converted = _merged_logits(tmp_path / "converted", full["ids"])
    err = float((converted - full["logits"]).norm() / full["logits"].norm())
    assert err < 1e-4, err

    # interrupt after step 3: drop the later checkpoint and resume
    shutil.rmtree(run / "checkpoint-6")
    resumed = run_deepspeed(2, args + ["--resume"], tmp_path / "b", worker=WORKER)
    assert resumed["losses"] == full["losses"]
    assert resumed["totals"] == full["totals"]
    for name, t in full["frozen"].items():
        assert torch.equal(resumed["frozen"][name], t), name


def test_sft_trainer_with_elalora_callback_resumes_exactly_and_saves_an_exact_adapter(tmp_path):
    """ElaLoRACallback in TRL's SFTTrainer at ZeRO-2 on 2 ranks: rounds move ranks under the budget, each rank's
    importance averages and the masks go beside the Trainer's checkpoint, a resume from step 3 reproduces
    the losses and the final rank pattern, and ``save_model`` writes a plain LoRA adapter of the active
    slots whose logits under stock PEFT match the engine's (fp32, reordering only: 1e-5 relative)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run, adapter = tmp_path / "run", tmp_path / "adapter"
    args = ["--run-dir", run, "--steps", 8, "--stage", 2, "--method", "elalora"]
    full = run_deepspeed(2, [*args, "--merged", adapter], tmp_path / "a", worker=WORKER)
    pattern = full["rank_pattern"]
    assert sum(pattern.values()) == 2 * 14 and len(set(pattern.values())) > 1 and full["totals"]["moved"] > 0
    assert full["refusal"] is None and (run / "checkpoint-3" / "ds_elalora_state.pt").is_file()
    tag_dir = next((run / "checkpoint-3").glob("global_step*"))
    assert sorted(p.name for p in tag_dir.glob("ds_elalora_rank*")) == ["ds_elalora_rank00000_of00002.pt",
                                                                        "ds_elalora_rank00001_of00002.pt"]
    base = AutoModelForCausalLM.from_pretrained(run / "base", dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter)).eval()
    with torch.no_grad():
        logits = model(input_ids=full["ids"]).logits.float()
    err = float((logits - full["logits"]).norm() / full["logits"].norm())
    assert err < 1e-5, err
    # tools/convert.py on the Trainer's own checkpoint: ElaLoRA's masks and init_rank from ds_elalora_state.pt
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
    import convert

    assert convert.main(["merged", str(run), str(tmp_path / "converted"), "--dtype", "fp32", "--quiet"]) == 0
    converted = _merged_logits(tmp_path / "converted", full["ids"])
    assert float((converted - full["logits"]).norm() / full["logits"].norm()) < 1e-5

    shutil.rmtree(run / "checkpoint-6")
    shutil.rmtree(run / "checkpoint-8")
    resumed = run_deepspeed(2, args + ["--resume"], tmp_path / "b", worker=WORKER)
    assert resumed["losses"] == full["losses"]
    assert resumed["rank_pattern"] == pattern
