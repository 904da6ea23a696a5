"""The update-rank probe (``ds_scalora.bench.update_rank``): its cuts, and that its hook leaves the model as it found it."""

import os

import torch
from peft import LoraConfig, get_peft_model

from ds_scalora.bench.update_rank import CutUpdate, cut, energy_outside


def test_cut_is_the_best_rank_k_approximation_and_its_energy_share_is_the_residual():
    """Against a brute-force reference in float64: no rank-k product of a random search does better than the
    SVD cut (Eckart-Young), and the share of ‖Δ‖² outside the top k is the cut's relative residual."""
    gen = torch.Generator().manual_seed(0)
    delta = torch.randn(12, 20, generator=gen, dtype=torch.float64)
    S = torch.linalg.svdvals(delta)
    for k in (1, 3, 12):
        residual = float((delta - cut(delta, k)).norm() ** 2 / delta.norm() ** 2)
        assert abs(residual - energy_outside(S, k)) < 1e-12  # both exact up to float64 rounding
        for _ in range(50):  # random rank-k products never beat it (the cut is a minimiser)
            L = torch.randn(12, k, generator=gen, dtype=torch.float64)
            coef = torch.linalg.lstsq(L, delta).solution  # the best right factor for this left one: still no better
            assert float((delta - L @ coef).norm() ** 2 / delta.norm() ** 2) >= residual - 1e-12
    assert energy_outside(S, 12) == 0.0


def test_hook_cuts_the_merged_and_adapter_update_and_restores_the_model():
    """A PEFT LoRA layer whose frozen weight also holds a merged update (as ScaLoRA's does): at full rank the
    rebuilt update gives the model's own loss, a cut at the update's rank too, and the model comes back bit for bit."""
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(16, 16, dtype=torch.float64))
    model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["0"]))
    hook = CutUpdate("0")
    hook.after_setup(None, model)
    layer = hook.module
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
        merged = torch.randn(16, 1, dtype=torch.float64) @ torch.randn(1, 16, dtype=torch.float64)
        hook.weight.add_(merged)  # a rank-1 merge: the update is rank 3 in all
    x = torch.randn(8, 16, dtype=torch.float64)
    target = torch.randn(8, 16, dtype=torch.float64)
    evaluate = lambda: {"eval_loss": float(((model(x) - target) ** 2).mean())}  # noqa: E731
    before = [p.detach().clone() for p in model.parameters()]
    hook.ks = (1, 3)
    hook.after_training(None, model, evaluate)
    r = hook.result
    assert abs(r["nll_rebuilt"] - r["nll"]) < 1e-12
    assert abs(r["cut_nll"]["3"] - r["nll"]) < 1e-12  # rank 3: the cut is the whole update
    assert r["cut_nll"]["1"] != r["nll"]
    assert r["energy_outside"]["3"] < 1e-20 and r["energy_outside"]["1"] > 0.01
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_hook_in_the_training_loop_sees_the_last_evaluation_and_a_merged_update_of_rank_above_r(tmp_path):
    """Through ``loop.run`` (tiny.yaml, one rank, ZeRO-2): ``after_training``'s evaluation is the run's last one,
    the update ScaLoRA merged into the weight plus its adapter rebuilds that loss, and after refreshes that merged
    the update has energy outside its top r (4) directions, which a LoRA update cannot have."""
    import pytest

    pytest.importorskip("deepspeed")
    from pathlib import Path

    from ds_scalora.bench.grid import train_once
    from ds_scalora.train.config import load_config

    cfg = load_config(str(Path(__file__).resolve().parents[1] / "ds_configs" / "tiny.yaml"),
                      [f"train.output_dir={tmp_path / 'run'}", "train.max_steps=12", "train.save_steps=0",
                       "train.eval_steps=12", "eval.exact_match=false", "method.target_modules=[layers.1.mlp.down_proj]",
                       "method.scalora.shrink=4.0", "train.learning_rate=0.05"])
    hook = CutUpdate("layers.1.mlp.down_proj", ks=(4,))
    saved = dict(os.environ)
    try:
        summary = train_once(cfg, hook)
    finally:
        # the in-process run sets one-rank launcher variables (RANK, MASTER_PORT: the port this process's group
        # now listens on); left behind, every later test's subprocess would take itself for a launched rank of
        # this group and fail to bind that port
        os.environ.clear()
        os.environ.update(saved)
    r = hook.result
    assert abs(r["nll"] - summary["eval"]["eval_loss"]) < 1e-9  # the same model, evaluated again
    assert abs(r["nll_rebuilt"] - r["nll"]) < 1e-5  # fp32 rounding of W0 + ΔW
    assert r["energy_outside"]["4"] > 1e-4
