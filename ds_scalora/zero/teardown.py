"""The end of a DeepSpeed program: every rank waits for the others, then the process group goes.

Why more than ``dist.destroy_process_group()``: on the CPU accelerator (gloo) a finished run could
abort at interpreter exit with "terminate called without an active exception" (SIGABRT; the launcher
then exits 250). The example's abort did not recur in 14 tries; a core dump of a minimal 2-rank gloo
script that aborts the same way (all_reduces on temporaries, then exit, under CPU load) shows the cause:

    ProcessGroupGloo::runLoop -> ~AsyncAllreduceWork -> TensorImpl::decref_pyobject
        -> gil_scoped_acquire -> take_gil -> PyThread_exit_thread -> _Unwind_ForcedUnwind -> std::terminate

A gloo worker thread drops its reference to a finished collective a moment after the caller has
returned. When that reference is the last one to a tensor whose Python object was kept alive for it,
the release needs the GIL; if the main thread has begun interpreter finalization by then, taking the
GIL ends the worker with ``pthread_exit``, and the forced unwind through a ``noexcept`` destructor
calls ``std::terminate``. ``destroy_process_group`` would join those workers first, but only when it
drops the last reference to the group, and DeepSpeed keeps its own (engine, optimizer,
``deepspeed.utils.groups``), so the gloo backend and its threads outlive it.

The barrier is what helps: it waits for every earlier collective, and while the main thread waits in it
the GIL is free, so a worker's late release completes then instead of during finalization. It narrows
the window to a worker that stays descheduled through a whole barrier round trip; it does not close it
(nothing short of destroying the backend does). NCCL runs do not have gloo's worker threads.
"""

from __future__ import annotations


def end_distributed() -> None:
    """Barrier, then ``destroy_process_group``; a no-op without an initialised process group."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
