"""Single-process reference for the DeepSpeed equivalence tests (plain torch, no DeepSpeed).

Trains the tiny PEFT LoRA Llama of ``tests/tiny_models.py`` for N optimizer steps with
``torch.optim.AdamW`` on the same deterministic global batches that ``zero_worker.py`` shards
across ranks, with the same loss normalisation and clipping, optionally with ``ds_scalora.ScaLoRA``
(the documented loop: backward -> refresh_if_due -> clip_grad_norm_ -> step). It returns (and the
CLI saves) the dictionary that the DeepSpeed worker writes::

    {"losses": [float] * steps,          # mean loss over the global batch, per optimizer step
     "grad_norms": [float] * steps,      # global grad norm before clipping, per step
     "trainable": {name: fp32 tensor},   # final LoRA factors (fp32 masters in bf16 runs)
     "frozen": {name: tensor},           # final frozen base weights, in the model's dtype
     "meta": {...}}

Data and loss normalisation (shared with the worker, see ``global_batch``/``rank_micro_batch``):
step ``t`` uses the global batch ``global_batch(t, G)`` of G sequences. The HF causal-LM loss is the
mean over the tokens of a (micro-)batch; every sequence has the same length and no padding, so the
mean over the global batch equals the mean of the K equal-sized micro-batch means. DeepSpeed divides
each micro-batch loss by GAS (engine.backward) and averages gradients over ranks, so its gradient is
the gradient of the global-batch mean; here the global batch is split into ``chunks`` equal parts,
each loss is divided by ``chunks`` before backward (``chunks=1``: one forward on the whole batch).

Precision: ``fp32`` trains everything in float32. ``bf16`` has two styles:

* ``master`` (default for LoRA): what DeepSpeed's ``bf16`` does. Every parameter (adapters too) is
  cast to bf16, buffers stay fp32; AdamW steps fp32 master copies made from the bf16 params; grads are computed in bf16,
  upcast for clipping and the step; the masters are copied back into the bf16 params.
* ``peft`` (required by ScaLoRA, whose refresh needs the optimizer to own the model's params):
  PEFT's own bf16 setup, bf16 base with fp32 adapters (``tiny_lora_model(torch.bfloat16)``).

Usage::

    python tests/distributed/reference.py --steps 6 --global-batch 8 --dtype fp32 --clip 1.0 --out ref.pt
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

_HERE = Path(__file__).resolve().parent
for _p in (_HERE.parent, _HERE):  # tests/ (tiny_models) and tests/distributed/
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from tiny_models import VOCAB, tiny_elastic_model, tiny_lora_model  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# ElaLoRA in the equivalence tests: 2 of 4 slots active per matrix, rounds at steps 3 and 5 of 8
ELALORA_TEST = {"init_rank": 2, "max_rank": 4, "init_warmup": 1, "final_warmup": 1, "interval": 2, "moves": 3,
                "per_matrix": 2}


def elalora_config(steps: int):
    from ds_scalora.methods import ElaLoRAConfig

    return ElaLoRAConfig(total_steps=steps, **ELALORA_TEST)


# ---------------------------------------------------------------------------------------------
# data: shared by the reference and the DeepSpeed worker
# ---------------------------------------------------------------------------------------------


def global_batch(step: int, size: int, seq_len: int = 16, data_seed: int = 1) -> dict:
    """The global batch of optimizer step ``step``: ``size`` random token sequences, labels = ids.

    Depends only on (step, size, seq_len, data_seed), never on the rank or the world size.
    """
    g = torch.Generator().manual_seed(data_seed * 1_000_003 + step)
    ids = torch.randint(0, VOCAB, (size, seq_len), generator=g)
    return {"input_ids": ids, "labels": ids.clone()}


def rank_micro_batch(batch: dict, rank: int, world: int, gas: int, micro: int, k: int) -> dict:
    """Micro-step ``k`` of data-parallel rank ``rank``: rows [(rank*gas + k)*micro, +micro).

    Each rank owns a contiguous block of ``gas*micro`` rows of the global batch (``world*gas*micro``
    rows); the union over ranks and GAS micro-steps is exactly the global batch, each row once.
    """
    n = batch["input_ids"].shape[0]
    if n != world * gas * micro:
        raise ValueError(f"global batch has {n} rows, expected world*gas*micro = {world}*{gas}*{micro}")
    start = (rank * gas + k) * micro
    return {key: value[start : start + micro] for key, value in batch.items()}


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """Options that must agree between the reference and the worker (same defaults on both)."""
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps")
    parser.add_argument("--clip", type=float, default=0.0, help="global grad-norm clipping; 0 = off")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--seq-len", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0, help="model init seed")
    parser.add_argument("--data-seed", type=int, default=1)
    parser.add_argument("--method", choices=["lora", "scalora", "elalora"], default="lora")
    parser.add_argument("--interval", type=int, default=1, help="ScaLoRA refresh interval")
    parser.add_argument("--scalora-warmup", type=int, default=2, help="ScaLoRA warmup_steps")
    parser.add_argument("--restart", action="store_true", help="ScaLoRA's refresh as a ReLoRA restart")
    parser.add_argument("--solver", default="column", help="ScaLoRA's solver (ds_scalora.scaling.SOLVERS)")


def build_model(dtype: str, seed: int = 0, bf16_style: str = "master", method: str = "lora",
                steps: int = 8) -> torch.nn.Module:  # fmt: skip
    """The tiny PEFT model as each setting sees it at step 0 (see the module docstring)."""
    if method == "elalora":
        if dtype != "fp32":
            raise ValueError("the ElaLoRA equivalence is checked in fp32")
        return tiny_elastic_model(torch.float32, seed=seed, total_steps=steps, init_rank=ELALORA_TEST["init_rank"],
                                  max_rank=ELALORA_TEST["max_rank"])  # fmt: skip
    if dtype == "fp32" or bf16_style == "master":
        model = tiny_lora_model(torch.float32, seed=seed)
        # DeepSpeed's bf16 casts every floating *parameter* (adapters included) but no buffer (the
        # rotary inv_freq stays fp32): engine._cast_module_mixed_precision. model.to() would cast both.
        with torch.no_grad():
            for p in model.parameters():
                p.data = p.data.to(DTYPES[dtype])
        return model
    if bf16_style == "peft":
        return tiny_lora_model(torch.bfloat16, seed=seed)
    raise ValueError(f"unknown bf16_style {bf16_style!r}")


def split_params(model: torch.nn.Module):
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p for n, p in model.named_parameters() if not p.requires_grad}
    return trainable, frozen


# ---------------------------------------------------------------------------------------------
# the reference loop
# ---------------------------------------------------------------------------------------------


def train_reference(
    *,
    steps: int = 6,
    global_batch_size: int = 8,
    dtype: str = "fp32",
    clip: float = 0.0,
    lr: float = 1e-2,
    weight_decay: float = 0.01,
    seq_len: int = 16,
    seed: int = 0,
    data_seed: int = 1,
    chunks: int = 1,
    method: str = "lora",
    interval: int = 1,
    scalora_warmup: int = 2,
    bf16_style: str | None = None,
    restart: bool = False,
    solver: str = "column",
    device: str = "cpu",
) -> dict:
    """Train in this process and return the result dictionary (see the module docstring); ``device``: where
    the model trains (the result's tensors come back on the CPU)."""
    if global_batch_size % chunks:
        raise ValueError("global_batch_size must be a multiple of chunks")
    if bf16_style is None:
        bf16_style = "peft" if method == "scalora" else "master"
    masters_mode = dtype == "bf16" and bf16_style == "master"
    if masters_mode and method == "scalora":
        raise ValueError("ScaLoRA's reference needs the optimizer to own the model params: use bf16_style='peft'")
    torch.use_deterministic_algorithms(True, warn_only=True)
    t0 = time.perf_counter()
    model = build_model(dtype, seed, bf16_style, method=method, steps=steps).to(device)
    trainable, _ = split_params(model)
    if masters_mode:
        masters = {n: p.detach().float().clone() for n, p in trainable.items()}
        opt_params = list(masters.values())
    else:
        masters = trainable
        opt_params = list(trainable.values())
    opt = torch.optim.AdamW(opt_params, lr=lr, weight_decay=weight_decay)
    scalora = None
    if method == "scalora":
        from ds_scalora import ScaLoRA, ScaLoRAConfig

        scalora = ScaLoRA(model, opt, ScaLoRAConfig(interval=interval, warmup_steps=scalora_warmup, restart=restart,
                                                    solver=solver, rank_sketch_every=1))
    elalora = None
    if method == "elalora":
        from ds_scalora.methods import ElaLoRA

        elalora = ElaLoRA(model, opt, elalora_config(steps))

    losses, grad_norms, accumulated_rank = [], [], None
    rows = global_batch_size // chunks
    for step in range(steps):
        batch = global_batch(step, global_batch_size, seq_len, data_seed)
        total = 0.0
        for c in range(chunks):
            part = {k: v[c * rows : (c + 1) * rows].to(device) for k, v in batch.items()}
            loss = model(**part).loss
            (loss / chunks).backward()
            total += float(loss.detach().float()) / chunks
        if scalora is not None:
            report = scalora.refresh_if_due()
            if report is not None:
                accumulated_rank = report.accumulated_rank
        if elalora is not None:
            elalora.after_backward()
        if masters_mode:
            for n, m in masters.items():
                g = trainable[n].grad
                m.grad = torch.zeros_like(m) if g is None else g.float()
        # max_norm=inf computes the norm without clipping (same 1e-6 epsilon as DeepSpeed otherwise)
        norm = torch.nn.utils.clip_grad_norm_(opt_params, clip if clip > 0 else float("inf"))
        opt.step()
        opt.zero_grad(set_to_none=True)
        if masters_mode:
            with torch.no_grad():
                for n, p in trainable.items():
                    p.copy_(masters[n])
                    p.grad = None
        losses.append(total)
        grad_norms.append(float(norm))

    _, frozen = split_params(model)
    return {
        "losses": losses,
        "grad_norms": grad_norms,
        "trainable": {n: m.detach().float().cpu().clone() for n, m in masters.items()},
        "frozen": {n: p.detach().cpu().clone() for n, p in frozen.items()},
        # ScaLoRA: the merged weights at the precision policy's full precision
        "merged": {} if scalora is None else {
            f"{layer.name}.base_layer.weight": scalora.merged_weight(layer).cpu() for layer in scalora.layers
        },
        "elalora": None if elalora is None else {"active": [a.clone() for a in elalora.core.active],
                                                  "rounds": elalora.core.rounds},
        "meta": {
            "kind": "reference",
            "accumulated_rank": accumulated_rank,
            "dtype": dtype,
            "bf16_style": bf16_style if dtype == "bf16" else None,
            "method": method,
            "steps": steps,
            "global_batch": global_batch_size,
            "chunks": chunks,
            "clip": clip,
            "seconds": time.perf_counter() - t0,
        },
    }


# ---------------------------------------------------------------------------------------------
# comparing two result dictionaries
# ---------------------------------------------------------------------------------------------


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in float64 (0 when both are zero)."""
    a, b = a.double(), b.double()
    den = float(b.norm())
    num = float((a - b).norm())
    return num / den if den else num


def compare_results(got: dict, ref: dict) -> dict:
    """Summary of the differences between two result dictionaries (same keys required).

    ``trainable_max_rel``: max over LoRA tensors of ‖got − ref‖/‖ref‖ (the worst tensor);
    ``trainable_global_rel``: the same over all LoRA tensors concatenated;
    ``loss_max_abs`` / ``grad_norm_max_rel``: over steps (the latter None when a side has no grad
norms); ``frozen_mismatch``: names of frozen tensors
    that are not bit-identical (dtype and values).
    """
    if set(got["trainable"]) != set(ref["trainable"]) or set(got["frozen"]) != set(ref["frozen"]):
        raise AssertionError("the two results have different parameter names")
    names = sorted(ref["trainable"])
    rel = {n: relative(got["trainable"][n], ref["trainable"][n]) for n in names}
    worst = max(rel, key=rel.get)
    flat_got = torch.cat([got["trainable"][n].flatten() for n in names])
    flat_ref = torch.cat([ref["trainable"][n].flatten() for n in names])
    losses = torch.tensor(got["losses"], dtype=torch.float64) - torch.tensor(ref["losses"], dtype=torch.float64)
    gn_got = torch.tensor(got["grad_norms"], dtype=torch.float64)
    gn_ref = torch.tensor(ref["grad_norms"], dtype=torch.float64)
    gn_rel = (gn_got - gn_ref).abs() / gn_ref
    gn_rel = gn_rel[~(gn_got.isnan() | gn_ref.isnan())]  # stage 0 reports no grad norm
    mismatch = [
        n
        for n in sorted(ref["frozen"])
        if got["frozen"][n].dtype != ref["frozen"][n].dtype or not torch.equal(got["frozen"][n], ref["frozen"][n])
    ]
    return {
        "trainable_max_rel": rel[worst],
        "trainable_worst": worst,
        "trainable_global_rel": relative(flat_got, flat_ref),
        "loss_max_abs": float(losses.abs().max()),
        "grad_norm_max_rel": float(gn_rel.max()) if gn_rel.numel() else None,
        "frozen_mismatch": mismatch,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(parser)
    parser.add_argument("--global-batch", type=int, default=8, help="sequences per optimizer step")
    parser.add_argument("--chunks", type=int, default=1, help="split the global batch into this many backward passes")
    parser.add_argument("--bf16-style", choices=["master", "peft"], default=None)
    parser.add_argument("--out", required=True)
    a = parser.parse_args(argv)
    result = train_reference(
        steps=a.steps,
        global_batch_size=a.global_batch,
        dtype=a.dtype,
        clip=a.clip,
        lr=a.lr,
        weight_decay=a.weight_decay,
        seq_len=a.seq_len,
        seed=a.seed,
        data_seed=a.data_seed,
        chunks=a.chunks,
        method=a.method,
        interval=a.interval,
        scalora_warmup=a.scalora_warmup,
        bf16_style=a.bf16_style,
        restart=a.restart,
        solver=a.solver,
    )
    torch.save(result, a.out)
    print(f"losses {['%.6f' % x for x in result['losses']]} -> {a.out}")


if __name__ == "__main__":
    main()
