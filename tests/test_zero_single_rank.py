"""The DeepSpeed controller in this process at one rank (gloo): fast checks of paths the multi-rank
tests do not cover: ZeRO disabled (stage 0), refused configurations, a step skipped for NaN gradients.

The worker of tests/distributed runs in-process here (world size 1), so the data, loss and model are
those of the equivalence tests; the reference is the same single-process trainer.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

deepspeed = pytest.importorskip("deepspeed")
sys.path.insert(0, str(Path(__file__).resolve().parent / "distributed"))
import zero_worker  # noqa: E402
from reference import compare_results, train_reference  # noqa: E402
from tiny_models import adamw, tiny_lora_model  # noqa: E402

from ds_scalora.zero import UnsupportedConfig, attach, disable_cpu_shm_comm  # noqa: E402
from ds_scalora.zero.single_process import free_port  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def one_rank_group():
    port = free_port()
    env = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    disable_cpu_shm_comm()
    deepspeed.init_distributed(dist_backend="gloo")
    yield
    # leave the process as it was: other tests (the HF Trainer) must not see a process group
    torch.use_deterministic_algorithms(False)  # zero_worker turns it on
    # DeepSpeed's own call: it also drops the groups deepspeed.utils.groups caches, which would otherwise
    # name a destroyed group in the next test that builds an engine (test_divergence, run after this file)
    deepspeed.comm.destroy_process_group()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def run_worker(tmp_path, *args):
    out = tmp_path / "r.pt"
    zero_worker.main([str(a) for a in args] + ["--out", str(out)])
    return torch.load(out, weights_only=True)


COMMON = ["--steps", 6, "--gas", 2, "--micro-batch", 4, "--clip", 0.1, "--method", "scalora", "--interval", 1,
          "--scalora-warmup", 1]  # fmt: skip


def test_zero_disabled_fp32_matches_reference_with_clipping(tmp_path):
    """Stage 0 clips in the engine before optimizer.step(); the refresh must still come first."""
    got = run_worker(tmp_path, "--stage", 0, "--dtype", "fp32", *COMMON)
    ref = train_reference(steps=6, global_batch_size=8, clip=0.1, chunks=2, method="scalora", interval=1, scalora_warmup=1)
    diff = compare_results(got, ref)
    assert got["meta"]["scalora_totals"]["refreshes"] == 5
    assert any(g > 0.1 for g in ref["grad_norms"])  # clipping engaged
    # one rank: only the GAS chunking differs; fp32 agreement as in the multi-rank tests
    assert diff["trainable_global_rel"] < 1e-5 and diff["loss_max_abs"] < 1e-5, diff


def test_relora_restart_under_zero2_matches_reference_and_restarts(tmp_path):
    """The ReLoRA baseline is ScaLoRA's refresh with α = β = 0 plus a fresh lora_A: under ZeRO-2 it
    matches the single-process reference (fp32, 1e-5 as above); in the reference, a restart leaves the
    effective weight W + s·B·A unchanged (float64 model: to 1e-12 of the merged adapter), zeroes lora_B and both factors' Adam moments, and draws lora_A afresh."""
    args = ["--steps", 6, "--gas", 2, "--micro-batch", 4, "--clip", 0.15, "--method", "scalora", "--interval", 2,
            "--scalora-warmup", 2, "--restart"]  # fmt: skip
    got = run_worker(tmp_path, "--stage", 2, "--dtype", "fp32", *args)
    ref = train_reference(steps=6, global_batch_size=8, clip=0.15, chunks=2, method="scalora", interval=2,
                          scalora_warmup=2, restart=True)  # fmt: skip
    diff = compare_results(got, ref)
    assert got["meta"]["scalora_totals"]["solver/restart"] == 2 * 14
    assert diff["trainable_global_rel"] < 1e-5 and diff["loss_max_abs"] < 1e-5, diff

    from ds_scalora import ScaLoRA, ScaLoRAConfig
    from tiny_models import fixed_batch

    model = tiny_lora_model(torch.float64)
    opt = adamw(model)
    relora = ScaLoRA(model, opt, ScaLoRAConfig(interval=3, warmup_steps=3, restart=True))
    for step in range(4):
        model(**fixed_batch(seed=step)).loss.backward()
        layer = relora.layers[0]
        adapter = layer.scale * layer.A.detach() @ layer.B.detach().T
        before = (layer.weight.detach() + adapter).clone()
        old_A = layer.lora_A.detach().clone()
        report = relora.refresh_if_due()
        if step == 3:
            assert report.solvers["restart"] == 14
            after = layer.weight.detach() + layer.scale * layer.A.detach() @ layer.B.detach().T
            assert float((after - before).norm()) < 1e-12 * float(adapter.norm()) and float(adapter.norm()) > 0
            assert float(layer.lora_B.abs().sum()) == 0 and not torch.equal(layer.lora_A.detach(), old_A)
            assert float(layer.lora_A.abs().max()) <= 1 / layer.lora_A.shape[1] ** 0.5
            for p in (layer.lora_A, layer.lora_B):
                assert all(float(opt.state[p][k].abs().sum()) == 0 for k in ("exp_avg", "exp_avg_sq"))
        opt.step()
        opt.zero_grad(set_to_none=True)


def test_nan_gradients_skip_the_step_and_the_refresh(tmp_path):
    """ZeRO-2 skips an optimizer step whose gradients are not finite; the refresh due at that step is
    skipped too (counted), nothing is corrupted, and training goes on."""
    got = run_worker(tmp_path, "--stage", 2, "--dtype", "fp32", *COMMON, "--nan-at", 3)
    totals = got["meta"]["scalora_totals"]
    from packaging.version import Version

    if Version(deepspeed.__version__).release < (0, 19, 8):
        # DeepSpeed before 0.19.8 applies the step: the weights turn NaN, and ScaLoRA skips that refresh and
        # every later one, whole (all 14 layers), rather than merging non-finite values
        assert totals["reason/nonfinite"] >= 14 and totals["reason/nonfinite"] % 14 == 0
        return
    assert got["meta"]["skipped_steps"] == 1
    assert totals["reason/nonfinite"] == 14 and totals["refreshes"] == 5
    assert all(torch.isfinite(t).all() for t in got["trainable"].values())
    assert all(torch.isfinite(t).all() for t in got["merged"].values())
    assert all(torch.isfinite(torch.tensor(x)) for i, x in enumerate(got["losses"]) if i != 3)


def _engine(config, dtype=torch.float32):
    model = tiny_lora_model(dtype)
    base = {"train_micro_batch_size_per_gpu": 1, "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=model, optimizer=adamw(model), config={**base, **config})
    return engine, model


def test_refused_configurations_say_why():
    engine, model = _engine({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}},
                             "zero_force_ds_cpu_optimizer": False})  # fmt: skip
    with pytest.raises(UnsupportedConfig, match="optimizer offload"):
        attach(engine, model)
    engine, model = _engine({"zero_optimization": {"stage": 0}, "bf16": {"enabled": True}})
    with pytest.raises(UnsupportedConfig, match="stage 0 with bf16"):
        attach(engine, model)
    engine, model = _engine({"zero_optimization": {"stage": 1}})
    attach(engine, model, interval=10)
    with pytest.raises(RuntimeError, match="already has a ds_scalora controller"):
        attach(engine, model)
    with pytest.raises(ValueError, match="interval"):
        attach(_engine({"zero_optimization": {"stage": 1}})[0], model, interval=0)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_gradient_edits_in_the_step_window_reach_the_optimizer_bf16(stage):
    """What a method writes into ``piece.grad`` inside the step window is what the optimizer steps with.
    Under ZeRO-3 with bf16 gradients DeepSpeed hands out an fp32 *copy* (get_local_fp32_grad_for_param),
    so the edits must be written back; once they were lost, silently: ScaLoRA's gradient rescale and
    ElaLoRA's regulariser and frozen slots under ZeRO-3 bf16. Check: zero every gradient in the window;
    AdamW (no weight decay) with zero gradients and zero moments moves nothing on its first step."""
    from ds_scalora.zero.state_access import ZeroAccess
    from ds_scalora.zero.step_hook import install_step_hook

    model = tiny_lora_model(torch.bfloat16)
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "bf16": {"enabled": True},
              "zero_optimization": {"stage": stage}}  # fmt: skip
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    access = ZeroAccess(engine)
    trainable = [p for p in engine.module.parameters() if p.requires_grad]
    seen = []

    def zero_grads(step):
        for p in trainable:
            piece = access.piece(p)
            if piece is not None:
                seen.append(float(piece.grad.abs().sum()))
                piece.grad.zero_()

    install_step_hook(engine, access.kind, zero_grads, after=access.write_back_grads)
    before = [access.piece(p, grad=False).master.clone() for p in trainable]
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    engine.backward(engine(input_ids=ids, labels=ids).loss)
    engine.step()
    after = [access.piece(p, grad=False).master for p in trainable]
    assert sum(seen) > 0  # there were gradients to drop
    moved = max(float((a - b).abs().max()) for a, b in zip(after, before))
    assert moved == 0.0, f"ZeRO-{stage} bf16: the optimizer stepped with gradients the window had zeroed ({moved})"
    engine.destroy()
