"""Full fine-tuning restricted to named modules (``method.name: full`` with a ``method.target_modules`` list):
a full-rank update of exactly the weights a LoRA run would adapt, the reference of a rank-limited benchmark
task. In-process runs of ds_configs/tiny.yaml at one rank (a few seconds each)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("deepspeed")

from ds_scalora.bench.grid import train_once  # noqa: E402
from ds_scalora.train.config import load_config  # noqa: E402
from ds_scalora.train.methods import train_only  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


class Snapshots:
    """The model's parameters at setup and before the summary: what training changed."""

    def after_setup(self, engine, model):
        self.before = {n: p.detach().clone() for n, p in model.named_parameters()}

    def before_summary(self, engine, model, summary):
        self.changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), self.before[n])}


def test_full_fine_tuning_of_named_modules_changes_only_them(tmp_path):
    cfg = load_config(str(REPO / "ds_configs" / "tiny.yaml"),
                      [f"train.output_dir={tmp_path / 'run'}", "train.max_steps=3", "train.save_steps=0",
                       "train.eval_steps=0", "method.name=full", "method.target_modules=[layers.1.mlp.down_proj]"])
    hooks = Snapshots()
    summary = train_once(cfg, hooks)
    assert summary["steps"] == 3
    assert hooks.changed == {"model.layers.1.mlp.down_proj.weight"}


def test_a_target_list_that_matches_nothing_is_refused_with_the_names():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"matches no module .*'all-linear'"):
        train_only(model, ["down_proj"])
    train_only(model, ["0"])
    assert all(p.requires_grad for p in model.parameters())
