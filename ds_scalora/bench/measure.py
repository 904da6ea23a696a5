"""Measurements taken around a benchmark run: the rank of the update every method accumulated, the
cost per step (in a fresh process per method, so that peak memory is that method's), and the
machine's matmul peak for model-FLOPs utilisation.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

import torch

from ..spectrum import numerical_rank

RANK_RTOL = 1e-3  # singular values above 1e-3 of the largest count (the threshold of the ScaLoRA sketch)


def _target_weights(model, targets) -> dict:
    """name -> (module, weight tensor) of every adapted (or, for full fine-tuning, targeted) linear;
    ``targets`` "all-linear": every PEFT layer, or every linear but the output head (PEFT's choice)."""
    out = {}
    adapted = any(hasattr(m, "get_base_layer") for m in model.modules())
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if targets == "all-linear":
            if hasattr(module, "get_base_layer") if adapted else (isinstance(module, torch.nn.Linear) and leaf != "lm_head"):
                out[name] = module
            continue
        if leaf in targets and hasattr(module, "weight") and isinstance(getattr(module, "weight"), torch.Tensor):
            out[name] = module  # a plain Linear (full fine-tuning)
        elif leaf in targets and hasattr(module, "get_base_layer"):
            out[name] = module  # a PEFT layer: base weight + get_delta_weight
    return out


def _effective(module) -> torch.Tensor:
    if hasattr(module, "get_base_layer"):
        W = module.get_base_layer().weight.detach().double()
        for adapter in module.active_adapters:
            W = W + module.get_delta_weight(adapter).detach().double()
        return W
    return module.weight.detach().double()


class UpdateRank:
    """Hooks for ``loop.run``: snapshot the targeted weights after setup; at the end, the numerical
    rank of (effective weight − initial weight) per matrix, for every method alike (one rank only)."""

    def __init__(self, targets):
        self.targets = targets if targets == "all-linear" else set(targets)
        self.initial: dict = {}
        self.ranks: dict = {}

    def after_setup(self, engine, model):
        self.initial = {n: _effective(m).float().clone() for n, m in _target_weights(model, self.targets).items()}

    def before_summary(self, engine, model, summary):
        for name, module in _target_weights(model, self.targets).items():
            self.ranks[name] = numerical_rank(_effective(module) - self.initial[name].double(), rtol=RANK_RTOL)
        summary["update_rank_mean"] = statistics.fmean(self.ranks.values()) if self.ranks else None


def matmul_peak_flops(seconds: float = 1.0, windows: int = 3) -> tuple[float, str]:
    """Measured dense matmul throughput (FLOP/s) of this machine in the training dtype: the best of
    ``windows`` timed windows (one window on the 2-core machine read 317 and 411 GFLOP/s a day apart)."""
    if torch.cuda.is_available():
        n, dtype, device = 8192, torch.bfloat16, "cuda"
    else:
        n, dtype, device = 1024, torch.float32, "cpu"
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    a @ b
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    best = 0.0
    for _ in range(windows):
        count, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            a @ b
            count += 1
        sync()
        best = max(best, 2 * n**3 * count / (time.perf_counter() - t0))
    return best, f"{n}x{n} {str(dtype).removeprefix('torch.')} on {device}, best of {windows} x {seconds:g} s"


def model_flops_per_token(model_params: int, full: bool, checkpointing: bool = False) -> float:
    """6·N per token with weight gradients (full fine-tuning), 4·N with a frozen base (forward 2N,
    backward through the activations 2N); gradient checkpointing recomputes the forward, 2N more. The
    adapters' own FLOPs and attention's are left out (the convention of ../shared/gpu.md)."""
    return ((6 if full else 4) + (2 if checkpointing else 0)) * model_params


def cost_in_subprocess(argv: list[str], timeout: float = 3600) -> dict:
    """Run ``python <argv>`` (``-m ds_scalora.bench.cost_worker ...``) in a fresh process; its JSON result."""
    out = argv[argv.index("--out") + 1]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(os.cpu_count() or 1))}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, *argv], env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 or not os.path.isfile(out):
        raise RuntimeError(f"cost run failed ({' '.join(argv)}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    with open(out) as f:
        return json.load(f)


def cost_summary(summary: dict, skip_first: int = 2) -> dict:
    """Amortised step time (the mean, so that periodic work such as a refresh every I steps counts
    1/I per step; the median would hide it), tokens/s over the same steps, the median step time for
    reference, and peak memory, from a run's per-step history (train.logging_steps = 1); the first steps
    (allocation, optimizer-state creation) and the last (final eval) are left out."""
    hist = [h for h in summary["history"] if "step_time_s" in h][skip_first:-1]
    if not hist:
        raise ValueError("the cost run is too short: raise --cost-steps")
    seconds = sum(h["step_time_s"] for h in hist)
    tokens = sum(h["tokens_per_s"] * h["step_time_s"] for h in hist)
    return {"step_time_s": seconds / len(hist), "tokens_per_s": tokens / seconds,
            "step_time_median_s": statistics.median(h["step_time_s"] for h in hist),
            "peak_memory_gib": max(h["peak_memory_gib"] for h in summary["history"] if "peak_memory_gib" in h)}  # fmt: skip
