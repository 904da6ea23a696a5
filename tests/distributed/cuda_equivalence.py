"""The fp32 equivalence and resume checks of test_zero_scalora_equivalence.py on one CUDA rank (NCCL).

Not part of the suite (CI has no GPU): the GPU checklist (``tools/gpu_checklist.sh``) runs it on a GPU machine::

    python tests/distributed/cuda_equivalence.py

In this process, one rank (as test_zero_single_rank.py does with gloo): ScaLoRA at ZeRO-0 to 3 (and the
Adam-aware solver at ZeRO-3), global batch 8 = GAS 2 x micro-batch 4, against the single-process reference
trained on the same device, with the CPU tests' tolerances (``TOL["fp32"]``: 1e-4 per tensor, 1e-5 overall
and on losses, 1e-4 on each merged update). Then the runs saved after step 3 resume in a fresh engine to
the same losses and state, bit for bit.

Beside it, each run's distance to the reference trained on the CPU is printed, not checked: the first
H200 run (2026-12-04, docs/gpu_runs.md) measured 3.3e-5 worst tensor, 0.9-1.2e-5 overall, 5.9-7.7e-5 on
the merged updates, losses 7e-7, against CPU references alone. CUDA's fp32 kernels round differently from
the CPU's, and Adam's 1/sqrt(v) on near-zero gradients amplifies that; the same-device reference
separates those kernel differences from the DeepSpeed integration's own error, which is what the CPU
tests bound.
Exits non-zero at the first failed check; prints one line per run.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent), str(HERE.parents[1])]
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # zero_worker asks for deterministic algorithms

import torch  # noqa: E402

import zero_worker  # noqa: E402
from reference import compare_results, train_reference  # noqa: E402
from test_zero_scalora_equivalence import CLIP, GAS, INTERVAL, STEPS, WARMUP, check, worker_args  # noqa: E402

from ds_scalora.zero.single_process import free_port  # noqa: E402

MICRO = 4  # one rank: global batch 8, as the 2-rank tests' 2 x GAS 2 x micro-batch 2


def run(tmp: Path, name: str, args: list) -> dict:
    out = tmp / f"{name}.pt"
    zero_worker.main([str(a) for a in args] + ["--out", str(out)])
    return torch.load(out, weights_only=True)


def main() -> None:
    cpu = "--cpu" in sys.argv  # a dry run of this script on gloo (DS_ACCELERATOR=cpu); the suite covers gloo
    if not torch.cuda.is_available() and not cpu:
        sys.exit("cuda_equivalence.py: no CUDA device (--cpu: a dry run on gloo with DS_ACCELERATOR=cpu)")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    from ds_scalora.deepspeed_import import import_deepspeed
    from ds_scalora.zero import disable_cpu_shm_comm

    disable_cpu_shm_comm()
    import_deepspeed().init_distributed(dist_backend="gloo" if cpu else "nccl")
    print(f"device {'CPU (gloo)' if cpu else torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="cuda_equivalence_"))
    device = "cpu" if cpu else "cuda"
    references = {}

    def check_both(got, label, solver="column"):
        if solver not in references:
            common = dict(steps=STEPS, global_batch_size=GAS * MICRO, dtype="fp32", clip=CLIP, chunks=GAS,
                          method="scalora", interval=INTERVAL, scalora_warmup=WARMUP, solver=solver)
            references[solver] = {d: train_reference(**common, device=d) for d in {device, "cpu"}}
        cross = compare_results(got, references[solver]["cpu"])
        print(f"  {label} against the CPU reference (not checked): factors worst {cross['trainable_max_rel']:.2e} "
              f"overall {cross['trainable_global_rel']:.2e}, losses {cross['loss_max_abs']:.2e}", flush=True)
        check(got, references[solver][device], "fp32", f"{label} (reference on {device})", 1)

    for stage in (0, 1, 2, 3):
        ckpt = tmp / f"zero{stage}-ckpt"
        full = run(tmp, f"zero{stage}", worker_args(stage, "fp32", MICRO, extra=("--save-at", 3, "--ckpt", ckpt)))
        check_both(full, f"ZeRO-{stage} fp32 1 rank")
        if stage >= 2:
            resumed = run(tmp, f"zero{stage}-resumed", worker_args(stage, "fp32", MICRO, extra=("--resume", ckpt)))
            assert resumed["meta"]["resumed_from"] == 3
            assert resumed["losses"] == full["losses"], (resumed["losses"], full["losses"])
            for kind in ("trainable", "frozen"):
                for name, t in full[kind].items():
                    assert torch.equal(resumed[kind][name], t), f"ZeRO-{stage} resume: {kind} {name} differs"
            print(f"ZeRO-{stage} resume after step 3: losses and state bit-identical", flush=True)
    adam = run(tmp, "zero3-adam", worker_args(3, "fp32", MICRO, extra=("--solver", "adam")))
    assert adam["meta"]["scalora_totals"].get("solver/adam", 0) > 0
    check_both(adam, "ZeRO-3 fp32 1 rank, solver adam", solver="adam")
    print(f"all equivalence checks passed on {'gloo' if cpu else 'CUDA'} (GAS {GAS}, micro-batch {MICRO})")


if __name__ == "__main__":
    main()
