"""Benchmark task (a): a single linear layer learning a full-rank update, where the answer is known.

A 64 x 64 frozen weight ``W0`` and a teacher ``W0 + D`` whose update ``D`` is full rank with singular
values ``σ_i ∝ i^-½`` (its energy spread over every direction, ‖D‖ = ½‖W0‖). The student is the real
PEFT LoRA layer on ``W0``, trained by AdamW on fresh Gaussian inputs with the squared error to the
teacher's outputs; every method runs through the library's own classes (``ScaLoRA`` for ScaLoRA, ReLoRA
and the ablations). The error is ``‖W − W0 − D‖² / ‖D‖²``: rank-r LoRA cannot go below the energy of D
outside its top r directions (:func:`lora_floor`), full fine-tuning reaches 0. A run takes ~1 s.

A seed fixes the teacher, the initialisation and the data order.
"""

from __future__ import annotations

import math

import torch

DIM = 64
STEPS = 400
BATCH = 256


def teacher(seed: int, dim: int = DIM):
    """``(W0, D)`` of ``seed``: a random frozen weight and a full-rank update with σ_i ∝ i^-½."""
    g = torch.Generator().manual_seed(10_000 + seed)
    W0 = torch.randn(dim, dim, generator=g, dtype=torch.float64) / math.sqrt(dim)
    U, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    sigma = torch.arange(1, dim + 1, dtype=torch.float64) ** -0.5
    D = U @ torch.diag(sigma) @ V.T
    return W0, D * (0.5 * W0.norm() / D.norm())


def lora_floor(r: int, dim: int = DIM) -> float:
    """The best error any rank-r update reaches (Eckart–Young): the energy of D outside its top r."""
    s2 = 1.0 / torch.arange(1, dim + 1, dtype=torch.float64)
    return float(s2[r:].sum() / s2.sum())


class _Linear(torch.nn.Module):
    def __init__(self, W0):
        super().__init__()
        self.proj = torch.nn.Linear(W0.shape[1], W0.shape[0], bias=False)
        self.proj.weight.data.copy_(W0)

    def forward(self, x):
        return self.proj(x)


def run(arm: dict, lr: float, seed: int, steps: int = STEPS) -> dict:
    """Train one arm; returns the final error, the error every 20 steps and the update's spectrum shares.

    ``arm``: ``method`` (lora | rslora | full | scalora | relora), ``r``, and for scalora/relora the
    :class:`ScaLoRAConfig` fields (``interval``, ``shrink``, ``solver``, ``ablation``, ...).
    """
    from peft import LoraConfig, get_peft_model

    from ..methods.adapted_layers import find_adapted_linears
    from ..methods.scalora import ScaLoRA, ScaLoRAConfig
    from ..spectrum import energy_outside_top

    torch.manual_seed(seed)
    W0, D = teacher(seed)
    W0f, target = W0.float(), (W0 + D).float()
    model = _Linear(W0f)
    method, r = arm["method"], int(arm.get("r", 4))
    if method != "full":
        model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=["proj"],
                                                 use_rslora=(method == "rslora")))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    refresher = None
    if method in ("scalora", "relora"):
        options = {k: v for k, v in arm.items() if k not in ("method", "r", "name")}
        if method == "relora":
            options = {"restart": True, "interval": options.get("interval", 40), "warmup_steps": 40, **options}
        refresher = ScaLoRA(model, opt, ScaLoRAConfig(rank_sketch=0, **options))
    g = torch.Generator().manual_seed(seed)
    curve = []

    def weight():
        if method == "full":
            return model.proj.weight.detach().double()
        if refresher is not None:
            return refresher.effective_weight(refresher.layers[0]).double()
        return find_adapted_linears(model)[0].effective_weight().double()

    def error():
        return float((weight() - W0 - D).pow(2).sum() / D.pow(2).sum())

    for t in range(steps):
        x = torch.randn(BATCH, W0.shape[1], generator=g)
        loss = (model(x) - x @ target.T).pow(2).mean()
        loss.backward()
        if refresher is not None:
            refresher.refresh_if_due()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (t + 1) % 20 == 0:
            curve.append(error())
    final = curve[-1]
    update = weight() - W0
    return {"error": final if math.isfinite(final) else math.inf, "curve": curve,
            "energy_outside_top_r": energy_outside_top(update, r) if math.isfinite(final) else math.nan,
            "refreshes": dict(refresher.totals) if refresher is not None else None}
