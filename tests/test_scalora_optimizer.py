"""``ScaLoRAOptimizer``: the optimizer wrapper for plain PyTorch and DDP loops (issue 18).

Checked against the single-process reference (``ScaLoRA.refresh_if_due`` + the bare AdamW, the loop the
README showed before the wrapper existed): the same model, batches, scheduler and clipping give the same
parameters bit for bit (float64 model; the two loops run the very same operations in the same order, so
any difference is a wiring bug). A resume from the wrapper's ``state_dict`` is exact too, and the test
can fail: plain AdamW (no refresh) ends elsewhere. Under DDP (2 gloo processes, each half of the batch),
both replicas end bit-identical, and equal to the single-process run on the whole batch within 1e-10
(the gradient all-reduce sums in another order than one backward: float64 rounding only).
"""

from __future__ import annotations

import os

import pytest
import torch
from transformers import get_scheduler

from ds_scalora import ScaLoRA, ScaLoRAConfig, ScaLoRAOptimizer
from tiny_models import adamw, fixed_batch, tiny_lora_model

STEPS = 12
CONFIG = dict(interval=2, warmup_steps=2)


def _batches(steps=STEPS, batch=4):
    return [fixed_batch(seed=100 + k, batch=batch) for k in range(steps)]


def _reference(model, batches, steps):
    opt = adamw(model)
    scheduler = get_scheduler("cosine", opt, num_warmup_steps=3, num_training_steps=STEPS)
    scalora = ScaLoRA(model, opt, ScaLoRAConfig(**CONFIG))
    for batch in batches[:steps]:
        model(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scalora.refresh_if_due()
        opt.step()
        scheduler.step()
        opt.zero_grad()
    return scalora


def _wrapped(model, batches, start, stop, state=None):
    opt = ScaLoRAOptimizer(adamw(model), model, ScaLoRAConfig(**CONFIG))
    scheduler = get_scheduler("cosine", opt, num_warmup_steps=3, num_training_steps=STEPS)
    if state is not None:
        opt.load_state_dict(state["opt"])
        scheduler.load_state_dict(state["scheduler"])
    for batch in batches[start:stop]:
        model(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        scheduler.step()
        opt.zero_grad()
    return opt, scheduler


def _params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_wrapper_equals_the_reference_loop_and_resumes_exactly(tmp_path):
    batches = _batches()
    ref_model = tiny_lora_model(torch.float64)
    ref = _reference(ref_model, batches, STEPS)
    assert ref.totals["refreshes"] == 5  # steps 2, 4, 6, 8, 10
    want = _params(ref_model)

    model = tiny_lora_model(torch.float64)
    opt, scheduler = _wrapped(model, batches, 0, STEPS)
    got = _params(model)
    assert opt.scalora.totals == ref.totals
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert scheduler.get_last_lr() == [g["lr"] for g in opt.param_groups]

    # resume at step 6 from files: model, wrapper, scheduler
    model = tiny_lora_model(torch.float64)
    opt, scheduler = _wrapped(model, batches, 0, 6)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "scheduler": scheduler.state_dict()}, tmp_path / "ck.pt")
    state = torch.load(tmp_path / "ck.pt", weights_only=True)
    model = tiny_lora_model(torch.float64, seed=7)  # other initial values: everything must come from the file
    model.load_state_dict(state["model"])
    _wrapped(model, batches, 6, STEPS, state)
    resumed = _params(model)
    assert all(torch.equal(resumed[k], want[k]) for k in want)

    # and the check can fail: plain AdamW without the refreshes ends elsewhere
    plain = tiny_lora_model(torch.float64)
    opt = adamw(plain)
    for batch in batches:
        plain(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(plain.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
    frozen = [k for k in want if "base_layer.weight" in k]
    assert all(not torch.equal(_params(plain)[k], want[k]) for k in frozen)  # merges moved every adapted weight


def test_wrapper_refuses_what_it_cannot_wrap():
    model = tiny_lora_model()
    with pytest.raises(TypeError, match="wraps a torch.optim.Optimizer"):
        ScaLoRAOptimizer(object(), model)
    opt = ScaLoRAOptimizer(adamw(model), model)
    with pytest.raises(TypeError, match="already a ScaLoRAOptimizer"):
        ScaLoRAOptimizer(opt, model)
    with pytest.raises(ValueError, match="not a ScaLoRAOptimizer state dict"):
        opt.load_state_dict(adamw(model).state_dict())
    with pytest.raises(ValueError, match="does not train the LoRA factors"):
        ScaLoRAOptimizer(torch.optim.AdamW([next(p for p in model.parameters() if p.requires_grad)]), model)


def _ddp_worker(rank: int, world: int, init_file: str, out: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        model = tiny_lora_model(torch.float64)
        ddp = DistributedDataParallel(model)
        opt = ScaLoRAOptimizer(adamw(model), model, ScaLoRAConfig(**CONFIG))
        for batch in _batches(batch=4):
            mine = {k: v[rank * 2 : (rank + 1) * 2] for k, v in batch.items()}
            ddp(**mine).loss.backward()  # the mean over 2 rows; DDP averages the two replicas
            opt.step()
            opt.zero_grad()
        torch.save(_params(model), os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_replicas_refresh_identically_and_match_one_process(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert all(torch.equal(r0[k], r1[k]) for k in r0)  # the same refresh on both replicas, nothing drifted

    model = tiny_lora_model(torch.float64)
    opt = ScaLoRAOptimizer(adamw(model), model, ScaLoRAConfig(**CONFIG))
    for batch in _batches(batch=4):
        model(**batch).loss.backward()  # equal halves: the whole batch's mean = the mean of the halves' means
        opt.step()
        opt.zero_grad()
    one = _params(model)
    worst = max(float((r0[k] - one[k]).norm() / one[k].norm().clamp_min(1e-300)) for k in one)
    assert worst <= 1e-10, worst
    assert opt.scalora.totals["refreshes"] == 5
