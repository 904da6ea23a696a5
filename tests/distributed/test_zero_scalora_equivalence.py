"""ScaLoRA under DeepSpeed (2 and 4 CPU ranks, gloo) against the single-process reference.

Same setting as test_zero_lora_equivalence.py (tiny PEFT Llama, 6 optimizer steps, global batch 8 =
ranks x GAS 2 x micro-batch, AdamW, clipping at 0.15 so that some steps are clipped), with a refresh
at every step from step 1 (interval 1, warm-up 1): five refreshes, every layer merged five times.
The DeepSpeed side is ds_scalora.zero.attach; the reference is ds_scalora.ScaLoRA in one process.

Measured (this machine, fp32): factors agree to ~1e-6 relative overall, 1e-5 for the worst tensor, as
for plain LoRA (the floor is the reduction order, amplified by Adam's 1/sqrt(v) on near-zero
gradients); the merged updates W_T − W_0 agree to a few 1e-6 relative. Tolerances: the LoRA ones
(1e-4 per tensor, 2e-5 overall, 1e-5 on losses) and 1e-4 on each merged update relative to its size.
A wrong crossing (α for β), a missing scale or a merge on the wrong rows each move these by >1e-2.

bf16: DeepSpeed trains every parameter in bf16 with fp32 masters; the reference uses PEFT's bf16
(bf16 base, fp32 adapters): not the same arithmetic. On this tiny model, 6 steps of bf16 rounding move
the accumulated effective update W + s·A·Bᵀ − W_0 by about 20% (measured: the bf16 reference against the
fp32 reference, 0.21 worst layer; DeepSpeed bf16 against the bf16 reference, 0.18), and the scalar
fallback, a discrete choice, can flip per layer. So the bf16 check is at the function level: losses
within 5e-3 (measured 1.5e-3 on ~4.6), and the effective updates no further from the bf16 reference
than 1.5 times the bf16 reference's own distance from the fp32 one (the bf16 noise floor, measured in
the same test). Until 2026-11-24 ZeRO-3 bf16 lost the refresh's edits of the gradients (DeepSpeed hands
them out as fp32 copies; they are now written back): that measured 0.36 (losses 2.1e-3) and passed the
factor of 2 this test had then; 1.5 refuses it. The bf16 weights must equal the rounded full-precision
merged values (the policy path).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("deepspeed")

from launch import EXTENDED, SHARED_2_RANKS, run_deepspeed, run_deepspeed_two_nodes  # noqa: E402
from reference import build_model, compare_results, split_params, train_reference  # noqa: E402

pytestmark = pytest.mark.dist

STEPS, GAS, CLIP, INTERVAL, WARMUP = 6, 2, 0.15, 1, 1
TOL = {
    "fp32": {"tensor": 1e-4, "global": 1e-5, "loss": 1e-5, "merged": 1e-4},
    "bf16": {"loss": 5e-3, "noise_floor_factor": 1.5},
}
_REFERENCES: dict = {}


def worker_args(stage, dtype, micro, steps=STEPS, extra=()):
    return ["--stage", stage, "--dtype", dtype, "--steps", steps, "--gas", GAS, "--micro-batch", micro,
            "--clip", CLIP, "--method", "scalora", "--interval", INTERVAL, "--scalora-warmup", WARMUP,
            *extra]  # fmt: skip


# The 2-rank runs share one launch with the other equivalence modules' (launch.SharedLaunch). Each stage's run
# saves a checkpoint after step 3 on its way, which the resume test continues from in a launch of its own
# (and which must not change the run: the equivalence checks see it).
SHARED_RUNS = {
    **{f"scalora-zero{stage}": worker_args(stage, "fp32", micro=2,
                                           extra=("--save-at", 3, "--ckpt", f"{{dir}}/scalora-zero{stage}-ckpt"))
       for stage in (0, 1, 2, 3)},  # fmt: skip
    "scalora-zero3-adam": worker_args(3, "fp32", micro=2, extra=("--solver", "adam")),
    "scalora-zero3-bf16": worker_args(3, "bf16", micro=2),
}
for _key, _args in SHARED_RUNS.items():
    SHARED_2_RANKS.add(_key, _args)


def reference(dtype, world, micro, solver="column"):
    key = (dtype, world, micro, solver)
    if key not in _REFERENCES:
        _REFERENCES[key] = train_reference(
            steps=STEPS, global_batch_size=world * GAS * micro, dtype=dtype, clip=CLIP, chunks=world * GAS,
            method="scalora", interval=INTERVAL, scalora_warmup=WARMUP, solver=solver,
        )
    return _REFERENCES[key]


def merged_update_errors(got, ref, dtype):
    """Per adapted layer: ‖W_ds − W_ref‖ / ‖W_ref − W_0‖ on the full-precision merged weights."""
    _, initial = split_params(build_model(dtype, bf16_style="peft"))
    assert set(got["merged"]) == set(ref["merged"]) and len(ref["merged"]) == 14
    errors = {}
    for name, w_ref in ref["merged"].items():
        update = w_ref.double() - initial[name].double()
        assert float(update.norm()) > 0, f"{name} merged nothing"
        errors[name] = float((got["merged"][name].double() - w_ref.double()).norm() / update.norm())
    return errors


def effective_updates(res) -> dict:
    """Per adapted layer: W + s·lora_B·lora_A − W_0, each run against its own initial weights."""
    dtype = res["meta"]["dtype"]
    _, initial = split_params(build_model(dtype, bf16_style="peft"))
    scale = 8 / 4  # tiny_lora_model: lora_alpha 8, r 4
    out = {}
    for name, w in res["merged"].items():
        prefix = name[: -len(".base_layer.weight")]
        lora_A, lora_B = (res["trainable"][f"{prefix}.lora_{x}.default.weight"].double() for x in "AB")
        out[name] = w.double() + scale * lora_B @ lora_A - initial[name].double()
    return out


def effective_update_errors(got, ref) -> dict:
    u_got, u_ref = effective_updates(got), effective_updates(ref)
    return {n: float((u_got[n] - u_ref[n]).norm() / u_ref[n].norm()) for n in u_ref}


def check(got, ref, dtype, label, world):
    tol = TOL[dtype]
    diff = compare_results(got, ref)
    merged = merged_update_errors(got, ref, dtype)
    meta = got["meta"]
    print(f"{label}: factors worst {diff['trainable_max_rel']:.2e} overall {diff['trainable_global_rel']:.2e}, "
          f"losses {diff['loss_max_abs']:.2e}, merged updates worst {max(merged.values()):.2e}, "
          f"refresh totals {meta['scalora_totals']}, accumulated ranks {meta['accumulated_rank']}")
    assert meta["world_size"] == world
    assert meta["scalora_totals"]["refreshes"] == STEPS - WARMUP
    assert diff["loss_max_abs"] <= tol["loss"], diff
    if dtype == "fp32":
        assert diff["trainable_max_rel"] <= tol["tensor"], diff
        assert diff["trainable_global_rel"] <= tol["global"], diff
        assert max(merged.values()) <= tol["merged"], merged
        assert max(effective_update_errors(got, ref).values()) <= tol["merged"]
        # the rank estimate (sketched on the rank that solves each layer) is the reference's, layer by layer
        assert meta["accumulated_rank"] == ref["meta"]["accumulated_rank"] and max(meta["accumulated_rank"]) > 0
    else:
        floor = max(effective_update_errors(ref, reference("fp32", world, ref["meta"]["global_batch"] // world // GAS)).values())
        worst = max(effective_update_errors(got, ref).values())
        print(f"  bf16 effective-update error {worst:.3f} vs noise floor {floor:.3f}")
        assert worst <= tol["noise_floor_factor"] * floor
    if meta["stage"] < 3:
        assert meta["replicas_identical"] is True
    # the low-precision frozen weights the forward sees are the merged values, rounded
    for name, w in got["merged"].items():
        assert torch.equal(got["frozen"][name], w.to(got["frozen"][name].dtype)), name


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_scalora_matches_single_process_2_ranks(stage, tmp_path_factory):
    got = SHARED_2_RANKS.result(f"scalora-zero{stage}", tmp_path_factory)
    check(got, reference("fp32", 2, 2), "fp32", f"ZeRO-{stage} fp32 2 ranks", 2)


def test_adam_aware_solver_zero3_matches_single_process(tmp_path_factory):
    """The Adam-aware solver needs Adam's next step directions, computed on each rank's pieces of the
    partitioned moments and gradients and assembled with the factors: ZeRO-3's flat sub-groups are the
    hardest layout. Same fp32 tolerances as the paper's solver."""
    got = SHARED_2_RANKS.result("scalora-zero3-adam", tmp_path_factory)
    assert got["meta"]["scalora_totals"].get("solver/adam", 0) > 0
    check(got, reference("fp32", 2, 2, solver="adam"), "fp32", "ZeRO-3 fp32 2 ranks, solver adam", 2)


def test_scalora_4_ranks_zero2(tmp_path):
    got = run_deepspeed(4, worker_args(2, "fp32", micro=1), tmp_path, timeout=600)
    check(got, reference("fp32", 4, 1), "fp32", "ZeRO-2 fp32 4 ranks", 4)


def test_scalora_bf16_zero3(tmp_path_factory):
    got = SHARED_2_RANKS.result("scalora-zero3-bf16", tmp_path_factory)
    check(got, reference("bf16", 2, 2), "bf16", "ZeRO-3 bf16 2 ranks", 2)


@EXTENDED  # two nodes by default: test_train_entry.py's hostfile run at ZeRO-3 (the user's command, ScaLoRA)
def test_scalora_two_node_loopback_matches_one_node(tmp_path):
    """Two launchers as node 0 and node 1 on 127.0.0.1 (real cross-node rendezvous), ZeRO-2."""
    got = run_deepspeed_two_nodes(1, worker_args(2, "fp32", micro=2), tmp_path, timeout=600, launcher="deepspeed")
    check(got, reference("fp32", 2, 2), "fp32", "ZeRO-2 fp32 2 nodes x 1 rank", 2)


# ZeRO-2 extended: test_train_entry.py's killed run resumes ScaLoRA at ZeRO-2 (tiny.yaml) to the same losses exactly
@pytest.mark.parametrize("stage", [pytest.param(2, marks=EXTENDED), 3])
def test_resume_reproduces_the_uninterrupted_run(stage, tmp_path, tmp_path_factory):
    """Save after step 3 (between refreshes; the shared run of this stage), resume in a new launch: the same
    losses and state, exactly.
    ZeRO-1 is left out (80 s of CI): DeepSpeed runs ZeRO-1 and 2 through one optimizer and ZeroAccess reads
    both as "fragments", so stage 2 covers its save and load; ZeRO-1 checkpoint files are read in
    test_convert.py."""
    full = SHARED_2_RANKS.result(f"scalora-zero{stage}", tmp_path_factory)
    ckpt = SHARED_2_RANKS.dir / f"scalora-zero{stage}-ckpt"
    resumed = run_deepspeed(2, worker_args(stage, "fp32", micro=2, extra=("--resume", ckpt)), tmp_path)
    assert resumed["meta"]["resumed_from"] == 3
    assert resumed["losses"] == full["losses"]
    for name, t in full["trainable"].items():
        assert torch.equal(resumed["trainable"][name], t), name
    for name, t in full["frozen"].items():
        assert torch.equal(resumed["frozen"][name], t), name
    assert resumed["meta"]["scalora_totals"] == full["meta"]["scalora_totals"]
    assert resumed["meta"]["accumulated_rank"] == full["meta"]["accumulated_rank"]  # the sketches were saved
