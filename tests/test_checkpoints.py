"""ds_scalora.train.checkpoints: a save that fails part-way (a full disk, typically) is reported as a
CheckpointError naming the checkpoint and the free space, and leaves the run's earlier checkpoints
complete and resumable. The engine is a stand-in that writes files like DeepSpeed's, so that the test
needs no DeepSpeed and fails if the error were swallowed or the older checkpoint rotated away."""

from __future__ import annotations

import os

import pytest

from ds_scalora.train import checkpoints
from payloads import Payload


class FakeEngine:
    def __init__(self):
        self.fail = False

    def save_checkpoint(self, root, tag, client_state, save_latest):
        os.makedirs(os.path.join(root, tag), exist_ok=True)
        with open(os.path.join(root, tag, "mp_rank_00_model_states.pt"), "wb") as f:
            f.write(b"x" * 100)
        if self.fail:  # what torch.save raises when the disk fills mid-file
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 48576 vs 48468")


def test_a_failed_save_is_reported_and_keeps_the_earlier_checkpoint(tmp_path):
    engine = FakeEngine()
    checkpoints.save(engine, None, str(tmp_path), 10, {}, keep_last=1)
    engine.fail = True
    with pytest.raises(checkpoints.CheckpointError) as info:
        checkpoints.save(engine, None, str(tmp_path), 20, {}, keep_last=1)
    message = str(info.value)
    assert "step00000020" in message and "GiB free there" in message and "unexpected pos" in message
    assert checkpoints.complete_tags(str(tmp_path)) == ["step00000010"]
    assert checkpoints.incomplete_tags(str(tmp_path)) == ["step00000020"]
    assert checkpoints.resolve_resume("auto", str(tmp_path)) == (checkpoints.checkpoint_root(str(tmp_path)), "step00000010")
    engine.fail = False  # the next save clears the leftover and rotates the old one out
    checkpoints.save(engine, None, str(tmp_path), 30, {}, keep_last=1)
    assert checkpoints.complete_tags(str(tmp_path)) == ["step00000030"]
    assert checkpoints.incomplete_tags(str(tmp_path)) == []
    # DeepSpeed's 'latest' names the newest complete tag (zero_to_fp32.py and a tag-less load need it)
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step00000030"


def test_a_new_run_never_mixes_its_checkpoints_with_an_earlier_runs(tmp_path):
    """resume=never into an output_dir holding checkpoints is refused (keep_last would rotate the new run's
    lower steps away first); a fresh directory is fine; a checkpoint past max_steps is refused on resume."""
    assert checkpoints.resolve_resume("never", str(tmp_path)) is None
    checkpoints.save(FakeEngine(), None, str(tmp_path), 12, {}, keep_last=2)
    with pytest.raises(checkpoints.CheckpointError, match=r"train.resume_from_checkpoint=never, but .* \(step00000012\).*train.resume_from_checkpoint=auto"):
        checkpoints.resolve_resume("never", str(tmp_path))
    assert checkpoints.complete_tags(str(tmp_path)) == ["step00000012"]  # nothing was touched
    checkpoints.check_resumed_step(12, 12, "x")  # a finished run resumed: nothing left, accepted
    with pytest.raises(checkpoints.CheckpointError, match="at step 12, past train.max_steps=8"):
        checkpoints.check_resumed_step(12, 8, "x")


def test_resume_refuses_pickled_code_before_deepspeed_reads_anything(tmp_path):
    import torch

    engine = FakeEngine()
    checkpoints.save(engine, None, str(tmp_path), 12, {}, keep_last=2)
    tag = tmp_path / "checkpoints" / "step00000012"
    torch.save({"module": {"w": torch.zeros(2)}}, tag / "mp_rank_00_model_states.pt")
    root, name = checkpoints.resolve_resume("auto", str(tmp_path))
    loaded = []
    engine.load_checkpoint = lambda root, tag: loaded.append(tag) or (tag, {"step": 12})
    assert checkpoints.load(engine, None, root, name) == {"step": 12}  # plain data: accepted
    marker = tmp_path / "pwned"
    torch.save({"module": {}, "evil": Payload(str(marker))}, tag / "mp_rank_00_model_states.pt")
    with pytest.raises(checkpoints.CheckpointError, match=r"mp_rank_00_model_states.pt holds a pickled object .*run code"):
        checkpoints.load(engine, None, root, name)
    assert not marker.exists() and loaded == ["step00000012"]  # the second load never reached DeepSpeed


def test_resume_at_another_world_size_names_reshard(tmp_path):
    import torch

    checkpoints.save(FakeEngine(), None, str(tmp_path), 6, {}, keep_last=2)
    tag = tmp_path / "checkpoints" / "step00000006"
    (tag / "mp_rank_00_model_states.pt").unlink()
    for k in range(2):
        torch.save({"optimizer_state_dict": {}}, tag / f"zero_pp_rank_{k}_mp_rank_00_optim_states.pt")
    checkpoints.check_files(str(tag), 2)
    with pytest.raises(checkpoints.CheckpointError, match=r"written at 2 data-parallel ranks; this run has 1\. .*convert.py reshard"):
        checkpoints.check_files(str(tag), 1)


def test_a_resume_keeps_the_checkpoints_global_batch():
    checkpoints.check_resumed_batch({"step": 3}, 16, False, "x")  # written before the batch was recorded
    checkpoints.check_resumed_batch({"global_batch": 16}, 16, False, "x")
    with pytest.raises(checkpoints.CheckpointError, match=r"global batch of 16 rows .* this run has 8 .* product is 16"):
        checkpoints.check_resumed_batch({"global_batch": 16}, 8, False, "x")
    checkpoints.check_resumed_batch({"global_batch": 16}, 8, True, "x")  # allowed deliberately
