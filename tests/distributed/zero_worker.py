"""DeepSpeed side of the equivalence tests: train the tiny PEFT model under ZeRO, dump the result.

Run under a launcher (all ranks build the same model from the same seed)::

    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 --master_port 29512 tests/distributed/zero_worker.py \
        --stage 2 --dtype fp32 --steps 6 --gas 2 --micro-batch 2 --clip 1.0 --out /tmp/z2.pt
        [--method lora|scalora] [--interval I] [--scalora-warmup W]
        [--save-at STEP --ckpt DIR] [--resume DIR] [--zero-extra JSON]
    ... tests/distributed/zero_worker.py --plan runs.json   # several runs, one after the other, in one launch

The global batch of step t is ``reference.global_batch(t, world*gas*micro)``; rank r runs micro-steps
k = 0..gas-1 on rows [(r*gas + k)*micro, +micro) (``reference.rank_micro_batch``). Each micro-batch
loss is the HF mean over its tokens; DeepSpeed divides it by GAS and averages gradients over ranks,
so the step follows the gradient of the global-batch mean, like ``reference.train_reference`` with
``global_batch_size = world*gas*micro``. The reported loss of a step is the mean of the micro-batch
losses, all-reduced (averaged) over ranks.

Rank 0 writes (``torch.save``) the dictionary documented in ``reference.py``: ``losses``,
``grad_norms`` (``engine.get_global_grad_norm()``, before clipping; NaN where the engine keeps
none, e.g. stage 0), ``trainable`` (full fp32 masters
via ``safe_get_full_fp32_param``, a collective called on every rank in one order), ``frozen`` (full
base weights; ZeRO-3 gathers them with ``GatheredParameters``) and ``meta``.

``--plan FILE`` runs several argument lists one after the other in the same ranks (``plan.py``,
``launch.SharedLaunch``); each run starts from its own seed and engine, and destroys its engine at the end.

Checkpoints: ``--save-at S --ckpt DIR`` calls ``engine.save_checkpoint(DIR, tag="step{S}")`` after
optimizer step S (1-based) with ``client_state={"step", "losses", "grad_norms", "scalora"}``;
``--resume DIR`` loads the latest tag of DIR and continues to ``--steps``; the output then holds all
steps' losses (the earlier ones from the checkpoint).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

_HERE = Path(__file__).resolve().parent
for _p in (_HERE.parent, _HERE):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from reference import add_common_args, build_model, elalora_config, global_batch, rank_micro_batch  # noqa: E402


def attach_scalora(engine, model, interval, **options):
    """The DeepSpeed ScaLoRA controller, refreshing at the same steps as ``ScaLoRA.refresh_if_due``; its
    rank sketches measured at every refresh, so that the last refresh's estimate is compared."""
    from ds_scalora import ScaLoRAConfig
    from ds_scalora.zero import attach

    return attach(engine, model, ScaLoRAConfig(interval=interval, rank_sketch_every=1, **options))


def replica_fingerprints(model) -> list:
    """Per frozen parameter, a float64 checksum of this rank's full replica (ZeRO-0/1/2 only)."""
    return [float(p.detach().double().mul(torch.arange(p.numel(), dtype=torch.float64, device=p.device).view(p.shape).sin()).sum())
            for p in model.parameters() if not p.requires_grad]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="tiny PEFT LoRA model under DeepSpeed ZeRO (CPU/gloo friendly)")
    add_common_args(p)
    p.add_argument("--stage", type=int, choices=[0, 1, 2, 3], required=True)
    p.add_argument("--gas", type=int, default=1, help="gradient_accumulation_steps")
    p.add_argument("--micro-batch", type=int, default=1, help="train_micro_batch_size_per_gpu")
    p.add_argument("--out", required=True, help="result file, written by rank 0")
    p.add_argument("--save-at", type=int, default=None, help="save a checkpoint after this optimizer step")
    p.add_argument("--ckpt", default=None, help="checkpoint directory for --save-at")
    p.add_argument("--resume", default=None, help="checkpoint directory to resume from")
    p.add_argument(
        "--zero-extra",
        default=None,
        help="JSON merged into zero_optimization (default: ZeRO-3 partitions every param: "
        "persistence thresholds 0, sub_group_size 1024; all stages: 1000-element buckets)",
    )
    p.add_argument("--nan-at", type=int, default=None, help="make rank 0's gradients NaN at this step (0-based)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=-1, help="set by the launcher")
    a = p.parse_args(argv)
    if (a.save_at is None) != (a.ckpt is None):
        p.error("--save-at and --ckpt go together")
    return a


def ds_config(a) -> dict:
    # Small buckets: ZeRO-1/2 allocate a reduce_bucket_size-element buffer (default 5e8) on every
    # micro-step, ~1-2 s each on this CPU box; 1000 elements also splits the 4096 LoRA elements of
    # the tiny model into several reduction buckets.
    zero = {"stage": a.stage, "reduce_bucket_size": 1000}
    if a.stage in (1, 2):
        zero["allgather_bucket_size"] = 1000
    if a.stage == 3:
        # The tiny model's params are all below the default persistence threshold (1e5), which would
        # leave them unpartitioned; several sub-groups exercise the per-sub-group inner step.
        zero.update(
            {"stage3_param_persistence_threshold": 0, "stage3_model_persistence_threshold": 0, "sub_group_size": 1024}
        )
    if a.zero_extra:
        zero.update(json.loads(a.zero_extra))
    return {
        "train_micro_batch_size_per_gpu": a.micro_batch,
        "gradient_accumulation_steps": a.gas,
        "gradient_clipping": a.clip,
        "zero_optimization": zero,
        "bf16": {"enabled": a.dtype == "bf16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def gather_result(engine, model) -> tuple[dict, dict]:
    """Full fp32 trainable masters and full frozen weights, on every rank (collectives inside)."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    trainable, frozen = {}, {}
    for name, p in model.named_parameters():  # same order on every rank
        if p.requires_grad:
            full = safe_get_full_fp32_param(p)
            if full is None:  # stage 0 with a plain (fp32) optimizer: no hp mapping, the param is the master
                full = p.data
            trainable[name] = full.detach().float().cpu().clone()
        else:
            with deepspeed.zero.GatheredParameters([p]):  # no-op below ZeRO-3
                frozen[name] = p.data.detach().cpu().clone()
    return trainable, frozen


def main(argv=None) -> None:
    a = parse_args(argv)
    t_start = time.perf_counter()
    import torch.distributed as dist

    from ds_scalora.deepspeed_import import import_deepspeed

    deepspeed = import_deepspeed()  # the product's own first import (without mlflow)

    from ds_scalora.zero import disable_cpu_shm_comm

    disable_cpu_shm_comm()
    deepspeed.init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(a.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)

    model = build_model("fp32", a.seed, method=a.method, steps=a.steps)  # DeepSpeed casts to bf16 itself
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=a.lr, weight_decay=a.weight_decay)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config(a))
    t_init = time.perf_counter()

    controller = None
    if a.method == "scalora":
        controller = attach_scalora(engine, model, a.interval, warmup_steps=a.scalora_warmup, restart=a.restart,
                                    solver=a.solver)
    elif a.method == "elalora":
        from ds_scalora.zero import attach_elalora

        controller = attach_elalora(engine, model, elalora_config(a.steps))

    losses, grad_norms, start, accumulated_rank = [], [], 0, None
    if a.resume:
        loader = controller.load_checkpoint if controller is not None else engine.load_checkpoint
        _, client = loader(a.resume)
        start, losses, grad_norms = int(client["step"]), list(client["losses"]), list(client["grad_norms"])
        opt = engine.optimizer
        if hasattr(opt, "_hp_optimizer_states_linked") and hasattr(opt, "_lazy_init_hp_params_optimizer_state"):
            # ZeRO-1/2 re-link after load_checkpoint (deepspeed-zero.md §4.1, pitfall P11); harmless otherwise.
            opt._hp_optimizer_states_linked = False
            opt._lazy_init_hp_params_optimizer_state()

    global_size = world * a.gas * a.micro_batch
    for step in range(start, a.steps):
        t_step = time.perf_counter()
        batch = global_batch(step, global_size, a.seq_len, a.data_seed)
        total = torch.zeros((), dtype=torch.float64)
        for k in range(a.gas):
            mb = rank_micro_batch(batch, rank, world, a.gas, a.micro_batch, k)
            mb = {key: value.to(engine.device) for key, value in mb.items()}
            loss = engine(**mb).loss
            total += loss.detach().double().cpu()
            if step == a.nan_at and rank == 0 and k == 0:
                loss = loss * float("nan")  # a non-finite gradient: DeepSpeed skips the step
            engine.backward(loss)
            engine.step()  # the optimizer only steps at the boundary (k == gas-1)
        if a.method == "scalora" and controller.last_report is not None:
            accumulated_rank = controller.last_report.accumulated_rank
        total = (total / a.gas).to(engine.device)  # NCCL reduces device tensors only
        dist.all_reduce(total)
        losses.append(float(total) / world)
        norm = engine.get_global_grad_norm()
        grad_norms.append(float("nan") if norm is None else float(norm))
        if rank == 0:
            print(f"[zero_worker] step {step + 1}/{a.steps} loss {losses[-1]:.6f} "
                  f"grad_norm {grad_norms[-1]:.6f} ({time.perf_counter() - t_step:.2f}s)", flush=True)
        if a.save_at is not None and step + 1 == a.save_at:
            client = {"step": step + 1, "losses": losses, "grad_norms": grad_norms}
            saver = controller.save_checkpoint if controller is not None else engine.save_checkpoint
            saver(a.ckpt, tag=f"step{step + 1}", client_state=client)
    t_train = time.perf_counter()

    # ZeRO-3: how many params are really partitioned (an empty placeholder outside a gather)
    partitioned = sum(1 for p in model.parameters() if hasattr(p, "ds_tensor") and p.data.numel() == 0)
    trainable_full, frozen_full = gather_result(engine, model)
    replicas_identical = None
    if a.stage < 3:  # every rank holds full replicas of the frozen weights: they must agree bit for bit
        mine = torch.tensor(replica_fingerprints(model), dtype=torch.float64, device=engine.device)  # NCCL: device tensors
        everyone = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(everyone, mine)
        replicas_identical = all(torch.equal(mine, other) for other in everyone)
    totals = dict(controller.totals) if controller is not None else {}
    merged = {}  # full-precision merged weights (the bf16 weight plus the precision policy's state)
    if a.method == "scalora":
        for layer in controller.layers:
            merged[f"{layer.name}.base_layer.weight"] = controller.full_merged_weight(layer).cpu()
    if rank == 0:
        result = {
            "losses": losses,
            "grad_norms": grad_norms,
            "trainable": trainable_full,
            "frozen": frozen_full,
            "merged": merged,
            "elalora": None if a.method != "elalora" else {"active": [m.clone() for m in controller.core.active],
                                                           "rounds": controller.core.rounds},
            "meta": {
                "kind": "deepspeed",
                "accumulated_rank": accumulated_rank,
                "stage": a.stage,
                "dtype": a.dtype,
                "method": a.method,
                "world_size": world,
                "gas": a.gas,
                "micro_batch": a.micro_batch,
                "global_batch": global_size,
                "steps": a.steps,
                "resumed_from": start if a.resume else None,
                "replicas_identical": replicas_identical,
                "scalora_totals": totals,
                "skipped_steps": engine.skipped_steps,
                "clip": a.clip,
                "zero_optimizer": type(engine.optimizer).__name__,
                "partitioned_params": partitioned,
                "num_params": len(list(model.parameters())),
                "deepspeed": deepspeed.__version__,
                "backend": dist.get_backend(),
                "init_seconds": t_init - t_start,
                "train_seconds": t_train - t_init,
            },
        }
        tmp = f"{a.out}.tmp"
        torch.save(result, tmp)
        os.replace(tmp, a.out)
    dist.barrier()
    if hasattr(engine, "destroy"):  # a next run of a --plan in this process starts clean (ZeRO-3 hooks released)
        engine.destroy()


if __name__ == "__main__":
    from plan import main_or_plan

    main_or_plan(main)
    from ds_scalora.zero import end_distributed, exit_process

    end_distributed()  # barrier + destroy_process_group
    exit_process(0)  # on gloo: os._exit, see ds_scalora/zero/teardown.py
