"""The end of a DeepSpeed program: every rank waits for the others, the process group goes, and on
gloo the process leaves without interpreter finalization.

Why more than ``dist.destroy_process_group()``: on the CPU accelerator (gloo) a finished run could
abort at interpreter exit with "terminate called without an active exception" (SIGABRT; the launcher
then exits 250). A core dump of a minimal 2-rank gloo script that aborts the same way (all_reduces on
temporaries, then exit, under CPU load) shows the cause:

    ProcessGroupGloo::runLoop -> ~AsyncAllreduceWork -> TensorImpl::decref_pyobject
        -> gil_scoped_acquire -> take_gil -> PyThread_exit_thread -> _Unwind_ForcedUnwind -> std::terminate

A gloo worker thread drops its reference to a finished collective a moment after the caller has
returned. When that reference is the last one to a tensor whose Python object was kept alive for it,
the release needs the GIL; if the main thread has begun interpreter finalization by then, taking the
GIL ends the worker with ``pthread_exit``, and the forced unwind through a ``noexcept`` destructor
calls ``std::terminate`` (the same diagnosis as pytorch/pytorch PR 179291). ``destroy_process_group``
joins those workers only when it drops the last reference to the group; DeepSpeed keeps its own
(engine, optimizer, ``deepspeed.utils.groups``), and ``ProcessGroup.shutdown()`` does not join gloo's
threads (checked on torch 2.13: the thread count stays up until the last reference goes).

How often: ``tests/distributed/gloo_exit_repro.py`` (2 ranks, 2000 all_reduces, 2 busy loops
loading the 2 cores) aborted 4 of 20 plain exits in its first form; in a later sitting of 30, under a
different load (a benchmark sweep beside it), none. Barrier + destroy: 0 of 20. The CI run of 2026-11-25
aborted in the HF Trainer worker, which ended with neither. The frequency depends on scheduling, so a
count of zero proves nothing; what does is that without finalization there is nothing to meet.

So the end is in two parts: ``end_distributed`` (barrier, destroy) after a run that
finished, and ``exit_process`` as the last statement of a launched program, which on gloo flushes what
Python buffers and calls ``os._exit``: no finalization, so no thread can meet it. NCCL runs do not have
gloo's worker threads and exit normally.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import NoReturn

_ended_on_gloo = False


def _on_gloo() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and "gloo" in str(dist.get_backend()).lower()


def end_distributed() -> None:
    """Barrier, then ``destroy_process_group``; a no-op without an initialised process group."""
    import torch.distributed as dist

    global _ended_on_gloo
    if dist.is_available() and dist.is_initialized():
        _ended_on_gloo = _on_gloo()
        dist.barrier()
        dist.destroy_process_group()


def exit_process(status: int = 0) -> NoReturn:
    """End a launched program with ``status``. After a gloo group (ended or still up), skip interpreter
    finalization (``os._exit`` after flushing stdio and logging); otherwise ``sys.exit``. Call it only
    as the last statement of ``__main__``: nothing after it runs, atexit handlers included."""
    if not (_ended_on_gloo or _on_gloo()):
        sys.exit(status)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    logging.shutdown()
    os._exit(status)


# What a collective raises on a rank whose peer process is gone (it exited on its own error, or was killed):
# gloo's TCP transport ("Connection reset by peer", "Connection closed by peer", as a plain RuntimeError on
# torch 2.13), NCCL's watchdog ("remote process exited"), and torch.distributed's own network error.
_PEER_GONE = ("Connection reset by peer", "Connection closed by peer", "remote process exited", "Broken pipe")


def peer_lost(error: BaseException) -> bool:
    """Whether ``error`` says that another rank went away while this one waited for it in a collective:
    that rank's own error is the one to report, this one is only its echo."""
    import torch.distributed as dist

    if isinstance(error, getattr(dist, "DistNetworkError", ())):
        return True
    return isinstance(error, RuntimeError) and any(text in str(error) for text in _PEER_GONE)
