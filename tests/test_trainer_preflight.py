"""Both Trainer callbacks read a DeepSpeed checkpoint named in ``TrainingArguments(resume_from_checkpoint=...)``
as plain data at ``on_init_end``, before the Trainer hands it to DeepSpeed's unpickling loader.

A planted object (``payloads.Payload``: unpickling it creates a file) is refused with the file's name and
never runs; a clean checkpoint passes; ``True`` finds the newest ``checkpoint-N``; without DeepSpeed
nothing is read (the Trainer loads its own files as plain data). The full Trainer path of the same
refusal, through ``ScaLoRATrainer.train``, is ``tests/distributed/test_hf_trainer.py``.
"""

from types import SimpleNamespace

import pytest
import torch
from payloads import Payload

from ds_scalora.checkpoint.deepspeed_files import CheckpointFileError
from ds_scalora.zero import ElaLoRACallback, ScaLoRACallback


def _trainer_checkpoint(root, step, planted=None):
    folder = root / f"checkpoint-{step}"
    tag = folder / f"global_step{step}"
    tag.mkdir(parents=True)
    (folder / "latest").write_text(f"global_step{step}")
    state = {"module": {"w": torch.zeros(2)}}
    if planted:
        state["evil"] = Payload(str(planted))
    torch.save(state, tag / "mp_rank_00_model_states.pt")
    return folder


def _args(root, resume, deepspeed="ds_config.json"):
    return SimpleNamespace(deepspeed=deepspeed, resume_from_checkpoint=resume, world_size=1, output_dir=str(root))


@pytest.mark.parametrize("callback", [ScaLoRACallback, ElaLoRACallback])
def test_callbacks_read_the_checkpoint_to_resume_from_as_plain_data_first(tmp_path, callback):
    marker = tmp_path / "pwned"
    clean = _trainer_checkpoint(tmp_path, 3)
    callback().on_init_end(_args(tmp_path, str(clean)), None, None)  # passes
    _trainer_checkpoint(tmp_path, 6, planted=marker)
    with pytest.raises(CheckpointFileError, match="mp_rank_00_model_states.pt.*not plain data"):
        callback().on_init_end(_args(tmp_path, "True"), None, None)  # the newest, checkpoint-6
    assert not marker.exists()
    callback().on_init_end(_args(tmp_path, str(clean)), None, None)
    callback().on_init_end(_args(tmp_path, str(tmp_path / "checkpoint-6"), deepspeed=None), None, None)  # no DeepSpeed
    callback().on_init_end(_args(tmp_path, None), None, None)
    assert not marker.exists()
