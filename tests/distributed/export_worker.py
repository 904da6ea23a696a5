"""Load a ``launch/train.py`` checkpoint into a DeepSpeed engine, built exactly as the run built it, and
dump what the engine computes: logits on a fixed batch and, per adapted layer, the controller's full
merged weight (fp32 at the policy's precision) and the fp32 masters of the factors. Rank 0 writes.

    deepspeed --num_gpus N tests/distributed/export_worker.py --config tiny.yaml --set k=v ... \
        --checkpoint RUN/checkpoints/stepNNNNNNNN --out result.pt
    ... tests/distributed/export_worker.py --plan runs.json   # several checkpoints in one launch (plan.py)
"""

from __future__ import annotations

import argparse
import os

import torch


def fixed_batch(vocab: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1234)
    return torch.randint(0, vocab, (2, 16), generator=g)


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--set", nargs="*", default=[])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--local_rank", type=int, default=0)
    a = p.parse_args(argv)

    import torch.distributed as dist

    from ds_scalora.deepspeed_import import import_deepspeed

    deepspeed = import_deepspeed()  # the product's own first import (without mlflow)
    from deepspeed.utils import safe_get_full_fp32_param

    from ds_scalora.methods.scalora import ScaLoRAConfig
    from ds_scalora.train import checkpoints
    from ds_scalora.train.config import load_config
    from ds_scalora.train.loop import deepspeed_config, lr_scheduler
    from ds_scalora.train.model import load_model_and_tokenizer
    from ds_scalora.zero import attach, disable_cpu_shm_comm

    disable_cpu_shm_comm()
    deepspeed.init_distributed()
    cfg = load_config(a.config, a.set)
    ds_config = deepspeed_config(cfg, dist.get_world_size())
    model, tokenizer = load_model_and_tokenizer(cfg, ds_config)
    trainable = [q for q in model.parameters() if q.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.train.learning_rate, weight_decay=cfg.train.weight_decay)
    scheduler = lr_scheduler(optimizer, cfg)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    o = cfg.method.scalora
    controller = attach(engine, model, ScaLoRAConfig(interval=o.interval, strength=o.strength,
                                                     warmup_steps=o.warmup_steps, solver=o.solver,
                                                     precision=o.precision, rank_sketch=o.rank_sketch,
                                                     rank_sketch_every=o.rank_sketch_every,
                                                     seed=cfg.train.seed))  # fmt: skip
    root, tag = os.path.split(os.path.abspath(a.checkpoint))
    checkpoints.load(engine, controller, root, tag)

    layers = {}
    for layer in controller.layers:
        W = controller.full_merged_weight(layer).detach().double().cpu()
        A = safe_get_full_fp32_param(layer.lora_A).detach().double().cpu()
        B = safe_get_full_fp32_param(layer.lora_B).detach().double().cpu()
        key = layer.name.removeprefix("base_model.model.") + ".weight"
        layers[key] = {"merged_frozen": W, "lora_A": A, "lora_B": B, "scale": float(layer.scale)}
    engine.eval()
    ids = fixed_batch(len(tokenizer)).to(engine.device)
    with torch.no_grad():
        logits = engine(input_ids=ids).logits.detach().double().cpu()
    if dist.get_rank() == 0:
        torch.save({"logits": logits, "input_ids": ids.cpu(), "layers": layers,
                    "meta": {"world": dist.get_world_size(), "stage": engine.zero_optimization_stage()}}, a.out)  # fmt: skip
    dist.barrier()
    engine.destroy()  # a next run of a --plan starts clean


if __name__ == "__main__":
    from plan import main_or_plan  # beside this script: the first entry of sys.path

    main_or_plan(main)
    from ds_scalora.zero import end_distributed, exit_process

    end_distributed()  # barrier + destroy_process_group
    exit_process(0)  # on gloo: os._exit, see ds_scalora/zero/teardown.py
