"""``exit_process`` (ds_scalora/zero/teardown.py): after a gloo group it leaves without interpreter
finalization (so atexit handlers do not run), with the status asked for and stdout flushed; without
one it is ``sys.exit`` (atexit handlers run). One-rank processes, a few seconds each."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ds_scalora.zero.single_process import free_port

REPO = Path(__file__).resolve().parents[1]
SCRIPT = """
import atexit, sys
sys.path.insert(0, {repo!r})
import torch, torch.distributed as dist
from ds_scalora.zero.teardown import end_distributed, exit_process
atexit.register(lambda: print("atexit ran", flush=True))
if {gloo}:
    dist.init_process_group("gloo")
    dist.all_reduce(torch.ones(4))
    if {end}:
        end_distributed()
print("buffered line", end="")  # no newline, no flush: exit_process must flush it
exit_process(3)
"""


@pytest.mark.parametrize("gloo,end", [(True, True), (True, False), (False, False)])
def test_exit_process(gloo, end):
    port = free_port()
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1")
    proc = subprocess.run([sys.executable, "-c", SCRIPT.format(repo=str(REPO), gloo=gloo, end=end)], env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert proc.stdout.startswith("buffered line")
    assert ("atexit ran" in proc.stdout) == (not gloo)


def test_a_collective_error_from_a_lost_peer_is_recognised():
    """The gloo message here is the one torch 2.13 raised on rank 0 when rank 1 exited during a barrier
    (reproduced by hand: 2 gloo processes under torchrun, rank 1 ``os._exit(2)``, rank 0 ``barrier()``)."""
    from ds_scalora.zero import peer_lost

    gloo = RuntimeError("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error "
                        "[127.0.0.1]:39055: Connection reset by peer. This is typically caused by a remote worker "
                        "hanging or bugs in the application.")  # fmt: skip
    assert peer_lost(gloo)
    assert not peer_lost(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))  # a bug keeps its traceback
    assert not peer_lost(ValueError("Connection reset by peer"))
