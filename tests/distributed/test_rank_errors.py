"""An error raised on one rank while the others wait in a collective reaches the terminal, through the real
launcher, with the rank, the file and the remedy, and the run ends promptly with a non-zero status; the
checkpoints written before stay complete and usable.

The fault is injected from outside the code under test: a ``sitecustomize`` module on ``PYTHONPATH`` makes
``torch.save`` fail with ``ENOSPC`` (a full disk) on rank 1 only, for its ScaLoRA shard of the step-4
checkpoint. Rank 0 has written its own files by then and waits for rank 1 in the shard barrier; rank 1
raises inside ``save``. Without its own report, the user would see only the launcher killing rank 0
(or gloo's "connection closed" on rank 0), not which file on which rank failed, nor what to do.
"""

import os
import subprocess
import time
from pathlib import Path

import pytest

pytest.importorskip("deepspeed")
from launch import _env  # noqa: E402
from test_train_entry import REPO, command  # noqa: E402

pytestmark = pytest.mark.dist

FULL_DISK_ON_RANK_1 = '''
import os
if os.environ.get("RANK") == "1":
    import errno
    import torch

    _save = torch.save

    def save(obj, f, *args, **kwargs):
        if str(f).endswith(os.path.join("step00000004", "ds_scalora_rank00001_of00002.pt.tmp")):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        return _save(obj, f, *args, **kwargs)

    torch.save = save
'''


def test_an_error_on_rank_1_during_a_collective_reaches_the_user(tmp_path):
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(FULL_DISK_ON_RANK_1)
    env = _env()
    env["PYTHONPATH"] = os.pathsep.join([str(inject), env.get("PYTHONPATH", "")])
    out = tmp_path / "run"
    sets = ("train.max_steps=4", "train.save_steps=2", "train.eval_steps=0")
    start = time.perf_counter()
    proc = subprocess.run(command(2, out, *sets), cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - start
    said = proc.stdout + proc.stderr
    assert proc.returncode != 0, said[-3000:]
    line = next((l for l in said.splitlines() if "[rank 1] error: saving checkpoint" in l), None)
    assert line is not None, said[-3000:]
    assert "step00000004" in line and "No space left on device" in line and "train.resume_from_checkpoint=auto" in line, line
    assert "Traceback" not in said, said[-3000:]  # rank 0's echo of it is one line, not a gloo traceback
    # rank 0 either says in one line that another rank ended ("[rank 0] stopped: ...") or is killed by the
    # launcher before it can (the launcher polls its ranks once a second): never a save failure of its own
    assert said.count("No space left on device") == 1, said[-3000:]
    assert said.count("error: saving checkpoint") == said.count("[rank 1] error: saving checkpoint") == 1, said[-3000:]
    assert seconds < 300, seconds  # no rank hangs in its collective
    ckpts = out / "checkpoints"
    assert (ckpts / "step00000002" / "COMPLETE").is_file() and not (ckpts / "step00000004" / "COMPLETE").exists()
