"""ElaLoRA under DeepSpeed (2 CPU ranks, gloo, ZeRO-0, ZeRO-2 and ZeRO-3) against the single-process reference.

Tiny SVD-adapted Llama (14 matrices, 2 of 4 slots active each), 8 optimizer steps, global batch 8 =
2 ranks x GAS 2 x micro-batch 2, AdamW, clipping at 0.15, orthogonality regulariser 0.1, rounds at
steps 3 (3 moves) and 5 (2 moves: the cubic decay). Under ZeRO-3 every factor is partitioned, so the
slot scores, the regulariser's gradient and the grown directions are assembled from pieces; under
ZeRO-0 every rank's piece is the whole replica and must not be summed (before this was handled, the
ZeRO-0 case moved different ranks at step 3).

Measured (this machine, fp32): identical rounds and masks; factors within 6e-7 relative overall and
1.5e-5 for the worst tensor (a λ vector whose entries are ~lr-sized, where Adam's 1/sqrt(v) amplifies
the reduction-order floor); losses within 2e-7. Tolerances: the plain-LoRA equivalence ones (1e-4 per
tensor, 2e-5 overall, 1e-5 on losses). A rank that used its local scores without the all-reduce, or
a growth written to the wrong entries, changes the masks or moves the factors by > 1e-2.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("deepspeed")

from launch import SHARED_2_RANKS  # noqa: E402
from reference import compare_results, train_reference  # noqa: E402

pytestmark = pytest.mark.dist

STEPS, GAS, MICRO, CLIP = 8, 2, 2, 0.15
TOL = {"tensor": 1e-4, "global": 2e-5, "loss": 1e-5}
STAGES = (0, 2, 3)
for _stage in STAGES:  # in the equivalence tests' shared launch (launch.SharedLaunch)
    SHARED_2_RANKS.add(f"elalora-zero{_stage}", ["--stage", _stage, "--dtype", "fp32", "--steps", STEPS, "--gas", GAS,
                                                 "--micro-batch", MICRO, "--clip", CLIP, "--method", "elalora"])  # fmt: skip


@pytest.fixture(scope="module")
def reference():
    return train_reference(steps=STEPS, global_batch_size=2 * GAS * MICRO, dtype="fp32", clip=CLIP, chunks=2 * GAS,
                           method="elalora")  # fmt: skip


@pytest.mark.parametrize("stage", STAGES)
def test_two_ranks_match_single_process(stage, reference, tmp_path_factory):
    got = SHARED_2_RANKS.result(f"elalora-zero{stage}", tmp_path_factory)
    ref_rounds, got_rounds = reference["elalora"]["rounds"], got["elalora"]["rounds"]
    assert [r["step"] for r in ref_rounds] == [0, 3, 5] and [r["moves"] for r in ref_rounds] == [0, 3, 2]
    assert got_rounds == ref_rounds
    assert all(torch.equal(a, b) for a, b in zip(got["elalora"]["active"], reference["elalora"]["active"]))
    budget = 2 * 14
    assert all(sum(r["ranks"]) == budget for r in got_rounds)
    diff = compare_results(got, reference)
    assert diff["trainable_max_rel"] < TOL["tensor"], diff
    assert diff["trainable_global_rel"] < TOL["global"], diff
    assert diff["loss_max_abs"] < TOL["loss"], diff
    assert diff["frozen_mismatch"] == [], diff
    # inactive slots hold exact zeros on both sides (nothing leaks through the ZeRO step)
    for name, t in got["trainable"].items():
        if ".lora_E." in name:
            layer = name.split(".lora_E.")[0]
            index = sorted({n.split(".lora_E.")[0] for n in got["trainable"] if ".lora_E." in n}).index(layer)
            inactive = ~got["elalora"]["active"][index]
            assert torch.all(t.flatten()[inactive] == 0)
            assert torch.all(got["trainable"][f"{layer}.lora_A.default"][inactive] == 0)
            assert torch.all(got["trainable"][f"{layer}.lora_B.default"][:, inactive] == 0)
