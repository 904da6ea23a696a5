"""The divergence guard of the training loop (train.divergence_patience): a run whose loss turns
non-finite, or whose gradient norm vanishes to exactly zero (the weights overflowed), stops with
:class:`Diverged` after K bad steps in a row, records it in summary.json, and never saves a checkpoint
of a bad step over a good one. In-process runs of ds_configs/tiny.yaml at one rank (a few seconds each)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

pytest.importorskip("deepspeed")

from ds_scalora.bench.grid import train_once  # noqa: E402
from ds_scalora.train import checkpoints  # noqa: E402
from ds_scalora.train.config import load_config  # noqa: E402
from ds_scalora.train.loop import Diverged  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _run(tmp_path, *sets):
    cfg = load_config(str(REPO / "ds_configs" / "tiny.yaml"),
                      [f"train.output_dir={tmp_path / 'run'}", "train.max_steps=10", "train.save_steps=1",
                       "train.save_total_limit=3", "train.eval_steps=0", "train.logging_steps=1", "method.name=lora", *sets])  # fmt: skip
    return cfg


@pytest.mark.parametrize("lr,reason", [("1e30", "loss nan"), ("1e6", "gradient norm 0.0")])
def test_a_diverging_run_stops_and_keeps_its_good_checkpoint(tmp_path, lr, reason):
    cfg = _run(tmp_path, f"train.learning_rate={lr}", "train.divergence_patience=3")
    with pytest.raises(Diverged, match=rf"{reason} for 3 steps in a row .* newest good checkpoint is step0000000"):
        train_once(cfg)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    stop = summary["diverged"]
    assert stop["steps_in_a_row"] == 3 and stop["reason"].startswith(reason) and stop["step"] < 10
    history = {h["step"]: h for h in summary["history"]}
    for tag in checkpoints.complete_tags(cfg.train.output_dir):  # every saved step was a good one
        h = history[int(tag.removeprefix("step"))]
        assert math.isfinite(h["loss"]) and math.isfinite(h["grad_norm"]) and h["grad_norm"] > 0, h
    assert checkpoints.complete_tags(cfg.train.output_dir)


def test_a_healthy_run_is_not_stopped(tmp_path):
    summary = train_once(_run(tmp_path, "train.max_steps=4"))
    assert summary["diverged"] is None and summary["steps"] == 4
    # the final evaluation states its own seconds (transformers' name), part of what the run took
    assert 0 < summary["eval"]["eval_runtime"] < 600
